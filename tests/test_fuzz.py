"""Fuzzing the loader and the rewrite pipeline (hypothesis, fixed budget, derandomized).

Property: whatever the input — mutated ONNX bytes, or a random small graph from a grammar of
the ops lpcompile meets (MatMul, Gemm, Conv, Add, Mul, Relu, Sigmoid, Softmax, Reshape,
Transpose, LayerNormalization, Flatten) with random opsets, shapes, shared / all-zero /
NaN weights and a random per-node plan — ``load_model`` + ``apply_to_file`` either write a model
that passes ``onnx.checker.check_model(full_check=True)`` or raise an ``LpError``. Anything else
(a traceback) fails the test. The rewritten random graphs also run in ONNX Runtime, and a few
of them go through the whole ``compile`` (analysis, solver, rewrite).

Budget: 60 examples per test (15 for compile), derandomized, no example database; set
``LP_FUZZ_EXAMPLES=1000`` for a longer local run.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from lpcompile.config import ApplyConfig
from lpcompile.errors import LpError
from lpcompile.files import apply_file
from lpcompile.frontend.onnx_io import load_model

EXAMPLES = int(os.environ.get("LP_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FORMATS = ["fp32", "bf16", "fp16", "fp8_e4m3", "fp8_e5m2", "int8", "int4_b32", "int4_b128"]


# --------------------------------------------------------------------------------------------
# a grammar of small graphs


class _Builder:
    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, np.ndarray] = {}
        self.n = 0

    def name(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def weight(self, shape: tuple[int, ...], kind: str, reuse: bool) -> str:
        if reuse:
            for k, v in self.inits.items():
                if v.shape == shape and k.startswith("w"):
                    return k
        w = (self.rng.standard_normal(shape) / np.sqrt(max(1, shape[0]))).astype(np.float32)
        if kind == "zero":
            w[:] = 0
        elif kind == "nan":
            w.flat[0] = np.nan
        elif kind == "big":
            w *= 1e4
        name = self.name("w")
        self.inits[name] = w
        return name

    def node(self, op: str, inputs: list[str], **attrs: object) -> str:
        out = self.name("t")
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.name(op.lower()), **attrs))
        return out


@st.composite
def graphs(draw: st.DrawFn) -> tuple[onnx.ModelProto, np.ndarray]:
    seed = draw(st.integers(0, 2**32 - 1))
    b = _Builder(np.random.default_rng(seed))
    opset = draw(st.sampled_from([13, 17, 18, 21]))
    conv = draw(st.booleans())
    batch = draw(st.integers(1, 3))
    wkind = st.sampled_from(["normal"] * 6 + ["zero", "nan", "big"])
    if conv:
        c, hw = draw(st.integers(1, 4)), draw(st.integers(3, 6))
        x_shape: list[int | str] = ["N", c, hw, hw]
        t = "x"
        for _ in range(draw(st.integers(1, 2))):
            co, k = draw(st.integers(1, 6)), draw(st.sampled_from([1, 3]))
            w = b.weight((co, c, k, k), draw(wkind), draw(st.booleans()))
            inputs = ["x" if t == "x" else t, w]
            if draw(st.booleans()):
                bias = b.name("b")
                b.inits[bias] = np.zeros(co, np.float32)
                inputs.append(bias)
            t = b.node("Conv", inputs, pads=[k // 2] * 4)
            t = b.node("Relu", [t])
            c = co
        t = b.node("Flatten", [t], axis=1)
        d = c * hw * hw
        feed = np.random.default_rng(seed).standard_normal((batch, x_shape[1], hw, hw)).astype(np.float32)
    else:
        d = draw(st.sampled_from([4, 8, 16, 33]))
        x_shape = ["N", d]
        t = "x"
        feed = np.random.default_rng(seed).standard_normal((batch, d)).astype(np.float32)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(
            st.sampled_from(
                ["MatMul", "Gemm", "Add", "Mul", "Relu", "Sigmoid", "Softmax", "Reshape3", "LayerNorm", "MatMul"]
            )
        )
        if op == "MatMul":
            n = draw(st.sampled_from([4, 8, 16, 40]))
            t = b.node("MatMul", [t, b.weight((d, n), draw(wkind), draw(st.booleans()))])
            d = n
        elif op == "Gemm":
            n, trans = draw(st.sampled_from([4, 8, 16])), draw(st.integers(0, 1))
            w = b.weight((n, d) if trans else (d, n), draw(wkind), draw(st.booleans()))
            inputs = [t, w]
            if draw(st.booleans()):
                c = b.name("c")
                b.inits[c] = np.full(n, 0.1, np.float32)
                inputs.append(c)
            t = b.node("Gemm", inputs, transB=trans, alpha=draw(st.sampled_from([1.0, 0.5])))
            d = n
        elif op in ("Add", "Mul"):
            c = b.name("c")
            b.inits[c] = np.linspace(-1, 1, d, dtype=np.float32)
            t = b.node(op, [t, c])
        elif op in ("Relu", "Sigmoid"):
            t = b.node(op, [t])
        elif op == "Softmax":
            t = b.node("Softmax", [t], axis=-1)
        elif op == "Reshape3" and d % 2 == 0:  # [N, d] → [N, 2, d/2] → transpose → back
            s1, s2 = b.name("s"), b.name("s")
            b.inits[s1] = np.array([0, 2, d // 2], np.int64)
            b.inits[s2] = np.array([0, d], np.int64)
            t = b.node("Reshape", [t, s1])
            t = b.node("Transpose", [t], perm=[0, 2, 1])
            if draw(st.booleans()):
                t = b.node("MatMul", [t, b.weight((2, 2), draw(wkind), False)])
            t = b.node("Transpose", [t], perm=[0, 2, 1])
            t = b.node("Reshape", [t, s2])
        elif op == "LayerNorm" and opset >= 17:
            g, beta = b.name("g"), b.name("beta")
            b.inits[g], b.inits[beta] = np.ones(d, np.float32), np.zeros(d, np.float32)
            t = b.node("LayerNormalization", [t, g, beta], axis=-1)
    b.nodes.append(helper.make_node("Identity", [t], ["y"], name="out"))
    graph = helper.make_graph(
        b.nodes,
        "fuzz",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", d])],
        [numpy_helper.from_array(v, k) for k, v in b.inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)  # the grammar only makes valid models
    return model, feed


def _apply_or_lperror(src: Path, out: Path, **kw: object) -> bool:
    """Apply; True when a model was written (and it passes the full checker), False on LpError."""
    try:
        target = kw.pop("target", "qdq")
        apply_file(src, out, force=True, config=ApplyConfig(target=target), **kw)  # type: ignore[arg-type]
    except LpError as exc:
        assert str(exc) and "\n" not in str(exc)
        event(f"LpError: {str(exc)[:60]}")
        return False
    event("rewritten")
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    return True


@FUZZ
@given(graphs(), st.data())
def test_random_graphs_rewrite_to_valid_models(case: tuple[onnx.ModelProto, np.ndarray], data: st.DataObject) -> None:
    from lpcompile.passes.pipeline import plan_nodes_for, uniform_plan
    from lpcompile.runtime.ort import make_session, run

    model, feed = case
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "m.onnx", Path(tmp) / "m.lp.onnx"
        onnx.save(model, str(src))
        loaded = load_model(src)
        nodes = plan_nodes_for(loaded)
        target = data.draw(st.sampled_from(["qdq", "ort"]), label="target")
        if data.draw(st.booleans(), label="uniform"):
            kw: dict[str, object] = {"uniform": data.draw(st.sampled_from(FORMATS), label="format")}
        else:  # a random per-node plan; nodes sharing a weight get one format (else PlanError is expected)
            from lpcompile.passes.normalize import NormalizeWeightsPass

            NormalizeWeightsPass()(loaded)
            base = uniform_plan(loaded, "fp32")
            by_weight = {n.weight: data.draw(st.sampled_from(FORMATS), label=f"fmt {n.weight}") for n in nodes}
            from lpcompile.formats import get_format

            fmts = {n.name: by_weight[n.weight] for n in nodes}
            plan_nodes = tuple(
                replace(a, format=fmts[a.name], bits=get_format(fmts[a.name]).bits_for(tuple(n.shape), n.layout))
                for a, n in zip(base.nodes, nodes, strict=True)
            )
            kw = {
                "plan": replace(
                    base,
                    nodes=plan_nodes,
                    softmax=data.draw(st.sampled_from(["auto", "two-pass", "keep"]), label="softmax"),
                )
            }
        if _apply_or_lperror(src, out, target=target, **kw):
            y = run(make_session(str(out)), {"x": feed})["y"]
            assert y.shape[0] == feed.shape[0]


# bit flips most often (they keep the protobuf framing more often than not, so the passes see
# damaged-but-loadable models), then deletions, insertions, truncations and zeroed bytes
_MUTATIONS = st.lists(
    st.tuples(
        st.sampled_from(["flip"] * 4 + ["delete", "insert", "truncate", "zero"]),
        st.integers(0, 2**31),
        st.integers(0, 255),
    ),
    min_size=1,
    max_size=3,
)


def _mutate(data: bytes, ops: list[tuple[str, int, int]]) -> bytes:
    buf = bytearray(data)
    for op, pos, byte in ops:
        if not buf:
            break
        i = pos % len(buf)
        if op == "flip":
            buf[i] ^= 1 << (byte % 8)
        elif op == "delete":
            del buf[i : i + 1 + byte % 8]
        elif op == "insert":
            buf[i:i] = bytes([byte]) * (1 + byte % 4)
        elif op == "truncate":
            del buf[i:]
        else:
            buf[i] = 0
    return bytes(buf)


@pytest.fixture(scope="module")
def seed_models() -> list[bytes]:
    rng = np.random.default_rng(1)
    models = []
    for opset in (13, 21):
        graph = helper.make_graph(
            [
                helper.make_node("Gemm", ["x", "w0", "c0"], ["h"], name="fc0", transB=1),
                helper.make_node("Relu", ["h"], ["r"], name="relu"),
                helper.make_node("MatMul", ["r", "w1"], ["s"], name="fc1"),
                helper.make_node("Softmax", ["s"], ["y"], name="sm", axis=-1),
            ],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
            [
                numpy_helper.from_array(rng.standard_normal((6, 8)).astype(np.float32), "w0"),
                numpy_helper.from_array(np.zeros(6, np.float32), "c0"),
                numpy_helper.from_array(rng.standard_normal((6, 4)).astype(np.float32), "w1"),
            ],
        )
        models.append(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]).SerializeToString())
    return models


@FUZZ
@given(st.integers(0, 1), _MUTATIONS, st.sampled_from(["int8", "int4_b32", "fp8_e4m3", "bf16"]))
def test_mutated_bytes_load_cleanly_or_fail_with_lperror(
    seed_models: list[bytes], which: int, ops: list[tuple[str, int, int]], fmt: str
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "m.onnx", Path(tmp) / "o.onnx"
        src.write_bytes(_mutate(seed_models[which], ops))
        try:
            load_model(src)
        except LpError as exc:
            assert "\n" not in str(exc)
            event(f"load: {type(exc).__name__}: {str(exc).split(':')[0][:40]}")
            return
        _apply_or_lperror(src, out, uniform=fmt)


@settings(FUZZ, max_examples=max(1, EXAMPLES // 4))
@given(graphs(), st.sampled_from(["4.5", "6", "8", "1MB"]))
def test_random_graphs_compile_or_fail_with_lperror(case: tuple[onnx.ModelProto, np.ndarray], budget: str) -> None:
    from lpcompile.analysis.config import AnalysisConfig
    from lpcompile.files import compile_file

    model, _ = case
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "m.onnx", Path(tmp) / "m.lp.onnx"
        onnx.save(model, str(src))
        try:
            compile_file(src, budget, out=out, config=AnalysisConfig(probes=2, batch_size=4))
        except LpError as exc:
            assert "\n" not in str(exc)
            event(f"LpError: {str(exc)[:40]}")
            return
        onnx.checker.check_model(onnx.load(str(out)), full_check=True)
        event("compiled")
