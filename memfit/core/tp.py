"""Tensor parallelism, as the methods see it: each rank holds a slice of the KV heads.

memfit runs tensor-parallel through transformers' own plan (`DistributedConfig(tp_plan="auto")` over
torch.distributed: NCCL on GPUs, gloo on CPUs). Attention is split by heads, so each rank's cache holds and
compresses only its own KV heads — per-head selection needs no communication at all. The few decisions that combine
heads need one small collective, and only those call this module:
- a score averaged over every head of a layer (TOVA's official rule, GemFilter's filter score): `sum_over_heads`;
- a budget shared across heads (AdaKV): `all_heads` gathers every rank's (B, Hkv/N, T) scores, each rank decides
  for the whole layer and keeps its own slice (`own_heads`), so every rank makes the same choice as one process.
Outside a split model's scope (or with one rank) every helper is the identity.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch

# True while a cache whose model is split over the ranks runs its policy (set by CompressedCache around the
# method's calls): a model in the same process that is not split (a reference, a draft) never communicates.
_SCOPE: contextvars.ContextVar[bool] = contextvars.ContextVar("memfit_tp_scope", default=False)


@contextlib.contextmanager
def scope(sharded: bool) -> Iterator[None]:
    """Run the enclosed policy code as one rank of a split model (`sharded`) or as a whole model."""
    token = _SCOPE.set(bool(sharded))
    try:
        yield
    finally:
        _SCOPE.reset(token)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether `model`'s weights are split over tensor-parallel ranks (DTensor parameters)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


def world() -> tuple[int, int]:
    """(rank, world size) of the tensor-parallel group inside a sharded scope; (0, 1) elsewhere."""
    if not _SCOPE.get():
        return 0, 1
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def sum_over_heads(local_sum: torch.Tensor) -> torch.Tensor:
    """`local_sum` is a sum over this rank's heads; returns the sum over every head of the layer (all ranks)."""
    _, n = world()
    if n == 1:
        return local_sum
    import torch.distributed as dist

    total = local_sum.contiguous().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def all_heads(local: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Every rank's slice of the heads, concatenated along `dim` in rank order (the model's head order)."""
    _, n = world()
    if n == 1:
        return local
    import torch.distributed as dist

    parts = [torch.empty_like(local.contiguous()) for _ in range(n)]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts, dim=dim)


def own_heads(full: torch.Tensor, local_heads: int, dim: int = 1) -> torch.Tensor:
    """This rank's slice of a tensor over every head (the inverse of `all_heads`)."""
    rank, n = world()
    if n == 1:
        return full
    return full.narrow(dim, rank * local_heads, local_heads)
