"""Rebuild the embedded example models (seeded; about a minute on 2 cores).

python examples/build_digits.py [--out examples/models] [--seed 0]
"""

from __future__ import annotations

import argparse
import logging

from lpcompile.examples import build_digits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="examples/models")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    art = build_digits(args.out, seed=args.seed, force=True)
    print(f"MLP held-out accuracy {art.mlp_accuracy:.3f}  -> {art.mlp}")
    print(f"CNN held-out accuracy {art.cnn_accuracy:.3f}  -> {art.cnn}")


if __name__ == "__main__":
    main()
