"""The one pipeline: analyze → decide → apply in memory, the plan as a pure decision, and the layering."""

from __future__ import annotations

import ast
import json
import re
from dataclasses import replace
from pathlib import Path

import onnx
import pytest

from lpcompile.analysis.config import AnalysisConfig
from lpcompile.analysis.table import Candidate, NodeSensitivity, SensitivityTable
from lpcompile.api import analyze, apply, decide, decide_sweep, decide_uniform
from lpcompile.budget import Budget
from lpcompile.cli import main
from lpcompile.config import ApplyConfig, DecideConfig, SoftmaxMode, Target, parse_option
from lpcompile.errors import PlanError, UsageError
from lpcompile.files import compile_file, load_calib_for, load_normalized
from lpcompile.solver import parse_keep

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "models"
MLP, CALIB = EXAMPLES / "digits_mlp.onnx", EXAMPLES / "digits_calib.npz"

# Decisions recorded before the pipeline was restructured (same seed, probes 8): they must not move.
GOLDEN_MLP_4_5 = {"fc0": "int8", "fc1": "int4_b128", "fc2": "int4_b128", "fc3": "int8"}
GOLDEN_MLP_4_25 = {"fc0": "int4_b32", "fc1": "int4_b128", "fc2": "int4_b64", "fc3": "int8"}


@pytest.fixture(scope="module")
def table() -> SensitivityTable:
    model = load_normalized(MLP)
    # the golden decisions were recorded with the reference rounding (under gptq 4.25 bits picks fc2
    # int4_b128, fc3 bf16)
    return analyze(model, load_calib_for(model, CALIB), AnalysisConfig(probes=8, rounding="nearest"))


def test_golden_decisions_unchanged(table: SensitivityTable) -> None:
    assert {n.name: n.format for n in decide(table, "4.5bits").plan.nodes} == GOLDEN_MLP_4_5
    assert {n.name: n.format for n in decide(table, "4.25").plan.nodes} == GOLDEN_MLP_4_25


def test_decide_is_pure_and_deterministic(table: SensitivityTable) -> None:
    before = table.to_json()
    a, b = decide(table, "4.5bits"), decide(table, "4.5bits")
    assert a.plan.to_dict() == b.plan.to_dict()
    assert table.to_json() == before
    node = a.plan.to_dict()["nodes"][0]
    assert "candidates" not in node and "trace" not in node  # evidence stays in the table
    assert "analysis" not in a.plan.metadata


def test_softmax_auto_is_resolved_per_target(table: SensitivityTable) -> None:
    assert decide(table, "6", DecideConfig(target=Target.ORT)).plan.softmax == "keep"
    assert decide(table, "6", DecideConfig(target=Target.TVM)).plan.softmax == "two-pass"
    assert decide(table, "6", DecideConfig(softmax=SoftmaxMode.TWO_PASS)).plan.softmax == "two-pass"


def test_options_are_checked_in_one_place() -> None:
    assert parse_option(Target, "ORT", "--target") is Target.ORT
    with pytest.raises(UsageError, match="--target: unknown value 'cuda'"):
        ApplyConfig(target="cuda")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="--softmax"):
        DecideConfig(softmax="sometimes")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="--seed"):
        ApplyConfig(seed=2**70)


def test_apply_writes_the_decision_it_read(table: SensitivityTable) -> None:
    plan = decide(table, "4.5bits").plan
    model = load_normalized(MLP)
    out = apply(model, plan, ApplyConfig(), load_calib_for(model, CALIB))
    assert [(n.name, n.format) for n in out.plan.nodes] == [(n.name, n.format) for n in plan.nodes]
    assert out.plan.achieved_bits == pytest.approx(plan.achieved_bits)
    formats = {n.name: n.metadata_props.get("lpcompile.format") for n in out.model.graph if n.name in GOLDEN_MLP_4_5}
    assert formats == GOLDEN_MLP_4_5


