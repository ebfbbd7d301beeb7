"""NormalizeWeightsPass: Gemm → MatMul(+Add), weight Constants → initializers.

Numerics: the rewritten graph computes x@(alpha·Bᵀ) + beta·C instead of alpha·(x@Bᵀ) + beta·C; the
difference is fp32 summation order plus one rounding of alpha·B, so outputs are compared with
rtol 1e-5 and atol 1e-5·max|y| (K ≤ 64 here: K·2⁻²⁴ ≈ 4e-6).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from pass_helpers import check, ops, parse, run, signature, snapshot, to_ir

from lpcompile.graph import find_weight_nodes
from lpcompile.passes.normalize import NormalizeWeightsPass, needs_normalization

RNG = np.random.default_rng(7)
X = RNG.standard_normal((3, 16)).astype(np.float32)


def _close(a: np.ndarray, b: np.ndarray) -> None:
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))


def _w(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def test_gemm_transb_alpha_beta_becomes_matmul_add() -> None:
    proto = parse(
        """<ir_version: 10, opset_import: ["" : 21]>
        g (float[3,16] x) => (float[3,8] y) {
          y = Gemm<transB=1, alpha=0.5, beta=2.0>(x, B, C)
        }""",
        B=_w(8, 16),
        C=_w(8),
    )
    (expected,) = run(proto, x=X)
    model = to_ir(proto)
    assert needs_normalization(model)
    result = NormalizeWeightsPass()(model)
    assert result.modified and result.model is model
    out = check(model)
    assert ops(out) == ["MatMul", "Add"]
    assert [n.name for n in out.graph.node] == ["n0", "n0/bias"]
    assert signature(out) == signature(proto)
    b = model.graph.initializers["B"]  # only user rewritten: replaced in place, same name
    assert tuple(b.shape) == (16, 8)
    assert "C" not in model.graph.initializers  # beta·C is a new initializer, C became unused
    (got,) = run(out, x=X)
    _close(got, expected)
    (w,) = find_weight_nodes(model)
    assert (w.name, w.op_type, w.weight, w.shape) == ("n0", "MatMul", "B", (16, 8))
    assert not needs_normalization(model)


def test_idempotent() -> None:
    proto = parse(
        """<ir_version: 10, opset_import: ["" : 21]>
        g (float[3,16] x) => (float[3,8] y) {
          y = Gemm<transB=1>(x, B, C)
        }""",
        B=_w(8, 16),
        C=_w(8),
    )
    model = to_ir(proto)
    assert NormalizeWeightsPass()(model).modified
    before = snapshot(model)
    second = NormalizeWeightsPass()(model)
    assert second.modified is False
    assert snapshot(model) == before


def test_plain_gemm_reuses_weight_and_keeps_output_name() -> None:
    proto = parse(
        """<ir_version: 10, opset_import: ["" : 21]>
        g (float[3,16] x) => (float[3,8] y) {
          y = Gemm(x, B)
        }""",
        B=_w(16, 8),
    )
    (expected,) = run(proto, x=X)
    model = to_ir(proto)
    assert NormalizeWeightsPass()(model).modified
    out = check(model)
    assert ops(out) == ["MatMul"]
    assert out.graph.node[0].output[0] == "y" and out.graph.node[0].name == "n0"
    assert list(out.graph.node[0].input) == ["x", "B"]
    (got,) = run(out, x=X)
    _close(got, expected)


def test_shared_weight_with_other_user_gets_new_initializer() -> None:
    b = _w(8, 16)
    proto = parse(
        """<ir_version: 10, opset_import: ["" : 21]>
        g (float[3,16] x) => (float[3,8] y, float[3,8] z, float[8,16] bb) {
          y = Gemm<transB=1>(x, B)
          z = Gemm<transB=1>(x, B)
          bb = Identity(B)
        }""",
        B=b,
    )
    expected = run(proto, x=X)
    model = to_ir(proto)
    assert NormalizeWeightsPass()(model).modified
    out = check(model)
    assert ops(out) == ["MatMul", "MatMul", "Identity"]
    mm = [n for n in out.graph.node if n.op_type == "MatMul"]
    assert mm[0].input[1] == mm[1].input[1] == "B_mm"  # one transposed copy, shared
    assert tuple(model.graph.initializers["B"].shape) == (8, 16)  # original kept for Identity
    for got, exp in zip(run(out, x=X), expected, strict=True):
        _close(got, exp)


def test_dynamic_bias_with_beta_gets_mul() -> None:
    proto = parse(
        """<ir_version: 10, opset_import: ["" : 21]>
        g (float[3,16] x, float[3,8] c) => (float[3,8] y) {
          y = Gemm<beta=0.5>(x, B, c)
        }""",
        B=_w(16, 8),
    )
    c = RNG.standard_normal((3, 8)).astype(np.float32)
    (expected,) = run(proto, x=X, c=c)
    model = to_ir(proto)
    assert NormalizeWeightsPass()(model).modified
    out = check(model)
    assert ops(out) == ["MatMul", "Mul", "Add"]
    assert [n.name for n in out.graph.node] == ["n0", "n0/beta", "n0/bias"]
    (got,) = run(out, x=X, c=c)
    _close(got, expected)


def test_transa_gemm_left_alone(caplog: pytest.LogCaptureFixture) -> None:
    proto = parse(
        """<ir_version: 10, opset_import: ["" : 21]>
        g (float[16,3] x) => (float[3,8] y) {
          y = Gemm<transA=1>(x, B)
        }""",
        B=_w(16, 8),
    )
    model = to_ir(proto)
    with caplog.at_level(logging.WARNING):
        result = NormalizeWeightsPass()(model)
    assert result.modified is False
    assert ops(model) == ["Gemm"]
    assert "transA" in caplog.text


def test_constant_weight_becomes_initializer() -> None:
    w = _w(16, 8)
    proto = parse(
        """<ir_version: 10, opset_import: ["" : 21]>
        g (float[3,16] x) => (float[3,8] y) {
          y = MatMul(x, W)
        }""",
        _check=False,
    )
    const = onnx.helper.make_node("Constant", [], ["W"], name="const_w", value=onnx.numpy_helper.from_array(w))
    proto.graph.node.insert(0, const)
    check(proto)
    (expected,) = run(proto, x=X)
    model = to_ir(proto)
    assert find_weight_nodes(model) == []
    assert NormalizeWeightsPass()(model).modified
    out = check(model)
    assert ops(out) == ["MatMul"]
    assert "W" in model.graph.initializers
    (wn,) = find_weight_nodes(model)
    assert (wn.name, wn.weight) == ("n0", "W")
    (got,) = run(out, x=X)
    np.testing.assert_array_equal(got, expected)
    assert NormalizeWeightsPass()(model).modified is False


# ---------------------------------------------------------------------------------------------
# constant weight subgraphs and tied tables (issue 13)
# ---------------------------------------------------------------------------------------------

FOLD = """<ir_version: 10, opset_import: ["" : 21]>
g (float[1,2,5,5] x, float[3,16] v, int64[4] ids) => (float[1,4,3,3] y, float[3,8] z, float[4,6] e) {
  wr = Reshape (w_flat, wshape)
  y = Conv (x, wr)
  b32 = Cast <to=1> (b_half)
  bt = Transpose <perm=[1,0]> (b32)
  z = MatMul (v, bt)
  tshape = Constant <value = int64[2] {10, 6}> ()
  table = ConstantOfShape <value = float[1] {0.5}> (tshape)
  e = Gather <axis=0> (table, ids)
}"""


def _fold_model() -> onnx.ModelProto:
    return parse(
        FOLD,
        w_flat=_w(4 * 2 * 3 * 3),
        wshape=np.array([4, 2, 3, 3], np.int64),
        b_half=_w(8, 16).astype(np.float16),
    )


def test_constant_weight_subgraphs_are_folded_exactly() -> None:
    proto = _fold_model()
    feeds = {"x": _w(1, 2, 5, 5), "v": _w(3, 16), "ids": np.array([0, 9, 3, 3], np.int64)}
    expected = run(proto, **feeds)
    model = to_ir(proto)
    assert needs_normalization(model)
    assert NormalizeWeightsPass()(model).modified
    out = check(model)
    assert ops(out) == ["Conv", "MatMul", "Gather"]
    nodes = find_weight_nodes(model)
    assert [(n.op_type, n.shape) for n in nodes] == [("Conv", (4, 2, 3, 3)), ("MatMul", (16, 8)), ("Gather", (10, 6))]
    for got, exp in zip(run(out, **feeds), expected, strict=True):
        assert np.array_equal(got, exp)  # folding is exact (fp16 → fp32 widens exactly)
    assert not NormalizeWeightsPass()(model).modified  # idempotent
    assert not needs_normalization(model)


def test_transposed_table_of_a_tied_head_is_not_folded() -> None:
    proto = parse(
        """<ir_version: 10, opset_import: ["" : 21]>
        g (int64[4] ids) => (float[4,10] y) {
          h = Gather <axis=0> (E, ids)
          t = Transpose <perm=[1,0]> (E)
          y = MatMul (h, t)
        }""",
        E=_w(10, 6),
    )
    model = to_ir(proto)
    assert not NormalizeWeightsPass()(model).modified
    nodes = find_weight_nodes(model)
    assert [n.weight for n in nodes] == ["E", "E"] and nodes[1].via


def test_gemm_tied_to_a_gather_reads_the_table_through_a_transpose() -> None:
    proto = parse(
        """<ir_version: 10, opset_import: ["" : 21]>
        g (int64[4] ids) => (float[4,10] y) {
          h = Gather <axis=0> (E, ids)
          y = Gemm <transB=1> (h, E)
        }""",
        E=_w(10, 6),
    )
    ids = np.array([1, 2, 9, 0], np.int64)
    expected = run(proto, ids=ids)
    model = to_ir(proto)
    assert NormalizeWeightsPass()(model).modified
    out = check(model)
    assert ops(out) == ["Gather", "Transpose", "MatMul"]
    assert list(model.graph.initializers) == ["E"]
    _close(run(out, ids=ids)[0], expected[0])


def test_decode_casts_of_the_rewrite_are_not_folded() -> None:
    proto = parse(
        """<ir_version: 10, opset_import: ["" : 21]>
        g (float[3,16] x) => (float[3,8] y) {
          wf = Cast <to=1> (w_q)
          y = MatMul (x, wf)
        }""",
        w_q=_w(16, 8).astype(np.float16),
    )
    proto.graph.node[0].metadata_props.add(key="lpcompile.serves", value="n1")
    model = to_ir(proto)
    assert not NormalizeWeightsPass()(model).modified


def test_head_stored_as_a_transposed_copy_is_retied_to_its_table() -> None:
    """torch.onnx.export folds the transpose of a tied head into a second initializer; normalisation re-ties it."""
    table = _w(10, 6)
    proto = parse(
        """<ir_version: 10, opset_import: ["" : 21]>
        g (int64[4] ids) => (float[4,10] y) {
          h = Gather <axis=0> (E, ids)
          r = Relu (h)
          y = MatMul (r, ET)
        }""",
        E=table,
        ET=np.ascontiguousarray(table.T),
    )
    ids = np.array([1, 2, 9, 0], np.int64)
    expected = run(proto, ids=ids)
    model = to_ir(proto)
    assert needs_normalization(model)
    assert NormalizeWeightsPass()(model).modified
    out = check(model)
    assert ops(out) == ["Gather", "Relu", "Transpose", "MatMul"]
    assert list(model.graph.initializers) == ["E"]  # one stored copy
    assert np.array_equal(run(out, ids=ids)[0], expected[0])  # a transpose is exact
    nodes = find_weight_nodes(model)
    assert {n.weight for n in nodes} == {"E"} and nodes[1].via
    assert not NormalizeWeightsPass()(model).modified and not needs_normalization(model)


def test_a_different_matmul_weight_of_the_table_shape_is_not_retied() -> None:
    table = _w(10, 6)
    other = np.ascontiguousarray(table.T).copy()
    other[0, 0] += 1.0
    proto = parse(
        """<ir_version: 10, opset_import: ["" : 21]>
        g (int64[4] ids) => (float[4,10] y) {
          h = Gather <axis=0> (E, ids)
          y = MatMul (h, W)
        }""",
        E=table,
        W=other,
    )
    assert not NormalizeWeightsPass()(to_ir(proto)).modified
