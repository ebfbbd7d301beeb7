"""Every weight counts (issue 13): a budget over every weight of the model versus today's MatMul-only plan.

For each language model (``minilm``, ``smollm2``) one sensitivity table is analysed (the harness's
cached ``sens.json``) and both plans are solved from it, for each ``--targets`` entry:

* ``all``: ``--budget`` bits over every weight, embedding tables and tied heads included;
* ``matmul-only``: today's plan — the embedding tables (and the heads tied to them) kept fp32 by a
  ``--keep`` rule, and ``--budget`` bits over the other weights (the solver's bits budget is then
  ``(B·P_other + 32·P_tables) / P_all``, the same plan as a budget over the MatMul weights alone).

Each plan is written by ``lpcompile apply`` (``files.apply_file``) and measured from the file:
the written model plus external data against the fp32 files, bits per weight counted from the
file's tensors (:func:`harness.model_bits`, and lpcompile's own recognizer
:func:`lpcompile.graph.weight_coverage`) beside the bits the plan reports, and the task's quality
metrics run in ONNX Runtime (MiniLM: 1−cos of the sentence embedding on 400 held-out Lee
sentences; SmolLM2: perplexity on the first ``--eval-windows`` × 256 tokens of the Lee test
articles).

``efficientnet`` measures feasibility from shapes: the smallest feasible budget, the bits of the
uniform int4 plans (planned and measured from the written files), and the wall time of
``python -m lpcompile MODEL --budget 4.1bits`` failing (a subprocess, median of ``--repeat``),
beside the time of the imports alone and of the in-process check.

    python benchmarks/bench_coverage.py [--models minilm,efficientnet,smollm2] [--budget 4.5]
        [--targets qdq,ort] [--eval-windows 4]

Writes ``benchmarks/results_coverage.json`` (one key per model; a run with fewer models keeps the
others) and prints a table per model.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (
    ARTIFACTS,
    BENCH_DIR,
    LPC_FORMATS,
    ROOT,
    Context,
    Task,
    analyze,
    file_bytes,
    model_bits,
    prepare,
    remove_model_files,
    session,
    setup_logging,
    weight_bits,
)

logger = logging.getLogger("bench_coverage")

OUT_JSON = BENCH_DIR / "results_coverage.json"
UNIFORM_INT4 = ("int4_b128", "int4_b64", "int4_b32")


def _table_rule(table: Any, tables: frozenset[str]) -> Any:
    """A ``--keep`` rule pinning every node of an embedding table's group (the Gather and tied heads) to fp32."""
    from lpcompile.solver.problem import KeepRule

    names = [n.name for n in table.nodes if n.weight in tables]
    return KeepRule("^(?:" + "|".join(re.escape(x) for x in names) + ")$", ("fp32",), spec="embedding tables=fp32")


def _file_weight_bits(path: Path) -> tuple[float, int]:
    """Σ stored bits and weights of the weights lpcompile's recognizer finds in the file (quantized or float)."""
    import onnx_ir as ir

    from lpcompile.graph import find_weight_nodes, weight_coverage

    model = ir.load(str(path))
    cov = weight_coverage(model)
    q = [k for k in cov.kept if k.reason == "already-quantized"]
    fp = find_weight_nodes(model)  # weights left in float (fp32 plan choices)
    bits = sum(k.bits * k.params for k in q) + sum(n.params * (16 if n.dtype != "float32" else 32) for n in fp)
    return bits, sum(k.params for k in q) + sum(n.params for n in fp)


def _plan_summary(plan: Any, tables: frozenset[str]) -> dict[str, Any]:
    seen: set[str] = set()
    total_bits = total = 0.0
    mix: dict[str, float] = {}
    for a in plan.nodes:
        if a.weight in seen:
            continue
        seen.add(a.weight)
        total_bits += a.bits * a.params
        total += a.params
        mix[a.format] = mix.get(a.format, 0.0) + a.params
    group = [
        {"node": a.name, "op": a.op_type, "weight": a.weight, "format": a.format, "bits": round(a.bits, 4)}
        for a in plan.nodes
        if a.weight in tables
    ]
    return {
        "plan_bits": total_bits / total,
        "plan_total_bits": total_bits,
        "mix": {f: round(v / total, 4) for f, v in sorted(mix.items())},
        "tables": group,
    }


