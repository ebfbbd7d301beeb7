"""GPTQ vs nearest rounding per weighted node on held-out inputs (EfficientNet-Lite0 by default).

XᵀX is gathered from the first ``--calib-samples`` calibration rows; each node's weight is rounded to
``--format`` by ``nearest`` and by ``gptq`` with XᵀX shrunk by each ``--shrink`` setting (``raw``: the
plain mean; a number ``c``: ``δ = c·K/(c·K + rows)``, :meth:`HessianAccumulator.result`; ``lpc``: what
lpcompile uses, :data:`~lpcompile.analysis.input_hessians.SHRINK`), and the layer-output error
``‖(Ŵ−W)·X‖² / ‖W·X‖²`` is measured on held-out rows (``--held-out A:B`` of the same file, or
``--held-out-file``) with an independent reference (``torch.nn.functional.conv2d`` with the node's
groups, strides, dilations and pads / a matmul on the real layer input captured from the fp32 model;
padded tokens left out). Grouped (depthwise) Convs get a per-group XᵀX; for them the table also has
what they got before it existed: ``rtn`` (run-wide gptq) and ``mse_noH`` (an explicit ``:gptq``).

    python benchmarks/gptq_heldout.py --calib-samples 8 --format int4_b128 \\
        --json-out benchmarks/gptq_heldout_efficientnet_int4_b128.json
    python benchmarks/gptq_heldout.py --model artifacts/bench/minilm.onnx \\
        --calib artifacts/bench/minilm/calib.npz --calib-samples 64 --held-out 64:128 --shrink raw,0.5,1,2,4
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _ints(node: Any, name: str, default: tuple[int, ...]) -> tuple[int, ...]:
    a = node.attributes.get(name)
    return tuple(int(v) for v in a.as_ints()) if a is not None else default


def shrink(raw: np.ndarray, c: float, rows: int) -> np.ndarray:
    """``raw`` (``[K, K]`` or ``[G, K, K]``) shrunk with ``δ = c·K/(c·K + rows)``, independently of lpcompile."""
    k = raw.shape[-1]
    return shrink_by(raw, np.asarray(c * k / (c * k + rows) if c > 0 else 0.0))


def shrink_by(raw: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """``(1−δ)·raw + δ·μI`` (``μ`` the mean diagonal) with ``δ`` a scalar or one per group."""
    k = raw.shape[-1]
    dl = np.asarray(delta, dtype=np.float64).reshape(-1, 1, 1) if raw.ndim == 3 else float(delta)
    out = np.array(raw, dtype=np.float64) * (1.0 - dl)
    d = np.diagonal(raw, axis1=-2, axis2=-1)
    dd = np.asarray(delta, dtype=np.float64).reshape(-1, 1) if raw.ndim == 3 else float(delta)
    idx = np.arange(k)
    out[..., idx, idx] = (1.0 - dd) * d + dd * d.mean(axis=-1, keepdims=True)
    return out


def main() -> None:
    import onnx_ir as ir

    from lpcompile.analysis.input_hessians import SHRINK, HessianAccumulator, attention_mask, hessian_specs
    from lpcompile.analysis.interpreter import TorchGraph
    from lpcompile.files import load_normalized
    from lpcompile.formats import dequantize
    from lpcompile.graph import find_weight_nodes
    from lpcompile.rounding import FactoredXtX, round_weight

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "artifacts/bench/efficientnet_lite0.onnx"))
    p.add_argument("--calib", default=str(ROOT / "artifacts/bench/efficientnet_lite0/calib48.npz"))
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--held-out", default="32:48", help="calibration rows A:B used as held-out inputs")
    p.add_argument("--held-out-file", type=Path, help="held-out inputs from this .npz (rows --held-out of it)")
    p.add_argument("--format", default="int4_b128")
    p.add_argument(
        "--shrink", default="raw,lpc", help="comma list: raw, lpc, lw (Ledoit–Wolf over samples) or constants c"
    )
    p.add_argument("--nodes", choices=("all", "grouped"), default="all")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json-out", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = load_normalized(args.model)
    nodes = find_weight_nodes(model)
    by_name = {n.name: n for n in model.graph}
    with np.load(args.calib) as data:
        calib = {k: np.asarray(data[k]) for k in data.files}
    held_src = calib
    if args.held_out_file:
        with np.load(args.held_out_file) as data:
            held_src = {k: np.asarray(data[k]) for k in data.files}
    a, b = (int(v) for v in args.held_out.split(":"))
    if not args.held_out_file and args.calib_samples > a:
        raise SystemExit("--calib-samples overlaps the held-out rows")
    graph = TorchGraph(ir.to_proto(model))
    settings = [s.strip() for s in args.shrink.split(",") if s.strip()]
    acc = HessianAccumulator(hessian_specs(model, nodes), sample_stats="lw" in settings)
    with torch.no_grad():
        for i in range(0, args.calib_samples, args.batch):
            bt = {k: v[i : min(i + args.batch, args.calib_samples)] for k, v in calib.items()}
            acc.update(graph.forward(bt, capture=acc.tensors), attention_mask(bt))
        hb = {k: v[a:b] for k, v in held_src.items()}
        held = graph.forward(hb, capture=sorted({n.activation for n in nodes}))
    hmask = attention_mask(hb)
    raw_all = acc.result(shrink=False)
    consts = {s: (0.0 if s == "raw" else SHRINK if s == "lpc" else float(s)) for s in settings if s != "lw"}
    rows: list[dict[str, Any]] = []
    for wn in nodes:
        node = by_name[wn.name]
        h_raw = raw_all.get(wn.activation)
        if h_raw is None or wn.op_type not in ("Conv", "MatMul", "Gemm"):
            continue
        groups = node.attributes.get_int("group", 1) if wn.op_type == "Conv" else 1
        if args.nodes == "grouped" and groups == 1:
            continue
        w = np.asarray(model.graph.initializers[wn.weight].const_value.numpy(), dtype=np.float32)
        x = held[wn.activation].double()
        if wn.op_type == "Conv":
            pads = _ints(node, "pads", (0, 0, 0, 0))
            xp = torch.nn.functional.pad(x, [pads[1], pads[3], pads[0], pads[2]])
            st, dl = _ints(node, "strides", (1, 1)), _ints(node, "dilations", (1, 1))

            def f(
                ww: np.ndarray, xp: torch.Tensor = xp, st: tuple = st, dl: tuple = dl, g: int = groups
            ) -> torch.Tensor:
                return torch.nn.functional.conv2d(xp, torch.from_numpy(ww).double(), stride=st, dilation=dl, groups=g)
        else:
            trans_b = wn.op_type == "Gemm" and node.attributes.get_int("transB", 0)
            if hmask is not None and x.ndim == 3 and tuple(hmask.shape) == tuple(x.shape[:2]):
                x = x[torch.as_tensor(hmask).bool()]

            def f(ww: np.ndarray, x: torch.Tensor = x, t: bool = bool(trans_b)) -> torch.Tensor:
                m = torch.from_numpy(ww).double()
                return x.reshape(-1, x.shape[-1]) @ (m.T if t else m)

        y = f(w)
        n_rows = acc._rows[wn.activation]
        k = h_raw.shape[-1]
        row: dict[str, Any] = {
            "node": wn.name,
            "op": wn.op_type,
            "groups": groups,
            "shape": list(w.shape),
            "k": k,
            "rows": n_rows,
            "rows_per_k": n_rows / k,
        }
        lw = acc.ledoit_wolf(wn.activation) if "lw" in settings else None
        if lw is not None:
            row["delta_lw"] = lw.tolist()
        variants: list[tuple[str, str, np.ndarray | None]] = [("nearest", "nearest", None)]
        if groups > 1:
            variants += [("rtn", "rtn", None), ("mse_noH", "mse", None)]
        for s in settings:
            if s == "lw":
                if lw is None:
                    continue
                h = shrink_by(np.asarray(h_raw), lw)
            else:
                h = np.asarray(h_raw) if consts[s] == 0 else shrink(np.asarray(h_raw), consts[s], n_rows)
            variants.append((f"gptq_{s}", "gptq", h.view(FactoredXtX)))
        for name, method, h in variants:
            q = dequantize(round_weight(args.format, w, wn.layout, method, hessian=h)).reshape(w.shape)
            row[name] = float(((f(q.astype(np.float32)) - y) ** 2).sum() / (y**2).sum())
        rows.append(row)
        print(
            f"{wn.name:16s} g={groups:4d} K={k:5d} rows={n_rows:7d} "
            + (f"δlw={float(np.mean(lw)):.3g} " if lw is not None else "")
            + "  ".join(f"{nm} {row[nm]:.3g}" for nm, _, _ in variants),
            flush=True,
        )
    keys = (
        [nm for nm in rows[0] if nm == "nearest" or nm.startswith("gptq_") or nm in ("rtn", "mse_noH")] if rows else []
    )
    summary = {
        k: {
            "sum": sum(r[k] for r in rows if k in r),
            "worse_than_nearest": [r["node"] for r in rows if k in r and r[k] > r["nearest"]],
        }
        for k in keys
    }
    print(
        json.dumps({k: {"sum": v["sum"], "worse": len(v["worse_than_nearest"])} for k, v in summary.items()}, indent=1)
    )
    if args.json_out:
        args.json_out.write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows, "summary": summary}, indent=1)
        )


if __name__ == "__main__":
    main()
