"""ONNX Runtime CPU latency of lpcompile outputs against their fp32 source (issue 16).

For every benchmark model available offline, every budget of the benchmark table (lpcompile's
plan from the cached sensitivity table, formats ``harness.LPC_FORMATS``) and a few uniform formats,
the model is rewritten for each target and measured:

* latency: median batch-1 milliseconds of the rewritten model and of the fp32 source, interleaved
  run by run in this process (``lpcompile.runtime.ort.compare_latency``: ``ORT_ENABLE_ALL``,
  2 intra-op threads by default, ≥ 20 runs), and the ratio;
* size: the file's bytes and the average weight bits measured from its tensors
  (``harness.weight_bits``: codes, scales, and every tensor the rewrite added);
* quality: the task's metrics (``harness.Task.score``) of the outputs computed in ``"exact"``
  numerics against the fp32 outputs;
* the ops ORT still runs after its optimisations that decode weights per inference
  (``DequantizeLinear`` left after folding), and whether its optimised graph runs the fp32 model's
  kernels on the same shapes (``lpcompile.runtime.ort_kernels``: the ``kernels`` column says ``fp32``, or
  ``fp32 (Nᵀ)`` where N weights are laid out otherwise, e.g. a Gemm weight transposed with ``transB`` flipped);
* a 95 % bootstrap interval of each ratio over the interleaved rounds.

Targets: ``qdq`` (default, standard ONNX: weights decoded once at session start), ``ort``
(MatMulNBits for int4 MatMul weights, decode-once elsewhere); ``--before`` adds ``dq``: the same
plan written with per-run ``DequantizeLinear`` weights (what the ``qdq`` target wrote before issue
16; today the ``tvm`` target's form). The softmax follows ``passes.targets.softmax_pays`` (kept
as ``Softmax`` on ORT).

``plan`` rows use the default objective (``auto``: ``fast`` on ONNX Runtime); ``--size-plans`` adds
``plan-size``: ``--objective size`` over the same formats without ``bf16w`` (the default before), so the
speed and quality of the two are side by side.

``--w8a8-plans B,..`` adds, at those budgets, plans over the table's formats plus ``w8a8`` (W8A8 int8,
calibrated activation scale) and ``w8a8_dyn`` (W8A8 with per-run activation ranges), from a separate
analysis cached in ``artifacts/latency/<model>/sens_w8a8.json``, solved for each row's target with
``--objective size`` and ``--objective latency`` (``plan-w8a8-size``,
``plan-w8a8-latency``; the plan's predicted latency is recorded as ``predicted_x_fp32``).

    python benchmarks/latency.py [--models digits_mlp,digits_cnn,fashion_mnist_cnn,efficientnet_lite0,minilm,smollm2]
        [--budgets 4.25,4.5,5,6,8] [--targets qdq,ort] [--uniform int8,fp8_e4m3,int4_b128] [--before]
        [--latency-plans B,..] [--w8a8-plans B,..] [--runs 20] [--threads 2] [--no-quality] [--fresh]

Writes ``benchmarks/results_latency.json`` and prints a table. Timings on shared machines are
noisy: every ratio is measured side by side with fp32 in the same process, and ``uptime`` load is
recorded in the JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (
    ARTIFACTS,
    BENCH_DIR,
    BUDGETS,
    LPC_FORMATS,
    ROOT,
    Context,
    Metric,
    Task,
    analyze,
    file_bytes,
    prepare,
    session,
    setup_logging,
    weight_bits,
)

logger = logging.getLogger(__name__)

OUT_DIR = ROOT / "artifacts" / "latency"
UNIFORM = ("int8", "fp8_e4m3", "int4_b128")
DEFAULT_MODELS = ("digits_mlp", "digits_cnn", "fashion_mnist_cnn", "efficientnet_lite0", "minilm", "smollm2")
RUNS = {"digits_mlp": 300, "digits_cnn": 300, "fashion_mnist_cnn": 200, "smollm2": 20}
"""Timed runs per model where one run is well under a millisecond (more runs, steadier medians)."""


# ------------------------------------------------------------------------------------------
# models


def _digits_cnn_task() -> Task:
    from common import classifier_scores, run_batched

    models = ROOT / "examples" / "models"
    x = np.load(models / "digits_heldout.npz")["pixels"].astype(np.float32)
    labels = np.load(models / "digits_heldout_labels.npy")

    def collect(sess: object) -> dict[str, np.ndarray]:
        return run_batched(sess, {"pixels": x}, 128)

    def score(out: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> dict[str, float]:
        return classifier_scores(out["logits"], ref["logits"], labels)

    return Task(
        name="digits_cnn",
        model=models / "digits_cnn.onnx",
        calib=models / "digits_calib.npz",
        collect=collect,
        score=score,
        metrics=(Metric("kl", "KL", False, "{:.2e}"), Metric("accuracy", "acc", True, "{:.3f}")),
        latency_feed={"pixels": x[:1]},
        analysis={"probes": 16, "batch_size": 64},
    )


def _task(name: str) -> Task:
    if name == "digits_mlp":
        from bench_digits import digits_task

        return digits_task()
    if name == "digits_cnn":
        return _digits_cnn_task()
    if name == "fashion_mnist_cnn":
        from bench_fashion_mnist import fashion_task

        return fashion_task()
    if name == "efficientnet_lite0":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from bench_efficientnet import efficientnet_task

        return efficientnet_task()
    if name == "minilm":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from bench_minilm import minilm_task

        return minilm_task()
    if name == "smollm2":
        from bench_smollm2 import smollm2_task

        task = smollm2_task(eval_windows=4)  # 4×256 tokens for quality: 2 shared cores
        # the segment-streamed analysis (issue 18): the same table in a third of the memory
        return dataclasses.replace(task, analysis={**dict(task.analysis), "stream": "on"})
    raise ValueError(f"unknown model {name!r}; known: {', '.join(DEFAULT_MODELS)}")


# ------------------------------------------------------------------------------------------
# building


def _write(ctx: Context, plan: Any, target: str, out: Path) -> dict[str, Any]:
    """Rewrite the task's model by ``plan`` for ``target`` (``dq``: the ``tvm`` target's per-run
    DequantizeLinear weights and FP8 Q/DQ activations, i.e. what ``qdq`` wrote before issue 16)."""
    from lpcompile.config import ApplyConfig
    from lpcompile.files import apply_file

    res = apply_file(
        ctx.task.model,
        out,
        plan=plan,
        calib_path=ctx.task.calib,
        config=ApplyConfig(target="tvm" if target == "dq" else target),
        force=True,
    )
    return {"plan_bits": res.plan.achieved_bits, "softmax_substituted": len(res.softmax_substituted)}


def _plan(
    ctx: Context,
    budget: float | None,
    uniform: str | None,
    formats: tuple[str, ...] = LPC_FORMATS,
    objective: str = "auto",
) -> Any:
    """The plan (softmax resolved for ORT: kept) at ``budget`` from the cached table, or a uniform one."""
    from lpcompile.api import decide, decide_uniform
    from lpcompile.config import DecideConfig
    from lpcompile.files import load_normalized

    if uniform is not None:
        return decide_uniform(load_normalized(ctx.task.model), uniform, target="qdq")
    return decide(ctx.table, f"{budget}bits", DecideConfig(formats=formats, target="qdq", objective=objective)).plan


W8A8_FORMATS = (*LPC_FORMATS, "w8a8", "w8a8_dyn")
"""Formats of the ``plan-w8a8`` variant: the table's formats plus W8A8 int8."""


