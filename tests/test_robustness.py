"""Bad inputs through the CLI: one-line errors, documented exit codes, inputs untouched, no stray files.

Every case runs ``lpcompile.cli.main`` in-process (two through a subprocess) and checks the exit
code (0 success, 1 failure, 2 usage), that stderr holds exactly one line and no traceback, and
that no file in the working folder changed or appeared (temp files included). Models with
things lpcompile leaves alone (custom domains, control flow, NaN/Inf weights...) succeed with
findings from :mod:`lpcompile.checks` in the JSON summary, and their output passes the full ONNX
checker.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lpcompile.analysis.table import Candidate, NodeSensitivity, SensitivityTable
from lpcompile.checks import check_model
from lpcompile.cli import main
from lpcompile.frontend.onnx_io import load_model

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "models"
MLP = EXAMPLES / "digits_mlp.onnx"
CALIB = EXAMPLES / "digits_calib.npz"
FAST = ["--probes", "2", "--max-samples", "16"]  # analysis settings that keep compile at ~1 s on tiny models

RNG = np.random.default_rng(0)
W1 = RNG.standard_normal((16, 8)).astype(np.float32)
W2 = RNG.standard_normal((8, 4)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# small models


def _model(
    nodes: list[onnx.NodeProto],
    inits: dict[str, np.ndarray],
    *,
    opset: int = 17,
    ir_version: int = 8,
    inputs: list[onnx.ValueInfoProto] | None = None,
    outputs: list[onnx.ValueInfoProto] | None = None,
    domains: dict[str, int] | None = None,
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        outputs or [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in (domains or {}).items()]
    return helper.make_model(graph, opset_imports=opsets, ir_version=ir_version)


def mlp(
    w1: np.ndarray = W1, w2: np.ndarray = W2, *, opset: int = 17, mid: str = "Relu", **kw: object
) -> onnx.ModelProto:
    """x[N,16] → MatMul fc0 → ``mid`` → MatMul fc1 → y[N,4]."""
    domain = kw.pop("mid_domain", "")
    return _model(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc0"),
            helper.make_node(mid, ["h"], ["r"], name="mid", domain=domain),
            helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc1"),
        ],
        {"w1": w1, "w2": w2},
        opset=opset,
        **kw,
    )  # type: ignore[arg-type]


def gemm_opset11() -> onnx.ModelProto:
    return _model(
        [
            helper.make_node("Gemm", ["x", "w1"], ["h"], name="fc0"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("Gemm", ["r", "w2"], ["y"], name="fc1"),
        ],
        {"w1": W1, "w2": W2},
        opset=11,
        ir_version=6,
    )


def pad_opset1() -> onnx.ModelProto:
    """Pad-1 (``paddings`` attribute): valid at opset 1, but onnx's version converter cannot raise it to 21."""
    return _model(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc0"),
            helper.make_node("Pad", ["h"], ["p"], name="pad", paddings=[0, 0, 0, 0]),
            helper.make_node("MatMul", ["p", "w2"], ["y"], name="fc1"),
        ],
        {"w1": W1, "w2": W2},
        opset=1,
        ir_version=4,
    )


def if_model() -> onnx.ModelProto:
    """fc1 shares w2 with the then-branch (outer-scope use); the else-branch has its own weight."""
    out = [helper.make_tensor_value_info("t", TensorProto.FLOAT, ["N", 4])]
    then_g = helper.make_graph([helper.make_node("MatMul", ["r", "w2"], ["t"], name="then_mm")], "then", [], out)
    else_g = helper.make_graph(
        [helper.make_node("MatMul", ["r", "w3"], ["t"], name="else_mm")],
        "else",
        [],
        out,
        [numpy_helper.from_array(W2 * 2, "w3")],
    )
    return _model(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc0"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("ReduceSum", ["x"], ["s"], name="sum", keepdims=0),
            helper.make_node("ReduceSum", ["s"], ["s0"], name="sum0", keepdims=0),
            helper.make_node("Greater", ["s0", "zero"], ["cond"], name="gt"),
            helper.make_node("If", ["cond"], ["b"], name="branch", then_branch=then_g, else_branch=else_g),
            helper.make_node("MatMul", ["r", "w2"], ["a"], name="fc1"),
            helper.make_node("Add", ["a", "b"], ["y"], name="add"),
        ],
        {"w1": W1, "w2": W2, "zero": np.array(0.0, np.float32)},
    )


