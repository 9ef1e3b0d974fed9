"""Stack blocks (memfit.core.stacks): many requests' frozen KIVI stores as rows of shared buffers.

- a member keeps decoding alone exactly as its own store would (its buffers are views of its row), through a
  leave that moves the last member into the freed row, and unfreezes to the same portable store;
- a block's one step (the Triton kernels with per-row counters: CPU interpreter, CUDA) equals each member's lone
  step: same attention outputs, bit-identical codes, scales, zeros, ring and counters, rows of different lengths;
- bytes: a member counts its row; free rows are the blocks' slack; blocks go when empty;
- the server stacks frozen KIVI stores of requests joining at different ticks and each request's greedy text is
  the one it gets alone (CPU: rows step one by one on their views; CUDA: one call per block and layer).
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch

from memfit.core.cache import StepInfo
from memfit.core.stacks import BlockView, StackBlocks, capacity_class, release, stack_key
from memfit.core.static_quant_store import KIVIForm, StaticKIVILayer
from memfit.core.static_store import StaticKVLayer

try:
    from tests.test_kernels import interpreter_dtype  # noqa: F401  (fixture)
except ImportError:  # pragma: no cover  (no triton: the interpreter cases skip)
    pass
from tests.test_static_quant import _FLUSH_DEVICES as _DEVICES  # CUDA, or Triton's CPU interpreter


def test_capacity_class_rounds_up_by_at_most_a_32nd():
    for unit in (1, 8, 32):
        for need in range(1, 3000):
            c = capacity_class(need, unit)
            assert c >= need and c % unit == 0
            assert c <= 1.03125 * need + unit, (need, unit, c)
    assert len({capacity_class(n, 1) for n in range(1025, 2049)}) == 32  # 32 classes per octave


def _layer(form, i, reserve):
    """A KIVI store of `form`, or the dense static store when form is None."""
    return StaticKVLayer(i, reserve=reserve) if form is None else StaticKIVILayer(i, form, reserve=reserve)


def _request(form, prompt, reserve, gen, layers=2, hkv=2, d=16, dtype=torch.float32, device="cpu"):
    """A request's frozen layers (prompt in, one decode step: the step that freezes them)."""
    own = [_layer(form, i, reserve) for i in range(layers)]
    for layer in own:
        k = (torch.randn(1, hkv, prompt, d, generator=gen) * 2 + 1).to(device, dtype)
        v = torch.randn(1, hkv, prompt, d, generator=gen).to(device, dtype)
        layer.append(k, v, None)
        layer.finalize_step(StepInfo(layer.index, layers, prompt, True, None))
    _lone_step(own, gen, hkv, d, dtype, device)
    assert all(layer.frozen for layer in own)
    return own


def _inputs(n_layers, gen, hkv, d, dtype, device):
    return [tuple((torch.randn(1, h, 1, d, generator=gen) * 2).to(device, dtype) for h in (hkv, hkv, 2 * hkv))
            for _ in range(n_layers)]


def _lone_step(layers, gen=None, hkv=2, d=16, dtype=torch.float32, device="cpu", inputs=None):
    inputs = inputs or _inputs(len(layers), gen, hkv, d, dtype, device)
    outs = []
    for layer, (k, v, q) in zip(layers, inputs, strict=True):
        layer.append(k, v, None)
        outs.append(layer.attend(q, d**-0.5))
        layer.finalize_step(StepInfo(layer.index, len(layers), 1, False, None))
    return outs


def _mirrors(layer):
    return (layer.length, getattr(layer, "qk", None), getattr(layer, "qv", None))


def _same_state(a, b, zeros_after=True) -> None:
    """a (maybe a row of a block, maybe longer) holds what b holds: every buffer on b's capacity (zeros after it on
    a), the counters and the host mirrors."""
    assert _mirrors(a) == _mirrors(b)
    (bufs_a, ctr_a), (bufs_b, ctr_b) = a.stack_parts(), b.stack_parts()
    for name, t in bufs_b.items():
        n = t.shape[2]
        if isinstance(a, StaticKIVILayer):
            assert torch.equal(bufs_a[name][:, :, :n], t), name
        else:  # dense: only the used slots are defined (the buffers are allocated with new_empty)
            assert torch.equal(bufs_a[name][:, :, : a.length], t[:, :, : b.length]), name
        if zeros_after and isinstance(a, StaticKIVILayer):
            assert not bufs_a[name][:, :, n:].any(), name
    for name, t in ctr_b.items():
        assert torch.equal(ctr_a[name], t), name


