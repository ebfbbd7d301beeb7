"""Models as they come (issue 14): one small model per class of third-party export that used to fail.

1. dynamic image H/W with MaxPool / Add / Concat skip paths that break at 16×16;
2. a fixed batch of 1 with a symbolic width (an OCR-like recogniser, per-position softmax);
3. an encoder that also returns int64 and weight-independent outputs;
4. a stateful model: a scalar sample-rate input, a recurrent state with the batch on axis 1;
5. a causal-LM-like model: rank-3 logits, a second output, an attention mask with padding.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from lpcompile.errors import CalibrationError, UsageError
from lpcompile.frontend.calib import (
    SAMPLE_AXIS_PREFIX,
    batches,
    calibration_for,
    check_against_model,
    load_calibration,
    synthesize,
)
from lpcompile.frontend.input_spec import (
    ShapeOverride,
    fixed_batch_size,
    model_input_specs,
    parse_input_shape,
    parse_input_shapes,
    resolve_input_shapes,
    sample_axis,
)

OPSET = 21


def _w(rng: np.random.Generator, *shape: int, scale: float | None = None) -> np.ndarray:
    fan_in = int(np.prod(shape[1:])) if len(shape) == 4 else shape[0]
    s = scale if scale is not None else 1.0 / np.sqrt(fan_in)
    return (rng.standard_normal(shape) * s).astype(np.float32)


def _model(nodes, inputs, outputs, inits, name: str) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model


def detector() -> onnx.ModelProto:
    """Class 1: images[batch, 3, height, width]; needs H, W ≥ 64 (two even-size skip Adds, a 3×3 valid MaxPool)."""
    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array(_w(rng, 8, 3, 3, 3), "c1.w"),
        numpy_helper.from_array(_w(rng, 8, 8, 3, 3), "c2.w"),
        numpy_helper.from_array(_w(rng, 16, 16, 3, 3), "c3.w"),
        numpy_helper.from_array(_w(rng, 32, 10), "head.w"),
    ]
    n = helper.make_node
    nodes = [
        n("Conv", ["images", "c1.w"], ["a"], name="c1", strides=[2, 2], pads=[1, 1, 1, 1]),
        n("Relu", ["a"], ["ar"]),
        n("MaxPool", ["ar"], ["b"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        n("Conv", ["b", "c2.w"], ["c"], name="c2", strides=[2, 2], pads=[1, 1, 1, 1]),
        n("MaxPool", ["b"], ["d"], name="skip1", kernel_shape=[2, 2], strides=[2, 2]),
        n("Add", ["c", "d"], ["cd"], name="add1"),
        n("Concat", ["cd", "d"], ["cat"], name="cat1", axis=1),
        n("Conv", ["cat", "c3.w"], ["e"], name="c3", strides=[2, 2], pads=[1, 1, 1, 1]),
        n("MaxPool", ["cat"], ["f"], name="skip2", kernel_shape=[2, 2], strides=[2, 2]),
        n("Add", ["e", "f"], ["ef"], name="add2"),
        n("Concat", ["ef", "f"], ["cat2"], name="cat2", axis=1),
        n("MaxPool", ["cat2"], ["g"], name="pool3", kernel_shape=[3, 3], strides=[1, 1]),
        n("GlobalAveragePool", ["g"], ["gp"]),
        n("Flatten", ["gp"], ["flat"], axis=1),
        n("MatMul", ["flat", "head.w"], ["logits"], name="head"),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, "height", "width"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        inits,
        "detector",
    )


def recogniser() -> onnx.ModelProto:
    """Class 2: input1[1, 1, 16, image_width] → per-position class probabilities [1, width/2, 12]."""
    rng = np.random.default_rng(2)
    inits = [
        numpy_helper.from_array(_w(rng, 8, 1, 3, 3), "conv.w"),
        numpy_helper.from_array(_w(rng, 64, 64), "fc.w"),
        numpy_helper.from_array(_w(rng, 64, 12), "cls.w"),
        numpy_helper.from_array(np.array([1, -1, 64], np.int64), "seq_shape"),
    ]
    n = helper.make_node
    nodes = [
        n("Conv", ["input1", "conv.w"], ["a"], name="conv", pads=[1, 1, 1, 1]),
        n("Relu", ["a"], ["ar"]),
        n("MaxPool", ["ar"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),  # [1, 8, 8, W/2]
        n("Transpose", ["p"], ["t"], perm=[0, 3, 1, 2]),  # [1, W/2, 8, 8]
        n("Reshape", ["t", "seq_shape"], ["seq"]),  # [1, W/2, 64]
        n("MatMul", ["seq", "fc.w"], ["h"], name="fc"),
        n("Tanh", ["h"], ["ht"]),
        n("MatMul", ["ht", "cls.w"], ["z"], name="cls"),
        n("Softmax", ["z"], ["probs"], axis=-1),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("input1", TensorProto.FLOAT, [1, 1, 16, "image_width"])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, None, 12])],
        inits,
        "recogniser",
    )


VOCAB = 128
HIDDEN = 64


def encoder() -> onnx.ModelProto:
    """Class 3: a sentence encoder that also returns int64 tensors and a weight-free float output."""
    rng = np.random.default_rng(3)
    inits = [
        numpy_helper.from_array(_w(rng, VOCAB, HIDDEN, scale=1.0), "emb"),
        numpy_helper.from_array(_w(rng, HIDDEN, HIDDEN), "proj.w"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(np.array([2], np.int64), "axis2"),
    ]
    n = helper.make_node
    nodes = [
        n("Gather", ["emb", "input_ids"], ["e"], name="embed"),
        n("MatMul", ["e", "proj.w"], ["hidden"], name="proj"),
        n("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
        n("Unsqueeze", ["m", "axis2"], ["mu"]),
        n("Mul", ["hidden", "mu"], ["masked"]),
        n("ReduceSum", ["masked", "axis1"], ["summed"], keepdims=0),
        n("ReduceSum", ["m", "axis1"], ["count"], keepdims=1),
        n("Div", ["summed", "count"], ["sentence_embedding"]),
        n("ReduceSum", ["attention_mask", "axis1"], ["token_count"], keepdims=0),
        n("ArgMax", ["hidden"], ["top_dim"], axis=-1, keepdims=0),
        n("Identity", ["count"], ["mask_fraction"]),
    ]
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])
    return _model(
        nodes,
        [ids, mask],
        [
            helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", HIDDEN]),
            helper.make_tensor_value_info("token_count", TensorProto.INT64, ["batch"]),
            helper.make_tensor_value_info("top_dim", TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info("mask_fraction", TensorProto.FLOAT, ["batch", 1]),
        ],
        inits,
        "encoder",
    )


def vad() -> onnx.ModelProto:
    """Class 4: input[batch, 64], sr (int64 scalar), state[2, batch, 16] → output[batch, 1], stateN."""
    rng = np.random.default_rng(4)
    inits = [
        numpy_helper.from_array(_w(rng, 64, 16), "in.w"),
        numpy_helper.from_array(_w(rng, 16, 16), "rec.w"),
        numpy_helper.from_array(_w(rng, 16, 1), "out.w"),
        numpy_helper.from_array(np.array(16000.0, np.float32), "rate"),
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        numpy_helper.from_array(np.array(1, np.int64), "one"),
        numpy_helper.from_array(np.array([0], np.int64), "axis0"),
    ]
    n = helper.make_node
    nodes = [
        n("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT),
        n("Div", ["srf", "rate"], ["gain"]),
        n("Mul", ["input", "gain"], ["xin"]),
        n("MatMul", ["xin", "in.w"], ["x"], name="in"),
        n("Gather", ["state", "zero"], ["h"], axis=0),
        n("Gather", ["state", "one"], ["c"], axis=0),
        n("MatMul", ["h", "rec.w"], ["hr"], name="rec"),
        n("Add", ["x", "hr"], ["pre"]),
        n("Add", ["pre", "c"], ["pre2"]),
        n("Tanh", ["pre2"], ["hn"]),
        n("MatMul", ["hn", "out.w"], ["o"], name="out"),
        n("Sigmoid", ["o"], ["output"]),
        n("Unsqueeze", ["hn", "axis0"], ["hn0"]),
        n("Unsqueeze", ["pre", "axis0"], ["cn0"]),
        n("Concat", ["hn0", "cn0"], ["stateN"], axis=0),
    ]
    return _model(
        nodes,
        [
            helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", 16]),
        ],
        [
            helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 1]),
            helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, "batch", 16]),
        ],
        inits,
        "vad",
    )


def causal_lm() -> onnx.ModelProto:
    """Class 5: input_ids/attention_mask[batch, sequence] → output [batch, sequence, VOCAB] logits + hidden."""
    rng = np.random.default_rng(5)
    inits = [
        numpy_helper.from_array(_w(rng, VOCAB, HIDDEN, scale=1.0), "embed.w"),
        numpy_helper.from_array(_w(rng, HIDDEN, 2 * HIDDEN), "up.w"),
        numpy_helper.from_array(_w(rng, 2 * HIDDEN, HIDDEN), "down.w"),
        numpy_helper.from_array(_w(rng, HIDDEN, VOCAB, scale=0.5), "lm_head.w"),
        numpy_helper.from_array(np.array([2], np.int64), "axis2"),
    ]
    n = helper.make_node
    nodes = [
        n("Gather", ["embed.w", "input_ids"], ["e"], name="embed"),
        n("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
        n("Unsqueeze", ["m", "axis2"], ["mu"]),
        n("Mul", ["e", "mu"], ["em"]),
        n("MatMul", ["em", "up.w"], ["u"], name="up"),
        n("Relu", ["u"], ["ur"]),
        n("MatMul", ["ur", "down.w"], ["dn"], name="down"),
        n("Add", ["dn", "e"], ["last_hidden_state"]),
        n("MatMul", ["last_hidden_state", "lm_head.w"], ["output"], name="lm_head"),
    ]
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])
    return _model(
        nodes,
        [ids, mask],
        [
            helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", "sequence", VOCAB]),
            helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", HIDDEN]),
        ],
        inits,
        "causal_lm",
    )


def padded_tokens(n: int = 12, seq: int = 10, seed: int = 0) -> dict[str, np.ndarray]:
    """Token ids with right padding (lengths 3..seq), and the attention mask."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, size=(n, seq)).astype(np.int64)
    lengths = rng.integers(3, seq + 1, size=n)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    return {"input_ids": ids * mask, "attention_mask": mask}


