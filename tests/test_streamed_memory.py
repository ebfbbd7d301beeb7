"""Issue 18, SmolLM2's compile memory: the changes that keep less in memory give the same numbers."""

from __future__ import annotations

import gc
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from lpcompile.analysis import losses
from lpcompile.analysis.config import AnalysisConfig
from lpcompile.analysis.interpreter import TorchGraph
from lpcompile.analysis.sensitivity import analyze_onnx
from lpcompile.analysis.streamed import analyze_streamed
from lpcompile.files import load_normalized
from lpcompile.frontend.calib import CalibrationSet
from lpcompile.frontend.synth_llama import PRESETS, write_llama


def _kl_probe_whole(y_ref: torch.Tensor, gen: torch.Generator, mask: object) -> torch.Tensor:
    """The KL probe as it was before it drew its signs block by block (one draw of the whole tensor)."""
    y = y_ref.detach()
    u8 = torch.randint(0, 2, y.shape, generator=gen, dtype=torch.int8)
    vocab = max(int(y.shape[-1]), 1) if y.ndim else 1
    rows = y.reshape(-1, vocab)
    u_rows = u8.reshape(-1, vocab)
    m = losses._torch_mask(mask, y.to(torch.float64)[..., :1], 1)
    m_rows = m.reshape(-1, 1) if m is not None else None
    div = math.sqrt(max(rows.shape[0], 1)) if m is None else math.sqrt(float(m.sum().clamp_min(1.0)))
    out = torch.empty(rows.shape, dtype=y_ref.dtype)
    step = max(1, losses._KL_CHUNK // vocab)
    for start in range(0, rows.shape[0], step):
        sl = slice(start, start + step)
        y0 = rows[sl].to(torch.float64)
        u = u_rows[sl].to(torch.float64).mul_(2).sub_(1)
        p = torch.softmax(y0, dim=-1)
        a = p.sqrt()
        z = a * u - p * (a * u).sum(-1, keepdim=True)
        if m_rows is not None:
            z = z * m_rows[sl]
        out[sl] = (z / div).to(y_ref.dtype)
    return out.reshape(y.shape)


@pytest.mark.parametrize("chunk", [1 << 22, 30, 7])
@pytest.mark.parametrize("masked", [False, True])
def test_kl_probe_drawn_in_blocks_is_the_whole_tensor_probe(
    chunk: int, masked: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(losses, "_KL_CHUNK", chunk)  # 30 // 7 = 4 rows a block: blocks split the samples
    y = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0))
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=np.int64) if masked else None
    new = losses.ggn_output_probe(y, "kl", torch.Generator().manual_seed(5), mask)
    old = _kl_probe_whole(y, torch.Generator().manual_seed(5), mask)
    assert torch.equal(new, old)


def _two_output_model(path: Path) -> Path:
    """x → MatMul → y1 (an output) → Relu → MatMul → y2 (an output): the outputs come out of two segments."""
    rng = np.random.default_rng(0)
    w1 = onnx.numpy_helper.from_array((rng.standard_normal((16, 16)) * 0.3).astype(np.float32), "w1")
    w2 = onnx.numpy_helper.from_array((rng.standard_normal((16, 4)) * 0.3).astype(np.float32), "w2")
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("MatMul", ["x", "w1"], ["y1"], name="mm1"),
            onnx.helper.make_node("Relu", ["y1"], ["r"], name="relu"),
            onnx.helper.make_node("MatMul", ["r", "w2"], ["y2"], name="mm2"),
        ],
        "two",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 16])],
        [
            onnx.helper.make_tensor_value_info("y1", onnx.TensorProto.FLOAT, ["n", 16]),
            onnx.helper.make_tensor_value_info("y2", onnx.TensorProto.FLOAT, ["n", 4]),
        ],
        [w1, w2],
    )
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)]), path)
    return path


def test_outputs_of_several_segments_are_kept_from_the_forward_pass(tmp_path: Path) -> None:
    from tests.test_streamed import _same_tables

    model = load_normalized(_two_output_model(tmp_path / "two.onnx"))
    x = np.random.default_rng(1).standard_normal((24, 16)).astype(np.float32)
    calib = CalibrationSet(arrays={"x": x}, source="random")
    cfg = AnalysisConfig(seeding="per-probe", batch_size=8, probes=6)
    res = analyze_streamed(model, calib, cfg, segment_bytes=1)
    assert res.table.timings["segments"] >= 2
    _same_tables(analyze_onnx(model, calib, cfg), res.table)


