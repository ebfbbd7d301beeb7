"""Residual ``Add`` s of w8a8 Conv blocks as uint8 ``QLinearAdd`` on ONNX Runtime (passes/qlinear_add.py).

Reference: the same plan written for ``qdq`` (standard Q/DQ and float Convs) with the residual roundings
inserted in standard ONNX by :class:`RoundResidualsPass`, run by ONNX Runtime with its optimisations off.
Which tensors are rounded, and with which step, is asserted on the graph; the integer file may differ
from the reference only where its int32 bias or its fp32 requantization moves a value across a rounding
boundary (one code, on a small fraction of elements). No test asserts a time.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from pass_helpers import check, ops, parse, run, run_at_level, to_ir, with_outputs

from lpcompile.config import ApplyConfig
from lpcompile.errors import UsageError
from lpcompile.passes.pipeline import apply_plan, uniform_plan
from lpcompile.passes.qlinear_add import RoundResidualsPass
from lpcompile.plan import PrecisionPlan
from lpcompile.runtime.ort import optimized_proto

RNG = np.random.default_rng(2024)

# stem → Clip → two inverted-residual blocks (expand 1×1 → Clip → depthwise 3×3 → Clip → project 1×1, + skip)
# → head 1×1 → y. The first skip is the stem's clipped output, the second the first block's sum.
TEXT = """<ir_version: 10, opset_import: ["" : 21]>
g (float[2,3,12,12] x) => (float[2,4,12,12] y) {
  c0 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, W0, B0)
  a0 = Clip(c0, lo, hi)
  ce1 = Conv <kernel_shape = [1, 1]> (a0, E1, BE1)
  e1 = Clip(ce1, lo, hi)
  cd1 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1], group = 16> (e1, D1, BD1)
  d1 = Clip(cd1, lo, hi)
  p1 = Conv <kernel_shape = [1, 1]> (d1, P1, BP1)
  s1 = Add(p1, a0)
  ce2 = Conv <kernel_shape = [1, 1]> (s1, E2, BE2)
  e2 = Clip(ce2, lo, hi)
  cd2 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1], group = 16> (e2, D2, BD2)
  d2 = Clip(cd2, lo, hi)
  p2 = Conv <kernel_shape = [1, 1]> (d2, P2, BP2)
  s2 = Add(p2, s1)
  y = Conv <kernel_shape = [1, 1]> (s2, H)
}"""
ROUNDED = ("x", "a0", "e1", "d1", "s1", "e2", "d2", "s2")  # every Conv input (the w8a8 plan's roundings)


def _weights() -> dict[str, np.ndarray]:
    def w(*shape: int, s: float) -> np.ndarray:
        return (RNG.standard_normal(shape) * s).astype(np.float32)

    return {
        "W0": w(8, 3, 3, 3, s=0.3), "B0": w(8, s=0.5),
        "E1": w(16, 8, 1, 1, s=0.3), "BE1": w(16, s=0.3),
        "D1": w(16, 1, 3, 3, s=0.4), "BD1": w(16, s=0.1),
        "P1": w(8, 16, 1, 1, s=0.2), "BP1": w(8, s=0.1),
        "E2": w(16, 8, 1, 1, s=0.3), "BE2": w(16, s=0.3),
        "D2": w(16, 1, 3, 3, s=0.4), "BD2": w(16, s=0.1),
        "P2": w(8, 16, 1, 1, s=0.2), "BP2": w(8, s=0.1),
        "H": w(4, 8, 1, 1, s=0.3),
        "lo": np.array(0.0, np.float32), "hi": np.array(6.0, np.float32),
    }  # fmt: skip


def _model(text: str = TEXT) -> tuple[onnx.ModelProto, np.ndarray]:
    x = (RNG.standard_normal((2, 3, 12, 12)) * 2).astype(np.float32)
    return parse(text, **_weights()), x


def _plan(
    proto: onnx.ModelProto, x: np.ndarray, rounded: tuple[str, ...] = ROUNDED, **inputs: np.ndarray
) -> PrecisionPlan:
    """Uniform w8a8, the range of every rounded tensor (``rounded``: the Conv inputs) measured on ``x`` and
    any other graph ``inputs`` (ORT)."""
    feeds = {"x": x, **inputs}
    names = [n for n in rounded if n not in feeds]
    outs = run(with_outputs(proto, names), **feeds)
    got = {**feeds, **dict(zip(names, outs[len(proto.graph.output) :], strict=True))}
    return uniform_plan(to_ir(proto), "w8a8", activation_scales={n: float(np.abs(got[n]).max()) for n in rounded})


def _optimised_ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in optimized_proto(model, "all").graph.node]


def test_residual_blocks_become_one_int8_chain() -> None:
    proto, x = _model()
    plan = _plan(proto, x)
    plain = check(apply_plan(to_ir(proto), plan, target="ort")[0])
    chained = check(apply_plan(to_ir(proto), plan, target="ort", int8_residuals=True)[0])
    # without: the stem (its output is also the first skip), the project Convs (they feed Adds) and the head
    # (a graph output) stay float
    assert ops(plain).count("QLinearConv") == 4 and ops(plain).count("Conv") == 4 and "QLinearAdd" not in ops(plain)
    # with: every Conv but the head is a QLinearConv, both Adds are QLinearAdd, and the only float tensor
    # on the way is the head's input
    assert ops(chained).count("QLinearConv") == 7 and ops(chained).count("QLinearAdd") == 2
    assert ops(chained).count("Conv") == 1 and "Add" not in ops(chained)
    assert {n.domain for n in chained.graph.node if n.op_type == "QLinearAdd"} == {"com.microsoft"}
    assert any(o.domain == "com.microsoft" for o in chained.opset_import)
    # ORT runs the blocks in NHWC without a transpose between them: one pair around the whole chain at most
    # (the stem's input and the head's), against one pair per float Conv without
    assert _optimised_ops(chained).count("Transpose") <= 2
    assert _optimised_ops(plain).count("Transpose") > 2


def test_the_added_roundings_use_the_sums_step() -> None:
    """The project Conv's output is rounded with its sum's step; the skip is read through the rounding its
    other reader (the next expand Conv) makes anyway; nothing else is rounded that the plan did not round."""
    proto, x = _model()
    plan = _plan(proto, x)
    model = apply_plan(to_ir(proto), plan, target="qdq")[0]
    before = [n for n in model.graph if n.op_type == "QuantizeLinear"]
    assert RoundResidualsPass()(model).modified
    added = [n for n in model.graph if n.op_type == "QuantizeLinear" and n not in before]
    assert sorted(n.inputs[0].name for n in added) == ["p1", "p2"]
    for q in added:
        sum_name = {"p1": "s1", "p2": "s2"}[q.inputs[0].name]
        step = float(q.inputs[1].const_value.numpy())
        assert step == pytest.approx(plan.activation_scales[sum_name] / 127, rel=1e-6)
    for add in (n for n in model.graph if n.op_type == "Add"):
        for v in add.inputs:  # both inputs are read rounded
            assert v.producer() is not None and v.producer().op_type == "DequantizeLinear"


def test_int8_chain_computes_the_rounded_reference() -> None:
    proto, x = _model()
    plan = _plan(proto, x)
    reference = apply_plan(to_ir(proto), plan, target="qdq")[0]
    RoundResidualsPass()(reference)
    reference = check(reference)
    chained = check(apply_plan(to_ir(proto), plan, target="ort", int8_residuals=True)[0])
    (want,) = run_at_level(reference, ort.GraphOptimizationLevel.ORT_DISABLE_ALL, x=x)
    step_s2 = plan.activation_scales["s2"] / 127
    h = _weights()["H"]
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        (got,) = run_at_level(chained, level, x=x)
        # y = H · s2 per position: a code of s2 one step off moves y by at most step · max Σ|H| (1 % for H's
        # own rounding); the int32 biases and the requantizations may flip a code at each of the chain's
        # roundings and a flip reaches s2 through at most two blocks: allow two steps, on few elements
        bound = 2 * 1.01 * step_s2 * np.abs(h).sum(axis=(1, 2, 3)).max()
        diff = np.abs(got - want)
        assert diff.max() <= bound + 1e-5, (diff.max(), bound)
        assert np.mean(diff > 1e-5 * max(1.0, np.abs(want).max())) <= 0.1


def test_the_file_computes_the_same_at_every_optimisation_level() -> None:
    proto, x = _model()
    model = check(apply_plan(to_ir(proto), _plan(proto, x), target="ort", int8_residuals=True)[0])
    (off,) = run_at_level(model, ort.GraphOptimizationLevel.ORT_DISABLE_ALL, x=x)
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        (on,) = run_at_level(model, level, x=x)
        assert np.abs(on - off).max() <= 1e-4 * max(1.0, float(np.abs(off).max())), level


def test_a_sum_read_unrounded_is_left_alone(caplog: pytest.LogCaptureFixture) -> None:
    """s2 is also a graph output here: its Add stays float, and so does s1's, whose sum it reads."""
    text = TEXT.replace("=> (float[2,4,12,12] y)", "=> (float[2,4,12,12] y, float[2,8,12,12] s2)")
    proto, x = _model(text)
    plan = _plan(proto, x)
    with caplog.at_level("WARNING", logger="lpcompile.passes.qlinear_add"):
        model = check(apply_plan(to_ir(proto), plan, target="ort", int8_residuals=True)[0])
    assert "nothing changed" in caplog.text
    names = ops(model)
    # s1 feeds the rounded expand Conv and the second Add (which stays float): a reader that is neither
    assert "QLinearAdd" not in names and names.count("Add") == 2
    plain = check(apply_plan(to_ir(proto), plan, target="ort")[0])
    assert ops(plain) == names


