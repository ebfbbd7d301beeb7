"""The sensitivity table: per (node, format) predicted (and optionally measured) loss, as JSON.

Schema (version 1)::

    {"version": 1, "model": "m.onnx", "method": "hutchinson-diag" | "hutchinson-trace" | "measured",
     "loss": "kl" | "mse" | "ce", "probes": 16, "seed": 0, "calib": "data.npz", "num_samples": 64,
     "synthetic_calib": false, "formats": ["fp8_e4m3", ...],
     "activation_amax": {"tensor": 3.2},
     "validation": {"spearman": 0.93, "per_format": {"int8": 0.9}, "pairs": 120} | null,
     "timings": {"hessian_s": 12.3, ...},    # in memory and to_dict() only: not written by save()
     "nodes": [{"name", "op_type", "weight", "params", "shape", "group", "module_path",
                "trace", "trace_rse"?, "candidates": {"int8": {"bits", "predicted_loss", "measured_loss"}}}]}

``trace_rse`` (per node, when known), ``probe_tol``, ``seeding`` (when not ``sequential``) and ``probe_dtype``
(when not ``float32``) are written only when set, so tables of the default analysis read and write as before.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lpcompile.errors import LpError
from lpcompile.io_utils import atomic_write_text

TABLE_VERSION = 1


class SensitivityFileError(LpError):
    """A sensitivity file is missing or malformed."""


@dataclass(frozen=True)
class Candidate:
    """One format considered for a node: its cost and (when analysed) its predicted / measured loss."""

    bits: float
    predicted_loss: float | None = None
    measured_loss: float | None = None


@dataclass(frozen=True)
class NodeSensitivity:
    """Sensitivity of one weighted node: its Hessian trace and each candidate format's cost/loss."""

    name: str
    op_type: str
    weight: str
    params: int
    shape: tuple[int, ...]
    candidates: Mapping[str, Candidate]
    trace: float | None = None
    group: str | None = None
    module_path: str | None = None
    activation: str | None = None  # the activation input an activation format rounds
    trace_rse: float | None = None  # relative standard error of ``trace`` (from per-probe samples); None: unknown

    @classmethod
    def of(
        cls,
        node: Any,
        candidates: Mapping[str, Candidate],
        *,
        trace: float | None = None,
        group: str | None = None,
        module_path: str | None = None,
    ) -> NodeSensitivity:
        """The row of a :class:`lpcompile.graph.WeightNode` (name, op, weight, size, activation) with its evidence."""
        return cls(
            name=node.name,
            op_type=node.op_type,
            weight=node.weight,
            params=node.params,
            shape=node.shape,
            candidates=candidates,
            trace=trace,
            group=group,
            module_path=module_path,
            activation=node.activation,
        )

    def runner_up(self, chosen: str) -> tuple[str, Candidate] | None:
        """The alternative that explains choosing ``chosen``: the next cheaper candidate (what saving
        more bits would have cost in loss), or, for the cheapest choice, the next more expensive one."""
        if chosen not in self.candidates:
            return None
        bits = self.candidates[chosen].bits
        others = sorted(((f, c) for f, c in self.candidates.items() if f != chosen), key=lambda fc: (fc[1].bits, fc[0]))
        if not others:
            return None
        cheaper = [fc for fc in others if fc[1].bits < bits]
        return cheaper[-1] if cheaper else others[0]