def lm_rows(task: Task, budget: float, targets: Sequence[str], keep_models: bool = False) -> dict[str, Any]:
    """The ``all`` and ``matmul-only`` plans of ``task`` at ``budget`` bits, per target, from one table."""
    from lpcompile.api import decide
    from lpcompile.config import ApplyConfig, DecideConfig
    from lpcompile.feasibility import retarget_table
    from lpcompile.files import apply_file, load_normalized
    from lpcompile.graph import find_weight_nodes

    ctx: Context = prepare(task)
    t0 = time.perf_counter()
    table = analyze(ctx)
    logger.info(
        "%s: table of %d nodes (analysis %.0f s, cached: %s)",
        task.name,
        len(table.nodes),
        ctx.analysis_s,
        time.perf_counter() - t0 < 60,
    )
    nodes = find_weight_nodes(load_normalized(task.model))
    p_tab = sum(n.params for n in {n.weight: n for n in nodes if n.weight in ctx.tables}.values())
    p_all = ctx.model_params
    mm_budget = (budget * (p_all - p_tab) + 32.0 * p_tab) / p_all
    t1 = time.perf_counter()
    ref = task.collect(session(ctx.norm))
    fp32 = {
        "plan": "fp32",
        "target": "-",
        "file_bytes": ctx.fp32_bytes,
        "size_ratio": 1.0,
        "model_bits": model_bits(ctx.norm, ctx),
        "bits": weight_bits(ctx.norm, ctx),
        "eval_s": time.perf_counter() - t1,
        **task.score(ref, ref),
    }
    rows = [fp32]
    out_dir = ctx.dir / "coverage"
    out_dir.mkdir(parents=True, exist_ok=True)
    for target in targets:
        t_table = retarget_table(table, nodes, target)
        for kind in ("matmul-only", "all"):
            keep = (_table_rule(table, ctx.tables),) if kind == "matmul-only" else ()
            b = mm_budget if kind == "matmul-only" else budget
            cfg = DecideConfig(formats=LPC_FORMATS, keep=keep, target=target)
            plan = decide(t_table, f"{b:.6f}bits", cfg).plan
            out = out_dir / f"{kind}_{budget:g}_{target}.onnx"
            t2 = time.perf_counter()
            res = apply_file(
                task.model, out, plan=plan, calib_path=task.calib, config=ApplyConfig(target=target), force=True
            )
            row: dict[str, Any] = {
                "plan": kind,
                "target": target,
                "solver_budget_bits": b,
                "apply_s": time.perf_counter() - t2,
                **_plan_summary(res.plan, ctx.tables),
            }
            size = file_bytes(out)
            fb, fp = _file_weight_bits(out)
            mb = model_bits(out, ctx)
            row.update(
                file_bytes=size,
                size_ratio=size / ctx.fp32_bytes,
                model_bits=mb,
                bits=weight_bits(out, ctx),
                # every stored weight-derived tensor of the file (harness rule) against the plan's count
                plan_equals_file=abs(mb * p_all - row["plan_total_bits"]) <= 1e-9 * row["plan_total_bits"],
                # lpcompile's own recognizer (graph.weight_coverage): misses weights it does not recognise
                recognised_bits=fb / fp if fp else None,
                recognised_weights=fp,
            )
            t3 = time.perf_counter()
            try:
                outs = task.collect(session(out))
                row.update(task.score(outs, ref), eval_s=time.perf_counter() - t3, runs_in_ort=True)
            except Exception as exc:  # recorded: "runs in ORT" is an acceptance item
                row.update(runs_in_ort=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
            rows.append(row)
            logger.info("%s %s %s: %s", task.name, kind, target, _brief(row, task))
            if not keep_models:
                remove_model_files(out)
    primary = task.metrics[0].key
    ratios = {}
    for target in targets:
        r_all = next(r for r in rows if r["plan"] == "all" and r["target"] == target)
        r_mm = next(r for r in rows if r["plan"] == "matmul-only" and r["target"] == target)
        if primary in r_all and primary in r_mm:
            ratios[target] = r_all[primary] / r_mm[primary]
    return {
        "model": str(Path(task.model).name),
        "notes": task.notes,
        "budget_bits": budget,
        "matmul_only_solver_budget_bits": mm_budget,
        "params_all": p_all,
        "params_tables": p_tab,
        "fp32_bytes": ctx.fp32_bytes,
        "analysis": {
            "wall_s": ctx.analysis_s,
            "nodes": len(table.nodes),
            "table": str(ctx.dir / "sens.json"),
            "settings": dict(task.analysis),
            "timings": dict(table.timings),
        },
        "primary": primary,
        "all_over_matmul_only": ratios,
        "rows": rows,
    }


def _brief(row: dict[str, Any], task: Task) -> str:
    m = task.metrics[0]
    val = row.get(m.key)
    return (
        f"plan {row['plan_bits']:.4f} b, file {row['model_bits']:.4f} b, size ×{row['size_ratio']:.3f}, "
        f"{m.key} {val if val is None else m.fmt.format(val)}" + (f" ERROR {row['error']}" if "error" in row else "")
    )


def lm_table(res: dict[str, Any], task: Task) -> str:
    metrics = task.metrics
    head = [
        "plan",
        "target",
        "plan bits",
        "file bits",
        "bits (linear)",
        "MB",
        "size ×fp32",
        *[m.label for m in metrics],
        "tables",
    ]
    lines = [" | ".join(head)]
    for r in res["rows"]:
        tab = ", ".join(sorted({t["format"] for t in r.get("tables", [])})) or "-"
        cells = [
            r["plan"],
            r["target"],
            f"{r['plan_bits']:.4f}" if "plan_bits" in r else "-",
            f"{r['model_bits']:.4f}",
            f"{r['bits']:.4f}",
            f"{r['file_bytes'] / 1e6:.2f}",
            f"{r['size_ratio']:.3f}",
            *[m.fmt.format(r[m.key]) if r.get(m.key) is not None else "-" for m in metrics],
            tab,
        ]
        lines.append(" | ".join(cells))
    lines.append(
        f"{res['primary']} all / matmul-only: "
        + ", ".join(f"{t} {v:.3f}" for t, v in res["all_over_matmul_only"].items())
    )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# EfficientNet-Lite0: feasibility from shapes


def _median_wall(cmd: Sequence[str], repeat: int) -> tuple[float, int, str]:
    walls = []
    rc, err = 0, ""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for _ in range(repeat):
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, check=False)
        walls.append(time.perf_counter() - t0)
        rc, err = p.returncode, (p.stderr.strip().splitlines() or [""])[-1]
    return statistics.median(walls), rc, err


