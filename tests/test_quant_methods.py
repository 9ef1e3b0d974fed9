"""Quantizers (kivi, gear, vidkv) and composed methods (snapkv+kivi, ...): store properties and the model matrix.

Store level: lane decoding equals `QuantizedTensor.dequantize`; the residual holds exactly the newest tokens (KIVI
values: the last R, keys: the last n mod R) and matches `ResidualQuantBuffer` bit for bit; nbytes equals a closed form
and the bytes of every tensor held; eviction on quantized data never changes a kept token's reconstruction.
Model level (tiny random models): a residual longer than the run never quantizes and is exact; 8-bit is close to
full; bytes fall as bits fall; budgets hold for composed methods; no step dequantizes more than attention reads and
nothing is quantized twice; padding never enters a group's statistics; composed-name errors are ConfigErrors.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from conftest import held_tensors
from hypothesis import given, settings
from hypothesis import strategies as st

from memfit.adapters.transformers import forward
from memfit.api import make_cache
from memfit.core.budget import Budget
from memfit.core.cache import KVLayer, StepInfo, tensor_bytes
from memfit.core.method import REGISTRY, Composed, Method, all_methods, build_policy, get_method
from memfit.core.quant import ResidualQuantBuffer, bytes_per_group, quantize
from memfit.core.quantized_store import QuantizedKVLayer, decode_channel_lanes, decode_token_lanes
from memfit.engine import pad_left, positions_from_mask
from memfit.errors import ConfigError

FAST = settings(max_examples=25, deadline=None)
QUANTIZERS = sorted(n for n, c in all_methods().items() if c.family == "quantization")
# tiny models have head_dim 16: groups of 8 channels / tokens; a small residual so quantization starts early
SMALL = {
    "kivi": {"group_size": 8, "residual": 16},
    "gear": {"group_size": 8, "gap": 16},
    "vidkv": {"group_size": 8, "residual": 16},
}
HUGE = {"kivi": {"residual": 1024, "group_size": 8}, "gear": {"gap": 1024, "group_size": 8},
        "vidkv": {"residual": 1024, "group_size": 8}}
# the most precise setting of each quantizer (8-bit everywhere; GEAR's backbone stops at 4 bits)
PRECISE = {
    "kivi": {"bits": 8},
    "gear": {"bits": 4},
    "vidkv": {"anomalous_ratio": 1.0, "anomalous_bits": 8, "value_bits": 8, "stp": 0.0},
}
COMPOSED = ["snapkv+kivi", "h2o+kivi", "streaming+kivi", "h2o+gear", "streaming+vidkv"]


def qparams(spec: str, base: dict[str, dict], extra: dict[str, dict] | None = None) -> dict:
    q = spec.split("+")[-1]
    params = {**base[q], **((extra or {}).get(q, {}))}
    return {f"{q}.{k}": v for k, v in params.items()}


def run(model, spec, budget, params, prompt_lens=(50,), steps=6, seed=0, pad_id=0):
    """Prefill + teacher-forced decode; returns (list of (B, V) logits, cache, per-step snapshots)."""
    torch.manual_seed(seed)
    rows = [torch.randint(1, 128, (n,)).tolist() for n in prompt_lens]
    feed = torch.randint(1, 128, (len(rows), steps))
    ids, mask = pad_left(rows, pad_id=pad_id)
    cache = make_cache(model, spec, budget, params)
    pos = positions_from_mask(mask)
    snaps = []
    with torch.no_grad():
        logits = [forward(model, ids, mask, cache, pos)[:, -1]]
        snaps.append([(layer.num_slots, layer.held_per_row().clone()) for layer in cache.core.layers])
        last = pos[:, -1:]
        for i in range(steps):
            mask = torch.cat([mask, torch.ones_like(feed[:, :1])], dim=1)
            last = last + 1
            logits.append(forward(model, feed[:, i : i + 1], mask, cache, last)[:, -1])
            snaps.append([(layer.num_slots, layer.held_per_row().clone()) for layer in cache.core.layers])
    return logits, cache, snaps


# ------------------------------------------------------------------------------------------------ store level


@FAST
@given(bits=st.sampled_from([1, 1.58, 2, 4, 8]), G=st.sampled_from([4, 5, 8, 32]), ng=st.integers(1, 4),
       seed=st.integers(0, 10_000))
def test_lane_decoding_equals_dequantize(bits, G, ng, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, ng * G, 2 * G, generator=g)
    bh = torch.randint(0, 6, (40,), generator=g)
    for axis, decode in (("token", decode_channel_lanes), ("channel", decode_token_lanes)):
        qt = quantize(x, bits, axis, G)
        lanes = torch.randint(0, ng * G, (40,), generator=g)
        ref = qt.dequantize(torch.float32).reshape(6, ng * G, 2 * G)[bh, lanes]
        assert torch.equal(decode(qt, bh, lanes), ref)


def _codecs():
    from memfit.core.quantized_store import ChannelCodec, TokenCodec
    from memfit.methods.gear import GearCodec
    from memfit.methods.vidkv import VidKVKeyCodec, VidKVValueCodec

    ranks = {"prefill": 4, "decode": 2}
    return [ChannelCodec(2, 8), TokenCodec(4, 8), GearCodec("key", 2, 8, ranks, 3, 0.05),
            GearCodec("value", 2, 8, ranks, 3, 0.1), GearCodec("key", 4, None, ranks, 3, 0.05),
            VidKVKeyCodec(8, 0.5), VidKVKeyCodec(8, 0.0), VidKVKeyCodec(8, 1.0, 4), VidKVValueCodec(8, 1.58, 0.3)]


@pytest.mark.parametrize("codec", _codecs(), ids=lambda c: f"{type(c).__name__}")
def test_whole_segment_decoding_equals_lane_decoding(codec):
    """The vectorized path (every lane live) and the per-lane path (after eviction) reconstruct the same values,
    and padding (invalid tokens) does not change the valid tokens' reconstruction beyond their own group."""
    from memfit.core.quantized_store import FlushContext, Segment

    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 16)
    valid = torch.ones(2, 3, 64, dtype=torch.bool)
    valid[0, :, :5] = False
    ctx = FlushContext("prefill", lambda: torch.rand(2, 3, 64))
    for v in (None, valid):
        segs, local = codec.encode(x, v, ctx)
        for seg in segs:
            torch.testing.assert_close(seg.decode_all(2, 3), Segment.decode_all(seg, 2, 3), atol=1e-5, rtol=1e-5)
        assert sum(seg.lanes for seg in segs) == 64 and (local is None or sorted(local[0, 0].tolist()) == list(
            range(64)))


