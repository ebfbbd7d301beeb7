"""Loading and saving ONNX models safely (clear errors, atomic writes, external data).

Loading (:func:`load_proto`, :func:`load_model`) turns every way a file can be wrong into a
one-line :class:`~lpcompile.errors.ModelLoadError`: missing, not a file, empty, unreadable,
truncated or not ONNX, without outputs, with names that are not UTF-8, failing ``onnx.checker``
(full check: types and shapes too), or with external data whose ``location`` is absolute,
escapes the model's folder (``../x``, symlinks out of it) or is missing.

External data: :func:`load_model` reads external tensors into memory when they total at most
:data:`INLINE_EXTERNAL_LIMIT` (so the model can still be handed to ONNX Runtime or the analyzer
as a proto); bigger models keep them as :class:`StreamedTensor` references, read from the file
each time a pass asks and dropped by the pass afterwards, so memory holds one weight at a time.
:func:`save_model` writes ``<name>.data`` beside the model when the initializers exceed
:data:`EXTERNAL_THRESHOLD` (or when asked), data file first, model second, each through a
temp file and an atomic rename, so a reader never sees a model pointing at missing data.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from lpcompile.errors import LpError, ModelLoadError
from lpcompile.io_utils import atomic_path

logger = logging.getLogger(__name__)

PROTOBUF_LIMIT = 2**31 - 1
EXTERNAL_THRESHOLD = 1_800_000_000
"""Bytes of initializers beyond which :func:`save_model` writes external data."""
INLINE_EXTERNAL_LIMIT = 1_000_000_000
"""External data up to this many bytes is read into memory on load (the model then fits one proto)."""
STREAMED_INLINE_LIMIT = 256 * 2**20
""":func:`save_model` writes a model loaded with streamed weights with external data above this many bytes."""
STREAMED_META = "lpcompile.streamed"
"""``model.meta`` key :func:`load_model` sets when the model's weights stream from their file."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _external_location(tensor: onnx.TensorProto) -> str:
    return next((e.value for e in tensor.external_data if e.key == "location"), "")


def _check_external_locations(proto: onnx.ModelProto, base: Path) -> None:
    """Refuse external data outside ``base`` (absolute, ``..``, symlinks out) or missing.

    Raises:
        ModelLoadError: naming the tensor and its location.
    """
    base_resolved = base.resolve()
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        if not onnx.external_data_helper.uses_external_data(tensor):
            continue
        location = _external_location(tensor)
        what = f"external data location {location!r} of tensor {tensor.name!r}"
        if not location or "\x00" in location:
            raise ModelLoadError(f"{what} is empty or malformed")
        loc = Path(location)
        if loc.is_absolute() or location.startswith(("/", "\\")) or ".." in loc.parts or ".." in location.split("\\"):
            raise ModelLoadError(f"{what} escapes the model folder (absolute or '..' paths are refused)")
        try:
            inside = (base_resolved / loc).resolve().is_relative_to(base_resolved)
        except (OSError, RuntimeError, ValueError):
            inside = False
        if not inside:
            raise ModelLoadError(f"{what} escapes the model folder (through a link)")
        if not (base / loc).is_file():
            raise ModelLoadError(
                f"external data file {location!r} of tensor {tensor.name!r} not found beside the model"
            )


def _read_header(path: Path) -> onnx.ModelProto:
    """Parse the model file without its external data (one-line errors for unreadable files)."""
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelLoadError(f"model path is not a file: {path}")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"model file is empty: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except PermissionError:
        raise ModelLoadError(f"model file is not readable (permission denied): {path}") from None
    except Exception as exc:  # protobuf DecodeError, UnicodeDecodeError, ...
        raise ModelLoadError(f"not a readable ONNX model: {path} ({type(exc).__name__})") from None
    if not proto.HasField("graph") or (not proto.graph.node and not proto.graph.output):
        raise ModelLoadError(f"not an ONNX model (no graph): {path}")
    if not proto.graph.output:
        raise ModelLoadError(f"model has no graph outputs (nothing to compute): {path}")
    return proto


