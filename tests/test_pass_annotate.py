"""AnnotatePass: the precision map in node / model metadata_props and doc strings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from pass_helpers import check, parse, snapshot, to_ir

import lpcompile
from lpcompile.errors import PlanError
from lpcompile.frontend.onnx_io import load_model, save_model
from lpcompile.passes.activations import ActivationPrecisionPass
from lpcompile.passes.annotate import AnnotatePass
from lpcompile.passes.quantize_weights import QuantizeWeightsPass
from lpcompile.plan import NodeAssignment, PrecisionPlan

RNG = np.random.default_rng(3)


def model_and_plan():
    proto = parse(
        """<ir_version: 10, opset_import: ["" : 21]>
        g (float[2,256] x) => (float[2,8] y) {
          h = MatMul(x, W1)
          r = Relu(h)
          y = MatMul(r, W2)
        }""",
        W1=RNG.standard_normal((256, 24)).astype(np.float32),
        W2=RNG.standard_normal((24, 8)).astype(np.float32),
    )
    plan = PrecisionPlan(
        nodes=(
            NodeAssignment(
                "n0",
                "MatMul",
                "W1",
                256 * 24,
                "int4_b128",
                4.125,
                predicted_loss=1.2e-4,
                module_path="encoder.fc1",
            ),
            NodeAssignment("n2", "MatMul", "W2", 24 * 8, "fp8_e4m3", 8.0 + 32 * 8 / 192),
        ),
        budget="4.5bits",
        budget_bits=4.5,
        activation_scales={"r": 5.0},
    )
    return to_ir(proto), plan


def props(node: onnx.NodeProto) -> dict[str, str]:
    return {p.key: p.value for p in node.metadata_props}


def test_node_and_model_metadata(tmp_path: Path) -> None:
    model, plan = model_and_plan()
    QuantizeWeightsPass(plan, target="tvm")(model)  # the DequantizeLinear form
    ActivationPrecisionPass(plan)(model)
    result = AnnotatePass(plan)(model)
    assert result.modified
    path = tmp_path / "m.onnx"
    save_model(model, path)  # metadata survives a save / load round trip
    out = check(onnx.load(str(path)))
    nodes = {n.name: n for n in out.graph.node}
    p0 = props(nodes["n0"])
    assert p0 == {
        "lpcompile.format": "int4_b128",
        "lpcompile.bits": "4.125",  # repr(4.125)
        "lpcompile.params": "6144",
        "lpcompile.predicted_loss": "0.00012",
        "lpcompile.module_path": "encoder.fc1",
    }  # the precision map only: other candidates and traces stay in the sensitivity table
    for a in plan.nodes:  # bits written are exactly the plan's bits
        meta = props(nodes[a.name])["lpcompile.bits"]
        assert float(meta) == a.bits
    assert nodes["n0"].doc_string == (
        "lpcompile: int4_b128 (4.125 bits): predicted loss 0.00012"
    )
    p2 = props(nodes["n2"])
    assert p2["lpcompile.format"] == "fp8_e4m3" and "lpcompile.predicted_loss" not in p2
    assert "lpcompile.runner_up" not in p2
    assert nodes["n2"].doc_string == "lpcompile: fp8_e4m3 (9.33333 bits)"
    for name in ("n0/weight_dq", "n0/weight_cast"):
        role = name.rsplit("/", 1)[-1]
        assert props(nodes[name]) == {"lpcompile.serves": "n0", "lpcompile.format": "int4_b128", "lpcompile.role": role}
    # the doc line (and the exporter's grouping keys) sit on the node that feeds the planned node only
    assert nodes["n0/weight_cast"].doc_string.startswith("lpcompile: weight_cast (")
    assert nodes["n0/weight_dq"].doc_string == ""
    for name in ("n2/weight_dq", "n2/act_q", "n2/act_dq"):
        role = name.rsplit("/", 1)[-1]
        assert props(nodes[name]) == {"lpcompile.serves": "n2", "lpcompile.format": "fp8_e4m3", "lpcompile.role": role}
    assert "lpcompile.serves" not in props(nodes["n1"])  # the Relu is not ours
    meta = {p.key: p.value for p in out.metadata_props}
    assert meta["lpcompile.version"] == lpcompile.__version__
    assert meta["lpcompile.budget"] == "4.5bits"
    assert meta["lpcompile.achieved_bits"] == f"{plan.achieved_bits:.6g}"
    assert json.loads(meta["lpcompile.precision_map"]) == {"n0": "int4_b128", "n2": "fp8_e4m3"}
    assert "lpcompile.plan" not in meta  # the plan file is beside the model, not copied into it
    assert json.loads(meta["lpcompile.format_mix"]) == {"int4_b128": 6144, "fp8_e4m3": 192}
    loaded = next(n for n in load_model(path).graph if n.name == "n0")
    assert loaded.metadata_props["lpcompile.format"] == "int4_b128"


def test_idempotent_and_keeps_foreign_doc_string() -> None:
    model, plan = model_and_plan()
    node = next(n for n in model.graph if n.name == "n0")
    node.doc_string = "exported from torch"
    assert AnnotatePass(plan)(model).modified
    assert node.doc_string.splitlines() == [
        "lpcompile: int4_b128 (4.125 bits): predicted loss 0.00012",
        "exported from torch",
    ]
    before = snapshot(model)
    assert AnnotatePass(plan)(model).modified is False
    assert snapshot(model) == before


def test_reannotating_with_new_plan_replaces_keys() -> None:
    model, plan = model_and_plan()
    AnnotatePass(plan)(model)
    plan2 = plan.with_nodes([NodeAssignment("n0", "MatMul", "W1", 6144, "int8", 8.09375), plan.nodes[1]])
    plan2 = PrecisionPlan(nodes=plan2.nodes)  # no budget
    assert AnnotatePass(plan2)(model).modified
    node = next(n for n in model.graph if n.name == "n0")
    assert node.metadata_props["lpcompile.format"] == "int8"
    assert "lpcompile.runner_up" not in node.metadata_props
    assert "lpcompile.module_path" not in node.metadata_props
    assert "lpcompile.budget" not in model.metadata_props


def test_unknown_node_is_plan_error() -> None:
    model, _ = model_and_plan()
    plan = PrecisionPlan(nodes=(NodeAssignment("ghost", "MatMul", "W", 1, "int8", 8.0),))
    with pytest.raises(PlanError, match="ghost"):
        AnnotatePass(plan)(model)
