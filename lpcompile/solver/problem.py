"""Data model of the budget problem: items, their format choices, solutions and ``--keep`` rules.

An :class:`Item` is one quantizable weight tensor with the formats it may take; each
:class:`Choice` carries the effective bits per weight of that format on that item (scale
overhead included) and the predicted loss increase. Items that share a ``group`` string are
tied: they must all get the same format, chosen among the formats common to all members.

``--keep`` rules (``parse_keep`` / ``apply_rules``) restrict the choices before solving:

* ``REGEX=FMT`` pins matching items to ``FMT``; ``REGEX=FMT1,FMT2`` allows only those formats;
* ``REGEX=!FMT`` (or ``REGEX=!FMT1,FMT2``) excludes formats;
* ``REGEX`` alone pins matching items to ``fp32``.

The rule splits at its last ``=`` unless that ``=`` belongs to regex syntax (``(?=``, ``(?<=``,
``(?P=``), in which case the whole text is the regex. Spaces around the regex and the formats are
ignored. The regex is searched
(``re.search``) in item names: anchor with ``^``/``$`` for exact names. Every rule that matches an
item applies (their restrictions intersect), so rule order does not matter.

Errors: bad rule syntax or a rule that matches no item -> ``UsageError`` (a command-line mistake);
a pinned format an item cannot take, or rules that leave an item no format -> ``FormatError``;
inconsistent items (duplicate names, no choices, bad numbers) -> ``PlanError``.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from lpcompile.budget import Budget
from lpcompile.errors import FormatError, PlanError, UsageError

logger = logging.getLogger(__name__)

#: format used by a bare ``--keep REGEX`` rule.
DEFAULT_KEEP_FORMAT = "fp32"

_FORMAT_TOKEN = re.compile(r"[A-Za-z0-9_.\-]+")
_FORMAT_LIST = re.compile(r"!?\s*[A-Za-z0-9_.\-]+(?:\s*,\s*[A-Za-z0-9_.\-]+)*\s*")


@dataclass(frozen=True)
class Choice:
    """One format an item may take.

    Attributes:
        format: format name (e.g. ``"int4"``).
        bits: effective bits per weight of this format on this item, scale overhead included.
        loss: predicted loss increase of this format on this item (normally >= 0; a negative
            value, e.g. a noisy estimate, is taken literally).
    """

    format: str
    bits: float
    loss: float

    def __post_init__(self) -> None:
        if not isinstance(self.format, str) or not self.format:
            raise PlanError(f"choice format must be a non-empty string, got {self.format!r}")
        bits, loss = _as_float(self.bits, "bits", self.format), _as_float(self.loss, "loss", self.format)
        if bits < 0:
            raise PlanError(f"choice {self.format!r}: bits must be >= 0, got {bits}")
        object.__setattr__(self, "bits", bits)
        object.__setattr__(self, "loss", loss)


@dataclass(frozen=True)
class Item:
    """One quantizable node: a weight tensor of ``params`` elements and its format choices."""

    name: str
    params: int
    choices: tuple[Choice, ...]
    group: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise PlanError(f"item name must be a non-empty string, got {self.name!r}")
        if isinstance(self.params, bool) or not isinstance(self.params, int | np.integer):
            raise PlanError(f"item {self.name!r}: params must be an integer, got {self.params!r}")
        if self.params < 0:
            raise PlanError(f"item {self.name!r}: params must be >= 0, got {self.params}")
        object.__setattr__(self, "params", int(self.params))
        choices = tuple(self.choices)
        if not choices:
            raise PlanError(f"item {self.name!r} has no format choices")
        if not all(isinstance(c, Choice) for c in choices):
            raise PlanError(f"item {self.name!r}: choices must be Choice objects")
        formats = [c.format for c in choices]
        if len(set(formats)) != len(formats):
            raise PlanError(f"item {self.name!r} lists a format twice: {formats}")
        object.__setattr__(self, "choices", choices)
        if self.group is not None and (not isinstance(self.group, str) or not self.group):
            raise PlanError(f"item {self.name!r}: group must be a non-empty string or None")

    @property
    def formats(self) -> tuple[str, ...]:
        return tuple(c.format for c in self.choices)

    def choice(self, fmt: str) -> Choice:
        """The choice for ``fmt``; ``FormatError`` when the item cannot take it."""
        for c in self.choices:
            if c.format == fmt:
                return c
        raise FormatError(f"format {fmt!r} is not available for {self.name!r} (choices: {', '.join(self.formats)})")


@dataclass(frozen=True)
class Solution:
    """The solver's answer for one budget.

    Attributes:
        assignments: item name -> format, for every item.
        total_bits: Σ bits·params of the chosen formats.
        achieved_bits: ``total_bits / Σ params`` (0 when there are no parameters).
        predicted_loss: Σ loss of the chosen formats.
        optimal: the assignment is proven optimal (False after a time limit).
        status: one line on how the answer was reached.
        budget: the budget solved for.
        total_params: Σ params of all items.
    """

    assignments: dict[str, str]
    total_bits: float
    achieved_bits: float
    predicted_loss: float
    optimal: bool
    status: str
    budget: Budget | None = None
    total_params: int = 0


@dataclass(frozen=True)
class KeepRule:
    """A ``--keep`` rule: items whose name matches ``pattern`` may only take (or, with
    ``exclude``, may not take) ``formats``."""

    pattern: str
    formats: tuple[str, ...]
    exclude: bool = False
    spec: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern:
            raise UsageError("--keep rule needs a non-empty regex")
        try:
            compiled = re.compile(self.pattern)
        except re.error as exc:
            raise UsageError(f"--keep {self.spec or self.pattern!r}: bad regex: {exc}") from None
        if not self.formats or not all(isinstance(f, str) and _FORMAT_TOKEN.fullmatch(f) for f in self.formats):
            raise UsageError(f"--keep {self.spec or self.pattern!r}: bad format list {self.formats!r}")
        object.__setattr__(self, "_regex", compiled)
        if not self.spec:
            rhs = ("!" if self.exclude else "") + ",".join(self.formats)
            object.__setattr__(self, "spec", f"{self.pattern}={rhs}")

    def matches(self, name: str) -> bool:
        return self.__dict__["_regex"].search(name) is not None

    def allowed(self, formats: Iterable[str]) -> tuple[str, ...]:
        """The subset of ``formats`` this rule leaves (order kept)."""
        wanted = set(self.formats)
        return tuple(f for f in formats if (f in wanted) != self.exclude)

    def __str__(self) -> str:
        return self.spec


def parse_keep(spec: str) -> KeepRule:
    """Parse one ``--keep`` rule (see the module docstring).

    Raises:
        UsageError: empty rule, empty regex, bad regex or bad format list.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError("--keep rule is empty: expected REGEX=FMT, REGEX=!FMT or REGEX")
    text = spec.strip()
    pattern, sep, rhs = text.rpartition("=")
    pattern = pattern.strip()
    if not sep or pattern.endswith(("(?", "(?<", "(?P")):  # no '=', or regex syntax: (?=, (?<=, (?P=
        return KeepRule(text, (DEFAULT_KEEP_FORMAT,), False, text)
    if not pattern:
        raise UsageError(f"--keep {spec!r}: the regex before '=' is empty")
    if not _FORMAT_LIST.fullmatch(rhs.strip()):
        raise UsageError(f"--keep {spec!r}: expected a format (or FMT1,FMT2, or !FMT) after '=', got {rhs.strip()!r}")
    rhs = rhs.strip()
    exclude = rhs.startswith("!")
    formats = tuple(f.strip() for f in rhs[1:].split(",")) if exclude else tuple(f.strip() for f in rhs.split(","))
    return KeepRule(pattern, formats, exclude, text)


