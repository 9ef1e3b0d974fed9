"""RULER-style task generators: lengths, needle placement and uniqueness, determinism, task correctness."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from memfit.bench.tasks import (
    ALL_TASKS,
    LENGTH_TOLERANCE,
    NIAH_TASKS,
    SINGLE_NEEDLE_TASKS,
    TaskSample,
    count_tokens,
    generate_sample,
    generate_samples,
    natural_paragraphs,
    pydoc_paragraphs,
)
from memfit.bench.testing import toy_tokenizer
from memfit.errors import ConfigError

ANSWER_TASKS = [t for t in ALL_TASKS if t not in ("ppl", "fidelity")]


@pytest.fixture(scope="module")
def tok():
    return toy_tokenizer()


def _within(tokens: int, target: int) -> bool:
    return abs(tokens - target) <= LENGTH_TOLERANCE * target


# ------------------------------------------------------------------------------------------------- lengths


@pytest.mark.parametrize("filler", ["natural", "noise"])
@pytest.mark.parametrize("length", [384, 2048])
@pytest.mark.parametrize("task", ALL_TASKS)
def test_prompt_hits_target_length(tok, task: str, length: int, filler: str) -> None:
    s = generate_sample(task, tok, length, seed=11, filler=filler)
    measured = count_tokens(tok, s.prompt)
    assert s.context_tokens == measured
    assert _within(measured, length), (task, length, measured)
    assert s.target_tokens == length
    assert s.prompt.endswith(s.question)
    if task not in ("ppl", "fidelity"):
        assert s.question and s.context and s.prompt == s.context + s.question


@pytest.mark.parametrize("task", ["niah_single_number", "variable_tracking", "common_words", "ppl"])
def test_long_context_length(tok, task: str) -> None:
    s = generate_sample(task, tok, 12_000, seed=2)
    assert _within(count_tokens(tok, s.prompt), 12_000)


def test_target_too_short_is_a_clear_error(tok) -> None:
    with pytest.raises(ConfigError, match="too short"):
        generate_sample("niah_multiquery", tok, 40, seed=0)


def test_bad_inputs(tok) -> None:
    with pytest.raises(ConfigError, match="unknown task"):
        generate_sample("niah_nope", tok, 512)
    with pytest.raises(ConfigError, match="unknown option"):
        generate_sample("niah_single_number", tok, 512, num_keys=3)
    with pytest.raises(ConfigError, match="filler"):
        generate_sample("niah_single_number", tok, 512, filler="lorem")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="depth"):
        generate_sample("niah_single_number", tok, 512, depth=1.5)
    with pytest.raises(ConfigError, match="corpus"):
        generate_sample("niah_single_number", tok, 512, corpus=Path("/nonexistent/book.txt"))


# -------------------------------------------------------------------------------------------------- needles


@pytest.mark.parametrize("filler", ["natural", "noise"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("task", NIAH_TASKS)
def test_needle_values_occur_exactly_once_in_the_context(tok, task: str, seed: int, filler: str) -> None:
    s = generate_sample(task, tok, 1024, seed=seed, filler=filler)
    values = s.meta["values"]
    low_prompt, low_context = s.prompt.lower(), s.context.lower()
    for v in values:
        assert low_prompt.count(v.lower()) == 1, v
        assert v.lower() in low_context
        needle = f"The special magic {s.meta['value_type']} for "
        i = s.prompt.index(v)
        assert needle in s.prompt[max(0, i - 80) : i]  # the value sits in its needle sentence
    assert set(s.answers) <= set(values)
    for key in s.meta["asked"]:
        assert key in s.question
    for a in s.answers:
        assert a.lower() not in s.question.lower()


def test_task_shapes(tok) -> None:
    mk = generate_sample("niah_multikey", tok, 1024, seed=5)
    assert len(mk.meta["keys"]) == 4 and len(mk.answers) == 1 and len(mk.meta["asked"]) == 1
    asked = mk.meta["asked"][0]
    assert mk.answers[0] == mk.meta["values"][mk.meta["keys"].index(asked)]
    assert re.search(rf"for {re.escape(asked)} is: {re.escape(mk.answers[0])}\.", mk.prompt)

    mv = generate_sample("niah_multivalue", tok, 1024, seed=5, num_values=3)
    assert len(mv.answers) == 3 and len(set(mv.answers)) == 3
    key = mv.meta["asked"][0]
    for v in mv.answers:
        assert f"for {key} is: {v}." in mv.prompt

    mq = generate_sample("niah_multiquery", tok, 1024, seed=5)
    assert len(mq.answers) == 4
    for k, v in zip(mq.meta["asked"], mq.answers, strict=True):
        assert f"for {k} is: {v}." in mq.prompt

    w = generate_sample("niah_single_word", tok, 1024, seed=5)
    assert w.answers[0].isalpha()
    u = generate_sample("niah_single_uuid", tok, 1024, seed=5)
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", u.answers[0])
    n = generate_sample("niah_single_number", tok, 1024, seed=5)
    assert re.fullmatch(r"\d{7}", n.answers[0])


def test_filler_containing_the_value_is_dropped(tok, tmp_path: Path) -> None:
    """A corpus that repeats the needle value (and the key) everywhere still yields the value exactly once."""
    base = generate_sample("niah_single_number", tok, 1024, seed=9, depth=0.5)
    value, key = base.answers[0], base.meta["keys"][0]
    lines = []
    for i in range(400):
        lines.append(f"Paragraph {i} says the code is {value} today. It mentions {key} too. The river flows north.")
        lines.append(f"Clean paragraph {i} talks about boats and harbours and the weather in the valley.")
    corpus = tmp_path / "poison.txt"
    corpus.write_text("\n\n".join(lines), encoding="utf-8")
    s = generate_sample("niah_single_number", tok, 1024, seed=9, depth=0.5, corpus=corpus)
    assert s.answers == [value]  # values are drawn before the filler, so the poison targets this very sample
    assert s.prompt.count(value) == 1
    assert s.context.count(key) == 1
    assert "the code is" not in s.prompt and "It mentions" not in s.prompt  # the poisoned sentences are gone ...
    assert "The river flows north." in s.prompt and "boats and harbours" in s.prompt  # ... the clean ones stay


def test_word_value_not_hidden_inside_filler_words(tok, tmp_path: Path) -> None:
    base = generate_sample("niah_single_word", tok, 768, seed=4)
    word = base.answers[0]
    corpus = tmp_path / "words.txt"
    corpus.write_text(
        "\n\n".join(
            f"Many {word.upper()}S were seen. The old {word}-keeper waved. Bells rang at noon." for _ in range(300)
        )
        + "\n\n"
        + "\n\n".join("Quiet streets lead to the market square every morning." for _ in range(300)),
        encoding="utf-8",
    )
    s = generate_sample("niah_single_word", tok, 768, seed=4, corpus=corpus)
    assert s.answers == [word]
    assert s.prompt.lower().count(word.lower()) == 1


# ---------------------------------------------------------------------------------------------------- depth


def _realized_depth(tok, s: TaskSample, value: str) -> float:
    start = s.meta["context_start"]
    i = s.prompt.rindex("The special magic", 0, s.prompt.index(value))  # start of the needle sentence
    before = count_tokens(tok, s.prompt[start:i])
    total = count_tokens(tok, s.context[start:])
    return before / total


@pytest.mark.parametrize("filler", ["natural", "noise"])
def test_needle_depth_spread_over_the_context(tok, filler: str) -> None:
    samples = generate_samples("niah_single_number", tok, 2048, n=5, seed=3, filler=filler)
    depths = [s.depth for s in samples]
    assert depths == pytest.approx([0.1, 0.3, 0.5, 0.7, 0.9])
    realized = [_realized_depth(tok, s, s.answers[0]) for s in samples]
    for want, got in zip(depths, realized, strict=True):
        assert abs(want - got) < 0.06, (want, got)
    assert realized == sorted(realized)


def test_explicit_depths_and_extremes(tok) -> None:
    samples = generate_samples("niah_single_uuid", tok, 1024, n=4, seed=1, depths=[0.0, 1.0])
    assert [s.depth for s in samples] == [0.0, 1.0, 0.0, 1.0]
    assert _realized_depth(tok, samples[0], samples[0].answers[0]) == 0.0
    assert _realized_depth(tok, samples[1], samples[1].answers[0]) > 0.9


def test_multi_needle_depths_cover_the_context(tok) -> None:
    realized = []
    for seed in range(4):
        s = generate_sample("niah_multivalue", tok, 1536, seed=seed)
        realized += [_realized_depth(tok, s, v) for v in s.meta["values"]]
    assert min(realized) < 0.25 and max(realized) > 0.75


# ------------------------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("task", ALL_TASKS)
def test_deterministic_for_a_seed_and_different_across_seeds(tok, task: str) -> None:
    a = generate_sample(task, tok, 640, seed=123)
    b = generate_sample(task, tok, 640, seed=123)
    c = generate_sample(task, tok, 640, seed=124)
    assert a.to_dict() == b.to_dict()
    assert a.prompt != c.prompt
    if a.answers:
        assert a.answers != c.answers


def test_sample_sets_reproducible_per_sample(tok) -> None:
    samples = generate_samples("niah_multikey", tok, 768, n=3, seed=7)
    assert len({s.seed for s in samples}) == 3
    again = generate_sample("niah_multikey", tok, 768, seed=samples[1].seed, depth=samples[1].depth)
    assert again.to_dict() == samples[1].to_dict()
    other = generate_samples("niah_multikey", tok, 768, n=3, seed=8)
    assert not {s.seed for s in samples} & {s.seed for s in other}


# ---------------------------------------------------------------------------------------- other tasks


def _resolve_variables(text: str) -> dict[str, str]:
    """Evaluate the VAR statements of a prompt in order (a small interpreter, independent of the generator)."""
    env: dict[str, str] = {}
    for name, rhs in re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", text):
        env[name] = env[rhs[4:]] if rhs.startswith("VAR ") else rhs
    return env


@pytest.mark.parametrize("filler", ["natural", "noise"])
@pytest.mark.parametrize("seed", [0, 1])
def test_variable_tracking_answers_resolve_to_the_value(tok, seed: int, filler: str) -> None:
    s = generate_sample("variable_tracking", tok, 1536, seed=seed, filler=filler, num_chains=2, num_hops=3)
    value = s.meta["values"][0]
    assert s.context.count(value) == 1
    assert value in s.question
    for name in [n for chain in s.meta["chains"] for n in chain]:
        assert s.prompt.count(f"VAR {name} =") == 1
    env = _resolve_variables(s.context)  # raises KeyError if a variable is used before it is defined
    assert sorted(n for n, v in env.items() if v == value) == sorted(s.answers)
    assert len(s.answers) == 4


def test_common_words_answers_are_the_most_frequent(tok) -> None:
    for length in (512, 4096):
        s = generate_sample("common_words", tok, length, seed=6)
        words = re.findall(r"^\d+\. (\S+)$", s.context, flags=re.M)
        counts = Counter(words)
        assert len(s.answers) == 10
        top = {w for w, _ in counts.most_common(10)}
        assert top == set(s.answers)
        rare_max = max(c for w, c in counts.items() if w not in top)
        assert min(counts[w] for w in s.answers) >= 2 * rare_max


@pytest.mark.parametrize("task,cont", [("ppl", 256), ("fidelity", 64)])
def test_text_tasks_cut_exact_token_ids(tok, task: str, cont: int) -> None:
    s = generate_sample(task, tok, 1000, seed=1)
    assert s.prompt_ids is not None and s.continuation_ids is not None
    assert len(s.prompt_ids) == 1000 and len(s.continuation_ids) == cont
    assert s.context_tokens == 1000 and s.answers == [] and s.depth is None
    joined = tok.decode(s.prompt_ids + s.continuation_ids)
    assert joined.startswith(s.prompt)
    assert s.continuation is not None and s.continuation.strip() in joined


# -------------------------------------------------------------------------------------------------- filler


def test_pydoc_filler_is_prose() -> None:
    paras = pydoc_paragraphs()
    assert len(paras) > 300
    assert sum(len(p) for p in paras) > 100_000
    for p in paras:
        assert ">>>" not in p and "::=" not in p and "****" not in p and "\n" not in p
        assert p.endswith((".", "!", "?"))


def test_corpus_file_paragraphs(tmp_path: Path) -> None:
    f = tmp_path / "book.txt"
    f.write_text("First   paragraph\nwraps here.\n\n\nSecond one is\nhere too.\n\nx\n", encoding="utf-8")
    assert natural_paragraphs(f) == ("First paragraph wraps here.", "Second one is here too.")


def test_single_needle_depth_field(tok) -> None:
    for task in SINGLE_NEEDLE_TASKS:
        assert generate_sample(task, tok, 512, seed=1, depth=0.25).depth == 0.25
    assert generate_sample("niah_multivalue", tok, 512, seed=1).depth is None
    assert generate_sample("niah_multikey", tok, 512, seed=1).depth is not None