# --------------------------------------------------------------------------------------------
# input specs


def test_parse_input_shape_forms() -> None:
    assert parse_input_shape("images=1x3x640x640") == ShapeOverride("images", (1, 3, 640, 640))
    assert parse_input_shape("input1=batch:1,image_width:320") == ShapeOverride(
        "input1", None, (("batch", 1), ("image_width", 320))
    )
    assert parse_input_shape("x=3:320").sizes == ((3, 320),)
    assert parse_input_shape("width:320").name is None
    assert len(parse_input_shapes(["a=1x2 b=batch:2", "c=4"])) == 3
    for bad in ("", "=1x2", "x=", "x=1xy", "x=0x3", "x=batch:0", "1x3", "x=batch:1,width"):
        with pytest.raises(UsageError):
            parse_input_shape(bad)


def test_sample_axes_and_fixed_batch_come_from_the_model() -> None:
    specs = {s.name: s for s in model_input_specs(vad())}
    all_specs = list(specs.values())
    assert [sample_axis(specs[k], all_specs) for k in ("input", "sr", "state")] == [0, None, 1]
    assert fixed_batch_size(all_specs) is None
    assert fixed_batch_size(recogniser()) == 1


def test_class1_probe_finds_a_size_the_model_runs_at() -> None:
    model = detector()
    calib = synthesize(model, num_samples=4)
    assert calib.arrays["images"].shape == (4, 3, 64, 64)  # 16 and 32 fail in MaxPool / Add
    assert calib.shapes is not None and len(calib.shapes.tried) == 3


