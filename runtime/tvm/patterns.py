"""Find the quantized patterns of a rewritten model and cut them out for lpcompile's kernels.

TVM's ONNX importer rejects blocked, int4 and FP8 Q/DQ, so :func:`prepare` turns the rewritten
ONNX graph (see :mod:`lpcompile.passes.quantize_weights` / :mod:`lpcompile.passes.activations`)
into one it can import plus a table of kernel calls:

=====================================================  =============================================
pattern (``W`` an initializer, ``x`` any tensor)       replaced by (domain ``lpcompile.tvm``)
=====================================================  =============================================
``MatMul(x, Cast_f32(DQ(W int4, s fp16, axis=0,        ``LpcInt4MatMul(x)`` — packed int4 GEMV/GEMM
block)))`` and ``com.microsoft.MatMulNBits(x, B, s)``
``MatMul(DQ(Q(x, sa, zp8)), DQ(W fp8, sw, axis=1))``   ``LpcFp8MatMul(x)`` — quantize + FP8 GEMM
``MatMul(Cast_f32(Cast_h(x)), Cast_f32(W h))``         ``LpcHalfMatMul(x)`` — round + bf16/fp16 GEMM
``DQ(Q(x, sa, zp8))`` left over (e.g. before a Conv)   ``LpcActQDQ(x)`` — exact FP8 Q→DQ kernel
``Cast_f32(Cast_h(x))`` left over                      ``LpcActRound(x)`` — exact bf16/fp16 rounding
=====================================================  =============================================

(``h`` is BFLOAT16 or FLOAT16, ``zp8`` a zero FP8 zero point.) The custom node's name keys a
:class:`KernelSpec` holding the stored codes and scales as numpy arrays in the kernels' layout.
Afterwards every decode node whose inputs are all initializers (weight DequantizeLinear / Cast
of Conv weights, int8 weights, unmatched MatMuls) is folded at build time into a float
initializer with the exact ``DequantizeLinear`` semantics, so such ops run in fp32 through TVM's
own converters. ``lpcompile.TwoPassSoftmax`` nodes are left for the importer.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lpcompile.errors import LpError
from lpcompile.runtime.tvm.kernels import fp8_matmul, half_matmul, int4_matmul

logger = logging.getLogger(__name__)

DOMAIN = "lpcompile.tvm"
INT4_OP = "LpcInt4MatMul"
FP8_OP = "LpcFp8MatMul"
HALF_OP = "LpcHalfMatMul"
QDQ_OP = "LpcActQDQ"
ROUND_OP = "LpcActRound"
CUSTOM_OPS = (INT4_OP, FP8_OP, HALF_OP, QDQ_OP, ROUND_OP)
SOFTMAX_DOMAIN = "lpcompile"
SOFTMAX_OP = "TwoPassSoftmax"
SHAPE_HINT = "lpc_input_shape"
"""Attribute added to custom and softmax nodes: the static input shape found by ONNX shape inference."""

_FP8_TYPES = {TensorProto.FLOAT8E4M3FN: "float8_e4m3fn", TensorProto.FLOAT8E5M2: "float8_e5m2"}
_HALF_TYPES = {TensorProto.BFLOAT16: "bfloat16", TensorProto.FLOAT16: "float16"}
_NP_TYPES = {
    TensorProto.FLOAT: np.float32,
    TensorProto.FLOAT16: np.float16,
    TensorProto.BFLOAT16: ml_dtypes.bfloat16,
    TensorProto.DOUBLE: np.float64,
}


@dataclass(frozen=True, eq=False)
class Int4MatMul:
    """``y = x @ W`` with packed int4 ``W[k, n]`` (see :mod:`.kernels.int4_matmul`)."""

    node: str
    k: int
    n: int
    block: int
    scale_dtype: str
    packed: np.ndarray
    scales: np.ndarray


@dataclass(frozen=True, eq=False)
class Fp8MatMul:
    """``y = DQ(Q(x, act_scale)) @ DQ(W, weight_scale)`` in ``element`` (see :mod:`.kernels.fp8_matmul`)."""

    node: str
    k: int
    n: int
    element: str
    act_scale: float
    packed: np.ndarray
    weight_scale: np.ndarray


@dataclass(frozen=True, eq=False)
class HalfMatMul:
    """``y = round_h(x) @ W_h`` with fp32 accumulation (see :mod:`.kernels.half_matmul`)."""

    node: str
    k: int
    n: int
    element: str
    packed: np.ndarray


@dataclass(frozen=True, eq=False)
class ActQDQ:
    """``DQ(Q(x, scale))`` in an FP8 element, elementwise."""

    node: str
    element: str
    scale: float


@dataclass(frozen=True, eq=False)
class ActRound:
    """``Cast_f32(Cast_h(x))``, elementwise."""

    node: str
    element: str


KernelSpec = Int4MatMul | Fp8MatMul | HalfMatMul | ActQDQ | ActRound


@dataclass(frozen=True)
class Prepared:
    """The importable graph, its kernel calls (by custom node name) and a log of what was done."""

    model: onnx.ModelProto
    specs: dict[str, KernelSpec]
    folded: tuple[str, ...] = field(default_factory=tuple)
    output_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """Static output shape (ONNX shape inference) of each uniquely named one-output node."""


class UnsupportedPatternError(LpError):
    """The rewritten model holds a pattern lpcompile's TVM lowering does not handle."""


