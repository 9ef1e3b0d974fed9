"""Quality floors on natural prose (issue #12): every eviction method must retrieve a mid-prompt fact better than
StreamingLLM *and* a random selector at the same budget, so a broken selector — or one that keeps random tokens —
fails. Methods that genuinely cannot (question-agnostic scores on this model) are listed in EXCEPTIONS with the
measured reason and must still keep the local context that a random selector destroys.
Cost: 1423 s on the shared 2-core box at load average ~20 (about 10x an idle core), kvzip and the H2O-style
prefill scoring being the slowest.

Prompts: two `niah_single_number` samples (a 7-digit value in pydoc prose, ~512 tokens, needle at 30 % and 50 %
depth, plain text), one left-padded batch. Metric: the mean log-probability of the answer's tokens (" " + 7 digits)
under teacher forcing after the compressed prompt, averaged over both prompts — continuous, so it does not depend on
this 135M model answering perfectly. The full cache sits near 0; StreamingLLM at 1/4 keeps only sinks and the last
quarter (the needle is out of it) and must guess the digits.
Measured figures and exceptions: benchmarks/claims.md, "Quality floors".
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from memfit.adapters.transformers import forward
from memfit.api import make_cache
from memfit.core.contract import Selection
from memfit.core.method import REGISTRY, Method, all_methods
from memfit.engine import pad_left, positions_from_mask, prefill_prompt

pytestmark = pytest.mark.model

BUDGET = 0.25
MARGIN = 0.5  # nats per answer token above streaming (full - streaming is ~2 nats per token here)
# Methods that genuinely cannot beat StreamingLLM on this retrieval floor (measured, benchmarks/claims.md): they must
# still beat a random selector, so a broken implementation fails anyway.
# Measured 2026-11-29 (answer log-prob per token; full -0.03, streaming -2.29, random selector -1.75):
EXCEPTIONS: dict[str, str] = {
    "h2o": "accumulated attention (column sums) is question-agnostic and favours early tokens: the needle is dropped",
    "keyformer": "H2O's accumulation with Gumbel noise: question-agnostic, the needle is dropped",
    "scissorhands": "persistence-of-importance counts are question-agnostic: -2.10, the needle is dropped",
}
EXCEPTION_MARGIN = 0.3  # nats per question token below the random selector
RANDOM_MARGIN = 0.2  # nats per answer token above a random selector at the same budget (a random 1/4 beats streaming)
EVICTION = sorted(n for n, c in all_methods().items() if c.family == "eviction" and n != "streaming")


@pytest.fixture(scope="module")
def needles(default_model):
    from memfit.bench.tasks import generate_sample

    model, tok = default_model
    samples = [generate_sample("niah_single_number", tok, 512, seed=s, filler="natural", depth=d)
               for s, d in ((1, 0.3), (2, 0.5))]
    ids, mask = pad_left([tok(s.prompt)["input_ids"] for s in samples], tok.pad_token_id)
    answers = torch.tensor([tok(" " + s.answers[0], add_special_tokens=False)["input_ids"] for s in samples])
    return model, ids, mask, answers


def answer_logprob(needles, method: str, budget: float | None) -> float:
    """Mean log-probability of the answer tokens, teacher-forced after the prompt (decode-time eviction applies)."""
    model, ids, mask, answers = needles
    cache = make_cache(model, method, budget)
    total = 0.0
    with torch.no_grad():
        logits, m = prefill_prompt(model, ids, mask, cache)  # the engine's prefill: GemFilter's prompt selection applies
        pos = positions_from_mask(m)[:, -1:]
        for t in range(answers.shape[1]):
            total += float(torch.log_softmax(logits.float(), -1).gather(-1, answers[:, t : t + 1]).mean())
            if t == answers.shape[1] - 1:
                break
            m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
            pos = pos + 1
            logits = forward(model, answers[:, t : t + 1], m, cache, pos)[:, -1]
    return total / answers.shape[1]


def question_nll(needles, method: str, budget: float | None, tail: int = 24) -> float:
    """Mean NLL of the prompt's last `tail` tokens (the question), teacher-forced after the compressed rest of the
    prompt: local language modelling, which recent-window methods keep and a random selector breaks."""
    model, ids, mask, _ = needles
    head, rest = ids[:, :-tail], ids[:, -tail:]
    cache = make_cache(model, method, budget)
    total = 0.0
    with torch.no_grad():
        logits, m = prefill_prompt(model, head, mask[:, :-tail], cache)
        pos = positions_from_mask(m)[:, -1:]
        for t in range(tail):
            total -= float(torch.log_softmax(logits.float(), -1).gather(-1, rest[:, t : t + 1]).mean())
            m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
            pos = pos + 1
            logits = forward(model, rest[:, t : t + 1], m, cache, pos)[:, -1]
    return total / tail


@dataclass
class _RandomKeep(Method):
    """A selector that keeps random tokens (plus nothing protected): what the floor must reject."""

    name = "test-random-keep"
    family = "eviction"
    acts = "prefill"

    def after_attention(self, layer, queries, scaling, info) -> Selection | None:
        if info.is_prefill and info.keep is not None:
            gen = torch.Generator().manual_seed(info.layer_idx)
            return Selection(torch.rand(layer.keys.shape[:3], generator=gen))
        return None


@pytest.fixture(scope="module")
def floors(needles):
    REGISTRY[_RandomKeep.name] = _RandomKeep
    try:
        random = answer_logprob(needles, _RandomKeep.name, BUDGET)
        random_nll = question_nll(needles, _RandomKeep.name, BUDGET) if EXCEPTIONS else None
    finally:
        del REGISTRY[_RandomKeep.name]
    return {"full": answer_logprob(needles, "full", None), "streaming": answer_logprob(needles, "streaming", BUDGET),
            "random": random, "random_question_nll": random_nll}


def test_floor_separates_full_streaming_and_random(floors):
    # the floor can fail: the full cache knows the answer, streaming and a random selector do not
    assert floors["full"] > -0.7, floors
    assert floors["full"] > floors["streaming"] + 2 * MARGIN, floors
    # a random 1/4 keeps some needle digits by chance (it beats streaming here), but stays far below the full cache
    assert floors["random"] < floors["full"] - 2 * MARGIN, floors


@pytest.mark.parametrize("method", EVICTION)
def test_method_beats_streaming_on_prose_needles(needles, floors, method):
    if method in EXCEPTIONS:
        # cannot retrieve mid-prompt facts at 1/4 on this model (measured; see EXCEPTIONS), but must still keep the
        # local context a random selector destroys
        nll = question_nll(needles, method, BUDGET)
        assert nll < floors["random_question_nll"] - EXCEPTION_MARGIN, (method, nll, floors, EXCEPTIONS[method])
        return
    got = answer_logprob(needles, method, BUDGET)
    # measured on the idle 2-core box (answer log-prob per token): snapkv, tova, gemfilter clear random by > 0.5;
    # kvzip -1.48 and windowkv -1.37 clear streaming (-2.29) by > 0.8 and random (-1.75) by 0.27 and 0.38
    assert got > floors["streaming"] + MARGIN, (method, got, floors)
    assert got > floors["random"] + RANDOM_MARGIN, (method, got, floors)
