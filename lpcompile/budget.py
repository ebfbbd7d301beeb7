"""Size budgets: parsing ``4.5bits`` / ``4.5`` / ``12MB`` and converting them to a total bit count.

Accepted syntax (``parse_budget``), whitespace between number and unit allowed:

* bits per weight: a bare number (``4.5``) or a number with ``bits``, ``bit`` or ``bpw``
  (case-insensitive): ``4.5bits``, ``4.5 bits``, ``4.5bpw``.
* bytes: ``B``, decimal ``KB``/``kB``, ``MB``, ``GB``, ``TB`` (powers of 1000) and binary ``KiB``,
  ``MiB``, ``GiB``, ``TiB`` (powers of 1024): ``12MB``, ``12 MiB``, ``500KB``, ``1.5GB``, ``1024B``.

Rejected: a lone ``b`` (``4.5b`` is ambiguous between bits and bytes), lower-case byte units
such as ``mb`` (conventionally megabits), zero, negative, NaN, infinite or malformed numbers.

A bits budget is an average over the quantizable weights (Σ bits·params ≤ budget·Σ params);
a bytes budget caps the bytes of those weights (scale overhead included, as the per-format
bit counts include it). Whatever is not quantizable is outside the budget: a caller that wants
a whole-file size must subtract the fixed part first.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal
from typing import Literal

from lpcompile.errors import BudgetError

logger = logging.getLogger(__name__)

BudgetKind = Literal["bits", "bytes"]

#: byte unit -> number of bytes.
BYTE_UNITS: dict[str, int] = {
    "B": 1,
    "KB": 1000,
    "kB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "TiB": 1024**4,
}
_BITS_UNITS = frozenset({"bits", "bit", "bpw"})

_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_BUDGET_RE = re.compile(rf"^\s*(?P<num>{_NUMBER})\s*(?P<unit>[A-Za-z]*)\s*$")

_FORMS = "e.g. 4.5bits, 4.5, 12MB, 12MiB, 500KB, 1024B"


def _fmt(x: float, digits: int = 12) -> str:
    """Short human form of a number: ``4.5``, ``12``, ``4.125``."""
    return format(x, f".{digits}g")


def format_up(x: float, digits: int = 6) -> str:
    """``x`` as a short decimal string whose value is >= ``x``: exact when ``x`` has at most
    ``digits`` significant digits (``4.125``), else rounded up at ``digits`` (``21.3334``).

    Used to name a minimum budget so that passing the printed number back is feasible.
    """
    for d in range(1, digits + 1):
        s = format(x, f".{d}g")
        if float(s) == x:
            return s
    exact = Decimal(x)
    step = Decimal(1).scaleb(exact.adjusted() - digits + 1)
    up = exact.quantize(step, rounding=ROUND_CEILING).normalize()
    return format(up, "f" if -5 <= up.adjusted() < 16 else "g")


@dataclass(frozen=True)
class Budget:
    """A size budget for the quantizable weights.

    Attributes:
        kind: ``"bits"`` (average bits per weight) or ``"bytes"`` (total bytes).
        value: bits per weight, or bytes (always in plain bytes, whatever unit was written).
        unit: the unit used for display (``"bits"``, ``"B"``, ``"MB"``, ``"MiB"``...); empty means
            the default for the kind.
    """

    kind: BudgetKind
    value: float
    unit: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("bits", "bytes"):
            raise BudgetError(f"budget kind must be 'bits' or 'bytes', got {self.kind!r}")
        try:
            value = float(self.value)
        except (TypeError, ValueError):
            raise BudgetError(f"budget value must be a number, got {self.value!r}") from None
        if not math.isfinite(value) or value <= 0:
            raise BudgetError(f"budget must be a positive finite number, got {self.value!r}")
        object.__setattr__(self, "value", value)
        unit = self.unit or ("bits" if self.kind == "bits" else "B")
        if self.kind == "bits" and unit != "bits":
            raise BudgetError(f"a bits budget is displayed in 'bits', got unit {unit!r}")
        if self.kind == "bytes" and unit not in BYTE_UNITS:
            raise BudgetError(f"unknown byte unit {unit!r} (use one of {', '.join(BYTE_UNITS)})")
        object.__setattr__(self, "unit", unit)

    @classmethod
    def bits(cls, value: float) -> Budget:
        """A budget of ``value`` average bits per weight."""
        return cls("bits", value)

    @classmethod
    def bytes(cls, value: float, unit: str = "B") -> Budget:
        """A budget of ``value`` in ``unit`` (``"B"``, ``"MB"``, ``"MiB"``...)."""
        if unit not in BYTE_UNITS:
            raise BudgetError(f"unknown byte unit {unit!r} (use one of {', '.join(BYTE_UNITS)})")
        return cls("bytes", float(value) * BYTE_UNITS[unit], unit)

    @property
    def display_value(self) -> float:
        """The value in the display unit (``12`` for ``12MB``)."""
        if self.kind == "bits":
            return self.value
        return self.value / BYTE_UNITS[self.unit]

    def max_total_bits(self, total_params: int) -> float:
        """Total bits allowed for weights of ``total_params`` elements."""
        if self.kind == "bits":
            return self.value * total_params
        return self.value * 8.0

    def describe_total(self, total_bits: float, total_params: int) -> str:
        """``total_bits`` expressed in this budget's unit, rounded up (e.g. ``"4.125 bits"``)."""
        if self.kind == "bits":
            per_weight = total_bits / total_params if total_params else 0.0
            return f"{format_up(per_weight)} bits"
        return f"{format_up(total_bits / 8.0 / BYTE_UNITS[self.unit])} {self.unit}"

    def __str__(self) -> str:
        if self.kind == "bits":
            return f"{_fmt(self.value)} bits"
        return f"{_fmt(self.display_value)} {self.unit}"


def parse_budget(text: str) -> Budget:
    """Parse a budget string; see the module docstring for the accepted forms.

    Raises:
        BudgetError: malformed, zero, negative or non-finite budget, or an unknown unit.
    """
    if not isinstance(text, str):
        raise BudgetError(f"budget must be a string, got {type(text).__name__}")
    m = _BUDGET_RE.match(text)
    if m is None:
        raise BudgetError(f"malformed budget {text!r}: expected a positive number with an optional unit ({_FORMS})")
    value = float(m["num"])
    unit = m["unit"]
    if not math.isfinite(value):
        raise BudgetError(f"budget {text!r} is not a finite number")
    if value <= 0:
        raise BudgetError(f"budget must be positive, got {text.strip()!r}")
    if unit == "" or unit.lower() in _BITS_UNITS:
        return Budget("bits", value)
    if unit in BYTE_UNITS:
        return Budget("bytes", value * BYTE_UNITS[unit], unit)
    if unit.lower() == "b":
        raise BudgetError(
            f"ambiguous budget unit in {text.strip()!r}: write 'bits' for bits per weight or 'B' for bytes"
        )
    raise BudgetError(
        f"unknown budget unit {unit!r} in {text.strip()!r}: use bits (or no unit) for bits per weight, "
        f"or {', '.join(BYTE_UNITS)} for bytes"
    )
