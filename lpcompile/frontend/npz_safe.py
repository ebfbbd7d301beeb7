"""Bounded ``.npz`` / ``.npy`` reading: every header is checked before anything inflates.

``np.load`` on an ``.npz`` allocates whatever the ``.npy`` header inside says (a 6 MB file can
claim 6 GiB, or 10^12 elements) and inflates it all, even when only the first samples are used.
:func:`read_npz` reads each member's header first, refuses pickled or object arrays, computes the
bytes it would need (only the first ``max_rows`` rows of C-ordered arrays are read when
``max_rows`` is given), checks the total against a memory budget, and only then reads the data
in chunks into one preallocated array. Arrays come back in native byte order (big-endian files
are converted), so torch and ONNX Runtime take them.

Every problem is an :class:`NpzError` with a one-line message.
"""

from __future__ import annotations

import logging
import math
import os
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from lpcompile.errors import LpError

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 2 * 1024**3
"""Default cap on the bytes one file's arrays may take in memory (``LPCOMPILE_MAX_ARRAY_BYTES`` overrides)."""
MAX_MEMBERS = 10_000
MAX_HEADER_BYTES = 10_000
_CHUNK = 16 * 1024 * 1024


class NpzError(LpError):
    """An ``.npz`` / ``.npy`` file that cannot be read safely (exit code 1)."""


