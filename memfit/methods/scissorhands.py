"""Scissorhands — "Scissorhands: Exploiting the Persistence of Importance Hypothesis for LLM KV Cache Compression at
Test Time" (Liu et al., NeurIPS 2023, arXiv 2305.17118).

Idea (persistence of importance): a token that mattered to recent queries will keep mattering, so a fixed-size cache
should hold the tokens that were *not* repeatedly ignored during a recent history window.

Algorithm, mode "paper" (per layer, per row, per KV head):
- History: for each held token we remember, for each of the last `w` query rows, one bit: "this row gave the token
  less than the uniform share" (probability < 1/t, t = valid tokens the row attended over, the row itself included).
  The bits live in a ring buffer of w bits per token, bit-packed into `layer.extras["scissorhands_history"]`
  ((B, Hkv, T, ceil(w/8)) uint8, gathered with the tokens on eviction and counted in `nbytes()`). Rows overwrite
  the slot of the row `w` steps before them, so the popcount of a token's bits is exactly its "unimportant" count
  within the window. Prefill contributes the last `w` prompt query rows (fp32, block-wise over queries); each
  decode step contributes its single row. GQA: probabilities are reduced over the query group (`reduce`, mean)
  before the 1/t test, so there is one history per KV head.
- Eviction: the `r` most recent tokens are protected; the others are ranked by unimportant count (fewest kept),
  ties broken by the current row's attention, then by recency. At the end of the prompt (and after every chunk
  of a chunked prefill) the row is cut to its budget B. During decoding, when a row exceeds B (B + 1 after the new token), its `m` worst tokens are dropped at
  once, leaving B + 1 - m: the next m - 1 steps only append, so compression runs once every m steps (amortised) and
  "held <= B after every step" holds throughout.
- w, r and m are fractions of each row's own budget (`history`, `recent`, `drop`).

Mode "released": the rule of the authors' partial release (lzcemma/Scissorhands,
`Decentralized_FM_alpha/modules/hf_opt_dropkv.py`, commit d0bf444). There, for every prompt query row, a key stays
visible if in the previous `lru_window` query rows it was at least once strictly above that row's 90th-percentile
attention value, plus the last `position_window` tokens; everything else is masked for that row. That is a
threshold rule (variable cache size) applied as a mask inside the prompt only (teacher-forced C4 perplexity, OPT-66B
layers 5-35, from position 100). We do not replicate the masking or the variable size: we use its statistic — the
number of top-10 % events over the last `lru_window` rows (same bit ring, width `lru_window`) — as the score under
the same fixed budget, keep the last `position_window` tokens, and evict down to B at the prompt and at every step.

Defaults. Paper mode: history w = 0.5 B, recent r = 0.25 B, drop m = 0.5 B — ours, taken from a third-party reading
(no official code exists for the paper's algorithm; the paper's own values are unverified). Released mode:
`lru_window` = 100, `position_window` = 10, percentile 0.9 — verified from the release script
`run_infer_opt_66b_sparse_c4.sh` (LRU_WINDOW=100, POSITION_WINDOW=10) and the threshold taken as the sorted row's
element at index int(0.9 * n).

Deviations and why:
- Real eviction (K/V gathered into smaller tensors) instead of masking; budgets per row from its real prompt length.
- GQA: one decision per KV head (group-reduced probabilities), DESIGN §3. The paper/release used MHA (OPT).
- Prompt handling: the prompt is cut to exactly B (not B + 1 - m); amortised drops start with decoding.
- Released mode: the threshold is the 90th percentile over the row's *visible* keys; the release sorts the whole
  padded row including the causal future zeros (so for early rows its threshold is 0). Its window excludes the
  current row; ours includes it (scoring happens after the row attended). All layers are compressed.
- Ties (very common with integer counts) are broken by the current row's attention, then recency, so selections are
  deterministic and identical for a row alone or in a padded batch.
- Cost: the exact windowed count needs w bits per token and KV head (w = 0.5 B: B/16 bytes), reported in nbytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memfit.core.contract import LayerView, Selection, StepInfo, select_tokens
from memfit.core.method import Method, recent_valid, register
from memfit.core.scoring import attention_probs, reduce_groups
from memfit.errors import ConfigError

HISTORY = "scissorhands_history"
_CHUNK = 256  # query rows scored at once at prefill
_BIT_WEIGHTS = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.uint8)


def unpack_bits(state: torch.Tensor) -> torch.Tensor:
    """(..., n) uint8 -> (..., 8n) bool; bit k of byte j is history slot 8j + k."""
    return (state.unsqueeze(-1) & _BIT_WEIGHTS.to(state.device)).ne(0).flatten(-2)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """(..., 8n) bool -> (..., n) uint8 (inverse of `unpack_bits`)."""
    grouped = bits.unflatten(-1, (-1, 8)).to(torch.uint8) * _BIT_WEIGHTS.to(bits.device)
    return grouped.sum(-1, dtype=torch.uint8)


def event_counts(state: torch.Tensor) -> torch.Tensor:
    """Number of set bits per token: (B, Hkv, T, n) uint8 -> (B, Hkv, T) long."""
    return _POPCOUNT.to(state.device)[state.long()].sum(-1)


def keep_ranks(primary: torch.Tensor, secondary: torch.Tensor, protect: torch.Tensor) -> torch.Tensor:
    """Distinct float scores (higher = kept first) ordering slots by: protected, then `primary`, then `secondary`,
    then recency (later slot). All (B, Hkv, T); exact lexicographic order through successive stable sorts."""
    order = torch.argsort(secondary, dim=-1, stable=True)
    for key in (primary, protect.to(torch.int8)):
        order = order.gather(-1, torch.argsort(key.gather(-1, order), dim=-1, stable=True))
    ranks = torch.arange(order.shape[-1], device=order.device, dtype=torch.float32).expand(order.shape)
    return torch.empty_like(ranks).scatter_(-1, order, ranks)


@register
@dataclass
class Scissorhands(Method):
    name = "scissorhands"
    paper = (
        "Scissorhands: Exploiting the Persistence of Importance Hypothesis for LLM KV Cache Compression at Test Time"
    )
    arxiv = "2305.17118"
    family = "eviction"
    acts = "prefill+decode"
    summary = "Drops tokens repeatedly below uniform attention over a history window, m at a time (amortised)."

    mode: str = "paper"
    history: float = 0.5  # w as a fraction of the budget (paper mode)
    recent: float = 0.25  # r as a fraction of the budget (paper mode)
    drop: float = 0.5  # m as a fraction of the budget (paper mode)
    lru_window: int = 100  # released mode: history rows
    position_window: int = 10  # released mode: last tokens always kept
    percentile: float = 0.9  # released mode: "important" = strictly above this quantile of the row
    reduce: str = "mean"

    # memfit methods: what each parameter means and the values it takes
    param_help = {
        "mode": ("paper: the paper's history-window counts; released: the authors' top-10 % rule as a score",
                 "paper | released"),
        "history": ("paper mode: history window w, as a fraction of the budget", "number > 0"),
        "recent": ("paper mode: most recent tokens always kept, as a fraction of the budget", "number in [0, 1]"),
        "drop": ("paper mode: tokens dropped at once when the budget is exceeded, as a fraction of it",
                 "number in (0, 1]"),
        "lru_window": ("released mode: query rows in the history window", "integer >= 1"),
        "position_window": ("released mode: last tokens always kept", "integer >= 0"),
        "percentile": ("released mode: a token is important in a row above this quantile of the row",
                       "number in (0, 1)"),
        "reduce": ("how the query heads of a GQA group combine before the test", "mean | max"),
    }

    def validate(self) -> None:
        if self.mode not in ("paper", "released"):
            raise ConfigError("scissorhands.mode must be 'paper' or 'released'")
        if self.history <= 0:
            raise ConfigError("scissorhands.history must be > 0 (a fraction of the budget)")
        if not 0.0 <= self.recent <= 1.0:
            raise ConfigError("scissorhands.recent must be in [0, 1]")
        if not 0.0 < self.drop <= 1.0:
            raise ConfigError("scissorhands.drop must be in (0, 1]")
        if self.lru_window < 1:
            raise ConfigError("scissorhands.lru_window must be >= 1")
        if self.position_window < 0:
            raise ConfigError("scissorhands.position_window must be >= 0")
        if not 0.0 < self.percentile < 1.0:
            raise ConfigError("scissorhands.percentile must be in (0, 1)")
        if self.reduce not in ("mean", "max"):
            raise ConfigError("scissorhands.reduce must be 'mean' or 'max'")

    # -- sizes per row (tensors of shape (B,), long) ---------------------------------------------------------------
    def window_rows(self, budget: torch.Tensor) -> torch.Tensor:
        if self.mode == "released":
            return torch.full_like(budget, self.lru_window)
        return (budget.double() * self.history).round().long().clamp(min=1)

    def recent_rows(self, budget: torch.Tensor) -> torch.Tensor:
        if self.mode == "released":
            return torch.full_like(budget, self.position_window)
        return (budget.double() * self.recent).round().long()

    def drop_rows(self, budget: torch.Tensor) -> torch.Tensor:
        if self.mode == "released":
            return torch.ones_like(budget)
        return (budget.double() * self.drop).round().long().clamp(min=1)

    # -- events ----------------------------------------------------------------------------------------------------
    def _events(self, probs: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Per (row, KV head, query, key) event bit: paper = below uniform, released = above the row's percentile."""
        n = visible.sum(-1, keepdim=True)
        if self.mode == "paper":
            return visible & (probs * n.to(probs.dtype) < 1.0)
        t_len = probs.shape[-1]
        ranked = probs.masked_fill(~visible, -1.0).sort(dim=-1).values  # invalid first
        at = (t_len - n + (n.double() * self.percentile).floor().long()).clamp(max=t_len - 1)
        return visible & (probs > ranked.gather(-1, at))

    def _record(
        self, layer: LayerView, queries: torch.Tensor, scaling: float, info: StepInfo, window: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this call's query rows into the history ring: (the last row's group-reduced probs (B, Hkv, T), the
        new ring (B, Hkv, T, bytes), to be stored as the layer's HISTORY)."""
        keys = layer.keys
        b, hkv, t_len, _ = keys.shape
        dev = keys.device
        q_len = queries.shape[2]
        w_max = int(window.max())
        n_bytes = (w_max + 7) // 8
        state = layer.extras.get(HISTORY)
        if state is None:
            state = torch.zeros(b, hkv, t_len, n_bytes, dtype=torch.uint8, device=dev)
        elif state.shape[-1] < n_bytes:  # a wider window than before (budgets changed): widen with empty bits
            state = torch.nn.functional.pad(state, (0, n_bytes - state.shape[-1]))
        valid = layer.valid_mask()
        first = max(0, q_len - w_max)  # older rows of this call fall out of every row's window
        # Ring slot of each recorded query row: its absolute (padded) index modulo the row's window. Any labelling
        # that cycles works — a count never depends on which slot holds which step — so padding shifts are harmless.
        steps = torch.arange(layer.seen - q_len + first, layer.seen, device=dev)
        win = window.to(dev)
        slots = steps[None, :] % win[:, None]  # (B, R)
        include = steps[None, :] >= layer.seen - win[:, None]
        if info.new_valid is not None:
            include &= info.new_valid[:, first:].to(dev).bool()
        last = None
        if q_len == 1:  # decode: update one bit per token in the packed ring
            probs = reduce_groups(attention_probs(queries, keys, scaling, layer.valid), hkv, self.reduce)
            ev = self._events(probs, valid[:, :, None, :])[:, :, 0]  # (B, Hkv, T)
            slot = slots[:, 0]
            idx = (slot // 8).view(b, 1, 1, 1).expand(b, hkv, t_len, 1)
            bit = torch.bitwise_left_shift(torch.ones_like(slot), slot % 8).to(torch.uint8).view(b, 1, 1, 1)
            cur = state.gather(-1, idx)
            new = (cur & ~bit) | (ev.unsqueeze(-1).to(torch.uint8) * bit)
            new = torch.where(include[:, 0].view(b, 1, 1, 1), new, cur)
            return probs[:, :, 0], state.scatter(-1, idx, new)
        bits = torch.nn.functional.pad(unpack_bits(state), (0, 1))  # extra column absorbs excluded rows
        dump = bits.shape[-1] - 1
        for start in range(first, q_len, _CHUNK):
            stop = min(q_len, start + _CHUNK)
            visible_len = t_len - q_len + stop  # keys the block's last query can see
            probs = attention_probs(queries[:, :, start:stop], keys[:, :, :visible_len], scaling,
                                    None if layer.valid is None else layer.valid[:, :, :visible_len])
            probs = reduce_groups(probs, hkv, self.reduce)  # (B, Hkv, c, Tv)
            qpos = torch.arange(t_len - q_len + start, t_len - q_len + stop, device=dev)
            kpos = torch.arange(visible_len, device=dev)
            visible = valid[:, :, None, :visible_len] & (kpos[None, :] <= qpos[:, None])[None, None]
            ev = self._events(probs, visible)
            rows = slice(start - first, stop - first)
            col = torch.where(include[:, rows], slots[:, rows], dump)  # (B, c)
            col = col[:, None, None, :].expand(b, hkv, visible_len, stop - start)
            bits[:, :, :visible_len].scatter_(-1, col, ev.transpose(-1, -2))
            last = probs[:, :, -1]
        assert last is not None and last.shape[-1] == t_len
        return last, pack_bits(bits[..., :dump])

    # -- policy ----------------------------------------------------------------------------------------------------
    def after_attention(
        self, layer: LayerView, queries: torch.Tensor, scaling: float, info: StepInfo
    ) -> Selection | None:
        keep = info.keep
        if keep is None:
            return None  # unlimited: keep everything, no need to score
        budget = keep.long().cpu()
        current, history = self._record(layer, queries, scaling, info, self.window_rows(budget))
        held = layer.held_per_row().amax(-1).cpu()
        over = held > budget
        if not bool(over.any()):
            return Selection(state={HISTORY: history})
        if info.is_prefill:
            target = budget  # the prompt (or each chunk of a chunked prefill) is cut to the budget itself
        else:
            target = (budget + 1 - self.drop_rows(budget)).clamp(min=1)  # drop m at once
        target = torch.where(over, target, held)  # rows within budget keep every valid token
        valid = layer.valid_mask()
        counts = event_counts(history)
        primary = -counts if self.mode == "paper" else counts  # paper: fewest "unimportant" events is best
        scores = keep_ranks(primary, current, recent_valid(valid, self.recent_rows(budget)))
        # its own per-row targets (m at a time while decoding), so it picks the slots itself
        indices, kept_valid = select_tokens(scores, target, layer.valid)
        return Selection(indices=indices, valid=kept_valid, state={HISTORY: history})
