"""W8A8 Convs on ONNX Runtime: uniform ``w8a8`` on a Conv model written for ``qdq`` and ``ort`` (QLinearConv
chains, and with ``--int8-residuals`` QLinearAdd residuals as well), against ORT's own ``quantize_static``
(QDQ, per-channel, uint8 activations), in one process.

For each file: KL of the logits to fp32 on the task's evaluation data at every ORT optimisation level (a file
must compute the same at every level: ORT's WeightBiasQuantization re-quantized decoded float weights
behind an activation DequantizeLinear), and the batch-1 latency over fp32, each file timed ABBA-interleaved
with fp32 (``fp32`` against itself is the control), with a 95 % bootstrap interval; ``--sessions S``
repeats each comparison with S fresh session pairs (``compare_latency(sessions=S)``).

    python benchmarks/w8a8_conv.py [--model efficientnet_lite0|fashion_mnist_cnn] [--runs 40] [--sessions 1]
                                   [--qs-methods MinMax,Entropy,Percentile]

Writes ``benchmarks/results_w8a8_conv.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import BENCH_DIR, setup_logging

LEVELS = ("disable", "basic", "all")


def _session(path: str, level: str, threads: int = 2) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _kl(ref: np.ndarray, got: np.ndarray) -> float:
    def logp(a: np.ndarray) -> np.ndarray:
        a = a.astype(np.float64) - a.max(axis=1, keepdims=True)
        return a - np.log(np.exp(a).sum(axis=1, keepdims=True))

    lr, lg = logp(ref), logp(got)
    return float(np.mean(np.sum(np.exp(lr) * (lr - lg), axis=1)))


def _quantize_static(model: str, calib: np.ndarray, name: str, out: str, method: str = "MinMax") -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{name: calib[i : i + 1]} for i in range(len(calib))])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    pre = out + ".pre.onnx"
    quant_pre_process(model, pre)
    quantize_static(pre, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod[method])  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="efficientnet_lite0", choices=["efficientnet_lite0", "fashion_mnist_cnn"])
    p.add_argument("--runs", type=int, default=40)
    p.add_argument("--sessions", type=int, default=1, help="fresh session pairs per comparison")
    p.add_argument("--calib-samples", type=int, default=16, help="calibration inputs for quantize_static")
    p.add_argument("--qs-methods", default="MinMax",
                   help="quantize_static calibration methods, comma-separated (MinMax, Entropy, Percentile)")
    p.add_argument("--out", type=Path, default=BENCH_DIR / "results_w8a8_conv.json")
    args = p.parse_args()
    setup_logging()
    from lpcompile.api import decide_uniform
    from lpcompile.config import ApplyConfig
    from lpcompile.files import apply_file, load_normalized
    from lpcompile.runtime.ort import compare_latency

    if args.model == "efficientnet_lite0":
        from bench_efficientnet import efficientnet_task as make_task
    else:
        from bench_fashion_mnist import fashion_task as make_task
    task = make_task()
    with np.load(task.calib) as data:
        name = data.files[0]
        calib = data[name][: args.calib_samples]
    result: dict[str, Any] = {
        "model": task.name, "runs": args.runs, "sessions": args.sessions, "loadavg_start": os.getloadavg(), "rows": []
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="w8a8_conv_") as tmp:
        files = {"fp32": str(task.model)}
        for target, residuals in (("qdq", False), ("ort", False), ("ort", True)):
            key = f"lpcompile w8a8 {target}" + (" int8-residuals" if residuals else "")
            out = f"{tmp}/{key.replace(' ', '_')}.onnx"
            plan = decide_uniform(load_normalized(task.model), "w8a8", target=target)
            config = ApplyConfig(target=target, int8_residuals=residuals)
            apply_file(task.model, out, plan=plan, calib_path=task.calib, config=config)
            files[key] = out
        for method in args.qs_methods.split(","):
            key = "ORT quantize_static" + ("" if method == "MinMax" else f" ({method})")
            files[key] = f"{tmp}/qs_{method}.onnx"
            _quantize_static(str(task.model), calib, name, files[key], method)
        ref = task.collect(_session(files["fp32"], "disable"))  # the task's evaluation data and metric
        scores = {k: {lv: task.score(task.collect(_session(f, lv)), ref) for lv in LEVELS} for k, f in files.items()}
        kls = {k: {lv: float(s["kl"]) for lv, s in by_level.items()} for k, by_level in scores.items()}
        # each file against fp32 in its own ABBA-interleaved pair (lpcompile.runtime.ort.compare_latency);
        # a fixed round-robin over all sessions put fp32 first in every round and read it up to 20 % slow
        # against itself (control 0.82x, 2026-12-03)
        lats = {k: compare_latency(f, files["fp32"], dict(task.latency_feed), threads=2, runs=args.runs,
                                   sessions=args.sessions)
                for k, f in files.items()}  # fmt: skip
    print(f"{task.name}: KL on the task's evaluation data, {args.runs} ABBA batch-1 runs x {args.sessions} session "
          "pair(s) per file against fp32, 2 threads")  # fmt: skip
    head = f"{'file':38s} {'KL off':>9s} {'KL basic':>9s} {'KL all':>9s} {'top1=':>6s} {'ms':>8s} {'x fp32':>7s}"
    print(f"{head} {'95% interval':>13s}")
    for k, lat in lats.items():
        kl = kls[k]
        top1 = float(scores[k]["all"]["top1_agree"])  # agreement with fp32's top class at ORT_ENABLE_ALL
        lo, hi = lat.ratio_interval()
        print(f"{k:38s} {kl['disable']:9.4g} {kl['basic']:9.4g} {kl['all']:9.4g} {top1:6.3f} {lat.model_ms:8.2f} "
              f"{lat.ratio:7.2f} {lo:6.2f}-{hi:5.2f}")  # fmt: skip
        result["rows"].append(
            {"file": k, "kl": kl, "top1_agree_all": top1, "ms": lat.model_ms, "fp32_ms": lat.reference_ms,
             "x_fp32": lat.ratio, "x_fp32_ci95": [lo, hi]}
        )  # fmt: skip
    result["loadavg_end"] = os.getloadavg()
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
