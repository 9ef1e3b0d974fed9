"""The 4-bit layout of torch's int4 kernel (`memfit.kernels.tinygemm`): learning its order, reordering a layer's
codes and undoing it. On CPU a stand-in packing op with a random (tile-periodic) order plays the kernel's packing:
the learnt order must undo whatever order the op uses. On CUDA the real op and kernel run."""

from __future__ import annotations

import pytest
import torch

from memfit.kernels import tinygemm
from memfit.weights.format import (
    CompressedLinear,
    Int4Group,
    group_kernel_forward,
    group_repacked,
    model_weight_bytes,
    repack_for_decode,
)
from memfit.weights.quantizer import rtn_quantize


def stand_in_pack(seed: int = 0):
    """A packing op shaped like `_convert_weight_to_int4pack` (8 x 128 tiles -> 32 x 4 int32 words each) whose
    order inside a tile is a random permutation."""
    perm = torch.randperm(tinygemm.TILE_ROWS * tinygemm.TILE_COLS, generator=torch.Generator().manual_seed(seed))

    def pack(pairs: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
        assert inner_k_tiles == tinygemm.INNER_K_TILES and pairs.dtype == torch.uint8
        n, half = pairs.shape
        codes = torch.stack([pairs >> 4, pairs & 15], -1).reshape(n, 2 * half).long()  # even column: high nibble
        tiles = codes.view(n // 8, 8, -1, 128).permute(0, 2, 1, 3).reshape(n // 8, -1, 1024)[..., perm]
        words = torch.zeros(*tiles.shape[:2], 128, dtype=torch.int64)
        for j in range(8):
            words |= tiles[..., j::8] << (4 * j)
        words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
        return words.view(n // 8, -1, 32, inner_k_tiles // 2)

    return pack


@pytest.fixture
def learnt(monkeypatch):
    pack = stand_in_pack()
    monkeypatch.setattr(tinygemm, "_ORDER", {"learnt": tinygemm.learn_order(torch.device("cpu"), pack)})
    return pack


def rtn_layer(out: int = 64, inp: int = 256, gs: int = 64, bias: bool = True, seed: int = 0) -> CompressedLinear:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.05
    bits = torch.full((inp // gs,), 4, dtype=torch.uint8)
    codes, scales, offsets = rtn_quantize(w, bits, gs)
    b = torch.randn(out, generator=g) if bias else None
    return CompressedLinear.from_group(codes, scales, offsets, bits, inp, b)


def test_learnt_order_undoes_the_packing(learnt) -> None:
    codes = torch.randint(0, 16, (48, 384), dtype=torch.uint8)
    packed = tinygemm.repack(codes, pack=learnt)
    assert packed.shape == (48, 192) and packed.dtype == torch.uint8  # the same bytes as the 4-bit stream
    inv = tinygemm.order(torch.device("cpu"))
    assert torch.equal(tinygemm.unpack_band(packed, inv), codes)
    assert torch.equal(tinygemm.unpack_band(packed[16:40], inv), codes[16:40])  # any band of whole tiles


def test_a_packing_that_mixes_tiles_is_refused() -> None:
    def mixing(pairs: torch.Tensor, k: int) -> torch.Tensor:
        return stand_in_pack()(pairs.flip(0), k)  # rows of tile 0 land in tile 1

    with pytest.raises(RuntimeError, match="tiles"):
        tinygemm.learn_order(torch.device("cpu"), mixing)


def test_a_repacked_layer_computes_the_same_and_counts_its_extra_bytes(learnt) -> None:
    layer = rtn_layer()
    before = {n: b.clone() for n, b in layer.named_buffers()}
    x_decode, x_prefill = torch.randn(3, 256), torch.randn(40, 256)
    want_decode, want_prefill = layer.reference_forward(x_decode), layer.reference_forward(x_prefill)
    assert layer.repack_for_kernel(pack=learnt) and layer.repacked
    assert not torch.equal(layer.codes_4, before["codes_4"])  # really reordered
    torch.testing.assert_close(layer.reference_forward(x_decode), want_decode, rtol=0, atol=0)
    torch.testing.assert_close(layer.reference_forward(x_prefill), want_prefill, rtol=0, atol=0)
    groups = layer.meta["n_groups"] * layer.out_features
    assert layer.weight_bytes == sum(b.numel() * b.element_size() for b in before.values()) + 4 * groups
    assert "tg_scales_zeros" not in layer.state_dict()  # derived: a saved folder does not hold it
    layer.canonical_layout()
    assert not layer.repacked
    assert all(torch.equal(b, before[n]) for n, b in layer.named_buffers())


def test_only_four_bit_bf16_cuda_layers_are_repacked(learnt) -> None:
    model = torch.nn.Sequential(rtn_layer())
    assert repack_for_decode(model, torch.bfloat16) == 0  # a CPU layer: the kernel is CUDA-only
    assert tinygemm.shape_ok(64, 256, 64, {4})
    assert not tinygemm.shape_ok(64, 256, 64, {3}) and not tinygemm.shape_ok(64, 256, 64, {2, 4})
    assert not tinygemm.shape_ok(64, 200, 8, {4}) and not tinygemm.shape_ok(60, 256, 64, {4})
    small = rtn_layer(out=64, inp=64, gs=32)  # 64 inputs: not a whole 128-column tile
    assert not small.repack_for_kernel(pack=learnt) and not small.repacked


def test_saving_a_repacked_model_writes_memfit_order(learnt, tmp_path) -> None:
    from test_weights import tiny_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from memfit.weights import quantize_model
    from memfit.weights.io import load_quantized, save_quantized

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    quantize_model(model, "rtn:4:group_size=64")
    tok = tiny_tokenizer()
    ids = torch.randint(0, 100, (1, 9))
    with torch.no_grad():
        want = model(ids).logits
    layers = [m for m in model.modules() if isinstance(m, CompressedLinear)]
    assert all(m.repack_for_kernel(pack=learnt) for m in layers)
    save_quantized(model, tok, tmp_path / "q")
    assert not any(m.repacked for m in layers)
    loaded, _ = load_quantized(tmp_path / "q")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, want, rtol=0, atol=0)


def tiny_rtn4_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    from memfit.weights import quantize_model

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    quantize_model(model, "rtn:4:group_size=64")
    return model


def test_sibling_layers_stack_into_one_buffer_with_the_same_bytes_and_results(learnt) -> None:
    from memfit.adapters.transformers import projection_groups

    model = tiny_rtn4_llama()
    ids = torch.randint(0, 100, (1, 9))
    layers = [m for m in model.modules() if isinstance(m, CompressedLinear)]
    assert all(m.repack_for_kernel(pack=learnt) for m in layers)
    codes_before = {id(m): m.codes_4.clone() for m in layers}
    bytes_before = model_weight_bytes(model)
    with torch.no_grad():
        want = model(ids).logits
    groups = projection_groups(model)
    assert len(groups) == 4  # q/k/v and gate/up in each of two layers
    assert group_repacked(groups) == 4 and group_repacked(groups) == 4  # idempotent: no second stacking
    assert model_weight_bytes(model) == bytes_before  # views of one buffer: the bytes exist once
    for members in groups:
        group = members[0]._tg_group
        assert isinstance(group, Int4Group) and all(m._tg_group is group for m in members)
        codes, pairs = group.matrices()
        assert all(m.codes_4.untyped_storage().data_ptr() == codes.untyped_storage().data_ptr() for m in members)
        assert torch.equal(codes, torch.cat([codes_before[id(m)] for m in members]))
        assert pairs.shape[1] == sum(m.out_features for m in members)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=0)  # the reference reads each view
    q = groups[0][0]
    q.canonical_layout()  # one member leaves: the group no longer holds, its siblings run alone
    assert groups[0][1]._tg_group.matrices() is None and not q.repacked


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_stacked_int4_layers_give_each_member_its_own_output_on_cuda() -> None:
    members = [rtn_layer(out=n, inp=1024, gs=128, seed=i).cuda() for i, n in enumerate((512, 128, 128))]
    assert all(m.repack_for_kernel() for m in members)
    x = torch.randn(2, 1024, device="cuda", dtype=torch.bfloat16)
    alone = [group_kernel_forward(m, x) for m in members]
    assert group_repacked([members]) == 1
    together = [group_kernel_forward(m, x) for m in members]
    for a, b in zip(alone, together, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert members[0]._tg_group.input is None  # every part taken: the group keeps nothing between steps


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_int4_kernel_matches_the_reference_on_cuda() -> None:
    layer = rtn_layer(out=512, inp=1024, gs=128).cuda()
    x = torch.randn(4, 1024, device="cuda", dtype=torch.bfloat16)
    want = layer.reference_forward(x.float())
    assert layer.repack_for_kernel() and layer.capturable(4) and not layer.capturable(tinygemm.MAX_ROWS + 1)
    got = group_kernel_forward(layer, x)
    # bf16 scales and zeros, bf16 output: ~0.5 % of the output's range (the 4-bit rounding itself is ~10 %)
    assert (got.float() - want).abs().max() <= 1e-2 * want.abs().max()
    torch.testing.assert_close(layer.reference_forward(x.float()), want, rtol=0, atol=0)  # prefill: exact codes
