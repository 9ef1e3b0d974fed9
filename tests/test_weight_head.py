"""``head=true`` on a weight spec: the output head compressed too (untied heads only), saved and reloaded exactly."""

from __future__ import annotations

import pytest
import torch
from test_weights import tiny_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from memfit.errors import ConfigError
from memfit.weights import CompressedLinear, model_weight_bytes, parse_weight_spec, quantize_model
from memfit.weights.io import load_quantized, save_quantized


def llama(tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).eval()


def test_the_head_is_compressed_only_when_asked() -> None:
    plain, with_head = llama(False), llama(False)
    quantize_model(plain, "rtn:4")
    quantize_model(with_head, "rtn:4:head=true")
    assert isinstance(plain.lm_head, torch.nn.Linear) and not isinstance(plain.lm_head, CompressedLinear)
    assert isinstance(with_head.lm_head, CompressedLinear)
    head_bf = 256 * 128 * 4  # the fp32 head's bytes
    assert model_weight_bytes(plain) - model_weight_bytes(with_head) == head_bf - with_head.lm_head.weight_bytes
    assert with_head.memfit_weights == "rtn:4:head=True"
    assert parse_weight_spec(with_head.memfit_weights).head  # the recorded spec reads back


def reloads_exactly(model: LlamaForCausalLM, folder) -> None:
    """Save the compressed model, load the folder: the head is compressed there too and the logits are identical."""
    ids = torch.randint(0, 200, (1, 11))
    with torch.no_grad():
        want = model(ids).logits
    save_quantized(model, tiny_tokenizer(), folder)
    loaded, _ = load_quantized(folder)
    assert isinstance(loaded.lm_head, CompressedLinear)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, want, rtol=0, atol=0)


def test_a_compressed_head_saves_and_reloads_with_identical_logits(tmp_path) -> None:
    reloads_exactly(quantize_model(llama(False), "rtn:4:head=true"), tmp_path / "q")


def test_a_tied_head_gets_its_own_compressed_copy(tmp_path) -> None:
    model = llama(True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    before = model_weight_bytes(model)
    emb = model.model.embed_tokens.weight.detach().clone()
    quantize_model(model, "rtn:4:head=true")
    assert isinstance(model.lm_head, CompressedLinear) and not model.config.tie_word_embeddings
    assert torch.equal(model.model.embed_tokens.weight, emb)  # the lookups keep the full-precision matrix
    body = quantize_model(llama(True), "rtn:4")
    assert model_weight_bytes(model) == model_weight_bytes(body) + model.lm_head.weight_bytes  # the copy is counted
    assert model_weight_bytes(body) < before
    reloads_exactly(model, tmp_path / "q")


def test_bad_head_values_are_clear_errors() -> None:
    with pytest.raises(ConfigError, match="head"):
        parse_weight_spec("rtn:4:head=maybe")
