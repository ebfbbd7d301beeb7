"""QuantizeWeightsPass: stored codes + decode, checked against the formats reference.

Tolerances: the decoded weight is checked bit-exactly (initializers decoded with the reference
``dequantize`` equal ``qdq_weight``); ORT outputs are compared with x@qdq_weight(W) in float64
within the fp32 summation bound ``(K+1)·2⁻²⁴·(|x|@|Wq|)`` (see pass_helpers). MatMulNBits decodes
code·scale in fp32 while the reference rounds it to fp16: per weight that is at most 2⁻¹¹
relative, so its bound adds ``2⁻¹¹·(|x|@|Wq|)``.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from pass_helpers import assert_matmul_close, check, fp32_dot_bound, ops, parse, run, signature, snapshot, to_ir

from lpcompile.errors import LpError, PlanError
from lpcompile.formats import CONV_LAYOUT, MATMUL_LAYOUT, get_format, qdq_weight, quantize_weight
from lpcompile.graph import find_weight_nodes
from lpcompile.passes.quantize_weights import QuantizeWeightsPass, pack_matmul_nbits, weight_seed
from lpcompile.plan import NodeAssignment, PrecisionPlan

RNG = np.random.default_rng(11)

ONE_MATMUL = """<ir_version: 10, opset_import: ["" : 21]>
g (float[4,{k}] x) => (float[4,{n}] y) {{
  y = MatMul(x, W)
}}"""

EXPECTED_STORAGE = {
    "fp8_e4m3": onnx.TensorProto.FLOAT8E4M3FN,
    "fp8_e5m2": onnx.TensorProto.FLOAT8E5M2,
    "int8": onnx.TensorProto.INT8,
    "int4_b32": onnx.TensorProto.INT4,
    "int4_b64": onnx.TensorProto.INT4,
    "int4_b128": onnx.TensorProto.INT4,
    "bf16": onnx.TensorProto.BFLOAT16,
    "fp16": onnx.TensorProto.FLOAT16,
}


def plan_for(model: ir.Model, formats: dict[str, str] | str) -> PrecisionPlan:
    nodes = []
    for w in find_weight_nodes(model):
        fmt = formats if isinstance(formats, str) else formats.get(w.name)
        if fmt is None:
            continue
        bits = get_format(fmt).bits_for(w.shape, w.layout)
        nodes.append(NodeAssignment(w.name, w.op_type, w.weight, w.params, fmt, bits))
    return PrecisionPlan(nodes=tuple(nodes))


def one_matmul(k: int = 256, n: int = 24) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    w = RNG.standard_normal((k, n)).astype(np.float32)
    x = RNG.standard_normal((4, k)).astype(np.float32)
    return parse(ONE_MATMUL.format(k=k, n=n), W=w), w, x


def initializer(proto: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in proto.graph.initializer if t.name == name)


@pytest.mark.parametrize("fmt", list(EXPECTED_STORAGE))
def test_matmul_weight_formats_qdq(fmt: str) -> None:
    proto, w, x = one_matmul(k=200)  # 200: partial last int4 block for every block size
    model = to_ir(proto)
    plan = plan_for(model, fmt)
    result = QuantizeWeightsPass(plan, target="tvm")(model)  # DequantizeLinear form (decode-once: test_targets.py)
    assert result.modified
    out = check(model)
    assert signature(out) == signature(proto)
    f = get_format(fmt)
    codes = initializer(out, "W_q")
    assert codes.data_type == EXPECTED_STORAGE[fmt]
    assert "W" not in {t.name for t in out.graph.initializer}  # the fp32 weight is gone
    nodes = {n.name: n for n in out.graph.node}
    if f.scale == "per_channel":
        assert ops(out) == ["DequantizeLinear", "MatMul"]
        dq = nodes["n0/weight_dq"]
        assert list(dq.input) == ["W_q", "W_scale"]
        assert {a.name: a.i for a in dq.attribute} == {"axis": 1}
        scale = initializer(out, "W_scale")
        assert scale.data_type == onnx.TensorProto.FLOAT and list(scale.dims) == [24]
        assert nodes["n0"].input[1] == "W_dq"
    elif f.scale == "per_block":
        assert ops(out) == ["DequantizeLinear", "Cast", "MatMul"]
        dq = nodes["n0/weight_dq"]
        assert {a.name: a.i for a in dq.attribute} == {"axis": 0, "block_size": f.block_size}
        scale = initializer(out, "W_scale")
        assert scale.data_type == onnx.TensorProto.FLOAT16
        assert list(scale.dims) == [-(-200 // f.block_size), 24]
        cast = nodes["n0/weight_cast"]
        assert cast.input[0] == "W_dq" and cast.attribute[0].i == onnx.TensorProto.FLOAT
        assert nodes["n0"].input[1] == "W_fp32"
    else:
        assert ops(out) == ["Cast", "MatMul"]
        assert nodes["n0/weight_cast"].input[0] == "W_q"
    assert all({p.key: p.value for p in n.metadata_props}.get("lpcompile.serves") == "n0" for n in out.graph.node[:-1])
    (y,) = run(out, x=x)
    assert_matmul_close(y, x, qdq_weight(fmt, w, MATMUL_LAYOUT))
    # idempotent: nothing left to do, same model
    before = snapshot(model)
    again = QuantizeWeightsPass(plan, target="tvm")(model)
    assert again.modified is False and snapshot(model) == before


def test_stored_int4_codes_match_reference() -> None:
    proto, w, _ = one_matmul(k=64, n=8)
    model = to_ir(proto)
    QuantizeWeightsPass(plan_for(model, "int4_b32"), target="tvm")(model)
    ref = quantize_weight("int4_b32", w, MATMUL_LAYOUT)
    codes = model.graph.initializers["W_q"].const_value.numpy()
    assert codes.dtype == ml_dtypes.int4
    np.testing.assert_array_equal(codes.astype(np.int8), ref.codes)
    np.testing.assert_array_equal(model.graph.initializers["W_scale"].const_value.numpy(), ref.scale)


@pytest.mark.parametrize(("k", "fmt"), [(256, "int4_b32"), (256, "int4_b128"), (80, "int4_b32"), (64, "int4_b128")])
def test_matmulnbits_target_ort(k: int, fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lpcompile.passes.targets.NBITS_MIN_ELEMENTS", 0)  # MatMulNBits even for small weights
    proto, w, x = one_matmul(k=k, n=24)
    model = to_ir(proto)
    QuantizeWeightsPass(plan_for(model, fmt), target="ort")(model)
    out = check(model)
    assert signature(out) == signature(proto)
    (node,) = out.graph.node
    assert (node.op_type, node.domain, node.name) == ("MatMulNBits", "com.microsoft", "n0")
    q = quantize_weight(fmt, w, MATMUL_LAYOUT)
    bs = q.block_size
    nblk = -(-k // bs)
    assert {a.name: a.i for a in node.attribute} == {"K": k, "N": 24, "bits": 4, "block_size": bs, "accuracy_level": 0}
    assert list(node.input) == ["x", "W_q4", "W_scale"]
    b = initializer(out, "W_q4")
    s = initializer(out, "W_scale")
    assert b.data_type == onnx.TensorProto.UINT8 and list(b.dims) == [24, nblk, bs // 2]
    assert s.data_type == onnx.TensorProto.FLOAT and list(s.dims) == [24, nblk]
    assert {o.domain: o.version for o in out.opset_import}.get("com.microsoft") == 1
    (y,) = run(out, x=x)
    # exact decode of the stored codes (fp32 code·scale, no fp16 rounding) ...
    exact = q.codes.astype(np.float64) * np.repeat(q.scale.astype(np.float64), bs, axis=0)[:k]
    assert_matmul_close(y, x, exact)
    # ... and the reference (fp16-rounded) weight, up to 2^-11 relative per weight
    wq = qdq_weight(fmt, w, MATMUL_LAYOUT)
    err = np.abs(y.astype(np.float64) - x.astype(np.float64) @ wq.astype(np.float64))
    assert np.all(err <= fp32_dot_bound(x, wq) + 2.0**-11 * (np.abs(x) @ np.abs(wq)))
    assert QuantizeWeightsPass(plan_for(model, fmt), target="ort")(model).modified is False


def test_pack_matmul_nbits_layout() -> None:
    w = RNG.standard_normal((40, 3)).astype(np.float32)
    q = quantize_weight("int4_b32", w, MATMUL_LAYOUT)
    packed, scales = pack_matmul_nbits(q)
    assert packed.shape == (3, 2, 16) and scales.shape == (3, 2)
    low = (packed & 0x0F).astype(np.int16) - 8
    high = (packed >> 4).astype(np.int16) - 8
    unpacked = np.stack([low, high], axis=-1).reshape(3, 64)  # [N, padded K]
    np.testing.assert_array_equal(unpacked[:, :40], q.codes.T)
    assert np.all(unpacked[:, 40:] == 0)  # padding decodes to zero
    np.testing.assert_array_equal(scales, q.scale.astype(np.float32).T)


def test_block_not_fitting_matmulnbits_falls_back_to_qdq() -> None:
    proto, w, x = one_matmul(k=48, n=8)  # int4_b128 on K=48: block 48, not a power of two
    model = to_ir(proto)
    QuantizeWeightsPass(plan_for(model, "int4_b128"), target="ort")(model)
    out = check(model)
    # decoded once (passes/targets.py): no MatMulNBits, no per-run DequantizeLinear
    assert ops(out) == ["Cast", "Cast", "Mul", "Cast", "Cast", "Flatten", "MatMul"]
    (y,) = run(out, x=x)
    assert_matmul_close(y, x, qdq_weight("int4_b128", w, MATMUL_LAYOUT))


@pytest.mark.parametrize("fmt", ["int8", "int4_b32", "fp8_e4m3", "bf16"])
def test_conv_weight(fmt: str) -> None:
    w = RNG.standard_normal((6, 64, 3, 3)).astype(np.float32)
    x = RNG.standard_normal((1, 64, 5, 5)).astype(np.float32)
    proto = parse(
        """<ir_version: 10, opset_import: ["" : 21]>
        g (float[1,64,5,5] x) => (float[1,6,3,3] y) {
          y = Conv(x, W)
        }""",
        W=w,
    )
    model = to_ir(proto)
    QuantizeWeightsPass(plan_for(model, fmt), target="tvm")(model)
    out = check(model)
    f = get_format(fmt)
    dq = [n for n in out.graph.node if n.op_type == "DequantizeLinear"]
    if f.scale == "per_channel":
        assert {a.name: a.i for a in dq[0].attribute} == {"axis": 0}
    elif f.scale == "per_block":
        assert {a.name: a.i for a in dq[0].attribute} == {"axis": 1, "block_size": 32}
        assert list(initializer(out, "W_scale").dims) == [6, 2, 3, 3]
    (y,) = run(out, x=x)
    wq = qdq_weight(fmt, w, CONV_LAYOUT).astype(np.float64)
    ref = torch.nn.functional.conv2d(torch.from_numpy(x.astype(np.float64)), torch.from_numpy(wq)).numpy()
    mag = torch.nn.functional.conv2d(torch.from_numpy(np.abs(x).astype(np.float64)), torch.from_numpy(np.abs(wq)))
    bound = (64 * 9 + 1) * 2.0**-24 * mag.numpy()
    assert np.all(np.abs(y - ref) <= bound)


def test_shared_weight_one_decode() -> None:
    w = RNG.standard_normal((32, 32)).astype(np.float32)
    x = RNG.standard_normal((2, 32)).astype(np.float32)
    proto = parse(
        """<ir_version: 10, opset_import: ["" : 21]>
        g (float[2,32] x) => (float[2,32] y) {
          h = MatMul(x, W)
          y = MatMul(h, W)
        }""",
        W=w,
    )
    model = to_ir(proto)
    QuantizeWeightsPass(plan_for(model, "int8"), target="tvm")(model)
    out = check(model)
    assert ops(out) == ["DequantizeLinear", "MatMul", "MatMul"]
    dq = out.graph.node[0]
    assert dq.name == "n0/weight_dq"
    assert {p.key: p.value for p in dq.metadata_props}["lpcompile.serves"] == "n0,n1"
    assert out.graph.node[1].input[1] == out.graph.node[2].input[1] == dq.output[0]
    (y,) = run(out, x=x)
    wq = qdq_weight("int8", w, MATMUL_LAYOUT)
    h = x.astype(np.float64) @ wq
    np.testing.assert_allclose(y, h @ wq, rtol=1e-5, atol=1e-5 * np.abs(h @ wq).max())


def test_shared_weight_different_formats_is_plan_error() -> None:
    proto = parse(
        """<ir_version: 10, opset_import: ["" : 21]>
        g (float[2,32] x) => (float[2,32] y) {
          h = MatMul(x, W)
          y = MatMul(h, W)
        }""",
        W=RNG.standard_normal((32, 32)).astype(np.float32),
    )
    model = to_ir(proto)
    with pytest.raises(PlanError, match="share weight"):
        QuantizeWeightsPass(plan_for(model, {"n0": "int8", "n1": "int4_b32"}))(model)


def test_unknown_node_is_plan_error() -> None:
    proto, _, _ = one_matmul()
    model = to_ir(proto)
    plan = PrecisionPlan(nodes=(NodeAssignment("nope", "MatMul", "W", 10, "int8", 8.0),))
    with pytest.raises(PlanError, match="nope"):
        QuantizeWeightsPass(plan)(model)


def test_replanning_a_quantized_node_differently_is_plan_error() -> None:
    proto, _, _ = one_matmul()
    model = to_ir(proto)
    QuantizeWeightsPass(plan_for(model, "int8"))(model)
    plan = PrecisionPlan(nodes=(NodeAssignment("n0", "MatMul", "W", 256 * 24, "int4_b32", 4.5),))
    with pytest.raises(PlanError, match="already stores"):
        QuantizeWeightsPass(plan)(model)


def test_fp32_plan_changes_nothing() -> None:
    proto, _, _ = one_matmul()
    model = to_ir(proto)
    before = snapshot(model)
    assert QuantizeWeightsPass(plan_for(model, "fp32"))(model).modified is False
    assert snapshot(model) == before


def test_stochastic_rounding_is_seeded() -> None:
    proto, w, _ = one_matmul(k=64, n=8)
    outs = []
    for _ in range(2):
        model = to_ir(proto)
        QuantizeWeightsPass(plan_for(model, "int8"), rounding="stochastic", seed=3)(model)
        outs.append(model.graph.initializers["W_q"].const_value.numpy())
    np.testing.assert_array_equal(outs[0], outs[1])
    ref = quantize_weight("int8", w, MATMUL_LAYOUT, "stochastic", weight_seed(3, "W"))
    np.testing.assert_array_equal(outs[0], ref.codes)
    assert not np.array_equal(ref.codes, quantize_weight("int8", w, MATMUL_LAYOUT).codes)


def test_old_opset_is_upgraded() -> None:
    w = RNG.standard_normal((32, 8)).astype(np.float32)
    x = RNG.standard_normal((2, 32)).astype(np.float32)
    proto = parse(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[2,32] x) => (float[2,8] y) {
          h = MatMul(x, W)
          y = ReduceSum<keepdims=1>(h, axes)
        }""".replace("float[2,8] y", "float[2,1] y"),
        W=w,
        axes=np.array([1], dtype=np.int64),
    )
    model = to_ir(proto)
    QuantizeWeightsPass(plan_for(model, "int4_b32"))(model)
    out = check(model)
    assert {o.domain: o.version for o in out.opset_import}[""] == 21
    assert out.ir_version >= 10
    (y,) = run(out, x=x)
    ref = (x.astype(np.float64) @ qdq_weight("int4_b32", w, MATMUL_LAYOUT)).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_unconvertible_opset_is_lp_error() -> None:
    proto = parse(
        """<ir_version: 8, opset_import: ["" : 13]>
        g (float[2,32] x) => (float[2,8] y) {
          h = MatMul(x, W)
          y = NoSuchOp(h)
        }""",
        _check=False,
        W=RNG.standard_normal((32, 8)).astype(np.float32),
    )
    model = to_ir(proto)
    with pytest.raises(LpError, match="opset 13"):
        QuantizeWeightsPass(plan_for(model, "int8"))(model)