def test_class1_flag_and_one_line_error() -> None:
    model = detector()
    calib = synthesize(model, num_samples=2, input_shapes=parse_input_shapes(["images=1x3x96x96"]))
    assert calib.arrays["images"].shape == (2, 3, 96, 96) and calib.fixed_batch == 1
    calib = synthesize(model, num_samples=3, input_shapes=parse_input_shapes(["height:128,width:64"]))
    assert calib.arrays["images"].shape == (3, 3, 128, 64) and calib.fixed_batch is None
    with pytest.raises(CalibrationError) as info:
        synthesize(model, num_samples=2, input_shapes=parse_input_shapes(["images=batch:1,height:40,width:40"]))
    msg = str(info.value)
    assert "\n" not in msg and "images 1x3x40x40" in msg and "--input-shape images=" in msg and "--calib" in msg
    assert "MaxPool" in msg or "Add" in msg or "Concat" in msg
    with pytest.raises(UsageError, match="fixed to 3"):
        resolve_input_shapes(model, parse_input_shapes(["images=1x4x64x64"]))
    with pytest.raises(UsageError, match="unknown input"):
        resolve_input_shapes(model, parse_input_shapes(["pixels=1x3x64x64"]))


def test_class2_fixed_batch_honoured_in_batches(tmp_path) -> None:
    model = recogniser()
    calib = synthesize(model, num_samples=5)
    assert calib.fixed_batch == 1 and calib.num_samples == 5
    assert all(b["input1"].shape == (1, 1, 16, 16) for b in batches(calib, 8))
    path = tmp_path / "lines.npz"
    np.savez(path, input1=np.random.default_rng(0).standard_normal((6, 1, 16, 40)).astype(np.float32))
    real = calibration_for(model, path)
    assert real.fixed_batch == 1 and len(list(batches(real, 8))) == 6


