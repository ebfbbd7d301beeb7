"""Safe file output: one guard for every file a command writes, committed together, never over an input.

Three layers:

* :func:`check_outputs` / :func:`guard_output`: refuse an output whose resolved path (symlinks
  followed, hard links compared by inode) is one of the inputs or one of an input model's
  external-data files (found by :func:`model_data_files`, which scans the protobuf without
  reading weights), an output that is a directory, a device node, a FIFO or a socket, and two
  outputs of one run that are the same file. ``force`` never lets an output replace an input;
  a previous output is always replaced.
* :class:`OutputSession`: one run's outputs. Entering it makes every :func:`atomic_path` of the
  process (model, external data, plan, report, overlays, sources, ``.meta.json``) write a temp
  file beside its target and *defer* the rename; leaving it without an exception renames them
  all, in the order they were written, with SIGINT/SIGTERM blocked, so a run leaves either all
  of its outputs or none. On any exception (KeyboardInterrupt and :class:`Terminated` included)
  the temp files are removed. Each output is locked (``.NAME.lpcompile.lock`` beside it, flock;
  the lock file is removed on release) so a second concurrent writer of the same output fails
  at once with one line.
* :func:`atomic_path` alone (no session): the temp file is renamed over the target at once.

Bounded readers live here too: :func:`read_json_bounded` (size and nesting depth checked before
parsing), :func:`check_plan_limits` (node count, linear duplicate check) and
:func:`check_activation_scales` (finite, positive, normal).
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import hashlib
import json
import logging
import math
import mmap
import os
import secrets
import shutil
import signal
import stat
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lpcompile.errors import LpError, UsageError

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

LOCK_SUFFIX = ".lpcompile.lock"

MAX_JSON_BYTES = 256 * 1024 * 1024
"""Largest JSON file (plan, sensitivity table, metadata) :func:`read_json_bounded` reads."""
MAX_JSON_DEPTH = 64
"""Deepest nesting of arrays/objects accepted in a JSON input (a plan needs 4)."""
MAX_PLAN_NODES = 200_000
"""Most nodes a plan (or sensitivity table) may list; large language models have ~10^3–10^4 weighted nodes."""


class Terminated(BaseException):
    """Raised in the main thread by the SIGTERM handler the CLI installs (exit code 143)."""


def _why(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


# -------------------------------------------------------------------------------------------------
# inputs: a model's external-data files, read from the protobuf wire format (no weights read)


def _varint(buf: Any, pos: int, end: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: Any, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, start, end) of each field in ``buf[start:end]``; for varints start = value."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield num, wire, value, pos
        elif wire == 1:
            pos += 8
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise ValueError("truncated field")
            yield num, wire, pos, pos + length
            pos += length
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")


# message -> {field number: message kind of that length-delimited field}
_SCHEMA: dict[str, dict[int, str]] = {
    "model": {7: "graph", 25: "function"},
    "function": {7: "node"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
}


def _scan(buf: Any, kind: str, start: int, end: int, found: set[str], depth: int) -> None:
    if depth > 100:
        raise ValueError("graph nesting too deep")
    if kind == "tensor":
        for num, wire, s, e in _fields(buf, start, end):
            if num == 13 and wire == 2:  # external_data: StringStringEntryProto
                entry = {n: bytes(buf[a:b]) for n, w, a, b in _fields(buf, s, e) if w == 2}
                if entry.get(1) == b"location" and 2 in entry:
                    found.add(entry[2].decode("utf-8", "replace"))
        return
    sub = _SCHEMA[kind]
    for num, wire, s, e in _fields(buf, start, end):
        if wire == 2 and num in sub:
            _scan(buf, sub[num], s, e, found, depth + 1)


def external_data_locations(path: PathLike) -> list[str]:
    """The ``location`` of every external tensor of an ONNX file, without reading any weights.

    Scans the protobuf wire format through ``mmap`` (raw data is skipped, never copied).
    Returns an empty list for files that cannot be parsed (the loader reports those).
    """
    found: set[str] = set()
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size == 0:
                return []
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                _scan(buf, "model", 0, size, found, 0)
    except (OSError, ValueError) as exc:
        logger.debug("cannot scan %s for external data: %s", path, exc)
    return sorted(found)


def model_data_files(path: PathLike) -> list[Path]:
    """The external-data files an ONNX model refers to (resolved, whether they exist or not)."""
    base = Path(path).resolve().parent
    out = []
    for loc in external_data_locations(path):
        if loc and "\x00" not in loc:
            out.append((base / loc).resolve())
    return out


def _is_model(path: Path) -> bool:
    return path.suffix.lower() == ".onnx"


@dataclass(frozen=True)
class _Protected:
    path: Path  # the input as given
    resolved: Path
    ident: tuple[int, int] | None  # (st_dev, st_ino) when it exists

    @staticmethod
    def of(path: Path, shown: Path | None = None) -> _Protected:
        resolved = path.resolve()
        try:
            st = os.stat(resolved)
            ident: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except OSError:
            ident = None
        return _Protected(shown or path, resolved, ident)


def protected_inputs(inputs: Iterable[PathLike | None], models: Iterable[PathLike | None] = ()) -> list[_Protected]:
    """Every input file, plus the external-data files of each model (``.onnx`` inputs and ``models``)."""
    result: list[_Protected] = []
    models = [Path(m) for m in models if m is not None]
    for raw in inputs:
        if raw is None:
            continue
        p = Path(raw)
        result.append(_Protected.of(p))
        if p.is_dir():  # a calibration folder: the files in it are inputs too
            with contextlib.suppress(OSError):
                for i, child in enumerate(sorted(p.iterdir())):
                    if i >= 100_000:
                        break
                    result.append(_Protected.of(child))
        if _is_model(p) and p not in models:
            models.append(p)
    for m in models:
        if Path(m).is_file():
            result.extend(_Protected.of(d, d) for d in model_data_files(m))
    return result


# -------------------------------------------------------------------------------------------------
# the guard


def _resolve_output(path: PathLike) -> Path:
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError) as exc:  # symlink loop
        raise UsageError(f"output {path} cannot be resolved ({exc})") from None


def guard_output(path: PathLike, protected: Sequence[_Protected]) -> Path:
    """Check one output; return its resolved path.

    Raises:
        UsageError: the output is a directory, not a regular file (device, FIFO, socket), or one
            of the protected inputs (exit code 2).
    """
    out = Path(path)
    if not str(path):
        raise UsageError("output path is empty")
    resolved = _resolve_output(out)
    try:
        st: os.stat_result | None = os.stat(resolved)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ENAMETOOLONG, errno.ELOOP):
            raise LpError(f"cannot write {out}: {_why(exc)}") from None
        st = None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise UsageError(f"output {out} is a directory; give a file name")
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"output {out} is not a regular file (device, FIFO or socket); refusing to replace it")
    ident = (st.st_dev, st.st_ino) if st is not None else None
    for inp in protected:
        if resolved == inp.resolved or (ident is not None and ident == inp.ident):
            what = "the input model" if _is_model(inp.path) else f"an input ({inp.path})"
            via = f" (through {out} -> {resolved})" if out.is_symlink() else ""
            raise UsageError(f"output {out} is {what}{via}; choose another output (--force never replaces an input)")
    return resolved


def check_outputs(
    outputs: Iterable[PathLike | None],
    inputs: Iterable[PathLike | None],
    *,
    force: bool = False,
    models: Iterable[PathLike | None] = (),
) -> list[Path]:
    """Refuse outputs that would replace an input (or its external data), that are not regular files,
    or that name the same file twice. Returns the resolved outputs.

    An ``.onnx`` output also checks the ``<output>.data`` file it may write beside it.

    Args:
        outputs: every file the command is about to write (``None`` entries are skipped).
        inputs: every file it reads (``None`` entries are skipped); ``.onnx`` inputs bring their
            external-data files.
        force: kept for the ``--force`` flags: a previous output is always replaced, an input never.
        models: inputs that are ONNX models whatever their name.

    Raises:
        UsageError: naming the output and what it would replace (exit code 2).
    """
    del force  # --force replaces previous outputs only, which are replaced anyway
    protected = protected_inputs(inputs, models)
    seen: dict[Path, Path] = {}
    result = []
    for raw in outputs:
        if raw is None:
            continue
        paths = [Path(raw)]
        if _is_model(Path(raw)):
            paths.append(Path(raw).with_name(Path(raw).name + ".data"))
        for i, out in enumerate(paths):
            resolved = guard_output(out, protected)
            if i == 0:
                if resolved in seen:
                    raise UsageError(f"outputs {seen[resolved]} and {out} are the same file")
                seen[resolved] = out
                result.append(resolved)
    return result


# -------------------------------------------------------------------------------------------------
# locks


@dataclass
class _Lock:
    path: Path
    fd: int

    def release(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.close(self.fd)


def lock_path_for(target: Path) -> Path:
    return target.with_name(f".{target.name}{LOCK_SUFFIX}")


def acquire_lock(target: Path) -> _Lock:
    """An exclusive, non-blocking lock on ``target`` (a lock file beside it, removed on release).

    Raises:
        LpError: another process holds it.
    """
    import fcntl

    path = lock_path_for(target)
    for _ in range(10):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise LpError(f"cannot write {target}: {_why(exc)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise LpError(
                f"output {target} is being written by another lpcompile process (lock {path.name}); "
                "wait for it or choose another output"
            ) from None
        try:  # the holder before us may have unlinked the file between our open and our flock
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
            return _Lock(path, fd)
        os.close(fd)
    raise LpError(f"cannot lock {target}: the lock file keeps changing")


# -------------------------------------------------------------------------------------------------
# sessions and atomic writes

_SESSION: contextvars.ContextVar[OutputSession | None] = contextvars.ContextVar(
    "lpcompile_output_session", default=None
)


@dataclass
class _Staged:
    tmp: Path
    target: Path
    mode: int


@dataclass
class OutputSession:
    """One run's outputs: guarded, locked, written to temp files, committed together.

    Example::

        with OutputSession(inputs=[model, calib]) as session:
            session.declare(out, plan_out)           # checked and locked before any work
            ...                                      # every atomic_path() inside is staged
        # here all outputs exist, or (on an exception) none was touched

    Attributes:
        inputs: files the run reads (``.onnx`` ones bring their external data).
        models: inputs that are ONNX models whatever their suffix.
        lock: lock each output against a concurrent writer.
        defer: defer every rename to the end of the session. With ``defer=False`` each file is
            renamed as soon as it is written (for library code that reads its outputs back before
            the session ends) and the file it replaced is kept as a hard-linked backup until the
            session ends: on an exception the outputs are undone (previous versions restored, new
            files removed). Either way a run leaves all of its outputs or none.
    """

    inputs: Sequence[PathLike | None] = ()
    models: Sequence[PathLike | None] = ()
    lock: bool = True
    defer: bool = True
    _protected: list[_Protected] = field(default_factory=list, init=False, repr=False)
    _declared: dict[Path, Path] = field(default_factory=dict, init=False, repr=False)
    _exempt: dict[Path, set[Path]] = field(default_factory=dict, init=False, repr=False)
    _locks: list[_Lock] = field(default_factory=list, init=False, repr=False)
    _staged: list[_Staged] = field(default_factory=list, init=False, repr=False)
    _published: list[tuple[Path, Path | None]] = field(default_factory=list, init=False, repr=False)
    _temps: set[Path] = field(default_factory=set, init=False, repr=False)
    _made_dirs: list[Path] = field(default_factory=list, init=False, repr=False)
    _token: contextvars.Token[OutputSession | None] | None = field(default=None, init=False, repr=False)
    _outer: OutputSession | None = field(default=None, init=False, repr=False)
    committed: list[Path] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self._protected = protected_inputs(self.inputs, self.models)

    # -- declaring ---------------------------------------------------------------------------
    def declare(self, *outputs: PathLike | None, may_replace: PathLike | None = None) -> list[Path]:
        """Check and lock outputs now (before the work); returns their resolved paths.

        ``may_replace`` names one input these outputs may replace (``apply`` rewrites the plan it
        read with the same plan, completed).
        """
        if self._outer is not None:
            return self._outer.declare(*outputs, may_replace=may_replace)
        exempt = Path(may_replace).resolve() if may_replace is not None else None
        protected = [p for p in self._protected if exempt is None or p.resolved != exempt]
        result = []
        for raw in outputs:
            if raw is None:
                continue
            resolved = guard_output(raw, protected)
            if resolved in self._declared:
                raise UsageError(f"outputs {self._declared[resolved]} and {raw} are the same file")
            else:
                for other in self._declared:  # a second output may not be an earlier one's lock or temp
                    if resolved == lock_path_for(other):
                        raise UsageError(f"output {raw} is the lock file of {other}")
                self._make_parent(resolved)
                if self.lock:
                    self._locks.append(acquire_lock(resolved))
                self._declared[resolved] = Path(raw)
            if exempt is not None:
                self._exempt.setdefault(resolved, set()).add(exempt)
            result.append(resolved)
        return result

    def _make_parent(self, target: Path) -> None:
        missing = []
        parent = target.parent
        while not parent.exists() and parent != parent.parent:
            missing.append(parent)
            parent = parent.parent
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LpError(f"cannot create folder {target.parent}: {_why(exc)}") from None
        self._made_dirs.extend(reversed(missing))

    def _check_target(self, target: Path) -> Path:
        resolved = _resolve_output(target)
        if resolved in self._declared:
            exempt = self._exempt.get(resolved, set())
            guard_output(target, [p for p in self._protected if p.resolved not in exempt])
            return resolved
        # written beside an output without being declared: guard and lock it now
        return self.declare(target)[0]

    # -- staging -----------------------------------------------------------------------------
    def _new_temp(self, target: Path, suffix: str) -> Path:
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix + ".tmp", dir=target.parent)
        except OSError as exc:
            raise LpError(f"cannot write {target}: {_why(exc)}") from None
        os.close(fd)
        self._temps.add(Path(tmp))
        return Path(tmp)

    def _stage(self, tmp: Path, target: Path) -> None:
        _fsync_file(tmp)
        for old in [s for s in self._staged if s.target == target]:
            self._discard(old.tmp)
        self._staged = [s for s in self._staged if s.target != target]
        self._staged.append(_Staged(tmp, target, _default_mode(target)))

    def _discard(self, tmp: Path) -> None:
        with contextlib.suppress(OSError):
            tmp.unlink()
        self._temps.discard(tmp)

    # -- committing --------------------------------------------------------------------------
    def publish(self) -> list[Path]:
        """Rename every staged temp file over its target now (signals blocked), keeping a hard-linked
        backup of each file it replaces until the session ends, so :meth:`abort` can undo it."""
        blocked = block_signals()
        try:
            staged, self._staged = self._staged, []
            for i, st in enumerate(staged):
                try:
                    backup = self._backup(st.target)
                    os.chmod(st.tmp, st.mode)
                    os.replace(st.tmp, st.target)
                except OSError as exc:
                    for rest in staged[i:]:
                        self._discard(rest.tmp)
                    raise LpError(f"cannot write {st.target}: {_why(exc)}") from None
                self._temps.discard(st.tmp)
                self._published.append((st.target, backup))
                self.committed.append(st.target)
            for folder in {st.target.parent for st in staged}:
                _fsync_dir(folder)
        finally:
            unblock_signals(blocked)
        return list(self.committed)

    def _backup(self, target: Path) -> Path | None:
        """A hard link to ``target``'s current content (None when there is none)."""
        if not target.exists():
            return None
        for _ in range(100):
            backup = target.with_name(f".{target.name}.{secrets.token_hex(4)}.bak")
            try:
                os.link(target, backup)
            except FileExistsError:
                continue
            except OSError:  # no hard links here: copy
                shutil.copy2(target, backup)
            self._temps.add(backup)
            return backup
        raise LpError(f"cannot back up {target}")

    def commit(self) -> list[Path]:
        """Publish what is staged and drop the backups: the run's outputs are final."""
        self.publish()
        for _, backup in self._published:
            if backup is not None:
                self._discard(backup)
        self._published = []
        return list(self.committed)

    def abort(self) -> None:
        """Undo published outputs (restore what they replaced), remove every temp file and every
        folder this session created that is still empty."""
        blocked = block_signals()
        try:
            for target, backup in reversed(self._published):
                with contextlib.suppress(OSError):
                    if backup is not None:
                        os.replace(backup, target)
                        self._temps.discard(backup)
                    else:
                        target.unlink()
            self._published = []
            self.committed = []
        finally:
            unblock_signals(blocked)
        for tmp in list(self._temps):
            self._discard(tmp)
        self._staged = []
        for folder in reversed(self._made_dirs):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty

    def release(self) -> None:
        for lk in self._locks:
            lk.release()
        self._locks = []

    def __enter__(self) -> OutputSession:
        outer = _SESSION.get()
        if outer is not None:  # nested: the outer session commits
            self._outer = outer
            outer._protected.extend(self._protected)
            return self
        self._token = _SESSION.set(self)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if self._outer is not None:
            return
        try:
            if exc_type is None:
                self.commit()
            else:
                self.abort()
        except BaseException:
            self.abort()
            raise
        finally:
            self.release()
            if self._token is not None:
                _SESSION.reset(self._token)
                self._token = None


