"""lpcompile (GPTQ rounding) against the peers at their strongest settings on the Conv benchmark models.

Models: the Fashion-MNIST CNN (``bench_fashion_mnist.py``: 10,000 test images) and EfficientNet-Lite0
(``bench_efficientnet.py``: 224 crops of 8 photos), with their tasks' data, metrics and bits rule
(every weighted node's weight bits, as ``harness.weight_bits`` counts them).

Rows, all built and scored in one run:

* ``lpcompile gptq`` at every budget (candidates ``harness.LPC_FORMATS``, analysis and apply with
  ``rounding="gptq"``), and ``lpcompile nearest`` (today's default) beside it;
* ``lpcompile gptq @ peer bits``: lpcompile solved at the bits a peer reached (its bits are fixed);
* peers: NNCF ``compress_weights`` (INT4_SYM / INT4_ASYM with scale estimation, groups 32/64/128 or
  per channel; INT8_SYM), first with Conv weights included, then — when ONNX Runtime rejects the
  result or NNCF refuses — with Conv ignored; ONNX Runtime ``quantize_static`` QDQ (W8A8, W8A16,
  W4A8 / W4A16 with int4 per-channel weights); ONNX Runtime ``MatMulNBitsQuantizer`` (default and
  k-quant, symmetric/asymmetric, block 32) — MatMul only. A peer that fails is recorded with its error.

    python benchmarks/bench_peers_strong.py fashion_mnist_cnn [--budgets 4.25,4.5,5,6,8] [--peers all]
    python benchmarks/bench_peers_strong.py efficientnet_lite0 --threads 1

Writes ``benchmarks/results_peers_strong_<model>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (
    BENCH_DIR,
    BUDGETS,
    LPC_FORMATS,
    Context,
    _float_feeds,
    _lower_ir,
    _Reader,
    calib_batches,
    prepare,
    remove_model_files,
    save_proto,
    session,
    setup_logging,
    weight_bits,
)

logger = logging.getLogger("bench_peers_strong")


def _task(name: str) -> Any:
    if name == "fashion_mnist_cnn":
        from bench_fashion_mnist import fashion_task

        return fashion_task()
    if name == "efficientnet_lite0":
        from bench_efficientnet import efficientnet_task

        return efficientnet_task()
    raise SystemExit(f"unknown model {name!r}: fashion_mnist_cnn or efficientnet_lite0")


# ------------------------------------------------------------------------------------------
# peers


def _loads(ctx: Context, path: Path) -> None:
    """Raise when ONNX Runtime cannot load and run ``path`` on one calibration sample."""
    import onnx

    from lpcompile.runtime.ort import run

    proto = onnx.load(str(path), load_external_data=False)
    run(session(path), _float_feeds(calib_batches(ctx.task, 1, limit=1), proto)[0])


def nncf_peer(ctx: Context, out: Path, mode: str, group: int, *, se: bool, conv: bool) -> dict[str, Any]:
    """NNCF ``compress_weights`` (ratio 1: every weight in ``mode``) on the model raised to opset 21."""
    import nncf
    import onnx
    from nncf import CompressWeightsMode, SensitivityMetric
    from onnx import version_converter

    proto = onnx.load(str(ctx.norm))
    feeds = _float_feeds(calib_batches(ctx.task, ctx.task.nncf_batch, limit=64), proto)
    ignored = ["Gather"] if conv else ["Gather", "Conv"]
    kwargs: dict[str, Any] = {}
    if mode.startswith("INT4"):
        from nncf.quantization.advanced_parameters import AdvancedCompressionParameters, GroupSizeFallbackMode

        kwargs = dict(
            ratio=1.0,
            group_size=group,
            all_layers=True,
            sensitivity_metric=SensitivityMetric.HESSIAN_INPUT_ACTIVATION,
            dataset=nncf.Dataset(feeds),
            scale_estimation=se,
            # a K that the group does not divide (the CNN's 800-input Gemm): NNCF adjusts the group there
            advanced_parameters=AdvancedCompressionParameters(group_size_fallback_mode=GroupSizeFallbackMode.ADJUST),
        )
    q = nncf.compress_weights(
        version_converter.convert_version(proto, 21),
        mode=getattr(CompressWeightsMode, mode),
        ignored_scope=nncf.IgnoredScope(types=ignored, validate=False),
        **kwargs,
    )
    save_proto(_lower_ir(q), out)
    _loads(ctx, out)
    return {"mode": mode, "group": group, "scale_estimation": se, "conv": conv}


def nncf_best_effort(ctx: Context, out: Path, mode: str, group: int, se: bool) -> dict[str, Any]:
    """Conv included when NNCF and ONNX Runtime accept it, else Conv ignored (the note says which)."""
    try:
        return nncf_peer(ctx, out, mode, group, se=se, conv=True)
    except Exception as exc:
        info = nncf_peer(ctx, out, mode, group, se=se, conv=False)
        info["conv_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        return info


def ort_qdq(ctx: Context, out: Path, weight: str, activation: str) -> dict[str, Any]:
    """ONNX Runtime ``quantize_static`` QDQ, per-channel weights, MinMax activations (MatMul/Conv/Gemm)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    proto = onnx.load(str(ctx.norm), load_external_data=False)
    feeds = _float_feeds(calib_batches(ctx.task, 1, limit=64), proto)
    tmp = out.with_name(out.stem + ".tmp.onnx")
    quantize_static(
        str(ctx.norm),
        str(tmp),
        _Reader(feeds),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        weight_type=getattr(QuantType, weight),
        activation_type=getattr(QuantType, activation),
        op_types_to_quantize=["MatMul", "Conv", "Gemm"],
        calibrate_method=CalibrationMethod.MinMax,
    )
    save_proto(_lower_ir(onnx.load(str(tmp))), out)
    tmp.unlink(missing_ok=True)
    _loads(ctx, out)
    return {"weight": weight, "activation": activation}


