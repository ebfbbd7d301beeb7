"""lpcompile against the peers at their strongest settings on SmolLM2-135M (issue 19).

The task is ``bench_smollm2.smollm2_task`` (perplexity on Lee test windows, KL and top-1 agreement of
the next-token distribution vs fp32; calibration 16×128 tokens of Lee background articles) and the bits
rule is the harness's (``harness.weight_bits``: every stored tensor derived from the linear weights,
scales and zero points included, over the 210 linear weights; the tied embedding/head stays fp32 for
every method, so it is left out of the count for every method alike).

Rows, all built and scored in one run (one fp32 reference):

* peers — NNCF ``compress_weights`` on the model raised to opset 21 (blocked DequantizeLinear):
  INT4_SYM / INT4_ASYM, groups 32/64/128, ratio 1, ``scale_estimation=True`` and ``awq=True`` with the
  calibration windows as dataset; ONNX Runtime ``MatMulNBitsQuantizer``: default (absmax RTN)
  symmetric/asymmetric, HQQ (asymmetric only), k-quant (asymmetric only), blocks 32 and 128. A peer
  that fails is recorded with its error.
* ``lpcompile <rounding>`` at every budget, for the roundings asked (``nearest``: today's default;
  ``gptq``), streamed analysis (``stream="on"``), and ``lpcompile <rounding> @ <peer> bits``: solved at
  the bits each peer reached (duplicates merged), so every cell compares at equal bits.

Why NNCF failed before ("ValidationError: There is no tensor with the name val_3229"): SmolLM2's head is
tied to the embedding table, so its MatMul reads ``val_3229 = Transpose(lm.lm_head.weight)``. NNCF's
graph counts that constant subgraph as the head's weight, but its ONNX backend then looks the weight up
among the initializers and fails. The head (like the table) stays fp32 for every method here
(``harness.peer_scope`` pins it for lpcompile; ORT's quantizer skips a MatMul whose weight is not an
initializer), so NNCF is given it in ``ignored_scope`` by name, which weakens nothing else. K = 576
(the hidden size) is not a multiple of 128, so group 128 runs with ``GroupSizeFallbackMode.ADJUST``
(NNCF picks a smaller group that divides K on those layers; the achieved bits say what it cost).

    python benchmarks/bench_peers_smollm2.py [--eval-windows 6] [--peers all] [--roundings nearest,gptq]

Writes ``benchmarks/results_peers_strong_smollm2.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_peers_strong import format_table, run_peers
from harness import (
    BENCH_DIR,
    BUDGETS,
    LPC_FORMATS,
    Context,
    _float_feeds,
    _lower_ir,
    calib_batches,
    peer_scope,
    prepare,
    remove_model_files,
    save_proto,
    session,
    setup_logging,
    weight_bits,
)

logger = logging.getLogger("bench_peers_smollm2")


# ------------------------------------------------------------------------------------------
# peers


def _loads(ctx: Context, path: Path) -> None:
    """Raise when ONNX Runtime cannot load and run ``path`` on one calibration window."""
    import onnx

    from lpcompile.runtime.ort import run

    proto = onnx.load(str(path), load_external_data=False)
    run(session(path), _float_feeds(calib_batches(ctx.task, 1, limit=1), proto)[0])


def head_nodes(proto: Any) -> list[str]:
    """MatMul nodes whose weight is computed from an initializer (the tied head: ``Transpose(table)``)."""
    inits = {t.name for t in proto.graph.initializer}
    from_init = {o for n in proto.graph.node if n.input and all(i in inits for i in n.input) for o in n.output}
    return [n.name for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in from_init]


def nncf_peer(ctx: Context, out: Path, mode: str, group: int, *, se: bool = True, awq: bool = True) -> dict[str, Any]:
    """NNCF ``compress_weights`` (ratio 1: every linear weight in ``mode``) with data-aware options."""
    import nncf
    import onnx
    from nncf import CompressWeightsMode, SensitivityMetric
    from nncf.quantization.advanced_parameters import AdvancedCompressionParameters, GroupSizeFallbackMode
    from onnx import version_converter

    # opset 21: NNCF writes blocked DequantizeLinear (below 21 it writes MatMulNBits: see FACTS.md)
    proto = version_converter.convert_version(onnx.load(str(ctx.norm)), 21)
    feeds = _float_feeds(calib_batches(ctx.task, 1, limit=64), proto)  # one window per item: 16 items
    q = nncf.compress_weights(
        proto,
        mode=getattr(CompressWeightsMode, mode),
        ratio=1.0,
        group_size=group,
        all_layers=True,
        sensitivity_metric=SensitivityMetric.HESSIAN_INPUT_ACTIVATION,
        dataset=nncf.Dataset(feeds),
        scale_estimation=se,
        awq=awq,
        subset_size=len(feeds),
        ignored_scope=nncf.IgnoredScope(names=head_nodes(proto), types=["Gather"], validate=False),
        advanced_parameters=AdvancedCompressionParameters(group_size_fallback_mode=GroupSizeFallbackMode.ADJUST),
    )
    save_proto(_lower_ir(q), out)
    _loads(ctx, out)
    return {"mode": mode, "group": group, "scale_estimation": se, "awq": awq}


def ort_nbits(ctx: Context, out: Path, block: int, symmetric: bool, algo: str) -> dict[str, Any]:
    """ONNX Runtime ``MatMulNBitsQuantizer`` (MatMul weights that are initializers)."""
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    config: Any = None
    if algo == "k_quant":
        config = mnq.KQuantWeightOnlyQuantConfig()
    elif algo == "hqq":
        config = mnq.HQQWeightOnlyQuantConfig(block_size=block)
    q = mnq.MatMulNBitsQuantizer(onnx.load(str(ctx.norm)), block_size=block, is_symmetric=symmetric, algo_config=config)
    q.process()
    save_proto(_lower_ir(q.model.model), out)
    _loads(ctx, out)
    return {"algo": algo, "block": block, "symmetric": symmetric}


PEERS: dict[str, Callable[[Context, Path], dict[str, Any]]] = {
    **{
        f"nncf-{m.lower().replace('_', '')}-g{g}-se-awq": (lambda c, o, m=m, g=g: nncf_peer(c, o, m, g))
        for m in ("INT4_SYM", "INT4_ASYM")
        for g in (32, 64, 128)
    },
    "ort-nbits-default-sym-b32": lambda c, o: ort_nbits(c, o, 32, True, "default"),
    "ort-nbits-default-asym-b32": lambda c, o: ort_nbits(c, o, 32, False, "default"),
    "ort-nbits-default-sym-b128": lambda c, o: ort_nbits(c, o, 128, True, "default"),
    "ort-nbits-default-asym-b128": lambda c, o: ort_nbits(c, o, 128, False, "default"),
    "ort-nbits-hqq-asym-b32": lambda c, o: ort_nbits(c, o, 32, False, "hqq"),
    "ort-nbits-hqq-asym-b128": lambda c, o: ort_nbits(c, o, 128, False, "hqq"),
    "ort-nbits-kquant-asym-b32": lambda c, o: ort_nbits(c, o, 32, False, "k_quant"),
    "ort-nbits-kquant-asym-b128": lambda c, o: ort_nbits(c, o, 128, False, "k_quant"),
}


# ------------------------------------------------------------------------------------------
# lpcompile


def lpcompile_table(
    ctx: Context, rounding: str, formats: tuple[str, ...], overrides: dict[str, Any], hessians: Any = None
) -> float:
    """Analyse once for ``rounding`` (streamed) into ``ctx.table``; returns the wall time. ``hessians``
    (a ``HessianStore``) receives the layer inputs' XᵀX the analysis gathers, so every apply of this
    rounding reuses them (as ``lpcompile MODEL --budget`` does) instead of another calibration pass."""
    from lpcompile.analysis.config import AnalysisConfig
    from lpcompile.api import analyze
    from lpcompile.files import load_calib_for, load_normalized

    model = load_normalized(ctx.task.model)
    calib = load_calib_for(model, Path(ctx.task.calib))
    cfg = AnalysisConfig(formats=formats, rounding=rounding, **{**dict(ctx.task.analysis), **overrides})
    t0 = time.perf_counter()
    ctx.table = analyze(model, calib, cfg, hessians=hessians)
    return time.perf_counter() - t0


def lpcompile_build(
    ctx: Context, rounding: str, formats: tuple[str, ...], budget: float, out: Path, hessians: Any = None
) -> dict[str, Any]:
    """Solve ``budget`` over the linear weights (tied table and head pinned to fp32, like the peers) and write it
    (``hessians``: the analysis's XᵀX, see :func:`lpcompile_table`)."""
    from lpcompile.api import decide
    from lpcompile.config import ApplyConfig, DecideConfig
    from lpcompile.files import apply_file

    keep, bits = peer_scope(ctx, budget)
    plan = decide(ctx.table, f"{bits:.6f}bits", DecideConfig(formats=formats, keep=keep, target="qdq")).plan
    t0 = time.perf_counter()
    res = apply_file(
        ctx.task.model, out, plan=plan, calib_path=ctx.task.calib,
        config=ApplyConfig(target="qdq", rounding=rounding), force=True, hessians=hessians,
    )
    lin = list({n.weight: n for n in res.plan.nodes if n.weight not in ctx.tables}.values())
    mix: dict[str, float] = {}
    for n in lin:
        mix[n.format] = mix.get(n.format, 0.0) + n.params
    total = sum(mix.values()) or 1.0
    return {
        "plan_bits": sum(n.bits * n.params for n in lin) / total,
        "mix": {f: round(v / total, 4) for f, v in sorted(mix.items())},
        "apply_s": time.perf_counter() - t0,
    }



# ------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", default=",".join(f"{b:g}" for b in BUDGETS))
    p.add_argument("--peers", default="all", help=f"'all' or a comma list of: {', '.join(PEERS)}")
    p.add_argument("--roundings", default="nearest,gptq", help="lpcompile roundings (analysis and apply)")
    p.add_argument("--match-roundings", default="nearest,gptq", help="roundings also solved at each peer's bits")
    p.add_argument("--eval-windows", type=int, default=6, help="256-token Lee test windows scored")
    p.add_argument("--probes", type=int, default=0, help="lpcompile analysis probes (0: the task's 16)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument(
        "--peers-from", type=Path, default=None,
        help="take the peer rows from an earlier result JSON of this script (same --eval-windows) instead of "
        "rebuilding them; their scores do not depend on load, and each copied row says where it came from",
    )
    p.add_argument("--out", type=Path, default=BENCH_DIR / "results_peers_strong_smollm2.json")
    p.add_argument("--report", action="store_true", help="print the markdown tables of --out and exit")
    args = p.parse_args()
    if args.report:
        print(markdown(json.loads(args.out.read_text())))
        return
    setup_logging()
    logger.setLevel(logging.INFO)
    import torch
    from bench_smollm2 import smollm2_task

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    task = smollm2_task(eval_windows=args.eval_windows)
    ctx = prepare(task)
    work = ctx.dir / "peers_strong"
    work.mkdir(parents=True, exist_ok=True)
    ref = task.collect(session(ctx.norm))
    rows: list[dict[str, Any]] = []
    result: dict[str, Any] = {
        "model": task.name, "notes": task.notes, "command": " ".join(sys.argv), "rows": rows,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "loadavg_start": os.getloadavg(),
        "weight_params": ctx.weight_params,
    }

    def record(row: dict[str, Any]) -> None:
        row["loadavg"] = os.getloadavg()
        rows.append(row)
        logger.info("%s", {k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()})
        tmp = args.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=1, default=str))
        tmp.replace(args.out)

    def score(path: Path) -> dict[str, Any]:
        outs = task.collect(session(path))
        return {"bits": weight_bits(path, ctx), **task.score(outs, ref)}

    record({"kind": "fp32", "method": "fp32", "bits": 32.0, **task.score(ref, ref)})
    if args.peers_from is not None:
        earlier = json.loads(args.peers_from.read_text())
        cmd = earlier.get("command", "")
        said = f"--eval-windows {args.eval_windows}" in cmd or ("--eval-windows" not in cmd and args.eval_windows == 6)
        if not said:
            raise SystemExit(f"{args.peers_from} was not scored on --eval-windows {args.eval_windows}")
        result["peers_from"] = {"file": str(args.peers_from), "date": earlier.get("date"), "command": cmd}
        peer_bits = []
        for row in earlier["rows"]:
            if row.get("kind") != "peer":
                continue
            record({**row, "from": earlier.get("date")})
            if "error" not in row:
                peer_bits.append((row["method"], row["bits"]))
    else:
        peer_names = list(PEERS) if args.peers == "all" else [x for x in args.peers.split(",") if x]
        peer_bits = run_peers(ctx, PEERS, peer_names, work, score, record)

    budgets = [float(b) for b in args.budgets.split(",") if b]
    formats = tuple(LPC_FORMATS)
    overrides: dict[str, Any] = {"stream": "on", **({"probes": args.probes} if args.probes else {})}
    result["candidates"] = list(formats)
    result["lpcompile_analysis"] = {**dict(task.analysis), **overrides}
    matched = [r for r in args.match_roundings.split(",") if r]
    roundings = [r for r in args.roundings.split(",") if r]
    from lpcompile.analysis.input_hessians import HessianStore
    from lpcompile.formats import needs_input_hessians

    tables: dict[str, Any] = {}
    stores: dict[str, Any] = {}
    for rounding in roundings:
        stores[rounding] = HessianStore() if needs_input_hessians(rounding, formats) else None
        result[f"analysis_s_{rounding}"] = lpcompile_table(ctx, rounding, formats, overrides, stores[rounding])
        tables[rounding] = ctx.table
        logger.info("analysis %s: %.1f s", rounding, result[f"analysis_s_{rounding}"])
    # every rounding at the budgets first, then at the peers' bits (gptq before nearest)
    jobs: list[tuple[str, str, float]] = [(r, f"budget {b:g}", b) for r in roundings for b in budgets]
    for rounding in sorted((r for r in roundings if r in matched), key=lambda r: r != "gptq"):
        seen: dict[float, str] = {}
        for n, b in peer_bits:
            key = round(b, 3)
            if key in seen:
                result.setdefault("same_bits", {})[n] = seen[key]
                continue
            seen[key] = n
            jobs.append((rounding, f"@ {n} bits", round(b, 4)))
    for rounding, label, b in jobs:
        ctx.table = tables[rounding]
        path = work / f"lpc_{rounding}_{b:g}.onnx"
        t0 = time.perf_counter()
        try:
            info = lpcompile_build(ctx, rounding, formats, b, path, stores[rounding])
            row = {"kind": "lpcompile", "rounding": rounding, "target": label, "budget": b, **info,
                   **score(path), "build_s": time.perf_counter() - t0}
        except Exception as exc:
            row = {"kind": "lpcompile", "rounding": rounding, "target": label, "budget": b,
                   "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        record(row)
        remove_model_files(path)
    for store in stores.values():
        if store is not None:
            store.close()
    result["loadavg_end"] = os.getloadavg()
    args.out.write_text(json.dumps(result, indent=1, default=str))
    print(format_table([r for r in rows if r["kind"] != "fp32"], task.metrics))


def markdown(result: dict[str, Any]) -> str:
    """The RESULTS.md tables: lpcompile at the budgets, then each peer beside lpcompile at its bits."""
    rows = result["rows"]
    fp32 = next(r for r in rows if r["kind"] == "fp32")

    def cells(r: dict[str, Any] | None) -> str:
        if r is None:
            return "– | – | –"
        if "error" in r:
            return "error | | "
        return f"{r['ppl']:.3f} | {r['kl']:.3e} | {r['top1_agree']:.4f}"

    out = [f"fp32: ppl {fp32['ppl']:.3f}.", "", "| lpcompile | budget | bits | ppl | KL | top-1 = fp32 | mix |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "lpcompile" and r["target"].startswith("budget"):
            if "error" in r:
                out.append(f"| {r['rounding']} | {r['budget']:g} | error: {r['error'][:100]} | | | | |")
                continue
            mix = ", ".join(f"{k} {v:.0%}" for k, v in r["mix"].items() if v >= 0.005)
            out.append(f"| {r['rounding']} | {r['budget']:g} | {r['bits']:.3f} | {cells(r)} | {mix} |")
    same = result.get("same_bits", {})
    lpc = {(r["rounding"], r["target"]): r for r in rows if r["kind"] == "lpcompile"}
    out += ["", "| peer | bits | ppl | KL | top-1 | lpcompile gptq at its bits: bits, ppl, KL, top-1 "
            "| lpcompile nearest at its bits: bits, ppl, KL, top-1 |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] != "peer":
            continue
        if "error" in r:
            out.append(f"| {r['method']} | failed: {r['error'][:160]} | | | | | |")
            continue
        name = same.get(r["method"], r["method"])
        twin = [lpc.get((rd, f"@ {name} bits")) for rd in ("gptq", "nearest")]
        tw = [f"{t['bits']:.3f}, {cells(t).replace(' | ', ', ')}" if t and "error" not in t else
              ("error" if t else "–") for t in twin]
        out.append(f"| {r['method']} | {r['bits']:.3f} | {cells(r)} | {tw[0]} | {tw[1]} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
