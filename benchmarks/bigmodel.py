"""A synthetic model with gigabytes of external data, and the peak memory of apply and compile on it.

The model is a stack of ``layers`` blocks ``Relu(x @ W_i + b_i)`` with ``W_i`` of ``d × d`` fp32
(``d=8192``, 10 layers: 2.5 GiB of external data, largest tensor 256 MiB). :func:`write_model`
generates it seeded, chunk by chunk: the weights are written to ``<name>.data`` a few MiB at a
time and the model file holds only the graph with external-data references, so the generator
never holds a tensor, let alone the model, in memory.

Measured (each command a fresh process under ``/usr/bin/time -v``, peak = "Maximum resident set
size"), in one run:

- ``python -m lpcompile apply BIG --uniform int4 -o OUT``;
- ``python -m lpcompile BIG --budget 4.5bits -o OUT2`` (synthetic calibration: no data given);
- the same two commands from another checkout (``--old-tree``: e.g. the main branch before the
  streaming rewrite), when given.

Targets (issue 15): apply peak ≤ 3 × the largest tensor + 2 GB; compile peak ≤ 2.5 × the model's size.

Then compile is profiled phase by phase in one process (``--phase-dims``: the 2.5 GiB model and a
0.63 GiB one whose analysis fits the current in-memory analysis): resident set after and peak during
each of load+normalize, checks, feasibility, calibration, analysis, decide, apply+save, with the
tracemalloc peak of each phase.

    python benchmarks/bigmodel.py [--dim 8192] [--layers 10] [--workdir artifacts/issue15]
        [--old-tree /path/to/old/checkout] [--skip-compile] [--gemm] [--phase-dims 8192,4096]
        [--json-out benchmarks/bigmodel.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parent.parent

logger = logging.getLogger(__name__)

_CHUNK_BYTES = 16 * 2**20
"""Rows of a weight are generated and written this many bytes at a time."""


@dataclass(frozen=True)
class BigModel:
    """What :func:`write_model` wrote."""

    path: Path
    data_path: Path
    dim: int
    layers: int
    batch: int
    data_bytes: int
    largest_tensor_bytes: int


def _external(name: str, dims: list[int], location: str, offset: int, length: int) -> TensorProto:
    t = TensorProto()
    t.name = name
    t.data_type = TensorProto.FLOAT
    t.dims.extend(dims)
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


def _write_weight(f, rng: np.random.Generator, rows: int, cols: int, scale: float) -> int:
    """Write a ``rows × cols`` fp32 normal(0, scale) matrix to ``f`` chunk by chunk; return its bytes."""
    step = max(1, _CHUNK_BYTES // (4 * cols))
    for r0 in range(0, rows, step):
        n = min(step, rows - r0)
        chunk = rng.standard_normal((n, cols), dtype=np.float32)
        chunk *= np.float32(scale)
        f.write(chunk.astype("<f4", copy=False).tobytes())
    return rows * cols * 4


def write_model(path: str | os.PathLike[str], *, dim: int = 8192, layers: int = 10, batch: int = 4,
                seed: int = 0, gemm: bool = False) -> BigModel:
    """Write the stacked MatMul/Add/Relu model with its weights in ``<name>.data`` beside it.

    Args:
        path: the ``.onnx`` file (its folder must exist).
        dim: hidden size (every weight is ``dim × dim``).
        layers: number of MatMul/Add/Relu blocks.
        batch: rows of the (fixed-shape) input ``x: [batch, dim]``.
        seed: the generator's seed (same seed, same bytes).
        gemm: write each block as ``Relu(Gemm(x, W_i, b_i, transB=1))`` (how torch exports Linear;
            the data file is the same, read as ``[out, in]``) instead of MatMul + Add.

    Returns:
        The paths and sizes written.
    """
    path = Path(path)
    data_path = path.with_name(path.name + ".data")
    location = data_path.name
    rng = np.random.default_rng(seed)
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    offset = 0
    largest = 0
    with open(data_path, "wb") as f:
        for i in range(layers):
            n = _write_weight(f, rng, dim, dim, 1.0 / np.sqrt(dim))
            inits.append(_external(f"w{i}", [dim, dim], location, offset, n))
            offset += n
            largest = max(largest, n)
            b = _write_weight(f, rng, 1, dim, 0.01)
            inits.append(_external(f"b{i}", [dim], location, offset, b))
            offset += b
            x = "x" if i == 0 else f"h{i - 1}"
            if gemm:
                nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [f"add{i}"], name=f"gemm{i}", transB=1))
            else:
                nodes += [
                    helper.make_node("MatMul", [x, f"w{i}"], [f"mm{i}"], name=f"matmul{i}"),
                    helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"add{i}"], name=f"add{i}"),
                ]
            nodes.append(
                helper.make_node("Relu", [f"add{i}"], [f"h{i}" if i < layers - 1 else "y"], name=f"relu{i}")
            )
    graph = helper.make_graph(
        nodes, "bigmodel",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, dim])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], producer_name="bigmodel")
    model.ir_version = 10
    path.write_bytes(model.SerializeToString())  # no weights inside: a few KB
    return BigModel(path, data_path, dim, layers, batch, offset, largest)


# A child process: compile's steps one by one (as lpcompile.files.compile_file runs them), printing
# after each the resident set now and at its peak (VmRSS / VmHWM, anonymous and file-backed) and the
# peak of tracemalloc (numpy and Python allocations; torch's own allocator is not traced).
_PHASES = r"""
import gc, json, sys, time, tracemalloc
from pathlib import Path
tracemalloc.start()
rows = []
t = time.perf_counter()
def mark(name, error=""):
    global t
    gc.collect()
    st = {k: int(v.split()[0]) // 1024 for k, v in (ln.split(":", 1) for ln in open("/proc/self/status"))
          if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}
    rows.append({"phase": name, "s": round(time.perf_counter() - t, 1), "rss_mib": st["VmRSS"],
                 "anon_mib": st["RssAnon"], "file_mib": st["RssFile"], "peak_rss_mib": st["VmHWM"],
                 "tracemalloc_peak_mib": tracemalloc.get_traced_memory()[1] // 2**20, "error": error})
    tracemalloc.reset_peak()
    print("LPPHASE " + json.dumps(rows[-1]), flush=True)
    t = time.perf_counter()
import lpcompile.analysis.sensitivity  # noqa: F401  (the analysis imports torch)
from lpcompile.analysis.config import AnalysisConfig
from lpcompile.api import decide
from lpcompile.checks import check_model
from lpcompile.config import ApplyConfig, DecideConfig
from lpcompile.feasibility import check_budget, retarget_table
from lpcompile.files import analysis_calib, analyze_file, apply_file, load_normalized
from lpcompile.graph import find_weight_nodes
mark("imports")
src, out, budget = sys.argv[1], sys.argv[2], sys.argv[3]
config, dc = AnalysisConfig(), DecideConfig()
model = load_normalized(src); mark("load+normalize")
check_model(model); mark("checks")
check_budget(model, budget, dc.formats or config.formats, dc.target.value); mark("feasibility")
calib = analysis_calib(model, None, config); mark("calibration")
try:
    table = analyze_file(src, None, config, model=model, calib=calib)
except Exception as exc:
    mark("analysis", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    sys.exit(0)
mark("analysis")
table = retarget_table(table, find_weight_nodes(model), dc.target.value)
decision = decide(table, budget, dc); mark("decide")
ac = ApplyConfig(target=dc.target, seed=config.seed, rounding=config.rounding)
apply_file(src, out, plan=decision.plan, config=ac, force=True, model=model, log_checks=False, calib=calib)
mark("apply+save")
del model, table, decision
from lpcompile.frontend.calib import calibration_for
from lpcompile.frontend.onnx_io import load_model
from lpcompile.guard import check_quality
held = calibration_for(load_model(src), None, num_samples=16, seed=config.seed + 1)
check_quality(out, src, held, batch_size=config.batch_size)
mark("quality guard")
"""


def phases(tree: Path, model: Path, out: Path, budget: str = "4.5bits") -> list[dict[str, object]]:
    """Compile's phases in one process of ``tree`` (see ``_PHASES``); one row per phase."""
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-c", _PHASES, str(model), str(out), budget], env=env, cwd=str(tree),
                          capture_output=True, text=True, check=False)
    rows = [json.loads(ln[len("LPPHASE "):]) for ln in proc.stdout.splitlines() if ln.startswith("LPPHASE ")]
    if proc.returncode:
        rows.append({"phase": "crashed", "error": proc.stderr.strip().splitlines()[-1:]})
    _remove_outputs(out)
    return rows


def _print_phases(title: str, rows: list[dict[str, object]]) -> None:
    print(f"\n{title}")
    print(f"{'phase':16} {'s':>6} {'rss':>6} {'anon':>6} {'file':>6} {'peak':>6} {'tracemalloc':>11}  (MiB)")
    for r in rows:
        if r["phase"] == "crashed":
            print(f"crashed: {r['error']}")
            continue
        print(f"{r['phase']:16} {r['s']:>6} {r['rss_mib']:>6} {r['anon_mib']:>6} {r['file_mib']:>6} "
              f"{r['peak_rss_mib']:>6} {r['tracemalloc_peak_mib']:>11}  {r['error']}")


@dataclass(frozen=True)
class Run:
    """One measured command."""

    tree: str
    command: str
    argv: list[str]
    rc: int
    wall_s: float
    max_rss_mib: float
    last_line: str


def _measure(tree: Path, name: str, args: list[str], label: str) -> Run:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="2")
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "lpcompile", *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=str(tree), capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines()
             if ln.strip() and not ln.startswith(("\t", "Command"))]
    last = next((ln for ln in reversed(lines) if "error" in ln.lower()), lines[-1] if lines else "")
    return Run(label, name, args, proc.returncode, round(wall, 1),
               round(int(rss.group(1)) / 1024, 1) if rss else float("nan"), last[:300])


