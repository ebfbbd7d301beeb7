"""The analysis's memory savings give the same numbers as the expressions they replace.

An embedding table (a Gather's weight) is also its node's "activation": its activation leaf is the
weight's own leaf in the GGN analysis (no table-sized zero perturbation, copy, gradient and
accumulator per batch), its range is taken chunk by chunk, and the activation term is summed with
two float64 temporaries instead of five. Tables must be bit-identical to the old way.
"""

from __future__ import annotations

import time

import numpy as np
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from lpcompile.analysis import sensitivity
from lpcompile.analysis.config import AnalysisConfig
from lpcompile.analysis.sensitivity import (
    OnnxAdapter,
    activation_elements,
    activation_error,
    analyze_onnx,
    finite_amax,
    run_analysis,
)
from lpcompile.analysis.table import SensitivityTable
from lpcompile.formats import activation_scale, qdq_activation
from lpcompile.frontend.calib import CalibrationSet
from lpcompile.graph import find_weight_nodes

V, D, N, T = 50, 16, 12, 6


def _old_activation_error(d: np.ndarray, a: np.ndarray, element: str, amax: float) -> float:
    delta = qdq_activation(a, element, activation_scale(amax, element)).astype(np.float64) - a
    return float(np.sum(d.astype(np.float64) * delta * delta))


def _old_amax(t: torch.Tensor) -> float | None:
    a = t.abs()
    a = a[torch.isfinite(a)]
    return float(a.max()) if a.numel() else None


@pytest.mark.parametrize("chunk", [100, 1 << 20])
@pytest.mark.parametrize("element", ["float8_e4m3fn", "float8_e5m2", "bfloat16", "float16", "int8"])
def test_activation_error_is_bit_identical(element: str, chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sensitivity, "ACTIVATION_CHUNK", chunk)
    rng = np.random.default_rng(1)
    a = (rng.normal(size=(37, 53)) * 3).astype(np.float32)
    d32 = np.abs(rng.normal(size=a.shape)).astype(np.float32)
    amax = float(np.abs(a).max())
    old = _old_activation_error(d32, a, element, amax)
    assert activation_error(d32, a, element, amax) == old
    assert activation_error(d32.astype(np.float64), a, element, amax) == old


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 20])
def test_finite_amax_matches_masked_max(chunk: int) -> None:
    rng = np.random.default_rng(2)
    t = torch.from_numpy(rng.normal(size=(9, 11)).astype(np.float32))
    t[0, 3] = float("nan")
    t[4, 4] = float("inf")
    t[8, 10] = -float("inf")
    assert finite_amax(t, chunk) == _old_amax(t)
    assert finite_amax(torch.full((5,), float("nan")), chunk) is None
    assert finite_amax(torch.zeros(0), chunk) is None
    assert finite_amax(torch.tensor(-2.5), chunk) == 2.5


def _embedding_model(table: np.ndarray, w: np.ndarray) -> ir.Model:
    """ids → Gather(table) → MatMul(W) → y, and a tied head h·tableᵀ → logits (the table read twice)."""
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["E", "ids"], ["h"], name="embed"),
            helper.make_node("MatMul", ["h", "W"], ["y"], name="mm"),
            helper.make_node("Transpose", ["E"], ["Et"], name="tr", perm=[1, 0]),
            helper.make_node("MatMul", ["h", "Et"], ["logits"], name="head"),
        ],
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", T])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", T, N]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", T, V]),
        ],
        [numpy_helper.from_array(table, "E"), numpy_helper.from_array(w, "W")],
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))


def _table(model: ir.Model, calib: CalibrationSet, cfg: AnalysisConfig, share: bool) -> SensitivityTable:
    nodes = find_weight_nodes(model)
    weights = sorted({n.weight for n in nodes})
    acts = sorted({n.activation for n in nodes}) if activation_elements(cfg.formats) else []
    adapter = OnnxAdapter(model, weights, acts, share_tables=share)
    return run_analysis(adapter, model, nodes, calib, cfg, None, {}, time.perf_counter())


def test_shared_table_leaf_gives_the_same_table() -> None:
    rng = np.random.default_rng(3)
    table = rng.normal(size=(V, D)).astype(np.float32)
    table[1, 2] = -0.0
    model = _embedding_model(table, rng.normal(size=(D, N)).astype(np.float32))
    calib = CalibrationSet({"ids": rng.integers(0, V, size=(20, T)).astype(np.int64)}, source="test")
    cfg = AnalysisConfig(formats=("int8", "int4_b16", "fp8_e4m3", "bf16"), probes=8, batch_size=6, seed=5)
    nodes = find_weight_nodes(model)
    assert any(n.activation == n.weight for n in nodes), "the Gather's activation is its table"
    old = _table(model, calib, cfg, share=False)
    new = _table(model, calib, cfg, share=True)
    assert new.nodes == old.nodes
    assert new.activation_amax == old.activation_amax
    # the analysis entry point shares the table leaf for GGN and gives that same table
    via_api = analyze_onnx(model, calib, cfg)
    assert via_api.nodes == old.nodes


def test_hvp_keeps_a_separate_table_leaf() -> None:
    rng = np.random.default_rng(4)
    model = _embedding_model(rng.normal(size=(V, D)).astype(np.float32), rng.normal(size=(D, N)).astype(np.float32))
    nodes = find_weight_nodes(model)
    adapter = OnnxAdapter(model, sorted({n.weight for n in nodes}), ["E"], share_tables=False)
    assert adapter.shared == frozenset()
    assert OnnxAdapter(model, ["E", "W"], ["E"], share_tables=True).shared == frozenset({"E"})


def test_streamed_table_term_is_bit_identical() -> None:
    from lpcompile.analysis.streamed import _table_term

    rng = np.random.default_rng(6)
    value = torch.from_numpy((rng.normal(size=(40, 24)) * 2).astype(np.float32))
    value[3, 3] = -9.5  # the largest magnitude, negative
    diag = torch.from_numpy(np.abs(rng.normal(size=(40, 24))).astype(np.float32))
    elements = ["bfloat16", "float8_e4m3fn"]
    amax: dict[str, float] = {}
    act_term: dict[tuple[str, str], float] = {}
    _table_term("E", value, diag, elements, amax, act_term)
    a = value.numpy()
    finite = np.abs(a[np.isfinite(a)])
    old_amax = float(finite.max())
    assert amax == {"E": old_amax}
    for e in elements:
        assert act_term[("E", e)] == 0.5 * _old_activation_error(diag.double().numpy(), a, e, old_amax)


def test_float64_diagonals_convert_on_access() -> None:
    from lpcompile.analysis.sensitivity import Float64Diagonals

    t = torch.tensor([[1.5, 2.0]], dtype=torch.float32)
    d = Float64Diagonals({"a": t}, {"a": (1, 2), "b": (3,)})
    assert sorted(d) == ["a", "b"] and len(d) == 2
    assert d["a"].dtype == np.float64 and np.array_equal(d["a"], t.double().numpy())
    assert np.array_equal(d["b"], np.zeros(3))
    # widen=False: float32 views (no copy), the same values; zeros for weights without an estimate still
    lean = Float64Diagonals({"a": t}, {"a": (1, 2), "b": (3,)}, widen=False)
    assert lean["a"].dtype == np.float32 and np.shares_memory(lean["a"], t.numpy())
    assert np.array_equal(lean["a"].astype(np.float64), d["a"]) and np.array_equal(lean["b"], np.zeros(3))
