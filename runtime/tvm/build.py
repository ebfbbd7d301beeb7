"""Lower a rewritten ONNX model to a TVM module (LLVM or CUDA) and run compiled modules.

:func:`lower_model` = :func:`~lpcompile.runtime.tvm.patterns.prepare` (cut out the quantized
patterns) → :func:`~lpcompile.runtime.tvm.relax_import.to_relax` (TVM's ONNX frontend plus
``call_tir`` to lpcompile's kernels) → ``tvm.compile`` with the default Relax pipeline of the
target → ``export_library``. Beside ``OUT`` it writes ``OUT.meta.json`` (inputs, outputs, target,
kernel calls) which :func:`load_compiled` / ``lpcompile run`` read.

CUDA builds run in a child process (``python -m lpcompile.runtime.tvm.build``): TVM has crashed
hard in some CUDA schedules (FACTS.md), and a crash must become an error message, not a dead
CLI. No GPU is needed to build: the CUDA C source is generated and compiled by nvcc here;
``emit_source`` keeps the ``.cu`` (and a ``.ptx`` when nvcc is available).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from lpcompile.errors import LpError, ModelLoadError, UsageError
from lpcompile.frontend.npz_safe import NpzError, read_npz
from lpcompile.io_utils import (
    OutputSession,
    atomic_path,
    atomic_write_text,
    file_sha256,
    read_json_bounded,
    verify_shared_library,
)

logger = logging.getLogger(__name__)

META_FORMAT = "lpcompile.tvm/1"
TARGETS = ("llvm", "cuda")
CUDA_BUILD_TIMEOUT_S = 1800


@dataclass(frozen=True)
class TensorInfo:
    """A graph input or output: name, element type and shape (symbolic dims as strings)."""

    name: str
    dtype: str
    shape: tuple[int | str | None, ...]


@dataclass(frozen=True)
class LowerResult:
    """What :func:`lower_model` wrote."""

    output: Path
    meta: Path
    target: str
    kernels: tuple[dict[str, str], ...]
    folded: int
    sources: tuple[Path, ...]


def parse_shapes(specs: Sequence[str]) -> dict[str, list[int]]:
    """``["pixels=1,8,8"]`` → ``{"pixels": [1, 8, 8]}`` (static input shapes for the lowering)."""
    out: dict[str, list[int]] = {}
    for spec in specs:
        name, sep, dims = spec.partition("=")
        try:
            shape = [int(d) for d in dims.split(",") if d.strip()]
        except ValueError:
            shape = []
        if not sep or not name or not shape or any(d < 1 for d in shape):
            raise UsageError(f"bad --shape {spec!r}: expected NAME=D0,D1,... with positive integers")
        out[name] = shape
    return out


def target_for(kind: str, arch: str | None = None) -> dict[str, str]:
    """The TVM target dict for ``llvm`` (this host's CPU) or ``cuda`` (``arch``, default sm_90)."""
    from lpcompile.runtime.tvm.kernels.common import cuda_target, host_llvm_target

    if kind == "llvm":
        return host_llvm_target()
    if kind == "cuda":
        arch = arch or "sm_90"
        if not arch.startswith("sm_") or not arch[3:].rstrip("a").isdigit():
            raise UsageError(f"bad --arch {arch!r}: expected sm_NN, e.g. sm_90")
        return cuda_target(arch)
    raise UsageError(f"unknown target {kind!r}; expected one of {', '.join(TARGETS)}")


def _elem_name(elem: int) -> str:
    return onnx.helper.tensor_dtype_to_np_dtype(elem).name if elem else "unknown"


def _value_infos(graph: onnx.GraphProto, values: Sequence[onnx.ValueInfoProto]) -> list[TensorInfo]:
    inits = {t.name for t in graph.initializer}
    out = []
    for v in values:
        if v.name in inits:
            continue
        tt = v.type.tensor_type
        dims: list[int | str | None] = []
        for d in tt.shape.dim:
            dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
        out.append(TensorInfo(v.name, _elem_name(tt.elem_type), tuple(dims)))
    return out


def load_onnx(model_path: str | os.PathLike[str]) -> onnx.ModelProto:
    path = Path(model_path)
    if not path.is_file():
        raise ModelLoadError(f"model not found: {path}")
    try:
        return onnx.load(str(path))
    except Exception as exc:
        raise ModelLoadError(f"cannot read {path} as ONNX: {str(exc).splitlines()[0] if str(exc) else exc}") from None


def _apply_shapes(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]) -> None:
    names = {i.name for i in model.graph.input}
    unknown = sorted(set(shapes) - names)
    if unknown:
        raise UsageError(f"--shape names unknown input(s): {', '.join(unknown)}; inputs: {', '.join(sorted(names))}")
    for vi in model.graph.input:
        if vi.name in shapes:
            dims = vi.type.tensor_type.shape.dim
            new = list(shapes[vi.name])
            if len(dims) and len(dims) != len(new):
                raise UsageError(f"--shape {vi.name}: rank {len(new)} but the model input has rank {len(dims)}")
            del dims[:]
            for d in new:
                dims.add().dim_value = int(d)


