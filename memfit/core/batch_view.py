"""One decode forward over many requests' own compressed stores (continuous batching in `memfit serve`).

Each request of the server keeps its own `CompressedCache` (its own method, budget, parameters and length). To
decode all of them with ONE model forward per step, `BatchView` presents n single-row caches to the model as one
n-row cache: the adapter's `MemfitCache` wraps it like a `CompressedCache`, so every linear layer, MLP, norm and
embedding runs once over the n rows, and at each attention layer the view receives the n new keys/values and the
n query rows and hands each row back to its own cache's public `step`, which appends the token, attends, runs the
method's per-step policy (H2O, TOVA, Scissorhands...) and lets the store finalize (KIVI's residual flush), exactly
as in a lone decode. Each row is the request's true next token at its true next position (the scheduler passes
per-row position ids), so RoPE and the methods see what they would see alone.

Attention, per layer:
- rows whose store is a plain dense `KVLayer` of a global-attention layer (full, SnapKV, H2O, StreamingLLM, TOVA,
  ...) join ONE SDPA over a left-padded view: each row's held keys/values and its new token are copied
  right-aligned into (n', Hkv, T+1, d) tensors, T = the most slots any of these rows holds; padding slots are
  invalid in the mask, so a row attends over exactly its own tokens. The row's output is then given to its cache's
  `step` in place of the store's own `attend` (for a dense store `attend` is that same SDPA over the same slots,
  without side effects, so nothing else changes);
- rows whose store sits in a stack block (`memfit.core.stacks`: frozen static stores, KIVI or dense, of requests
  whose method never acts while decoding, stacked by the runtime) attend, append and flush in ONE call per block and
  layer when every member of the block is in this step (`stacked_rows`); the members' caches' `step` is not called
  for them: such a step does nothing but append, attend and flush (no method acts);
- rows of any other store (quantized segments of KIVI/GEAR/VidKV, ragged AdaKV heads, static buffers, sliding-
  window layers, a method's own store subclass) attend through their store's own `attend` inside `step`, on their
  row only: they still share the forward, only their attention is a call of its own (counted in `own_rows`).

Memory. The padded view is a transient of one layer at a time, freed before the next layer runs: 2 * n' * Hkv *
(T + 1) * d * element size bytes of keys and values, plus n' * Hkv * (T + 1) bytes of validity and the
(n', H, 1, T + 1) boolean mask SDPA receives. It is reported (`view_bytes`, the largest of the step) and is not part
of any store: the stores' own `nbytes()` stay the basis of admission. Rows all of the same length with no padding
or placeholder slot skip the mask. A layer whose view would exceed `max_view_bytes` (long contexts: the copy then
costs more than the attention calls it saves, and it is memory no reservation covers) is not copied: its rows attend
on their own, as non-dense stores do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from memfit.core.cache import CompressedCache, KVLayer, dense_attention


class _LayerStub:
    """What the transformers Cache bookkeeping reads of one layer of the view (`keys` is not None once the rows
    are prefilled; `seen` is the longest row's logical length, used only for mask sizes, which memfit ignores).
    It holds the view's list of caches, not the view: no reference cycle, so a view dropped after its step frees
    at once (see `memfit.adapters.transformers._LayerView`)."""

    def __init__(self, cores: list[CompressedCache], index: int) -> None:
        self.cores, self.index = cores, index

    @property
    def keys(self) -> torch.Tensor | None:
        return self.cores[0].layers[self.index].keys

    @property
    def seen(self) -> int:
        return max(core.layers[self.index].seen for core in self.cores)


@contextlib.contextmanager
def _attended(layer: KVLayer, out: torch.Tensor) -> Iterator[None]:
    """For one `step` call, the layer's `attend` returns the row's already computed attention output (an instance
    attribute shadowing the class method; removed right after)."""
    layer.attend = lambda queries, scaling, window=None: out  # type: ignore[method-assign]
    try:
        yield
    finally:
        del layer.attend


def joins_padded_attention(layer: KVLayer) -> bool:
    """A plain dense store of a global-attention layer: its `attend` is SDPA over (keys, values, valid) and
    nothing else, so it can attend inside the shared padded view."""
    return type(layer) is KVLayer and layer.window is None and layer.keys is not None


class BatchView:
    """n single-row `CompressedCache`s seen by the model as one n-row cache for one decode forward (see module
    docstring). Build one per step; it holds no tensors between steps."""

    def __init__(
        self, cores: Sequence[CompressedCache], padded: bool = True, max_view_bytes: int | None = 256 << 20
    ) -> None:
        if not cores:
            raise ValueError("a batch view needs at least one cache")
        layers = {core.num_layers for core in cores}
        if len(layers) != 1:
            raise ValueError(f"caches of one batched forward must have the same layer count, got {sorted(layers)}")
        for core in cores:
            if core.prompt_lens is not None and len(core.prompt_lens) != 1:
                raise ValueError("each cache of a batch view must hold exactly one row")
        self.cores = list(cores)
        self.padded = padded
        self.max_view_bytes = max_view_bytes
        self.layers = [_LayerStub(self.cores, i) for i in range(layers.pop())]
        self.tensor_parallel = False
        self.padded_rows = 0  # (row, layer) pairs that attended in the shared padded view
        self.stacked_rows = 0  # (row, layer) pairs that decoded in a stack block's one call (memfit.core.stacks)
        self.own_rows = 0  # (row, layer) pairs that attended through their store's own attend
        self.view_bytes = 0  # the largest padded view (keys, values, validity, SDPA mask) of any layer
        self._perms: dict[int, torch.Tensor] = {}  # a stack block's member rows in row order (one copy per step)
        self._groups: dict[int, tuple[Any, list[int]]] | None = None  # stack block -> its rows here

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def step(
        self,
        layer_idx: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        queries: torch.Tensor,
        scaling: float,
        new_valid: torch.Tensor | None,
    ) -> torch.Tensor:
        """The adapter's per-layer call for the whole batch: keys/values (n, Hkv, 1, d), queries (n, H, 1, d).
        Returns the attention output (n, H, 1, d)."""
        n = len(self.cores)
        if keys.shape[0] != n or keys.shape[2] != 1:
            raise ValueError(f"a batch view decodes one token for each of its {n} rows, got keys {tuple(keys.shape)}")
        out = torch.empty_like(queries)
        done = self._stacked(layer_idx, keys, values, queries, scaling, out)
        rows = [i for i, core in enumerate(self.cores) if joins_padded_attention(core.layers[layer_idx])]
        shared: dict[int, torch.Tensor] = {}
        if self.padded and len(rows) > 1 and self._fits(layer_idx, rows, queries):
            shared = dict(zip(rows, self._padded_attention(layer_idx, rows, keys, values, queries, scaling),
                              strict=True))
        for i, core in enumerate(self.cores):
            if i in done:
                continue
            # the store keeps what it is given: a copy of this row, not a view that pins the whole batch's tensor
            k, v = keys[i : i + 1].clone(), values[i : i + 1].clone()
            nv = None if new_valid is None else new_valid[i : i + 1]
            if i in shared:
                with _attended(core.layers[layer_idx], shared[i]):
                    out[i : i + 1] = core.step(layer_idx, k, v, queries[i : i + 1], scaling, nv)
                self.padded_rows += 1
            else:
                out[i : i + 1] = core.step(layer_idx, k, v, queries[i : i + 1], scaling, nv)
                self.own_rows += 1
        return out

    def _stacked(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor,
                 scaling: float, out: torch.Tensor) -> set[int]:
        """Rows decoded by their stack block's one call, written into `out`; a block runs only when every member is
        here, its kernels run on this device and every member has room (else its rows step one by one)."""
        if self._groups is None:  # a request's layers are all in one block: the same groups at every layer
            self._groups = {}
            for i, core in enumerate(self.cores):
                block = getattr(core.layers[layer_idx], "stack", None)
                if block is not None:
                    self._groups.setdefault(id(block), (block, []))[1].append(i)
        done: set[int] = set()
        for key, (block, idxs) in self._groups.items():
            if len(idxs) != block.used or not block.kernels or not block.room(layer_idx):
                continue
            order = sorted(idxs, key=lambda i: self.cores[i].layers[layer_idx].stack_row)
            perm = self._perms.get(key)
            if perm is None or perm.numel() != len(order):  # members' rows are the same at every layer of a step
                perm = self._perms[key] = torch.tensor(order).to(keys.device, non_blocking=True)
            out[perm] = block.step(layer_idx, keys[perm], values[perm], queries[perm], scaling)
            done.update(order)
            self.stacked_rows += len(order)
        return done

    def _fits(self, layer_idx: int, rows: list[int], queries: torch.Tensor) -> bool:
        """Whether the padded view of `rows` stays within `max_view_bytes` (upper bound: validity and mask counted)."""
        if self.max_view_bytes is None:
            return True
        layer = self.cores[rows[0]].layers[layer_idx]
        assert layer.keys is not None
        _, hkv, _, d = layer.keys.shape
        width = max(self.cores[i].layers[layer_idx].num_slots for i in rows) + 1
        n, heads = len(rows), queries.shape[1]
        return 2 * n * hkv * width * d * layer.keys.element_size() + n * (hkv + heads) * width <= self.max_view_bytes

    def _padded_attention(
        self,
        layer_idx: int,
        rows: list[int],
        keys: torch.Tensor,
        values: torch.Tensor,
        queries: torch.Tensor,
        scaling: float,
    ) -> list[torch.Tensor]:
        """One SDPA for `rows` over their held tokens + the new one, left-padded; one (1, H, 1, d) output per row."""
        held = [self.cores[i].layers[layer_idx] for i in rows]
        lens = [layer.num_slots for layer in held]
        width = max(lens) + 1
        n, hkv, _, d = len(rows), keys.shape[1], keys.shape[2], keys.shape[3]
        idx = torch.tensor(rows, device=keys.device)
        if all(t == lens[0] for t in lens) and all(layer.valid is None for layer in held):
            k_view = torch.cat([torch.cat([layer.keys for layer in held]), keys[idx]], dim=2)
            v_view = torch.cat([torch.cat([layer.values for layer in held]), values[idx]], dim=2)
            valid = None
        else:
            k_view = keys.new_zeros(n, hkv, width, d)
            v_view = values.new_zeros(n, hkv, width, d)
            valid = torch.zeros(n, hkv, width, dtype=torch.bool, device=keys.device)
            for j, (layer, t) in enumerate(zip(held, lens, strict=True)):
                start = width - 1 - t
                k_view[j, :, start:-1] = layer.keys[0]
                v_view[j, :, start:-1] = layer.values[0]
                valid[j, :, start:-1] = True if layer.valid is None else layer.valid[0]
            k_view[:, :, -1:] = keys[idx]
            v_view[:, :, -1:] = values[idx]
            valid[:, :, -1] = True
        q = queries[idx]
        mask_bytes = 0 if valid is None else q.shape[1] * n * width + valid.numel()
        self.view_bytes = max(self.view_bytes, 2 * k_view.numel() * k_view.element_size() + mask_bytes)
        out = dense_attention(q, k_view, v_view, valid, scaling)
        return list(out.split(1))
