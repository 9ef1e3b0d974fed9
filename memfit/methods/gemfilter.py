"""GemFilter — "Discovering the Gems in Early Layers: Accelerating Long-Context LLMs with 1000x Input Token
Reduction" (Shi et al., 2024, arXiv 2409.17422).

Algorithm (two passes, before anything is cached):
1. *Filter pass.* The prompt runs through attention layers 0..r only (r = `filter_layer`; the layers above never
   run, and the lower layers' K/V are dropped as soon as they have been used). At layer r, the post-RoPE query of
   the last prompt token is dotted with every key of the layer, per query head (raw dot products: no softmax, no
   1/sqrt(d) — neither changes the ranking), the products are summed over the heads, smoothed along the tokens by
   average pooling (kernel `kernel`, zero padding at the ends) and the top-k tokens are taken, k = the row's
   budget, in their original order.
2. *Generation pass.* Only those k token ids form a new, shorter prompt; the *whole* model re-runs prefill on it from
   scratch (positions re-numbered 0..k-1, as in the official code), building a k-token cache in every layer; then
   decoding proceeds normally (the cache grows by one token per step).
The engine calls the filter pass through `Method.select_prompt`; `memfit.adapters.transformers.run_first_layers`
stops the forward after layer r.

Official defaults (SalesforceAIResearch/GemFilter): top-k 1024 tokens, pooling avg kernel 5; r = 13 of 32 layers
for Llama-3.1-8B-Instruct (19 of 40 for Mistral-Nemo-12B, 19 of 32 for Phi-3.5-mini), chosen per model where the
top-k set's needle-retrieval accuracy peaks. Ours: the budget is k; `kernel` 5; `filter_layer` None = layer
floor(`filter_depth` x layers) with `filter_depth` = 0.5, i.e. layer 15 of SmolLM2-135M's 30 layers, picked by a
sweep: over 30 synthetic passkey prompts (1.0-2.5K tokens, PG-19 prose filler, needle at 10-90 % depth), the share
whose passkey digits all fall in layer r's top-k set peaks at layers 15 (k=64/128/256: 0.53/0.80/0.90) and 21-22
(0.70/0.83/0.93 at 21); below layer 12 it stays <= 0.4 even at k=256. Layer 15 is the earliest peak, so its filter
pass costs 16/30 of a prefill instead of 22/30. 0.5 is also in the range of the official picks as a fraction of depth
(13/32 = 0.41, 19/40 = 0.48, 19/32 = 0.59). Set `filter_layer` for a layer calibrated on another model.
End to end the picture is weaker on this 135M model: on 6 such prompts (~1.2K tokens) the full cache answered 3/6,
GemFilter 0/6 (layer 15, k=256), 1/6 (layer 15, k=512), 1/6 (layer 21, k=256), 2/6 (layer 21, k=512) — even when the
needle sentence survives the selection, the model rarely answers from the shredded prompt.

Deviations:
- Batches: the official code is batch-1 only. Rows of a left-padded batch select independently (each row its own
  budget; padding is never scored and is zero in the pooling, as the sequence ends are in the official code) and
  the selected rows are re-padded on the left.
- An unlimited budget, or one that covers every row's prompt, skips the filter pass (exact: the full cache).
- Without the engine's prompt-selection hook (a bare `forward` with a memfit cache, as in the core test matrix) the
  method falls back to a single pass: at layer r the same score selects each row's top-budget tokens, and that one
  index set is evicted from layers 0..r at once and from every later layer as it runs. Tokens keep their original
  positions and the prompt's attention output is the full one — an approximation of the two-pass method, never
  used by `memfit run`/`generate`/`prefill`.
- Layer schedules (`--allocation pyramid`): the generation pass holds k tokens in every layer; a layer whose
  scheduled budget is smaller evicts down to it with the same score, recomputed at layer r of the short prompt.
- Reporting: after the generation pass the cache has only ever seen k prompt tokens, so its "full" byte count is
  that of the shortened prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memfit.core import tp
from memfit.core.contract import LayerView, Selection, StepInfo
from memfit.core.method import Method, register
from memfit.core.scoring import pool_scores
from memfit.errors import ConfigError


def filter_scores(
    last_queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor | None, kernel: int
) -> torch.Tensor:
    """GemFilter's token score (B, T) fp32: the last query (B, H, d) dotted with the keys (B, Hkv, T, d), summed over
    all query heads, average-pooled; -inf at invalid slots (padding counts as 0 inside the pooling)."""
    b, h, d = last_queries.shape
    hkv = keys.shape[1]
    # sum_h q_h . k_kv(h) == sum_kv (sum of the group's queries) . k_kv: no repeated keys needed
    q_sum = last_queries.float().reshape(b, hkv, h // hkv, d).sum(2)
    scores = tp.sum_over_heads(torch.einsum("bkd,bktd->bt", q_sum, keys.float()))  # every rank's heads
    row_valid = None if valid is None else valid[:, 0]
    if row_valid is not None:
        scores = scores.masked_fill(~row_valid, 0.0)
    scores = pool_scores(scores, kernel, "avg")
    if row_valid is not None:
        scores = scores.masked_fill(~row_valid, float("-inf"))
    return scores


@register
@dataclass
class GemFilter(Method):
    name = "gemfilter"
    paper = "Discovering the Gems in Early Layers: Accelerating Long-Context LLMs with 1000x Input Token Reduction"
    arxiv = "2409.17422"
    family = "eviction"
    acts = "prefill"
    summary = "An early layer's last-query scores pick the prompt tokens; the model re-prefills only those."

    filter_layer: int | None = None
    filter_depth: float = 0.5
    kernel: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        self._scores: torch.Tensor | None = None  # single-pass fallback: layer r's selection scores (B, T)

    # memfit methods: what each parameter means and the values it takes
    param_help = {
        "filter_layer": ("layer whose last-token attention selects the prompt tokens (none: from filter_depth)",
                         "none | integer in [0, layers)"),
        "filter_depth": ("filter layer as a fraction of the model's depth, when filter_layer is none", "number in [0, 1]"),
        "kernel": ("average-pooling kernel over neighbouring tokens' scores", "integer >= 1"),
    }

    def validate(self) -> None:
        if self.filter_layer is not None and self.filter_layer < 0:
            raise ConfigError("gemfilter.filter_layer must be >= 0 (or none for filter_depth)")
        if not 0.0 <= self.filter_depth <= 1.0:
            raise ConfigError("gemfilter.filter_depth must be in [0, 1]")
        if self.kernel < 1:
            raise ConfigError("gemfilter.kernel must be >= 1")

    def layer_for(self, num_layers: int) -> int:
        """The filter layer r for a model with `num_layers` attention layers."""
        if self.filter_layer is None:
            return min(num_layers - 1, int(self.filter_depth * num_layers))
        if self.filter_layer >= num_layers:
            raise ConfigError(f"gemfilter.filter_layer={self.filter_layer} but the model has {num_layers} layers")
        return self.filter_layer

    # -- two-pass path (the engine) ------------------------------------------------------------------------------
    def select_prompt(
        self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_layers: int
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        lens = attention_mask.sum(-1).cpu().long()
        budgets = self.budget.resolve_rows(lens)
        if budgets is None or bool((budgets >= lens).all()):
            return None  # everything fits: prefill the prompt as it is (exact)
        from memfit.adapters.transformers import run_first_layers

        queries, keys, valid, _ = run_first_layers(model, input_ids, attention_mask, self.layer_for(num_layers))
        scores = filter_scores(queries[:, :, -1], keys, valid, self.kernel)
        keep = torch.minimum(budgets, lens)
        width = int(keep.max())
        new_ids = input_ids.new_zeros(input_ids.shape[0], width)
        new_mask = attention_mask.new_zeros(input_ids.shape[0], width)
        for row, k in enumerate(keep.tolist()):
            picked = scores[row].topk(k).indices.sort().values.to(input_ids.device)
            new_ids[row, width - k :] = input_ids[row, picked]
            new_mask[row, width - k :] = 1
        return new_ids, new_mask

    # -- single-pass fallback (bare forward without the engine's hook) -------------------------------------------
    def after_attention(
        self, layer: LayerView, queries: torch.Tensor, scaling: float, info: StepInfo
    ) -> dict[int, Selection] | None:
        if not (info.is_prefill and info.prefill_done) or info.keep is None:
            return None
        if info.layer_idx == 0:
            self._scores = None
        r = self.layer_for(info.num_layers)
        if info.layer_idx < r:
            return None
        targets = [layer]
        if info.layer_idx == r:  # one last-query score for every layer (cheap: one query row)
            self._scores = filter_scores(queries[:, :, -1], layer.keys, layer.valid, self.kernel)
            targets = list(info.layers[: r + 1])  # the layers below were left whole until this score
        chosen: dict[int, Selection] = {}
        for target in targets:
            keep = info.keep if target.index == info.layer_idx else info.budget_of(target.index)  # type: ignore[misc]
            assert keep is not None
            if bool((target.held_per_row() <= keep.to(target.keys.device)[:, None]).all()):
                continue  # every row fits (after the engine's selection: unless a layer schedule gives less)
            if self._scores is None or self._scores.shape[-1] != target.num_slots:
                continue
            chosen[target.index] = Selection(self._scores[:, None].expand(-1, target.keys.shape[1], -1))
        return chosen

    def reset(self) -> None:
        self._scores = None