def check_file(path: str | os.PathLike[str]) -> None:
    """Run ``onnx.checker`` with ``full_check`` (strict type and shape inference) on a model file.

    Works from the path, so external data and >2 GB models are checked without loading them. A
    model that fails here would give a rewritten model that fails it too, or fail later in the
    analysis with a less clear message.

    Raises:
        ModelLoadError: ``model fails the ONNX checker: <first line of its message>``.
    """
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise ModelLoadError(f"model fails the ONNX checker: {path}: {_first_line(exc)}") from None


def load_proto(path: str | os.PathLike[str], *, check: bool = True, external_data: bool = True) -> onnx.ModelProto:
    """Read an ONNX file with its external data, or raise ``ModelLoadError`` with one line.

    Args:
        path: the ``.onnx`` file.
        check: run ``onnx.checker`` on it (default).
        external_data: read the external data too (False: the graph, names and metadata only; the
            external initializers keep their references).
    """
    path = Path(path)
    proto = _read_header(path)
    _check_external_locations(proto, path.parent)
    if check:
        check_file(path)
    if not external_data:
        return proto
    try:
        onnx.load_external_data_for_model(proto, str(path.parent))
    except Exception as exc:
        raise ModelLoadError(f"cannot read external data of {path}: {_first_line(exc)}") from None
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


def _all_initializers(model: ir.Model) -> list[ir.Value]:
    return [v for g in model.graphs() for v in g.initializers.values()]


def external_tensors(model: ir.Model) -> list[ir.Value]:
    """Initializers (subgraphs included) whose data lives in an external file."""
    return [v for v in _all_initializers(model) if isinstance(v.const_value, ir.ExternalTensor)]


class StreamedTensor(ir.ExternalTensor):
    """An external tensor read from its file on each access and never cached.

    ``onnx_ir.ExternalTensor`` memory-maps the data file and keeps the mapping: every page a pass
    touches stays in the process's resident set (file-backed) until the tensor is released, so a
    pass over all weights of a 2.5 GB model ends at 2.5 GB RSS. This tensor reads the bytes with
    ``np.fromfile`` instead: the array belongs to the caller and is freed when the caller drops it,
    so passes that touch one weight at a time hold one weight at a time. Writing it to a file
    (``tofile``, used by ``ir.save`` with external data) copies inside the kernel. It stays an
    ``ExternalTensor``, so ``ir.to_proto`` and ``ir.save`` treat it as external data (the same
    location checks, the same refusal to overwrite its own file).

    Sub-byte types (int4, fp4, ...) fall back to the memory-mapped parent.
    """

    __slots__ = ()

    @classmethod
    def of(cls, t: ir.ExternalTensor) -> StreamedTensor:
        """The same external reference as ``t`` (location, offset, length, type, shape, base folder)."""
        return cls(
            t.location,
            t.offset,
            t.length,
            t.dtype,
            shape=t.shape,
            name=t.name or "",
            doc_string=t.doc_string,
            metadata_props=dict(t.metadata_props) if t.metadata_props else None,
            base_dir=t.base_dir,
        )

    def _streams(self) -> bool:
        return self.dtype.bitwidth >= 8 and self.size > 0

    def numpy(self) -> np.ndarray:
        """A fresh array read from the file (the caller owns it; nothing is cached here)."""
        if not self._streams():
            return super().numpy()
        self._check_validity()
        self._check_path_containment()
        dtype = np.dtype(self.dtype.numpy()).newbyteorder("<")
        arr = np.fromfile(self.path, dtype=dtype, count=self.size, offset=self.offset or 0)
        if arr.size != self.size:
            raise ValueError(f"external data of {self.name!r} is truncated ({arr.size} of {self.size} values)")
        if not dtype.isnative:
            arr = arr.astype(dtype.newbyteorder("="))
        return arr.reshape(self.shape.numpy())

    def __array__(self, dtype: object = None, copy: bool | None = None) -> np.ndarray:
        arr = self.numpy()
        return arr if dtype is None else arr.astype(dtype, copy=False)

    def tobytes(self) -> bytes:
        """The tensor's bytes, read from the file."""
        if not self._streams():
            return super().tobytes()
        self._check_validity()
        self._check_path_containment()
        length = self.length if self.length is not None else self.nbytes
        with open(self.path, "rb") as f:
            f.seek(self.offset or 0)
            data = f.read(length)
        if len(data) != length:
            raise ValueError(f"external data of {self.name!r} is truncated ({len(data)} of {length} bytes)")
        return data