KINDS = [pytest.param(KIVIForm(2, 4, 8, False), id="kivi"), pytest.param(None, id="dense")]


@pytest.mark.parametrize("form", KINDS)
def test_members_decode_alone_on_their_rows_through_leaves(form):
    gen = torch.Generator().manual_seed(0)
    reqs = [_request(form, n, 30, gen) for n in (21, 23, 22)]  # 22 + 30 .. 24 + 30 tokens: one capacity class
    twins = [copy.deepcopy(r) for r in reqs]
    blocks = StackBlocks(first_rows=4)
    keys = {stack_key(r) for r in reqs}
    assert len(keys) == 1 and None not in keys
    for r in reqs:
        blocks.join(r)
    (block,) = blocks.all_blocks()
    assert block.used == 3 and not block.kernels  # the CPU: members step one by one, on their rows
    assert [r[0].stack_row for r in reqs] == [0, 1, 2]
    assert all(sum(layer.nbytes() for layer in r) == block.row_nbytes() for r in reqs)  # what the server counts
    assert blocks.slack_bytes() == block.row_nbytes()  # the fourth row
    assert blocks.nbytes() == 4 * block.row_nbytes()
    for r, t in zip(reqs, twins, strict=True):
        for a, b in zip(r, t, strict=True):
            _same_state(a, b)
    live = [0, 1, 2]
    for step in range(20):
        if step == 7:  # the first request leaves: the last one moves into row 0
            release(reqs[0])
            assert not reqs[0][0].frozen and reqs[0][0].stack is None
            live = [1, 2]
            assert reqs[2][0].stack_row == 0 and reqs[1][0].stack_row == 1
            assert blocks.slack_bytes() == 2 * block.row_nbytes()
        for i in live:
            inputs = _inputs(2, gen, 2, 16, torch.float32, "cpu")
            got = _lone_step(reqs[i], inputs=inputs)
            want = _lone_step(twins[i], inputs=inputs)
            for x, y in zip(got, want, strict=True):
                assert torch.equal(x, y)
            for a, b in zip(reqs[i], twins[i], strict=True):
                _same_state(a, b)
    # unfreezing a member takes its whole request out of the block, then gives the twin's portable store
    if form is not None:
        reqs[1][0].unfreeze()
        twins[1][0].unfreeze()
        for sa, sb in ((reqs[1][0].k, twins[1][0].k), (reqs[1][0].v, twins[1][0].v)):
            assert torch.equal(sa.residual, sb.residual)
            for x, y in zip(sa.segments, sb.segments, strict=True):
                assert all(torch.equal(p, q) for p, q in zip(x.qt.tensors(), y.qt.tensors(), strict=True))
    else:
        reqs[1][0]._unfreeze()
        twins[1][0]._unfreeze()
        assert torch.equal(reqs[1][0].keys, twins[1][0].keys) and torch.equal(reqs[1][0].values, twins[1][0].values)
    assert reqs[1][1].stack is None and reqs[1][1].frozen and reqs[2][0].stack_row == 0
    release(reqs[2])
    blocks.drop_empty()
    assert blocks.all_blocks() == [] and blocks.slack_bytes() == 0


