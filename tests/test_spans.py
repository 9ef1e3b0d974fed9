"""Spans, not tokens (memfit.core.spans): span boundaries, the score adjustment, and the cache wiring."""

from __future__ import annotations

import torch

from memfit.adapters.transformers import forward
from memfit.api import make_cache
from memfit.core.cache import select_tokens
from memfit.core.spans import SPAN_KEY, enable_spans, span_scores, token_spans
from memfit.engine import pad_left, prefill_prompt


def test_token_spans_join_word_pieces_and_digit_runs():
    toks = ["Ġthe", "Ġpass", "Ġkey", "Ġis", "Ġ", "4", "8", "2", "1", "3", ".", "Ġremem", "ber", "Ġit", None, "Ċ", "x"]
    ids = token_spans(toks)
    groups: dict[int, list[str]] = {}
    for t, i in zip(toks, ids, strict=True):
        groups.setdefault(i, []).append(str(t))
    assert ["4", "8", "2", "1", "3"] in groups.values()
    assert ["Ġremem", "ber"] in groups.values()
    assert ["."] in groups.values() and ["Ġ"] in groups.values() and ["None"] in groups.values()
    assert all(i >= 1 for i in ids)


def test_long_runs_are_capped():
    ids = token_spans(["Ġ1"] + ["7"] * 29, max_len=12)
    sizes = [ids.count(i) for i in dict.fromkeys(ids)]
    assert sizes == [12, 12, 6]


def test_span_scores_keep_whole_numbers_within_the_budget():
    # 1 row, 1 head, 20 slots: a number at slots 5..9 whose first digit holds the peak, the rest score low
    scores = torch.linspace(0.1, 0.3, 20)[None, None].clone()
    scores[..., 5] = 5.0
    scores[..., 6:10] = 0.01
    spans = torch.arange(1, 21, dtype=torch.int16)[None, None].clone()
    spans[..., 5:10] = 99
    keep = torch.tensor([8])
    plain, _ = select_tokens(scores, keep, None)
    assert 5 in plain.tolist()[0][0] and not set(range(6, 10)) & set(plain.tolist()[0][0])
    adjusted = span_scores(scores, spans)
    idx, _ = select_tokens(adjusted, keep, None)
    kept = idx.tolist()[0][0]
    assert len(kept) == 8 and set(range(5, 10)) <= set(kept)  # the whole number, and exactly the budget
    assert adjusted[0, 0, 5] == 5.0 and bool((adjusted[0, 0, 6:10] < 5.0).all())  # the peak token keeps its score
    # tokens outside spans (id 0) and invalid slots are untouched
    valid = torch.ones(1, 1, 20, dtype=torch.bool)
    valid[..., 7] = False
    again = span_scores(scores, spans.masked_fill(torch.arange(20) > 15, 0), valid)
    assert again[0, 0, 7] == scores[0, 0, 7] and torch.equal(again[..., 16:], scores[..., 16:])


class _Pieces:
    """A tokenizer stand-in: token i reads as a digit when i % 4 == 1 (digit runs), else a new word."""

    all_special_ids: list[int] = []

    def convert_ids_to_tokens(self, ids):
        return [str(i % 10) if i % 4 == 1 else f"Ġw{i}" for i in ids]


def _partial_spans(layer, spans_full: torch.Tensor, row: int) -> int:
    """Spans of a row that the layer keeps only partly (by span id over the row's real prompt tokens)."""
    held = layer.extras[SPAN_KEY][row, 0]
    valid = layer.valid_mask()[row, 0]
    kept = held[valid & (held > 0)].tolist()
    full = spans_full[row][spans_full[row] > 0].tolist()
    return sum(1 for s in set(kept) if kept.count(s) != full.count(s))


def test_cache_stores_span_ids_and_keeps_spans_whole(llama):
    torch.manual_seed(3)
    rows = []
    for n in (80, 57):
        ids = torch.randint(2, 128, (n,))
        ids[torch.rand(n) < 0.6] = 1 + 4 * torch.randint(0, 31, (1,))  # long digit runs
        rows.append(ids.tolist())
    ids, mask = pad_left(rows)
    cache = make_cache(llama, "snapkv", 0.4, {"window": 4})
    enable_spans(cache, _Pieces())
    with torch.no_grad():
        prefill_prompt(llama, ids, mask, cache)
    spans = cache.core.prompt_spans
    for layer in cache.core.layers:
        assert SPAN_KEY in layer.extras and layer.extras[SPAN_KEY].dtype == torch.int16
        assert bool((layer.held_per_row() <= cache.core.keep_rows[:, None]).all())  # never above budget
        for row in range(2):
            # at most the span cut by the budget and the one cut by the protected window stay partial
            assert _partial_spans(layer, spans, row) <= 2
    # the ids are counted as held bytes
    assert cache.nbytes() == sum(layer.nbytes() for layer in cache.core.layers)
    # decode steps append id 0 (own span) and keep working
    with torch.no_grad():
        m = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
        forward(llama, torch.tensor([[5], [6]]), m, cache, m.sum(-1, keepdim=True) - 1)
    assert all(int(layer.extras[SPAN_KEY][:, 0, -1].abs().sum()) == 0 for layer in cache.core.layers)


def test_spans_off_by_default_and_exact_when_unlimited(llama):
    ids, mask = pad_left([list(range(2, 40))])
    cache = make_cache(llama, "h2o", None)
    enable_spans(cache, _Pieces())
    plain = make_cache(llama, "h2o", None)
    with torch.no_grad():
        a = prefill_prompt(llama, ids, mask, cache)[0]
        b = prefill_prompt(llama, ids, mask, plain)[0]
    torch.testing.assert_close(a, b)
    assert SPAN_KEY not in plain.core.layers[0].extras
