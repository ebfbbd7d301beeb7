"""``lpcompile run`` on big inputs (issue 15): refused from the headers in one line, or streamed in batches.

* Inputs over ``--max-input-mb`` end with one line and exit 1 before the module loads or any array inflates.
* ``--batch-size`` reads the ``.npz`` a batch at a time (stored and deflated members, big-endian
  arrays) and gives the outputs and the ONNX Runtime comparison of the whole run.
* :func:`iter_npz_batches` against ``np.load`` as the reference, and its one-line refusals.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from lpcompile.cli import main
from lpcompile.frontend.npz_safe import NpzError, iter_npz_batches

ROOT = Path(__file__).resolve().parent.parent
MLP = ROOT / "examples" / "models" / "digits_mlp.onnx"


def _cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    got = capsys.readouterr()
    return code, got.out, got.err


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "internal error" not in err, err
    return lines[0]


# --- iter_npz_batches -------------------------------------------------------------------------


@pytest.mark.parametrize("compressed", [False, True])
def test_batches_equal_the_whole_arrays(tmp_path: Path, compressed: bool) -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((11, 3, 4)).astype(np.float32)
    b = rng.integers(-5, 5, size=(11, 2)).astype(">i4")  # big-endian comes back native
    path = tmp_path / "x.npz"
    (np.savez_compressed if compressed else np.savez)(path, a=a, b=b)
    got = list(iter_npz_batches(path, ["a", "b"], 4))
    assert [g["a"].shape[0] for g in got] == [4, 4, 3]
    np.testing.assert_array_equal(np.concatenate([g["a"] for g in got]), a)
    np.testing.assert_array_equal(np.concatenate([g["b"] for g in got]), b.astype(np.int32))
    assert all(g["b"].dtype.isnative for g in got)


def test_batch_larger_than_the_file(tmp_path: Path) -> None:
    a = np.arange(6, dtype=np.float64).reshape(3, 2)
    np.savez(tmp_path / "x.npz", a=a)
    (only,) = list(iter_npz_batches(tmp_path / "x.npz", ["a"], 100))
    np.testing.assert_array_equal(only["a"], a)


def _npz_with_header_only(path: Path, shape: tuple[int, ...], fortran: bool = False) -> None:
    """An .npz whose one member promises ``shape`` float32 but holds data for it (small shapes only)."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.zeros(shape, np.float32, order="F" if fortran else "C"))
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a.npy", buf.getvalue())


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("rows differ", "different numbers of rows"),
        ("fortran", "Fortran-ordered"),
        ("scalar", "scalar"),
        ("missing", "no array named"),
        ("over budget", "may take at most"),
        ("zero batch", "at least 1"),
    ],
)
def test_batch_refusals_are_one_line(tmp_path: Path, case: str, needle: str) -> None:
    path = tmp_path / "x.npz"
    names, batch, cap = ["a", "b"], 2, None
    if case == "rows differ":
        np.savez(path, a=np.zeros((3, 2)), b=np.zeros((4, 2)))
    elif case == "fortran":
        _npz_with_header_only(path, (5, 3), fortran=True)
        names = ["a"]
    elif case == "scalar":
        np.savez(path, a=np.float32(1), b=np.zeros(3))
    elif case == "missing":
        np.savez(path, a=np.zeros((3, 2)))
    elif case == "over budget":
        np.savez(path, a=np.zeros((1000, 100), np.float32), b=np.zeros((1000, 1), np.float32))
        batch, cap = 500, 1000
    else:
        np.savez(path, a=np.zeros((3, 2)), b=np.zeros((3, 2)))
        batch = 0
    with pytest.raises(NpzError) as err:
        list(iter_npz_batches(path, names, batch, max_bytes=cap))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_truncated_member_is_one_error(tmp_path: Path) -> None:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ones((10, 4), np.float32))
    data = buf.getvalue()
    path = tmp_path / "x.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a.npy", data[: len(data) - 24])  # the last rows are missing
    with pytest.raises(NpzError):
        list(iter_npz_batches(path, ["a"], 3))


# --- lpcompile run ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dynamic_module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The int8 digits MLP lowered for LLVM with its batch dimension left dynamic."""
    pytest.importorskip("tvm")
    d = tmp_path_factory.mktemp("run_inputs")
    assert main(["apply", str(MLP), "--uniform", "int8", "-o", str(d / "q.onnx"), "-q"]) == 0
    assert main(["lower", str(d / "q.onnx"), "--target", "llvm", "-o", str(d / "q.so"), "-q"]) == 0
    return d


