"""ONNX Runtime sessions with explicit numerics, and running them on numpy inputs.

Two numerics settings:

* ``"exact"`` — what every *measurement* uses: graph optimisation OFF (``ORT_DISABLE_ALL``),
  because ONNX Runtime 1.31's optimisers change low-precision arithmetic as written: measured on
  the digits MLP, FP8 E5M2 Q/DQ logits move by 0.75 at ``ORT_ENABLE_BASIC``, FP8 E4M3 and E5M2
  by 56 at ``ORT_ENABLE_ALL`` (its QDQ transforms drop the FP8 zero points), and MatMul+Add →
  Gemm fusion reorders fp32 sums (0.0046 on bf16 logits) — against 6e-6 for the graph as written;
  plus the session config entry
  ``session.qdq_matmulnbits_accuracy_level = "0"`` (so ORT never silently replaces a weight
  DequantizeLinear→MatMul by a MatMulNBits with int8 activations, see FACTS.md), deterministic
  compute and a fixed thread count.
* ``"fast"`` — ``ORT_ENABLE_ALL`` for latency runs; numerics may differ from the graph as written.

:func:`run` converts numpy inputs to the element type the session expects (float64 → float32,
int32 → int64, float → bfloat16 / float8 / int4 through OrtValues) and returns numpy arrays, with
bfloat16 / float8 / int4 outputs as ml_dtypes arrays.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from lpcompile.errors import CalibrationError, ModelLoadError
from lpcompile.frontend.onnx_io import EXTERNAL_THRESHOLD, external_tensors, load_proto, model_bytes_estimate

logger = logging.getLogger(__name__)

Numerics = Literal["exact", "fast"]
DEFAULT_PROVIDERS: tuple[str, ...] = ("CPUExecutionProvider",)
QDQ_ACCURACY_KEY = "session.qdq_matmulnbits_accuracy_level"

# ORT type string -> (numpy dtype of the values, onnx element type)
_ORT_TYPES: dict[str, tuple[np.dtype, int]] = {
    "tensor(float)": (np.dtype(np.float32), onnx.TensorProto.FLOAT),
    "tensor(double)": (np.dtype(np.float64), onnx.TensorProto.DOUBLE),
    "tensor(float16)": (np.dtype(np.float16), onnx.TensorProto.FLOAT16),
    "tensor(bfloat16)": (np.dtype(ml_dtypes.bfloat16), onnx.TensorProto.BFLOAT16),
    "tensor(float8e4m3fn)": (np.dtype(ml_dtypes.float8_e4m3fn), onnx.TensorProto.FLOAT8E4M3FN),
    "tensor(float8e4m3fnuz)": (np.dtype(ml_dtypes.float8_e4m3fnuz), onnx.TensorProto.FLOAT8E4M3FNUZ),
    "tensor(float8e5m2)": (np.dtype(ml_dtypes.float8_e5m2), onnx.TensorProto.FLOAT8E5M2),
    "tensor(float8e5m2fnuz)": (np.dtype(ml_dtypes.float8_e5m2fnuz), onnx.TensorProto.FLOAT8E5M2FNUZ),
    "tensor(int4)": (np.dtype(ml_dtypes.int4), onnx.TensorProto.INT4),
    "tensor(uint4)": (np.dtype(ml_dtypes.uint4), onnx.TensorProto.UINT4),
    "tensor(int8)": (np.dtype(np.int8), onnx.TensorProto.INT8),
    "tensor(uint8)": (np.dtype(np.uint8), onnx.TensorProto.UINT8),
    "tensor(int16)": (np.dtype(np.int16), onnx.TensorProto.INT16),
    "tensor(uint16)": (np.dtype(np.uint16), onnx.TensorProto.UINT16),
    "tensor(int32)": (np.dtype(np.int32), onnx.TensorProto.INT32),
    "tensor(uint32)": (np.dtype(np.uint32), onnx.TensorProto.UINT32),
    "tensor(int64)": (np.dtype(np.int64), onnx.TensorProto.INT64),
    "tensor(uint64)": (np.dtype(np.uint64), onnx.TensorProto.UINT64),
    "tensor(bool)": (np.dtype(np.bool_), onnx.TensorProto.BOOL),
}
_FP8 = {"tensor(float8e4m3fn)", "tensor(float8e4m3fnuz)", "tensor(float8e5m2)", "tensor(float8e5m2fnuz)"}
_INT4 = {"tensor(int4)", "tensor(uint4)"}
_FLOAT_TYPES = {"tensor(float)", "tensor(double)", "tensor(float16)", "tensor(bfloat16)"} | _FP8
_ML_FLOATS = {
    np.dtype(t)
    for t in (
        ml_dtypes.bfloat16,
        ml_dtypes.float8_e4m3fn,
        ml_dtypes.float8_e4m3fnuz,
        ml_dtypes.float8_e5m2,
        ml_dtypes.float8_e5m2fnuz,
    )
}
# Types whose values ORT's numpy bridge cannot produce: read through OrtValue memory instead.
_RAW_OUTPUT = {"tensor(bfloat16)"} | _INT4 | _FP8


def session_options(numerics: Numerics = "exact", threads: int | None = None) -> ort.SessionOptions:
    """Session options for ``"exact"`` (measurement) or ``"fast"`` (latency) numerics.

    Args:
        numerics: ``"exact"`` or ``"fast"`` (see the module docstring).
        threads: intra-op threads; default ``min(4, os.cpu_count())``. Always fixed, never
            ORT's "all cores" default, so runs are comparable.
    """
    if numerics not in ("exact", "fast"):
        raise ValueError(f"numerics must be 'exact' or 'fast', not {numerics!r}")
    so = ort.SessionOptions()
    so.log_severity_level = 4  # fatal only: failures reach the user as one-line errors, not coloured log lines
    so.intra_op_num_threads = int(threads) if threads else min(4, os.cpu_count() or 1)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if numerics == "exact":
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.add_session_config_entry(QDQ_ACCURACY_KEY, "0")
        if hasattr(so, "use_deterministic_compute"):
            so.use_deterministic_compute = True
        # Without graph optimisations a decode-once weight is decoded on every run; ORT's CPU arena
        # keeps each run's buffers and grows (a 2.5 GB model: 3.5 GB after one run, 6.6 GB after two).
        so.enable_cpu_mem_arena = False
    else:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return so


_IR_VERSION_RE = re.compile(r"max supported IR version: (\d+)")


def _max_ir_version_from(exc: Exception) -> int | None:
    m = _IR_VERSION_RE.search(str(exc))
    return int(m.group(1)) if m else None


def _proto_bytes(proto: onnx.ModelProto) -> int:
    return sum(
        t.ByteSize() for t in onnx.external_data_helper._get_all_tensors(proto)
    )  # private helper, stable since onnx 1.10


def _session_from_bytes(data: bytes, so: ort.SessionOptions, providers: list[str]) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(data, so, providers=providers)
    except Exception as exc:
        max_ir = _max_ir_version_from(exc)
        if max_ir is None:
            raise ModelLoadError(f"ONNX Runtime cannot load the model: {_first_line(exc)}") from None
    # onnx may stamp an IR version newer than this ORT build reads; the IR content we emit is
    # older, so lowering the number is safe.
    proto = onnx.ModelProto()
    proto.ParseFromString(data)
    logger.debug("lowering ir_version %d -> %d for ONNX Runtime", proto.ir_version, max_ir)
    proto.ir_version = max_ir
    try:
        return ort.InferenceSession(proto.SerializeToString(), so, providers=providers)
    except Exception as exc:
        raise ModelLoadError(f"ONNX Runtime cannot load the model: {_first_line(exc)}") from None


def _session_from_large(model: ir.Model, so: ort.SessionOptions, providers: list[str]) -> ort.InferenceSession:
    with tempfile.TemporaryDirectory(prefix="lpcompile-ort-") as tmp:
        path = Path(tmp) / "model.onnx"
        ir.save(model, path, external_data="model.onnx.data")
        return _session_from_path(path, so, providers)


def _session_from_path(path: Path, so: ort.SessionOptions, providers: list[str]) -> ort.InferenceSession:
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    try:
        return ort.InferenceSession(str(path), so, providers=providers)
    except Exception as exc:
        max_ir = _max_ir_version_from(exc)
        if max_ir is None:
            raise ModelLoadError(f"ONNX Runtime cannot load {path}: {_first_line(exc)}") from None
    proto = load_proto(path)
    proto.ir_version = max_ir
    return _session_from_proto(proto, so, providers)


def _session_from_proto(proto: onnx.ModelProto, so: ort.SessionOptions, providers: list[str]) -> ort.InferenceSession:
    if _proto_bytes(proto) > EXTERNAL_THRESHOLD:
        return _session_from_large(ir.from_proto(proto), so, providers)
    return _session_from_bytes(proto.SerializeToString(), so, providers)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")
_SOURCE_PATH = re.compile(r"/onnxruntime_src/\S+:\d+ (onnxruntime::\S+?\(.*?\) )?")


def _first_line(exc: Exception) -> str:
    """One line of an ORT error: ANSI colour codes, the status prefix and source paths dropped."""
    text = _ANSI.sub("", str(exc)).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    return _SOURCE_PATH.sub("", _ORT_PREFIX.sub("", lines[0]))


def make_session(
    model: onnx.ModelProto | ir.Model | str | os.PathLike[str],
    numerics: Numerics = "exact",
    providers: Sequence[str] | None = None,
    threads: int | None = None,
) -> ort.InferenceSession:
    """An ``InferenceSession`` for a model given as a proto, an onnx-ir model or a file path.

    Models whose initializers exceed the protobuf limit, or that read weights from an external data
    file (a session made from bytes would look for it in the working directory), are written to a
    temporary folder with external data and loaded from there. A model stamped with an IR version newer than this ORT
    reads is loaded with the version lowered to ORT's maximum.
    """
    so = session_options(numerics, threads)
    provs = list(providers) if providers is not None else list(DEFAULT_PROVIDERS)
    if isinstance(model, ir.Model):
        if model_bytes_estimate(model) > EXTERNAL_THRESHOLD or external_tensors(model):
            return _session_from_large(model, so, provs)
        return _session_from_proto(ir.to_proto(model), so, provs)
    if isinstance(model, onnx.ModelProto):
        return _session_from_proto(model, so, provs)
    return _session_from_path(Path(model), so, provs)


# --------------------------------------------------------------------------------------------
# inputs


def _convert_input(name: str, array: np.ndarray, type_str: str) -> np.ndarray | ort.OrtValue:
    """Convert one numpy input to what the session expects (a numpy array or an OrtValue)."""
    if type_str not in _ORT_TYPES:
        raise CalibrationError(f"input {name!r} has type {type_str}, which lpcompile cannot feed")
    target, onnx_type = _ORT_TYPES[type_str]
    a = np.asarray(array)
    src_float = np.issubdtype(a.dtype, np.floating) or a.dtype in _ML_FLOATS
    if type_str not in _FLOAT_TYPES and src_float:
        af = a.astype(np.float64)
        if not np.all(np.isfinite(af)) or not np.all(af == np.round(af)):
            raise CalibrationError(f"input {name!r} expects {type_str} but got non-integer float values")
    if type_str in _FP8 or type_str == "tensor(bfloat16)":
        a = np.ascontiguousarray(a.astype(target))
        view = np.uint8 if type_str in _FP8 else np.uint16
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(a.view(view), onnx_type)
    if type_str in _INT4:
        return _int4_ortvalue(a.astype(target), onnx_type)
    if a.dtype != target:
        a = a.astype(target)
    return np.ascontiguousarray(a)


def _int4_ortvalue(a: np.ndarray, onnx_type: int) -> ort.OrtValue:
    """int4/uint4 cannot cross the numpy bridge: allocate an OrtValue and copy packed nibbles in."""
    ov = ort.OrtValue.ortvalue_from_shape_and_type(list(a.shape), onnx_type)
    packed = onnx.numpy_helper.from_array(np.ascontiguousarray(a)).raw_data
    if packed:
        ctypes.memmove(ov.data_ptr(), packed, len(packed))
    return ov


def _ortvalue_to_numpy(ov: ort.OrtValue, type_str: str) -> np.ndarray:
    if type_str not in _RAW_OUTPUT:
        return np.asarray(ov.numpy())
    shape = tuple(int(d) for d in ov.shape())
    dtype, onnx_type = _ORT_TYPES[type_str]
    n = int(np.prod(shape, dtype=np.int64))
    if type_str in _INT4:
        nbytes = (n + 1) // 2
        raw = _copy_bytes(ov, nbytes)
        tensor = onnx.helper.make_tensor("t", onnx_type, shape, raw, raw=True)
        return onnx.numpy_helper.to_array(tensor).astype(dtype).reshape(shape)
    raw = _copy_bytes(ov, n * dtype.itemsize)
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


def _copy_bytes(ov: ort.OrtValue, nbytes: int) -> bytes:
    if nbytes == 0:
        return b""
    if ov.device_name().lower() != "cpu":
        raise CalibrationError(f"cannot read a {ov.data_type()} output that lives on {ov.device_name()}")
    return ctypes.string_at(ov.data_ptr(), nbytes)


def prepare_inputs(session: ort.InferenceSession, inputs: Mapping[str, np.ndarray]) -> dict[str, object]:
    """Check names and ranks against the session and convert every input (see :func:`run`)."""
    specs = {i.name: i for i in session.get_inputs()}
    missing = [n for n in specs if n not in inputs]
    unknown = [n for n in inputs if n not in specs]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing input(s) {', '.join(missing)}")
        if unknown:
            parts.append(f"unknown input(s) {', '.join(unknown)}")
        raise CalibrationError(f"{'; '.join(parts)}; the model takes {', '.join(specs) or 'no inputs'}")
    feed: dict[str, object] = {}
    for name, spec in specs.items():
        a = np.asarray(inputs[name])
        shape = spec.shape
        if isinstance(shape, list):
            if len(shape) != a.ndim:
                raise CalibrationError(
                    f"input {name!r} has rank {a.ndim} {tuple(a.shape)}, "
                    f"the model expects rank {len(shape)} {tuple(shape)}"
                )
            for axis, (want, got) in enumerate(zip(shape, a.shape, strict=True)):
                if isinstance(want, int) and want >= 0 and want != got:
                    raise CalibrationError(
                        f"input {name!r} has shape {tuple(a.shape)}, the model expects {tuple(shape)} (axis {axis})"
                    )
        feed[name] = _convert_input(name, a, spec.type)
    return feed


def run(
    session: ort.InferenceSession,
    inputs: Mapping[str, np.ndarray],
    outputs: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """Run ``session`` once and return ``{output name: array}`` in the session's output order.

    Inputs are converted to the element type the session expects (float64 → float32,
    int32 → int64, floats → float8/bfloat16 through OrtValues, int4 packed into OrtValues);
    wrong names, ranks, fixed dims or non-integral values for integer inputs raise
    ``CalibrationError``. bfloat16 / float8 / int4 outputs come back as ml_dtypes arrays.

    Args:
        session: the session.
        inputs: one array per graph input.
        outputs: names of outputs to fetch (default: all).
    """
    feed = prepare_inputs(session, inputs)
    return _run_feed(session, feed, outputs)


def _run_feed(
    session: ort.InferenceSession, feed: Mapping[str, object], outputs: Sequence[str] | None
) -> dict[str, np.ndarray]:
    out_types = {o.name: o.type for o in session.get_outputs()}
    names = list(outputs) if outputs is not None else list(out_types)
    unknown = [n for n in names if n not in out_types]
    if unknown:
        raise CalibrationError(f"unknown output(s) {', '.join(unknown)}")
    ort_feed = {
        k: v if isinstance(v, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(np.asarray(v))
        for k, v in feed.items()
    }
    try:
        values = session.run_with_ort_values(names, ort_feed)
    except Exception as exc:
        raise CalibrationError(f"ONNX Runtime failed to run the model: {_first_line(exc)}") from None
    return {n: _ortvalue_to_numpy(v, out_types[n]) for n, v in zip(names, values, strict=True)}


def concat_outputs(parts: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate per-batch outputs along axis 0 (rank-0 outputs are stacked)."""
    if not parts:
        return {}
    out: dict[str, np.ndarray] = {}
    for name in parts[0]:
        arrays = [p[name] for p in parts]
        out[name] = np.stack(arrays) if arrays[0].ndim == 0 else np.concatenate(arrays, axis=0)
    return out