def ort_nbits(ctx: Context, out: Path, block: int, symmetric: bool, algo: str) -> dict[str, Any]:
    """ONNX Runtime ``MatMulNBitsQuantizer`` (MatMul only: Conv and Gemm stay fp32)."""
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    config = mnq.KQuantWeightOnlyQuantConfig() if algo == "k_quant" else None
    q = mnq.MatMulNBitsQuantizer(onnx.load(str(ctx.norm)), block_size=block, is_symmetric=symmetric, algo_config=config)
    q.process()
    save_proto(q.model.model, out)
    _loads(ctx, out)
    return {"algo": algo, "block": block, "symmetric": symmetric}


PEERS: dict[str, Callable[[Context, Path], dict[str, Any]]] = {
    "nncf-int4sym-g32-se": lambda c, o: nncf_best_effort(c, o, "INT4_SYM", 32, True),
    "nncf-int4sym-g64-se": lambda c, o: nncf_best_effort(c, o, "INT4_SYM", 64, True),
    "nncf-int4sym-g128-se": lambda c, o: nncf_best_effort(c, o, "INT4_SYM", 128, True),
    "nncf-int4sym-pc-se": lambda c, o: nncf_best_effort(c, o, "INT4_SYM", -1, True),
    "nncf-int4asym-g32-se": lambda c, o: nncf_best_effort(c, o, "INT4_ASYM", 32, True),
    "nncf-int8sym": lambda c, o: nncf_best_effort(c, o, "INT8_SYM", -1, False),
    "ort-qdq-w8a8": lambda c, o: ort_qdq(c, o, "QInt8", "QUInt8"),
    "ort-qdq-w8a16": lambda c, o: ort_qdq(c, o, "QInt8", "QUInt16"),
    "ort-qdq-w4a8": lambda c, o: ort_qdq(c, o, "QInt4", "QUInt8"),
    "ort-qdq-w4a16": lambda c, o: ort_qdq(c, o, "QInt4", "QUInt16"),
    "ort-nbits-sym-b32": lambda c, o: ort_nbits(c, o, 32, True, "default"),
    "ort-nbits-asym-b32": lambda c, o: ort_nbits(c, o, 32, False, "default"),
    "ort-nbits-kquant-asym-b32": lambda c, o: ort_nbits(c, o, 32, False, "k_quant"),
}


# ------------------------------------------------------------------------------------------
# lpcompile


def lpcompile_table(
    ctx: Context, rounding: str, formats: tuple[str, ...], calib_path: Path, overrides: dict[str, Any]
) -> tuple[Any, float]:
    from lpcompile.analysis.config import AnalysisConfig
    from lpcompile.api import analyze
    from lpcompile.files import load_calib_for, load_normalized

    model = load_normalized(ctx.task.model)
    calib = load_calib_for(model, calib_path)
    cfg = AnalysisConfig(formats=formats, rounding=rounding, **{**dict(ctx.task.analysis), **overrides})
    t0 = time.perf_counter()
    table = analyze(model, calib, cfg)
    return table, time.perf_counter() - t0


def lpcompile_build(
    ctx: Context, table: Any, rounding: str, formats: tuple[str, ...], budget: float, out: Path, calib_path: Path
) -> dict[str, Any]:
    from lpcompile.api import decide
    from lpcompile.config import ApplyConfig, DecideConfig
    from lpcompile.files import apply_file

    plan = decide(table, f"{budget}bits", DecideConfig(formats=formats, target="qdq")).plan
    res = apply_file(
        ctx.task.model, out, plan=plan, calib_path=calib_path,
        config=ApplyConfig(target="qdq", rounding=rounding), force=True,
    )
    mix: dict[str, float] = {}
    for n in res.plan.nodes:
        mix[n.format] = mix.get(n.format, 0.0) + n.params
    total = sum(mix.values()) or 1.0
    return {"plan_bits": res.plan.achieved_bits, "mix": {f: round(v / total, 4) for f, v in sorted(mix.items())}}


# ------------------------------------------------------------------------------------------


