"""RULER-style long-context tasks, generated locally from a seed and a target length in tokens.

Every task is built here, offline, with the caller's tokenizer measuring the length: nothing is downloaded.

Tasks
-----
- ``niah_single_number`` / ``niah_single_word`` / ``niah_single_uuid``: one needle ("The special magic number
  for KEY is: VALUE.") hidden at a chosen depth of the filler; the model must return the value.
- ``niah_multikey``: several needles with different keys (distractors); one key is asked.
- ``niah_multivalue``: one key with several values; all values must be returned.
- ``niah_multiquery``: several keys, all asked at once.
- ``variable_tracking``: chains ``VAR A = 12345.`` ... ``VAR B = VAR A.`` hidden in the filler; the model must name
  every variable bound to the value.
- ``common_words``: a numbered word list in which a few words occur much more often; return the top k.
- ``ppl``: a natural-text prefix of the target length plus a continuation (perplexity of the continuation).
- ``fidelity``: the same shape; the runner compares next-token distributions with the full cache.

Filler
------
``filler="natural"`` uses prose: the standard library's ``pydoc_data.topics`` cleaned to paragraphs (default), or a
user text file (``corpus=Path``). ``filler="noise"`` repeats RULER's five trivial sentences. Needle values, keys and
variable names are chosen first and every filler sentence containing one of them (case-insensitive) is dropped, so
a value occurs in the prompt exactly where it was put.

Lengths
-------
``TaskSample.context_tokens`` is the length of the whole ``prompt`` (context + question) measured with the given
tokenizer *without* special tokens and without a chat template. The generator searches the amount of filler (at
word granularity) until that length is within 2% of the target (in practice within a few tokens). For ``ppl`` and
``fidelity`` the token ids are cut exactly (``prompt_ids``, ``continuation_ids``); use the ids, not the text.
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
import re
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from memfit.errors import ConfigError

__all__ = [
    "ALL_TASKS",
    "NIAH_TASKS",
    "SINGLE_NEEDLE_TASKS",
    "TEXT_TASKS",
    "LENGTH_TOLERANCE",
    "NOISE_SENTENCES",
    "TaskSample",
    "Tokenizer",
    "count_tokens",
    "encode",
    "filler_description",
    "natural_paragraphs",
    "pydoc_paragraphs",
    "generate_sample",
    "generate_samples",
    "sample_seed",
]

SINGLE_NEEDLE_TASKS: tuple[str, ...] = ("niah_single_number", "niah_single_word", "niah_single_uuid")
NIAH_TASKS: tuple[str, ...] = SINGLE_NEEDLE_TASKS + ("niah_multikey", "niah_multivalue", "niah_multiquery")
TEXT_TASKS: tuple[str, ...] = ("ppl", "fidelity")
ALL_TASKS: tuple[str, ...] = NIAH_TASKS + ("variable_tracking", "common_words") + TEXT_TASKS

LENGTH_TOLERANCE = 0.02
"""A generated prompt is within this relative distance of the target token length (or an error is raised)."""

NOISE_SENTENCES: tuple[str, ...] = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)

FillerKind = Literal["natural", "noise"]


class Tokenizer(Protocol):
    """What the generators need from a tokenizer (any Hugging Face tokenizer fits)."""

    def encode(self, text: str, *args: Any, **kwargs: Any) -> Any: ...

    def decode(self, ids: Any, *args: Any, **kwargs: Any) -> str: ...


@dataclass
class TaskSample:
    """One generated example.

    ``prompt`` is context + question and ends where the model should start answering; ``question`` is the tail of
    ``prompt`` after the context (so ``prompt[:-len(question)]`` is the context, useful for question-agnostic
    compression). ``answers`` are scored with ``memfit.bench.metrics.score_prediction``.
    """

    task: str
    prompt: str
    answers: list[str]
    context_tokens: int
    seed: int
    depth: float | None = None
    target_tokens: int = 0
    question: str = ""
    filler: str = ""
    continuation: str | None = None
    prompt_ids: list[int] | None = None
    continuation_ids: list[int] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def context(self) -> str:
        """The prompt without the question."""
        return self.prompt[: len(self.prompt) - len(self.question)] if self.question else self.prompt

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (token id lists included)."""
        return asdict(self)


