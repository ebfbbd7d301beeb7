"""Every weight counts: depthwise / grouped Conv, ConvTranspose, Gather tables and tied heads,
fp16 weights, constant weight subgraphs, recurrent and already-quantized weights, feasibility,
and bits as the written file stores them.

Tolerances: the rewritten model is compared with the same graph run by ORT on the reference
decoded weight (``formats.qdq_weight``). The decode is exact (int4 codes times fp16 scales are
fp16 values; Reshape/Cast are exact), so the two runs differ only by fp32 summation order: at
most ``K·2⁻²⁴·Σ|x·w|`` for a length-K reduction (:func:`tests.pass_helpers.fp32_dot_bound`), here
bounded by ``K²·2⁻²⁴·max|x|·max|w|``. MatMulNBits / GatherBlockQuantized decode ``code·scale``
in fp32 while the reference rounds it to fp16 once (≤ 2⁻¹¹ relative per weight), so those
comparisons add ``K·2⁻¹¹·max|x|·max|w|``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from pass_helpers import check, parse, run, to_ir

from lpcompile.errors import BudgetError
from lpcompile.feasibility import check_budget, smallest_feasible, stored_bits
from lpcompile.formats import get_format, qdq_weight
from lpcompile.graph import GATHER_LAYOUT, find_weight_nodes, tied_groups, weight_coverage
from lpcompile.passes.pipeline import apply_plan, normalize, uniform_plan

HEADER = '<ir_version: 10, opset_import: ["" : 21]>'
FP16_ULP_REL = 2.0**-11


def _bound(k: int, x: np.ndarray, w: np.ndarray, extra_rel: float = 0.0) -> float:
    scale = float(np.abs(x).max()) * float(np.abs(w).max())
    return k * k * 2.0**-24 * scale + k * extra_rel * scale + 1e-30


def _prepare(proto: onnx.ModelProto) -> ir.Model:
    model = to_ir(proto)
    normalize(model)
    return model


def _file_bits(model: ir.Model) -> tuple[float, int]:
    """Σ stored bits and weights of every quantized weight in the written file (codes + scales)."""
    cov = weight_coverage(model)
    kept = [k for k in cov.kept if k.reason == "already-quantized"]
    return sum(k.bits * k.params for k in kept), sum(k.params for k in kept)


def _plan_bits(model: ir.Model, fmt: str, target: str) -> float:
    nodes = find_weight_nodes(model)
    return smallest_feasible(nodes, [fmt], target).min_total_bits


# ---------------------------------------------------------------------------------------------
# depthwise / grouped Conv
# ---------------------------------------------------------------------------------------------

DW = HEADER + " g (float[1,8,6,6] x) => (float[1,8,4,4] y) { y = Conv <group=8> (x, w) }"
GROUPED = HEADER + " g (float[1,8,6,6] x) => (float[1,6,4,4] y) { y = Conv <group=2> (x, w) }"


@pytest.mark.parametrize("target", ["qdq", "ort"])
@pytest.mark.parametrize(
    ("text", "shape", "fmt"), [(DW, (8, 1, 3, 3), "int4_b128"), (GROUPED, (6, 4, 3, 3), "int4_b32")]
)
def test_grouped_conv_blocks_run_over_flattened_reduction(text: str, shape: tuple, fmt: str, target: str) -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal(shape).astype(np.float32)
    model = _prepare(parse(text, w=w))
    (node,) = find_weight_nodes(model)
    assert node.layout.flatten
    k = int(np.prod(shape[1:]))
    f = get_format(fmt)
    nblk = -(-k // min(f.block_size, k))
    # one fp16 scale per ⌈I·kh·kw / bs⌉ block of each output channel, not one per weight
    assert f.bits_for(node.shape, node.layout) == pytest.approx(4 + 16 * nblk / k)
    plan_bits = _plan_bits(model, fmt, target)
    out, _ = apply_plan(model, uniform_plan(model, fmt), target=target)
    check(out)
    assert _file_bits(out) == (pytest.approx(plan_bits), w.size)
    x = rng.standard_normal((1, 8, 6, 6)).astype(np.float32)
    wq = qdq_weight(fmt, w, node.layout)
    ref = run(parse(text, w=wq), x=x)[0]
    y = run(out, x=x)[0]
    np.testing.assert_allclose(y, ref, rtol=0, atol=_bound(k, x, wq))


def test_depthwise_3x3_costs_one_scale_per_channel() -> None:
    model = _prepare(parse(DW, w=np.ones((8, 1, 3, 3), np.float32)))
    (node,) = find_weight_nodes(model)
    # 9 weights per output channel share one fp16 scale: 4 + 16/9 bits (it was 4 + 16 = 20)
    assert get_format("int4_b128").bits_for(node.shape, node.layout) == pytest.approx(4 + 16 / 9)


# ---------------------------------------------------------------------------------------------
# ConvTranspose
# ---------------------------------------------------------------------------------------------

CONVT = HEADER + " g (float[1,4,5,5] x) => (float[1,3,7,7] y) { y = ConvTranspose (x, w) }"


@pytest.mark.parametrize("fmt", ["int8", "int4_b32"])
def test_conv_transpose_is_weighted(fmt: str) -> None:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    model = _prepare(parse(CONVT, w=w))
    (node,) = find_weight_nodes(model)
    assert node.op_type == "ConvTranspose" and node.layout.channel_axis == 1
    plan_bits = _plan_bits(model, fmt, "qdq")
    out, _ = apply_plan(model, uniform_plan(model, fmt), target="qdq")
    check(out)
    assert _file_bits(out) == (pytest.approx(plan_bits), w.size)
    x = rng.standard_normal((1, 4, 5, 5)).astype(np.float32)
    wq = qdq_weight(fmt, w, node.layout)
    ref = run(parse(CONVT, w=wq), x=x)[0]
    np.testing.assert_allclose(run(out, x=x)[0], ref, rtol=0, atol=_bound(36, x, wq))


# ---------------------------------------------------------------------------------------------
# Gather embedding tables and tied heads
# ---------------------------------------------------------------------------------------------

V, D = 50, 64
TIED = (
    HEADER
    + """ g (int64[2,3] ids) => (float[2,3,50] y) {
  h = Gather <axis=0> (E, ids)
  t = Transpose <perm=[1,0]> (E)
  y = MatMul (h, t)
}"""
)
TIED_GEMM = (
    HEADER
    + """ g (int64[4] ids) => (float[4,50] y) {
  h = Gather <axis=0> (E, ids)
  y = Gemm <transB=1> (h, E)
}"""
)


def _table() -> np.ndarray:
    return np.random.default_rng(2).standard_normal((V, D)).astype(np.float32)


def test_gather_and_tied_head_are_one_group() -> None:
    model = _prepare(parse(TIED, E=_table()))
    nodes = find_weight_nodes(model)
    assert [n.op_type for n in nodes] == ["Gather", "MatMul"]
    assert {n.weight for n in nodes} == {"E"} and nodes[1].via
    assert nodes[0].layout == nodes[1].layout  # rows × embedding dim, blocks along D
    groups = tied_groups(nodes)
    assert len(set(groups.values())) == 1 and set(groups) == {n.name for n in nodes}


def test_tied_gemm_head_keeps_the_tie() -> None:
    model = _prepare(parse(TIED_GEMM, E=_table()))
    nodes = find_weight_nodes(model)
    assert [n.op_type for n in nodes] == ["Gather", "MatMul"]
    assert {n.weight for n in nodes} == {"E"}
    assert len([v for v in model.graph.initializers.values() if v.dtype == ir.DataType.FLOAT]) == 1


@pytest.mark.parametrize("target", ["qdq", "ort"])
def test_tied_table_is_stored_once_and_decoded_per_row(target: str) -> None:
    table = _table()
    model = _prepare(parse(TIED, E=table))
    fmt = "int4_b32"
    plan_bits = _plan_bits(model, fmt, target)
    out, _ = apply_plan(model, uniform_plan(model, fmt), target=target)
    if target == "qdq":
        check(out)
    else:
        assert "GatherBlockQuantized" in [n.op_type for n in out.graph]
    codes = [v for v in out.graph.initializers.values() if v.dtype == ir.DataType.INT4]
    assert len(codes) == 1  # one stored copy for the Gather and the head
    assert _file_bits(out) == (pytest.approx(plan_bits), table.size)
    ids = np.array([[0, 1, 2], [3, 49, 7]], dtype=np.int64)
    eq = qdq_weight(fmt, table, GATHER_LAYOUT)
    ref = (eq[ids].astype(np.float64) @ eq.T.astype(np.float64)).astype(np.float32)
    h = eq[ids]
    extra = FP16_ULP_REL if target == "ort" else 0.0
    np.testing.assert_allclose(run(out, ids=ids)[0], ref, rtol=0, atol=_bound(D, h, eq, extra))


def test_hutchinson_differentiates_the_table() -> None:
    from lpcompile.analysis.config import AnalysisConfig
    from lpcompile.analysis.sensitivity import analyze_onnx
    from lpcompile.frontend.calib import CalibrationSet

    model = _prepare(parse(TIED, E=_table()))
    ids = np.random.default_rng(3).integers(0, V, size=(8, 2, 3)).astype(np.int64)
    calib = CalibrationSet({"ids": ids}, source="test")
    cfg = AnalysisConfig(formats=("int4_b32", "int8"), probes=4, batch_size=4, activations=False)
    table = analyze_onnx(model, calib, cfg)
    by_name = {n.name: n for n in table.nodes}
    assert {n.op_type for n in table.nodes} == {"Gather", "MatMul"}
    assert all(n.trace > 0 for n in table.nodes)
    assert len({n.group for n in table.nodes}) == 1 and None not in {n.group for n in table.nodes}
    for n in by_name.values():
        assert n.candidates["int4_b32"].predicted_loss > 0


# ---------------------------------------------------------------------------------------------
# fp16 weights, constant subgraphs
# ---------------------------------------------------------------------------------------------

FP16 = HEADER + " g (float16[3,64] x) => (float16[3,16] y) { y = MatMul (x, w) }"


def test_fp16_weights_are_quantized_from_their_own_values() -> None:
    rng = np.random.default_rng(4)
    w = rng.standard_normal((64, 16)).astype(np.float16)
    model = _prepare(parse(FP16, w=w))
    (node,) = find_weight_nodes(model)
    assert node.dtype == "float16"
    out, _ = apply_plan(model, uniform_plan(model, "int4_b32"), target="qdq")
    check(out)
    x = rng.standard_normal((3, 64)).astype(np.float16)
    wq = qdq_weight("int4_b32", w.astype(np.float32), node.layout).astype(np.float16)
    # int4 codes × fp16 scales are fp16 values: the decoded weight is exactly wq
    assert np.array_equal(wq.astype(np.float32), qdq_weight("int4_b32", w.astype(np.float32), node.layout))
    ref = run(parse(FP16, w=wq), x=x)[0]
    assert np.array_equal(run(out, x=x)[0], ref)


def test_fp16_weight_kept_as_is_costs_16_bits() -> None:
    model = _prepare(parse(FP16, w=np.ones((64, 16), np.float16)))
    (node,) = find_weight_nodes(model)
    assert stored_bits("fp32", node) == 16.0
    assert stored_bits("int4_b32", node) == pytest.approx(4 + 16 / 32)


def test_fp16_weights_are_analysed_in_fp32() -> None:
    from lpcompile.analysis.interpreter import TorchGraph

    w = np.random.default_rng(5).standard_normal((64, 16)).astype(np.float16)
    graph = TorchGraph(parse(FP16, w=w), trainable=["w"])
    assert str(graph.params["w"].dtype) == "torch.float32"
    out = graph.forward({"x": np.ones((3, 64), np.float16)})
    assert str(out["y"].dtype) == "torch.float16"


CONST_WEIGHTS = (
    HEADER
    + """ g (float[2,32] x) => (float[2,8] y) {
  w16 = Cast <to=1> (w_half)
  h = MatMul (x, w16)
  shp = Constant <value = int64[2] {16, 8}> ()
  w2 = ConstantOfShape <value = float[1] {0.25}> (shp)
  y = MatMul (h, w2)
}"""
)


def test_constant_subgraph_weights_are_folded_and_planned() -> None:
    rng = np.random.default_rng(6)
    w_half = rng.standard_normal((32, 16)).astype(np.float16)
    proto = parse(CONST_WEIGHTS, w_half=w_half)
    model = _prepare(proto)
    nodes = find_weight_nodes(model)
    assert [n.op_type for n in nodes] == ["MatMul", "MatMul"]
    assert [n.shape for n in nodes] == [(32, 16), (16, 8)]
    folded = weight_array_of(model, nodes[0].weight)
    assert np.array_equal(folded, w_half.astype(np.float32))  # widened exactly
    assert not [n for n in model.graph if n.op_type in ("Cast", "ConstantOfShape", "Constant")]
    out, _ = apply_plan(model, uniform_plan(model, "int8"), target="qdq")
    check(out)
    x = rng.standard_normal((2, 32)).astype(np.float32)
    w1 = qdq_weight("int8", w_half.astype(np.float32), nodes[0].layout).astype(np.float64)
    w2 = qdq_weight("int8", np.full((16, 8), 0.25, np.float32), nodes[1].layout).astype(np.float64)
    ref = (x.astype(np.float64) @ w1) @ w2
    np.testing.assert_allclose(run(out, x=x)[0], ref, rtol=0, atol=_bound(32, x, w1) * 16 + _bound(16, x @ w1, w2))


def weight_array_of(model: ir.Model, name: str) -> np.ndarray:
    return np.asarray(model.graph.initializers[name].const_value.numpy(), dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# recurrent and already-quantized weights: explicit outcomes
# ---------------------------------------------------------------------------------------------

LSTM = (
    HEADER
    + """ g (float[5,1,4] x) => (float[5,1,8] y) {
  seq, h, c = LSTM <hidden_size=6> (x, W, R)
  s = Squeeze (seq, one)
  y = MatMul (s, P)
}"""
)


def test_lstm_weights_are_kept_with_a_reason(caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(7)
    proto = parse(
        LSTM,
        W=rng.standard_normal((1, 24, 4)).astype(np.float32),
        R=rng.standard_normal((1, 24, 6)).astype(np.float32),
        P=rng.standard_normal((6, 8)).astype(np.float32),
        one=np.array([1], np.int64),
    )
    model = _prepare(proto)
    with caplog.at_level(logging.WARNING, logger="lpcompile.graph"):
        cov = weight_coverage(model)
    assert [n.op_type for n in cov.planned] == ["MatMul"]
    assert {k.tensor for k in cov.kept} == {"W", "R"} and {k.reason for k in cov.kept} == {"recurrent"}
    assert "recurrent weights not yet supported" in cov.outcome()
    assert "recurrent weights not yet supported" in caplog.text
    assert not cov.nothing_to_do
    # the interpreter runs the LSTM, so the other weights get Hutchinson sensitivities
    from lpcompile.analysis.config import AnalysisConfig
    from lpcompile.analysis.sensitivity import analyze_onnx
    from lpcompile.frontend.calib import CalibrationSet

    calib = CalibrationSet({"x": rng.standard_normal((4, 5, 1, 4)).astype(np.float32)}, source="test")
    cfg = AnalysisConfig(formats=("int8",), probes=2, batch_size=2, activations=False)
    table = analyze_onnx(model, calib, cfg)
    assert [n.op_type for n in table.nodes] == ["MatMul"] and table.nodes[0].trace > 0


def test_already_quantized_model_says_nothing_to_do() -> None:
    from lpcompile.formats import MATMUL_LAYOUT, quantize_weight
    from lpcompile.passes.quantize_weights import pack_matmul_nbits

    rng = np.random.default_rng(8)
    w1 = rng.standard_normal((32, 32)).astype(np.float32)
    w2 = rng.standard_normal((32, 8)).astype(np.float32)
    q1 = quantize_weight("int8", w1, MATMUL_LAYOUT)
    q2 = quantize_weight("int4_b32", w2, MATMUL_LAYOUT)
    packed, scales = pack_matmul_nbits(q2)
    text = (
        '<ir_version: 10, opset_import: ["" : 21, "com.microsoft" : 1]> g (float[2,32] x) => (float[2,8] y) {'
        " wd = DequantizeLinear <axis=1> (c1, s1)  h = MatMul (x, wd)"
        " y = com.microsoft.MatMulNBits <K=32, N=8, bits=4, block_size=32, accuracy_level=0> (h, b2, s2) }"
    )
    proto = parse(text, _check=False, c1=q1.codes.astype(np.int8), s1=q1.scale, b2=packed, s2=scales)
    model = _prepare(proto)
    cov = weight_coverage(model)
    assert cov.nothing_to_do
    assert {k.reason for k in cov.kept} == {"already-quantized"}
    bits = {k.op_type: k.bits for k in cov.kept}
    assert bits["DequantizeLinear"] == pytest.approx(8 + 32 * 32 / w1.size)  # int8 codes + fp32 scale per column
    assert bits["MatMulNBits"] == pytest.approx((32 * 8 * 4 + 8 * 32) / w2.size)  # nibbles + fp32 scale per block
    assert cov.outcome().startswith("nothing to do")
    _strict_refuses(proto)
    x = rng.standard_normal((2, 32)).astype(np.float32)
    assert run(proto, x=x)[0].shape == (2, 8)  # the file runs as it is


# ---------------------------------------------------------------------------------------------
# feasibility and bits per target
# ---------------------------------------------------------------------------------------------

MIXED = (
    HEADER
    + """ g (int64[4] ids) => (float[4,10] y) {
  h = Gather <axis=0> (E, ids)
  a = MatMul (h, W1)
  y = MatMul (a, W2)
}"""
)


def _mixed() -> ir.Model:
    rng = np.random.default_rng(9)
    return _prepare(
        parse(
            MIXED,
            E=rng.standard_normal((40, 64)).astype(np.float32),
            W1=rng.standard_normal((64, 48)).astype(np.float32),
            W2=rng.standard_normal((48, 10)).astype(np.float32),
        )
    )


def test_infeasible_budget_fails_from_shapes() -> None:
    model = _mixed()
    feas = smallest_feasible(find_weight_nodes(model), ["int8", "int4_b32"])
    assert feas.min_bits_per_weight > 4.0
    with pytest.raises(BudgetError, match=r"smallest feasible budget is 4\.\d+ bits"):
        check_budget(model, "4bits", ["int8", "int4_b32"])
    assert check_budget(model, "4.6bits", ["int8", "int4_b32"]).feasible("4.6bits")
    t0 = time.perf_counter()
    smallest_feasible(find_weight_nodes(model), ["int8", "int4_b32"])
    del t0  # timing is never asserted; the function only reads shapes


def test_matmul_nbits_counts_fp32_scales(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lpcompile.passes.targets.NBITS_MIN_ELEMENTS", 0)  # MatMulNBits even for small weights
    model = _mixed()
    w1 = next(n for n in find_weight_nodes(model) if n.weight == "W1")
    f = get_format("int4_b32")
    assert stored_bits(f, w1, "qdq") == pytest.approx(4 + 16 / 32)
    assert stored_bits(f, w1, "ort") == pytest.approx(4 + 32 / 32)


@pytest.mark.parametrize("target", ["qdq", "ort", "tvm"])
@pytest.mark.parametrize("fmt", ["int4_b32", "int8"])
def test_plan_bits_equal_file_bits(target: str, fmt: str) -> None:
    model = _mixed()
    plan_bits = _plan_bits(model, fmt, target)
    out, _ = apply_plan(model, uniform_plan(model, fmt), target=target)
    total, params = _file_bits(out)
    assert params == sum(n.params for n in find_weight_nodes(_mixed()))
    assert total == pytest.approx(plan_bits, rel=1e-12)
    ids = np.array([0, 5, 39, 2], dtype=np.int64)
    assert np.isfinite(run(out, ids=ids)[0]).all()


RECURRENT = (
    HEADER
    + """ g (float[5,2,4] x) => (float[5,{dirs},2,6] y, float[{dirs},2,6] yh) {{
  y, yh = {op} <hidden_size=6, direction="{direction}"{extra}> (x, W, R, B)
}}"""
)


@pytest.mark.parametrize(
    ("op", "direction", "extra"),
    [
        ("LSTM", "forward", ""),
        ("LSTM", "bidirectional", ""),
        ("GRU", "forward", ""),
        ("GRU", "reverse", ", linear_before_reset=1"),
        ("RNN", "bidirectional", ""),
    ],
)
def test_recurrent_ops_are_interpreted_like_ort(op: str, direction: str, extra: str) -> None:
    """The interpreter runs LSTM/GRU/RNN (so the other weights of such models get Hutchinson sensitivities).

    Tolerance: fp32 with a different summation order and transcendental implementations, over 5
    recurrent steps of |values| ≤ 1 (tanh/sigmoid outputs): 1e-5 absolute.
    """
    from lpcompile.analysis.interpreter import TorchGraph

    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    dirs = 2 if direction == "bidirectional" else 1
    rng = np.random.default_rng(10)
    proto = parse(
        RECURRENT.format(op=op, dirs=dirs, direction=direction, extra=extra),
        W=(0.5 * rng.standard_normal((dirs, gates * 6, 4))).astype(np.float32),
        R=(0.5 * rng.standard_normal((dirs, gates * 6, 6))).astype(np.float32),
        B=(0.1 * rng.standard_normal((dirs, 2 * gates * 6))).astype(np.float32),
    )
    x = rng.standard_normal((5, 2, 4)).astype(np.float32)
    ref = run(proto, x=x)
    got = TorchGraph(proto, trainable=["W"]).forward({"x": x})
    for name, r in zip(("y", "yh"), ref, strict=True):
        np.testing.assert_allclose(got[name].detach().numpy(), r, rtol=0, atol=1e-5)


def test_gather_block_quantized_with_a_partial_last_block() -> None:
    """D = 100 is not a multiple of 32: GatherBlockQuantized decodes the partial block like the reference.

    Tolerance: GatherBlockQuantized computes code·scale and rounds it to its fp16 output once, as the
    reference does; the Cast to fp32 is exact, so the rows are equal.
    """
    text = HEADER + " g (int64[4] ids) => (float[4,100] y) { y = Gather (E, ids) }"
    table = np.random.default_rng(11).standard_normal((10, 100)).astype(np.float32)
    model = _prepare(parse(text, E=table))
    plan_bits = _plan_bits(model, "int4_b32", "ort")
    out, _ = apply_plan(model, uniform_plan(model, "int4_b32"), target="ort")
    assert [n.op_type for n in out.graph] == ["GatherBlockQuantized", "Cast"]
    assert _file_bits(out) == (pytest.approx(plan_bits), table.size)
    ids = np.array([0, 3, 9, 1], dtype=np.int64)
    assert np.array_equal(run(out, ids=ids)[0], qdq_weight("int4_b32", table, GATHER_LAYOUT)[ids])


@pytest.mark.parametrize("target", ["qdq", "ort", "tvm"])
def test_api_plan_bits_equal_file_bits(target: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The plan the API writes reports the bits the file stores (MatMulNBits with fp32 scales on ort)."""
    from lpcompile.api import apply, decide_uniform
    from lpcompile.config import ApplyConfig

    monkeypatch.setattr("lpcompile.passes.targets.NBITS_MIN_ELEMENTS", 0)  # MatMulNBits even for small weights
    model = _mixed()
    plan = decide_uniform(model, "int4_b32", target=target)
    applied = apply(model, plan, ApplyConfig(target=target))
    if target == "ort":
        assert "MatMulNBits" in [n.op_type for n in applied.model.graph]
    planned = sum(a.bits * a.params for a in plan.nodes)
    assert sum(a.bits * a.params for a in applied.plan.nodes) == pytest.approx(planned)
    assert _file_bits(applied.model)[0] == pytest.approx(planned)


