"""MLIR through torch-mlir: element types per format, verification, ExecutionEngine vs ONNX Runtime.

A six-layer MLP (ONNX text; a Reshape whose shape is computed with Shape/Gather/Concat, so the
shape baking is exercised) is rewritten with one format per layer, exported once as a torch
program and imported at every level. Element types are read by walking the module with the MLIR
bindings, not by searching the text.

ExecutionEngine tolerance (fp32/bf16/fp16 plan): the JIT-compiled linalg and ONNX Runtime sum the
fp32 matmuls in different orders (relative differences ~1e-7), and such a difference can move a
value across a bf16 rounding boundary before the next layer; one such flip changes an output by
at most about one bf16 ulp of the activations it touches. The bound is therefore one bf16 ulp
(2^-8) of the output's magnitude, max |Δ| ≤ 2^-8 · max|y|, and the median error must stay at
fp32 rounding level (≤ 1e-6 · max|y|).
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

pytest.importorskip("torch_mlir")

from dataclasses import replace

from lpcompile.errors import UsageError
from lpcompile.files import apply_file
from lpcompile.frontend.onnx_io import ensure_node_names, save_model
from lpcompile.passes.pipeline import normalize, uniform_plan
from lpcompile.runtime import mlir

pytestmark = pytest.mark.mlir

MLP_TEXT = """
<ir_version: 10, opset_import: ["" : 21]>
mlp (float[N, 4, 16] x) => (float[N, 10] y) {
    h0 = MatMul(x, W0)
    a0 = Relu(h0)
    h1 = MatMul(a0, W1)
    a1 = Tanh(h1)
    h2 = MatMul(a1, W2)
    a2 = Relu(h2)
    h3 = MatMul(a2, W3)
    a3 = Sigmoid(h3)
    shape = Shape(a3)
    batch = Gather <axis = 0> (shape, zero)
    new_shape = Concat <axis = 0> (batch, flat)
    f = Reshape(a3, new_shape)
    h4 = MatMul(f, W4)
    a4 = Relu(h4)
    h5 = MatMul(a4, W5)
    y = Softmax <axis = -1> (h5)
}
"""
SHAPES = {"W0": (16, 32), "W1": (32, 32), "W2": (32, 32), "W3": (32, 32), "W4": (128, 64), "W5": (64, 10)}
LOW = ("fp8_e4m3", "fp8_e5m2", "bf16", "fp16", "int8", "int4_b32")
HALF = ("bf16", "fp16", "fp32", "bf16", "fp16", "bf16")
LEVELS = ("torch", "linalg", "stablehlo", "tosa")


def _mlp() -> onnx.ModelProto:
    model = onnx.parser.parse_model(MLP_TEXT)
    rng = np.random.default_rng(0)
    inits = [
        onnx.numpy_helper.from_array((rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32), name)
        for name, s in SHAPES.items()
    ]
    inits += [
        onnx.numpy_helper.from_array(np.array([0], np.int64), "zero"),
        onnx.numpy_helper.from_array(np.array([128], np.int64), "flat"),
    ]
    model.graph.initializer.extend(inits)
    onnx.checker.check_model(model)
    return model


def _rewrite(tmp: Path, formats: tuple[str, ...]) -> Path:
    import onnx_ir as ir

    src = tmp / "mlp.onnx"
    model = ir.from_proto(_mlp())
    ensure_node_names(model)
    save_model(model, src)
    normalize(model)
    plan = uniform_plan(model, "fp32")
    plan = plan.with_nodes([replace(a, format=f) for a, f in zip(plan.nodes, formats, strict=True)])
    return apply_file(src, tmp / f"mlp.{formats[0]}.lp.onnx", plan=plan).output


@pytest.fixture(scope="module")
def low_model(tmp_path_factory) -> Path:
    return _rewrite(tmp_path_factory.mktemp("mlir"), LOW)


@pytest.fixture(scope="module")
def example() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).standard_normal((2, 4, 16)).astype(np.float32)}


@pytest.fixture(scope="module")
def program(low_model: Path, example):
    return mlir.export_program(low_model, example)


@pytest.fixture(scope="module")
def modules(program) -> dict[str, object]:
    return {}


def _at(modules: dict[str, object], program, level: str):
    if level not in modules:
        modules[level] = mlir.import_program(program, level)
    return modules[level]


@pytest.mark.parametrize("level", LEVELS)
def test_levels_carry_the_plan_element_types(program, modules, level: str) -> None:
    module = _at(modules, program, level)
    found = set(mlir.element_types(module))
    assert mlir.expected_element_types(LOW, level) <= found, found
    assert {"f8E4M3FN", "f8E5M2", "bf16", "f16"} <= found


def _weight_constants(model: onnx.ModelProto, level: str) -> collections.Counter:
    """``(element type, shape)`` of the stored weight of every planned node: the initializer at the
    start of the DequantizeLinear/Cast chain that feeds the node's weight input."""
    props = {p.key: p.value for p in model.metadata_props}
    precision_map = json.loads(props["lpcompile.precision_map"])
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    seen, out = set(), collections.Counter()
    for node_name, fmt in precision_map.items():
        et = mlir.weight_element_type(fmt, level)
        if et is None:
            continue
        name = nodes[node_name].input[1]
        while name not in inits:
            name = producers[name].input[0]
        if name not in seen:
            seen.add(name)
            out[(et, inits[name])] += 1
    return out


