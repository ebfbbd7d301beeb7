"""Benchmark harness: lpcompile versus peer quantizers on one model, side by side.

A :class:`Task` says how to run a model on its evaluation data (``collect``) and how to score a
variant's outputs against the fp32 outputs (``score``). :func:`run_task` then

1. normalises the model once (Gemm → MatMul + Add, Constant weights → initializers) and saves a
   copy every peer reads (IR version lowered to what ONNX Runtime loads), so every method starts
   from the same graph;
2. runs the lpcompile analysis once (cached ``sens.json``) and solves every budget from that table;
3. builds each method's model at each budget (lpcompile plans, lpcompile ``--uniform`` baselines,
   ONNX Runtime ``MatMulNBitsQuantizer`` RTN and ``quantize_static`` QDQ int8, NNCF
   ``compress_weights`` INT4_SYM/INT8 mixes with the Hessian sensitivity metric);
4. measures for each: the quality metrics, the achieved average weight bits (computed the same way
   for every method from the file: see :func:`weight_bits`), the file size, and the ONNX Runtime
   CPU latency at batch 1 (median, interleaved with the fp32 model in the same run).

Results are cached per variant under ``artifacts/bench/<task>/`` (git-ignored) so an interrupted
run resumes; the JSON summary goes to ``benchmarks/results_<task>.json``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts" / "bench"
BENCH_DIR = ROOT / "benchmarks"
BUDGETS: tuple[float, ...] = (4.25, 4.5, 5.0, 6.0, 8.0)
LPC_FORMATS = ("fp8_e4m3", "int8", "int4_b128", "int4_b32", "bf16", "bf16w")
"""The formats lpcompile chooses from in the main comparison."""
ANALYSIS_FORMATS = ("fp8_e4m3", "int8", "int4_b128", "int4_b64", "int4_b32", "bf16", "bf16w")
"""The formats analysed (one table); subsets are solved from it."""
LPC_VARIANTS: dict[str, tuple[str, ...]] = {
    "lpcompile": LPC_FORMATS,
    "lpcompile-b128only": ("fp8_e4m3", "int8", "int4_b128", "bf16"),
    "lpcompile+b64": ANALYSIS_FORMATS,
}
VALIDATE_FORMATS = ("fp8_e4m3", "int8", "int4_b128", "int4_b32")
UNIFORM = ("int4_b128", "int4_b32", "int8", "fp8_e4m3")
ALL_METHODS = (
    *LPC_VARIANTS,
    *(f"uniform-{f}" for f in UNIFORM),
    "ort-rtn-b128",
    "ort-rtn-b32",
    "ort-qdq-int8",
    "nncf",
    "nncf-int8",
)
ONNX_BITS = {
    onnx.TensorProto.FLOAT: 32,
    onnx.TensorProto.DOUBLE: 64,
    onnx.TensorProto.FLOAT16: 16,
    onnx.TensorProto.BFLOAT16: 16,
    onnx.TensorProto.INT8: 8,
    onnx.TensorProto.UINT8: 8,
    onnx.TensorProto.INT16: 16,
    onnx.TensorProto.UINT16: 16,
    onnx.TensorProto.INT32: 32,
    onnx.TensorProto.UINT32: 32,
    onnx.TensorProto.INT64: 64,
    onnx.TensorProto.UINT64: 64,
    onnx.TensorProto.BOOL: 8,
    onnx.TensorProto.INT4: 4,
    onnx.TensorProto.UINT4: 4,
    onnx.TensorProto.FLOAT8E4M3FN: 8,
    onnx.TensorProto.FLOAT8E4M3FNUZ: 8,
    onnx.TensorProto.FLOAT8E5M2: 8,
    onnx.TensorProto.FLOAT8E5M2FNUZ: 8,
}
ORT_MAX_IR = 10
TARGET = "qdq"
"""lpcompile's rewrite target for quality and bits: standard QDQ with fp16 int4 scales (the plan's
accounting). Latency is measured on the same plan applied with ``--target ort`` (int4 MatMul weights
as com.microsoft MatMulNBits, fp32 scales, what ORT runs fast), whose bits are reported as ``bits_ort``."""

Outputs = dict[str, np.ndarray]


@dataclass(frozen=True)
class Metric:
    """One quality metric: its key in ``score``'s dict, a label, and which direction is better."""

    key: str
    label: str
    higher_is_better: bool
    fmt: str = "{:.4f}"


