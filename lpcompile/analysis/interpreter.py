"""A differentiable evaluator of ONNX graphs in torch.

``TorchGraph(model, trainable=...)`` turns an ONNX model into a torch computation: initializers
become torch tensors (those named in ``trainable`` are leaf tensors with ``requires_grad``), and
``forward`` evaluates the nodes in topological order with the implementations of
:mod:`lpcompile.analysis.ops`. Everything is plain differentiable torch, so gradients, and
Hessian-vector products by double backward, flow to parameters, to graph inputs, and to leaf
overrides of intermediate activations.

Model-local ONNX functions are inlined before interpretation. Ops outside the table raise
:class:`lpcompile.errors.UnsupportedOpsError` naming all of them, before any work is done.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.inliner
import torch

from lpcompile.analysis import ops as _ops
from lpcompile.errors import CalibrationError, LpError, ModelLoadError, UnsupportedOpsError

logger = logging.getLogger(__name__)

__all__ = ["NodeSpec", "TorchGraph", "check_supported", "supported_ops"]


def supported_ops() -> frozenset[str]:
    """Op types the interpreter implements (``domain::op_type`` outside the default domain)."""
    return _ops.registered_ops()


def _domain(d: str) -> str:
    return "" if d in ("", "ai.onnx") else d


def check_supported(model: onnx.ModelProto) -> list[str]:
    """Sorted op types of ``model`` (local function bodies included) that are not supported.

    Calls to model-local functions count as supported when their bodies are.
    """
    functions = {(_domain(f.domain), f.name): f for f in model.functions}
    missing: set[str] = set()
    seen: set[tuple[str, str]] = set()

    def visit(nodes: Iterable[onnx.NodeProto]) -> None:
        for node in nodes:
            key = (_domain(node.domain), node.op_type)
            if key in functions:
                if key not in seen:
                    seen.add(key)
                    visit(functions[key].node)
                continue
            if _ops.lookup(node.op_type, key[0]) is None:
                missing.add(_ops.op_key(node.op_type, key[0]))

    visit(model.graph.node)
    return sorted(missing)


@dataclass(frozen=True)
class NodeSpec:
    """One node of the interpreted (inlined, topologically sorted) graph."""

    name: str
    op_type: str
    domain: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class _Step:
    spec: NodeSpec
    fn: _ops.OpFn
    ctx: _ops.OpContext
    attrs: dict[str, Any]


def _sparse_to_torch(sp: onnx.SparseTensorProto) -> torch.Tensor:
    values = _ops.tensor_from_proto(sp.values)
    idx = _ops.tensor_from_proto(sp.indices).to(torch.int64)
    dims = list(sp.dims)
    dense = torch.zeros(int(np.prod(dims)) if dims else 1, dtype=values.dtype)
    if idx.dim() == 2:  # [NNZ, rank] coordinates -> linear
        strides = torch.tensor([int(np.prod(dims[i + 1 :])) for i in range(len(dims))], dtype=torch.int64)
        idx = (idx * strides).sum(dim=1)
    dense[idx.reshape(-1)] = values.reshape(-1)
    return dense.reshape(dims)


def _attr_value(a: onnx.AttributeProto) -> Any:
    t = onnx.AttributeProto
    if a.type == t.FLOAT:
        return float(a.f)
    if a.type == t.INT:
        return int(a.i)
    if a.type == t.STRING:
        return a.s.decode("utf-8", errors="replace")
    if a.type == t.TENSOR:
        return _ops.tensor_from_proto(a.t)
    if a.type == t.SPARSE_TENSOR:
        return _sparse_to_torch(a.sparse_tensor)
    if a.type == t.FLOATS:
        return [float(v) for v in a.floats]
    if a.type == t.INTS:
        return [int(v) for v in a.ints]
    if a.type == t.STRINGS:
        return [s.decode("utf-8", errors="replace") for s in a.strings]
    return onnx.helper.get_attribute_value(a)


def _constant_type(node: onnx.NodeProto) -> int:
    for a in node.attribute:
        if a.name == "value":
            return a.t.data_type
        if a.name == "sparse_value":
            return a.sparse_tensor.values.data_type
        if a.name in ("value_float", "value_floats"):
            return onnx.TensorProto.FLOAT
        if a.name in ("value_int", "value_ints"):
            return onnx.TensorProto.INT64
    return 0


def _load_initializer(t: onnx.TensorProto) -> torch.Tensor:
    if t.data_location == onnx.TensorProto.EXTERNAL and not t.raw_data:
        raise ModelLoadError(
            f"initializer {t.name!r} has external data that was not loaded; "
            "load the model with onnx.load(path) (load_external_data=True) or pass the path"
        )
    return _ops.tensor_from_proto(t)


def _light_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` without initializer data, for inlining functions cheaply."""
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    g = light.graph
    g.name = model.graph.name
    g.node.extend(model.graph.node)
    g.input.extend(model.graph.input)
    g.output.extend(model.graph.output)
    g.value_info.extend(model.graph.value_info)
    return light


