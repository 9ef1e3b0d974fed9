"""Decode steps for the runtime loop: eager forwards, or one forward captured in a CUDA graph and replayed.

A decode step is one token per row through the whole model. With the fast backend's static stores
(`memfit.core.static_store`) a step allocates nothing new, reads its write slot and lengths from device counters
and never syncs with the host — so it can be recorded once and replayed: the ~hundreds of kernel launches of a
transformers forward then cost one launch. The first step runs eagerly (it moves the prompt's tokens into the static
buffers and compiles the kernels), the second is captured, every later one is a replay. The host-side mirrors of the
stores (used slots, logical length) are advanced after each replay.

Used only when `cache.backend.graphs` (CUDA, a store with a static form, a method that never evicts while decoding),
every layer holds rectangular rows (no placeholder slots) and at least `MIN_GRAPH_STEPS` steps remain — recording a
graph costs about one eager step plus its instantiation, which short answers (the bench's 12-48 tokens, measured on
an H200: `benchmarks/results/backend_agreement_h200.jsonl`) do not win back. Otherwise the steps stay eager and
`reason` says why.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from memfit.adapters.transformers import MemfitCache, forward
from memfit.backend import MIN_GRAPH_STEPS
from memfit.core.static_quant_store import StaticKIVILayer
from memfit.core.static_store import StaticKVLayer

STATIC_STORES = (StaticKVLayer, StaticKIVILayer)  # stores whose decode step is capturable


class DecodeSteps:
    """callable(next_tokens (B,), mask (B, T), positions (B, 1)) -> logits (B, V) of the next position.
    `steps`: how many decode steps the caller will run at most."""

    def __init__(self, model: torch.nn.Module, cache: MemfitCache, steps: int | None = None) -> None:
        self.model, self.cache = model, cache
        self.steps = steps
        backend = getattr(cache, "backend", None)
        self.use_graphs = bool(backend is not None and backend.graphs)
        self.reason = "" if self.use_graphs else "not requested by the backend"
        if self.use_graphs and steps is not None and steps < MIN_GRAPH_STEPS:
            self.use_graphs = False
            self.reason = f"{steps} decode steps: too few to win back recording a graph"
        for layer in cache.core.layers:  # the kernels only where the graph amortises their compilation
            if isinstance(layer, STATIC_STORES):
                layer.kernel_attention = self.use_graphs
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager_steps = 0
        self.replays = 0
        self.capture_seconds = 0.0  # recording the graph and its first replay (host wall time, synchronized)
        self._ids: torch.Tensor | None = None
        self._pos: torch.Tensor | None = None
        self._out: torch.Tensor | None = None
        self._ids_rows = 0

    def _capturable(self) -> bool:
        layers = self.cache.core.layers
        if not all(isinstance(layer, STATIC_STORES) and layer.frozen for layer in layers):
            self.reason = "a layer has no static buffer"
            return False
        left = None if self.steps is None else self.steps - self.eager_steps
        if left is None or any(not getattr(layer, "fused", False) and layer.length + left > layer.capacity
                               for layer in layers):  # a replayed step cannot grow a buffer
            self.reason = "the static buffers have no room for every remaining step"
            return False
        if any(layer.valid is not None or layer.extras for layer in layers):
            self.reason = "rows hold placeholder slots (a padded batch) or per-token policy state"
            return False
        rows = self._ids_rows
        if any(not m.capturable(rows) for m in self.model.modules() if hasattr(m, "capturable")):
            self.reason = f"a compressed linear layer cannot run {rows} rows inside a graph (its kernel's limit)"
            return False
        return True

    def __call__(self, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.graph is not None:
            assert self._ids is not None and self._pos is not None and self._out is not None
            self._ids.copy_(tokens[:, None])
            self._pos.copy_(positions)
            for layer in self.cache.core.layers:
                layer.advance(1)  # type: ignore[attr-defined]
            self.graph.replay()
            self.replays += 1
            return self._out[:, -1]
        if self.use_graphs and self.eager_steps >= 1:
            self._ids_rows = int(tokens.shape[0])
            if self._capturable():
                return self._capture(tokens, positions)
            self.use_graphs = False
        self.eager_steps += 1
        return forward(self.model, tokens[:, None], mask, self.cache, positions, logits_to_keep=1)[:, -1]

    def _capture(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self._ids = tokens[:, None].clone()
        self._pos = positions.clone()
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        start = time.perf_counter()
        # Recording runs the Python once: the stores' host mirrors advance here, for the replay just below.
        with torch.cuda.graph(graph):
            self._out = forward(self.model, self._ids, None, self.cache, self._pos, logits_to_keep=1)
        self.graph = graph
        graph.replay()
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - start
        self.replays += 1
        return self._out[:, -1]


class BlockGraph:
    """One decode step of every stack block of a server (`memfit.core.stacks`), recorded once in a CUDA graph and
    replayed while the blocks stay the same (`memfit serve`, issue #11).

    Inside the server's eager shared forward a step of 64 stacked requests costs ~73 ms on an H200
    (benchmarks/serve/gpu/stack_ab_kivi_h200.jsonl), nearly all of it the host: transformers' Python per layer and
    the launches. The forward over a `BlockView` (every row of every block, members and free rows alike) has fixed
    shapes and reads its slots and lengths from device counters, so it can be replayed. The graph is keyed by the
    blocks (identity and rows), not by who is in them: a member joining or leaving a row changes nothing recorded.
    Free rows are emptied before each step (one token to attend to) and their outputs dropped (`StackBlock.fill_free_rows`).

    A new key's first step runs eagerly (the kernels compile outside any capture, and the step counts), the next
    is recorded and replayed, every later one is a replay. Host mirrors advance after each step
    (`StackBlock.advance_members`)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.key: tuple | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.warm = False  # this key's eager step ran (the next one is recorded)
        self._view: Any = None
        self._ids: torch.Tensor | None = None
        self._pos: torch.Tensor | None = None
        self._out: torch.Tensor | None = None
        self.captures = 0
        self.replays = 0
        self.eager_steps = 0
        self.capture_seconds = 0.0

    @staticmethod
    def key_of(blocks: Sequence[Any]) -> tuple:
        return tuple((id(b), b.rows) for b in blocks)

    def drop(self) -> None:
        """Forget the recorded graph (its memory pool goes back once the caller empties the cache)."""
        self.key = self.graph = self._view = self._ids = self._pos = self._out = None
        self.warm = False

    def step(self, blocks: Sequence[Any], tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One decode step of every row of `blocks`: tokens (R,) and positions (R, 1) on the device, rows block
        after block (free rows: anything). Returns logits (R, V)."""
        from memfit.core.stacks import BlockView

        key = self.key_of(blocks)
        if key != self.key:
            self.drop()
            self.key = key
        for b in blocks:
            b.fill_free_rows()
        if self.graph is not None:
            assert self._ids is not None and self._pos is not None and self._out is not None
            self._ids.copy_(tokens[:, None])
            self._pos.copy_(positions)
            self.graph.replay()
            self.replays += 1
            out = self._out[:, -1]
        elif not self.warm:
            out = forward(self.model, tokens[:, None], None, MemfitCache(BlockView(blocks)), positions,
                          logits_to_keep=1)[:, -1]
            self.warm = True
            self.eager_steps += 1
        else:
            self._view = BlockView(blocks)
            self._ids, self._pos = tokens[:, None].clone(), positions.clone()
            graph = torch.cuda.CUDAGraph()
            torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.cuda.graph(graph):
                self._out = forward(self.model, self._ids, None, MemfitCache(self._view), self._pos,
                                    logits_to_keep=1)
            self.graph = graph
            graph.replay()
            torch.cuda.synchronize()
            self.capture_seconds += time.perf_counter() - start
            self.captures += 1
            self.replays += 1
            out = self._out[:, -1]
        for b in blocks:
            b.advance_members()
        return out
