"""Superpipeline — layer-wise streaming of a model through the accelerator with two knobs (arXiv 2410.08791).

Our reading: the model's repeated blocks live in (pinned) CPU memory; the GPU holds a window of **k** blocks.
While block i computes, the copies of the next **k′** blocks run on a side stream; once a block has computed it
leaves the GPU when the window needs its place. k trades memory (about k block sizes) against stalls: with
k′ ≥ 1 a copy overlaps every block's compute, so a block's load stalls only when it takes longer than the compute
of the blocks before it.

Defaults: k = 2, k′ = 1 (the smallest window that overlaps every copy). The paper tunes k, k′ per model; its code
was not available to us, so these defaults are ours.
Deviations: blocks that fit in `--weights-memory` next to the window stay resident for the whole run (llama.cpp's
`-ngl` split); only the rest streams. The window is cyclic across forward calls (the last block's prefetch is the
first block of the next token). Training (reverse window for backward) is out of scope.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memfit.adapters.transformers import decoder_layers


@dataclass
class Superpipeline:
    name = "superpipeline"
    paper = "Superpipeline: A Universal Approach for Reducing GPU Memory Usage in Large Models (arXiv 2410.08791)"
    release_before = False
    default_tier = "cpu"

    window: int = 2  # k: streamed blocks on the device at once (loaded or in flight)
    prefetch: int = 1  # k': blocks loaded ahead of the one computing

    def unit_modules(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        return [(f"layer{i}", m) for i, m in enumerate(decoder_layers(model))]