# --------------------------------------------------------------------------------------------------- tokenizers


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (fast path through a HF fast tokenizer's backend)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return list(backend.encode(text, add_special_tokens=False).ids)
    try:
        out = tokenizer.encode(text, add_special_tokens=False)
    except TypeError:
        out = tokenizer.encode(text)
    ids = getattr(out, "ids", out)
    return list(ids)


def count_tokens(tokenizer: Tokenizer, text: str) -> int:
    """Number of tokens of ``text`` without special tokens."""
    return len(encode(tokenizer, text))


# ------------------------------------------------------------------------------------------------------ filler

_HEADING_RULE = re.compile(r"^\s*([*=\-~^#+])\1{3,}\s*$")
_LIST_MARKER = re.compile(r"^\s*(?:[*\-+]|\d+\.|\(\d+\)|\[\d+\]|[a-z]\.)\s+")
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")
_WS = re.compile(r"\s+")


def _is_prose(paragraph: str) -> bool:
    words = paragraph.split()
    if len(words) < 8 or not paragraph.endswith((".", "!", "?")):
        return False
    if any(bad in paragraph for bad in ("::=", ">>>", "...:", "|", "{", "}", "\\")):
        return False
    nonspace = [c for c in paragraph if not c.isspace()]
    letters = sum(c.isalpha() for c in nonspace)
    if letters / len(nonspace) < 0.8:
        return False
    codeish = sum(1 for w in words if any(c in w for c in "()_=[]<>"))
    return codeish / len(words) <= 0.15


def _clean_paragraphs(raw: str) -> list[str]:
    """Split text into whitespace-normalised prose paragraphs (drops code, headings, tables, short lines)."""
    out: list[str] = []
    for block in re.split(r"\n\s*\n", raw):
        lines = [ln for ln in block.splitlines() if ln.strip()]
        if not lines or any(_HEADING_RULE.match(ln) for ln in lines):
            continue
        if any(ln.lstrip().startswith((">>>", "...", "$ ", "%")) for ln in lines):
            continue
        text = _LIST_MARKER.sub("", _WS.sub(" ", " ".join(lines)).strip())
        text = text.replace("*", "").replace("`", "")
        if _is_prose(text):
            out.append(text)
    return out


@functools.cache
def pydoc_paragraphs() -> tuple[str, ...]:
    """Prose paragraphs from the standard library's ``pydoc_data.topics`` (present on every CPython)."""
    import pydoc_data.topics as topics

    paragraphs: list[str] = []
    for name in sorted(topics.topics):
        paragraphs.extend(_clean_paragraphs(topics.topics[name]))
    return tuple(paragraphs)


@functools.lru_cache(maxsize=8)
def _file_paragraphs(path: str, mtime_ns: int) -> tuple[str, ...]:
    raw = Path(path).read_text(encoding="utf-8", errors="replace")
    paragraphs = []
    for block in re.split(r"\n\s*\n", raw):
        text = _WS.sub(" ", block).strip()
        if len(text.split()) >= 3:
            paragraphs.append(text)
    return tuple(paragraphs)


def natural_paragraphs(corpus: Path | str | None = None) -> tuple[str, ...]:
    """Paragraphs of natural text: ``corpus`` (a UTF-8 text file, paragraphs separated by blank lines) or pydoc."""
    if corpus is None:
        return pydoc_paragraphs()
    path = Path(corpus)
    if not path.is_file():
        raise ConfigError(f"corpus file not found: {path}")
    paragraphs = _file_paragraphs(str(path.resolve()), path.stat().st_mtime_ns)
    if not paragraphs:
        raise ConfigError(f"corpus file {path} holds no text paragraphs")
    return paragraphs


def filler_description(filler: FillerKind = "natural", corpus: Path | str | None = None) -> str:
    """A short human label for the filler, for reports (e.g. ``natural (pydoc_data.topics)``)."""
    if filler == "noise":
        return "noise (repeated 'The grass is green. The sky is blue. ...')"
    return f"natural ({Path(corpus).name if corpus is not None else 'pydoc_data.topics'})"


@dataclass
class _Stream:
    """Filler cut into words: ``pieces[i]`` is a word plus its trailing separator."""

    pieces: list[str] = field(default_factory=list)
    sentence_end: list[bool] = field(default_factory=list)

    def add_sentence(self, sentence: str, paragraph_end: bool) -> None:
        words = sentence.split()
        for j, w in enumerate(words):
            last = j == len(words) - 1
            self.pieces.append(w + ("\n\n" if last and paragraph_end else " "))
            self.sentence_end.append(last)

    def boundaries(self, n: int) -> list[int]:
        """Word indices in ``[0, n]`` where a sentence may be inserted."""
        return [0] + [i + 1 for i in range(n) if self.sentence_end[i]]


def _sentences(filler: FillerKind, corpus: Path | str | None, rng: random.Random) -> Iterator[tuple[str, bool]]:
    """Endless (sentence, ends_paragraph) stream; natural text starts at a seed-chosen paragraph and cycles."""
    if filler == "noise":
        while True:
            for s in NOISE_SENTENCES:
                yield s, False
    if filler != "natural":
        raise ConfigError(f"unknown filler {filler!r}: use 'natural' (with an optional corpus file) or 'noise'")
    paragraphs = natural_paragraphs(corpus)
    start = rng.randrange(len(paragraphs))
    i = start
    while True:
        sents = [s for s in _SENTENCE_SPLIT.split(paragraphs[i]) if s.strip()]
        for j, s in enumerate(sents):
            yield s.strip(), j == len(sents) - 1
        i = (i + 1) % len(paragraphs)


def _make_stream(
    filler: FillerKind,
    corpus: Path | str | None,
    rng: random.Random,
    forbidden: Sequence[str],
) -> Callable[[int], _Stream]:
    """Returns ``grow(n_words)``: the stream extended to at least ``n_words`` words, forbidden sentences dropped."""
    lowered = [f.lower() for f in forbidden if f]
    source = _sentences(filler, corpus, rng)
    stream = _Stream()
    dropped_in_a_row = 0

    def grow(n_words: int) -> _Stream:
        nonlocal dropped_in_a_row
        while len(stream.pieces) < n_words:
            sentence, par_end = next(source)
            low = sentence.lower()
            if any(f in low for f in lowered):
                dropped_in_a_row += 1
                if dropped_in_a_row > 100_000:
                    raise ConfigError("the filler text contains the needle strings everywhere; use another corpus")
                continue
            dropped_in_a_row = 0
            stream.add_sentence(sentence, par_end)
        return stream

    return grow


def _compose(stream: _Stream, n: int, inserts: Sequence[tuple[float, str]]) -> str:
    """The first ``n`` filler words with each ``(depth, sentence)`` inserted at the sentence boundary nearest depth."""
    bounds = stream.boundaries(n)
    placed: list[tuple[int, int, str]] = []
    for order, (depth, sentence) in enumerate(inserts):
        want = depth * n
        pos = min(bounds, key=lambda b: (abs(b - want), b))
        placed.append((pos, order, sentence))
    placed.sort()
    out: list[str] = []
    prev = 0
    for pos, _, sentence in placed:
        out.extend(stream.pieces[prev:pos])
        out.append(sentence + " ")
        prev = pos
    out.extend(stream.pieces[prev:n])
    return "".join(out).strip()


# --------------------------------------------------------------------------------------------- length fitting


def _fit(
    build: Callable[[int], str],
    count: Callable[[str], int],
    target: int,
    n_max: int,
) -> tuple[str, int, int] | None:
    """Search ``n`` in ``[0, n_max]`` so that ``count(build(n))`` is close to ``target`` (count grows with n).

    Returns ``(text, tokens, n)``, or ``None`` when even ``n_max`` is too short. Raises if ``n = 0`` is too long.
    """
    tol = max(1, int(target * LENGTH_TOLERANCE))
    tight = max(1, int(target * 0.002))
    text0 = build(0)
    c0 = count(text0)
    if c0 > target + tol:
        raise ConfigError(f"target length {target} tokens is too short: the task's fixed text alone takes {c0} tokens")
    text_hi = build(n_max)
    c_hi = count(text_hi)
    if c_hi < target - tol:
        return None
    lo, c_lo, hi = 0, c0, n_max
    best = min(((abs(c0 - target), text0, c0, 0), (abs(c_hi - target), text_hi, c_hi, n_max)), key=lambda t: t[0])
    last_width = hi - lo
    bisect = False
    while hi - lo > 1 and best[0] > tight:
        if bisect or c_hi == c_lo:
            n = (lo + hi) // 2
        else:
            n = lo + round((target - c_lo) * (hi - lo) / (c_hi - c_lo))
            n = min(max(n, lo + 1), hi - 1)
        text = build(n)
        c = count(text)
        if abs(c - target) < best[0]:
            best = (abs(c - target), text, c, n)
        if c < target:
            lo, c_lo = n, c
        else:
            hi, c_hi = n, c
        width = hi - lo
        bisect = width > last_width // 2  # interpolation did not halve the interval: bisect next
        last_width = width
    if best[0] > tol:
        raise ConfigError(f"could not fit the prompt to {target} tokens (closest: {best[2]})")
    return best[1], best[2], best[3]


def _fit_filler(
    tokenizer: Tokenizer,
    target: int,
    grow: Callable[[int], _Stream],
    make_prompt: Callable[[str], str],
    inserts: Sequence[tuple[float, str]],
) -> tuple[str, int]:
    """Prompt (and its token count) with as much filler as fits ``target`` tokens."""

    def count(text: str) -> int:
        return count_tokens(tokenizer, text)

    probe = grow(400)
    per_word = max(0.2, count("".join(probe.pieces[:400])) / 400)
    n_max = int(target / per_word * 1.25) + 64
    for _ in range(12):
        stream = grow(n_max)

        def build(n: int, stream: _Stream = stream) -> str:
            return make_prompt(_compose(stream, n, inserts))

        fitted = _fit(build, count, target, n_max)
        if fitted is None:
            n_max *= 2
            continue
        text, tokens, n = fitted
        # prefer a haystack that ends with a whole sentence when that stays within 1% of the target
        bounds = stream.boundaries(n_max)
        if n in bounds:
            return text, tokens
        below = [b for b in bounds if b < n][-1:]
        above = [b for b in bounds if b > n][:1]
        best: tuple[int, str, int] | None = None
        for m in below + above:
            candidate = build(m)
            c = count(candidate)
            if abs(c - target) <= max(1, target // 100) and (best is None or abs(c - target) < best[0]):
                best = (abs(c - target), candidate, c)
        return (best[1], best[2]) if best is not None else (text, tokens)
    raise ConfigError(f"could not reach {target} tokens with this filler")


# ----------------------------------------------------------------------------------------------- random values

_NOUNS = (
    "albatross anchor antelope apricot archipelago avalanche badger balcony bamboo banjo barnacle beacon beetle "
    "blizzard blueberry bonfire boulder buffalo butterfly cactus camel canoe canyon caramel caravan cathedral "
    "cello chestnut chimney cinnamon clarinet coconut comet compass coral cottage coyote crocodile daffodil dolphin "
    "dragonfly drumstick eclipse elephant emerald falcon ferret flamingo fountain gazelle geyser giraffe glacier "
    "gondola gorilla granite hammock harbor harmonica hedgehog heron hyacinth iceberg iguana jaguar jellyfish "
    "kangaroo kayak kettle koala lagoon lantern lemonade leopard lighthouse lobster lullaby magnolia mandolin "
    "mango marble meadow meteor monsoon mosaic mushroom nectarine nightingale oasis octopus orchard orchid ostrich "
    "otter pancake panther papaya parrot peacock pelican penguin pepper pinecone pistachio plankton porcupine "
    "pumpkin quartz raccoon rainbow raspberry reindeer rhubarb saddle saffron salamander sandcastle sapphire "
    "saxophone scarecrow seahorse sequoia shipwreck sparrow squirrel starfish strawberry submarine sunflower "
    "swallow tambourine tangerine telescope thunder tortoise toucan trombone tulip turquoise umbrella vineyard "
    "violin volcano walnut walrus waterfall whistle wildflower windmill wombat xylophone yacht zebra zeppelin"
).split()
_ADJECTIVES = (
    "amber ancient brave bright calm clever cosmic crimson curious dazzling eager elegant fancy fearless fuzzy "
    "gentle giant golden graceful happy hidden humble icy jolly lively lucky marvelous mellow misty nimble noble "
    "odd patient polite proud quiet rapid rustic scarlet shiny silent silver sleepy smooth snowy sunny swift "
    "tidy tiny velvet vivid wandering wild witty zealous"
).split()


def _distinct_ok(strings: Sequence[str]) -> bool:
    """No string is equal to or contained in another (case-insensitive)."""
    low = [s.lower() for s in strings]
    return all(i == j or a not in b for i, a in enumerate(low) for j, b in enumerate(low))


def _value(rng: random.Random, kind: str) -> str:
    if kind == "number":
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "word":
        return rng.choice(_NOUNS)
    if kind == "uuid":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ConfigError(f"unknown value type {kind!r}: number, word or uuid")


def _key(rng: random.Random) -> str:
    return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"


def _draw_distinct(rng: random.Random, draw: Callable[[], list[str]]) -> list[str]:
    for _ in range(1000):
        items = draw()
        if _distinct_ok(items):
            return items
    raise ConfigError("could not draw distinct keys/values; lower the number of needles")


# ---------------------------------------------------------------------------------------------------- NIAH

_PLURAL = {"number": "numbers", "word": "words", "uuid": "uuids"}


def _needle(kind: str, key: str, value: str) -> str:
    return f"The special magic {kind} for {key} is: {value}."


def _niah(
    task: str,
    tokenizer: Tokenizer,
    length: int,
    seed: int,
    rng: random.Random,
    filler: FillerKind,
    corpus: Path | str | None,
    depth: float | None,
    opts: dict[str, Any],
) -> TaskSample:
    single_kind = {"niah_single_number": "number", "niah_single_word": "word", "niah_single_uuid": "uuid"}
    kind = single_kind[task] if task in single_kind else str(opts.pop("value_type", "number"))
    num_keys = int(opts.pop("num_keys", 4)) if task == "niah_multikey" else 1
    num_values = int(opts.pop("num_values", 4)) if task == "niah_multivalue" else 1
    num_queries = int(opts.pop("num_queries", 4)) if task == "niah_multiquery" else 1
    n_keys = max(num_keys, num_queries)
    if min(num_keys, num_values, num_queries) < 1:
        raise ConfigError("num_keys, num_values and num_queries must be >= 1")

    def draw() -> list[str]:
        keys = [_key(rng) for _ in range(n_keys)]
        values = [_value(rng, kind) for _ in range(n_keys * num_values)]
        return keys + values

    drawn = _draw_distinct(rng, draw)
    keys, values = drawn[:n_keys], drawn[n_keys:]
    # needle i: keys[i // num_values] -> values[i]
    needles = [(keys[i // num_values], values[i]) for i in range(len(values))]
    if task in SINGLE_NEEDLE_TASKS:
        d = rng.random() if depth is None else float(depth)
        if not 0.0 <= d <= 1.0:
            raise ConfigError(f"depth must be in [0, 1], got {d}")
        depths = [d]
    else:
        depths = [rng.random() for _ in needles]
    order = list(range(len(needles)))
    rng.shuffle(order)  # needle order in the text does not follow the key order
    inserts = [(depths[i], _needle(kind, *needles[i])) for i in order]

    if task == "niah_multikey":
        asked = [keys[rng.randrange(num_keys)]]
    elif task == "niah_multiquery":
        asked = list(keys)
    else:
        asked = [keys[0]]
    answers = [v for k in asked for kk, v in needles if kk == k]

    plural = _PLURAL[kind]
    if len(values) == 1:
        header = (
            f"A special magic {kind} is hidden in the text below. Read carefully and remember it: "
            f"you will be asked for it afterwards.\n\n"
        )
    else:
        header = (
            f"Some special magic {plural} are hidden in the text below. Read carefully and remember them: "
            f"you will be asked about them afterwards.\n\n"
        )
    key_list = _join_names(asked)
    if len(answers) == 1:
        question = (
            f"\n\nQuestion: What is the special magic {kind} for {key_list} in the text above?\n"
            f"Answer: The special magic {kind} for {key_list} is:"
        )
    else:
        question = (
            f"\n\nQuestion: What are all the special magic {plural} for {key_list} in the text above?\n"
            f"Answer: The special magic {plural} for {key_list} are:"
        )
    grow = _make_stream(filler, corpus, rng, forbidden=keys + values)
    prompt, tokens = _fit_filler(tokenizer, length, grow, lambda hay: header + hay + question, inserts)
    low = prompt.lower()
    for v in values:
        if low.count(v.lower()) != 1:  # cannot happen: filler sentences holding a value are dropped
            raise RuntimeError(f"needle value {v!r} occurs {low.count(v.lower())} times in the prompt")
    asked_depths = [depths[i] for i in range(len(needles)) if needles[i][0] in asked]
    return TaskSample(
        task=task,
        prompt=prompt,
        answers=answers,
        context_tokens=tokens,
        seed=seed,
        depth=asked_depths[0] if len(asked_depths) == 1 else None,
        target_tokens=length,
        question=question,
        filler=filler_description(filler, corpus),
        meta={
            "keys": keys,
            "values": values,
            "asked": asked,
            "needle_depths": depths,
            "value_type": kind,
            "context_start": len(header),
        },
    )


def _join_names(names: Sequence[str]) -> str:
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:-1]) + " and " + names[-1]


# ------------------------------------------------------------------------------------------ variable tracking


def _variable_tracking(
    tokenizer: Tokenizer,
    length: int,
    seed: int,
    rng: random.Random,
    filler: FillerKind,
    corpus: Path | str | None,
    opts: dict[str, Any],
) -> TaskSample:
    num_chains = int(opts.pop("num_chains", 1))
    num_hops = int(opts.pop("num_hops", 4))
    if num_chains < 1 or num_hops < 0:
        raise ConfigError("variable_tracking needs num_chains >= 1 and num_hops >= 0")
    n_names = num_chains * (num_hops + 1)

    def draw() -> list[str]:
        names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)) for _ in range(n_names)]
        values = [str(rng.randint(10_000, 99_999)) for _ in range(num_chains)]
        return names + values

    drawn = _draw_distinct(rng, draw)
    names, values = drawn[:n_names], drawn[n_names:]
    chains = [names[c * (num_hops + 1) : (c + 1) * (num_hops + 1)] for c in range(num_chains)]
    inserts: list[tuple[float, str]] = []
    for chain, value in zip(chains, values, strict=True):
        depths = sorted(rng.random() for _ in chain)
        inserts.append((depths[0], f"VAR {chain[0]} = {value}."))
        for prev, name, d in zip(chain, chain[1:], depths[1:], strict=False):
            inserts.append((d, f"VAR {name} = VAR {prev}."))
    header = "Memorize and track the chains of variable assignments hidden in the text below.\n\n"
    asked = values[0]
    question = (
        f"\n\nQuestion: Find every variable that is assigned the value {asked} in the text above, directly or "
        f"through other variables.\nAnswer: The variables assigned the value {asked} are:"
    )
    # inserts at equal depth keep their order, so a chain never references a variable before it is defined
    grow = _make_stream(filler, corpus, rng, forbidden=names + values)
    prompt, tokens = _fit_filler(tokenizer, length, grow, lambda hay: header + hay + question, inserts)
    return TaskSample(
        task="variable_tracking",
        prompt=prompt,
        answers=list(chains[0]),
        context_tokens=tokens,
        seed=seed,
        depth=None,
        target_tokens=length,
        question=question,
        filler=filler_description(filler, corpus),
        meta={"chains": chains, "values": values, "context_start": len(header)},
    )


