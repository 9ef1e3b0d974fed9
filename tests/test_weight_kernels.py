"""The Triton decode matmul of group-quantized weights (memfit.kernels.group_gemv) against the reference matmul.

On a machine without CUDA the kernel runs in Triton's CPU interpreter (small shapes: every program runs in
Python); with CUDA the same checks run on the GPU at a Llama-sized shape (`-m gpu`)."""

from __future__ import annotations

import importlib

import pytest
import torch

from memfit.kernels.group_gemv import MAX_ROWS, Bucket, group_gemv, supported
from memfit.weights.format import CompressedLinear, _group_buckets, group_kernel_forward, kernel_for
from tests.test_kernels import _INTERPRET, interpreter_dtype  # noqa: F401 (the fixture is used by name)

_DEVICES = [
    pytest.param("cuda", marks=[pytest.mark.gpu,
                                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]),
    pytest.param("interpret", marks=pytest.mark.skipif(
        not _INTERPRET, reason="needs triton >= 3.8 (the kernels run in its CPU interpreter) and no CUDA device")),
]


def _setup(device: str, request: pytest.FixtureRequest) -> tuple[str, torch.dtype, int, int, int]:
    """(device, activation dtype, out_features, in_features, group_size)."""
    if device == "interpret":
        dtype = request.getfixturevalue("interpreter_dtype")  # sets TRITON_INTERPRET=1 first
        import memfit.kernels._group_gemv_kernel as kmod

        if type(kmod.group_gemv_kernel).__name__ != "InterpretedFunction":
            importlib.reload(kmod)  # defined under TRITON_INTERPRET=1 (the fixture set it)
        assert type(kmod.group_gemv_kernel).__name__ == "InterpretedFunction"
        # in_features not a multiple of the group: the last group is padded (stored, never multiplied)
        return "cpu", dtype, 80, 8 * 32 - 5, 32
    return "cuda", torch.bfloat16, 4096, 4096, 128


def _layer(out: int, inf: int, gs: int, bits: list[int], dev: str, lowrank: bool = False,
           bias: bool = False) -> CompressedLinear:
    gen = torch.Generator().manual_seed(sum(bits) + out)
    n_groups = len(bits)
    assert n_groups * gs >= inf > (n_groups - 1) * gs
    codes = torch.stack([torch.randint(0, 1 << b, (out, gs), generator=gen) for b in bits], 1)
    scales = torch.rand(out, n_groups, generator=gen) * 0.02 + 0.002
    offsets = -scales * torch.tensor([(1 << b) / 2 for b in bits])  # centred, like a quantized weight
    lin = CompressedLinear.from_group(codes, scales, offsets, torch.tensor(bits), inf,
                                      bias=torch.randn(out, generator=gen) if bias else None)
    if lowrank:
        lin.add_lowrank(torch.randn(out, 4, generator=gen) * 0.05, torch.randn(4, inf, generator=gen) * 0.05)
    return lin.to(dev)


@pytest.mark.parametrize("device", _DEVICES)
@pytest.mark.parametrize(("variant", "rows"),
                         [("dot", 1), ("dot", 5), ("dot", 17), ("rows", 1), ("rows", 3), ("row1", 1)])
