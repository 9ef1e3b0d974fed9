"""Issue #11: `memfit serve` must not hold tensors beyond its running requests' stores (and the weights).

On an H200 the full-cache server ran out of memory with ~78 GB of live tensors that were neither the stores it
counted nor the weights: the stores of requests that had already finished. Each dropped cache sat in a reference
cycle (MemfitCache <-> its transformers layer views, CompressedCache <-> its layer views' closure, BatchView <->
its layer stubs), so only Python's cyclic collector could free it, and its full passes are rare on a large heap.
These tests run with the cyclic collector off, so whatever they find alive is what reference counting alone keeps.
"""

from __future__ import annotations

import contextlib
import gc
import weakref

import pytest
import torch
from conftest import tiny_llama

from memfit.adapters.transformers import MemfitCache, forward
from memfit.api import make_cache
from memfit.core.batch_view import BatchView
from memfit.core.budget import Budget
from memfit.serve.scheduler import Request, Scheduler

# a dense store (padded shared SDPA), a per-step eviction, and a quantized store with its own attention call
SPECS = [("full", None, {}), ("h2o", "0.5", {}), ("snapkv+kivi", "0.5", {"kivi.residual": 16, "kivi.group_size": 16})]


@contextlib.contextmanager
def no_cyclic_gc():
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def live_tensor_bytes() -> int:
    """Bytes of the distinct storages behind every tensor the interpreter tracks (uncollected garbage included)."""
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor):  # (isinstance would touch deprecated module attributes)
            st = obj.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def run_round(scheduler: Scheduler, seed: int) -> tuple[list[Request], int, list[weakref.ref]]:
    """Submit one request per spec at once and tick until all finish; returns them, the most bytes their stores
    held together, and weak references to every cache they used."""
    gen = torch.Generator().manual_seed(seed)
    reqs = [Request(torch.randint(0, 128, (40 + 9 * i,), generator=gen).tolist(), 12, m, Budget.parse(b), p,
                    sink=lambda e: None) for i, (m, b, p) in enumerate(SPECS)]
    for req in reqs:
        scheduler.submit(req)
    caches: dict[int, weakref.ref] = {}
    peak = 0
    with torch.inference_mode():
        for _ in range(500):
            scheduler.tick()
            for r in scheduler.running:
                if r.cache is not None:
                    caches.setdefault(id(r.cache), weakref.ref(r.cache))
                    caches.setdefault(id(r.cache.core), weakref.ref(r.cache.core))
            peak = max(peak, sum(r.cache.nbytes() for r in scheduler.running if r.cache is not None))
            if not scheduler.running and not scheduler.waiting:
                break
    assert all(r.finished in ("length", "stop") for r in reqs)
    return reqs, peak, list(caches.values())


def test_finished_requests_free_their_stores_at_once():
    """After every request finished, the scheduler's process holds no more tensor bytes than before they came
    (measured as the GPU run would see it: with no cyclic gc pass in between), and no cache they used is alive."""
    scheduler = Scheduler(tiny_llama(), kv_memory=1 << 30, prefill_chunk=16)
    run_round(scheduler, seed=0)  # warm-up: byte predictor calibration, RoPE caches, ...
    with no_cyclic_gc():
        before = live_tensor_bytes()
        reqs, peak, caches = run_round(scheduler, seed=1)
        assert scheduler.stats["decode_batched_rows_total"] > 0  # the batched (BatchView) path ran
        left = live_tensor_bytes() - before
        alive = [r() for r in caches if r() is not None]
        assert peak > 10_000
        assert left <= 0.01 * peak, f"{left} tensor bytes outlive the finished requests (their stores held {peak})"
        assert not alive, f"{len(alive)} caches of finished requests are still alive: {alive}"


def test_a_preempted_or_cancelled_request_frees_its_store_at_once():
    """Preemption and cancellation drop a store mid-generation: its bytes return in the same tick."""
    scheduler = Scheduler(tiny_llama(), kv_memory=1 << 30, prefill_chunk=16)
    gen = torch.Generator().manual_seed(2)
    reqs = [Request(torch.randint(0, 128, (48,), generator=gen).tolist(), 40, "full", Budget.parse(None), {},
                    sink=lambda e: None) for _ in range(2)]
    with no_cyclic_gc(), torch.inference_mode():
        for req in reqs:
            scheduler.submit(req)
        for _ in range(12):
            scheduler.tick()
        assert all(r.prefilled for r in reqs)
        refs = [weakref.ref(r.cache.core) for r in reqs]
        scheduler.kv_memory = 1  # the stores now exceed the pool: this tick preempts the newest request
        scheduler.tick()
        assert reqs[1].preemptions == 1 and refs[1]() is None, "the preempted request's cache is still alive"
        scheduler.kv_memory = 1 << 30
        assert refs[0]() is not None  # a request running alone is never preempted
        scheduler.cancel(reqs[0])
        scheduler.tick()
        assert refs[0]() is None, "the cancelled request's cache is still alive"