def _import_seconds(cmd: Sequence[str]) -> dict[str, Any]:
    """One run of ``cmd`` under ``python -X importtime``: seconds spent importing (top-level imports
    summed), the run's wall time, and the slowest top-level packages."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    p = subprocess.run(
        [cmd[0], "-X", "importtime", *cmd[1:]], capture_output=True, text=True, cwd=ROOT, env=env, check=False
    )
    wall = time.perf_counter() - t0
    top: dict[str, float] = {}
    for line in p.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \| (\S.*)$", line)
        if m:  # no indentation before the name: a top-level import (its cumulative time includes its children)
            top[m.group(3)] = top.get(m.group(3), 0.0) + int(m.group(2)) / 1e6
    slowest = dict(sorted(top.items(), key=lambda kv: -kv[1])[:4])
    return {"imports_s": sum(top.values()), "wall_s": wall, "slowest": slowest}


def efficientnet(repeat: int = 3, infeasible: float = 4.1) -> dict[str, Any]:
    """Smallest feasible budget, uniform int4 bits (plan and file), and an infeasible budget's wall time."""
    from lpcompile.api import apply, decide_uniform
    from lpcompile.config import ApplyConfig
    from lpcompile.feasibility import check_budget, smallest_feasible
    from lpcompile.files import load_normalized
    from lpcompile.frontend.zoo import efficientnet_lite0_onnx
    from lpcompile.graph import find_weight_nodes

    model_path = efficientnet_lite0_onnx(ARTIFACTS / "efficientnet_lite0.onnx")
    t0 = time.perf_counter()
    model = load_normalized(model_path)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    nodes = find_weight_nodes(model)
    feas = {t: smallest_feasible(nodes, LPC_FORMATS, t).min_bits_per_weight for t in ("qdq", "ort", "tvm")}
    t_check = time.perf_counter() - t0
    params = sum(n.params for n in {n.weight: n for n in nodes}.values())
    uniform: dict[str, Any] = {}
    for fmt in UNIFORM_INT4:
        plan = decide_uniform(model, fmt, target="qdq")
        planned = sum(a.bits * a.params for a in plan.nodes) / sum(a.params for a in plan.nodes)
        applied = apply(load_normalized(model_path), plan, ApplyConfig(target="qdq"))
        from lpcompile.graph import weight_coverage

        kept = [k for k in weight_coverage(applied.model).kept if k.reason == "already-quantized"]
        measured = sum(k.bits * k.params for k in kept) / sum(k.params for k in kept)
        uniform[fmt] = {"plan_bits": planned, "file_bits": measured, "file_weights": sum(k.params for k in kept)}
    try:
        check_budget(nodes, f"{infeasible}bits", LPC_FORMATS, "qdq")
        message = "feasible?"
    except Exception as exc:
        message = str(exc)
    cli = [
        sys.executable,
        "-m",
        "lpcompile",
        str(model_path),
        "--budget",
        f"{infeasible}bits",
        "-o",
        str(ARTIFACTS / "efficientnet_lite0" / "coverage_infeasible.onnx"),
    ]
    wall, rc, err = _median_wall(cli, repeat)
    imports = _import_seconds(cli)
    bare, _, _ = _median_wall([sys.executable, "-c", "pass"], repeat)
    return {
        "model": model_path.name,
        "params": params,
        "formats": list(LPC_FORMATS),
        "smallest_feasible_bits": feas,
        "uniform_int4": uniform,
        "infeasible": {
            "budget_bits": infeasible,
            "cli_wall_s": wall,
            "cli_rc": rc,
            "cli_message": err,
            "python_startup_s": bare,
            "imports_s": imports,
            "in_process_load_normalize_s": t_load,
            "in_process_check_s": t_check,
            "check_message": message,
            "repeat": repeat,
        },
    }


