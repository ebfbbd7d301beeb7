"""Calibration data: loading npz files and folders, checks against a model, synthetic inputs."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper

from lpcompile.errors import CalibrationError
from lpcompile.frontend.calib import (
    SYNTHETIC_WARNING,
    CalibrationSet,
    batches,
    check_against_model,
    load_calibration,
    model_input_specs,
    split,
    synthesize,
)

VOCAB = 37


def _encoder() -> onnx.ModelProto:
    """Token ids -> Gather(embedding) + mask, token_type and a float input."""
    text = """
    <ir_version: 10, opset_import: ["" : 21]>
    enc (int64[batch, seq] input_ids, int64[batch, seq] attention_mask, int64[batch, seq] token_type_ids,
         int32[batch, seq] codes, float[batch, 4] feats) => (float[batch, seq, 4] y) {
        e = Gather(emb, input_ids)
        c64 = Cast<to = 7>(codes)
        e2 = Gather(emb2, c64)
        m = Cast<to = 1>(attention_mask)
        mu = Unsqueeze(m, axes)
        s = Add(e, e2)
        y = Mul(s, mu)
    }
    """
    model = onnx.parser.parse_model(text)
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(np.zeros((VOCAB, 4), np.float32), "emb"),
            numpy_helper.from_array(np.zeros((11, 4), np.float32), "emb2"),
            numpy_helper.from_array(np.array([2], np.int64), "axes"),
        ]
    )
    return model


def test_load_npz(tmp_path) -> None:
    path = tmp_path / "calib.npz"
    np.savez(path, x=np.ones((5, 3), np.float32), ids=np.arange(10).reshape(5, 2))
    calib = load_calibration(path)
    assert calib.num_samples == 5 and set(calib.names) == {"x", "ids"}
    assert not calib.synthetic and calib.source == str(path)


def test_load_folder_sorted_and_concatenated(tmp_path) -> None:
    np.savez(tmp_path / "b.npz", x=np.full((2, 3), 2.0))
    np.savez(tmp_path / "a.npz", x=np.full((1, 3), 1.0))
    (tmp_path / "notes.txt").write_text("ignored")
    calib = load_calibration(tmp_path)
    assert calib.num_samples == 3
    assert calib.arrays["x"][:, 0].tolist() == [1.0, 2.0, 2.0]


def _write_text(path, text: str):
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: p / "missing.npz", "not found"),
        (lambda p: _write_text(p / "x.npz", "hello"), "not an .npz"),
        (lambda p: np.savez(p / "e.npz") or p / "e.npz", "no arrays"),
        (lambda p: np.savez(p / "i.npz", a=np.zeros((2, 1)), b=np.zeros((3, 1))) or p / "i.npz", "inconsistent"),
        (lambda p: np.savez(p / "z.npz", a=np.zeros((0, 2))) or p / "z.npz", "no samples"),
        (lambda p: (p / "d").mkdir() or p / "d", "no .npz, .npy or image files"),
    ],
)
def test_load_errors(tmp_path, setup, message) -> None:
    with pytest.raises(CalibrationError, match=message):
        load_calibration(setup(tmp_path))


def test_folder_with_mismatched_files(tmp_path) -> None:
    np.savez(tmp_path / "a.npz", x=np.zeros((1, 3)))
    np.savez(tmp_path / "b.npz", y=np.zeros((1, 3)))
    with pytest.raises(CalibrationError, match="disagree on array names"):
        load_calibration(tmp_path)


def test_check_against_model() -> None:
    model = _encoder()
    good = synthesize(model, num_samples=2, seq_len=3)
    check_against_model(good, model)
    check_against_model(good, ir.from_proto(model))
    bad = dict(good.arrays)
    del bad["feats"]
    bad["input_ids"] = bad["input_ids"].astype(np.float32) + 0.5
    bad["codes"] = bad["codes"][:, :, None]
    bad["extra"] = np.zeros((2,))
    with pytest.raises(CalibrationError) as info:
        check_against_model(CalibrationSet(bad, "mem"), model)
    msg = str(info.value)
    assert "\n" not in msg
    for part in ("missing input(s) feats", "unknown array(s) extra", "non-integer", "codes: rank 3"):
        assert part in msg
    wrong_dim = dict(good.arrays)
    wrong_dim["feats"] = np.zeros((2, 5), np.float32)
    with pytest.raises(CalibrationError, match="axis 1"):
        check_against_model(CalibrationSet(wrong_dim), model)


def test_synthesize_rules(caplog) -> None:
    model = _encoder()
    with caplog.at_level(logging.WARNING):
        calib = synthesize(model, num_samples=6, seed=1, seq_len=5)
    assert SYNTHETIC_WARNING in caplog.text
    assert calib.synthetic and calib.num_samples == 6
    ids = calib.arrays["input_ids"]
    assert ids.shape == (6, 5) and ids.dtype == np.int64
    assert ids.min() >= 0 and ids.max() < VOCAB and len(np.unique(ids)) > 1
    codes = calib.arrays["codes"]  # int input reaching a Gather through a Cast: vocab of emb2
    assert codes.dtype == np.int32 and codes.min() >= 0 and codes.max() < 11
    assert (calib.arrays["attention_mask"] == 1).all()
    assert (calib.arrays["token_type_ids"] == 0).all()
    feats = calib.arrays["feats"]
    assert feats.shape == (6, 4) and feats.dtype == np.float32
    # deterministic by seed
    again = synthesize(model, num_samples=6, seed=1, seq_len=5)
    other = synthesize(model, num_samples=6, seed=2, seq_len=5)
    for name in calib.names:
        np.testing.assert_array_equal(calib.arrays[name], again.arrays[name])
    assert not np.array_equal(calib.arrays["feats"], other.arrays["feats"])


def test_synthesize_fixed_batch_and_signature() -> None:
    text = """
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[2, 3] x) => (float[2, 3] y) {
        y = Relu(x)
    }
    """
    model = onnx.parser.parse_model(text)
    assert model_input_specs(model)[0].shape == (2, 3)
    calib = synthesize(model, num_samples=3)
    assert calib.num_samples == 4  # rounded up to a multiple of the fixed batch 2
    check_against_model(calib, model)
    assert [b["x"].shape for b in batches(calib, 2)] == [(2, 3), (2, 3)]


def test_batches_and_split() -> None:
    calib = CalibrationSet({"x": np.arange(10).reshape(5, 2)}, "mem")
    assert [b["x"].shape[0] for b in batches(calib, 2)] == [2, 2, 1]
    assert [b["x"].shape[0] for b in batches(calib, 2, drop_last=True)] == [2, 2]
    first, rest = split(calib, 3)
    assert first.num_samples == 3 and rest.num_samples == 2
    assert rest.arrays["x"][0].tolist() == [6, 7]
    everything, nothing = split(calib, 5)
    assert everything.num_samples == 5 and nothing.num_samples == 0
    assert list(batches(nothing, 2)) == []
    for bad in (-1, 6):
        with pytest.raises(CalibrationError, match="cannot split"):
            split(calib, bad)


def test_trim_padding_cuts_only_all_padding_columns() -> None:
    from lpcompile.frontend.calib import trim_padding

    batch = {
        "input_ids": np.array([[5, 6, 7, 0, 0], [8, 9, 0, 0, 0]]),
        "attention_mask": np.array([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]),
        "pixels": np.ones((2, 5), dtype=np.float32) * 2,
    }
    out = trim_padding(batch)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert out["attention_mask"].shape == (2, 3)
    assert out["pixels"].shape == (2, 3)  # same [batch, seq] shape: trimmed too
    full = {"input_ids": batch["input_ids"], "attention_mask": np.ones((2, 5), dtype=np.int64)}
    assert trim_padding(full)["input_ids"].shape == (2, 5)
    assert trim_padding({"x": np.zeros((2, 5))})["x"].shape == (2, 5)  # no mask: unchanged


def test_trim_padding_respects_a_fixed_sequence_length() -> None:
    from onnx import TensorProto, helper

    from lpcompile.frontend.calib import dynamic_sequence_inputs, trim_padding

    def model(seq: object) -> onnx.ModelProto:
        inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["b", seq]) for n in ("ids", "attention_mask")]
        out = helper.make_tensor_value_info("y", TensorProto.INT64, ["b", seq])
        graph = helper.make_graph([helper.make_node("Add", ["ids", "attention_mask"], ["y"])], "g", inputs, [out])
        return helper.make_model(graph)

    batch = {"ids": np.array([[3, 4, 0, 0]]), "attention_mask": np.array([[1, 1, 0, 0]])}
    assert dynamic_sequence_inputs(model("s")) == {"ids", "attention_mask"}
    assert trim_padding(batch, dynamic_sequence_inputs(model("s")))["ids"].shape == (1, 2)
    assert dynamic_sequence_inputs(model(4)) == frozenset()
    assert trim_padding(batch, dynamic_sequence_inputs(model(4)))["ids"].shape == (1, 4)
