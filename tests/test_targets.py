"""Targets (passes/targets.py): declared kernels, the decode-once form, latency helpers.

Numerics: the decode-once form is checked *bit-exactly* against the reference decode
``lpcompile.formats.qdq_weight`` twice — by evaluating the decode subgraph as written (ORT,
optimisation off) and by reading the weights ONNX Runtime constant-folded at session creation
(``optimized_proto``): both use the reference arithmetic (one fp32 multiply; for fp16 block scales
the exact product rounded to fp16 once). Model outputs are compared with ``x @ qdq_weight(W)``
within the fp32 summation bound of pass_helpers. Stored bits are counted from the file's codes and
scale tensors and must equal the plan's bits exactly. No test asserts a time.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from pass_helpers import assert_matmul_close, check, ops, parse, run, snapshot, to_ir

from lpcompile.errors import UsageError
from lpcompile.formats import MATMUL_LAYOUT, get_format, qdq_weight
from lpcompile.graph import find_weight_nodes
from lpcompile.passes.pipeline import apply_plan
from lpcompile.passes.quantize_weights import QuantizeWeightsPass, decode_once_encoding
from lpcompile.passes.targets import (
    NBITS_MIN_ELEMENTS,
    TARGETS,
    WeightForm,
    activation_style,
    check_target,
    decode_once_bytes,
    kernel_table,
    softmax_pays,
    weight_form,
    weight_kernel,
)
from lpcompile.plan import NodeAssignment, PrecisionPlan
from lpcompile.runtime.ort import compare_latency, latency_inputs, optimized_proto

RNG = np.random.default_rng(16)
ONNX_BITS = {
    onnx.TensorProto.INT4: 4,
    onnx.TensorProto.INT8: 8,
    onnx.TensorProto.FLOAT8E4M3FN: 8,
    onnx.TensorProto.FLOAT8E5M2: 8,
    onnx.TensorProto.FLOAT16: 16,
    onnx.TensorProto.BFLOAT16: 16,
    onnx.TensorProto.FLOAT: 32,
}
WEIGHT_FORMATS = ["int4_b32", "int4_b64", "int4_b128", "int8", "fp8_e4m3", "fp8_e5m2", "bf16", "fp16"]


def plan_for(model: ir.Model, fmt: str) -> PrecisionPlan:
    nodes = [
        NodeAssignment(w.name, w.op_type, w.weight, w.params, fmt, get_format(fmt).bits_for(w.shape, w.layout))
        for w in find_weight_nodes(model)
    ]
    return PrecisionPlan(nodes=tuple(nodes))


def one_matmul(k: int, n: int = 24) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    w = RNG.standard_normal((k, n)).astype(np.float32)
    x = RNG.standard_normal((3, k)).astype(np.float32)
    text = f"""<ir_version: 10, opset_import: ["" : 21]>
    g (float[3,{k}] x) => (float[3,{n}] y) {{
      y = MatMul(x, W)
    }}"""
    return parse(text, W=w), w, x


def one_conv(o: int = 6, i: int = 40) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    w = RNG.standard_normal((o, i, 3, 3)).astype(np.float32)
    x = RNG.standard_normal((1, i, 5, 5)).astype(np.float32)
    text = f"""<ir_version: 10, opset_import: ["" : 21]>
    g (float[1,{i},5,5] x) => (float[1,{o},3,3] y) {{
      y = Conv(x, W)
    }}"""
    return parse(text, W=w), w, x


def folded_weight(proto: onnx.ModelProto, op_type: str) -> np.ndarray:
    """The weight input of the only ``op_type`` node after ORT's basic optimisations (must be folded)."""
    opt = optimized_proto(proto, "basic")
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in opt.graph.initializer}
    (node,) = [n for n in opt.graph.node if n.op_type == op_type]
    assert node.input[1] in inits, f"weight of {op_type} not folded: {[n.op_type for n in opt.graph.node]}"
    assert [n.op_type for n in opt.graph.node] == [op_type]  # the whole decode was folded
    return inits[node.input[1]]


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return np.array_equal(np.asarray(a, np.float32).view(np.uint32), np.asarray(b, np.float32).view(np.uint32))


