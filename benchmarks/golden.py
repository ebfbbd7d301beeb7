"""Golden outputs of the example models, to check that a refactor changes no decision and no graph.

    python benchmarks/golden.py record DIR      # compile + apply --uniform on the digits MLP and CNN
    python benchmarks/golden.py compare OLD NEW # decisions, bits, and graphs with metadata stripped

``record`` writes DIR/golden.json (per case: exit code, sha256 of the file, node → format, achieved
bits, softmax mode, activation scales) and the rewritten models. ``compare`` prints every difference
and a count; two graphs are the same when their protos are equal after node/model ``metadata_props``
and doc strings are removed (metadata may change without the model changing).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import onnx

from lpcompile.cli import main as lpcompile

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "models"
BUDGETS = {"digits_mlp": ("4.25", "4.5", "6"), "digits_cnn": ("4.75", "5", "6")}
UNIFORM = ("bf16", "fp16", "fp8_e4m3", "fp8_e5m2", "int8", "int4_b128", "int4_b64", "int4_b32")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def graph_digest(path: Path) -> str:
    """sha256 of the model without metadata_props and doc strings."""
    m = onnx.load(str(path))
    del m.metadata_props[:]
    for n in m.graph.node:
        del n.metadata_props[:]
        n.doc_string = ""
    return hashlib.sha256(m.SerializeToString()).hexdigest()


def record(out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    calib = str(EXAMPLES / "digits_calib.npz")
    res: dict[str, dict[str, object]] = {}
    for model, budgets in BUDGETS.items():
        src = str(EXAMPLES / f"{model}.onnx")
        for b in budgets:
            o = out / f"{model}@{b}.onnx"
            rc = lpcompile([src, "--budget", b, "--calib", calib, "-o", str(o), "-q", "--probes", "8"])
            plan = json.loads(o.with_name(f"{model}@{b}.plan.json").read_text())
            res[o.name] = {
                "rc": rc,
                "sha": _sha(o),
                "formats": {n["name"]: n["format"] for n in plan["nodes"]},
                "bits": plan["achieved_bits"],
                "softmax": plan.get("softmax"),
                "scales": plan.get("activation_scales"),
            }
        for fmt in UNIFORM:
            for target in ("qdq", "ort"):
                o = out / f"{model}.{fmt}.{target}.onnx"
                args = ["apply", src, "--uniform", fmt, "--target", target, "--calib", calib, "-o", str(o), "-q"]
                res[o.name] = {"rc": lpcompile(args), "sha": _sha(o)}
    (out / "golden.json").write_text(json.dumps(res, indent=1, sort_keys=True))
    print(f"recorded {len(res)} cases in {out}")


def compare(old: Path, new: Path) -> int:
    a = json.loads((old / "golden.json").read_text())
    b = json.loads((new / "golden.json").read_text())
    same_graph = differing = 0
    for case in sorted(a):
        x, y = a[case], b.get(case, {})
        notes = []
        if graph_digest(old / case) == graph_digest(new / case):
            same_graph += 1
        else:
            notes.append("GRAPH DIFFERS")
        keys = ("rc", "formats", "bits", "softmax", "scales")
        notes += [f"{k}: {x.get(k)} -> {y.get(k)}" for k in keys if x.get(k) != y.get(k)]
        if notes:
            differing += 1
            print(case, "; ".join(notes))
    print(f"{len(a)} cases: {same_graph} graphs identical without metadata; {differing} with a difference listed above")
    return 0


def cli() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("out", type=Path)
    c = sub.add_parser("compare")
    c.add_argument("old", type=Path)
    c.add_argument("new", type=Path)
    args = p.parse_args()
    if args.cmd == "record":
        record(args.out)
        return 0
    return compare(args.old, args.new)


if __name__ == "__main__":
    raise SystemExit(cli())
