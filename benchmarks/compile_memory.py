"""Peak RSS of ``lpcompile MODEL --budget 4.5bits``: an old tree against this one, side by side.

Issue 18's memory acceptance: the peak resident set size of the bare compile, measured with
``/usr/bin/time -v``, at most 2 × the model's fp32 weights + 1 GiB. For each model the same command
runs in fresh processes under ``nice -n 10``, alternating the old tree (``--old``, a git revision
checked out as a detached worktree, default main's start of wave 5, 4009b72) and this tree (each on
``PYTHONPATH``), ``--repeats`` times each. Every run records its peak RSS (``time -v``'s "Maximum
resident set size") and wall time, with the load average before and after (RSS hardly depends on
load, wall time does). The old and new outputs must be the same: the output models' bytes and the
plans (every key) are compared.

Models (``--models``, comma-separated keys; ``EXTRA`` flags after the key's own):

* ``minilm``: all-MiniLM-L6-v2, ``artifacts/bench/minilm.onnx`` + ``artifacts/bench/minilm/calib.npz``
  (built by ``benchmarks/bench_minilm.py``), the whole-graph analysis (the default below 1 GiB);
* ``smollm2``: SmolLM2-135M, ``artifacts/bench/smollm2.onnx`` + ``artifacts/bench/smollm2/calib.npz``
  (16 × 128 tokens; built by ``benchmarks/bench_smollm2.py``) with ``--stream on``;
* ``digits``: the embedded digits MLP (seconds; a smoke run of the script);
* ``ocr``: the seeded OCR-style CNN+transformer recogniser of ``benchmarks/ocr_standin.py`` (built when
  missing).

    python benchmarks/compile_memory.py [--models minilm,smollm2] [--old 4009b72 | --old-tree PATH]
                                        [--repeats 1] [--new-only] [--bare] [--json-out benchmarks/compile_memory.json]

``--bare`` runs every tree with only ``--budget``/``--calib``/``-o`` (no per-model flags such as ``--stream
on``, which an old tree may not know): each tree's own default path, e.g. the first wave's tree (e25a897)
against this one for issue 18's "≥ 4× faster than today's path". The table then also gives old ÷ new wall.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from lpcompile.io_utils import atomic_write_text  # noqa: E402

logger = logging.getLogger(__name__)

DEFAULT_OLD = "4009b72"
OCR_WORK = ROOT / "artifacts" / "bench" / "ocr_standin"  # benchmarks/ocr_standin.py builds it
GIB = 2**30
_CLI = "import sys; from lpcompile.cli import main; sys.exit(main())"


@dataclass(frozen=True)
class Case:
    """One model's compile: paths and the flags beyond ``--budget`` / ``--calib`` / ``-o``."""

    key: str
    model: Path
    calib: Path
    flags: tuple[str, ...] = ()


def cases(keys: list[str]) -> list[Case]:
    bench, examples = ROOT / "artifacts" / "bench", ROOT / "examples" / "models"
    known = {
        "minilm": Case("minilm", bench / "minilm.onnx", bench / "minilm" / "calib.npz"),
        "smollm2": Case("smollm2", bench / "smollm2.onnx", bench / "smollm2" / "calib.npz", ("--stream", "on")),
        "digits": Case("digits", examples / "digits_mlp.onnx", examples / "digits_calib.npz"),
        "ocr": Case("ocr", OCR_WORK / "recogniser.onnx", OCR_WORK / "calib.npz"),
    }
    out = []
    for k in keys:
        if k not in known:
            raise SystemExit(f"unknown model key {k!r} (known: {', '.join(known)})")
        case = known[k]
        if k == "ocr":  # the seeded stand-in is built here when missing
            from ocr_standin import build

            build()
        if not case.model.is_file() or not case.calib.is_file():
            raise SystemExit(f"{case.model} or {case.calib} is missing: run benchmarks/bench_{k}.py first")
        out.append(case)
    return out