@pytest.mark.parametrize("level", ("torch", "linalg"))
def test_every_weight_constant_keeps_its_format(program, modules, low_model: Path, level: str) -> None:
    expected = _weight_constants(onnx.load(str(low_model)), level)
    found = mlir.constant_types(_at(modules, program, level))
    assert len(expected) == len(LOW)
    assert not expected - found, (expected, found)


def test_text_parses_and_verifies(program, modules) -> None:
    module = _at(modules, program, "linalg")
    again = mlir.parse_module(str(module))
    assert mlir.element_types(again) == mlir.element_types(module)


def test_lower_to_mlir_writes_a_file(low_model: Path, tmp_path: Path) -> None:
    import onnx_ir as ir

    copy = tmp_path / "copy.lp.onnx"  # any path the lower command gives it
    save_model(ir.load(str(low_model)), copy)
    out = mlir.lower_to_mlir(copy, tmp_path / "mlp.mlir", "torch")
    module = mlir.parse_module(out.read_text(encoding="utf-8"))
    assert {"f8E4M3FN", "si8"} <= set(mlir.element_types(module))
    with pytest.raises(UsageError):
        mlir.lower_to_mlir(copy, tmp_path / "x.mlir", "spirv")


def test_linalg_runs_like_onnx_runtime(tmp_path: Path, example) -> None:
    from lpcompile.runtime.ort import make_session, run

    model_path = _rewrite(tmp_path, HALF)
    module = mlir.import_onnx(model_path, "linalg", example)
    assert {"bf16", "f16"} <= set(mlir.element_types(module))
    (got,) = mlir.run_linalg(module, [example["x"]])
    ref = run(make_session(onnx.load(str(model_path)), numerics="exact"), example)["y"]
    err = np.abs(got.astype(np.float64) - ref)
    scale = float(np.abs(ref).max())
    assert err.max() <= 2.0**-8 * scale
    assert float(np.median(err)) <= 1e-6 * scale


def test_onnx_program_matches_the_interpreter(low_model: Path, example) -> None:
    import torch

    from lpcompile.analysis.interpreter import TorchGraph

    prog = mlir.OnnxProgram(low_model, example)
    graph = TorchGraph(str(low_model))
    (y,) = prog(torch.from_numpy(example["x"]))
    ref = graph.forward(example)["y"]
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    assert prog.baked  # the Reshape's shape came from Shape/Gather/Concat and was baked


# --------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2 (slow): the MLIR of the compiled plan


@pytest.mark.slow
@pytest.mark.model
def test_minilm_plan_types_reach_mlir() -> None:
    from _torch_models import minilm_compiled

    result = minilm_compiled()
    formats = sorted({n.format for n in result.plan.nodes} - {"fp32"})
    assert formats, "the 4.5-bit plan uses low-precision formats"
    module = result.to_mlir("linalg")
    mlir.verify(module)
    found = set(mlir.element_types(module))
    assert mlir.expected_element_types(formats, "linalg") <= found, (formats, found)
    # every quantized weight is a constant of its format's element type and its stored shape
    expected = _weight_constants(result.model, "linalg")
    assert sum(expected.values()) == sum(1 for n in result.plan.nodes if n.format != "fp32")
    assert not expected - mlir.constant_types(module)
