"""Float zero points (issue 19, helper 19z): ``q4_1``-style formats on SmolLM2-135M.

SmolLM2's weights came as GGUF Q4_1 (blocks of 32 along the input dimension, fp16 scale ``d`` and fp16
min ``m``, decode ``q·d + m``). lpcompile's ``int4_asym_b32`` has an *integer* zero point, which cannot
express that grid; ``int4_asym_b32_zf16`` (= ``q4_1``) stores the float offset. This script scores, in
one run against one fp32 reference, every linear weight in one format (the tied embedding table and head
stay fp32, as for the peers of ``bench_peers_smollm2.py``), counted by ``harness.weight_bits``:

* uniform rows: each ``--formats`` entry, round-to-nearest (``--roundings`` adds e.g. ``gptq``);
* ``--peers hqq``: ONNX Runtime's HQQ b32 quantizer rebuilt in the same run (the 35.49 @ 6.0 bits row
  of ``results_peers_strong_smollm2.json``);
* ``--budgets 5,6``: mixed plans solved by lpcompile (streamed analysis, nearest rounding) over
  ``--mixed-formats`` (the new format among the candidates) at those bits of the linear weights.

Same task as ``bench_peers_smollm2.py``: perplexity over ``--eval-windows`` × 256 Lee test tokens, KL
and top-1 agreement of the next-token distribution vs fp32.

    python benchmarks/bench_float_zero_smollm2.py [--formats ...] [--peers hqq] [--budgets 5,6]

Writes ``benchmarks/results_float_zero_smollm2.json`` (``--out``) and prints the rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import BENCH_DIR, Context, prepare, remove_model_files, session, setup_logging, weight_bits

logger = logging.getLogger("bench_float_zero_smollm2")

FORMATS = ("int4_asym_b32_zf16", "int4_asym_b32", "int4_b32", "int4_asym_b32_sbf16_zbf16", "int5_asym_b32_zf16")
MIXED_FORMATS = ("int4_asym_b32_zf16", "int4_b32", "int4_b128", "int8", "bf16")


def skip_value_info_refresh() -> str:
    """Turn off ``passes.cleanup.refresh_value_info`` in this process (returns the note recorded in the JSON).

    It re-runs ONNX shape inference with ``data_prop=True`` over the rewritten model to fix stale value
    infos (best effort: it changes no weight and no op). On table-decoded weights (every grammar format,
    not only the float-offset ones: int4_asym_b32 and nf4 alike) that inference peaks at ~110 MB per
    576×1536 weight (measured on 8 such weights: 0.24 → 1.10 GB maxrss, 0.22 → 1.11 GB without moving
    the large initializers out), so SmolLM2's 210 weights were OOM-killed at 15.9 GB RSS on this 23 GB
    machine. Left for passes/cleanup.py (not this helper's file).
    """
    from lpcompile.passes import cleanup

    cleanup.refresh_value_info = lambda model: False  # type: ignore[assignment]
    return "passes.cleanup.refresh_value_info skipped (OOM on table decodes at this size; numerics unchanged)"


def uniform_linear(ctx: Context, fmt: str, rounding: str, out: Path) -> dict[str, Any]:
    """Every linear weight in ``fmt`` (tables and tied heads fp32), written for target ``qdq``."""
    from lpcompile.api import decide_uniform
    from lpcompile.config import ApplyConfig
    from lpcompile.files import apply_file, load_normalized

    model = load_normalized(ctx.task.model)
    plan = decide_uniform(model, fmt)
    nodes = tuple(dataclasses.replace(n, format="fp32", bits=32.0) if n.weight in ctx.tables else n for n in plan.nodes)
    plan = dataclasses.replace(plan, nodes=nodes)
    t0 = time.perf_counter()
    apply_file(
        ctx.task.model, out, plan=plan, calib_path=ctx.task.calib,
        config=ApplyConfig(target="qdq", rounding=rounding), force=True, model=model,
    )  # fmt: skip
    lin = [n for n in nodes if n.weight not in ctx.tables]
    return {
        "plan_bits": sum(n.bits * n.params for n in lin) / sum(n.params for n in lin),
        "apply_s": time.perf_counter() - t0,
    }



def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--formats", default=",".join(FORMATS), help="uniform formats of the linear weights")
    p.add_argument("--roundings", default="nearest", help="roundings of the uniform rows")
    p.add_argument("--peers", default="", help="'hqq': rebuild ORT's HQQ b32 in this run")
    p.add_argument("--budgets", default="", help="mixed-plan budgets (bits of the linear weights), e.g. 5,6")
    p.add_argument("--mixed-formats", default=",".join(MIXED_FORMATS))
    p.add_argument("--probes", type=int, default=8, help="analysis probes of the mixed plans")
    p.add_argument("--eval-windows", type=int, default=6, help="256-token Lee test windows scored")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--out", type=Path, default=BENCH_DIR / "results_float_zero_smollm2.json")
    args = p.parse_args()
    setup_logging()
    logger.setLevel(logging.INFO)
    import torch
    from bench_smollm2 import smollm2_task

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    task = smollm2_task(eval_windows=args.eval_windows)
    ctx = prepare(task)
    work = ctx.dir.parent.parent / "19z" / "smollm2"  # artifacts/19z/smollm2 (this helper's own cache)
    work.mkdir(parents=True, exist_ok=True)
    ref = task.collect(session(ctx.norm))
    rows: list[dict[str, Any]] = []
    result: dict[str, Any] = {
        "model": task.name, "notes": task.notes, "command": " ".join(sys.argv), "rows": rows,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "loadavg_start": os.getloadavg(),
        "weight_params": ctx.weight_params, "value_info": skip_value_info_refresh(),
    }  # fmt: skip

    def record(row: dict[str, Any]) -> None:
        row["loadavg"] = os.getloadavg()
        rows.append(row)
        logger.info("%s", {k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()})
        tmp = args.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=1, default=str))
        tmp.replace(args.out)

    def score(path: Path) -> dict[str, Any]:
        t0 = time.perf_counter()
        outs = task.collect(session(path))
        return {"bits": weight_bits(path, ctx), **task.score(outs, ref), "eval_s": time.perf_counter() - t0}

    record({"kind": "fp32", "method": "fp32", "bits": 32.0, **task.score(ref, ref)})
    for rounding in [r for r in args.roundings.split(",") if r]:
        for fmt in [f for f in args.formats.split(",") if f]:
            path = work / f"uniform_{fmt}_{rounding}.onnx"
            try:
                info = uniform_linear(ctx, fmt, rounding, path)
                row = {"kind": "uniform", "method": fmt, "rounding": rounding, **info, **score(path)}
            except Exception as exc:  # recorded, the run goes on
                logger.exception("%s failed", fmt)
                row = {"kind": "uniform", "method": fmt, "rounding": rounding, "error": f"{type(exc).__name__}: {exc}"}
            record(row)
            remove_model_files(path)
    if "hqq" in args.peers.split(","):
        from bench_peers_smollm2 import ort_nbits

        path = work / "peer_hqq_b32.onnx"
        t0 = time.perf_counter()
        info = ort_nbits(ctx, path, 32, False, "hqq")
        record({"kind": "peer", "method": "ort-nbits-hqq-asym-b32", **info, "build_s": time.perf_counter() - t0,
                **score(path)})  # fmt: skip
        remove_model_files(path)
    budgets = [float(b) for b in args.budgets.split(",") if b]
    if budgets:
        from bench_peers_smollm2 import lpcompile_build, lpcompile_table

        formats = tuple(f for f in args.mixed_formats.split(",") if f)
        result["mixed_candidates"] = list(formats)
        result["analysis_s"] = lpcompile_table(ctx, "nearest", formats, {"stream": "on", "probes": args.probes})
        for b in budgets:
            path = work / f"mixed_{b:g}.onnx"
            try:
                info = lpcompile_build(ctx, "nearest", formats, b, path)
                row = {"kind": "mixed", "method": f"lpcompile nearest {b:g}", "budget": b, **info, **score(path)}
            except Exception as exc:
                logger.exception("budget %g failed", b)
                row = {"kind": "mixed", "budget": b, "error": f"{type(exc).__name__}: {exc}"}
            record(row)
            remove_model_files(path)
    result["loadavg_end"] = os.getloadavg()
    args.out.write_text(json.dumps(result, indent=1, default=str))
    for r in rows:
        if "error" in r:
            print(f"{r['method']}: error {r['error'][:120]}")
        else:
            print(f"{r['method']:<40} {r.get('rounding', ''):<8} bits {r['bits']:.4f}  ppl {r['ppl']:.3f}  "
                  f"KL {r['kl']:.3e}  top1 {r['top1_agree']:.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