def test_class4_state_on_axis_1_and_a_scalar(tmp_path) -> None:
    model = vad()
    rng = np.random.default_rng(0)
    path = tmp_path / "audio.npz"
    np.savez(
        path,
        input=rng.standard_normal((64, 64)).astype(np.float32),
        sr=np.int64(16000),
        state=np.zeros((2, 64, 16), np.float32),
    )
    calib = calibration_for(model, path)
    assert calib.sample_axes == {"input": 0, "sr": None, "state": 1} and calib.num_samples == 64
    first = next(batches(calib, 8))
    assert first["state"].shape == (2, 8, 16) and first["sr"].shape == () and first["input"].shape == (8, 64)
    # without the model, an explicit entry gives the layout
    explicit = tmp_path / "explicit.npz"
    np.savez(
        explicit,
        input=np.zeros((4, 64), np.float32),
        sr=np.int64(8000),
        state=np.zeros((2, 4, 16), np.float32),
        **{SAMPLE_AXIS_PREFIX + "state": np.int64(1)},
    )
    loaded = load_calibration(explicit)
    assert loaded.num_samples == 4 and check_against_model(loaded, model).sample_axes["state"] == 1
    with pytest.raises(CalibrationError, match=r"inconsistent sample counts.*_sample_axis"):
        load_calibration(path)  # without the model: axis 0 everywhere, 64 vs 2
    synth = synthesize(model, num_samples=4)
    assert synth.arrays["sr"].shape == () and int(synth.arrays["sr"]) == 16000
    assert synth.arrays["state"].shape == (2, 4, 16) and not synth.arrays["state"].any()


def test_folder_of_npy_files(tmp_path) -> None:
    data = padded_tokens(4, 6)
    for k, v in data.items():
        np.save(tmp_path / f"{k}.npy", v)
    calib = calibration_for(causal_lm(), tmp_path)
    assert calib.num_samples == 4 and set(calib.names) == {"input_ids", "attention_mask"}


def test_synthetic_tokens_probe_only_when_dims_are_free() -> None:
    calls: list[dict[str, tuple[int, ...]]] = []

    def probe(inputs) -> None:  # type: ignore[no-untyped-def]
        calls.append({k: v.shape for k, v in inputs.items()})

    synthesize(causal_lm(), num_samples=2, probe=probe)
    assert calls == [{"input_ids": (1, 16), "attention_mask": (1, 16)}]
    calls.clear()
    fixed = onnx.parser.parse_model(
        '<ir_version: 10, opset_import: ["" : 21]> g (float[2, 3] x) => (float[2, 3] y) { y = Relu(x) }'
    )
    synthesize(fixed, num_samples=2, probe=probe)
    assert calls == []


