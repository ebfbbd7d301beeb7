"""Hutchinson analysis on an ``nn.Module``: the module adapter of the one sensitivity driver.

The Gauss–Newton diagonal is estimated by exact autograd on the module itself (backward through
its own forward; no ONNX interpretation), with ``torch.func.functional_call`` swapping each
quantizable weight for a leaf tensor and hooks adding zero perturbation leaves where the activation
formats round. Everything else is :func:`lpcompile.analysis.sensitivity.run_analysis`, shared with
the ONNX path: the same calibration batches (padding trimmed the same way), loss, probe count and
spreading, the same estimator fed from one generator seeded with ``config.seed`` in the same order,
with weight leaves held in the ONNX orientation (the module sees their transpose where the export
folded one), and the same prediction formulas. For a given seed both adapters draw the *same
probes* and so estimate the same diagonal up to float rounding, not just up to Hutchinson noise.

Activations are perturbed as the ONNX path perturbs them (for all their uses): at the inputs of
the quantizable ``Linear``/``Conv`` modules when only they consume the tensor, else at the output
of the module that produces it, when that module runs once and hands its output object to the
consumers; failing that, at the quantizable consumers only (logged; the rewrite rounds exactly
that input). ``scaled_dot_product_attention`` runs with the math backend (the fused CPU kernels
do not support double backward). When a weight cannot be traced back to a parameter (an exporter
rewrite) or an activation to a module call, :class:`ModuleAnalysisUnsupported` is raised and the
caller analyses the ONNX export instead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from lpcompile.analysis.config import AnalysisConfig, candidate_formats
from lpcompile.analysis.sensitivity import ProbeForward, activation_elements, run_analysis
from lpcompile.analysis.table import SensitivityTable
from lpcompile.errors import LpError
from lpcompile.frontend.calib import CalibrationSet
from lpcompile.frontend.torch_export import ExportedModule, ParamRef, flatten_inputs, rebuild_inputs
from lpcompile.graph import find_weight_nodes

logger = logging.getLogger(__name__)

__all__ = ["ModuleAdapter", "ModuleAnalysisUnsupported", "analyze_module"]

_ACT_MODULES = ("Linear", "Conv1d", "Conv2d", "Conv3d")


class ModuleAnalysisUnsupported(LpError):
    """The module-level analysis cannot mirror this export (callers fall back to the ONNX path)."""


class ModuleAdapter:
    """The forward of an ``nn.Module`` with ONNX-named weight and activation leaves."""

    def __init__(
        self,
        module: torch.nn.Module,
        exported: ExportedModule,
        example_inputs: Any,
        weights: Sequence[str],
        act_tensors: Sequence[str],
    ) -> None:
        model = exported.model
        nodes = find_weight_nodes(model)
        self.module = module
        self.exported = exported
        self.weights = list(weights)
        self.act_tensors = list(act_tensors)
        self.refs = _weight_refs(self.weights, exported.params)
        _, _, self.example_leaves, self.tensor_pos, self.spec = flatten_inputs(module, example_inputs)
        self.example_dtypes = [self.example_leaves[i].dtype for i in self.tensor_pos]
        paths = exported.module_paths
        self.hooks = _ActivationHooks(module, model, nodes, paths, self.act_tensors) if self.act_tensors else None
        self.base = {w: _param(module, r).detach() for w, r in self.refs.items()}
        _check_values(model, self.base, self.refs)

    def close(self) -> None:
        if self.hooks is not None:
            self.hooks.remove()

    def _forward(self, batch: Mapping[str, np.ndarray], leaves: Mapping[str, Any]) -> dict[str, Any]:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.utils import _pytree as pytree

        tensors = [
            torch.from_numpy(np.ascontiguousarray(batch[name])).to(dt)
            for name, dt in zip(self.exported.input_names, self.example_dtypes, strict=True)
        ]
        args, kwargs = rebuild_inputs(self.example_leaves, self.tensor_pos, self.spec, tensors)
        swap = {self.refs[w].fqn: leaf.T if self.refs[w].transposed else leaf for w, leaf in leaves.items()}
        with sdpa_kernel(SDPBackend.MATH):
            out = torch.func.functional_call(self.module, swap, args, kwargs, tie_weights=False, strict=False)
        flat = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        if len(flat) != len(self.exported.output_names):
            raise ModuleAnalysisUnsupported(
                f"the module returned {len(flat)} tensor(s), the export has {len(self.exported.output_names)} outputs"
            )
        return dict(zip(self.exported.output_names, flat, strict=True))

    def prepare(self, batch: Mapping[str, np.ndarray]) -> None:
        """One observing pass deciding where each activation can be perturbed."""
        if self.hooks is None:
            return
        with torch.no_grad():
            self.hooks.reset(observing=True)
            self._forward(batch, {})
            self.hooks.decide()

    def reference(self, batch: Mapping[str, np.ndarray]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        with torch.no_grad():
            if self.hooks is not None:
                self.hooks.reset()
            out = self._forward(batch, {})
            if self.hooks is not None:
                self.hooks.check()
        captured = dict(self.hooks.captured) if self.hooks is not None else {}
        return {k: v.detach() for k, v in out.items()}, captured

    def probe(self, batch: Mapping[str, np.ndarray]) -> ProbeForward:
        if self.hooks is not None:
            self.hooks.reset(perturb=True)
        wleaves = {
            w: (self.base[w].T if self.refs[w].transposed else self.base[w]).clone().requires_grad_(True)
            for w in self.weights
        }
        out = self._forward(batch, wleaves)
        act_leaves: dict[str, torch.Tensor] = {}
        captured: dict[str, torch.Tensor] = {}
        if self.hooks is not None:
            self.hooks.check()
            act_leaves = {t: self.hooks.leaves[t] for t in self.act_tensors}
            captured = dict(self.hooks.captured)
        return ProbeForward(outputs=out, weight_leaves=wleaves, activation_leaves=act_leaves, captured=captured)


def analyze_module(
    module: torch.nn.Module,
    exported: ExportedModule,
    calib: CalibrationSet,
    config: AnalysisConfig,
    example_inputs: Any,
    progress: Callable[[int, int], None] | None = None,
) -> SensitivityTable:
    """Hutchinson analysis by autograd on ``module`` (see the module docstring).

    Raises:
        ModuleAnalysisUnsupported: a weight or activation of the export cannot be traced back to the
            module (callers analyse the ONNX export instead).
    """
    t0 = time.perf_counter()
    model = exported.model
    nodes = find_weight_nodes(model)
    fmts = candidate_formats(config)
    weights = sorted({n.weight for n in nodes})
    act_tensors = sorted({n.activation for n in nodes}) if config.activations and activation_elements(fmts) else []
    was_training = module.training
    module.eval()
    adapter = ModuleAdapter(module, exported, example_inputs, weights, act_tensors)
    try:
        return run_analysis(
            adapter, model, nodes, calib, config, progress, exported.module_paths, t0, prepare=adapter.prepare
        )
    finally:
        adapter.close()
        module.train(was_training)


def _check_values(model: ir.Model, base: Mapping[str, Any], refs: Mapping[str, ParamRef]) -> None:
    """The module's parameters must still hold the exported weights (same module, not retrained)."""
    from lpcompile.graph import weight_array

    for w, ref in refs.items():
        value = base[w].T if ref.transposed else base[w]
        if not np.array_equal(value.float().cpu().numpy(), weight_array(model, w)):
            raise ModuleAnalysisUnsupported(f"parameter {ref.fqn} does not match the exported weight {w!r}")


