"""Method-specific tests for Scissorhands and Keyformer on hand-built stores and the tiny random model."""

from __future__ import annotations

import math

import pytest
import torch

from memfit.adapters.transformers import forward
from memfit.api import make_cache
from memfit.core.cache import KVLayer, StepInfo, apply_selection
from memfit.core.contract import LayerView
from memfit.core.method import get_method
from memfit.engine import pad_left, positions_from_mask
from memfit.errors import ConfigError
from memfit.methods.keyformer import SCORE, gumbel_noise
from memfit.methods.scissorhands import HISTORY, event_counts, pack_bits, unpack_bits


def act(method, keep: list[int], layer: KVLayer, queries: torch.Tensor, scaling: float, info: StepInfo) -> None:
    """One policy step as the runtime drives it: the method sees a read-only view of `layer` and its budget per row
    (`keep`), and its answer is applied to the store."""
    info.keep = torch.tensor(keep)
    apply_selection(layer, method.after_attention(LayerView(layer), queries, scaling, info), info.keep)


def hand_layer(keys: torch.Tensor) -> KVLayer:
    """A store whose values carry each token's id (value[..., 0] = position)."""
    b, h, t, d = keys.shape
    values = torch.arange(t, dtype=torch.float32)[None, None, :, None].expand(b, h, t, d).clone()
    layer = KVLayer()
    layer.append(keys, values, None)
    return layer


def held_ids(layer: KVLayer, row: int = 0, head: int = 0) -> list[int]:
    ids = layer.values[row, head, :, 0].long()
    return sorted(ids[layer.valid_mask()[row, head]].tolist())


def prefill_info(q: int) -> StepInfo:
    return StepInfo(0, 1, q, True, None)


def decode_info() -> StepInfo:
    return StepInfo(0, 1, 1, False, None)


def append_token(layer: KVLayer, token_id: int, key: torch.Tensor) -> None:
    b, h, _, d = layer.keys.shape
    layer.append(key.view(b, h, 1, d), torch.full((b, h, 1, d), float(token_id)), None)


# -- Scissorhands ----------------------------------------------------------------------------------------------------
def test_bit_ring_packing_round_trip():
    bits = torch.rand(2, 3, 5, 24) > 0.5
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3, 5, 3)
    assert torch.equal(unpack_bits(packed), bits)
    assert torch.equal(event_counts(packed), bits.sum(-1))


def test_scissorhands_evicts_tokens_repeatedly_below_uniform():
    """One-hot keys; each of the last w prompt rows puts its attention on chosen tokens. Tokens left below 1/t most
    often in the window are evicted; the history counts match a direct count."""
    t = 16
    layer = hand_layer(torch.eye(t)[None, None])
    chosen = {11: [1, 4, 7, 8, 2, 10], 12: [1, 4, 7, 8, 2], 13: [1, 4, 7, 8, 10], 14: [1, 4, 7, 8, 2, 10], 15: [1, 4, 7, 8]}
    queries = torch.zeros(1, 1, t, t)
    for row, tokens in chosen.items():
        queries[0, 0, row, tokens] = 10.0
    # budget 10: w = 5 rows (11..15), r = 2 protected, m = 5
    method = get_method("scissorhands").create(10, {"recent": 0.2})
    # direct count of "below uniform" events over rows 11..15
    expected = torch.zeros(t, dtype=torch.long)
    for row in chosen:
        p = torch.softmax(queries[0, 0, row] @ torch.eye(t)[: row + 1].T, -1)
        expected[: row + 1] += (p < 1.0 / (row + 1)).long()
    act(method, [10], layer, queries, 1.0, prefill_info(t))
    kept = held_ids(layer)
    assert kept == [1, 2, 4, 7, 8, 10, 12, 13, 14, 15]
    # counts: 0 for {1,4,7,8}, 2 for {2,10}, 3 for 13, 4 for 12, 5 for the evicted ones; protected 14, 15
    assert expected[[0, 3, 5, 6, 9, 11]].tolist() == [5] * 6
    counts = event_counts(layer.extras[HISTORY])[0, 0]
    assert counts.tolist() == expected[kept].tolist()
    assert layer.extras[HISTORY].shape == (1, 1, 10, 1)  # 5 history bits -> one byte per token


