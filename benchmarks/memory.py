"""Peak memory of the analysis against the number of calibration samples (it streams batches).

For each sample count (default 64 and 512 sentences of gensim's Lee background corpus, tokenized
to ``--max-len`` tokens) a fresh process runs ``lpcompile analyze`` on all-MiniLM-L6-v2
(``lpcompile.frontend.zoo.minilm_onnx``) and reports its peak resident set size (``getrusage``
``ru_maxrss``, the figure ``/usr/bin/time -v`` prints as "Maximum resident set size") and wall
time. A ``baseline`` row is the same process up to loading the model and the data, without the
analysis. Streaming means the peak grows with the batch size, not with the sample count.

    python benchmarks/memory.py [--samples 64,512] [--max-len 128] [--batch-size 8] [--probes 16]
                                [--workdir /tmp/lpcompile-memory] [--json-out benchmarks/memory.json]
                                [--synthetic]

``--synthetic`` (or a missing MiniLM package) measures a synthetic transformer-ish ONNX model
instead (embedding, 4 attention + MLP blocks, d=256) with random token ids; the JSON says which.
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
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lpcompile.io_utils import atomic_write_text  # noqa: E402

logger = logging.getLogger(__name__)

# A child process: run the CLI (or only load model + data), then print its peak RSS.
_CHILD = r"""
import resource, sys, time
t0 = time.perf_counter()
if sys.argv[1] == "--baseline":
    import torch  # noqa: F401  (the analysis imports it too)
    from lpcompile.files import load_calib_for, load_normalized
    import lpcompile.analysis.sensitivity  # noqa: F401
    model = load_normalized(sys.argv[2])
    load_calib_for(model, sys.argv[3])
    rc = 0
else:
    from lpcompile.cli import main
    rc = main(sys.argv[1:])
print("LPMEM", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter() - t0, flush=True)
sys.exit(rc)
"""


def lee_sentences(n: int) -> list[str]:
    """The first ``n`` sentences (≥ 5 words) of gensim's Lee background corpus."""
    from gensim.test.utils import datapath

    out: list[str] = []
    for doc in Path(datapath("lee_background.cor")).read_text(encoding="utf8", errors="replace").splitlines():
        out += [s for s in re.split(r'(?<=[.!?])\s+(?=[A-Z"])', doc.strip()) if len(s.split()) >= 5]
        if len(out) >= n:
            return out[:n]
    raise SystemExit(f"the Lee corpus has only {len(out)} sentences, {n} asked")


