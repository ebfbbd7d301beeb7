"""Second moments ``XᵀX`` of every weighted node's activation input, for error-compensated rounding.

The accumulator plugs into any calibration forward of :class:`lpcompile.analysis.interpreter.TorchGraph`:
capture :attr:`HessianAccumulator.tensors` besides what the forward needs anyway, and hand the
captured values to :meth:`HessianAccumulator.update` (the analysis does this in its reference pass,
so no second pass over the data is needed). :func:`collect_input_hessians` runs such a forward
on its own, for ``apply`` without an analysis.

Result: ``Mapping[str, np.ndarray]`` keyed by activation tensor name, each ``[K, K]`` float64, the
mean of ``xxᵀ`` over all rows the layer multiplies (tokens × batch for MatMul, patches for Conv),
shrunk towards a multiple of the identity by ``δ = c·K/(c·K + rows)`` (:meth:`HessianAccumulator.result`:
the raw mean over few rows lets GPTQ fit the calibration rows and lose to nearest rounding on new data;
each matrix carries its ``δ`` so the loss prediction can use the raw mean, :func:`lpcompile.rounding.unshrunk`).
Rows of padded positions (``attention_mask == 0``) are left out when the caller passes the mask.
A MatMul/Gemm input's ``K`` is its last axis (Gemm with ``transA``: the first); a 1-D/2-D Conv's is
``I·kh·kw`` in ``torch.nn.functional.unfold`` order (the flattened weight order of
:func:`lpcompile.rounding.to_2d`). A grouped (e.g. depthwise) Conv's output channels of group ``g``
read only that group's input channels, so its entry is one ``XᵀX`` per group, ``[G, K, K]`` with
``K = (I/G)·kh·kw`` (``[C, kh·kw, kh·kw]`` for a depthwise Conv), each shrunk the same way;
:func:`lpcompile.rounding.round_weight` uses group ``o // (O/G)``'s matrix for output channel ``o``.
An activation read by two nodes that need different ``K`` (or groups) gets no entry.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

from lpcompile.graph import WeightNode, find_weight_nodes
from lpcompile.rounding import FactoredXtX, reduction_size

logger = logging.getLogger(__name__)


#: ``c`` of the shrinkage ``δ = c·K/(c·K + n)`` of every ``XᵀX`` (:meth:`HessianAccumulator.result`);
#: chosen on held-out layer-output error (EfficientNet-Lite0 Convs and classifier, MiniLM MatMuls).
SHRINK = 2.0
#: how :meth:`HessianAccumulator.result` picks ``δ``: ``"constant"`` (``c·K/(c·K + rows)`` with
#: :data:`SHRINK`) or ``"ledoit_wolf"`` (:meth:`HessianAccumulator.ledoit_wolf`, estimated from the
#: spread between calibration samples; the constant rule where it is unavailable). Ledoit–Wolf is not the
#: default: it matches the raw mean where that is best (digits MLP, Fashion-MNIST CNN, the digits demo)
#: but estimates δ ≈ 0.01–0.03 at EfficientNet-Lite0's deep 1×1 Convs (8 images), where c = 2 gives
#: 0.4–0.5, and there loses to nearest rounding on held-out images as the raw mean does (issue 19, wave 5)
SHRINK_RULE = "constant"


@dataclass(frozen=True)
class ConvGeometry:
    """What ``unfold`` needs to turn a Conv input into weight-shaped rows."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]  # ONNX order: begins then ends
    auto_pad: str


@dataclass(frozen=True)
class HessianSpec:
    """How one activation tensor becomes rows of the reduction: ``kind`` is matmul, matmul_t or conv."""

    tensor: str
    kind: str
    k: int
    conv: ConvGeometry | None = None
    groups: int = 1  # conv: one XᵀX per group of input channels (``group`` attribute)


def _ints(node: ir.Node, name: str, default: Sequence[int]) -> tuple[int, ...]:
    attr = node.attributes.get(name)
    return tuple(int(v) for v in attr.as_ints()) if attr is not None else tuple(default)


