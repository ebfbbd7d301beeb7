"""MLIR emission through torch-mlir, with the plan's precisions as MLIR element types.

Route. torch-mlir's ONNX importer takes neither fp8 initializers nor blocked int4
DequantizeLinear (see FACTS), so the rewritten ONNX model is evaluated as a torch program
instead: :class:`OnnxProgram` runs the graph with lpcompile's torch interpretation of ONNX
(:class:`lpcompile.analysis.interpreter.TorchGraph`), holding every floating-point and 8-bit
initializer as a buffer *in its own dtype* (``float8_e4m3fn``, ``float8_e5m2``, ``bfloat16``,
``float16``, ``int8``) and dequantizing in ``forward`` exactly as the DequantizeLinear / Cast
nodes say. ``torch.export`` traces it for the example input shapes (static shapes: integer shape
arithmetic of the graph is evaluated once on the examples and baked in), and
``torch_mlir.fx.export_and_import(..., output_type=...)`` imports and lowers it.

Element types per format (linalg level; the ``torch`` level spells integers ``si8``):

=============  =====================================================================
format         what carries it in MLIR
=============  =====================================================================
``bf16``       ``bf16`` weight constant + ``arith.extf``; activations truncated to bf16
``fp16``       ``f16`` weight constant; activations truncated to f16
``fp8_e4m3``   ``f8E4M3FN`` weight constant and activation (quantize → f8E4M3FN → dequantize)
``fp8_e5m2``   ``f8E5M2`` likewise
``int8``       ``i8`` weight constant, f32 per-channel scales
``int4_b*``    ``i8`` *storage* holding values in [-8, 7], ``f16`` block scales. torch has no
               int4 tensor dtype that ``torch.export`` and torch-mlir's FX importer carry
               (``torch.int4`` is a shell dtype without kernels), so the int4 grid is kept
               exactly but stored one value per byte.
=============  =====================================================================

Levels: ``torch`` (torch backend dialect), ``linalg`` (linalg-on-tensors), ``stablehlo``,
``tosa``. :func:`run_linalg` compiles a linalg module with the bundled ``ExecutionEngine`` (LLVM
JIT) and runs it; fp8 does not lower to LLVM there, so that works for fp32/bf16/fp16 plans.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import torch

from lpcompile.errors import LpError, UsageError
from lpcompile.io_utils import atomic_write_text

logger = logging.getLogger(__name__)

__all__ = [
    "LEVELS",
    "MlirError",
    "OnnxProgram",
    "available",
    "constant_types",
    "default_examples",
    "element_types",
    "expected_element_types",
    "export_program",
    "import_onnx",
    "import_program",
    "lower_to_mlir",
    "parse_module",
    "run_linalg",
    "weight_element_type",
    "write_module",
]

#: user-facing level → torch-mlir output type
LEVELS: dict[str, str] = {
    "torch": "torch",
    "linalg": "linalg-on-tensors",
    "linalg-on-tensors": "linalg-on-tensors",
    "stablehlo": "stablehlo",
    "tosa": "tosa",
}

#: a format's stored element → the MLIR element type that carries it at the linalg level
_ELEMENT_TYPES = {
    "bfloat16": "bf16",
    "float16": "f16",
    "float8_e4m3fn": "f8E4M3FN",
    "float8_e5m2": "f8E5M2",
    "int8": "i8",
}


#: ops of the packed-code table decode (lpcompile.passes.table_decode) the torch interpretation lacks
_PACKED_DECODE_OPS = frozenset({"BitShift", "BitwiseAnd"})


def _refuse_packed_decodes(proto: onnx.ModelProto) -> None:
    """Raise a one-line ``MlirError`` for weights in grammar formats whose table decode unpacks
    1/2/4-bit codes with ``BitShift`` / ``BitwiseAnd`` (FP4, NF4, int2/int4 asymmetric or with a
    float offset such as ``q4_1``...): the torch interpretation this route traces has no such ops."""
    from lpcompile.passes.table_decode import DECODE_KEY

    serves = "lpcompile.serves"
    bad = {n.op_type for n in proto.graph.node if n.op_type in _PACKED_DECODE_OPS and not n.domain}
    if not bad:
        return
    formats = sorted({p.value for n in proto.graph.node for p in n.metadata_props if p.key == DECODE_KEY})
    nodes = sorted({p.value for n in proto.graph.node if n.op_type in bad for p in n.metadata_props if p.key == serves})
    raise MlirError(
        f"MLIR lowering does not support weights stored in {', '.join(formats) or 'packed grammar formats'} "
        f"(their decode unpacks codes with {', '.join(sorted(bad))}; nodes {', '.join(nodes[:4]) or '?'}"
        f"{'…' if len(nodes) > 4 else ''}): write them for target qdq / ort and run them with ONNX Runtime"
    )


def _format_type(fmt: str) -> str | None:
    """The linalg element type of ``fmt``'s stored weights (int4: i8 storage + f16 scales); None: fp32."""
    from lpcompile.formats import canonical_name, get_format

    name = canonical_name(fmt)
    return "i8" if name.startswith("int4") else _ELEMENT_TYPES.get(get_format(name).element)