def stream_external(model: ir.Model) -> int:
    """Replace every memory-mapped external initializer by a :class:`StreamedTensor`; return how many.

    Raises:
        ModelLoadError: a tensor's bytes run past the end of its data file (a truncated file would
            otherwise fail in the middle of a pass).
    """
    n = 0
    sizes: dict[str, int] = {}
    for v in external_tensors(model):
        t = v.const_value
        if isinstance(t, StreamedTensor) or t.raw is not None:  # streamed already, or mapped by its owner
            continue
        if t.path not in sizes:
            sizes[t.path] = os.stat(t.path).st_size
        end = (t.offset or 0) + (t.length if t.length is not None else t.nbytes)
        if end > sizes[t.path] or (t.length is not None and t.length < t.nbytes):
            raise ModelLoadError(
                f"external data of tensor {t.name!r} is truncated: it needs bytes up to {end:,} of "
                f"{t.location!r}, which holds {sizes[t.path]:,}"
            )
        v.const_value = StreamedTensor.of(t)
        n += 1
    return n


def materialize(model: ir.Model) -> int:
    """Read every external initializer into memory (the model no longer refers to files); return how many."""
    n = 0
    for v in external_tensors(model):
        t = v.const_value
        v.const_value = ir.Tensor(np.array(t.numpy()), name=t.name, doc_string=t.doc_string)
        n += 1
    return n


def load_model(path: str | os.PathLike[str], *, check: bool = True) -> ir.Model:
    """Load an ONNX model into onnx-ir with unique node names.

    External data is memory-mapped; when it totals at most :data:`INLINE_EXTERNAL_LIMIT` bytes
    it is read into memory so the model is self-contained.
    """
    path = Path(path)
    proto = _read_header(path)
    _check_external_locations(proto, path.parent)
    if check:
        check_file(path)
    try:
        model = ir.from_proto(proto)
        ir.external_data.set_base_dir(model.graph, path.parent)
        for g in model.graphs():
            ir.external_data.set_base_dir(g, path.parent)
        ext = external_tensors(model)
        if ext and sum(v.const_value.nbytes for v in ext) <= INLINE_EXTERNAL_LIMIT:
            materialize(model)
        elif ext:
            stream_external(model)
            model.meta[STREAMED_META] = True
            logger.info("%d external initializer(s) of %s are read from the file one at a time", len(ext), path)
        _check_text(model)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"cannot read ONNX model {path}: {_first_line(exc)}") from None
    del proto
    n = ensure_node_names(model)
    if n:
        logger.info("named %d unnamed node(s)", n)
    return model


def _check_text(model: ir.Model) -> None:
    """Names and doc strings must be text: protobuf (proto2) lets invalid UTF-8 through as bytes,
    which onnx-ir cannot write back."""

    def bad(x: object) -> bool:
        return x is not None and not isinstance(x, str)

    for g in model.graphs():
        if bad(g.name) or bad(g.doc_string):
            raise ModelLoadError(f"graph name or doc string {g.name!r} is not valid UTF-8")
        values = [*g.inputs, *g.outputs, *g.initializers.values()]
        for node in g:
            if bad(node.name) or bad(node.doc_string) or bad(node.op_type) or bad(node.domain):
                raise ModelLoadError(f"node {node.name!r} has a name, type or doc string that is not valid UTF-8")
            for attr in node.attributes.values():
                v = attr.value
                if (
                    bad(attr.name)
                    or (attr.type == ir.AttributeType.STRING and bad(v))
                    or (attr.type == ir.AttributeType.STRINGS and any(bad(x) for x in v))
                ):
                    raise ModelLoadError(f"attribute {attr.name!r} of node {node.name!r} is not valid UTF-8")
            values.extend(v for v in (*node.inputs, *node.outputs) if v is not None)
        for v in values:
            if bad(v.name):
                raise ModelLoadError(f"tensor name {v.name!r} is not valid UTF-8")
    props = [
        model.doc_string,
        model.producer_name,
        model.producer_version,
        model.domain,
        *model.metadata_props.keys(),
        *model.metadata_props.values(),
    ]
    if any(bad(p) for p in props):
        raise ModelLoadError("model metadata is not valid UTF-8")