def loop_model() -> onnx.ModelProto:
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["c_in"], ["c_out"]),
            helper.make_node("MatMul", ["s_in", "wl"], ["m"]),
            helper.make_node("Relu", ["m"], ["s_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("s_in", TensorProto.FLOAT, ["N", 8]),
        ],
        [
            helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("s_out", TensorProto.FLOAT, ["N", 8]),
        ],
    )
    return _model(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc0"),
            helper.make_node("Loop", ["trip", "", "h"], ["l"], name="loop", body=body),
            helper.make_node("MatMul", ["l", "w2"], ["y"], name="fc1"),
        ],
        {
            "w1": W1,
            "w2": W2,
            "wl": (0.3 * RNG.standard_normal((8, 8))).astype(np.float32),
            "trip": np.array(2, np.int64),
        },
    )


def shared_model() -> onnx.ModelProto:
    return _model(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc0"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("Neg", ["h"], ["n"], name="neg"),
            helper.make_node("MatMul", ["r", "w2"], ["a"], name="fc1"),
            helper.make_node("MatMul", ["n", "w2"], ["b"], name="fc2"),
            helper.make_node("Add", ["a", "b"], ["y"], name="add"),
        ],
        {"w1": W1, "w2": W2},
    )


def zero_sized_model() -> onnx.ModelProto:
    return _model(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc0"),
            helper.make_node("MatMul", ["h", "w2"], ["a"], name="fc1"),
            helper.make_node("Concat", ["a", "empty"], ["y"], name="cat", axis=0),
        ],
        {"w1": W1, "w2": W2, "empty": np.zeros((0, 4), np.float32)},
    )


def dynamic_model() -> onnx.ModelProto:
    """[batch, seq, 16] → MatMul → Softmax → MatMul: symbolic batch and sequence."""
    return _model(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc0"),
            helper.make_node("Softmax", ["h"], ["s"], name="sm", axis=-1),
            helper.make_node("MatMul", ["s", "w2"], ["y"], name="fc1"),
        ],
        {"w1": W1, "w2": W2},
        inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 16])],
        outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 4])],
    )


def embedding_model() -> onnx.ModelProto:
    return _model(
        [
            helper.make_node("Gather", ["emb", "ids"], ["e"], name="embed"),
            helper.make_node("MatMul", ["e", "w1"], ["y"], name="fc0"),
        ],
        {"emb": RNG.standard_normal((50, 16)).astype(np.float32), "w1": W1[:, :4].copy()},
        inputs=[helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 6])],
        outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 4])],
    )


def no_weights_model() -> onnx.ModelProto:
    return _model(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")],
        {},
        outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])],
    )


def nonfinite_w1() -> np.ndarray:
    w = W1.copy()
    w[0, 0], w[3, 5] = np.nan, np.inf
    return w


# --------------------------------------------------------------------------------------------
# harness


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # argparse usage errors
        code = int(exc.code or 0)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def expect_error(capsys: pytest.CaptureFixture[str], folder: Path, args: list[str], code: int, msg: str) -> str:
    """Run; check the exit code, one stderr line containing ``msg``, and that ``folder`` is unchanged."""
    before = _digests(folder)
    got, _, err = cli(capsys, *args, "-q")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert got == code, err
    assert len(lines) == 1, err
    assert msg.lower() in lines[0].lower(), err
    assert "Traceback" not in err
    assert _digests(folder) == before, "an input changed or an output/temp file was left behind"
    return lines[0]


def save(folder: Path, name: str, model: onnx.ModelProto) -> Path:
    path = folder / name
    onnx.save(model, str(path))
    return path


