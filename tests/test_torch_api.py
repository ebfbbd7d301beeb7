"""PyTorch entry: ``lpcompile.compile(module, example_inputs, budget=...)``, module paths, keep rules.

The tiny transformer block (SDPA attention) is exported once per module. Agreement of the module
path with the ONNX path: both draw the same probes from the same seed, so their per-(node, format)
predicted losses agree to float rounding (relative 1e-3 allows for activations whose bf16/fp8
rounding flips on a last-bit difference between the two forwards), and the plans they solve are
identical at every budget tried.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from _torch_models import MINILM_INPUTS, SMALL_CONFIG, make_block, minilm_compiled, minilm_data

import lpcompile
from lpcompile.analysis.losses import numpy_distortion, output_loss_kinds
from lpcompile.api import analyze, decide
from lpcompile.config import DecideConfig
from lpcompile.errors import BudgetError, UsageError
from lpcompile.files import compile_file, load_normalized
from lpcompile.frontend.calib import CalibrationSet, synthesize
from lpcompile.frontend.onnx_io import save_model
from lpcompile.frontend.torch_export import module_paths_from_metadata
from lpcompile.frontend.torch_module import ModuleAnalysisUnsupported, analyze_module
from lpcompile.plan import PrecisionPlan
from lpcompile.solver import parse_keep
from lpcompile.torch_api import TorchCompileResult

BLOCK_PATHS = {"attn.query", "attn.key", "attn.value", "attn.out", "mlp.0", "mlp.2", "head"}
BUDGETS = ("4.5bits", "5bits", "6bits", "8bits", "16bits")  # 4.44 bits is the least feasible


@pytest.fixture(scope="module")
def block():
    return make_block(0)


@pytest.fixture(scope="module")
def compiled(block) -> TorchCompileResult:
    module, x = block
    return lpcompile.compile(module, (x,), budget="4.5bits", config=SMALL_CONFIG)


@pytest.fixture(scope="module")
def onnx_result(compiled, tmp_path_factory):
    """The ONNX path (``compile_file``) on the same export, calibration settings and seed."""
    ref_path = tmp_path_factory.mktemp("onnx_path") / "block.onnx"
    save_model(compiled.exported.model, ref_path)
    return compile_file(ref_path, "4.5bits", config=SMALL_CONFIG)


@pytest.fixture(scope="module")
def onnx_table(onnx_result):
    return onnx_result.table


def _ort(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from lpcompile.runtime.ort import make_session, run

    return run(make_session(model, numerics="exact"), inputs)


def _distortion(model: onnx.ModelProto, reference: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> float:
    ref, out = _ort(reference, inputs), _ort(model, inputs)
    kinds = output_loss_kinds(list(ref), [v.shape for v in ref.values()], "auto")
    return numpy_distortion(out, ref, kinds)


def test_import_lpcompile_stays_light() -> None:
    code = "import sys, lpcompile; assert 'torch' not in sys.modules; assert callable(lpcompile.compile)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_compile_returns_plan_model_and_module_paths(compiled: TorchCompileResult) -> None:
    assert compiled.analysis == "module"
    assert isinstance(compiled.model, onnx.ModelProto)
    assert {n.module_path for n in compiled.plan.nodes} == BLOCK_PATHS
    assert compiled.plan.achieved_bits <= 4.5 + 1e-9
    assert compiled.plan.metadata["frontend"]["analysis"] == "module"
    meta = {n.name: {p.key: p.value for p in n.metadata_props} for n in compiled.model.graph.node}
    for a in compiled.plan.nodes:
        assert meta[a.name]["lpcompile.module_path"] == a.module_path
        assert meta[a.name]["lpcompile.format"] == a.format
    out = compiled.run()
    assert out["output_0"].shape == (2, 10) and np.isfinite(out["output_0"]).all()


def test_module_paths_from_export_metadata(compiled: TorchCompileResult) -> None:
    model = compiled.exported.model
    assert module_paths_from_metadata(model) == dict(compiled.exported.module_paths)
    # every weight traced back to its Linear (transposed: Linear → MatMul stores Wᵀ)
    assert {r.fqn for r in compiled.exported.params.values()} == {f"{p}.weight" for p in BLOCK_PATHS}
    assert all(r.transposed for r in compiled.exported.params.values())


def test_module_and_onnx_analysis_agree(compiled: TorchCompileResult, onnx_table) -> None:
    by_name = {n.name: n for n in onnx_table.nodes}
    for m in compiled.table.nodes:
        o = by_name[m.name]
        assert m.module_path == o.module_path
        assert m.trace == pytest.approx(o.trace, rel=1e-4)
        for f, c in m.candidates.items():
            assert c.predicted_loss == pytest.approx(o.candidates[f].predicted_loss, rel=1e-3, abs=1e-12), (m.name, f)
    for budget in BUDGETS:
        p_mod = decide(compiled.table, budget).plan
        p_onnx = decide(onnx_table, budget).plan
        assert [n.format for n in p_mod.nodes] == [n.format for n in p_onnx.nodes], budget


def test_hvp_estimator_double_backward_through_sdpa(block, compiled: TorchCompileResult) -> None:
    """Double backward through ``scaled_dot_product_attention`` (math backend) matches the ONNX path."""
    from dataclasses import replace


    module, x = block
    cfg = replace(SMALL_CONFIG, estimator="hvp", probes=2)
    mod = analyze_module(module, compiled.exported, compiled.calib, cfg, (x,))
    ref = analyze(compiled.exported.model, compiled.calib, cfg)
    assert mod.method == ref.method == "hutchinson-hvp-diag"
    for m, o in zip(mod.nodes, ref.nodes, strict=True):
        assert m.trace == pytest.approx(o.trace, rel=1e-4, abs=1e-9), m.name


def test_distortion_no_worse_than_onnx_path(compiled: TorchCompileResult, onnx_result) -> None:
    onnx_model = onnx.load(str(onnx_result.applied.output))
    assert {n.module_path for n in onnx_result.plan.nodes} == BLOCK_PATHS  # names from the export metadata
    held = synthesize(compiled.exported.model, num_samples=32, seed=1).arrays
    reference = compiled.reference_model
    d_api = _distortion(compiled.model, reference, held)
    d_onnx = _distortion(onnx_model, reference, held)
    assert 0 < d_api <= d_onnx * (1 + 1e-6) + 1e-12


def test_keep_rules_match_module_paths(compiled: TorchCompileResult) -> None:
    table = compiled.table
    keep = (parse_keep(r"attn\.(key|value)$"), parse_keep(r"^head$=int8"))
    plan = decide(table, "12bits", DecideConfig(keep=keep)).plan
    by_path = {n.module_path: n for n in plan.nodes}
    assert by_path["attn.key"].format == by_path["attn.value"].format == "fp32"
    assert by_path["head"].format == "int8"
    onnx_name = by_path["mlp.0"].name  # the ONNX node name still works
    plan2 = decide(table, "8bits", DecideConfig(keep=(parse_keep(f"^{onnx_name}$=bf16"),))).plan
    assert plan2.by_name()[onnx_name].format == "bf16"
    with pytest.raises(UsageError, match="matches no quantizable node"):
        decide(table, "8bits", DecideConfig(keep=(parse_keep(r"^encoder\.nothing$"),)))


def test_save_writes_model_and_plan(compiled: TorchCompileResult, tmp_path: Path) -> None:
    out = compiled.save(tmp_path / "block.lp.onnx")
    plan = PrecisionPlan.load(tmp_path / "block.lp.plan.json")
    assert [n.module_path for n in plan.nodes] == [n.module_path for n in compiled.plan.nodes]
    again = _ort(onnx.load(str(out)), dict(compiled.example_inputs))
    np.testing.assert_array_equal(again["output_0"], compiled.run()["output_0"])
    if _has_report():
        report = compiled.write_report(tmp_path / "report.html")
        assert "attn.query" in report.read_text(encoding="utf-8")


def _has_report() -> bool:
    try:
        import lpcompile.report.html  # noqa: F401
    except ImportError:
        return False
    return True


def test_calibration_forms(block, compiled: TorchCompileResult) -> None:
    from lpcompile.torch_api import calibration_set

    x = torch.randn(12, 8, 32)
    for form in (x, (x,), {"x": x.numpy()}, CalibrationSet({"x": x.numpy()})):
        data = calibration_set(form, compiled.exported, compiled.example_inputs, SMALL_CONFIG)
        assert data.names == ("x",) and data.num_samples == 12
    with pytest.raises(lpcompile.errors.CalibrationError):
        calibration_set((x, x), compiled.exported, compiled.example_inputs, SMALL_CONFIG)


def test_module_analysis_refuses_a_module_it_cannot_mirror(compiled: TorchCompileResult) -> None:
    other, x = make_block(1)  # same structure, other weights: nothing matches the export
    with pytest.raises(ModuleAnalysisUnsupported, match="does not match the exported weight"):
        analyze_module(other, compiled.exported, compiled.calib, SMALL_CONFIG, (x,))


def test_bad_arguments_fail_before_export(block) -> None:
    module, x = block
    with pytest.raises(BudgetError):
        lpcompile.compile(module, (x,), budget="4.5 potatoes")
    with pytest.raises(UsageError):
        lpcompile.compile(module, (x,), analysis="guess")  # type: ignore[arg-type]
    with pytest.raises(lpcompile.frontend.torch_export.ExportError):
        lpcompile.compile(module, "not a tensor")


# --------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2 from nn.Module (slow)


@pytest.mark.slow
@pytest.mark.model
def test_minilm_from_module_no_worse_than_onnx_path(tmp_path: Path) -> None:
    result = minilm_compiled()
    assert result.analysis == "module"
    paths = {n.module_path for n in result.plan.nodes}
    assert "encoder.layer.0.attention.self.query" in paths and None not in paths
    assert result.plan.achieved_bits <= 4.5 + 1e-9
    # the ONNX path on the same export, the same calibration data and settings
    calib, held = minilm_data()
    ref_path, calib_path = tmp_path / "minilm.onnx", tmp_path / "calib.npz"
    save_model(result.exported.model, ref_path)
    np.savez(calib_path, **calib)
    onnx_result = compile_file(ref_path, "4.5bits", calib_path=calib_path, config=_minilm_config())
    formats_mod = [n.format for n in result.plan.nodes]
    formats_onnx = [n.format for n in onnx_result.plan.nodes]
    assert formats_mod == formats_onnx
    d_api = _distortion(result.model, result.reference_model, {k: held[k] for k in MINILM_INPUTS})
    d_onnx = _distortion(onnx.load(str(onnx_result.applied.output)), result.reference_model, held)
    assert d_api <= d_onnx * (1 + 1e-6) + 1e-12


def _minilm_config():
    from lpcompile.analysis.config import AnalysisConfig

    return AnalysisConfig(probes=16, batch_size=8)


def test_plain_onnx_files_get_no_guessed_module_paths() -> None:

    digits = Path(__file__).resolve().parents[1] / "examples" / "models" / "digits_mlp.onnx"
    model = load_normalized(digits)  # weights are named fc0.weight..., but nothing says they are modules
    assert module_paths_from_metadata(model) == {}
    assert module_paths_from_metadata(model, ["fc0.weight"]) == {"fc0": "fc0"}