# ----------------------------------------------------------------------------------------------
# graph helpers
# ----------------------------------------------------------------------------------------------


class _Graph:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.inits = {t.name: t for t in self.graph.initializer}
        self.types: dict[str, int] = {}
        self.shapes: dict[str, list[int]] = {}
        for vi in list(self.graph.input) + list(self.graph.value_info) + list(self.graph.output):
            if vi.type.HasField("tensor_type"):
                self.types[vi.name] = vi.type.tensor_type.elem_type
                tt = vi.type.tensor_type
                if tt.HasField("shape"):
                    dims = [d.dim_value if d.HasField("dim_value") else 0 for d in tt.shape.dim]
                    if all(d > 0 for d in dims):
                        self.shapes[vi.name] = dims
        for t in self.graph.initializer:
            self.types[t.name] = t.data_type
        self._names = {n.name for n in self.graph.node} | set(self.inits)
        self.refresh()

    def refresh(self) -> None:
        self.producer: dict[str, onnx.NodeProto] = {}
        self.uses: Counter[str] = Counter()
        for node in self.graph.node:
            for o in node.output:
                if o:
                    self.producer[o] = node
            for i in node.input:
                if i:
                    self.uses[i] += 1
        for o in self.graph.output:
            self.uses[o.name] += 1

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.inits[name])

    def is_init(self, name: str) -> bool:
        return bool(name) and name in self.inits and name not in {i.name for i in self.graph.input}

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self._names:
            name = f"{base}_{i}"
            i += 1
        self._names.add(name)
        return name

    def replace(self, old: onnx.NodeProto, new: onnx.NodeProto) -> None:
        nodes = list(self.graph.node)
        idx = next(i for i, n in enumerate(nodes) if n is old)
        self.graph.node.remove(old)
        self.graph.node.insert(idx, new)

    def eliminate_dead(self) -> None:
        """Drop nodes whose outputs nobody reads, then unused initializers (to a fixed point)."""
        changed = True
        while changed:
            self.refresh()
            dead = [n for n in self.graph.node if all(not o or self.uses[o] == 0 for o in n.output)]
            changed = bool(dead)
            for n in dead:
                self.graph.node.remove(n)
        self.refresh()
        keep = [
            t for t in self.graph.initializer if self.uses[t.name] > 0 or t.name in {i.name for i in self.graph.input}
        ]
        if len(keep) != len(self.graph.initializer):
            del self.graph.initializer[:]
            self.graph.initializer.extend(keep)
        self.inits = {t.name: t for t in self.graph.initializer}


def _attr(node: onnx.NodeProto, name: str, default: object) -> object:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _is(node: onnx.NodeProto | None, op: str) -> bool:
    return node is not None and node.op_type == op and node.domain in ("", "ai.onnx")


def _inputs(node: onnx.NodeProto) -> list[str]:
    return list(node.input) + [""] * 3


# ----------------------------------------------------------------------------------------------
# pattern matching
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _Weight:
    kind: str  # "int4" | "fp8" | "half"
    element: str
    codes: np.ndarray  # [K, N]
    scale: np.ndarray | None
    block: int