def synthetic_transformer(path: Path, d: int = 256, layers: int = 4, vocab: int = 2000, seed: int = 0) -> Path:
    """A transformer-ish encoder in plain ONNX: Gather embedding, per layer single-head attention
    (q/k/v/o MatMuls, Softmax) and a 4·d ReLU MLP, LayerNormalization after each; ids [N, S]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits: dict[str, np.ndarray] = {
        "emb": (0.1 * rng.standard_normal((vocab, d))).astype(np.float32),
        "scale": np.array(1 / np.sqrt(d), np.float32),
        "g": np.ones(d, np.float32),
        "b": np.zeros(d, np.float32),
    }
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["h0"], name="embed")]
    h = "h0"

    def w(name: str, k: int, n: int) -> str:
        inits[name] = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
        return name

    for i in range(layers):
        p = f"l{i}."
        q, k, v = (helper.make_node("MatMul", [h, w(p + x, d, d)], [p + x + "_out"], name=p + x) for x in "qkv")
        nodes += [
            q,
            k,
            v,
            helper.make_node("Transpose", [p + "k_out"], [p + "kt"], perm=[0, 2, 1], name=p + "kt"),
            helper.make_node("MatMul", [p + "q_out", p + "kt"], [p + "s"], name=p + "scores"),
            helper.make_node("Mul", [p + "s", "scale"], [p + "ss"], name=p + "scale"),
            helper.make_node("Softmax", [p + "ss"], [p + "a"], axis=-1, name=p + "softmax"),
            helper.make_node("MatMul", [p + "a", p + "v_out"], [p + "c"], name=p + "ctx"),
            helper.make_node("MatMul", [p + "c", w(p + "o", d, d)], [p + "o_out"], name=p + "o"),
            helper.make_node("Add", [h, p + "o_out"], [p + "r1"], name=p + "res1"),
            helper.make_node("LayerNormalization", [p + "r1", "g", "b"], [p + "n1"], axis=-1, name=p + "ln1"),
            helper.make_node("MatMul", [p + "n1", w(p + "up", d, 4 * d)], [p + "u"], name=p + "up"),
            helper.make_node("Relu", [p + "u"], [p + "ru"], name=p + "relu"),
            helper.make_node("MatMul", [p + "ru", w(p + "down", 4 * d, d)], [p + "dn"], name=p + "down"),
            helper.make_node("Add", [p + "n1", p + "dn"], [p + "r2"], name=p + "res2"),
            helper.make_node("LayerNormalization", [p + "r2", "g", "b"], [p + "out"], axis=-1, name=p + "ln2"),
        ]
        h = p + "out"
    nodes.append(helper.make_node("Identity", [h], ["last_hidden_state"], name="out"))
    graph = helper.make_graph(
        nodes,
        "synthetic_transformer",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "seq", d])],
        [numpy_helper.from_array(a, k) for k, a in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def measure(args: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Run the child with ``args``; return (peak RSS in MiB, wall seconds of the child's work)."""
    res = subprocess.run(
        [sys.executable, "-c", _CHILD, *args], capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=7200
    )
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("LPMEM ")), None)
    if res.returncode != 0 or line is None:
        raise SystemExit(f"child failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
    _, kb, secs = line.split()
    return int(kb) / 1024.0, float(secs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", default="64,512", help="calibration sample counts (comma-separated)")
    p.add_argument("--max-len", type=int, default=128, help="tokens per sentence (padded)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--probes", type=int, default=16)
    p.add_argument("--workdir", default="/tmp/lpcompile-memory", help="model export and calibration files")
    p.add_argument("--json-out", default=str(ROOT / "benchmarks" / "memory.json"))
    p.add_argument("--synthetic", action="store_true", help="synthetic transformer instead of MiniLM")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("gensim").setLevel(logging.WARNING)
    counts = [int(x) for x in args.samples.split(",")]
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)

    model_name = "all-MiniLM-L6-v2"
    if not args.synthetic:
        try:
            from lpcompile.frontend.zoo import minilm_onnx, minilm_tokenize

            model = minilm_onnx(work / "minilm.onnx")
            sentences = lee_sentences(max(counts))
            data = minilm_tokenize(sentences, args.max_len)
        except Exception as exc:  # package missing or offline export failing: say so, measure the stand-in
            logger.warning("MiniLM unavailable (%s): measuring the synthetic transformer instead", exc)
            args.synthetic = True
    if args.synthetic:
        model_name = "synthetic transformer (d=256, 4 layers)"
        model = synthetic_transformer(work / "synthetic.onnx")
        data = {"input_ids": np.random.default_rng(0).integers(0, 2000, (max(counts), args.max_len))}

    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    rows: list[dict[str, Any]] = []
    for n in counts:
        calib = work / f"calib_{n}_{args.max_len}.npz"
        np.savez(calib, **{k: v[:n] for k, v in data.items()})
        out = work / f"sens_{n}.json"
        if n == counts[0]:
            rss, secs = measure(["--baseline", str(model), str(calib)], env)
            rows.append(
                {
                    "what": "baseline (imports, model, data)",
                    "samples": n,
                    "peak_rss_mib": round(rss, 1),
                    "wall_s": round(secs, 1),
                }
            )
            logger.info("baseline: %.0f MiB", rss)
        cli = [
            "analyze",
            str(model),
            "--calib",
            str(calib),
            "-o",
            str(out),
            "--probes",
            str(args.probes),
            "--batch-size",
            str(args.batch_size),
            "-q",
        ]
        t0 = time.perf_counter()
        rss, secs = measure(cli, env)
        rows.append(
            {
                "what": "analyze",
                "samples": n,
                "peak_rss_mib": round(rss, 1),
                "wall_s": round(secs, 1),
                "command": "lpcompile " + " ".join(cli[:-1]),
            }
        )
        logger.info(
            "analyze, %d samples: %.0f MiB, %.0f s (%.0f s with start-up)", n, rss, secs, time.perf_counter() - t0
        )

    title = (
        f"peak memory of `lpcompile analyze` — {model_name}, seq {args.max_len}, batch {args.batch_size}, "
        f"{args.probes} probes"
    )
    print(title)
    print(f"{'what':<34} {'samples':>8} {'peak RSS MiB':>13} {'wall s':>8}")
    for r in rows:
        print(f"{r['what']:<34} {r['samples']:>8} {r['peak_rss_mib']:>13.1f} {r['wall_s']:>8.1f}")
    an = [r for r in rows if r["what"] == "analyze"]
    if len(an) >= 2:
        print(
            f"peak ratio {an[-1]['samples']}/{an[0]['samples']} samples: "
            f"{an[-1]['peak_rss_mib'] / an[0]['peak_rss_mib']:.2f}×"
        )
    atomic_write_text(
        args.json_out,
        json.dumps(
            {
                "model": model_name,
                "max_len": args.max_len,
                "batch_size": args.batch_size,
                "probes": args.probes,
                "corpus": "gensim lee_background.cor" if not args.synthetic else "random token ids",
                "platform": platform.platform(),
                "python": platform.python_version(),
                "rows": rows,
            },
            indent=2,
        )
        + "\n",
    )
    print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
