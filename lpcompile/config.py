"""Options of the pipeline, checked in one place: enums for every choice and the three step configs.

``analyze`` takes an :class:`~lpcompile.analysis.config.AnalysisConfig`, ``decide`` a
:class:`DecideConfig`, ``apply`` an :class:`ApplyConfig` (see :mod:`lpcompile.api`). Every option
that is a choice among names is a :class:`enum.StrEnum` (so ``Target.ORT == "ort"``) parsed by
:func:`parse_option`, the one place a bad value becomes a one-line usage error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

from lpcompile.analysis.config import DEFAULT_FORMATS, AnalysisConfig
from lpcompile.errors import UsageError
from lpcompile.solver.problem import KeepRule

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_FORMATS",
    "AnalysisConfig",
    "ApplyConfig",
    "DecideConfig",
    "Rounding",
    "SoftmaxMode",
    "Target",
    "parse_option",
]


class Target(StrEnum):
    """Where the rewritten model runs: decides how each format is written."""

    QDQ = "qdq"  # portable standard ONNX (QuantizeLinear/DequantizeLinear, Cast)
    ORT = "ort"  # ONNX Runtime: com.microsoft kernels where they exist (MatMulNBits)
    TVM = "tvm"  # lpcompile's TVM lowering


class SoftmaxMode(StrEnum):
    """Whether Softmax nodes become the two-pass function op."""

    AUTO = "auto"  # where the target runs it faster and the neighbourhood is low precision
    TWO_PASS = "two-pass"  # every eligible Softmax
    KEEP = "keep"  # never


class Rounding(StrEnum):
    """How weights are rounded onto a format's grid."""

    NEAREST = "nearest"  # round half to even
    STOCHASTIC = "stochastic"  # unbiased, seeded per weight
    RTN = "rtn"  # nearest with the full code range (-8 / -128 where it lowers the error)
    MSE = "mse"  # per-block clip search, error weighted by diag(XᵀX)
    GPTQ = "gptq"  # error-compensated with the layer-input Hessian XᵀX (lpcompile.rounding)


E = TypeVar("E", bound=StrEnum)


def parse_option(kind: type[E], value: str | E, flag: str) -> E:
    """``value`` as a member of ``kind``; a one-line ``UsageError`` naming ``flag`` otherwise."""
    if isinstance(value, kind):
        return value
    try:
        return kind(str(value).strip().lower())
    except ValueError:
        known = ", ".join(m.value for m in kind)
        raise UsageError(f"{flag}: unknown value {value!r}; use one of {known}") from None


@dataclass(frozen=True)
class DecideConfig:
    """How a table and a budget become a plan (:func:`lpcompile.api.decide`).

    Attributes:
        formats: restrict the choice to these formats (``None``: every format in the table);
            fp32 is always allowed.
        keep: ``--keep`` rules, matched against node names and PyTorch module paths.
        softmax: the softmax substitution mode the plan records.
        target: the target the plan is for (resolves ``SoftmaxMode.AUTO``).
        max_loss: the dual mode: with no budget, the fewest bits whose predicted loss stays within
            this bound (in units of the distortion loss); ignored when a budget is given.
        objective: ``"auto"`` (``"fast"`` on ``qdq``/``ort``, ``"size"`` on ``tvm``), ``"size"`` (least loss
            within the budget), ``"fast"`` (least loss among the choices
            that run at least as fast as fp32 on ``target``), ``"both"`` (among near-equal-loss
            choices the faster one on ``target``) or ``"latency"`` (only choices that run at least as
            fast as fp32, speed first); see :mod:`lpcompile.solver.latency`. Applies to a
            budget, not to the ``max_loss`` dual.
        int8_residuals: the plan will be written with ``--int8-residuals`` (``ort``): the latency model
            counts w8a8 Convs as int8 chains through residual blocks.
    """

    formats: tuple[str, ...] | None = None
    keep: tuple[KeepRule, ...] = ()
    softmax: SoftmaxMode = SoftmaxMode.AUTO
    target: Target = Target.QDQ
    max_loss: float | None = None
    objective: str = "auto"
    int8_residuals: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "softmax", parse_option(SoftmaxMode, self.softmax, "--softmax"))
        object.__setattr__(self, "target", parse_option(Target, self.target, "--target"))
        object.__setattr__(self, "keep", tuple(self.keep))
        if self.objective not in ("auto", "size", "fast", "latency", "both"):
            raise UsageError(f"--objective must be auto, size, fast, latency or both, not {self.objective!r}")
        if self.max_loss is not None and not (isinstance(self.max_loss, int | float) and self.max_loss >= 0):
            raise UsageError(f"--max-loss must be a non-negative number, not {self.max_loss!r}")
        if self.int8_residuals and self.target != Target.ORT:
            raise UsageError("--int8-residuals needs --target ort (QLinearAdd is an ONNX Runtime op)")


@dataclass(frozen=True)
class ApplyConfig:
    """How a plan is written (:func:`lpcompile.api.apply`).

    Attributes:
        target: how formats are written (see :class:`Target`).
        rounding: weight rounding mode.
        seed: seeds stochastic rounding and synthetic calibration data.
        batch_size: calibration batch size for FP8 activation scales a plan still lacks.
        int8_residuals: on ``ort``, also round the residual ``Add`` s between w8a8 Convs so their
            int8 chains run through (:mod:`lpcompile.passes.qlinear_add`; adds error the analyzer
            does not score, which the guard measures).
    """

    target: Target = Target.QDQ
    rounding: Rounding = Rounding.NEAREST
    seed: int = 0
    batch_size: int = 16
    int8_residuals: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "target", parse_option(Target, self.target, "--target"))
        object.__setattr__(self, "rounding", parse_option(Rounding, self.rounding, "--rounding"))
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise UsageError(f"--seed must be an integer in [0, 2**63), not {self.seed!r}")
        if self.int8_residuals and self.target != Target.ORT:
            raise UsageError("--int8-residuals needs --target ort (QLinearAdd is an ONNX Runtime op)")