def run_peers(
    ctx: Context,
    peers: Mapping[str, Callable[[Context, Path], dict[str, Any]]],
    names: list[str],
    work: Path,
    score: Callable[[Path], dict[str, Any]],
    record: Callable[[dict[str, Any]], None],
) -> list[tuple[str, float]]:
    """Build, score and record each peer in ``names`` (a failure is recorded with its first error line);
    the ``(name, bits)`` of those that ran. Each peer's files are removed after scoring."""
    peer_bits: list[tuple[str, float]] = []
    for name in names:
        path = work / f"peer_{name}.onnx"
        t0 = time.perf_counter()
        try:
            info = peers[name](ctx, path)
            row = {"kind": "peer", "method": name, "build_s": time.perf_counter() - t0, **info, **score(path)}
            peer_bits.append((name, row["bits"]))
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            row = {"kind": "peer", "method": name, "error": f"{type(exc).__name__}: {msg}"}
        record(row)
        remove_model_files(path)
    return peer_bits


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", choices=["fashion_mnist_cnn", "efficientnet_lite0"])
    p.add_argument("--budgets", default=",".join(f"{b:g}" for b in BUDGETS))
    p.add_argument("--peers", default="all", help=f"'all' or a comma list of: {', '.join(PEERS)}")
    p.add_argument("--roundings", default="gptq,nearest", help="lpcompile roundings (analysis and apply)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--calib-samples", type=int, default=0, help="lpcompile: first N calibration samples (0: all)")
    p.add_argument("--probes", type=int, default=0, help="lpcompile analysis probes (0: the task's)")
    p.add_argument("--extra-candidates", default="", help="formats added to lpcompile's candidates (e.g. int4_pc)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    setup_logging()
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    task = _task(args.model)
    ctx = prepare(task)
    out_json = args.out or BENCH_DIR / f"results_peers_strong_{task.name}.json"
    work = ctx.dir / "peers_strong"
    work.mkdir(parents=True, exist_ok=True)
    ref = task.collect(session(ctx.norm))
    rows: list[dict[str, Any]] = []
    result: dict[str, Any] = {"model": task.name, "notes": task.notes, "rows": rows, "loadavg_start": os.getloadavg()}

    def record(row: dict[str, Any]) -> None:
        rows.append(row)
        logger.info("%s", {k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()})
        tmp = out_json.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=1, default=str))
        tmp.replace(out_json)

    def score(path: Path) -> dict[str, Any]:
        outs = task.collect(session(path))
        return {"bits": weight_bits(path, ctx), **task.score(outs, ref)}

    peer_names = list(PEERS) if args.peers == "all" else [x for x in args.peers.split(",") if x]
    peer_bits = run_peers(ctx, PEERS, peer_names, work, score, record)

    budgets = [float(b) for b in args.budgets.split(",") if b]
    formats = (*LPC_FORMATS, *(f for f in args.extra_candidates.split(",") if f))
    result["candidates"] = list(formats)
    calib_path = Path(task.calib)
    if args.calib_samples:
        import numpy as np

        calib_path = ctx.dir / f"calib_first{args.calib_samples}.npz"
        with np.load(task.calib) as data:
            np.savez(calib_path, **{k: data[k][: args.calib_samples] for k in data.files})
    overrides: dict[str, Any] = {"probes": args.probes} if args.probes else {}
    result["lpcompile_calib"] = str(calib_path)
    result["lpcompile_overrides"] = overrides
    for rounding in [r for r in args.roundings.split(",") if r]:
        table, analysis_s = lpcompile_table(ctx, rounding, formats, calib_path, overrides)
        result[f"analysis_s_{rounding}"] = analysis_s
        targets = [(f"budget {b:g}", b) for b in budgets]
        if rounding == "gptq":
            targets += [(f"@ {n} bits", round(b, 4)) for n, b in peer_bits if b < 32]
        for label, b in targets:
            path = work / f"lpc_{rounding}_{b:g}.onnx"
            try:
                info = lpcompile_build(ctx, table, rounding, formats, b, path, calib_path)
                row = {"kind": "lpcompile", "rounding": rounding, "target": label, "budget": b, **info, **score(path)}
            except Exception as exc:
                row = {"kind": "lpcompile", "rounding": rounding, "target": label, "budget": b,
                       "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            record(row)
            path.unlink(missing_ok=True)
    result["loadavg_end"] = os.getloadavg()
    record_final = json.dumps(result, indent=1, default=str)
    out_json.write_text(record_final)
    print(format_table(rows, task.metrics))


def format_table(rows: list[Mapping[str, Any]], metrics: Any) -> str:
    keys = [m.key for m in metrics]
    head = "| method | target | bits | " + " | ".join(m.label for m in metrics) + " |"
    lines = [head, "|" + "---|" * (3 + len(keys))]
    for r in rows:
        what = r["method"] if r["kind"] == "peer" else f"lpcompile {r['rounding']}"
        target = r.get("target", "–")
        if "error" in r:
            lines.append(f"| {what} | {target} | – | error: {r['error'][:120]} |")
            continue
        vals = " | ".join(f"{r.get(k, float('nan')):.4g}" for k in keys)
        lines.append(f"| {what} | {target} | {r['bits']:.3f} | {vals} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