def _remove_outputs(*paths: Path) -> None:
    for p in paths:
        for q in (p, p.with_name(p.name + ".data"), p.with_name(p.name.removesuffix(".onnx") + ".plan.json")):
            q.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--workdir", type=Path, default=ROOT / "artifacts" / "issue15")
    ap.add_argument("--old-tree", type=Path, help="another checkout measured the same way (the old path)")
    ap.add_argument("--skip-compile", action="store_true", help="measure apply only")
    ap.add_argument("--gemm", action="store_true", help="Gemm(transB=1) blocks, as torch exports Linear")
    ap.add_argument("--phase-dims", default="8192,4096",
                    help="hidden sizes whose compile is profiled phase by phase (10 layers each; '' for none)")
    ap.add_argument("--json-out", type=Path, default=ROOT / "benchmarks" / "bigmodel.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    args.workdir.mkdir(parents=True, exist_ok=True)
    kind = "gemm" if args.gemm else "l"
    model_path = args.workdir / f"big_d{args.dim}_{kind}{args.layers}.onnx"
    t0 = time.perf_counter()
    big = write_model(model_path, dim=args.dim, layers=args.layers, gemm=args.gemm)
    gen_s = time.perf_counter() - t0
    logger.info("wrote %s: %.2f GiB external data, largest tensor %.0f MiB (%.1f s)",
                model_path, big.data_bytes / 2**30, big.largest_tensor_bytes / 2**20, gen_s)

    trees = [("new", ROOT)] + ([("old", args.old_tree.resolve())] if args.old_tree else [])
    runs: list[Run] = []
    for label, tree in trees:
        out1 = args.workdir / f"out_apply_{label}.onnx"
        out2 = args.workdir / f"out_compile_{label}.onnx"
        _remove_outputs(out1, out2)
        runs.append(_measure(tree, "apply --uniform int4",
                             ["apply", str(model_path), "--uniform", "int4", "-o", str(out1), "--force"], label))
        logger.info("%s", runs[-1])
        if not args.skip_compile:
            runs.append(_measure(tree, "compile --budget 4.5bits",
                                 [str(model_path), "--budget", "4.5bits", "-o", str(out2), "--force"], label))
            logger.info("%s", runs[-1])
        _remove_outputs(out1, out2)

    phase_runs: dict[str, object] = {}
    for d in [int(x) for x in args.phase_dims.split(",") if x.strip()]:
        m = big if d == args.dim else write_model(args.workdir / f"big_d{d}_{kind}{args.layers}.onnx", dim=d,
                                                 layers=args.layers, gemm=args.gemm)
        phase_runs[f"d{d}"] = {"data_bytes": m.data_bytes,
                               "rows": phases(ROOT, m.path, args.workdir / f"out_phases_d{d}.onnx")}

    model_gb = big.data_bytes / 1e9
    apply_target_mib = (3 * big.largest_tensor_bytes + 2e9) / 2**20
    compile_target_mib = 2.5 * big.data_bytes / 2**20
    print(f"\nmodel: {big.data_bytes / 2**30:.2f} GiB external data ({model_gb:.2f} GB), "
          f"largest tensor {big.largest_tensor_bytes / 2**20:.0f} MiB; load {os.getloadavg()[0]:.2f}")
    print(f"{'tree':5} {'command':26} {'rc':>3} {'wall s':>8} {'peak MiB':>9} {'target MiB':>10}  met")
    for r in runs:
        target = apply_target_mib if r.command.startswith("apply") else compile_target_mib
        met = "yes" if r.rc == 0 and r.max_rss_mib <= target else "no"
        print(f"{r.tree:5} {r.command:26} {r.rc:>3} {r.wall_s:>8.1f} {r.max_rss_mib:>9.0f} {target:>10.0f}  {met}")
        if r.rc:
            print(f"      {r.last_line}")
    for key, pr in phase_runs.items():
        _print_phases(f"compile phase by phase, {key}: {pr['data_bytes'] / 2**20:.0f} MiB of weights",
                      pr["rows"])  # type: ignore[arg-type]
    record = {
        "model": {**asdict(big), "path": str(big.path), "data_path": str(big.data_path), "gemm": args.gemm},
        "generate_s": round(gen_s, 1),
        "targets_mib": {"apply": round(apply_target_mib), "compile": round(compile_target_mib)},
        "runs": [asdict(r) for r in runs],
        "phases": phase_runs,
        "load_avg_end": os.getloadavg(),
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
    }
    args.json_out.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
