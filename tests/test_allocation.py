"""Adaptive budgets: pyramid layer schedule, AdaKV per-head allocation and the ragged store it runs on."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memfit.adapters.transformers import forward
from memfit.api import make_cache
from memfit.core.allocation import adakv_keep_mask, parse_allocation, pyramid_budgets, pyramid_schedule
from memfit.core.budget import Budget
from memfit.core.cache import KVLayer, StepInfo, tensor_bytes
from memfit.core.quant import quantize
from memfit.core.ragged import QuantizedRaggedKVLayer, RaggedKVLayer
from memfit.engine import pad_left, positions_from_mask, prefill
from memfit.errors import ConfigError

EVICTION = ["snapkv", "h2o"]
PREFILL_ONLY = {"snapkv"}


def decode_run(model, ids, mask, cache, feed):
    """Prefill, then feed `feed` (B, steps) one token at a time; returns logits per step and held (B, Hkv) per layer."""
    pos = positions_from_mask(mask)
    logits = [forward(model, ids, mask, cache, pos)[:, -1]]
    held = [[layer.held_per_row().clone() for layer in cache.core.layers]]
    last = pos[:, -1:]
    for i in range(feed.shape[1]):
        mask = torch.cat([mask, torch.ones_like(feed[:, :1])], dim=1)
        last = last + 1
        logits.append(forward(model, feed[:, i : i + 1], mask, cache, last)[:, -1])
        held.append([layer.held_per_row().clone() for layer in cache.core.layers])
    return logits, held


def walk_bytes(cache) -> int:
    """Bytes of every tensor the layer objects hold, found independently of nbytes()."""
    total = 0
    for layer in cache.core.layers:
        for value in vars(layer).values():
            if isinstance(value, torch.Tensor):
                total += tensor_bytes(value)
            elif isinstance(value, dict):
                total += sum(tensor_bytes(v) for v in value.values() if isinstance(v, torch.Tensor))
    return total


# -- pyramid -------------------------------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 5000),
    st.integers(1, 80),
    st.floats(1.0, 50.0),
    st.one_of(st.none(), st.integers(1, 8000)),
    st.integers(0, 64),
)
def test_pyramid_keeps_the_mean_exactly_and_decreases(budget, layers, beta, cap, reserve):
    out = pyramid_budgets(budget, layers, beta, cap, reserve)
    assert len(out) == layers
    assert sum(out) == layers * budget  # the mean over layers is the user's budget, exactly
    assert all(a >= b for a, b in zip(out, out[1:], strict=False))  # bottom layers get more
    assert min(out) >= 1
    if cap is not None and budget < cap:
        assert max(out) <= cap


def test_pyramid_shape_matches_pyramidkv():
    out = pyramid_budgets(400, 32, beta=20)
    assert out[0] > 1.9 * 400 and out[-1] == 20  # bottom 2b - b/beta, top b/beta
    assert pyramid_budgets(400, 32, beta=20, cap=600)[0] == 600  # clamped to what there is to keep
    assert pyramid_budgets(400, 32, beta=20, cap=300) == [400] * 32  # budget >= prompt: keep all everywhere
    windowed = pyramid_budgets(400, 32, beta=20, reserve=32)  # SnapKV's window stays whole in every layer
    assert windowed[-1] == 32 + 18 and sum(windowed) == 32 * 400
    schedule = pyramid_schedule(prompt_lens=lambda: torch.tensor([1000, 500]))  # per row, capped by its prompt
    table = torch.stack([schedule(torch.tensor([250, 125]), i, 30) for i in range(30)], dim=1)
    assert table.sum(1).tolist() == [30 * 250, 30 * 125]


@pytest.mark.parametrize("method", EVICTION)
def test_pyramid_schedule_in_a_cache(llama, method):
    torch.manual_seed(5)
    lens = (64, 41)
    ids, mask = pad_left([torch.randint(0, 128, (n,)).tolist() for n in lens])
    cache = make_cache(llama, method, 0.25, allocation="pyramid")
    with torch.no_grad():
        forward(llama, ids, mask, cache, positions_from_mask(mask))
    per_layer = torch.stack([cache.core.layer_keep(i) for i in range(cache.core.num_layers)], dim=1)  # (B, L)
    assert per_layer.sum(1).tolist() == [3 * Budget.parse(0.25).resolve(n) for n in lens]
    assert bool((per_layer[:, :-1] >= per_layer[:, 1:]).all()) and bool((per_layer[:, 0] > per_layer[:, -1]).all())
    slots = [layer.num_slots for layer in cache.core.layers]
    assert slots[0] > slots[-1]  # the dense stores really differ in size per layer


# -- AdaKV selection -----------------------------------------------------------------------------------------------
def test_adakv_moves_budget_to_the_dispersed_head():
    t = 40
    scores = torch.full((1, 2, t), 1.0 / t)  # head 1: flat attention (dispersed)
    scores[0, 0] = 1e-4
    scores[0, 0, :3] = 0.3  # head 0: three tokens take all the mass (concentrated)
    keep = adakv_keep_mask(scores, torch.tensor([10]), None, None, alpha=0.2)
    per_head = keep.sum(-1)[0].tolist()
    assert sum(per_head) == 20  # the layer's total: Hkv x budget
    assert per_head[1] > 10 > per_head[0] >= 2  # the safeguard: at least alpha x budget per head
    assert keep[0, 0, :3].all()
    # alpha = 1: uniform again
    assert adakv_keep_mask(scores, torch.tensor([10]), None, None, alpha=1.0).sum(-1).tolist() == [[10, 10]]


@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 30), st.integers(1, 40), st.floats(0.0, 1.0))
@settings(max_examples=60, deadline=None)
def test_adakv_total_never_exceeds_the_layer_budget(b, h, t, k, alpha):
    torch.manual_seed(b * 1000 + h * 100 + t)
    scores = torch.rand(b, h, t)
    valid = torch.rand(b, h, t) > 0.3
    protect = (torch.rand(b, h, t) > 0.9) & valid
    keep_rows = torch.randint(1, k + 1, (b,))
    keep = adakv_keep_mask(scores, keep_rows, valid, protect, alpha)
    assert not bool((keep & ~valid).any())
    held = keep.sum((1, 2))
    assert bool((held == torch.minimum(h * keep_rows, valid.sum((1, 2)))).all())  # the whole budget is used


# -- ragged store --------------------------------------------------------------------------------------------------
def test_ragged_attend_matches_dense_on_the_same_tokens():
    torch.manual_seed(0)
    b, hkv, g, t, d = 2, 3, 2, 12, 8
    ragged = RaggedKVLayer()
    first_valid = torch.ones(b, t, dtype=torch.bool)
    first_valid[1, :4] = False  # row 1 is left-padded
    ragged.append(torch.randn(b, hkv, t, d), torch.randn(b, hkv, t, d), first_valid)
    ragged.finalize_step(StepInfo(0, 1, t, True, first_valid))
    ragged.keep_mask(torch.rand(b, hkv, t) > 0.4)  # a different ragged subset per (row, head)
    assert len({tuple(r) for r in ragged.held_per_row().tolist()}) > 1 or ragged.held_per_row().unique().numel() > 1
    dense = KVLayer()
    dense.append(ragged.keys, ragged.values, None)
    dense.valid = ragged.valid  # the same kept tokens, right-aligned with placeholders
    for q, new_valid in ((3, torch.tensor([[True, True, True], [False, True, True]])), (1, None)):
        k, v = torch.randn(b, hkv, q, d), torch.randn(b, hkv, q, d)
        queries = torch.randn(b, hkv * g, q, d)
        ragged.append(k, v, new_valid)
        dense.append(k, v, new_valid)
        out_r = ragged.attend(queries, 0.3)
        out_d = dense.attend(queries, 0.3)
        real = torch.ones(b, q, dtype=torch.bool) if new_valid is None else new_valid
        torch.testing.assert_close(out_r.transpose(1, 2)[real], out_d.transpose(1, 2)[real], atol=1e-5, rtol=1e-5)
        ragged.finalize_step(StepInfo(0, 1, q, False, new_valid))
        kept = ragged.valid_mask()
        for r in range(b):
            for h in range(hkv):  # the views show each head's tokens in order, newest last
                want = dense.keys[r, h][dense.valid_mask()[r, h]]
                torch.testing.assert_close(ragged.keys[r, h][kept[r, h]], want)


def test_ragged_extras_follow_their_tokens():
    torch.manual_seed(1)
    layer = RaggedKVLayer()
    keys = torch.arange(10, dtype=torch.float32)[None, None, :, None].expand(1, 2, 10, 4).clone()
    layer.append(keys, keys.clone(), None)
    layer.extras["score"] = keys[..., 0] * 10
    mask = torch.zeros(1, 2, 10, dtype=torch.bool)
    mask[0, 0, [1, 5]] = True
    mask[0, 1, [0, 2, 3, 9]] = True
    layer.keep_mask(mask)
    assert layer.held_per_row().tolist() == [[2, 4]]
    assert layer.keys.shape == (1, 2, 4, 4)
    assert layer.extras["score"][0, 0, 2:].tolist() == [10.0, 50.0]
    assert layer.extras["score"][0, 1].tolist() == [0.0, 20.0, 30.0, 90.0]
    assert layer.nbytes() == 6 * 4 * 4 * 2 + 6 * 4  # K + V + score for 6 tokens, no placeholders


# -- in a model ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def full_reference(llama):
    torch.manual_seed(1)
    ids, mask = pad_left([torch.randint(0, 128, (n,)).tolist() for n in (50, 37)])
    feed = torch.randint(0, 128, (2, 4))
    with torch.no_grad():
        ref, _ = decode_run(llama, ids, mask, make_cache(llama, "full"), feed)
    return ids, mask, feed, ref


@pytest.mark.parametrize(
    "method, allocation, budget",
    [
        ("snapkv", "adakv", None),
        ("snapkv", "pyramid+adakv", 100_000),
        ("h2o", "adakv", 100_000),
        ("h2o", "pyramid+adakv", None),
        ("full", "adakv", None),
    ],
)
def test_unlimited_budget_is_exact(llama, full_reference, method, allocation, budget):
    ids, mask, feed, ref = full_reference
    with torch.no_grad():
        out, _ = decode_run(llama, ids, mask, make_cache(llama, method, budget, allocation=allocation), feed)
    for r, o in zip(ref, out, strict=True):
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "method, allocation, budget",
    [
        ("snapkv", "pyramid", 0.25),
        ("snapkv", "adakv", 12),
        ("snapkv", "pyramid+adakv", 0.25),
        ("h2o", "pyramid", 12),
        ("h2o", "adakv", 0.25),
        ("h2o", "pyramid+adakv", 12),
    ],
)
def test_budget_never_exceeded(llama, method, allocation, budget):
    torch.manual_seed(2)
    lens = torch.tensor([64, 41, 20])
    ids, mask = pad_left([torch.randint(0, 128, (int(n),)).tolist() for n in lens])
    cache = make_cache(llama, method, budget, allocation=allocation)
    with torch.no_grad():
        _, held = decode_run(llama, ids, mask, cache, torch.randint(0, 128, (3, 4)))
    per_head = parse_allocation(allocation)[1]
    for step, layers in enumerate(held):
        grow = step if method in PREFILL_ONLY else 0
        for layer_idx, h in enumerate(layers):
            limit = torch.minimum(cache.core.layer_keep(layer_idx), lens) + grow  # (B,)
            if per_head:  # a head may hold more than the layer budget, the layer's row never more than Hkv x it
                assert bool((h.sum(-1) <= h.shape[1] * limit).all()), (step, layer_idx, h, limit)
            else:
                assert bool((h <= limit[:, None]).all()), (step, layer_idx, h, limit)
    assert cache.nbytes() == walk_bytes(cache)


@pytest.mark.parametrize(
    "method, rows, budget",
    [("snapkv", (80,), 16), ("snapkv", (64, 41, 20), 0.25), ("h2o", (80,), 0.25), ("h2o", (64, 41, 20), 0.25)],
)
def test_per_head_holds_no_more_bytes_than_uniform(llama, method, rows, budget):
    torch.manual_seed(3)
    ids, mask = pad_left([torch.randint(0, 128, (n,)).tolist() for n in rows])
    feed = torch.randint(0, 128, (len(rows), 5))
    sizes = {}
    for allocation in ("uniform", "adakv"):
        cache = make_cache(llama, method, budget, allocation=allocation)
        with torch.no_grad():
            pos = positions_from_mask(mask)
            forward(llama, ids, mask, cache, pos)
            sizes[allocation] = [cache.nbytes()]
            assert cache.nbytes() == walk_bytes(cache)
            m, last = mask, pos[:, -1:]
            for i in range(feed.shape[1]):  # and after every decode step (no spare capacity is ever held)
                m, last = torch.cat([m, torch.ones_like(feed[:, :1])], 1), last + 1
                forward(llama, feed[:, i : i + 1], m, cache, last)
                sizes[allocation].append(cache.nbytes())
            assert cache.nbytes() == walk_bytes(cache)
    assert all(a <= u for a, u in zip(sizes["adakv"], sizes["uniform"], strict=True)), sizes
    if len(rows) > 1 and budget < 1:  # uniform pads short rows with placeholders + a validity mask; ragged doesn't
        assert sizes["adakv"][0] < sizes["uniform"][0]


@pytest.mark.parametrize("method, allocation", [("snapkv", "adakv"), ("h2o", "pyramid+adakv")])
def test_padded_batch_matches_rows_alone(llama, method, allocation):
    torch.manual_seed(4)
    rows = [torch.randint(0, 128, (n,)).tolist() for n in (45, 30, 60)]
    feed = torch.randint(0, 128, (3, 4))
    ids, mask = pad_left(rows)
    with torch.no_grad():
        batch = make_cache(llama, method, 0.3, allocation=allocation)
        batch_logits, _ = decode_run(llama, ids, mask, batch, feed)
        for r, row in enumerate(rows):
            rid, rmask = pad_left([row])
            alone = make_cache(llama, method, 0.3, allocation=allocation)
            alone_logits, _ = decode_run(llama, rid, rmask, alone, feed[r : r + 1])
            for bl, al in zip(batch_logits, alone_logits, strict=True):
                torch.testing.assert_close(bl[r : r + 1], al, atol=1e-4, rtol=1e-4)
            for bl_layer, al_layer in zip(batch.core.layers, alone.core.layers, strict=True):
                assert bl_layer.held_per_row()[r].tolist() == al_layer.held_per_row()[0].tolist()
                valid = bl_layer.valid_mask()[r]
                for h in range(valid.shape[0]):
                    kept = bl_layer.keys[r, h][valid[h]]
                    torch.testing.assert_close(
                        kept, al_layer.keys[0, h][al_layer.valid_mask()[0, h]], atol=1e-5, rtol=1e-5
                    )


@pytest.mark.parametrize("method", EVICTION)
def test_chunked_prefill_on_the_ragged_store(llama, method):
    torch.manual_seed(6)
    ids, mask = pad_left([torch.randint(0, 128, (n,)).tolist() for n in (70, 52)])
    with torch.no_grad():
        ref = prefill(llama, ids, mask, make_cache(llama, "full"))
        exact = prefill(llama, ids, mask, make_cache(llama, method, None, allocation="adakv"), prefill_chunk=16)
        torch.testing.assert_close(exact, ref, atol=1e-5, rtol=1e-5)
        cache = make_cache(llama, method, 0.25, allocation="pyramid+adakv")
        prefill(llama, ids, mask, cache, prefill_chunk=16)
    for i, layer in enumerate(cache.core.layers):
        assert bool((layer.held_per_row().sum(-1) <= 2 * cache.core.layer_keep(i)).all())


def test_ragged_select_batch_and_reset(llama):
    torch.manual_seed(7)
    ids, mask = pad_left([torch.randint(0, 128, (n,)).tolist() for n in (40, 25, 33)])
    cache = make_cache(llama, "h2o", 0.3, allocation="adakv")
    with torch.no_grad():
        decode_run(llama, ids, mask, cache, torch.randint(0, 128, (3, 2)))
    before = [(layer.keys, layer.valid_mask(), layer.extras["h2o_score"]) for layer in cache.core.layers]
    cache.core.select_batch(torch.tensor([2, 0]))
    for layer, (keys, valid, score) in zip(cache.core.layers, before, strict=True):
        for new_r, old_r in ((0, 2), (1, 0)):
            for h in range(keys.shape[1]):
                got = layer.keys[new_r, h][layer.valid_mask()[new_r, h]]
                torch.testing.assert_close(got, keys[old_r, h][valid[old_r, h]])
                got = layer.extras["h2o_score"][new_r, h][layer.valid_mask()[new_r, h]]
                torch.testing.assert_close(got, score[old_r, h][valid[old_r, h]])
    assert cache.nbytes() == walk_bytes(cache)
    cache.reset()
    assert all(type(layer) is RaggedKVLayer and layer.num_slots == 0 for layer in cache.core.layers)


def test_bad_allocation_is_a_config_error(llama):
    with pytest.raises(ConfigError, match="does not combine"):
        make_cache(llama, "snapkv+gear", 0.5, allocation="adakv")
    with pytest.raises(ConfigError, match="bits 2, 4 or 8"):
        make_cache(llama, "snapkv+kivi", 0.5, {"kivi.bits": 1}, allocation="adakv")
    with pytest.raises(ConfigError, match="unknown allocation"):
        make_cache(llama, "snapkv", 0.5, allocation="pyramid+nope")
    with pytest.raises(ConfigError, match="unknown allocation"):
        parse_allocation("adakv+adakv")
    with pytest.raises(ConfigError, match="per-head budgets"):  # its scoring needs equal heads (was a shape crash)
        make_cache(llama, "keyformer", 0.5, allocation="pyramid+adakv")
    assert parse_allocation("adakv+pyramid") == (True, True)


# -- ragged store holding KIVI's codes ------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantized_ragged_rows_are_the_quantizer_codes(bits):
    """A packed row is [codes | fp16 scales | fp16 minima] of the token's channel groups: decoding gives exactly
    memfit.core.quant's dequantization, and the row holds exactly those bytes."""
    torch.manual_seed(9)
    layer = QuantizedRaggedKVLayer(key_bits=bits, value_bits=bits, group_size=8, residual=8)
    x = torch.randn(1, 1, 20, 16)
    layer._dtype, layer._dk, layer._dv = x.dtype, 16, 16
    rows = layer._encode(x[0, 0], "k")
    want = quantize(x, bits, axis="channel", group_size=8)
    assert rows.dtype == torch.uint8 and rows.numel() == want.nbytes()
    torch.testing.assert_close(layer._decode(rows, "k"), want.dequantize()[0, 0], atol=0, rtol=0)


