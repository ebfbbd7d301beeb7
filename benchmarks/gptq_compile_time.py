"""Compile time of ``--rounding gptq`` against the default (nearest) compile, side by side (issue 19).

Alternates the two commands ``--repeats`` times under ``/usr/bin/time -v`` (wall, user + sys CPU,
peak RSS), records the load average before and after each, and reports medians and the gptq/nearest
ratios (acceptance: gptq within 2× of the default compile, MiniLM, 128 calibration sentences):

    nice -n 10 python benchmarks/gptq_compile_time.py --repeats 2 \
        --json-out benchmarks/gptq_compile_time_minilm.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _load() -> list[float]:
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]


def _run(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        before = _load()
        t0 = time.time()
        proc = subprocess.run(
            ["/usr/bin/time", "-v", "-o", tf.name, *cmd], env=env, capture_output=True, text=True, check=False
        )
        wall_py = time.time() - t0
        text = Path(tf.name).read_text()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")

    def grab(label: str) -> str:
        m = re.search(rf"{re.escape(label)}:\s*(.+)", text)
        return m.group(1).strip() if m else ""

    parts = [float(p) for p in grab("Elapsed (wall clock) time (h:mm:ss or m:ss)").split(":")]
    wall = sum(p * 60**i for i, p in enumerate(reversed(parts)))
    return {
        "wall_s": wall,
        "wall_s_python": wall_py,
        "cpu_s": float(grab("User time (seconds)")) + float(grab("System time (seconds)")),
        "peak_rss_gb": int(grab("Maximum resident set size (kbytes)")) / 1e6,
        "load_before": before,
        "load_after": _load(),
        "tail": proc.stdout.strip().splitlines()[-1:] + proc.stderr.strip().splitlines()[-2:],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "artifacts/bench/minilm.onnx"))
    p.add_argument("--calib", default=str(ROOT / "artifacts/bench/minilm/calib.npz"))
    p.add_argument("--budget", default="4.5bits")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out-dir", type=Path, default=ROOT / "artifacts/19g/compile_time")
    p.add_argument("--json-out", type=Path)
    args = p.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmds = {
        "nearest": [],
        "gptq": ["--rounding", "gptq"],
    }
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in cmds}
    for i in range(args.repeats):
        for name, extra in cmds.items():
            cmd = [sys.executable, "-m", "lpcompile", args.model, "--budget", args.budget, "--calib", args.calib]
            cmd += ["-o", str(args.out_dir / f"{name}.onnx"), "--force", *extra]
            r = _run(cmd, env)
            r["repeat"] = i
            runs[name].append(r)
            if args.json_out:  # partial results survive an interrupted run
                args.json_out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs}))
            print(
                f"[{i}] {name:8s} wall {r['wall_s']:7.1f} s  cpu {r['cpu_s']:7.1f} s  rss {r['peak_rss_gb']:.2f} GB  "
                f"load {r['load_before'][0]:.2f} -> {r['load_after'][0]:.2f}",
                flush=True,
            )
    med = {
        k: {m: statistics.median(r[m] for r in v) for m in ("wall_s", "cpu_s", "peak_rss_gb")} for k, v in runs.items()
    }
    ratio = {m: med["gptq"][m] / med["nearest"][m] for m in ("wall_s", "cpu_s", "peak_rss_gb")}
    pairs = [g["wall_s"] / n["wall_s"] for n, g in zip(runs["nearest"], runs["gptq"], strict=True)]
    print("\n| rounding | median wall | median CPU (user+sys) | peak RSS |")
    print("|---|---|---|---|")
    for k in cmds:
        extra = f" ({ratio['wall_s']:.2f}×)" if k == "gptq" else ""
        extra_c = f" ({ratio['cpu_s']:.2f}×)" if k == "gptq" else ""
        print(
            f"| {k} | {med[k]['wall_s']:.1f} s{extra} | {med[k]['cpu_s']:.1f} s{extra_c} "
            f"| {med[k]['peak_rss_gb']:.2f} GB |"
        )
    print(f"per-pair wall ratios: {', '.join(f'{x:.2f}' for x in pairs)}")
    if args.json_out:
        args.json_out.write_text(
            json.dumps(
                {
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "runs": runs,
                    "median": med,
                    "ratio": ratio,
                    "pair_wall_ratios": pairs,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
