"""The runtime of a compressed cache: one list of layer stores, one policy, and the loop that drives both.

`CompressedCache` knows nothing about transformers: for each attention layer the adapter calls `step`, which appends
the new tokens to the layer's store, attends, asks the policy (a `Method`) what to keep and applies the answer
(`apply_selection`). Methods never see this object: they get a read-only `LayerView` of the layer and a `StepInfo`
with the layer's resolved budget, and return a `Selection` (memfit.core.contract). Imports point one way: this
module imports the stores and the method contract; neither imports it. `nbytes()` counts every tensor held (keys,
values, validity masks and policy state).

The dense store (`KVLayer`, `dense_attention`, `tensor_bytes`) lives in memfit.core.store, `StepInfo` and
`select_tokens` in memfit.core.contract; they are re-exported here for existing imports.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from memfit.core import tp
from memfit.core.budget import Budget
from memfit.core.contract import Decision, LayerView, Selection, StepInfo, select_tokens
from memfit.core.method import Method
from memfit.core.spans import SPAN_KEY, record_spans, span_priority, span_scores
from memfit.core.store import KVLayer, attention_with_lse, dense_attention, tensor_bytes

__all__ = [
    "CompressedCache", "HeadAllocator", "KVLayer", "LayerSchedule", "StepInfo", "apply_selection", "dense_attention",
    "select_tokens", "tensor_bytes",
]


class HeadAllocator(Protocol):
    """Per-head budget allocation (AdaKV, memfit.core.allocation.HeadAllocation): applies one layer's scores."""

    def evict(
        self, layer: KVLayer, scores: torch.Tensor, keep_rows: torch.Tensor, protect: torch.Tensor | None
    ) -> None: ...


def apply_selection(
    layer: KVLayer,
    selection: Selection | None,
    keep: torch.Tensor | None,
    head_allocation: HeadAllocator | None = None,
) -> None:
    """Apply a method's decision to one layer's store — the one place where a decision becomes a store operation,
    whatever the store (dense, quantized, ragged, static).

    `keep`: the layer's budget per row (B,) or None (unlimited: a score-based selection keeps everything). Scores
    become kept slots by: whole-word spans when the layer holds span ids (memfit.core.spans), then per-head
    allocation when set (AdaKV: values stay comparable across heads), else each row's top-`keep` valid slots
    (protected first)."""
    if selection is None:
        return
    for name, state in selection.state.items():  # first: gathered with the kept tokens below
        layer.extras[name] = state
    if selection.indices is not None:
        layer.keep(selection.indices, selection.valid)
        return
    scores, protect = selection.scores, selection.protect
    if selection.keep is not None and keep is not None:  # the method moved budget between layers (same total)
        keep = selection.keep
    if scores is None or keep is None:
        return
    span_ids = layer.extras.get(SPAN_KEY)
    if head_allocation is not None:
        if span_ids is not None:
            scores = span_scores(scores, span_ids, layer.valid)
        head_allocation.evict(layer, scores, keep, protect)
        return
    if layer.num_slots <= int(keep.min()):
        return  # every row is within its budget: nothing to free
    if span_ids is not None:
        scores = span_priority(scores, span_ids, layer.valid)
    indices, valid = select_tokens(scores, keep, layer.valid, protect)
    layer.keep(indices, valid)


class _Views(Sequence[LayerView]):
    """Read-only views of a cache's current layers, made on access (what `StepInfo.layers` holds)."""

    def __init__(self, layers: Callable[[], list[KVLayer]]) -> None:
        self._layers = layers

    def __len__(self) -> int:
        return len(self._layers())

    def __getitem__(self, i):  # type: ignore[no-untyped-def, override]
        layers = self._layers()
        if isinstance(i, slice):
            return [LayerView(layer) for layer in layers[i]]
        return LayerView(layers[i])


LayerSchedule = Callable[[torch.Tensor, int, int], torch.Tensor]