@dataclass(frozen=True)
class Task:
    """A model with its data.

    Attributes:
        name: short name (folder and JSON names).
        model: the fp32 ONNX file.
        calib: calibration ``.npz`` (arrays keyed by input name), disjoint from the evaluation data.
        collect: runs a session over all evaluation inputs and returns the raw outputs it needs.
        score: ``(variant outputs, fp32 outputs) -> {metric key: value}``.
        metrics: the metrics ``score`` returns, the first one is the primary (plots, wins).
        latency_feed: one batch-1 input for the latency measurement.
        analysis: keyword arguments of :class:`lpcompile.analysis.config.AnalysisConfig`.
        nncf_batch: samples per NNCF / quantize_static calibration batch.
        notes: free text carried into the JSON.
    """

    name: str
    model: Path
    calib: Path
    collect: Callable[[Any], Outputs]
    score: Callable[[Outputs, Outputs], dict[str, float]]
    metrics: tuple[Metric, ...]
    latency_feed: Mapping[str, np.ndarray]
    analysis: Mapping[str, Any] = field(default_factory=dict)
    nncf_batch: int = 8
    notes: str = ""


@dataclass
class Context:
    task: Task
    dir: Path
    norm: Path
    peer_model: Path
    weight_params: int
    weight_k: dict[str, int]
    weight_ops: dict[str, str]
    nonweight: frozenset[tuple[str, int, tuple[int, ...]]]
    model_params: int = 0
    tables: frozenset[str] = frozenset()
    fp32_bytes: int = 0
    table: Any = None
    analysis_s: float = 0.0


# ------------------------------------------------------------------------------------------
# bits and sizes


def _tensor_entries(proto: onnx.ModelProto) -> list[tuple[str, int, tuple[int, ...]]]:
    out = [(t.name, t.data_type, tuple(t.dims)) for t in proto.graph.initializer]
    for node in proto.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    out.append((node.output[0], a.t.data_type, tuple(a.t.dims)))
    return out


def remove_model_files(path: Path) -> None:
    """Delete a written model, its external ``.data`` and its ``.plan.json`` (those that exist)."""
    for p in (path, path.with_name(path.name + ".data"), path.with_name(path.stem + ".plan.json")):
        p.unlink(missing_ok=True)


def file_bytes(path: Path) -> int:
    """The model file plus its external data files (if any)."""
    total = path.stat().st_size
    proto = onnx.load(str(path), load_external_data=False)
    seen: set[str] = set()
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location" and e.value not in seen:
                seen.add(e.value)
                p = path.parent / e.value
                if p.exists():
                    total += p.stat().st_size
    return total


def _stored_bits(path: Path, ctx: Context) -> tuple[float, float]:
    """Stored bits of the file's weight-derived tensors: (linear/conv weights, embedding tables).

    A tensor belongs to a table when it is named after it (the table itself, or ``<table>_…``: the
    codes and scales lpcompile writes for it); every other counted tensor to the linear/conv weights.
    """
    proto = onnx.load(str(path), load_external_data=False)
    linear = table = 0.0
    for name, dtype, dims in _tensor_entries(proto):
        if (name, dtype, dims) in ctx.nonweight:
            continue
        bits = ONNX_BITS.get(dtype, 32) * math.prod(dims)
        if any(name == t or name.startswith(t + "_") for t in ctx.tables):
            table += bits
        else:
            linear += bits
    return linear, table


def weight_bits(path: Path, ctx: Context) -> float:
    """Average bits per weight of the linear/conv weights of a (quantized) model file, one rule for every method.

    Every tensor stored in the file (initializers and Constant nodes) counts, at its element
    width times its element count, except the tensors the fp32 model already had unchanged
    (same name, type and shape) that are not weights of weighted nodes (biases, norms, shapes)
    and the tensors of embedding tables (see :func:`model_bits`). The sum is divided by the
    number of weights of the MatMul/Gemm/Conv/ConvTranspose nodes (after normalisation). So
    quantized weights, their scales, zero points, packed nibbles, and any new constants a method
    adds (activation scales) are all counted.
    """
    return _stored_bits(path, ctx)[0] / ctx.weight_params


