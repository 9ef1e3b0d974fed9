"""The model's context window: a prompt that does not fit is refused before generation, or cut on request.

Why: a prompt past the model's trained positions does not fail, it silently degrades (a 12K-token prompt on an
8K-position model prints lines of ``*`` after 84 s). So ``memfit run`` measures the prompt against the window and
either refuses it with both numbers and the ways out, or, with an explicit ``--truncate left|right``, cuts it.

Truncation cuts the user's text (in tokens), not the templated ids, so the chat template's head and tail
(``<|im_start|>assistant``...) survive: ``left`` drops the beginning (keeps the end, where a question usually is),
``right`` drops the end.

A prompt is also allowed past the window when it is prefilled in chunks (``--prefill-chunk``) by an eviction
method with a budget: the cache then never holds more than budget + chunk tokens. Positions still run past the
trained range (memfit keeps original positions; see methods/streaming.py), which the error message says.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from memfit.errors import ConfigError

__all__ = ["TRUNCATE_SIDES", "context_window", "fit_prompts", "held_at_most"]

TRUNCATE_SIDES = ("left", "right")


def context_window(model: Any) -> int | None:
    """The number of positions the model was trained for (``max_position_embeddings``), or None if unknown."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def held_at_most(method: str, budget: Any, prefill_chunk: int | None, prompt_tokens: int) -> int | None:
    """Tokens a layer can hold while a chunked prefill runs (budget + one chunk), or None when it is unbounded:
    no chunking, a method that keeps every token, or no budget."""
    if not prefill_chunk:
        return None
    from memfit.core.budget import Budget
    from memfit.core.method import evicts

    if not evicts(method):
        return None
    kept = Budget.parse(budget).resolve(prompt_tokens)
    return None if kept is None else kept + int(prefill_chunk)


def _prompt_tokens(tokenizer: Any, prompts: Sequence[str], chat: bool) -> list[int]:
    from memfit.engine import encode_prompts

    return [int(encode_prompts(tokenizer, [p], chat)[1].sum()) for p in prompts]


def fit_prompts(
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    chat: bool,
    window: int | None,
    new_tokens: int,
    truncate: str | None = None,
    method: str = "full",
    budget: Any = None,
    prefill_chunk: int | None = None,
) -> list[str]:
    """Return ``prompts`` if every one fits ``window`` positions with ``new_tokens`` generated after it.

    Otherwise: with ``truncate`` ("left" drops the beginning, "right" the end) the prompts cut to fit; with a
    chunked prefill by an eviction method whose cache stays inside the window, the prompts unchanged; else a
    ConfigError with the prompt's length, the window and the fixes."""
    if truncate is not None and truncate not in TRUNCATE_SIDES:
        raise ConfigError(f"--truncate must be 'left' (drop the beginning) or 'right' (drop the end), got {truncate!r}")
    new_tokens = max(int(new_tokens), 0)
    if window is None:
        return list(prompts)
    lengths = _prompt_tokens(tokenizer, prompts, chat)
    longest = max(lengths)
    if longest + new_tokens <= window:
        return list(prompts)
    room = window - new_tokens  # prompt tokens that fit (template included)
    held = held_at_most(method, budget, prefill_chunk, longest)
    if held is not None and held + new_tokens <= window:
        return list(prompts)
    if truncate is None:
        raise ConfigError(
            f"the prompt is {longest:,} tokens and --max-new-tokens adds {new_tokens:,}, but the model's context "
            f"window is {window:,} positions. Fixes: a shorter prompt; --truncate left (keep the end) or "
            f"--truncate right (keep the start) to cut it to {max(room, 0):,} tokens; or --prefill-chunk N with an "
            f"eviction method and a budget + N <= {window - new_tokens:,} tokens (e.g. --method streaming --budget "
            f"{max(min(2048, room // 2), 2)} --prefill-chunk 512), so the cache never holds more than the window "
            "(positions still run past the trained range)"
        )
    if room < 1:
        raise ConfigError(
            f"--max-new-tokens {new_tokens:,} leaves no room for a prompt in the model's {window:,}-position "
            "context window: lower --max-new-tokens"
        )
    return [_cut(tokenizer, p, n, room, truncate, chat) for p, n in zip(prompts, lengths, strict=True)]


def _cut(tokenizer: Any, text: str, length: int, room: int, side: str, chat: bool) -> str:
    """``text`` cut (in tokens of its own) until its encoded prompt, template included, is at most ``room``."""
    if length <= room:
        return text
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    overhead = length - len(ids)  # template and special tokens around the text
    keep = room - overhead
    for _ in range(4):  # re-tokenizing decoded text can merge or split a token at the cut: shave and retry
        if keep < 1:
            raise ConfigError(
                f"the chat template alone takes {overhead:,} of the {room:,} prompt positions left: use --no-chat "
                "or lower --max-new-tokens"
            )
        cut = tokenizer.decode(ids[-keep:] if side == "left" else ids[:keep], skip_special_tokens=False)
        got = _prompt_tokens(tokenizer, [cut], chat)[0]
        if got <= room:
            return cut
        keep -= got - room
    raise ConfigError(f"could not cut the prompt to {room:,} tokens: shorten it by hand")