def efficientnet_table(res: dict[str, Any]) -> str:
    f = res["smallest_feasible_bits"]
    lines = [
        f"smallest feasible budget ({', '.join(res['formats'])}): " + ", ".join(f"{t} {v:.4f}" for t, v in f.items())
    ]
    for fmt, u in res["uniform_int4"].items():
        lines.append(f"uniform {fmt}: plan {u['plan_bits']:.4f} bits, file {u['file_bits']:.4f} bits")
    i = res["infeasible"]
    lines.append(
        f"--budget {i['budget_bits']}bits: rc {i['cli_rc']}, wall {i['cli_wall_s']:.2f} s (median of {i['repeat']}; "
        f"python start {i['python_startup_s']:.2f} s; in one run under -X importtime: imports "
        f"{i['imports_s']['imports_s']:.2f} s of {i['imports_s']['wall_s']:.2f} s, slowest: "
        f"{', '.join(f'{k} {v:.2f}' for k, v in i['imports_s']['slowest'].items())}; "
        f"in process: load+normalize {i['in_process_load_normalize_s']:.2f} s, check {i['in_process_check_s']:.3f} s)"
    )
    lines.append(f"  {i['cli_message']}")
    return "\n".join(lines)


def profile_analysis(num_layers: int, eval_windows: int = 4, top: int = 25) -> dict[str, Any]:
    """cProfile of the SmolLM2 analysis (the bench's config) on a model truncated to ``num_layers`` layers.

    Writes ``artifacts/bench/smollm2_l<N>/analysis.pstats`` and returns the table's own stage timings
    with the ``top`` functions by cumulative and by own time.
    """
    import cProfile
    import io
    import pstats

    from bench_smollm2 import smollm2_task
    from harness import ANALYSIS_FORMATS

    from lpcompile.analysis.config import AnalysisConfig
    from lpcompile.files import analyze_file

    task = smollm2_task(eval_windows=eval_windows, num_layers=num_layers, name=f"smollm2_l{num_layers}")
    cfg = AnalysisConfig(formats=ANALYSIS_FORMATS, **dict(task.analysis))
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    table = analyze_file(task.model, task.calib, cfg)
    prof.disable()
    wall = time.perf_counter() - t0
    out = ARTIFACTS / f"smollm2_l{num_layers}" / "analysis.pstats"
    prof.dump_stats(str(out))
    res: dict[str, Any] = {
        "layers": num_layers,
        "nodes": len(table.nodes),
        "analysis_wall_s": wall,
        "timings": dict(table.timings),
        "pstats": str(out),
    }
    for key in ("cumulative", "tottime"):
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(top)
        res[key] = buf.getvalue()
    return res