def compile_model(
    model: onnx.ModelProto, target: Any, shapes: Mapping[str, Sequence[int]] | None = None
) -> tuple[Any, list[Any], Any]:
    """Prepare, import and compile in this process; return ``(executable, kernel calls, prepared)``."""
    import tvm

    from lpcompile.runtime.tvm import patterns, relax_import
    from lpcompile.runtime.tvm.kernels.common import as_target

    model = onnx.ModelProto.FromString(model.SerializeToString())
    if shapes:
        _apply_shapes(model, shapes)
    prepared = patterns.prepare(model)
    tgt = as_target(target)
    mod, calls = relax_import.to_relax(prepared, tgt, {k: list(v) for k, v in (shapes or {}).items()})
    ex = tvm.compile(mod, target=tgt)
    return ex, calls, prepared


def _device_modules(mod: Any) -> list[Any]:
    found = []
    stack = [mod]
    while stack:
        m = stack.pop()
        for sub in getattr(m, "imports", []):
            found.append(sub)
            stack.append(sub)
    return found


def cuda_source(ex: Any) -> str:
    """The generated CUDA C source of a compiled executable (empty string when there is none)."""
    root = getattr(ex, "mod", ex)
    for sub in _device_modules(root):
        if str(getattr(sub, "kind", "")) == "cuda":
            return str(sub.inspect_source("cuda"))
    return ""


