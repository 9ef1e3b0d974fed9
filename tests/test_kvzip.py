"""KVzip (memfit/methods/kvzip.py): its score equals a dense fp32 softmax reference; the two-pass engine path keeps
the chat template's prefix (the official code never evicts the system prompt) and scores by context reconstruction."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

from memfit.api import make_cache
from memfit.core.scoring import attention_probs, reduce_groups
from memfit.core.store import dense_attention
from memfit.engine import generate, pad_left
from memfit.methods import kvzip
from memfit.methods.kvzip import global_budgets, max_attention, max_attention_given_lse


@pytest.mark.parametrize("block", [1, 5, 256])
def test_max_attention_matches_a_dense_softmax(block):
    torch.manual_seed(0)
    q, k = torch.randn(2, 6, 37, 8), torch.randn(2, 3, 50, 8)
    valid = torch.rand(2, 3, 50) > 0.2
    valid[..., -37:] = True
    valid[1, :, 13:17] = False  # a padding query (sees no valid key) must not poison the max with NaN
    ref = reduce_groups(attention_probs(q, k, 0.3, valid).amax(2), 3, "max")
    torch.testing.assert_close(max_attention(q, k, 0.3, valid, block=block), ref, atol=1e-6, rtol=1e-6)


class _Tok:
    """A stand-in tokenizer: one id per character (mod 128), no chat template."""

    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 128 for c in text]}


@pytest.mark.parametrize("budgets", ["layer", "global"])
def test_two_pass_path_scores_by_reconstruction_and_keeps_the_sink(budgets):
    model = tiny_llama()
    torch.manual_seed(7)
    ids, mask = pad_left([torch.randint(0, 128, (n,)).tolist() for n in (80, 50)])
    full = make_cache(model, "full")
    with torch.no_grad():
        generate(model, ids, mask, full, max_new_tokens=1)
    kept = {}
    for bound in (False, True):
        cache = make_cache(model, "kvzip", 0.25, {"chunk": 24, "sinks": 3, "budgets": budgets})
        if bound:
            cache.method.bind_tokenizer(_Tok())
        with torch.no_grad():
            generate(model, ids, mask, cache, max_new_tokens=1)
        per_row = torch.stack([layer.valid_mask().sum(-1) for layer in cache.core.layers])  # (L, B, Hkv)
        assert bool((per_row == per_row[..., :1]).all())  # head-uniform within a layer (a rectangular store)
        if budgets == "layer":  # ceil(0.25 * 80), ceil(0.25 * 50) tokens per layer and head: each row its budget
            assert per_row[:, 0].eq(20).all() and per_row[:, 1].eq(13).all()
        else:  # one ranking over every layer: ragged over layers, the same total per row
            assert per_row[:, :, 0].sum(0).tolist() == [60, 39] and not per_row[:, 0].eq(20).all()
        for layer, ref in zip(cache.core.layers, full.core.layers, strict=True):
            valid = layer.valid_mask()
            for row, pad in ((0, 0), (1, 30)):  # the first 3 real tokens (the sink) are held in every head
                for h in range(layer.keys.shape[1]):
                    held = layer.keys[row, h][valid[row, h]]
                    for slot in range(pad, pad + 3):
                        assert bool(((held - ref.keys[row, h, slot]).abs().amax(-1) < 1e-6).any())
        kept[bound] = torch.cat([layer.keys.flatten() for layer in cache.core.layers])
    # the instruction changes the reconstruction queries, hence the scores
    assert not torch.equal(kept[False], kept[True])


def test_global_budgets_follow_one_ranking_and_add_up():
    # 2 layers x 2 heads x 4 tokens; the 6 best pairs: 4 in layer 0 (2 per head), 2 in layer 1 -> (2, 1) per head
    s0 = torch.tensor([[[9.0, 8, 1, 0], [7, 6, 0, 0]]])
    s1 = torch.tensor([[[5.0, 0, 0, 0], [4, 0, 0, -1]]])
    assert global_budgets([s0, s1], torch.tensor([6]), 2).tolist() == [[2], [1]]
    # protected pairs (+inf) count first; padding (-inf) is never chosen; remainders go to the largest leftovers
    s1[0, :, 1] = float("inf")
    s0[0, :, 3] = float("-inf")
    got = global_budgets([s0, s1], torch.tensor([10]), 2)
    assert got.sum().item() == 5 and got[1].item() >= 2


@pytest.mark.skipif(kvzip._FLASH_CPU is None, reason="this torch has no CPU flash-attention kernel")
def test_split_attention_gives_the_dense_output_and_the_scores_normaliser():
    """The reconstruction's fast path: three flash calls merged by their logsumexps give the dense attention output
    over every key, and the scored part's logsumexp gives the same scores as `max_attention` over sink + chunk + own
    (other chunks' keys excluded, as the official code scores)."""
    torch.manual_seed(0)
    n_ctx, q_len = 40, 11
    q, k, v = torch.randn(1, 6, q_len, 8), torch.randn(1, 3, n_ctx + q_len, 8), torch.randn(1, 3, n_ctx + q_len, 8)
    sink, chunk = torch.arange(0, 3), torch.arange(15, 29)  # slots 3-14 and 29-39: other chunks
    for valid in (None, torch.ones(1, 3, n_ctx + q_len, dtype=torch.bool).index_fill_(2, torch.tensor([5, 33]), False)):
        layer = kvzip._ReadThrough.__new__(kvzip._ReadThrough)
        layer.keys, layer.values, layer.valid, layer.scored = k, v, valid, torch.cat([sink, chunk])
        out = layer._split_attention(q, 0.3)
        torch.testing.assert_close(out, dense_attention(q, k, v, valid, 0.3), atol=1e-6, rtol=1e-5)
        own = torch.arange(n_ctx, n_ctx + q_len)
        sel = torch.cat([sink, chunk, own])
        ref = max_attention(q, k[:, :, sel], 0.3, None)[..., 3 : 3 + chunk.numel()]
        got = max_attention_given_lse(q, k[:, :, chunk], 0.3, layer.scored_lse)
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    # a padded slot inside the scored set: not the fast path's case, the caller attends as usual
    layer.valid = torch.ones(1, 3, n_ctx + q_len, dtype=torch.bool).index_fill_(2, torch.tensor([16]), False)
    assert layer._split_attention(q, 0.3) is None


def test_fast_reconstruction_keeps_what_the_two_pass_reference_keeps(monkeypatch):
    """End to end on a tiny model, several reconstruction chunks, two rows with left padding, both allocations:
    the kept pairs and the answer are those of the reference path (dense attention + a second softmax)."""
    model = tiny_llama()
    torch.manual_seed(3)
    ids, mask = pad_left([torch.randint(0, 128, (n,)).tolist() for n in (90, 61)])
    got = {}
    for fast in (True, False):
        if not fast:
            monkeypatch.setattr(kvzip, "_FLASH_CPU", None)
        for allocation in ("uniform", "adakv"):
            cache = make_cache(model, "kvzip", 0.3, {"chunk": 32}, allocation=allocation)
            cache.method.bind_tokenizer(_Tok())
            with torch.no_grad():
                out = generate(model, ids, mask, cache, max_new_tokens=4)
            got[fast, allocation] = ([layer.valid_mask() for layer in cache.core.layers],
                                     [layer.keys for layer in cache.core.layers], out.tokens)
    for allocation in ("uniform", "adakv"):
        (m1, k1, t1), (m2, k2, t2) = got[True, allocation], got[False, allocation]
        assert t1 == t2
        for a, b in zip(m1, m2, strict=True):
            assert torch.equal(a, b)
        for a, b in zip(k1, k2, strict=True):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