@dataclass(frozen=True)
class SensitivityTable:
    """The analyzer's output; the solver's input. Reusable across budgets (no re-analysis)."""

    nodes: tuple[NodeSensitivity, ...]
    formats: tuple[str, ...]
    method: str
    loss: str
    model: str | None = None
    probes: int = 0
    seed: int = 0
    calib: str | None = None
    num_samples: int = 0
    synthetic_calib: bool = False
    activation_amax: Mapping[str, float] = field(default_factory=dict)
    validation: Mapping[str, Any] | None = None
    timings: Mapping[str, float] = field(default_factory=dict)
    version: int = TABLE_VERSION
    loss_outputs: Mapping[str, Any] | None = None  # LossSpec.to_dict(): outputs, loss per output, masks
    probe_tol: float | None = None  # convergence mode: the target relative standard error of each trace
    seeding: str = "sequential"  # how probes were seeded: sequential | per-probe (sharded runs)
    probe_dtype: str = "float32"  # the probe passes' arithmetic (bfloat16: --probe-dtype)

    def node(self, name: str) -> NodeSensitivity | None:
        """The node called ``name`` (None when the table has none)."""
        for n in self.nodes:
            if n.name == name:
                return n
        return None

    def with_validation(self, validation: Mapping[str, Any], nodes: tuple[NodeSensitivity, ...]) -> SensitivityTable:
        return replace(self, validation=dict(validation), nodes=nodes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "model": self.model,
            "method": self.method,
            "loss": self.loss,
            "probes": self.probes,
            "seed": self.seed,
            "calib": self.calib,
            "num_samples": self.num_samples,
            "synthetic_calib": self.synthetic_calib,
            "formats": list(self.formats),
            "activation_amax": {k: _num(v) for k, v in sorted(self.activation_amax.items())},
            "validation": self.validation,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            **({"loss_outputs": dict(self.loss_outputs)} if self.loss_outputs else {}),
            **({"probe_tol": self.probe_tol} if self.probe_tol is not None else {}),
            **({"seeding": self.seeding} if self.seeding != "sequential" else {}),
            **({"probe_dtype": self.probe_dtype} if self.probe_dtype != "float32" else {}),
            "nodes": [
                {
                    "name": n.name,
                    "op_type": n.op_type,
                    "weight": n.weight,
                    "params": n.params,
                    "shape": list(n.shape),
                    "group": n.group,
                    "module_path": n.module_path,
                    "activation": n.activation,
                    "trace": _num(n.trace),
                    **({"trace_rse": _num(n.trace_rse)} if n.trace_rse is not None else {}),
                    "candidates": {
                        f: {
                            "bits": _num(c.bits),
                            "predicted_loss": _num(c.predicted_loss),
                            "measured_loss": _num(c.measured_loss),
                        }
                        for f, c in n.candidates.items()
                    },
                }
                for n in self.nodes
            ],
        }

    def to_json(self) -> str:
        """The file form: everything but ``timings``, so reruns write byte-identical files."""
        data = self.to_dict()
        data.pop("timings", None)
        return json.dumps(data, indent=1, allow_nan=False) + "\n"

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> SensitivityTable:
        path = Path(path)
        if not path.is_file():
            raise SensitivityFileError(f"sensitivity file not found: {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SensitivityFileError(f"sensitivity file {path} is not valid JSON: {exc}") from None
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> SensitivityTable:
        if not isinstance(data, dict) or data.get("version") != TABLE_VERSION or "nodes" not in data:
            raise SensitivityFileError(f"{source} is not an lpcompile sensitivity file (version {TABLE_VERSION})")
        try:
            nodes = tuple(
                NodeSensitivity(
                    name=n["name"],
                    op_type=n["op_type"],
                    weight=n["weight"],
                    params=int(n["params"]),
                    shape=tuple(int(d) for d in n["shape"]),
                    group=n.get("group"),
                    module_path=n.get("module_path"),
                    activation=n.get("activation"),
                    trace=n.get("trace"),
                    trace_rse=None if n.get("trace_rse") is None else float(n["trace_rse"]),
                    candidates={
                        f: Candidate(
                            bits=float(c["bits"]),
                            predicted_loss=c.get("predicted_loss"),
                            measured_loss=c.get("measured_loss"),
                        )
                        for f, c in n["candidates"].items()
                    },
                )
                for n in data["nodes"]
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SensitivityFileError(f"{source}: malformed node entry ({exc})") from None
        return cls(
            nodes=nodes,
            formats=tuple(data.get("formats", ())),
            method=str(data.get("method", "")),
            loss=str(data.get("loss", "")),
            model=data.get("model"),
            probes=int(data.get("probes", 0)),
            seed=int(data.get("seed", 0)),
            calib=data.get("calib"),
            num_samples=int(data.get("num_samples", 0)),
            synthetic_calib=bool(data.get("synthetic_calib", False)),
            activation_amax={k: float(v) for k, v in (data.get("activation_amax") or {}).items()},
            validation=data.get("validation"),
            loss_outputs=data.get("loss_outputs"),
            probe_tol=None if data.get("probe_tol") is None else float(data["probe_tol"]),
            seeding=str(data.get("seeding", "sequential")),
            probe_dtype=str(data.get("probe_dtype", "float32")),
            timings=dict(data.get("timings") or {}),
        )


def _num(v: float | None) -> float | None:
    if v is None:
        return None
    v = float(v)
    if not math.isfinite(v):
        return None
    return float(f"{v:.8g}")
