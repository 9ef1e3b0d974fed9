"""The pair-order 4-bit decode matmul (memfit.kernels.int4_pairs) and the layer layout the fast backend gives it.

Layout and layer tests run on the CPU (the repack is plain PyTorch). The kernel runs in Triton's CPU interpreter
without CUDA (its plain-Triton arithmetic: the interpreter cannot run the PTX of the bf16x2 path) and, with
`-m gpu`, on the GPU at Llama-3.1-8B's shapes with the PTX path."""

from __future__ import annotations

import importlib

import pytest
import torch

from memfit.kernels import int4_pairs
from memfit.weights.format import CompressedLinear, Int4Group, group_repacked
from memfit.weights.quantizer import rtn_quantize
from tests.test_kernels import _INTERPRET, interpreter_dtype  # noqa: F401, F811 (the fixture is used by name)


def rtn4(out: int, inp: int, gs: int = 128, seed: int = 0, device: str = "cpu") -> CompressedLinear:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=gen) * 0.02
    codes, scales, offsets = rtn_quantize(w, torch.full((inp // gs,), 4, dtype=torch.uint8), gs)
    return CompressedLinear.from_group(codes, scales, offsets, torch.full((inp // gs,), 4), inp).to(device)


def test_pair_order_is_a_permutation_inside_each_word_and_round_trips() -> None:
    layer = rtn4(24, 256)
    codes = layer.codes_4
    paired = int4_pairs.to_pairs(codes)
    assert paired.shape == codes.shape and paired.dtype == torch.uint8
    assert torch.equal(int4_pairs.from_pairs(paired), codes)
    assert not torch.equal(paired, codes)
    # each 4-byte word holds the same eight codes, reordered: pair p = 4 i + j of a 32-code block sits in word j,
    # nibbles i (first code) and 4 + i (second)
    nib = torch.stack([codes & 15, codes >> 4], -1).view(24, -1, 32)  # (row, block, code)
    pnib = torch.stack([paired & 15, paired >> 4], -1).view(24, -1, 4, 8)  # (row, block, word, nibble)
    for i in range(4):
        for j in range(4):
            p = 4 * i + j
            assert torch.equal(pnib[:, :, j, i], nib[:, :, 2 * p])
            assert torch.equal(pnib[:, :, j, 4 + i], nib[:, :, 2 * p + 1])


def test_a_pair_ordered_layer_computes_the_same_and_saves_in_memfit_order() -> None:
    layer = rtn4(40, 512, gs=64)
    before = {n: b.clone() for n, b in layer.named_buffers() if b is not None}
    x1, x40 = torch.randn(1, 512), torch.randn(40, 512)
    want1, want40 = layer.reference_forward(x1), layer.reference_forward(x40)
    assert not layer.repack_for_kernel(kernel="pairs")  # a CPU layer: the kernel runs on CUDA only
    assert layer.repack_for_kernel(kernel="pairs", force=True) and layer.kernel_layout == "pairs"
    assert not torch.equal(layer.codes_4, before["codes_4"])
    torch.testing.assert_close(layer.reference_forward(x1), want1, rtol=0, atol=0)
    torch.testing.assert_close(layer.reference_forward(x40), want40, rtol=0, atol=0)
    assert layer.weight_bytes == sum(b.numel() * b.element_size() for b in before.values())  # no extra bytes
    layer.canonical_layout()
    assert layer.kernel_layout is None
    assert all(torch.equal(b, before[n]) for n, b in layer.named_buffers() if b is not None)


def test_only_uniform_4bit_layers_take_the_pair_order() -> None:
    assert int4_pairs.shape_ok(64, 256, 128, {4})
    assert not int4_pairs.shape_ok(64, 256, 128, {3}) and not int4_pairs.shape_ok(64, 256, 128, {2, 4})
    assert not int4_pairs.shape_ok(64, 200, 8, {4})  # a group size the kernel does not take
    with pytest.raises(ValueError, match="bf16"):
        int4_pairs.gemv(torch.randn(1, 256), torch.zeros(8, 128, dtype=torch.uint8), torch.ones(8, 2),
                        torch.zeros(8, 2), 128)


def _interpreted():
    import memfit.kernels._int4_pairs_kernel as kmod

    if type(kmod.int4_pairs_gemv_kernel).__name__ != "InterpretedFunction":
        importlib.reload(kmod)  # defined under TRITON_INTERPRET=1 (the fixture set it)
    assert type(kmod.int4_pairs_gemv_kernel).__name__ == "InterpretedFunction"


@pytest.mark.skipif(not _INTERPRET, reason="needs triton >= 3.8 (the CPU interpreter) and no CUDA device")
@pytest.mark.parametrize(("rows", "split", "gs"), [(1, None, 128), (1, 3, 64), (3, 1, 128), (2, 2, 32)])
def test_kernel_equals_the_reference_in_the_interpreter(rows, split, gs, interpreter_dtype) -> None:  # noqa: F811
    if interpreter_dtype != torch.bfloat16:
        pytest.skip("this triton's interpreter does not compute bf16 as the GPU does")
    _interpreted()
    layer = rtn4(40, 768, gs=gs, seed=rows)
    x = torch.randn(rows, 768).to(torch.bfloat16)
    want = layer.reference_forward(x.float())
    assert layer.repack_for_kernel(kernel="pairs", force=True)
    for bn, gpi in ((16, 2), (8, 8)):
        got = int4_pairs.gemv(x, layer.codes_4, layer.scales, layer.offsets, gs, block_n=bn, gpi=gpi, split=split,
                              num_warps=1)
        assert got.dtype == torch.bfloat16 and got.shape == (rows, 40)
        torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2 * want.abs().max().item())


@pytest.mark.skipif(not _INTERPRET, reason="needs triton >= 3.8 (the CPU interpreter) and no CUDA device")
def test_grouped_layers_share_one_buffer_and_one_launch(interpreter_dtype) -> None:  # noqa: F811
    if interpreter_dtype != torch.bfloat16:
        pytest.skip("this triton's interpreter does not compute bf16 as the GPU does")
    _interpreted()
    members = [rtn4(n, 256, seed=n) for n in (32, 16, 16)]
    x = torch.randn(1, 256).to(torch.bfloat16)
    want = [m.reference_forward(x.float()) for m in members]
    assert all(m.repack_for_kernel(kernel="pairs", force=True) for m in members)
    nbytes = sum(m.weight_bytes for m in members)
    assert group_repacked([members]) == 1
    group = members[0]._tg_group
    assert isinstance(group, Int4Group) and group.layout == "pairs" and group.matrices() is not None
    assert sum(m.weight_bytes for m in members) == nbytes  # views: the bytes exist once
    assert members[1].scales.untyped_storage().data_ptr() == members[0].scales.untyped_storage().data_ptr()
    for i in range(len(members)):
        got = group.output(i, x, x)
        torch.testing.assert_close(got.float(), want[i], rtol=1e-2, atol=1e-2 * want[i].abs().max().item())
    assert group.input is None  # every part taken: nothing kept between steps
    members[1].canonical_layout()  # one member leaves: the group no longer holds
    assert group.matrices() is None
    torch.testing.assert_close(members[1].reference_forward(x.float()), want[1], rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("out", "inp", "rows"), [(6144, 4096, 1), (28672, 4096, 1), (4096, 14336, 1),
                                                  (4096, 4096, 3)])
def test_kernel_equals_the_reference_on_the_gpu(out, inp, rows) -> None:
    """The PTX path (bf16x2 pairs) at Llama-3.1-8B's shapes, including the split input dimension of the tall one."""
    layer = rtn4(out, inp, seed=out, device="cuda")
    x = torch.randn(rows, inp, device="cuda").to(torch.bfloat16)
    want = layer.reference_forward(x.float())
    assert layer.repack_for_kernel(kernel="pairs")
    got = int4_pairs.gemv(x, layer.codes_4, layer.scales, layer.offsets, 128)
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=1e-2 * want.abs().max().item())
    again = int4_pairs.gemv(x, layer.codes_4, layer.scales, layer.offsets, 128)
    assert torch.equal(got, again)  # the split's fix-up adds in a fixed order: deterministic


def test_the_kernel_follows_the_rows_unless_the_environment_says(monkeypatch) -> None:
    from memfit.errors import ConfigError
    from memfit.weights.format import int4_kernel_for

    monkeypatch.delenv("MEMFIT_INT4_KERNEL", raising=False)
    assert int4_kernel_for(1) == "pairs" and int4_kernel_for(4) == "tinygemm"
    monkeypatch.setenv("MEMFIT_INT4_KERNEL", "tinygemm")
    assert int4_kernel_for(1) == "tinygemm"
    monkeypatch.setenv("MEMFIT_INT4_KERNEL", "fastest")
    with pytest.raises(ConfigError, match="MEMFIT_INT4_KERNEL"):
        int4_kernel_for(1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_batch_switches_the_layout_and_a_single_row_switches_back(monkeypatch) -> None:
    """`make_cache(rows=...)` on the fast backend: several rows take torch's int4 layout, one row the pair order;
    the layers convert in place and compute the same."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from memfit.api import make_cache
    from memfit.weights.base import quantize_model
    from tests.conftest import TINY

    monkeypatch.delenv("MEMFIT_INT4_KERNEL", raising=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**dict(TINY, hidden_size=256, intermediate_size=512, head_dim=64)))
    model = quantize_model(model.eval(), "rtn:4").to("cuda", torch.bfloat16)
    layers = [m for m in model.modules() if isinstance(m, CompressedLinear)]
    x = torch.randn(1, 256, device="cuda", dtype=torch.bfloat16)
    want = layers[0].reference_forward(x.float())
    for rows, layout in ((2, "tinygemm"), (1, "pairs"), (3, "tinygemm")):
        make_cache(model, "full", None, backend="fast", rows=rows)
        assert {m.kernel_layout for m in layers} == {layout}
        torch.testing.assert_close(layers[0](x).float(), want, rtol=2e-2, atol=1e-2 * want.abs().max().item())
