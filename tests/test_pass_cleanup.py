"""CleanupPass: removes only what cannot change a result; outputs stay bit-identical."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from pass_helpers import check, ops, parse, run, signature, snapshot, to_ir

from lpcompile.passes.cleanup import CleanupPass

RNG = np.random.default_rng(9)
X = (RNG.standard_normal((2, 8)) * 4).astype(np.float32)
F8 = onnx.TensorProto.FLOAT8E4M3FN


def fp8_zero(name: str) -> onnx.TensorProto:
    return onnx.helper.make_tensor(name, F8, [], [0.0])


def cleaned(proto: onnx.ModelProto, **feeds: np.ndarray) -> onnx.ModelProto:
    """Run the pass, check outputs are bit-identical and the pass is idempotent."""
    expected = run(proto, **feeds)
    model = to_ir(proto)
    first = CleanupPass()(model)
    out = check(model)
    assert signature(out) == signature(proto)
    for got, exp in zip(run(out, **feeds), expected, strict=True):
        np.testing.assert_array_equal(got, exp)
    before = snapshot(model)
    assert CleanupPass()(model).modified is False
    assert snapshot(model) == before
    out.doc_string = "modified" if first.modified else "unchanged"
    return out


def test_noop_cast_removed_bf16_round_trip_kept() -> None:
    proto = parse(
        """<ir_version: 10, opset_import: ["" : 21]>
        g (float[2,8] x) => (float[2,8] y) {
          a = Cast<to=1>(x)
          b = Cast<to=16>(a)
          c = Cast<to=1>(b)
          y = Relu(c)
        }"""
    )
    out = cleaned(proto, x=X)
    assert out.doc_string == "modified"
    assert ops(out) == ["Cast", "Cast", "Relu"]  # fp32→bf16→fp32 is rounding, not a no-op
    assert out.graph.node[0].input[0] == "x"


def test_second_round_trip_on_rounded_tensor_removed() -> None:
    proto = parse(
        """<ir_version: 10, opset_import: ["" : 21]>
        g (float[2,8] x) => (float[2,8] y) {
          a = Cast<to=16>(x)
          b = Cast<to=1>(a)
          c = Cast<to=16>(b)
          d = Cast<to=1>(c)
          y = Relu(d)
        }"""
    )
    out = cleaned(proto, x=X)
    assert ops(out) == ["Cast", "Cast", "Relu"]


def test_duplicate_round_trips_merged() -> None:
    proto = parse(
        """<ir_version: 10, opset_import: ["" : 21]>
        g (float[2,8] x) => (float[2,8] y, float[2,8] z) {
          a1 = Cast<to=10>(x)
          b1 = Cast<to=1>(a1)
          a2 = Cast<to=10>(x)
          b2 = Cast<to=1>(a2)
          y = Relu(b1)
          z = Neg(b2)
        }"""
    )
    out = cleaned(proto, x=X)
    assert ops(out) == ["Cast", "Cast", "Relu", "Neg"]
    assert out.graph.node[2].input[0] == out.graph.node[3].input[0]


def test_fp16_round_trip_not_merged_with_bf16() -> None:
    proto = parse(
        """<ir_version: 10, opset_import: ["" : 21]>
        g (float[2,8] x) => (float[2,8] y, float[2,8] z) {
          a1 = Cast<to=10>(x)
          b1 = Cast<to=1>(a1)
          a2 = Cast<to=16>(x)
          b2 = Cast<to=1>(a2)
          y = Relu(b1)
          z = Neg(b2)
        }"""
    )
    out = cleaned(proto, x=X)
    assert out.doc_string == "unchanged"
    assert ops(out).count("Cast") == 4


def _qdq_chain(scale2: float) -> onnx.ModelProto:
    proto = parse(
        """<ir_version: 10, opset_import: ["" : 21]>
        g (float[2,8] x) => (float[2,8] y) {
          q1 = QuantizeLinear(x, s1, zp)
          d1 = DequantizeLinear(q1, s1, zp)
          q2 = QuantizeLinear(d1, s2, zp)
          d2 = DequantizeLinear(q2, s2, zp)
          y = Relu(d2)
        }""",
        _check=False,
        s1=np.array(0.0123, dtype=np.float32),
        s2=np.array(scale2, dtype=np.float32),
    )
    proto.graph.initializer.append(fp8_zero("zp"))
    check(proto)
    return proto


def test_repeated_qdq_with_same_scale_removed() -> None:
    out = cleaned(_qdq_chain(0.0123), x=X)
    assert ops(out) == ["QuantizeLinear", "DequantizeLinear", "Relu"]
    assert {t.name for t in out.graph.initializer} == {"s1", "zp"}  # s2 became unused


def test_qdq_with_other_scale_kept() -> None:
    out = cleaned(_qdq_chain(0.05), x=X)
    assert out.doc_string == "unchanged"
    assert ops(out).count("QuantizeLinear") == 2


def test_dead_nodes_and_initializers_removed() -> None:
    proto = parse(
        """<ir_version: 10, opset_import: ["" : 21]>
        g (float[2,8] x) => (float[2,8] y) {
          dead = Add(x, unused_w)
          y = Relu(x)
        }""",
        unused_w=np.ones((2, 8), dtype=np.float32),
    )
    out = cleaned(proto, x=X)
    assert ops(out) == ["Relu"] and not out.graph.initializer


def test_graph_output_cast_kept() -> None:
    proto = parse(
        """<ir_version: 10, opset_import: ["" : 21]>
        g (float[2,8] x) => (float[2,8] y) {
          y = Cast<to=1>(x)
        }"""
    )
    out = cleaned(proto, x=X)
    assert ops(out) == ["Cast"]


@pytest.mark.parametrize("inner", [onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16])
def test_exact_widening_round_trip_folded(inner: int) -> None:
    proto = parse(
        f"""<ir_version: 10, opset_import: ["" : 21]>
        g (float[2,8] x) => (float[2,8] y) {{
          a = Cast<to={inner}>(x)
          b = Cast<to=1>(a)
          c = Cast<to={inner}>(b)
          d = Cast<to=1>(c)
          y = Relu(d)
        }}"""
    )
    out = cleaned(proto, x=X)
    assert ops(out) == ["Cast", "Cast", "Relu"]