def model_bits(path: Path, ctx: Context) -> float:
    """Average bits over every weight of the model: the linear/conv weights of :func:`weight_bits`
    plus the Gather embedding tables (tied heads once), whatever each method did with them (a table
    left in fp32 counts 32 bits per entry)."""
    linear, table = _stored_bits(path, ctx)
    return (linear + table) / ctx.model_params


# ------------------------------------------------------------------------------------------
# preparation


def _lower_ir(proto: onnx.ModelProto) -> onnx.ModelProto:
    proto.ir_version = min(proto.ir_version, ORT_MAX_IR)
    return proto


def save_proto(proto: onnx.ModelProto, path: Path) -> Path:
    """Save a model (external data beside it when over 1 GB), replacing old files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(path.name + ".data")
    for p in (path, data):
        if p.exists():
            p.unlink()
    if proto.ByteSize() > 1_000_000_000 or any(t.data_location == 1 for t in proto.graph.initializer):
        onnx.save_model(
            proto,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data.name,
            size_threshold=1024,
        )
    else:
        onnx.save_model(proto, str(path))
    return path


def _load_full(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=True)


def prepare(task: Task, workdir: Path = ARTIFACTS) -> Context:
    """Normalised copy of the model (what every peer quantizes) and the weight inventory."""
    import onnx_ir as ir

    from lpcompile.files import load_normalized
    from lpcompile.graph import find_weight_nodes

    d = Path(workdir) / task.name
    d.mkdir(parents=True, exist_ok=True)
    norm = d / "normalized.onnx"
    model = load_normalized(task.model)
    nodes = find_weight_nodes(model)
    if not norm.exists() or norm.stat().st_mtime < Path(task.model).stat().st_mtime:
        proto = _lower_ir(ir.to_proto(model))
        save_proto(proto, norm)
    every = {n.weight: n for n in nodes}
    tables = frozenset(n.weight for n in nodes if n.op_type == "Gather")
    weights = {w: n for w, n in every.items() if w not in tables}
    weight_params = sum(n.params for n in weights.values())
    weight_k = {w: n.params // n.shape[n.layout.channel_axis] for w, n in weights.items()}
    proto = onnx.load(str(norm), load_external_data=False)
    nonweight = frozenset(e for e in _tensor_entries(proto) if e[0] not in every)
    return Context(
        task=task,
        dir=d,
        norm=norm,
        peer_model=norm,
        weight_params=weight_params,
        weight_k=weight_k,
        weight_ops={w: n.op_type for w, n in weights.items()},
        nonweight=nonweight,
        model_params=sum(n.params for n in every.values()),
        tables=tables,
        fp32_bytes=file_bytes(Path(task.model)),
    )


def calib_batches(task: Task, batch: int, limit: int | None = None) -> list[dict[str, np.ndarray]]:
    with np.load(task.calib) as data:
        arrays = {k: np.asarray(data[k]) for k in data.files}
    n = next(iter(arrays.values())).shape[0]
    if limit is not None:
        n = min(n, limit)
    return [{k: v[i : i + batch] for k, v in arrays.items()} for i in range(0, n, batch)]


# ------------------------------------------------------------------------------------------
# lpcompile


def validate_subset(ctx: Context, samples: int, formats: Sequence[str] = VALIDATE_FORMATS) -> dict[str, Any]:
    """``lpcompile analyze --validate`` on the first ``samples`` calibration samples (cached).

    Validation quantizes one node to one format at a time and runs the whole model in ONNX Runtime, so
    its cost is nodes × formats × calibration set: on 2 shared cores it runs on a subset, with its own
    (smaller) analysis, and reports Spearman ρ(predicted, measured) over every (node, format) pair.
    """
    from lpcompile.analysis.config import AnalysisConfig
    from lpcompile.files import analyze_file

    out = ctx.dir / f"validation_{samples}.json"
    if out.exists():
        return json.loads(out.read_text())
    sub = ctx.dir / f"calib_validate_{samples}.npz"
    with np.load(ctx.task.calib) as data:
        np.savez(sub, **{k: data[k][:samples] for k in data.files})
    kw = {**dict(ctx.task.analysis), "batch_size": min(samples, int(ctx.task.analysis.get("batch_size", 8)))}
    t0 = time.perf_counter()
    table = analyze_file(ctx.task.model, sub, AnalysisConfig(formats=tuple(formats), **kw), validate=True)
    res = {
        "samples": samples,
        "formats": list(formats),
        "validation": table.validation,
        "wall_s": time.perf_counter() - t0,
        "validate_s": table.timings.get("validate_s"),
    }
    _write_json(out, res)
    return res


def analyze(ctx: Context, *, validate: bool = False, force: bool = False) -> Any:
    """The sensitivity table (cached in ``sens.json``), and the wall time of the analysis."""
    from lpcompile.analysis.config import AnalysisConfig
    from lpcompile.analysis.table import SensitivityTable
    from lpcompile.files import analyze_file

    path = ctx.dir / "sens.json"
    meta = ctx.dir / "sens.meta.json"
    cfg = AnalysisConfig(formats=ANALYSIS_FORMATS, **dict(ctx.task.analysis))
    key = repr(cfg) + f" validate={validate}"
    if path.exists() and meta.exists() and not force:
        m = json.loads(meta.read_text())
        if m.get("config") == key:
            ctx.table = SensitivityTable.load(path)
            ctx.analysis_s = float(m["wall_s"])
            return ctx.table
    t0 = time.perf_counter()
    table = analyze_file(ctx.task.model, ctx.task.calib, cfg, validate=validate)
    wall = time.perf_counter() - t0
    table.save(path)
    meta.write_text(json.dumps({"config": key, "wall_s": wall, "validate": validate}))
    ctx.table, ctx.analysis_s = table, wall
    return table


def _ort_twin(out: Path) -> Path:
    return out.with_name(out.stem + ".ort.onnx")


def lpcompile_plan(ctx: Context, formats: Sequence[str], budget: float, out: Path) -> tuple[Path, dict[str, Any]]:
    from lpcompile.api import decide
    from lpcompile.config import ApplyConfig, DecideConfig
    from lpcompile.files import apply_file

    keep, bits = peer_scope(ctx, budget)
    plan = decide(ctx.table, f"{bits:.6f}bits", DecideConfig(formats=tuple(formats), keep=keep, target=TARGET)).plan
    res = apply_file(ctx.task.model, out, plan=plan, calib_path=ctx.task.calib, config=ApplyConfig(target=TARGET),
                     force=True)
    twin = _ort_twin(out)
    apply_file(ctx.task.model, twin, plan=plan, calib_path=ctx.task.calib, config=ApplyConfig(target="ort"),
               force=True)
    mix: dict[str, float] = {}
    lin = list({n.weight: n for n in res.plan.nodes if n.weight not in ctx.tables}.values())  # tied weights once
    for n in lin:
        mix[n.format] = mix.get(n.format, 0.0) + n.params
    total = sum(mix.values())
    return out, {
        "latency_model": twin,
        "plan_bits": sum(n.bits * n.params for n in lin) / total,  # over the linear weights, like ``bits``
        "plan_model_bits": res.plan.achieved_bits,
        "mix": {f: round(v / total, 4) for f, v in sorted(mix.items())},
    }


def peer_scope(ctx: Context, budget: float) -> tuple[tuple[Any, ...], float]:
    """Keep rules and solver budget for a plan over the weights the peers quantize.

    The peers leave embedding tables in fp32, so the main comparison does too: the tables (and the
    heads tied to them) are pinned to fp32 and ``budget`` covers the other weights, i.e. the solver's
    budget over every weight is ``(budget·P_linear + 32·P_tables) / P_all``. Whole-model plans (the
    tables quantized too) are benchmarked by ``bench_coverage.py``.
    """
    import re

    from lpcompile.solver.problem import KeepRule

    names = [n.name for n in ctx.table.nodes if n.weight in ctx.tables]
    if not names:
        return (), budget
    p_tab = ctx.model_params - ctx.weight_params
    rule = KeepRule("^(?:" + "|".join(re.escape(x) for x in names) + ")$", ("fp32",), spec="embedding tables=fp32")
    return (rule,), (budget * ctx.weight_params + 32.0 * p_tab) / ctx.model_params


def lpcompile_uniform(ctx: Context, fmt: str, out: Path) -> tuple[Path, dict[str, Any]]:
    from lpcompile.config import ApplyConfig
    from lpcompile.files import apply_file

    apply_file(ctx.task.model, out, uniform=fmt, calib_path=ctx.task.calib, config=ApplyConfig(target=TARGET),
               force=True)
    twin = _ort_twin(out)
    apply_file(ctx.task.model, twin, uniform=fmt, calib_path=ctx.task.calib, config=ApplyConfig(target="ort"),
               force=True)
    return out, {"latency_model": twin}


# ------------------------------------------------------------------------------------------
# peers


def ort_rtn(ctx: Context, block: int, out: Path) -> Path:
    """ONNX Runtime ``MatMulNBitsQuantizer``: symmetric int4 RTN, fp32 scale per block (MatMul only)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(_load_full(ctx.peer_model), block_size=block, is_symmetric=True)
    q.process()
    return save_proto(q.model.model, out)