def _run_decode_steps(method, layer, keep, steps, queries, keys, log=None, window=None):
    """Decode `steps` tokens through the policy; returns held counts after every step.

    With `log`, also checks the history counts against a brute-force record of below-uniform events."""
    held = []
    hkv = layer.keys.shape[1]
    groups = queries.shape[1] // hkv
    for s in range(steps):
        token = 1000 + s
        append_token(layer, token, keys[s])
        q = queries[s].view(1, -1, 1, layer.keys.shape[-1])
        if log is not None:
            logits = torch.einsum("hd,htd->ht", q[0, :, 0], layer.keys[0].repeat_interleave(groups, 0))
            probs = torch.softmax(logits, -1).view(hkv, groups, -1).mean(1)  # (Hkv, T)
            ids = layer.values[0, :, :, 0].long()
            log.append({(h, int(ids[h, j])): bool(probs[h, j] * probs.shape[-1] < 1) for h in range(hkv) for j in range(ids.shape[1])})
        act(method, [keep], layer, q, 1.0, decode_info())
        held.append(int(layer.held_per_row().max()))
        if log is not None:
            counts = event_counts(layer.extras[HISTORY])[0]
            ids = layer.values[0, :, :, 0].long()
            for h in range(hkv):
                for j in range(ids.shape[1]):
                    want = sum(step.get((h, int(ids[h, j])), False) for step in log[-window:])
                    assert int(counts[h, j]) == want, (s, h, int(ids[h, j]))
    return held


def test_scissorhands_amortised_drops_and_exact_window_counts():
    """After the prompt is cut to B, the first overflow drops m tokens at once; then m - 1 steps only append.
    Throughout, each token's history count equals its below-uniform events over the last w rows (GQA: group mean)."""
    torch.manual_seed(0)
    t, d, keep = 20, 8, 12
    keys = torch.randn(1, 2, t, d)
    layer = hand_layer(keys)
    method = get_method("scissorhands").create(keep)  # w = 6, r = 3, m = 6
    queries = torch.randn(1, 4, t, d)
    # brute-force record of the prompt rows' events (the last w = 6 rows count)
    log = []
    for row in range(t - 6, t):
        logits = torch.einsum("hd,htd->ht", queries[0, :, row], keys[0].repeat_interleave(2, 0)[:, : row + 1])
        probs = torch.softmax(logits, -1)
        probs = probs.view(2, 2, -1).mean(1)
        log.append({(h, j): bool(probs[h, j] * (row + 1) < 1) for h in range(2) for j in range(row + 1)})
    act(method, [keep], layer, queries, 1.0, prefill_info(t))
    assert int(layer.held_per_row().max()) == keep
    steps = 14
    held = _run_decode_steps(method, layer, keep, steps, torch.randn(steps, 4, d), torch.randn(steps, 2, d), log, 6)
    assert held == [7, 8, 9, 10, 11, 12, 7, 8, 9, 10, 11, 12, 7, 8]
    assert max(held) <= keep


def test_scissorhands_drop_one_evicts_every_step():
    torch.manual_seed(1)
    layer = hand_layer(torch.randn(1, 1, 20, 8))
    method = get_method("scissorhands").create(10, {"drop": 0.01})  # m = 1 (at least one)
    act(method, [10], layer, torch.randn(1, 1, 20, 8), 1.0, prefill_info(20))
    held = _run_decode_steps(method, layer, 10, 5, torch.randn(5, 1, 8), torch.randn(5, 1, 8))
    assert held == [10] * 5


def test_scissorhands_released_mode_keeps_top_decile_events():
    """Released rule: a token counts when it is strictly above its row's 90th-percentile attention; the last
    `position_window` tokens are always kept; the cut is to the fixed budget at every step."""
    t = 30
    layer = hand_layer(torch.eye(t)[None, None])
    queries = torch.zeros(1, 1, t, t)
    # rows 27..29 (lru_window = 3): strengths 10 > 9 > 8; only the two strongest are above the percentile
    for row, (a, b, c) in {27: (3, 7, 11), 28: (5, 3, 11), 29: (3, 9, 11)}.items():
        queries[0, 0, row, [a, b, c]] = torch.tensor([10.0, 9.0, 8.0])
    method = get_method("scissorhands").create(6, {"mode": "released", "lru_window": 3, "position_window": 2})
    act(method, [6], layer, queries, 1.0, prefill_info(t))
    assert held_ids(layer) == [3, 5, 7, 9, 28, 29]  # 11 is well attended but never in the top decile
    counts = dict(zip(held_ids(layer), event_counts(layer.extras[HISTORY])[0, 0].tolist(), strict=True))
    assert counts[3] == 3 and counts[5] == counts[7] == counts[9] == 1
    assert layer.extras[HISTORY].shape[-1] == 1  # 3 bits
    # paper mode on the same rows keeps 11 (it is above uniform in every row)
    paper_layer = hand_layer(torch.eye(t)[None, None])
    act(get_method("scissorhands").create(6), [6], paper_layer, queries, 1.0, prefill_info(t))
    assert 11 in held_ids(paper_layer)
    # decoding in released mode: back to the budget after every token, the last 2 always held
    torch.manual_seed(2)
    keys = torch.randn(4, 1, t)
    held = _run_decode_steps(method, layer, 6, 4, torch.randn(4, 1, t), keys)
    assert held == [6, 6, 6, 6]
    assert {1002, 1003} <= set(held_ids(layer))


