"""An offline tokenizer for tests and demos of the bench: a small byte-level BPE trained on local text.

Real tokenizers need a download; this one is trained in about a second on the bench's own filler (pydoc text,
RULER's noise sentences, digits) and wrapped as a ``transformers.PreTrainedTokenizerFast``, so the task
generators measure lengths with the same code path they use with a real model's tokenizer.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

__all__ = ["toy_tokenizer", "train_tokenizer"]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2000) -> Any:
    """Train a byte-level BPE on ``texts`` and return it as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


@functools.cache
def toy_tokenizer(vocab_size: int = 2000) -> Any:
    """A cached BPE tokenizer trained on the default filler (pydoc prose, noise sentences, numbers)."""
    from memfit.bench.tasks import NOISE_SENTENCES, pydoc_paragraphs

    texts = list(pydoc_paragraphs())
    texts.append(" ".join(NOISE_SENTENCES) * 4)
    texts.append(" ".join(str(i * 7919 % 100_000) for i in range(2000)))
    return train_tokenizer(texts, vocab_size)