@dataclass(frozen=True)
class ArrayHeader:
    """What an ``.npy`` header promises, before any data is read."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool

    @property
    def count(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.count * self.dtype.itemsize

    def bytes_for(self, max_rows: int | None) -> int:
        """Bytes needed to read the first ``max_rows`` rows (all of them for Fortran order or scalars)."""
        if max_rows is None or not self.shape or self.fortran_order or self.shape[0] <= max_rows:
            return self.nbytes
        return max_rows * math.prod(self.shape[1:]) * self.dtype.itemsize


def available_memory() -> int | None:
    """Bytes of memory available now (``MemAvailable``, bounded by ``RLIMIT_AS``); None if unknown."""
    avail: int | None = None
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        avail = None
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            avail = soft if avail is None else min(avail, soft)
    except (ImportError, OSError, ValueError):
        pass
    return avail


def memory_budget(max_bytes: int | None = None) -> int:
    """The byte budget for one file: ``max_bytes`` (or ``LPCOMPILE_MAX_ARRAY_BYTES``, or
    :data:`DEFAULT_MAX_BYTES`), and at most half the memory available now."""
    if max_bytes is None:
        env = os.environ.get("LPCOMPILE_MAX_ARRAY_BYTES", "")
        max_bytes = int(env) if env.isdigit() else DEFAULT_MAX_BYTES
    avail = available_memory()
    if avail is not None:
        max_bytes = min(max_bytes, avail // 2)
    return max_bytes


def human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if size < 1024 or unit == "PiB":
            return f"{size:.3g} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def _read_header(fp: IO[bytes], name: str, where: str) -> ArrayHeader:
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(fp, max_header_size=MAX_HEADER_BYTES)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = fmt.read_array_header_2_0(fp, max_header_size=MAX_HEADER_BYTES)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except (ValueError, EOFError, OSError, SyntaxError, TypeError, zipfile.BadZipFile) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise NpzError(f"array {name!r} in {where} has a malformed .npy header: {msg}") from None
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise NpzError(f"array {name!r} in {where} holds Python objects (pickled); save plain numeric arrays")
    if any(not isinstance(d, int) or d < 0 for d in shape):
        raise NpzError(f"array {name!r} in {where} has an invalid shape {shape}")
    return ArrayHeader(name, tuple(int(d) for d in shape), dtype, bool(fortran))


def _read_data(fp: IO[bytes], header: ArrayHeader, max_rows: int | None, where: str) -> np.ndarray:
    need = header.bytes_for(max_rows)
    shape = header.shape
    if need != header.nbytes:
        shape = (max_rows or 0, *header.shape[1:])
    return _read_exact(fp, header, shape, need, where)


def _read_exact(fp: IO[bytes], header: ArrayHeader, shape: tuple[int, ...], need: int, where: str) -> np.ndarray:
    """The next ``need`` bytes of ``fp`` as an array of ``shape``, in chunks, in native byte order."""
    buf = np.empty(need, dtype=np.uint8)
    view = memoryview(buf)
    got = 0
    while got < need:
        n = fp.readinto(view[got : min(need, got + _CHUNK)])  # type: ignore[attr-defined]
        if not n:
            raise NpzError(f"array {header.name!r} in {where} is truncated: {got:,} of {need:,} bytes present")
        got += n
    arr = buf.view(header.dtype).reshape(shape, order="F" if header.fortran_order else "C")
    if arr.dtype.byteorder not in ("=", "|") and arr.dtype.byteorder != _NATIVE:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr


_NATIVE = "<" if np.little_endian else ">"


def _check_budget(headers: Iterable[ArrayHeader], max_rows: int | None, budget: int, where: str) -> None:
    total = 0
    for h in headers:
        need = h.bytes_for(max_rows)
        total += need
        if total > budget:
            rows = "" if max_rows is None else f" (first {max_rows} rows)"
            raise NpzError(
                f"array {h.name!r} in {where} would take {human_bytes(need)}{rows}: shape {list(h.shape)} {h.dtype}; "
                f"the arrays of this file may take at most {human_bytes(budget)} of memory "
                "(LPCOMPILE_MAX_ARRAY_BYTES sets the cap, never above half the available memory)"
            )


def npz_headers(path: str | os.PathLike[str]) -> dict[str, ArrayHeader]:
    """The header of every array in an ``.npz``, read without inflating any data."""
    p = Path(path)
    with _open_zip(p) as zf:
        return {h.name: h for h in _headers(zf, p)}


def _open_zip(p: Path) -> zipfile.ZipFile:
    if not p.is_file():
        raise NpzError(f"array file not found: {p}")
    try:
        return zipfile.ZipFile(p)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise NpzError(f"not a readable .npz file: {p} ({type(exc).__name__})") from None


def _headers(zf: zipfile.ZipFile, p: Path) -> list[ArrayHeader]:
    infos = [i for i in zf.infolist() if i.filename.endswith(".npy") and not i.is_dir()]
    if len(infos) > MAX_MEMBERS:
        raise NpzError(f"{p} holds {len(infos):,} arrays, more than the {MAX_MEMBERS:,} accepted")
    headers = []
    for info in infos:
        name = info.filename[: -len(".npy")]
        try:
            with zf.open(info) as fp:
                h = _read_header(fp, name, str(p))
                start = fp.tell()
        except NpzError:
            raise
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, RuntimeError) as exc:
            raise NpzError(f"cannot read array {name!r} in {p}: {type(exc).__name__}: {exc}") from None
        if info.file_size < start + h.nbytes:
            raise NpzError(
                f"array {name!r} in {p} is truncated or inconsistent: its header promises {human_bytes(h.nbytes)}, "
                f"the archive holds {human_bytes(max(info.file_size - start, 0))}"
            )
        headers.append(h)
    return headers


def read_npz(
    path: str | os.PathLike[str],
    *,
    max_rows: int | None = None,
    max_bytes: int | None = None,
    names: Iterable[str] | None = None,
) -> dict[str, np.ndarray]:
    """Read the arrays of an ``.npz`` within a memory budget.

    Args:
        path: the ``.npz`` file.
        max_rows: read only the first rows along axis 0 (``--max-samples``); None: all.
        max_bytes: cap on the bytes all arrays take (default :func:`memory_budget`).
        names: read only these arrays (default: all).

    Raises:
        NpzError: not a zip, no arrays, a pickled/object array, a malformed or truncated header,
            or arrays larger than the budget, each in one line, before any data is inflated.
    """
    p = Path(path)
    if max_rows is not None and max_rows < 0:
        raise NpzError(f"max_rows must be at least 0, not {max_rows}")
    budget = memory_budget(max_bytes)
    wanted = None if names is None else set(names)
    with _open_zip(p) as zf:
        headers = [h for h in _headers(zf, p) if wanted is None or h.name in wanted]
        if not headers:
            return {}  # the caller says what an empty file means
        _check_budget(headers, max_rows, budget, str(p))
        arrays: dict[str, np.ndarray] = {}
        for h in headers:
            try:
                with zf.open(h.name + ".npy") as fp:
                    _read_header(fp, h.name, str(p))
                    arrays[h.name] = _read_data(fp, h, max_rows, str(p))
            except NpzError:
                raise
            except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
                raise NpzError(f"cannot read array {h.name!r} in {p}: {type(exc).__name__}: {exc}") from None
    return arrays


def read_npy(path: str | os.PathLike[str], *, max_rows: int | None = None, max_bytes: int | None = None) -> np.ndarray:
    """Read one ``.npy`` file within a memory budget (same checks as :func:`read_npz`)."""
    p = Path(path)
    if not p.is_file():
        raise NpzError(f"array file not found: {p}")
    try:
        with open(p, "rb") as fp:
            h = _read_header(fp, p.stem, str(p))
            size = os.fstat(fp.fileno()).st_size
            if size < fp.tell() + h.nbytes:
                raise NpzError(f"{p} is truncated: its header promises {human_bytes(h.nbytes)}")
            _check_budget([h], max_rows, memory_budget(max_bytes), str(p))
            return _read_data(fp, h, max_rows, str(p))
    except OSError as exc:
        raise NpzError(f"cannot read {p}: {exc.strerror or type(exc).__name__}") from None


def iter_npz_batches(
    path: str | os.PathLike[str],
    names: Iterable[str],
    batch_rows: int,
    *,
    max_bytes: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Yield the arrays ``names`` of an ``.npz`` ``batch_rows`` rows at a time along axis 0.

    Only one batch of each array is in memory at a time: the members are read as streams (stored
    or deflated alike), so an input of any size runs in memory bounded by the batch.

    Args:
        path: the ``.npz`` file.
        names: the arrays to read; all must be C-ordered, of rank >= 1, with the same number of rows.
        batch_rows: rows per batch (the last batch may be shorter).
        max_bytes: cap on the bytes one batch of all arrays takes (default :func:`memory_budget`).

    Raises:
        NpzError: a missing, Fortran-ordered or scalar array, row counts that differ, or a batch
            over the budget, each in one line, before any data is inflated.
    """
    p = Path(path)
    if batch_rows < 1:
        raise NpzError(f"the batch size must be at least 1, not {batch_rows}")
    wanted = list(names)
    with _open_zip(p) as zf:
        by_name = {h.name: h for h in _headers(zf, p)}
        missing = [n for n in wanted if n not in by_name]
        if missing:
            raise NpzError(f"{p} holds no array named {', '.join(map(repr, missing))}")
        headers = [by_name[n] for n in wanted]
        for h in headers:
            if not h.shape:
                raise NpzError(f"array {h.name!r} in {p} is a scalar; batches are taken along axis 0")
            if h.fortran_order and h.count > math.prod(h.shape[1:]):
                raise NpzError(f"array {h.name!r} in {p} is Fortran-ordered; save it C-ordered to read it in batches")
        rows = {h.shape[0] for h in headers}
        if len(rows) > 1:
            counts = ", ".join(f"{h.name} {h.shape[0]}" for h in headers)
            raise NpzError(f"the arrays of {p} have different numbers of rows ({counts}); batches need the same")
        _check_budget(headers, batch_rows, memory_budget(max_bytes), str(p))
        total = rows.pop() if rows else 0
        streams = []
        try:
            for h in headers:
                fp = zf.open(h.name + ".npy")
                streams.append(fp)
                _read_header(fp, h.name, str(p))
            for start in range(0, total, batch_rows):
                n = min(batch_rows, total - start)
                batch = {}
                for h, fp in zip(headers, streams, strict=True):
                    row_bytes = math.prod(h.shape[1:]) * h.dtype.itemsize
                    batch[h.name] = _read_exact(fp, h, (n, *h.shape[1:]), n * row_bytes, str(p))
                yield batch
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            raise NpzError(f"cannot read {p}: {type(exc).__name__}: {exc}") from None
        finally:
            for fp in streams:
                fp.close()