@pytest.fixture()
def work(tmp_path: Path) -> Path:
    shutil.copy(MLP, tmp_path / "m.onnx")
    shutil.copy(CALIB, tmp_path / "calib.npz")
    return tmp_path


# --------------------------------------------------------------------------------------------
# unreadable / invalid model files, through every command that reads a model


def _bad_model(folder: Path, case: str) -> Path:
    path = folder / "bad.onnx"
    good = MLP.read_bytes()
    if case == "missing":
        return folder / "nope.onnx"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "truncated":
        path.write_bytes(good[: len(good) // 3])
    elif case == "not_onnx":
        path.write_text("this is not an ONNX model\n" * 20)
    elif case == "directory":
        path.mkdir()
    elif case == "checker":  # a node reads a tensor nothing produces
        model = mlp()
        model.graph.node[1].input[0] = "nowhere"
        onnx.save(model, str(path))
    elif case == "unknown_op":  # an op the default domain does not have
        onnx.save(mlp(mid="FooBar"), str(path))
    elif case in ("escape", "absolute"):
        onnx.save(mlp(), str(path), save_as_external_data=True, location="bad.onnx.data", size_threshold=0)
        proto = onnx.load(str(path), load_external_data=False)
        loc = "../../etc/passwd" if case == "escape" else "/etc/passwd"
        for t in proto.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = loc
        onnx.save(proto, str(path))
    else:  # pragma: no cover
        raise AssertionError(case)
    return path


MODEL_CASES = {
    "missing": "not found",
    "empty": "empty",
    "truncated": "not a readable ONNX model",
    "not_onnx": "ONNX",
    "directory": "not a file",
    "checker": "fails the ONNX checker",
    "unknown_op": "No Op registered for FooBar",
    "escape": "escapes the model folder",
    "absolute": "escapes the model folder",
}

COMMANDS: dict[str, Callable[[Path, Path], list[str]]] = {
    "apply": lambda m, d: ["apply", str(m), "--uniform", "int4", "-o", str(d / "o.onnx")],
    "compile": lambda m, d: ["compile", str(m), "--budget", "4.5bits", "-o", str(d / "o.onnx")],
    "analyze": lambda m, d: ["analyze", str(m), "-o", str(d / "o.sens.json")],
    "eval": lambda m, d: ["eval", str(m), "--reference", str(d / "m.onnx")],
    "eval-reference": lambda m, d: ["eval", str(d / "m.onnx"), "--reference", str(m)],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_unreadable_model_is_one_line_exit_1(work: Path, command: str, case: str, capsys) -> None:
    bad = _bad_model(work, case)
    expect_error(capsys, work, COMMANDS[command](bad, work), 1, MODEL_CASES[case])


@pytest.mark.parametrize(
    ("content", "msg"),
    [
        (None, "not found"),
        ("", "not valid JSON"),
        ("{not json", "not valid JSON"),
        ('{"version": 99, "nodes": []}', "not an lpcompile sensitivity file"),
        ('{"version": 1, "nodes": [{"name": "a"}]}', "malformed node entry"),
    ],
)
def test_bad_sensitivity_file_for_plan(work: Path, content: str | None, msg: str, capsys) -> None:
    sens = work / "s.sens.json"
    if content is not None:
        sens.write_text(content)
    expect_error(capsys, work, ["plan", str(sens), "--budget", "4.5"], 1, msg)


# --------------------------------------------------------------------------------------------
# budgets


def _table() -> SensitivityTable:
    def node(name: str, params: int, s: float) -> NodeSensitivity:
        cands = {"int4_b128": Candidate(4.125, 100 * s), "int8": Candidate(8.25, s), "fp32": Candidate(32.0, 0.0)}
        return NodeSensitivity(
            name=name,
            op_type="MatMul",
            weight=name + ".w",
            params=params,
            shape=(params // 8, 8),
            candidates=cands,
            trace=s,
        )

    return SensitivityTable(
        nodes=(node("a", 4096, 1.0), node("b", 1024, 3.0)),
        formats=("int4_b128", "int8", "fp32"),
        method="hutchinson-diag",
        loss="kl",
        model="m.onnx",
    )


BUDGETS = {
    "abc": "malformed budget",
    "-1": "positive",
    "0": "positive",
    "nan": "malformed budget",
    "inf": "malformed budget",
    "4.5b": "ambiguous",
    "12mb": "unknown budget unit",
    "1bits": "smallest feasible",
}


@pytest.mark.parametrize("budget", sorted(BUDGETS))
def test_bad_budget_for_plan(work: Path, budget: str, capsys) -> None:
    sens = work / "t.sens.json"
    _table().save(sens)
    code = 1 if budget == "1bits" else 2  # malformed: usage error; infeasible: failure
    expect_error(
        capsys, work, ["plan", str(sens), f"--budget={budget}", "-o", str(work / "p.json")], code, BUDGETS[budget]
    )


@pytest.mark.parametrize("budget", sorted(b for b in BUDGETS if b != "1bits"))
def test_bad_budget_for_compile_fails_before_analysis(work: Path, budget: str, capsys) -> None:
    expect_error(
        capsys,
        work,
        ["compile", str(work / "m.onnx"), f"--budget={budget}", "-o", str(work / "o.onnx")],
        2,  # a malformed budget is a usage error
        BUDGETS[budget],
    )


@pytest.mark.parametrize("spec", ["", "4:2:0.5", "a:b:c", "4:8:0", "4:8:-1"])
def test_bad_sweep(work: Path, spec: str, capsys) -> None:
    sens = work / "t.sens.json"
    _table().save(sens)
    before = _digests(work)
    code, _, err = cli(capsys, "plan", str(sens), f"--sweep={spec}", "-q")
    assert code in (1, 2) and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert _digests(work) == before


def test_infeasible_budget_for_compile(work: Path, capsys) -> None:
    expect_error(
        capsys,
        work,
        [
            "compile",
            str(work / "m.onnx"),
            "--budget",
            "1bits",
            "--calib",
            str(work / "calib.npz"),
            "-o",
            str(work / "o.onnx"),
            *FAST,
        ],
        1,
        "smallest feasible",
    )


FLAG_CASES: dict[str, tuple[list[str], int, str]] = {
    "max-samples 0": (["analyze", "M", "--max-samples", "0", "-o", "D/o.json"], 2, "--max-samples must be at least 1"),
    "probes 0": (
        ["compile", "M", "--budget", "4.5", "--probes", "0", "-o", "D/o.onnx"],
        2,
        "--probes must be at least 1",
    ),
    "batch-size -1": (["analyze", "M", "--batch-size=-1", "-o", "D/o.json"], 2, "--batch-size must be at least 1"),
    "eval batch-size 0": (["eval", "M", "--reference", "M", "--batch-size", "0"], 2, "batch size must be at least 1"),
    "unknown format": (["apply", "M", "--uniform", "fmt_nope", "-o", "D/o.onnx"], 1, "unknown format 'fmt_nope'"),
    "empty formats": (["analyze", "M", "--formats", ",", "-o", "D/o.json"], 1, "empty format list"),
    "bad keep regex": (["compile", "M", "--budget", "4.5", "--keep", "(", "-o", "D/o.onnx"], 2, "bad regex"),
    "unknown flag": (["apply", "M", "--frobnicate"], 2, "unrecognized arguments"),
    "missing budget": (["compile", "M"], 2, "--budget"),
    "plan is not a plan": (["apply", "M", "D/calib.npz", "-o", "D/o.onnx"], 1, "cannot read plan"),
    "plan and uniform": (
        ["apply", "M", "D/p.plan.json", "--uniform", "int8", "-o", "D/o.onnx"],
        2,
        "either a plan file or --uniform",
    ),
}


@pytest.mark.parametrize("case", sorted(FLAG_CASES))
def test_bad_flags(work: Path, case: str, capsys) -> None:
    args, code, msg = FLAG_CASES[case]
    _plan_file(work)
    args = [
        a.replace("D/", f"{work}/") if a.startswith("D/") else str(work / "m.onnx") if a == "M" else a for a in args
    ]
    expect_error(capsys, work, args, code, msg)


# --------------------------------------------------------------------------------------------
# calibration data


def _calib(folder: Path, case: str) -> Path:
    path = folder / f"{case}.npz"
    x = RNG.standard_normal((16, 8, 8)).astype(np.float32)  # the example's input: pixels[batch, 8, 8]
    if case == "missing":
        return folder / "nope.npz"
    if case == "wrong_name":
        np.savez(path, images=x)
    elif case == "positional":
        np.savez(path, x)
    elif case == "wrong_shape":
        np.savez(path, pixels=x[:, :, :7])
    elif case == "wrong_rank":
        np.savez(path, pixels=x.reshape(16, 64))
    elif case == "strings":
        np.savez(path, pixels=np.full((16, 8, 8), "a"))
    elif case == "not_npz":
        path.write_text("pixels\n1,2,3\n")
    elif case == "empty":
        np.savez(path, pixels=x[:0])
    elif case == "pickled":
        np.savez(path, pixels=np.array([{"a": 1}] * 16, dtype=object))
    else:  # pragma: no cover
        raise AssertionError(case)
    return path


CALIB_CASES = {
    "missing": "not found",
    "wrong_name": "unknown array(s) images",
    "positional": "save arrays by input name",
    "wrong_shape": "model expects",
    "wrong_rank": "rank 2",
    "strings": "cannot feed",
    "not_npz": "not an .npz file",
    "empty": "no samples",
    "pickled": "pickled",
}

CALIB_COMMANDS: dict[str, Callable[[Path, Path], list[str]]] = {
    "compile": lambda c, d: [
        "compile",
        str(d / "m.onnx"),
        "--budget",
        "4.5",
        "--calib",
        str(c),
        "-o",
        str(d / "o.onnx"),
    ],
    "analyze": lambda c, d: ["analyze", str(d / "m.onnx"), "--calib", str(c), "-o", str(d / "o.sens.json")],
    "eval": lambda c, d: ["eval", str(d / "m.onnx"), "--reference", str(d / "m.onnx"), "--calib", str(c)],
    "apply-fp8": lambda c, d: [
        "apply",
        str(d / "m.onnx"),
        "--uniform",
        "fp8_e4m3",
        "--calib",
        str(c),
        "-o",
        str(d / "o.onnx"),
    ],
}


@pytest.mark.parametrize("command", sorted(CALIB_COMMANDS))
@pytest.mark.parametrize("case", sorted(CALIB_CASES))
def test_bad_calibration_data(work: Path, command: str, case: str, capsys) -> None:
    calib = _calib(work, case)
    expect_error(capsys, work, CALIB_COMMANDS[command](calib, work), 1, CALIB_CASES[case])


def test_non_integer_data_for_integer_input(work: Path, capsys) -> None:
    model = save(work, "emb.onnx", embedding_model())
    calib = work / "ids.npz"
    np.savez(calib, ids=RNG.random((8, 6)))
    expect_error(
        capsys,
        work,
        ["analyze", str(model), "--calib", str(calib), "-o", str(work / "e.sens.json")],
        1,
        "non-integer floats",
    )


# --------------------------------------------------------------------------------------------
# outputs: never over an input, never a directory


def _plan_file(folder: Path) -> Path:
    path = folder / "p.plan.json"
    path.write_text(json.dumps({"version": 1, "nodes": [{"name": "fc0", "format": "int8"}]}))
    return path


OUTPUT_CASES: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    "apply -o input": (
        lambda d: ["apply", str(d / "m.onnx"), "--uniform", "int8", "-o", str(d / "m.onnx")],
        "is the input model",
    ),
    "apply -o ./input": (
        lambda d: ["apply", str(d / "m.onnx"), "--uniform", "int8", "-o", str(d / "." / "x" / ".." / "m.onnx")],
        "is the input model",
    ),
    "apply -o calib": (
        lambda d: [
            "apply",
            str(d / "m.onnx"),
            "--uniform",
            "fp8_e4m3",
            "--calib",
            str(d / "calib.npz"),
            "-o",
            str(d / "calib.npz"),
        ],
        "is an input",
    ),
    "apply -o plan": (
        lambda d: ["apply", str(d / "m.onnx"), str(_plan_file(d)), "-o", str(d / "p.plan.json")],
        "is an input",
    ),
    "apply -o dir": (lambda d: ["apply", str(d / "m.onnx"), "--uniform", "int8", "-o", str(d)], "is a directory"),
    "compile -o input": (
        lambda d: ["compile", str(d / "m.onnx"), "--budget", "4.5", "-o", str(d / "m.onnx")],
        "is the input model",
    ),
    "compile --report input": (
        lambda d: [
            "compile",
            str(d / "m.onnx"),
            "--budget",
            "4.5",
            "-o",
            str(d / "o.onnx"),
            "--report",
            str(d / "m.onnx"),
        ],
        "is the input model",
    ),
    "compile -o calib plan": (
        lambda d: [
            "compile",
            str(d / "m.onnx"),
            "--budget",
            "4.5",
            "--calib",
            str(d / "calib.plan.json"),
            "-o",
            str(d / "calib.onnx"),
        ],
        "is an input",
    ),
    "analyze -o input": (lambda d: ["analyze", str(d / "m.onnx"), "-o", str(d / "m.onnx")], "is the input model"),
    "analyze -o calib": (
        lambda d: ["analyze", str(d / "m.onnx"), "--calib", str(d / "calib.npz"), "-o", str(d / "calib.npz")],
        "is an input",
    ),
    "plan -o sensitivity": (
        lambda d: ["plan", str(d / "t.sens.json"), "--budget", "8", "-o", str(d / "t.sens.json")],
        "is an input",
    ),
}


@pytest.mark.parametrize("case", sorted(OUTPUT_CASES))
def test_output_never_replaces_an_input(work: Path, case: str, capsys) -> None:
    _table().save(work / "t.sens.json")
    shutil.copy(CALIB, work / "calib.plan.json")  # a calibration file whose name collides with compile's plan output
    args, msg = OUTPUT_CASES[case]
    expect_error(capsys, work, args(work), 2, msg)


def test_force_never_replaces_the_input(work: Path, capsys) -> None:
    """``--force`` replaces a previous output only; the input model stays byte-identical (exit 2)."""
    model = work / "m.onnx"
    before = model.read_bytes()
    code, _, err = cli(capsys, "apply", model, "--uniform", "int8", "-o", model, "--force", "-q")
    assert code == 2, err
    assert "is the input model" in err and len(err.strip().splitlines()) == 1
    assert model.read_bytes() == before
    assert not [p for p in work.iterdir() if p.name.startswith(".")]  # no temp or lock files left


def test_output_plan_may_replace_the_input_plan(work: Path, capsys) -> None:
    """``apply m.onnx p.plan.json -o p.onnx`` rewrites p.plan.json with the same plan, completed."""
    plan = _plan_file(work)
    code, _, err = cli(capsys, "apply", work / "m.onnx", plan, "-o", work / "p.onnx", "-q")
    assert code == 0, err
    data = json.loads(plan.read_text())
    assert data["model"] == "m.onnx" and data["nodes"][0]["format"] == "int8"


# --------------------------------------------------------------------------------------------
# models lpcompile rewrites with findings (or refuses cleanly)


def _apply_json(capsys, model: Path, fmt: str, out: Path, *extra: str) -> dict:
    code, stdout, err = cli(capsys, "apply", model, "--uniform", fmt, "-o", out, "--json", *extra)
    assert code == 0, err
    assert "Traceback" not in err
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    return json.loads(stdout)


CONTENT_CASES: dict[str, tuple[Callable[[], onnx.ModelProto], set[str]]] = {
    "custom_domain": (
        lambda: mlp(mid="MyRelu", mid_domain="com.example", domains={"com.example": 1}),
        {"custom-domain"},
    ),
    "if": (if_model, {"control-flow"}),
    "loop": (loop_model, {"control-flow"}),
    "shared": (shared_model, {"shared-weight"}),
    "zero_sized": (zero_sized_model, {"zero-sized"}),
    "dynamic": (dynamic_model, {"dynamic-shape"}),
    "nonfinite": (lambda: mlp(nonfinite_w1()), {"nonfinite-weight"}),
    "all_zero": (lambda: mlp(np.zeros_like(W1)), {"zero-weight"}),
    "no_weights": (no_weights_model, set()),
    "opset11_gemm": (gemm_opset11, set()),
}


@pytest.mark.parametrize("case", sorted(CONTENT_CASES))
def test_apply_uniform_reports_findings_and_writes_a_valid_model(work: Path, case: str, capsys) -> None:
    build, codes = CONTENT_CASES[case]
    model = save(work, f"{case}.onnx", build())
    before = model.read_bytes()
    for fmt in ("int4", "int8"):
        report = _apply_json(capsys, model, fmt, work / f"{case}.{fmt}.onnx")
        assert {c["code"] for c in report["checks"]} >= codes
        assert {c["code"] for c in report["checks"] if c["severity"] == "warning"} <= codes
    assert model.read_bytes() == before
    out = onnx.load(str(work / f"{case}.int4.onnx"))
    assert case == "no_weights" or max(o.version for o in out.opset_import if o.domain in ("", "ai.onnx")) >= 21


def test_nonfinite_weights_keep_their_node_fp32(work: Path, capsys) -> None:
    model = save(work, "nan.onnx", mlp(nonfinite_w1()))
    _apply_json(capsys, model, "int4", work / "nan.int4.onnx")
    plan = json.loads((work / "nan.int4.plan.json").read_text())
    assert {n["name"]: n["format"] for n in plan["nodes"]} == {"fc0": "fp32", "fc1": "int4_b128"}
    w = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(work / "nan.int4.onnx")).graph.initializer}
    np.testing.assert_array_equal(w["w1"], nonfinite_w1())  # untouched, NaN and Inf included
    # apply never changes a decision: an explicit plan asking for int8 there is refused in one line
    (work / "p.json").write_text(json.dumps({"version": 1, "nodes": [{"name": "fc0", "format": "int8"}]}))
    code, _, err = cli(capsys, "apply", model, work / "p.json", "-o", work / "nan.p.onnx", "-q")
    assert code == 1
    assert "NaN/Inf weights: fc0" in err and len(err.strip().splitlines()) == 1
    assert not (work / "nan.p.onnx").exists()


def test_plan_check_scans_the_weights_once(work: Path, monkeypatch) -> None:
    """check_plan reads every weight to find NaN/Inf ones: once, not once per plan node (it was 212 scans of
    0.5 GB, 39 s, in SmolLM2's compile)."""
    import lpcompile.api as api
    from lpcompile.errors import PlanError
    from lpcompile.passes.pipeline import normalize, uniform_plan

    calls: list[int] = []

    def counting(model):  # type: ignore[no-untyped-def]
        calls.append(1)
        return check_model(model)

    monkeypatch.setattr(api, "check_model", counting)
    model = load_model(save(work, "nan.onnx", mlp(nonfinite_w1())))
    normalize(model)
    plan = uniform_plan(model, "int4_b128")
    with pytest.raises(PlanError, match="NaN/Inf weights"):
        api.check_plan(model, plan)
    assert len(plan.nodes) == 2 and len(calls) == 1


def test_all_zero_weights_quantize_to_zeros(work: Path, capsys) -> None:
    from lpcompile.runtime.ort import make_session, run

    model = save(work, "zero.onnx", mlp(np.zeros_like(W1)))
    x = RNG.standard_normal((4, 16)).astype(np.float32)
    for fmt in ("int4", "int8", "fp8_e4m3", "bf16"):
        out = work / f"zero.{fmt}.onnx"
        _apply_json(capsys, model, fmt, out)
        y = run(make_session(str(out)), {"x": x})["y"]
        np.testing.assert_array_equal(y, np.zeros((4, 4), np.float32))  # exact: 0·anything = 0


def test_shared_weight_inside_if_branch_still_runs(work: Path, capsys) -> None:
    from lpcompile.runtime.ort import make_session, run

    model = save(work, "if.onnx", if_model())
    _apply_json(capsys, model, "int8", work / "if.int8.onnx")
    x = RNG.standard_normal((3, 16)).astype(np.float32)
    y0 = run(make_session(str(model)), {"x": x})["y"]
    y1 = run(make_session(str(work / "if.int8.onnx")), {"x": x})["y"]
    # int8 per-channel: each weight within scale/2 = amax/254 of fp32; outputs within the propagated bound
    assert np.allclose(y1, y0, rtol=0.05, atol=0.05 * float(np.abs(y0).max()))


def test_unconvertible_opset_is_one_line(work: Path, capsys) -> None:
    model = save(work, "pad1.onnx", pad_opset1())
    expect_error(
        capsys,
        work,
        ["apply", str(model), "--uniform", "int4", "-o", str(work / "o.onnx")],
        1,
        "cannot convert the model from opset 1 to opset 21",
    )


def test_custom_domain_cannot_be_analysed_or_evaluated(work: Path, capsys) -> None:
    model = save(work, "custom.onnx", mlp(mid="MyRelu", mid_domain="com.example", domains={"com.example": 1}))
    msg = expect_error(
        capsys, work, ["compile", str(model), "--budget", "6", "-o", str(work / "o.onnx"), *FAST], 1, "com.example"
    )
    assert "MyRelu" in msg
    expect_error(capsys, work, ["eval", str(model), "--reference", str(model)], 1, "MyRelu")


def test_compile_with_nonfinite_output_is_a_clear_error(work: Path, capsys) -> None:
    model = save(work, "nan.onnx", mlp(nonfinite_w1()))
    expect_error(
        capsys, work, ["compile", str(model), "--budget", "6", "-o", str(work / "o.onnx"), *FAST], 1, "not finite"
    )


@pytest.mark.parametrize("case", ["shared", "dynamic", "all_zero", "zero_sized", "if"])
def test_compile_succeeds_on_edge_models(work: Path, case: str, capsys) -> None:
    model = save(work, f"{case}.onnx", CONTENT_CASES[case][0]())
    before = model.read_bytes()
    out = work / f"{case}.lp.onnx"
    code, _, err = cli(capsys, "compile", model, "--budget", "8", "-o", out, "--json", *FAST)
    assert code == 0, err
    assert "Traceback" not in err
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    assert model.read_bytes() == before
    plan = json.loads(out.with_name(f"{case}.lp.plan.json").read_text())
    if case == "shared":  # tied: one format for both users of w2
        fmts = {n["name"]: n["format"] for n in plan["nodes"]}
        assert fmts["fc1"] == fmts["fc2"]


def test_checks_on_the_example_model_are_clean() -> None:
    assert check_model(load_model(MLP)).warnings == ()


# --------------------------------------------------------------------------------------------
# the real process: exit codes and one line


def _subprocess(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lpcompile.cli", *args], capture_output=True, text=True, timeout=120)


def test_subprocess_truncated_model_and_bad_budget(tmp_path: Path) -> None:
    bad = tmp_path / "t.onnx"
    bad.write_bytes(MLP.read_bytes()[:777])
    res = _subprocess("compile", str(bad), "--budget", "4.5", "-o", str(tmp_path / "o.onnx"))
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
    res = _subprocess(str(MLP), "--budget", "4.5 parsecs", "-o", str(tmp_path / "o.onnx"))
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "unknown budget unit" in res.stderr, res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.onnx"]
