"""Peak memory and wall time of `lpcompile MODEL --budget 4.5bits`: single process vs `--workers 2`.

For each model (the digits MLP of ``examples/models`` with its calibration file, and the synthetic
transformer of :func:`benchmarks.memory.synthetic_transformer` with random token ids) three
configurations run side by side, interleaved, ``--repeats`` times each, every run a fresh process
under ``/usr/bin/time -v``:

* ``single``: the default (one process, sequential probe seeding);
* ``single per-probe``: one process, ``--seeding per-probe`` (the seeding sharded runs use);
* ``workers 2``: ``--workers 2`` (the probe passes in two spawned worker processes).

Reported per configuration: the median wall time, the median "Maximum resident set size" of
``/usr/bin/time -v`` (the largest single process of the tree: the driver or one worker), the
median peak of the *sum* of the RSS of the process tree (sampled every 50 ms with psutil: what the
machine must hold), ratios against ``single``, and whether the plan of ``workers 2`` equals the
plan of ``single per-probe`` (it must: same seed, same probes). The ``uptime`` load average before
and after is recorded, since the machine may be shared.

The ``convergence`` part runs the analysis alone (in this process, per-probe seeding) on each model
with the fixed probe count and with each ``--tols`` value as ``--probe-tol``, and reports the probes drawn, the
worst and median per-node relative standard error of the trace, and the analysis time.

    python benchmarks/scale.py [--repeats 3] [--samples 64] [--seq 64] [--probes 16]
                               [--parts compile,convergence] [--tols 0.1,0.05] [--max-probes 512]
                               [--workdir /tmp/lpcompile-scale]
                               [--json-out benchmarks/scale.json]

With ``--parts convergence`` alone the ``results`` of an existing JSON file are kept.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from lpcompile.io_utils import atomic_write_text  # noqa: E402

logger = logging.getLogger(__name__)

CONFIGS: dict[str, list[str]] = {
    "single": [],
    "single per-probe": ["--seeding", "per-probe"],
    "workers 2": ["--workers", "2"],
}


def uptime() -> str:
    """The load averages from ``uptime``."""
    out = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return out.split("load average:")[-1].strip() if "load average" in out else out


def _tree_rss(pid: int, exclude: tuple[str, ...] = ()) -> int:
    """Sum of the RSS (bytes) of ``pid`` and its descendants (0 when gone), leaving out processes
    named in ``exclude`` (e.g. the ``nice`` / ``time`` wrappers)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            if not exclude or p.name() not in exclude:
                total += p.memory_info().rss
    return total