def _export(ex: Any, out: Path) -> dict[str, Any]:
    """``export_library`` to a temp folder beside ``out`` (the loader needs a ``.so`` name), then move it
    to ``out`` through :func:`atomic_path`; returns ``{"bytes", "sha256"}`` of the library (for the
    ``.meta.json``, which :func:`load_compiled` checks before loading it)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        lib = tmp / (out.stem + ".so")
        ex.export_library(str(lib))
        identity = {"bytes": lib.stat().st_size, "sha256": file_sha256(lib)}
        with atomic_path(out) as staged:
            os.replace(lib, staged)
        return identity
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_sources(ex: Any, kind: str, source_dir: Path, stem: str, arch: str | None) -> list[Path]:
    from lpcompile.runtime.tvm import cuda_tools

    if source_dir.exists() and not source_dir.is_dir():
        raise UsageError(f"--emit-source {source_dir} is a file; give a folder")
    source_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if kind == "cuda":
        src = cuda_source(ex)
        cu = source_dir / f"{stem}.cu"
        atomic_write_text(cu, src)
        written.append(cu)
        if cuda_tools.find_nvcc():
            try:
                ptx = cuda_tools.compile_cuda(src, source_dir, stem, arch=arch, kinds=("ptx",))["ptx"]
                written.append(ptx)
            except LpError as exc:  # the .cu is still useful
                logger.warning("nvcc could not produce PTX: %s", exc)
    else:
        root = getattr(ex, "mod", ex)
        llvm = [m for m in [root, *_device_modules(root)] if str(getattr(m, "kind", "")) == "llvm"]
        try:
            text = str(llvm[0].inspect_source("ll")) if llvm else ""
        except Exception as exc:  # pragma: no cover - depends on the TVM build
            logger.warning("no LLVM source available: %s", exc)
            text = ""
        if text:
            ll = source_dir / f"{stem}.ll"
            atomic_write_text(ll, text)
            written.append(ll)
    return written


def lower_model(
    model_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    target: str = "llvm",
    arch: str | None = None,
    emit_source: str | os.PathLike[str] | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    subprocess_build: bool | None = None,
) -> LowerResult:
    """Lower ``model_path`` (a rewritten ``.lp.onnx``) for ``target`` and export ``out``.

    Args:
        model_path: the ONNX model.
        out: the shared library to write (``OUT.meta.json`` goes beside it).
        target: ``"llvm"`` or ``"cuda"``.
        arch: CUDA architecture (default ``sm_90``).
        emit_source: folder for the generated source (``.cu`` [+ ``.ptx``] or ``.ll``).
        shapes: static shapes for inputs with symbolic dims (``{"pixels": [1, 8, 8]}``).
        subprocess_build: build in a child process (default: for CUDA).
    """
    tgt = target_for(target, arch)
    out_path = Path(out)
    if out_path.is_dir():
        raise UsageError(f"output {out_path} is a directory; give a file name")
    if not Path(model_path).is_file():
        raise ModelLoadError(f"model not found: {model_path}")
    if subprocess_build is None:
        subprocess_build = target == "cuda"
    if subprocess_build:
        return _lower_in_child(model_path, out_path, target, arch, emit_source, shapes)
    model = load_onnx(model_path)
    ex, calls, prepared = compile_model(model, tgt, shapes)
    library = _export(ex, out_path)
    sources: list[Path] = []
    if emit_source is not None:
        sources = _write_sources(ex, target, Path(emit_source), out_path.name.split(".")[0], tgt.get("arch"))
    shaped = onnx.ModelProto.FromString(model.SerializeToString())
    if shapes:
        _apply_shapes(shaped, shapes)
    kernels = tuple({k: str(v) for k, v in asdict(c).items()} for c in calls)
    meta = {
        "format": META_FORMAT,
        "model": Path(model_path).name,
        "target": target,
        "target_spec": tgt,
        "inputs": [asdict(t) for t in _value_infos(shaped.graph, shaped.graph.input)],
        "outputs": [asdict(t) for t in _value_infos(shaped.graph, shaped.graph.output)],
        "kernels": list(kernels),
        "folded_decodes": list(prepared.folded),
        "library": library,
    }
    meta_path = meta_path_for(out_path)
    atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
    logger.info("wrote %s (%d kernel call(s), %d decode(s) folded)", out_path, len(kernels), len(prepared.folded))
    return LowerResult(out_path, meta_path, target, kernels, len(prepared.folded), tuple(sources))


def meta_path_for(lib: str | os.PathLike[str]) -> Path:
    p = Path(lib)
    return p.with_name(p.name + ".meta.json")


def _lower_in_child(
    model_path: str | os.PathLike[str],
    out: Path,
    target: str,
    arch: str | None,
    emit_source: str | os.PathLike[str] | None,
    shapes: Mapping[str, Sequence[int]] | None,
) -> LowerResult:
    spec = {
        "model": str(model_path),
        "out": str(out),
        "target": target,
        "arch": arch,
        "emit_source": None if emit_source is None else str(emit_source),
        "shapes": {k: list(v) for k, v in (shapes or {}).items()},
    }
    with tempfile.TemporaryDirectory(prefix="lpcompile-tvm-") as tmp:
        spec_path = Path(tmp) / "spec.json"
        result_path = Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        cmd = [sys.executable, "-m", "lpcompile.runtime.tvm.build", str(spec_path), str(result_path)]
        proc = _run_child(cmd, target)
        if proc.returncode != 0 or not result_path.exists():
            lines = [ln for ln in (proc.stderr or "").splitlines() if ln.strip()]
            msg = next((ln for ln in reversed(lines) if ln.startswith("lpcompile:")), lines[-1] if lines else "")
            how = "crashed (signal)" if proc.returncode < 0 else f"failed (exit {proc.returncode})"
            raise LpError(f"TVM {target} build {how}: {msg.removeprefix('lpcompile: ')}".rstrip(": "))
        data = json.loads(result_path.read_text())
    return LowerResult(
        Path(data["output"]),
        Path(data["meta"]),
        data["target"],
        tuple(data["kernels"]),
        int(data["folded"]),
        tuple(Path(p) for p in data["sources"]),
    )


def _run_child(cmd: list[str], target: str) -> subprocess.CompletedProcess[str]:
    """Run the build child; on Ctrl-C/SIGTERM/timeout it gets SIGTERM first (it removes its temp files)."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as child:
        try:
            out, err = child.communicate(timeout=CUDA_BUILD_TIMEOUT_S)
        except BaseException as exc:
            child.terminate()
            try:
                child.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.communicate()
            if isinstance(exc, subprocess.TimeoutExpired):
                raise LpError(f"TVM {target} build timed out after {CUDA_BUILD_TIMEOUT_S} s") from None
            raise
    return subprocess.CompletedProcess(cmd, child.returncode, out, err)


