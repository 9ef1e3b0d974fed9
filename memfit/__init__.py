"""memfit: fit LLM inference into the memory you have.

Public API: `load_model(spec)`, `make_cache(model, method, budget, params)`, `run(prompt, ...)`,
`compress(document, ...)` / `CompressedContext.load(path, model)` (reusable compressed contexts),
`available_methods()`. Imports are lazy so `import memfit` stays cheap.
"""

from __future__ import annotations

import os
import sys
from typing import Any


def openmp_defaults(load: float, cores: int) -> dict[str, str]:
    """The OpenMP wait settings memfit asks for, from the 1-minute load average and the core count.

    torch's CPU wheels use GNU OpenMP, whose threads spin ~300,000 rounds at every barrier before sleeping. When
    other work holds the cores, a spinning thread keeps its core while the thread it waits for cannot run, and every
    parallel region stalls: on the 2-core test box with both cores busy elsewhere, decoding the default model fell
    to 0.5 tok/s (benchmarks/cpu_contention.py; README "CPU threads"). Short spins (10,000 rounds) cost nothing on
    an idle machine and recover much of that; sleeping at once (PASSIVE) recovers the most but costs ~15-20 % of an
    idle machine's decode speed. So: PASSIVE when the machine is already busy (load >= half its cores), else short
    spins."""
    if load >= cores / 2:
        return {"OMP_WAIT_POLICY": "PASSIVE"}
    return {"GOMP_SPINCOUNT": "10000"}


# Read once, when torch loads its OpenMP runtime: too late if torch was imported before memfit. A user's own
# OMP_WAIT_POLICY or GOMP_SPINCOUNT stands.
def _choose_openmp_waits() -> None:
    if "torch" in sys.modules or {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & os.environ.keys():
        return
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on this platform
        load = 0.0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ.update(openmp_defaults(load, cores))


_choose_openmp_waits()

__version__ = "0.1.0"
__all__ = ["load_model", "make_cache", "run", "compress", "CompressedContext", "available_methods", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "load_model":
        from memfit.models import load_model

        return load_model
    if name == "make_cache":
        from memfit.api import make_cache

        return make_cache
    if name == "run":
        from memfit.engine import run

        return run
    if name in ("compress", "CompressedContext"):
        from memfit import contexts

        return getattr(contexts, name)
    if name == "available_methods":
        from memfit.core.method import all_methods

        return lambda: sorted(all_methods())
    raise AttributeError(f"module 'memfit' has no attribute {name!r}")