def _with_analysis(task: Task, spec: str) -> Task:
    """``task`` with analysis settings overridden by ``key=value,...`` (ints where they parse)."""
    from dataclasses import replace

    if not spec:
        return task
    over: dict[str, Any] = {}
    for part in spec.split(","):
        key, _, value = part.partition("=")
        over[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else value.strip()
    return replace(task, analysis={**dict(task.analysis), **over})


def _load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="minilm,efficientnet", help="comma-separated: minilm, efficientnet, smollm2")
    p.add_argument("--budget", type=float, default=4.5)
    p.add_argument("--targets", default="qdq,ort")
    p.add_argument("--eval-windows", type=int, default=4, help="SmolLM2 evaluation windows of 256 tokens")
    p.add_argument("--repeat", type=int, default=3, help="runs of the infeasible-budget command (median)")
    p.add_argument("--keep-models", action="store_true", help="keep the written models under artifacts/bench/")
    p.add_argument(
        "--lm-analysis",
        default="",
        help="override the language models' analysis settings, e.g. probes=4,max_samples=8,batch_size=2 "
        "(the table is cached per setting in artifacts/bench/<model>/sens.json)",
    )
    p.add_argument("--profile-layers", type=int, default=0, help="model 'profile': SmolLM2 truncated to N layers")
    args = p.parse_args()
    setup_logging()
    logger.setLevel(logging.INFO)
    targets = [t for t in args.targets.split(",") if t]
    for name in [m for m in args.models.split(",") if m]:
        t0 = time.perf_counter()
        load0 = _load_avg()
        if name == "minilm":
            from bench_minilm import minilm_task

            task = _with_analysis(minilm_task(), args.lm_analysis)
            res = lm_rows(task, args.budget, targets, args.keep_models)
            text = lm_table(res, task)
        elif name == "smollm2":
            from bench_smollm2 import smollm2_task

            task = _with_analysis(smollm2_task(eval_windows=args.eval_windows), args.lm_analysis)
            res = lm_rows(task, args.budget, targets, args.keep_models)
            text = lm_table(res, task)
        elif name == "profile":
            res = profile_analysis(args.profile_layers or 2, args.eval_windows)
            head = f"{res['nodes']} nodes, {res['analysis_wall_s']:.1f} s, timings {res['timings']}"
            text = f"{head}\n{res['cumulative']}\n{res['tottime']}"
        elif name == "efficientnet":
            res = efficientnet(args.repeat)
            text = efficientnet_table(res)
        else:
            p.error(f"unknown model {name!r}")
        res.update(
            wall_s=time.perf_counter() - t0,
            load_before=load0,
            load_after=_load_avg(),
            date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        )
        results = json.loads(OUT_JSON.read_text()) if OUT_JSON.exists() else {}  # another run may have written
        results[name] = res
        tmp = OUT_JSON.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1, default=str))
        os.replace(tmp, OUT_JSON)
        print(f"\n== {name} (load {load0} → {res['load_after']}, {res['wall_s']:.0f} s)\n{text}", flush=True)


if __name__ == "__main__":
    main()
