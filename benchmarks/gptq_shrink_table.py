"""Markdown table of the held-out per-node sums written by ``gptq_heldout.py --shrink ...`` (issue 19):
one row per model, one column per setting (sum of relative layer-output errors; nodes worse than nearest).

    python benchmarks/gptq_shrink_table.py benchmarks/gptq_shrink_*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    files = [Path(a) for a in sys.argv[1:]]
    tables = [(f.stem.removeprefix("gptq_shrink_"), json.loads(f.read_text())["summary"]) for f in files]
    cols: list[str] = []
    for _, s in tables:
        cols += [c for c in s if c not in cols]
    print("| model | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for name, s in tables:
        cells = [f"{s[c]['sum']:.4g} ({len(s[c]['worse_than_nearest'])})" if c in s else "–" for c in cols]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
