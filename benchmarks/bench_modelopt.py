"""NVIDIA ModelOpt ``mtq.auto_quantize`` on all-MiniLM-L6-v2 (torch, CPU), scored like bench_minilm.py.

ModelOpt searches per-Linear formats (here INT4 blockwise weight-only and INT8 per-channel
weight-only, its closest recipes to lpcompile's weight formats) under ``constraints={"effective_bits":
b}`` with its gradient sensitivity on the same 128 calibration sentences and a loss matching the
metric (squared distance to the fp32 sentence embedding). Its ``effective_bits`` ignore scale
overhead (int4 = 4, int8 = 8, unquantized = 16), so ``b`` is set below the budget and the bits are
then recounted with the benchmark's rule (int4 block B with an fp16 scale = 4 + 16/B, int8 per-channel
with an fp32 scale = 8 + 32/K, unquantized = 32). The model is evaluated as ModelOpt's fake-quantized
torch module: its INT4 mixes do not export to an ONNX that ONNX Runtime loads (the export is tried
and the error recorded), so no file size or ORT latency.

    python benchmarks/bench_modelopt.py [--budgets 4.5,6]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_minilm import minilm_task
from harness import BENCH_DIR, prepare, session, setup_logging


def encoder() -> object:
    import torch
    from torch import nn
    from transformers import AutoModel

    from lpcompile.frontend.zoo import _minilm_dir, _offline

    _offline()
    bert = AutoModel.from_pretrained(str(_minilm_dir()), attn_implementation="eager")

    class SentenceEncoder(nn.Module):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
        ) -> torch.Tensor:
            h = self.model(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(dim=1) / torch.clamp(m.sum(dim=1), min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    return SentenceEncoder(bert).eval()


def as_callable(model: object) -> object:
    import torch

    def f(part: dict[str, np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in part.items()}
            return model(t["input_ids"], t["attention_mask"], t["token_type_ids"]).numpy()

    return f


def our_bits(model: object) -> tuple[float, dict[str, float]]:
    """Bits per weight of the used Linear layers under the benchmark's rule, and the format mix."""
    total, bits, mix = 0, 0.0, {}
    for name, mod in model.named_modules():  # type: ignore[attr-defined]
        if not hasattr(mod, "weight_quantizer") or "pooler" in name:
            continue
        n, k = mod.weight.numel(), mod.weight.shape[1]
        q = mod.weight_quantizer
        if not getattr(q, "is_enabled", False):
            b, fmt = 32.0, "fp32"
        elif q.num_bits == 4:
            bs = (q.block_sizes or {}).get(-1) or (q.block_sizes or {}).get(1) or 128
            b, fmt = 4 + 16 / bs, f"int4_b{bs}"
        else:
            b, fmt = 8 + 32 / k, f"int{q.num_bits}"
        total += n
        bits += b * n
        mix[fmt] = mix.get(fmt, 0) + n
    return bits / total, {f: round(v / total, 4) for f, v in mix.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", default="4.5,6")
    args = p.parse_args()
    setup_logging()
    import modelopt.torch.quantization as mtq
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(2)
    task = minilm_task()
    ctx = prepare(task)
    ref = task.collect(session(ctx.norm))
    base = encoder()
    rows = [{"method": "fp32-torch", **task.score(task.collect(as_callable(base)), ref)}]
    with np.load(task.calib) as d:
        calib = {k: torch.from_numpy(d[k]) for k in d.files}
    with torch.no_grad():
        target = base(calib["input_ids"], calib["attention_mask"], calib["token_type_ids"])
    loader = [{**{k: v[i : i + 16] for k, v in calib.items()}, "ref": target[i : i + 16]} for i in range(0, 128, 16)]

    def forward_step(model: object, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])  # type: ignore[operator]

    def loss_func(out: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return ((out - batch["ref"]) ** 2).sum(-1).mean()

    for budget in [float(b) for b in args.budgets.split(",")]:
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        row: dict[str, object] = {"method": "modelopt-auto_quantize", "budget": budget}
        try:
            model, _ = mtq.auto_quantize(
                model,
                constraints={"effective_bits": budget - 0.1},
                quantization_formats=[mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG, mtq.INT8_WEIGHT_ONLY_CFG],
                data_loader=loader,
                forward_step=forward_step,
                loss_func=loss_func,
                num_calib_steps=len(loader),
                num_score_steps=len(loader),
                disabled_layers=["*pooler*"],
            )
            row["build_s"] = time.perf_counter() - t0
            row["bits"], row["mix"] = our_bits(model)
            row.update(task.score(task.collect(as_callable(model)), ref))
            try:
                out = ctx.dir / f"modelopt@{budget:g}.onnx"
                ids = calib["input_ids"][:2, :16]
                torch.onnx.export(model, (ids, torch.ones_like(ids), torch.zeros_like(ids)), str(out), dynamo=True)
                session(out)
                row["onnx"] = "exported and loads in ORT"
            except Exception as exc:  # the documented limitation: record it
                row["onnx"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
        rows.append(row)
        print(json.dumps(row, default=str), flush=True)
    (BENCH_DIR / "results_modelopt_minilm.json").write_text(
        json.dumps({"task": "minilm", "rows": rows}, indent=1, default=str)
    )


if __name__ == "__main__":
    main()
