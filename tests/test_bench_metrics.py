"""Bench metrics on hand-made cases: string matching, KL, top-1 agreement, perplexity, answer agreement."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memfit.bench.metrics import (
    answer_agreement,
    exact_match,
    kl_divergence,
    perplexity,
    score_prediction,
    string_match_all,
    string_match_part,
    top1_agreement,
)

# ------------------------------------------------------------------------------------------ string matching


def test_string_match_all_fraction_case_insensitive() -> None:
    assert string_match_all("The number is 1234567.", ["1234567"]) == 1.0
    assert string_match_all("nothing here", ["1234567"]) == 0.0
    assert string_match_all("Values: 111, 333", ["111", "222", "333", "444"]) == 0.5
    assert string_match_all("the word is PELICAN", ["pelican"]) == 1.0
    assert string_match_all("XKQZB and abcde", ["xkqzb", "ABCDE", "QQQQQ"]) == pytest.approx(2 / 3)
    assert string_match_all("anything", []) == 1.0
    assert string_match_all("uuid 1234", "1234") == 1.0  # a single string is one answer, not characters
    assert exact_match("Values: 111, 333", ["111", "222"]) == 0.5


def test_string_match_part_any() -> None:
    assert string_match_part("it is 222", ["111", "222"]) == 1.0
    assert string_match_part("it is 999", ["111", "222"]) == 0.0
    assert string_match_part("It Is Paris", ["paris", "london"]) == 1.0


def test_score_prediction_uses_task_metric() -> None:
    assert score_prediction("niah_multivalue", "1 and 3", ["1", "2", "3", "4"]) == 0.5
    assert score_prediction("common_words", "apple, pear", ["apple", "pear", "fig", "kiwi"]) == 0.5


# ------------------------------------------------------------------------------------------------------ KL


def test_kl_identical_is_zero() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 50, generator=g)
    assert kl_divergence(logits, logits) == pytest.approx(0.0, abs=1e-6)
    assert kl_divergence(logits, logits + 3.0) == pytest.approx(0.0, abs=1e-5)  # shift-invariant


def test_kl_hand_computed_example() -> None:
    # P = (0.5, 0.5), Q = (0.25, 0.75): KL = 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.5 ln 2 + 0.5 ln(2/3)
    p = torch.log(torch.tensor([[0.5, 0.5]]))
    q = torch.log(torch.tensor([[0.25, 0.75]]))
    expected = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    assert kl_divergence(p, q) == pytest.approx(expected, rel=1e-5)
    # the direction matters: KL(Q || P) = 0.25 ln(0.5) + 0.75 ln(1.5)
    assert kl_divergence(q, p) == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), rel=1e-5)


def test_kl_mean_over_positions_and_mask() -> None:
    p = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.5]]))
    q = torch.log(torch.tensor([[0.5, 0.5], [0.25, 0.75]]))
    one = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    assert kl_divergence(p, q) == pytest.approx(one / 2, rel=1e-5)
    assert kl_divergence(p, q, mask=torch.tensor([False, True])) == pytest.approx(one, rel=1e-5)
    assert kl_divergence(p, q, mask=torch.tensor([True, False])) == pytest.approx(0.0, abs=1e-7)


def test_kl_bf16_inputs_computed_in_fp32() -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(4, 1000, generator=g) * 5
    b = a + 0.1 * torch.randn(4, 1000, generator=g)
    ref = kl_divergence(a.bfloat16().float(), b.bfloat16().float())
    assert kl_divergence(a.bfloat16(), b.bfloat16()) == pytest.approx(ref, rel=1e-6)
    assert ref > 0


def test_kl_zero_probability_reference_tokens() -> None:
    p = torch.tensor([[0.0, float("-inf")]])  # reference puts all mass on token 0
    q = torch.log(torch.tensor([[0.5, 0.5]]))
    assert kl_divergence(p, q) == pytest.approx(math.log(2), rel=1e-6)
    assert math.isinf(kl_divergence(q, p))  # the method rules out a token the reference allows


def test_kl_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="shapes differ"):
        kl_divergence(torch.zeros(2, 5), torch.zeros(2, 6))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-20, 20), min_size=2, max_size=8), st.lists(st.floats(-20, 20), min_size=2, max_size=8))
def test_kl_is_non_negative(a: list[float], b: list[float]) -> None:
    n = min(len(a), len(b))
    assert kl_divergence(torch.tensor([a[:n]]), torch.tensor([b[:n]])) >= 0.0


# ---------------------------------------------------------------------------------------------------- top-1


def test_top1_agreement_constructed() -> None:
    ref = torch.zeros(4, 5)
    test = torch.zeros(4, 5)
    for i, (r, t) in enumerate([(0, 0), (1, 1), (2, 3), (4, 4)]):
        ref[i, r] = 1.0
        test[i, t] = 2.0
    assert top1_agreement(ref, test) == 0.75
    assert top1_agreement(ref, test, mask=torch.tensor([True, True, True, False])) == pytest.approx(2 / 3)
    assert top1_agreement(ref.view(2, 2, 5), test.view(2, 2, 5)) == 0.75


# ----------------------------------------------------------------------------------------------- perplexity


@pytest.mark.parametrize("vocab", [2, 17, 1000])
def test_perplexity_of_uniform_logits_is_vocab_size(vocab: int) -> None:
    logits = torch.zeros(3, 9, vocab)
    targets = torch.randint(0, vocab, (3, 9), generator=torch.Generator().manual_seed(vocab))
    assert perplexity(logits, targets) == pytest.approx(vocab, rel=1e-5)


def test_perplexity_hand_computed_and_ignore_index() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]))
    targets = torch.tensor([0, 2])
    assert perplexity(logits, targets) == pytest.approx(math.exp(-(math.log(0.5) + math.log(0.8)) / 2), rel=1e-5)
    assert perplexity(logits, torch.tensor([0, -100])) == pytest.approx(2.0, rel=1e-5)
    confident = torch.full((2, 3), -1e4)
    confident[0, 1] = confident[1, 2] = 0.0
    assert perplexity(confident, torch.tensor([1, 2])) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="targets"):
        perplexity(logits, torch.tensor([0, 1, 2]))


# --------------------------------------------------------------------------------------------- agreement


def test_answer_agreement() -> None:
    assert answer_agreement("The number is 42.", "the number is 42") == 1.0
    assert answer_agreement("", "") == 1.0
    assert answer_agreement("1234567 and more", "7654321 and more") == 0.0
    assert answer_agreement("alpha beta gamma delta", "alpha beta zeta delta") == 0.5
    assert answer_agreement("alpha beta", "alpha beta gamma delta") == 0.5
    assert answer_agreement("a b", "b a") == answer_agreement("b a", "a b") == 0.0
