"""Big models on a small one: the generator of ``benchmarks/bigmodel.py``, streamed external weights,
slice-wise quantization, and ``--max-samples`` bounding what a calibration file inflates.

The >2 GB path is exercised by lowering ``INLINE_EXTERNAL_LIMIT`` to 0 (every external weight then
streams from its file as it would for a big model). Equality checks are exact: the streamed path
must write the same bytes as the in-memory path, and slice-wise rounding the same codes and scales as
the reference :func:`lpcompile.formats.quantize_weight`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import lpcompile.frontend.onnx_io as onnx_io
from lpcompile.analysis.config import AnalysisConfig
from lpcompile.errors import ModelLoadError
from lpcompile.files import analysis_calib, apply_file, load_normalized
from lpcompile.formats import WeightLayout, get_format, quantize_weight
from lpcompile.frontend.calib import load_calibration
from lpcompile.frontend.onnx_io import StreamedTensor, load_model
from lpcompile.passes.quantize_weights import quantize_in_slices

ROOT = Path(__file__).resolve().parent.parent


def _bigmodel():
    spec = importlib.util.spec_from_file_location("bigmodel", ROOT / "benchmarks" / "bigmodel.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bigmodel"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def small_big(tmp_path_factory: pytest.TempPathFactory):
    """A 4-layer, d=256 model (1 MiB of external data) written by the benchmark's generator."""
    path = tmp_path_factory.mktemp("big") / "big.onnx"
    return _bigmodel().write_model(path, dim=256, layers=4, batch=2, seed=3)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_generator_writes_a_valid_model_with_external_data(small_big, tmp_path: Path) -> None:
    assert small_big.data_bytes == 4 * (256 * 256 + 256) * 4
    assert small_big.data_path.stat().st_size == small_big.data_bytes
    assert small_big.largest_tensor_bytes == 256 * 256 * 4
    assert small_big.path.stat().st_size < 10_000  # no weight inside the model file
    onnx.checker.check_model(str(small_big.path), full_check=True)
    proto = onnx.load(str(small_big.path))
    w0 = numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == "w0"))
    assert w0.shape == (256, 256) and abs(float(w0.std()) - 1 / 16) < 0.01  # N(0, 1/sqrt(d))
    again = _bigmodel().write_model(tmp_path / "again.onnx", dim=256, layers=4, batch=2, seed=3)
    assert _sha(again.data_path) == _sha(small_big.data_path)  # seeded: same bytes


def test_streamed_tensors_read_fresh_arrays_without_mapping(small_big, monkeypatch) -> None:
    monkeypatch.setattr(onnx_io, "INLINE_EXTERNAL_LIMIT", 0)
    model = load_model(small_big.path)
    t = model.graph.initializers["w1"].const_value
    assert isinstance(t, StreamedTensor)
    a, b = t.numpy(), t.numpy()
    assert a is not b and a.flags.writeable  # the caller owns each array; nothing is cached
    assert t.raw is None  # no memory map held by the tensor
    ref = numpy_helper.to_array(next(x for x in onnx.load(str(small_big.path)).graph.initializer if x.name == "w1"))
    np.testing.assert_array_equal(a, ref)
    assert t.tobytes() == ref.astype("<f4").tobytes()
    np.testing.assert_array_equal(np.asarray(t, dtype=np.float64), ref.astype(np.float64))


