"""Integration on the embedded default model (SmolLM2-135M-Instruct): exactness and quality floors on real text."""

from __future__ import annotations

import random

import pytest
import torch

from memfit.adapters.transformers import forward
from memfit.api import make_cache
from memfit.core.method import all_methods
from memfit.engine import encode_prompts, generate, pad_left, positions_from_mask

pytestmark = pytest.mark.model

EVICTION = sorted(n for n, c in all_methods().items() if c.family in ("eviction", "reference"))


def prose(n_words: int, seed: int = 0) -> str:
    """Natural English prose from the standard library's pydoc topics (always available offline)."""
    from pydoc_data.topics import topics

    words = " ".join(topics[k] for k in sorted(topics)).split()
    start = random.Random(seed).randrange(0, len(words) - n_words)
    return " ".join(words[start : start + n_words])


def noise(n_sentences: int) -> list[str]:
    return ["The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."] * n_sentences


@pytest.mark.parametrize("method", EVICTION)
def test_unlimited_budget_reproduces_full_logits(default_model, method):
    model, tok = default_model
    ids, mask = pad_left([tok(prose(220, s))["input_ids"] for s in (1, 2)], tok.pad_token_id)
    feed = torch.tensor([[tok.eos_token_id + 100] * 3, [tok.eos_token_id + 200] * 3])
    with torch.no_grad():
        cache = make_cache(model, method, None)
        pos = positions_from_mask(mask)
        got = [forward(model, ids, mask, cache, pos)[:, -1]]
        full_ids, full_mask = ids, mask
        ref = [model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]]
        for i in range(3):
            full_ids = torch.cat([full_ids, feed[:, i : i + 1]], 1)
            full_mask = torch.cat([full_mask, torch.ones_like(feed[:, :1])], 1)
            fpos = positions_from_mask(full_mask)
            got.append(forward(model, feed[:, i : i + 1], full_mask, cache, fpos[:, -1:])[:, -1])
            ref.append(model(input_ids=full_ids, attention_mask=full_mask, position_ids=fpos).logits[:, -1])
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, atol=2e-4, rtol=1e-4)


def needle_prompt(tok, depth: float, key: str = "71432") -> str:
    filler = noise(60)  # ~1.2K tokens of RULER's repeated noise: the full cache scores 100 % here (DESIGN §5)
    at = int(len(filler) * depth)
    filler.insert(at, f"The pass key is {key}. Remember it. {key} is the pass key.")
    return " ".join(filler) + "\nWhat is the pass key? The pass key is"


# H2O is not in this list on purpose: its accumulated score favours early tokens and it loses the pass key here
# even at budget 0.5 (as the SnapKV paper reports for needle tests); the bench shows that loss.
@pytest.mark.parametrize("method, budget", [("full", None), ("snapkv", 0.25)])
def test_needle_is_retrieved(default_model, method, budget):
    model, tok = default_model
    keys = ["71432", "58209"]
    prompts = [needle_prompt(tok, d, k) for d, k in zip((0.3, 0.7), keys, strict=True)]
    ids, mask = encode_prompts(tok, prompts, chat=False)
    cache = make_cache(model, method, budget)
    gen = generate(model, ids, mask, cache, max_new_tokens=6, eos_token_ids=[tok.eos_token_id])
    answers = [tok.decode(t) for t in gen.tokens]
    for key, answer in zip(keys, answers, strict=True):
        assert key in answer, (method, answers)
    if budget is not None:
        assert cache.nbytes() < 0.35 * cache.full_nbytes()


def test_snapkv_fidelity_on_prose(default_model):
    """Teacher-forced continuation of natural prose: SnapKV at half the prompt agrees with the full cache's
    next-token choice most of the time, and streaming at an eighth agrees less (compression damage is visible)."""
    model, tok = default_model
    text_ids = tok(prose(900, seed=7))["input_ids"]
    prompt, cont = text_ids[:700], text_ids[700:732]
    ids, mask = pad_left([prompt], tok.pad_token_id)

    def continuation_argmax(method, budget):
        cache = make_cache(model, method, budget)
        out = []
        with torch.no_grad():
            pos = positions_from_mask(mask)
            logits = forward(model, ids, mask, cache, pos)[:, -1]
            m, last = mask, pos[:, -1:]
            for tok_id in cont:
                out.append(int(logits.argmax(-1)))
                m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
                last = last + 1
                logits = forward(model, torch.tensor([[tok_id]]), m, cache, last)[:, -1]
        return out

    full = continuation_argmax("full", None)
    snap = continuation_argmax("snapkv", 0.5)
    agree = sum(a == b for a, b in zip(full, snap, strict=True)) / len(full)
    assert agree >= 0.75, agree