#: ONNX ops whose outputs depend only on their input's shape, not its values
_SHAPE_ONLY_OPS = frozenset({"Shape", "Size"})

#: the ExecutionEngine lowering of linalg-on-tensors (the RefBackend's, without its private passes)
_LLVM_PIPELINE = (
    "func.func(linalg-generalize-named-ops)",
    "func.func(linalg-fuse-elementwise-ops)",
    "convert-shape-to-std",
    "one-shot-bufferize{copy-before-write bufferize-function-boundaries "
    "function-boundary-type-conversion=identity-layout-map}",
    "buffer-deallocation-pipeline",
    "func.func(convert-linalg-to-loops)",
    "func.func(lower-affine)",
    "convert-scf-to-cf",
    "func.func(arith-expand)",
    "func.func(convert-math-to-llvm)",
    "convert-math-to-libm",
    "expand-strided-metadata",
    "finalize-memref-to-llvm",
    "lower-affine",
    "convert-bufferization-to-memref",
    "finalize-memref-to-llvm",
    "func.func(convert-arith-to-llvm)",
    "convert-func-to-llvm",
    "convert-cf-to-llvm",
    "reconcile-unrealized-casts",
)


class MlirError(LpError):
    """torch-mlir is missing, or the model does not import / lower / verify."""


def available() -> bool:
    """Whether torch-mlir (``pip install torch-mlir``) can be imported."""
    import importlib.util

    return importlib.util.find_spec("torch_mlir") is not None


def _require() -> None:
    if not available():
        raise MlirError("MLIR output needs torch-mlir: pip install torch-mlir (it must not replace your torch)")


def _output_type(level: str) -> str:
    try:
        return LEVELS[level]
    except KeyError:
        raise UsageError(f"unknown MLIR level {level!r}; use torch, linalg, stablehlo or tosa") from None


# --------------------------------------------------------------------------------------------
# the rewritten ONNX graph as a torch program


def _to_proto(model: onnx.ModelProto | ir.Model | str | os.PathLike[str]) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, ir.Model):
        return ir.to_proto(model)
    from lpcompile.frontend.onnx_io import load_proto

    return load_proto(model)


def default_examples(model: onnx.ModelProto | ir.Model, seq_len: int = 16) -> dict[str, np.ndarray]:
    """Example inputs that fix the shapes MLIR is emitted for: a symbolic batch becomes 1, other
    symbolic dims ``seq_len``. Only shapes matter (the values feed nothing that is baked)."""
    from lpcompile.frontend.calib import model_input_specs

    rng = np.random.default_rng(0)
    out: dict[str, np.ndarray] = {}
    for spec in model_input_specs(model):
        if spec.shape is None:
            raise MlirError(f"input {spec.name!r} has no declared shape; pass example inputs")
        shape = tuple(int(d) if isinstance(d, int) else (1 if i == 0 else seq_len) for i, d in enumerate(spec.shape))
        dtype = spec.dtype.numpy()
        if np.issubdtype(dtype, np.floating):
            out[spec.name] = rng.standard_normal(shape).astype(dtype)
        else:
            out[spec.name] = np.ones(shape, dtype=dtype)
    return out


def _example_tensors(
    proto: onnx.ModelProto, input_names: Sequence[str], example_inputs: Mapping[str, Any] | Sequence[Any] | None
) -> list[Any]:
    from lpcompile.analysis.ops import numpy_to_torch

    if example_inputs is None:
        example_inputs = default_examples(proto)
        logger.info("MLIR for input shapes %s", {k: v.shape for k, v in example_inputs.items()})
    if isinstance(example_inputs, Mapping):
        missing = [n for n in input_names if n not in example_inputs]
        if missing:
            raise MlirError(f"example inputs lack {', '.join(missing)}")
        values = [example_inputs[n] for n in input_names]
    else:
        values = list(example_inputs)
        if len(values) != len(input_names):
            raise MlirError(f"the model takes {len(input_names)} input(s), {len(values)} example(s) given")
    return [v if isinstance(v, torch.Tensor) else numpy_to_torch(np.asarray(v)) for v in values]