def test_quantized_ragged_attends_over_its_dequantized_tokens():
    """After an eviction (a ragged subset per head) and decode steps, attention equals dense attention over the
    dequantized kept tokens + the full-precision tail; the packed part holds codes only."""
    torch.manual_seed(10)
    b, hkv, g, t, d = 2, 3, 2, 24, 16
    layer = QuantizedRaggedKVLayer(key_bits=4, value_bits=2, group_size=8, residual=8)
    layer.append(torch.randn(b, hkv, t, d), torch.randn(b, hkv, t, d), None)
    layer.finalize_step(StepInfo(0, 1, t, True, None))
    layer.keep_mask(torch.rand(b, hkv, t) > 0.4)
    assert layer._k.dtype == torch.uint8 and layer._v.dtype == torch.uint8 and layer.tail == 0
    for step in range(10):  # the tail grows, then folds into codes (fold_min = residual)
        k, v = torch.randn(b, hkv, 1, d), torch.randn(b, hkv, 1, d)
        layer.append(k, v, None)
        dense = KVLayer()
        dense.append(layer.keys, layer.values, None)
        dense.valid = layer.valid
        queries = torch.randn(b, hkv * g, 1, d)
        torch.testing.assert_close(layer.attend(queries, 0.3), dense.attend(queries, 0.3), atol=1e-5, rtol=1e-5)
        layer.finalize_step(StepInfo(0, 1, 1, False, None))
        if step == 9:
            assert layer.tail < 10  # a fold quantized the tail at least once
            torch.testing.assert_close(layer.keys[:, :, -1], k[:, :, 0])  # the newest token is still exact


