"""Small PrecisionPlan / SensitivityTable objects for the report, overlay and viewer tests.

Built directly (no analysis run) for the four MatMuls of ``examples/models/digits_mlp.onnx``; the
losses follow a simple noise model (loss ∝ Tr(H) · 4^-bits), measured = predicted × seeded noise.
"""

from __future__ import annotations

import numpy as np

from lpcompile.analysis.table import Candidate, NodeSensitivity, SensitivityTable
from lpcompile.plan import NodeAssignment, PrecisionPlan

DIGITS_NODES = (
    ("fc0", "fc0.weight", (64, 512)),
    ("fc1", "fc1.weight", (512, 512)),
    ("fc2", "fc2.weight", (512, 256)),
    ("fc3", "fc3.weight", (256, 10)),
)
FORMATS = {"fp32": 32.0, "bf16": 16.0, "fp8_e4m3": 8.0, "int8": 8.0, "int4_b128": 4.125}
CHOSEN = {"fc0": "int8", "fc1": "int4_b128", "fc2": "int4_b128", "fc3": "bf16"}


def digits_table(validated: bool = True, seed: int = 0) -> SensitivityTable:
    rng = np.random.default_rng(seed)
    nodes = []
    for i, (name, weight, shape) in enumerate(DIGITS_NODES):
        trace = float(10.0 ** (1 - i) * 3.0)
        cands = {}
        for f, bits in FORMATS.items():
            pred = 0.0 if f == "fp32" else trace * 4.0 ** (-bits / 2) * (1.3 if f == "fp8_e4m3" else 1.0)
            meas = pred * float(np.exp(rng.normal(0, 0.3))) if validated and f != "fp32" else None
            cands[f] = Candidate(bits=bits, predicted_loss=pred, measured_loss=meas)
        nodes.append(
            NodeSensitivity(
                name=name,
                op_type="MatMul",
                weight=weight,
                params=int(np.prod(shape)),
                shape=shape,
                candidates=cands,
                trace=trace,
            )
        )
    validation = {"spearman": 0.91, "pairs": 16} if validated else None
    return SensitivityTable(
        nodes=tuple(nodes),
        formats=tuple(FORMATS),
        method="hutchinson-diag",
        loss="kl",
        model="digits_mlp.onnx",
        probes=16,
        seed=seed,
        calib="digits_calib.npz",
        num_samples=64,
        validation=validation,
    )


def digits_plan(table: SensitivityTable | None = None) -> PrecisionPlan:
    table = table or digits_table()
    nodes = []
    for n in table.nodes:
        f = CHOSEN[n.name]
        c = n.candidates[f]
        nodes.append(
            NodeAssignment(
                name=n.name,
                op_type=n.op_type,
                weight=n.weight,
                params=n.params,
                format=f,
                bits=c.bits,
                predicted_loss=c.predicted_loss,
            )
        )
    return PrecisionPlan(nodes=tuple(nodes), budget="6bits", budget_bits=6.0, model="digits_mlp.onnx")
