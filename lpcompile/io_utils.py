"""Safe file output: atomic writes (temp file + rename in the target folder), never over an input."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from lpcompile.errors import LpError, UsageError

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]


def _why(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


@contextlib.contextmanager
def atomic_path(target: PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success rename it over ``target``.

    The temp file lives in the same folder so the final ``os.replace`` is atomic; its content
    is flushed to disk (``fsync``) before the rename. On any exception (KeyboardInterrupt
    included) the temp file is removed and ``target`` is left untouched.

    Raises:
        LpError: the folder cannot be created or written, or ``target`` is a directory.
    """
    target = Path(target)
    if target.is_dir():
        raise LpError(f"cannot write {target}: it is a directory")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix + ".tmp", dir=target.parent)
    except OSError as exc:
        raise LpError(f"cannot write {target}: {_why(exc)}") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _fsync_file(tmp_path)
        os.chmod(tmp_path, _default_mode(target))
        os.replace(tmp_path, target)
        _fsync_dir(target.parent)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        if isinstance(exc, OSError):
            raise LpError(f"cannot write {target}: {_why(exc)}") from None
        raise


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
    except (OSError, ValueError):
        return False


def check_outputs(outputs: Iterable[PathLike], inputs: Iterable[PathLike | None], *, force: bool = False) -> None:
    """Refuse outputs that are directories or that would replace one of the inputs.

    Args:
        outputs: every file the command is about to write.
        inputs: every file it reads (``None`` entries are skipped).
        force: allow replacing an input (``--force``).

    Raises:
        UsageError: naming the output and the input it would replace (exit code 2).
    """
    ins = [Path(p) for p in inputs if p is not None]
    for out in outputs:
        out = Path(out)
        if out.is_dir():
            raise UsageError(f"output {out} is a directory; give a file name")
        if force:
            continue
        for inp in ins:
            if inp.exists() and same_file(out, inp):
                what = "the input model" if inp.suffix == ".onnx" else f"an input ({inp})"
                raise UsageError(f"output {out} is {what}; choose another -o (or --force to replace it)")