class OnnxProgram(torch.nn.Module):
    """An ONNX model as an ``nn.Module`` for ``torch.export``, low-precision weights kept as such.

    Args:
        model: the (rewritten) ONNX model.
        example_inputs: one value per graph input (by name or in order); they fix the shapes.

    Attributes:
        input_names / output_names: the graph's inputs and outputs, in order.
        examples: the example inputs as tensors (in ``input_names`` order).
        baked: integer values computed from shapes and constants only, evaluated once on the examples.
    """

    def __init__(
        self,
        model: onnx.ModelProto | ir.Model | str | os.PathLike[str],
        example_inputs: Mapping[str, Any] | Sequence[Any] | None = None,
    ) -> None:
        from lpcompile.analysis.interpreter import TorchGraph

        super().__init__()
        proto = _to_proto(model)
        _refuse_packed_decodes(proto)
        graph = TorchGraph(proto)
        self._graph_ref = (graph,)  # not an attribute torch.export walks: its tensors are handled below
        self.input_names = tuple(graph.input_names)
        self.output_names = tuple(graph.output_names)
        self.examples = _example_tensors(proto, self.input_names, example_inputs)

        # values that depend on the inputs' data (not just their shapes)
        dependent = set(self.input_names)
        for node in graph.nodes:
            if node.op_type in _SHAPE_ONLY_OPS and not node.domain:
                continue
            if any(i in dependent for i in node.inputs if i):
                dependent.update(o for o in node.outputs if o)
        produced = [o for node in graph.nodes for o in node.outputs if o]
        with torch.no_grad():
            values = graph.forward(dict(zip(self.input_names, self.examples, strict=True)), capture=produced)
        self.baked: dict[str, torch.Tensor] = {
            k: v.detach()
            for k, v in values.items()
            if k not in dependent and k not in self.output_names and not v.is_floating_point()
        }
        # initializers that carry numerics: buffers in their own dtype (fp32/bf16/f16/f8/i8)
        self._buffer_names: list[str] = []
        for i, (name, value) in enumerate(graph.constants.items()):
            if value.is_floating_point() or value.dtype in (torch.int8, torch.uint8):
                self.register_buffer(f"w{i}", value)
                self._buffer_names.append(name)

    def forward(self, *inputs: Any) -> tuple[Any, ...]:
        (graph,) = self._graph_ref
        overrides = {name: getattr(self, f"w{i}") for i, name in self._iter_buffers()}
        overrides.update(self.baked)
        out = graph.forward(dict(zip(self.input_names, inputs, strict=True)), overrides=overrides)
        return tuple(out[n] for n in self.output_names)

    def _iter_buffers(self) -> Iterator[tuple[int, str]]:
        (graph,) = self._graph_ref
        index = {name: i for i, name in enumerate(graph.constants)}
        for name in self._buffer_names:
            yield index[name], name

    def export(self) -> Any:
        """``torch.export`` of this program at the example shapes."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)  # torch internals
            try:
                return torch.export.export(self, tuple(self.examples), strict=False)
            except LpError:
                raise
            except Exception as exc:
                raise MlirError(f"cannot trace the ONNX model as a torch program: {_first_line(exc)}") from exc


# --------------------------------------------------------------------------------------------
# import / write / inspect


def export_program(
    model: onnx.ModelProto | ir.Model | str | os.PathLike[str],
    example_inputs: Mapping[str, Any] | Sequence[Any] | None = None,
) -> Any:
    """The ``torch.export`` program of an ONNX model at the example shapes (see :class:`OnnxProgram`);
    one program can be imported at several levels."""
    return OnnxProgram(model, example_inputs).export()


def import_program(program: Any, level: str = "linalg") -> Any:
    """Import a ``torch.export`` program with torch-mlir and lower it to ``level``; verified."""
    output_type = _output_type(level)
    _require()
    from torch_mlir import fx

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)  # torch internals
            module = fx.export_and_import(program, output_type=output_type)
    except Exception as exc:  # torch-mlir reports lowering failures as assorted exception types
        raise MlirError(f"torch-mlir could not lower the model to {level}: {_first_line(exc)}") from exc
    verify(module)
    return module


def import_onnx(
    model: onnx.ModelProto | ir.Model | str | os.PathLike[str],
    level: str = "linalg",
    example_inputs: Mapping[str, Any] | Sequence[Any] | None = None,
) -> Any:
    """The MLIR module (``torch_mlir.ir.Module``) of an ONNX model at ``level``, verified.

    Raises:
        UsageError: unknown level. MlirError: torch-mlir missing, or import/lowering/verification failed.
    """
    _output_type(level)
    _require()
    return import_program(export_program(model, example_inputs), level)


def weight_element_type(fmt: str, level: str = "linalg") -> str | None:
    """The element type of the weight constant a format's weights are stored in (None: fp32)."""
    _output_type(level)
    et = _format_type(fmt)
    return "si8" if et == "i8" and level == "torch" else et