def test_scissorhands_released_mode_runs_on_a_model(llama):
    torch.manual_seed(3)
    ids, mask = pad_left([torch.randint(0, 128, (n,)).tolist() for n in (50, 33)])
    cache = make_cache(llama, "scissorhands", 0.5, {"mode": "released", "lru_window": 16})
    with torch.no_grad():
        logits = forward(llama, ids, mask, cache, positions_from_mask(mask))
    assert torch.isfinite(logits).all()
    for layer in cache.core.layers:
        assert layer.held_per_row().tolist() == [[25, 25], [17, 17]]
        assert layer.extras[HISTORY].shape[-1] == 2  # 16 bits


def test_scissorhands_bad_params():
    cls = get_method("scissorhands")
    for params in ({"mode": "x"}, {"history": 0}, {"drop": 0}, {"recent": 2}, {"percentile": 1.0}):
        with pytest.raises(ConfigError):
            cls.create(0.5, params)


# -- Keyformer -------------------------------------------------------------------------------------------------------
def test_gumbel_noise_is_seeded_with_gumbel_statistics():
    g = gumbel_noise(7, 4, 100, (3, 128, 512))
    assert g.shape == (3, 128, 512) and g.dtype == torch.float32
    assert torch.equal(g, gumbel_noise(7, 4, 100, (3, 128, 512)))  # a pure function of (seed, layer, position)
    for other in ((8, 4, 100), (7, 5, 100), (7, 4, 101)):
        assert not torch.equal(g, gumbel_noise(*other, (3, 128, 512)))
    assert abs(g.mean().item() - 0.5772) < 0.02  # Euler-Mascheroni
    assert abs(g.std().item() - math.pi / math.sqrt(6)) < 0.02
    assert torch.isfinite(g).all()


def test_keyformer_temperature_schedule():
    m = get_method("keyformer").create(0.5)
    assert (m.tau_init, m.tau_end, m.max_new_tokens, m.recent_fraction) == (1.0, 2.0, 128, 0.3)
    assert m.temperature(0) == 1.0
    assert m.temperature(1) == pytest.approx(1 + 1 / 128)
    assert m.temperature(64) == pytest.approx(1.5)
    assert m.temperature(128) == pytest.approx(2.0)
    assert m.temperature(1000) == pytest.approx(2.0)  # held at tau_end beyond max_new_tokens
    m2 = get_method("keyformer").create(0.5, {"tau_init": "0.5", "tau_end": "1.5", "max_new_tokens": "10"})
    assert m2.temperature(4) == pytest.approx(0.9)