class _Reader:
    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._it = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def _float_feeds(feeds: list[dict[str, np.ndarray]], proto: onnx.ModelProto) -> list[dict[str, np.ndarray]]:
    types = {i.name: i.type.tensor_type.elem_type for i in proto.graph.input}
    conv = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.INT64: np.int64}
    return [{k: v.astype(conv.get(types.get(k), v.dtype)) for k, v in f.items()} for f in feeds]


def ort_qdq_int8(ctx: Context, out: Path) -> Path:
    """ONNX Runtime ``quantize_static``: QDQ W8A8 (per-channel int8 weights, uint8 activations, MinMax)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    proto = onnx.load(str(ctx.peer_model), load_external_data=False)
    feeds = _float_feeds(calib_batches(ctx.task, 1, limit=64), proto)
    tmp = out.with_name(out.stem + ".tmp.onnx")
    quantize_static(
        str(ctx.peer_model),
        str(tmp),
        _Reader(feeds),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        weight_type=QuantType.QInt8,
        activation_type=QuantType.QUInt8,
        op_types_to_quantize=["MatMul", "Conv", "Gemm"],
        calibrate_method=CalibrationMethod.MinMax,
        use_external_data_format=ctx.peer_model.with_name(ctx.peer_model.name + ".data").exists(),
    )
    proto = _lower_ir(_load_full(tmp))
    for p in (tmp, tmp.with_name(tmp.name + ".data")):
        if p.exists():
            p.unlink()
    return save_proto(proto, out)


def nncf_mix(ctx: Context, budget: float, out: Path) -> tuple[Path, dict[str, Any]]:
    """NNCF ``compress_weights``: INT4_SYM (group 128, or the largest group dividing every K) with an
    INT8_ASYM backup, ratio chosen so the average bits (counted like everyone's) meet ``budget``."""
    import nncf
    from nncf import CompressWeightsMode, SensitivityMetric

    ks = [k for w, k in ctx.weight_k.items() if ctx.weight_ops.get(w) != "Conv"]
    group = next((g for g in (128, 64, 32) if all(k % g == 0 for k in ks)), 32)
    b4 = 4 + 32 / group
    kbar = sum(ks) / len(ks)
    b8 = 8 + 40 / kbar
    ratio = float(np.clip((b8 - budget) / (b8 - b4), 0.0, 1.0))
    proto = _load_full(ctx.peer_model)
    feeds = _float_feeds(calib_batches(ctx.task, ctx.task.nncf_batch, limit=64), proto)
    info: dict[str, Any] = {"group_size": group}
    for attempt in range(2):
        q = nncf.compress_weights(
            proto,
            mode=CompressWeightsMode.INT4_SYM,
            ratio=ratio,
            group_size=group,
            all_layers=True,
            sensitivity_metric=SensitivityMetric.HESSIAN_INPUT_ACTIVATION,
            dataset=nncf.Dataset(feeds),
            # Gather: embeddings stay fp32 for every method. Conv: NNCF's ONNX backend emits a blocked
            # DequantizeLinear for Conv weights that ONNX Runtime rejects, so NNCF compresses MatMul/Gemm.
            ignored_scope=nncf.IgnoredScope(types=["Gather", "Conv"], validate=False),
        )
        save_proto(_lower_ir(q), out)
        bits = weight_bits(out, ctx)
        info.update(ratio=ratio, attempts=attempt + 1)
        if bits <= budget + 0.02 or ratio >= 1.0 or attempt == 1:
            break
        ratio = float(np.clip(ratio + (bits - budget) / (b8 - b4), 0.0, 1.0))
        proto = _load_full(ctx.peer_model)
    return out, info


def nncf_int8(ctx: Context, out: Path) -> Path:
    """NNCF ``compress_weights(mode=INT8_ASYM)``: every MatMul/Gemm weight int8 asymmetric per channel."""
    import nncf
    from nncf import CompressWeightsMode

    q = nncf.compress_weights(
        _load_full(ctx.peer_model),
        mode=CompressWeightsMode.INT8_ASYM,
        ignored_scope=nncf.IgnoredScope(types=["Gather", "Conv"], validate=False),
    )
    return save_proto(_lower_ir(q), out)


# ------------------------------------------------------------------------------------------
# measuring


def session(path: Path, numerics: str = "exact") -> Any:
    from lpcompile.runtime.ort import make_session

    return make_session(path, numerics=numerics, threads=2)  # type: ignore[arg-type]


def latency_pair(
    ref: Path, test: Path, feed: Mapping[str, np.ndarray], rounds: int = 5, per: int = 4, numerics: str = "fast"
) -> dict[str, float]:
    """Batch-1 medians of the fp32 and the test model, interleaved round by round (``fast`` numerics)."""
    from lpcompile.runtime.ort import latency_ms

    s_test = session(test, numerics)
    s_ref = session(ref, numerics)
    a: list[float] = []
    b: list[float] = []
    for r in range(rounds):
        a += latency_ms(s_ref, feed, warmup=2 if r == 0 else 0, repeat=per)
        b += latency_ms(s_test, feed, warmup=2 if r == 0 else 0, repeat=per)
    ma, mb = statistics.median(a), statistics.median(b)
    return {"fp32_ms": ma, "latency_ms": mb, "latency_ratio": mb / ma}


@dataclass(frozen=True)
class Variant:
    method: str
    budget: float | None
    build: Callable[[Path], Any]

    @property
    def key(self) -> str:
        return self.method + ("" if self.budget is None else f"@{self.budget:g}")


def variants(ctx: Context, methods: Sequence[str], budgets: Sequence[float]) -> list[Variant]:
    out: list[Variant] = []
    for m in methods:
        if m in LPC_VARIANTS:
            fm = LPC_VARIANTS[m]
            out += [Variant(m, b, lambda p, b=b, fm=fm: lpcompile_plan(ctx, fm, b, p)) for b in budgets]
        elif m.startswith("uniform-"):
            f = m.removeprefix("uniform-")
            out.append(Variant(m, None, lambda p, f=f: lpcompile_uniform(ctx, f, p)))
        elif m == "ort-rtn-b128":
            out.append(Variant(m, None, lambda p: ort_rtn(ctx, 128, p)))
        elif m == "ort-rtn-b32":
            out.append(Variant(m, None, lambda p: ort_rtn(ctx, 32, p)))
        elif m == "ort-qdq-int8":
            out.append(Variant(m, None, lambda p: ort_qdq_int8(ctx, p)))
        elif m == "nncf-int8":
            out.append(Variant(m, None, lambda p: nncf_int8(ctx, p)))
        elif m == "nncf":
            out += [Variant(m, b, lambda p, b=b: nncf_mix(ctx, b, p)) for b in budgets]
        else:
            raise ValueError(f"unknown method {m!r}; known: {', '.join(ALL_METHODS)}")
    return out


def evaluate_variant(
    ctx: Context, v: Variant, ref_out: Outputs, *, latency: bool = True, keep_model: bool = False, fresh: bool = False
) -> dict[str, Any]:
    """Build, measure and score one variant (cached as JSON)."""
    cache = ctx.dir / "results" / f"{v.key}.json"
    if cache.exists() and not fresh:
        return json.loads(cache.read_text())
    path = ctx.dir / "variants" / f"{v.key}.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    row: dict[str, Any] = {"method": v.method, "budget": v.budget}
    t0 = time.perf_counter()
    try:
        extra = v.build(path)
    except Exception as exc:  # a peer that cannot handle the model: recorded, not fatal
        logger.warning("%s failed: %s", v.key, exc)
        row.update(error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}")
        _write_json(cache, row)
        return row
    row["build_s"] = time.perf_counter() - t0
    lat_model = path
    if isinstance(extra, tuple):
        info = dict(extra[1])
        lat_model = Path(info.pop("latency_model", path))
        row.update(info)
    row.update(size_columns(path, ctx))
    if lat_model != path:
        row.update({f"{k}_ort": v for k, v in size_columns(lat_model, ctx).items()})
    try:
        t1 = time.perf_counter()
        outs = ctx.task.collect(session(path))
        row["eval_s"] = time.perf_counter() - t1
        row.update(ctx.task.score(outs, ref_out))
    except Exception as exc:
        logger.warning("%s does not run: %s", v.key, exc)
        row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:600]}"
    if latency and "error" not in row:
        try:
            row.update(latency_pair(ctx.norm, lat_model, ctx.task.latency_feed))
        except Exception as exc:  # e.g. ORT's QDQ fusions at ORT_ENABLE_ALL reject the graph
            row["latency_note"] = f"fast session failed ({str(exc).strip().splitlines()[0][:300]}); exact numerics"
            row.update(latency_pair(ctx.norm, lat_model, ctx.task.latency_feed, numerics="exact"))
    if not keep_model:
        for m in {path, lat_model}:
            remove_model_files(m)
    _write_json(cache, row)
    return row


