"""The default weight rounding is ``gptq`` (best accuracy at the bits), with ``rtn`` where GPTQ has no data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lpcompile.analysis.config import AnalysisConfig
from lpcompile.cli import main
from lpcompile.config import ApplyConfig, Rounding
from lpcompile.formats import MATMUL_LAYOUT, dequantize
from lpcompile.rounding import default_method, round_weight

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "models"
MLP = EXAMPLES / "digits_mlp.onnx"
CALIB = EXAMPLES / "digits_calib.npz"


def test_config_defaults_are_gptq() -> None:
    assert AnalysisConfig().rounding == "gptq"
    assert ApplyConfig().rounding is Rounding.GPTQ
    # what the default becomes per format and weight: the search only where it pays and has data
    assert default_method("int4_b128", "gptq") == "gptq"
    assert default_method("int8", "gptq") == "rtn"
    assert default_method("fp8_e4m3", "gptq") == "rtn"
    assert default_method("int4_b128", "gptq", has_hessian=False) == "rtn"


def _written(plan_path: Path) -> str:
    return json.loads(plan_path.read_text())["metadata"]["written"]["rounding"]


def test_apply_cli_default_follows_calibration(tmp_path: Path) -> None:
    """``lpcompile apply`` rounds by GPTQ with --calib and by full-range RTN without it (no synthetic XᵀX)."""
    with_calib = tmp_path / "c.onnx"
    without = tmp_path / "n.onnx"
    assert main(["apply", str(MLP), "--uniform", "int4", "-o", str(with_calib), "--calib", str(CALIB), "-q"]) == 0
    assert main(["apply", str(MLP), "--uniform", "int4", "-o", str(without), "-q"]) == 0
    assert _written(tmp_path / "c.plan.json") == "gptq"
    assert _written(tmp_path / "n.plan.json") == "rtn"
    explicit = tmp_path / "e.onnx"
    assert main(["apply", str(MLP), "--uniform", "int4", "-o", str(explicit), "--rounding", "nearest", "-q"]) == 0
    assert _written(tmp_path / "e.plan.json") == "nearest"


def test_rtn_never_worse_than_nearest() -> None:
    """The no-data fallback is at least as close to the weights as the reference rounding, block by block."""
    rng = np.random.default_rng(3)
    w = (rng.standard_t(3, (256, 48)) * 0.05).astype(np.float32)
    near = dequantize(round_weight("int4_b128", w, MATMUL_LAYOUT, "nearest")) - w
    rtn = dequantize(round_weight("int4_b128", w, MATMUL_LAYOUT, "rtn")) - w
    per_block = lambda d: (d.reshape(2, 128, 48) ** 2).sum(axis=1)  # noqa: E731
    assert np.all(per_block(rtn) <= per_block(near) * (1 + 1e-6))
