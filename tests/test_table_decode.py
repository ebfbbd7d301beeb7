"""Grammar formats written by the portable table decode: ONNX Runtime reproduces the reference decode.

Bit-exactness: the decoded weight ORT computes is read back as a graph output and compared with
``formats.dequantize`` with no tolerance (every op of the decode is exact or rounds like the
reference). Model outputs are compared with x@dequantize(q) within the fp32 summation bound.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from pass_helpers import ONE_MATMUL, assert_matmul_close, check, parse, session, to_ir

from lpcompile.formats import MATMUL_LAYOUT, dequantize, get_format, quantize_weight
from lpcompile.graph import find_weight_nodes
from lpcompile.passes.quantize_weights import QuantizeWeightsPass
from lpcompile.passes.table_decode import pack_codes, unpack_codes
from lpcompile.plan import NodeAssignment, PrecisionPlan

FAMILIES = (
    "mxfp4",
    "nvfp4",
    "nf4",
    "mxfp6_e2m3",
    "mxfp6_e3m2",
    "mxfp8_e4m3",
    "mxint8",
    "int3_b32",
    "int2_b16",
    "int6_pc",
    "int4_asym_b64",
    "int8_asym",
    "int2_asym_b16_sbf16",
    "e2m1_b32_sbf16",
    "int4_b48_sbf16",
    "int5_b32",
    "int7_b64",
    "int3_asym_b32",
    "int5_asym_pc",
    "int6_b32_se8m0",
)


def _plan(model: ir.Model, fmt: str) -> PrecisionPlan:
    nodes = []
    for w in find_weight_nodes(model):
        nodes.append(
            NodeAssignment(w.name, w.op_type, w.weight, w.params, fmt, get_format(fmt).bits_for(w.shape, w.layout))
        )
    return PrecisionPlan(nodes=tuple(nodes))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_pack_roundtrip(bits: int) -> None:
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 2**bits, size=37).astype(np.uint8)
    packed, per, nbytes = pack_codes(codes, bits)
    assert packed.size == -(-37 // per) * nbytes  # whole groups of `per` codes in `nbytes` bytes
    assert per * bits == nbytes * 8  # no bit of a group is unused
    np.testing.assert_array_equal(unpack_codes(packed, bits, 37), codes)


def test_pack_is_a_little_endian_bit_stream() -> None:
    """3-bit codes 0..7: bit i of the stream is bit (i mod 3) of code i // 3."""
    codes = np.arange(8, dtype=np.uint8)
    packed, _, _ = pack_codes(codes, 3)
    stream = np.unpackbits(packed, bitorder="little")
    expect = np.array([(c >> k) & 1 for c in codes for k in range(3)], np.uint8)
    np.testing.assert_array_equal(stream, expect)


@pytest.mark.parametrize("fmt", FAMILIES)
def test_ort_runs_the_table_decode_bit_exactly(fmt: str) -> None:
    rng = np.random.default_rng(21)
    k, n = 100, 12  # K not a multiple of the blocks: padding and slicing are exercised
    w = (rng.standard_normal((k, n)) * np.exp(rng.uniform(-3, 3, (1, n)))).astype(np.float32)
    w[:, 0] = 0.0
    x = rng.standard_normal((3, k)).astype(np.float32)
    model = to_ir(parse(ONE_MATMUL.format(k=k, n=n), W=w))
    res = QuantizeWeightsPass(_plan(model, fmt))(model)
    assert res.modified
    out = res.model
    # expose the decoded weight as a graph output to read it back from ORT
    mm = next(nd for nd in out.graph if nd.op_type == "MatMul")
    decoded = mm.inputs[1]
    out.graph.outputs.append(decoded)
    proto = check(out)
    y, wq = session(proto).run(None, {"x": x})
    ref = dequantize(quantize_weight(fmt, w, MATMUL_LAYOUT))
    np.testing.assert_array_equal(wq, ref)
    assert_matmul_close(y, x, ref)
    assert not any(t.data_type == 1 and tuple(t.dims) == (k, n) for t in proto.graph.initializer)  # W is gone
    # idempotent: a second application finds the weight already written in this format
    out.graph.outputs.pop()
    again = QuantizeWeightsPass(_plan(model, fmt))(out)
    assert not again.modified


def test_packed_storage_is_small() -> None:
    rng = np.random.default_rng(2)
    w = rng.standard_normal((256, 64)).astype(np.float32)
    model = to_ir(parse(ONE_MATMUL.format(k=256, n=64), W=w))
    out = QuantizeWeightsPass(_plan(model, "mxfp4"))(model).model
    sizes = {v.name: v.const_value.nbytes for v in out.graph.initializers.values()}
    codes = [s for name, s in sizes.items() if name.endswith("_codes")]
    assert codes == [256 * 64 // 2]  # two FP4 codes per byte
    scales = [s for name, s in sizes.items() if name.endswith("_scale_q")]
    assert scales == [256 // 32 * 64]  # one E8M0 byte per block of 32


STORED = ("_codes", "_scale", "_scale_q", "_zp", "_tscale")
"""The initializers a table decode stores per weight: codes, scales, zero points, NVFP4's tensor scale
(its other constants — the code table, the E8M0 table, shapes, masks — are the decode's, not the weight's)."""


@pytest.mark.parametrize(
    "fmt",
    [
        "int3_b32",
        "int5_b32",
        "int6_pc",
        "int7_b64",
        "int2_b16",
        "int3_asym_b32",
        "int5_asym_pc",
        "int4_asym_b64",
        "int6_b32_se8m0",
        "mxfp4",
        "nvfp4",
        "nf4",
        "mxfp6_e3m2",
    ],
)
def test_plan_bits_equal_file_bits(fmt: str) -> None:
    """The bits a plan counts (``Format.bits_for``) are the bits the file stores, for every code width.

    K·N and the number of scale groups are multiples of 8, so no group is padded (the padding of the
    last group, fewer than 8 codes per tensor, is the only storage a plan does not count).
    """
    rng = np.random.default_rng(5)
    k, n = 128, 16
    w = rng.standard_normal((k, n)).astype(np.float32)
    model = to_ir(parse(ONE_MATMUL.format(k=k, n=n), W=w))
    plan = _plan(model, fmt)
    out = QuantizeWeightsPass(plan)(model).model
    stored = sum(8 * v.const_value.nbytes for v in out.graph.initializers.values() if v.name.endswith(STORED))
    assert stored == pytest.approx(plan.nodes[0].bits * k * n, rel=1e-12)
