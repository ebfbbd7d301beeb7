"""Pipeline safety (issue 15): no input ever lost, every failure one line, bounded inputs, clean signals.

* Every writing command with an output aimed at each of its inputs and their external data,
  directly and through a symlink, exits 2 with one line and leaves every file byte-identical.
* SIGINT during the first seconds and SIGTERM while an output is being written end with exit
  130 / 143, one line, no traceback and no leftover file (temp, lock, backup or half output).
* The inputs that used to end in "internal error" get one line and exit 1 or 2.
* An inflating ``.npz`` is refused from its header, in one line, with little memory.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lpcompile.cli import main
from lpcompile.errors import LpError, UsageError
from lpcompile.io_utils import (
    OutputSession,
    atomic_write_text,
    check_activation_scales,
    check_outputs,
    check_plan_limits,
    external_data_locations,
    read_json_bounded,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "models"
PACKAGE_DIR = str(Path(__file__).resolve().parents[1] / "lpcompile")
MLP = EXAMPLES / "digits_mlp.onnx"
CALIB = EXAMPLES / "digits_calib.npz"
FAST = ["--probes", "1", "--max-samples", "8", "--batch-size", "8"]


# --------------------------------------------------------------------------------------------
# helpers


def _snapshot(folder: Path) -> dict[str, str]:
    """name -> sha256 of every regular file, or 'link:TARGET' for symlinks (dot files included)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = f"link:{os.readlink(p)}"
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "internal error" not in err, err
    return lines[0]