def test_only_on_the_ort_target() -> None:
    with pytest.raises(UsageError, match="--target ort"):
        ApplyConfig(target="qdq", int8_residuals=True)
    assert ApplyConfig(target="ort", int8_residuals=True).int8_residuals


def test_the_latency_objective_counts_the_int8_chain() -> None:
    """With int8 residuals a w8a8 Conv is declared faster than its weight-only int8 twin on ``ort``, so
    ``--objective latency`` takes it (without, the two cost the same and the loss decides)."""
    from lpcompile.analysis.table import Candidate, NodeSensitivity, SensitivityTable
    from lpcompile.budget import parse_budget
    from lpcompile.passes.targets import relative_latency
    from lpcompile.solver.latency import predict_latency, solve_with_objective
    from lpcompile.solver.problem import Choice, Item

    assert relative_latency("ort", "Conv", "w8a8", int8_residuals=True) < 1.0
    assert relative_latency("ort", "Conv", "w8a8") == relative_latency("ort", "Conv", "int8")
    assert relative_latency("qdq", "Conv", "w8a8", int8_residuals=True) == relative_latency("qdq", "Conv", "w8a8")
    nodes = tuple(
        NodeSensitivity(
            name=name, op_type="Conv", weight=f"{name}.w", params=64 * 64, shape=(64, 64, 1, 1),
            candidates={"fp32": Candidate(32.0, 0.0), "int8": Candidate(8.5, 0.01), "w8a8": Candidate(8.5, 0.02)},
            activation=f"{name}.x",
        )
        for name in ("a", "b")
    )  # fmt: skip
    table = SensitivityTable(formats=("int8", "w8a8"), method="hutchinson", loss="kl", nodes=nodes)
    items = [
        Item(n.name, n.params, tuple(Choice(f, c.bits, float(c.predicted_loss or 0)) for f, c in n.candidates.items()))
        for n in table.nodes
    ]
    budget = parse_budget("8.5bits")
    plain = solve_with_objective(items, budget, table, "ort", "latency")
    chained = solve_with_objective(items, budget, table, "ort", "latency", int8_residuals=True)
    assert set(plain.assignments.values()) == {"int8"}
    assert set(chained.assignments.values()) == {"w8a8"}
    assert predict_latency(table, chained.assignments, "ort", int8_residuals=True).ratio < 1.0
    with pytest.raises(UsageError, match="--target ort"):
        from lpcompile.config import DecideConfig

        DecideConfig(target="tvm", int8_residuals=True)


