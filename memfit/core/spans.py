"""Spans, not tokens: when a selector keeps one token of a word or number, keep the rest of it too.

Token-level selection often keeps the first digits of a number and drops the rest ("48." for the passkey 48213):
the attention peak sits on one token of the span, and the span's other tokens score lower than unrelated tokens
elsewhere. This module makes any score-based selection span-aware, independently of the method:

1. `token_spans(tokens)` splits a prompt's token strings into short spans — a token continues the previous token's
   span when it does not start a new word (no leading space / newline marker) and both sides are word characters,
   or when both are digits (so digit-by-digit tokenizers keep numbers together). Spans are capped at `max_len`
   tokens, so a long run (a URL, a hash) never forces itself into the budget as one block.
2. The ids are stored per token and KV head in `layer.extras[SPAN_KEY]` (int16, 2 bytes per token per KV head,
   counted by `nbytes()`), written once while the prompt is prefilled and gathered with the tokens on eviction.
   Generated tokens get id 0 ("no span": each is its own span).
3. `span_priority(scores, span_ids, valid)` ranks every token of a span by the best score in that span (then by
   span, then by its own score), before the usual top-k. Selection still takes exactly each row's budget of slots,
   so the budget never grows: whole spans displace the lowest-scored single tokens. The span around the budget
   boundary may be cut; every other kept span is whole. With per-head budgets (AdaKV), whose allocation compares
   score *values* across heads, `span_scores` is used instead (each span's tokens just below its best score).

Spans are contiguous runs of equal ids in slot order (kept tokens stay in prompt order); ids wrap at 2^15, which
could only merge two spans if 32K spans between them were all evicted — harmless: it re-ranks, never over budget.
Applied by the runtime (`memfit.core.cache.apply_selection`), so every method that returns scores is span-aware when
the cache has span ids; methods that choose their own indices (Scissorhands, WindowKV `layer_budgets=decay`,
GemFilter's prompt selection) ignore spans.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

SPAN_KEY = "span_id"
MAX_SPAN = 12
_ID_WRAP = 2**15 - 1
_NEW_WORD = ("Ġ", "▁", "Ċ", " ", "\n", "\t", "ĉ")  # byte-level BPE / sentencepiece word starts, and raw whitespace
_MARKERS = "".join(_NEW_WORD)


def _is_word(text: str) -> bool:
    return bool(text) and all(c.isalnum() or c == "_" for c in text)


def token_spans(tokens: Sequence[str | None], max_len: int = MAX_SPAN) -> list[int]:
    """Span id per token (>= 1; equal ids on consecutive tokens = one span). `None` marks a token that never joins
    a span (special tokens, padding)."""
    ids: list[int] = []
    current, length, prev = 0, 0, None
    for tok in tokens:
        joins = False
        if tok is not None and prev is not None and not tok.startswith(_NEW_WORD):
            last = prev.lstrip(_MARKERS)[-1:]  # a bare space/newline token ends the previous span
            if tok.isdigit() and last.isdigit():
                joins = True  # digit runs: "4" "8" "2" "1" "3" is one number
            elif _is_word(tok) and last.isalnum():
                joins = True  # word pieces: "Ġremem" "ber"
        if joins and length < max_len:
            length += 1
        else:
            current, length = current % _ID_WRAP + 1, 1
        ids.append(current)
        prev = tok
    return ids


def prompt_spans(tokenizer: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) int16 span ids for a left-padded batch of prompts (padding: 0)."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    out = torch.zeros(input_ids.shape, dtype=torch.int16)
    for row in range(input_ids.shape[0]):
        real = attention_mask[row].bool().cpu()
        ids = input_ids[row].cpu()[real].tolist()
        pieces = tokenizer.convert_ids_to_tokens(ids)
        tokens = [None if i in special else p for i, p in zip(ids, pieces, strict=True)]
        out[row, real] = torch.tensor(token_spans(tokens), dtype=torch.int16)
    return out


class SpanRule:
    """What a cache keeps to compute span ids for each prompt it prefills (set by `enable_spans`)."""

    def __init__(self, tokenizer: Any, max_len: int = MAX_SPAN) -> None:
        self.tokenizer = tokenizer
        self.max_len = max_len

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return prompt_spans(self.tokenizer, input_ids, attention_mask)


def enable_spans(cache: Any, tokenizer: Any) -> None:
    """Make a cache (MemfitCache or CompressedCache) keep whole spans: the engine computes the prompt's span ids
    with `tokenizer` before prefill (memfit.engine.prefill_prompt) and each layer stores them as it fills."""
    core = getattr(cache, "core", cache)
    core.span_rule = SpanRule(tokenizer)


def record_spans(layer: Any, spans: torch.Tensor, q_len: int) -> None:
    """Write the span ids of the `q_len` tokens just appended to `layer` (columns seen-q .. seen of the padded
    prompt `spans` (B, T_prompt)) into its last `q_len` slots."""
    start = layer.seen - q_len
    if start >= spans.shape[1]:
        return  # past the prompt (decode steps): appended slots keep id 0
    new = spans[:, start : start + q_len]
    b, h, t = layer.valid_mask().shape
    state = layer.extras.get(SPAN_KEY)
    state = torch.zeros(b, h, t, dtype=torch.int16, device=layer.valid_mask().device) if state is None else state.clone()
    state[:, :, t - q_len : t - q_len + new.shape[1]] = new.to(state.device)[:, None, :]
    layer.extras[SPAN_KEY] = state


def _runs(scores: torch.Tensor, span_ids: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """(fp32 scores, in-span mask, run index of each slot, best score of the slot's run), all (B, H, T)."""
    s = scores.float()
    ids = span_ids.to(s.device).long()
    ok = ids > 0 if valid is None else (ids > 0) & valid
    prev_same = torch.zeros_like(ok)
    prev_same[..., 1:] = ok[..., 1:] & ok[..., :-1] & (ids[..., 1:] == ids[..., :-1])
    segment = (~prev_same).long().cumsum(-1) - 1
    finite = s.masked_fill(~ok, float("-inf"))
    best = torch.full_like(s, float("-inf")).scatter_reduce(-1, segment, finite, reduce="amax", include_self=True)
    return s, ok, segment, torch.where(ok, best.gather(-1, segment), s)


def span_scores(scores: torch.Tensor, span_ids: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Scores (B, H, T) adjusted so each span ranks as its best token: the best token keeps its score, the span's
    other tokens get the largest float below it. Tokens outside spans (id 0) and invalid slots are unchanged.
    Values stay comparable across heads (for per-head budget allocation); two spans with the *same* best score
    (common after max pooling) tie, so the budget boundary may cut both — `span_priority` orders those too."""
    s, ok, _, span_best = _runs(scores, span_ids, valid)
    below = torch.nextafter(span_best, torch.full_like(span_best, float("-inf")))
    return torch.where(ok & (s < span_best), below, s)


def span_priority(scores: torch.Tensor, span_ids: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Distinct ranks (B, H, T) as float (higher = kept first): by the best score of the slot's span (a token outside
    spans is its own span), then by span (later first, so equal-best spans are never interleaved), then by the
    slot's own score. A top-k over these keeps whole spans, with at most one span cut at the budget boundary.
    Invalid slots keep -inf and the caller's protection still applies on top. Pure function."""
    s, _, segment, span_best = _runs(scores, span_ids, valid)
    order = torch.argsort(s, dim=-1, stable=True)
    for key in (segment, span_best):
        order = order.gather(-1, torch.argsort(key.gather(-1, order), dim=-1, stable=True))
    ranks = torch.arange(order.shape[-1], device=order.device, dtype=torch.float32).expand(order.shape)
    ranks = torch.empty_like(ranks).scatter_(-1, order, ranks)
    return ranks if valid is None else ranks.masked_fill(~valid.to(ranks.device), float("-inf"))


# Methods whose selection does not go through score-based top-k (they choose their own indices): spans would only
# add 2 bytes per token and KV head there, so the default leaves them off.
IGNORE_SPANS = ("scissorhands", "gemfilter")
SPANS_CHOICES = ("auto", "on", "off")


def spans_default(method: str, budget: Any) -> bool:
    """What `spans="auto"` (the default of `memfit run`, `memfit bench` and `memfit plan`'s prediction) means: on for
    an eviction method with a budget (measured: whole numbers kept at the same bytes, benchmarks/claims.md, issue
    #12), off for the full cache, a quantizer alone (nothing is selected) and the methods in `IGNORE_SPANS`."""
    from memfit.core.method import evicts

    first = method.split("+")[0].strip()
    return budget is not None and first not in IGNORE_SPANS and evicts(method)


def resolve_spans(value: str | bool | None, method: str, budget: Any) -> bool:
    """`on` / `off` / `auto` (or True / False / None = auto) -> whether the cache keeps whole spans."""
    from memfit.errors import ConfigError

    if value is None or value == "auto":
        return spans_default(method, budget)
    if isinstance(value, bool):
        return value
    if value not in SPANS_CHOICES:
        raise ConfigError(f"--spans takes auto, on or off, got {value!r}")
    return value == "on"
