"""Loading and saving ONNX models safely (clear errors, atomic writes, external data)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import onnx
import onnx_ir as ir

from lpcompile.errors import ModelLoadError
from lpcompile.io_utils import atomic_path

logger = logging.getLogger(__name__)

PROTOBUF_LIMIT = 2**31 - 1
EXTERNAL_THRESHOLD = 1_800_000_000  # bytes of initializers beyond which we save external data


def _check_external_locations(proto: onnx.ModelProto, base: Path) -> None:
    base_resolved = base.resolve()
    for tensor in onnx.external_data_helper._get_all_tensors(proto):  # noqa: SLF001
        if not onnx.external_data_helper.uses_external_data(tensor):
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        loc = Path(location)
        if not location or loc.is_absolute() or ".." in loc.parts:
            raise ModelLoadError(f"external data location {location!r} of tensor {tensor.name!r} escapes the model folder")
        if not (base_resolved / loc).resolve().is_relative_to(base_resolved):
            raise ModelLoadError(f"external data location {location!r} of tensor {tensor.name!r} escapes the model folder")
        if not (base / loc).is_file():
            raise ModelLoadError(f"external data file {location!r} of tensor {tensor.name!r} not found beside the model")


def load_proto(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Read an ONNX file with its external data, or raise ``ModelLoadError`` with one line."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelLoadError(f"model path is not a file: {path}")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"model file is empty: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError / RuntimeWarning-ish variety
        raise ModelLoadError(f"not a readable ONNX model: {path} ({type(exc).__name__})") from None
    if not proto.graph.node and not proto.graph.output:
        raise ModelLoadError(f"not an ONNX model (no graph): {path}")
    _check_external_locations(proto, path.parent)
    try:
        onnx.load_external_data_for_model(proto, str(path.parent))
    except Exception as exc:
        raise ModelLoadError(f"cannot read external data of {path}: {exc}") from None
    return proto


def ensure_node_names(model: ir.Model) -> int:
    """Give every unnamed (or duplicate-named) node a deterministic unique name; return how many."""
    seen: set[str] = set()
    renamed = 0
    for i, node in enumerate(ir.traversal.RecursiveGraphIterator(model.graph)):
        name = node.name
        if not name or name in seen:
            base = f"{node.op_type}_{i}"
            name = base
            k = 1
            while name in seen:
                name = f"{base}_{k}"
                k += 1
            node.name = name
            renamed += 1
        seen.add(name)
    return renamed


def load_model(path: str | os.PathLike[str]) -> ir.Model:
    """Load an ONNX model into onnx-ir with unique node names."""
    proto = load_proto(path)
    try:
        model = ir.from_proto(proto)
    except Exception as exc:
        raise ModelLoadError(f"cannot convert ONNX model {path}: {exc}") from None
    n = ensure_node_names(model)
    if n:
        logger.info("named %d unnamed node(s)", n)
    return model


def model_bytes_estimate(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def save_model(model: ir.Model | onnx.ModelProto, path: str | os.PathLike[str]) -> None:
    """Save atomically; models too large for one protobuf get a ``<name>.data`` external file."""
    path = Path(path)
    if isinstance(model, onnx.ModelProto):
        model = ir.from_proto(model)
    large = model_bytes_estimate(model) > EXTERNAL_THRESHOLD
    if large:
        data_name = path.name + ".data"
        with atomic_path(path.parent / data_name) as tmp_data, atomic_path(path) as tmp:
            # onnx-ir writes the external file relative to the model path under the given name;
            # write both under temp names, then rename data first, model second.
            ir.save(model, tmp, external_data=tmp_data.name)
            _rewrite_location(tmp, tmp_data.name, data_name)
    else:
        with atomic_path(path) as tmp:
            ir.save(model, tmp)


def _rewrite_location(model_path: Path, old: str, new: str) -> None:
    proto = onnx.load(str(model_path), load_external_data=False)
    for tensor in onnx.external_data_helper._get_all_tensors(proto):  # noqa: SLF001
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new
    onnx.save(proto, str(model_path))