def stored_bits(proto: onnx.ModelProto, names: set[str]) -> int:
    return sum(ONNX_BITS[t.data_type] * math.prod(t.dims) for t in proto.graph.initializer if t.name in names)


# -- declarations ------------------------------------------------------------------------------


def test_policies() -> None:
    assert TARGETS == ("qdq", "ort", "tvm")
    assert [softmax_pays(t) for t in TARGETS] == [False, False, True]
    assert [activation_style(t) for t in TARGETS] == ["cast", "cast", "qdq"]
    with pytest.raises(UsageError, match="unknown target"):
        check_target("cuda")
    with pytest.raises(UsageError):
        softmax_pays("onnx")
    assert decode_once_bytes(1000) == 4000


def test_weight_forms() -> None:
    # qdq: standard ops only, never a per-run DequantizeLinear, never a contrib op
    for fmt in ("int4_b128", "int8", "fp8_e4m3"):
        for op in ("MatMul", "Conv"):
            assert weight_form("qdq", op, fmt, block_size=128) == WeightForm.DECODE_ONCE
    assert weight_form("qdq", "MatMul", "bf16") == WeightForm.CAST
    # ort: MatMulNBits for int4 blocks that fit it, decode-once for the rest (int8 MatMulNBits at
    # accuracy_level 0 is slower than fp32; no weight-only Conv kernel)
    assert weight_form("ort", "MatMul", "int4_b32", block_size=32) == WeightForm.MATMUL_NBITS
    big, small = NBITS_MIN_ELEMENTS, NBITS_MIN_ELEMENTS - 1
    assert weight_form("ort", "MatMul", "int4_b32", block_size=32, elements=big) == WeightForm.MATMUL_NBITS
    assert weight_form("ort", "MatMul", "int4_b32", block_size=32, elements=small) == WeightForm.DECODE_ONCE
    assert weight_form("ort", "MatMul", "int4_b128", block_size=48) == WeightForm.DECODE_ONCE
    assert weight_form("ort", "MatMul", "int4_b128", block_size=128, rank=3) == WeightForm.DECODE_ONCE
    assert weight_form("ort", "MatMul", "int8") == WeightForm.DECODE_ONCE
    assert weight_form("ort", "Conv", "int4_b32", block_size=32, rank=4, axis=1) == WeightForm.DECODE_ONCE
    # tvm: the DequantizeLinear patterns its lowering matches
    assert weight_form("tvm", "MatMul", "int4_b32", block_size=32) == WeightForm.DEQUANTIZE
    assert weight_kernel("tvm", "Conv", "int8").fast is False
    # grammar families are a portable table decode there: no kernel matches it, so not fast
    for fmt in ("nf4", "mxfp4", "nvfp4", "q4_1"):
        k = weight_kernel("tvm", "MatMul", fmt, block_size=32)
        assert k.fast is False and "table decode" in k.note
    rows = kernel_table()
    assert {(r.target, r.op) for r in rows} == {(t, op) for t in TARGETS for op in ("MatMul", "Conv")}
    # every weight-only form is fast on ORT; w8a8 on qdq decodes its DequantizeLinear weight per run, and
    # w8a8_dyn has an integer GEMM on MatMuls only (ORT's ConvInteger form is slower than fp32)
    slow = {
        ("qdq", "MatMul", "w8a8"), ("qdq", "Conv", "w8a8"), ("qdq", "Conv", "w8a8_dyn"), ("ort", "Conv", "w8a8_dyn")
    }
    assert all(r.fast for r in rows if r.target != "tvm" and (r.target, r.op, r.format) not in slow)
    assert not any(r.fast for r in rows if (r.target, r.op, r.format) in slow)


# -- decode once: numerics, folding, stored bits ------------------------------------------------


