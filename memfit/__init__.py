"""memfit: fit LLM inference into the memory you have.

Public API: `load_model(spec)`, `make_cache(model, method, budget, params)`, `run(prompt, ...)`,
`compress(document, ...)` / `CompressedContext.load(path, model)` (reusable compressed contexts),
`available_methods()`. Imports are lazy so `import memfit` stays cheap.
"""

from __future__ import annotations

import os
import sys
from typing import Any

# OpenMP threads that spin while they wait for each other (GNU OpenMP's default, which torch's CPU wheels use) stall
# every parallel region once other work holds a core: on the shared 2-core test box a 48-token prefill of the default
# model took seconds instead of a quarter of one (benchmarks/cpu_contention.py, README "CPU threads"). Sleeping
# waiters cost little on an idle machine, so memfit asks for them unless the user chose a policy. Read once, when
# torch loads its OpenMP runtime: too late if torch was imported before memfit.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
