"""Bytes for people and for plans. The one byte formatter every memfit output uses: binary units (KiB, MiB, GiB), because the numbers it prints
are divided by 1024 (tensor bytes, peak RSS, CUDA allocator stats) and labelling them "MB" would be off by ~5 %."""

from __future__ import annotations

__all__ = ["current_rss", "format_bytes"]

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def format_bytes(n: float | None, digits: int = 1) -> str:
    """Human-readable bytes in binary units: ``1536`` -> ``"1.5 KiB"``; ``None`` (not measured) -> ``"–"``.

    `digits` after the point (plans and offload messages print 2: their figures are compared by hand)."""
    if n is None:
        return "–"
    value = float(n)
    for unit in _UNITS[:-1]:
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.{digits}f} {unit}"
        value /= 1024
    return f"{value:.{digits}f} {_UNITS[-1]}"


def current_rss() -> int:
    """The process's resident set size now (Linux /proc; 0 where it cannot be read)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
