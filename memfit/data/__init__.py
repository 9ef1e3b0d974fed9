"""Example documents shipped with memfit, for the README's examples and quick tries.

``lighthouse.txt``: an invented history (about 1,700 tokens for SmolLM2's tokenizer) ending in a question whose
answer sits in the middle of the text, so a cache that drops the wrong tokens visibly loses it. Every fact in it is
made up, so the model cannot answer from memory. Write it to a file with ``python -m memfit.data > long.txt``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["EXAMPLE", "example_path", "example_text"]

EXAMPLE = "lighthouse.txt"


def example_path(name: str = EXAMPLE) -> Path:
    """Path of a shipped example document (inside the installed package)."""
    return Path(str(resources.files(__name__).joinpath(name)))


def example_text(name: str = EXAMPLE) -> str:
    """Text of a shipped example document."""
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")
