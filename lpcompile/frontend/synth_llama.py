"""A Llama-architecture ONNX model with seeded random weights, written tensor by tensor.

For scale tests and benchmarks where a real checkpoint of the size is not installed offline (the
1.1B TinyLlama shapes, see :data:`PRESETS`). The graph is standard ONNX (opset 21): token
embedding Gather, per layer RMSNorm → q/k/v projections → rotary embedding → grouped-query
causal attention → o projection → residual, RMSNorm → SiLU-gated MLP → residual, a final RMSNorm
and an untied (or tied) lm_head MatMul. Input ``input_ids`` ``[batch, seq]`` (int64), output
``logits`` ``[batch, seq, vocab]``.

Weights go straight to one external-data file as they are drawn (N(0, σ²) with σ = 0.02, norm
gains near 1), so writing a 4 GB model needs memory for one tensor, never the model.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

logger = logging.getLogger(__name__)

__all__ = ["PRESETS", "LlamaShape", "write_llama"]


@dataclass(frozen=True)
class LlamaShape:
    """The published shape parameters of a Llama-architecture model."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    max_seq: int = 2048
    tied: bool = False
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def params(self) -> int:
        """Parameters (a tied head counted once)."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        per_layer = h * h * 2 + h * kv * 2 + 3 * h * self.intermediate + 2 * h
        head = 0 if self.tied else self.vocab * h
        return self.vocab * h + self.layers * per_layer + h + head


#: TinyLlama-1.1B (22 layers, GQA 32/4 heads, 5632 MLP, 32000 vocabulary); a 2-layer toy for tests
PRESETS: dict[str, LlamaShape] = {
    "tinyllama-1.1b": LlamaShape(hidden=2048, layers=22, heads=32, kv_heads=4, intermediate=5632, vocab=32000),
    "smollm2-135m": LlamaShape(
        hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, vocab=49152, tied=True, rope_theta=100000.0
    ),
    "toy": LlamaShape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=256, max_seq=64, tied=True),
}


class _Writer:
    """Initializers appended to one external-data file as they are made."""

    def __init__(self, data_path: Path, rng: np.random.Generator) -> None:
        self.path = data_path
        self.rng = rng
        self.fh = open(data_path, "wb")  # noqa: SIM115 - closed by close()
        self.offset = 0
        self.initializers: list[TensorProto] = []

    def add(self, name: str, array: np.ndarray, external: bool = True) -> str:
        array = np.ascontiguousarray(array)
        if not external or array.nbytes < 1024:
            self.initializers.append(onnx.numpy_helper.from_array(array, name))
            return name
        t = TensorProto()
        t.name = name
        t.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        t.dims.extend(array.shape)
        pad = (-self.offset) % 64
        if pad:
            self.fh.write(b"\0" * pad)
            self.offset += pad
        array.tofile(self.fh)
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(self.offset)), ("length", str(array.nbytes))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        self.offset += array.nbytes
        self.initializers.append(t)
        return name

    def weight(self, name: str, shape: tuple[int, ...], std: float = 0.02) -> str:
        a = self.rng.standard_normal(shape, dtype=np.float32)
        a *= np.float32(std)
        return self.add(name, a)

    def gain(self, name: str, n: int) -> str:
        return self.add(name, (1.0 + 0.05 * self.rng.standard_normal(n)).astype(np.float32))

    def close(self) -> None:
        self.fh.close()


def _const(nodes: list[onnx.NodeProto], name: str, values: list[int]) -> str:
    value = helper.make_tensor(name, TensorProto.INT64, [len(values)], values)
    nodes.append(helper.make_node("Constant", [], [name], value=value))
    return name


def write_llama(path: str | os.PathLike[str], shape: LlamaShape, seed: int = 0) -> Path:
    """Write the model to ``path`` and its weights to ``path + '.data'``; returns ``path``."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    w = _Writer(data, np.random.default_rng(seed))
    nodes: list[onnx.NodeProto] = []
    h, hd, nh, nkv = shape.hidden, shape.head_dim, shape.heads, shape.kv_heads
    rep = nh // nkv
    mk = helper.make_node

    embed = w.weight("model.embed_tokens.weight", (shape.vocab, h))
    nodes.append(mk("Gather", [embed, "input_ids"], ["h0"], name="embed_tokens", axis=0))
    # positions, rotary tables and the causal mask, sliced to the sequence length
    nodes.append(mk("Shape", ["input_ids"], ["ids_shape"], name="ids_shape"))
    nodes.append(mk("Gather", ["ids_shape", _const(nodes, "one", [1])], ["seq"], name="seq_len", axis=0))
    zero = _const(nodes, "zero", [0])
    inv = 1.0 / shape.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    ang = np.outer(np.arange(shape.max_seq, dtype=np.float64), inv)
    ang = np.concatenate([ang, ang], axis=1)
    w.add("rope_cos", np.cos(ang).astype(np.float32), external=False)
    w.add("rope_sin", np.sin(ang).astype(np.float32), external=False)
    for t in ("cos", "sin"):
        nodes.append(mk("Slice", [f"rope_{t}", zero, "seq", zero], [f"{t}_s"], name=f"rope_{t}_slice"))
    mask = np.triu(np.full((shape.max_seq, shape.max_seq), -1e9, dtype=np.float32), k=1)
    w.add("causal_mask", mask)
    nodes.append(mk("Slice", ["causal_mask", zero, "seq", zero], ["mask_r"], name="mask_rows"))
    nodes.append(mk("Slice", ["mask_r", zero, "seq", _const(nodes, "axis1", [1])], ["mask_s"], name="mask_cols"))
    shp_heads = _const(nodes, "shp_heads", [0, 0, nh, hd])
    shp_kv = _const(nodes, "shp_kv", [0, 0, nkv, hd])
    shp_rep = _const(nodes, "shp_rep", [0, nkv, rep, -1, hd])
    shp_merge = _const(nodes, "shp_merge", [0, 0, h])
    ax_last = _const(nodes, "ax_last", [-1])
    w.add("eps", np.array(1e-5, dtype=np.float32), external=False)
    w.add("two", np.array(2.0, dtype=np.float32), external=False)
    w.add("attn_scale", np.array(1.0 / np.sqrt(hd), dtype=np.float32), external=False)
    nodes.append(mk("Unsqueeze", ["mask_s", _const(nodes, "ax01", [0, 1])], ["mask4"], name="mask4"))

    def rmsnorm(x: str, gain: str, p: str) -> str:
        nodes.append(mk("Pow", [x, "two"], [f"{p}_sq"], name=f"{p}_sq"))
        nodes.append(mk("ReduceMean", [f"{p}_sq", ax_last], [f"{p}_ms"], name=f"{p}_ms", keepdims=1))
        nodes.append(mk("Add", [f"{p}_ms", "eps"], [f"{p}_mse"], name=f"{p}_mse"))
        nodes.append(mk("Sqrt", [f"{p}_mse"], [f"{p}_rms"], name=f"{p}_rms"))
        nodes.append(mk("Div", [x, f"{p}_rms"], [f"{p}_n"], name=f"{p}_n"))
        nodes.append(mk("Mul", [f"{p}_n", gain], [f"{p}_out"], name=f"{p}_out"))
        return f"{p}_out"

    def rope(x: str, p: str) -> str:  # x [B, H, S, hd]
        nodes.append(mk("Split", [x], [f"{p}_x1", f"{p}_x2"], name=f"{p}_split", axis=-1, num_outputs=2))
        nodes.append(mk("Neg", [f"{p}_x2"], [f"{p}_nx2"], name=f"{p}_neg"))
        nodes.append(mk("Concat", [f"{p}_nx2", f"{p}_x1"], [f"{p}_rot"], name=f"{p}_rot", axis=-1))
        nodes.append(mk("Mul", [x, "cos_s"], [f"{p}_c"], name=f"{p}_c"))
        nodes.append(mk("Mul", [f"{p}_rot", "sin_s"], [f"{p}_s"], name=f"{p}_s"))
        nodes.append(mk("Add", [f"{p}_c", f"{p}_s"], [f"{p}_out"], name=f"{p}_out"))
        return f"{p}_out"

    x = "h0"
    for i in range(shape.layers):
        p = f"model.layers.{i}"
        n1 = rmsnorm(x, w.gain(f"{p}.input_layernorm.weight", h), f"{p}.ln1")
        proj = {}
        for name, out in (("q_proj", h), ("k_proj", nkv * hd), ("v_proj", nkv * hd)):
            wt = w.weight(f"{p}.self_attn.{name}.weight_t", (h, out))
            nodes.append(mk("MatMul", [n1, wt], [f"{p}.{name}"], name=f"/{p}/self_attn/{name}/MatMul"))
            proj[name] = f"{p}.{name}"
        heads = {}
        for name, shp in (("q_proj", shp_heads), ("k_proj", shp_kv), ("v_proj", shp_kv)):
            nodes.append(mk("Reshape", [proj[name], shp], [f"{p}.{name}_r"], name=f"{p}.{name}_r"))
            nodes.append(mk("Transpose", [f"{p}.{name}_r"], [f"{p}.{name}_t"], name=f"{p}.{name}_t", perm=[0, 2, 1, 3]))
            heads[name] = f"{p}.{name}_t"
        q = rope(heads["q_proj"], f"{p}.q_rope")
        k = rope(heads["k_proj"], f"{p}.k_rope")
        v = heads["v_proj"]
        # grouped-query attention: q [B, nkv·rep, S, hd] viewed as [B, nkv, rep·S, hd] against k [B, nkv, S, hd]
        nodes.append(mk("Reshape", [q, shp_rep], [f"{p}.q_g"], name=f"{p}.q_g"))
        nodes.append(mk("Unsqueeze", [k, _const(nodes, f"{p}.ax2", [2])], [f"{p}.k_u"], name=f"{p}.k_u"))
        nodes.append(mk("Unsqueeze", [v, f"{p}.ax2"], [f"{p}.v_u"], name=f"{p}.v_u"))
        nodes.append(mk("Transpose", [f"{p}.k_u"], [f"{p}.k_t"], name=f"{p}.k_t", perm=[0, 1, 2, 4, 3]))
        nodes.append(mk("MatMul", [f"{p}.q_g", f"{p}.k_t"], [f"{p}.scores"], name=f"{p}.scores"))
        nodes.append(mk("Mul", [f"{p}.scores", "attn_scale"], [f"{p}.scaled"], name=f"{p}.scaled"))
        nodes.append(mk("Add", [f"{p}.scaled", "mask4"], [f"{p}.masked"], name=f"{p}.masked"))
        nodes.append(mk("Softmax", [f"{p}.masked"], [f"{p}.probs"], name=f"{p}.softmax", axis=-1))
        nodes.append(mk("MatMul", [f"{p}.probs", f"{p}.v_u"], [f"{p}.ctx_g"], name=f"{p}.ctx"))
        shp_ctx = _const(nodes, f"{p}.shp_ctx", [0, nh, -1, hd])
        nodes.append(mk("Reshape", [f"{p}.ctx_g", shp_ctx], [f"{p}.ctx_h"], name=f"{p}.ctx_h"))
        nodes.append(mk("Transpose", [f"{p}.ctx_h"], [f"{p}.ctx_t"], name=f"{p}.ctx_t", perm=[0, 2, 1, 3]))
        nodes.append(mk("Reshape", [f"{p}.ctx_t", shp_merge], [f"{p}.ctx_m"], name=f"{p}.ctx_m"))
        wo = w.weight(f"{p}.self_attn.o_proj.weight_t", (h, h))
        nodes.append(mk("MatMul", [f"{p}.ctx_m", wo], [f"{p}.attn_out"], name=f"/{p}/self_attn/o_proj/MatMul"))
        nodes.append(mk("Add", [x, f"{p}.attn_out"], [f"{p}.res1"], name=f"{p}.res1"))
        n2 = rmsnorm(f"{p}.res1", w.gain(f"{p}.post_attention_layernorm.weight", h), f"{p}.ln2")
        wg = w.weight(f"{p}.mlp.gate_proj.weight_t", (h, shape.intermediate))
        wu = w.weight(f"{p}.mlp.up_proj.weight_t", (h, shape.intermediate))
        wd = w.weight(f"{p}.mlp.down_proj.weight_t", (shape.intermediate, h))
        nodes.append(mk("MatMul", [n2, wg], [f"{p}.gate"], name=f"/{p}/mlp/gate_proj/MatMul"))
        nodes.append(mk("MatMul", [n2, wu], [f"{p}.up"], name=f"/{p}/mlp/up_proj/MatMul"))
        nodes.append(mk("Sigmoid", [f"{p}.gate"], [f"{p}.gate_sig"], name=f"{p}.gate_sig"))
        nodes.append(mk("Mul", [f"{p}.gate", f"{p}.gate_sig"], [f"{p}.silu"], name=f"{p}.silu"))
        nodes.append(mk("Mul", [f"{p}.silu", f"{p}.up"], [f"{p}.act"], name=f"{p}.act"))
        nodes.append(mk("MatMul", [f"{p}.act", wd], [f"{p}.mlp_out"], name=f"/{p}/mlp/down_proj/MatMul"))
        nodes.append(mk("Add", [f"{p}.res1", f"{p}.mlp_out"], [f"{p}.out"], name=f"{p}.res2"))
        x = f"{p}.out"
        logger.debug("layer %d written (%d bytes so far)", i, w.offset)
    nf = rmsnorm(x, w.gain("model.norm.weight", h), "final_norm")
    if shape.tied:
        nodes.append(mk("Transpose", [embed], ["lm_head_t"], name="lm_head_transpose", perm=[1, 0]))
        head = "lm_head_t"
    else:
        head = w.weight("lm_head.weight_t", (h, shape.vocab))
    nodes.append(mk("MatMul", [nf, head], ["logits"], name="/lm_head/MatMul"))
    w.close()

    graph = helper.make_graph(
        nodes,
        "llama",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", shape.vocab])],
        initializer=w.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], producer_name="lpcompile.synth_llama")
    model.ir_version = 10
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(model.SerializeToString())
    os.replace(tmp, path)
    logger.info("wrote %s (%d parameters, %.2f GB external data)", path, shape.params(), w.offset / 1e9)
    return path
