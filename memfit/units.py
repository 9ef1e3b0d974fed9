"""The one byte formatter every memfit output uses: binary units (KiB, MiB, GiB), because the numbers it prints
are divided by 1024 (tensor bytes, peak RSS, CUDA allocator stats) and labelling them "MB" would be off by ~5 %."""

from __future__ import annotations

__all__ = ["format_bytes"]

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def format_bytes(n: float | None) -> str:
    """Human-readable bytes in binary units: ``1536`` -> ``"1.5 KiB"``; ``None`` (not measured) -> ``"–"``."""
    if n is None:
        return "–"
    value = float(n)
    for unit in _UNITS[:-1]:
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} {_UNITS[-1]}"
