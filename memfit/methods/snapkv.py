"""SnapKV — "SnapKV: LLM Knows What You are Looking for Before Generation" (Li et al., 2024, arXiv 2404.14469).

Algorithm (once, at the end of the prompt, per layer and per KV head): the last `window` prompt queries form an
observation window. Their attention over all prompt keys (softmax in fp32, causal inside the window) is summed over
the window's queries and reduced over each GQA group; the scores are smoothed by 1-D pooling (kernel `kernel`) so
that neighbours of important tokens survive together. Each row keeps the `budget - window` best prefix tokens plus
the window itself. During decoding nothing more is evicted: the cache grows by one token per step.
With a chunked prefill (`--prefill-chunk`), the same selection runs after every chunk, so the prompt never
occupies more than budget + chunk slots.

Official defaults (FasterDecoding/SnapKV): window 32, kernel 7, max pooling in the LongBench configs
(`init_snapkv` default: window 32, kernel 5, avg pooling). Ours: window 32, kernel 7, max pooling.
Measured on the default model (`memfit bench --tasks niah_single_number`, 2K tokens, 4 needles of 7 digits, each
digit its own token): with kernel 7 the answers keep only the needle's first 3-4 digits at budgets 0.25 and 0.5
(max pooling carries a peak only 3 tokens to each side, and the later digits get little window attention of their
own); `--param kernel=15` finds 4/4 at both budgets, kernel 31 3/4 at 0.25; `reduce=max` and `window=64` do not
help. We keep the official kernel 7 as the default; raise it for long multi-token answers.
Audit against FasterDecoding/SnapKV (`snapkv/monkeypatch/snapkv_utils.py`, `SnapKVCluster.update_kv`): softmax over
all keys with the window causal, sum over the window's queries of the *prefix* columns, pooling of the prefix only,
top (capacity - window) prefix tokens + the window. We pooled across the window boundary until 2026-11-29, so a max
pool spread the window's own scores over the 3 prefix tokens before it (they were kept "for free"); fixed — the
window's scores are zeroed before pooling, which equals the official prefix-only pooling.
Deviation: the official code selects per *query* head after `repeat_kv` (storing g copies of each KV head); we
select once per KV head, reducing scores over the group (`reduce`, mean by default) — DESIGN §3, g times less memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memfit.core.contract import LayerView, Selection, StepInfo
from memfit.core.method import Method, protect_mask, register
from memfit.core.scoring import attention_probs, pool_scores, reduce_groups
from memfit.errors import ConfigError


@register
@dataclass
class SnapKV(Method):
    name = "snapkv"
    paper = "SnapKV: LLM Knows What You are Looking for Before Generation"
    arxiv = "2404.14469"
    family = "eviction"
    acts = "prefill"
    summary = "Observation-window attention, pooled, selects prompt tokens once at prefill."

    window: int = 32
    kernel: int = 7
    pooling: str = "max"
    reduce: str = "mean"

    # memfit methods: what each parameter means and the values it takes
    param_help = {
        "window": ("observation window: the last N prompt queries whose attention scores the earlier tokens", "integer >= 1"),
        "kernel": ("pooling kernel over neighbouring tokens' scores (wider keeps longer spans together)", "integer >= 1"),
        "pooling": ("how scores are smoothed along the tokens", "max | avg"),
        "reduce": ("how the query heads of a GQA group combine into one score per KV head", "mean | max"),
    }

    def validate(self) -> None:
        if self.window < 1:
            raise ConfigError("snapkv.window must be >= 1")
        if self.kernel < 1:
            raise ConfigError("snapkv.kernel must be >= 1")
        if self.pooling not in ("max", "avg"):
            raise ConfigError("snapkv.pooling must be 'max' or 'avg'")
        if self.reduce not in ("mean", "max"):
            raise ConfigError("snapkv.reduce must be 'mean' or 'max'")

    def after_attention(
        self, layer: LayerView, queries: torch.Tensor, scaling: float, info: StepInfo
    ) -> Selection | None:
        keep = info.keep
        # Acts on the prompt only: once after a one-shot prefill, or after every chunk of a chunked prefill
        # (then the chunk's last queries are the observation window — Locret's schedule with SnapKV's scorer).
        if not info.is_prefill or keep is None or layer.num_slots <= int(keep.min()):
            return None
        window = min(self.window, queries.shape[2])
        probs = attention_probs(queries[:, :, -window:], layer.keys, scaling, layer.valid)  # (B, H, w, T)
        if info.new_valid is not None:  # padding queries (rows shorter than the window) do not vote
            probs = probs * info.new_valid[:, None, -window:, None].to(probs.dtype)
        scores = reduce_groups(probs.sum(dim=2), layer.keys.shape[1], self.reduce)
        # Pool the prefix only, as the official code (`attn_weights_sum[..., :-window]`): the window's own (large)
        # scores must not spill into the kernel // 2 prefix tokens before it. Zeros act as the official padding
        # (probabilities are >= 0, so a zero never wins a max pool; avg pooling pads with zeros there too).
        scores[..., -window:] = 0.0
        scores = pool_scores(scores, self.kernel, self.pooling)
        # The window is kept whole, unless a row's budget is smaller than the window: then its most recent tokens.
        recent = keep.clamp(max=window)
        return Selection(scores, protect_mask(layer, recent=recent))
