"""External data: load, rewrite and save models whose weights live beside them, safely.

The fast tests run the same code paths as a >2 GB model on a small one (saved with external
data, and with the thresholds lowered); ``test_model_over_2gb`` (``slow``) runs the real thing.
Tolerances: int8 per-channel weights are within scale/2 = amax/254 of fp32 per element, so the
outputs of the tiny MLPs here stay within 2% of the output range (checked loosely at 5%).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import lpcompile.frontend.onnx_io as onnx_io
from lpcompile.cli import main
from lpcompile.errors import LpError, ModelLoadError
from lpcompile.frontend.onnx_io import (
    _check_external_locations,
    external_tensors,
    load_model,
    load_proto,
    save_model,
)
from lpcompile.runtime.ort import make_session, run

RNG = np.random.default_rng(0)


def _mlp(shapes: list[tuple[int, int]], weights: list[np.ndarray] | None = None) -> onnx.ModelProto:
    nodes, inits, prev = [], [], "x"
    for i, (k, n) in enumerate(shapes):
        w = weights[i] if weights is not None else (RNG.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        out = "y" if i == len(shapes) - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [out], name=f"fc{i}"))
        prev = out
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", shapes[0][0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", shapes[-1][1]])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _save_external(model: onnx.ModelProto, path: Path, location: str | None = None) -> Path:
    onnx.save(model, str(path), save_as_external_data=True, location=location or path.name + ".data", size_threshold=0)
    return path


def _locations(path: Path) -> set[str]:
    proto = onnx.load(str(path), load_external_data=False)
    return {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}


def _close(y: np.ndarray, ref: np.ndarray) -> bool:
    return bool(np.allclose(y, ref, rtol=0.05, atol=0.05 * float(np.abs(ref).max())))


@pytest.fixture()
def ext_model(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    return _save_external(_mlp([(64, 32), (32, 8)]), folder / "m.onnx")


# --------------------------------------------------------------------------------------------
# locations that escape the model folder


@pytest.mark.parametrize(
    ("location", "msg"),
    [
        ("../x.data", "escapes the model folder"),
        ("../../etc/passwd", "escapes the model folder"),
        ("sub/../../x.data", "escapes the model folder"),
        ("/etc/passwd", "escapes the model folder"),
        ("", "empty or malformed"),
        ("a\x00b", "empty or malformed"),
        ("link.data", "through a link"),
        ("missing.data", "not found beside the model"),
    ],
)
def test_external_locations_outside_the_folder_are_refused(ext_model: Path, location: str, msg: str) -> None:
    folder = ext_model.parent
    (folder.parent / "x.data").write_bytes(b"\0" * 4096)
    (folder / "link.data").symlink_to(folder.parent / "x.data")
    proto = onnx.load(str(ext_model), load_external_data=False)
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    with pytest.raises(ModelLoadError, match=msg):
        _check_external_locations(proto, folder)
    bad = folder / "bad.onnx"
    onnx.save(proto, str(bad))
    with pytest.raises(ModelLoadError, match=msg):
        load_model(bad)
    with pytest.raises(ModelLoadError, match=msg):
        load_proto(bad)


def test_external_location_in_a_subfolder_is_fine(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    path = _save_external(_mlp([(8, 4)]), tmp_path / "m.onnx", location="weights/m.bin")
    proto = onnx.load(str(path), load_external_data=False)
    _check_external_locations(proto, tmp_path)
    assert load_model(path).graph.initializers["w0"].const_value.numpy().shape == (8, 4)


# --------------------------------------------------------------------------------------------
# load → rewrite → save


def test_apply_reads_external_data_and_writes_a_self_contained_model(ext_model: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out" / "m.int8.onnx"  # another folder: the output must not refer to the input's data
    assert main(["apply", str(ext_model), "--uniform", "int8", "-o", str(out), "-q"]) == 0, capsys.readouterr().err
    assert _locations(out) == set()
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    x = RNG.standard_normal((5, 64)).astype(np.float32)
    assert _close(run(make_session(str(out)), {"x": x})["y"], run(make_session(str(ext_model)), {"x": x})["y"])


def test_memory_mapped_path_same_as_a_large_model(ext_model: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """Thresholds at 0: weights stay memory-mapped on load and the output gets its own data file."""
    monkeypatch.setattr(onnx_io, "INLINE_EXTERNAL_LIMIT", 0)
    monkeypatch.setattr(onnx_io, "EXTERNAL_THRESHOLD", 0)
    model = load_model(ext_model)
    assert all(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
    out = tmp_path / "out" / "m.lp.onnx"
    for fmt in ("int8", "fp32"):
        assert main(["apply", str(ext_model), "--uniform", fmt, "-o", str(out), "-q", "--force"]) == 0, (
            capsys.readouterr().err
        )
        assert _locations(out) == {"m.lp.onnx.data"}
        assert sorted(p.name for p in out.parent.iterdir()) == ["m.lp.onnx", "m.lp.onnx.data", "m.lp.plan.json"]
        onnx.checker.check_model(str(out), full_check=True)
        x = RNG.standard_normal((3, 64)).astype(np.float32)
        assert _close(run(make_session(str(out)), {"x": x})["y"], run(make_session(str(ext_model)), {"x": x})["y"])
    reloaded = load_model(out)  # and it loads back, lazily
    assert reloaded.graph.initializers["w0"].const_value.numpy().shape == (64, 32)


def test_eval_and_compile_on_an_external_data_model(ext_model: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "c.onnx"
    code = main(["compile", str(ext_model), "--budget", "8", "-o", str(out), "--probes", "2", "-q"])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["eval", str(out), "--reference", str(ext_model), "--synthetic", "--json", "-q"]) == 0, (
        capsys.readouterr().err
    )


def test_synthetic_inputs_for_a_memory_mapped_model_from_another_folder(
    ext_model: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """No --calib: the input sizes are probed in ONNX Runtime, which must find the weights' data file
    (a session from bytes would look for it in the working directory)."""
    monkeypatch.setattr(onnx_io, "INLINE_EXTERNAL_LIMIT", 0)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    model = load_model(ext_model)
    assert external_tensors(model)
    x = RNG.standard_normal((2, 64)).astype(np.float32)
    assert _close(run(make_session(model), {"x": x})["y"], run(make_session(str(ext_model)), {"x": x})["y"])
    out = tmp_path / "c.onnx"
    # (a model whose weights stay in their file is one above the streaming threshold: --stream on)
    code = main(["compile", str(ext_model), "--budget", "8", "-o", str(out), "--probes", "2", "--stream", "on", "-q"])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in elsewhere.iterdir()) == []


def test_save_model_inline_materialises_external_tensors(ext_model: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(onnx_io, "INLINE_EXTERNAL_LIMIT", 0)
    model = load_model(ext_model)
    out = tmp_path / "inline.onnx"
    assert save_model(model, out) is None
    assert _locations(out) == set()
    # the in-memory model still reads from the input file (save does not change it)
    assert isinstance(model.graph.initializers["w0"].const_value, ir.ExternalTensor)


def test_save_failure_leaves_no_files_and_keeps_the_old_output(tmp_path: Path, monkeypatch) -> None:
    model = ir.from_proto(_mlp([(8, 4)]))
    out = tmp_path / "o.onnx"
    save_model(model, out)
    before = out.read_bytes()

    def boom(*args: object, **kwargs: object) -> None:
        Path(args[1]).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_io.ir, "save", boom)
    for external in (False, True):
        with pytest.raises(KeyboardInterrupt):
            save_model(model, out, external=external)
        assert out.read_bytes() == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["o.onnx"]


def test_save_into_an_unwritable_place_is_an_lperror(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(LpError, match="cannot write"):
        save_model(ir.from_proto(_mlp([(8, 4)])), blocker / "o.onnx")  # parent is a file


# --------------------------------------------------------------------------------------------
# the real thing: weights beyond the protobuf limit


@pytest.mark.slow
def test_model_over_2gb(tmp_path: Path, capsys) -> None:
    """4 MatMuls, 2.2 GB of fp32 weights: load (memory-mapped), rewrite to int8 and fp32, save, run."""
    free = shutil.disk_usage(tmp_path).free
    if free < 12 * 2**30:
        pytest.skip(f"needs ~12 GB of free disk, {free / 2**30:.1f} GB free")
    k = 13_568  # 3 × k² fp32 = 2.21 GB
    weights = []
    for i in range(3):
        block = (RNG.standard_normal((256, 256)) * (1 + 0.1 * i) / np.sqrt(k)).astype(np.float32)
        weights.append(np.ascontiguousarray(np.tile(block, (k // 256 + 1, k // 256 + 1))[:k, :k]))
    weights.append((RNG.standard_normal((k, 64)) / np.sqrt(k)).astype(np.float32))
    assert sum(w.nbytes for w in weights) > onnx_io.PROTOBUF_LIMIT
    src = tmp_path / "big.onnx"
    ir.save(_big_ir_model(weights), src, external_data="big.onnx.data")
    del weights
    x = RNG.standard_normal((2, k)).astype(np.float32)
    ref = run(make_session(str(src)), {"x": x})["y"]

    for fmt, external in (("int8", False), ("fp32", True)):
        out = tmp_path / f"big.{fmt}.onnx"
        code = main(["apply", str(src), "--uniform", fmt, "-o", str(out), "-q"])
        assert code == 0, capsys.readouterr().err
        assert (_locations(out) == {out.name + ".data"}) is external
        onnx.checker.check_model(str(out))
        y = run(make_session(str(out)), {"x": x})["y"]
        assert _close(y, ref)
        if fmt == "fp32":
            np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))
        for p in tmp_path.glob(f"big.{fmt}.*"):
            os.remove(p)


def _big_ir_model(weights: list[np.ndarray]) -> ir.Model:
    x = ir.Value(name="x", shape=ir.Shape(["N", weights[0].shape[0]]), type=ir.TensorType(ir.DataType.FLOAT))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 17}, name="g")
    prev = x
    for i, w in enumerate(weights):
        wv = ir.Value(
            name=f"w{i}",
            shape=ir.Shape(w.shape),
            type=ir.TensorType(ir.DataType.FLOAT),
            const_value=ir.Tensor(w, name=f"w{i}"),
        )
        graph.register_initializer(wv)
        node = ir.Node("", "MatMul", [prev, wv], name=f"fc{i}", num_outputs=1)
        graph.append(node)
        prev = node.outputs[0]
        prev.name = "y" if i == len(weights) - 1 else f"h{i}"
        prev.dtype = ir.DataType.FLOAT
    prev.shape = ir.Shape(["N", weights[-1].shape[1]])
    graph.outputs.append(prev)
    return ir.Model(graph, ir_version=8)