def _external_copy(src: Path, dest: Path, location: str) -> Path:
    """``src`` saved as ``dest`` with every initializer in the external file ``location``."""
    model = onnx.load(str(src))
    onnx.save(
        model, str(dest), save_as_external_data=True, all_tensors_to_one_file=True, location=location, size_threshold=0
    )
    return dest


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Inputs made once: a plan, a sensitivity table, and (with TVM) a lowered module."""
    d = tmp_path_factory.mktemp("built")
    shutil.copy(MLP, d / "m.onnx")
    shutil.copy(CALIB, d / "c.npz")
    assert main(["apply", str(d / "m.onnx"), "--uniform", "int8", "-o", str(d / "q.onnx"), "-q"]) == 0
    assert (
        main(["analyze", str(d / "m.onnx"), "--calib", str(d / "c.npz"), *FAST, "-o", str(d / "s.sens.json"), "-q"])
        == 0
    )
    return d


@pytest.fixture()
def work(tmp_path: Path, built: Path) -> Path:
    shutil.copy(MLP, tmp_path / "m.onnx")
    _external_copy(MLP, tmp_path / "e.onnx", "e.onnx.data")
    _external_copy(MLP, tmp_path / "f.onnx", "y.onnx.data")  # `-o y.onnx` would write y.onnx.data
    _external_copy(MLP, tmp_path / "z.onnx", "z.format.json")  # view's overlay name is z's data file
    shutil.copy(CALIB, tmp_path / "c.npz")
    shutil.copy(CALIB, tmp_path / "k.plan.json")  # calibration named like apply's plan output for -o k.onnx
    shutil.copy(built / "q.plan.json", tmp_path / "p.plan.json")
    shutil.copy(built / "q.plan.json", tmp_path / "m.format.json")  # a plan named like view's overlay
    shutil.copy(built / "s.sens.json", tmp_path / "s.sens.json")
    shutil.copy(built / "q.onnx", tmp_path / "q.onnx")
    (tmp_path / "link_m.onnx").symlink_to("m.onnx")
    (tmp_path / "link_data").symlink_to("e.onnx.data")
    (tmp_path / "link_calib.npz").symlink_to("c.npz")
    (tmp_path / "link_plan.json").symlink_to("p.plan.json")
    (tmp_path / "link_sens.json").symlink_to("s.sens.json")
    return tmp_path


# --------------------------------------------------------------------------------------------
# outputs aimed at inputs

Case = Callable[[Path], list[str]]

OUTPUT_CASES: dict[str, Case] = {
    # apply
    "apply -o model": lambda d: ["apply", d / "m.onnx", "--uniform", "int8", "-o", d / "m.onnx"],
    "apply -o model --force": lambda d: ["apply", d / "m.onnx", "--uniform", "int8", "-o", d / "m.onnx", "--force"],
    "apply -o symlink to model": lambda d: ["apply", d / "m.onnx", "--uniform", "int8", "-o", d / "link_m.onnx"],
    "apply -o external data": lambda d: ["apply", d / "e.onnx", "--uniform", "int8", "-o", d / "e.onnx.data"],
    "apply -o symlink to external data": lambda d: ["apply", d / "e.onnx", "--uniform", "int8", "-o", d / "link_data"],
    "apply -o whose .data is the input's data": lambda d: [
        "apply",
        d / "f.onnx",
        "--uniform",
        "int8",
        "-o",
        d / "y.onnx",
    ],
    "apply -o calib": lambda d: [
        "apply",
        d / "m.onnx",
        "--uniform",
        "fp8_e4m3",
        "--calib",
        d / "c.npz",
        "-o",
        d / "c.npz",
    ],
    "apply -o symlink to calib": lambda d: [
        "apply",
        d / "m.onnx",
        "--uniform",
        "int8",
        "--calib",
        d / "c.npz",
        "-o",
        d / "link_calib.npz",
    ],
    "apply plan beside -o is calib": lambda d: [
        "apply",
        d / "m.onnx",
        "--uniform",
        "int8",
        "--calib",
        d / "k.plan.json",
        "-o",
        d / "k.onnx",
    ],
    "apply -o plan input": lambda d: ["apply", d / "m.onnx", d / "p.plan.json", "-o", d / "p.plan.json"],
    "apply -o symlink to plan": lambda d: ["apply", d / "m.onnx", d / "p.plan.json", "-o", d / "link_plan.json"],
    # compile
    "compile -o model": lambda d: ["compile", d / "m.onnx", "--budget", "6", *FAST, "-o", d / "m.onnx"],
    "compile -o external data": lambda d: ["compile", d / "e.onnx", "--budget", "6", *FAST, "-o", d / "e.onnx.data"],
    "compile -o symlink to data": lambda d: ["compile", d / "e.onnx", "--budget", "6", *FAST, "-o", d / "link_data"],
    "compile --report model": lambda d: [
        "compile",
        d / "m.onnx",
        "--budget",
        "6",
        *FAST,
        "-o",
        d / "o.onnx",
        "--report",
        d / "m.onnx",
    ],
    "compile --report calib": lambda d: [
        "compile",
        d / "m.onnx",
        "--budget",
        "6",
        *FAST,
        "--calib",
        d / "c.npz",
        "-o",
        d / "o.onnx",
        "--report",
        d / "link_calib.npz",
    ],
    "compile --report = -o": lambda d: [
        "compile",
        d / "m.onnx",
        "--budget",
        "6",
        *FAST,
        "-o",
        d / "o.onnx",
        "--report",
        d / "o.onnx",
    ],
    "compile --report = plan of -o": lambda d: [
        "compile",
        d / "m.onnx",
        "--budget",
        "6",
        *FAST,
        "-o",
        d / "o.onnx",
        "--report",
        d / "o.plan.json",
    ],
    # analyze
    "analyze -o model": lambda d: ["analyze", d / "m.onnx", *FAST, "-o", d / "m.onnx"],
    "analyze -o external data": lambda d: ["analyze", d / "e.onnx", *FAST, "-o", d / "e.onnx.data"],
    "analyze -o calib": lambda d: ["analyze", d / "m.onnx", *FAST, "--calib", d / "c.npz", "-o", d / "c.npz"],
    "analyze -o symlink to model": lambda d: ["analyze", d / "m.onnx", *FAST, "-o", d / "link_m.onnx"],
    # plan
    "plan -o sensitivity": lambda d: ["plan", d / "s.sens.json", "--budget", "6", "-o", d / "s.sens.json"],
    "plan -o symlink to sensitivity": lambda d: [
        "plan",
        d / "s.sens.json",
        "--budget",
        "6",
        "-o",
        d / "link_sens.json",
    ],
    # report
    "report -o plan": lambda d: ["report", d / "p.plan.json", "-o", d / "p.plan.json"],
    "report -o sensitivity": lambda d: [
        "report",
        d / "p.plan.json",
        "--sensitivity",
        d / "s.sens.json",
        "-o",
        d / "s.sens.json",
    ],
    "report -o symlink to plan": lambda d: ["report", d / "p.plan.json", "-o", d / "link_plan.json"],
    # view (the overlays are its outputs)
    "view overlay = --plan": lambda d: [
        "view",
        d / "m.onnx",
        "--viewer",
        "netron",
        "--no-browser",
        "--plan",
        d / "m.format.json",
        "--timeout",
        "1",
    ],
    "view overlay = model's external data": lambda d: [
        "view",
        d / "z.onnx",
        "--viewer",
        "netron",
        "--no-browser",
        "--timeout",
        "1",
    ],
}


@pytest.mark.parametrize("case", sorted(OUTPUT_CASES))
def test_output_aimed_at_an_input_is_refused(work: Path, case: str, capsys: pytest.CaptureFixture[str]) -> None:
    if case.startswith("view"):
        pytest.importorskip("netron")
    before = _snapshot(work)
    code, err = _cli(capsys, *OUTPUT_CASES[case](work), "-q")
    line = _one_line(err)
    assert code == 2, err
    assert "output" in line and ("input" in line or "same file" in line), line
    assert _snapshot(work) == before, "an input changed or a file was left behind"


@pytest.fixture(scope="module")
def lowered(built: Path) -> Path:
    """A module lowered for LLVM from the int8 model, with its .meta.json and an inputs file."""
    pytest.importorskip("tvm")
    lib = built / "q.so"
    assert (
        main(["lower", str(built / "q.onnx"), "--target", "llvm", "-o", str(lib), "-q", "--shape", "pixels=2,8,8"]) == 0
    )
    np.savez(built / "x.npz", pixels=np.zeros((2, 8, 8), np.float32))
    return lib


@pytest.fixture()
def tvm_work(tmp_path: Path, lowered: Path) -> Path:
    for name in ("q.so", "q.so.meta.json", "x.npz", "q.onnx"):
        shutil.copy(lowered.parent / name, tmp_path / name)
    _external_copy(lowered.parent / "q.onnx", tmp_path / "qe.onnx", "qe.onnx.data")
    (tmp_path / "link_x.npz").symlink_to("x.npz")
    (tmp_path / "link_q.onnx").symlink_to("q.onnx")
    return tmp_path


TVM_CASES: dict[str, Case] = {
    "lower -o model": lambda d: ["lower", d / "q.onnx", "--target", "llvm", "-o", d / "q.onnx"],
    "lower -o symlink to model": lambda d: ["lower", d / "q.onnx", "--target", "llvm", "-o", d / "link_q.onnx"],
    "lower -o external data": lambda d: ["lower", d / "qe.onnx", "--target", "llvm", "-o", d / "qe.onnx.data"],
    "run -o module": lambda d: ["run", d / "q.so", "--inputs", d / "x.npz", "-o", d / "q.so"],
    "run -o meta": lambda d: ["run", d / "q.so", "--inputs", d / "x.npz", "-o", d / "q.so.meta.json"],
    "run -o inputs": lambda d: ["run", d / "q.so", "--inputs", d / "x.npz", "-o", d / "x.npz"],
    "run -o symlink to inputs": lambda d: ["run", d / "q.so", "--inputs", d / "x.npz", "-o", d / "link_x.npz"],
    "run -o reference": lambda d: [
        "run",
        d / "q.so",
        "--inputs",
        d / "x.npz",
        "--reference",
        d / "q.onnx",
        "-o",
        d / "q.onnx",
    ],
    "run -o reference's data": lambda d: [
        "run",
        d / "q.so",
        "--inputs",
        d / "x.npz",
        "--reference",
        d / "qe.onnx",
        "-o",
        d / "qe.onnx.data",
    ],
}


@pytest.mark.tvm
@pytest.mark.parametrize("case", sorted(TVM_CASES))
def test_lower_and_run_outputs_aimed_at_inputs(tvm_work: Path, case: str, capsys: pytest.CaptureFixture[str]) -> None:
    before = _snapshot(tvm_work)
    code, err = _cli(capsys, *TVM_CASES[case](tvm_work), "-q")
    _one_line(err)
    assert code == 2, err
    assert _snapshot(tvm_work) == before


def test_device_nodes_and_directories_are_never_outputs(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = _snapshot(work)
    for target in ("/dev/null", str(work)):
        code, err = _cli(capsys, "apply", work / "m.onnx", "--uniform", "int8", "-o", target, "-q")
        assert code == 2 and ("regular file" in err or "directory" in err), err
        _one_line(err)
    fifo = work / "fifo"
    os.mkfifo(fifo)
    code, err = _cli(capsys, "report", work / "p.plan.json", "-o", fifo, "-q")
    assert code == 2 and "regular file" in _one_line(err)
    assert Path("/dev/null").is_char_device()
    assert not Path("/dev/null.plan.json").exists()
    fifo.unlink()
    assert _snapshot(work) == before


def test_previous_output_is_replaced(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = work / "o.onnx"
    for fmt in ("int8", "int4"):
        code, err = _cli(capsys, "apply", work / "m.onnx", "--uniform", fmt, "-o", out, "-q")
        assert code == 0, err
    assert json.loads((work / "o.plan.json").read_text())["nodes"][0]["format"].startswith("int4")
    assert not [p.name for p in work.iterdir() if p.name.startswith(".")]


def test_external_data_locations_found_without_loading_weights(work: Path) -> None:
    assert external_data_locations(work / "e.onnx") == ["e.onnx.data"]
    assert external_data_locations(work / "m.onnx") == []
    assert external_data_locations(work / "c.npz") == []  # not ONNX: nothing, no error


def test_library_guard_refuses_inputs_and_duplicate_outputs(work: Path) -> None:
    with pytest.raises(UsageError, match="input"):
        check_outputs([work / "link_data"], [work / "e.onnx"])
    with pytest.raises(UsageError, match="same file"):
        check_outputs([work / "a.json", work / "b" / ".." / "a.json"], [])
    assert check_outputs([work / "new.onnx"], [work / "e.onnx"]) == [(work / "new.onnx").resolve()]


# --------------------------------------------------------------------------------------------
# outputs committed together


def test_session_commits_all_or_nothing(tmp_path: Path) -> None:
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("old a")
    with pytest.raises(RuntimeError), OutputSession(inputs=[]):
        atomic_write_text(a, "new a")
        atomic_write_text(b, "new b")
        assert a.read_text() == "old a" and not b.exists()  # deferred: nothing visible yet
        raise RuntimeError("disk full")
    assert a.read_text() == "old a" and not b.exists()
    with OutputSession(inputs=[]):
        atomic_write_text(a, "new a")
        atomic_write_text(b, "new b")
    assert a.read_text() == "new a" and b.read_text() == "new b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]


def test_immediate_session_rolls_back(tmp_path: Path) -> None:
    """defer=False (apply/compile): files appear at once, and an exception restores the previous ones."""
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("old a")
    with pytest.raises(KeyboardInterrupt), OutputSession(inputs=[], defer=False):
        atomic_write_text(a, "new a")
        atomic_write_text(b, "new b")
        assert a.read_text() == "new a" and b.read_text() == "new b"
        raise KeyboardInterrupt
    assert a.read_text() == "old a" and not b.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_plan_write_failure_leaves_no_model(
    work: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Disk full while writing the plan: the model written just before is removed again."""
    from lpcompile.plan import PrecisionPlan

    def full(self: object, path: object) -> None:
        raise LpError(f"cannot write {path}: No space left on device")

    monkeypatch.setattr(PrecisionPlan, "save", full)
    before = _snapshot(work)
    code, err = _cli(capsys, "apply", work / "m.onnx", "--uniform", "int8", "-o", work / "o.onnx", "-q")
    assert code == 1 and "No space left" in _one_line(err)
    assert _snapshot(work) == before