def test_ir_and_proto_give_the_same_specs() -> None:
    model = vad()
    assert model_input_specs(model) == model_input_specs(ir.from_proto(model))


# --------------------------------------------------------------------------------------------
# the distortion loss: outputs that matter, padding, rank-3 logits


def test_choose_outputs_per_class() -> None:
    from lpcompile.analysis.losses import choose_outputs

    enc = choose_outputs(encoder())
    assert enc.names == ("sentence_embedding",)
    assert dict(enc.skipped) == {
        "token_count": "int64",
        "top_dim": "int64",
        "mask_fraction": "does not depend on weights",
    }
    lm = choose_outputs(causal_lm())
    terms = {o.name: (o.loss, o.kind, o.mask) for o in lm.outputs}
    assert terms == {
        "output": ("kl", "sequence", "attention_mask"),  # rank-3 logits (last dim = the vocabulary) -> KL
        "last_hidden_state": ("mse", "tensor", "attention_mask"),
    }
    assert "KL over positions" in lm.describe() and "padding masked by attention_mask" in lm.describe()
    assert choose_outputs(recogniser()).outputs[0].kind == "sequence"  # per-step softmax
    assert choose_outputs(causal_lm(), ["last_hidden_state"]).names == ("last_hidden_state",)
    with pytest.raises(UsageError, match="unknown output"):
        choose_outputs(causal_lm(), ["logits"])
    with pytest.raises(UsageError, match="no gradient"):
        choose_outputs(encoder(), ["token_count"])


def test_padding_is_masked_in_both_distortions() -> None:
    import torch

    from lpcompile.analysis.losses import choose_outputs, numpy_distortion, torch_distortion

    spec = choose_outputs(causal_lm())
    rng = np.random.default_rng(0)
    ref = {"output": rng.standard_normal((2, 5, VOCAB)), "last_hidden_state": rng.standard_normal((2, 5, HIDDEN))}
    test = {k: v + 0.1 * rng.standard_normal(v.shape) for k, v in ref.items()}
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    garbage = {k: v.copy() for k, v in test.items()}
    for v in garbage.values():
        v[mask == 0] += 100.0  # padded positions may hold anything
    masks = spec.masks({"attention_mask": mask}, {k: v.shape for k, v in ref.items()})
    clean = numpy_distortion(test, ref, spec.kinds(), masks)
    assert numpy_distortion(garbage, ref, spec.kinds(), masks) == pytest.approx(clean, rel=1e-12)
    assert numpy_distortion(garbage, ref, spec.kinds()) > 10 * clean  # unmasked, padding dominates
    t = torch_distortion(
        {k: torch.from_numpy(v) for k, v in garbage.items()},
        {k: torch.from_numpy(v) for k, v in ref.items()},
        spec.kinds(),
        masks,
    )
    assert float(t) == pytest.approx(clean, rel=1e-9)


@pytest.mark.parametrize("loss", ["kl", "mse"])
def test_masked_ggn_probe_has_the_masked_hessian_as_covariance(loss: str) -> None:
    import torch

    from lpcompile.analysis.losses import ggn_output_probe, torch_distortion

    y0 = torch.from_numpy(np.random.default_rng(1).standard_normal((2, 3, 4)))
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    f = lambda y: torch_distortion({"y": y}, {"y": y0}, {"y": loss}, {"y": mask})  # noqa: E731
    hess = torch.autograd.functional.hessian(f, y0.clone()).reshape(24, 24)
    gen = torch.Generator().manual_seed(0)
    n = 3000
    zs = torch.stack([ggn_output_probe(y0, loss, gen, mask).reshape(-1) for _ in range(n)])
    cov = zs.T @ zs / n
    # Monte-Carlo covariance of n probes: error ~ 1/sqrt(n) ≈ 1.8 % of the largest entry; allow 4 standard errors
    assert torch.allclose(cov, hess, atol=4 / np.sqrt(n) * float(hess.abs().max()))


