"""Flash-LLM storage: unstructured sparse weights kept compressed in Tiled-CSL, decompressed tile by tile.

Paper: "Flash-LLM: Enabling Cost-Effective and Highly-Efficient Large Generative Model Inference with
Unstructured Sparsity", Xia et al., arXiv 2309.10285 (VLDB 2024). Official code: github.com/AlibabaResearch/flash-llm.

Algorithm, in our words: Flash-LLM is a storage format plus a GPU kernel ("load as sparse, compute as dense").
The weight is cut into tiles of 128 rows x 64 columns; each tile lists its non-zeros as (fp16 value, 16-bit
position inside the tile), 4 bytes each, with prefix sums over tiles. At run time a tile is loaded in this compact
form, scattered into a dense tile in fast memory, and multiplied densely. Here the reference does the same per band
of 128-row tiles in PyTorch. The sparsity itself comes from pruning: we drop the ``sparsity`` fraction of each
layer's weights with the smallest magnitude.

Bytes: 4 per kept weight against 2 for dense fp16, so it only saves memory above 50 % sparsity (the paper targets
70-90 %, where accuracy needs retraining or a better pruner - we prune by magnitude, without retraining).
Official details not reproduced (GPU-kernel concerns with no effect on bytes or results): the XOR swizzle of
positions, padding each tile's non-zeros to a multiple of 4, the bank-aware reordering, split-K.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from memfit.errors import ConfigError
from memfit.weights.base import WeightMethod, linear_weight, register_weight_method
from memfit.weights.calibrate import LinearStats
from memfit.weights.format import CompressedLinear


def magnitude_prune(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero the ``sparsity`` fraction of ``w``'s entries with the smallest magnitude."""
    drop = int(round(sparsity * w.numel()))
    if drop == 0:
        return w
    threshold = w.abs().flatten().kthvalue(drop).values
    return torch.where(w.abs() > threshold, w, torch.zeros_like(w))


@register_weight_method
@dataclass
class FlashLLM(WeightMethod):
    name: ClassVar[str] = "flash-llm"
    paper: ClassVar[str] = "Flash-LLM: Cost-Effective and Highly-Efficient Large Generative Model Inference with Unstructured Sparsity"
    arxiv: ClassVar[str] = "2309.10285"
    family: ClassVar[str] = "weights: unstructured sparsity (storage)"
    summary: ClassVar[str] = "Magnitude-pruned weights kept in Tiled-CSL (fp16 value + 16-bit position per non-zero)."

    sparsity: float = 0.8

    def validate(self) -> None:
        if not 0 <= self.sparsity < 1:
            raise ConfigError(f"flash-llm.sparsity must be in [0, 1), got {self.sparsity}")

    def compress(self, linear: nn.Linear, stats: LinearStats | None) -> CompressedLinear:
        w, bias = linear_weight(linear)
        return CompressedLinear.from_tiled_csl(magnitude_prune(w, self.sparsity), bias)
