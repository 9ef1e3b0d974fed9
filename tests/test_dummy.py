"""The random-weight checkpoint that tensor-parallel ranks load (memfit.dummy.dummy_checkpoint): written one tensor
at a time, yet bit-identical to the weights `load_dummy` draws in one process, and loadable by transformers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import memfit.dummy as dummy

BASE = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 300, "max_position_embeddings": 512, "bos_token_id": 1, "eos_token_id": 2}
CONFIGS = {
    "llama": {"model_type": "llama", "num_hidden_layers": 2, "tie_word_embeddings": False, **BASE},
    "llama-tied": {"model_type": "llama", "num_hidden_layers": 2, "tie_word_embeddings": True, **BASE},
    "qwen2": {"model_type": "qwen2", "num_hidden_layers": 3, **BASE},  # q/k/v biases: 1-D, zero-initialised
    "gemma3_text": {"model_type": "gemma3_text", "num_hidden_layers": 4, "head_dim": 16, "sliding_window": 8,
                    "layer_types": ["sliding_attention", "full_attention"] * 2, **BASE},  # norms start at zero
}


def _spec(tmp_path, name: str) -> str:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(CONFIGS[name]))
    return str(path)


def _written(folder) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        part = load_file(file)
        assert not set(part) & set(tensors)
        tensors.update(part)
    return tensors


@pytest.mark.parametrize("name", list(CONFIGS))
def test_checkpoint_tensors_equal_load_dummy(name, tmp_path, monkeypatch):
    """Every tensor written equals load_dummy's parameter of that name, bit for bit (random >= 2-D weights and the
    1-D norms/biases alike), with one file per <= shard_bytes shard and transformers' index."""
    monkeypatch.setenv("MEMFIT_CACHE", str(tmp_path / "cache"))
    spec = _spec(tmp_path, name)
    dtype = torch.bfloat16 if name == "llama" else torch.float32
    shard_bytes = 40_000
    folder = dummy.dummy_checkpoint(spec, dtype, torch.device("cpu"), shard_bytes=shard_bytes)
    model, _ = dummy.load_dummy(spec, dtype, torch.device("cpu"))
    expected = dict(model.named_parameters())
    got = _written(folder)
    assert list(got) and set(got) == set(expected)
    assert ("lm_head.weight" in got) == (not model.config.tie_word_embeddings)
    for key, value in expected.items():
        assert got[key].dtype == dtype and torch.equal(got[key], value.detach()), key
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(files) > 1 and sorted(set(index["weight_map"].values())) == files
    assert set(index["weight_map"]) == set(expected)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in expected.values())
    for file in files:  # a shard over the limit holds one tensor only
        part = load_file(folder / file)
        assert sum(v.numel() * v.element_size() for v in part.values()) <= shard_bytes or len(part) == 1
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no leftover temporary folder


@pytest.mark.parametrize("tied", [False, True])
def test_checkpoint_loads_as_load_dummy(tied, tmp_path, monkeypatch):
    """from_pretrained on the folder (sharded or one file) gives load_dummy's model: same logits, the LM head tied
    again when the config ties it."""
    monkeypatch.setenv("MEMFIT_CACHE", str(tmp_path / "cache"))
    spec = _spec(tmp_path, "llama-tied" if tied else "llama")
    cpu = torch.device("cpu")
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]])
    ref, _ = dummy.load_dummy(spec, torch.float32, cpu)
    with torch.no_grad():
        want = ref(ids).logits
    for shard_bytes in (None, 100_000):
        monkeypatch.setenv("MEMFIT_CACHE", str(tmp_path / f"cache-{shard_bytes}"))
        folder = dummy.dummy_checkpoint(spec, torch.float32, cpu, shard_bytes=shard_bytes)
        assert (folder / "model.safetensors.index.json").is_file() == (shard_bytes is not None)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
        assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
        with torch.no_grad():
            assert torch.equal(model(ids).logits, want)


def test_checkpoint_never_builds_the_whole_model(tmp_path, monkeypatch):
    """The writer does not go through load_dummy (the whole model on one device); a second call is a lookup; a
    write that fails part-way leaves no folder behind."""
    monkeypatch.setenv("MEMFIT_CACHE", str(tmp_path / "cache"))
    spec = _spec(tmp_path, "qwen2")

    def refuse(*_a, **_k):
        raise AssertionError("the checkpoint writer must not build the whole model")

    monkeypatch.setattr(dummy, "load_dummy", refuse)
    folder = dummy.dummy_checkpoint(spec, torch.float32, torch.device("cpu"))
    monkeypatch.setattr(dummy, "_write_weights", refuse)
    assert dummy.dummy_checkpoint(spec, torch.float32, torch.device("cpu")) == folder

    calls = []

    def fail_second(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(*args, **kwargs)

    import safetensors.torch

    real_save = safetensors.torch.save_file
    monkeypatch.undo()
    monkeypatch.setenv("MEMFIT_CACHE", str(tmp_path / "cache2"))
    monkeypatch.setattr(safetensors.torch, "save_file", fail_second)
    with pytest.raises(OSError, match="disk full"):
        dummy.dummy_checkpoint(spec, torch.float32, torch.device("cpu"), shard_bytes=40_000)
    assert list((tmp_path / "cache2" / "dummy").iterdir()) == []