def expected_element_types(formats: Sequence[str], level: str = "linalg") -> set[str]:
    """The MLIR element types that carry ``formats`` at ``level`` (see the module docstring)."""
    from lpcompile.formats import canonical_name

    _output_type(level)
    int8 = "si8" if level == "torch" else "i8"
    out: set[str] = set()
    for f in formats:
        et = _format_type(f)
        if canonical_name(f).startswith("int4"):
            out |= {int8, "f16"}
        elif et is not None:
            out.add(int8 if et == "i8" else et)
    return out


def verify(module: Any) -> None:
    """Raise ``MlirError`` unless the module verifies."""
    try:
        ok = module.operation.verify()
    except Exception as exc:
        raise MlirError(f"MLIR verification failed: {_first_line(exc)}") from exc
    if ok is False:
        raise MlirError("MLIR verification failed")


def write_module(module: Any, path: str | os.PathLike[str]) -> Path:
    """Write the module's textual form atomically."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"output {path} is a directory; give a file name")
    atomic_write_text(path, str(module) + "\n")
    return path


def lower_to_mlir(
    model_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    level: str = "linalg",
    example_inputs: Mapping[str, Any] | None = None,
) -> Path:
    """``lpcompile lower MODEL --target mlir -o OUT --mlir-level LEVEL``: write MLIR of a rewritten model.

    The shapes are the example inputs' (default: synthetic, batch 1, symbolic dims 16).
    """
    _output_type(level)
    path = Path(model_path)
    if not path.is_file():
        from lpcompile.errors import ModelLoadError

        raise ModelLoadError(f"model file not found: {path}")
    module = import_onnx(path, level, example_inputs)
    out_path = write_module(module, out)
    logger.info(
        "wrote %s MLIR to %s (element types: %s)",
        level,
        out_path,
        ", ".join(f"{k}×{v}" for k, v in sorted(element_types(module).items())),
    )
    return out_path


def parse_module(text: str) -> Any:
    """Parse MLIR text with the bundled bindings (all dialects registered) and verify it."""
    _require()
    from torch_mlir import ir as mlir_ir

    ctx = _context()
    try:
        module = mlir_ir.Module.parse(text, ctx)
    except Exception as exc:
        raise MlirError(f"cannot parse MLIR: {_first_line(exc)}") from exc
    verify(module)
    return module


def _context() -> Any:
    from torch_mlir import ir as mlir_ir
    from torch_mlir.dialects import torch as torch_d

    ctx = mlir_ir.Context()
    torch_d.register_dialect(ctx)
    return ctx


def _iter_ops(op: Any) -> Iterator[Any]:
    yield op
    for region in op.regions:
        for block in region.blocks:
            for child in block.operations:
                yield from _iter_ops(child.operation)


def _element_type(t: Any) -> str | None:
    from torch_mlir import ir as mlir_ir

    if isinstance(t, mlir_ir.ShapedType):
        return str(t.element_type)
    text = str(t)
    if text.startswith(("!torch.vtensor<", "!torch.tensor<")) and "," in text:
        return text.rsplit(",", 1)[1].rstrip(">").strip()  # torch dialect tensors: !torch.vtensor<[..],dtype>
    return None


_CONSTANT_OPS = frozenset({"arith.constant", "torch.vtensor.literal", "stablehlo.constant", "tosa.const"})


def _tensor_type(t: Any) -> tuple[str, tuple[int, ...]] | None:
    from torch_mlir import ir as mlir_ir

    if isinstance(t, mlir_ir.ShapedType) and t.has_rank:
        return str(t.element_type), tuple(int(d) for d in t.shape)
    text = str(t)
    if text.startswith("!torch.vtensor<[") and "]," in text:
        dims, dtype = text[len("!torch.vtensor<[") :].rstrip(">").split("],", 1)
        try:
            return dtype.strip(), tuple(int(d) for d in dims.split(",") if d.strip())
        except ValueError:  # dynamic dims
            return None
    return None


def constant_types(module: Any) -> collections.Counter[tuple[str, tuple[int, ...]]]:
    """``(element type, shape)`` of the tensor constants (weights) of a module, walked with the bindings."""
    counts: collections.Counter[tuple[str, tuple[int, ...]]] = collections.Counter()
    for op in _iter_ops(module.operation):
        if op.name in _CONSTANT_OPS:
            for r in op.results:
                tt = _tensor_type(r.type)
                if tt is not None:
                    counts[tt] += 1
    return counts


def element_types(module: Any) -> collections.Counter[str]:
    """How many op results / operands / block arguments of each tensor element type the module has
    (walked with the MLIR bindings: ``f8E4M3FN``, ``bf16``, ``i8``, ``f32``...)."""
    counts: collections.Counter[str] = collections.Counter()
    for op in _iter_ops(module.operation):
        values = list(op.results) + list(op.operands)
        for region in op.regions:
            for block in region.blocks:
                values.extend(block.arguments)
        for v in values:
            et = _element_type(v.type)
            if et is not None:
                counts[et] += 1
    return counts


# --------------------------------------------------------------------------------------------
# ExecutionEngine


_NP_TO_CTYPE = {
    "f32": (np.float32, ctypes.c_float),
    "f64": (np.float64, ctypes.c_double),
    "i64": (np.int64, ctypes.c_int64),
    "i32": (np.int32, ctypes.c_int32),
    "i8": (np.int8, ctypes.c_int8),
    "i1": (np.bool_, ctypes.c_bool),
    "f16": (np.float16, ctypes.c_uint16),
}


def run_linalg(module: Any, inputs: Sequence[np.ndarray], func: str = "main") -> list[np.ndarray]:
    """Compile a linalg-on-tensors module to LLVM with the ``ExecutionEngine`` and run ``func``.

    The module is copied (the argument is left as it is). Results come back as numpy arrays.

    Raises:
        MlirError: the module does not lower to LLVM (e.g. fp8 arithmetic) or has unsupported result types.
    """
    _require()
    from torch_mlir import ir as mlir_ir
    from torch_mlir import passmanager
    from torch_mlir.execution_engine import ExecutionEngine
    from torch_mlir.runtime import np_to_memref as npm

    ctx = _context()
    work = mlir_ir.Module.parse(str(module), ctx)
    with ctx:
        fn = next(
            (
                op
                for op in work.body.operations
                if op.operation.name == "func.func" and op.attributes["sym_name"].value == func
            ),
            None,
        )
        if fn is None:
            raise MlirError(f"the module has no function {func!r}")
        results = mlir_ir.FunctionType(fn.attributes["function_type"].value).results
        if not all(isinstance(t, mlir_ir.ShapedType) and t.has_rank for t in results):
            raise MlirError(f"function {func!r} returns non-tensor or unranked values")
        result_types = [str(t.element_type) for t in results]
        result_ranks = [t.rank for t in results]
        fn.attributes["llvm.emit_c_interface"] = mlir_ir.UnitAttr.get()
        try:
            passmanager.PassManager.parse("builtin.module(" + ",".join(_LLVM_PIPELINE) + ")").run(work.operation)
        except Exception as exc:
            raise MlirError(f"the module does not lower to LLVM: {_first_line(exc)}") from exc
    unknown = [t for t in result_types if t not in _NP_TO_CTYPE]
    if unknown:
        raise MlirError(f"unsupported result element type(s) for the ExecutionEngine: {', '.join(unknown)}")
    engine = ExecutionEngine(work, opt_level=2)
    args = [ctypes.pointer(ctypes.pointer(npm.get_ranked_memref_descriptor(np.ascontiguousarray(a)))) for a in inputs]
    descs = [
        npm.make_nd_memref_descriptor(r, _NP_TO_CTYPE[t][1])() for r, t in zip(result_ranks, result_types, strict=True)
    ]
    if len(descs) == 1:
        holder: Any = descs[0]
    else:
        fields = [(f"r{i}", type(d)) for i, d in enumerate(descs)]
        holder = type("Results", (ctypes.Structure,), {"_fields_": fields})()
    engine.invoke(func, ctypes.pointer(ctypes.pointer(holder)), *args)
    results = [holder] if len(descs) == 1 else [getattr(holder, f"r{i}") for i in range(len(descs))]
    out = []
    for desc, t in zip(results, result_types, strict=True):
        arr = np.array(npm.ranked_memref_to_numpy(ctypes.pointer(desc)), copy=True)
        out.append(arr.view(np.float16) if t == "f16" else arr.astype(_NP_TO_CTYPE[t][0], copy=False))
    return out


def _first_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(exc).__name__