@pytest.mark.parametrize("form", KINDS)
def test_an_adopted_block_is_the_requests_own_buffers(form):
    """With no room for a block's new rows, a request's own buffers become a one-row block: the same tensors, the
    same bytes, no free row for anyone else; it decodes on them as alone and leaves with them."""
    gen = torch.Generator().manual_seed(4)
    req = _request(form, 22, 30, gen)
    twin = copy.deepcopy(req)
    before = sum(layer.nbytes() for layer in req)
    ptrs = [{n: t.data_ptr() for n, t in layer.stack_parts()[0].items()} for layer in req]
    blocks = StackBlocks()
    block = blocks.adopt(req)
    assert block.adopted and block.rows == block.used == 1 and req[0].stack is block
    assert [{n: t.data_ptr() for n, t in layer.stack_parts()[0].items()} for layer in req] == ptrs  # no copy
    assert sum(layer.nbytes() for layer in req) == block.row_nbytes() == before and blocks.slack_bytes() == 0
    other = _request(form, 22, 30, gen)
    assert stack_key(other) == stack_key(twin)
    assert blocks.new_block_bytes(other) > 0 and blocks.join(other) is not block  # nobody joins an adopted block
    for _ in range(12):
        inputs = _inputs(len(req), gen, 2, 16, torch.float32, "cpu")
        for a, b in zip(_lone_step(req, inputs=inputs), _lone_step(twin, inputs=inputs), strict=True):
            torch.testing.assert_close(a, b)
    for a, b in zip(req, twin, strict=True):
        _same_state(a, b, zeros_after=False)
    release(req, keep=True)
    assert req[0].stack is None and req[0].frozen
    assert [{n: t.data_ptr() for n, t in layer.stack_parts()[0].items()} for layer in req] == ptrs
    for a, b in zip(req, twin, strict=True):
        _same_state(a, b, zeros_after=False)
    blocks.drop_empty()
    assert [b.adopted for b in blocks.all_blocks()] == [False]


def test_what_cannot_be_stacked():
    form = KIVIForm(2, 4, 8, False)
    gen = torch.Generator().manual_seed(1)
    short, long = _request(form, 20, 8, gen), _request(form, 200, 8, gen)
    assert stack_key(short) != stack_key(long)  # other capacity classes: other blocks
    other = _request(KIVIForm(4, 4, 8, False), 20, 8, gen)
    assert stack_key(other) != stack_key(short)
    unfrozen = [StaticKIVILayer(0, form)]
    assert stack_key(unfrozen) is None and stack_key([]) is None
    blocks = StackBlocks(first_rows=1, max_rows=2)
    blocks.join(short)
    assert stack_key(short) is None  # already in a block
    b2 = _request(form, 21, 8, gen)
    assert blocks.new_block_bytes(b2) > 0  # the first block (one row) is full: the next has two rows
    blocks.join(b2)
    assert [b.rows for b in blocks.all_blocks()] == [1, 2]
    with pytest.raises(ValueError):
        blocks.join(unfrozen)


def test_a_block_as_small_as_memory_allows():
    """A server short of memory asks for a block of fewer rows (`join(rows=...)`): it gets exactly that many, a row
    costs what `row_bytes` said, and the next block of the key doubles from there."""
    form = KIVIForm(2, 4, 8, False)
    gen = torch.Generator().manual_seed(3)
    a, b, c = (_request(form, 20, 8, gen) for _ in range(3))
    blocks = StackBlocks(first_rows=4, max_rows=64)
    row = blocks.row_bytes(a)
    assert row > 0 and blocks.new_block_bytes(a) == 4 * row
    first = blocks.join(a, rows=1)
    assert first.rows == 1 and first.row_nbytes() == row and blocks.slack_bytes() == 0
    assert blocks.new_block_bytes(b) == 2 * row  # doubles from the small block
    second = blocks.join(b, rows=3)
    assert second.rows == 3 and blocks.slack_bytes() == 2 * row
    assert blocks.join(c) is second and blocks.slack_bytes() == row  # a free row first: no new block