def fp32_weight_bytes(model: Path) -> int:
    """4 bytes per element of every floating-point initializer (the model's weights held in fp32)."""
    import onnx

    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
    m = onnx.load(str(model), load_external_data=False)
    total = 0
    for t in m.graph.initializer:
        if t.data_type in floats:
            n = 1
            for d in t.dims:
                n *= int(d)
            total += 4 * n
    return total


def rss_limit_bytes(weight_bytes: int) -> int:
    """Issue 18's bound: 2 × the fp32 weights + 1 GiB."""
    return 2 * weight_bytes + GIB


def parse_time_v(stderr: str) -> dict[str, float]:
    """``/usr/bin/time -v`` figures: peak RSS in KiB and wall seconds."""
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", stderr)
    if rss is None or wall is None:
        raise ValueError("no /usr/bin/time -v figures in the output")
    secs = 0.0
    for part in wall.group(1).split(":"):
        secs = secs * 60 + float(part)
    return {"max_rss_kib": float(rss.group(1)), "wall_s": secs}


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def old_tree(rev: str) -> Path:
    """A detached worktree of ``rev`` (made once, reused)."""
    sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True, check=True)
    path = Path("/tmp") / f"lpcompile-compile-memory-{sha.stdout.strip()}"
    if not (path / "lpcompile").is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", str(path), rev], cwd=ROOT, check=True,
                       capture_output=True)
    return path


def run_compile(
    tree: Path, case: Case, out: Path, budget: str, bare: bool = False, extra: tuple[str, ...] = ()
) -> dict[str, Any]:
    """One compile in a fresh process with ``tree`` first on the path, under ``nice -n 10`` and
    ``/usr/bin/time -v``; a sampler also records the peak RSS of the process tree (psutil, every 50 ms).
    ``extra``: flags after the case's own (a variant of this tree)."""
    # the first wave's trees have no lpcompile/__main__.py: call the console script's function
    entry = ["-m", "lpcompile"] if (tree / "lpcompile" / "__main__.py").is_file() else ["-c", _CLI]
    cmd = [
        "nice", "-n", "10", "/usr/bin/time", "-v", sys.executable, *entry, str(case.model),
        "--budget", budget, "--calib", str(case.calib), "-o", str(out), "--force", "-q", *(() if bare else case.flags),
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    record: dict[str, Any] = {"tree": str(tree), "command": " ".join(cmd[5:]), "load_before": load_average()}
    for sub in ("passes", "runtime"):  # trees that map lpcompile.passes/.runtime by package-dir only
        link = tree / "lpcompile" / sub
        if not link.exists() and (tree / sub).is_dir():
            link.symlink_to(Path("..") / sub)
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tree)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        from scale import _tree_rss

        while not done.is_set():
            peak[0] = max(peak[0], _tree_rss(proc.pid, exclude=("nice", "time")))
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate(timeout=7200)
    done.set()
    sampler.join()
    record["load_after"] = load_average()
    record["started"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t0))
    record["exit"] = proc.returncode
    # exit 1 may be the quality guard firing after the outputs were written; the figures still count
    try:
        record.update(parse_time_v(err))
    except ValueError:
        record["error"] = err[-1000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("lpcompile:")]
    if proc.returncode != 0 and lines:
        record["message"] = lines[-1]
    record["sampled_peak_kib"] = peak[0] / 1024
    return record


def same_outputs(a: Path, b: Path) -> dict[str, bool]:
    """Whether two compiles wrote the same model bytes and the same plan."""
    plan_a, plan_b = (p.with_name(p.name.replace(".onnx", ".plan.json")) for p in (a, b))
    out = {"model_bytes_equal": a.is_file() and b.is_file() and a.read_bytes() == b.read_bytes()}
    out["plan_equal"] = (
        plan_a.is_file() and plan_b.is_file() and json.loads(plan_a.read_text()) == json.loads(plan_b.read_text())
    )
    return out


