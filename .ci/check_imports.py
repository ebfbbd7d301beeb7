"""Type-checker resolution of every ``lpcompile.passes.*`` / ``lpcompile.runtime.*`` module.

Writes one import per module into a scratch file and runs mypy on it from the repository root,
with no import-ignoring flags: a module mypy cannot find on the file system (for example if the
``lpcompile/passes`` / ``lpcompile/runtime`` symlinks were lost) fails the check.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    sys.path.insert(0, str(ROOT))
    import lpcompile.passes
    import lpcompile.runtime

    names = [
        m.name
        for pkg in (lpcompile.passes, lpcompile.runtime)
        for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")
    ]
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "lpcompile_imports.py"
        probe.write_text("".join(f"import {n}  # noqa: F401\n" for n in sorted(names)))
        rc = subprocess.call([sys.executable, "-m", "mypy", "--follow-imports=skip", str(probe)], cwd=ROOT)
    print(f"mypy resolved {len(names)} lpcompile.passes/runtime modules" if rc == 0 else "mypy could not resolve them")
    return rc


if __name__ == "__main__":
    sys.exit(main())
