"""Scale (issue 18): convergence of the probes, sharded analysis (processes, Ray), devices, CLI flags."""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from lpcompile.analysis.config import AnalysisConfig
from lpcompile.analysis.sensitivity import probe_generator, resolve_device, trace_rse
from lpcompile.analysis.table import SensitivityTable
from lpcompile.api import analyze
from lpcompile.commands._args import add_analysis_args, analysis_config
from lpcompile.errors import UsageError
from lpcompile.files import load_calib_for, load_normalized

ROOT = Path(__file__).resolve().parents[1]
MLP, CALIB = ROOT / "examples" / "models" / "digits_mlp.onnx", ROOT / "examples" / "models" / "digits_calib.npz"

# 64 samples in 8 batches of 8 keep every run small; 16 probes = 2 per batch.
SMALL = AnalysisConfig(probes=16, max_samples=64, seeding="per-probe")


@pytest.fixture(scope="module")
def model_and_calib() -> tuple[Any, Any]:
    model = load_normalized(MLP)
    return model, load_calib_for(model, CALIB)


@pytest.fixture(scope="module")
def single(model_and_calib: tuple[Any, Any]) -> SensitivityTable:
    model, calib = model_and_calib
    return analyze(model, calib, SMALL)


def _numbers(table: SensitivityTable) -> list[tuple[Any, ...]]:
    """Every estimated number of a table, unrounded (equality here is bit-for-bit)."""
    return [
        (n.name, n.trace, n.trace_rse, tuple((f, c.predicted_loss) for f, c in n.candidates.items()))
        for n in table.nodes
    ] + [tuple(sorted(table.activation_amax.items())), (table.probes, table.seeding, table.probe_tol)]


# --- the error estimate -----------------------------------------------------------------------


def test_trace_rse_is_the_stratified_standard_error() -> None:
    # two batches, weights ½/½: T = ½·2 + ½·5 = 3.5; Var = ¼·(var[1,3]/2) + ¼·(var[4,6]/2) = ¼·1 + ¼·1
    rse = trace_rse([(0.5, [1.0, 3.0]), (0.5, [4.0, 6.0])])
    assert rse == pytest.approx(math.sqrt(0.5) / 3.5, rel=1e-12)
    # a one-probe batch takes the pooled squared coefficient of variation of the others: only batch 1
    # has two probes, cv² = var/mean² = 2/2² = 0.5, so batch 2 (one sample, 4) gets s² = 0.5·4² = 8
    rse1 = trace_rse([(0.5, [1.0, 3.0]), (0.5, [4.0])])
    total = 0.5 * 2.0 + 0.5 * 4.0
    assert rse1 == pytest.approx(math.sqrt(0.25 * 2.0 / 2 + 0.25 * 8.0 / 1) / total, rel=1e-12)
    assert trace_rse([(1.0, [2.0])]) is None  # no batch with two probes: unknown
    assert trace_rse([(1.0, [0.0, 0.0])]) is None  # a zero trace has no relative error


def test_probe_generator_depends_on_seed_batch_and_probe_only() -> None:
    def draw(seed: int, b: int, j: int) -> torch.Tensor:
        return torch.randint(0, 2**30, (4,), generator=probe_generator(seed, b, j))

    assert torch.equal(draw(0, 3, 5), draw(0, 3, 5))
    assert not torch.equal(draw(0, 3, 5), draw(0, 5, 3))
    assert not torch.equal(draw(0, 3, 5), draw(1, 3, 5))


# --- convergence --------------------------------------------------------------------------------


def test_fixed_probes_record_the_achieved_error_and_round_trip(single: SensitivityTable, tmp_path: Path) -> None:
    assert single.probes == 16 and single.probe_tol is None and single.seeding == "per-probe"
    assert all(n.trace_rse is not None and 0.0 < n.trace_rse < 1.0 for n in single.nodes)
    path = tmp_path / "t.json"
    single.save(path)
    data = json.loads(path.read_text())
    assert data["seeding"] == "per-probe" and "probe_tol" not in data
    back = SensitivityTable.load(path)
    assert [n.trace_rse for n in back.nodes] == pytest.approx([n.trace_rse for n in single.nodes], rel=1e-7)
    assert back.seeding == "per-probe" and back.probes == 16


def test_convergence_reaches_the_tolerance(model_and_calib: tuple[Any, Any], single: SensitivityTable) -> None:
    model, calib = model_and_calib
    tol = 0.1  # the 16-probe table above is at 8–15 %
    table = analyze(model, calib, replace(SMALL, probe_tol=tol, max_probes=256))
    assert table.probe_tol == tol
    assert all(n.trace_rse is not None and n.trace_rse <= tol for n in table.nodes)
    assert table.probes > single.probes and table.probes % 8 == 0  # the same count on each of the 8 batches
    back = SensitivityTable.from_dict(json.loads(table.to_json()))
    assert back.probe_tol == tol and back.probes == table.probes
    # the estimate moved by no more than a few of its standard errors from the 16-probe one
    for a, b in zip(single.nodes, table.nodes, strict=True):
        assert b.trace is not None and a.trace is not None and a.trace_rse is not None
        assert abs(a.trace - b.trace) <= 4 * a.trace_rse * abs(a.trace) + 4 * tol * abs(b.trace)


