"""Weight rounding on all-MiniLM-L6-v2: uniform int4 with nearest / rtn / mse / gptq, and mixed plans
whose analyzer scores each candidate by the weights that rounding really writes.

Data and metric are bench_minilm.py's: calibration 128 Lee background sentences, 1−cos of the sentence
embedding vs fp32 on 400 held-out sentences, bits counted by ``harness.weight_bits`` (every stored
tensor of the weights, scales included, over the MatMul weight count).

* ``uniform``: every MatMul weight in one format (``int4_b128``, ``int4_b64``) with each rounding:
  ``nearest`` (today's reference, ±qmax grid), ``rtn`` (full code range, per-block choice),
  ``mse`` (clip search weighted by diag(XᵀX)), ``gptq`` (error-compensated, act-order, MSE scales).
  ``XᵀX`` per MatMul input comes from one forward over the calibration set (padded positions left out).
* ``mixed``: one Hutchinson analysis (the harness's settings: 32 probes, batch 16); from its Hessian
  diagonal the candidates are scored for each rounding — ``nearest`` with today's ½·ΣD·δ²,
  ``gptq`` with the Kronecker-factored ½·Σ_n g_n·δ_nᵀĤδ_n (``lpcompile.rounding.kron_loss``, which
  sees the input correlations GPTQ uses) — the exact ILP picks a plan per budget, and the plan is
  written with exactly the scored weights (``QuantizeWeightsPass(weights=...)``).

Until the analysis/apply API threads roundings and Hessians itself, this script injects them: it
wraps ``sensitivity.predict_losses`` to keep the Hessian diagonal and hands precomputed weights to
``QuantizeWeightsPass`` through ``lpcompile.passes.pipeline``.

    python benchmarks/bench_rounding.py [--formats int4_b128,int4_b64] [--methods nearest,rtn,mse,gptq]
                                        [--budgets 4.25,4.5] [--skip-mixed] [--skip-uniform]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_minilm import minilm_task
from harness import ANALYSIS_FORMATS, BENCH_DIR, Context, prepare, session, setup_logging, weight_bits

logger = logging.getLogger("bench_rounding")

OUT_JSON = BENCH_DIR / "results_rounding.json"


@contextlib.contextmanager
def precomputed_weights(weights: Mapping[str, Any]) -> Iterator[None]:
    """Make ``apply_plan`` write ``weights`` (by initializer name) instead of re-rounding."""
    import lpcompile.passes.pipeline as pipeline

    orig = pipeline.QuantizeWeightsPass
    pipeline.QuantizeWeightsPass = functools.partial(orig, weights=dict(weights))  # type: ignore[misc]
    try:
        yield
    finally:
        pipeline.QuantizeWeightsPass = orig  # type: ignore[misc]


class Rounder:
    """Rounded weights per (weight, format, method), computed once and shared by scoring and writing."""

    def __init__(self, model: Any, nodes: Sequence[Any], hessians: Mapping[str, np.ndarray]) -> None:
        from lpcompile.graph import weight_array

        self.nodes = {n.weight: n for n in nodes}
        self.arrays = {n.weight: weight_array(model, n.weight) for n in nodes}
        self.hessians = hessians
        self.cache: dict[tuple[str, str, str], Any] = {}
        self.seconds: dict[str, float] = {}

    def get(self, weight: str, fmt: str, method: str) -> Any:
        from lpcompile.analysis.input_hessians import node_hessian
        from lpcompile.rounding import round_weight

        key = (weight, fmt, method)
        if key not in self.cache:
            n = self.nodes[weight]
            t0 = time.perf_counter()
            self.cache[key] = round_weight(
                fmt, self.arrays[weight], n.layout, method, hessian=node_hessian(n, self.hessians)
            )
            self.seconds[method] = self.seconds.get(method, 0.0) + time.perf_counter() - t0
        return self.cache[key]

    def for_plan(self, plan: Any, method: str) -> dict[str, Any]:
        from lpcompile.formats import get_format

        out = {}
        for a in plan.nodes:
            if not get_format(a.format).is_identity:
                out[a.weight] = self.get(a.weight, get_format(a.format).name, method)
        return out


WEIGHT_OPS = ("MatMul", "Gemm")


def matmul_only(ctx: Context, nodes: Sequence[Any]) -> Context:
    """``ctx`` with the bits rule over exactly ``nodes``' weights (as bench_minilm counted before
    Gather tables became weighted nodes)."""
    import onnx
    from harness import _tensor_entries

    weights = {n.weight: n for n in nodes}
    proto = onnx.load(str(ctx.norm), load_external_data=False)
    nonweight = frozenset(e for e in _tensor_entries(proto) if e[0] not in weights)
    return replace(ctx, weight_params=sum(n.params for n in weights.values()), nonweight=nonweight)


def evaluate(ctx: Context, path: Path, ref: Mapping[str, np.ndarray]) -> dict[str, Any]:
    t0 = time.perf_counter()
    outs = ctx.task.collect(session(path))
    row = {"bits": weight_bits(path, ctx), "eval_s": time.perf_counter() - t0}
    row.update(ctx.task.score(outs, ref))
    return row


def apply(ctx: Context, plan: Any, weights: Mapping[str, Any], path: Path) -> None:
    from lpcompile.config import ApplyConfig
    from lpcompile.files import apply_file

    with precomputed_weights(weights):
        apply_file(
            ctx.task.model, path, plan=plan, calib_path=ctx.task.calib, config=ApplyConfig(target="qdq"), force=True
        )


# ------------------------------------------------------------------------------------------
# peers at their strongest settings (the same data, metric and bits rule)


def peer_nncf(
    ctx: Context, out: Path, mode: str, group: int, budget: float | None, awq: bool = False
) -> dict[str, Any]:
    """NNCF ``compress_weights`` with scale estimation on the model raised to opset 21.

    At opset < 21 NNCF 3.4 writes ``MatMulNBits`` with the MatMul→Add bias as its input 5 and keeps the
    Add (the bias is added twice); at opset 21 it writes blocked DequantizeLinear. ``budget`` None: every
    MatMul in ``mode`` (ratio 1); else an INT8_ASYM backup with the ratio fitted to the budget.
    """
    import nncf
    import onnx
    from harness import _float_feeds, _lower_ir, calib_batches, save_proto
    from nncf import CompressWeightsMode, SensitivityMetric
    from onnx import version_converter

    proto = onnx.load(str(ctx.norm))
    feeds = _float_feeds(calib_batches(ctx.task, ctx.task.nncf_batch, limit=64), proto)
    ratio = 1.0
    info: dict[str, Any] = {"mode": mode, "group": group, "scale_estimation": True, "awq": awq}
    for attempt in range(3):
        q = nncf.compress_weights(
            version_converter.convert_version(onnx.load(str(ctx.norm)), 21),
            mode=getattr(CompressWeightsMode, mode),
            ratio=ratio,
            group_size=group,
            all_layers=True,
            sensitivity_metric=SensitivityMetric.HESSIAN_INPUT_ACTIVATION,
            dataset=nncf.Dataset(feeds),
            scale_estimation=True,
            awq=awq,
            ignored_scope=nncf.IgnoredScope(types=["Gather", "Conv"], validate=False),
        )
        save_proto(_lower_ir(q), out)
        bits = weight_bits(out, ctx)
        info.update(ratio=ratio, attempts=attempt + 1)
        if budget is None or abs(bits - budget) <= 0.03 or attempt == 2:
            break
        if attempt == 0:
            b4 = bits
            ratio = float(np.clip((8.3 - budget) / (8.3 - b4), 0.0, 1.0))
        else:
            ratio = float(np.clip(ratio + (bits - budget) / (8.3 - b4), 0.0, 1.0))
    return info


def peer_ort(ctx: Context, out: Path, block: int, symmetric: bool, algo: str = "default") -> dict[str, Any]:
    """ONNX Runtime ``MatMulNBitsQuantizer``: its default absmax rounding or k-quant scale search."""
    import onnx
    from harness import save_proto
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    config = None
    if algo == "k_quant":
        config = mnq.KQuantWeightOnlyQuantConfig()
    q = mnq.MatMulNBitsQuantizer(onnx.load(str(ctx.norm)), block_size=block, is_symmetric=symmetric, algo_config=config)
    q.process()
    save_proto(q.model.model, out)
    return {"algo": algo, "block": block, "symmetric": symmetric}


PEERS: dict[str, Any] = {
    "nncf-int4sym-g64-se": lambda ctx, out: peer_nncf(ctx, out, "INT4_SYM", 64, None),
    "nncf-int4sym-g64-se-4.5": lambda ctx, out: peer_nncf(ctx, out, "INT4_SYM", 64, 4.5),
    "nncf-int4sym-g128-se": lambda ctx, out: peer_nncf(ctx, out, "INT4_SYM", 128, None),
    "nncf-int4sym-g128-se-4.5": lambda ctx, out: peer_nncf(ctx, out, "INT4_SYM", 128, 4.5),
    "nncf-int4asym-g128-se-awq": lambda ctx, out: peer_nncf(ctx, out, "INT4_ASYM", 128, None, awq=True),
    "ort-default-asym-b64": lambda ctx, out: peer_ort(ctx, out, 64, False),
    "ort-kquant-asym-b64": lambda ctx, out: peer_ort(ctx, out, 64, False, "k_quant"),
}


def analyze_capturing(ctx: Context) -> tuple[Any, dict[str, Any], float]:
    """One Hutchinson analysis (harness settings); also returns its Hessian diagonal and activation terms."""
    import lpcompile.analysis.sensitivity as sens
    from lpcompile.analysis.config import AnalysisConfig
    from lpcompile.files import analyze_file

    captured: dict[str, Any] = {}
    orig = sens.predict_losses

    def keep(model, nodes, fmts, config, diag, act_term, act_elements, module_paths):  # type: ignore[no-untyped-def]
        captured.update(nodes=nodes, fmts=fmts, diag=diag, act_term=act_term, act_elements=act_elements)
        return orig(model, nodes, fmts, config, diag, act_term, act_elements, module_paths)

    cfg = AnalysisConfig(formats=ANALYSIS_FORMATS, **dict(ctx.task.analysis))
    sens.predict_losses = keep  # type: ignore[assignment]
    try:
        t0 = time.perf_counter()
        table = analyze_file(ctx.task.model, ctx.task.calib, cfg)
        wall = time.perf_counter() - t0
    finally:
        sens.predict_losses = orig  # type: ignore[assignment]
    return table, captured, wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--formats", default="int4_b128,int4_b64")
    p.add_argument("--methods", default="nearest,rtn,mse,gptq")
    p.add_argument("--budgets", default="4.25,4.5")
    p.add_argument("--mixed-methods", default="nearest,gptq")
    p.add_argument("--skip-uniform", action="store_true")
    p.add_argument("--skip-mixed", action="store_true")
    p.add_argument("--extra-candidates", default="", help="grammar formats added to the mixed plans' candidates")
    p.add_argument("--peers", default="", help=f"comma list of peer variants: {', '.join(PEERS)}")
    p.add_argument("--out", type=Path, default=OUT_JSON)
    p.add_argument("--threads", type=int, default=1, help="torch threads (rounding, XᵀX, analysis)")
    args = p.parse_args()
    setup_logging()
    import torch

    from lpcompile.analysis.input_hessians import collect_input_hessians
    from lpcompile.analysis.rounded import predict_rounded_losses, weights_for_plan
    from lpcompile.api import decide
    from lpcompile.config import DecideConfig
    from lpcompile.files import load_normalized
    from lpcompile.formats import get_format
    from lpcompile.frontend.calib import load_calibration
    from lpcompile.graph import find_weight_nodes
    from lpcompile.passes.pipeline import uniform_plan

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)  # on shared, oversubscribed cores one thread is many times faster
    task = minilm_task()
    ctx = prepare(task)
    model = load_normalized(task.model)
    # the benchmark's bits rule: MatMul/Gemm weights only (embedding tables stay fp32 for every method)
    nodes = [n for n in find_weight_nodes(model) if n.op_type in WEIGHT_OPS]
    ctx = matmul_only(ctx, nodes)
    calib = load_calibration(task.calib, model)
    t0 = time.perf_counter()
    hessians = collect_input_hessians(model, calib, nodes, batch_size=16)
    hess_s = time.perf_counter() - t0
    logger.info("XᵀX for %d activation tensors in %.1f s", len(hessians), hess_s)
    rounder = Rounder(model, nodes, hessians)
    ref = task.collect(session(ctx.norm))
    work = ctx.dir / "rounding"
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    result: dict[str, Any] = {
        "model": "all-MiniLM-L6-v2",
        "metric": "1-cos of the sentence embedding vs fp32, 400 held-out Lee sentences",
        "calibration": "128 Lee background sentences",
        "hessian_s": hess_s,
        "rows": rows,
    }

    def record(row: dict[str, Any]) -> None:
        rows.append(row)
        logger.info("%s", {k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()})
        args.out.write_text(json.dumps(result, indent=1))

    if not args.skip_uniform:
        for fmt in args.formats.split(","):
            full = uniform_plan(model, fmt)
            plan = full.with_nodes(a for a in full.nodes if a.op_type in WEIGHT_OPS)
            for method in args.methods.split(","):
                t1 = time.perf_counter()
                weights = rounder.for_plan(plan, method)
                round_s = time.perf_counter() - t1
                path = work / f"uniform_{fmt}_{method}.onnx"
                apply(ctx, plan, weights, path)
                record(
                    {
                        "kind": "uniform",
                        "format": fmt,
                        "rounding": method,
                        "round_s": round_s,
                        **evaluate(ctx, path, ref),
                    }
                )
                path.unlink(missing_ok=True)

    if not args.skip_mixed:
        table, captured, analysis_s = analyze_capturing(ctx)
        result["analysis_s"] = analysis_s
        # "nearest" is today's analyzer (½·ΣD·δ², RTN weights); the others score their own weights with
        # the Kronecker prediction; a "+diag" suffix keeps the diagonal prediction (to isolate its effect)
        extras = tuple(get_format(f).name for f in args.extra_candidates.split(",") if f)
        result["extra_candidates"] = list(extras)
        variants = []
        for m in args.mixed_methods.split(","):
            method, _, pred = m.partition("+")
            variants.append((method, method != "nearest" and pred != "diag"))
        for method, kron in variants:
            t1 = time.perf_counter()
            predicted, rounded = predict_rounded_losses(
                model,
                nodes,
                (*captured["fmts"], *extras),
                captured["diag"],
                captured["act_term"],
                captured["act_elements"],
                {},
                hessians=hessians,
                default_rounding=method,
                kron=kron,
            )
            predict_s = time.perf_counter() - t1
            by_name = {n.name: n for n in table.nodes}
            tab = replace(table, nodes=tuple(replace(n, group=by_name[n.name].group) for n in predicted))
            for b in (float(x) for x in args.budgets.split(",")):
                decision = decide(tab, f"{b}bits", DecideConfig(formats=(*ANALYSIS_FORMATS, *extras), target="qdq"))
                plan = decision.plan
                path = work / f"mixed_{b}_{method}.onnx"
                apply(ctx, plan, weights_for_plan(plan, rounded), path)
                mix: dict[str, int] = {}
                for a in plan.nodes:
                    mix[a.format] = mix.get(a.format, 0) + a.params
                total = sum(mix.values())
                record(
                    {
                        "kind": "mixed",
                        "budget": b,
                        "rounding": method,
                        "prediction": "kron" if kron else "diag",
                        "predict_s": predict_s,
                        "plan_bits": plan.achieved_bits,
                        "predicted_loss": decision.solution.predicted_loss,
                        "mix": {f: round(v / total, 4) for f, v in sorted(mix.items())},
                        **evaluate(ctx, path, ref),
                    }
                )
                path.unlink(missing_ok=True)
    for name in [x for x in args.peers.split(",") if x]:
        path = work / f"peer_{name}.onnx"
        t1 = time.perf_counter()
        try:
            info = PEERS[name](ctx, path)
        except Exception as exc:  # a peer that cannot handle the model is recorded, not fatal
            record({"kind": "peer", "method": name, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            continue
        build_s = time.perf_counter() - t1
        try:
            row = evaluate(ctx, path, ref)
        except Exception as exc:
            row = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        record({"kind": "peer", "method": name, "build_s": build_s, **info, **row})
        path.unlink(missing_ok=True)
    result["round_s_by_method"] = rounder.seconds
    args.out.write_text(json.dumps(result, indent=1))
    print(format_table(rows))


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    head = "| weights | rounding | bits | 1−cos | SimLex ρ | probe acc |"
    lines = [head, "|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "uniform":
            what, how = f"uniform {r['format']}", r["rounding"]
        elif r["kind"] == "mixed":
            what, how = f"lpcompile mixed plan, budget {r['budget']}", f"{r['rounding']} ({r['prediction']})"
        else:
            what, how = r["method"], "peer"
        if "error" in r:
            lines.append(f"| {what} | {how} | – | {r['error'][:60]} | | |")
            continue
        cells = [what, how, f"{r['bits']:.3f}", f"{r['dcos']:.2e}", f"{r['simlex']:.4f}", f"{r['sentiment']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
