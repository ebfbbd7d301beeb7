"""Relax construction: TVM's ONNX frontend for ordinary ops, lpcompile kernels for quantized ones.

:class:`Importer` is TVM's ``ONNXGraphImporter`` with three extensions:

* the custom nodes left by :func:`lpcompile.runtime.tvm.patterns.prepare` become
  ``relax.call_tir`` calls of lpcompile's TIR kernels, with the stored codes and scales as
  Relax constants (the activation is reshaped to ``[M, K]``; ``M`` may be symbolic);
* ``lpcompile.TwoPassSoftmax`` becomes a call of the two-pass softmax kernel of
  :mod:`lpcompile.runtime.tvm.softmax` when that module exists and the shape is static, and is
  otherwise expanded from the model-local ONNX function body (standard ops);
* everything else goes through TVM's own converters.

Kernel PrimFuncs are shared between calls with equal parameters.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper

from lpcompile.errors import LpError
from lpcompile.runtime.tvm import patterns
from lpcompile.runtime.tvm.kernels import common, fp8_matmul, half_matmul, int4_matmul

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KernelCall:
    """One emitted kernel call, for reports: the ONNX node it replaces and the PrimFunc(s) used."""

    node: str
    kind: str
    kernels: tuple[str, ...]
    shape: str


def _importer_base() -> type:
    from tvm.relax.frontend.onnx.onnx_frontend import ONNXGraphImporter

    return ONNXGraphImporter


def _int64(v: int) -> Any:
    from tvm import tirx

    return tirx.IntImm("int64", int(v))


def _static(dims: list[Any]) -> list[int] | None:
    from tvm import tirx

    return [int(d.value) for d in dims] if all(isinstance(d, tirx.IntImm) for d in dims) else None


def build_importer(prepared: patterns.Prepared, target: Any, shape_dict: dict[str, list[int]] | None) -> Any:
    """An :class:`Importer` instance (the class is created lazily: TVM is an optional dependency)."""
    base = _importer_base()

    class Importer(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__(shape_dict or {}, "float32", keep_params_in_input=False, sanitize=True)
            self._specs = prepared.specs
            self._functions = {(f.domain, f.name): f for f in prepared.model.functions}
            self._target = common.as_target(target)
            self._cuda = common.is_cuda(self._target)
            self._gvars: dict[tuple[Any, ...], Any] = {}
            self._out_shapes = prepared.output_shapes
            self.calls: list[KernelCall] = []

        # -- dispatch ---------------------------------------------------------------------------
        def _check_for_unsupported_ops(self, graph: onnx.GraphProto) -> None:
            mine = set(patterns.CUSTOM_OPS) | {patterns.SOFTMAX_OP}
            rest = onnx.GraphProto()
            rest.node.extend(n for n in graph.node if n.op_type not in mine)
            super()._check_for_unsupported_ops(rest)

        def _convert_operator(self, op_name: str, inputs: Any, attrs: dict, opset: int) -> Any:
            name = attrs.get("tvm_custom", {}).get("name", "")
            if op_name in patterns.CUSTOM_OPS and name in self._specs:
                return self._kernel(self._specs[name], inputs[0], attrs.get(patterns.SHAPE_HINT))
            if op_name == patterns.SOFTMAX_OP:
                return self._softmax(inputs[0], attrs, name)
            return self._pin_shape(super()._convert_operator(op_name, inputs, attrs, opset), name)

        def _pin_shape(self, out: Any, name: str) -> Any:
            """Match-cast an output whose Relax shape is not static to the static shape ONNX shape
            inference found (TVM's importer loses static dims through shape arithmetic such as
            ``Range``-built attention masks, and unknown shapes cannot be legalized)."""
            from tvm import relax

            hint = self._out_shapes.get(name)
            ty = getattr(out, "ty", None)
            if hint is None or not isinstance(ty, relax.TensorType):
                return out
            shape = getattr(ty, "shape", None)
            if shape is not None and hasattr(shape, "values") and _static(list(shape.values)) is not None:
                return out
            if int(getattr(ty, "ndim", -1)) not in (-1, len(hint)):
                return out
            return self.bb.match_cast(out, relax.TensorType(shape=[_int64(d) for d in hint], dtype=ty.dtype))

        # -- helpers ------------------------------------------------------------------------------
        def _func(self, key: tuple[Any, ...], make: Any) -> Any:
            if key not in self._gvars:
                name = "lpc_" + "_".join(str(k).replace(".", "") for k in key)
                self._gvars[key] = self.bb.add_func(make(name), name)
            return self._gvars[key]

        def _emit(self, expr: Any) -> Any:
            return self.bb.emit(expr)

        def _dims_of(self, x: Any, what: str, hint: Any = None) -> tuple[Any, list[Any]]:
            """``(x, dims)``; an input of unknown shape is match-cast to the ONNX shape-inference
            hint (static) or to fresh symbolic dims when only its rank is known."""
            from tvm import relax, tirx

            shape = getattr(x.ty, "shape", None)
            if shape is not None and hasattr(shape, "values"):
                return x, list(shape.values)
            ndim = int(getattr(x.ty, "ndim", -1))
            if hint is not None and (ndim < 0 or ndim == len(hint)):
                dims = [_int64(d) for d in hint]
            elif ndim >= 0:
                dims = [tirx.Var(f"lpc_{what.replace('/', '_')}_d{i}", "int64") for i in range(ndim)]
            else:
                raise LpError(f"{what}: input rank unknown (give static input shapes with --shape)")
            x = self.bb.match_cast(x, relax.TensorType(shape=dims, dtype=x.ty.dtype))
            return x, dims

        def _as_f32(self, x: Any) -> Any:
            from tvm import relax

            return x if x.ty.dtype == "float32" else self._emit(relax.op.astype(x, "float32"))

        def _tensor(self, shape: list[Any], dtype: str) -> Any:
            from tvm import relax

            return relax.TensorType(shape=shape, dtype=dtype)

        # -- quantized ops -------------------------------------------------------------------------
        def _kernel(self, spec: patterns.KernelSpec, x: Any, hint: Any) -> Any:
            if isinstance(spec, patterns.ActQDQ | patterns.ActRound):
                return self._elementwise(spec, x, hint)
            return self._matmul(spec, x, hint)

        def _elementwise(self, spec: patterns.ActQDQ | patterns.ActRound, x: Any, hint: Any) -> Any:
            from tvm import relax
            from tvm.sym.analyzer import Analyzer

            x, dims = self._dims_of(x, spec.node, hint)
            total = Analyzer().simplify(math.prod(dims, start=_int64(1)))
            flat = self._emit(relax.op.reshape(self._as_f32(x), relax.ShapeExpr([total])))
            tgt = self._target
            if isinstance(spec, patterns.ActQDQ):
                gv = self._func(("qdq", spec.element), lambda n: fp8_matmul.qdq_primfunc(spec.element, tgt, n))
                args = [
                    flat,
                    relax.const(np.array([spec.scale], np.float32)),
                    relax.const(common.fp8_table(spec.element)),
                ]
                kind = f"qdq {spec.element}"
            else:
                gv = self._func(
                    ("round", spec.element), lambda n: half_matmul.round_trip_primfunc(spec.element, tgt, n)
                )
                args = [flat, relax.const(np.ones(1, np.float32))]
                kind = f"round {spec.element}"
            y = self._emit(relax.call_tir(gv, args, self._tensor([total], "float32")))
            self.calls.append(KernelCall(spec.node, kind, (gv.name_hint,), "x".join(map(str, dims))))
            return self._emit(relax.op.reshape(y, relax.ShapeExpr(dims)))

        def _matmul(
            self, spec: patterns.Int4MatMul | patterns.Fp8MatMul | patterns.HalfMatMul, x: Any, hint: Any
        ) -> Any:
            from tvm import relax
            from tvm.sym.analyzer import Analyzer

            x, dims = self._dims_of(x, spec.node, hint)
            if not dims:
                raise LpError(f"{spec.node}: MatMul of a scalar")
            last = _static(dims[-1:])
            if last is not None and last[0] != spec.k:
                raise LpError(f"{spec.node}: activation has {last[0]} columns, weight expects {spec.k}")
            lead = dims[:-1]
            m = Analyzer().simplify(math.prod(lead, start=_int64(1)))
            rows = _static([m])
            k, n = spec.k, spec.n
            x2 = self._emit(relax.op.reshape(self._as_f32(x), relax.ShapeExpr([m, _int64(k)])))
            out_t = self._tensor([m, _int64(n)], "float32")
            tgt = self._target
            if isinstance(spec, patterns.Int4MatMul):
                gemv = self._cuda and rows is not None and rows[0] <= int4_matmul.GEMV_MAX_ROWS
                key = ("int4", f"k{k}", f"n{n}", f"b{spec.block}", spec.scale_dtype) + (
                    (f"m{rows[0]}",) if gemv else ()
                )
                gv = self._func(
                    key,
                    lambda nm: int4_matmul.matmul_primfunc(
                        k, n, spec.block, tgt, nm, scale_dtype=spec.scale_dtype, rows=rows[0] if gemv else None
                    ),
                )
                y = self._emit(relax.call_tir(gv, [x2, relax.const(spec.packed), relax.const(spec.scales)], out_t))
                kernels: tuple[str, ...] = (gv.name_hint,)
                kind = f"int4 block {spec.block} ({'gemv' if gemv else 'gemm' if self._cuda else 'llvm'})"
            elif isinstance(spec, patterns.Fp8MatMul):
                kw = fp8_matmul.padded_words(k)
                qv = self._func(
                    ("fp8q", spec.element, f"k{k}"),
                    lambda nm: fp8_matmul.quantize_pack_primfunc(k, spec.element, tgt, nm),
                )
                mv = self._func(
                    ("fp8mm", spec.element, f"k{k}", f"n{n}"),
                    lambda nm: fp8_matmul.matmul_primfunc(k, n, spec.element, tgt, nm),
                )
                sa = relax.const(np.array([spec.act_scale], np.float32))
                q = self._emit(relax.call_tir(qv, [x2, sa], self._tensor([m, _int64(kw)], "uint32")))
                args = [q, relax.const(spec.packed), sa, relax.const(spec.weight_scale)]
                if fp8_matmul.needs_table(tgt):
                    args.append(relax.const(common.fp8_table(spec.element)))
                y = self._emit(relax.call_tir(mv, args, out_t))
                kernels = (qv.name_hint, mv.name_hint)
                kind = f"fp8 {spec.element}"
            else:
                kw = half_matmul.padded_words(k)
                rv = self._func(
                    ("halfr", spec.element, f"k{k}"),
                    lambda nm: half_matmul.round_pack_primfunc(k, spec.element, tgt, nm),
                )
                mv = self._func(
                    ("halfmm", spec.element, f"k{k}", f"n{n}"),
                    lambda nm: half_matmul.matmul_primfunc(k, n, spec.element, tgt, nm),
                )
                one = relax.const(np.ones(1, np.float32))
                h = self._emit(relax.call_tir(rv, [x2, one], self._tensor([m, _int64(kw)], "uint32")))
                ones = [one, relax.const(np.ones(n, np.float32))]
                y = self._emit(relax.call_tir(mv, [h, relax.const(spec.packed), *ones], out_t))
                kernels = (rv.name_hint, mv.name_hint)
                kind = f"{spec.element}"
            self.calls.append(KernelCall(spec.node, kind, kernels, f"M={m} K={k} N={n}"))
            return self._emit(relax.op.reshape(y, relax.ShapeExpr([*lead, _int64(n)])))

        # -- two-pass softmax ---------------------------------------------------------------------
        def _softmax(self, x: Any, attrs: dict, name: str) -> Any:
            from tvm import relax

            axis = int(attrs.get("axis", -1))
            x, dims = self._dims_of(x, name, attrs.get(patterns.SHAPE_HINT))
            static = _static(dims)
            builder = _softmax_builder()
            dtype = x.ty.dtype
            if static is None or not static or dtype not in ("float32", "float16", "bfloat16"):
                why = "dynamic shape" if static is None else dtype
                logger.info("TwoPassSoftmax %r: expanding the ONNX function body (%s)", name, why)
                self.calls.append(KernelCall(name, "two-pass softmax (ONNX body)", (), "x".join(map(str, dims))))
                return self._inline_function(x, attrs, name)
            rank = len(static)
            axis = axis % rank
            perm = None
            if axis != rank - 1:
                perm = [i for i in range(rank) if i != axis] + [axis]
                x = self._emit(relax.op.permute_dims(x, perm))
                static = [static[p] for p in perm]
            cols = static[-1]
            rows = math.prod(static[:-1])
            tgt = self._target
            gv = self._func(
                ("softmax2", f"r{rows}", f"c{cols}", dtype),
                lambda nm: builder(rows, cols, dtype, target=tgt).with_attrs(
                    {"global_symbol": nm, "tirx.is_scheduled": True, "op_pattern": 8}
                ),
            )
            x2 = self._emit(relax.op.reshape(x, relax.ShapeExpr([_int64(rows), _int64(cols)])))
            call = relax.call_tir(gv, [x2], self._tensor([_int64(rows), _int64(cols)], dtype))
            # Relax's RewriteDataflowReshape analyses every one-input call_tir bound to a dataflow
            # var for a reshape pattern, and that analysis aborts on hand-scheduled PrimFuncs
            # without a root block; a block output binding is outside its scope.
            y = self.bb.emit_output(call) if self.bb.current_block_is_dataflow() else self._emit(call)
            y = self._emit(relax.op.reshape(y, relax.ShapeExpr([_int64(d) for d in static])))
            if perm is not None:
                inverse = [perm.index(i) for i in range(rank)]
                y = self._emit(relax.op.permute_dims(y, inverse))
            self.calls.append(KernelCall(name, "two-pass softmax", (gv.name_hint,), "x".join(map(str, static))))
            return y

        def _inline_function(self, x: Any, attrs: dict, name: str) -> Any:
            from tvm.relax.frontend.onnx.onnx_frontend import onnx_input

            fn = self._functions.get((patterns.SOFTMAX_DOMAIN, patterns.SOFTMAX_OP))
            if fn is None:
                raise LpError(f"{name}: the model has no lpcompile.TwoPassSoftmax function body")
            caller = {k: v for k, v in attrs.items() if k not in ("tvm_custom", patterns.SHAPE_HINT)}
            caller.setdefault("axis", -1)
            env: dict[str, Any] = {fn.input[0]: x}
            for node in fn.node:
                protos = []
                for a in node.attribute:
                    if a.ref_attr_name:
                        protos.append(helper.make_attribute(a.name, caller[a.ref_attr_name]))
                    else:
                        protos.append(a)
                if node.op_type == "Constant":  # TVM's converter reads only the tensor form
                    env[node.output[0]] = _constant(protos)
                    continue
                node_attrs = self._parse_attr(protos)
                node_attrs["tvm_custom"] = {"name": f"{name}/{node.output[0]}", "num_outputs": len(node.output)}
                ins = onnx_input()
                for i in node.input:
                    ins.append(env[i] if i else None)
                out = super()._convert_operator(node.op_type, ins, node_attrs, self.opset)
                for i, o in enumerate(node.output):
                    env[o] = out if len(node.output) == 1 else out[i]
            return env[fn.output[0]]

    return Importer()


def _constant(attrs: list[onnx.AttributeProto]) -> Any:
    """A Relax constant from ONNX ``Constant`` attributes (tensor, scalar or list forms)."""
    from onnx import numpy_helper
    from tvm import relax

    a = attrs[0]
    value = helper.get_attribute_value(a)
    if a.name == "value":
        arr = numpy_helper.to_array(value)
    elif a.name in ("value_int", "value_ints"):
        arr = np.asarray(value, dtype=np.int64)
    elif a.name in ("value_float", "value_floats"):
        arr = np.asarray(value, dtype=np.float32)
    else:
        raise LpError(f"unsupported Constant attribute {a.name!r} in the TwoPassSoftmax body")
    return relax.const(arr)


def _softmax_builder() -> Any:
    """The two-pass softmax kernel builder (imported lazily: it pulls in the TIR schedules)."""
    from lpcompile.runtime.tvm.softmax import two_pass_softmax_primfunc

    return two_pass_softmax_primfunc


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 1


def to_relax(
    prepared: patterns.Prepared, target: Any, shape_dict: dict[str, list[int]] | None = None
) -> tuple[Any, list[KernelCall]]:
    """Build the Relax ``IRModule`` of a prepared model; return it with the kernel calls made."""
    importer = build_importer(prepared, target, shape_dict)
    mod = importer.from_onnx(prepared.model.graph, default_opset(prepared.model))
    return mod, list(importer.calls)
