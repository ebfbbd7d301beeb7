"""The ``lpcompile`` command: parses arguments, calls one library function, prints.

Exit codes: 0 success; 1 failure (bad model, plan, data, infeasible budget, internal error);
2 usage error (bad flags or arguments); 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from lpcompile import __version__
from lpcompile.console import setup_logging
from lpcompile.errors import LpError, UsageError

logger = logging.getLogger(__name__)

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


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        sys.stderr.write(f"lpcompile: error: {message}\n")
        sys.exit(2)


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


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    known = set(parser._subparsers._group_actions[0].choices) if parser._subparsers else set()
    if argv and argv[0] not in known and not argv[0].startswith("-"):
        argv = ["compile", *argv]
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return 2
    setup_logging(args.verbose, args.quiet)
    try:
        return int(args._run(args) or 0)
    except UsageError as exc:
        sys.stderr.write(f"lpcompile: error: {exc}\n")
        return exc.exit_code
    except LpError as exc:
        sys.stderr.write(f"lpcompile: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("lpcompile: interrupted\n")
        return 130
    except Exception as exc:  # the last line of defence: one line, no traceback unless asked
        if os.environ.get("LPCOMPILE_DEBUG"):
            raise
        msg = str(exc).splitlines()[0] if str(exc) else ""
        sys.stderr.write(
            f"lpcompile: internal error: {type(exc).__name__}: {msg} (set LPCOMPILE_DEBUG=1 for a traceback)\n"
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
