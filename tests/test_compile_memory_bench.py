"""benchmarks/compile_memory.py: the /usr/bin/time -v parsing, the issue-18 bound, and a digits run."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from compile_memory import GIB, fp32_weight_bytes, parse_time_v, rss_limit_bytes  # noqa: E402

TIME_V = """\tCommand being timed: "python3 -m lpcompile m.onnx"
\tElapsed (wall clock) time (h:mm:ss or m:ss): 1:02:03.5
\tMaximum resident set size (kbytes): 1171472
"""


def test_parse_time_v() -> None:
    assert parse_time_v(TIME_V) == {"max_rss_kib": 1171472.0, "wall_s": 3723.5}
    with pytest.raises(ValueError):
        parse_time_v("no figures")


def test_limit_counts_float_initializers_at_four_bytes() -> None:
    model = ROOT / "examples" / "models" / "digits_mlp.onnx"
    wbytes = fp32_weight_bytes(model)
    assert wbytes % 4 == 0 and wbytes > 400_000 * 4
    assert rss_limit_bytes(wbytes) == 2 * wbytes + GIB


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("/usr/bin/time") is None, reason="needs /usr/bin/time")
def test_new_only_digits_run(tmp_path: Path) -> None:
    from compile_memory import main

    out = tmp_path / "m.json"
    argv = ["--models", "digits", "--new-only", "--workdir", str(tmp_path), "--json-out", str(out)]
    assert main([*argv, "--variant", "p2=--probes 2"]) == 0
    doc = json.loads(out.read_text())
    run, variant = doc["results"][0]["runs"]
    assert run["exit"] == 0 and run["max_rss_kib"] > 0
    assert variant["which"] == "p2" and variant["exit"] == 0 and variant["command"].endswith("--probes 2")
    assert doc["variants"] == {"p2": ["--probes", "2"]}