def apply_rules(items: Sequence[Item], rules: Sequence[KeepRule]) -> tuple[Item, ...]:
    """Restrict each item's choices by every rule matching its name.

    Raises:
        UsageError: a rule matches no item.
        FormatError: an item cannot take a format a rule pins, or the rules leave it no format.
    """
    out: list[Item] = []
    hits = [0] * len(rules)
    for item in items:
        formats = item.formats
        applied: list[str] = []
        for k, rule in enumerate(rules):
            if not rule.matches(item.name):
                continue
            hits[k] += 1
            applied.append(rule.spec)
            if not rule.exclude:
                missing = [f for f in rule.formats if f not in item.formats]
                if len(missing) == len(rule.formats):
                    raise FormatError(
                        f"--keep {rule.spec!r}: {item.name!r} cannot take {', '.join(missing)} "
                        f"(choices: {', '.join(item.formats)})"
                    )
            formats = rule.allowed(formats)
        if not formats:
            raise FormatError(f"--keep rules {', '.join(map(repr, applied))} leave no format for {item.name!r}")
        if len(formats) != len(item.formats):
            item = replace(item, choices=tuple(c for c in item.choices if c.format in formats))
        out.append(item)
    for rule, n in zip(rules, hits, strict=True):
        if n == 0:
            raise UsageError(f"--keep {rule.spec!r} matches no quantizable node")
    for rule, n in zip(rules, hits, strict=True):
        logger.debug("--keep %r matched %d item(s)", rule.spec, n)
    return tuple(out)


def _as_float(x: object, what: str, fmt: str) -> float:
    try:
        v = float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise PlanError(f"choice {fmt!r}: {what} must be a number, got {x!r}") from None
    if not math.isfinite(v):
        raise PlanError(f"choice {fmt!r}: {what} must be finite, got {x!r}")
    return v