@pytest.mark.parametrize("form", KINDS)
def test_small_blocks_merge_into_one(form):
    """Blocks built one or two rows at a time and adopted one-row blocks (a server short of memory) merge into one
    block once `room` allows it: the members' rows move (codes, tails, counters), each member then decodes exactly
    as its twin alone, a member holds the same bytes, the free rows stay free, the old blocks go; a merge with no
    room for its bytes does not happen."""
    gen = torch.Generator().manual_seed(6)
    reqs = [_request(form, n, 30, gen) for n in (21, 22, 23, 22, 21)]
    twins = [copy.deepcopy(r) for r in reqs]
    blocks = StackBlocks(first_rows=4, max_rows=64)
    row = blocks.row_bytes(reqs[0])
    blocks.join(reqs[0], rows=1)
    blocks.join(reqs[1], rows=2)
    blocks.join(reqs[2])  # the second block is full now
    blocks.join(reqs[3], rows=2)  # one free row
    blocks.adopt(reqs[4])  # its own buffers
    before = blocks.all_blocks()
    assert [(b.rows, b.used, b.adopted) for b in before] == [(1, 1, False), (2, 2, False), (2, 1, False),
                                                             (1, 1, True)]
    assert blocks.compact(2 * row - 1) == 0 and blocks.all_blocks() == before  # no room for any merged block
    assert blocks.compact(6 * row) == 3
    blocks.drop_empty()
    (merged,) = blocks.all_blocks()
    assert (merged.rows, merged.used, merged.adopted) == (6, 5, False)
    assert all(r[0].stack is merged for r in reqs) and sorted(r[0].stack_row for r in reqs) == [0, 1, 2, 3, 4]
    assert blocks.slack_bytes() == row  # the free row stays free
    for r, t in zip(reqs, twins, strict=True):
        assert sum(layer.nbytes() for layer in r) == row
        for a, b in zip(r, t, strict=True):
            _same_state(a, b)
    for _ in range(12):  # through flushes
        for r, t in zip(reqs, twins, strict=True):
            inputs = _inputs(2, gen, 2, 16, torch.float32, "cpu")
            for x, y in zip(_lone_step(r, inputs=inputs), _lone_step(t, inputs=inputs), strict=True):
                assert torch.equal(x, y)
    for r, t in zip(reqs, twins, strict=True):
        for a, b in zip(r, t, strict=True):
            _same_state(a, b)
    release(reqs[1])  # members leave the merged block as any other
    assert merged.used == 4 and blocks.slack_bytes() == 2 * row


def test_a_merge_short_of_memory_drops_free_rows_and_merges_what_fits():
    form = KIVIForm(2, 4, 8, False)
    gen = torch.Generator().manual_seed(8)
    reqs = [_request(form, 20, 8, gen) for _ in range(6)]
    blocks = StackBlocks(first_rows=2, max_rows=64)
    row = blocks.row_bytes(reqs[0])
    for r in reqs:
        blocks.join(r, rows=2)
    for r in reqs[1::2]:
        release(r)  # three blocks of two rows, one member each
    assert blocks.slack_bytes() == 3 * row
    assert blocks.compact(2 * row) == 1  # room for a block of two rows: the two emptiest merge, no free row kept
    blocks.drop_empty()
    assert sorted((b.rows, b.used) for b in blocks.all_blocks()) == [(2, 1), (2, 2)]
    assert blocks.slack_bytes() == row  # the merge freed two free rows' bytes
    assert blocks.compact(3 * row) == 1
    blocks.drop_empty()
    assert [(b.rows, b.used) for b in blocks.all_blocks()] == [(3, 3)]


def test_merging_stops_at_max_rows():
    form = KIVIForm(2, 4, 8, False)
    gen = torch.Generator().manual_seed(7)
    blocks = StackBlocks(first_rows=1, max_rows=4)
    for _ in range(7):
        blocks.join(_request(form, 20, 8, gen), rows=1)
    assert len(blocks.all_blocks()) == 7
    assert blocks.compact(10**12) == 3  # the four smallest into one block of max_rows
    blocks.drop_empty()
    assert sorted(b.rows for b in blocks.all_blocks()) == [1, 1, 1, 4]
    assert blocks.compact(10**12) == 2  # then the other three
    blocks.drop_empty()
    assert sorted(b.rows for b in blocks.all_blocks()) == [3, 4]
    assert blocks.compact(10**12) == 0
    assert sum(b.used for b in blocks.all_blocks()) == 7