def test_a_second_writer_of_the_same_output_is_refused(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lpcompile.io_utils import acquire_lock

    out = work / "o.onnx"
    lock = acquire_lock(out.resolve())  # another process writing o.onnx holds this
    try:
        code, err = _cli(capsys, "apply", work / "m.onnx", "--uniform", "int8", "-o", out, "-q")
    finally:
        lock.release()
    assert code == 1 and "another lpcompile process" in _one_line(err)
    assert not out.exists()
    code, err = _cli(capsys, "apply", work / "m.onnx", "--uniform", "int8", "-o", out, "-q")
    assert code == 0, err
    assert not [p.name for p in work.iterdir() if p.name.startswith(".")]


def test_output_files_respect_the_umask(work: Path, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    from lpcompile.frontend import onnx_io

    monkeypatch.setattr(onnx_io, "EXTERNAL_THRESHOLD", 0)  # the output gets its own external-data file
    old = os.umask(0o022)
    try:
        code, err = _cli(capsys, "apply", work / "e.onnx", "--uniform", "int8", "-o", work / "o.onnx", "-q")
    finally:
        os.umask(old)
    assert code == 0, err
    for name in ("o.onnx", "o.onnx.data", "o.plan.json"):
        assert (work / name).stat().st_mode & 0o777 == 0o644, name


# --------------------------------------------------------------------------------------------
# inputs that used to end in "internal error"


def _write_npz_member(path: Path, name: str, header: dict, payload: bytes = b"") -> None:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}.npy", buf.getvalue() + payload)


def test_big_endian_calibration_is_read(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = dict(np.load(CALIB))
    np.savez(work / "be.npz", **{k: v.astype(v.dtype.newbyteorder(">")) for k, v in data.items()})
    code, err = _cli(
        capsys, "analyze", work / "m.onnx", "--calib", work / "be.npz", *FAST, "-o", work / "s2.json", "-q"
    )
    assert code == 0, err
    assert (work / "s2.json").is_file()


def test_huge_shape_header_is_one_line(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_npz_member(
        work / "huge.npz",
        "pixels",
        {"descr": "<f4", "fortran_order": False, "shape": (10**12 // 64, 8, 8)},
        b"\0" * 1000,
    )
    before = _snapshot(work)
    code, err = _cli(
        capsys, "analyze", work / "m.onnx", "--calib", work / "huge.npz", *FAST, "-o", work / "s2.json", "-q"
    )
    assert code == 1 and "pixels" in _one_line(err)
    assert _snapshot(work) == before


def test_pickled_and_malformed_arrays_are_one_line(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_npz_member(work / "obj.npz", "pixels", {"descr": "|O", "fortran_order": False, "shape": (2,)}, b"x" * 64)
    (work / "bad.npz").write_bytes(b"PK\x03\x04 not really a zip")
    for name in ("obj.npz", "bad.npz"):
        code, err = _cli(
            capsys, "analyze", work / "m.onnx", "--calib", work / name, *FAST, "-o", work / "s2.json", "-q"
        )
        assert code in (1, 2), err
        _one_line(err)


def test_deeply_nested_json_is_one_line(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    nested = work / "nested.json"
    nested.write_text("[" * 200_000 + "]" * 200_000)
    cases = [
        ["report", nested, "-o", work / "r.html"],
        ["report", work / "p.plan.json", "--sensitivity", nested, "-o", work / "r.html"],
        ["apply", work / "m.onnx", nested, "-o", work / "o.onnx"],
        ["plan", nested, "--budget", "6", "-o", work / "o.plan.json"],
    ]
    before = _snapshot(work)
    for args in cases:
        code, err = _cli(capsys, *args, "-q")
        assert code == 1, (args, err)
        _one_line(err)
    assert _snapshot(work) == before
    with pytest.raises(LpError, match="nested"):
        read_json_bounded(nested)


@pytest.mark.parametrize("command", ["apply", "analyze"])
def test_seed_out_of_range_is_a_usage_error(work: Path, command: str, capsys: pytest.CaptureFixture[str]) -> None:
    extra = ["--uniform", "int8"] if command == "apply" else FAST
    code, err = _cli(capsys, command, work / "m.onnx", *extra, "--seed", str(2**70), "-o", work / "o.out")
    assert code == 2 and "--seed" in _one_line(err)


def test_unwritable_output_folder_is_one_line(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """/proc refuses new files even to root: the stand-in for a read-only output folder."""
    for args in (
        ["apply", work / "m.onnx", "--uniform", "int8", "-o", "/proc/lpcompile-test/o.onnx"],
        ["report", work / "p.plan.json", "-o", "/proc/lpcompile-test.html"],
        ["apply", work / "m.onnx", "--uniform", "int8", "-o", work / "p.plan.json" / "o.onnx"],
    ):
        code, err = _cli(capsys, *args, "-q")
        assert code == 1, err
        assert "cannot" in _one_line(err)


@pytest.mark.tvm
def test_lower_emit_source_into_a_file_is_one_line(tvm_work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tvm_work / "src.txt").write_text("not a folder")
    before = _snapshot(tvm_work)
    code, err = _cli(
        capsys,
        "lower",
        tvm_work / "q.onnx",
        "--target",
        "llvm",
        "-o",
        tvm_work / "n.so",
        "--emit-source",
        tvm_work / "src.txt",
        "-q",
    )
    assert code == 2 and "--emit-source" in _one_line(err)
    assert _snapshot(tvm_work) == before  # no .so without its .meta.json


@pytest.mark.tvm
def test_compiled_module_is_checked_before_loading(tvm_work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lib, meta_path = tvm_work / "q.so", tvm_work / "q.so.meta.json"
    meta = json.loads(meta_path.read_text())
    assert meta["library"]["bytes"] == lib.stat().st_size
    assert meta["library"]["sha256"] == hashlib.sha256(lib.read_bytes()).hexdigest()
    code, err = _cli(capsys, "run", lib, "--inputs", tvm_work / "x.npz", "-q")
    assert code == 0, err

    def run_with(lib_bytes: bytes | None, meta_text: str | None) -> tuple[int, str]:
        t = tvm_work / "case"
        t.mkdir(exist_ok=True)
        (t / "m.so").write_bytes(lib_bytes if lib_bytes is not None else lib.read_bytes())
        (t / "m.so.meta.json").write_text(meta_text if meta_text is not None else meta_path.read_text())
        return _cli(capsys, "run", t / "m.so", "--inputs", tvm_work / "x.npz", "-q")

    full = lib.read_bytes()
    libz = next(
        (
            p
            for p in (Path("/lib/x86_64-linux-gnu/libz.so.1"), Path("/usr/lib/x86_64-linux-gnu/libz.so.1"))
            if p.is_file()
        ),
        None,
    )
    foreign_meta = None
    if libz is not None:
        z = libz.read_bytes()
        foreign_meta = json.dumps({**meta, "library": {"bytes": len(z), "sha256": hashlib.sha256(z).hexdigest()}})
    cases: list[tuple[str, bytes | None, str | None]] = [
        ("truncated", full[: len(full) // 2], None),  # used to die of SIGBUS
        ("modified", full[:-1] + bytes([full[-1] ^ 1]), None),
        ("not ELF", b"#!/bin/sh\necho hi\n" + full[18:], None),
        ("meta not JSON", None, "{not json"),
        ("meta nested", None, "[" * 100_000),
        ("meta wrong keys", None, json.dumps({"format": meta["format"], "target": "llvm"})),
        ("meta without hash", None, json.dumps({k: v for k, v in meta.items() if k != "library"})),
    ]
    if libz is not None:
        cases.append(("foreign library with its hash", libz.read_bytes(), foreign_meta))
    for name, lib_bytes, meta_text in cases:
        code, err = run_with(lib_bytes, meta_text)
        assert code == 1, (name, err)
        _one_line(err)


# --------------------------------------------------------------------------------------------
# limits


def test_plan_limits_are_linear_and_bounded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    nodes = [{"name": f"n{i}", "format": "int8"} for i in range(150_000)]
    check_plan_limits({"nodes": nodes})  # distinct names: accepted (one pass over a set)
    with pytest.raises(LpError, match="twice"):
        check_plan_limits({"nodes": [*nodes, {"name": "n5"}]})
    with pytest.raises(LpError, match="more than"):
        check_plan_limits({"nodes": nodes}, max_nodes=1000)
    with pytest.raises(LpError, match="name"):
        check_plan_limits({"nodes": [{"format": "int8"}]})
    big = tmp_path / "big.plan.json"
    big.write_text(json.dumps({"version": 1, "nodes": [{"name": f"n{i}", "format": "int8"} for i in range(10**6)]}))
    code, err = _cli(capsys, "report", big, "-o", tmp_path / "r.html", "-q")
    assert code == 1 and "1,000,000 nodes" in _one_line(err)
    shutil.copy(MLP, tmp_path / "m.onnx")
    code, err = _cli(capsys, "apply", tmp_path / "m.onnx", big, "-o", tmp_path / "o.onnx", "-q")
    assert code == 1 and "1,000,000 nodes" in _one_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.plan.json", "m.onnx"]


def test_files_in_a_calibration_folder_are_inputs(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = work / "calib_dir"
    folder.mkdir()
    shutil.copy(CALIB, folder / "a.npz")
    before = _snapshot(work)
    code, err = _cli(capsys, "analyze", work / "m.onnx", "--calib", folder, *FAST, "-o", folder / "a.npz", "-q")
    assert code == 2 and "input" in _one_line(err)
    assert _snapshot(work) == before


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), 1e-45, 1e39, "0.1", True])
def test_activation_scales_must_be_finite_positive_normal(bad: object) -> None:
    with pytest.raises(LpError, match="scale"):
        check_activation_scales({"x": bad})


def test_activation_scales_accept_normal_numbers() -> None:
    assert check_activation_scales({"x": 0.5, "y": 3}) == {"x": 0.5, "y": 3.0}


def _bomb(path: Path, rows: int) -> None:
    """An .npz whose one array (rows×8×8 float32 zeros) deflates to a small fraction of its size."""
    with (
        zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z,
        z.open("pixels.npy", "w", force_zip64=True) as f,
    ):
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (rows, 8, 8)})
        f.write(buf.getvalue())
        chunk = b"\0" * (rows * 256 // 16)
        for _ in range(16):
            f.write(chunk)


_MEASURE = (
    "import resource, subprocess, sys\n"
    "rc = subprocess.run(sys.argv[1:], check=False).returncode\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
    "sys.exit(rc)\n"
)


def _run_measured(cmd: list[str], env: dict[str, str]) -> tuple[int, str, int]:
    """Run ``cmd``; (exit code, stderr, peak RSS in KiB of that command alone).

    A small launcher process starts it: a child forked from this (large) test process would
    inherit its peak RSS in ``ru_maxrss``.
    """
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    *lines, peak = proc.stderr.rstrip("\n").split("\n")
    return proc.returncode, "\n".join(lines) + "\n", int(peak)


def test_inflating_npz_is_refused_from_its_header(tmp_path: Path) -> None:
    """A 256 MiB array in a ~256 KiB file, with a 64 MiB cap: refused in one line, small peak memory."""
    shutil.copy(MLP, tmp_path / "m.onnx")
    bomb = tmp_path / "bomb.npz"
    _bomb(bomb, 1 << 20)
    assert bomb.stat().st_size < 2 * 1024**2
    env = {**os.environ, "LPCOMPILE_MAX_ARRAY_BYTES": str(64 * 1024**2)}
    # without --max-samples: every row is asked for (with it, only those rows inflate: tests/test_bigmodel.py)
    fast = ["--probes", "1", "--batch-size", "8"]
    cmd = [sys.executable, "-m", "lpcompile", "analyze", str(tmp_path / "m.onnx"), "--calib", str(bomb), *fast]
    code, err, peak_kib = _run_measured([*cmd, "-o", str(tmp_path / "s.json"), "-q"], env)
    assert code == 1, err
    line = _one_line(err)
    assert "would take" in line and "LPCOMPILE_MAX_ARRAY_BYTES" in line
    assert peak_kib < 1024 * 1024, f"peak RSS {peak_kib} KiB"  # generous: < 1 GiB (the array alone is 256 MiB)
    from lpcompile.frontend.npz_safe import read_npz

    rows = read_npz(bomb, max_rows=16, max_bytes=64 * 1024**2)["pixels"]  # only the first rows inflate
    assert rows.shape == (16, 8, 8) and not rows.any()


# --------------------------------------------------------------------------------------------
# signals (subprocesses)


def _foreground_signals() -> None:
    """In the child: SIGINT/SIGTERM as a terminal's foreground job gets them (a background parent may ignore SIGINT)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _spawn(args: list[str], cwd: Path, setup: Callable[[], None] = _foreground_signals) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "lpcompile", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=setup,  # only resets signal dispositions
    )


def _check_stopped(proc: subprocess.Popen[str], folder: Path, before: dict[str, str], code: int) -> None:
    """Exit ``code`` (or 0 / death by the signal when it came after the outputs were committed, or
    before Python ran any lpcompile code), at most one line, no traceback, no temp/lock/backup file,
    the input unchanged, and the outputs either both complete or both absent."""
    _, err = proc.communicate(timeout=300)
    if ("Traceback" in err or "Fatal Python error" in err) and PACKAGE_DIR not in err:
        # the interpreter's own start-up (site-packages .pth files, runpy) before any lpcompile code
        # ran: Python reports that itself; nothing was written
        assert _snapshot(folder) == before
        return
    assert "Traceback" not in err, err
    assert len([ln for ln in err.splitlines() if ln.strip()]) <= 1, err
    assert proc.returncode in (0, code, -(code - 128)), (proc.returncode, err)
    if proc.returncode == code:
        assert err.strip() in ("lpcompile: interrupted", "lpcompile: terminated", ""), err
    after = _snapshot(folder)
    assert not [n for n in after if n.startswith(".")], after  # temp, lock and backup files
    assert after["m.onnx"] == before["m.onnx"]
    outputs = sorted(set(after) - set(before))
    assert outputs in ([], ["o.onnx", "o.plan.json"]), outputs
    if outputs:
        onnx.checker.check_model(str(folder / "o.onnx"), full_check=True)
        json.loads((folder / "o.plan.json").read_text())


def _signal_at(tmp_path: Path, delay: float, sig: signal.Signals) -> None:
    shutil.copy(MLP, tmp_path / "m.onnx")
    before = _snapshot(tmp_path)
    proc = _spawn(["apply", "m.onnx", "--uniform", "int8", "-o", "o.onnx", "-q"], tmp_path)
    time.sleep(delay)
    proc.send_signal(sig)
    _check_stopped(proc, tmp_path, before, 130 if sig == signal.SIGINT else 143)


@pytest.mark.parametrize("delay", [0.1, 0.4, 0.8, 1.3, 2.0, 3.0])
def test_sigint_in_the_first_seconds(tmp_path: Path, delay: float) -> None:
    _signal_at(tmp_path, delay, signal.SIGINT)


@pytest.mark.slow
@pytest.mark.parametrize("step", range(1, 31))
def test_sigint_every_tenth_of_a_second(tmp_path: Path, step: int) -> None:
    _signal_at(tmp_path, step / 10, signal.SIGINT)


def test_an_ignored_sigint_stays_ignored(tmp_path: Path) -> None:
    """``nohup`` / a shell's background job: SIGINT was ignored by the parent, so the run completes."""
    shutil.copy(MLP, tmp_path / "m.onnx")
    proc = _spawn(["apply", "m.onnx", "--uniform", "int8", "-o", "o.onnx", "-q"], tmp_path, _ignore_sigint)
    for _ in range(5):
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert (tmp_path / "o.onnx").is_file() and (tmp_path / "o.plan.json").is_file()


@pytest.mark.parametrize("delay", [0.3, 1.5])
def test_sigterm_in_the_first_seconds(tmp_path: Path, delay: float) -> None:
    _signal_at(tmp_path, delay, signal.SIGTERM)


def _big_model(path: Path, n: int = 4, dim: int = 1536) -> None:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((dim, dim)).astype(np.float32), f"w{i}") for i in range(n)]
    nodes = [
        helper.make_node(
            "MatMul", ["x" if i == 0 else f"h{i}", f"w{i}"], [f"h{i + 1}" if i < n - 1 else "y"], name=f"mm{i}"
        )
        for i in range(n)
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", dim])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), str(path))


def test_sigterm_while_writing_leaves_nothing(tmp_path: Path) -> None:
    """SIGTERM as soon as a temp file of the output appears: exit 143, one line, no temp/lock/half output."""
    _big_model(tmp_path / "big.onnx")
    before = _snapshot(tmp_path)
    proc = _spawn(["apply", "big.onnx", "--uniform", "fp32", "-o", "o.onnx", "-q"], tmp_path)
    deadline = time.monotonic() + 300
    seen = None
    while proc.poll() is None and time.monotonic() < deadline:
        seen = next((p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")), None)
        if seen:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.002)
    if seen is None:
        proc.communicate(timeout=300)
        pytest.skip("the write finished between two polls; no temp file was seen")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    assert _one_line(err) == "lpcompile: terminated"
    assert _snapshot(tmp_path) == before, "temp files or a half output were left behind"