# --------------------------------------------------------------------------------------------
# the README command on each class


def _compile(tmp_path, model: onnx.ModelProto, budget: str = "4.5bits", calib=None, **kw):  # type: ignore[no-untyped-def]
    from lpcompile.analysis.config import AnalysisConfig
    from lpcompile.files import compile_file

    src = tmp_path / "model.onnx"
    onnx.save(model, str(src))
    out = tmp_path / "model.lp.onnx"
    result = compile_file(src, budget, out=out, calib_path=calib, config=AnalysisConfig(probes=4), **kw)
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    return result


@pytest.mark.parametrize("build", [detector, recogniser, vad])
def test_classes_1_2_4_compile_without_data(tmp_path, build) -> None:  # type: ignore[no-untyped-def]
    result = _compile(tmp_path, build(), budget="6bits")
    assert result.plan.nodes and result.applied.output.exists()


def test_guard_fires_on_a_model_built_to_break_at_4_5_bits(tmp_path) -> None:
    from lpcompile.frontend.calib import load_calibration
    from lpcompile.guard import check_quality

    model, calib, held = breaker(tmp_path)
    result = _compile(tmp_path, model, "4.5bits", calib)
    guard = check_quality(
        result.applied.output, tmp_path / "model.onnx", load_calibration(held), plan=result.plan, table=result.table
    )
    assert guard.fired and guard.distortion > 0.1 and guard.threshold_source == "default"
    assert guard.worst_nodes[0][0] == "fc1" and guard.worst_nodes[0][1].startswith("int4")
    assert guard.suggested_budget is not None and float(guard.suggested_budget.removesuffix("bits")) > 4.5
    msg = guard.message()
    assert "\n" not in msg and "QUALITY WARNING" in msg and "fc1" in msg and "--budget" in msg
    strict = check_quality(result.applied.output, tmp_path / "model.onnx", load_calibration(held), strict=True)
    assert strict.exit_code == 1
    # a loose --max-loss silences it
    loose = check_quality(result.applied.output, tmp_path / "model.onnx", load_calibration(held), max_loss=1e3)
    assert not loose.fired and loose.exit_code == 0


