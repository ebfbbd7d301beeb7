"""Write the precision map into the model (node and model ``metadata_props``, doc strings).

Per planned node (``metadata_props``; numbers with 6 significant digits, ``f"{x:.6g}"``):

* ``lpcompile.format`` – the format name; ``lpcompile.bits`` – the plan's bits (exact repr);
  ``lpcompile.params`` – parameter count;
* ``lpcompile.predicted_loss`` – when the plan knows it;
* ``lpcompile.module_path`` – the PyTorch module, when known;
* ``doc_string``: a first line ``lpcompile: int4_b128 (4.125 bits): predicted loss 0.00012``
  (any doc string the node had is kept below it).

The evidence behind a choice (other candidates, Hessian traces) stays in the sensitivity table
and the report; the model carries the precision map only.

Nodes inserted by the other passes (Q/DQ/Cast, recognised by their ``lpcompile.serves`` key)
get ``lpcompile.serves`` recomputed from the graph: the sorted, comma-separated names of the
planned nodes they feed (through other inserted nodes); ``lpcompile.format`` of what they serve;
``lpcompile.role`` (``weight_dq``, ``act_q``, ``to_bf16``, ...: the last part of their name); a
one-line doc string; and the served node's ``namespace`` / ``pkg.torch.onnx.name_scopes`` so
graph viewers group them with the module they belong to.

Model ``metadata_props``: ``lpcompile.version``, ``lpcompile.budget`` (only when the plan has
one), ``lpcompile.achieved_bits``, ``lpcompile.precision_map`` (compact JSON ``{node: format}``),
``lpcompile.softmax`` (the plan's softmax mode) and ``lpcompile.format_mix`` (JSON ``{format: params}``).
"""

from __future__ import annotations

import json
import logging

import onnx_ir as ir

import lpcompile
from lpcompile.passes._common import SERVES_KEY, nodes_by_name
from lpcompile.plan import NodeAssignment, PrecisionPlan, validate_against

logger = logging.getLogger(__name__)

DOC_PREFIX = "lpcompile: "
NODE_KEYS = (
    "lpcompile.format",
    "lpcompile.bits",
    "lpcompile.params",
    "lpcompile.predicted_loss",
    "lpcompile.module_path",
    # keys written by earlier versions: removed when a node is annotated again
    "lpcompile.runner_up",
    "lpcompile.runner_up_loss",
    "lpcompile.trace",
)
# node metadata the exporters use for grouping; copied onto inserted nodes
GROUPING_KEYS = ("namespace", "pkg.torch.onnx.name_scopes", "pkg.torch.onnx.class_hierarchy")


def fmt_number(x: float) -> str:
    """How numbers are written into metadata (6 significant digits)."""
    return f"{float(x):.6g}"


def node_metadata(a: NodeAssignment) -> dict[str, str]:
    """The ``metadata_props`` a planned node gets."""
    out = {
        "lpcompile.format": a.format,
        "lpcompile.bits": repr(float(a.bits)),  # exact: equals the plan's JSON value
        "lpcompile.params": str(int(a.params)),
    }
    if a.predicted_loss is not None:
        out["lpcompile.predicted_loss"] = fmt_number(a.predicted_loss)
    if a.module_path:
        out["lpcompile.module_path"] = a.module_path
    return out


def node_doc(a: NodeAssignment) -> str:
    """One line such as ``int4_b128 (4.125 bits): predicted loss 0.00012``."""
    text = f"{a.format} ({a.bits:.6g} bits)"
    if a.predicted_loss is not None:
        text += f": predicted loss {a.predicted_loss:.2g}"
    return text


def model_metadata(plan: PrecisionPlan) -> dict[str, str]:
    """The model-level ``metadata_props``."""
    mix: dict[str, int] = {}
    for n in plan.nodes:
        mix[n.format] = mix.get(n.format, 0) + int(n.params)
    out = {
        "lpcompile.version": lpcompile.__version__,
        "lpcompile.achieved_bits": fmt_number(plan.achieved_bits),
        "lpcompile.precision_map": json.dumps({n.name: n.format for n in plan.nodes}, separators=(",", ":")),
        "lpcompile.softmax": plan.softmax,
        "lpcompile.format_mix": json.dumps(mix, separators=(",", ":")),
    }
    if plan.budget is not None:
        out["lpcompile.budget"] = str(plan.budget)
    return out


