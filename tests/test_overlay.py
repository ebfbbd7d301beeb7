"""Model Explorer node-data overlays: keyed by node name, numeric values, colours by format / loss."""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import types
from pathlib import Path

import onnx
import pytest
from _report_data import CHOSEN, digits_plan, digits_table

from lpcompile.errors import ModelLoadError
from lpcompile.report.overlay import (
    FORMAT_COLORS,
    LOSS_STOPS,
    format_color,
    format_overlay,
    loss_color,
    loss_overlay,
    precision_map,
    text_color,
    write_overlays,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "models"

# A rewritten-model stand-in in ONNX text form: two planned MatMuls, a DequantizeLinear and two
# Casts serving them, and an unplanned Relu; the AnnotatePass metadata is set in Python below.
ANNOTATED = """
<ir_version: 10, opset_import: ["" : 21]>
g (float[1,4] x, int8[4,4] w0q, float[4] s0, float[4,2] w1) => (float[1,2] y) {
  w0 = DequantizeLinear <axis = 1> (w0q, s0)
  h = MatMul (x, w0)
  r = Relu (h)
  w1c = Cast <to = 16> (w1)
  w1f = Cast <to = 1> (w1c)
  y = MatMul (r, w1f)
}
"""
NAMES = ["w0/weight_dq", "mm0", "relu", "w1/weight_cast", "w1/to_fp32", "mm1"]
PROPS = {
    "w0/weight_dq": {"lpcompile.serves": "mm0"},
    "mm0": {"lpcompile.format": "int8", "lpcompile.bits": "8.0625", "lpcompile.predicted_loss": "0.002"},
    "w1/weight_cast": {"lpcompile.serves": "mm1"},
    "w1/to_fp32": {"lpcompile.serves": "mm1"},
    "mm1": {"lpcompile.format": "bf16", "lpcompile.bits": "16", "lpcompile.predicted_loss": "2e-07"},
}


def _model_with_props() -> onnx.ModelProto:
    model = onnx.parser.parse_model(ANNOTATED)
    for node, name in zip(model.graph.node, NAMES, strict=True):
        node.name = name
        for k, v in PROPS.get(name, {}).items():
            node.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(model)
    return model


def test_format_overlay_from_plan_keys_values_colours() -> None:
    plan = digits_plan()
    ov = format_overlay(plan)
    assert set(ov["results"]) == set(CHOSEN)
    for name, fmt in CHOSEN.items():
        r = ov["results"][name]
        assert r["bgColor"] == FORMAT_COLORS[fmt]
        assert isinstance(r["value"], float)  # Model Explorer's NodeDataResult.value is a number
        assert r["value"] == plan.by_name()[name].bits
        assert r["textColor"] in ("#ffffff", "#1f1f1f")
    json.dumps(ov, allow_nan=False)


def test_format_overlay_from_model_colours_serving_nodes() -> None:
    ov = format_overlay(_model_with_props())
    res = ov["results"]
    assert set(res) == {"w0/weight_dq", "mm0", "w1/weight_cast", "w1/to_fp32", "mm1"}  # not the Relu
    assert res["mm0"]["bgColor"] == res["w0/weight_dq"]["bgColor"] == FORMAT_COLORS["int8"]
    assert res["mm1"]["bgColor"] == res["w1/to_fp32"]["bgColor"] == FORMAT_COLORS["bf16"]
    assert res["mm0"]["value"] == 8.0625


def test_precision_map_marks_serving_nodes() -> None:
    nodes = {n.name: n for n in precision_map(_model_with_props())}
    assert nodes["w0/weight_dq"].serves == ("mm0",)
    assert nodes["mm0"].serves == () and nodes["mm0"].predicted_loss == pytest.approx(0.002)


def test_loss_overlay_log_scale_darker_for_larger_loss() -> None:
    ov = loss_overlay(digits_plan())
    res = ov["results"]
    losses = {n: r["value"] for n, r in res.items()}
    order = sorted(losses, key=losses.get)

    def lum(c: str) -> float:
        return sum(int(c[i : i + 2], 16) for i in (1, 3, 5))

    lums = [lum(res[n]["bgColor"]) for n in order]
    assert lums == sorted(lums, reverse=True)
    assert res[order[0]]["bgColor"] == LOSS_STOPS[0] and res[order[-1]]["bgColor"] == LOSS_STOPS[-1]
    assert ov["gradient"][0]["stop"] == 0 and ov["gradient"][-1]["stop"] == 1


def test_loss_overlay_from_model_skips_serving_nodes() -> None:
    res = loss_overlay(_model_with_props())["results"]
    assert set(res) == {"mm0", "mm1"}


def test_loss_color_edges() -> None:
    assert loss_color(0.0, 1e-3, 1.0) == LOSS_STOPS[0]
    assert loss_color(0.5, 0.5, 0.5) == LOSS_STOPS[len(LOSS_STOPS) // 2]
    assert loss_color(10.0, 1e-3, 1.0) == LOSS_STOPS[-1]  # clipped


def test_format_color_stable_for_unknown_formats() -> None:
    c = format_color("fp4_e2m1")
    assert c == format_color("fp4_e2m1") and c.startswith("#") and len(c) == 7
    assert text_color("#000000") == "#ffffff" and text_color("#ffffff") == "#1f1f1f"


def _node_data_builder() -> types.ModuleType:
    """``model_explorer.node_data_builder`` without running the package ``__init__`` (which imports torch)."""
    spec = importlib.util.find_spec("model_explorer")
    if spec is None or spec.origin is None:
        pytest.skip("model_explorer is not installed")
    pkg = types.ModuleType("_me_schema")
    pkg.__path__ = [str(Path(spec.origin).parent)]
    sys.modules["_me_schema"] = pkg
    try:
        return importlib.import_module("_me_schema.node_data_builder")
    finally:
        for name in [m for m in sys.modules if m == "_me_schema" or m.startswith("_me_schema.")]:
            del sys.modules[name]


def test_overlays_match_model_explorer_schema() -> None:
    nd = _node_data_builder()
    for ov in (format_overlay(digits_plan()), loss_overlay(digits_plan())):
        data = nd.GraphNodeData(
            name=ov["name"],
            results={k: nd.NodeDataResult(**v) for k, v in ov["results"].items()},
            gradient=[nd.GradientItem(**g) for g in ov.get("gradient", [])],
        )
        assert json.loads(data.to_json_string())["results"] == ov["results"]


def test_write_overlays(tmp_path: Path) -> None:
    paths = write_overlays(digits_plan(), tmp_path, "m.lp")
    assert [p.name for p in paths] == ["m.lp.format.json", "m.lp.loss.json"]
    assert json.loads(paths[1].read_text())["results"]["fc1"]["value"] == pytest.approx(
        digits_table().nodes[1].candidates["int4_b128"].predicted_loss, rel=1e-5
    )
    # no losses known: only the format overlay
    no_loss = digits_plan().with_nodes(
        [n.__class__(**{**n.__dict__, "predicted_loss": None}) for n in digits_plan().nodes]
    )
    assert [p.name for p in write_overlays(no_loss, tmp_path / "b", "m")] == ["m.format.json"]


def test_overlay_from_model_path_and_bad_path(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(_model_with_props(), path)
    assert set(format_overlay(path)["results"]) >= {"mm0", "mm1"}
    assert format_overlay(EXAMPLES / "digits_mlp.onnx")["results"] == {}  # an fp32 model: nothing planned
    with pytest.raises(ModelLoadError):
        format_overlay(tmp_path / "missing.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    with pytest.raises(ModelLoadError):
        format_overlay(tmp_path / "bad.onnx")


def test_overlay_from_real_rewrite(tmp_path: Path) -> None:
    """The real apply pipeline (AnnotatePass metadata) feeds the overlays."""
    from lpcompile.files import apply_file

    plan = digits_plan()
    result = apply_file(EXAMPLES / "digits_mlp.onnx", tmp_path / "m.lp.onnx", plan=plan, log_checks=False)
    res = format_overlay(result.output)["results"]
    for name, fmt in CHOSEN.items():
        assert res[name]["bgColor"] == FORMAT_COLORS[fmt]
    served = [n for n in precision_map(result.output) if n.serves]
    assert served, "the inserted DQ/Cast nodes should carry lpcompile.serves"
    assert set(loss_overlay(result.output)["results"]) == set(CHOSEN)
