"""PyTorch entry: ``nn.Module`` → ``torch.export`` → ONNX (dynamo exporter) → normalised ``ir.Model``,
and the map from ONNX nodes back to the PyTorch modules and parameters they came from.

Module paths. The dynamo exporter records, per ONNX node, the module scopes it was traced in
(``metadata_props["pkg.torch.onnx.name_scopes"]``, e.g. ``['', 'encoder', 'encoder.layer.0',
..., 'encoder.layer.0.attention.self.query', 'linear']``: the enclosing modules from the root,
then the FX node name). The module path of a node is the innermost module scope (the entry before
the FX node name). Without that metadata a node whose weight initializer is named like a
parameter (``head.weight``, kept by Gemm exports) gets the parameter's module. The map is
computed by :func:`module_paths_from_metadata`, which needs no torch import and works on any
dynamo-exported file.

Parameters. Exports fold ``Linear`` weights into new initializers (``val_12`` = Wᵀ for a 3-D
input, or the parameter itself under its name for ``Gemm(transB=1)``, which
:class:`~lpcompile.passes.normalize.NormalizeWeightsPass` turns into ``MatMul`` with Wᵀ). The
weight of every weighted node is matched, by exact value, to a parameter of its module (as is or
transposed), so the analyzer can differentiate the module itself (:mod:`lpcompile.torch_api`).

Inputs and outputs. The ONNX graph inputs are the tensor leaves of ``(args, kwargs)`` in pytree
order (kwargs reordered as the ``forward`` signature lists them); the outputs are the tensor
leaves of the module's output, named after their pytree key (``last_hidden_state``, ``logits``,
``output_0``...).
"""

from __future__ import annotations

import ast
import inspect
import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from lpcompile.errors import LpError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_OPSET",
    "ExportError",
    "ExportedModule",
    "ParamRef",
    "export_module",
    "flatten_inputs",
    "match_parameters",
    "module_paths_from_metadata",
    "output_names_for",
]

#: opset of the export (QDQ with int4 / fp8 / blocks needs 21; the apply pipeline raises it anyway).
DEFAULT_OPSET = 21
NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
MODULE_PATH_KEY = "lpcompile.module_path"


class ExportError(LpError):
    """The module could not be exported to ONNX, or its export cannot be mapped back to it."""


@dataclass(frozen=True)
class ParamRef:
    """Where the value of an ONNX weight initializer lives in the module.

    Attributes:
        module_path: dotted path of the owning module (``""`` for the root).
        attr: the parameter's attribute name on that module (``weight``).
        transposed: the ONNX tensor is the parameter transposed (``Linear`` → ``MatMul``).
    """

    module_path: str
    attr: str
    transposed: bool

    @property
    def fqn(self) -> str:
        return f"{self.module_path}.{self.attr}" if self.module_path else self.attr


@dataclass(frozen=True)
class ExportedModule:
    """A module exported to ONNX and normalised (Gemm → MatMul), with its names mapped back.

    Attributes:
        model: the normalised ONNX model (what plans name and passes rewrite).
        input_names: ONNX graph inputs, in the order of the tensor leaves of ``(args, kwargs)``.
        output_names: ONNX graph outputs, in the order of the tensor leaves of the output.
        module_paths: weighted-node name → PyTorch module path.
        params: weight initializer name → the parameter it holds (weights that match one).
        export_s: seconds spent exporting.
    """

    model: ir.Model
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    module_paths: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, ParamRef] = field(default_factory=dict)
    export_s: float = 0.0


# --------------------------------------------------------------------------------------------
# module paths from metadata (no torch needed)


def _scopes(node: ir.Node) -> list[str] | None:
    raw = node.metadata_props.get(NAME_SCOPES_KEY)
    if not raw:
        return None
    try:
        scopes = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return None
    if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
        return None
    return scopes


def node_module_path(node: ir.Node, param_names: Sequence[str] = (), by_weight_name: bool = True) -> str | None:
    """The PyTorch module path of one node, or None when the model does not say.

    Order: an ``lpcompile.module_path`` already written by lpcompile; the innermost module scope
    of the dynamo exporter's ``name_scopes`` (root-level ops have none); with ``by_weight_name``, a
    weight input named like ``<module>.weight`` (parameter names survive as initializer names in
    Gemm/Conv exports; restricted to ``param_names`` when given).
    """
    known = node.metadata_props.get(MODULE_PATH_KEY)
    if known:
        return known
    scopes = _scopes(node)
    if scopes is not None and len(scopes) >= 2:
        modules = [s for s in scopes[:-1] if s]
        if modules:
            return modules[-1]
    if not by_weight_name:
        return None
    names = set(param_names)
    for value in node.inputs[1:2]:
        if value is not None and value.name and value.is_initializer():
            name = value.name
            if (not names or name in names) and "." in name:
                return name.rsplit(".", 1)[0]
    return None


