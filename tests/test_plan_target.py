"""``lpcompile plan TABLE --target T`` counts each candidate's bits as target T writes it (issue 13).

A saved table holds the analysis' own counts (``Format.bits_for``: fp16 block scales). On ``ort``
an int4 MatMul weight is written as MatMulNBits with fp32 scales, so the plan command must recount
from the model, and the written file must store exactly what the plan reports.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from lpcompile.analysis.table import Candidate, NodeSensitivity, SensitivityTable
from lpcompile.cli import main
from lpcompile.formats import get_format
from lpcompile.graph import find_weight_nodes, weight_coverage

K, N = 64, 32


def _model(path: Path) -> Path:
    w = np.random.default_rng(0).standard_normal((K, N)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, N])],
        [numpy_helper.from_array(w, "W")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), path)
    return path


def _table(model: Path) -> Path:
    node = find_weight_nodes(ir.load(str(model)))[0]
    cands = {
        f: Candidate(bits=get_format(f).bits_for(node.shape, node.layout), predicted_loss=loss)
        for f, loss in (("fp32", 0.0), ("int8", 0.01), ("int4_b32", 1.0))
    }
    table = SensitivityTable(
        nodes=(NodeSensitivity.of(node, cands),),
        formats=tuple(cands),
        method="diag",
        loss="mse",
        model=model.name,
    )
    path = model.with_name("m.sens.json")
    table.save(path)
    return path


@pytest.fixture
def small_nbits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lpcompile.passes.targets.NBITS_MIN_ELEMENTS", 0)  # MatMulNBits even for a small weight


@pytest.mark.parametrize(("target", "bits"), [("qdq", 4 + 16 / 32), ("tvm", 4 + 16 / 32), ("ort", 4 + 32 / 32)])
def test_plan_counts_bits_as_the_target_stores_them(
    tmp_path: Path, small_nbits: None, target: str, bits: float
) -> None:
    model = _model(tmp_path / "m.onnx")
    sens = _table(model)
    plan = tmp_path / f"{target}.plan.json"
    assert main(["plan", str(sens), "--budget", "5bits", "--target", target, "-o", str(plan), "-q"]) == 0
    (node,) = json.loads(plan.read_text())["nodes"]
    assert node["format"] == "int4_b32"
    assert node["bits"] == pytest.approx(bits, rel=1e-12)
    out = tmp_path / f"{target}.onnx"
    assert main(["apply", str(model), str(plan), "-o", str(out), "--target", target, "-q"]) == 0
    (kept,) = [k for k in weight_coverage(ir.load(str(out))).kept if k.reason == "already-quantized"]
    assert kept.bits == pytest.approx(bits, rel=1e-12)  # the file stores what the plan reports


def test_ort_budget_between_the_counts_picks_the_format_the_file_can_afford(tmp_path: Path, small_nbits: None) -> None:
    """4.75 bits fits int4_b32 as the analysis counts it (4.5) but not as MatMulNBits stores it (5.0)."""
    sens = _table(_model(tmp_path / "m.onnx"))
    plan = tmp_path / "p.plan.json"
    assert main(["plan", str(sens), "--budget", "4.75bits", "--target", "qdq", "-o", str(plan), "-q"]) == 0
    assert json.loads(plan.read_text())["nodes"][0]["format"] == "int4_b32"
    assert main(["plan", str(sens), "--budget", "4.75bits", "--target", "ort", "-o", str(plan), "-q"]) == 1


def test_ort_without_the_model_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _model(tmp_path / "m.onnx")
    sens = _table(model)
    model.unlink()
    assert main(["plan", str(sens), "--budget", "5bits", "--target", "ort", "-o", str(tmp_path / "p.json")]) == 2
    assert "--model" in capsys.readouterr().err


def test_another_model_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sens = _table(_model(tmp_path / "m.onnx"))
    other = tmp_path / "other.onnx"
    proto = onnx.load(str(tmp_path / "m.onnx"))
    proto.graph.node[0].name = "renamed"
    onnx.save(proto, other)
    args = ["plan", str(sens), "--budget", "5bits", "--model", str(other), "-o", str(tmp_path / "p.json")]
    assert main(args) == 2
    assert "no weighted node 'mm'" in capsys.readouterr().err


def test_a_same_named_other_model_next_to_the_table_only_warns_on_qdq(tmp_path: Path) -> None:
    """Found implicitly (not named by --model), a model that does not match the table is not an error on
    qdq/tvm (the table's counts stand, a warning), but it is on ort, whose counts must change."""
    sens = _table(_model(tmp_path / "m.onnx"))
    proto = onnx.load(str(tmp_path / "m.onnx"))
    proto.graph.node[0].name = "renamed"
    onnx.save(proto, tmp_path / "m.onnx")
    assert main(["plan", str(sens), "--budget", "5bits", "-o", str(tmp_path / "q.json"), "-q"]) == 0
    assert main(["plan", str(sens), "--budget", "5bits", "--target", "ort", "-o", str(tmp_path / "o.json")]) == 2


def test_output_never_replaces_the_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _model(tmp_path / "m.onnx")
    sens = _table(model)
    before = model.read_bytes()
    assert main(["plan", str(sens), "--budget", "5bits", "--model", str(model), "-o", str(model)]) == 2
    assert "input" in capsys.readouterr().err
    assert model.read_bytes() == before