def hessian_specs(model: ir.Model, nodes: Sequence[WeightNode] | None = None) -> dict[str, HessianSpec]:
    """Specs by activation tensor name for the weighted nodes of ``model`` (all when ``nodes`` is None)."""
    nodes = find_weight_nodes(model) if nodes is None else nodes
    by_name = {n.name: n for n in model.graph}
    out: dict[str, HessianSpec] = {}
    dropped: set[str] = set()
    for wn in nodes:
        node = by_name.get(wn.name)
        if node is None:
            continue
        k = reduction_size(wn.shape, wn.layout)
        spec: HessianSpec | None
        if wn.op_type == "MatMul":
            spec = HessianSpec(wn.activation, "matmul", k)
        elif wn.op_type == "Gemm":
            trans_a = node.attributes.get_int("transA", 0)
            spec = HessianSpec(wn.activation, "matmul_t" if trans_a else "matmul", k)
        elif wn.op_type == "Conv" and len(wn.shape) in (3, 4):
            nk = len(wn.shape) - 2
            auto = node.attributes.get_string("auto_pad", "NOTSET") or "NOTSET"
            geom = ConvGeometry(
                kernel=tuple(int(d) for d in wn.shape[2:]),
                strides=_ints(node, "strides", [1] * nk),
                dilations=_ints(node, "dilations", [1] * nk),
                pads=_ints(node, "pads", [0] * (2 * nk)),
                auto_pad=auto,
            )
            groups = node.attributes.get_int("group", 1)
            if groups < 1 or wn.shape[0] % groups:
                continue
            spec = HessianSpec(wn.activation, "conv", k, geom, groups)
        else:
            spec = None
        if spec is None or wn.activation in dropped:
            continue
        prev = out.get(wn.activation)
        if prev is not None and prev != spec:
            logger.info("activation %r feeds nodes with different reductions: no Hessian for it", wn.activation)
            del out[wn.activation]
            dropped.add(wn.activation)
            continue
        out[wn.activation] = spec
    return out