def test_group_kernel_equals_the_reference_for_every_width(device, variant, rows, request):
    """Every bit width 1..8 in one layer (widths that straddle bytes or words and those that do not, buckets of one
    and of two groups, in mixed order). The tl.dot kernel, at row counts that fill 1, 5 and 17 of its 16- or 32-row
    tiles, multiplies the dequantized weight in the activation dtype; the register kernel (decode's 1-4 rows, and
    its one-row form) dequantizes in fp32. Each fp32 output equals x @ W^T computed from the operands it multiplies, to fp32
    summation order."""
    dev, dtype, out, inf, gs = _setup(device, request)
    bits = [3, 8, 1, 5, 2, 4, 6, 7] if device == "interpret" else [4] * 16 + [3] * 8 + [5] * 8
    inf = inf if device == "interpret" else len(bits) * gs
    lin = _layer(out, inf, gs, bits, dev)
    x = (torch.randn(rows, inf, generator=torch.Generator().manual_seed(rows))).to(dev, dtype)
    got = group_gemv(x, _group_buckets(lin), lin.scales, lin.offsets, gs, out, torch.float32, variant=variant)
    w = lin.dequantize(dtype if variant == "dot" else torch.float32, with_lowrank=False)
    want = x.float() @ w.float().T
    assert got.dtype == torch.float32 and got.shape == (rows, out)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_register_kernel_serves_decode_rows_of_whole_words():
    """`auto` takes the register kernel for 1-4 rows when every bucket's groups are whole int32 words, and the
    tl.dot kernel otherwise; asking for the register kernel where it cannot serve is an error, not a wrong result."""
    def buckets(layer: CompressedLinear) -> list[Bucket]:  # as _group_buckets builds them, without a Triton
        bits = layer.group_bits
        return [Bucket(b, getattr(layer, f"codes_{b}"), (bits == b).nonzero().flatten().to(torch.int32))
                for b in sorted(set(bits.tolist()))]

    lin = _layer(64, 64, 32, [4, 3], "cpu")
    assert all(b.words is not None and b.words.dtype == torch.int32 for b in buckets(lin))
    assert buckets(lin)[0].words.data_ptr() == buckets(lin)[0].codes.data_ptr()  # a view, no copy
    odd = _layer(64, 64, 16, [3] * 4, "cpu")  # 16 codes of 3 bits: 6 bytes per group, not whole words
    assert buckets(odd)[0].words is None
    x = torch.randn(5, 64)
    for variant in ("rows", "row1"):  # checked before Triton is imported or anything launches
        with pytest.raises(ValueError, match="register kernel"):
            group_gemv(x, buckets(lin), lin.scales, lin.offsets, 32, 64, variant=variant)


@pytest.mark.parametrize("device", _DEVICES)
def test_group_kernel_forward_matches_reference_forward(device, request):
    """The registered CUDA forward (kernel + low-rank branch + bias, output in the activation dtype) answers as the
    reference forward does, for a (batch, tokens, features) input; prefill-sized inputs take the reference."""
    dev, dtype, out, inf, gs = _setup(device, request)
    bits = [4, 3, 4, 2, 4, 8, 4, 4] if device == "interpret" else [4] * 32
    inf = inf if device == "interpret" else len(bits) * gs
    lin = _layer(out, inf, gs, bits, dev, lowrank=True, bias=True)
    x = torch.randn(2, 1, inf, generator=torch.Generator().manual_seed(3)).to(dev, dtype)
    got = group_kernel_forward(lin, x)
    want = lin.reference_forward(x)
    assert got.shape == want.shape == (2, 1, out) and got.dtype == dtype
    scale = want.float().abs().max().item()
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=1e-2 * scale)  # both round to `dtype`
    big = torch.randn(MAX_ROWS + 1, inf, generator=torch.Generator().manual_seed(4)).to(dev, dtype)
    assert torch.equal(group_kernel_forward(lin, big), lin.reference_forward(big))  # prefill: the reference itself


def test_kernel_serves_only_what_it_can():
    assert supported(128, 1) and supported(16, MAX_ROWS) and supported(256, 8)
    assert not supported(24, 1)  # not a power of two (tl.arange)
    assert not supported(8, 1)  # below tl.dot's 16
    assert not supported(128, MAX_ROWS + 1)  # prefill: the reference's dense matmul per band is faster
    assert not supported(128, 0)
    assert kernel_for("group", "cuda")[0] == "triton-group-gemv"
    assert kernel_for("group", "cpu") is None  # CPUs run the reference


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_forward_dispatches_to_the_kernel():
    """On CUDA a decode-sized forward goes through the kernel (the reference is never called) and matches the
    reference; the layer's buckets are built once and reused."""
    lin = _layer(1024, 1024, 128, [4] * 4 + [3] * 4, "cuda")
    x = torch.randn(1, 1024, device="cuda", dtype=torch.bfloat16)
    want = lin.reference_forward(x)
    lin.reference_forward = lambda _x: pytest.fail("a decode-sized CUDA forward took the reference")
    y = lin(x)
    torch.testing.assert_close(y.float(), want.float(), rtol=2e-2, atol=2e-2)
    buckets = _group_buckets(lin)
    assert buckets is not None and lin(x) is not None and _group_buckets(lin) is buckets