def _weight_refs(weights: Sequence[str], params: Mapping[str, ParamRef]) -> dict[str, ParamRef]:
    missing = [w for w in weights if w not in params]
    if missing:
        raise ModuleAnalysisUnsupported(
            f"{len(missing)} weight(s) of the export match no parameter of the module (e.g. {missing[0]!r})"
        )
    refs = {w: params[w] for w in weights}
    by_fqn: dict[str, str] = {}
    for w, r in refs.items():
        if r.fqn in by_fqn:
            raise ModuleAnalysisUnsupported(f"weights {by_fqn[r.fqn]!r} and {w!r} of the export are one parameter")
        by_fqn[r.fqn] = w
    return refs


def _param(module: Any, ref: ParamRef) -> Any:
    owner = module.get_submodule(ref.module_path) if ref.module_path else module
    return getattr(owner, ref.attr)


class _ActivationHooks:
    """Zero perturbation leaves (and captures) for the activation inputs of the weighted nodes.

    The ONNX path perturbs an activation tensor for *all* its consumers. Here a tensor whose ONNX
    consumers are all weighted nodes gets one shared leaf added at the inputs of their modules
    (forward pre-hooks; "consumer" mode). A tensor that also feeds other ops is perturbed at the
    output of the module that produces it ("producer" mode: a forward hook), when an observing pass
    shows that module runs once and its output object is exactly what the consumers receive;
    otherwise it falls back to consumer mode (the rewrite rounds only the weighted consumers'
    input, which that mode measures) and is logged.
    """

    def __init__(
        self,
        module: Any,
        model: ir.Model,
        nodes: Sequence[Any],
        module_paths: Mapping[str, str],
        act_tensors: Sequence[str],
    ) -> None:
        from lpcompile.frontend.torch_export import node_module_path

        self.act_tensors = list(act_tensors)
        self.consumer_calls: dict[str, list[str]] = {}
        for n in nodes:
            path = module_paths.get(n.name)
            sub = _submodule(module, path)
            if path is None or sub is None:
                raise ModuleAnalysisUnsupported(f"node {n.name!r} has no module for its activation hook")
            if type(sub).__name__ not in _ACT_MODULES:
                raise ModuleAnalysisUnsupported(
                    f"node {n.name!r} sits in a {type(sub).__name__} ({path}); activation hooks need Linear/Conv"
                )
            self.consumer_calls.setdefault(path, []).append(n.activation)
        weighted = {n.name for n in nodes}
        values = {v.name: v for node in model.graph for v in node.outputs if v.name}
        self.producer_of: dict[str, str] = {}
        for t in self.act_tensors:
            value = values.get(t)
            if value is None or all(use.node.name in weighted for use in value.uses()):
                continue
            path = node_module_path(value.producer()) if value.producer() is not None else None
            if path and _submodule(module, path) is not None and path not in self.producer_of.values():
                self.producer_of[t] = path
        self.mode = dict.fromkeys(self.act_tensors, "consumer")
        self.perturb = False
        self.observing = False
        self.calls: dict[str, int] = {}
        self.produced_calls: dict[str, int] = {}
        self.produced: dict[str, Any] = {}
        self.identity: dict[str, bool] = {}
        self.captured: dict[str, Any] = {}
        self.leaves: dict[str, Any] = {}
        self.handles: list[Any] = []
        for path, names in self.consumer_calls.items():
            self.handles.append(module.get_submodule(path).register_forward_pre_hook(self._consumer_hook(path, names)))
        for t, path in self.producer_of.items():
            self.handles.append(module.get_submodule(path).register_forward_hook(self._producer_hook(t)))

    def reset(self, *, perturb: bool = False, observing: bool = False) -> None:
        self.perturb, self.observing = perturb, observing
        self.calls, self.produced_calls, self.produced, self.captured, self.leaves = {}, {}, {}, {}, {}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def decide(self) -> None:
        """After an observing pass: producer mode where it reproduces the ONNX perturbation."""
        for t, path in self.producer_of.items():
            if self.produced_calls.get(t) == 1 and self.identity.get(t, False):
                self.mode[t] = "producer"
            else:
                logger.info(
                    "activation %s: perturbed at its weighted consumers only (the ONNX path also perturbs "
                    "its other uses; %s is not a single-output producer)",
                    t,
                    path,
                )
        self.observing = False

    def check(self) -> None:
        for path, names in self.consumer_calls.items():
            if self.calls.get(path, 0) != len(names):
                raise ModuleAnalysisUnsupported(
                    f"module {path!r} ran {self.calls.get(path, 0)} time(s), the export shows {len(names)}"
                )
        for t in self.act_tensors:
            if self.mode[t] == "producer" and self.produced_calls.get(t) != 1:
                raise ModuleAnalysisUnsupported(f"the producer of activation {t!r} ran more than once")
            if t not in self.captured:
                raise ModuleAnalysisUnsupported(f"activation {t!r} was not reached by a hook")
            if self.perturb and t not in self.leaves:
                raise ModuleAnalysisUnsupported(f"activation {t!r} was not perturbed")

    def _leaf(self, t: str, x: Any) -> Any:
        leaf = self.leaves.get(t)
        if leaf is None:
            leaf = torch.zeros_like(x, requires_grad=True)
            self.leaves[t] = leaf
        elif leaf.shape != x.shape:
            raise ModuleAnalysisUnsupported(f"activation {t!r} reaches modules with different shapes")
        return leaf

    def _consumer_hook(self, path: str, names: Sequence[str]) -> Callable[..., Any]:
        def hook(_mod: Any, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            i = self.calls.get(path, 0)
            self.calls[path] = i + 1
            if i >= len(names) or not args or not isinstance(args[0], torch.Tensor):
                return None  # reported by check()
            t, x = names[i], args[0]
            if t in self.producer_of and (self.observing or self.mode[t] == "producer"):
                same = x is self.produced.get(t)
                self.identity[t] = self.identity.get(t, True) and same
                if self.mode[t] == "producer" and not same:
                    raise ModuleAnalysisUnsupported(f"activation {t!r} reached {path} through another tensor")
                if self.mode[t] == "producer":
                    return None
            self.captured.setdefault(t, x.detach())
            if not self.perturb:
                return None
            return (x + self._leaf(t, x), *args[1:])

        return hook

    def _producer_hook(self, t: str) -> Callable[..., Any]:
        def hook(_mod: Any, _args: tuple[Any, ...], out: Any) -> Any:
            if not (self.observing or self.mode[t] == "producer"):
                return None
            self.produced_calls[t] = self.produced_calls.get(t, 0) + 1
            if not isinstance(out, torch.Tensor):
                self.identity[t] = False
                return None
            if self.mode[t] == "producer":
                self.captured.setdefault(t, out.detach())
            if self.perturb and self.mode[t] == "producer":
                out = out + self._leaf(t, out)
            self.produced[t] = out
            return out

        return hook


def _submodule(module: Any, path: str | None) -> Any | None:
    if path is None:
        return None
    try:
        return module.get_submodule(path) if path else module
    except AttributeError:
        return None