def _zero_point_ok(g: _Graph, name: str) -> bool:
    if not name:
        return True
    if not g.is_init(name):
        return False
    return bool(np.all(g.array(name).astype(np.float32) == 0))


def _match_weight(g: _Graph, w: str) -> _Weight | None:
    p = g.producer.get(w)
    if _is(p, "Cast") and _attr(p, "to", 0) == TensorProto.FLOAT:
        src = p.input[0]
        if g.is_init(src) and g.types.get(src) in _HALF_TYPES:
            arr = g.array(src)
            if arr.ndim == 2:
                return _Weight("half", _HALF_TYPES[g.types[src]], arr, None, 0)
            return None
        dq = g.producer.get(src)
        if _is(dq, "DequantizeLinear"):
            codes, scale, zp = _inputs(dq)[:3]
            block = int(_attr(dq, "block_size", 0))
            axis = int(_attr(dq, "axis", 1))
            if (
                g.is_init(codes)
                and g.is_init(scale)
                and g.types.get(codes) == TensorProto.INT4
                and g.types.get(scale) in (TensorProto.FLOAT16, TensorProto.FLOAT)
                and block > 0
                and axis in (0, -2)
                and _zero_point_ok(g, zp)
            ):
                c = g.array(codes)
                s = g.array(scale)
                if c.ndim == 2 and s.ndim == 2:
                    return _Weight("int4", "int4", c, s, block)
        return None
    if _is(p, "DequantizeLinear"):
        codes, scale, zp = _inputs(p)[:3]
        axis = int(_attr(p, "axis", 1))
        if (
            g.is_init(codes)
            and g.is_init(scale)
            and g.types.get(codes) in _FP8_TYPES
            and g.types.get(scale) == TensorProto.FLOAT
            and int(_attr(p, "block_size", 0)) == 0
            and _zero_point_ok(g, zp)
        ):
            c = g.array(codes)
            s = g.array(scale).astype(np.float32)
            if c.ndim != 2:
                return None
            if s.size == 1:
                s = np.full((c.shape[1],), float(s.reshape(-1)[0]), dtype=np.float32)
            elif s.ndim != 1 or axis not in (1, -1) or s.shape[0] != c.shape[1]:
                return None
            return _Weight("fp8", _FP8_TYPES[g.types[codes]], c, s, 0)
    return None


@dataclass(frozen=True)
class _Act:
    kind: str  # "fp8" | "half"
    element: str
    source: str
    scale: float = 1.0


def _match_fp8_pair(g: _Graph, dq: onnx.NodeProto | None) -> _Act | None:
    if not _is(dq, "DequantizeLinear"):
        return None
    qv, s, zp = _inputs(dq)[:3]
    q = g.producer.get(qv)
    if not _is(q, "QuantizeLinear") or not zp:
        return None
    x, s2, zp2 = _inputs(q)[:3]
    if not (g.is_init(s) and g.is_init(zp) and g.is_init(s2) and g.is_init(zp2)):
        return None
    element = _FP8_TYPES.get(g.types.get(zp, 0))
    if element is None or g.types.get(zp2) != g.types.get(zp):
        return None
    sa, sb = g.array(s), g.array(s2)
    if sa.size != 1 or sb.size != 1 or float(sa.reshape(-1)[0]) != float(sb.reshape(-1)[0]):
        return None
    if not (_zero_point_ok(g, zp) and _zero_point_ok(g, zp2)) or int(_attr(q, "saturate", 1)) != 1:
        return None
    if int(_attr(dq, "block_size", 0)) or int(_attr(q, "block_size", 0)):
        return None
    if g.types.get(x, TensorProto.FLOAT) != TensorProto.FLOAT:
        return None
    return _Act("fp8", element, x, float(np.float32(sa.reshape(-1)[0])))


def _match_round_trip(g: _Graph, up: onnx.NodeProto | None) -> _Act | None:
    if not _is(up, "Cast") or _attr(up, "to", 0) != TensorProto.FLOAT:
        return None
    down = g.producer.get(up.input[0])
    if not _is(down, "Cast") or _attr(down, "to", 0) not in _HALF_TYPES:
        return None
    x = down.input[0]
    if g.types.get(x, TensorProto.FLOAT) != TensorProto.FLOAT:
        return None
    return _Act("half", _HALF_TYPES[int(_attr(down, "to", 0))], x)