def run_once(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run ``cmd`` under ``/usr/bin/time -v``; return wall s, max RSS MiB (time -v) and peak tree RSS MiB."""
    proc = subprocess.Popen(
        ["/usr/bin/time", "-v", *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT
    )
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate(timeout=7200)
    done.set()
    sampler.join()
    if proc.returncode != 0:  # recorded, not fatal: the other configurations still run
        lines = [ln for ln in err.splitlines() if ln.startswith("lpcompile:")]
        logger.error("%s failed (%d): %s", " ".join(cmd), proc.returncode, lines[-1] if lines else err[-500:])
        return {"error": lines[-1] if lines else f"exit {proc.returncode}"}
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", err)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", err)
    if rss is None or wall is None:
        raise SystemExit(f"no /usr/bin/time -v figures in:\n{err[-2000:]}")
    secs = 0.0
    for part in wall.group(1).split(":"):
        secs = secs * 60 + float(part)
    return {"wall_s": secs, "max_rss_mib": int(rss.group(1)) / 1024, "tree_rss_mib": peak[0] / 2**20}


def models(work: Path, samples: int, seq: int) -> list[tuple[str, Path, Path, int]]:
    """(name, model, calibration file, fp32 weight bytes) for the digits MLP and the synthetic transformer."""
    import onnx
    from memory import synthetic_transformer

    out = []
    mlp = ROOT / "examples" / "models" / "digits_mlp.onnx"
    out.append(("digits MLP", mlp, ROOT / "examples" / "models" / "digits_calib.npz"))
    st = synthetic_transformer(work / "synthetic.onnx")
    calib = work / f"synthetic_calib_{samples}x{seq}.npz"
    np.savez(calib, input_ids=np.random.default_rng(0).integers(0, 2000, (samples, seq)))
    out.append((f"synthetic transformer (d=256, 4 layers, {samples}×{seq} tokens)", st, calib))
    rows = []
    for name, path, c in out:
        m = onnx.load(str(path))
        nbytes = sum(int(np.prod(t.dims)) * 4 for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
        rows.append((name, path, c, nbytes))
    return rows


def convergence(
    rows: list[tuple[str, Path, Path, int]], probes: int, tols: tuple[float | None, ...], max_probes: int
) -> list[dict[str, Any]]:
    """Probes drawn and trace errors reached, fixed count vs ``--probe-tol`` (in this process)."""
    from lpcompile.analysis.config import AnalysisConfig
    from lpcompile.api import analyze
    from lpcompile.files import load_calib_for, load_normalized

    out = []
    for name, path, calib_path, _ in rows:
        model = load_normalized(path)
        calib = load_calib_for(model, calib_path)
        for tol in tols:
            cfg = AnalysisConfig(probes=probes, seeding="per-probe", probe_tol=tol, max_probes=max_probes)
            table = analyze(model, calib, cfg)
            errs = [n.trace_rse for n in table.nodes if n.trace_rse is not None]
            row = {
                "model": name,
                "probe_tol": tol,
                "probes": table.probes,
                "batches": math.ceil(calib.num_samples / cfg.batch_size),
                "nodes": len(table.nodes),
                "nodes_with_error": len(errs),
                "worst_rse": round(max(errs), 4) if errs else None,
                "median_rse": round(statistics.median(errs), 4) if errs else None,
                "hessian_s": round(table.timings.get("hessian_s", float("nan")), 2),
            }
            out.append(row)
            logger.info("convergence %s", row)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--samples", type=int, default=64, help="synthetic transformer calibration samples")
    p.add_argument("--seq", type=int, default=64, help="synthetic transformer tokens per sample")
    p.add_argument("--probes", type=int, default=16)
    p.add_argument("--budget", default="4.5bits")
    p.add_argument("--workdir", default="/tmp/lpcompile-scale")
    p.add_argument("--json-out", default=str(ROOT / "benchmarks" / "scale.json"))
    p.add_argument("--parts", default="compile,convergence", help="compile, convergence or both")
    p.add_argument("--tols", default="0.1,0.05", help="--probe-tol values of the convergence part")
    p.add_argument("--max-probes", type=int, default=512, help="--max-probes of the convergence part")
    args = p.parse_args()
    parts = set(args.parts.split(","))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    load_before = uptime()

    results: list[dict[str, Any]] = []
    rows = models(work, args.samples, args.seq)
    previous = json.loads(Path(args.json_out).read_text()) if Path(args.json_out).is_file() else {}
    if "compile" not in parts:
        results = previous.get("results", [])
    for name, model, calib, wbytes in rows if "compile" in parts else []:
        runs: dict[str, list[dict[str, Any]]] = {c: [] for c in CONFIGS}
        plans: dict[str, Any] = {}
        failed: str | None = None
        for r in range(args.repeats * len(CONFIGS)):
            cfg, extra = list(CONFIGS.items())[r % len(CONFIGS)]
            if failed is None:  # interleaved: each repeat runs every configuration once
                out = work / f"{model.stem}.{cfg.replace(' ', '_')}.lp.onnx"
                cmd = [
                    sys.executable,
                    "-m",
                    "lpcompile",
                    str(model),
                    "--budget",
                    args.budget,
                    "--calib",
                    str(calib),
                    "--probes",
                    str(args.probes),
                    "-o",
                    str(out),
                    "--force",
                    "-q",
                    *extra,
                ]
                fig = run_once(cmd, env)
                if "error" in fig:
                    failed = f"{cfg}: {fig['error']}"
                    continue
                runs[cfg].append(fig)
                plan = json.loads(out.with_name(out.name.replace(".onnx", ".plan.json")).read_text())
                plans[cfg] = {n["name"]: n["format"] for n in plan["nodes"]}
                logger.info(
                    "%s / %s #%d: %.1f s, max RSS %.0f MiB, tree %.0f MiB",
                    name,
                    cfg,
                    r // len(CONFIGS) + 1,
                    fig["wall_s"],
                    fig["max_rss_mib"],
                    fig["tree_rss_mib"],
                )
        if failed is not None:
            results.append({"model": name, "fp32_weights_mib": round(wbytes / 2**20, 2), "error": failed})
            continue
        med = {c: {k: statistics.median(f[k] for f in fs) for k in fs[0]} for c, fs in runs.items()}
        base = med["single"]
        results.append(
            {
                "model": name,
                "fp32_weights_mib": round(wbytes / 2**20, 2),
                "configs": {
                    c: {
                        **{k: round(v, 2) for k, v in m.items()},
                        "wall_ratio": round(m["wall_s"] / base["wall_s"], 3),
                        "tree_rss_ratio": round(m["tree_rss_mib"] / base["tree_rss_mib"], 3),
                        "runs": [{k: round(v, 2) for k, v in f.items()} for f in runs[c]],
                    }
                    for c, m in med.items()
                },
                "workers_plan_equals_per_probe_plan": plans["workers 2"] == plans["single per-probe"],
                "plans": plans,
            }
        )
    tols = (None, *(float(t) for t in args.tols.split(",") if t))
    conv = (
        convergence(rows, args.probes, tols, args.max_probes)
        if "convergence" in parts
        else previous.get("convergence", [])
    )
    load_after = uptime()
    # each part keeps the load it ran under (a part not run keeps the previous file's figures)
    compile_meta = (
        {"repeats": args.repeats, "load_before": load_before, "load_after": load_after}
        if "compile" in parts
        else {k: previous.get(k) for k in ("repeats", "load_before", "load_after")}
    )
    conv_load = (
        {"load_before": load_before, "load_after": load_after}
        if "convergence" in parts
        else previous.get("convergence_load")
    )

    print(
        f"`lpcompile MODEL --budget {args.budget} --probes {args.probes}`: "
        f"medians of {compile_meta['repeats']} interleaved runs"
    )
    print(f"load average before: {compile_meta['load_before']}; after: {compile_meta['load_after']}")
    hdr = f"{'model':<52} {'config':<17} {'wall s':>7} {'×single':>8} {'max RSS MiB':>12} {'tree RSS MiB':>13}"
    print(hdr)
    for res in results:
        if "error" in res:
            print(f"{res['model']:<52} failed: {res['error']}")
            continue
        for c, m in res["configs"].items():
            print(
                f"{res['model']:<52} {c:<17} {m['wall_s']:>7.1f} {m['wall_ratio']:>8.2f} "
                f"{m['max_rss_mib']:>12.0f} {m['tree_rss_mib']:>13.0f}"
            )
        print(f"{'':<52} workers-2 plan == per-probe plan: {res['workers_plan_equals_per_probe_plan']}")
    if conv:
        print(f"\nconvergence (analysis only, per-probe seeding); load: {conv_load}")
        print(f"{'model':<52} {'probe tol':>9} {'probes':>7} {'worst rse':>10} {'median rse':>11} {'hessian s':>10}")
        for c in conv:
            tol = "fixed" if c["probe_tol"] is None else f"{c['probe_tol']:g}"
            print(
                f"{c['model']:<52} {tol:>9} {c['probes']:>7} {c['worst_rse'] or float('nan'):>10.3f} "
                f"{c['median_rse'] or float('nan'):>11.3f} {c['hessian_s']:>10.1f}"
            )
    payload = {
        "benchmark": "scale",
        "command": f"lpcompile MODEL --budget {args.budget} --calib CALIB --probes {args.probes} "
        "[--seeding per-probe | --workers 2]",
        **compile_meta,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "results": results,
        "convergence": conv,
        "convergence_load": conv_load,
    }
    atomic_write_text(args.json_out, json.dumps(payload, indent=1) + "\n")
    print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