def test_a_failing_kernel_falls_back_to_the_reference_and_says_so(monkeypatch, capsys):
    """If the kernel cannot run (a Triton that fails to compile it), the layer answers through the reference
    matmul, the process says so once on stderr, and later calls do not retry the kernel."""
    import memfit.kernels
    import memfit.kernels.group_gemv as gg
    import memfit.weights.format as fmt

    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("PassManager::run failed\nmore lines")

    monkeypatch.setattr(memfit.kernels, "available", lambda: True)
    monkeypatch.setattr(gg, "group_gemv", broken)
    monkeypatch.setattr(fmt, "_KERNEL_FAILED", [])
    lin = _layer(64, 64, 32, [4, 3], "cpu", bias=True)
    x = torch.randn(1, 64)
    for _ in range(2):
        assert torch.equal(group_kernel_forward(lin, x), lin.reference_forward(x))
    assert len(calls) == 1
    err = capsys.readouterr().err
    assert err.count("memfit: the Triton kernel for group-quantized weights failed here") == 1
    assert "RuntimeError: PassManager::run failed" in err and "more lines" not in err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernel_forward_records_in_a_cuda_graph():
    """After one eager call, a decode-sized forward records in a CUDA graph and replays to the eager result: the
    condition for letting compressed weights use the fast backend's graphs (`CompressedLinear.cuda_graph_safe`,
    still False until this runs on a GPU)."""
    lin = _layer(2048, 1024, 128, [4] * 8, "cuda", lowrank=True, bias=True)
    x = torch.randn(4, 1024, device="cuda", dtype=torch.bfloat16)
    eager = lin(x)
    graph = torch.cuda.CUDAGraph()
    static_x = x.clone()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        static_y = lin(static_x)
    static_x.copy_(x * 2)
    graph.replay()
    torch.testing.assert_close(static_y.float(), lin(x * 2).float(), rtol=1e-2, atol=1e-2)
    static_x.copy_(x)
    graph.replay()
    torch.testing.assert_close(static_y.float(), eager.float(), rtol=1e-2, atol=1e-2)


def test_only_kernel_served_layers_are_graph_safe():
    """The reference matmul reads group widths on the host: a layer is graph-safe only where the CUDA kernel serves
    it, and only for decode-sized inputs (on a CPU never)."""
    lin = _layer(64, 64, 32, [4, 3], "cpu")
    assert not lin.cuda_graph_safe and not lin.capturable(1)
    if torch.cuda.is_available():
        gpu = lin.to("cuda")
        assert gpu.cuda_graph_safe == (_group_buckets(gpu) is not None)
        assert not gpu.capturable(MAX_ROWS + 1) and not gpu.capturable(0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_quantized_model_decodes_in_a_cuda_graph_like_the_portable_path():
    """A model with 4-bit group weights (quantized on load, as `--weights rtn:4` does) takes the fast backend with
    CUDA graphs, and generates what the portable path (eager, same weights) generates, within bf16 rounding."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from memfit.api import make_cache
    from memfit.engine import generate, pad_left
    from memfit.weights.base import quantize_model
    from tests.conftest import TINY

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**dict(TINY, hidden_size=256, intermediate_size=512, head_dim=64)))
    model = quantize_model(model.eval(), "rtn:4").to("cuda", torch.bfloat16)
    assert all(m.cuda_graph_safe for m in model.modules() if isinstance(m, CompressedLinear))
    g = torch.Generator().manual_seed(1)
    ids, mask = pad_left([torch.randint(3, 120, (40,), generator=g).tolist()])
    runs = {}
    for backend in ("fast", "portable"):
        cache = make_cache(model, "full", None, backend=backend, reserve=80)
        runs[backend] = (cache, generate(model, ids, mask, cache, max_new_tokens=80))
    fast_cache, fast = runs["fast"]
    _, port = runs["portable"]
    assert fast_cache.backend.name == "fast" and fast_cache.backend.graphs, fast_cache.backend
    # the fast backend gave the 4-bit layers torch's int4 kernel layout (memfit.kernels.tinygemm)
    assert all(m.repacked for m in model.modules() if isinstance(m, CompressedLinear))
    assert fast.graph_replays == 80 - 2
    torch.testing.assert_close(fast.first_logits, port.first_logits, rtol=2e-2, atol=2e-2)
    agree = sum(a == b for a, b in zip(fast.tokens[0][:12], port.tokens[0][:12], strict=True)) / 12
    assert agree >= 0.75, (fast.tokens, port.tokens)
