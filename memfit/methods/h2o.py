"""H2O — "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of LLMs" (Zhang et al., NeurIPS 2023,
arXiv 2306.14048).

Algorithm (per layer, per KV head): every token carries its accumulated attention — the sum of the attention
probabilities it received from every query so far (prefill: column sums of the causal attention matrix, computed
block-wise in fp32; decode: the new query's row each step), reduced over the GQA group. Whenever the layer holds
more than its budget, the most recent `recent_fraction` of the budget is kept unconditionally and the rest of the
budget goes to the tokens with the largest accumulated score (heavy hitters). Evicted tokens never return; their
scores are dropped with them. Acts after the prompt and after every generated token (fixed budget).

Official defaults (FMInference/H2O): heavy_ratio = recent_ratio = 0.1 of the prompt (20 % total), i.e. half the
budget recent -> `recent_fraction=0.5`.
Deviations: the official real-drop code sums scores over the batch (batch 1 only) and keeps per-query-head scores
(MHA only); we keep one score per row and KV head (GQA: sum over the group, `reduce`).

Audit (2026-11-29) against FMInference/H2O `h2o_hf/utils_real_drop/modify_llama.py` (`H2OKVCache_LayerWise`): the
prompt's score is the column sum of its full causal attention over every query row (`attn.sum(0).sum(1)`), each
decode row is added to it, the last `recent_size` tokens are kept and the top `hh_size` of the rest — the same as
ours. Not reproduced: the `utils_hh` *simulation* used for the paper's lm-eval tables masks attention token by
token inside the prompt (each row sees only the heavy hitters and recent tokens chosen so far, and its
renormalised probabilities feed the score); the real-drop code, which frees memory, does not. A raw column sum
favours early tokens (they are seen by more queries) and is blind to the question, so a needle in the middle of a
long prompt is often dropped: the needle scores below StreamingLLM's in `benchmarks/vs_kvpress` are a property of
the method, not of this port.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memfit.core.contract import LayerView, Selection, StepInfo
from memfit.core.method import Method, protect_mask, register
from memfit.core.scoring import attention_probs, column_sums, reduce_groups
from memfit.errors import ConfigError

SCORE = "h2o_score"


@register
@dataclass
class H2O(Method):
    name = "h2o"
    paper = "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models"
    arxiv = "2306.14048"
    family = "eviction"
    acts = "prefill+decode"
    summary = "Accumulated attention (heavy hitters) + recent tokens, evicting at every step."
    # the prompt's column sums reuse each query's log-sum-exp from the prompt's own attention kernel (CUDA)
    prefill_lse = True

    recent_fraction: float = 0.5
    reduce: str = "sum"

    # memfit methods: what each parameter means and the values it takes
    param_help = {
        "recent_fraction": ("share of the budget kept for the most recent tokens; the rest goes to heavy hitters",
                            "number in [0, 1]"),
        "reduce": ("how the query heads of a GQA group combine into one score per KV head", "sum | mean | max"),
    }

    def validate(self) -> None:
        if not 0.0 <= self.recent_fraction <= 1.0:
            raise ConfigError("h2o.recent_fraction must be in [0, 1]")
        if self.reduce not in ("sum", "mean", "max"):
            raise ConfigError("h2o.reduce must be sum, mean or max")

    def static_decode_rule(self) -> dict | None:
        # the fused decode kernel sums each GQA group's probabilities: only the default reduce maps onto it
        if self.reduce != "sum":
            return None
        return {"rule": "accumulated", "score_key": SCORE, "recent_fraction": self.recent_fraction}

    def after_attention(
        self, layer: LayerView, queries: torch.Tensor, scaling: float, info: StepInfo
    ) -> Selection | None:
        if not info.is_prefill and layer.fused:
            return None  # the fast backend's store ran this step's accumulate-and-evict itself (static_decode_rule)
        keep = info.keep
        if keep is None:
            return None  # unlimited: no need to even score
        hkv = layer.keys.shape[1]
        if info.q_len > 1:
            qvalid = info.new_valid
            probs_sum = column_sums(queries, layer.keys, scaling, layer.valid, qvalid, lse=info.lse)
        else:
            probs_sum = attention_probs(queries, layer.keys, scaling, layer.valid).sum(dim=2)
        step = reduce_groups(probs_sum, hkv, self.reduce)
        # first call: the state starts here (same length as the store)
        score = step if SCORE not in layer.extras else layer.extras[SCORE] + step
        recent = (keep.double() * self.recent_fraction).round().long()  # per row: its own budget share
        return Selection(score, protect_mask(layer, recent=recent), state={SCORE: score})