def size_columns(path: Path, ctx: Context) -> dict[str, float]:
    """``bits`` (linear/conv weights), ``model_bits`` (every weight) and the file size, also vs fp32."""
    size = file_bytes(path)
    return {
        "bits": weight_bits(path, ctx),
        "model_bits": model_bits(path, ctx),
        "file_bytes": size,
        "size_ratio": size / ctx.fp32_bytes,
    }


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=_json_default))
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o))


def run_task(
    task: Task,
    *,
    methods: Sequence[str] = ALL_METHODS,
    budgets: Sequence[float] = BUDGETS,
    validate: bool = False,
    latency: bool = True,
    fresh: bool = False,
    match_peers: bool = True,
    out_json: Path | None = None,
    workdir: Path = ARTIFACTS,
    quiet: bool = False,
    validate_samples: int | None = None,
) -> dict[str, Any]:
    """Run every method × budget on ``task``; print a table; write the JSON summary."""
    t_start = time.perf_counter()
    if fresh and (Path(workdir) / task.name / "results").exists():
        shutil.rmtree(Path(workdir) / task.name / "results")
    ctx = prepare(task, workdir)
    table = analyze(ctx, validate=validate and not validate_samples)
    validation = validate_subset(ctx, validate_samples) if validate and validate_samples else None
    logger.info(
        "%s: analysis %.1fs, %d weighted nodes, %d weights",
        task.name,
        ctx.analysis_s,
        len(table.nodes),
        ctx.weight_params,
    )
    t0 = time.perf_counter()
    ref_out = task.collect(session(ctx.norm))
    fp32_eval_s = time.perf_counter() - t0
    fp32_row: dict[str, Any] = {
        "method": "fp32",
        "budget": None,
        **size_columns(ctx.norm, ctx),
        "eval_s": fp32_eval_s,
        **task.score(ref_out, ref_out),
    }
    rows = [fp32_row]
    for v in variants(ctx, methods, budgets):
        row = evaluate_variant(ctx, v, ref_out, latency=latency, fresh=False)
        rows.append(row)
        logger.info("%s: %s", v.key, _brief(row, task))
    if match_peers and "lpcompile" in methods:
        # lpcompile at exactly the bits each fixed-bit peer reached (fairest point-to-point comparison)
        done = {round(b, 2) for b in budgets}
        # (fixed-bit peers, and budgeted peers that overshot their budget)
        for row in list(rows):
            if row["method"] in ("fp32", *LPC_VARIANTS) or "bits" not in row:
                continue
            if row.get("budget") is not None and row["bits"] <= row["budget"] + 0.02:
                continue
            b = float(row["bits"])
            if b > 16 or round(b, 2) in done:
                continue
            done.add(round(b, 2))
            v = Variant("lpcompile", round(b, 4), lambda p, b=b: lpcompile_plan(ctx, LPC_FORMATS, b, p))
            r = evaluate_variant(ctx, v, ref_out, latency=latency)
            r["matched"] = peer_key(row)
            rows.append(r)
            logger.info("%s: %s", v.key, _brief(r, task))
    summary = {
        "task": task.name,
        "model": str(Path(task.model).name),
        "notes": task.notes,
        "weight_params": ctx.weight_params,
        "model_params": ctx.model_params,
        "fp32_bytes": ctx.fp32_bytes,
        "weighted_nodes": len(table.nodes),
        "analysis": {
            "wall_s": ctx.analysis_s,
            "timings": dict(table.timings),
            "method": table.method,
            "loss": table.loss,
            "probes": table.probes,
            "num_samples": table.num_samples,
            "formats": list(table.formats),
            "validation": table.validation,
            "validation_subset": validation,
        },
        "metrics": [m.__dict__ for m in task.metrics],
        "rows": rows,
        "total_s": time.perf_counter() - t_start,
        "date": time.strftime("%Y-%m-%d"),
    }
    out_json = out_json or BENCH_DIR / f"results_{task.name}.json"
    _write_json(out_json, summary)
    if not quiet:
        print(format_table(summary))
    return summary


