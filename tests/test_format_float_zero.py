"""Asymmetric integers with a FLOAT offset per group (``z<T>``: GGUF Q4_1 / Q5_1, HQQ-style).

Decode ``q·s + m`` in fp32 (``fp32(fp32(q·s) + m)``), ``s = (max−min)/(2^N−1)`` in the scale type,
``m = min`` in the offset type, codes ``clip(rint((w−m)/s), 0, 2^N−1)`` with the stored ``s`` and
``m``. Checked here against an independent numpy + ml_dtypes reference, bit for bit, and through ONNX
Runtime at ``ORT_DISABLE_ALL`` and ``ORT_ENABLE_ALL``.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from pass_helpers import ONE_MATMUL, assert_matmul_close, check, parse, to_ir

from lpcompile import format_grammar as fg
from lpcompile.errors import FormatError
from lpcompile.formats import (
    MATMUL_LAYOUT,
    WeightLayout,
    canonical_name,
    dequantize,
    get_format,
    quantize_weight,
)
from lpcompile.graph import find_weight_nodes
from lpcompile.passes.quantize_weights import QuantizeWeightsPass
from lpcompile.plan import NodeAssignment, PrecisionPlan
from lpcompile.rounding import round_weight

NP_TYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32}

FAMILY = (
    "q4_1",
    "q5_1",
    "int4_asym_b32_sbf16_zbf16",
    "int4_asym_b32_sfp32_zf32",
    "int3_asym_pc_zf32",
    "int2_asym_b16_zf16",
    "int8_asym_b64_zf16",
    "int6_asym_b32_zbf16",
)


# ---------------------------------------------------------------------------------------------
# the independent reference (numpy + ml_dtypes; MatMul layout [K, N], groups along K or per column)
# ---------------------------------------------------------------------------------------------


def _store(x: np.ndarray, dtype: str, positive: bool) -> np.ndarray:
    """Round float64 to ``dtype`` (scales: positive, fp32 → type as the other families; offsets: saturate)."""
    t = NP_TYPES[dtype]
    big = float(ml_dtypes.finfo(t).max)
    if positive:
        out = np.minimum(x, big).astype(np.float32).astype(t) if dtype == "bfloat16" else np.minimum(x, big).astype(t)
        tiny = (
            t(float(ml_dtypes.finfo(t).smallest_subnormal))
            if dtype != "float32"
            else np.float32(np.finfo(np.float32).tiny)
        )
        return np.where(out.astype(np.float32) > 0, out, tiny).astype(t)
    return np.clip(x, -big, big).astype(t)


def reference(name: str, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(codes [K, N], scale, offset, decode)`` of ``w [K, N]``; scale / offset ``[n_blocks, N]`` or ``[N]``."""
    spec = fg.parse(name)
    hi = 2**spec.storage_bits - 1
    lim = float(np.finfo(np.float32).max) / 4  # the format saturates there (a finite decode)
    w = np.clip(np.nan_to_num(np.asarray(w, np.float32), nan=0.0, posinf=lim, neginf=-lim), -lim, lim)
    k, n = w.shape
    b = min(spec.block_size, k) if spec.block_size else k
    nb = -(-k // b)
    codes = np.zeros((k, n), np.int64)
    scale = np.zeros((nb, n), NP_TYPES[spec.scale_dtype])
    offset = np.zeros((nb, n), NP_TYPES[spec.offset_dtype])
    dec = np.zeros((k, n), np.float32)
    for i in range(nb):
        rows = slice(i * b, min(k, (i + 1) * b))
        blk = w[rows].astype(np.float64)
        lo, top = blk.min(axis=0), blk.max(axis=0)
        s = _store(np.where(top > lo, (top - lo) / hi, 1.0), spec.scale_dtype, positive=True)
        m = _store(lo, spec.offset_dtype, positive=False)
        q = np.clip(np.rint((blk - m.astype(np.float64)) / s.astype(np.float64)), 0, hi).astype(np.int64)
        codes[rows], scale[i], offset[i] = q, s, m
        prod = q.astype(np.float32) * s.astype(np.float32)  # fp32 product, then one fp32 add
        dec[rows] = prod.astype(np.float32) + m.astype(np.float32)
    if not spec.block_size:
        scale, offset = scale[0], offset[0]
    return codes, scale, offset, dec


def _check_against_reference(name: str, w: np.ndarray) -> np.ndarray:
    q = quantize_weight(name, w, MATMUL_LAYOUT)
    codes, scale, offset, dec = reference(name, w)
    np.testing.assert_array_equal(q.codes.astype(np.int64), codes)
    assert q.scale.dtype == scale.dtype and q.zero_point.dtype == offset.dtype
    np.testing.assert_array_equal(q.scale.astype(np.float32), scale.astype(np.float32))
    np.testing.assert_array_equal(q.zero_point.astype(np.float32), offset.astype(np.float32))
    out = dequantize(q)
    np.testing.assert_array_equal(out, dec)
    return out


# ---------------------------------------------------------------------------------------------
# grammar
# ---------------------------------------------------------------------------------------------


def test_names_and_short_names() -> None:
    assert canonical_name("q4_1") == "int4_asym_b32_zf16"
    assert canonical_name("q5_1") == "int5_asym_b32_zf16"
    assert canonical_name("int4_asym_b32_sf16_zf16") == "int4_asym_b32_zf16"  # sf16 = sfp16 (the default)
    assert canonical_name("uint4_b32_zfp16") == "int4_asym_b32_zf16"
    assert canonical_name("int4_asym_b32_zf32") == "int4_asym_b32_zf32"
    assert canonical_name("int4_asym_b64_sbf16_zbf16") == "int4_asym_b64_sbf16_zbf16"
    f = get_format("q4_1")
    assert (f.element, f.zero_point, f.offset_dtype, f.scale_dtype, f.block_size) == (
        "uint4", True, "float16", "float16", 32
    )  # fmt: skip
    # the integer-zero-point family is unchanged
    g = get_format("int4_asym_b32")
    assert g.offset_dtype is None and g.nominal_bits == pytest.approx(4 + 20 / 32)
    assert get_format("int4_b32").name == "int4_b32"


@pytest.mark.parametrize(
    "bad",
    ["int4_b32_zf16", "e2m1_b32_zf16", "nf4_b64_zf16", "int4_asym_b32_zf8", "int4_asym_b16_se4m3_t32_zf16"],
)
def test_invalid_offsets_are_one_line_errors(bad: str) -> None:
    with pytest.raises(FormatError) as err:
        get_format(bad)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("name", "bits"),
    [("q4_1", 5.0), ("q5_1", 6.0), ("int4_asym_b32_zf32", 5.5), ("int4_asym_b32_sfp32_zf32", 6.0),
     ("int4_asym_b64_sbf16_zbf16", 4.5), ("int2_asym_b16_zf16", 4.0)],
)  # fmt: skip
def test_bits_per_weight(name: str, bits: float) -> None:
    f = get_format(name)
    assert f.nominal_bits == pytest.approx(bits)
    assert f.bits_for((256, 64), MATMUL_LAYOUT) == pytest.approx(bits)
    spec = fg.parse(name)
    assert fg.bits_per_weight(spec, 256 * 64, 256 // spec.block_size * 64) == pytest.approx(bits)
    # per channel: one scale and one offset per output channel
    pspec = fg.parse(spec.name.replace(f"_b{spec.block_size}", "_pc"))
    assert get_format(pspec.name).bits_for((100, 7), MATMUL_LAYOUT) == pytest.approx(
        spec.storage_bits + 7 * (fg.SCALE_BITS[pspec.scale_dtype] + fg.OFFSET_BITS[pspec.offset_dtype]) / 700
    )


# ---------------------------------------------------------------------------------------------
# the reference, bit for bit
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILY)
def test_random_weights_match_the_independent_reference(name: str) -> None:
    rng = np.random.default_rng(7)
    k, n = 100, 9  # 100 is no multiple of the blocks: a partial last block
    w = (rng.standard_normal((k, n)) * np.exp(rng.uniform(-4, 2, (1, n))) + rng.uniform(-1, 1, (1, n))).astype(
        np.float32
    )
    out = _check_against_reference(name, w)
    spec = fg.parse(name)
    # error bound: half a step per element (+ offset rounding and the fp32 add)
    b = spec.block_size or k
    for i in range(-(-k // b)):
        blk = w[i * b : (i + 1) * b]
        step = (blk.max(axis=0) - blk.min(axis=0)) / (2**spec.storage_bits - 1)
        err = np.abs(out[i * b : (i + 1) * b] - blk)
        assert np.all(err <= 0.5 * step * 1.01 + 4e-3 * np.abs(blk).max(axis=0) + 1e-30)


@pytest.mark.parametrize("name", FAMILY)
def test_every_code_round_trips_exactly(name: str) -> None:
    """Weights built as ``q·s + m`` on the format's own grid (every code in every block) come back unchanged."""
    spec = fg.parse(name)
    hi = 2**spec.storage_bits - 1
    rng = np.random.default_rng(spec.storage_bits)
    b = spec.block_size or 96
    n = 6
    reps = -(-b // (hi + 1))
    k = b * 3 if spec.block_size else b
    codes = np.zeros((k, n), np.int64)
    full_s = np.zeros((k, n), np.float32)
    full_m = np.zeros((k, n), np.float32)
    for i in range(k // b):
        for j in range(n):
            col = np.tile(np.arange(hi + 1), reps)[:b] if hi + 1 <= b else rng.integers(0, hi + 1, b)
            col[0], col[-1] = 0, hi  # min and max codes present
            codes[i * b : (i + 1) * b, j] = rng.permutation(col)
            s = NP_TYPES[spec.scale_dtype](rng.uniform(1e-3, 1e-1) / hi * 15)
            m = NP_TYPES[spec.offset_dtype](rng.uniform(-0.3, 0.1))
            full_s[i * b : (i + 1) * b, j] = np.float32(s)
            full_m[i * b : (i + 1) * b, j] = np.float32(m)
    w = ((codes.astype(np.float32) * full_s).astype(np.float32) + full_m).astype(np.float32)
    q = quantize_weight(name, w, MATMUL_LAYOUT)
    np.testing.assert_array_equal(q.codes.astype(np.int64), codes)
    if spec.scale_dtype == "float32":  # (max − min)/hi recomputes s only to within an fp32 rounding
        np.testing.assert_allclose(dequantize(q), w, rtol=0, atol=4 * np.finfo(np.float32).eps)
    else:  # 16-bit scales: s and m are recovered exactly, so is every weight
        np.testing.assert_array_equal(q.scale.astype(np.float32), full_s[::b])
        np.testing.assert_array_equal(q.zero_point.astype(np.float32), full_m[::b])
        np.testing.assert_array_equal(dequantize(q), w)
    _check_against_reference(name, w)


@pytest.mark.parametrize("name", ["q4_1", "int4_asym_b32_sbf16_zbf16", "int3_asym_pc_zf32", "int8_asym_b64_zf16"])
def test_adversarial_weights(name: str) -> None:
    k, n = 70, 8
    w = np.zeros((k, n), np.float32)
    w[:, 1] = 0.1  # constant (not an fp16 value)
    w[:, 2] = np.where(np.arange(k) % 2, 1000.0, -1000.0)
    w[:, 3] = np.float32(1e-40) * np.arange(k)  # fp32 subnormals
    w[:, 4] = np.linspace(-3.0, 5.0, k)
    w[5, 4] = np.nan
    w[6, 5], w[7, 5] = np.inf, -np.inf
    w[:, 6] = np.linspace(1e6, 2e6, k)  # beyond fp16: offsets and scales saturate
    w[64:, 7] = np.linspace(5.0, 6.0, k - 64)  # partial last block away from 0: its padding is ignored
    with np.errstate(over="ignore", invalid="ignore"):
        out = _check_against_reference(name, w)
        clean = np.nan_to_num(w, nan=0.0, posinf=np.finfo(np.float32).max, neginf=-np.finfo(np.float32).max)
        np.testing.assert_array_equal(dequantize(quantize_weight(name, clean, MATMUL_LAYOUT)), out)  # NaN → 0
    spec = fg.parse(name)
    assert np.all(out[:, 0] == 0.0)  # zeros stay zeros
    m01 = NP_TYPES[spec.offset_dtype](0.1)
    assert np.all(out[:, 1] == np.float32(m01))  # a constant decodes to its offset exactly
    if spec.offset_dtype != "float32":
        assert np.all(out[::2, 2] == -1000.0)  # the minimum is the offset itself
        # the maximum is hi·s + m with s = (2000/hi) rounded to the scale type: off by that rounding
        assert np.abs(out[1::2, 2] - 1000.0).max() <= 0.5 * 2000.0 / (2**spec.storage_bits - 1)
    assert np.all(np.isfinite(out))
    if spec.block_size:  # the partial last block [64, 70) of column 7 spans [5, 6], not [0, 6]
        assert np.abs(out[64:, 7] - w[64:, 7]).max() <= 1.0 / (2**spec.storage_bits - 1)


def test_conv_layout_uses_the_grammar_reference() -> None:
    rng = np.random.default_rng(3)
    w = rng.standard_normal((8, 40, 3, 3)).astype(np.float32)
    layout = WeightLayout(channel_axis=0, reduction_axis=1)
    q = quantize_weight("q4_1", w, layout)
    assert q.zero_point.dtype == np.float16 and q.scale.shape == (8, 2, 3, 3)
    out = dequantize(q)
    # decode by hand: blocks of 32 along axis 1 (the last one partial)
    s = np.repeat(q.scale.astype(np.float32), 32, axis=1)[:, :40]
    m = np.repeat(q.zero_point.astype(np.float32), 32, axis=1)[:, :40]
    np.testing.assert_array_equal(out, (q.codes.astype(np.float32) * s).astype(np.float32) + m)


# ---------------------------------------------------------------------------------------------
# the written form in ONNX Runtime
# ---------------------------------------------------------------------------------------------


def _plan(model: ir.Model, fmt: str) -> PrecisionPlan:
    nodes = [
        NodeAssignment(w.name, w.op_type, w.weight, w.params, fmt, get_format(fmt).bits_for(w.shape, w.layout))
        for w in find_weight_nodes(model)
    ]
    return PrecisionPlan(nodes=tuple(nodes))


def _sessions(proto: onnx.ModelProto) -> list[ort.InferenceSession]:
    out = []
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        out.append(ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"]))
    return out


@pytest.mark.parametrize("target", ["qdq", "ort"])
@pytest.mark.parametrize("name", FAMILY)
def test_ort_runs_the_written_form_exactly(name: str, target: str) -> None:
    rng = np.random.default_rng(11)
    k, n = 100, 12
    w = (rng.standard_normal((k, n)) * np.exp(rng.uniform(-3, 3, (1, n)))).astype(np.float32)
    w[:, 0] = 0.0
    w[:, 1] = 0.25 + np.abs(w[:, 1])  # all positive: the offset carries the block's minimum
    x = rng.standard_normal((3, k)).astype(np.float32)
    model = to_ir(parse(ONE_MATMUL.format(k=k, n=n), W=w))
    out = QuantizeWeightsPass(_plan(model, name), target=target)(model).model
    mm = next(nd for nd in out.graph if nd.op_type == "MatMul")
    out.graph.outputs.append(mm.inputs[1])
    proto = check(out)
    assert all(nd.domain in ("", "ai.onnx") for nd in proto.graph.node)  # standard ONNX (no MatMulNBits)
    ref = dequantize(quantize_weight(name, w, MATMUL_LAYOUT))
    np.testing.assert_array_equal(ref, reference(name, w)[3])
    for sess in _sessions(proto):
        y, wq = sess.run(None, {"x": x})
        np.testing.assert_array_equal(wq, ref)
        assert_matmul_close(y, x, ref)
    out.graph.outputs.pop()
    assert not QuantizeWeightsPass(_plan(model, name), target=target)(out).modified  # already written


STORED = ("_codes", "_scale", "_offset")


@pytest.mark.parametrize("name", ["q4_1", "q5_1", "int3_asym_b32_zf32", "int4_asym_b64_sbf16_zbf16"])
def test_plan_bits_equal_file_bits(name: str) -> None:
    rng = np.random.default_rng(5)
    k, n = 128, 16
    w = rng.standard_normal((k, n)).astype(np.float32)
    model = to_ir(parse(ONE_MATMUL.format(k=k, n=n), W=w))
    plan = _plan(model, name)
    out = QuantizeWeightsPass(plan)(model).model
    stored = sum(8 * v.const_value.nbytes for v in out.graph.initializers.values() if v.name.endswith(STORED))
    assert stored == pytest.approx(plan.nodes[0].bits * k * n, rel=1e-12)
    offsets = [v for v in out.graph.initializers.values() if v.name.endswith("_offset")]
    assert len(offsets) == 1 and offsets[0].dtype == {
        "float16": ir.DataType.FLOAT16, "float32": ir.DataType.FLOAT, "bfloat16": ir.DataType.BFLOAT16
    }[fg.parse(name).offset_dtype]  # fmt: skip


def test_ort_matmul_nbits_float_zero_point_is_not_this_offset() -> None:
    """Why target ``ort`` writes the table decode, not ``MatMulNBits`` with float zero points: ORT 1.32's
    CPU kernel decodes ``q·s + fp32(−z·s)`` (checked here), so a stored offset ``m`` needs an fp32 ``z``
    with ``fp32(z·s) = −m`` exactly, and for some (fp16 s, fp16 m) no fp32 ``z`` near ``−m/s`` has one."""
    rng = np.random.default_rng(0)
    k, n, bs = 64, 16, 32
    nb = k // bs
    q = rng.integers(0, 16, size=(n, nb, bs)).astype(np.uint8)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    s = (rng.random((n, nb)) * 0.01 + 0.001).astype(np.float16).astype(np.float32)
    z = (rng.random((n, nb)) * 15).astype(np.float32)
    node = helper.make_node("MatMulNBits", ["A", "B", "S", "Z"], ["Y"], domain="com.microsoft", K=k, N=n, bits=4,
                            block_size=bs, accuracy_level=0)  # fmt: skip
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [k, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [k, n])],
        [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(s.reshape(-1), "S"),
         numpy_helper.from_array(z.reshape(-1), "Z")],
    )  # fmt: skip
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    qf, s3, z3 = q.astype(np.float32), s[..., None], z[..., None]
    expect = ((qf * s3).astype(np.float32) + (-(z3 * s3)).astype(np.float32)).reshape(n, k).T
    for sess in _sessions(proto):
        np.testing.assert_array_equal(sess.run(None, {"A": np.eye(k, dtype=np.float32)})[0], expect)
    # fp16 offsets that no fp32 z within ±4 ulps of −m/s reaches
    s16 = (rng.random(4000) * 0.01 + 0.001).astype(np.float16).astype(np.float32)
    m16 = (-(rng.random(4000) * 0.08)).astype(np.float16).astype(np.float32)
    z0 = (-m16.astype(np.float64) / s16).astype(np.float32)
    hit = np.zeros(z0.shape, bool)
    for d in range(-4, 5):
        zc = z0.copy()
        for _ in range(abs(d)):
            zc = np.nextafter(zc, np.float32(np.inf) if d > 0 else np.float32(-np.inf))
        hit |= (zc * s16).astype(np.float32) == -m16
    assert 0.5 < hit.mean() < 1.0


# ---------------------------------------------------------------------------------------------
# rounding
# ---------------------------------------------------------------------------------------------


def test_rounding_methods_keep_scale_and_offset() -> None:
    rng = np.random.default_rng(4)
    k, n = 128, 24
    x = (rng.standard_normal((800, k)) * np.exp(rng.normal(size=k))).astype(np.float32)
    x[:, 1:] += 0.6 * x[:, :-1]  # correlated inputs: what GPTQ exploits
    w = (0.05 * rng.standard_normal((k, n))).astype(np.float32)
    h = x.T.astype(np.float64) @ x.astype(np.float64)
    near = quantize_weight("q4_1", w, MATMUL_LAYOUT)
    errs = {}
    for method in ("rtn", "mse", "gptq"):
        q = round_weight("q4_1", w, MATMUL_LAYOUT, method, hessian=h)
        np.testing.assert_array_equal(q.scale, near.scale)
        np.testing.assert_array_equal(q.zero_point, near.zero_point)
        assert q.zero_point.dtype == np.float16 and q.codes.min() >= 0 and q.codes.max() <= 15
        dec = dequantize(q)
        # the decode is the format's: q·s + m in fp32
        s = np.repeat(q.scale.astype(np.float32), 32, axis=0)
        m = np.repeat(q.zero_point.astype(np.float32), 32, axis=0)
        np.testing.assert_array_equal(dec, (q.codes.astype(np.float32) * s).astype(np.float32) + m)
        errs[method] = float(np.sum((x @ (dec - w)) ** 2))
    assert errs["mse"] == errs["rtn"]  # no search for this family: nearest with the min/max grid
    assert errs["gptq"] < 0.9 * errs["rtn"]


# ---------------------------------------------------------------------------------------------
# other targets: TVM runs the decode with its own converters; MLIR refuses packed 1/2/4-bit codes
# ---------------------------------------------------------------------------------------------


@pytest.mark.tvm
@pytest.mark.parametrize("target", ["qdq", "tvm"])
def test_tvm_lowering_matches_ort(tmp_path: object, target: str) -> None:
    pytest.importorskip("tvm")
    import test_tvm_lowering as tv

    path = tv._rewrite(tmp_path, tv.EXAMPLES / "digits_mlp.onnx", "q4_1", target=target)  # type: ignore[arg-type]
    assert tv._check(path, tv._pixels(), layers=4, k_max=512) == []  # no kernel: decode ops + fp32 MatMul


def _mlir_model(tmp_path: object, fmt: str) -> object:
    pytest.importorskip("torch_mlir")
    import test_mlir as tm

    return tm._rewrite(tmp_path, (fmt,) * len(tm.LOW))  # type: ignore[arg-type]


@pytest.mark.mlir
def test_mlir_refuses_packed_codes_in_one_line(tmp_path: object) -> None:
    from lpcompile.runtime import mlir

    path = _mlir_model(tmp_path, "q4_1")
    x = np.random.default_rng(1).standard_normal((2, 4, 16)).astype(np.float32)
    with pytest.raises(mlir.MlirError) as err:
        mlir.import_onnx(path, "linalg", {"x": x})  # type: ignore[arg-type]
    assert "int4_asym_b32_zf16" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.mlir
@pytest.mark.parametrize("fmt", ["int8_asym_b32_zf16", "int3_asym_b32_zf16"])
def test_mlir_runs_unpacked_offsets_like_ort(tmp_path: object, fmt: str) -> None:
    from lpcompile.runtime import mlir
    from lpcompile.runtime.ort import make_session, run

    path = _mlir_model(tmp_path, fmt)
    x = np.random.default_rng(1).standard_normal((2, 4, 16)).astype(np.float32)
    (got,) = mlir.run_linalg(mlir.import_onnx(path, "linalg", {"x": x}), [x])  # type: ignore[arg-type]
    ref = run(make_session(onnx.load(str(path)), numerics="exact"), {"x": x})["y"]
    assert float(np.abs(got - ref).max()) <= 64 * 2.0**-24 * float(np.abs(ref).max())


GATHER = """<ir_version: 10, opset_import: ["" : 21]>
g (int64[2,3] ids) => (float[2,3,{d}] y) {{
  y = Gather(T, ids)
}}"""


def test_embedding_table_rows_decode_exactly() -> None:
    """A Gather table (rows = channel 0, blocks along D) in q4_1: the gathered rows are the reference's."""
    rng = np.random.default_rng(9)
    v, d = 20, 80
    table = (rng.standard_normal((v, d)) * 0.1 + 0.05).astype(np.float32)
    model = to_ir(parse(GATHER.format(d=d), T=table))
    (wn,) = find_weight_nodes(model)
    out = QuantizeWeightsPass(_plan(model, "q4_1"), target="ort")(model).model
    proto = check(out)
    ids = np.array([[0, 5, 19], [7, 7, 3]], np.int64)
    ref = dequantize(quantize_weight("q4_1", table, wn.layout)).reshape(v, d)
    for sess in _sessions(proto):
        np.testing.assert_array_equal(sess.run(None, {"ids": ids})[0], ref[ids])
