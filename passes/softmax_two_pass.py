"""Replace ``Softmax`` nodes by the two-pass softmax function op ``lpcompile.TwoPassSoftmax``.

The node keeps its name, inputs, outputs and axis (written explicitly); its ``metadata_props``
get ``lpcompile.softmax = "two-pass"``. The function (:func:`lpcompile.twopass.function_proto`,
body in the model's default-domain opset) is added to ``model.functions`` and ``lpcompile: 1`` to
the opset imports, once. See :mod:`lpcompile.twopass` for the semantics (fully masked rows give
zeros instead of NaN).

Modes:
    ``"two-pass"``: every Softmax. ``"keep"``: none. ``"auto"``: a Softmax whose own name is in
    ``low_precision_nodes`` (names of nodes assigned a sub-fp32 format), or whose input is
    produced by, or whose output is consumed by, such a node — where the surrounding arithmetic
    is fp16/bf16/fp8 and the two-pass form pays. With a ``target``, ``"auto"`` substitutes only
    where the target runs the two-pass form faster (:func:`lpcompile.passes.targets.softmax_pays`:
    TVM; never ONNX Runtime CPU, whose fused Softmax beats the function body).

Softmax nodes in the main graph and in subgraphs (If/Loop/Scan bodies) are visited; those inside
model-local functions are not. Models whose default-domain opset is below 15 are left alone
(the function body needs ``CastLike``), with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Literal, get_args

import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult
from onnx_ir.traversal import RecursiveGraphIterator

from lpcompile.errors import UsageError
from lpcompile.passes.targets import softmax_pays
from lpcompile.twopass import DOMAIN, DOMAIN_VERSION, FUNCTION_NAME, MIN_OPSET, function_proto

logger = logging.getLogger(__name__)

Mode = Literal["auto", "two-pass", "keep"]
METADATA_KEY = "lpcompile.softmax"
METADATA_VALUE = "two-pass"


def _default_opset(model: ir.Model) -> int | None:
    imports = model.opset_imports
    if "" in imports:
        return imports[""]
    return imports.get("ai.onnx")


def _touches_low_precision(node: ir.Node, low_precision_nodes: frozenset[str]) -> bool:
    if node.name in low_precision_nodes:
        return True
    x = node.inputs[0] if node.inputs else None
    producer = x.producer() if x is not None else None
    if producer is not None and producer.name in low_precision_nodes:
        return True
    return any(consumer.name in low_precision_nodes for out in node.outputs for consumer in out.consumers())


def _resolved_axis(node: ir.Node, version: int) -> int | None:
    """The opset-13 axis equivalent to the node's axis, or None when there is none."""
    if version >= 13:
        return node.attributes.get_int("axis", -1)
    # opset < 13: the input is coerced to 2-D [d0*..*d(axis-1), d(axis)*..*d(r-1)] and the softmax
    # runs over the flattened tail, which is a softmax along one axis only when axis is the last one
    axis = node.attributes.get_int("axis", 1)
    x = node.inputs[0] if node.inputs else None
    rank = len(x.shape) if x is not None and x.shape is not None else None
    if rank is not None and axis + (rank if axis < 0 else 0) == rank - 1:
        return -1
    logger.warning(
        "Softmax %r (opset %d, axis=%d, rank %s) flattens the trailing dims: left as is",
        node.name,
        version,
        axis,
        rank,
    )
    return None


class TwoPassSoftmaxPass(InPlacePass):
    """Substitute ``Softmax`` by ``lpcompile.TwoPassSoftmax`` (see the module docstring).

    After a call, ``substituted`` lists the names of the nodes replaced by that call (an unnamed
    node appears as ``<unnamed: OUTPUT>``).
    """

    def __init__(
        self, mode: Mode = "auto", low_precision_nodes: Iterable[str] = frozenset(), target: str | None = None
    ) -> None:
        super().__init__()
        if mode not in get_args(Mode):
            raise UsageError(f"unknown softmax mode {mode!r}; expected one of {', '.join(get_args(Mode))}")
        self.mode: Mode = mode
        self.low_precision_nodes: frozenset[str] = frozenset(low_precision_nodes)
        self.auto_pays = True if target is None else softmax_pays(target)
        self.substituted: list[str] = []

    def _selected(self, node: ir.Node) -> bool:
        if self.mode == "two-pass":
            return True
        return self.mode == "auto" and self.auto_pays and _touches_low_precision(node, self.low_precision_nodes)

    def call(self, model: ir.Model) -> PassResult:
        self.substituted = []
        if self.mode == "keep":
            return PassResult(model, modified=False)
        opset = _default_opset(model)
        softmaxes = [n for n in RecursiveGraphIterator(model.graph) if n.op_type == "Softmax" and n.domain == ""]
        chosen = [n for n in softmaxes if self._selected(n)]
        if not chosen:
            return PassResult(model, modified=False)
        if opset is None or opset < MIN_OPSET:
            logger.warning(
                "default-domain opset %s < %d: %d Softmax node(s) left as is (two-pass softmax needs CastLike)",
                opset,
                MIN_OPSET,
                len(chosen),
            )
            return PassResult(model, modified=False)
        for node in chosen:
            axis = _resolved_axis(node, node.version or opset)
            if axis is None:
                continue
            node.domain = DOMAIN
            node.op_type = FUNCTION_NAME
            node.version = None
            node.attributes["axis"] = ir.AttrInt64("axis", axis)
            node.metadata_props[METADATA_KEY] = METADATA_VALUE
            self.substituted.append(node.name or f"<unnamed: {node.outputs[0].name}>")
        modified = bool(self.substituted)
        if modified:
            _ensure_function(model, opset)
        logger.info("two-pass softmax: %d of %d Softmax node(s) substituted", len(self.substituted), len(softmaxes))
        return PassResult(model, modified=modified)


def _ensure_function(model: ir.Model, opset: int) -> bool:
    """Add the function (body at ``opset``) and the domain import if missing or stale."""
    changed = False
    key = (DOMAIN, FUNCTION_NAME, "")
    existing = model.functions.get(key)
    if existing is None or existing.opset_imports.get("") != opset:
        model.functions[key] = ir.serde.deserialize_function(function_proto(opset))
        changed = True
    if model.opset_imports.get(DOMAIN) != DOMAIN_VERSION:
        model.opset_imports[DOMAIN] = DOMAIN_VERSION
        changed = True
    return changed


def substitute_two_pass_softmax(
    model: ir.Model, mode: Mode = "auto", low_precision_nodes: Iterable[str] = frozenset(), target: str | None = None
) -> list[str]:
    """Run :class:`TwoPassSoftmaxPass` on ``model`` in place; return the substituted node names."""
    p = TwoPassSoftmaxPass(mode, low_precision_nodes, target)
    p(model)
    return p.substituted


__all__ = ["METADATA_KEY", "METADATA_VALUE", "Mode", "TwoPassSoftmaxPass", "substitute_two_pass_softmax"]