def _w8a8_table(ctx: Context) -> Any:
    """A sensitivity table that also scores ``w8a8`` and ``w8a8_dyn`` (its own cache: ``sens.json`` is not touched)."""
    from harness import ANALYSIS_FORMATS

    from lpcompile.analysis.config import AnalysisConfig
    from lpcompile.analysis.table import SensitivityTable
    from lpcompile.files import analyze_file

    cfg = AnalysisConfig(formats=(*ANALYSIS_FORMATS, "w8a8", "w8a8_dyn"), **dict(ctx.task.analysis))
    path = OUT_DIR / ctx.task.name / "sens_w8a8.json"
    meta = path.with_suffix(".meta.json")
    if path.exists() and meta.exists() and json.loads(meta.read_text()).get("config") == repr(cfg):
        return SensitivityTable.load(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    table = analyze_file(ctx.task.model, ctx.task.calib, cfg)
    table.save(path)
    meta.write_text(json.dumps({"config": repr(cfg), "wall_s": time.perf_counter() - t0}))
    return table


def _w8a8_plan(ctx: Context, table: Any, budget: float, objective: str, target: str = "ort") -> Any:
    """The budget solved over :data:`W8A8_FORMATS` for ``target`` with ``objective``."""
    from lpcompile.api import decide
    from lpcompile.config import DecideConfig

    cfg = DecideConfig(formats=W8A8_FORMATS, target=target, objective=objective)  # type: ignore[arg-type]
    return decide(table, f"{budget}bits", cfg).plan


#: ops of the ORT_ENABLE_ALL graph that still decode or round per inference
PER_RUN_OPS = (
    "DequantizeLinear",
    "QuantizeLinear",
    "Cast",
    "com.microsoft.MatMulNBits",
    "com.microsoft.MatMulIntegerToFloat",
    "lpcompile.TwoPassSoftmax",
)


def _per_run_decodes(steps: tuple[Any, ...]) -> dict[str, int]:
    """Counts of :data:`PER_RUN_OPS` among the optimised graph's nodes (``ort_kernels.kernel_steps``)."""
    counts: dict[str, int] = {}
    for s in steps:
        if s.op in PER_RUN_OPS:
            counts[s.op] = counts.get(s.op, 0) + 1
    return counts


def _mix(plan: Any) -> dict[str, float]:
    mix: dict[str, float] = {}
    for n in plan.nodes:
        mix[n.format] = mix.get(n.format, 0.0) + n.params
    total = sum(mix.values()) or 1.0
    return {f: round(v / total, 4) for f, v in sorted(mix.items())}


# ------------------------------------------------------------------------------------------
# measuring


def measure(
    ctx: Context,
    key: str,
    build: Callable[[Path], dict[str, Any]],
    ref_out: dict[str, np.ndarray] | None,
    runs: int,
    threads: int,
    batch: int,
    fresh: bool,
    sessions: int = 1,
    ref_steps: tuple[Any, ...] = (),
) -> dict[str, Any]:
    """Build one variant and measure latency (vs fp32), size, bits and quality (cached as JSON).

    ``ref_steps``: the fp32 model's ``kernel_steps`` (read here when not given)."""
    from lpcompile.errors import LpError
    from lpcompile.runtime.ort import compare_latency, latency_inputs
    from lpcompile.runtime.ort_kernels import compare_kernels, kernel_steps

    cache = OUT_DIR / ctx.task.name / f"{key}.json"
    if cache.exists() and not fresh:
        return json.loads(cache.read_text())
    path = OUT_DIR / ctx.task.name / f"{key}.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    row: dict[str, Any] = {"key": key}
    t0 = time.perf_counter()
    row.update(build(path))
    row["build_s"] = time.perf_counter() - t0
    row["bits"] = weight_bits(path, ctx)
    row["file_bytes"] = file_bytes(path)
    proto = onnx.load(str(path), load_external_data=False)
    row["contrib_ops"] = sorted({n.domain for n in proto.graph.node if n.domain not in ("", "ai.onnx")})
    try:
        steps = kernel_steps(path)  # ORT's optimised graph, read once for both
        row["per_run_ops"] = _per_run_decodes(steps)
        row["kernels"] = compare_kernels(steps, ref_steps or kernel_steps(ctx.task.model)).to_dict()
        lat = compare_latency(
            path, ctx.task.model, ctx.task.latency_feed, threads=threads, runs=runs, sessions=sessions
        )
    except LpError as exc:  # e.g. ORT's QDQ transforms at ORT_ENABLE_ALL reject FP8 Q/DQ graphs
        row["latency_note"] = f"ORT_ENABLE_ALL failed ({str(exc)[:200]}); both timed with exact numerics"
        logger.warning("%s: %s", key, row["latency_note"])
        lat = compare_latency(path, ctx.task.model, ctx.task.latency_feed, threads=threads, runs=runs, numerics="exact")
    row.update(fp32_ms=lat.reference_ms, ms=lat.model_ms, ratio=lat.ratio, runs=lat.runs, threads=lat.threads)
    row["sessions"] = sessions
    row["ratio_ci95"] = list(lat.ratio_interval())
    if batch > 1:
        from lpcompile.frontend.calib import load_calibration

        feed = latency_inputs(ctx.task.model, load_calibration(ctx.task.calib), batch)
        lb = compare_latency(path, ctx.task.model, feed, threads=threads, runs=max(10, runs // 4))
        row.update({f"fp32_ms_b{batch}": lb.reference_ms, f"ms_b{batch}": lb.model_ms, f"ratio_b{batch}": lb.ratio})
    if ref_out is not None:
        t1 = time.perf_counter()
        row.update(ctx.task.score(ctx.task.collect(session(path)), ref_out))
        row["eval_s"] = time.perf_counter() - t1
    cache.write_text(json.dumps(row, indent=1, default=_json_default))
    for p in (path, path.with_name(path.name + ".data"), path.with_name(path.stem + ".plan.json")):
        if p.exists():
            p.unlink()
    return row


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o))


def run_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    from lpcompile.passes.targets import latency_formats
    from lpcompile.runtime.ort import compare_latency
    from lpcompile.runtime.ort_kernels import kernel_steps

    task = _task(name)
    ctx = prepare(task, ARTIFACTS)
    budgets = [float(b) for b in args.budgets.split(",") if b]
    if budgets:  # uniform formats alone need no sensitivity table
        t0 = time.perf_counter()
        analyze(ctx)
        logger.info("%s: sensitivity table ready (%.1fs, cached across runs)", name, time.perf_counter() - t0)
    ref_out = task.collect(session(task.model)) if not args.no_quality else None
    runs = args.runs or RUNS.get(name, 30)
    fp32 = {"key": "fp32", "file_bytes": file_bytes(Path(task.model)), "bits": weight_bits(ctx.norm, ctx)}
    # control: the fp32 model against itself (two sessions), the noise floor of every ratio below
    ctl = compare_latency(
        task.model, task.model, task.latency_feed, threads=args.threads, runs=runs, sessions=args.sessions
    )
    fp32.update(fp32_ms=ctl.reference_ms, control_ms=ctl.model_ms, control_ratio=ctl.ratio, runs=ctl.runs)
    fp32["control_ci95"] = list(ctl.ratio_interval())
    logger.info("%s: fp32 %.3f ms; fp32 vs itself %.3fx (noise floor)", name, ctl.reference_ms, ctl.ratio)
    rows = [fp32]
    ref_steps = kernel_steps(task.model)  # the fp32 graph as ORT runs it, compared with every row
    targets = [t for t in args.targets.split(",") if t] + (["dq"] if args.before else [])
    fast_formats = latency_formats("qdq", LPC_FORMATS, "latency")
    for budget in budgets:
        variants = [("plan", LPC_FORMATS, targets)]
        if args.size_plans:  # the size objective over the formats of before issue 16 (bf16 and FP8 included)
            variants.append(("plan-size", tuple(f for f in LPC_FORMATS if f != "bf16w"), targets))
        if args.latency_plans and budget in {float(b) for b in args.latency_plans.split(",") if b}:
            variants.append(("plan-latency", fast_formats, [t for t in targets if t != "dq"]))
        if args.w8a8_plans and budget in {float(b) for b in args.w8a8_plans.split(",") if b}:
            for objective in ("size", "latency"):
                variants.append((f"plan-w8a8-{objective}", W8A8_FORMATS, [t for t in targets if t != "dq"]))
        w8a8_table = _w8a8_table(ctx) if any(v.startswith("plan-w8a8-") for v, _, _ in variants) else None
        for variant, formats, tgts in variants:
            if w8a8_table is None or not variant.startswith("plan-w8a8-"):
                plan = _plan(ctx, budget, None, formats, "size" if variant == "plan-size" else "auto")
            for target in tgts:
                if w8a8_table is not None and variant.startswith("plan-w8a8-"):  # solved for the row's target
                    plan = _w8a8_plan(ctx, w8a8_table, budget, variant.rsplit("-", 1)[1], target)
                key = f"{variant}@{budget:g}/{target}"
                row = measure(
                    ctx,
                    key,
                    lambda p, t=target, pl=plan: _write(ctx, pl, t, p),
                    None if target == "dq" else ref_out,  # dq: the qdq weights bit for bit; exact numerics equal
                    runs,
                    args.threads,
                    args.batch,
                    args.fresh,
                    args.sessions,
                    ref_steps,
                )
                row.update(variant=variant, budget=budget, target=target, mix=_mix(plan), formats=list(formats))
                if "latency" in plan.metadata:
                    row["predicted_x_fp32"] = plan.metadata["latency"]["predicted_x_fp32"]
                rows.append(row)
                logger.info("%s %s: %.2fx fp32, %.3f bits", name, key, row["ratio"], row["bits"])
    for fmt in [f for f in args.uniform.split(",") if f]:
        plan = _plan(ctx, None, fmt)
        for target in targets:
            key = f"uniform-{fmt}/{target}"
            row = measure(
                ctx,
                key,
                lambda p, t=target, pl=plan: _write(ctx, pl, t, p),
                None if target == "dq" else ref_out,
                runs,
                args.threads,
                args.batch,
                args.fresh,
                args.sessions,
                ref_steps,
            )
            row.update(variant=f"uniform-{fmt}", budget=None, target=target)
            rows.append(row)
            logger.info("%s %s: %.2fx fp32, %.3f bits", name, key, row["ratio"], row["bits"])
    return {
        "model": name,
        "file": Path(task.model).name,
        "weight_params": ctx.weight_params,
        "metrics": [m.__dict__ for m in task.metrics],
        "rows": rows,
    }


# ------------------------------------------------------------------------------------------
# table


def _kernels_label(k: dict[str, Any] | None) -> str:
    """``fp32`` (the fp32 graph's kernels on the same shapes), ``fp32 (Nᵀ)`` (the same but N weights laid
    out otherwise, e.g. a Gemm's ``transB`` flipped), ``other``, or ``–`` (not checked)."""
    if not k:
        return "–"
    if k.get("same_kernels"):
        return "fp32"
    if k.get("same_ops"):
        return f"fp32 ({k.get('layout_changes', 0)}ᵀ)"
    return "other"


def format_table(results: list[dict[str, Any]]) -> str:
    lines = []
    head = (
        f"{'model':<20} {'variant':<22} {'target':<6} {'bits':>6} {'MB':>7} {'fp32 ms':>8} {'ms':>8} {'ratio':>6}"
        f" {'95% interval':>12} {'kernels':>8}  quality"
    )
    lines.append(head)
    lines.append("-" * len(head))
    for res in results:
        primary = res["metrics"][0]
        for r in res["rows"]:
            if r["key"] == "fp32":
                ctl = r.get("control_ratio")
                lines.append(
                    f"{res['model']:<20} {'fp32 (vs itself)':<22} {'':<6} {r['bits']:6.2f}"
                    f" {r['file_bytes'] / 1e6:7.2f} "
                    + (f"{r['fp32_ms']:8.3f} {r['control_ms']:8.3f} {ctl:5.2f}x" if ctl is not None else "")
                )
                continue
            variant = r["variant"] if r["budget"] is None else f"{r['variant']}@{r['budget']:g}bits"
            q = r.get(primary["key"])
            qs = f"{primary['label']} {primary['fmt'].format(q)}" if q is not None else ""
            ci = r.get("ratio_ci95") or [float("nan")] * 2
            same = _kernels_label(r.get("kernels"))
            lines.append(
                f"{res['model']:<20} {variant:<22} {r['target']:<6} {r['bits']:6.3f} {r['file_bytes'] / 1e6:7.2f} "
                f"{r['fp32_ms']:8.3f} {r['ms']:8.3f} {r['ratio']:5.2f}x {ci[0]:5.2f}-{ci[1]:5.2f}"
                f" {same:>8}  {qs}"
            )
    return "\n".join(lines)


def markdown(results: list[dict[str, Any]]) -> str:
    """One markdown table per model: latency ratio vs fp32 per target, bits, size, primary quality."""
    out = []
    for res in results:
        primary = res["metrics"][0]
        rows = {(r.get("variant"), r.get("budget"), r.get("target")): r for r in res["rows"] if r["key"] != "fp32"}
        fp32 = next(r for r in res["rows"] if r["key"] == "fp32")
        out.append(
            f"#### {res['model']} ({res['weight_params']:,} weights; fp32 {fp32.get('fp32_ms', 0):.3f} ms, "
            f"{fp32['file_bytes'] / 1e6:.2f} MB; fp32 vs itself {fp32.get('control_ratio', float('nan')):.2f}x)"
        )
        out.append("")
        out.append(
            f"| variant | bits qdq | MB qdq | {primary['label']} qdq | qdq × fp32 | qdq 95 % | qdq kernels "
            f"| ort × fp32 | ort predicted | bits ort | {primary['label']} ort | before (dq) × fp32 | bits before |"
        )
        out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        keys = sorted({(v, b) for v, b, _ in rows}, key=lambda k: (k[1] is None, k[0] != "plan", k[1] or 0, k[0]))
        for v, b in keys:
            q, o, d = (rows.get((v, b, t), {}) for t in ("qdq", "ort", "dq"))
            name = v if b is None else f"{v}@{b:g}"

            def f(r: dict[str, Any], k: str, spec: str) -> str:
                return spec.format(r[k]) if k in r and r[k] is not None else "–"

            ci = q.get("ratio_ci95")
            same = _kernels_label(q.get("kernels"))
            out.append(
                f"| {name} | {f(q, 'bits', '{:.3f}')} | {f(q, 'file_bytes', '{:.0f}')} | "
                f"{f(q, primary['key'], primary['fmt'])} | {f(q, 'ratio', '{:.2f}')} | "
                f"{f'{ci[0]:.2f}–{ci[1]:.2f}' if ci else '–'} | "
                f"{same} | {f(o, 'ratio', '{:.2f}')} | "
                f"{f(o, 'predicted_x_fp32', '{:.2f}')} | "
                f"{f(o, 'bits', '{:.3f}')} | {f(o, primary['key'], primary['fmt'])} | {f(d, 'ratio', '{:.2f}')} | "
                f"{f(d, 'bits', '{:.3f}')} |"
            )
        out.append("")
    return "\n".join(out).replace("| MB qdq |", "| bytes qdq |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(DEFAULT_MODELS))
    p.add_argument("--budgets", default=",".join(f"{b:g}" for b in BUDGETS))
    p.add_argument("--targets", default="qdq,ort")
    p.add_argument("--uniform", default=",".join(UNIFORM), help="uniform formats also measured ('' for none)")
    p.add_argument("--before", action="store_true", help="also the per-run DequantizeLinear form ('dq')")
    p.add_argument(
        "--latency-plans",
        default="",
        metavar="BUDGETS",
        help="at these budgets also plans from the formats ORT runs fast (latency_formats: no activation rounding)",
    )
    p.add_argument(
        "--w8a8-plans",
        default="",
        metavar="BUDGETS",
        help="at these budgets also plans over the formats + w8a8 (own analysis), objective size and latency (ort)",
    )
    p.add_argument(
        "--size-plans",
        action="store_true",
        help="also the plans of --objective size over the formats without bf16w ('plan-size': the default before "
        "the fast objective), from the same table",
    )
    p.add_argument("--runs", type=int, default=0, help="timed batch-1 runs per model (default 30; 200-300 sub-ms)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sessions", type=int, default=1,
                   help="fresh session pairs per ratio, created in alternating order (--runs rounds each)")
    p.add_argument("--batch", type=int, default=1, help="also time this batch size (> 1)")
    p.add_argument("--no-quality", action="store_true")
    p.add_argument("--fresh", action="store_true", help="ignore cached variant rows")
    p.add_argument("--out", type=Path, default=BENCH_DIR / "results_latency.json")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--markdown", action="store_true", help="print markdown tables from --out and exit")
    args = p.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.out.read_text())["results"]))
        return
    setup_logging(args.verbose)
    logger.setLevel(logging.INFO)
    results = []
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    for name in [m for m in args.models.split(",") if m]:
        try:
            results.append(run_model(name, args))
        except (ImportError, FileNotFoundError, OSError) as exc:
            logger.warning("%s skipped: %s", name, exc)
    summary = {
        "benchmark": "ONNX Runtime CPU latency vs fp32 (batch 1, interleaved, same process)",
        "onnxruntime": __import__("onnxruntime").__version__,
        "threads": args.threads,
        "cores": os.cpu_count(),
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "total_s": time.perf_counter() - t0,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "results": results,
    }
    if args.out.exists():  # keep models measured by earlier invocations
        old = json.loads(args.out.read_text())
        names = {r["model"] for r in results}
        summary["results"] = [r for r in old.get("results", []) if r["model"] not in names] + results
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=1, default=_json_default))
    os.replace(tmp, args.out)
    print(format_table(summary["results"]))


if __name__ == "__main__":
    main()