def peer_key(row: Mapping[str, Any]) -> str:
    """``method`` or ``method@budget``: how matched lpcompile rows name the peer row they match."""
    return row["method"] + ("" if row.get("budget") is None else f"@{row['budget']:g}")


def _brief(row: Mapping[str, Any], task: Task) -> str:
    if "error" in row:
        return "ERROR " + row["error"]
    m = task.metrics[0]
    return f"bits {row.get('bits', float('nan')):.3f} {m.key} {row.get(m.key)}"


def slot(row: Mapping[str, Any], budgets: Sequence[float] = BUDGETS) -> float | None:
    """The budget a row is compared at: its own, or for fixed-bit methods the smallest budget ≥ its
    bits (2% slack, so uniform int8 at 8.06 bits sits at 8)."""
    if row.get("budget") is not None and not row.get("matched"):
        return float(row["budget"])
    bits = row.get("bits")
    if bits is None:
        return None
    for b in budgets:
        if bits <= b * 1.02:
            return b
    return None


def format_table(summary: Mapping[str, Any]) -> str:
    """A plain-text table of one task's rows."""
    metrics = [Metric(**m) for m in summary["metrics"]]
    head = ["method", "budget", "bits", "model bits", "MB", "size×fp32", *[m.label for m in metrics], "ms", "×fp32"]
    lines = [" | ".join(head)]
    for r in summary["rows"]:
        b = r.get("budget")
        cells = [r["method"] + (f" (={r['matched']})" if r.get("matched") else ""), "-" if b is None else f"{b:g}"]
        if "error" in r:
            lines.append(" | ".join([*cells, "error: " + r["error"][:80]]))
            continue
        cells += [
            f"{r.get('bits', float('nan')):.3f}",
            f"{r['model_bits']:.3f}" if "model_bits" in r else "-",
            f"{r.get('file_bytes', 0) / 1e6:.2f}",
            f"{r['size_ratio']:.3f}" if "size_ratio" in r else "-",
        ]
        cells += [m.fmt.format(r[m.key]) if r.get(m.key) is not None else "-" for m in metrics]
        cells += [
            f"{r['latency_ms']:.2f}" if "latency_ms" in r else "-",
            f"{r['latency_ratio']:.2f}" if "latency_ratio" in r else "-",
        ]
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.INFO if not verbose else logging.DEBUG,
        format="%(asctime)s %(name)s %(message)s",
        datefmt="%H:%M:%S",
    )
    # nncf installs its own logger class: import it before touching its logger
    with contextlib.suppress(ImportError):
        import nncf  # noqa: F401
    for noisy in ("nncf", "onnxruntime", "onnxruntime.quantization", "lpcompile", "onnx_ir"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger(__name__).setLevel(logging.INFO)


def common_args(parser: Any) -> None:
    parser.add_argument("--methods", default=",".join(ALL_METHODS), help="comma-separated methods")
    parser.add_argument("--budgets", default=",".join(f"{b:g}" for b in BUDGETS))
    parser.add_argument("--validate", action="store_true", help="also measure the analyzer's Spearman ρ")
    parser.add_argument(
        "--validate-samples",
        type=int,
        default=None,
        help="validate on a separate analysis of the first N calibration samples (cheaper)",
    )
    parser.add_argument("--no-latency", action="store_true")
    parser.add_argument("--fresh", action="store_true", help="ignore cached variant results")


def run_from_args(task: Task, args: Any) -> dict[str, Any]:
    return run_task(
        task,
        methods=[m for m in args.methods.split(",") if m],
        budgets=[float(b) for b in args.budgets.split(",") if b],
        validate=args.validate,
        latency=not args.no_latency,
        fresh=args.fresh,
        validate_samples=args.validate_samples,
    )