def test_quantized_ragged_store_in_a_model(llama):
    """snapkv+kivi with per-head budgets: close to snapkv's ragged run at 8 bits, fewer bytes at every step, bytes
    counted exactly; nothing is dequantized into the store."""
    torch.manual_seed(11)
    ids, mask = pad_left([torch.randint(0, 128, (n,)).tolist() for n in (60, 37)])
    feed = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        plain = make_cache(llama, "snapkv", 0.5, allocation="adakv")
        ref, held_ref = decode_run(llama, ids, mask, plain, feed)
        quant = make_cache(llama, "snapkv+kivi", 0.5, {"kivi.bits": 8, "kivi.group_size": 16, "kivi.residual": 16},
                           allocation="adakv")
        out, held = decode_run(llama, ids, mask, quant, feed)
    assert all(type(layer) is QuantizedRaggedKVLayer for layer in quant.core.layers)
    assert [[h.tolist() for h in step] for step in held] == [[h.tolist() for h in step] for step in held_ref]
    for r, o in zip(ref, out, strict=True):
        torch.testing.assert_close(o, r, atol=5e-2, rtol=5e-2)
    assert quant.nbytes() == walk_bytes(quant) < plain.nbytes()
    quant4 = make_cache(llama, "snapkv+kivi", 0.5, {"kivi.bits": 4, "kivi.group_size": 16, "kivi.residual": 16},
                        allocation="adakv")
    with torch.no_grad():
        decode_run(llama, ids, mask, quant4, feed)
    assert quant4.nbytes() < quant.nbytes()
