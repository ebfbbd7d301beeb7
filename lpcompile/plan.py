"""The PrecisionPlan: the one boundary between deciding precisions and applying them.

JSON schema (version 1)::

    {
      "version": 1,
      "model": "model.onnx" | null,          # informational
      "budget": "4.5bits" | null,            # the budget as the user wrote it
      "budget_bits": 4.5 | null,             # budget as average bits per weight (null: no budget)
      "achieved_bits": 4.41,                 # Σ bits·params / Σ params over "nodes"
      "total_params": 123456,
      "predicted_loss": 0.0123 | null,       # Σ of the chosen formats' predicted losses
      "softmax": "auto" | "two-pass" | "keep",
      "activation_scales": {"tensor": amax}, # calibrated amax of FP8 activation inputs (optional)
      "nodes": [
        {"name": "...", "op_type": "MatMul", "weight": "W1", "params": 4096,
         "format": "int4_b128", "bits": 4.125,
         "predicted_loss": 0.001 | null,     # optional
         "module_path": "encoder.layer.0..." # optional (PyTorch entry)
         "group": "weight:W"                 # optional: nodes of a group share one format (tied weights)
        }, ...
      ],
      "metadata": {...}                      # free-form: solver status; how apply wrote it (target, rounding, seed)
    }

The plan holds decisions only. The evidence behind them (every candidate's bits and predicted /
measured loss, Hessian traces, how the analysis ran) stays in the sensitivity table
(:mod:`lpcompile.analysis.table`); the report and the plan table join the two. Keys of older
plans (``candidates``, ``trace``) are ignored when read.

Unknown keys are kept in ``metadata`` round trips only; unknown node names or formats are an
error when a plan is checked against a model (:func:`validate_against`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lpcompile.errors import FormatError, PlanError
from lpcompile.formats import canonical_name, get_format
from lpcompile.io_utils import atomic_write_text, check_plan_limits, read_json_bounded

logger = logging.getLogger(__name__)

PLAN_VERSION = 1
_TINY = 1.1754943508222875e-38  # smallest normal float32: a smaller positive amax gives a denormal scale
SOFTMAX_MODES = ("auto", "two-pass", "keep")


@dataclass(frozen=True)
class NodeAssignment:
    """The precision chosen for one weighted node."""

    name: str
    op_type: str
    weight: str
    params: int
    format: str
    bits: float
    predicted_loss: float | None = None
    module_path: str | None = None
    group: str | None = None


@dataclass(frozen=True)
class PrecisionPlan:
    """Per-node formats plus the budget accounting, serialisable to versioned JSON."""

    nodes: tuple[NodeAssignment, ...]
    budget: str | None = None
    budget_bits: float | None = None
    model: str | None = None
    softmax: str = "auto"
    activation_scales: Mapping[str, float] = field(default_factory=dict)
    metadata: Mapping[str, Any] = field(default_factory=dict)
    version: int = PLAN_VERSION

    def _stored(self) -> list[NodeAssignment]:
        """One node per stored weight: nodes that share a weight initializer count it once."""
        seen: set[str] = set()
        out = []
        for n in self.nodes:
            key = n.weight or f"node:{n.name}"
            if key not in seen:
                seen.add(key)
                out.append(n)
        return out

    @property
    def total_params(self) -> int:
        """Weights stored, each shared weight once."""
        return sum(n.params for n in self._stored())

    @property
    def achieved_bits(self) -> float:
        total = self.total_params
        if total == 0:
            return 0.0
        return sum(n.bits * n.params for n in self._stored()) / total

    @property
    def predicted_loss(self) -> float | None:
        losses = [n.predicted_loss for n in self.nodes]
        if any(x is None for x in losses) or not losses:
            return None
        return float(sum(losses))  # type: ignore[arg-type]

    def by_name(self) -> dict[str, NodeAssignment]:
        return {n.name: n for n in self.nodes}

    def format_of(self, node_name: str) -> str | None:
        for n in self.nodes:
            if n.name == node_name:
                return n.format
        return None

    def with_nodes(self, nodes: Iterable[NodeAssignment]) -> PrecisionPlan:
        return replace(self, nodes=tuple(nodes))

    # -- JSON -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "model": self.model,
            "budget": self.budget,
            "budget_bits": self.budget_bits,
            "achieved_bits": _round(self.achieved_bits),
            "total_params": self.total_params,
            "predicted_loss": _round(self.predicted_loss),
            "softmax": self.softmax,
            "activation_scales": {k: _round(v) for k, v in sorted(self.activation_scales.items())},
            "nodes": [_node_to_dict(n) for n in self.nodes],
            "metadata": dict(self.metadata),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False, allow_nan=False) + "\n"

    def save(self, path: str | Path) -> None:
        """Write the plan atomically."""
        atomic_write_text(path, self.to_json())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrecisionPlan:
        if not isinstance(data, Mapping):
            raise PlanError("plan JSON must be an object")
        version = data.get("version")
        if version != PLAN_VERSION:
            raise PlanError(f"unsupported plan version {version!r} (this lpcompile reads version {PLAN_VERSION})")
        raw_nodes = data.get("nodes")
        if not isinstance(raw_nodes, list):
            raise PlanError("plan has no 'nodes' list")
        seen: set[str] = set()
        dup_set: set[str] = set()
        for n in raw_nodes:  # duplicates in one pass, before anything is built
            name = n.get("name") if isinstance(n, Mapping) else None
            if isinstance(name, str):
                (dup_set if name in seen else seen).add(name)
        dup = sorted(dup_set)
        if dup:
            raise PlanError(f"plan names node(s) more than once: {', '.join(dup[:5])}")
        check_plan_limits(dict(data))  # node count bounded
        nodes = tuple(_node_from_dict(i, n) for i, n in enumerate(raw_nodes))
        softmax = data.get("softmax", "auto") or "auto"
        if softmax not in SOFTMAX_MODES:
            raise PlanError(f"plan softmax mode {softmax!r} is not one of {', '.join(SOFTMAX_MODES)}")
        budget_bits = data.get("budget_bits")
        if budget_bits is not None and not _is_number(budget_bits):
            raise PlanError("plan 'budget_bits' must be a number or null")
        scales = data.get("activation_scales") or {}
        if not isinstance(scales, Mapping) or not all(_valid_amax(v) for v in scales.values()):
            raise PlanError(
                "plan 'activation_scales' must map tensor names to finite numbers that are 0 (uncalibrated) or "
                "positive normal float32 values"
            )
        return cls(
            nodes=nodes,
            budget=data.get("budget"),
            budget_bits=None if budget_bits is None else float(budget_bits),
            model=data.get("model"),
            softmax=softmax,
            activation_scales={str(k): float(v) for k, v in scales.items()},
            metadata=dict(data.get("metadata") or {}),
        )

    @classmethod
    def from_json(cls, text: str) -> PrecisionPlan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"plan is not valid JSON: {exc.msg} at line {exc.lineno}") from None
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | Path) -> PrecisionPlan:
        """Read a plan file; its size and nesting depth are checked before it is parsed."""
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"plan file not found: {path}")
        return cls.from_dict(read_json_bounded(path, "plan", error=PlanError))


def _valid_amax(v: Any) -> bool:
    return _is_number(v) and (v == 0 or v >= _TINY)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _round(v: float | None) -> float | None:
    """Floats are written at full precision (Python's shortest repr round-trips exactly)."""
    return None if v is None else float(v)


def _node_to_dict(n: NodeAssignment) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": n.name,
        "op_type": n.op_type,
        "weight": n.weight,
        "params": n.params,
        "format": n.format,
        "bits": _round(n.bits),
    }
    if n.predicted_loss is not None:
        out["predicted_loss"] = _round(n.predicted_loss)
    if n.module_path:
        out["module_path"] = n.module_path
    if n.group:
        out["group"] = n.group
    return out


