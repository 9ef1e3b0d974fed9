"""Foundation matrix on tiny random models: exactness, budgets, byte accounting, padding, GQA, selection."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from memfit.adapters.transformers import forward
from memfit.api import make_cache
from memfit.core.budget import Budget
from memfit.core.cache import KVLayer, select_tokens, tensor_bytes
from memfit.core.method import all_methods
from memfit.engine import pad_left, positions_from_mask
from memfit.errors import ConfigError

METHODS = sorted(all_methods())
PREFILL_ONLY = {name for name, cls in all_methods().items() if cls.acts == "prefill"}
# Quantizers (family "quantization") are lossy by design (no exactness at unlimited budget), keep every token on
# their own (budgets apply to the eviction method they are composed with: snapkv+kivi) and hold packed codes, not
# `layer.keys`. tests/test_quant_methods.py runs the same invariants on them and their compositions.
QUANTIZERS = {name for name, cls in all_methods().items() if cls.family == "quantization"}
EVICTING = [m for m in METHODS if m != "full" and m not in QUANTIZERS]


def decode_run(model, ids, mask, cache, steps=5, feed=None):
    """Prefill then `steps` greedy (or fed) decode steps; returns list of (B, V) logits and held checks."""
    pos = positions_from_mask(mask)
    logits = [forward(model, ids, mask, cache, pos)[:, -1]]
    snapshots = [snapshot(cache)]
    last = pos[:, -1:]
    for i in range(steps):
        tok = logits[-1].argmax(-1, keepdim=True) if feed is None else feed[:, i : i + 1]
        mask = torch.cat([mask, torch.ones_like(tok)], dim=1)
        last = last + 1
        logits.append(forward(model, tok, mask, cache, last)[:, -1])
        snapshots.append(snapshot(cache))
    return logits, snapshots


def snapshot(cache):
    if cache is None:
        return None
    return [(layer.num_slots, layer.held_per_row().clone()) for layer in cache.core.layers]


def plain_logits(model, ids, mask, steps, feed):
    """Reference: the model without any memfit cache, re-run on the growing sequence (no cache at all)."""
    out = []
    for i in range(steps + 1):
        cur_ids = torch.cat([ids, feed[:, :i]], dim=1)
        cur_mask = torch.cat([mask, torch.ones_like(feed[:, :i])], dim=1)
        out.append(model(input_ids=cur_ids, attention_mask=cur_mask, position_ids=positions_from_mask(cur_mask)).logits[:, -1])
    return out


@pytest.mark.parametrize(
    "method, budget",
    # `full` takes no budget (a ConfigError: it would evict nothing); every eviction method, none or a huge one
    [("full", None)] + [(m, b) for m in EVICTING for b in (None, 100_000)],
)
def test_unlimited_budget_is_exact(tiny_model, method, budget):
    torch.manual_seed(1)
    ids, mask = pad_left([torch.randint(0, 128, (n,)).tolist() for n in (50, 37)])
    feed = torch.randint(0, 128, (2, 4))
    with torch.no_grad():
        ref = plain_logits(tiny_model, ids, mask, 4, feed)
        logits, _ = decode_run(tiny_model, ids, mask, make_cache(tiny_model, method, budget), 4, feed)
    for r, o in zip(ref, logits, strict=True):
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", EVICTING)
@pytest.mark.parametrize("budget", [0.25, 0.5, 12])
def test_budget_never_exceeded(llama, method, budget):
    torch.manual_seed(2)
    lens = (64, 41, 20)
    ids, mask = pad_left([torch.randint(0, 128, (n,)).tolist() for n in lens])
    cache = make_cache(llama, method, budget)
    with torch.no_grad():
        _, snaps = decode_run(llama, ids, mask, cache, steps=6)
    b = Budget.parse(budget)
    assert cache.core.keep_rows.tolist() == [b.resolve(n) for n in lens]
    for step, snap in enumerate(snaps):
        grow = step if method in PREFILL_ONLY else 0
        for layer_idx, (slots, held) in enumerate(snap):
            limits = torch.minimum(cache.core.layer_keep(layer_idx), torch.tensor(lens))
            assert slots <= int(limits.max()) + grow, (step, layer_idx, slots)
            assert bool((held <= (limits + grow)[:, None]).all()), (step, layer_idx, held, limits)


@pytest.mark.parametrize("method", EVICTING)
def test_nbytes_counts_every_tensor_and_falls_with_budget(llama, method):
    torch.manual_seed(3)
    ids = torch.randint(0, 128, (2, 80))
    mask = torch.ones_like(ids)
    sizes = {}
    for budget in (None, 0.5, 0.25):
        cache = make_cache(llama, method, budget)
        with torch.no_grad():
            forward(llama, ids, mask, cache, positions_from_mask(mask))
        held = 0
        for layer in cache.core.layers:  # independent walk over everything the layer object holds
            for value in vars(layer).values():
                if isinstance(value, torch.Tensor):
                    held += tensor_bytes(value)
                elif isinstance(value, dict):
                    held += sum(tensor_bytes(v) for v in value.values() if isinstance(v, torch.Tensor))
        assert cache.nbytes() == held
        kv = sum(tensor_bytes(layer.keys, layer.values) for layer in cache.core.layers)
        sizes[budget] = kv
        full = cache.full_nbytes()
        assert full == 2 * 3 * 2 * 2 * 80 * 16 * 4  # layers * (K,V) * B * Hkv * T * d * fp32
        if budget is not None:
            assert kv == full * math.ceil(budget * 80) // 80
    assert sizes[0.25] < sizes[0.5] < sizes[None]


@pytest.mark.parametrize("method, budget", [("full", None)] + [(m, b) for m in EVICTING for b in (0.3, 16)])
def test_padded_batch_matches_rows_alone(llama, method, budget):
    torch.manual_seed(4)
    rows = [torch.randint(0, 128, (n,)).tolist() for n in (45, 30, 60)]
    feed = torch.randint(0, 128, (3, 5))
    ids, mask = pad_left(rows)
    with torch.no_grad():
        batch_cache = make_cache(llama, method, budget)
        batch_logits, _ = decode_run(llama, ids, mask, batch_cache, 5, feed)
        for r, row in enumerate(rows):
            rid, rmask = pad_left([row])
            alone_cache = make_cache(llama, method, budget)
            alone_logits, _ = decode_run(llama, rid, rmask, alone_cache, 5, feed[r : r + 1])
            for bl, al in zip(batch_logits, alone_logits, strict=True):
                torch.testing.assert_close(bl[r : r + 1], al, atol=1e-4, rtol=1e-4)
            for bl_layer, al_layer in zip(batch_cache.core.layers, alone_cache.core.layers, strict=True):
                valid = bl_layer.valid_mask()[r]
                for h in range(valid.shape[0]):
                    kept = bl_layer.keys[r, h][valid[h]]
                    torch.testing.assert_close(kept, al_layer.keys[0, h][al_layer.valid_mask()[0, h]], atol=1e-5, rtol=1e-5)


def test_storage_never_expands_kv_heads(llama):
    cache = make_cache(llama, "snapkv", 0.25)
    ids = torch.randint(0, 128, (1, 90))
    with torch.no_grad():
        forward(llama, ids, torch.ones_like(ids), cache)
    for layer in cache.core.layers:
        assert layer.keys.shape[1] == llama.config.num_key_value_heads


def test_selection_is_per_kv_head():
    """Two KV heads whose queries point at different tokens keep different tokens (SnapKV scoring, GQA g=2)."""
    from memfit.core.method import get_method

    torch.manual_seed(0)
    t, d = 40, 8
    layer = KVLayer()
    keys = torch.randn(1, 2, t, d) * 0.01
    keys[0, 0, 5] = 10.0  # head 0: token 5 is the magnet
    keys[0, 1, 17] = -10.0  # head 1: token 17 is the magnet
    values = torch.arange(t, dtype=torch.float32)[None, None, :, None].expand(1, 2, t, d).clone()  # value = position
    layer.append(keys, values, None)
    queries = torch.zeros(1, 4, 4, d)
    queries[0, :2] = 1.0  # query heads 0,1 -> KV head 0
    queries[0, 2:] = -1.0  # query heads 2,3 -> KV head 1

    method = get_method("snapkv").create(6, {"window": 4, "kernel": 1})
    from memfit.core.cache import StepInfo, apply_selection
    from memfit.core.contract import LayerView

    info = StepInfo(0, 1, 4, True, None, keep=torch.tensor([6]))
    apply_selection(layer, method.after_attention(LayerView(layer), queries, 1.0, info), info.keep)
    kept0 = set(layer.values[0, 0, :, 0].long().tolist())
    kept1 = set(layer.values[0, 1, :, 0].long().tolist())
    assert layer.keys.shape == (1, 2, 6, d)
    assert 5 in kept0 and 17 not in kept0  # each KV head kept its own magnet token
    assert 17 in kept1 and 5 not in kept1
    assert {36, 37, 38, 39} <= kept0 & kept1  # the observation window is kept by both


def test_select_tokens_fills_short_rows_with_placeholders():
    scores = torch.tensor([[[5.0, 1.0, 4.0, 3.0, 2.0]], [[1.0, 2.0, 3.0, 4.0, 5.0]]])
    idx, valid = select_tokens(scores, torch.tensor([3, 1]), None)
    assert idx.tolist() == [[[0, 2, 3]], [[2, 3, 4]]]
    assert valid.tolist() == [[[True, True, True]], [[False, False, True]]]


@given(st.floats(min_value=1e-6, max_value=1.0), st.integers(min_value=1, max_value=100_000))
def test_fraction_budget_resolution(frac, n):
    k = Budget.parse(frac).resolve(n)
    assert 1 <= k <= max(1, n) and k >= frac * n - 1e-6


@given(st.integers(min_value=2, max_value=10**7), st.integers(min_value=1, max_value=10**6))
def test_token_budget_resolution(tokens, n):
    assert Budget.parse(tokens).resolve(n) == tokens
    assert Budget.parse(str(tokens)).tokens == tokens


@pytest.mark.parametrize("bad", [0, -1, 1.5, "abc", "nan", 0.0, True])
def test_bad_budgets_raise_config_error(bad):
    with pytest.raises(ConfigError):
        Budget.parse(bad)


def test_unknown_method_and_param():
    with pytest.raises(ConfigError, match="unknown method"):
        make_cache(torch.nn.Linear(1, 1), "nope")
    from memfit.core.method import get_method

    with pytest.raises(ConfigError, match="unknown parameter"):
        get_method("snapkv").create(0.5, {"nope": "1"})
    with pytest.raises(ConfigError, match="not a valid int"):
        get_method("snapkv").create(0.5, {"window": "x"})


@pytest.mark.parametrize("method", [m for m in METHODS if m not in QUANTIZERS])
def test_chunked_prefill(llama, method):
    """Unlimited budget: chunked prefill is exact. With a budget: the cache never holds more than budget + chunk."""
    from memfit.engine import generate

    torch.manual_seed(5)
    ids, mask = pad_left([torch.randint(0, 128, (n,)).tolist() for n in (90, 70)])
    with torch.no_grad():
        one = generate(llama, ids, mask, make_cache(llama, method, None), max_new_tokens=4)
        chunked = generate(llama, ids, mask, make_cache(llama, method, None), max_new_tokens=4, prefill_chunk=16)
    torch.testing.assert_close(chunked.first_logits, one.first_logits, atol=1e-5, rtol=1e-5)
    assert chunked.tokens == one.tokens
    if method == "full":
        return
    cache = make_cache(llama, method, 0.25)
    peak_slots = []  # slots held while attending, i.e. before the policy evicts

    def spy(layer, attend):
        def wrapped(*args, **kwargs):
            peak_slots.append(layer.num_slots)
            return attend(*args, **kwargs)

        return wrapped

    for layer in cache.core.layers:
        layer.attend = spy(layer, layer.attend)
    with torch.no_grad():
        generate(llama, ids, mask, cache, max_new_tokens=2, prefill_chunk=16)
    budget = int(cache.core.keep_rows.max())
    assert budget == math.ceil(0.25 * 90)  # resolved from the whole prompt, not the first chunk
    assert max(peak_slots) <= budget + 16 + 2


@given(q_len=st.integers(1, 40), extra=st.integers(0, 30), chunk=st.sampled_from([None, 1, 7, 64]),
       seed=st.integers(0, 100))
def test_column_sums_match_one_dense_softmax(q_len, extra, chunk, seed):
    """Block-wise accumulated attention (any chunk, GQA, masked keys and padding queries) equals the column sums
    of one dense causal softmax written out here."""
    from memfit.core.scoring import column_sums

    g = torch.Generator().manual_seed(seed)
    t_len = q_len + extra
    q = torch.randn(2, 4, q_len, 8, generator=g)
    k = torch.randn(2, 2, t_len, 8, generator=g)
    kvalid = torch.rand(2, 2, t_len, generator=g) > 0.2
    qvalid = torch.rand(2, q_len, generator=g) > 0.3
    got = column_sums(q, k, 0.35, kvalid, qvalid, chunk=chunk)
    kk = k.repeat_interleave(2, dim=1)
    logits = q @ kk.transpose(-1, -2) * 0.35
    causal = torch.arange(t_len)[None, :] <= (torch.arange(q_len)[:, None] + extra)
    allowed = causal[None, None] & kvalid.repeat_interleave(2, dim=1)[:, :, None, :]
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    want = (probs * qvalid[:, None, :, None]).sum(2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
