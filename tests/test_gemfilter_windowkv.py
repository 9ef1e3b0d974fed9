"""GemFilter (two-pass prompt selection through the engine) and WindowKV (window selection, index sharing)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from memfit.adapters.transformers import forward, run_first_layers
from memfit.api import make_cache
from memfit.core.cache import KVLayer
from memfit.core.method import get_method
from memfit.engine import generate, pad_left, positions_from_mask, prefill
from memfit.errors import ConfigError
from memfit.methods.windowkv import group_budgets, window_priority

CONFIG = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    attn_implementation="sdpa",
)


def tiny(seed: int = 0, layers: int = 3) -> torch.nn.Module:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**CONFIG, "num_hidden_layers": layers})).eval()


@pytest.fixture(scope="module")
def model():
    return tiny()


def rows(*lens: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (n,), generator=g).tolist() for n in lens]


# -- GemFilter ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [None, 100_000])
def test_gemfilter_unlimited_budget_is_full(model, budget):
    ids, mask = pad_left(rows(50, 37))
    full = generate(model, ids, mask, make_cache(model, "full"), max_new_tokens=4)
    gem = generate(model, ids, mask, make_cache(model, "gemfilter", budget), max_new_tokens=4)
    torch.testing.assert_close(gem.first_logits, full.first_logits, atol=1e-5, rtol=1e-5)
    assert gem.tokens == full.tokens


@pytest.mark.parametrize("budget", [0.3, 12])
def test_gemfilter_holds_at_most_the_budget(model, budget):
    lens = (64, 41, 20)
    ids, mask = pad_left(rows(*lens, seed=1))
    cache = make_cache(model, "gemfilter", budget)
    prefill(model, ids, mask, cache)
    keep = [min(cache.method.budget.resolve(n), n) for n in lens]
    assert cache.core.prompt_lens.tolist() == list(lens)  # budgets resolve from the original prompt
    for layer in cache.core.layers:
        assert layer.held_per_row().tolist() == [[k] * 2 for k in keep]  # exactly the selected tokens
        assert layer.seen == max(keep)  # the cache only ever saw the shortened prompt
    cache = make_cache(model, "gemfilter", budget)
    gen = generate(model, ids, mask, cache, max_new_tokens=5)
    for layer in cache.core.layers:
        assert bool((layer.held_per_row() <= torch.tensor(keep)[:, None] + gen.decode_steps).all())


def test_gemfilter_padded_batch_matches_rows_alone(model):
    prompts = rows(45, 30, 60, seed=2)
    ids, mask = pad_left(prompts)
    batch = generate(model, ids, mask, make_cache(model, "gemfilter", 0.3), max_new_tokens=5)
    for r, row in enumerate(prompts):
        rid, rmask = pad_left([row])
        alone = generate(model, rid, rmask, make_cache(model, "gemfilter", 0.3), max_new_tokens=5)
        torch.testing.assert_close(batch.first_logits[r : r + 1], alone.first_logits, atol=1e-4, rtol=1e-4)
        assert batch.tokens[r] == alone.tokens[0]


def planted_model(planted: int, question: int) -> torch.nn.Module:
    """Layer 0's query of token `question` points at the key of token `planted` and at no other key.

    Signal in the last rotary pair of each head (the slowest frequency: RoPE barely turns it over 100 tokens)."""
    m = tiny(seed=3)
    hd = CONFIG["hidden_size"] // CONFIG["num_attention_heads"]
    j_key, j_query = 5, 6  # hidden channels that carry the two tokens
    with torch.no_grad():
        emb = m.model.embed_tokens.weight
        emb[:, [j_key, j_query]] = 0.0
        emb[planted, j_key] = 1.0
        emb[question, j_query] = 1.0
        attn = m.model.layers[0].self_attn
        attn.q_proj.weight.zero_()
        attn.k_proj.weight.zero_()
        for h in range(CONFIG["num_attention_heads"]):
            attn.q_proj.weight[h * hd + hd - 1, j_query] = 3.0
        for h in range(CONFIG["num_key_value_heads"]):
            attn.k_proj.weight[h * hd + hd - 1, j_key] = 3.0
    return m


def test_gemfilter_selects_the_planted_token_and_reprefills_it():
    planted, question = 7, 9
    m = planted_model(planted, question)
    g = torch.Generator().manual_seed(4)
    filler = [t for t in torch.randint(10, 128, (200,), generator=g).tolist()][:80]
    prompts = [
        filler[:20] + [planted] + filler[20:59] + [question],
        filler[:30] + [planted] + filler[30:45] + [question],
    ]
    ids, mask = pad_left(prompts)
    cache = make_cache(m, "gemfilter", 12, {"filter_layer": 0})
    new_ids, new_mask = cache.core.select_prompt(m, ids, mask)
    assert new_ids.shape == (2, 12) and bool(new_mask.bool().all())
    for row in range(2):
        kept = new_ids[row].tolist()
        assert planted in kept
        assert kept[kept.index(planted) - 2 : kept.index(planted) + 3] == [
            prompts[row][i] for i in range(prompts[row].index(planted) - 2, prompts[row].index(planted) + 3)
        ]  # pooling (kernel 5) keeps the neighbourhood, in prompt order
    # the engine prefills exactly that prompt, re-numbered from position 0, with a full model
    gem = generate(m, ids, mask, make_cache(m, "gemfilter", 12, {"filter_layer": 0}), max_new_tokens=3)
    ref = generate(m, new_ids, new_mask, make_cache(m, "full"), max_new_tokens=3)
    torch.testing.assert_close(gem.first_logits, ref.first_logits, atol=1e-5, rtol=1e-5)
    assert gem.tokens == ref.tokens


def test_run_first_layers_stops_after_the_filter_layer(model):
    ids, mask = pad_left(rows(40, 25, seed=5))
    calls = []
    hook = model.model.layers[2].register_forward_hook(lambda *a: calls.append(1))
    try:
        queries, keys, valid, scaling = run_first_layers(model, ids, mask, 1)
    finally:
        hook.remove()
    assert not calls  # layer 2 never ran
    full = make_cache(model, "full")
    forward(model, ids, mask, full, positions_from_mask(mask))
    torch.testing.assert_close(keys, full.core.layers[1].keys)
    assert torch.equal(valid, full.core.layers[1].valid_mask())
    assert queries.shape == (2, 4, 40, 16) and scaling == pytest.approx(16**-0.5)


def test_gemfilter_filter_layer_defaults_and_errors():
    method = get_method("gemfilter").create(0.5)
    assert method.layer_for(30) == 15 and method.layer_for(32) == 16 and method.layer_for(3) == 1
    assert get_method("gemfilter").create(0.5, {"filter_depth": str(13 / 32)}).layer_for(32) == 13  # official
    assert get_method("gemfilter").create(0.5, {"filter_layer": "4"}).layer_for(30) == 4
    with pytest.raises(ConfigError):
        get_method("gemfilter").create(0.5, {"filter_layer": "30"}).layer_for(30)
    with pytest.raises(ConfigError):
        get_method("gemfilter").create(0.5, {"filter_depth": "1.5"})


# -- WindowKV ----------------------------------------------------------------------------------------------------
def test_window_priority_keeps_whole_windows_then_trims_one():
    t, suffix = 40, 4
    scores = torch.full((1, 2, t), 0.01)
    scores[0, :, 16:24] = 1.0  # window 2 is the best
    scores[0, :, 8:16] = 0.5  # window 1 second ...
    scores[0, :, 9] = 0.9  # ... with its best tokens at 9 and 12
    scores[0, :, 12] = 0.8
    valid = torch.ones(1, t, dtype=torch.bool)
    prio = window_priority(scores, valid, suffix, 8, "average")
    top = set(prio[0].topk(suffix + 8 + 2).indices.tolist())
    assert top == set(range(36, 40)) | set(range(16, 24)) | {9, 12}
    assert set(prio[0].topk(2).indices.tolist()) == {38, 39}  # budget < suffix: the most recent tokens


def test_max_and_average_strategies_differ():
    t = 24  # windows [0, 8), [8, 16) and a 8-token suffix
    scores = torch.zeros(1, 1, t)
    scores[0, 0, 3] = 1.0  # window 0: one spike (top-4 mean 0.25, mean 0.125)
    scores[0, 0, 8:16] = 0.2  # window 1: flat (top-4 mean 0.2, mean 0.2)
    valid = torch.ones(1, t, dtype=torch.bool)
    best = {s: window_priority(scores, valid, 8, 8, s)[0].topk(8 + 8).indices.tolist() for s in ("max", "average")}
    assert set(best["max"]) == set(range(0, 8)) | set(range(16, 24))
    assert set(best["average"]) == set(range(8, 24))


def test_windowkv_task_defaults_and_errors():
    qa, other = get_method("windowkv").create(0.5), get_method("windowkv").create(0.5, {"task": "other"})
    assert (qa.window_strategy, qa.suffix_size) == ("max", 32)
    assert (other.window_strategy, other.suffix_size) == ("average", 16)
    custom = get_method("windowkv").create(0.5, {"strategy": "average", "suffix": "8"})
    assert (custom.window_strategy, custom.suffix_size) == ("average", 8)
    for bad in ({"task": "summary"}, {"strategy": "min"}, {"window_size": "0"}, {"layer_budgets": "pyramid"}):
        with pytest.raises(ConfigError):
            get_method("windowkv").create(0.5, bad)


def test_group_budgets_official_arithmetic_rescaled():
    keep = torch.tensor([2048, 100])
    decay = group_budgets(keep, 4, 8, 14, "decay")
    # official for C=2048: 2926, 2341, 1756, 1170 -> rescaled so the first group keeps C
    assert decay[:, 0].tolist() == [2048 * x // 2926 for x in (2926, 2341, 1756, 1170)]
    assert bool((decay <= keep).all()) and decay[0].tolist() == keep.tolist()
    assert group_budgets(keep, 4, 8, 14, "uniform").tolist() == [keep.tolist()] * 4


@pytest.mark.parametrize("params", [{}, {"task": "other"}, {"window_size": "1"}])
def test_windowkv_keeps_exactly_the_budget_with_the_suffix(model, params):
    lens = (90, 61, 20)
    ids, mask = pad_left(rows(*lens, seed=6))
    cache = make_cache(model, "windowkv", 40, params)
    forward(model, ids, mask, cache, positions_from_mask(mask))
    suffix = cache.method.suffix_size
    for layer in cache.core.layers:
        assert layer.held_per_row().tolist() == [[min(40, n)] * 2 for n in lens]
        for r, n in enumerate(lens):  # the suffix is held: the row's last keys are the prompt's last keys
            kept = layer.keys[r, 0][layer.valid_mask()[r, 0]]
            assert kept.shape[0] == min(40, n) and kept.shape[0] >= min(suffix, n)
    row_alone = make_cache(model, "windowkv", 40, params)
    rid, rmask = pad_left([rows(*lens, seed=6)[1]])
    forward(model, rid, rmask, row_alone, positions_from_mask(rmask))
    for bl, al in zip(cache.core.layers, row_alone.core.layers, strict=True):
        torch.testing.assert_close(bl.keys[1, :, bl.valid_mask()[1, 0]], al.keys[0], atol=1e-5, rtol=1e-5)


def test_windowkv_layer_groups_share_indices(monkeypatch):
    m = tiny(seed=7, layers=4)
    kept: dict[int, torch.Tensor] = {}
    original = KVLayer.keep

    def spy(self, indices, valid=None):
        kept[self.index] = indices.clone()
        return original(self, indices, valid)

    monkeypatch.setattr(KVLayer, "keep", spy)
    ids, mask = pad_left(rows(80, 55, seed=8))
    cache = make_cache(m, "windowkv", 0.7, {"shared_layers": "2"})  # suffix 32 + review
    forward(m, ids, mask, cache, positions_from_mask(mask))
    assert torch.equal(kept[0], kept[1]) and torch.equal(kept[2], kept[3])
    assert not torch.equal(kept[0], kept[2])  # each group scored with its own first layer
    assert bool((kept[0] == kept[0][:, :1]).all())  # one index set for every KV head


def test_windowkv_decay_budgets_fall_over_groups():
    m = tiny(seed=9, layers=4)
    ids, mask = pad_left(rows(100, seed=10))
    cache = make_cache(m, "windowkv", 64, {"shared_layers": "1", "layer_budgets": "decay"})
    forward(m, ids, mask, cache, positions_from_mask(mask))
    held = [int(layer.held_per_row().max()) for layer in cache.core.layers]
    assert held == group_budgets(torch.tensor([64]), 4, 1, 14, "decay")[:, 0].tolist()
    assert held[0] == 64 and held == sorted(held, reverse=True) and held[-1] < held[0]