def kivi_layer(bits=2, G=4, R=8) -> QuantizedKVLayer:
    layer = get_method("kivi").create(None, {"bits": bits, "group_size": G, "residual": R}).make_layer(0)
    assert isinstance(layer, QuantizedKVLayer)
    return layer


def feed(layer: KVLayer, x: torch.Tensor, prefill: bool) -> None:
    layer.append(x, x * 0.5 + 1.0, None)
    layer.finalize_step(StepInfo(0, 1, x.shape[2], prefill, None))


@FAST
@given(chunks=st.lists(st.integers(1, 20), min_size=1, max_size=8), bits=st.sampled_from([2, 4, 8]),
       G=st.sampled_from([2, 4]), mult=st.integers(1, 3), seed=st.integers(0, 1000))
def test_residual_holds_exactly_the_newest_tokens(chunks, bits, G, mult, seed):
    """KIVI store: values keep exactly the last min(R, n) tokens and keys the last n mod R, bit for bit; the whole
    store reads back exactly what `ResidualQuantBuffer` (the reference quantizer) holds."""
    R = G * mult
    layer = kivi_layer(bits, G, R)
    x = torch.randn(1, 2, sum(chunks), 8, generator=torch.Generator().manual_seed(seed)).half()
    ref_k, ref_v = ResidualQuantBuffer(bits, "token", G, R), ResidualQuantBuffer(bits, "channel", G, R)
    n = 0
    for i, c in enumerate(chunks):
        part = x[:, :, n : n + c]
        feed(layer, part, prefill=i == 0)
        ref_k.append(part)
        ref_v.append(part * 0.5 + 1.0)
        n += c
        assert layer.v.residual_len == min(R, n) and layer.k.residual_len == n % R
        assert torch.equal(layer.v.residual, (x * 0.5 + 1.0)[:, :, n - min(R, n) : n])
        assert torch.equal(layer.k.residual, x[:, :, n - n % R : n])
        assert torch.equal(layer.keys, ref_k.dequantize_all())
        assert torch.equal(layer.values, ref_v.dequantize_all())
        assert layer.nbytes() == ref_k.nbytes() + ref_v.nbytes()


@FAST
@given(chunks=st.lists(st.integers(1, 20), min_size=1, max_size=8), G=st.sampled_from([2, 4]),
       mult=st.integers(1, 3), seed=st.integers(0, 1000))
