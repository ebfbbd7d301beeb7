"""The segment-streamed analysis gives the full-model GGN table; XᵀX is gathered once per compile."""

from __future__ import annotations

import itertools
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from lpcompile.analysis.config import AnalysisConfig
from lpcompile.analysis.input_hessians import HessianStore
from lpcompile.analysis.sensitivity import analyze_onnx
from lpcompile.analysis.streamed import analyze_streamed, plan_segments, streamable
from lpcompile.files import load_normalized
from lpcompile.frontend.calib import CalibrationSet
from lpcompile.frontend.synth_llama import PRESETS, write_llama

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "models"


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_llama(tmp_path_factory.mktemp("toy") / "toy.onnx", PRESETS["toy"], seed=0)


def _calib(n: int = 6, seq: int = 12) -> CalibrationSet:
    ids = np.random.default_rng(1).integers(0, PRESETS["toy"].vocab, (n, seq)).astype(np.int64)
    return CalibrationSet(arrays={"input_ids": ids}, source="random ids")


def _same_tables(a: object, b: object, rtol: float = 1e-5) -> None:
    assert [n.name for n in a.nodes] == [n.name for n in b.nodes]  # type: ignore[attr-defined]
    for x, y in zip(a.nodes, b.nodes, strict=True):  # type: ignore[attr-defined]
        assert x.candidates.keys() == y.candidates.keys()
        for f, c in x.candidates.items():
            np.testing.assert_allclose(y.candidates[f].predicted_loss, c.predicted_loss, rtol=rtol, atol=1e-30)
            assert y.candidates[f].bits == c.bits
        assert x.group == y.group
        np.testing.assert_allclose(y.trace, x.trace, rtol=rtol)
    for t, v in a.activation_amax.items():  # type: ignore[attr-defined]
        np.testing.assert_allclose(b.activation_amax[t], v, rtol=1e-6)  # type: ignore[attr-defined]


def test_synth_llama_runs_in_ort_and_is_causal(toy: Path) -> None:
    onnx.checker.check_model(str(toy), full_check=True)
    sess = ort.InferenceSession(str(toy))
    ids = np.random.default_rng(0).integers(0, PRESETS["toy"].vocab, (2, 10)).astype(np.int64)
    y = sess.run(None, {"input_ids": ids})[0]
    ids2 = ids.copy()
    ids2[:, 6] = (ids2[:, 6] + 1) % PRESETS["toy"].vocab
    y2 = sess.run(None, {"input_ids": ids2})[0]
    assert y.shape == (2, 10, PRESETS["toy"].vocab)
    np.testing.assert_array_equal(y[:, :6], y2[:, :6])  # earlier positions never see later tokens
    assert np.abs(y[:, 6:] - y2[:, 6:]).max() > 0
    assert PRESETS["tinyllama-1.1b"].params() == pytest.approx(1.1e9, rel=0.01)


def test_segments_cover_the_graph_and_cut_between_blocks(toy: Path) -> None:
    model = load_normalized(toy)
    segs = plan_segments(model, segment_bytes=20_000)
    assert len(segs) >= 3
    assert segs[0].nodes[0] == 0 and segs[-1].nodes[1] == len(list(model.graph))
    assert all(a.nodes[1] == b.nodes[0] for a, b in itertools.pairwise(segs))
    # an interior cut carries the residual stream plus the shared mask/rotary tensors, not a block's innards
    consts = {n.outputs[0].name for n in model.graph if n.op_type == "Constant"}
    assert all(len(set(s.inputs) - consts) <= 5 for s in segs[1:])
    # the tied embedding table is read by the first and the last segment
    assert "model.embed_tokens.weight" in segs[0].initializers
    assert "model.embed_tokens.weight" in segs[-1].initializers