def test_a_dropped_cache_or_batch_view_is_freed_by_reference_counting():
    """No reference cycle through the adapter's cache, the core's layer views or the batch view's stubs."""
    model = tiny_llama()
    with no_cyclic_gc(), torch.inference_mode():
        caches = [make_cache(model, "full") for _ in range(2)]
        x = torch.tensor([[3, 4, 5, 6]])
        for c in caches:
            forward(model, x, torch.ones_like(x), c, logits_to_keep=1)
        cores = [c.core for c in caches]
        view = BatchView(cores)
        wrapped = MemfitCache(view)
        forward(model, torch.tensor([[7], [8]]), torch.ones(2, 1, dtype=torch.long), wrapped,
                torch.tensor([[4], [4]]), logits_to_keep=1)
        refs = [weakref.ref(o) for o in (*caches, *cores, view, wrapped)]
        keys = weakref.ref(cores[0].layers[0].keys)
        del caches, cores, view, wrapped, c
        assert [r() is None for r in refs] == [True] * len(refs)
        assert keys() is None


def test_serve_sets_expandable_segments_on_cuda_unless_the_user_chose(monkeypatch):
    """`memfit serve` on CUDA turns on expandable segments before CUDA starts, and says so; a user's own allocator
    config is left alone; on the CPU nothing is set."""
    import os

    from memfit.serve import ALLOC_CONF, configure_cuda_allocator

    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    assert configure_cuda_allocator("cpu") is None and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    note = configure_cuda_allocator("cuda")
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == ALLOC_CONF and note is not None and ALLOC_CONF in note
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    note = configure_cuda_allocator("cuda")
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128" and note is not None and "yours" in note


def test_a_forward_that_raises_leaves_no_cache_parked():
    """The adapter parks a layer's new keys/values between the cache update and the attention call; a forward that
    raises (e.g. out of memory) must not leave a request's cache parked there."""
    from memfit.adapters import transformers as adapter

    model = tiny_llama()
    cache = make_cache(model, "full")
    k = torch.zeros(1, 2, 1, 16)
    cache.update(k, k, 0)  # parked, as inside a forward that fails before layer 0 attends
    with pytest.raises(IndexError), torch.inference_mode():
        forward(model, torch.tensor([[10_000]]), torch.ones(1, 1, dtype=torch.long), cache)
    assert adapter._PENDING.get() is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_later_prefill_chunk_attends_in_a_fused_kernel_on_cuda():
    """A chunk of a chunked prefill (q queries, the last q of T keys, GQA, no padding) must not build (B, H, q, T)
    scores: on CUDA a materialised mask sent SDPA to its math kernel (4 GiB of fp32 scores per layer for a
    4096-token chunk at 8K on Llama-3.1-8B). Same output as the masked reference, a fraction of its memory."""
    from memfit.core.store import dense_attention

    gen = torch.Generator(device="cuda").manual_seed(0)
    h, hkv, q_len, t_len, d = 32, 8, 2048, 4096, 128
    q = torch.randn(1, h, q_len, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, hkv, t_len, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(1, hkv, t_len, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = dense_attention(q, k, v, None, d**-0.5)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    scores = h * q_len * t_len * 4  # what the math kernel's fp32 scores alone would take (1 GiB here)
    assert extra < scores / 8, f"{extra} bytes for one chunk's attention"
    mask = torch.ones(q_len, t_len, dtype=torch.bool, device="cuda").tril(t_len - q_len)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(h // hkv, 1), v.float().repeat_interleave(h // hkv, 1),
        attn_mask=mask, scale=d**-0.5)
    assert (out.float() - ref).abs().max().item() < 3e-2


def test_a_failed_prompt_chunk_fails_only_its_request(monkeypatch):
    """A prefill chunk that raises (on a GPU: a CUDA out-of-memory) ends its own request with an error and frees
    its store; the request already decoding finishes its answer as if nothing happened."""
    import memfit.serve.scheduler as sched_mod

    model = tiny_llama()
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 128, (n,), generator=gen).tolist() for n in (24, 37)]
    events: dict[int, list] = {0: [], 1: []}

    def submit_all(scheduler: Scheduler) -> list[Request]:
        reqs = [Request(p, 8, "full", Budget.parse(None), {}, sink=events[i].append) for i, p in enumerate(prompts)]
        scheduler.submit(reqs[0])
        with torch.inference_mode():
            for _ in range(3):  # the first request is decoding before the second arrives
                scheduler.tick()
            scheduler.submit(reqs[1])
            for _ in range(40):
                scheduler.tick()
                if not scheduler.running and not scheduler.waiting:
                    break
        return reqs

    alone = submit_all(Scheduler(model, kv_memory=1 << 30, prefill_chunk=64))[0].tokens
    real = sched_mod.forward

    def failing(mdl, ids, *args, **kwargs):
        if ids.shape[1] == len(prompts[1]):
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(mdl, ids, *args, **kwargs)

    monkeypatch.setattr(sched_mod, "forward", failing)
    events[0].clear()
    scheduler = Scheduler(model, kv_memory=1 << 30, prefill_chunk=64)
    reqs = submit_all(scheduler)
    assert reqs[1].finished == "error" and reqs[1].cache is None
    assert any(kind == "error" and "out of memory" in str(msg) for kind, msg in events[1])
    assert reqs[0].finished == "length" and reqs[0].tokens == alone  # untouched by its neighbour's failure
    assert scheduler.stats["scheduler_errors_total"] == 1
