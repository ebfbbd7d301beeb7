"""Reruns write byte-identical files: same inputs and seed → same .onnx, .plan.json, .sens.json.

The two runs are separate processes with different ``PYTHONHASHSEED`` (set/dict order of
strings), run side by side with the same thread count. The guarantee is for the same machine
settings: torch sums in an order that depends on its intra-op thread count, so a different
``OMP_NUM_THREADS`` can move the last digits of predicted losses (seen on MiniLM, not on the
digits MLP). The default-suite test uses fewer probes and samples than the defaults to stay
fast; the ``slow`` one runs the example with the default settings.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lpcompile.cli import main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "models"
MLP = EXAMPLES / "digits_mlp.onnx"
CALIB = EXAMPLES / "digits_calib.npz"


def _env(hash_seed: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"PYTHONHASHSEED": str(hash_seed), "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"})
    return env


def _compile_twice(folder: Path, *extra: str) -> tuple[Path, Path]:
    """Two ``compile`` processes at once (hash seeds 1 and 2); their output folders."""
    procs, outs = [], []
    for i in (1, 2):
        out = folder / f"run{i}"
        out.mkdir()
        cmd = [
            sys.executable,
            "-m",
            "lpcompile.cli",
            "compile",
            str(MLP),
            "--budget",
            "4.5bits",
            "--calib",
            str(CALIB),
            "-o",
            str(out / "mlp.lp.onnx"),
            "-q",
            *extra,
        ]
        procs.append(subprocess.Popen(cmd, env=_env(i), stderr=subprocess.PIPE, text=True))
        outs.append(out)
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    return outs[0], outs[1]


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_compile_twice_gives_identical_bytes(tmp_path: Path) -> None:
    a, b = _compile_twice(tmp_path, "--probes", "4", "--max-samples", "64")
    assert sorted(_digests(a)) == ["mlp.lp.onnx", "mlp.lp.plan.json"]
    assert _digests(a) == _digests(b)


def test_analyze_plan_apply_rerun_in_process_gives_identical_bytes(tmp_path: Path) -> None:
    runs = []
    for i in (1, 2):
        d = tmp_path / f"r{i}"
        d.mkdir()
        args = [
            [
                "analyze",
                str(MLP),
                "--calib",
                str(CALIB),
                "--probes",
                "2",
                "--max-samples",
                "32",
                "-o",
                str(d / "m.sens.json"),
            ],
            ["plan", str(d / "m.sens.json"), "--budget", "5", "-o", str(d / "m.plan.json")],
            ["apply", str(MLP), str(d / "m.plan.json"), "--calib", str(CALIB), "-o", str(d / "m.lp.onnx")],
            [
                "apply",
                str(MLP),
                "--uniform",
                "int4",
                "--rounding",
                "stochastic",
                "--seed",
                "7",
                "-o",
                str(d / "m.sr.onnx"),
            ],
        ]
        for a in args:
            assert main([*a, "-q"]) == 0
        runs.append(_digests(d))
    assert runs[0] == runs[1]
    assert "m.sens.json" in runs[0] and "m.sr.plan.json" in runs[0]


@pytest.mark.slow
def test_compile_twice_default_settings(tmp_path: Path) -> None:
    a, b = _compile_twice(tmp_path)
    assert _digests(a) == _digests(b)
