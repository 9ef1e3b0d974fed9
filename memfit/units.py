"""Bytes for people and for plans. The one byte formatter every memfit output uses: binary units (KiB, MiB, GiB), because the numbers it prints
are divided by 1024 (tensor bytes, peak RSS, CUDA allocator stats) and labelling them "MB" would be off by ~5 %."""

from __future__ import annotations

__all__ = ["current_rss", "format_bytes", "return_freed_memory"]

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


def return_freed_memory() -> None:
    """Ask the C allocator to give freed heap memory back to the system (glibc's ``malloc_trim``; a no-op where it
    does not exist). Without it, the temporaries of a layer-by-layer transformation (quantizing on load) stay in
    glibc's heap after they are freed, and the process's peak RSS grows with every layer (measured on the default
    model: ~1.5 GiB instead of ~1 GiB after quantizing its 210 linears)."""
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes
            import ctypes.util

            name = ctypes.util.find_library("c")
            lib = ctypes.CDLL(name) if name else None
            _TRIM = lib.malloc_trim if lib is not None and hasattr(lib, "malloc_trim") else False
        except OSError:
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None  # glibc's malloc_trim once looked up, or False where there is none