def _child_main(argv: Sequence[str]) -> int:
    from lpcompile.cli import install_signal_handlers
    from lpcompile.io_utils import Terminated

    install_signal_handlers()
    spec_path, result_path = argv
    spec = json.loads(Path(spec_path).read_text())
    try:
        # the parent holds the output locks; this session stages and commits the files together
        with OutputSession(lock=False):
            res = lower_model(
            spec["model"],
            spec["out"],
            target=spec["target"],
            arch=spec["arch"],
            emit_source=spec["emit_source"],
            shapes=spec["shapes"] or None,
                subprocess_build=False,
            )
    except LpError as exc:
        sys.stderr.write(f"lpcompile: {exc}\n")
        return exc.exit_code
    except (KeyboardInterrupt, Terminated):
        sys.stderr.write("lpcompile: interrupted\n")
        return 130
    data = {
        "output": str(res.output),
        "meta": str(res.meta),
        "target": res.target,
        "kernels": list(res.kernels),
        "folded": res.folded,
        "sources": [str(p) for p in res.sources],
    }
    Path(result_path).write_text(json.dumps(data))
    return 0


# ----------------------------------------------------------------------------------------------
# running compiled modules
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompiledModel:
    """A loaded ``.so`` with its metadata; :meth:`run` maps input arrays to output arrays."""

    path: Path
    meta: dict[str, Any]
    vm: Any
    device: Any

    @property
    def input_names(self) -> list[str]:
        return [i["name"] for i in self.meta["inputs"]]

    @property
    def output_names(self) -> list[str]:
        return [o["name"] for o in self.meta["outputs"]]

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import tvm

        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise UsageError(f"missing input(s) {', '.join(missing)}; the model takes {', '.join(self.input_names)}")
        args = []
        for info in self.meta["inputs"]:
            arr = np.asarray(inputs[info["name"]])
            want = np.dtype(info["dtype"]) if info["dtype"] != "unknown" else arr.dtype
            if arr.dtype != want:
                if (arr.dtype.kind == "f" and want.kind == "f") or (arr.dtype.kind in "iu" and want.kind in "iu"):
                    arr = arr.astype(want)
                else:
                    raise LpError(f"input {info['name']!r} is {arr.dtype}, the model expects {want}")
            _check_shape(info, arr)
            args.append(tvm.runtime.tensor(np.ascontiguousarray(arr), self.device))
        result = self.vm["main"](*args)
        values = [result] if hasattr(result, "numpy") else list(result)
        return {name: v.numpy() for name, v in zip(self.output_names, values, strict=False)}


def _check_shape(info: Mapping[str, Any], arr: np.ndarray) -> None:
    shape = info["shape"]
    if shape and len(shape) != arr.ndim:
        raise LpError(f"input {info['name']!r} has rank {arr.ndim}, the model expects {len(shape)}")
    for want, got in zip(shape, arr.shape, strict=False):
        if isinstance(want, int) and want > 0 and want != got:
            raise LpError(f"input {info['name']!r} has shape {list(arr.shape)}, the model expects {shape}")


def load_compiled(path: str | os.PathLike[str]) -> CompiledModel:
    """Load a module written by :func:`lower_model` (needs its ``.meta.json``)."""
    import tvm
    from tvm import relax

    lib = Path(path)
    meta_path = meta_path_for(lib)
    if not lib.is_file():
        raise ModelLoadError(f"compiled module not found: {lib}")
    if not meta_path.is_file():
        raise ModelLoadError(f"{meta_path.name} is missing beside {lib.name} (written by `lpcompile lower`)")
    meta = read_module_meta(lib)
    verify_shared_library(lib, meta.get("library"))  # before dlopen: a truncated or foreign .so never loads
    if meta["target"] == "cuda":
        device = tvm.cuda(0)
        if not device.exist:
            raise LpError(f"{lib.name} was built for CUDA and this machine has no CUDA device")
    else:
        device = tvm.cpu(0)
    try:
        mod = tvm.runtime.load_module(str(lib))
        vm = relax.VirtualMachine(mod, device)
    except Exception as exc:
        raise ModelLoadError(f"cannot load {lib}: {str(exc).splitlines()[0] if str(exc) else exc}") from None
    return CompiledModel(lib, meta, vm, device)