def run_batches(
    session: ort.InferenceSession,
    batches: Iterable[Mapping[str, np.ndarray]],
    outputs: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """Run every batch and concatenate each output along axis 0."""
    parts = [run(session, b, outputs) for b in batches]
    if not parts:
        raise CalibrationError("no input batches to run")
    return concat_outputs(parts)


def latency_ms(
    session: ort.InferenceSession,
    inputs: Mapping[str, np.ndarray],
    warmup: int = 3,
    repeat: int = 20,
) -> list[float]:
    """Wall-clock milliseconds of ``repeat`` runs after ``warmup`` runs (callers take the median)."""
    feed = prepare_inputs(session, inputs)
    ort_feed = {
        k: v if isinstance(v, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(np.asarray(v))
        for k, v in feed.items()
    }
    names = [o.name for o in session.get_outputs()]
    for _ in range(max(0, warmup)):
        session.run_with_ort_values(names, ort_feed)
    times: list[float] = []
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        session.run_with_ort_values(names, ort_feed)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


# --------------------------------------------------------------------------------------------
# latency against a reference, and what ORT really runs


@dataclass(frozen=True)
class LatencyComparison:
    """Median latencies of a model and its reference, measured interleaved in one process.

    Attributes:
        batch: samples per run.
        threads: intra-op threads of both sessions.
        runs: timed runs per model (after ``warmup`` untimed ones each).
        numerics: session settings (``"fast"``: ``ORT_ENABLE_ALL``, what a deployment runs).
        model_ms: median milliseconds of the model.
        reference_ms: median milliseconds of the reference.
        model_times: every timed run of the model (ms).
        reference_times: every timed run of the reference (ms).
        blocks: rounds per session pair, in order (empty: one pair).
    """

    batch: int
    threads: int
    runs: int
    numerics: str
    model_ms: float
    reference_ms: float
    model_times: tuple[float, ...] = ()
    reference_times: tuple[float, ...] = ()
    blocks: tuple[int, ...] = ()

    @property
    def ratio(self) -> float:
        """Model median over reference median (< 1: the model is faster)."""
        return self.model_ms / self.reference_ms if self.reference_ms > 0 else float("nan")

    def ratio_interval(self, confidence: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
        """Bootstrap interval of :attr:`ratio` at ``confidence``: the rounds (one run of each model,
        interleaved) are resampled with replacement, so a load spike that slowed both runs of a round
        stays paired; with several session pairs (:attr:`blocks`) the pairs are resampled first, so the
        interval also holds the spread between sessions. ``(nan, nan)`` without the individual times."""
        a = np.asarray(self.model_times, dtype=np.float64)
        b = np.asarray(self.reference_times, dtype=np.float64)
        if a.size == 0 or a.size != b.size:
            return (float("nan"), float("nan"))
        rng = np.random.default_rng(seed)
        sizes = [n for n in self.blocks if n > 0] if sum(self.blocks) == a.size else [a.size]
        starts = np.cumsum([0, *sizes[:-1]])
        if len(sizes) > 1:  # resample session pairs, then rounds within each (a two-stage bootstrap)
            picks = rng.integers(0, len(sizes), size=(int(resamples), len(sizes)))
            idx = np.stack([
                np.concatenate([starts[p] + rng.integers(0, sizes[p], size=sizes[p]) for p in row]) for row in picks
            ])  # fmt: skip
        else:
            idx = rng.integers(0, a.size, size=(int(resamples), a.size))
        r = np.median(a[idx], axis=1) / np.median(b[idx], axis=1)
        tail = (1.0 - confidence) / 2.0
        lo, hi = np.quantile(r, [tail, 1.0 - tail])
        return (float(lo), float(hi))

    def to_dict(self) -> dict[str, float | int | str | list[float]]:
        return {
            "batch": self.batch,
            "threads": self.threads,
            "runs": self.runs,
            "numerics": self.numerics,
            "model_ms": self.model_ms,
            "reference_ms": self.reference_ms,
            "ratio": self.ratio,
            "ratio_ci95": list(self.ratio_interval()),
            "sessions": max(1, len(self.blocks)),
        }


def _ort_feed(session: ort.InferenceSession, inputs: Mapping[str, np.ndarray]) -> dict[str, ort.OrtValue]:
    feed = prepare_inputs(session, inputs)
    return {
        k: v if isinstance(v, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(np.asarray(v))
        for k, v in feed.items()
    }


def compare_latency(
    model: onnx.ModelProto | ir.Model | str | os.PathLike[str],
    reference: onnx.ModelProto | ir.Model | str | os.PathLike[str],
    inputs: Mapping[str, np.ndarray],
    *,
    threads: int = 2,
    runs: int = 20,
    warmup: int = 3,
    numerics: Numerics = "fast",
    sessions: int = 1,
) -> LatencyComparison:
    """Median latency of ``model`` and ``reference`` on the same inputs, interleaved run by run.

    Both sessions live in this process with the same thread count; each round times one run of
    each, alternating which goes first (ABBA), so drift in machine load hits both alike. With
    ``sessions`` > 1 the whole comparison is repeated with fresh sessions, created in alternating
    order: on a 2-core machine the same fp32 model read 0.93–1.15× against itself across five
    session pairs (200 rounds each), so a ratio from one pair carries that spread, and
    :meth:`LatencyComparison.ratio_interval` then resamples session pairs as well as rounds.
    ``numerics="fast"`` (the default) measures what a deployment runs (``ORT_ENABLE_ALL``, where
    ORT constant-folds decode-once weights); ``"exact"`` measures the graph as written.

    Args:
        model: the rewritten model.
        reference: the model it came from.
        inputs: one batch (its sample count is reported as ``batch``: the first axis of the
            first input, 1 for scalars).
        threads: intra-op threads of both sessions.
        runs: timed runs per model and session pair (at least 1).
        warmup: untimed runs per model before timing.
        numerics: ``"fast"`` or ``"exact"``.
        sessions: session pairs, each timed ``runs`` rounds.
    """
    times: tuple[list[float], list[float]] = ([], [])
    blocks: list[int] = []
    for rep in range(max(1, int(sessions))):
        # fresh sessions per repeat, created in alternating order: one session of a model can run a few
        # per cent faster or slower than another of the same model for its whole life (allocation,
        # thread placement), which interleaving rounds cannot average out
        first_model = rep % 2 == 0
        made = [make_session(m, numerics=numerics, threads=threads) for m in
                ((model, reference) if first_model else (reference, model))]  # fmt: skip
        s_model, s_ref = made if first_model else made[::-1]
        pairs = []
        for s in (s_model, s_ref):
            names = [o.name for o in s.get_outputs()]
            pairs.append((s, names, _ort_feed(s, inputs)))
        for s, names, feed in pairs:
            for _ in range(max(0, warmup)):
                s.run_with_ort_values(names, feed)
        for r in range(max(1, int(runs))):
            order = (0, 1) if r % 2 == 0 else (1, 0)
            for i in order:
                s, names, feed = pairs[i]
                t0 = time.perf_counter()
                s.run_with_ort_values(names, feed)
                times[i].append((time.perf_counter() - t0) * 1e3)
        blocks.append(max(1, int(runs)))
        del pairs, made, s_model, s_ref
    first = next(iter(inputs.values()), None)
    batch = int(np.asarray(first).shape[0]) if first is not None and np.asarray(first).ndim else 1
    return LatencyComparison(
        batch=batch,
        threads=int(threads),
        runs=len(times[0]),
        numerics=numerics,
        model_ms=float(np.median(times[0])),
        reference_ms=float(np.median(times[1])),
        model_times=tuple(times[0]),
        reference_times=tuple(times[1]),
        blocks=tuple(blocks),
    )


def optimized_proto(
    model: onnx.ModelProto | ir.Model | str | os.PathLike[str], level: Literal["basic", "extended", "all"] = "basic"
) -> onnx.ModelProto:
    """The graph ONNX Runtime runs after its optimisations at ``level`` (constant folding included).

    ``basic`` is portable (no layout transforms): use it to check that a decode subgraph was folded
    and to read the folded weights. Weights stay inside the returned proto.
    """
    levels = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if level not in levels:
        raise ValueError(f"level must be one of {', '.join(levels)}, not {level!r}")
    so = session_options("fast", threads=1)
    so.graph_optimization_level = levels[level]
    with tempfile.TemporaryDirectory(prefix="lpcompile-ort-opt-") as tmp:
        out = Path(tmp) / "optimized.onnx"
        so.optimized_model_filepath = str(out)
        if isinstance(model, ir.Model):
            model = ir.to_proto(model)
        if isinstance(model, onnx.ModelProto):
            _session_from_proto(model, so, list(DEFAULT_PROVIDERS))
        else:
            _session_from_path(Path(model), so, list(DEFAULT_PROVIDERS))
        return onnx.load(str(out), load_external_data=True)


def latency_inputs(
    reference: onnx.ModelProto | ir.Model | str | os.PathLike[str], calib: object | None, batch: int
) -> dict[str, np.ndarray]:
    """One batch of ``batch`` samples for :func:`compare_latency`.

    From ``calib`` (a :class:`lpcompile.frontend.calib.CalibrationSet`; samples repeated when it
    has fewer than ``batch``) or synthesised from the reference's input signature when None.
    """
    from lpcompile.frontend.calib import CalibrationSet, batches, synthesize

    if batch < 1:
        raise CalibrationError(f"latency batch must be >= 1, not {batch}")
    if calib is None:
        proto = reference if isinstance(reference, (onnx.ModelProto, ir.Model)) else load_proto(Path(reference))
        calib = synthesize(proto, num_samples=batch)
    if not isinstance(calib, CalibrationSet):
        raise TypeError(f"calib must be a CalibrationSet, not {type(calib).__name__}")
    feed = next(batches(calib, batch), None)
    if feed is None:
        raise CalibrationError("no input samples for the latency measurement")
    first = next(iter(feed.values()), None)
    have = int(np.asarray(first).shape[0]) if first is not None and np.asarray(first).ndim else batch
    if have < batch and calib.fixed_batch is None:
        reps = -(-batch // have)
        feed = {
            k: np.concatenate([np.asarray(v)] * reps, axis=0)[:batch] if np.asarray(v).ndim else v
            for k, v in feed.items()
        }
    return dict(feed)