# the skip u is a graph input whose rounding (for q) the activation pass puts before q, after the Add
BRANCHES = """<ir_version: 10, opset_import: ["" : 21]>
g (float[2,3,12,12] x, float[2,8,12,12] u) => (float[2,4,12,12] y) {
  cb = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, W0, B0)
  b1 = Clip(cb, lo, hi)
  p = Conv <kernel_shape = [1, 1]> (b1, P1)
  s = Add(p, u)
  h = Conv <kernel_shape = [1, 1]> (s, H)
  q = Conv <kernel_shape = [1, 1]> (u, H)
  y = Add(h, q)
}"""


def test_a_skip_rounded_only_after_its_add() -> None:
    """The Add reads the skip through a rounding listed after it: the written graph is sorted again, and
    computes the rounded reference."""
    w = _weights()
    w["P1"] = (RNG.standard_normal((8, 8, 1, 1)) * 0.2).astype(np.float32)
    proto = parse(BRANCHES, **{k: w[k] for k in ("W0", "B0", "P1", "H", "lo", "hi")})
    x = (RNG.standard_normal((2, 3, 12, 12)) * 2).astype(np.float32)
    u = np.abs(RNG.standard_normal((2, 8, 12, 12))).astype(np.float32)
    plan = _plan(proto, x, ("x", "b1", "s", "u"), u=u)
    out = check(apply_plan(to_ir(proto), plan, target="ort", int8_residuals=True)[0])  # checks the node order
    assert ops(out).count("QLinearAdd") == 1
    reference = apply_plan(to_ir(proto), plan, target="qdq")[0]
    RoundResidualsPass()(reference)
    (want,) = run_at_level(check(reference), ort.GraphOptimizationLevel.ORT_DISABLE_ALL, x=x, u=u)
    (got,) = run_at_level(out, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, x=x, u=u)
    # y = H·s + H·u: codes of s one step off (the int32 bias, the requantizations) move y by step·Σ|H| each
    bound = 2 * 1.01 * plan.activation_scales["s"] / 127 * np.abs(w["H"]).sum(axis=(1, 2, 3)).max()
    assert np.abs(got - want).max() <= bound + 1e-5, (np.abs(got - want).max(), bound)