def read_module_meta(lib: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``.meta.json`` beside a compiled module, checked field by field (one-line errors)."""
    meta_path = meta_path_for(lib)
    try:
        meta = read_json_bounded(meta_path, "module metadata", max_bytes=64 * 1024 * 1024)
    except LpError as exc:
        raise ModelLoadError(str(exc)) from None
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        raise ModelLoadError(f"{meta_path} is not lpcompile TVM metadata")
    if meta.get("target") not in TARGETS:
        raise ModelLoadError(f"{meta_path}: unknown target {meta.get('target')!r}")
    for key in ("inputs", "outputs"):
        infos = meta.get(key)
        if not isinstance(infos, list) or not all(
            isinstance(i, dict)
            and isinstance(i.get("name"), str)
            and isinstance(i.get("dtype"), str)
            and isinstance(i.get("shape"), list)
            for i in infos
        ):
            raise ModelLoadError(f"{meta_path}: '{key}' must be a list of {{name, dtype, shape}}")
    return meta


def load_inputs(path: str | os.PathLike[str], names: Sequence[str]) -> dict[str, np.ndarray]:
    """Arrays from an ``.npz``: by input name, or the only array for a one-input model."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"inputs file not found: {p}")
    try:
        arrays = read_npz(p)
    except NpzError as exc:
        raise LpError(str(exc)) from None
    if all(n in arrays for n in names):
        return {n: arrays[n] for n in names}
    if len(names) == 1 and len(arrays) == 1:
        return {names[0]: next(iter(arrays.values()))}
    raise LpError(f"{p.name} holds {', '.join(sorted(arrays))}; the model takes {', '.join(names)}")


def run_compiled(path: str | os.PathLike[str], inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return load_compiled(path).run(inputs)


def save_outputs(path: str | os.PathLike[str], outputs: Mapping[str, np.ndarray]) -> None:
    """Write outputs to an ``.npz`` atomically."""
    import io

    from lpcompile.io_utils import atomic_write_bytes

    buf = io.BytesIO()
    np.savez(buf, **dict(outputs))
    atomic_write_bytes(path, buf.getvalue())


def reference_outputs(model_path: str | os.PathLike[str], inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """ONNX Runtime on the graph *as written* (optimisations off, see :func:`ort_session`)."""
    return _session_outputs(ort_session(model_path), inputs)


def _session_outputs(sess: Any, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    feed = {i.name: np.asarray(inputs[i.name]) for i in sess.get_inputs()}
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed), strict=False))


def ort_session(model_path: str | os.PathLike[str]) -> Any:
    """An ORT CPU session with graph optimisations disabled.

    The reference for the lowering is the rewritten graph as written. ORT's BASIC level (what
    ``lpcompile.runtime.ort`` uses for "exact" numerics) changes the numerics of FP8 E5M2 Q/DQ
    after Relu in the digits MLP by 0.4 on the logits; with optimisations off ORT and the
    lowered module agree to fp32 accumulation order.
    """
    import onnxruntime as ort

    model = load_onnx(model_path)
    model.ir_version = min(model.ir_version, 10)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


class OnnxComparison:
    """``{output: {max_abs_diff, max_abs_ref}}`` between a module's outputs and ORT on ``model_path``,
    accumulated (as maxima) over any number of batches with one ORT session."""

    def __init__(self, model_path: str | os.PathLike[str]) -> None:
        self._sess = ort_session(model_path)
        self._acc: dict[str, dict[str, float]] = {}

    def add(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        ref = _session_outputs(self._sess, inputs)
        for name, got in outputs.items():
            if name not in ref:
                continue
            r = np.asarray(ref[name], dtype=np.float64)
            d = self._acc.setdefault(name, {"max_abs_diff": 0.0, "max_abs_ref": 0.0})
            if r.size:
                d["max_abs_diff"] = max(d["max_abs_diff"], float(np.max(np.abs(np.asarray(got, np.float64) - r))))
                d["max_abs_ref"] = max(d["max_abs_ref"], float(np.max(np.abs(r))))

    def result(self) -> dict[str, dict[str, float]]:
        return {name: dict(d) for name, d in self._acc.items()}


def compare_with_onnx(
    model_path: str | os.PathLike[str], inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]
) -> dict[str, dict[str, float]]:
    """``{output: {max_abs_diff, max_abs_ref}}`` between ``outputs`` and ORT on ``model_path``."""
    comparison = OnnxComparison(model_path)
    comparison.add(inputs, outputs)
    return comparison.result()


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
