"""Quality metrics of the bench: task scores (RULER-style string matching) and fidelity to the full cache.

Task scores compare a generated answer with the reference strings:

- ``string_match_all`` (alias ``exact_match``): the fraction of reference strings contained in the prediction,
  case-insensitive. RULER scores its needle, variable-tracking and common-words tasks this way.
- ``string_match_part``: 1 if any reference string is contained in the prediction (for tasks where one of several
  answers suffices).

Fidelity compares a method's logits with the full cache's logits on the same tokens (teacher-forced):

- ``kl_divergence``: mean next-token KL(P_full || P_method) in nats, computed in float32 with ``log_softmax``.
- ``top1_agreement``: fraction of positions where both argmaxes agree.
- ``perplexity``: exp of the mean negative log-likelihood of target tokens.
- ``answer_agreement``: how much of two generated answers agree (common word prefix / longer length).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "TASK_METRICS",
    "answer_agreement",
    "exact_match",
    "kl_divergence",
    "normalize_answer",
    "perplexity",
    "score_prediction",
    "string_match_all",
    "string_match_part",
    "top1_agreement",
]


def _answers(answers: str | Sequence[str]) -> list[str]:
    return [answers] if isinstance(answers, str) else list(answers)


def string_match_all(prediction: str, answers: str | Sequence[str]) -> float:
    """Fraction of ``answers`` found (case-insensitive substring) in ``prediction``; 1.0 when there are none."""
    refs = _answers(answers)
    if not refs:
        return 1.0
    pred = prediction.lower()
    return sum(ref.lower() in pred for ref in refs) / len(refs)


def exact_match(prediction: str, answers: str | Sequence[str]) -> float:
    """RULER's "exact match" for its synthetic tasks: the same as ``string_match_all``."""
    return string_match_all(prediction, answers)


def string_match_part(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 if any of ``answers`` is found (case-insensitive substring) in ``prediction``, else 0.0."""
    refs = _answers(answers)
    if not refs:
        return 1.0
    pred = prediction.lower()
    return float(any(ref.lower() in pred for ref in refs))


TASK_METRICS = {
    "niah_single_number": string_match_all,
    "niah_single_word": string_match_all,
    "niah_single_uuid": string_match_all,
    "niah_multikey": string_match_all,
    "niah_multivalue": string_match_all,
    "niah_multiquery": string_match_all,
    "variable_tracking": string_match_all,
    "common_words": string_match_all,
}
"""The scoring function of each generated-answer task."""


def score_prediction(task: str, prediction: str, answers: str | Sequence[str]) -> float:
    """Score one prediction with the task's metric (``string_match_all`` for tasks not listed)."""
    return TASK_METRICS.get(task, string_match_all)(prediction, answers)


def normalize_answer(text: str) -> list[str]:
    """Lower-cased words of ``text`` with surrounding punctuation stripped."""
    words = (w.strip(".,;:!?\"'()[]{}") for w in text.lower().split())
    return [w for w in words if w]


def answer_agreement(a: str, b: str) -> float:
    """Agreement of two generated answers: length of their common word prefix over the longer length.

    Greedy decodes from the full cache and from a method agree token for token until they diverge; this measures
    how far they agree (1.0: same words after normalisation; 0.0: the first word already differs).
    """
    wa, wb = normalize_answer(a), normalize_answer(b)
    longest = max(len(wa), len(wb))
    if longest == 0:
        return 1.0
    common = 0
    for x, y in zip(wa, wb, strict=False):
        if x != y:
            break
        common += 1
    return common / longest


def _flat_logits(logits: torch.Tensor | Sequence[float], name: str) -> torch.Tensor:
    t = torch.as_tensor(logits)
    if t.dim() == 0:
        raise ValueError(f"{name} must have a vocabulary dimension, got a scalar")
    return t.detach().to(torch.float32).reshape(-1, t.shape[-1])


def _flat_mask(mask: torch.Tensor | Sequence[bool] | None, rows: int) -> torch.Tensor | None:
    if mask is None:
        return None
    m = torch.as_tensor(mask).reshape(-1).to(torch.bool)
    if m.numel() != rows:
        raise ValueError(f"mask has {m.numel()} positions, logits have {rows}")
    return m


def _pair(ref_logits: torch.Tensor, test_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ref = _flat_logits(ref_logits, "ref_logits")
    test = _flat_logits(test_logits, "test_logits")
    if ref.shape != test.shape:
        raise ValueError(f"logit shapes differ: {tuple(ref_logits.shape)} vs {tuple(test_logits.shape)}")
    return ref, test


def kl_divergence(
    ref_logits: torch.Tensor,
    test_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> float:
    """Mean over positions of KL(P_ref || P_test) in nats.

    ``ref_logits`` (the full cache) and ``test_logits`` have the same shape ``[..., vocab]``; ``mask`` (shape
    ``[...]``) selects positions. Computed in float32; tokens with zero reference probability contribute nothing.
    """
    ref, test = _pair(ref_logits, test_logits)
    log_p = torch.log_softmax(ref, dim=-1)
    log_q = torch.log_softmax(test, dim=-1)
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    per_position = terms.sum(dim=-1).clamp_min(0.0)
    m = _flat_mask(mask, per_position.shape[0])
    if m is not None:
        per_position = per_position[m]
    if per_position.numel() == 0:
        return float("nan")
    return float(per_position.mean())


def top1_agreement(
    ref_logits: torch.Tensor,
    test_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> float:
    """Fraction of positions where the argmax of ``test_logits`` equals the argmax of ``ref_logits``."""
    ref, test = _pair(ref_logits, test_logits)
    same = ref.argmax(dim=-1) == test.argmax(dim=-1)
    m = _flat_mask(mask, same.shape[0])
    if m is not None:
        same = same[m]
    if same.numel() == 0:
        return float("nan")
    return float(same.float().mean())


def perplexity(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> float:
    """exp(mean negative log-likelihood) of ``targets`` under ``logits``.

    ``logits[..., t, :]`` is the prediction for ``targets[..., t]`` (shift before calling: for a causal LM pass
    ``logits[:, :-1]`` and ``input_ids[:, 1:]``). Targets equal to ``ignore_index`` are skipped.
    """
    flat = _flat_logits(logits, "logits")
    tgt = torch.as_tensor(targets).reshape(-1).to(torch.long)
    if tgt.numel() != flat.shape[0]:
        raise ValueError(f"{tgt.numel()} targets for {flat.shape[0]} logit rows")
    keep = tgt != ignore_index
    if not bool(keep.any()):
        return float("nan")
    log_probs = torch.log_softmax(flat[keep], dim=-1)
    nll = -log_probs.gather(-1, tgt[keep].unsqueeze(-1)).squeeze(-1)
    return math.exp(float(nll.mean()))