def _match_activation(g: _Graph, a: str) -> _Act | None:
    p = g.producer.get(a)
    return _match_fp8_pair(g, p) or _match_round_trip(g, p)


# ----------------------------------------------------------------------------------------------
# rewriting
# ----------------------------------------------------------------------------------------------


def _custom(g: _Graph, op: str, x: str, out: str, base: str) -> onnx.NodeProto:
    node = helper.make_node(op, [x], [out], name=g.fresh(f"lpc/{base}"), domain=DOMAIN)
    if x in g.shapes:
        node.attribute.append(helper.make_attribute(SHAPE_HINT, g.shapes[x]))
    return node


def _hint_softmax_shapes(g: _Graph) -> None:
    for node in g.graph.node:
        is_softmax = node.domain == SOFTMAX_DOMAIN and node.op_type == SOFTMAX_OP
        hinted = any(a.name == SHAPE_HINT for a in node.attribute)
        if is_softmax and not hinted and node.input[0] in g.shapes:
            node.attribute.append(helper.make_attribute(SHAPE_HINT, g.shapes[node.input[0]]))


def _lower_matmul(g: _Graph, node: onnx.NodeProto, specs: dict[str, KernelSpec]) -> bool:
    x, w = node.input[0], node.input[1]
    weight = _match_weight(g, w)
    if weight is None:
        return False
    k, n = (int(d) for d in weight.codes.shape)
    act = _match_activation(g, x)
    if weight.kind == "int4":
        if weight.scale.shape != (-(-k // weight.block), n):
            return False
        scale_dtype = "float16" if weight.scale.dtype == np.float16 else "float32"
        new = _custom(g, INT4_OP, x, node.output[0], node.name or "int4")
        specs[new.name] = Int4MatMul(
            node.name,
            k,
            n,
            weight.block,
            scale_dtype,
            int4_matmul.pack_weight(weight.codes.astype(np.int8)),
            int4_matmul.pack_scales(weight.scale, n, scale_dtype),
        )
    elif weight.kind == "fp8":
        if act is None or act.kind != "fp8" or act.element != weight.element:
            return False
        new = _custom(g, FP8_OP, act.source, node.output[0], node.name or "fp8")
        specs[new.name] = Fp8MatMul(
            node.name,
            k,
            n,
            weight.element,
            act.scale,
            fp8_matmul.pack_weight(np.ascontiguousarray(weight.codes.T), weight.element),
            weight.scale.astype(np.float32),
        )
    else:
        if act is None or act.kind != "half" or act.element != weight.element:
            return False
        new = _custom(g, HALF_OP, act.source, node.output[0], node.name or "half")
        specs[new.name] = HalfMatMul(
            node.name,
            k,
            n,
            weight.element,
            half_matmul.pack_weight(np.ascontiguousarray(weight.codes.T), weight.element),
        )
    g.replace(node, new)
    logger.debug("%s → %s (%s)", node.name, new.op_type, new.name)
    return True


def _lower_nbits(g: _Graph, node: onnx.NodeProto, specs: dict[str, KernelSpec]) -> None:
    ins = [i for i in node.input]
    extra = [i for i in ins[3:] if i]
    k, n = int(_attr(node, "K", 0)), int(_attr(node, "N", 0))
    bits, block = int(_attr(node, "bits", 4)), int(_attr(node, "block_size", 0))
    if extra or bits != 4 or len(ins) < 3 or not (g.is_init(ins[1]) and g.is_init(ins[2])) or block < 1:
        raise UnsupportedPatternError(
            f"MatMulNBits {node.name!r}: only 4-bit weights with initializer B and scales and no zero points, "
            "g_idx or bias are supported"
        )
    scales = g.array(ins[2]).astype(np.float32).reshape(n, -1)  # [N, n_blocks]
    new = _custom(g, INT4_OP, ins[0], node.output[0], node.name or "nbits")
    specs[new.name] = Int4MatMul(
        node.name,
        k,
        n,
        block,
        "float32",
        int4_matmul.repack_matmul_nbits(g.array(ins[1]), k, n, block),
        np.ascontiguousarray(scales),
    )
    g.replace(node, new)


def dequantize_linear(
    codes: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int, block: int
) -> np.ndarray:
    """ONNX ``DequantizeLinear`` (opset 21, incl. blocked) in numpy; output in the scale's type.

    ``(x − zp) · scale`` is evaluated in float64 (exact for every stored type) and rounded once to
    the output type, as ONNX Runtime does for float32, and as the reference
    :func:`lpcompile.formats.dequantize` models for float16 scales.
    """
    x = codes.astype(np.float64)
    s = np.asarray(scale)
    out_type = s.dtype
    zp = None if zero_point is None else np.asarray(zero_point).astype(np.float64)
    sd = s.astype(np.float64)
    if s.size == 1 and not block:
        y = (x - (0.0 if zp is None else zp.reshape(-1)[0])) * sd.reshape(-1)[0]
    else:
        ax = axis % x.ndim
        if block:
            sd = np.repeat(sd, block, axis=ax).take(np.arange(x.shape[ax]), axis=ax)
            if zp is not None:
                zp = np.repeat(zp, block, axis=ax).take(np.arange(x.shape[ax]), axis=ax)
        else:
            shape = [1] * x.ndim
            shape[ax] = -1
            sd = sd.reshape(shape)
            if zp is not None:
                zp = zp.reshape(shape)
        y = (x - (0.0 if zp is None else zp)) * sd
    return y.astype(np.float32).astype(out_type) if out_type != np.float64 else y


def _fold_constants(g: _Graph) -> list[str]:
    """Evaluate DequantizeLinear / Cast nodes whose inputs are all initializers (build-time decode)."""
    folded: list[str] = []
    changed = True
    while changed:
        changed = False
        g.refresh()
        for node in list(g.graph.node):
            if not (_is(node, "DequantizeLinear") or _is(node, "Cast")):
                continue
            ins = [i for i in node.input if i]
            if not ins or not all(g.is_init(i) for i in ins):
                continue
            if _is(node, "Cast"):
                to = int(_attr(node, "to", 0))
                if to not in _NP_TYPES:
                    continue
                value = g.array(ins[0]).astype(_NP_TYPES[to])
            else:
                codes, scale, zp = _inputs(node)[:3]
                value = dequantize_linear(
                    g.array(codes),
                    g.array(scale),
                    g.array(zp) if zp else None,
                    int(_attr(node, "axis", 1)),
                    int(_attr(node, "block_size", 0)),
                )
            out = node.output[0]
            tensor = numpy_helper.from_array(np.ascontiguousarray(value), name=out)
            g.graph.node.remove(node)
            g.graph.initializer.append(tensor)
            g.inits[out] = tensor
            g.types[out] = tensor.data_type
            folded.append(node.name or out)
            changed = True
    return folded


def _lower_activations(g: _Graph, specs: dict[str, KernelSpec]) -> None:
    g.refresh()
    for node in list(g.graph.node):
        act = _match_fp8_pair(g, node) if _is(node, "DequantizeLinear") else _match_round_trip(g, node)
        if act is None:
            continue
        if act.kind == "fp8":
            new = _custom(g, QDQ_OP, act.source, node.output[0], node.name or "qdq")
            specs[new.name] = ActQDQ(node.name, act.element, act.scale)
        else:
            new = _custom(g, ROUND_OP, act.source, node.output[0], node.name or "round")
            specs[new.name] = ActRound(node.name, act.element)
        g.replace(node, new)
    g.eliminate_dead()


def _check_leftovers(g: _Graph) -> None:
    bad: list[str] = []
    for node in g.graph.node:
        if node.domain == DOMAIN or (node.domain == SOFTMAX_DOMAIN and node.op_type == SOFTMAX_OP):
            continue
        if node.domain not in ("", "ai.onnx"):
            bad.append(f"{node.domain}.{node.op_type} ({node.name})")
            continue
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            typed = [g.types.get(i) for i in node.input[2:3] if i] + [g.types.get(node.input[0])]
            exotic = any(t in _FP8_TYPES or t in (TensorProto.INT4, TensorProto.UINT4) for t in typed if t)
            if exotic or int(_attr(node, "block_size", 0)):
                bad.append(f"{node.op_type} ({node.name}): unmatched int4/fp8/blocked Q/DQ")
    if bad:
        raise UnsupportedPatternError("TVM lowering cannot handle: " + "; ".join(bad[:6]))


def _with_types(model: onnx.ModelProto) -> onnx.ModelProto:
    """Types and shapes of every value (recomputed from the inputs, with data propagation so
    that shape arithmetic such as attention-mask construction yields static dims)."""
    del model.graph.value_info[:]
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:  # shape inference is only a helper here
        logger.debug("shape inference failed (%s); matching without value types", exc)
        return model


def _static_inputs(model: onnx.ModelProto) -> bool:
    inits = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = vi.type.tensor_type.shape.dim
        if not all(d.HasField("dim_value") and d.dim_value > 0 for d in dims):
            return False
    return True


def _fold_shape_arithmetic(model: onnx.ModelProto) -> onnx.ModelProto:
    """With static inputs, fold ``Shape``/``Range``/``Expand`` chains (e.g. attention masks) to
    constants (onnxscript's constant folder): TVM's importer would turn them into symbolic dims
    that later defeat broadcasting shape inference and legalization."""
    if not _static_inputs(model):
        return model
    try:
        import onnx_ir as ir
        from onnxscript import optimizer

        m = ir.from_proto(model)
        optimizer.fold_constants(m)
        folded = ir.to_proto(m)
    except Exception as exc:  # folding is an optimisation; the unfolded graph is still correct
        logger.info("constant folding of shape arithmetic skipped: %s", exc)
        return model
    _constants_to_initializers(folded.graph)
    return folded


def _constants_to_initializers(graph: onnx.GraphProto) -> None:
    """Main-graph ``Constant`` nodes → initializers (TVM's converter reads only the tensor form)."""
    for node in [n for n in graph.node if _is(n, "Constant") and len(n.attribute) == 1]:
        a = node.attribute[0]
        value = helper.get_attribute_value(a)
        if a.name == "value":
            arr = numpy_helper.to_array(value)
        elif a.name in ("value_int", "value_ints"):
            arr = np.asarray(value, dtype=np.int64)
        elif a.name in ("value_float", "value_floats"):
            arr = np.asarray(value, dtype=np.float32)
        else:
            continue
        graph.initializer.append(numpy_helper.from_array(np.asarray(arr), name=node.output[0]))
        graph.node.remove(node)


def _dequantize_form(model: onnx.ModelProto) -> onnx.ModelProto:
    """Weights decoded once (targets qdq/ort) rewritten as DequantizeLinear, the form matched here."""
    import onnx_ir as ir

    from lpcompile.passes.targets import to_dequantize_form

    m = ir.from_proto(model)
    return ir.to_proto(m) if to_dequantize_form(m) else model


def prepare(model: onnx.ModelProto) -> Prepared:
    """Cut the quantized patterns out of ``model`` (not modified); see the module docstring."""
    work = _with_types(copy.deepcopy(_dequantize_form(model)))
    g = _Graph(work)
    specs: dict[str, KernelSpec] = {}
    for node in list(g.graph.node):
        if node.domain == "com.microsoft" and node.op_type == "MatMulNBits":
            _lower_nbits(g, node, specs)
        elif _is(node, "MatMul") and len(node.input) >= 2:
            _lower_matmul(g, node, specs)
        g.refresh()
    g.eliminate_dead()
    _lower_activations(g, specs)
    folded = _fold_constants(g)
    g.eliminate_dead()
    _check_leftovers(g)
    _hint_softmax_shapes(g)
    names = Counter(n.name for n in g.graph.node)
    out_shapes = {
        n.name: tuple(g.shapes[n.output[0]])
        for n in g.graph.node
        if n.name and names[n.name] == 1 and len(n.output) == 1 and n.output[0] in g.shapes
    }
    del work.graph.value_info[:]
    work = _fold_shape_arithmetic(work)
    kinds = Counter(type(s).__name__ for s in specs.values())
    logger.info("lowering: %s; %d decode node(s) folded", dict(kinds) or "no kernel patterns", len(folded))
    return Prepared(work, specs, tuple(folded), out_shapes)
