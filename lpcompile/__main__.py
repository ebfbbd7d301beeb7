"""``python -m lpcompile``: the ``lpcompile`` command."""

import os
import signal
import sys

_stopped: list[int] = []


def _early(signum: int, frame: object) -> None:
    """Before main() installs its handlers: one line, exit 130 (SIGINT) or 143 (SIGTERM)."""
    if not _stopped:
        os.write(2, b"lpcompile: terminated\n" if signum == signal.SIGTERM else b"lpcompile: interrupted\n")
    _stopped.append(signum)
    sys.exit(143 if signum == signal.SIGTERM else 130)


# first thing, before the command modules (numpy, onnx, torch) are imported; signals the parent set
# to be ignored stay ignored
for _signum in (signal.SIGINT, signal.SIGTERM):
    if signal.getsignal(_signum) != signal.SIG_IGN:
        signal.signal(_signum, _early)

from lpcompile.cli import main  # noqa: E402

if _stopped:  # CPython can lose the SystemExit raised while a module is being compiled
    sys.exit(143 if _stopped[0] == signal.SIGTERM else 130)
sys.exit(main())
