"""PrecisionPlan JSON: round trip, versioning, and clear errors on bad plans."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lpcompile.analysis.table import Candidate
from lpcompile.errors import PlanError
from lpcompile.formats import format_names
from lpcompile.plan import NodeAssignment, PrecisionPlan, validate_against


def _plan() -> PrecisionPlan:
    return PrecisionPlan(
        nodes=(
            NodeAssignment(
                "fc0",
                "MatMul",
                "fc0.weight",
                64 * 512,
                "int4_b128",
                4.25,
                predicted_loss=1e-3,
                group="weight:fc0.weight",
            ),
            NodeAssignment("fc1", "MatMul", "fc1.weight", 512 * 10, "bf16", 16.0, module_path="head.fc"),
        ),
        budget="4.5bits",
        budget_bits=4.5,
        model="m.onnx",
        activation_scales={"h0": 3.5},
        metadata={"seed": 0},
    )


def test_round_trip_is_exact(tmp_path) -> None:
    plan = _plan()
    path = tmp_path / "p.json"
    plan.save(path)
    back = PrecisionPlan.load(path)
    assert back.to_dict() == plan.to_dict()
    data = json.loads(path.read_text())
    assert data["version"] == 1 and data["budget_bits"] == 4.5
    assert data["achieved_bits"] == pytest.approx((4.25 * 32768 + 16 * 5120) / (32768 + 5120))
    assert set(data["nodes"][0]) == {"name", "op_type", "weight", "params", "format", "bits", "predicted_loss", "group"}


def test_plan_holds_decisions_only_and_reads_older_plans() -> None:
    """Evidence (candidates, traces) lives in the sensitivity table; keys of older plans are ignored."""
    d = _plan().to_dict()
    d["nodes"][0]["candidates"] = {"int8": {"bits": 8.0625, "predicted_loss": 2e-5}}
    d["nodes"][0]["trace"] = 12.5
    back = PrecisionPlan.from_dict(d)
    assert "candidates" not in back.to_dict()["nodes"][0] and "trace" not in back.to_dict()["nodes"][0]
    assert back.nodes[0].format == "int4_b128"


def test_shared_weights_count_once() -> None:
    a = NodeAssignment("a", "MatMul", "W", 100, "int8", 8.0)
    b = NodeAssignment("b", "Gather", "W", 100, "int8", 8.0)
    c = NodeAssignment("c", "MatMul", "V", 50, "int4_b128", 4.0)
    plan = PrecisionPlan(nodes=(a, b, c))
    assert plan.total_params == 150
    assert plan.achieved_bits == pytest.approx((8 * 100 + 4 * 50) / 150)


def test_negative_activation_scale_is_refused() -> None:
    d = _plan().to_dict()
    d["activation_scales"] = {"h0": -1.0}
    with pytest.raises(PlanError, match="positive normal float32"):
        PrecisionPlan.from_dict(d)


def test_runner_up_comes_from_the_table() -> None:
    from lpcompile.analysis.table import NodeSensitivity

    n = NodeSensitivity("fc0", "MatMul", "W", 10, (2, 5), {
        "int4_b128": Candidate(4.25, 1e-3), "int8": Candidate(8.0625, 2e-5, 3e-5), "fp32": Candidate(32.0, 0.0)})
    assert n.runner_up("int8") == ("int4_b128", Candidate(4.25, 1e-3))
    assert n.runner_up("int4_b128") == ("int8", Candidate(8.0625, 2e-5, 3e-5))


def test_unknown_format_and_version_are_errors() -> None:
    d = _plan().to_dict()
    d["nodes"][0]["format"] = "int99"
    with pytest.raises(PlanError, match="unknown format 'int99'"):
        PrecisionPlan.from_dict(d)
    d = _plan().to_dict()
    d["version"] = 99
    with pytest.raises(PlanError, match="version"):
        PrecisionPlan.from_dict(d)
    with pytest.raises(PlanError, match="not valid JSON"):
        PrecisionPlan.from_json("{nope")
    with pytest.raises(PlanError, match="more than once"):
        d = _plan().to_dict()
        d["nodes"].append(d["nodes"][0])
        PrecisionPlan.from_dict(d)


def test_unknown_node_is_an_error() -> None:
    with pytest.raises(PlanError, match="fc1"):
        validate_against(_plan(), ["fc0"])
    validate_against(_plan(), ["fc0", "fc1", "other"])


def test_aliases_are_canonicalised() -> None:
    d = _plan().to_dict()
    d["nodes"][0]["format"] = "int4"
    assert PrecisionPlan.from_dict(d).nodes[0].format == "int4_b128"


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(format_names()), st.integers(0, 10**7), st.floats(0, 32, allow_nan=False)),
        min_size=0,
        max_size=8,
    )
)
def test_property_round_trip(rows) -> None:
    nodes = tuple(NodeAssignment(f"n{i}", "MatMul", f"w{i}", p, f, b) for i, (f, p, b) in enumerate(rows))
    plan = PrecisionPlan(nodes=nodes)
    back = PrecisionPlan.from_json(plan.to_json())
    assert back.to_dict() == plan.to_dict()
    assert back.achieved_bits == pytest.approx(plan.achieved_bits, rel=1e-9)