class AnnotatePass(ir.passes.InPlacePass):
    """Attach the plan to the nodes and the model (see the module docstring)."""

    def __init__(self, plan: PrecisionPlan) -> None:
        super().__init__()
        self.plan = plan

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        by_name = nodes_by_name(graph)
        validate_against(self.plan, list(by_name))
        modified = False
        for a in self.plan.nodes:
            node = by_name[a.name]
            modified |= _set_props(node.metadata_props, node_metadata(a), clear=NODE_KEYS)
            doc = _merge_doc(node.doc_string, node_doc(a))
            if doc != (node.doc_string or ""):
                node.doc_string = doc
                modified = True
        modified |= _update_serves(graph, {a.name: a for a in self.plan.nodes}, by_name)
        stale = ("lpcompile.budget", "lpcompile.plan")  # no budget now; the verbatim plan of older versions
        modified |= _set_props(model.metadata_props, model_metadata(self.plan), clear=stale)
        return ir.passes.PassResult(model, modified)


def _set_props(props: dict[str, str], new: dict[str, str], clear: tuple[str, ...] = ()) -> bool:
    changed = False
    for key in clear:
        if key in props and key not in new:
            del props[key]
            changed = True
    for key, value in new.items():
        if props.get(key) != value:
            props[key] = value
            changed = True
    return changed


def _strip_doc(existing: str | None) -> str:
    """``existing`` without lpcompile's own doc line."""
    return "\n".join(ln for ln in (existing or "").splitlines() if not ln.startswith(DOC_PREFIX))


def _merge_doc(existing: str | None, line: str) -> str:
    kept = [ln for ln in (existing or "").splitlines() if not ln.startswith(DOC_PREFIX)]
    return "\n".join([DOC_PREFIX + line, *kept])


def _update_serves(graph: ir.Graph, planned: dict[str, NodeAssignment], by_name: dict[str, ir.Node]) -> bool:
    """Recompute ``lpcompile.serves`` (and the derived keys) of inserted nodes from the planned nodes they feed."""
    inserted = [n for n in graph if SERVES_KEY in n.metadata_props]
    served: dict[int, set[str]] = {id(n): set() for n in inserted}
    memo: dict[int, set[str]] = {}

    def feeds(node: ir.Node) -> set[str]:
        if id(node) in memo:
            return memo[id(node)]
        memo[id(node)] = set()  # cycle guard
        out: set[str] = set()
        for value in node.outputs:
            for use in value.uses():
                consumer = use.node
                if consumer.name in planned and SERVES_KEY not in consumer.metadata_props:
                    out.add(consumer.name)
                elif SERVES_KEY in consumer.metadata_props:
                    out |= feeds(consumer)
        memo[id(node)] = out
        return out

    def direct(node: ir.Node) -> bool:
        """The node hands its output to a planned node itself (the last node of a decode chain)."""
        return any(
            use.node.name in planned and SERVES_KEY not in use.node.metadata_props
            for value in node.outputs
            for use in value.uses()
        )

    changed = False
    for node in inserted:
        served[id(node)] = feeds(node)
        names = sorted(served[id(node)])
        props = {SERVES_KEY: ",".join(names)}
        clear: tuple[str, ...] = ()
        if names:
            fmts = sorted({planned[n].format for n in names})
            role = (node.name or node.op_type).rsplit("/", 1)[-1]
            props["lpcompile.format"] = ",".join(fmts)
            props["lpcompile.role"] = role
            if direct(node):
                # The grouping keys (exporter name scopes: long strings) and the doc line go on the node
                # that feeds the planned node; the rest of a decode chain (up to ~10 nodes in the
                # decode-once form) carries only the short keys, so metadata does not grow the file.
                first = by_name[names[0]]
                props.update({k: first.metadata_props[k] for k in GROUPING_KEYS if k in first.metadata_props})
                doc = _merge_doc(
                    node.doc_string, f"{role} ({node.op_type}) inserted for {', '.join(names)} [{', '.join(fmts)}]"
                )
            else:
                clear = GROUPING_KEYS
                doc = _strip_doc(node.doc_string)
            if doc != (node.doc_string or ""):
                node.doc_string = doc
                changed = True
        changed |= _set_props(node.metadata_props, props, clear=clear)
    return changed