def test_convergence_stops_at_max_probes(model_and_calib: tuple[Any, Any], caplog: pytest.LogCaptureFixture) -> None:
    model, calib = model_and_calib
    with caplog.at_level(logging.WARNING, logger="lpcompile.analysis.sensitivity"):
        table = analyze(model, calib, replace(SMALL, probe_tol=1e-3, max_probes=24))
    assert table.probes == 24  # 3 per batch
    assert any(n.trace_rse is not None and n.trace_rse > 1e-3 for n in table.nodes)
    assert "did not converge" in caplog.text


def test_one_probe_per_batch_is_not_taken_for_convergence(
    model_and_calib: tuple[Any, Any], caplog: pytest.LogCaptureFixture
) -> None:
    model, calib = model_and_calib
    with caplog.at_level(logging.WARNING, logger="lpcompile.analysis.sensitivity"):
        table = analyze(model, calib, replace(SMALL, max_samples=32, probe_tol=0.5, max_probes=4))
    assert table.probes == 4 and all(n.trace_rse is None for n in table.nodes)  # 4 batches, one probe each
    assert "trace errors unknown" in caplog.text


def test_default_config_keeps_sequential_seeding() -> None:
    assert AnalysisConfig().effective_seeding == "sequential"
    assert AnalysisConfig(workers=2).effective_seeding == "per-probe"
    assert AnalysisConfig(ray="local").effective_seeding == "per-probe"
    with pytest.raises(UsageError, match="sequential seeding cannot be sharded"):
        AnalysisConfig(workers=2, seeding="sequential")
    with pytest.raises(UsageError, match="--probe-tol"):
        AnalysisConfig(probe_tol=1.5)


# --- sharding -----------------------------------------------------------------------------------


def test_two_worker_processes_give_the_single_process_table(
    model_and_calib: tuple[Any, Any], single: SensitivityTable
) -> None:
    model, calib = model_and_calib
    sharded = analyze(model, calib, replace(SMALL, workers=2))
    assert _numbers(sharded) == _numbers(single)
    assert sharded.to_json() == single.to_json()


def test_two_worker_processes_converge_like_one(model_and_calib: tuple[Any, Any]) -> None:
    model, calib = model_and_calib
    cfg = replace(SMALL, max_samples=32, probe_tol=0.2, max_probes=32)  # 4 batches, 2 rounds at most
    assert _numbers(analyze(model, calib, replace(cfg, workers=2))) == _numbers(analyze(model, calib, cfg))


def test_ray_local_cluster_gives_the_single_process_table(
    model_and_calib: tuple[Any, Any], single: SensitivityTable
) -> None:
    ray = pytest.importorskip("ray")
    model, calib = model_and_calib
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        sharded = analyze(model, calib, replace(SMALL, ray="local", workers=2))
    finally:
        ray.shutdown()
    assert _numbers(sharded) == _numbers(single)


# --- devices ------------------------------------------------------------------------------------


def test_device_resolution() -> None:
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA device"):
            resolve_device("cuda")


@pytest.mark.gpu
def test_cuda_table_matches_cpu(model_and_calib: tuple[Any, Any], single: SensitivityTable) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model, calib = model_and_calib
    gpu = analyze(model, calib, replace(SMALL, device="cuda"))
    # the same probes (drawn on the CPU); only float rounding of the kernels differs
    for a, b in zip(single.nodes, gpu.nodes, strict=True):
        assert b.trace == pytest.approx(a.trace, rel=1e-4)
        for f, c in a.candidates.items():
            assert b.candidates[f].predicted_loss == pytest.approx(c.predicted_loss, rel=1e-3, abs=1e-12)


# --- CLI ------------------------------------------------------------------------------------------


def _parse(*argv: str) -> AnalysisConfig:
    p = argparse.ArgumentParser()
    add_analysis_args(p)
    return analysis_config(p.parse_args(list(argv)))


def test_cli_flags_reach_the_config() -> None:
    cfg = _parse("--probe-tol", "0.05", "--max-probes", "64", "--workers", "2", "--device", "auto")
    assert (cfg.probe_tol, cfg.max_probes, cfg.workers, cfg.device, cfg.ray) == (0.05, 64, 2, "auto", None)
    assert _parse("--ray").ray == "local"
    assert _parse("--ray", "ray://head:10001").ray == "ray://head:10001"
    assert _parse().effective_seeding == "sequential"
    with pytest.raises(UsageError, match="--workers"):
        _parse("--workers", "0")