def breaker(folder) -> tuple[onnx.ModelProto, object, object]:  # type: ignore[no-untyped-def]
    """fc1 [256, 256] has 50× outliers on every 16th input row, inputs the data leaves ~0: int4 blocks
    scaled by those outliers round every live weight to zero, and at 4.5 bits fc1 (97 % of the
    weights) cannot avoid int4."""
    rng = np.random.default_rng(0)
    d = 256
    w1 = (rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32)
    w1[::16, :] = 50.0 * np.sign(rng.standard_normal((d // 16, d))) / np.sqrt(d)
    w2 = (8.0 * rng.standard_normal((d, 10)) / np.sqrt(d)).astype(np.float32)
    n = helper.make_node
    model = _model(
        [
            n("MatMul", ["x", "w1"], ["h"], name="fc1"),
            n("Relu", ["h"], ["hr"]),
            n("MatMul", ["hr", "w2"], ["logits"], name="fc2"),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", d])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
        "breaker",
    )
    paths = []
    for name, seed in (("calib.npz", 1), ("held.npz", 2)):
        x = np.random.default_rng(seed).standard_normal((48, d)).astype(np.float32)
        x[:, ::16] *= 1e-4
        np.savez(folder / name, x=x)
        paths.append(folder / name)
    return model, paths[0], paths[1]


@pytest.mark.slow
def test_guard_is_silent_on_the_example_models(tmp_path) -> None:
    pytest.importorskip("sklearn")
    from lpcompile.examples import build_digits
    from lpcompile.frontend.calib import load_calibration
    from lpcompile.guard import check_quality

    art = build_digits(tmp_path)
    held = load_calibration(art.heldout)
    for model in (art.mlp, art.cnn):
        out = tmp_path / f"{model.stem}.lp.onnx"
        from lpcompile.files import compile_file

        result = compile_file(model, "4.5bits", out=out, calib_path=art.calib)
        guard = check_quality(out, model, held, plan=result.plan, table=result.table)
        assert not guard.fired, guard.message()
        assert guard.distortion < 0.05  # measured 4.1e-05 (MLP) and 3.0e-03 (CNN) at 4.5 bits


@pytest.mark.parametrize("build", [encoder, causal_lm])
def test_classes_3_5_compile_without_data(tmp_path, build) -> None:  # type: ignore[no-untyped-def]
    result = _compile(tmp_path, build(), budget="6bits")
    assert result.table.loss_outputs is not None
    names = [o["name"] for o in result.table.loss_outputs["outputs"]]
    assert names == (["sentence_embedding"] if build is encoder else ["output", "last_hidden_state"])


def test_classes_2_4_5_compile_with_real_data(tmp_path) -> None:
    rng = np.random.default_rng(0)
    lines = tmp_path / "lines.npz"
    np.savez(lines, input1=rng.standard_normal((5, 1, 16, 24)).astype(np.float32))
    assert _compile(tmp_path, recogniser(), "6bits", lines).table.num_samples == 5
    audio = tmp_path / "audio.npz"
    np.savez(
        audio,
        input=rng.standard_normal((24, 64)).astype(np.float32),
        sr=np.int64(16000),
        state=np.zeros((2, 24, 16), np.float32),
    )
    assert _compile(tmp_path, vad(), "6bits", audio).table.num_samples == 24
    tokens = tmp_path / "tokens.npz"
    np.savez(tokens, **padded_tokens(12, 10))
    table = _compile(tmp_path, causal_lm(), "6bits", tokens).table
    assert table.loss_outputs["outputs"][0]["mask"] == "attention_mask"


def test_class1_cli_flag_and_error_line(tmp_path, capsys) -> None:
    from lpcompile.cli import main

    src = tmp_path / "det.onnx"
    onnx.save(detector(), str(src))
    out = tmp_path / "det.lp.onnx"
    base = ["compile", str(src), "--budget", "6bits", "-o", str(out), "--probes", "2", "-q"]
    assert main([*base, "--input-shape", "images=2x3x96x96"]) == 0, capsys.readouterr().err
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    capsys.readouterr()
    assert main([*base, "--force", "--input-shape", "images=batch:2,height:40,width:40"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "images 2x3x40x40" in err and "--input-shape images=" in err
    assert main([*base, "--force", "--input-shape", "images=1xAx3"]) == 2


def test_plan_table_names_fit_80_columns() -> None:
    from lpcompile.commands._tables import shorten

    names = [f"/model/decoder/layers.0/self_attention_block/mlp/{n}/MatMul" for n in ("embed", "up", "lm_head")]
    prefix, suffix = "/model/decoder/layers.0/self_attention_block/mlp/", "/MatMul"
    assert [shorten(n, 12, prefix, suffix) for n in names] == ["…embed/…", "…up/MatMul", "…lm_head/…"]
    assert shorten("/a/b/c/q_proj/MatMul", 16) == "…/q_proj/MatMul"
    assert shorten("short", 12) == "short"


def test_folder_of_images(tmp_path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, size=(48, 80, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    sized = calibration_for(detector(), tmp_path, input_shapes=parse_input_shapes(["images=1x3x64x64"]))
    x = sized.arrays["images"]
    assert x.shape == (3, 3, 64, 64) and x.dtype == np.float32 and x.min() >= 0.0 and x.max() <= 1.0
    own = calibration_for(detector(), tmp_path)  # symbolic H×W: the images' own size
    assert own.arrays["images"].shape == (3, 3, 48, 80)
    gray = calibration_for(recogniser(), tmp_path)  # [1, 1, 16, width]: gray, height resized
    assert gray.arrays["input1"].shape == (3, 1, 16, 27) and gray.fixed_batch == 1  # 48x80 -> 16x27
    with pytest.raises(CalibrationError, match="one rank-4 float input"):
        calibration_for(vad(), tmp_path)
