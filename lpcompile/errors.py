"""Exception hierarchy. Every user-facing failure is an ``LpError`` with a one-line message."""

from __future__ import annotations


class LpError(Exception):
    """Base class for errors reported to the user as a one-line message (exit code 1)."""

    exit_code: int = 1


class UsageError(LpError):
    """Malformed command-line usage or arguments (exit code 2)."""

    exit_code = 2


class ModelLoadError(LpError):
    """The model file is missing, unreadable, truncated or not ONNX."""


class PlanError(LpError):
    """A precision plan is malformed or does not match the model."""


class FormatError(LpError):
    """Unknown format name or a format that cannot apply to a tensor."""


class BudgetError(LpError):
    """Malformed or infeasible budget."""


class CalibrationError(LpError):
    """Calibration data does not match the model's inputs."""


class UnsupportedOpsError(LpError):
    """The differentiable interpreter does not support some ops of the model."""

    def __init__(self, ops: list[str]) -> None:
        self.ops = sorted(set(ops))
        super().__init__(f"unsupported ops for differentiable analysis: {', '.join(self.ops)}")