def _conv_rows(x: torch.Tensor, g: ConvGeometry) -> torch.Tensor:
    """``[rows, C·kh·kw]`` patches of an NCHW (or NCL) input, in the order of the flattened weight."""
    if x.ndim == 3:  # 1-D conv as a 2-D one with height 1
        x = x.unsqueeze(2)
        g = ConvGeometry((1, *g.kernel), (1, *g.strides), (1, *g.dilations), (0, g.pads[0], 0, g.pads[1]), g.auto_pad)
    pads = list(g.pads)
    if g.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0] * 4
        for i in range(2):
            size = x.shape[2 + i]
            out = -(-size // g.strides[i])
            eff = (g.kernel[i] - 1) * g.dilations[i] + 1
            total = max(0, (out - 1) * g.strides[i] + eff - size)
            small, big = total // 2, total - total // 2
            pads[i], pads[i + 2] = (small, big) if g.auto_pad == "SAME_UPPER" else (big, small)
    elif g.auto_pad == "VALID":
        pads = [0] * 4
    if any(pads):
        x = torch.nn.functional.pad(x, [pads[1], pads[3], pads[0], pads[2]])
    cols = torch.nn.functional.unfold(x, g.kernel, dilation=g.dilations, stride=g.strides)  # [B, C·kh·kw, L]
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


class HessianAccumulator:
    """Running ``Σ xxᵀ`` and row counts per activation tensor (see the module docstring)."""

    def __init__(self, specs: Mapping[str, HessianSpec], sample_stats: bool | None = None) -> None:
        """``sample_stats``: also keep what :meth:`ledoit_wolf` needs (per calibration sample ``Σ xxᵀ``
        moments; one more ``[K, K]`` per tensor, and one product per sample instead of per batch);
        None: when :data:`SHRINK_RULE` is ``"ledoit_wolf"``."""
        self.specs = dict(specs)
        self._sum: dict[str, torch.Tensor] = {}
        self._rows: dict[str, int] = {}
        self.sample_stats = SHRINK_RULE == "ledoit_wolf" if sample_stats is None else sample_stats
        # per tensor: Σ_b ‖G_b‖²_F (per group), Σ_b n_b·G_b, Σ_b n_b², samples (G_b = Σ xxᵀ of sample b)
        self._lw: dict[str, list] = {}

    @property
    def tensors(self) -> tuple[str, ...]:
        """Activation tensor names to capture in the forward."""
        return tuple(self.specs)

    def rows(self, name: str, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """The ``[rows, K]`` matrix the layer multiplies, ``[G, rows, K]`` for a grouped Conv (None when
        the shape does not fit the spec)."""
        spec = self.specs[name]
        x = x.detach().to(torch.float32)
        if spec.kind == "conv":
            if spec.conv is None or x.ndim not in (3, 4):
                return None
            r = _conv_rows(x, spec.conv)
            if spec.groups > 1:
                if r.shape[1] != spec.groups * spec.k:
                    return None
                return r.reshape(r.shape[0], spec.groups, spec.k).transpose(0, 1)  # [G, rows, K]
        elif spec.kind == "matmul_t":
            r = x.reshape(x.shape[0], -1).T if x.ndim == 2 else None
            if r is None:
                return None
        else:
            if x.ndim < 1:
                return None
            if mask is not None and x.ndim == 3 and tuple(mask.shape) == tuple(x.shape[:2]):
                x = x[mask.to(torch.bool)]
            r = x.reshape(-1, x.shape[-1])
        if r.shape[1] != spec.k:
            return None
        return r

    def update(self, values: Mapping[str, torch.Tensor], mask: np.ndarray | torch.Tensor | None = None) -> None:
        """Add one batch: ``values`` holds (at least) the captured activation tensors.

        Args:
            values: captured tensors by name (others are ignored).
            mask: optional ``[batch, seq]`` 0/1 attention mask; rows of a ``[batch, seq, K]``
                MatMul input at masked positions are left out.
        """
        m = torch.as_tensor(np.asarray(mask)) if mask is not None and not isinstance(mask, torch.Tensor) else mask
        for name in self.specs:
            x = values.get(name)
            if x is None:
                continue
            if self.sample_stats and self.specs[name].kind != "matmul_t" and x.ndim >= 2:
                self._update_per_sample(name, x, m)
                continue
            r = self.rows(name, x, m)
            if r is None:
                logger.debug("activation %r: shape %s does not fit its spec", name, tuple(x.shape))
                continue
            r = torch.nan_to_num(r, nan=0.0, posinf=0.0, neginf=0.0)
            # fp32 product per batch (BLAS speed), fp64 running sum
            acc = (torch.bmm(r.transpose(1, 2), r) if r.ndim == 3 else r.T @ r).to(torch.float64)
            if name in self._sum:
                self._sum[name] += acc
            else:
                self._sum[name] = acc
            self._rows[name] = self._rows.get(name, 0) + int(r.shape[-2])

    def _update_per_sample(self, name: str, x: torch.Tensor, m: torch.Tensor | None) -> None:
        """:meth:`update` one calibration sample (batch item) at a time, keeping the moments of the
        per-sample ``G_b = Σ xxᵀ`` that :meth:`ledoit_wolf` needs."""
        for b in range(x.shape[0]):
            mb = m[b : b + 1] if m is not None and m.ndim == 2 and m.shape[0] == x.shape[0] else None
            r = self.rows(name, x[b : b + 1], mb)
            if r is None:
                continue
            r = torch.nan_to_num(r, nan=0.0, posinf=0.0, neginf=0.0)
            n = int(r.shape[-2])
            if n == 0:
                continue
            g = (torch.bmm(r.transpose(1, 2), r) if r.ndim == 3 else r.T @ r).to(torch.float64)
            if name in self._sum:
                self._sum[name] += g
            else:
                self._sum[name] = g.clone()
            self._rows[name] = self._rows.get(name, 0) + n
            sq = (g * g).sum(dim=(-2, -1))
            st = self._lw.get(name)
            if st is None:
                self._lw[name] = [sq, n * g, float(n * n), 1]
            else:
                st[0] += sq
                st[1] += n * g
                st[2] += float(n * n)
                st[3] += 1

    def ledoit_wolf(self, name: str) -> np.ndarray | None:
        """Ledoit–Wolf intensity towards ``μI`` per matrix (per group: shape ``[G]``, else ``[]``), with
        the calibration *samples* as the independent units (the rows of one image or sentence are not
        independent): ``δ = min(1, β²/γ²)``, ``β² = Σ_b (n_b/N)²‖S_b − S‖²_F`` the estimated variance of
        the mean ``S``, ``γ² = ‖S − μI‖²_F``. None without :attr:`sample_stats` or with < 2 samples."""
        st = self._lw.get(name)
        total, n = self._sum.get(name), self._rows.get(name, 0)
        if st is None or total is None or n <= 0 or st[3] < 2:
            return None
        sq, a, m2, _ = st
        s = total / n
        beta2 = (sq - 2.0 * (a * s).sum(dim=(-2, -1)) + m2 * (s * s).sum(dim=(-2, -1))) / float(n * n)
        mu = torch.diagonal(s, dim1=-2, dim2=-1).mean(-1)
        gamma2 = (s * s).sum(dim=(-2, -1)) - 2.0 * mu * torch.diagonal(s, dim1=-2, dim2=-1).sum(-1)
        gamma2 = gamma2 + mu * mu * s.shape[-1]
        delta = torch.where(gamma2 > 0, beta2.clamp(min=0.0) / gamma2.clamp(min=1e-300), torch.ones_like(gamma2))
        return delta.clamp(0.0, 1.0).numpy()

    def shrinkage(self, name: str) -> float:
        """Shrinkage intensity ``δ = c·K / (c·K + n)`` of ``name``'s ``XᵀX`` (``n`` rows, ``c`` = :data:`SHRINK`)."""
        n = self._rows.get(name, 0)
        k = self.specs[name].k
        return SHRINK * k / (SHRINK * k + n) if n > 0 and SHRINK > 0 else 0.0

    def result(self, shrink: bool = True) -> dict[str, np.ndarray]:
        """Mean ``xxᵀ`` per activation tensor, float64 ``[K, K]`` (``[G, K, K]`` for grouped Convs, each
        group shrunk towards its own diagonal mean).

        With ``shrink`` (the default, what the rounding and the analyzer use) each matrix is shrunk
        towards a multiple of the identity by :meth:`shrinkage`: off-diagonal entries times ``1 − δ``,
        the diagonal moved a fraction ``δ`` towards its mean. Without it, GPTQ fits the rows it saw:
        on EfficientNet-Lite0 with 8 calibration images the raw mean has rank 8 at the classifier
        (K = 1280) and is noisy at the deep 1×1 Convs (392 rows), and GPTQ's layer-output error on
        held-out images was *above* nearest rounding's there (classifier 1.29e-2 vs 9.2e-3 relative;
        seven expanding 1×1 Convs by 11–50 %) while the analyzer, scoring on the same rows, predicted
        it far below.
        Shrunk, every such layer beats nearest on held-out images. ``δ`` is 1e-3 or less where rows
        are plentiful (early Convs). Each matrix carries its ``δ`` (:attr:`FactoredXtX.shrinkage`): the
        analyzer predicts the loss with the raw mean (:func:`lpcompile.rounding.unshrunk`), which ranked
        held-out measurements better than the shrunk matrix (issue 19, wave 6).
        """
        out: dict[str, np.ndarray] = {}
        for n, total in self._sum.items():
            if self._rows.get(n, 0) <= 0:
                continue
            s = total / self._rows[n]
            lw = self.ledoit_wolf(n) if shrink and SHRINK_RULE == "ledoit_wolf" else None
            if lw is not None:
                dl = torch.from_numpy(np.asarray(lw, dtype=np.float64))
                d = torch.diagonal(s, dim1=-2, dim2=-1).clone()
                s = s * (1.0 - dl[..., None, None])
                s.diagonal(dim1=-2, dim2=-1).copy_((1.0 - dl[..., None]) * d + dl[..., None] * d.mean(-1, keepdim=True))
                logger.debug("XᵀX of %r: Ledoit–Wolf shrinkage %.3g (mean)", n, float(dl.mean()))
                out[n] = s.numpy().view(FactoredXtX)
                out[n].shrinkage = np.asarray(lw, dtype=np.float64)
                continue
            delta = self.shrinkage(n) if shrink else 0.0
            if delta > 0:
                d = torch.diagonal(s, dim1=-2, dim2=-1).clone()
                s = s * (1.0 - delta)
                s.diagonal(dim1=-2, dim2=-1).copy_((1.0 - delta) * d + delta * d.mean(-1, keepdim=True))
                logger.debug("XᵀX of %r: shrinkage %.3f (K=%d, %d rows)", n, delta, d.shape[-1], self._rows[n])
            out[n] = s.numpy().view(FactoredXtX)  # GPTQ factorises it once for every format and reader
            out[n].shrinkage = float(delta)  # the prediction undoes it (rounding.unshrunk)
        return out


class HessianStore(MutableMapping[str, np.ndarray]):
    """Layer-input ``XᵀX`` by activation tensor: in memory up to ``limit`` bytes, then in a temporary
    folder (read back one at a time). :meth:`close` (or garbage collection) removes the folder."""

    def __init__(self, limit: int = 256 << 20) -> None:
        self.limit = limit
        self.mem: dict[str, np.ndarray] = {}
        self.used = 0
        self.files: dict[str, Path] = {}
        self.shrinkage: dict[str, float | np.ndarray] = {}  # of the spilled matrices (np.save drops it)
        self.dir: tempfile.TemporaryDirectory[str] | None = None

    def __setitem__(self, key: str, value: np.ndarray) -> None:
        self.pop(key, None)
        if self.used + value.nbytes <= self.limit:
            self.mem[key] = value
            self.used += value.nbytes
            return
        if self.dir is None:
            self.dir = tempfile.TemporaryDirectory(prefix="lpcompile-xtx-")
        path = Path(self.dir.name) / f"{len(self.files)}.npy"
        np.save(path, value)
        self.files[key] = path
        self.shrinkage[key] = getattr(value, "shrinkage", 0.0)

    def __getitem__(self, key: str) -> np.ndarray:
        if key in self.mem:
            return self.mem[key]
        if key in self.files:
            out = np.load(self.files[key]).view(FactoredXtX)
            out.shrinkage = self.shrinkage.get(key, 0.0)
            return out
        raise KeyError(key)

    def __delitem__(self, key: str) -> None:
        if key in self.mem:
            self.used -= self.mem.pop(key).nbytes
        elif key in self.files:
            self.files.pop(key).unlink(missing_ok=True)
            self.shrinkage.pop(key, None)
        else:
            raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter([*self.mem, *self.files])

    def __len__(self) -> int:
        return len(self.mem) + len(self.files)

    def close(self) -> None:
        """Remove the spilled matrices."""
        self.files.clear()
        self.shrinkage.clear()
        if self.dir is not None:
            self.dir.cleanup()
            self.dir = None


def node_hessian(node: WeightNode, hessians: Mapping[str, np.ndarray] | None) -> np.ndarray | None:
    """The Hessian for ``node``'s weight (``[K, K]``, or ``[G, K, K]`` per group of output channels),
    or None when absent or of the wrong size."""
    if not hessians:
        return None
    h = hessians.get(node.activation)
    if h is None:
        return None
    k = reduction_size(node.shape, node.layout)
    if h.shape == (k, k):
        return h
    channels = node.shape[node.layout.channel_axis % len(node.shape)] if node.shape else 0
    if h.ndim == 3 and h.shape[1:] == (k, k) and h.shape[0] > 0 and channels % h.shape[0] == 0:
        return h
    return None


def attention_mask(batch: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """The single 2-D 0/1 input whose name contains ``mask``, if any."""
    masks = [v for k, v in batch.items() if "mask" in k.lower() and v.ndim == 2 and v.size and np.isin(v, (0, 1)).all()]
    return masks[0] if len(masks) == 1 else None


def collect_input_hessians(
    model: ir.Model,
    calib: object,
    nodes: Sequence[WeightNode] | None = None,
    batch_size: int = 16,
    max_samples: int | None = None,
    use_mask: bool = True,
    shrink: bool = True,
) -> dict[str, np.ndarray]:
    """Run the calibration data through the model once and return ``XᵀX`` per activation tensor.

    Args:
        model: the (normalised) model.
        calib: a :class:`lpcompile.frontend.calib.CalibrationSet`.
        nodes: the weighted nodes (default: all).
        batch_size: samples per forward.
        max_samples: use at most this many samples.
        use_mask: leave out rows of padded positions (an ``attention_mask``-like input).
        shrink: regularise each matrix as :meth:`HessianAccumulator.result` does (False: the raw mean).
    """
    from lpcompile.analysis.interpreter import TorchGraph
    from lpcompile.frontend.calib import CalibrationSet, batches, dynamic_sequence_inputs, split, trim_padding

    if not isinstance(calib, CalibrationSet):
        raise TypeError("calib must be a CalibrationSet")
    if max_samples is not None and max_samples < calib.num_samples:
        calib = split(calib, max_samples)[0]
    acc = HessianAccumulator(hessian_specs(model, nodes))
    if not acc.tensors:
        return {}
    graph = TorchGraph(ir.to_proto(model))
    dynamic = dynamic_sequence_inputs(model)
    with torch.no_grad():
        for b in batches(calib, batch_size):
            b = trim_padding(b, dynamic)
            res = graph.forward(b, capture=acc.tensors)
            acc.update(res, attention_mask(b) if use_mask else None)
    return acc.result(shrink=shrink)


__all__ = [
    "SHRINK",
    "SHRINK_RULE",
    "HessianAccumulator",
    "HessianSpec",
    "HessianStore",
    "attention_mask",
    "collect_input_hessians",
    "hessian_specs",
    "node_hessian",
]
