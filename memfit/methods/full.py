"""Full cache: the reference every method is measured against. Keeps every token; no scoring, no eviction."""

from __future__ import annotations

from dataclasses import dataclass

from memfit.core.method import Method, register


@register
@dataclass
class Full(Method):
    name = "full"
    paper = "(reference) uncompressed KV cache"
    family = "reference"
    acts = "never"
    summary = "Keeps every token; the quality and memory reference."
