"""lpcompile: a compiler for numerical precision."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "compile"]


def __getattr__(name: str) -> Any:
    """Lazy public API: ``lpcompile.compile`` imports torch only when first used."""
    if name == "compile":
        from lpcompile.torch_api import compile as compile_

        return compile_
    raise AttributeError(f"module 'lpcompile' has no attribute {name!r}")
