"""Whole-graph vs segment-streamed analysis: peak RSS and wall time of `lpcompile MODEL --budget B`.

For each model the two analyses run side by side in fresh processes under ``/usr/bin/time -v``
(interleaved, ``--repeats`` times): ``whole`` (``--stream off``, the first-wave path with its
default sequential seeding), ``whole per-probe`` (``--stream off --seeding per-probe``) and
``streamed`` (``--stream on``, which seeds per probe). The streamed table must equal the
``whole per-probe`` table (same probes): the plans are compared. Ratios are against ``whole``.

Models (``--models``, comma-separated keys):

* ``minilm``: all-MiniLM-L6-v2 (``artifacts/bench/minilm.onnx`` + ``minilm/calib.npz``, built by
  ``benchmarks/bench_minilm.py``);
* ``smollm2``: SmolLM2-135M (exported by :func:`lpcompile.frontend.zoo.smollm2_onnx`), 16 × 128 Lee tokens;
* ``smollm2-l4``: its first 4 layers;
* ``tinyllama``: a 1.1B-parameter Llama (TinyLlama shapes, seeded weights,
  :mod:`lpcompile.frontend.synth_llama`, 4.4 GB of external data), 16 × 128 random tokens: streamed
  only (the whole-graph analysis needs ≈ 4× the model).

    python benchmarks/streamed.py --models minilm,smollm2 [--repeats 1] [--probes 16]
                                  [--extra "--rounding gptq"] [--json-out benchmarks/streamed.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from scale import run_once, uptime  # noqa: E402

from lpcompile.io_utils import atomic_write_text  # noqa: E402

logger = logging.getLogger(__name__)
WORK = ROOT / "artifacts" / "streamed"
CONFIGS: dict[str, list[str]] = {
    "whole": ["--stream", "off"],
    "whole per-probe": ["--stream", "off", "--seeding", "per-probe"],
    "streamed": ["--stream", "on"],
}


def _lee_windows(count: int = 16, length: int = 128) -> np.ndarray:
    from bench_smollm2 import _lines, windows

    return windows(_lines("lee_background.cor"), length, count)


def prepare(key: str) -> tuple[Path, Path, list[str]]:
    """(model, calibration file, configurations) for a model key; builds what is missing."""
    WORK.mkdir(parents=True, exist_ok=True)
    if key == "minilm":
        model = ROOT / "artifacts" / "bench" / "minilm.onnx"
        calib = ROOT / "artifacts" / "bench" / "minilm" / "calib.npz"
        if not model.is_file() or not calib.is_file():
            raise SystemExit("run benchmarks/bench_minilm.py first (it builds the MiniLM model and calibration)")
        return model, calib, list(CONFIGS)
    if key in ("smollm2", "smollm2-l4"):
        from lpcompile.frontend.zoo import smollm2_onnx

        layers = 4 if key.endswith("l4") else None
        model = smollm2_onnx(WORK / f"{key}.onnx", num_layers=layers)
        calib = WORK / "smollm2_calib.npz"
        if not calib.is_file():
            ids = _lee_windows()
            np.savez(calib, input_ids=ids, attention_mask=np.ones_like(ids))
        return model, calib, list(CONFIGS)
    if key == "tinyllama":
        from lpcompile.frontend.synth_llama import PRESETS, write_llama

        model = WORK / "tinyllama.onnx"
        if not model.is_file():
            write_llama(model, PRESETS["tinyllama-1.1b"], seed=0)
        calib = WORK / "tinyllama_calib.npz"
        if not calib.is_file():
            np.savez(calib, input_ids=np.random.default_rng(0).integers(0, 32000, (16, 128)).astype(np.int64))
        return model, calib, ["streamed"]
    raise SystemExit(f"unknown model key {key!r}")


def _weight_bytes(model: Path) -> int:
    import onnx

    m = onnx.load(str(model), load_external_data=False)
    return sum(int(np.prod(t.dims)) * 4 for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="minilm,smollm2-l4")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--probes", type=int, default=16)
    p.add_argument("--budget", default="4.5bits")
    p.add_argument("--extra", default="", help="more lpcompile flags for every run (e.g. '--rounding gptq')")
    p.add_argument("--tinyllama-probes", type=int, default=2, help="probes of the 1.1B run (1 per batch of 8)")
    p.add_argument("--json-out", default=str(ROOT / "benchmarks" / "streamed.json"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    load_before = uptime()
    results: list[dict[str, Any]] = []
    for key in args.models.split(","):
        model, calib, configs = prepare(key)
        wbytes = _weight_bytes(model)
        probes = args.tinyllama_probes if key == "tinyllama" else args.probes
        runs: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
        plans: dict[str, dict[str, str]] = {}
        for r in range(args.repeats * len(configs)):
            cfg = configs[r % len(configs)]
            out = WORK / f"{model.stem}.{cfg.replace(' ', '_')}.lp.onnx"
            cmd = [
                sys.executable, "-m", "lpcompile", str(model), "--budget", args.budget, "--calib", str(calib),
                "--probes", str(probes), "-o", str(out), "--force", "-q", *CONFIGS[cfg], *shlex.split(args.extra),
            ]
            fig = run_once(cmd, {})
            fig["load"] = uptime()
            runs[cfg].append(fig)
            if "error" not in fig:
                plan = json.loads(out.with_name(out.name.replace(".onnx", ".plan.json")).read_text())
                plans[cfg] = {n["name"]: n["format"] for n in plan["nodes"]}
            logger.info("%s / %s: %s", key, cfg, fig)
        med: dict[str, dict[str, float]] = {}
        for c, fs in runs.items():
            ok = [f for f in fs if "error" not in f]
            if ok:
                med[c] = {k: statistics.median(f[k] for f in ok) for k in ("wall_s", "max_rss_mib", "tree_rss_mib")}
        base = med.get("whole")
        results.append({
            "model": key,
            "fp32_weights_mib": round(wbytes / 2**20, 1),
            "rss_limit_mib": round((2 * wbytes + 2**30) / 2**20, 1),
            "probes": probes,
            "configs": {
                c: {
                    **{k: round(v, 2) for k, v in m.items()},
                    "wall_ratio": round(m["wall_s"] / base["wall_s"], 3) if base else None,
                    "rss_ratio": round(m["max_rss_mib"] / base["max_rss_mib"], 3) if base else None,
                }
                for c, m in med.items()
            },
            "errors": {
                c: [f["error"] for f in fs if "error" in f] for c, fs in runs.items() if any("error" in f for f in fs)
            },
            "streamed_plan_equals_whole_per_probe": (
                plans.get("streamed") == plans.get("whole per-probe") if "whole per-probe" in plans else None
            ),
            "runs": runs,
        })
    doc = {"load_before": load_before, "load_after": uptime(), "budget": args.budget, "extra": args.extra,
           "results": results}
    atomic_write_text(Path(args.json_out), json.dumps(doc, indent=1))
    print(f"`lpcompile MODEL --budget {args.budget} --calib … {args.extra}`; load before {load_before}, "
          f"after {doc['load_after']}")
    print(f"{'model':<12} {'config':<16} {'probes':>6} {'wall s':>8} {'×whole':>7} {'max RSS MiB':>12} "
          f"{'limit MiB':>10} {'×whole':>7}")
    for res in results:
        for c, m in res["configs"].items():
            wr = f"{m['wall_ratio']:.2f}" if m["wall_ratio"] is not None else "-"
            rr = f"{m['rss_ratio']:.2f}" if m["rss_ratio"] is not None else "-"
            print(f"{res['model']:<12} {c:<16} {res['probes']:>6} {m['wall_s']:>8.1f} {wr:>7} "
                  f"{m['max_rss_mib']:>12.0f} {res['rss_limit_mib']:>10.0f} {rr:>7}")
        for c, errs in res["errors"].items():
            print(f"{res['model']:<12} {c:<16} failed: {errs[0]}")
        print(f"{'':<12} streamed plan == whole per-probe plan: {res['streamed_plan_equals_whole_per_probe']}")


if __name__ == "__main__":
    main()
