"""Where memfit keeps what it fetches or writes once: the default model, random-weight checkpoints.

Below every loader (`memfit.models`, `memfit.dummy`), so both can find the folder without importing each other."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The user cache folder: ``$MEMFIT_CACHE``, else ``$XDG_CACHE_HOME/memfit``, else ``~/.cache/memfit``."""
    env = os.environ.get("MEMFIT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "memfit"
