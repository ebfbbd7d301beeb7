"""Output-distortion losses, identical in torch (for Hessians) and numpy (for measurements).

With no labels the loss of a perturbed model is the distortion of its own outputs against the
fp32 outputs: KL(p_fp32 ‖ p) for class scores, and the normalised MSE
``mean((y − y0)²) / mean(y0²)`` otherwise, summed over outputs. Both are zero with zero gradient
at the fp32 point, so their Hessian there is the Gauss–Newton matrix and ½·δᵀHδ predicts the
loss of a weight perturbation δ. (torch is imported by the torch functions only, so evaluation
and the quality guard can choose outputs without loading it.)

**Which outputs, which loss** (:func:`choose_outputs`, logged and recorded as a :class:`LossSpec`):

* the outputs given (``--outputs NAME[,NAME]``), else every floating-point graph output that
  depends on a weight — integer outputs (ids, counts, argmax) and weight-free outputs (a mask
  passed through) have no gradient and are left out;
* the kind of each output follows the one rule of :func:`lpcompile.metrics.output_kind`:
  ``classifier`` and ``sequence`` outputs (rank-3 LM logits, per-step softmax) get KL over the
  last axis averaged over positions, other outputs the normalised MSE (``--loss kl|mse`` forces
  one for all);
* when the model has an attention-mask input (a rank-2 integer/bool input named ``*mask*``), the
  positions it marks as padding are left out of every output whose leading dims it covers
  (``[B, T, ...]``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import onnx
import onnx_ir as ir

from lpcompile.errors import LpError, UsageError
from lpcompile.metrics import kl_divergence, masked_mean, output_kind, position_mask

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

LossKind = Literal["auto", "kl", "mse"]


def _loss_of_kind(kind: str) -> str:
    return "kl" if kind in ("classifier", "sequence") else "mse"


def output_loss_kinds(
    names: Sequence[str], shapes: Sequence[tuple[int, ...]], kind: LossKind, *, vocab: int | None = None
) -> dict[str, str]:
    """Choose ``kl`` or ``mse`` per output from names and shapes alone (``auto``: see the module docstring)."""
    out: dict[str, str] = {}
    for name, shape in zip(names, shapes, strict=True):
        out[name] = kind if kind != "auto" else _loss_of_kind(output_kind(name, shape, vocab=vocab))
    return out


# --------------------------------------------------------------------------------------------
# which outputs


@dataclass(frozen=True)
class OutputLoss:
    """The loss term of one output.

    Attributes:
        name: the graph output.
        loss: ``kl`` or ``mse``.
        kind: :func:`lpcompile.metrics.output_kind` of the output.
        mask: the attention-mask input that masks its padded positions, or None.
    """

    name: str
    loss: str
    kind: str
    mask: str | None = None

    def describe(self) -> str:
        what = {
            "classifier": "KL (class scores)",
            "sequence": "KL over positions (per-position class scores)",
        }.get(self.kind, "normalised MSE")
        if self.loss == "mse" and self.kind in ("classifier", "sequence"):
            what = "normalised MSE (forced)"
        elif self.loss == "kl" and self.kind not in ("classifier", "sequence"):
            what = "KL (forced)"
        return f"{self.name}: {what}" + (f", padding masked by {self.mask}" if self.mask else "")


@dataclass(frozen=True)
class LossSpec:
    """The outputs the distortion loss is defined on, and how.

    Attributes:
        outputs: one term per measured output, in graph order.
        skipped: ``(output, reason)`` for each graph output left out.
        requested: True when the outputs were given (``--outputs``).
    """

    outputs: tuple[OutputLoss, ...]
    skipped: tuple[tuple[str, str], ...] = ()
    requested: bool = False

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.outputs)

    def kinds(self) -> dict[str, str]:
        """``{output: "kl" | "mse"}`` (the form the distortion functions take)."""
        return {o.name: o.loss for o in self.outputs}

    @property
    def summary(self) -> str:
        """``kl``, ``mse`` or ``kl+mse`` (the table's ``loss`` field)."""
        return "+".join(sorted({o.loss for o in self.outputs}))

    def describe(self) -> str:
        """One line: every term, and what was left out."""
        text = "; ".join(o.describe() for o in self.outputs)
        if self.skipped:
            text += " (left out: " + ", ".join(f"{n} [{why}]" for n, why in self.skipped) + ")"
        return text

    def masks(self, batch: Mapping[str, Any], shapes: Mapping[str, Sequence[int]]) -> dict[str, np.ndarray | None]:
        """Per output, the 0/1 padding mask of this batch covering its positions (None: no mask)."""
        out: dict[str, np.ndarray | None] = {}
        for o in self.outputs:
            m = batch.get(o.mask) if o.mask else None
            if m is None:
                out[o.name] = None
                continue
            arr = np.asarray(m.detach().cpu().numpy() if hasattr(m, "detach") else m)
            shape = tuple(shapes[o.name])
            out[o.name] = position_mask(arr, shape, last_axis_is_classes=o.loss == "kl")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "outputs": [{"name": o.name, "loss": o.loss, "kind": o.kind, "mask": o.mask} for o in self.outputs],
            "skipped": [{"name": n, "reason": why} for n, why in self.skipped],
            "requested": self.requested,
        }