@pytest.mark.parametrize("fmt", WEIGHT_FORMATS)
@pytest.mark.parametrize("k", [256, 200])  # 200: a partial last block for every int4 block size
def test_matmul_decode_once(fmt: str, k: int) -> None:
    proto, w, x = one_matmul(k)
    model = to_ir(proto)
    plan = plan_for(model, fmt)
    assert QuantizeWeightsPass(plan, target="qdq")(model).modified
    out = check(model)
    assert {o.domain for o in out.opset_import} <= {"", "ai.onnx"}  # standard ONNX only
    assert "DequantizeLinear" not in ops(out) and ops(out)[-1] == "MatMul"
    ref = qdq_weight(fmt, w, MATMUL_LAYOUT)
    # the decode as written (optimisation off) and as ORT folded it at session creation
    (y,) = run(out, x=x)
    assert_matmul_close(y, x, ref)
    assert same_bits(folded_weight(out, "MatMul"), ref)
    # the file stores exactly the plan's bits: codes and scales (a partial last block apart), nothing else
    names = {t.name for t in out.graph.initializer}
    assert names <= {"W_q", "W_scale", "W_q_tail", "W_scale_tail"}
    assert stored_bits(out, names) == pytest.approx(plan.nodes[0].bits * w.size, rel=0, abs=1e-6)
    # idempotent, and the pattern is recognised as the plan's encoding
    before = snapshot(model)
    assert QuantizeWeightsPass(plan, target="qdq")(model).modified is False
    assert snapshot(model) == before


@pytest.mark.parametrize("fmt", ["int8", "int4_b32", "fp8_e4m3", "bf16"])
def test_conv_decode_once(fmt: str) -> None:
    proto, w, _ = one_conv()
    model = to_ir(proto)
    (wn,) = find_weight_nodes(model)  # the layout the pass uses (int4 Conv blocks may run over I·kh·kw)
    assert QuantizeWeightsPass(plan_for(model, fmt), target="qdq")(model).modified
    out = check(model)
    assert "DequantizeLinear" not in ops(out)
    ref = qdq_weight(fmt, w, wn.layout)
    assert same_bits(folded_weight(out, "Conv"), ref)
    y_fold = optimized_proto(out, "basic")
    assert {n.op_type for n in y_fold.graph.node} == {"Conv"}


def test_ort_target_int8_matmul_decodes_once_and_int4_uses_nbits(monkeypatch: pytest.MonkeyPatch) -> None:
    proto, w, _ = one_matmul(256)
    model = to_ir(proto)
    QuantizeWeightsPass(plan_for(model, "int8"), target="ort")(model)
    out = check(model)
    assert ops(out) == ["Cast", "Mul", "MatMul"]
    assert same_bits(folded_weight(out, "MatMul"), qdq_weight("int8", w, MATMUL_LAYOUT))
    model = to_ir(proto)
    QuantizeWeightsPass(plan_for(model, "int4_b32"), target="ort")(model)
    assert "MatMulNBits" not in ops(model)  # 256x24 weights: below NBITS_MIN_ELEMENTS, decoded once
    monkeypatch.setattr("lpcompile.passes.targets.NBITS_MIN_ELEMENTS", 0)
    model = to_ir(proto)
    QuantizeWeightsPass(plan_for(model, "int4_b32"), target="ort")(model)
    assert ops(model) == ["MatMulNBits"]


def test_decode_once_encoding_recognises_blocks() -> None:
    proto, _, _ = one_matmul(200)
    model = to_ir(proto)
    QuantizeWeightsPass(plan_for(model, "int4_b64"), target="qdq")(model)
    mm = next(n for n in model.graph if n.op_type == "MatMul")
    assert decode_once_encoding(mm.inputs[1]) == ("int4", 64, 200)
    model = to_ir(proto)
    QuantizeWeightsPass(plan_for(model, "int8"), target="qdq")(model)
    mm = next(n for n in model.graph if n.op_type == "MatMul")
    assert decode_once_encoding(mm.inputs[1]) == ("int8", 0, 0)


