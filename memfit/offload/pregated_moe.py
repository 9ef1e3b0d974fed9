"""Pre-gated MoE — prefetch the experts the next MoE layer will use (ISCA 2024, arXiv 2308.12066), training-free.

Our reading: in the paper, each MoE block carries a *pre-gate* that reads block i's hidden state and picks block
i+1's experts, so their weights can be copied from CPU memory to the GPU while block i computes; the pre-gates are
learned by fine-tuning. Without fine-tuning (pretrained weights are unavailable here), we use the speculative
variant described for Mixtral offloading: apply layer i+1's own router to layer i's MoE input and prefetch the
experts it picks. A wrong guess costs nothing in accuracy — the experts layer i+1 really routes to are loaded on
demand (a "miss") — only time.

Runtime: the non-expert weights (attention, routers, norms, shared experts, embeddings) stay resident; each expert
is a unit of the streamer, homed in pinned CPU memory (or on disk with `--offload-dir`). A device-side cache holds
at most `capacity` experts (least recently used goes first; the experts in use and the ones just prefetched are
protected). Inside a layer, while expert e computes, the next experts of the same call are already loading.

Defaults: capacity = what `--weights-memory` leaves after the resident weights, in experts; prefetch = layer i+1's
top-k for every token of the step (decode: top-k experts), capped at half the capacity. `policy="ondemand"` turns
the prefetch off (the MoE-OnDemand baseline of the paper).
Counters: `expert_hits` / `expert_misses` (hit = the expert was on the device or in flight when needed).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from types import MethodType
from typing import Any

import torch

from memfit.adapters.transformers import MoEBlock, run_experts
from memfit.offload.streamer import Unit, WeightStreamer


@dataclass
class PregatedMoE:
    name = "pregated"
    paper = "Pre-gated MoE: An Algorithm-System Co-Design for Fast and Scalable Mixture-of-Expert Inference"
    default_tier = "cpu"

    prefetch: bool = True


class ExpertCache:
    """LRU set of experts on the device; `get` is called by the experts' forward, `prefetch` by the pre-gate hook."""

    def __init__(self, streamer: WeightStreamer, units: dict[tuple[int, int], Unit], capacity: int) -> None:
        self.s, self.units, self.capacity = streamer, units, capacity
        self.lru: OrderedDict[tuple[int, int], Unit] = OrderedDict()
        self.protected: set[tuple[int, int]] = set()

    def _admit(self, key: tuple[int, int], prefetch: bool) -> None:
        unit = self.units[key]
        if unit.home == "device":
            return
        if unit.state != "offloaded":
            self.lru.move_to_end(key)
            return
        while len(self.lru) >= self.capacity:
            victim = next((k for k in self.lru if k not in self.protected), None)
            if victim is None:
                break  # every held expert is in use or just prefetched: go over capacity by one, briefly
            self.s.release(self.lru.pop(victim))
        self.s.load(unit, prefetch=prefetch)
        self.lru[key] = unit

    def prefetch(self, layer: int, experts: list[int]) -> None:
        for e in experts:
            self.protected.add((layer, e))
            self._admit((layer, e), prefetch=True)

    def get(self, layer: int, e: int, hit: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        key = (layer, e)
        unit = self.units[key]
        if e == hit[0]:  # a layer's call starts: an expert is a hit if it was on the device or in flight already
            held = sum(1 for x in hit if self.units[(layer, x)].home == "device"
                       or self.units[(layer, x)].state != "offloaded")
            self.s.stats.expert_hits += held
            self.s.stats.expert_misses += len(hit) - held
        self.protected.add(key)
        self._admit(key, prefetch=False)
        nxt = hit[hit.index(e) + 1] if hit.index(e) + 1 < len(hit) else None
        if nxt is not None:  # overlap the next expert's copy with this one's compute
            self.protected.add((layer, nxt))
            self._admit((layer, nxt), prefetch=False)
        self.s.wait(unit)
        assert unit.tensors is not None
        if e == hit[-1]:  # this layer is done with its experts: they may be evicted from now on
            self.protected = {k for k in self.protected if k[0] != layer}
        return unit.tensors["gate_up"], unit.tensors["down"]


def install_experts(
    blocks: list[MoEBlock], streamer: WeightStreamer, homes: dict[tuple[int, int], str], capacity: int,
    folder: Any, prefetch: bool,
) -> ExpertCache:
    """Split every fused experts module into per-expert units, route its forward through the cache, and (with
    `prefetch`) hook each MoE block to prefetch the next block's predicted experts."""
    from memfit.offload.streamer import make_hook

    units: dict[tuple[int, int], Unit] = {}
    for b in blocks:
        ex = b.experts
        for e in range(int(ex.num_experts)):
            tensors = {"gate_up": ex.gate_up_proj.data[e], "down": ex.down_proj.data[e]}
            units[(b.layer, e)] = streamer.add_unit(f"layer{b.layer}.expert{e}", {}, homes[(b.layer, e)], folder,
                                                    tensors=tensors)
        for p in (ex.gate_up_proj, ex.down_proj):  # the fused tensors are gone: only per-expert units remain
            p.data = torch.empty(0, dtype=p.dtype, device=streamer.device)
    cache = ExpertCache(streamer, units, capacity)
    for b in blocks:
        def forward(self: torch.nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor, _layer: int = b.layer) -> torch.Tensor:
            return run_experts(self, hidden, top_k_index, top_k_weights,
                               lambda e, hit: cache.get(_layer, e, hit))

        b.experts.forward = MethodType(forward, b.experts)
    if prefetch:
        by_layer = {b.layer: b for b in blocks}
        for b in blocks:
            nxt = by_layer.get(b.layer + 1)
            if nxt is None:
                continue  # the last MoE layer has nothing to prefetch for

            def pre(module: torch.nn.Module, args: tuple, kwargs: dict, _next: MoEBlock = nxt) -> None:
                hidden = args[0] if args else kwargs["hidden_states"]
                with torch.no_grad():
                    idx = _next.router(hidden.reshape(-1, hidden.shape[-1]))[-1]
                experts, counts = torch.unique(idx, return_counts=True)
                order = counts.argsort(descending=True)[: max(1, cache.capacity // 2)]
                cache.prefetch(_next.layer, sorted(int(e) for e in experts[order].tolist()))

            streamer.attach(b.block, make_hook(pre=pre))
    return cache