def test_sliding_key_residual_keeps_the_newest_keys(chunks, G, mult, seed):
    """key_residual=sliding: the R newest keys (and up to G - 1 more) stay bit for bit; older ones are quantized
    in whole groups of G; values are unchanged (sliding R); bytes are every tensor held."""
    R = G * mult
    layer = get_method("kivi").create(None, {"bits": 2, "group_size": G, "residual": R,
                                              "key_residual": "sliding"}).make_layer(0)
    x = torch.randn(1, 2, sum(chunks), 8, generator=torch.Generator().manual_seed(seed)).half()
    n = 0
    for i, c in enumerate(chunks):
        feed(layer, x[:, :, n : n + c], prefill=i == 0)
        n += c
        expect = n if n < R else R + (n - R) % G
        assert layer.k.residual_len == expect and layer.v.residual_len == min(R, n)
        assert torch.equal(layer.k.residual, x[:, :, n - expect : n])
        keys = layer.keys
        assert keys.shape[2] == n
        assert torch.equal(keys[:, :, n - expect :].to(x.dtype), x[:, :, n - expect : n])
    block = kivi_layer(2, G, R)
    feed(block, x, prefill=True)
    assert block.k.residual_len == n % R


def kivi_bytes(B, H, T, d, bits, G, R, elem) -> int:
    """Closed form: keys quantize floor(T/R)*R tokens per channel in groups of G tokens, values all but the last R
    per token in groups of G channels; fp16 scale + zero per group; the rest full precision."""
    tk = T // R * R
    tv = max(0, T - R)
    keys = B * H * d * (tk // G) * (bytes_per_group(bits, G) + 4) + B * H * (T - tk) * d * elem
    values = B * H * tv * (d // G) * (bytes_per_group(bits, G) + 4) + B * H * (T - tv) * d * elem
    return keys + values


@FAST
@given(B=st.integers(1, 2), H=st.integers(1, 3), d=st.sampled_from([8, 16]), T=st.integers(1, 70),
       bits=st.sampled_from([1, 2, 4, 8]), G=st.sampled_from([4, 8]), mult=st.integers(1, 4),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), chunk=st.integers(1, 70))
def test_kivi_nbytes_closed_form(B, H, d, T, bits, G, mult, dtype, chunk):
    layer = kivi_layer(bits, G, G * mult)
    x = torch.randn(B, H, T, d).to(dtype)
    for i, s in enumerate(range(0, T, chunk)):
        feed(layer, x[:, :, s : s + chunk], prefill=i == 0)
    elem = torch.empty((), dtype=dtype).element_size()
    assert layer.nbytes() == kivi_bytes(B, H, T, d, bits, G, G * mult, elem)
    assert layer.full_nbytes() == 2 * B * H * T * d * elem


def test_reconstruction_error_falls_and_bytes_fall_as_bits_rise():
    x = torch.randn(1, 2, 96, 16)
    errs, sizes = [], []
    for bits in (1, 2, 4, 8):
        layer = kivi_layer(bits, 8, 16)
        feed(layer, x, prefill=True)
        errs.append(float((layer.keys - x).pow(2).mean() + (layer.values - (x * 0.5 + 1)).pow(2).mean()))
        sizes.append(layer.nbytes())
    assert errs == sorted(errs, reverse=True) and sizes == sorted(sizes)


@FAST
@given(seed=st.integers(0, 10_000), n_keep=st.lists(st.integers(0, 60), min_size=1, max_size=4))
def test_eviction_never_changes_a_kept_token(seed, n_keep):
    """keep() on quantized data (per-channel keys included) gathers reconstructions exactly: no re-quantization
    (unless holes pile up, which is counted), and freed groups really leave."""
    g = torch.Generator().manual_seed(seed)
    layer = kivi_layer(2, 4, 8)
    feed(layer, torch.randn(2, 2, 61, 8, generator=g), prefill=True)
    for k in n_keep:
        t = layer.num_slots
        k = min(k, t)
        idx = torch.stack([torch.randperm(t, generator=g)[:k].sort().values for _ in range(4)]).reshape(2, 2, k)
        before_k, before_v = layer.keys.gather(2, idx[..., None].expand(2, 2, k, 8)), layer.values.gather(
            2, idx[..., None].expand(2, 2, k, 8))
        requant = layer.requantized_tokens
        layer.keep(idx)
        exact = layer.requantized_tokens == requant
        if exact:
            assert torch.equal(layer.keys, before_k) and torch.equal(layer.values, before_v)
        else:  # a repack re-quantized the live tokens: close, and counted
            torch.testing.assert_close(layer.keys, before_k, atol=1.5, rtol=0)
        assert layer.k.physical_lanes <= layer.k.tq + max(8, layer.k.tq // 4) + 4
        feed(layer, torch.randn(2, 2, 3, 8, generator=g), prefill=False)


def test_streaming_eviction_frees_whole_groups_without_requantizing():
    layer = kivi_layer(2, 4, 8)
    feed(layer, torch.randn(1, 2, 64, 8), prefill=True)
    codes = sum(s.nbytes() for s in layer.k.segments)
    for _ in range(20):  # oldest-first eviction (StreamingLLM without sinks), one token per step
        t = layer.num_slots
        layer.keep(torch.arange(1, t).expand(1, 2, t - 1))
        feed(layer, torch.randn(1, 2, 1, 8), prefill=False)
    assert layer.requantized_tokens == 0
    assert layer.k.physical_lanes - layer.k.tq < 4  # holes never reach a whole group
    # 20 evicted, 20 added (16 quantized + 4 in the residual): five groups freed, four new ones
    assert sum(s.nbytes() for s in layer.k.segments) == codes * 15 // 16


# ------------------------------------------------------------------------------------------------ model level


@pytest.mark.parametrize("spec", QUANTIZERS + COMPOSED)
def test_residual_longer_than_the_run_never_quantizes_and_is_exact(tiny_model, spec):
    budget = 0.5 if "+" in spec else None
    ref_spec = spec.split("+")[0] if "+" in spec else "full"
    ref, _, _ = run(tiny_model, ref_spec, budget, None, (50, 33))
    out, cache, _ = run(tiny_model, spec, budget, qparams(spec, HUGE), (50, 33))
    assert all(layer.quantized_tokens == 0 and layer.dequantized_tokens == 0 for layer in cache.core.layers)
    for o, r in zip(out, ref, strict=True):
        assert torch.equal(o, r)


@pytest.mark.parametrize("spec", QUANTIZERS + ["snapkv+kivi", "h2o+kivi", "streaming+kivi"])
def test_high_precision_is_close_to_full(tiny_model, spec):
    """8-bit (GEAR: 4-bit backbone + low rank) keeps logits within 0.02 of the uncompressed run; composed methods
    are compared with their eviction method alone. Why 0.02: an 8-bit group step is range/255, so K/V move by
    < 0.2 % of their range; observed max logit error ~1e-3 (8-bit) and ~1e-2 (GEAR-4), against logits of std ~0.2
    on these random models; 2-bit KIVI is ~3e-2 and fails. (Argmax is not checked: random models have near-ties.)"""
    budget = 0.5 if "+" in spec else None
    ref_spec = spec.split("+")[0] if "+" in spec else "full"
    ref, _, _ = run(tiny_model, ref_spec, budget, None, (50,), steps=20)
    out, cache, _ = run(tiny_model, spec, budget, qparams(spec, SMALL, PRECISE), (50,), steps=20)
    assert all(layer.quantized_tokens > 0 for layer in cache.core.layers)
    for o, r in zip(out, ref, strict=True):
        torch.testing.assert_close(o, r, atol=0.02, rtol=0)


@pytest.mark.parametrize(("spec", "settings_"), [
    ("kivi", [{"bits": 8}, {"bits": 4}, {"bits": 2}, {"bits": 1}]),
    ("gear", [{"bits": 4}, {"bits": 2}, {"bits": 2, "prefill_rank": 0, "prefill_rank_v": 0, "rank": 0, "rank_v": 0,
                                          "outlier_ratio": 0.0}]),
    ("vidkv", [{"value_bits": 8, "anomalous_bits": 8}, {"value_bits": 4, "anomalous_bits": 4}, {"value_bits": 2},
               {"value_bits": 1.58, "anomalous_ratio": 0.25}]),
])
def test_bytes_fall_as_bits_fall(llama, spec, settings_):
    sizes = []
    for extra in settings_:
        _, cache, _ = run(llama, spec, None, qparams(spec, SMALL, {spec: extra}), (80,), steps=2)
        sizes.append(cache.nbytes())
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)
    assert sizes[0] < cache.full_nbytes()


@pytest.mark.parametrize("spec", QUANTIZERS + COMPOSED)
def test_nbytes_is_every_tensor_held(llama, spec):
    budget = 0.5 if "+" in spec else None
    _, cache, _ = run(llama, spec, budget, qparams(spec, SMALL), (60, 47), steps=20)
    total = 0
    for layer in cache.core.layers:
        tensors = held_tensors(layer)
        storages = {t.untyped_storage().data_ptr() for t in tensors.values() if t.numel()}
        assert len(storages) == sum(1 for t in tensors.values() if t.numel())  # no two tensors share storage
        for t in tensors.values():  # each owns exactly its storage: counted bytes are held bytes
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
        assert layer.nbytes() == sum(tensor_bytes(t) for t in tensors.values())
        total += layer.nbytes()
    assert cache.nbytes() == total < cache.full_nbytes()


@pytest.mark.parametrize("spec", COMPOSED + ["snapkv+gear", "h2o+vidkv"])
@pytest.mark.parametrize("budget", [0.25, 24])
def test_budget_never_exceeded_by_composed_methods(llama, spec, budget):
    lens = (64, 41, 20)
    _, cache, snaps = run(llama, spec, budget, qparams(spec, SMALL), lens, steps=18)
    prefill_only = get_method(spec.split("+")[0]).acts == "prefill"
    b = Budget.parse(budget)
    assert cache.core.keep_rows.tolist() == [b.resolve(n) for n in lens]
    for step, snap in enumerate(snaps):
        for layer_idx, (slots, held) in enumerate(snap):
            keep, n = cache.core.layer_keep(layer_idx), torch.tensor(lens)
            # prefill-only evictors let the cache grow by one token per step; the others hold at most the budget
            limits = torch.minimum(keep, n) + step if prefill_only else torch.minimum(keep, n + step)
            assert slots <= int(limits.max()), (step, layer_idx, slots)
            assert bool((held <= limits[:, None]).all()), (step, layer_idx, held, limits)
    assert any(layer.quantized_tokens for layer in cache.core.layers)


EVICTORS = sorted(n for n, c in all_methods().items() if c.family == "eviction")


@pytest.mark.parametrize("evictor", EVICTORS)
def test_every_eviction_method_composes_with_kivi(llama, evictor):
    """Smoke + budget check for every registered eviction method in front of a quantized store."""
    lens = (64, 41)
    _, cache, snaps = run(llama, f"{evictor}+kivi", 0.3, qparams("kivi", SMALL), lens, steps=6)
    grow_per_step = get_method(evictor).acts == "prefill"
    for step, snap in enumerate(snaps):
        for layer_idx, (_, held) in enumerate(snap):
            keep, n = cache.core.layer_keep(layer_idx), torch.tensor(lens)
            limits = torch.minimum(keep, n) + step if grow_per_step else torch.minimum(keep, n + step)
            assert bool((held <= limits[:, None]).all()), (step, layer_idx, held, limits)
    assert any(layer.quantized_tokens for layer in cache.core.layers)


@pytest.mark.parametrize("spec", QUANTIZERS + COMPOSED)
def test_no_step_dequantizes_more_than_attention_reads(llama, spec):
    """Every attend dequantizes exactly the quantized slots it reads (<= the slots attention reads), the policy's
    `layer.keys` costs nothing more, and without eviction every token is quantized exactly once (never again)."""
    budget = 0.5 if "+" in spec else None
    cache = make_cache(llama, spec, budget, qparams(spec, SMALL))
    log: list[tuple[int, int, int]] = []

    def spy(layer):
        attend = layer.attend

        def wrapped(queries, scaling):
            quantized_slots = int(layer.k.q_rows().sum()) + int(layer.v.q_rows().sum()) if layer.k.tq or \
                layer.v.tq else 0
            out = attend(queries, scaling)
            b, h = layer.k.residual.shape[:2]
            log.append((layer.step_dequantized, quantized_slots, 2 * b * h * layer.num_slots))
            return out

        layer.attend = wrapped

    for layer in cache.core.layers:
        spy(layer)
    torch.manual_seed(0)
    ids, mask = pad_left([torch.randint(1, 128, (n,)).tolist() for n in (70, 52)])
    from memfit.engine import generate

    with torch.no_grad():
        generate(llama, ids, mask, cache, max_new_tokens=24)
    assert log and any(d for d, _, _ in log)
    for dequantized, quantized_slots, read in log:
        assert dequantized == quantized_slots <= read
    for layer in cache.core.layers:
        assert layer.on_demand_dequantized == 0
        if "+" not in spec:  # nothing evicted: each quantized token was quantized once, nothing re-quantized
            assert layer.requantized_tokens == 0
            b, h = layer.k.residual.shape[:2]
            assert layer.k.quantized == b * h * layer.k.tq and layer.v.quantized == b * h * layer.v.tq
            assert layer.k.tq + layer.k.residual_len == layer.num_slots == layer.seen


@pytest.mark.parametrize("spec", QUANTIZERS + ["snapkv+kivi", "h2o+kivi"])
def test_padding_never_enters_group_statistics(llama, spec):
    """The same left-padded batch with different padding token ids gives the same logits for every real row."""
    budget = 0.5 if "+" in spec else None
    a, cache, _ = run(llama, spec, budget, qparams(spec, SMALL), (60, 37), steps=8, pad_id=0)
    b, _, _ = run(llama, spec, budget, qparams(spec, SMALL), (60, 37), steps=8, pad_id=77)
    assert any(layer.quantized_tokens for layer in cache.core.layers)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spec", QUANTIZERS + ["h2o+kivi"])
def test_equal_length_rows_match_running_alone(llama, spec):
    budget = 0.5 if "+" in spec else None
    torch.manual_seed(3)
    rows = [torch.randint(1, 128, (40,)).tolist() for _ in range(2)]
    ids, mask = pad_left(rows)
    with torch.no_grad():
        both = forward(llama, ids, mask, make_cache(llama, spec, budget, qparams(spec, SMALL)))[:, -1]
        for r in range(2):
            alone = forward(llama, ids[r : r + 1], mask[r : r + 1], make_cache(llama, spec, budget,
                            qparams(spec, SMALL)))[:, -1]
            torch.testing.assert_close(both[r : r + 1], alone, atol=1e-5, rtol=1e-5)


def test_chunked_prefill_with_a_quantizer(llama):
    from memfit.engine import generate

    ids, mask = pad_left([torch.randint(1, 128, (n,)).tolist() for n in (90, 70)])
    with torch.no_grad():
        one = generate(llama, ids, mask, make_cache(llama, "snapkv+kivi", 0.5, qparams("kivi", SMALL)), 6)
        chunked = generate(llama, ids, mask, make_cache(llama, "snapkv+kivi", 0.5, qparams("kivi", SMALL)), 6,
                           prefill_chunk=16)
    assert one.tokens and chunked.tokens  # runs; chunks quantize as they go, SnapKV then evicts quantized data


@pytest.mark.parametrize("spec", ["kivi", "snapkv+kivi", "h2o+gear"])
def test_row_blocked_reads_equal_one_read(llama, spec, monkeypatch):
    """A step over more rows than `READ_BLOCK_BYTES` covers attends row block by row block (bounded transient):
    the same logits and tokens as one read of every row."""
    import memfit.core.quantized_store as qs
    from memfit.engine import generate

    torch.manual_seed(5)
    ids, mask = pad_left([torch.randint(1, 128, (n,)).tolist() for n in (90, 70, 84)])
    budget = 0.5 if "+" in spec else None
    params = qparams(spec, SMALL)
    with torch.no_grad():
        one = generate(llama, ids, mask, make_cache(llama, spec, budget, params), 6, prefill_chunk=16)
        monkeypatch.setattr(qs, "READ_BLOCK_BYTES", 1)  # one row per block
        blocked = generate(llama, ids, mask, make_cache(llama, spec, budget, params), 6, prefill_chunk=16)
    assert blocked.tokens == one.tokens
    torch.testing.assert_close(blocked.first_logits, one.first_logits, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ composition


def test_composed_policy_shape():
    policy, factory = build_policy("snapkv+kivi", 0.25, {"kivi.bits": "4", "window": "16"})
    assert isinstance(policy, Composed) and policy.name == "snapkv+kivi" and policy.budget == Budget(fraction=0.25)
    assert policy.evictor.window == 16 and policy.quantizer.bits == 4
    assert isinstance(factory(3), QuantizedKVLayer) and factory(3).index == 3
    assert policy.params()["kivi.bits"] == 4 and policy.params()["snapkv.window"] == 16
    plain, plain_factory = build_policy("kivi", None, {"bits": 2})
    assert plain.name == "kivi" and isinstance(plain_factory(0), QuantizedKVLayer)
    dense, dense_factory = build_policy("snapkv", 0.5, {"snapkv.window": 8})
    assert dense.window == 8 and type(dense_factory(0)) is KVLayer


@dataclass
class _Window(Method):  # a throwaway quantizer sharing the parameter name "window" with snapkv
    name = "testq"
    family = "quantization"
    window: int = 1


@pytest.mark.parametrize(("spec", "params", "match"), [
    ("kivi+gear", {}, "2 quantizers"),
    ("snapkv+h2o", {}, "no quantizer"),
    ("kivi+snapkv", {}, "must come last"),
    ("snapkv+h2o+kivi", {}, "only one eviction"),
    ("snapkv+nope", {}, "unknown method 'nope'"),
    ("snapkv+", {}, "empty component"),
    ("snapkv+kivi", {"gear.bits": 2}, "not part of method"),
    ("snapkv+kivi", {"bogus": 1}, "unknown parameter 'bogus'"),
    ("snapkv+kivi", {"kivi.bits": 3}, "kivi.bits must be one of"),
    ("snapkv+testq", {"window": 4}, "ambiguous"),
])
def test_composed_name_errors(monkeypatch, spec, params, match):
    monkeypatch.setitem(REGISTRY, "testq", _Window)
    with pytest.raises(ConfigError, match=match):
        build_policy(spec, 0.5, params)


def test_qualified_params_resolve_an_ambiguity(monkeypatch):
    monkeypatch.setitem(REGISTRY, "testq", _Window)
    policy, _ = build_policy("snapkv+testq", 0.5, {"snapkv.window": 4, "testq.window": 9})
    assert policy.evictor.window == 4 and policy.quantizer.window == 9


def test_cli_understands_composed_names(monkeypatch, capsys):
    import sys

    from memfit.cli import main

    monkeypatch.setattr(sys, "argv", ["memfit", "run", "--method", "kivi+gear", "--prompt", "hi"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code != 0 and err.startswith("error: ") and "quantizers" in err
    monkeypatch.setattr(sys, "argv", ["memfit", "methods"])
    main()
    out = capsys.readouterr().out
    assert "quantization" in out and "<eviction>+<quantizer>" in out


@pytest.mark.model
def test_default_model_kivi_fidelity(default_model):
    """SmolLM2-135M on 512 tokens of PG-19 prose + 16 teacher-forced tokens: KIVI-4 stays close to the full cache
    (top-1 agreement >= 80 %, KL < 0.05), KIVI-2 trades fidelity for bytes (KL above KIVI-4's, fewer bytes).
    Measured here: KIVI-4 100 % / KL 0.003, KIVI-2 69 % / KL 0.15; benchmarks/quant_fidelity.py has the 2K-token
    figures (94.8 % and 71.9 % over 192 positions)."""
    from pathlib import Path

    import torch.nn.functional as F

    model, tok = default_model
    books = sorted((Path(__file__).resolve().parents[2] / "shared" / "data" / "pg19").glob("*.txt"))
    if not books:
        pytest.skip("PG-19 sample not available")
    text = books[0].read_text(encoding="utf-8", errors="replace")
    ids = tok(text[len(text) // 3 :][:6000], add_special_tokens=False, return_tensors="pt")["input_ids"][:, :528]
    prompt, cont = ids[:, :512], ids[:, 512:]

    def logits(spec, params):
        cache = make_cache(model, spec, None, params)
        mask = torch.ones_like(prompt)
        out = [forward(model, prompt, mask, cache, logits_to_keep=1)[:, -1]]
        for i in range(cont.shape[1] - 1):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            out.append(forward(model, cont[:, i : i + 1], mask, cache, logits_to_keep=1)[:, -1])
        return torch.cat(out).float(), cache.nbytes()

    with torch.no_grad():
        full, full_bytes = logits("full", None)
        stats = {}
        for bits in (4, 2):
            q, held = logits("kivi", {"bits": bits})
            kl = float(F.kl_div(q.log_softmax(-1), full.log_softmax(-1), log_target=True, reduction="batchmean"))
            stats[bits] = ((q.argmax(-1) == full.argmax(-1)).float().mean().item(), kl, held)
    assert stats[4][0] >= 0.8 and stats[4][1] < 0.05, stats
    assert stats[2][1] > stats[4][1] and stats[2][2] < stats[4][2] < full_bytes / 3, stats


def _fake_quant(x: torch.Tensor, bits: int, G: int, along_tokens: bool) -> torch.Tensor:
    """Independent KIVI fake quantization (B, H, T, d): min-max groups of G tokens per channel (keys) or of G
    channels per token (values), fp16 scale and minimum, round-to-nearest codes — written from the paper, not from
    memfit.core.quant."""
    B, H, T, d = x.shape
    v = x.float().reshape(B, H, T // G, G, d) if along_tokens else x.float().reshape(B, H, T, d // G, G)
    dim = 3 if along_tokens else 4
    lo = v.amin(dim, keepdim=True).half().float()
    scale = ((v.amax(dim, keepdim=True) - v.amin(dim, keepdim=True)) / (2**bits - 1)).half().float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = ((v - lo) / scale).round().clamp(0, 2**bits - 1)
    return (q * scale + lo).reshape(B, H, T, d).to(x.dtype)


def _next_logits_reference(model, ids, nxt, key_q: int, val_q: int, bits: int, G: int, values_per_token: bool):
    """Next-token logits after `ids` from a plain transformers DynamicCache whose first `key_q` keys and `val_q`
    values were fake-quantized (keys per channel; values per token or per channel)."""
    from transformers import DynamicCache

    from memfit.adapters.transformers import _cache_kwarg

    kw = _cache_kwarg(model)  # `cache` on newer transformers, `past_key_values` before
    cache = DynamicCache(config=model.config)
    model(input_ids=ids, use_cache=True, **{kw: cache})
    for layer in cache.layers:
        k, v = layer.keys, layer.values
        layer.keys = torch.cat([_fake_quant(k[:, :, :key_q], bits, G, True), k[:, :, key_q:]], dim=2)
        layer.values = torch.cat([_fake_quant(v[:, :, :val_q], bits, G, not values_per_token), v[:, :, val_q:]], dim=2)
    return model(input_ids=nxt, use_cache=True, **{kw: cache}).logits[:, -1]


def _next_logits_memfit(model, method: str, params: dict, ids, nxt, after_prefill=None):
    """(cache, next-token logits) with memfit's cache for `method` after prefilling `ids` (batch 1);
    `after_prefill(cache)` may check the cache between the prompt and the next token."""
    cache = make_cache(model, method, None, params)
    mask = torch.ones_like(ids)
    forward(model, ids, mask, cache, positions_from_mask(mask))
    if after_prefill is not None:
        after_prefill(cache)
    t = ids.shape[1]
    return cache, forward(model, nxt, torch.ones(1, t + 1, dtype=mask.dtype), cache, torch.tensor([[t]]))[:, -1]


def _prompt(T: int, seed: int):
    torch.manual_seed(seed)
    return torch.randint(0, 128, (1, T)), torch.randint(0, 128, (1, 1))


@pytest.mark.parametrize("key_residual", ["block", "sliding"])
@pytest.mark.parametrize("T", [70, 64])
def test_kivi_matches_an_independent_fake_quantized_cache(llama, key_residual, T):
    """The next-token logits with memfit's packed KIVI cache equal those of a plain DynamicCache whose old keys and
    values were fake-quantized with the paper's grouping: same tokens quantized, same values, same attention."""
    bits, G, R = 2, 8, 16
    ids, nxt = _prompt(T, 7)
    key_q = T - T % R if key_residual == "block" else max(0, T - R) // G * G
    val_q = max(0, T - R)
    with torch.no_grad():
        ref = _next_logits_reference(llama, ids, nxt, key_q, val_q, bits, G, values_per_token=True)
        def quantized_as_the_reference(cache) -> None:
            layer0 = cache.core.layers[0]
            assert (layer0.k.residual_len, layer0.v.residual_len) == (T - key_q, T - val_q)

        _, out = _next_logits_memfit(
            llama, "kivi", {"bits": bits, "group_size": G, "residual": R, "key_residual": key_residual}, ids, nxt,
            after_prefill=quantized_as_the_reference,
        )
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("T", [70, 64])
def test_gear_without_error_terms_is_its_quantized_backbone(llama, T):
    """GEAR with ranks 0 and no outliers must reduce to its KIVI-style backbone (G = 8 here): the same independent
    fake-quantized DynamicCache, prompt tokens quantized in whole groups at prefill (gap 16 <= T)."""
    bits, G = 2, 8
    ids, nxt = _prompt(T, 8)
    nq = T - T % G
    params = {"bits": bits, "group_size": G, "gap": 16, "prefill_rank": 0, "prefill_rank_v": 0, "rank": 0,
              "rank_v": 0, "outlier_ratio": 0.0}
    with torch.no_grad():
        ref = _next_logits_reference(llama, ids, nxt, nq, nq, bits, G, values_per_token=True)
        def whole_groups_quantized(cache) -> None:
            assert cache.core.layers[0].k.residual_len == T - nq

        _, out = _next_logits_memfit(llama, "gear", params, ids, nxt, after_prefill=whole_groups_quantized)
        # and the error terms (rank 2 low-rank + 10 % outliers) bring the logits closer to the full cache's
        full = llama(input_ids=torch.cat([ids, nxt], 1)).logits[:, -1]
        _, out_rich = _next_logits_memfit(
            llama, "gear", {**params, "prefill_rank": 2, "prefill_rank_v": 2, "outlier_ratio": 0.1}, ids, nxt
        )
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert (out_rich - full).abs().mean() < (out - full).abs().mean()


@pytest.mark.parametrize("T", [70, 64])
def test_vidkv_at_two_bits_everywhere_is_per_channel_min_max(llama, T):
    """VidKV with every key channel 'anomalous' at 2 bits, 2-bit values and no salient tokens reduces to 2-bit
    per-channel min-max groups of G tokens for keys and values alike (its value path is per channel, unlike
    KIVI's): the same as an independently fake-quantized DynamicCache."""
    bits, G = 2, 8
    ids, nxt = _prompt(T, 9)
    nq = T - T % G
    params = {"anomalous_ratio": 1.0, "anomalous_bits": bits, "value_bits": bits, "stp": 0.0, "group_size": G,
              "residual": 16}
    with torch.no_grad():
        ref = _next_logits_reference(llama, ids, nxt, nq, nq, bits, G, values_per_token=False)
        _, out = _next_logits_memfit(llama, "vidkv", params, ids, nxt)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
