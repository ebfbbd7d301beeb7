"""Shared helpers of the pass tests: small models, ORT sessions with fixed numerics, checks.

Tolerances: ORT and numpy sum fp32 products in different orders. A length-K fp32 dot product
is within ``K·2⁻²⁴·Σ|x_k·w_k|`` of the exact value (Higham, γ_K), so outputs are compared with
the float64 reference elementwise against ``fp32_dot_bound`` (that bound, with K the reduction
length). Rounding itself is checked bit-exactly through the reference ``qdq_weight`` /
``qdq_activation``.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import numpy_helper

from lpcompile.formats import FLOAT_SPECS


def session(model: onnx.ModelProto | ir.Model) -> ort.InferenceSession:
    """An ORT CPU session that runs the graph as written (BASIC, MatMulNBits accuracy level 0)."""
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto | ir.Model, **feeds: np.ndarray) -> list[np.ndarray]:
    return session(model).run(None, feeds)


def run_at_level(model: onnx.ModelProto, level: ort.GraphOptimizationLevel, **feeds: np.ndarray) -> list[np.ndarray]:
    """Run ``model`` in an ORT CPU session at optimisation ``level`` (one thread)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the intermediate tensors ``names``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for name in names:
        out.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return out


def check(model: onnx.ModelProto | ir.Model) -> onnx.ModelProto:
    """Serialise and run the full ONNX checker (strict shape inference included)."""
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    onnx.checker.check_model(proto, full_check=True)
    return proto


def signature(model: onnx.ModelProto | ir.Model) -> tuple:
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    return (
        tuple((v.name, v.type.SerializeToString()) for v in proto.graph.input),
        tuple((v.name, v.type.SerializeToString()) for v in proto.graph.output),
    )


def parse(text: str, _check: bool = True, **initializers: np.ndarray) -> onnx.ModelProto:
    """Parse ONNX text, add numpy initializers, name unnamed nodes ``n0, n1, ...``."""
    proto = onnx.parser.parse_model(text)
    for name, arr in initializers.items():
        proto.graph.initializer.append(numpy_helper.from_array(np.asarray(arr), name))
    for i, node in enumerate(proto.graph.node):
        if not node.name:
            node.name = f"n{i}"
    if _check:
        onnx.checker.check_model(proto, full_check=True)
    return proto


def to_ir(proto: onnx.ModelProto) -> ir.Model:
    return ir.from_proto(proto)


def fp32_dot_bound(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Elementwise bound on |fp32 x@w − exact|: K·2⁻²⁴·(|x|@|w|) plus the final fp32 rounding."""
    k = x.shape[-1]
    mag = np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64))
    return (k + 1) * 2.0**-24 * mag + np.finfo(np.float32).tiny


def assert_matmul_close(y: np.ndarray, x: np.ndarray, w: np.ndarray) -> None:
    """``y`` (fp32, from ORT) equals ``x @ w`` up to fp32 summation order."""
    ref = x.astype(np.float64) @ w.astype(np.float64)
    err = np.abs(y.astype(np.float64) - ref)
    bound = fp32_dot_bound(x, w)
    assert np.all(err <= bound), f"max err {err.max():.3g}, bound there {bound.flat[np.argmax(err - bound)]:.3g}"


def ops(model: onnx.ModelProto | ir.Model) -> list[str]:
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    return [n.op_type for n in proto.graph.node]


def snapshot(model: ir.Model) -> bytes:
    """Serialised bytes of the model (to compare 'same model')."""
    return ir.to_proto(model).SerializeToString(deterministic=True)


def ulp_bound(element: str) -> float:
    """Relative distance between neighbours of a float element (2^-mantissa_bits)."""
    return 2.0 ** -FLOAT_SPECS[element].mantissa_bits


def mlp_text(k: int, hidden: int, n: int, batch: int = 3) -> str:
    return f"""<ir_version: 10, opset_import: ["" : 21]>
g (float[{batch},{k}] x) => (float[{batch},{n}] y) {{
  h = MatMul(x, W1)
  r = Relu(h)
  y = MatMul(r, W2)
}}"""


#: one MatMul ``y = x·W`` (``.format(k=…, n=…)``, then ``parse(…, W=w)``)
ONE_MATMUL = """<ir_version: 10, opset_import: ["" : 21]>
g (float[3,{k}] x) => (float[3,{n}] y) {{
  y = MatMul(x, W)
}}"""


def relu_mlp(
    rng: np.random.Generator, k: int = 64, h: int = 48, n: int = 10, batch: int = 5
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """``y = Relu(x·W1 + b1)·W2`` with weights drawn from ``rng`` (W1, b1, W2 in that order), and the weights."""
    w = {
        "W1": (rng.standard_normal((k, h)) * 0.2).astype(np.float32),
        "b1": rng.standard_normal(h).astype(np.float32),
        "W2": (rng.standard_normal((h, n)) * 0.2).astype(np.float32),
    }
    text = f"""<ir_version: 10, opset_import: ["" : 21]>
    g (float[{batch},{k}] x) => (float[{batch},{n}] y) {{
      m1 = MatMul(x, W1)
      a1 = Add(m1, b1)
      r1 = Relu(a1)
      y = MatMul(r1, W2)
    }}"""
    return parse(text, **w), w