def test_apply_refuses_to_change_a_decision() -> None:
    model = load_normalized(MLP)
    plan = decide_uniform(model, "int8")
    bad = plan.with_nodes([replace(plan.nodes[0], name="nope"), *plan.nodes[1:]])
    with pytest.raises(PlanError, match="not found"):
        apply(model, bad)


def test_module_path_keep_rules_work_for_budget_and_sweep_alike() -> None:
    """One items builder: a rule that matches a module path is accepted by --budget and --sweep."""
    cands = {"fp32": Candidate(32.0, 0.0), "int8": Candidate(8.0, 1e-4), "int4_b128": Candidate(4.125, 1e-2)}
    nodes = tuple(
        NodeSensitivity(
            f"/layer.{i}/MatMul", "MatMul", f"w{i}", 1000, (10, 100), cands, module_path=f"encoder.layer.{i}.fc"
        )
        for i in range(3)
    )
    t = SensitivityTable(nodes=nodes, formats=tuple(cands), method="test", loss="kl")
    cfg = DecideConfig(keep=(parse_keep(r"encoder\.layer\.0=int8"),))
    assert decide(t, "6bits", cfg).plan.by_name()["/layer.0/MatMul"].format == "int8"
    sols, front = decide_sweep(t, [Budget("bits", 6.0), Budget("bits", 8.0)], cfg)
    assert all(s.assignments["/layer.0/MatMul"] == "int8" for s in sols) and front


def test_a_shared_weight_counts_once_in_budget_and_loss() -> None:
    """A table tied to a Gather and a MatMul head is one weight: stored once, its loss counted once."""
    cands = {"fp32": Candidate(32.0, 0.0), "int8": Candidate(8.0, 1e-4), "int4_b128": Candidate(4.125, 1e-2)}
    emb = NodeSensitivity("emb", "Gather", "E", 3000, (100, 30), cands, group="weight:E")
    head = NodeSensitivity("head", "MatMul", "E", 3000, (100, 30), cands, group="weight:E")
    other = NodeSensitivity("fc", "MatMul", "W", 1000, (10, 100), cands)
    t = SensitivityTable(nodes=(emb, head, other), formats=tuple(cands), method="test", loss="kl")
    dec = decide(t, "5.1bits")  # 4000 stored weights: E at int4, W at int8 = (3000·4.125 + 1000·8) / 4000 = 5.09
    assert dec.plan.by_name()["emb"].format == dec.plan.by_name()["head"].format == "int4_b128"
    assert dec.plan.by_name()["fc"].format == "int8"
    assert dec.plan.total_params == 4000
    assert dec.plan.achieved_bits == pytest.approx(dec.solution.achieved_bits)
    assert dec.plan.predicted_loss == pytest.approx(dec.solution.predicted_loss) == pytest.approx(1e-2 + 1e-4)


def test_max_loss_is_the_dual_of_the_budget(table: SensitivityTable, tmp_path: Path) -> None:
    """--max-loss D: the fewest bits whose predicted loss stays within D (plan and compile alike)."""
    at45 = decide(table, "4.5bits").plan
    dual = decide(table, None, DecideConfig(max_loss=at45.predicted_loss)).plan
    assert dual.predicted_loss <= at45.predicted_loss * (1 + 1e-9)
    assert dual.achieved_bits <= at45.achieved_bits + 1e-9
    loose = decide(table, None, DecideConfig(max_loss=1e9)).plan
    assert loose.achieved_bits <= dual.achieved_bits
    with pytest.raises(UsageError, match="--max-loss"):
        decide(table, None)
    sens = tmp_path / "t.sens.json"
    table.save(sens)
    assert main(["plan", str(sens), "--max-loss", str(at45.predicted_loss), "-o", str(tmp_path / "p.json"), "-q"]) == 0
    written = json.loads((tmp_path / "p.json").read_text())
    assert written["predicted_loss"] <= at45.predicted_loss * (1 + 1e-9) and written["budget"] is None