def test_pipeline_targets_softmax_and_activation_forms() -> None:
    proto, _, x = one_matmul(128)
    model = to_ir(proto)
    plan = plan_for(model, "fp8_e4m3")
    plan = PrecisionPlan(nodes=plan.nodes, activation_scales={"x": 3.0})
    apply_plan(model, plan, target="qdq")
    out = check(model)
    # FP8 activations as Div/Cast/Cast/Mul (faithful at every ORT optimisation level), weight decoded once
    assert "QuantizeLinear" not in ops(out) and "DequantizeLinear" not in ops(out)
    assert np.all(np.isfinite(run(out, x=x)[0]))
    fast = compare_latency(out, proto, {"x": x}, runs=2, warmup=1)
    assert fast.runs == 2 and fast.batch == 3 and fast.threads == 2 and fast.ratio > 0


def test_latency_inputs_repeat_samples() -> None:
    from lpcompile.frontend.calib import CalibrationSet

    proto, _, x = one_matmul(64)
    calib = CalibrationSet(arrays={"x": x}, source="test")
    feed = latency_inputs(proto, calib, 1)
    assert feed["x"].shape == (1, 64)
    feed = latency_inputs(proto, calib, 7)
    assert feed["x"].shape == (7, 64)
    np.testing.assert_array_equal(feed["x"][3], x[0])


@pytest.mark.parametrize("i", [64, 40])  # 40: a partial last block of 32
def test_decode_once_rank4_blocks_reshape_path(i: int) -> None:
    """Blocked weights of rank != 2 go through Pad/Reshape/Mul/Reshape/Slice; still bit-exact once folded."""
    from lpcompile.formats import CONV_LAYOUT, dequantize, quantize_weight
    from lpcompile.passes._common import Namer
    from lpcompile.passes.quantize_weights import _emit_decode_once

    proto, w, _ = one_conv(i=i)
    model = to_ir(proto)
    conv = next(iter(model.graph))
    q = quantize_weight("int4_b32", w, CONV_LAYOUT)
    decoded = _emit_decode_once(model.graph, Namer(model.graph), "W", q, get_format("int4_b32"), [conv])
    conv.replace_input_with(1, decoded)
    del model.graph.initializers["W"]
    out = check(model)
    assert "Reshape" in ops(out)
    assert same_bits(folded_weight(out, "Conv"), dequantize(q))


@pytest.mark.parametrize("fmt", ["int4_b32", "int8", "fp8_e4m3"])
def test_to_dequantize_form_is_the_tvm_form(fmt: str) -> None:
    """Decode-once weights (and Div/Cast/Cast/Mul FP8 roundings) convert back to Q/DQ exactly."""
    from lpcompile.passes.targets import to_dequantize_form

    proto, _, x = one_matmul(200)
    outs = {}
    for target in ("qdq", "tvm"):
        model = to_ir(proto)
        plan = plan_for(model, fmt)
        plan = PrecisionPlan(nodes=plan.nodes, activation_scales={"x": 3.0})
        apply_plan(model, plan, target=target)
        if target == "qdq":
            assert to_dequantize_form(model) >= 1
            assert to_dequantize_form(model) == 0  # nothing left to convert
        out = check(model)
        assert not {"Flatten", "Concat", "Div"} & set(ops(out)) and "DequantizeLinear" in ops(out)
        outs[target] = run(out, x=x)[0]
    np.testing.assert_array_equal(outs["qdq"], outs["tvm"])


def test_eval_latency_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``lpcompile eval --latency --latency-batch N``: ratios against the reference in the JSON (times not asserted)."""
    from lpcompile.cli import main
    from lpcompile.config import ApplyConfig
    from lpcompile.files import apply_file

    examples = Path(__file__).resolve().parent.parent / "examples" / "models"
    ref, calib = examples / "digits_mlp.onnx", examples / "digits_calib.npz"
    out = tmp_path / "mlp.int4.onnx"
    apply_file(ref, out, uniform="int4_b32", calib_path=calib, config=ApplyConfig(target="qdq"))
    args = ["eval", str(out), "--reference", str(ref), "--calib", str(calib), "--latency", "--latency-batch", "4"]
    assert main([*args, "--latency-runs", "3", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    lat = data["latency"]
    assert [r["batch"] for r in lat] == [1, 4]
    assert all(r["threads"] == 2 and r["runs"] == 3 and r["ratio"] > 0 for r in lat)
