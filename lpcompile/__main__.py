"""``python -m lpcompile``: the ``lpcompile`` command."""

import signal
import sys

# first thing: a signal before main() installs its handlers ends the run with 130/143 and no output
signal.signal(signal.SIGINT, lambda *_: sys.exit(130))
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

from lpcompile.cli import main  # noqa: E402

sys.exit(main())