class CompressedCache:
    """All layers' stores + the policy and per-row budgets; drives both (see module docstring)."""

    def __init__(self, num_layers: int, method: Method, layer_factory: Callable[[int], KVLayer] = KVLayer) -> None:
        self.method = method
        self.layer_factory = layer_factory  # layer index -> empty store (dense KVLayer, or a quantized store)
        self.layers: list[KVLayer] = [layer_factory(i) for i in range(num_layers)]
        # Per-layer budget schedule: maps (row budgets, layer index, layer count) -> that layer's row budgets.
        # Uniform by default; adaptive allocations (pyramid...) plug in here and must keep the mean budget.
        self.layer_schedule: LayerSchedule | None = None
        self.prompt_lens: torch.Tensor | None = None  # (B,) real prompt tokens per row
        self.keep_rows: torch.Tensor | None = None  # (B,) resolved budget per row (None = unlimited)
        self.prefill_done = False  # becomes True after the first complete forward over the prompt
        self._expected_prompt: torch.Tensor | None = None  # set by the engine for chunked prefill
        self._padded_prompt_len = 0
        self.skipped_prompt_tokens = 0  # prompt tokens removed before prefill (counted as held by a full cache)
        self.prefill_lse_kernel: str | None = None  # H2O-style prefill: the kernel that gave the prompt's lse
        self.tensor_parallel = False  # the model is split over ranks: this cache holds this rank's KV heads
        # Keep whole words/numbers (memfit.core.spans): `span_rule` (set by enable_spans) maps the prompt's ids to
        # span ids before prefill; each layer stores them for its prompt tokens as they are appended.
        self.span_rule: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
        self.prompt_spans: torch.Tensor | None = None  # (B, T_prompt) for the prompt being prefilled
        # Per-head budgets (AdaKV, set by memfit.core.allocation.configure_allocation with ragged stores): score-based
        # selections are shared out over the KV heads instead of each head keeping the row's budget.
        self.head_allocation: HeadAllocator | None = None
        # what a decision spanning layers may read (StepInfo.layers); it refers to the cache weakly, as a closure over
        # self would be a cycle that keeps a dropped cache's tensors alive until Python's next full gc pass (#11)
        owner = weakref.ref(self)
        self._views = _Views(lambda: owner().layers)  # type: ignore[union-attr]

    def layer_keep(self, layer_idx: int) -> torch.Tensor | None:
        """Budget per row (B,) for one layer (None = unlimited). What methods get as `StepInfo.keep`."""
        if self.keep_rows is None or self.layer_schedule is None:
            return self.keep_rows
        return self.layer_schedule(self.keep_rows, layer_idx, self.num_layers)

    # -- the method, driven (it never sees this object) ------------------------------------------------------------
    def select_prompt(
        self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Before prefill: the method may return a shorter left-padded prompt to prefill instead (GemFilter), else
        None. Budgets still resolve from the original prompt (the caller declares it with `begin_prompt`)."""
        with tp.scope(self.tensor_parallel):
            return self.method.select_prompt(model, input_ids, attention_mask, self.num_layers)

    def after_prefill(self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Once the whole prompt is cached (the ids and mask that were prefilled): a method that scores with extra
        forward passes (KVzip) returns its selections for every layer here, and they are applied."""
        with tp.scope(self.tensor_parallel):  # a ranking over every head (KVzip's global budgets) spans the ranks
            decision = self.method.after_prefill(model, self._views, self.keep_rows, input_ids, attention_mask)
            self._apply(decision)

    def _apply(self, decision: Decision, layer_idx: int | None = None, keep: torch.Tensor | None = None) -> None:
        """Apply a method's decision: one Selection for layer `layer_idx` (whose budget is `keep`), or {layer index:
        Selection} for several layers (each with its own budget)."""
        if decision is None:
            return
        if isinstance(decision, Selection):
            assert layer_idx is not None, "a single Selection belongs to the layer that was asked"
            apply_selection(self.layers[layer_idx], decision, keep, self.head_allocation)
            return
        for idx, selection in decision.items():
            budget = keep if idx == layer_idx else self.layer_keep(idx)
            apply_selection(self.layers[idx], selection, budget, self.head_allocation)

    @property
    def budget(self) -> Budget:
        return self.method.budget

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def begin_prompt(self, prompt_lens: torch.Tensor, padded_len: int) -> None:
        """Declare the prompt before a chunked prefill: real tokens per row (so fraction budgets resolve from the
        whole prompt, not the first chunk) and the padded length (so the policy knows when the prompt ends)."""
        self._expected_prompt = prompt_lens.detach().cpu().long()
        self._padded_prompt_len = int(padded_len)

    def _start_forward(self, layer_idx: int, q_len: int, new_valid: torch.Tensor | None, batch: int) -> StepInfo:
        layer = self.layers[layer_idx]
        is_prefill = not self.prefill_done
        if is_prefill and layer_idx == 0 and layer.seen == 0:
            if self._expected_prompt is not None:
                self.prompt_lens = self._expected_prompt
            elif new_valid is not None:
                self.prompt_lens = new_valid.sum(-1).cpu().long()
            else:
                self.prompt_lens = torch.full((batch,), q_len, dtype=torch.long)
            self.keep_rows = self.method.budget.resolve_rows(self.prompt_lens)
        prefill_done = True
        if is_prefill and self._expected_prompt is not None:
            # chunked prefill: done once this layer has seen the whole (padded) prompt
            prefill_done = layer.seen + q_len >= self._padded_prompt_len
        return StepInfo(layer_idx, self.num_layers, q_len, is_prefill, new_valid, prefill_done)

    def step(
        self,
        layer_idx: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        queries: torch.Tensor,
        scaling: float,
        new_valid: torch.Tensor | None,
    ) -> torch.Tensor:
        """Append new K/V, attend, then let the policy compress. Returns the attention output (B, H, q, d)."""
        info = self._start_forward(layer_idx, keys.shape[2], new_valid, keys.shape[0])
        layer = self.layers[layer_idx]
        layer.append(keys, values, new_valid)
        if self.prompt_spans is not None and info.is_prefill:
            record_spans(layer, self.prompt_spans, keys.shape[2])
        if getattr(layer, "window", None) is not None:  # a sliding-window layer keeps its window; the method acts
            # on the global layers
            out = layer.attend(queries, scaling, layer.window)
            layer.trim_to_window()
        else:
            fused = None
            if (info.is_prefill and self.method.prefill_lse and layer.valid is None and layer.keys is not None
                    and layer.keys.shape[2] == info.q_len):
                fused = attention_with_lse(queries, layer.keys, layer.values, scaling)
            if info.is_prefill and self.method.prefill_lse:
                # which kernel gave the prompt's log-sum-exp ("none": the column sums compute their own)
                self.prefill_lse_kernel = "none" if fused is None else fused.kernel
            if fused is not None:
                out, info.lse = fused.out, fused.lse
            else:
                out = layer.attend(queries, scaling)
            info.keep, info.layers, info.budget_of = self.layer_keep(layer_idx), self._views, self.layer_keep
            with tp.scope(self.tensor_parallel):  # cross-head decisions talk to the other ranks only for a split model
                decision = self.method.after_attention(LayerView(layer), queries, scaling, info)
                self._apply(decision, layer_idx, info.keep)
            if info.is_prefill and info.prefill_done and hasattr(layer, "budget_tokens"):
                # static stores size their buffers from it
                layer.budget_tokens = None if info.keep is None else int(info.keep.max())
        layer.finalize_step(info)
        if layer_idx == self.num_layers - 1 and info.is_prefill and info.prefill_done:
            self.prefill_done = True
            self._expected_prompt = None
        return out

    # -- accounting ----------------------------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds right now."""
        return sum(layer.nbytes() for layer in self.layers)

    def full_nbytes(self) -> int:
        """Bytes an uncompressed cache would hold for the same tokens (keys + values, same dtype), including prompt
        tokens a method never fed to the model (GemFilter's prompt selection)."""
        total = sum(layer.full_nbytes() for layer in self.layers)
        if self.skipped_prompt_tokens:
            for layer in self.layers:
                if layer.seen:
                    total += layer.full_nbytes() * self.skipped_prompt_tokens // layer.seen
        return total

    def seen_tokens(self) -> int:
        return self.layers[0].seen if self.layers else 0

    def held_tokens(self) -> list[int]:
        """Max valid tokens held by any (row, head), per layer."""
        return [int(layer.held_per_row().max()) if layer.num_slots else 0 for layer in self.layers]

    def select_batch(self, rows: torch.Tensor) -> None:
        for layer in self.layers:
            layer.select_batch(rows)
        if self.keep_rows is not None:
            self.keep_rows = self.keep_rows.index_select(0, rows.cpu())
        if self.prompt_lens is not None:
            self.prompt_lens = self.prompt_lens.index_select(0, rows.cpu())

    def reset(self) -> None:
        swapped = bool(self.layers) and type(self.layers[0]) is not type(self.layer_factory(0))
        factory = type(self.layers[0]) if swapped else self.layer_factory  # layers replaced after construction
        windows = [getattr(layer, "window", None) for layer in self.layers]
        self.layers = [factory(i) for i in range(len(self.layers))]
        for layer, window in zip(self.layers, windows, strict=True):
            layer.window = window
        self.prompt_lens = self.keep_rows = None
        self.prefill_done = False
        self._expected_prompt = None
        self.skipped_prompt_tokens = 0
        self.prefill_lse_kernel = None
        self.prompt_spans = None
        self.method.reset()
