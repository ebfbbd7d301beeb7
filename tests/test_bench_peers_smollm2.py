"""The SmolLM2 peers benchmark's NNCF fix: the tied head (a MatMul whose weight is ``Transpose(table)``)
is found by name, so NNCF can be told to leave it alone (it otherwise fails looking for the
Transpose output among the initializers: "There is no tensor with the name val_3229")."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def _tied_lm() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    table = numpy_helper.from_array(rng.standard_normal((10, 4)).astype(np.float32), "table")
    w = numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed"),
        helper.make_node("MatMul", ["emb", "w"], ["h"], name="linear"),
        helper.make_node("MatMul", ["h", "h_t"], ["scores"], name="attn"),  # two activations
        helper.make_node("Transpose", ["h"], ["h_t"], name="t_act", perm=[0, 2, 1]),
        helper.make_node("Transpose", ["table"], ["table_t"], name="t_table"),
        helper.make_node("MatMul", ["h", "table_t"], ["logits"], name="head"),
    ]
    graph = helper.make_graph(
        nodes,
        "tied",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 3])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3, 10]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 3, 3]),
        ],
        [table, w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_head_nodes_finds_only_the_tied_head() -> None:
    from bench_peers_smollm2 import head_nodes

    assert head_nodes(_tied_lm()) == ["head"]


def test_peer_names_cover_the_strongest_settings() -> None:
    from bench_peers_smollm2 import PEERS

    nncf = [n for n in PEERS if n.startswith("nncf-")]
    assert len(nncf) == 6 and all(n.endswith("-se-awq") for n in nncf)
    assert {n.split("-")[2] for n in PEERS if n.startswith("ort-nbits-")} == {"default", "hqq", "kquant"}