def module_paths_from_metadata(model: ir.Model, param_names: Sequence[str] = ()) -> dict[str, str]:
    """Weighted-node name → module path for every weighted node whose origin is recorded.

    Weight names are read as parameter names only for a dynamo export (some node carries
    ``name_scopes``) or when the module's ``param_names`` are given: in other ONNX files a dotted
    initializer name is not evidence of a PyTorch module.
    """
    from lpcompile.graph import find_weight_nodes

    by_name = {n.name: n for n in model.graph}
    by_weight_name = bool(param_names) or any(NAME_SCOPES_KEY in n.metadata_props for n in model.graph)
    out: dict[str, str] = {}
    for w in find_weight_nodes(model):
        node = by_name.get(w.name)
        path = node_module_path(node, param_names, by_weight_name) if node is not None else None
        if path:
            out[w.name] = path
    return out


# --------------------------------------------------------------------------------------------
# inputs / outputs


def _as_args(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    import torch

    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, list | tuple):
        return tuple(example_inputs), {}
    raise ExportError(
        f"example_inputs must be a tensor, a tuple of positional inputs or a dict of keyword inputs, "
        f"not {type(example_inputs).__name__}"
    )


def _ordered_kwargs(module: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Keyword inputs in the order ``forward`` declares them (torch.export flattens them so)."""
    try:
        params = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return kwargs
    order = {p: i for i, p in enumerate(params)}
    return dict(sorted(kwargs.items(), key=lambda kv: order.get(kv[0], len(order))))


def flatten_inputs(
    module: Any, example_inputs: Any
) -> tuple[tuple[Any, ...], dict[str, Any], list[Any], list[int], Any]:
    """``(args, kwargs, leaves, tensor leaf positions, treespec)`` of the example inputs."""
    import torch
    from torch.utils import _pytree as pytree

    args, kwargs = _as_args(example_inputs)
    kwargs = _ordered_kwargs(module, kwargs)
    leaves, spec = pytree.tree_flatten((args, kwargs))
    tensor_pos = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    if not tensor_pos:
        raise ExportError("example_inputs hold no tensor")
    return args, kwargs, leaves, tensor_pos, spec


def rebuild_inputs(
    example_leaves: Sequence[Any], tensor_pos: Sequence[int], spec: Any, tensors: Sequence[Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` with the tensor leaves replaced by ``tensors`` (in order)."""
    from torch.utils import _pytree as pytree

    leaves = list(example_leaves)
    for pos, t in zip(tensor_pos, tensors, strict=True):
        leaves[pos] = t
    args, kwargs = pytree.tree_unflatten(leaves, spec)
    return tuple(args), dict(kwargs)


def _key_name(path: Sequence[Any], index: int) -> str:
    parts: list[str] = []
    for k in path:
        key = getattr(k, "key", None)
        if key is None:
            key = getattr(k, "name", None)
        if key is None:
            key = getattr(k, "idx", None)
        parts.append(str(key) if key is not None else str(k))
    text = "_".join(p for p in parts if p)
    if not text or text.isdigit():
        return f"output_{index}"
    return "".join(c if c.isalnum() or c in "_.-" else "_" for c in text)


def output_names_for(outputs: Any) -> list[str]:
    """Names for the tensor leaves of a module output (dict / ModelOutput keys; else ``output_i``)."""
    import torch
    from torch.utils import _pytree as pytree

    flat, _ = pytree.tree_flatten_with_path(outputs)
    names: list[str] = []
    index = 0
    for path, leaf in flat:
        if not isinstance(leaf, torch.Tensor):
            continue
        name = _key_name(path, index)
        if name in names:
            name = f"{name}_{index}"
        names.append(name)
        index += 1
    if not names:
        raise ExportError("the module returns no tensor")
    return names


# --------------------------------------------------------------------------------------------
# parameters


def _module_at(root: Any, path: str) -> Any | None:
    try:
        return root.get_submodule(path) if path else root
    except AttributeError:
        return None


def _find_param(module: Any, path: str, value: np.ndarray, recurse: bool) -> ParamRef | None:
    """A parameter of ``module`` equal to ``value`` (as is, or transposed for rank 2)."""
    for name, p in module.named_parameters(recurse=recurse, remove_duplicate=False):
        arr = p.detach().cpu()
        if arr.dtype.is_floating_point is False:
            continue
        arr_np = arr.float().numpy()
        sub, _, attr = name.rpartition(".")
        owner = f"{path}.{sub}" if path and sub else (sub or path)
        if arr_np.shape == value.shape and np.array_equal(arr_np, value):
            return ParamRef(owner, attr, False)
        if arr_np.ndim == 2 and arr_np.shape[::-1] == value.shape and np.array_equal(arr_np.T, value):
            return ParamRef(owner, attr, True)
    return None


def match_parameters(model: ir.Model, module: Any, module_paths: Mapping[str, str]) -> dict[str, ParamRef]:
    """Weight initializer → the parameter it holds, for every weighted node that matches one.

    The node's own module is searched first (its direct parameters, then its children), then the
    whole model. Matches are by exact value, so a weight the exporter changed (scaled, fused) is
    left unmatched rather than mismatched.
    """
    from lpcompile.graph import find_weight_nodes, weight_array

    out: dict[str, ParamRef] = {}
    for w in find_weight_nodes(model):
        if w.weight in out:
            continue
        value = weight_array(model, w.weight)
        path = module_paths.get(w.name)
        ref = None
        owner = _module_at(module, path) if path is not None else None
        if owner is not None:
            ref = _find_param(owner, path or "", value, recurse=False) or _find_param(owner, path or "", value, True)
        if ref is None:
            ref = _find_param(module, "", value, recurse=True)
        if ref is not None:
            out[w.weight] = ref
        else:
            logger.debug("weight %s of node %s matches no parameter", w.weight, w.name)
    return out


# --------------------------------------------------------------------------------------------
# export


def _dynamic_batch(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``Dim.AUTO`` on axis 0 of every tensor input of rank ≥ 1, and on axis 1 of 2-D integer/bool
    inputs (token ids and attention masks: the sequence); export may still specialise either."""
    import torch
    from torch.utils import _pytree as pytree

    def spec(x: Any) -> Any:
        if not isinstance(x, torch.Tensor) or x.dim() < 1:
            return None
        if x.dim() == 2 and not x.is_floating_point() and not x.is_complex():
            return {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO}
        return {0: torch.export.Dim.AUTO}

    return pytree.tree_map(spec, args), pytree.tree_map(spec, kwargs)


def export_module(
    module: torch.nn.Module,
    example_inputs: Any,
    *,
    dynamic_shapes: Any = "batch",
    opset: int = DEFAULT_OPSET,
    progress: Callable[[str], None] | None = None,
) -> ExportedModule:
    """Export ``module`` (in eval mode) through ``torch.export`` and the dynamo ONNX exporter.

    Args:
        module: an fp32 ``torch.nn.Module``.
        example_inputs: a tensor, a tuple of positional inputs, or a dict of keyword inputs.
        dynamic_shapes: ``"batch"`` (the default: axis 0 of every tensor input dynamic, and the
            sequence axis of 2-D integer inputs such as token ids and masks), ``None`` (static
            shapes) or a ``torch.export`` ``dynamic_shapes`` spec.
        opset: ONNX opset of the export.

    Raises:
        ExportError: the exporter failed, or the export's inputs/outputs do not line up with the
            module's tensor inputs/outputs.
    """
    import time

    import torch

    from lpcompile.frontend.onnx_io import ensure_node_names
    from lpcompile.passes.normalize import NormalizeWeightsPass

    t0 = time.perf_counter()
    args, kwargs, _leaves, tensor_pos, _spec = flatten_inputs(module, example_inputs)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            outputs = module(*args, **kwargs)
        out_names = output_names_for(outputs)
        if dynamic_shapes == "batch":
            dyn_args, dyn_kwargs = _dynamic_batch(args, kwargs)
            dynamic = (*dyn_args, *dyn_kwargs.values())  # kwargs in signature order, as torch.export wants
        else:
            dynamic = dynamic_shapes
        if progress:
            progress("torch.export")
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)  # torch internals
                program = torch.export.export(module, args, kwargs or None, dynamic_shapes=dynamic, strict=False)
        except Exception as exc:  # exporter failures are many and version dependent
            raise ExportError(f"torch.export failed: {type(exc).__name__}: {_first_line(exc)}") from exc
        if progress:
            progress("torch.onnx.export")
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
                onnx_program = torch.onnx.export(
                    program, dynamo=True, opset_version=opset, output_names=out_names, verbose=False
                )
        except Exception as exc:
            raise ExportError(f"torch.onnx.export failed: {type(exc).__name__}: {_first_line(exc)}") from exc
    finally:
        module.train(was_training)
    if onnx_program is None:
        raise ExportError("torch.onnx.export returned no program")
    model = ir.from_proto(onnx_program.model_proto)
    ensure_node_names(model)
    NormalizeWeightsPass()(model)
    input_names = tuple(v.name or "" for v in model.graph.inputs if not v.is_initializer())
    output_names = tuple(v.name or "" for v in model.graph.outputs)
    if len(input_names) != len(tensor_pos):
        raise ExportError(
            f"the ONNX export has {len(input_names)} input(s) but the example inputs hold {len(tensor_pos)} tensor(s)"
        )
    if len(output_names) != len(out_names):
        raise ExportError(f"the ONNX export has {len(output_names)} output(s), the module returns {len(out_names)}")
    param_names = [n for n, _ in module.named_parameters(remove_duplicate=False)]
    paths = module_paths_from_metadata(model, param_names)
    params = match_parameters(model, module, paths)
    elapsed = time.perf_counter() - t0
    logger.info(
        "exported %s: %d weighted node(s) mapped to modules, %d to parameters (%.1f s)",
        type(module).__name__,
        len(paths),
        len(params),
        elapsed,
    )
    return ExportedModule(
        model=model,
        input_names=input_names,
        output_names=output_names,
        module_paths=paths,
        params=params,
        export_s=elapsed,
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
