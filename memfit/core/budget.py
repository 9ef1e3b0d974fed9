"""KV budgets: how many tokens a layer may hold.

A budget is either a fraction of the prompt (a float in (0, 1]) or an absolute number of tokens per layer (an
integer > 1). `None` means unlimited. Budgets are resolved per sequence from its *real* prompt length (padding
excluded), so a row in a padded batch keeps exactly what it would keep alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from memfit.errors import ConfigError


@dataclass(frozen=True)
class Budget:
    """A per-layer KV budget. `fraction` xor `tokens` is set; neither means unlimited."""

    fraction: float | None = None
    tokens: int | None = None

    @property
    def unlimited(self) -> bool:
        return self.fraction is None and self.tokens is None

    @classmethod
    def parse(cls, value: float | int | str | Budget | None) -> Budget:
        """Read a user budget: '0.25' → a quarter of the prompt, '512' → 512 tokens, None/'none'/'full' → unlimited."""
        if isinstance(value, Budget):
            return value
        if value is None:
            return cls()
        if isinstance(value, str):
            text = value.strip().lower()
            if text in ("", "none", "full", "unlimited", "inf"):
                return cls()
            try:
                value = int(text) if text.isdigit() else float(text)
            except ValueError:
                raise ConfigError(f"budget {value!r} is not a number: use a fraction in (0, 1] or a token count > 1") from None
        if isinstance(value, bool):
            raise ConfigError("budget must be a number, not a boolean")
        if isinstance(value, float) and value.is_integer() and value > 1:
            value = int(value)
        if isinstance(value, int) and value > 1:
            return cls(tokens=value)
        value = float(value)
        if math.isnan(value) or value <= 0 or value > 1:
            raise ConfigError(
                f"budget {value:g} is out of range: a fraction must be in (0, 1], a token count an integer > 1"
            )
        return cls(fraction=value)

    def resolve(self, prompt_len: int) -> int | None:
        """Tokens one sequence of `prompt_len` real tokens may keep (None = unlimited). At least 1."""
        if self.tokens is not None:
            return self.tokens
        if self.fraction is not None:
            return max(1, math.ceil(self.fraction * prompt_len))
        return None

    def resolve_rows(self, prompt_lens: torch.Tensor) -> torch.Tensor | None:
        """Per-row budgets for a batch (LongTensor of shape (B,)), or None when unlimited."""
        if self.unlimited:
            return None
        return torch.tensor([self.resolve(int(n)) for n in prompt_lens.tolist()], dtype=torch.long)

    def __str__(self) -> str:
        if self.tokens is not None:
            return str(self.tokens)
        if self.fraction is not None:
            return f"{self.fraction:g}"
        return "full"
