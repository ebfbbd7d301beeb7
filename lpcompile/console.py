"""Terminal output: rich tables and progress on stderr, machine-readable JSON on stdout."""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Output:
    """Where and how a command talks: ``quiet`` silences tables, ``json`` prints JSON instead."""

    quiet: bool = False
    json: bool = False

    @property
    def console(self) -> Console:
        return Console(stderr=True, quiet=self.quiet, highlight=False)

    def table(self, title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        if self.quiet or self.json:
            return
        table = Table(title=title, show_lines=False, header_style="bold")
        for col in columns:
            table.add_column(col, overflow="fold")
        for row in rows:
            table.add_row(*(_cell(v) for v in row))
        self.console.print(table)

    def line(self, text: str) -> None:
        if not (self.quiet or self.json):
            self.console.print(text)

    def emit_json(self, payload: Any) -> None:
        if self.json:
            sys.stdout.write(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
            sys.stdout.flush()


class StageProgress:
    """A rich progress bar per analysis stage (``hessian``, ``validate``, ...), as a callback."""

    def __init__(self, output: Output) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._enabled = not (output.quiet or output.json)
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=output.console,
            transient=False,
        )
        self._tasks: dict[str, int] = {}
        self._started = False

    def __enter__(self) -> StageProgress:
        return self  # the bar starts on the first update: a command that fails early prints nothing

    def __exit__(self, *exc: object) -> None:
        if self._started:
            self._progress.stop()

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self._enabled:
            return
        if not self._started:
            self._progress.start()
            self._started = True
        if stage not in self._tasks:
            self._tasks[stage] = self._progress.add_task(stage, total=total)
        self._progress.update(self._tasks[stage], completed=done, total=total)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3e}"
        return f"{v:.4g}"
    return str(v)


def setup_logging(verbosity: int, quiet: bool) -> None:
    """WARNING by default, INFO with -v, DEBUG with -vv, ERROR only with -q (on stderr)."""
    level = logging.ERROR if quiet else [logging.WARNING, logging.INFO, logging.DEBUG][min(verbosity, 2)]
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = RichHandler(console=Console(stderr=True), show_time=False, show_path=False, markup=False)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    warnings.showwarning = _log_warning  # Python warnings (numpy's RuntimeWarning...) as one log line


def _log_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: object = None,
    line: str | None = None,
) -> None:
    logging.getLogger("py.warnings").warning(
        "%s: %s (%s:%d)", category.__name__, message, os.path.basename(filename), lineno
    )