# ----------------------------------------------------------------------------------------------- common words


@functools.lru_cache(maxsize=8)
def _word_pool(corpus_key: str | None) -> tuple[str, ...]:
    words: set[str] = set(_NOUNS)
    for paragraph in natural_paragraphs(corpus_key):
        words.update(re.findall(r"\b[a-z]{4,12}\b", paragraph))
    return tuple(sorted(words))


def _common_words(
    tokenizer: Tokenizer,
    length: int,
    seed: int,
    rng: random.Random,
    filler: FillerKind,
    corpus: Path | str | None,
    opts: dict[str, Any],
) -> TaskSample:
    top_k = int(opts.pop("top_k", 10))
    freq_common = int(opts.pop("freq_common", 30))
    freq_rare = int(opts.pop("freq_rare", 3))
    if top_k < 1 or freq_rare < 1 or freq_common <= freq_rare:
        raise ConfigError("common_words needs top_k >= 1 and freq_common > freq_rare >= 1")
    pool = list(_word_pool(None if corpus is None or filler == "noise" else str(Path(corpus).resolve())))
    rng.shuffle(pool)
    common = pool[:top_k]
    if not _distinct_ok(common):
        common = _draw_distinct(rng, lambda: rng.sample(pool, top_k))
    low_common = [c.lower() for c in common]
    rare = [w for w in pool if w not in common and not any(c in w or w in c for c in low_common)]

    header = "Below is a numbered list of words. Some words appear many more times than the others.\n\n"
    question = (
        f"\n\nQuestion: What are the {top_k} most common words in the list above?\n"
        f"Answer: The {top_k} most common words in the list are:"
    )
    per_entry = count_tokens(tokenizer, "".join(f"{i + 101}. {w}\n" for i, w in enumerate(rare[:200]))) / 200
    fixed = count_tokens(tokenizer, header + question)
    entries = max(0.0, (length - fixed) / max(per_entry, 0.5))
    # common words take about half of the list at most; rare words repeat when the pool is too small
    # and stay at least twice as frequent as the rare ones
    freq_common = min(freq_common, int(entries * 0.5 / top_k))
    if freq_common < 2 * freq_rare:  # short lists: rarer rare words rather than no room for the common ones
        freq_rare = max(1, freq_common // 2)
    rare_entries = max(0.0, entries - top_k * freq_common)
    freq_rare = max(freq_rare, math.ceil(rare_entries / max(1, int(len(rare) * 0.8))))
    freq_common = max(freq_common, 2 * freq_rare)
    if top_k * freq_common * per_entry + fixed > length * (1 + LENGTH_TOLERANCE):
        raise ConfigError(f"target length {length} tokens is too short for common_words with top_k={top_k}")
    shuffle_seed = rng.getrandbits(64)

    def build(n: int) -> str:
        items = [w for w in common for _ in range(freq_common)] + [w for w in rare[:n] for _ in range(freq_rare)]
        random.Random(shuffle_seed).shuffle(items)
        return header + "\n".join(f"{i + 1}. {w}" for i, w in enumerate(items)) + question

    fitted = _fit(build, lambda t: count_tokens(tokenizer, t), length, len(rare))
    if fitted is None:
        raise ConfigError(f"common_words: the word pool is too small for {length} tokens; raise freq_rare")
    prompt, tokens, n_rare = fitted
    return TaskSample(
        task="common_words",
        prompt=prompt,
        answers=list(common),
        context_tokens=tokens,
        seed=seed,
        depth=None,
        target_tokens=length,
        question=question,
        filler="word list",
        meta={
            "freq_common": freq_common,
            "freq_rare": freq_rare,
            "num_rare": n_rare,
            "context_start": len(header),
        },
    )


# ---------------------------------------------------------------------------------------- ppl / fidelity


def _text_task(
    task: str,
    tokenizer: Tokenizer,
    length: int,
    seed: int,
    rng: random.Random,
    filler: FillerKind,
    corpus: Path | str | None,
    opts: dict[str, Any],
) -> TaskSample:
    cont = int(opts.pop("continuation_tokens", 256 if task == "ppl" else 64))
    if cont < 1:
        raise ConfigError("continuation_tokens must be >= 1")
    need = length + cont
    source = _sentences(filler, corpus, rng)
    parts: list[str] = []
    ids: list[int] = []
    chars = 0
    while len(ids) < need:
        goal = chars + max(4096, int((need - len(ids)) * 6))
        while chars < goal:
            sentence, par_end = next(source)
            parts.append(sentence + ("\n\n" if par_end else " "))
            chars += len(parts[-1])
        ids = encode(tokenizer, "".join(parts))
    prefix, continuation = ids[:length], ids[length:need]
    prompt = tokenizer.decode(prefix)
    return TaskSample(
        task=task,
        prompt=prompt,
        answers=[],
        context_tokens=len(prefix),
        seed=seed,
        depth=None,
        target_tokens=length,
        question="",
        filler=filler_description(filler, corpus),
        continuation=tokenizer.decode(continuation),
        prompt_ids=list(prefix),
        continuation_ids=list(continuation),
        meta={"continuation_tokens": cont},
    )


# -------------------------------------------------------------------------------------------------- public


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample ``index`` of the sample set ``seed`` (stable across runs and platforms)."""
    digest = hashlib.sha256(f"memfit-bench/{seed}/{index}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def generate_sample(
    task: str,
    tokenizer: Tokenizer,
    length: int,
    seed: int = 0,
    *,
    filler: FillerKind = "natural",
    corpus: Path | str | None = None,
    depth: float | None = None,
    **options: Any,
) -> TaskSample:
    """Generate one sample of ``task`` whose prompt is ``length`` tokens long (±2%).

    ``depth`` (0 = start of the context, 1 = end) places the needle of single-needle tasks; ``None`` draws it from
    the seed. Task options: ``num_keys`` (multikey, 4), ``num_values`` (multivalue, 4), ``num_queries`` (multiquery,
    4), ``value_type`` (multi-needle tasks: number/word/uuid), ``num_chains`` (1) and ``num_hops`` (4) for
    variable_tracking, ``top_k`` (10), ``freq_common`` (30), ``freq_rare`` (3) for common_words,
    ``continuation_tokens`` (ppl 256, fidelity 64).
    """
    if task not in ALL_TASKS:
        raise ConfigError(f"unknown task {task!r}; known tasks: {', '.join(ALL_TASKS)}")
    if length < 16:
        raise ConfigError(f"length must be at least 16 tokens, got {length}")
    if filler not in ("natural", "noise"):
        raise ConfigError(f"unknown filler {filler!r}: use 'natural' (with an optional corpus file) or 'noise'")
    rng = random.Random(f"{task}/{seed}")
    opts = dict(options)
    if task in NIAH_TASKS:
        sample = _niah(task, tokenizer, length, seed, rng, filler, corpus, depth, opts)
    elif task == "variable_tracking":
        sample = _variable_tracking(tokenizer, length, seed, rng, filler, corpus, opts)
    elif task == "common_words":
        sample = _common_words(tokenizer, length, seed, rng, filler, corpus, opts)
    else:
        sample = _text_task(task, tokenizer, length, seed, rng, filler, corpus, opts)
    if opts:
        raise ConfigError(f"unknown option(s) for task {task}: {', '.join(sorted(opts))}")
    return sample


def generate_samples(
    task: str,
    tokenizer: Tokenizer,
    length: int,
    n: int,
    seed: int = 0,
    *,
    filler: FillerKind = "natural",
    corpus: Path | str | None = None,
    depths: Sequence[float] | None = None,
    **options: Any,
) -> list[TaskSample]:
    """A sample set: ``n`` samples with seeds ``sample_seed(seed, i)``.

    Single-needle tasks spread their needles over the context: sample ``i`` gets depth ``depths[i % len(depths)]``
    or, by default, the stratified depth ``(i + 0.5) / n``. Any sample is reproduced by ``generate_sample`` with its
    ``seed`` and ``depth``.
    """
    if n < 1:
        raise ConfigError(f"n must be >= 1, got {n}")
    out = []
    for i in range(n):
        depth: float | None = None
        if task in SINGLE_NEEDLE_TASKS:
            depth = float(depths[i % len(depths)]) if depths else (i + 0.5) / n
        out.append(
            generate_sample(
                task, tokenizer, length, sample_seed(seed, i), filler=filler, corpus=corpus, depth=depth, **options
            )
        )
    return out