def test_keyformer_scores_use_gumbel_softmax_with_the_step_temperature():
    """Score increments equal group sums of softmax((logits + g) / tau_t), tau_t = 1 + t (tau_end 3, 2 steps)."""
    torch.manual_seed(4)
    t, d = 150, 8  # two query blocks at the prompt (128 + 22)
    keys = torch.randn(1, 1, t, d)
    layer = hand_layer(keys)
    method = get_method("keyformer").create(1000, {"tau_end": 3.0, "max_new_tokens": 2, "seed": 11})
    queries = torch.randn(1, 2, t, d)
    act(method, [1000], layer, queries, 0.5, prefill_info(t))
    logits = (queries[0] @ keys[0, 0].T) * 0.5 + torch.triu(torch.full((t, t), float("-inf")), 1)  # (H, t, t)
    noise = torch.cat([gumbel_noise(11, 0, 0, (2, 128, 128)), torch.zeros(2, 128, t - 128)], -1)
    noise = torch.cat([noise, gumbel_noise(11, 0, 128, (2, t - 128, t))], 1)
    want = torch.softmax(logits + noise, -1).sum(1).sum(0)  # tau 1 at the prompt; GQA group sum
    torch.testing.assert_close(layer.extras[SCORE][0, 0], want)
    for step in (1, 2):
        append_token(layer, t + step - 1, torch.randn(1, 1, 1, d))
        q = torch.randn(1, 2, 1, d)
        before = layer.extras[SCORE][0, 0].clone()
        assert before[-1] == 0  # the new token's score starts at zero
        act(method, [1000], layer, q, 0.5, decode_info())
        n = layer.num_slots
        logits = (q[0, :, 0] @ layer.keys[0, 0].T) * 0.5  # (H, n)
        g = gumbel_noise(11, 0, n - 1, (2, 1, n))[:, 0]
        want = torch.softmax((logits + g) / (1.0 + step), -1).sum(0)
        torch.testing.assert_close(layer.extras[SCORE][0, 0] - before, want, atol=1e-5, rtol=1e-5)


def test_keyformer_keeps_its_recent_share():
    """Recent = floor(0.3 B) most recent tokens always held; the rest of the budget goes by score."""
    torch.manual_seed(5)
    t, d, keep = 40, 8, 20
    keys = torch.randn(1, 2, t, d)
    keys[0, :, 3] *= 8  # a strong key attracts score
    layer = hand_layer(keys)
    method = get_method("keyformer").create(keep)
    act(method, [keep], layer, torch.randn(1, 4, t, d), 1.0, prefill_info(t))
    for h in range(2):
        kept = held_ids(layer, head=h)
        assert len(kept) == keep and set(range(t - 6, t)) <= set(kept)  # floor(0.3 * 20) = 6
    for s in range(5):
        append_token(layer, t + s, torch.randn(1, 2, 1, d))
        act(method, [keep], layer, torch.randn(1, 4, 1, d), 1.0, decode_info())
        for h in range(2):
            kept = held_ids(layer, head=h)
            assert len(kept) == keep and set(range(t + s - 5, t + s + 1)) <= set(kept)
    # recent_fraction 1: a pure sliding window
    layer = hand_layer(keys)
    act(get_method("keyformer").create(keep, {"recent_fraction": 1.0}), [keep], layer, torch.randn(1, 4, t, d), 1.0,
        prefill_info(t))
    assert held_ids(layer) == list(range(t - keep, t))


def _keyformer_run(llama, seed):
    torch.manual_seed(6)
    ids, mask = pad_left([torch.randint(0, 128, (n,)).tolist() for n in (48, 30)])
    cache = make_cache(llama, "keyformer", 0.5, {"seed": seed})
    outs = []
    pos = positions_from_mask(mask)
    with torch.no_grad():
        logits = forward(llama, ids, mask, cache, pos)[:, -1]
        last = pos[:, -1:]
        for _ in range(4):
            tok = logits.argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(tok)], 1)
            last = last + 1
            logits = forward(llama, tok, mask, cache, last)[:, -1]
            outs.append(logits)
    kept = [layer.values.clone() for layer in cache.core.layers]
    scores = [layer.extras[SCORE].clone() for layer in cache.core.layers]
    return outs, kept, scores


def test_keyformer_is_deterministic_for_a_seed_and_varies_across_seeds(llama):
    a_logits, a_kept, a_scores = _keyformer_run(llama, 0)
    b_logits, b_kept, b_scores = _keyformer_run(llama, 0)
    for x, y in zip(a_logits + a_kept + a_scores, b_logits + b_kept + b_scores, strict=True):
        assert torch.equal(x, y)
    c_logits, c_kept, c_scores = _keyformer_run(llama, 1)
    assert all(not torch.equal(x, y) for x, y in zip(a_scores, c_scores, strict=True))
    assert any(x.shape != y.shape or not torch.equal(x, y) for x, y in zip(a_kept, c_kept, strict=True))


def test_keyformer_bad_params():
    cls = get_method("keyformer")
    for params in ({"recent_fraction": 1.5}, {"tau_init": 0}, {"max_new_tokens": 0}, {"reduce": "x"}):
        with pytest.raises(ConfigError):
            cls.create(0.5, params)
