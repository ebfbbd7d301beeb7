"""The ``lpcompile`` command: parses arguments, calls one library function, prints.

Exit codes: 0 success; 1 failure (bad model, plan, data, infeasible budget, internal error);
2 usage error (bad flags or arguments, an output that would replace an input); 130 interrupted
(SIGINT / Ctrl-C); 143 terminated (SIGTERM). Every failure is one line on stderr.

The signal handlers are installed first thing in :func:`main`, before the command modules (and
numpy, onnx, torch behind them) are imported: a signal at any moment ends the run with one line
and its exit code, and the temp files of unfinished outputs are removed on the way out
(:class:`lpcompile.io_utils.OutputSession`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

from lpcompile import __version__
from lpcompile.errors import LpError, UsageError

# modules under lpcompile.commands, each exposing register(subparsers) -> parser and run(args) -> int
COMMAND_MODULES: tuple[str, ...] = (
    "compile",
    "apply",
    "evaluate",
    "analyze",
    "plan",
    "lower",
    "run",
    "view",
    "report",
    "demo",
)

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        sys.stderr.write(f"lpcompile: error: {message}\n")
        sys.exit(EXIT_USAGE)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("--json", action="store_true", help="print a machine-readable JSON summary on stdout")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lpcompile",
        description="Rewrite an ONNX model to mixed precision under a bit budget.\n"
        "  lpcompile MODEL --budget 4.5bits   (= lpcompile compile MODEL --budget 4.5bits)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"lpcompile {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for module in COMMAND_MODULES:
        mod = importlib.import_module(f"lpcompile.commands.{module}")
        p = mod.register(sub)
        _common(p)
        p.set_defaults(_run=mod.run)
    return parser


def _stop_handler(exc: type[BaseException]) -> Callable[[int, FrameType | None], None]:
    """A handler that raises ``exc`` once, then ignores SIGINT and SIGTERM while the run cleans up."""

    def handler(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise exc

    return handler


def install_signal_handlers() -> dict[int, Any]:
    """SIGINT raises KeyboardInterrupt, SIGTERM raises :class:`~lpcompile.io_utils.Terminated`.

    Returns the previous handlers (for :func:`restore_signal_handlers`). Does nothing outside the
    main thread.
    """
    from lpcompile.io_utils import Terminated

    if not _main_thread():
        return {}
    previous = {
        signal.SIGINT: signal.signal(signal.SIGINT, _stop_handler(KeyboardInterrupt)),
        signal.SIGTERM: signal.signal(signal.SIGTERM, _stop_handler(Terminated)),
    }
    return previous


def restore_signal_handlers(previous: dict[int, Any]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else ""


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (see the module docstring)."""
    from lpcompile.io_utils import Terminated

    previous = install_signal_handlers()
    try:
        return _main(argv)
    except KeyboardInterrupt:
        sys.stderr.write("lpcompile: interrupted\n")
        return EXIT_INTERRUPTED
    except Terminated:
        sys.stderr.write("lpcompile: terminated\n")
        return EXIT_TERMINATED
    finally:
        restore_signal_handlers(previous)


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    known = set(parser._subparsers._group_actions[0].choices) if parser._subparsers else set()
    if argv and argv[0] not in known and not argv[0].startswith("-"):
        argv = ["compile", *argv]
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help / --version (0) and usage errors (2, already printed)
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    from lpcompile.console import setup_logging

    setup_logging(args.verbose, args.quiet)
    try:
        return int(args._run(args) or 0)
    except UsageError as exc:
        sys.stderr.write(f"lpcompile: error: {_first_line(exc)}\n")
        return exc.exit_code
    except LpError as exc:
        sys.stderr.write(f"lpcompile: {_first_line(exc)}\n")
        return exc.exit_code
    except MemoryError:
        sys.stderr.write("lpcompile: out of memory (try a smaller --max-samples or --batch-size)\n")
        return EXIT_FAILURE
    except RecursionError:
        sys.stderr.write("lpcompile: input nested too deeply to process\n")
        return EXIT_FAILURE
    except OSError as exc:
        if os.environ.get("LPCOMPILE_DEBUG"):
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        sys.stderr.write(f"lpcompile: cannot access {where}{exc.strerror or _first_line(exc) or type(exc).__name__}\n")
        return EXIT_FAILURE
    except Exception as exc:  # the last line of defence: one line, no traceback unless asked
        if os.environ.get("LPCOMPILE_DEBUG"):
            raise
        sys.stderr.write(
            f"lpcompile: internal error: {type(exc).__name__}: {_first_line(exc)} "
            "(set LPCOMPILE_DEBUG=1 for a traceback)\n"
        )
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