def test_fixed_bits_count_what_the_plan_does_not_decide() -> None:
    model = _mixed()
    cov = weight_coverage(model)
    assert cov.other_params == 0 and cov.fixed_bits == 0.0
    out, _ = apply_plan(model, uniform_plan(model, "int8"), target="qdq")
    cov = weight_coverage(out)
    assert cov.nothing_to_do and cov.fixed_bits == pytest.approx(_file_bits(out)[0])


def test_fp8_is_no_candidate_for_an_embedding_table() -> None:
    """A Gather reads no float activation an FP8 scale could be calibrated on: its group is never FP8."""
    from lpcompile.analysis.config import AnalysisConfig
    from lpcompile.analysis.sensitivity import analyze_onnx
    from lpcompile.api import apply, decide_uniform
    from lpcompile.config import ApplyConfig
    from lpcompile.frontend.calib import CalibrationSet

    model = _prepare(parse(TIED, E=_table()))
    ids = np.random.default_rng(13).integers(0, V, size=(4, 2, 3)).astype(np.int64)
    cfg = AnalysisConfig(formats=("fp8_e4m3", "bf16", "int4_b32"), probes=2, batch_size=2)
    table = analyze_onnx(model, CalibrationSet({"ids": ids}, source="test"), cfg)
    for n in table.nodes:
        assert "fp8_e4m3" not in n.candidates and {"bf16", "int4_b32", "fp32"} <= set(n.candidates)
    plan = decide_uniform(model, "fp8_e4m3")
    assert {a.format for a in plan.nodes} == {"fp32"}
    out = apply(model, decide_uniform(model, "bf16"), ApplyConfig())
    assert np.isfinite(run(out.model, ids=ids[0])[0]).all()


