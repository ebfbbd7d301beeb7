"""Which W8A8 / low-bit forms ONNX Runtime CPU runs faster than fp32 (issue 16: the ``ort`` target's kernels).

One op per model, batch 1 (M rows of a sentence / prefill), 2 intra-op threads, ``ORT_ENABLE_ALL``,
each form timed interleaved with its fp32 op in the same process (median of ``--runs``); the ops ORT
leaves after optimisation are listed, and the error is the max |Δ| / max |y| against the same graph
run with optimisation off (0 = the fused kernel computes the written numbers). Forms:

MatMul ``[M, K] × [K, N]`` (+ bias):
* ``qdq`` — int8 activation Q/DQ (zero point 0) + int8 per-channel weight DQ → MatMul → Add(bias)
  (standard ONNX; what lpcompile's ``w8a8`` is before passes/w8a8.py);
* ``qdq-nobias`` — the same without the bias Add;
* ``mitf-s8`` / ``mitf-u8`` — ``com.microsoft.MatMulIntegerToFloat`` with int8 / uint8 (zero point 128)
  activations and the bias as input 6 (``mitf-u8`` is what ``--target ort`` writes);
* ``nbits4-b128-a4`` / ``nbits8-b128-a4`` / ``nbits4-b128-a0`` — MatMulNBits (accuracy level 4: int8
  activations; 0: fp32).

Conv 1×1 ``C→O`` at H×W, + Relu:
* ``qdq`` (weight DQ + activation Q/DQ), ``qdq-outq`` (+ output Q/DQ: QLinearConv), ``convinteger``.

    python benchmarks/ort_int8_forms.py [--runs 200] [--out benchmarks/results_ort_int8_forms.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

RNG = np.random.default_rng(16)
MATMULS = ((47, 384, 384), (47, 384, 1536), (47, 1536, 384), (128, 576, 1536), (128, 1536, 576), (1, 576, 1536))
CONVS = ((32, 64, 28), (96, 24, 56))


def _model(nodes: list, inits: list, shape: list) -> onnx.ModelProto:
    g = h.make_graph(
        nodes,
        "g",
        [h.make_tensor_value_info("x", T.FLOAT, shape)],
        [h.make_tensor_value_info("y", T.FLOAT, None)],
        inits,
    )
    return h.make_model(g, opset_imports=[h.make_opsetid("", 21), h.make_opsetid("com.microsoft", 1)])


def _session(m: onnx.ModelProto, optimize: bool, threads: int, opt_path: str | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if opt_path:
        so.optimized_model_filepath = opt_path
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _nbits(w: np.ndarray, bits: int, bs: int, acc: int) -> tuple[list, list]:
    k, n = w.shape
    nb = (k + bs - 1) // bs
    wp = np.zeros((nb * bs, n), np.float32)
    wp[:k] = w
    wb = wp.reshape(nb, bs, n)
    qmax = 2 ** (bits - 1) - 1
    s = np.abs(wb).max(1) / qmax + 1e-12
    q = (np.clip(np.round(wb / s[:, None, :]), -qmax - 1, qmax).astype(np.int32) + 2 ** (bits - 1)).transpose(2, 0, 1)
    q = q.astype(np.uint8)
    if bits == 4:
        q = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    node = h.make_node(
        "MatMulNBits",
        ["x", "B", "S"],
        ["m"],
        domain="com.microsoft",
        K=k,
        N=n,
        bits=bits,
        block_size=bs,
        accuracy_level=acc,
    )
    return [node], [nh.from_array(q, "B"), nh.from_array(s.T.copy().reshape(-1).astype(np.float32), "S")]


def matmul_forms(m: int, k: int, n: int) -> tuple[dict[str, onnx.ModelProto], np.ndarray]:
    w = (RNG.standard_normal((k, n)) * 0.05).astype(np.float32)
    b = RNG.standard_normal(n).astype(np.float32)
    x = RNG.standard_normal((m, k)).astype(np.float32)
    ws = (np.abs(w).max(0) / 127).astype(np.float32)
    wq = np.round(w / ws).astype(np.int8)
    xs = np.array(np.abs(x).max() / 127, np.float32)
    base = [nh.from_array(wq, "Wq"), nh.from_array(ws, "ws"), nh.from_array(xs, "xs"), nh.from_array(b, "b")]
    z8, zu = nh.from_array(np.array(0, np.int8), "z"), nh.from_array(np.array(128, np.uint8), "z")
    add = h.make_node("Add", ["m", "b"], ["y"])
    qdq = [
        h.make_node("QuantizeLinear", ["x", "xs", "z"], ["xq"]),
        h.make_node("DequantizeLinear", ["xq", "xs", "z"], ["xd"]),
        h.make_node("DequantizeLinear", ["Wq", "ws"], ["Wd"], axis=1),
        h.make_node("MatMul", ["xd", "Wd"], ["m"]),
    ]
    forms = {
        "fp32": _model([h.make_node("MatMul", ["x", "W"], ["m"]), add], [nh.from_array(w, "W"), base[3]], [m, k]),
        "qdq": _model([*qdq, add], [*base, z8], [m, k]),
        "qdq-nobias": _model([*qdq[:3], h.make_node("MatMul", ["xd", "Wd"], ["y"])], [*base[:3], z8], [m, k]),
    }
    for name, z in (("mitf-s8", z8), ("mitf-u8", zu)):
        forms[name] = _model(
            [
                h.make_node("QuantizeLinear", ["x", "xs", "z"], ["xq"]),
                h.make_node(
                    "MatMulIntegerToFloat", ["xq", "Wq", "xs", "ws", "z", "", "b"], ["y"], domain="com.microsoft"
                ),
            ],
            [*base, z],
            [m, k],
        )
    for name, bits, acc in (("nbits4-b128-a4", 4, 4), ("nbits8-b128-a4", 8, 4), ("nbits4-b128-a0", 4, 0)):
        nodes, inits = _nbits(w, bits, 128, acc)
        forms[name] = _model([*nodes, add], [*inits, base[3]], [m, k])
    return forms, x


def conv_forms(c: int, o: int, hw: int) -> tuple[dict[str, onnx.ModelProto], np.ndarray]:
    w = (RNG.standard_normal((o, c, 1, 1)) * 0.1).astype(np.float32)
    b = (RNG.standard_normal(o) * 0.1).astype(np.float32)
    x = np.maximum(RNG.standard_normal((1, c, hw, hw)), 0).astype(np.float32)
    ws = (np.abs(w).reshape(o, -1).max(1) / 127).astype(np.float32)
    wq = np.round(w / ws[:, None, None, None]).astype(np.int8)
    xs = np.array(np.abs(x).max() / 127, np.float32)
    init = [
        nh.from_array(wq, "Wq"),
        nh.from_array(ws, "ws"),
        nh.from_array(xs, "xs"),
        nh.from_array(np.array(0, np.int8), "z"),
        nh.from_array(b, "b"),
    ]
    qx = [
        h.make_node("QuantizeLinear", ["x", "xs", "z"], ["xq"]),
        h.make_node("DequantizeLinear", ["xq", "xs", "z"], ["xd"]),
        h.make_node("DequantizeLinear", ["Wq", "ws"], ["Wd"], axis=0),
        h.make_node("Conv", ["xd", "Wd", "b"], ["c"]),
    ]
    shape = [1, c, hw, hw]
    forms = {
        "fp32": _model(
            [h.make_node("Conv", ["x", "W", "b"], ["c"]), h.make_node("Relu", ["c"], ["y"])],
            [nh.from_array(w, "W"), init[4]],
            shape,
        ),
        "qdq": _model([*qx, h.make_node("Relu", ["c"], ["y"])], init, shape),
        "qdq-outq": _model(
            [
                *qx,
                h.make_node("QuantizeLinear", ["c", "ys", "z"], ["cq"]),
                h.make_node("DequantizeLinear", ["cq", "ys", "z"], ["cd"]),
                h.make_node("Relu", ["cd"], ["y"]),
            ],
            [*init, nh.from_array(np.array(0.05, np.float32), "ys")],
            shape,
        ),
        "convinteger": _model(
            [
                h.make_node("QuantizeLinear", ["x", "xs", "z"], ["xq"]),
                h.make_node("ConvInteger", ["xq", "Wq", "z"], ["ci"]),
                h.make_node("Cast", ["ci"], ["cf"], to=T.FLOAT),
                h.make_node("Mul", ["cf", "sc"], ["cm"]),
                h.make_node("Add", ["cm", "b4"], ["c"]),
                h.make_node("Relu", ["c"], ["y"]),
            ],
            [
                init[0],
                init[2],
                init[3],
                nh.from_array((xs * ws).reshape(1, o, 1, 1).astype(np.float32), "sc"),
                nh.from_array(b.reshape(1, o, 1, 1), "b4"),
            ],
            shape,
        ),
    }
    return forms, x


def measure(forms: dict[str, onnx.ModelProto], x: np.ndarray, runs: int, threads: int, tmp: Path) -> list[dict]:
    ref = _session(forms["fp32"], True, threads)
    rows = []
    for name, m in forms.items():
        if name == "fp32":
            continue
        try:
            opt = str(tmp / "opt.onnx")
            s = _session(m, True, threads, opt)
            kept = [n.op_type for n in onnx.load(opt).graph.node]
            exact = _session(m, False, threads).run(None, {"x": x})[0]
        except Exception as exc:
            rows.append({"form": name, "error": str(exc)[:200]})
            continue
        y = s.run(None, {"x": x})[0]
        t_ref, t = [], []
        for _ in range(runs):
            for sess, acc in ((ref, t_ref), (s, t)):
                t0 = time.perf_counter()
                sess.run(None, {"x": x})
                acc.append(time.perf_counter() - t0)
        rows.append(
            {
                "form": name,
                "fp32_ms": 1e3 * float(np.median(t_ref)),
                "ms": 1e3 * float(np.median(t)),
                "ratio": float(np.median(t) / np.median(t_ref)),
                "ops": kept,
                "err_vs_written": float(np.abs(y - exact).max() / max(np.abs(exact).max(), 1e-30)),
            }
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results_ort_int8_forms.json")
    args = p.parse_args()
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    load0 = os.getloadavg()
    results = []
    for m, k, n in MATMULS:
        forms, x = matmul_forms(m, k, n)
        results.append({"op": f"MatMul {m}x{k}x{n}", "rows": measure(forms, x, args.runs, args.threads, tmp)})
    for c, o, hw in CONVS:
        forms, x = conv_forms(c, o, hw)
        results.append({"op": f"Conv1x1 {c}->{o} @{hw}", "rows": measure(forms, x, args.runs, args.threads, tmp)})
    summary = {
        "onnxruntime": ort.__version__,
        "threads": args.threads,
        "runs": args.runs,
        "loadavg_start": load0,
        "loadavg_end": os.getloadavg(),
        "results": results,
    }
    tmp_out = args.out.with_suffix(".tmp")
    tmp_out.write_text(json.dumps(summary, indent=1))
    os.replace(tmp_out, args.out)
    for r in results:
        print(r["op"])
        for row in r["rows"]:
            if "error" in row:
                print(f"  {row['form']:<16} ERROR {row['error'][:100]}")
            else:
                print(
                    f"  {row['form']:<16} {row['ratio']:5.2f}x fp32 ({row['fp32_ms']:.3f} ms)  "
                    f"err {row['err_vs_written']:.1e}  {','.join(row['ops'])}"
                )


if __name__ == "__main__":
    main()