@pytest.mark.parametrize(("rounding", "segment_bytes"), [("nearest", 20_000), ("gptq", 60_000)])
def test_streamed_table_equals_full_model_table(
    toy: Path, rounding: str, segment_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lpcompile.analysis.streamed as streamed

    monkeypatch.setattr(streamed, "SPILL_BYTES", 0)  # the tied table's per-probe partials go through disk
    model = load_normalized(toy)
    cfg = AnalysisConfig(seeding="per-probe", batch_size=2, probes=6, rounding=rounding)
    full = analyze_onnx(model, _calib(), cfg)
    store = HessianStore(limit=0)  # every XᵀX spills to disk and is read back
    res = analyze_streamed(model, _calib(), cfg, segment_bytes=segment_bytes, hessians=store)
    _same_tables(full, res.table)
    assert res.table.timings["segments"] >= 2
    if rounding == "gptq":
        assert len(store) and store.files
        ref = HessianStore()
        analyze_onnx(model, _calib(), cfg, hessians=ref)
        for name in ref:
            # the same samples summed in other batch sizes (fp32 products per batch)
            np.testing.assert_allclose(store[name], ref[name], rtol=1e-5, atol=1e-6 * np.abs(ref[name]).max())
    else:
        assert not len(store)
    store.close()


def test_streamed_matches_on_a_classifier_with_activation_formats() -> None:
    model = load_normalized(EXAMPLES / "digits_mlp.onnx")
    data = np.load(EXAMPLES / "digits_calib.npz")
    calib = CalibrationSet(arrays={k: data[k][:24] for k in data.files}, source="digits")
    cfg = AnalysisConfig(seeding="per-probe", batch_size=8, probes=6)
    _same_tables(analyze_onnx(model, calib, cfg), analyze_streamed(model, calib, cfg, segment_bytes=1).table)


def test_settings_that_need_the_whole_graph_are_refused(toy: Path) -> None:
    model = load_normalized(toy)
    assert streamable(model, AnalysisConfig()) is None
    assert "hvp" in (streamable(model, AnalysisConfig(estimator="hvp")) or "")
    assert "probe-tol" in (streamable(model, AnalysisConfig(probe_tol=0.1)) or "")
    out = subprocess.run(
        [sys.executable, "-m", "lpcompile", "analyze", str(toy), "--stream", "on", "--probe-tol", "0.1"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2
    assert "--stream on" in out.stderr and "Traceback" not in out.stderr


def test_compile_gathers_xtx_once(toy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """compile hands the analysis' XᵀX to apply: one calibration pass for them, not two."""
    import lpcompile.analysis.input_hessians as ih
    from lpcompile.files import compile_file

    calls: list[int] = []
    real = ih.collect_input_hessians

    def counting(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ih, "collect_input_hessians", counting)
    np.savez(tmp_path / "calib.npz", input_ids=_calib(8).arrays["input_ids"])
    for stream, expected in (("off", 1), ("on", 0)):
        calls.clear()
        cfg = AnalysisConfig(rounding="gptq", probes=4, stream=stream, segment_mb=0.02)
        res = compile_file(toy, "4.5bits", out=tmp_path / f"o_{stream}.onnx", calib_path=tmp_path / "calib.npz",
                           config=cfg)
        assert len(calls) == expected, stream
        assert res.applied.output.exists()


def test_big_weights_are_scored_in_channel_slices_with_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    import lpcompile.analysis.sensitivity as sens
    from lpcompile.formats import WeightLayout, get_format

    rng = np.random.default_rng(0)
    cases = [((300, 256), WeightLayout(1, 0)), ((256, 300), WeightLayout(0, 1)), ((64, 40, 3, 3), WeightLayout(0, 1))]
    for shape, layout in cases:
        w = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        d = rng.random(shape)
        for name in ("int4_b128", "int4_b32", "int8", "fp8_e4m3", "bf16"):
            fmt = get_format(name)
            monkeypatch.setattr(sens, "PREDICT_SLICE", 1 << 30)
            whole = sens.rounding_error(fmt, w, layout, d)
            monkeypatch.setattr(sens, "PREDICT_SLICE", 5000)
            np.testing.assert_allclose(sens.rounding_error(fmt, w, layout, d), whole, rtol=1e-12)


@pytest.mark.parametrize("rounding", ["nearest", "gptq"])
def test_bf16_probes_agree_with_fp32_within_the_probe_noise(toy: Path, rounding: str) -> None:
    """--probe-dtype bfloat16: the same probes with bf16 products. Traces and predicted losses move by far less
    than another seed moves them; what the probes do not touch (activation ranges, XᵀX, the bf16 activation
    term's rounding) is the fp32 forward's exactly."""
    model = load_normalized(toy)
    cfg = AnalysisConfig(seeding="per-probe", batch_size=2, probes=8, rounding=rounding)
    store32, store16 = HessianStore(), HessianStore()
    t32 = analyze_streamed(model, _calib(), cfg, segment_bytes=20_000, hessians=store32).table
    t16 = analyze_streamed(
        model, _calib(), replace(cfg, probe_dtype="bfloat16"), segment_bytes=20_000, hessians=store16
    ).table
    other_seed = analyze_streamed(model, _calib(), replace(cfg, seed=1), segment_bytes=20_000).table
    assert t16.probe_dtype == "bfloat16" and t32.probe_dtype == "float32"

    def log_ratios(a: object, b: object) -> np.ndarray:
        pairs = [
            (c.predicted_loss, y.candidates[f].predicted_loss)
            for x, y in zip(a.nodes, b.nodes, strict=True)  # type: ignore[attr-defined]
            for f, c in x.candidates.items()
            if c.predicted_loss > 0
        ]
        return np.abs(np.log([p for p, _ in pairs]) - np.log([q for _, q in pairs]))

    bf16_err, seed_err = log_ratios(t32, t16), log_ratios(t32, other_seed)
    assert np.sqrt(np.mean(bf16_err**2)) < 0.25 * np.sqrt(np.mean(seed_err**2))
    for x, y in zip(t32.nodes, t16.nodes, strict=True):
        np.testing.assert_allclose(y.trace, x.trace, rtol=0.05)
    assert t16.activation_amax == t32.activation_amax
    assert sorted(store16) == sorted(store32)
    for name in store32:
        np.testing.assert_array_equal(store16[name], store32[name])
    store32.close()
    store16.close()


def test_bf16_probes_run_streamed_only(toy: Path) -> None:
    from lpcompile.api import use_streamed
    from lpcompile.errors import UsageError

    model = load_normalized(toy)
    assert use_streamed(model, AnalysisConfig(probe_dtype="bfloat16"))  # auto streams a small model for them
    with pytest.raises(UsageError, match=r"probe-dtype bfloat16.*probe-tol"):
        use_streamed(model, AnalysisConfig(probe_dtype="bfloat16", probe_tol=0.1))
    with pytest.raises(UsageError, match="streamed analysis"):
        analyze_onnx(model, _calib(), AnalysisConfig(probe_dtype="bfloat16"))
    with pytest.raises(UsageError, match="drop --stream off"):
        AnalysisConfig(probe_dtype="bfloat16", stream="off")
    out = subprocess.run(
        [sys.executable, "-m", "lpcompile", "analyze", str(toy), "--probe-dtype", "float16"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr


def test_a_tied_table_keeps_only_the_gathered_rows_between_its_segments(
    toy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The head's per-probe gradient of the tied embedding is squared where it is made, except on the rows the
    embedding Gather reads in that batch: only those wait for the first segment (no dense partials, no spill),
    and the table is still the whole-graph one."""
    import lpcompile.analysis.streamed as streamed

    model = load_normalized(toy)
    segs = plan_segments(model, segment_bytes=20_000)
    readers: dict[str, list[int]] = {}
    for seg in segs:
        for name in seg.initializers:
            readers.setdefault(name, []).append(seg.index)
    assert streamed._row_gathers(model, segs, readers) == {"model.embed_tokens.weight": ["input_ids"]}
    dense: list[tuple[str, int, int]] = []
    real_add = streamed._Partials.add
    monkeypatch.setattr(streamed._Partials, "add", lambda self, key, g: dense.append(key) or real_add(self, key, g))
    monkeypatch.setattr(streamed, "SPILL_BYTES", 0)
    cfg = AnalysisConfig(seeding="per-probe", batch_size=2, probes=6)
    _same_tables(analyze_onnx(model, _calib(), cfg), analyze_streamed(model, _calib(), cfg, segment_bytes=20_000).table)
    assert not [key for key in dense if key[0] == "model.embed_tokens.weight"]


def test_gathered_rows_wrap_negative_indices() -> None:
    from lpcompile.analysis.streamed import _read_rows

    rows = _read_rows([torch.tensor([[3, -1, 3]]), torch.tensor([0, -10])], 10)
    assert rows.tolist() == [0, 3, 9]