def current_session() -> OutputSession | None:
    """The :class:`OutputSession` of this context, if one is active."""
    return _SESSION.get()


@contextlib.contextmanager
def atomic_path(target: PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it replaces ``target``.

    Inside an :class:`OutputSession` the target is guarded (and locked) and the rename is
    deferred to the session's commit; otherwise the temp file is flushed (``fsync``) and renamed
    at once. On any exception (KeyboardInterrupt included) the temp file is removed and
    ``target`` is left untouched.

    Raises:
        UsageError: ``target`` is a directory or not a regular file, or (in a session) an input.
        LpError: the folder cannot be created or written.
    """
    target = Path(target)
    session = _SESSION.get()
    if session is not None:
        resolved = session._check_target(target)
        tmp_path = session._new_temp(resolved, suffix)
        try:
            yield tmp_path
            session._stage(tmp_path, resolved)
            if not session.defer:
                session.publish()
        except BaseException as exc:
            session._discard(tmp_path)
            if isinstance(exc, OSError):
                raise LpError(f"cannot write {target}: {_why(exc)}") from None
            raise
        return
    resolved = guard_output(target, [])
    try:
        resolved.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{resolved.name}.", suffix=suffix + ".tmp", dir=resolved.parent)
    except OSError as exc:
        raise LpError(f"cannot write {target}: {_why(exc)}") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _fsync_file(tmp_path)
        os.chmod(tmp_path, _default_mode(resolved))
        blocked = block_signals()
        try:
            os.replace(tmp_path, resolved)
        finally:
            unblock_signals(blocked)
        _fsync_dir(resolved.parent)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        if isinstance(exc, OSError):
            raise LpError(f"cannot write {target}: {_why(exc)}") from None
        raise


def block_signals() -> bool:
    """Hold SIGINT/SIGTERM back (they stay pending); returns whether they were blocked."""
    if os.name != "posix":  # pragma: no cover
        return False
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    except (OSError, ValueError):  # pragma: no cover
        return False
    return True


def unblock_signals(blocked: bool) -> None:
    if blocked:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def _fsync_file(path: Path) -> None:
    with contextlib.suppress(OSError), open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":  # pragma: no cover
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _default_mode(target: Path) -> int:
    """The mode a plain ``open(target, "w")`` would give (mkstemp makes files 0600)."""
    if target.exists():
        return target.stat().st_mode & 0o777
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(target: PathLike, data: bytes) -> None:
    """Write ``data`` to ``target`` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(target: PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``target`` atomically."""
    atomic_write_bytes(target, text.encode("utf-8"))


def same_file(a: PathLike, b: PathLike) -> bool:
    """Whether two paths name the same file (links and ``..`` resolved); False if either is missing."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.resolve() == b.resolve()
    except (OSError, ValueError, RuntimeError):
        return False


def file_sha256(path: PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


ELF_MAGIC = b"\x7fELF"


def verify_shared_library(path: PathLike, expected: Mapping[str, Any] | None) -> None:
    """Check a ``.so`` before anything loads it: a regular ELF file whose size and SHA-256 are those
    recorded when it was built (``expected = {"bytes": N, "sha256": HEX}``).

    Raises:
        LpError: one line naming what does not match (the library is never opened by the loader).
    """
    p = Path(path)
    try:
        st = os.stat(p)
    except OSError as exc:
        raise LpError(f"cannot read compiled module {p}: {_why(exc)}") from None
    if not stat.S_ISREG(st.st_mode):
        raise LpError(f"compiled module {p} is not a regular file")
    with open(p, "rb") as fh:
        magic = fh.read(4)
    if magic != ELF_MAGIC:
        raise LpError(f"{p} is not a shared library (no ELF header)")
    if not expected or not isinstance(expected.get("sha256"), str) or not isinstance(expected.get("bytes"), int):
        raise LpError(
            f"{p.name}'s metadata records no library hash (rebuild it with `lpcompile lower`); refusing to load it"
        )
    if st.st_size != expected["bytes"]:
        raise LpError(
            f"{p} has {st.st_size:,} bytes, its metadata says {expected['bytes']:,} (truncated or replaced); "
            "rebuild it with `lpcompile lower`"
        )
    if file_sha256(p) != expected["sha256"]:
        raise LpError(f"{p} does not match the hash in its metadata (modified or replaced); rebuild it")


# -------------------------------------------------------------------------------------------------
# bounded JSON


def _json_depth(text: str) -> int:
    """Deepest nesting of ``[``/``{`` outside strings (linear scan)."""
    depth = best = 0
    in_str = esc = False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            best = max(best, depth)
        elif ch in "]}":
            depth -= 1
    return best


def read_json_bounded(
    path: PathLike,
    what: str = "JSON file",
    *,
    max_bytes: int = MAX_JSON_BYTES,
    max_depth: int = MAX_JSON_DEPTH,
    error: type[LpError] = LpError,
) -> Any:
    """Parse a JSON file after checking its size and nesting depth.

    Args:
        path: the file.
        what: what the file is, for messages (``"plan"``: ``cannot read plan X: ...``).
        max_bytes: largest file accepted.
        max_depth: deepest nesting of arrays/objects accepted.
        error: the :class:`LpError` subclass to raise (e.g. ``PlanError``).

    Raises:
        error: missing, unreadable, too large, too deeply nested, or not JSON (one line).
    """
    p = Path(path)
    try:
        st = os.stat(p)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"cannot read {what} {p}: not a regular file")
        if st.st_size > max_bytes:
            raise error(f"cannot read {what} {p}: {st.st_size:,} bytes, more than the {max_bytes:,} accepted")
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{what} file not found: {p}") from None
    except UnicodeDecodeError:
        raise error(f"cannot read {what} {p}: not UTF-8 text") from None
    except OSError as exc:
        raise error(f"cannot read {what} {p}: {_why(exc)}") from None
    depth = _json_depth(text)
    if depth > max_depth:
        raise error(f"cannot read {what} {p}: nested {depth} levels deep (at most {max_depth} accepted)")
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError, ValueError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise error(f"{what} {p} is not valid JSON: {msg}") from None


def check_plan_limits(data: Any, *, max_nodes: int = MAX_PLAN_NODES, what: str = "plan") -> None:
    """Check a parsed plan (or sensitivity table) before it is turned into objects.

    ``data`` is the parsed JSON: ``{"nodes": [{"name": ...}, ...], ...}``. The node count is
    bounded and duplicate names are found in one pass (a set), so a million-node file is refused
    or accepted in well under a second.

    Raises:
        LpError: not an object, ``nodes`` not a list, too many nodes, a node without a string
            name, or a name listed twice.
    """
    if not isinstance(data, dict):
        raise LpError(f"{what} must be a JSON object, not {type(data).__name__}")
    nodes = data.get("nodes", [])
    if not isinstance(nodes, list):
        raise LpError(f"{what} 'nodes' must be a list, not {type(nodes).__name__}")
    if len(nodes) > max_nodes:
        raise LpError(f"{what} lists {len(nodes):,} nodes, more than the {max_nodes:,} accepted")
    seen: set[str] = set()
    for i, node in enumerate(nodes):
        name = node.get("name") if isinstance(node, dict) else None
        if not isinstance(name, str):
            raise LpError(f"{what} node #{i} has no string 'name'")
        if name in seen:
            raise LpError(f"{what} lists node {name!r} twice")
        seen.add(name)


def check_activation_scales(scales: Mapping[str, Any], *, what: str = "plan") -> dict[str, float]:
    """Activation scales must be finite, positive, normal float32 numbers; returns them as floats.

    A zero, negative, NaN/Inf or denormal scale makes a Q/DQ pair produce NaN or Inf (a
    division by the scale); such a plan is refused instead of giving an all-NaN model.

    Raises:
        LpError: naming the tensor and its scale.
    """
    if not isinstance(scales, Mapping):
        raise LpError(f"{what} activation_scales must be an object of tensor: scale")
    tiny = 1.1754943508222875e-38  # smallest normal float32
    big = 3.4028234663852886e38
    out: dict[str, float] = {}
    for name, value in scales.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise LpError(f"{what} activation scale of {name!r} is not a number: {value!r}")
        v = float(value)
        if not math.isfinite(v) or v < tiny or v > big:
            raise LpError(
                f"{what} activation scale of {name!r} is {value!r}; scales must be finite, positive float32 "
                "normal numbers"
            )
        out[str(name)] = v
    return out


SEED_MAX = 2**63 - 1


def check_seed(seed: int) -> int:
    """A seed every generator takes (numpy, torch): 0 ≤ seed < 2**63.

    Raises:
        UsageError: out of range.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise UsageError(f"--seed must be an integer between 0 and {SEED_MAX}, not {seed}")
    return seed