def parse_outputs(text: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """``--outputs a,b`` (or a list of such strings) → ``("a", "b")``; None/empty → None (the default)."""
    if text is None:
        return None
    parts = [text] if isinstance(text, str) else list(text)
    names = tuple(dict.fromkeys(n.strip() for p in parts for n in p.split(",") if n.strip()))
    return names or None


def _weight_dependent(model: ir.Model) -> set[str]:
    """Names of the values that depend on a weight of a weighted node (forward closure)."""
    from lpcompile.graph import find_weight_nodes

    weights = {w.weight for w in find_weight_nodes(model)}
    if not weights:
        weights = {
            v.name
            for v in model.graph.initializers.values()
            if v.dtype is not None and v.dtype.is_floating_point() and v.shape is not None and len(v.shape) >= 2
        }
    tainted: set[str] = set(weights)
    for node in model.graph:  # graph order is topological in a valid model
        used = {v.name for v in node.inputs if v is not None}
        for attr in node.attributes.values():  # subgraphs (If/Loop) reading weights from the outer scope
            if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
                graphs = [attr.value] if attr.type == ir.AttributeType.GRAPH else list(attr.value)
                for g in graphs:
                    for inner in ir.traversal.RecursiveGraphIterator(g):
                        used |= {v.name for v in inner.inputs if v is not None}
        if used & tainted:
            tainted |= {v.name for v in node.outputs if v.name}
    return tainted


def _embedding_vocab(model: ir.Model) -> int | None:
    sizes = []
    for node in model.graph:
        if node.op_type == "Gather" and len(node.inputs) == 2:
            data, idx = node.inputs
            table = data is not None and data.const_value is not None and len(data.const_value.shape) == 2
            if table and idx is not None and idx.const_value is None:
                sizes.append(int(data.const_value.shape[0]))  # type: ignore[union-attr]
    return max(sizes) if sizes else None


def embedding_vocab(model: ir.Model | onnx.ModelProto) -> int | None:
    """Rows of the model's largest token-embedding table (a Gather on a rank-2 initializer), or None."""
    return _embedding_vocab(ir.from_proto(model) if isinstance(model, onnx.ModelProto) else model)


def model_output_kinds(model: ir.Model | onnx.ModelProto, arrays: Mapping[str, Any]) -> dict[str, str]:
    """:func:`lpcompile.metrics.output_kind` of every output in ``arrays`` (reference values by name)."""
    m = ir.from_proto(model) if isinstance(model, onnx.ModelProto) else model
    producers = {v.name: v.producer() for v in m.graph.outputs}
    vocab = _embedding_vocab(m)
    kinds = {}
    for name, a in arrays.items():
        arr = np.asarray(a)
        p = producers.get(name)
        kinds[name] = output_kind(
            name,
            arr.shape,
            integer=arr.dtype.kind in "biu",
            producer=p.op_type if p is not None else None,
            vocab=vocab,
        )
    return kinds


def attention_mask_input(model: ir.Model) -> str | None:
    """The attention-mask graph input: rank 2, integer/bool/float, named like ``*mask*`` (exactly one)."""
    found = []
    for v in model.graph.inputs:
        if v.is_initializer() or "mask" not in (v.name or "").lower():
            continue
        if v.shape is not None and len(v.shape) != 2:
            continue
        found.append(v.name)
    return found[0] if len(found) == 1 else None


def choose_outputs(
    model: ir.Model | onnx.ModelProto,
    requested: Sequence[str] | None = None,
    loss: LossKind = "auto",
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> LossSpec:
    """The outputs the loss is defined on, the loss of each, and the padding mask (see the module docstring).

    Args:
        model: the model.
        requested: output names (``--outputs``); None for the default.
        loss: ``auto``, or ``kl`` / ``mse`` for every output.
        shapes: concrete output shapes (from a reference run), used where the declared shape
            has symbolic dims.

    Raises:
        UsageError: a requested output does not exist or is not floating point.
        LpError: the model has no floating-point output to measure.
    """
    m = ir.from_proto(model) if isinstance(model, onnx.ModelProto) else model
    outputs = list(m.graph.outputs)
    by_name = {v.name: v for v in outputs}
    vocab = _embedding_vocab(m)
    mask = attention_mask_input(m)
    dependent = _weight_dependent(m)
    skipped: list[tuple[str, str]] = []
    chosen: list[ir.Value] = []
    if requested:
        unknown = [n for n in requested if n not in by_name]
        if unknown:
            raise UsageError(
                f"--outputs names unknown output(s) {', '.join(unknown)} (model outputs: {', '.join(by_name)})"
            )
        for v in outputs:
            if v.name not in requested:
                skipped.append((v.name, "not requested"))
            elif v.dtype is None or not v.dtype.is_floating_point():
                raise UsageError(f"--outputs {v.name}: a {getattr(v.dtype, 'name', 'untyped')} output has no gradient")
            else:
                chosen.append(v)
    else:
        for v in outputs:
            if v.dtype is not None and not v.dtype.is_floating_point():
                skipped.append((v.name, v.dtype.name.lower()))
            elif v.name not in dependent:
                skipped.append((v.name, "does not depend on weights"))
            else:
                chosen.append(v)
        if not chosen:
            floats = [v for v in outputs if v.dtype is None or v.dtype.is_floating_point()]
            if not floats:
                raise LpError("the model has no floating-point output to measure distortion on")
            chosen, skipped = floats, [s for s in skipped if s[0] not in {v.name for v in floats}]
    terms = []
    for v in chosen:
        shape: Sequence[Any] | None = (shapes or {}).get(v.name)
        if shape is None and v.shape is not None:
            shape = tuple(d if isinstance(d, int) else None for d in v.shape)
        producer = v.producer()
        kind = output_kind(v.name, shape, producer=producer.op_type if producer else None, vocab=vocab)
        term_loss = loss if loss != "auto" else _loss_of_kind(kind)
        covers = mask is not None and _mask_covers(m, mask, v, shape, term_loss)
        terms.append(OutputLoss(v.name, term_loss, kind, mask if covers else None))
    spec = LossSpec(tuple(terms), tuple(skipped), requested=bool(requested))
    return spec


def _mask_covers(model: ir.Model, mask: str, output: ir.Value, shape: Sequence[Any] | None, loss: str) -> bool:
    """Whether the ``[batch, seq]`` mask input covers the output's leading positions.

    When the mask and the output both declare a symbol on axis 1, they must be the same symbol
    (a rank-2 ``[B, T]`` output is then covered under MSE); otherwise only outputs of rank ≥ 3
    (``[B, T, ...]``) are, so a ``[B, H]`` embedding never is. At run time the mask must also
    match the output's leading dims (:meth:`LossSpec.masks`).
    """
    if shape is None or len(shape) < 2:
        return False
    mask_value = next((v for v in model.graph.inputs if v.name == mask), None)
    mask_dims = [getattr(d, "value", d) for d in mask_value.shape] if mask_value and mask_value.shape else []
    out_dims = [getattr(d, "value", d) for d in output.shape] if output.shape is not None else []
    if len(mask_dims) == 2 and len(out_dims) >= 2 and isinstance(mask_dims[1], str) and isinstance(out_dims[1], str):
        return mask_dims[1] == out_dims[1] and (loss == "mse" or len(out_dims) >= 3)
    return len(shape) >= 3


# --------------------------------------------------------------------------------------------
# distortion


#: float64 elements per chunk of the KL probe (positions × vocabulary): bounds its temporaries (~8 × 8 MB)
_KL_CHUNK = 1 << 20


def _kl_probe(y_ref: torch.Tensor, gen: torch.Generator, mask: Any) -> torch.Tensor:
    """The KL branch of :func:`ggn_output_probe`, computed in float64 a block of positions at a time
    (the same numbers as the whole-tensor formula: every step is per position)."""
    import torch

    y = y_ref.detach()
    vocab = max(int(y.shape[-1]), 1) if y.ndim else 1
    rows = y.reshape(-1, vocab)
    m = _torch_mask(mask, y[..., :1], 1)  # (only the device of the reference is read)
    m_rows = m.reshape(-1, 1) if m is not None else None
    div = math.sqrt(max(rows.shape[0], 1)) if m is None else math.sqrt(float(m.sum().clamp_min(1.0)))
    out = torch.empty(rows.shape, dtype=y_ref.dtype, device=y.device)
    step = max(1, _KL_CHUNK // vocab)
    for start in range(0, rows.shape[0], step):
        sl = slice(start, start + step)
        y0 = rows[sl].to(torch.float64)
        # the signs of these rows: consecutive draws of one generator are one draw of the whole tensor
        u8 = torch.randint(0, 2, (y0.shape[0], vocab), generator=gen, dtype=torch.int8)
        u = u8.to(torch.float64).mul_(2).sub_(1)
        p = torch.softmax(y0, dim=-1)
        a = p.sqrt()
        z = a * u - p * (a * u).sum(-1, keepdim=True)
        if m_rows is not None:
            z = z * m_rows[sl]
        out[sl] = (z / div).to(y_ref.dtype)
    return out.reshape(y.shape)


def _torch_mask(mask: Any, like: torch.Tensor, trailing: int) -> torch.Tensor | None:
    import torch

    if mask is None:
        return None
    m = mask if isinstance(mask, torch.Tensor) else torch.from_numpy(np.asarray(mask))
    m = m.to(dtype=torch.float64, device=like.device)
    return m.reshape(tuple(m.shape) + (1,) * trailing)


def torch_distortion(
    outputs: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    kinds: Mapping[str, str],
    masks: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """Σ over outputs of the distortion of ``outputs`` against fixed ``reference`` tensors.

    ``masks`` (see :meth:`LossSpec.masks`) leave padded positions out: KL averages over the
    unmasked positions, MSE over the unmasked elements (numerator and normaliser alike).
    """
    import torch

    total = torch.zeros((), dtype=torch.float64)
    for name, kind in kinds.items():
        y = outputs[name].to(torch.float64)
        y0 = reference[name].to(torch.float64).detach()
        mask = (masks or {}).get(name)
        if kind == "kl":
            logp0 = torch.log_softmax(y0, dim=-1)
            logp = torch.log_softmax(y, dim=-1)
            per_pos = (logp0.exp() * (logp0 - logp)).sum(-1)
            m = _torch_mask(mask, per_pos, 0)
            total = total + (per_pos.mean() if m is None else (per_pos * m).sum() / m.sum().clamp_min(1.0))
        else:
            m = _torch_mask(mask, y, y.ndim - np.asarray(mask).ndim) if mask is not None else None
            if m is None:
                denom = (y0 * y0).mean().clamp_min(1e-30)
                total = total + ((y - y0) ** 2).mean() / denom
            else:
                w = m.expand_as(y)
                count = w.sum().clamp_min(1.0)
                denom = ((y0 * y0) * w).sum().div(count).clamp_min(1e-30)
                total = total + (((y - y0) ** 2) * w).sum().div(count) / denom
    return total


def numpy_distortion(
    outputs: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    kinds: Mapping[str, str],
    masks: Mapping[str, Any] | None = None,
) -> float:
    """The numpy twin of :func:`torch_distortion` (float64; KL by :func:`lpcompile.metrics.kl_divergence`)."""
    total = 0.0
    for name, kind in kinds.items():
        mask = (masks or {}).get(name)
        if kind == "kl":  # converted to float64 a block of positions at a time (an LLM's logits: 200 MB a copy)
            total += kl_divergence(reference[name], outputs[name], from_logits=True, mask=mask)
            continue
        y = np.asarray(outputs[name], dtype=np.float64)
        y0 = np.asarray(reference[name], dtype=np.float64)
        denom = max(masked_mean(y0 * y0, mask), 1e-30)
        total += masked_mean((y - y0) ** 2, mask) / denom
    return total


def ggn_output_probe(y_ref: torch.Tensor, kind: str, gen: torch.Generator, mask: Any = None) -> torch.Tensor:
    """A random vector z on the output space with Cov(z) = M, the Hessian of the distortion at y_ref.

    Then g = Jᵀz (one backward pass) satisfies E[g ⊙ g] = diag(JᵀMJ), the Gauss–Newton diagonal.
    For the normalised MSE, M = 2/(N·mean(y0²))·I; for KL(p0‖softmax(y)) averaged over B positions,
    M = (diag(p) − ppᵀ)/B per position, and z = (diag(√p) − p√pᵀ)u/√B with u Rademacher. With a
    padding ``mask`` (as in :func:`torch_distortion`) z is zero on padded positions and N, B count
    the unmasked elements / positions (and mean(y0²) is taken over them).
    """
    import torch

    if kind == "kl":
        return _kl_probe(y_ref, gen, mask)
    y0 = y_ref.detach().to(torch.float64)
    u = torch.randint(0, 2, y0.shape, generator=gen, dtype=torch.int8).to(torch.float64).mul_(2).sub_(1)
    m = _torch_mask(mask, y0, y0.ndim - np.asarray(mask).ndim) if mask is not None else None
    if m is None:
        denom = float((y0 * y0).mean().clamp_min(1e-30))
        return (u * math.sqrt(2.0 / (y0.numel() * denom))).to(y_ref.dtype)
    w = m.expand_as(y0)
    count = float(w.sum().clamp_min(1.0))
    denom = max(float((y0 * y0 * w).sum()) / count, 1e-30)
    return (u * w * math.sqrt(2.0 / (count * denom))).to(y_ref.dtype)