def test_streamed_apply_writes_the_same_model_as_the_in_memory_path(small_big, tmp_path: Path, monkeypatch) -> None:
    before = _sha(small_big.data_path)
    in_memory = apply_file(small_big.path, tmp_path / "mem.onnx", uniform="int4")
    monkeypatch.setattr(onnx_io, "INLINE_EXTERNAL_LIMIT", 0)
    monkeypatch.setattr(onnx_io, "STREAMED_INLINE_LIMIT", 0)  # a streamed model's output: tensor by tensor
    monkeypatch.setattr("lpcompile.passes.quantize_weights.SLICE_BYTES", 4096)  # slice-wise rounding too
    streamed = apply_file(small_big.path, tmp_path / "str.onnx", uniform="int4")
    assert _sha(small_big.data_path) == before  # the input's data is never written
    assert not (tmp_path / "mem.onnx.data").exists() and (tmp_path / "str.onnx.data").is_file()
    mem, st = onnx.load(str(in_memory.output)), onnx.load(str(streamed.output))
    a = {t.name: numpy_helper.to_array(t) for t in mem.graph.initializer}
    b = {t.name: numpy_helper.to_array(t) for t in st.graph.initializer}
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name].view(np.uint8), b[name].view(np.uint8), err_msg=name)


def test_streamed_weights_above_the_limit_keep_external_data(small_big, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(onnx_io, "INLINE_EXTERNAL_LIMIT", 0)
    monkeypatch.setattr(onnx_io, "STREAMED_INLINE_LIMIT", 0)
    model = load_normalized(small_big.path)  # fp32 weights left as they are: they stream file to file
    out = tmp_path / "copy.onnx"
    data = onnx_io.save_model(model, out)
    assert data == out.with_name("copy.onnx.data") and data.stat().st_size >= small_big.data_bytes
    copy = onnx.load(str(out), load_external_data=False)
    locations = {e.value for t in copy.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"copy.onnx.data"}


@pytest.mark.parametrize("fmt", ["int4_b128", "int4_b32", "int8", "fp8_e4m3", "bf16", "fp16"])
@pytest.mark.parametrize(
    ("shape", "layout"),
    [((300, 257), WeightLayout(1, 0)), ((257, 300), WeightLayout(0, 1)), ((32, 40, 3, 3), WeightLayout(0, 1))],
)
def test_quantize_in_slices_equals_the_reference(fmt: str, shape: tuple[int, ...], layout: WeightLayout) -> None:
    w = np.random.default_rng(7).standard_normal(shape).astype(np.float32) * 3
    ref = quantize_weight(fmt, w, layout)
    got = quantize_in_slices(get_format(fmt), w, layout, slice_bytes=4096)
    assert got.codes.dtype == ref.codes.dtype and got.codes.shape == ref.codes.shape
    width = ref.codes.dtype.itemsize
    view = {1: np.uint8, 2: np.uint16}[width]
    np.testing.assert_array_equal(got.codes.view(view), ref.codes.view(view))
    if ref.scale is None:
        assert got.scale is None
    else:
        np.testing.assert_array_equal(got.scale, ref.scale)
    assert (got.axis, got.block_size) == (ref.axis, ref.block_size)


# --------------------------------------------------------------------------------------------
# --max-samples bounds what inflates


def _bomb(path: Path, name: str, rows: int, width: int) -> None:
    """An .npz whose one float32 array of zeros (rows × width) deflates to a small fraction of its size."""
    with (
        zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z,
        z.open(f"{name}.npy", "w", force_zip64=True) as f,
    ):
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (rows, width)})
        f.write(buf.getvalue())
        chunk = b"\0" * (rows * width * 4 // 16)
        for _ in range(16):
            f.write(chunk)


def test_max_samples_reads_only_those_rows(small_big, tmp_path: Path, monkeypatch) -> None:
    """1 MiB of samples with a 256 KiB cap: refused whole, read when --max-samples asks for 8 rows."""
    bomb = tmp_path / "calib.npz"
    _bomb(bomb, "x", 1024, 256)
    monkeypatch.setenv("LPCOMPILE_MAX_ARRAY_BYTES", str(256 * 1024))
    model = load_normalized(small_big.path)  # input x: [2, 256], a fixed batch of 2
    with pytest.raises(Exception, match="LPCOMPILE_MAX_ARRAY_BYTES"):
        load_calibration(bomb, model)
    calib = analysis_calib(model, bomb, AnalysisConfig(max_samples=7))
    assert calib.num_samples == 8  # 7 rounded up to the fixed batch of 2
    assert calib.arrays["x"].shape == (8, 256)


def test_max_samples_on_the_cli_keeps_peak_memory_small(small_big, tmp_path: Path) -> None:
    """A 256 MiB array in a small file: ``analyze --max-samples 8`` inflates 8 rows and succeeds."""
    bomb = tmp_path / "calib.npz"
    _bomb(bomb, "x", 1 << 18, 256)
    assert bomb.stat().st_size < 2 * 1024**2
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LPCOMPILE_MAX_ARRAY_BYTES": str(64 * 1024**2)}
    measure = (
        "import resource, subprocess, sys\n"
        "rc = subprocess.run(sys.argv[1:], check=False).returncode\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
        "sys.exit(rc)\n"
    )
    cmd = [sys.executable, "-m", "lpcompile", "analyze", str(small_big.path), "--calib", str(bomb),
           "--probes", "1", "--max-samples", "8", "--batch-size", "2", "-o", str(tmp_path / "s.json"), "-q"]
    proc = subprocess.run([sys.executable, "-c", measure, *cmd], capture_output=True, text=True, env=env,
                          timeout=300, check=False)
    *lines, peak = proc.stderr.rstrip("\n").split("\n")
    assert proc.returncode == 0, "\n".join(lines)
    assert int(peak) < 1024 * 1024, f"peak RSS {peak} KiB"  # < 1 GiB; the whole array would be 256 MiB


def test_truncated_external_data_is_one_line_at_load(small_big, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(onnx_io, "INLINE_EXTERNAL_LIMIT", 0)
    model = tmp_path / "m.onnx"
    model.write_bytes(small_big.path.read_bytes())
    data = small_big.data_path.read_bytes()
    (tmp_path / small_big.data_path.name).write_bytes(data[: len(data) - 1000])
    with pytest.raises(ModelLoadError) as info:
        load_model(model)
    assert "truncated" in str(info.value) and "\n" not in str(info.value)


def _gemm_model(path: Path) -> np.ndarray:
    """Two Gemm(transB=1, alpha=0.5 on the second) layers with external data; return the first weight."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(11)
    w0 = rng.standard_normal((48, 64)).astype(np.float32) / 8  # [N, K]: transB=1
    w1 = rng.standard_normal((16, 48)).astype(np.float32) / 8
    b0 = rng.standard_normal(48).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "w0", "b0"], ["h"], name="fc0", transB=1),
        helper.make_node("Gemm", ["h", "w1"], ["y"], name="fc1", transB=1, alpha=0.5),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16])],
        initializer=[numpy_helper.from_array(w0, "w0"), numpy_helper.from_array(b0, "b0"),
                     numpy_helper.from_array(w1, "w1")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=0)
    return w0


def test_streamed_gemm_weights_are_transposed_on_access(tmp_path: Path, monkeypatch) -> None:
    import onnx_ir as ir

    w0 = _gemm_model(tmp_path / "gemm.onnx")
    in_memory = apply_file(tmp_path / "gemm.onnx", tmp_path / "mem.onnx", uniform="int8")
    monkeypatch.setattr(onnx_io, "INLINE_EXTERNAL_LIMIT", 0)
    model = load_normalized(tmp_path / "gemm.onnx")
    t = model.graph.initializers["w0"].const_value
    assert isinstance(t, ir.LazyTensor) and not t.cache  # computed from the file each time, never held
    assert tuple(t.shape) == (64, 48)
    np.testing.assert_array_equal(t.numpy(), w0.T)
    streamed = apply_file(tmp_path / "gemm.onnx", tmp_path / "str.onnx", uniform="int8")
    mem, st = onnx.load(str(in_memory.output)), onnx.load(str(streamed.output))
    a = {x.name: numpy_helper.to_array(x) for x in mem.graph.initializer}
    b = {x.name: numpy_helper.to_array(x) for x in st.graph.initializer}
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
