"""TOVA — "Transformers are Multi-State RNNs" (Oren, Hassid, Yarden, Adi, Schwartz, 2024, arXiv 2401.06104).
Token Omission Via Attention.

Idea: a decoder with a bounded KV cache is an RNN whose state is a fixed number of (key, value) pairs. When the state
is full, drop the pair the *current* query needs least — no accumulated history, no recency rule.

Algorithm (per layer, after it attended; at the end of the prompt, after every prefill chunk and after every
generated token): take the attention probabilities of the last query row (fp32 softmax over the held keys),
average them over the layer's heads, and keep the `budget` tokens with the highest average — the same tokens for
every KV head of the layer. In decoding the cache is one over budget after appending, so exactly one token (possibly
the new one, if it scores lowest) is dropped per step.

Official code (schwartz-lab-NLP/TOVA, `src/tova_cache.py`, `TOVACache.reduce`): after each attention call, if the
layer holds more than `cache_size` keys, `mean` over *all query heads* of the last row's attention weights, top-k,
sorted, gathered for every KV head. A one-shot prefill is compressed the same way (last prompt query). No sinks, no
recent window, no parameters beyond the cache size. Ours: `heads="layer"` (default) is exactly that.

Deviations:
- `heads="kv"` (option, not the default): each KV head keeps its own top tokens by the mean over its GQA group
  (DESIGN §3's per-KV-head selection); the official variant shares one index set across the layer.
- The official cache is a fixed token count for every row of a batch (batch 1 in practice); budgets here are per
  row (a fraction of the row's own prompt or a token count), and padding is never scored or kept.
- Scores come from a separate fp32 pass over the held keys (the model's own attention stays SDPA), not from eager
  attention weights cast to the model dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memfit.core import tp
from memfit.core.contract import LayerView, Selection, StepInfo
from memfit.core.method import Method, register
from memfit.core.scoring import attention_probs, reduce_groups
from memfit.errors import ConfigError


@register
@dataclass
class TOVA(Method):
    name = "tova"
    paper = "Transformers are Multi-State RNNs (TOVA: Token Omission Via Attention)"
    arxiv = "2401.06104"
    family = "eviction"
    acts = "prefill+decode"
    summary = "Keeps the tokens the last query attends to most (head-averaged), evicting at every step."

    heads: str = "layer"  # layer: mean over all query heads (official); kv: mean over each GQA group

    # memfit methods: what each parameter means and the values it takes
    param_help = {
        "heads": ("layer: one selection per layer from the mean over all query heads (official); kv: one per KV "
                  "head from the mean over its GQA group", "layer | kv"),
    }

    def validate(self) -> None:
        if self.heads not in ("layer", "kv"):
            raise ConfigError("tova.heads must be 'layer' (official: one selection per layer) or 'kv' (per KV head)")

    def after_attention(
        self, layer: LayerView, queries: torch.Tensor, scaling: float, info: StepInfo
    ) -> Selection | None:
        keep = info.keep
        if keep is None or layer.num_slots <= int(keep.min()):
            return None  # unlimited, or every row within its budget: nothing to score
        # Only the last query row votes (left padding: it is a real token in every row).
        probs = attention_probs(queries[:, :, -1:], layer.keys, scaling, layer.valid)[:, :, 0]  # (B, H, T)
        hkv = layer.keys.shape[1]
        if self.heads == "layer":  # the mean over every head of the layer (all ranks under tensor parallelism)
            heads = probs.shape[1] * tp.world()[1]
            scores = (tp.sum_over_heads(probs.sum(dim=1, keepdim=True)) / heads).expand(-1, hkv, -1)
        else:
            scores = reduce_groups(probs, hkv, "mean")
        return Selection(scores)