def test_cli_sweep_accepts_every_rule_budget_accepts(tmp_path: Path, capsys) -> None:
    cands = {"fp32": Candidate(32.0, 0.0), "int8": Candidate(8.0, 1e-4), "int4_b128": Candidate(4.125, 1e-2)}
    nodes = tuple(
        NodeSensitivity(f"n{i}", "MatMul", f"w{i}", 1000, (10, 100), cands, module_path=f"encoder.layer.{i}.fc")
        for i in range(3)
    )
    sens = tmp_path / "t.sens.json"
    SensitivityTable(nodes=nodes, formats=tuple(cands), method="test", loss="kl").save(sens)
    for rule in (r"encoder\.layer\.0=int8", r"^n1$=!int4_b128", r"encoder\.layer\.2"):
        assert main(["plan", str(sens), "--budget", "16", "--keep", rule, "-o", str(tmp_path / "p.json"), "-q"]) == 0
        capsys.readouterr()
        assert main(["plan", str(sens), "--sweep", "14:16:1", "--keep", rule, "--json", "-q"]) == 0
        rows = json.loads(capsys.readouterr().out)
        assert len(rows) == 3


def test_compile_file_loads_once_and_writes_plan_beside(tmp_path: Path) -> None:
    res = compile_file(MLP, "4.5bits", out=tmp_path / "m.lp.onnx", calib_path=CALIB,
                       config=AnalysisConfig(probes=8))
    written = json.loads((tmp_path / "m.lp.plan.json").read_text())
    assert {n["name"]: n["format"] for n in written["nodes"]} == GOLDEN_MLP_4_5
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m.lp.onnx")).metadata_props}
    assert json.loads(meta["lpcompile.precision_map"]) == GOLDEN_MLP_4_5
    assert "lpcompile.plan" not in meta
    assert res.plan.to_dict()["nodes"] == written["nodes"]


# -- layering: checked on the source ---------------------------------------------------------------

def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.append(node.module)
            out += [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names]
    return out


def _sources(*folders: str) -> list[Path]:
    return [p for f in folders for p in sorted((ROOT / f).rglob("*.py"))]


def test_analysis_imports_neither_passes_nor_runtime() -> None:
    for path in _sources("lpcompile/analysis"):
        bad = [m for m in _imports(path) if m.startswith(("lpcompile.passes", "lpcompile.runtime"))]
        assert not bad, f"{path.name} imports {bad}"


def test_no_mock_in_product_code_and_no_private_cross_module_imports() -> None:
    for path in _sources("lpcompile", "passes", "runtime"):
        if path.is_symlink() or "/lpcompile/passes/" in str(path) or "/lpcompile/runtime/" in str(path):
            continue
        text = path.read_text(encoding="utf-8")
        assert "unittest.mock" not in text and "from unittest import mock" not in text, path
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lpcompile"):
                private = [a.name for a in node.names if a.name.startswith("_") and a.name != "__version__"]
                assert not private, f"{path}: imports private {private} from {node.module}"


def test_no_scaffolding_guards() -> None:
    for path in _sources("lpcompile", "passes", "runtime"):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"not built yet|older trees", text), path


def test_package_paths_resolve_on_the_file_system() -> None:
    """``lpcompile.passes`` / ``lpcompile.runtime`` are folders (symlinks) a type checker can read."""
    import lpcompile.passes.pipeline
    import lpcompile.runtime.ort

    assert (ROOT / "lpcompile" / "passes" / "pipeline.py").exists()
    assert (ROOT / "lpcompile" / "runtime" / "ort.py").exists()
    assert Path(lpcompile.passes.pipeline.__file__).name == "pipeline.py"
    assert Path(lpcompile.runtime.ort.__file__).name == "ort.py"