@pytest.mark.parametrize("whole", [False, True, "merged"], ids=["members", "whole", "merged"])
@pytest.mark.parametrize("device", _DEVICES)
@pytest.mark.parametrize("kind", ["kivi", "kivi-sliding", "dense"])
def test_block_step_equals_each_members_lone_step(device, kind, whole, request):
    """One call per layer for every member (memfit.kernels with per-row counters) against each member's twin
    stepping alone (PyTorch flush, the reference attention on the CPU): rows of different lengths, across flushes
    of both sides and a member leaving. `whole`: the step a CUDA graph records (memfit.graphs.BlockGraph): every
    row of the block through a `BlockView`, free rows emptied (`fill_free_rows`) with inputs of their own, host
    mirrors after the step; the members' rows must come out the same, and a free row attends to its token alone."""
    if device == "interpret":
        dtype = request.getfixturevalue("interpreter_dtype")
        dev, (d, g, r, steps, lens, n_layers) = "cpu", (32, 16, 32, 20, (90, 95, 100), 1)  # Python runs each program
        import memfit.kernels.kivi_flush as kf

        if type(kf._flush_values_kernel).__name__ != "InterpretedFunction":
            importlib.reload(kf)  # defined under TRITON_INTERPRET=1 (the fixture set it)
    else:
        dtype, dev = torch.bfloat16, "cuda"
        d, g, r, steps, lens, n_layers = 128, 32, 128, 300, (1010, 1015, 1020), 2  # one capacity class
    form = None if kind == "dense" else KIVIForm(2, g, r, kind == "kivi-sliding")
    gen = torch.Generator().manual_seed(5)
    hkv = 2
    reqs = [_request(form, n, steps + 8, gen, layers=n_layers, hkv=hkv, d=d, dtype=dtype, device=dev) for n in lens]
    for req in reqs:
        for layer in req:
            layer.triton_flush = False  # the twins flush in PyTorch (the reference)
    twins = [copy.deepcopy(req) for req in reqs]
    base = [reqs[0][0].length, getattr(reqs[0][0], "qk", 0), getattr(reqs[0][0], "qv", 0)]
    blocks = StackBlocks()
    for req in reqs:
        blocks.join(req, rows=1 if whole == "merged" else None)
    if whole == "merged":  # three one-row blocks become one: the rows move, the kernels run on the new buffers
        assert blocks.compact(10**15) == 2
        blocks.drop_empty()
    (block,) = blocks.all_blocks()
    block.kernels = True
    live = [0, 1, 2]
    for i in range(steps):
        if i == steps // 2:
            release(reqs[1])
            live = [0, 2]
        inputs = {j: _inputs(n_layers, gen, hkv, d, dtype, dev) for j in live}
        order = sorted(live, key=lambda j: reqs[j][0].stack_row)
        if whole:
            block.fill_free_rows()
        for li in range(n_layers):
            k, v, q = (torch.cat([inputs[j][li][x] for j in order]) for x in range(3))
            if whole:  # free rows get inputs too; what they compute is never read
                pad = block.rows - len(order)
                k, v, q = (torch.cat([t, torch.randn((pad, *t.shape[1:]), generator=gen).to(t)]) for t in (k, v, q))
                out = BlockView([block]).step(li, k, v, q, d**-0.5, None)
                # a free row attends over its one new token only: its output is that token's value, per query head
                free_v = v[len(order):].repeat_interleave(q.shape[1] // v.shape[1], dim=1)
                torch.testing.assert_close(out[len(order):].float(), free_v.float(), rtol=2e-2, atol=2e-2)
            else:
                out = block.step(li, k, v, q, d**-0.5)
            for row, j in enumerate(order):
                twin = twins[j][li]
                kj, vj, qj = inputs[j][li]
                twin.append(kj, vj, None)
                want = twin.attend(qj, d**-0.5)
                twin.finalize_step(StepInfo(li, n_layers, 1, False, None))
                torch.testing.assert_close(out[row : row + 1].float(), want.float(), rtol=2e-2, atol=2e-2)
        if whole:
            block.advance_members()
        for j in live:
            for a, b in zip(reqs[j], twins[j], strict=True):
                assert _mirrors(a) == _mirrors(b)
                (bufs_a, ctr_a), (bufs_b, ctr_b) = a.stack_parts(), b.stack_parts()
                for name, t in ctr_b.items():
                    assert torch.equal(ctr_a[name], t), (i, name)
                for name, t in bufs_b.items():
                    n = t.shape[2] if form is not None else b.length
                    if name in ("kr", "vr") and device == "cuda":  # a fused multiply-add may move one bf16 unit
                        torch.testing.assert_close(bufs_a[name][:, :, :n], t[:, :, :n], rtol=2**-7, atol=0)
                    else:
                        assert torch.equal(bufs_a[name][:, :, :n], t[:, :, :n]), (i, name)
    a = reqs[0][0]
    assert a.length == base[0] + steps
    if form is not None:  # key blocks and a value every step were flushed by the block
        assert a.qk > base[1] and a.qv >= base[2] + steps


def _fast_alone(model, ids, spec, budget, params, n):
    from memfit.api import make_cache
    from memfit.engine import generate

    cache = make_cache(model, spec, budget, params, reserve=n + 1)
    x = torch.tensor([ids], device=next(model.parameters()).device)
    return generate(model, x, torch.ones_like(x), cache, n, [], 256).tokens[0]  # the server's --prefill-chunk


@pytest.mark.parametrize("adopt", [False, True, "merged"], ids=["blocks", "adopted", "merged"])
@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=[pytest.mark.gpu,
                                       pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])])