def test_spilled_weights_compile_to_the_same_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A streamed compile reading its weights from the temporary copy writes the same model and plan."""
    import lpcompile.files as files
    from lpcompile.frontend.onnx_io import StreamedTensor

    toy = write_llama(tmp_path / "toy.onnx", PRESETS["toy"], seed=0)
    ids = np.random.default_rng(1).integers(0, PRESETS["toy"].vocab, (8, 12)).astype(np.int64)
    np.savez(tmp_path / "calib.npz", input_ids=ids)
    cfg = AnalysisConfig(probes=4, stream="on", segment_mb=0.02)
    outs = {}
    for key, limit in (("kept", 1 << 40), ("spilled", 0)):
        monkeypatch.setattr(files, "SPILL_EMBEDDED_BYTES", limit)
        out = tmp_path / f"{key}.lp.onnx"
        files.compile_file(toy, "4.5bits", out=out, calib_path=tmp_path / "calib.npz", config=cfg)
        outs[key] = out
    assert outs["kept"].read_bytes() == outs["spilled"].read_bytes()
    assert files.plan_path_for(outs["kept"]).read_text() == files.plan_path_for(outs["spilled"]).read_text()

    model = load_normalized(toy)
    before = {n: v.const_value.numpy().copy() for n, v in model.graph.initializers.items()}
    assert files.spill_embedded_weights(model, 0) > 0
    folder = Path(model.meta[files.SPILLED_META].name)
    assert (folder / "weights.data").is_file()
    streamed = [v for v in model.graph.initializers.values() if isinstance(v.const_value, StreamedTensor)]
    assert streamed
    for n, v in model.graph.initializers.items():
        np.testing.assert_array_equal(v.const_value.numpy(), before[n])
    assert files.spill_embedded_weights(load_normalized(toy), 1 << 40) == 0  # below the limit: kept in memory
    del model, streamed, v
    gc.collect()
    assert not folder.exists()  # the copy goes with the model


def test_guard_measures_a_big_embedded_model_from_an_external_data_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lpcompile.guard as guard
    from lpcompile.files import apply_file

    examples = Path(__file__).resolve().parents[1] / "examples" / "models"
    src = examples / "digits_mlp.onnx"
    out = tmp_path / "digits.lp.onnx"
    apply_file(src, out, uniform="int4_b32")
    data = np.load(examples / "digits_calib.npz")
    heldout = CalibrationSet(arrays={k: data[k][:32] for k in data.files}, source="digits")
    whole = guard.check_quality(out, src, heldout)
    with guard.lean_model_file(src) as same:
        assert same == src  # small: as it is
    monkeypatch.setattr(guard, "LEAN_REFERENCE_BYTES", 0)
    with guard.lean_model_file(src) as copy:
        assert copy != src and Path(str(copy) + ".data").is_file()
        folder = Path(copy).parent
    assert not folder.exists()
    lean = guard.check_quality(out, src, heldout)
    assert lean.distortion == whole.distortion and lean.top1 == whole.top1


def test_an_activation_computed_from_inputs_alone_still_gets_its_gradient(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """x → Relu → MatMul: no weight is upstream of the MatMul's activation, so the streamed analysis
    takes its gradient through an additive perturbation leaf (elsewhere at the tensor itself)."""
    from tests.test_streamed import _same_tables

    rng = np.random.default_rng(2)
    w = onnx.numpy_helper.from_array((rng.standard_normal((16, 10)) * 0.3).astype(np.float32), "w")
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("Relu", ["x"], ["r"], name="relu"),
            onnx.helper.make_node("MatMul", ["r", "w"], ["y"], name="mm"),
        ],
        "relu_mm",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 16])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 10])],
        [w],
    )
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)]), tmp_path / "m.onnx")
    model = load_normalized(tmp_path / "m.onnx")
    x = rng.standard_normal((16, 16)).astype(np.float32)
    calib = CalibrationSet(arrays={"x": x}, source="random")
    cfg = AnalysisConfig(seeding="per-probe", batch_size=8, probes=4)
    perturbed: list[object] = []
    real = TorchGraph.forward

    def forward(self: TorchGraph, *args: object, **kwargs: object) -> object:
        perturbed.append(kwargs.get("perturb"))
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(TorchGraph, "forward", forward)
    streamed = analyze_streamed(model, calib, cfg, segment_bytes=1).table
    assert {"r": None} in perturbed  # the leaf was used
    _same_tables(analyze_onnx(model, calib, cfg), streamed)
    row = streamed.nodes[0]
    assert row.candidates["fp8_e4m3"].predicted_loss > row.candidates["bf16w"].predicted_loss  # activation term


def test_default_segments_are_not_raised_to_the_largest_tensor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default segment size is the weights / 16 (within bounds): a big embedding table no longer makes
    every segment as big as itself; a given size still is."""
    import lpcompile.analysis.streamed as streamed

    toy = write_llama(tmp_path / "toy.onnx", PRESETS["toy"], seed=0)
    model = load_normalized(toy)
    table = model.graph.initializers["model.embed_tokens.weight"].const_value.nbytes
    monkeypatch.setattr(streamed, "MIN_SEGMENT_BYTES", 1)
    default = streamed.plan_segments(model)
    given = streamed.plan_segments(model, segment_bytes=1)
    assert len(default) > len(given)
    assert min(s.weight_bytes for s in default) < table
    assert default[0].nodes[0] == 0 and default[-1].nodes[1] == len(list(model.graph))


@pytest.mark.parametrize("masked", [False, True])
def test_distortion_measured_a_position_at_a_time_is_the_same_number(
    masked: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(3)
    ref = {"logits": (rng.standard_normal((3, 20, 300)) * 3).astype(np.float32)}
    test = {"logits": ref["logits"] + (rng.standard_normal((3, 20, 300)) * 0.2).astype(np.float32)}
    mask = {"logits": (rng.random((3, 20)) > 0.3).astype(np.int64)} if masked else None
    whole = losses.numpy_distortion(test, ref, {"logits": "kl"}, mask)
    import lpcompile.metrics as metrics

    monkeypatch.setattr(metrics, "KL_ROWS_ELEMENTS", 300)  # one position (300 classes) at a time
    assert losses.numpy_distortion(test, ref, {"logits": "kl"}, mask) == whole
    test["logits"][1, 4, 7] = np.nan
    assert math.isnan(losses.numpy_distortion(test, ref, {"logits": "kl"}, mask))
