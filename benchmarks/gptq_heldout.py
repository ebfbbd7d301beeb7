"""GPTQ vs nearest rounding per weighted node on held-out inputs (EfficientNet-Lite0 by default).

XᵀX is gathered from the first ``--calib-samples`` calibration crops (raw mean and the shrunk one
lpcompile uses, :meth:`lpcompile.analysis.input_hessians.HessianAccumulator.result`); each node's
weight is rounded to ``--format`` by ``nearest`` and by ``gptq`` with each XᵀX, and the layer-output
error ``‖(Ŵ−W)·X‖² / ‖W·X‖²`` is measured on the held-out crops ``--held-out A:B`` with an
independent reference (``torch.nn.functional.conv2d`` / matmul on the real layer input, captured
from the fp32 model). Grouped (depthwise) Convs have no XᵀX and are skipped.

    python benchmarks/gptq_heldout.py --calib-samples 8 --format int4_b128 \
        --json-out benchmarks/gptq_heldout_efficientnet.json
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


def main() -> None:
    import onnx_ir as ir

    from lpcompile.analysis.input_hessians import HessianAccumulator, hessian_specs
    from lpcompile.analysis.interpreter import TorchGraph
    from lpcompile.files import load_normalized
    from lpcompile.formats import dequantize
    from lpcompile.graph import find_weight_nodes
    from lpcompile.rounding import round_weight

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "artifacts/bench/efficientnet_lite0.onnx"))
    p.add_argument("--calib", default=str(ROOT / "artifacts/bench/efficientnet_lite0/calib48.npz"))
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--held-out", default="32:48", help="calibration rows A:B used as held-out inputs")
    p.add_argument("--format", default="int4_b128")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json-out", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = load_normalized(args.model)
    nodes = find_weight_nodes(model)
    by_name = {n.name: n for n in model.graph}
    with np.load(args.calib) as data:
        (key,) = data.files
        allx = np.asarray(data[key])
    a, b = (int(v) for v in args.held_out.split(":"))
    if args.calib_samples > a:
        raise SystemExit("--calib-samples overlaps the held-out rows")
    graph = TorchGraph(ir.to_proto(model))
    acc = HessianAccumulator(hessian_specs(model, nodes))
    with torch.no_grad():
        for i in range(0, args.calib_samples, args.batch):
            acc.update(graph.forward({key: allx[i : min(i + args.batch, args.calib_samples)]}, capture=acc.tensors))
        held = graph.forward({key: allx[a:b]}, capture=sorted({n.activation for n in nodes}))
    hess = {"raw": acc.result(shrink=False), "shrunk": acc.result()}
    rows: list[dict[str, Any]] = []
    for wn in nodes:
        node = by_name[wn.name]
        h_raw = hess["raw"].get(wn.activation)
        if h_raw is None or wn.op_type not in ("Conv", "MatMul", "Gemm"):
            continue
        w = np.asarray(model.graph.initializers[wn.weight].const_value.numpy(), dtype=np.float32)
        x = held[wn.activation].double()
        if wn.op_type == "Conv":
            pads = _ints(node, "pads", (0, 0, 0, 0))
            xp = torch.nn.functional.pad(x, [pads[1], pads[3], pads[0], pads[2]])
            st, dl = _ints(node, "strides", (1, 1)), _ints(node, "dilations", (1, 1))

            def f(ww: np.ndarray, xp: torch.Tensor = xp, st: tuple = st, dl: tuple = dl) -> torch.Tensor:
                return torch.nn.functional.conv2d(xp, torch.from_numpy(ww).double(), stride=st, dilation=dl)
        else:
            trans_b = wn.op_type == "Gemm" and node.attributes.get_int("transB", 0)

            def f(ww: np.ndarray, x: torch.Tensor = x, t: bool = bool(trans_b)) -> torch.Tensor:
                m = torch.from_numpy(ww).double()
                return x.reshape(-1, x.shape[-1]) @ (m.T if t else m)

        y = f(w)
        row: dict[str, Any] = {
            "node": wn.name,
            "op": wn.op_type,
            "shape": list(w.shape),
            "k": h_raw.shape[0],
            "rows": acc._rows[wn.activation],
            "shrinkage": acc.shrinkage(wn.activation),
        }
        for name, method, h in (
            ("nearest", "nearest", None),
            ("gptq_raw", "gptq", h_raw),
            ("gptq", "gptq", hess["shrunk"][wn.activation]),
        ):
            q = dequantize(round_weight(args.format, w, wn.layout, method, hessian=h)).reshape(w.shape)
            row[name] = float(((f(q.astype(np.float32)) - y) ** 2).sum() / (y**2).sum())
        rows.append(row)
        print(
            f"{wn.name:16s} K={row['k']:5d} rows={row['rows']:7d} δ={row['shrinkage']:.3f} "
            f"nearest {row['nearest']:.3g}  gptq raw XᵀX {row['gptq_raw']:.3g}  gptq shrunk {row['gptq']:.3g}",
            flush=True,
        )
    summary = {
        k: {"sum": sum(r[k] for r in rows), "worse_than_nearest": [r["node"] for r in rows if r[k] > r["nearest"]]}
        for k in ("nearest", "gptq_raw", "gptq")
    }
    print(json.dumps(summary, indent=1))
    if args.json_out:
        args.json_out.write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows, "summary": summary}, indent=1)
        )


if __name__ == "__main__":
    main()
