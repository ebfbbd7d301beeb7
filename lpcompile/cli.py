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

import os
import signal
import sys

_EARLY_SIGNALS: list[int] = []
"""Signals received before :func:`main` installed its handlers (entry-point bookkeeping: CPython can
lose the ``SystemExit`` raised while a module is being compiled, so :func:`main` checks this too)."""


def _early_handler(signum: int, frame: object) -> None:
    if not _EARLY_SIGNALS:
        os.write(2, b"lpcompile: terminated\n" if signum == signal.SIGTERM else b"lpcompile: interrupted\n")
    _EARLY_SIGNALS.append(signum)
    sys.exit(143 if signum == signal.SIGTERM else 130)


def _install_early() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            if signal.getsignal(signum) != signal.SIG_IGN:
                signal.signal(signum, _early_handler)
        except ValueError:  # not the main thread
            return


if sys.argv and os.path.basename(sys.argv[0]) == "lpcompile":  # the console script: before any other import
    _install_early()

import argparse  # noqa: E402
import importlib  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from types import FrameType  # noqa: E402
from typing import Any  # noqa: E402

from lpcompile import __version__  # noqa: E402
from lpcompile.errors import LpError, UsageError  # noqa: E402
from lpcompile.io_utils import Terminated, block_signals, unblock_signals  # noqa: E402

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


@dataclass
class Signals:
    """The stop signal this run received (``received`` is 0 until one arrives) and the handlers it replaced."""

    received: int = 0
    previous: dict[int, Any] = field(default_factory=dict)

    def handler(self, signum: int, frame: FrameType | None) -> None:
        """Raise once (KeyboardInterrupt or Terminated); later signals are only recorded while the run
        cleans up. Imports nothing (a signal may land in the middle of an import)."""
        if self.received:
            return
        self.received = signum
        raise KeyboardInterrupt if signum == signal.SIGINT else Terminated

    @property
    def exit_code(self) -> int:
        return EXIT_TERMINATED if self.received == signal.SIGTERM else EXIT_INTERRUPTED

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self.previous = {}


def install_signal_handlers() -> Signals:
    """SIGINT raises KeyboardInterrupt, SIGTERM raises :class:`~lpcompile.io_utils.Terminated`.

    Returns the :class:`Signals` record (call its ``restore()`` to put the previous handlers back).
    A signal the parent set to be ignored stays ignored (``nohup``, background jobs of a shell).
    Does nothing outside the main thread.
    """
    sig = Signals()
    if _main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(signum) != signal.SIG_IGN:  # a shell running us in the background ignores SIGINT
                sig.previous[signum] = signal.signal(signum, sig.handler)
    return sig


def exit_early_on_signals() -> None:
    """Before anything heavy is imported: SIGINT/SIGTERM end the process with one line and 130/143
    (``SystemExit`` prints no traceback). :func:`main` replaces these with :func:`install_signal_handlers`."""
    if _main_thread():
        _install_early()


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else ""


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (see the module docstring)."""
    if _EARLY_SIGNALS:  # stopped before main() (the line is written already)
        return EXIT_TERMINATED if _EARLY_SIGNALS[0] == signal.SIGTERM else EXIT_INTERRUPTED
    hooks = sys.excepthook, sys.unraisablehook
    sig = install_signal_handlers()
    try:
        _quiet_hooks()
        code = _main(argv)
        if sig.received:  # the stop exception was swallowed somewhere: still a stopped run
            sys.stderr.write(
                "lpcompile: terminated\n" if sig.exit_code == EXIT_TERMINATED else "lpcompile: interrupted\n"
            )
            return sig.exit_code
        return code
    except BaseException as exc:
        # a signal may surface as another exception (numpy turns an interrupted import into ImportError)
        if not sig.received and not isinstance(exc, KeyboardInterrupt):
            if isinstance(exc, SystemExit | GeneratorExit) or os.environ.get("LPCOMPILE_DEBUG"):
                raise
            sys.stderr.write(f"lpcompile: internal error: {type(exc).__name__}: {_first_line(exc)}\n")
            return EXIT_FAILURE
        code = sig.exit_code if sig.received else EXIT_INTERRUPTED
        sys.stderr.write("lpcompile: terminated\n" if code == EXIT_TERMINATED else "lpcompile: interrupted\n")
        return code
    finally:
        sig.restore()
        sys.excepthook, sys.unraisablehook = hooks


def _quiet_hooks() -> None:
    """C extensions interrupted in their module init print the KeyboardInterrupt themselves
    (``PyErr_Print`` / unraisable): the run reports it in one line instead."""
    stop = (KeyboardInterrupt, Terminated)
    excepthook, unraisablehook = sys.excepthook, sys.unraisablehook

    def on_exception(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        if not issubclass(kind, stop):
            excepthook(kind, value, tb)

    def on_unraisable(info: Any) -> None:
        if not isinstance(info.exc_value, stop):
            unraisablehook(info)

    sys.excepthook, sys.unraisablehook = on_exception, on_unraisable


def _build_parser_uninterrupted() -> argparse.ArgumentParser:
    """Import the command modules (numpy, onnx, ... behind them) with SIGINT/SIGTERM held back: a
    signal during a C extension's import would come out as a garbled ImportError; it is delivered
    right after instead."""
    blocked = block_signals()
    try:
        return build_parser()
    finally:
        unblock_signals(blocked)


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser_uninterrupted()
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