def _pixels(n: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((n, 8, 8)) * 16).astype(np.float32)


@pytest.mark.tvm
def test_input_over_the_limit_is_refused_from_the_header(
    dynamic_module: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    np.savez(tmp_path / "x.npz", pixels=_pixels(4096))  # 1 MiB of pixels
    lib, inputs = dynamic_module / "q.so", tmp_path / "x.npz"
    code, out, err = _cli(capsys, "run", lib, "--inputs", inputs, "--max-input-mb", "0.5")
    line = _one_line(err)
    assert code == 1 and out == ""
    assert "--batch-size" in line and "--max-input-mb" in line and "1 MiB" in line, line
    # the same file within one batch's limit runs
    code, _, err = _cli(
        capsys, "run", dynamic_module / "q.so", "--inputs", tmp_path / "x.npz", "--max-input-mb", "0.5",
        "--batch-size", "1024", "-q",
    )  # fmt: skip
    assert code == 0, err


@pytest.mark.tvm
def test_batches_give_the_whole_run(dynamic_module: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    np.savez_compressed(tmp_path / "x.npz", pixels=_pixels(37))
    lib = dynamic_module / "q.so"
    whole, batched = tmp_path / "whole.npz", tmp_path / "batched.npz"
    code, _, err = _cli(capsys, "run", lib, "--inputs", tmp_path / "x.npz", "-o", whole, "-q")
    assert code == 0, err
    code, _, err = _cli(
        capsys, "run", lib, "--inputs", tmp_path / "x.npz", "-o", batched, "--batch-size", "8",
        "--reference", dynamic_module / "q.onnx", "--json", "-q",
    )  # fmt: skip
    assert code == 0, err
    a, b = np.load(whole)["logits"], np.load(batched)["logits"]
    assert a.shape == b.shape == (37, 10)
    np.testing.assert_array_equal(a, b)


@pytest.mark.tvm
def test_batched_reference_matches_the_whole_comparison(
    dynamic_module: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    np.savez(tmp_path / "x.npz", pixels=_pixels(20, seed=3))
    lib, ref = dynamic_module / "q.so", dynamic_module / "q.onnx"
    reports = []
    for extra in ([], ["--batch-size", "6"]):
        code, out, err = _cli(capsys, "run", lib, "--inputs", tmp_path / "x.npz", "--reference", ref, "--json", *extra)
        assert code == 0, err
        reports.append(json.loads(out)["reference"]["logits"])
    whole, batched = reports
    assert batched["max_abs_ref"] == pytest.approx(whole["max_abs_ref"], rel=1e-6)
    assert batched["max_abs_diff"] == pytest.approx(whole["max_abs_diff"], rel=1e-3, abs=1e-5)
    assert whole["max_abs_diff"] < 1e-3 * whole["max_abs_ref"]


@pytest.mark.tvm
@pytest.mark.parametrize(("flag", "value"), [("--batch-size", "0"), ("--max-input-mb", "0"), ("--max-input-mb", "nan")])
def test_bad_limits_are_usage_errors(
    dynamic_module: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str
) -> None:
    np.savez(tmp_path / "x.npz", pixels=_pixels(2))
    code, _, err = _cli(capsys, "run", dynamic_module / "q.so", "--inputs", tmp_path / "x.npz", flag, value)
    _one_line(err)
    assert code == 2


@pytest.mark.tvm
def test_fixed_batch_module_needs_its_batch(
    tmp_path: Path, dynamic_module: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lib = tmp_path / "s.so"
    assert main(["lower", str(dynamic_module / "q.onnx"), "--target", "llvm", "-o", str(lib), "-q",
                 "--shape", "pixels=4,8,8"]) == 0  # fmt: skip
    np.savez(tmp_path / "x.npz", pixels=_pixels(12))
    code, _, err = _cli(capsys, "run", lib, "--inputs", tmp_path / "x.npz", "--batch-size", "5")
    assert code == 2 and "--batch-size must be 4" in _one_line(err)
    code, out, err = _cli(capsys, "run", lib, "--inputs", tmp_path / "x.npz", "--batch-size", "4", "--json")
    assert code == 0, err
    assert json.loads(out)["outputs"] == {"logits": [12, 10]}