def test_server_stacks_frozen_stores_and_each_request_gets_its_own_text(device, adopt, monkeypatch):
    """Requests of snapkv+kivi and of the full cache join at different ticks; their stores freeze, join stack
    blocks (KIVI and dense) and leave as they finish; every request's greedy tokens equal a lone run
    (`generate` with its own cache). CPU: the fast stores' PyTorch form (MEMFIT_FAST_ON_CPU=1), rows step on their
    views; CUDA: one call per block and layer (`decode_stacked_row_layers_total`)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from memfit.core.budget import Budget
    from memfit.serve.scheduler import Request, Scheduler
    from tests.conftest import drive

    if adopt is True:  # as if no block's rows ever fit in the memory left: every request's own buffers become its block
        monkeypatch.setattr("memfit.core.stacks._row_bytes_at", lambda layers, capacity: 1 << 62)
    if adopt == "merged":  # one-row blocks (as when memory was short), full at once: the server merges them
        monkeypatch.setattr(StackBlocks, "_next_rows", lambda self, blocks: 1)
        adopt = False
        merging = True
    else:
        merging = False
    if device == "cpu":
        monkeypatch.setenv("MEMFIT_FAST_ON_CPU", "1")
        from tests.conftest import tiny_llama

        model, params, lens = tiny_llama(), {"kivi.group_size": 4, "kivi.residual": 8}, (40, 57, 45, 70, 52)
    else:
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
        model = LlamaForCausalLM(cfg).eval().to("cuda", torch.bfloat16)
        params, lens = {"kivi.group_size": 32, "kivi.residual": 32}, (600, 650, 620, 700, 640)
    n = 80  # > MIN_GRAPH_STEPS: on CUDA `auto` picks the fast backend (its static stores) only for long answers
    gen = torch.Generator().manual_seed(2)
    vocab = model.config.vocab_size
    prompts = [torch.randint(0, vocab, (t,), generator=gen).tolist() for t in lens]
    specs = [("snapkv+kivi", "0.5", params)] * 3 + [("full", None, {})] * 2
    joins = [0, 0, 3, 5, 8]

    def serve(stack_decode, decode_graphs=True):
        scheduler = Scheduler(model, kv_memory=1 << 32, prefill_chunk=256, stack_decode=stack_decode,
                              decode_graphs=decode_graphs)
        reqs = [Request(ids, n, m, Budget.parse(b), p, sink=None) for (m, b, p), ids in zip(specs, prompts,
                                                                                              strict=True)]
        kinds = set()
        tick = scheduler.tick

        def watched_tick():
            tick()
            if scheduler.stacks is not None:
                kinds.update((key[1][0], key[-1]) if key[-1] == "own" else key[1][0] for key in scheduler.stacks.blocks)

        scheduler.tick = watched_tick
        return drive(scheduler, reqs, joins=joins), scheduler, kinds

    got, scheduler, kinds = serve(True)
    if device == "cpu":  # the same arithmetic as alone, op for op: the same greedy tokens
        refs = [_fast_alone(model, ids, m, b, p, n) for (m, b, p), ids in zip(specs, prompts, strict=True)]
        for i, (spec, tokens) in enumerate(zip(specs, refs, strict=True)):
            assert got[i] == tokens, (i, spec[0])
    else:  # bf16 on a random model: sums in another order (one launch for n rows) may flip a near tie later on
        ref, _, _ = serve(False)
        eager, eager_scheduler, _ = serve(True, decode_graphs=False)
        for i in range(len(specs)):
            assert got[i][:8] == ref[i][:8] == eager[i][:8] and len(got[i]) == len(ref[i]) == len(eager[i]) == n, i
        # the blocks' step was recorded (once per set of blocks) and replayed; without graphs it never is
        assert scheduler.stats["decode_graph_captures_total"] >= 1, scheduler.last_error
        assert scheduler.stats["decode_graph_replays_total"] > scheduler.stats["decode_graph_captures_total"]
        assert eager_scheduler.stats["decode_graph_replays_total"] == 0
    assert kinds == ({("kivi", "own"), ("dense", "own")} if adopt else {"kivi", "dense"})
    assert (scheduler.stats["stack_blocks_merged_total"] > 0) == merging
    scheduler.stacks.drop_empty()
    assert scheduler.stacks.all_blocks() == []
    stacked = scheduler.stats["decode_stacked_row_layers_total"]
    assert stacked > 0 if device == "cuda" else stacked == 0


def test_stack_decode_switch(monkeypatch):
    """`memfit serve --no-stack-decode` (and --no-batch-decode) leave every store on its own; bad MEMFIT_STACK_ROWS is
    one clear error."""
    from memfit.errors import ConfigError
    from memfit.serve import make_scheduler
    from tests.conftest import tiny_llama

    model = tiny_llama()
    assert make_scheduler(model, None, 1 << 20).stacks is not None
    assert make_scheduler(model, None, 1 << 20, stack_decode=False).stacks is None
    assert make_scheduler(model, None, 1 << 20, batch_decode=False).stacks is None
    assert make_scheduler(model, None, 1 << 20).block_graph is None  # CUDA graphs: on a CUDA model only
    monkeypatch.setenv("MEMFIT_STACK_ROWS", "many")
    with pytest.raises(ConfigError, match="MEMFIT_STACK_ROWS"):
        StackBlocks()


@pytest.mark.parametrize("stack_decode", [True, False])
def test_server_lays_out_codes_for_the_rows_they_are_read_with(stack_decode, monkeypatch):
    """A served request is one row, but with stack decode its KIVI codes are read in blocks of up to
    `StackBlocks.max_rows` rows: the store chooses its code layout (`_use_planes`) for that many rows, and for its
    own row when it decodes alone."""
    from memfit.core import static_quant_store as S
    from memfit.core.budget import Budget
    from memfit.serve.scheduler import Request, Scheduler
    from tests.conftest import drive, tiny_llama

    monkeypatch.setenv("MEMFIT_FAST_ON_CPU", "1")
    seen = []
    real = S._use_planes
    monkeypatch.setattr(S, "_use_planes", lambda form, d, dev, rows: seen.append(rows) or real(form, d, dev, rows))
    scheduler = Scheduler(tiny_llama(), kv_memory=1 << 32, prefill_chunk=256, stack_decode=stack_decode)
    ids = torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    req = Request(ids, 80, "snapkv+kivi", Budget.parse("0.5"), {"kivi.group_size": 4, "kivi.residual": 8}, sink=None)
    got = drive(scheduler, [req], joins=[0])
    assert len(got[0]) == 80 and seen
    assert set(seen) == ({scheduler.stacks.max_rows} if stack_decode else {1})