def format_rows(results: list[dict[str, Any]]) -> str:
    lines = [
        "| model | fp32 weights | limit (2×W + 1 GiB) | tree | peak RSS | ÷ limit | wall | load before → after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for run in r["runs"]:
            if "max_rss_kib" not in run:
                lines.append(f"| {r['model']} | | | {run['which']} | error | | | |")
                continue
            mib = run["max_rss_kib"] / 1024
            lines.append(
                f"| {r['model']} | {r['fp32_weights_mib']:.1f} MiB | {r['limit_mib']:.1f} MiB | {run['which']} | "
                f"{mib:.0f} MiB | {mib / r['limit_mib']:.2f} | {run['wall_s']:.0f} s | "
                f"{run['load_before']} → {run['load_after']} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="minilm")
    p.add_argument("--old", default=DEFAULT_OLD, help="git revision of the old tree (default %(default)s)")
    p.add_argument("--old-tree", help="an existing checkout of the old revision (instead of making a worktree)")
    p.add_argument("--new-only", action="store_true", help="measure this tree only")
    p.add_argument("--bare", action="store_true", help="no per-model flags: each tree's default path")
    p.add_argument(
        "--variant", action="append", default=[], metavar="NAME=FLAGS",
        help="also run this tree with FLAGS added (e.g. bf16='--probe-dtype bfloat16'); repeatable",
    )
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--budget", default="4.5bits")
    p.add_argument("--workdir", default="/tmp/lpcompile-compile-memory")
    p.add_argument("--json-out", default=str(ROOT / "benchmarks" / "compile_memory.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    old = Path(args.old_tree) if args.old_tree else None
    trees = {"new": ROOT} if args.new_only else {"old": old or old_tree(args.old), "new": ROOT}
    variants: dict[str, tuple[str, ...]] = {}
    for spec in args.variant:
        name, sep, flags = spec.partition("=")
        if not sep or not name or name in ("old", "new"):
            p.error(f"--variant {spec!r}: give NAME=FLAGS with a new name")
        variants[name] = tuple(shlex.split(flags))
    runs = [(w, t, ()) for w, t in trees.items()] + [(name, ROOT, flags) for name, flags in variants.items()]
    results: list[dict[str, Any]] = []
    for case in cases(args.models.split(",")):
        wbytes = fp32_weight_bytes(case.model)
        row: dict[str, Any] = {
            "model": case.key,
            "fp32_weight_bytes": wbytes,
            "fp32_weights_mib": wbytes / 2**20,
            "limit_mib": rss_limit_bytes(wbytes) / 2**20,
            "runs": [],
        }
        outs: dict[str, Path] = {}
        for rep in range(args.repeats):
            for which, tree, extra in runs:
                out = work / f"{case.key}.{which}.lp.onnx"
                run = run_compile(tree, case, out, args.budget, bare=args.bare, extra=extra)
                run["which"], run["repeat"] = which, rep
                row["runs"].append(run)
                outs[which] = out
                logger.info("%s / %s: %s", case.key, which, {k: run.get(k) for k in
                            ("max_rss_kib", "wall_s", "load_before", "load_after", "exit")})
        if "old" in outs and "new" in outs:
            row["old_vs_new"] = same_outputs(outs["old"], outs["new"])
            walls = {w: sorted(r["wall_s"] for r in row["runs"] if r["which"] == w and "wall_s" in r) for w in outs}
            for which in outs:
                if which != "old" and walls["old"] and walls[which]:
                    ratio = walls["old"][len(walls["old"]) // 2] / walls[which][len(walls[which]) // 2]
                    row["old_over_new_wall" if which == "new" else f"old_over_{which}_wall"] = ratio
        results.append(row)
    doc = {
        "benchmark": "compile_memory",
        "old": None if args.new_only else args.old,
        "new": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip(),
        "budget": args.budget,
        "bare": args.bare,
        "variants": {name: list(flags) for name, flags in variants.items()},
        "results": results,
    }
    atomic_write_text(Path(args.json_out), json.dumps(doc, indent=1) + "\n")
    print(format_rows(results))
    for r in results:
        if "old_vs_new" in r:
            print(f"{r['model']}: old vs new outputs {r['old_vs_new']}")
        for key, value in r.items():
            if key.startswith("old_over_") and key.endswith("_wall"):
                which = key[len("old_over_") : -len("_wall")]
                print(f"{r['model']}: old / {which} wall time (medians) {value:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
