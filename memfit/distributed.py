"""Tensor-parallel runs: `memfit run --tp N` launches N ranks with torchrun; under torchrun each rank joins the group.

The model is split by transformers' own tensor-parallel plan (`DistributedConfig(tp_plan="auto")` in `from_pretrained`: attention and
KV heads, MLP columns/rows, one all-reduce per block) over torch.distributed — NCCL on GPUs, gloo on CPUs. Each
rank's memfit cache holds and compresses only its own KV heads (`memfit.core.tp` for the few cross-head
decisions), so the KV bytes per rank fall with N. Rank 0 prints; `--json` gives per-rank and total KV bytes.
`memfit bench --tp N` works the same way: every rank runs every configuration, rank 0 alone writes the rows
(with `tp` and `kv_bytes_held_per_rank`) and the report.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
from collections.abc import Sequence

import torch

from memfit.errors import ConfigError


def in_torchrun() -> bool:
    """True inside a rank started by torchrun with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init(device: str) -> tuple[int, int]:
    """Join the process group (NCCL for CUDA, gloo for the CPU) and mark the process tensor-parallel."""
    import torch.distributed as dist

    if not dist.is_initialized():
        cuda = str(device).startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
        # groups left for the interpreter's exit to destroy can abort a rank there ("terminate called without an
        # active exception" from gloo's threads, seen on CI once): tear them down while Python still runs
        atexit.register(_leave)
    return dist.get_rank(), dist.get_world_size()


def _leave() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def check_model(spec: str, ranks: int, load_format: str = "auto") -> None:
    """In the launching process: a model that cannot be split over `ranks` is one error here, not one per rank.
    (A dummy model's random-weight checkpoint is written by rank 0, on its GPU: the launcher takes no device.)"""
    from memfit.models import check_divisible

    if load_format == "dummy":
        from memfit.dummy import dummy_config

        check_divisible(dummy_config("smollm2-135m" if spec.strip() in ("", "default") else spec), ranks)
        return
    from transformers import AutoConfig

    from memfit.models import tp_source

    check_divisible(AutoConfig.from_pretrained(tp_source(spec, progress=True)), ranks)


def launch(ranks: int, argv: Sequence[str]) -> int:
    """Run `memfit <argv>` as `ranks` processes under torchrun (argv without --tp); returns the exit code."""
    if ranks < 2:
        raise ConfigError("--tp must be at least 2 (or leave it out for one process)")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
           "-m", "memfit.cli", *argv]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.Popen(cmd, env=env)
    # a signal to the launcher reaches torchrun, which stops its ranks (a server killed by its PID leaves no orphans)
    forward = lambda signum, _frame: proc.send_signal(signum)  # noqa: E731
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def strip_tp(argv: Sequence[str]) -> list[str]:
    """argv without its `--tp N` / `--tp=N`."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--tp":
            skip = True
            continue
        if arg.startswith("--tp="):
            continue
        out.append(arg)
    return out


def gather_ints(value: int) -> list[int]:
    """Every rank's `value`, in rank order (one small all-gather)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [int(value)]
    parts: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, int(value))
    return [int(p) for p in parts]  # type: ignore[arg-type]


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Ranks in the joined group (1 outside a tensor-parallel run)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