def test_tied_head_decode_is_folded_by_ort(tmp_path: Path) -> None:
    """On ``ort`` the head's decode of the shared codes is made of ops ORT folds at session start."""
    import onnxruntime as ort

    model = _prepare(parse(TIED, E=_table()))
    out, _ = apply_plan(model, uniform_plan(model, "int4_b32"), target="ort")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(ir.to_proto(out).SerializeToString(), so, providers=["CPUExecutionProvider"])
    ops_left = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert "GatherBlockQuantized" in ops_left and "MatMul" in ops_left
    assert not {"Mul", "Reshape", "Transpose"} & set(ops_left)  # the head weight is a folded fp32 constant


@pytest.mark.parametrize("target", ["qdq", "ort", "tvm"])
@pytest.mark.parametrize("case", ["tied", "depthwise", "fp16", "conv_transpose"])
def test_quantize_pass_is_idempotent_on_the_new_layouts(case: str, target: str) -> None:
    from pass_helpers import snapshot

    from lpcompile.passes.quantize_weights import QuantizeWeightsPass

    rng = np.random.default_rng(14)
    proto, fmt = {
        "tied": (lambda: parse(TIED, E=_table()), "int4_b32"),
        "depthwise": (lambda: parse(DW, w=rng.standard_normal((8, 1, 3, 3)).astype(np.float32)), "int4_b128"),
        "fp16": (lambda: parse(FP16, w=rng.standard_normal((64, 16)).astype(np.float16)), "int4_b32"),
        "conv_transpose": (lambda: parse(CONVT, w=rng.standard_normal((4, 3, 3, 3)).astype(np.float32)), "int8"),
    }[case]
    model = _prepare(proto())
    plan = uniform_plan(model, fmt)
    assert QuantizeWeightsPass(plan, target=target)(model).modified
    before = snapshot(model)
    assert not QuantizeWeightsPass(plan, target=target)(model).modified
    assert snapshot(model) == before


def _strict_refuses(proto: onnx.ModelProto) -> None:
    """``lpcompile MODEL --budget B --strict`` on a model with nothing to do: one line, exit 1, nothing written."""
    import tempfile

    from lpcompile.cli import main

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "q.onnx"
        onnx.save(proto, str(src))
        assert main([str(src), "--budget", "4.5bits", "--strict", "-q", "-o", str(Path(tmp) / "o.onnx")]) == 1
        assert sorted(p.name for p in Path(tmp).iterdir()) == ["q.onnx"]