def test_analyze_prints_nodes_that_cannot_take_every_format(tmp_path: Path) -> None:
    """An embedding table has no FP8 candidate (nothing to calibrate); the analyze table shows a gap."""
    import numpy as np
    from onnx import numpy_helper, parser

    proto = parser.parse_model(
        '<ir_version: 10, opset_import: ["" : 21]> g (int64[N, 4] ids) => (float[N, 4, 8] y) {'
        " e = Gather (E, ids)  y = MatMul (e, W) }"
    )
    rng = np.random.default_rng(0)
    proto.graph.initializer.extend([
        numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "E"),
        numpy_helper.from_array(rng.standard_normal((32, 8)).astype(np.float32), "W"),
    ])
    src, sens = tmp_path / "emb.onnx", tmp_path / "emb.sens.json"
    onnx.save(proto, str(src))
    for rounding in ("nearest", "gptq"):  # the Hutchinson and the rounded-candidate paths share the rule
        assert main(["analyze", str(src), "-o", str(sens), "--probes", "2", "--rounding", rounding, "-q"]) == 0
        table = SensitivityTable.load(sens)
        gather = next(n for n in table.nodes if n.op_type == "Gather")
        assert "fp8_e4m3" not in gather.candidates and "int4_b32" in gather.candidates
        assert "fp8_e4m3" in next(n for n in table.nodes if n.op_type == "MatMul" and n.weight == "W").candidates


def test_compile_writes_the_weights_its_analysis_scored(tmp_path: Path) -> None:
    """One calibration load per compile: apply's GPTQ Hessians come from the data the analysis saw
    (synthetic here, 32 samples), so the file equals an in-memory apply on that same data."""
    import numpy as np

    from lpcompile.files import analysis_calib

    cfg = AnalysisConfig(probes=4, batch_size=32, rounding="gptq")
    res = compile_file(MLP, "4.5bits", out=tmp_path / "g.onnx", config=cfg)
    assert res.calib is not None and res.calib.num_samples == 32
    model = load_normalized(MLP)
    again = apply(model, res.decision.plan, ApplyConfig(rounding="gptq"), analysis_calib(model, None, cfg))
    written = {t.name: t for t in onnx.load(str(tmp_path / "g.onnx")).graph.initializer}
    codes = [name for name in again.model.graph.initializers if name.endswith("_q")]
    assert codes, "the plan quantizes no weight"
    for name in codes:
        got = onnx.numpy_helper.to_array(written[name])
        np.testing.assert_array_equal(got, again.model.graph.initializers[name].const_value.numpy())


def test_guard_inputs_without_calib_come_from_the_compiles_model(tmp_path: Path, monkeypatch, capsys) -> None:
    """Without --calib the guard measures fresh synthetic inputs (seed + 1) at the compile's sizes, made from
    the model the compile loaded: it does not read the model again (nor start an ORT session to size them)."""
    import numpy as np

    import lpcompile.frontend.onnx_io as onnx_io
    from lpcompile.frontend.calib import synthesize

    res = compile_file(MLP, "4.5bits", out=tmp_path / "m.onnx", config=AnalysisConfig(probes=2))
    assert res.calib is not None and res.calib.synthetic and res.heldout is not None
    fresh = synthesize(load_normalized(MLP), num_samples=16, seed=1)
    assert res.heldout.arrays.keys() == fresh.arrays.keys() == res.calib.arrays.keys()
    for name, arr in res.heldout.arrays.items():
        np.testing.assert_array_equal(arr, fresh.arrays[name])
        assert arr.shape[1:] == res.calib.arrays[name].shape[1:] and not np.array_equal(arr, res.calib.arrays[name])
    cfg = AnalysisConfig(probes=2)
    with_calib = compile_file(MLP, "4.5bits", out=tmp_path / "d.onnx", calib_path=CALIB, config=cfg)
    n = with_calib.calib.num_samples  # with --calib: its last quarter
    assert with_calib.heldout.num_samples == n // 4
    for name, arr in with_calib.heldout.arrays.items():
        np.testing.assert_array_equal(arr, with_calib.calib.arrays[name][n - n // 4 :])
    reads: list[object] = []
    real = onnx_io.load_model
    monkeypatch.setattr(onnx_io, "load_model", lambda *a, **k: reads.append(a) or real(*a, **k))
    assert main([str(MLP), "--budget", "4.5bits", "-o", str(tmp_path / "c.onnx"), "--probes", "2", "--json", "-q"]) == 0
    guard = json.loads(capsys.readouterr().out)["guard"]
    assert guard["synthetic"] and guard["num_samples"] == 16 and reads == []
