"""memfit plan: KV predictions equal the stores' nbytes() exactly, peak predictions stay within 10 % of the
measured peak on the default model, and memory below the smallest configuration is one clear error."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from memfit.api import make_cache
from memfit.engine import generate
from memfit.plan import kv_bytes, model_shape, plan

CFG = dict(vocab_size=128, hidden_size=128, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=2048, attn_implementation="sdpa")

CASES = [  # (method, budget, params): dense, evicted (prefill-only and every step), quantized, evicted + quantized
    ("full", None, {}),
    ("snapkv", "0.25", {}),
    ("snapkv", "40", {}),
    ("streaming", "0.25", {}),
    ("h2o", "0.5", {}),
    ("kivi", None, {}),
    ("kivi", None, {"kivi.bits": "4", "kivi.residual": "64"}),
    ("kivi", None, {"kivi.key_residual": "sliding"}),
    ("snapkv+kivi", "0.5", {}),
]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**CFG)).eval()


@pytest.mark.parametrize("method,budget,params", CASES)
@pytest.mark.parametrize("tokens,new", [(300, 1), (250, 10)])  # (250, 10): a KIVI key flush while decoding
def test_kv_prediction_equals_nbytes(tiny, method, budget, params, tokens, new):
    ids = torch.randint(0, 128, (2, tokens), generator=torch.Generator().manual_seed(0))
    cache = make_cache(tiny, method, budget, params)
    gen = generate(tiny, ids, torch.ones_like(ids), cache, max_new_tokens=new)
    pred = kv_bytes(model_shape(tiny.config, torch.float32), method, budget, params, tokens, gen.decode_steps, 2)
    assert pred.exact
    assert pred.bytes == cache.nbytes(), (pred, cache.nbytes())
    assert pred.full_bytes == cache.full_nbytes()


def test_shape_from_config_counts_every_parameter(tiny):
    shape = model_shape(tiny.config, torch.float32)
    assert shape.weight_bytes == sum(p.numel() * 4 for p in tiny.parameters()) + sum(
        b.numel() * b.element_size() for b in tiny.buffers())
    assert shape.model.device.type == "meta" if hasattr(shape.model, "device") else True


def test_plan_fits_and_commands():
    p = plan("llama-3.1-8b", 24 * 2**30, 32768, device="cuda")
    assert p.fits and all(f.peak_bytes <= 24 * 2**30 for f in p.fits)
    assert all(f.command.startswith("memfit run --model llama-3.1-8b --load-format dummy") for f in p.fits)
    times = [f.decode_seconds_per_token for f in p.fits]
    assert times == sorted(times)
    assert p.weights_by_bits[16] > p.weights_by_bits[8] > p.weights_by_bits[4] > p.weights_by_bits[2]
    # 8 GiB cannot hold the 8B weights (15 GiB in bf16): every suggestion streams them within the memory
    small = plan("llama-3.1-8b", 8 * 2**30, 32768, device="cuda")
    assert small.fits and all(f.weights_memory is not None and "--weights-memory" in f.command for f in small.fits)


def test_plan_below_minimum_is_one_clear_error(monkeypatch, capsys):
    from memfit.cli import main

    monkeypatch.setattr(sys, "argv", ["memfit", "plan", "--model", "llama-3.1-8b", "--memory", "1GiB",
                                      "--context", "32768", "--device", "cuda"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_info.value.code == 2 and len(lines) == 1 and lines[0].startswith("error:"), err
    assert "below the smallest configuration" in err and "needs" in err and "memfit run" in err


def test_plan_json(monkeypatch, capsys):
    from memfit.cli import main

    monkeypatch.setattr(sys, "argv", ["memfit", "plan", "--memory", "2GiB", "--context", "1024", "--json"])
    main()
    d = json.loads(capsys.readouterr().out)
    assert d["fits"] and d["weights_by_bits"] and d["fits"][0]["command"].startswith("memfit run --model default")


@pytest.mark.model
@pytest.mark.parametrize("method,budget,params", [("full", None, {}), ("snapkv", "0.25", {}), ("kivi", None, {})])
def test_default_model_kv_prediction_is_exact(default_model, method, budget, params):
    model, tok = default_model
    ids = torch.randint(0, 1000, (1, 160), generator=torch.Generator().manual_seed(0))
    cache = make_cache(model, method, budget, params)
    gen = generate(model, ids, torch.ones_like(ids), cache, max_new_tokens=3)
    shape = model_shape(model.config, next(model.parameters()).dtype)
    assert kv_bytes(shape, method, budget, params, 160, gen.decode_steps).bytes == cache.nbytes()


PEAK_TOLERANCE = 0.10


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--weights-memory", "250MiB", "--offload-policy", "tpi"]])
def test_default_model_peak_within_tolerance(extra):
    """A separate process, so its RSS is a run's own (the CPU peak is the process's peak RSS)."""
    import subprocess

    r = subprocess.run([sys.executable, "-m", "memfit.cli", "run", "--context", "512", "--max-new-tokens", "4",
                        "--json", *extra], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout.strip().splitlines()[-1])
    assert d["predicted"]["kv_bytes"] == d["kv_bytes_held"]
    assert abs(d["predicted_peak_memory_bytes"] - d["peak_memory_bytes"]) <= PEAK_TOLERANCE * d["peak_memory_bytes"]