def _node_from_dict(i: int, d: Any) -> NodeAssignment:
    if not isinstance(d, Mapping):
        raise PlanError(f"plan node #{i} is not an object")
    for key in ("name", "format"):
        if not isinstance(d.get(key), str) or not d.get(key):
            raise PlanError(f"plan node #{i} lacks a string {key!r}")
    try:
        fmt = canonical_name(d["format"])
    except FormatError as exc:
        raise PlanError(f"plan node {d['name']!r}: {exc}") from None
    params = d.get("params", 0)
    if not isinstance(params, int) or params < 0:
        raise PlanError(f"plan node {d['name']!r}: 'params' must be a non-negative integer")
    bits = d.get("bits")
    return NodeAssignment(
        name=d["name"],
        op_type=str(d.get("op_type", "")),
        weight=str(d.get("weight", "")),
        params=params,
        format=fmt,
        bits=float(bits) if _is_number(bits) else get_format(fmt).nominal_bits,
        predicted_loss=_opt_float(d.get("predicted_loss")),
        module_path=d.get("module_path"),
        group=d.get("group") if isinstance(d.get("group"), str) else None,
    )


def _opt_float(v: Any) -> float | None:
    return float(v) if _is_number(v) else None


def validate_against(plan: PrecisionPlan, known_nodes: Sequence[str]) -> None:
    """Raise ``PlanError`` when the plan names nodes that are not quantizable nodes of the model."""
    known = set(known_nodes)
    unknown = [n.name for n in plan.nodes if n.name not in known]
    if unknown:
        more = f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise PlanError(
            f"plan names node(s) not found among the model's weighted nodes: {', '.join(unknown[:5])}{more}"
        )