# ResNet basic blocks: the sum goes through a Relu before its readers (the next block's Conv and Add)
RESNET = """<ir_version: 10, opset_import: ["" : 21]>
g (float[2,3,12,12] x) => (float[2,4,12,12] y) {
  c0 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, W0, B0)
  a0 = Relu(c0)
  c1 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (a0, K1, B0)
  r1 = Relu(c1)
  c2 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (r1, K2, B0)
  s1 = Add(c2, a0)
  o1 = Relu(s1)
  c3 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (o1, K3, B0)
  r3 = Relu(c3)
  c4 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (r3, K4, B0)
  s2 = Add(c4, o1)
  o2 = Relu(s2)
  y = Conv <kernel_shape = [1, 1]> (o2, H)
}"""


def test_resnet_blocks_with_a_relu_after_the_sum() -> None:
    w = _weights()
    kernels = {k: (RNG.standard_normal((8, 8, 3, 3)) * 0.1).astype(np.float32) for k in ("K1", "K2", "K3", "K4")}
    proto = parse(RESNET, **{k: w[k] for k in ("W0", "B0", "H")}, **kernels)
    x = (RNG.standard_normal((2, 3, 12, 12)) * 2).astype(np.float32)
    plan = _plan(proto, x, ("x", "a0", "r1", "o1", "r3", "o2"))
    chained = check(apply_plan(to_ir(proto), plan, target="ort", int8_residuals=True)[0])
    assert ops(chained).count("QLinearAdd") == 2 and ops(chained).count("QLinearConv") == 5
    assert ops(chained).count("Conv") == 1  # the head: a graph output
    assert _optimised_ops(chained).count("Transpose") <= 2  # one NHWC chain through both blocks
    reference = apply_plan(to_ir(proto), plan, target="qdq")[0]
    RoundResidualsPass()(reference)
    added = [n for n in reference.graph if n.op_type == "QuantizeLinear" and n.name.endswith(("residual_q0",))]
    assert sorted(n.inputs[0].name for n in added) == ["c2", "c4"]  # the second conv of each block
    for q in added:  # with the step of the roundings after the sum's Relu
        after = {"c2": "o1", "c4": "o2"}[q.inputs[0].name]
        assert float(q.inputs[1].const_value.numpy()) == pytest.approx(plan.activation_scales[after] / 127, rel=1e-6)
    (want,) = run_at_level(check(reference), ort.GraphOptimizationLevel.ORT_DISABLE_ALL, x=x)
    (got_y,) = run_at_level(chained, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, x=x)
    bound = 2 * 1.01 * plan.activation_scales["o2"] / 127 * np.abs(w["H"]).sum(axis=(1, 2, 3)).max()
    assert np.abs(got_y - want).max() <= bound + 1e-5, (np.abs(got_y - want).max(), bound)
