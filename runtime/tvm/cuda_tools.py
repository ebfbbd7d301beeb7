"""nvcc / nvdisasm helpers: compile generated CUDA source to PTX and cubin, read the instructions.

Used without a GPU: the CUDA C that TVM generates is compiled here for a given ``sm_XX`` and the
PTX / SASS is inspected for the instructions a kernel is meant to use (tensor-core MMA with the
intended operand types, 4-bit unpacking by shifts and masks). nvcc runs in a child process.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from lpcompile.errors import LpError

logger = logging.getLogger(__name__)

NVCC_TIMEOUT_S = 600


def find_nvcc() -> str | None:
    """Path of nvcc (PATH, then ``$CUDA_HOME/bin``), or None."""
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    return None


def find_nvdisasm() -> str | None:
    """Path of nvdisasm (PATH, beside nvcc, or the ``nvidia-cuda-nvdisasm`` wheel), or None."""
    found = shutil.which("nvdisasm")
    if found:
        return found
    nvcc = find_nvcc()
    if nvcc and (Path(nvcc).parent / "nvdisasm").is_file():
        return str(Path(nvcc).parent / "nvdisasm")
    try:
        import nvidia  # the namespace package of NVIDIA's pip wheels
    except ImportError:
        return None
    for base in getattr(nvidia, "__path__", []):
        for cand in sorted(Path(base).glob("*/bin/nvdisasm")):
            if cand.is_file():
                return str(cand)
    return None


def compile_cuda(
    source: str,
    workdir: str | os.PathLike[str],
    stem: str,
    *,
    arch: str | None = "sm_90",
    kinds: Sequence[str] = ("ptx", "cubin"),
) -> dict[str, Path]:
    """Write ``stem.cu`` and compile it with nvcc to each of ``kinds`` (``ptx``, ``cubin``).

    ``arch=None`` means sm_90. Raises ``LpError`` when nvcc is missing or fails (with nvcc's
    first error line).
    """
    nvcc = find_nvcc()
    if nvcc is None:
        raise LpError("nvcc not found (install the CUDA toolkit or set CUDA_HOME)")
    arch = arch or "sm_90"
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    cu = work / f"{stem}.cu"
    if not cu.exists() or cu.read_text() != source:
        cu.write_text(source)
    out: dict[str, Path] = {}
    for kind in kinds:
        if kind not in ("ptx", "cubin"):
            raise LpError(f"unknown nvcc output kind {kind!r}")
        target = work / f"{stem}.{kind}"
        cmd = [nvcc, f"-arch={arch}", f"--{kind}", "-o", str(target), str(cu), "-w"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=NVCC_TIMEOUT_S, check=False)
        if proc.returncode != 0:
            err = next((ln for ln in proc.stderr.splitlines() if "error" in ln), proc.stderr.strip()[-300:])
            raise LpError(f"nvcc ({kind}, {arch}) failed: {err}")
        out[kind] = target
    return out


def disassemble(cubin: str | os.PathLike[str]) -> str:
    """SASS of a cubin (nvdisasm). Raises ``LpError`` when nvdisasm is not available."""
    tool = find_nvdisasm()
    if tool is None:
        raise LpError("nvdisasm not found (pip install nvidia-cuda-nvdisasm)")
    proc = subprocess.run([tool, str(cubin)], capture_output=True, text=True, timeout=NVCC_TIMEOUT_S, check=False)
    if proc.returncode != 0:
        raise LpError(f"nvdisasm failed: {proc.stderr.strip()[:300]}")
    return proc.stdout


_PTX_FUNC = re.compile(r"^\.visible \.entry (\w+)\(", re.M)
_SASS_FUNC = re.compile(r"^\s*\.text\.(\w+):", re.M)


def split_functions(text: str, kind: str) -> dict[str, str]:
    """``{kernel name: its PTX / SASS text}``."""
    pattern = _PTX_FUNC if kind == "ptx" else _SASS_FUNC
    marks = [(m.start(), m.group(1)) for m in pattern.finditer(text)]
    out: dict[str, str] = {}
    for i, (start, name) in enumerate(marks):
        end = marks[i + 1][0] if i + 1 < len(marks) else len(text)
        out[name] = text[start:end]
    return out


def opcodes(text: str, kind: str) -> Counter[str]:
    """Count instruction mnemonics (with modifiers) in PTX or SASS text."""
    counts: Counter[str] = Counter()
    if kind == "ptx":
        for line in text.splitlines():
            s = line.strip().strip("{}").strip()  # inline asm comes wrapped in braces
            if not s or s.startswith(("//", ".")) or s.endswith(":"):
                continue
            s = re.sub(r"^@!?%\w+\s+", "", s)  # predicate guard
            op = re.split(r"[\s{;]", s, maxsplit=1)[0]
            counts[op] += 1
    else:
        for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", text):
            counts[m.group(1)] += 1
    return counts