def model_bytes_estimate(model: ir.Model) -> int:
    """Bytes of all initializers (subgraphs included)."""
    return sum(v.const_value.nbytes for v in _all_initializers(model) if v.const_value is not None)


def external_data_name(path: str | os.PathLike[str]) -> str:
    """The external data file :func:`save_model` writes beside ``path``: ``<name>.data``."""
    return Path(path).name + ".data"


def save_model(
    model: ir.Model | onnx.ModelProto, path: str | os.PathLike[str], *, external: bool | None = None
) -> Path | None:
    """Save atomically; return the external data file written, if any.

    Args:
        model: the model (not modified).
        path: the ``.onnx`` file.
        external: write initializers to ``<name>.data`` beside ``path``; ``None`` (default) does
            so when they exceed :data:`EXTERNAL_THRESHOLD` bytes, or :data:`STREAMED_INLINE_LIMIT`
            bytes for a model whose weights were streamed (:class:`StreamedTensor`; a big input and
            what is rewritten from it). Without external data a stale
            ``<name>.data`` beside the target is left alone; the new model does not refer to it.
    """
    path = Path(path)
    if isinstance(model, onnx.ModelProto):
        model = ir.from_proto(model)
    if external is None:
        # a model still reading many weights from its input's file (a big model: see load_model)
        # keeps external data, so those weights go from file to file without passing through memory
        # (or came from such a model): its output, once above the limit too, is written tensor by
        # tensor instead of as one protobuf that holds a second and a third copy of every weight
        size = model_bytes_estimate(model)
        streamed = bool(model.meta.get(STREAMED_META)) or any(
            isinstance(v.const_value, StreamedTensor) for v in external_tensors(model)
        )
        external = size > EXTERNAL_THRESHOLD or (streamed and size > STREAMED_INLINE_LIMIT)
    try:
        if external:
            return _save_external(model, path)
        if external_tensors(model):  # never let the output refer to the input's data file
            model = model.clone()
            materialize(model)
        with atomic_path(path) as tmp:
            ir.save(model, tmp)
        return None
    except OSError as exc:
        raise LpError(f"cannot write {path}: {_first_line(exc)}") from None


def _save_external(model: ir.Model, path: Path) -> Path | None:
    """Model and ``<name>.data`` under temp names (both through :func:`atomic_path`, so an output
    session guards and commits them together); the data is renamed first, the model second, so the
    model on disk never points at data that is not there yet."""
    path = path.resolve()  # the data file goes beside the real model file
    data_path = path.with_name(external_data_name(path))
    with atomic_path(path) as tmp_model:
        try:
            with atomic_path(data_path) as tmp_data:
                # small tensors stay inline, unless they are external already (they must leave the input's file)
                threshold = 0 if external_tensors(model) else 1024
                ir.save(model, tmp_model, external_data=tmp_data.name, size_threshold_bytes=threshold)
                if not _rewrite_location(tmp_model, tmp_data.name, data_path.name):
                    raise _NoExternalData  # every tensor was small enough to stay inline
        except _NoExternalData:
            return None
    return data_path


class _NoExternalData(Exception):
    """Internal: discard the data temp file, keep the model."""


def _rewrite_location(model_path: Path, old: str, new: str) -> int:
    """Point tensors stored in ``old`` at ``new``; return how many tensors are external."""
    proto = onnx.load(str(model_path), load_external_data=False)
    count = 0
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new
                count += 1
    if count:
        onnx.save(proto, str(model_path))
    return count
