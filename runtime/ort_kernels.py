"""Which kernels ONNX Runtime runs for a model once it has optimised it, compared with another model's.

A plan written in decode-once form (``qdq``/``ort`` targets: codes and scales in the file, a decode
subgraph on initializers only) is meant to run at fp32 speed: ORT folds the decode at session start
and the graph it then runs is the fp32 graph with other weight values. That is a structural fact,
not a timing: :func:`compare_kernels` reads both optimised graphs (``ORT_ENABLE_ALL``, the
deployment setting) and says whether they run the same op types, in the same order, on weights of
the same shapes and element types. Where they do, the two models execute the same kernels on the
same shapes, so their latency is equal up to measurement noise, whatever a loaded machine reads.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field

import onnx
import onnx_ir as ir

from lpcompile.runtime.ort import optimized_proto

logger = logging.getLogger(__name__)

ModelLike = onnx.ModelProto | ir.Model | str | os.PathLike[str]


@dataclass(frozen=True)
class KernelStep:
    """One node of an optimised graph: its op and the shapes/types of the initializers it reads."""

    op: str
    weights: tuple[tuple[int, tuple[int, ...]], ...] = ()

    def __str__(self) -> str:
        return self.op + "".join(f" {dt}{list(s)}" for dt, s in self.weights)

    def loose(self) -> tuple[str, tuple[tuple[int, int], ...]]:
        """The op and its weights' element types and sizes, shapes forgotten: a Gemm on ``Wᵀ`` with
        ``transB`` flipped (lpcompile's normaliser turns ``transB=1`` Gemms around) is the same work."""
        return self.op, tuple((dt, math.prod(s)) for dt, s in self.weights)


@dataclass(frozen=True)
class KernelComparison:
    """The result of :func:`compare_kernels`.

    Attributes:
        same: both graphs are the same sequence of :class:`KernelStep`.
        same_ops: the same sequence of ops, each on weights of the same element types and sizes
            (:meth:`KernelStep.loose`): ``same`` but for weight layouts (e.g. a transposed Gemm weight).
        layout_changes: positions where only the weight shapes differ.
        model_ops: op counts of the model's optimised graph.
        reference_ops: op counts of the reference's.
        first_difference: the first position where the sequences differ, as ``"i: model | reference"``
            (empty when ``same``).
    """

    same: bool
    same_ops: bool = False
    layout_changes: int = 0
    model_ops: dict[str, int] = field(default_factory=dict)
    reference_ops: dict[str, int] = field(default_factory=dict)
    first_difference: str = ""

    def extra_ops(self) -> dict[str, int]:
        """Ops the model runs more often than the reference (e.g. per-run ``DequantizeLinear``)."""
        diff = Counter(self.model_ops)
        diff.subtract(self.reference_ops)
        return {k: v for k, v in sorted(diff.items()) if v > 0}

    def to_dict(self) -> dict[str, object]:
        return {
            "same_kernels": self.same,
            "same_ops": self.same_ops,
            "layout_changes": self.layout_changes,
            "extra_ops": self.extra_ops(),
            "first_difference": self.first_difference,
            "model_nodes": sum(self.model_ops.values()),
            "reference_nodes": sum(self.reference_ops.values()),
        }


def kernel_steps(model: ModelLike) -> tuple[KernelStep, ...]:
    """The nodes ONNX Runtime runs for ``model`` at ``ORT_ENABLE_ALL``, in its (topological) order."""
    proto = optimized_proto(model, "all")
    inits = {t.name: (t.data_type, tuple(t.dims)) for t in proto.graph.initializer}
    steps = []
    for n in proto.graph.node:
        op = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
        steps.append(KernelStep(op, tuple(inits[i] for i in n.input if i in inits)))
    return tuple(steps)


def compare_kernels(
    model: ModelLike | tuple[KernelStep, ...], reference: ModelLike | tuple[KernelStep, ...]
) -> KernelComparison:
    """Whether ``model`` and ``reference`` run the same kernels on the same shapes once ORT has optimised them
    (``same``), or the same kernels on weights of the same sizes laid out otherwise (``same_ops``). Either
    may be given as its :func:`kernel_steps` already (one optimisation per model, e.g. a reference
    compared with many rewrites)."""
    a = model if isinstance(model, tuple) else kernel_steps(model)
    b = reference if isinstance(reference, tuple) else kernel_steps(reference)
    first = ""
    for i in range(max(len(a), len(b))):
        x = a[i] if i < len(a) else None
        y = b[i] if i < len(b) else None
        if x != y:
            first = f"{i}: {x if x is not None else '(end)'} | {y if y is not None else '(end)'}"
            break
    same = not first
    same_ops = len(a) == len(b) and all(x.loose() == y.loose() for x, y in zip(a, b, strict=True))
    layout = sum(x != y for x, y in zip(a, b, strict=True)) if same_ops else 0
    logger.debug("kernels %s the reference's%s", "match" if same else "differ from", f" at {first}" if first else "")
    return KernelComparison(
        same=same,
        same_ops=same_ops,
        layout_changes=layout,
        model_ops=dict(Counter(s.op for s in a)),
        reference_ops=dict(Counter(s.op for s in b)),
        first_difference=first,
    )


__all__ = ["KernelComparison", "KernelStep", "compare_kernels", "kernel_steps"]