def _toposort(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """Stable Kahn sort; raises ModelLoadError for inputs that are never produced or cycles."""
    producer: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for o in n.output:
            if o:
                producer[o] = i
    deps: list[set[int]] = []
    users: dict[int, list[int]] = {i: [] for i in range(len(nodes))}
    for i, n in enumerate(nodes):
        d: set[int] = set()
        for name in n.input:
            if not name or name in available:
                continue
            if name not in producer:
                raise ModelLoadError(f"node {n.name or n.op_type!r} reads {name!r}, which nothing produces")
            d.add(producer[name])
        deps.append(d)
        for j in d:
            users[j].append(i)
    indeg = [len(d) for d in deps]
    import heapq

    ready = [i for i, k in enumerate(indeg) if k == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            indeg[u] -= 1
            if indeg[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        raise ModelLoadError("the graph has a cycle")
    return [nodes[i] for i in order]


def _same_device(args: list[torch.Tensor | None], device: torch.device) -> list[torch.Tensor | None]:
    """Move CPU tensors of more than one element to ``device`` when another argument lives there."""
    if not any(a is not None and a.device.type == device.type for a in args):
        return args
    return [a.to(device) if a is not None and a.device.type == "cpu" and a.numel() > 1 else a for a in args]


class TorchGraph:
    """An ONNX graph evaluated with differentiable torch ops.

    Args:
        model: the ONNX model (a ``ModelProto``, or a path loaded with its external data).
        trainable: initializer names to hold as leaf tensors with ``requires_grad=True``.
        device: where the tensors live and the ops run (``"cpu"``, ``"cuda"``, ``"cuda:1"`` ...).
            Initializers and inputs are moved there; shape arithmetic that ops do on small CPU
            tensors stays on the CPU, and an op that mixes a CPU tensor (more than one element)
            with device tensors gets the CPU one moved to the device.

    Attributes:
        params: the trainable initializers, by name.
        perturbations: the additive perturbation leaves of the last perturbing ``forward``.
        constants: all other initializers, by name.
        nodes: the (inlined, topologically sorted) nodes.
        input_names: graph inputs that are not initializers.
        output_names: graph outputs.
    """

    def __init__(
        self,
        model: onnx.ModelProto | str | os.PathLike[str],
        trainable: Iterable[str] = (),
        device: str | torch.device = "cpu",
    ) -> None:
        self.device = torch.device(device)
        if isinstance(model, (str, os.PathLike)):
            path = Path(model)
            if not path.is_file():
                raise ModelLoadError(f"model file not found: {path}")
            model = onnx.load(str(path))
        unsupported = check_supported(model)
        if unsupported:
            raise UnsupportedOpsError(unsupported)

        self.opsets: dict[str, int] = {}
        for imp in model.opset_import:
            self.opsets[_domain(imp.domain)] = int(imp.version)

        # initializers (from the original model, so inlining never copies weight data)
        trainable = list(trainable)
        init_protos = {t.name: t for t in model.graph.initializer}
        missing = [n for n in trainable if n not in init_protos]
        if missing:
            raise LpError(f"trainable names are not initializers: {', '.join(sorted(missing))}")
        self.params: dict[str, torch.Tensor] = {}
        self.constants: dict[str, torch.Tensor] = {}
        # fp16/bf16 trainable weights are fp32 leaves (analysed in fp32), cast back where read
        self._param_dtypes: dict[str, torch.dtype] = {}
        train_set = set(trainable)
        for name, proto in init_protos.items():
            t = _load_initializer(proto)
            if self.device.type != "cpu":
                t = t.to(self.device)
            if name in train_set:
                if not t.is_floating_point():
                    raise LpError(f"trainable initializer {name!r} is not floating point")
                if t.dtype in (torch.float16, torch.bfloat16):
                    self._param_dtypes[name] = t.dtype
                    t = t.float()
                # tensor_from_proto / .to / .float() made ``t``: it owns its data, no clone needed
                self.params[name] = t.detach().requires_grad_(True)
            else:
                self.constants[name] = t
        for t in model.graph.sparse_initializer:
            self.constants[t.values.name] = _sparse_to_torch(t).to(self.device)

        graph = model.graph
        if model.functions:
            graph = onnx.inliner.inline_local_functions(_light_copy(model)).graph

        # static element types
        types: dict[str, int] = {}
        for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                types[vi.name] = vi.type.tensor_type.elem_type
        for name, proto in init_protos.items():
            types[name] = proto.data_type
        for node in graph.node:
            if node.op_type == "Constant" and _domain(node.domain) == "" and node.output:
                types[node.output[0]] = _constant_type(node)
            elif node.op_type == "Cast" and _domain(node.domain) == "" and node.output:
                for a in node.attribute:
                    if a.name == "to":
                        types[node.output[0]] = int(a.i)
        self._types = types

        init_names = set(self.params) | set(self.constants)
        self.input_names: tuple[str, ...] = tuple(i.name for i in graph.input if i.name not in init_names)
        self._input_types = {i.name: types.get(i.name, 0) for i in graph.input}
        self._optional_inputs = {i.name for i in graph.input if i.name in init_names}
        self.output_names: tuple[str, ...] = tuple(o.name for o in graph.output)

        available = init_names | {i.name for i in graph.input}
        steps: list[_Step] = []
        for node in _toposort(list(graph.node), available):
            dom = _domain(node.domain)
            fn = _ops.lookup(node.op_type, dom)
            if fn is None:  # unreachable after check_supported, kept for inlined bodies
                raise UnsupportedOpsError([_ops.op_key(node.op_type, dom)])
            spec = NodeSpec(
                name=node.name,
                op_type=node.op_type,
                domain=dom,
                inputs=tuple(node.input),
                outputs=tuple(node.output),
            )
            ctx = _ops.OpContext(
                op_type=node.op_type,
                domain=dom,
                opset=self.opsets.get(dom, 1),
                num_outputs=len(node.output),
                name=node.name,
                input_types=tuple(types.get(n, 0) for n in node.input),
                output_types=tuple(types.get(n, 0) for n in node.output),
            )
            attrs = {a.name: _attr_value(a) for a in node.attribute}
            steps.append(_Step(spec, fn, ctx, attrs))
        self._steps = steps
        self.nodes: tuple[NodeSpec, ...] = tuple(s.spec for s in steps)
        produced = {o for s in steps for o in s.spec.outputs if o}
        self._known = produced | init_names | {i.name for i in graph.input}
        #: the additive perturbation leaves of the last ``forward(..., perturb=...)`` call
        self.perturbations: dict[str, torch.Tensor] = {}
        logger.debug("TorchGraph: %d nodes, %d initializers", len(steps), len(init_names))

    # ----------------------------------------------------------------------------------------

    def is_float32_param(self, name: str) -> bool:
        """Whether ``name`` is a trainable initializer stored in float32 (read as its leaf, no cast)."""
        return name in self.params and name not in self._param_dtypes

    def value_names(self) -> frozenset[str]:
        """Every tensor name of the graph (inputs, initializers, node outputs)."""
        return frozenset(self._known)

    def elem_type(self, name: str) -> int:
        """The static ONNX element type of ``name``, or 0 when unknown."""
        return self._types.get(name, 0)

    def __call__(
        self,
        inputs: Mapping[str, np.ndarray | torch.Tensor],
        overrides: Mapping[str, torch.Tensor] | None = None,
        capture: Iterable[str] = (),
        perturb: Mapping[str, torch.Tensor | None] | None = None,
    ) -> dict[str, torch.Tensor]:
        return self.forward(inputs, overrides, capture, perturb)

    def _feed(self, inputs: Mapping[str, np.ndarray | torch.Tensor]) -> dict[str, torch.Tensor]:
        graph_inputs = set(self.input_names) | self._optional_inputs
        extra = sorted(set(inputs) - graph_inputs)
        if extra:
            raise CalibrationError(f"unknown model inputs: {', '.join(extra)}")
        feeds: dict[str, torch.Tensor] = {}
        for name, value in inputs.items():
            t = value if isinstance(value, torch.Tensor) else _ops.numpy_to_torch(np.asarray(value))
            want = self._input_types.get(name, 0)
            if want and want in _ops.ONNX_TO_TORCH and t.dtype != _ops.ONNX_TO_TORCH[want]:
                t = t.to(_ops.ONNX_TO_TORCH[want])
            if self.device.type != "cpu":
                t = t.to(self.device)
            feeds[name] = t
        return feeds

    def forward(
        self,
        inputs: Mapping[str, np.ndarray | torch.Tensor],
        overrides: Mapping[str, torch.Tensor] | None = None,
        capture: Iterable[str] = (),
        perturb: Mapping[str, torch.Tensor | None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Evaluate the graph.

        Args:
            inputs: graph input values by name (numpy arrays or torch tensors; cast to the
                declared element type where it differs).
            overrides: values that replace initializers or intermediate tensors by name. The
                producer of an overridden intermediate is skipped when nothing else needs it, so
                gradients flow to a leaf override (and not upstream of it).
            capture: intermediate tensor names to return besides the graph outputs.
            perturb: additive perturbations by tensor name: the tensor's value becomes
                ``value + delta`` for every consumer (and in the result). ``None`` makes a zero
                leaf with ``requires_grad=True``, so ``d/d(delta)`` is the gradient w.r.t. the
                activation while gradients still flow upstream to the parameters. The deltas
                used are left in ``self.perturbations`` (replaced on every call that perturbs).

        Returns:
            The graph outputs and the captured tensors, by name.
        """
        overrides = dict(overrides or {})
        capture = list(capture)
        perturb = dict(perturb or {})
        unknown = sorted(n for n in {*overrides, *capture, *perturb} if n not in self._known)
        if unknown:
            raise LpError(f"unknown tensor names: {', '.join(unknown)}")
        feeds = self._feed(inputs)
        wanted = list(dict.fromkeys([*self.output_names, *capture]))

        # prune: run only the nodes the wanted (and perturbed) values depend on, stopping at overrides
        need: set[str] = set(wanted) | set(perturb)
        plan: list[_Step] = []
        for step in reversed(self._steps):
            if any(o in need and o not in overrides for o in step.spec.outputs if o):
                plan.append(step)
                need.update(n for n in step.spec.inputs if n)
        plan.reverse()

        missing = sorted(n for n in self.input_names if n in need and n not in feeds and n not in overrides)
        if missing:
            raise CalibrationError(f"missing model inputs: {', '.join(missing)}")

        refs: dict[str, int] = {}
        for step in plan:
            for n in step.spec.inputs:
                if n:
                    refs[n] = refs.get(n, 0) + 1
        pinned = set(wanted) | set(perturb)
        env: dict[str, torch.Tensor] = {}
        if perturb:
            self.perturbations = {}

        def add_delta(name: str, value: torch.Tensor) -> torch.Tensor:
            delta = perturb[name]
            if delta is None:
                if not value.is_floating_point():
                    raise LpError(f"cannot perturb non-float tensor {name!r} ({value.dtype})")
                delta = torch.zeros_like(value.detach()).requires_grad_(True)
            self.perturbations[name] = delta
            return value + delta

        # perturbed values that no planned node produces (inputs, initializers, overrides)
        produced = {o for step in plan for o in step.spec.outputs if o and o not in overrides}
        for name in perturb:
            if name not in produced:
                base = overrides.get(name)
                if base is None:
                    base = feeds.get(name)
                if base is None:
                    base = self.params.get(name, self.constants.get(name))
                if base is None:
                    raise LpError(f"tensor {name!r} has no value to perturb")
                env[name] = add_delta(name, base)

        def get(name: str) -> torch.Tensor | None:
            if not name:
                return None
            if name in env:
                return env[name]
            if name in overrides:
                return overrides[name]
            if name in feeds:
                return feeds[name]
            if name in self.params:
                dt = self._param_dtypes.get(name)
                return self.params[name] if dt is None else self.params[name].to(dt)
            return self.constants[name]

        for step in plan:
            args = [get(n) for n in step.spec.inputs]
            if self.device.type != "cpu":
                args = _same_device(args, self.device)
            try:
                outs = step.fn(step.ctx, args, step.attrs)
            except LpError:
                raise
            except Exception as e:  # report which node failed
                raise _ops.OpEvalError(
                    f"{step.spec.op_type} node {step.spec.name!r} failed: {type(e).__name__}: {e}"
                ) from e
            for i, name in enumerate(step.spec.outputs):
                if not name or name in overrides or (name not in pinned and refs.get(name, 0) == 0):
                    continue
                if i >= len(outs):
                    raise _ops.OpEvalError(
                        f"{step.spec.op_type} node {step.spec.name!r}: output {i} is not implemented"
                    )
                env[name] = add_delta(name, outs[i]) if name in perturb else outs[i]
            for n in step.spec.inputs:
                if n and n in refs:
                    refs[n] -= 1
                    if refs[n] == 0 and n not in pinned:
                        env.pop(n, None)

        result: dict[str, torch.Tensor] = {}
        for name in wanted:
            value = get(name)
            if value is None:
                raise LpError(f"tensor {name!r} was not computed")
            result[name] = value
        return result
