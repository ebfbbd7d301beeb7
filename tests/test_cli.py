"""The CLI end to end on the embedded example: apply/eval, and bad input handled in one line."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from lpcompile.cli import main
from lpcompile.runtime.ort import make_session, run

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "models"
MLP = EXAMPLES / "digits_mlp.onnx"
CALIB = EXAMPLES / "digits_calib.npz"
HELDOUT = EXAMPLES / "digits_heldout.npz"


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lpcompile.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def uniform_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("uniform")
    out = {}
    for fmt in ("bf16", "fp8_e4m3", "int8", "int4"):
        path = folder / f"mlp.{fmt}.onnx"
        # reference rounding: the error order of the formats themselves (GPTQ int4 beats FP8 on this MLP)
        args = ["apply", str(MLP), "--uniform", fmt, "-o", str(path), "--calib", str(CALIB), "--rounding", "nearest"]
        assert main([*args, "-q"]) == 0
        out[fmt] = path
    return out


def test_uniform_models_are_valid_and_error_is_ordered(uniform_models: dict[str, Path], capsys) -> None:
    errors = {}
    for fmt, path in uniform_models.items():
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
        capsys.readouterr()
        assert main(["eval", str(path), "--reference", str(MLP), "--calib", str(HELDOUT), "--json", "-q"]) == 0
        report = json.loads(capsys.readouterr().out)
        errors[fmt] = float(report["outputs"]["logits"]["sqnr_db"])
    # fp32 < bf16 < fp8/int8 < int4 in error, i.e. SQNR in the opposite order
    assert errors["bf16"] > errors["int8"] > errors["int4"]
    assert errors["bf16"] > errors["fp8_e4m3"] > errors["int4"]


def test_metadata_bits_equal_plan_and_int4_file_is_small(uniform_models: dict[str, Path]) -> None:
    path = uniform_models["int4"]
    plan = json.loads(path.with_name("mlp.int4.plan.json").read_text())
    bits = {n["name"]: n["bits"] for n in plan["nodes"]}
    model = onnx.load(str(path))
    seen = 0
    for node in model.graph.node:
        props = {p.key: p.value for p in node.metadata_props}
        if node.name in bits and "lpcompile.bits" in props:
            assert float(props["lpcompile.bits"]) == bits[node.name]
            seen += 1
    assert seen == len(bits)
    assert path.stat().st_size <= 0.2 * MLP.stat().st_size


def test_mixed_plan_applies(tmp_path: Path, uniform_models: dict[str, Path]) -> None:
    plan = json.loads(uniform_models["int8"].with_name("mlp.int8.plan.json").read_text())
    fmts = ["int4", "fp8_e4m3", "bf16", "int8"]
    for node, fmt in zip(plan["nodes"], fmts, strict=False):
        node["format"] = fmt
        node.pop("bits")
    plan_path = tmp_path / "mixed.plan.json"
    plan_path.write_text(json.dumps(plan))
    out = tmp_path / "mixed.onnx"
    assert main(["apply", str(MLP), str(plan_path), "-o", str(out), "--calib", str(CALIB), "-q"]) == 0
    x = np.load(HELDOUT)["pixels"][:16]
    y = run(make_session(str(out)), {"pixels": x})["logits"]
    y0 = run(make_session(str(MLP)), {"pixels": x})["logits"]
    assert y.shape == y0.shape and np.all(np.isfinite(y))
    assert (y.argmax(-1) == y0.argmax(-1)).mean() > 0.9
    # a hand-written plan (name + format only) comes back with the model's real figures
    minimal = {"version": 1, "nodes": [{"name": "fc0", "format": "int4"}]}
    plan_path.write_text(json.dumps(minimal))
    assert main(["apply", str(MLP), str(plan_path), "-o", str(tmp_path / "min.onnx"), "-q"]) == 0
    written = json.loads((tmp_path / "min.plan.json").read_text())
    node = written["nodes"][0]
    assert node["params"] == 64 * 512 and node["op_type"] == "MatMul" and node["bits"] == 4 + 16 / 64
    assert written["achieved_bits"] == node["bits"]


def _bad_plan(tmp_path: Path, **change: str) -> Path:
    nodes = [{"name": "fc0", "format": "int8"}]
    nodes[0].update(change)
    p = tmp_path / "bad.plan.json"
    p.write_text(json.dumps({"version": 1, "nodes": nodes}))
    return p


@pytest.mark.parametrize(
    ("case", "expect_code", "expect_msg"),
    [
        ("missing", 1, "not found"),
        ("not_onnx", 1, "not a readable ONNX model"),
        ("truncated", 1, "ONNX"),
        ("empty", 1, "empty"),
        ("unknown_node", 1, "not found among the model's weighted nodes"),
        ("unknown_format", 1, "unknown format"),
        ("same_output", 2, "is the input model"),
        ("no_plan", 2, "either a plan file or --uniform"),
        ("int8_residuals_on_qdq", 2, "--int8-residuals needs --target ort"),
    ],
)
def test_bad_input_one_line_no_traceback_input_untouched(
    tmp_path: Path, case: str, expect_code: int, expect_msg: str, capsys
) -> None:
    model = tmp_path / "m.onnx"
    shutil.copy(MLP, model)
    args = ["apply", str(model), "--uniform", "int4", "-o", str(tmp_path / "o.onnx")]
    if case == "missing":
        args[1] = str(tmp_path / "nope.onnx")
    elif case == "not_onnx":
        model.write_text("this is not a model\n" * 10)
    elif case == "truncated":
        model.write_bytes(MLP.read_bytes()[:5000])
    elif case == "empty":
        model.write_bytes(b"")
    elif case == "unknown_node":
        args = ["apply", str(model), str(_bad_plan(tmp_path, name="nope")), "-o", str(tmp_path / "o.onnx")]
    elif case == "unknown_format":
        args = ["apply", str(model), str(_bad_plan(tmp_path, format="int99")), "-o", str(tmp_path / "o.onnx")]
    elif case == "same_output":
        args = ["apply", str(model), "--uniform", "int4", "-o", str(model)]
    elif case == "no_plan":
        args = ["apply", str(model), "-o", str(tmp_path / "o.onnx")]
    elif case == "int8_residuals_on_qdq":
        args = [*args, "--int8-residuals"]
    before = _digest(model) if model.exists() else None
    capsys.readouterr()
    try:
        code = main([*args, "-q"])
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == expect_code, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and expect_msg in lines[0], err
    assert "Traceback" not in err
    if before is not None:
        assert _digest(model) == before
    assert not (tmp_path / "o.onnx").exists()


def test_subprocess_error_is_one_line_with_exit_code(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\x01garbage" * 100)
    res = _cli("apply", str(bad), "--uniform", "int8", "-o", str(tmp_path / "o.onnx"))
    assert res.returncode == 1
    assert res.stderr.strip().count("\n") == 0 and "Traceback" not in res.stderr
    res = _cli("apply", "--no-such-flag")
    assert res.returncode == 2 and "Traceback" not in res.stderr
