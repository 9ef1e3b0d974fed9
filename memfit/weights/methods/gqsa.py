"""GQSA: group quantization with structured group sparsity.

Paper: "GQSA: Group Quantization and Sparsity for Accelerating Large Language Model Inference", Zeng et al.,
arXiv 2412.17560 (ACL 2025). No public code (the paper links an anonymous mirror); our reading is in the team's
spec sheet (../shared/specs/weights-offload-methods.md, A2).

Algorithm, in our words:
1. Cut every weight row into small groups of ``group_size`` consecutive input columns (the paper uses 16).
2. Score each (row, group) block by importance and prune whole blocks: per output row, the ``sparsity`` fraction
   of blocks with the lowest score go (row-wise group sparsity, not N:M). Score: Wanda-style
   sum_j (|W_ij| * ||X_j||)^2 over the block's columns, with ||X_j||^2 from the calibration Hessian's diagonal;
   plain magnitude when no calibration reached the layer.
3. Quantize the surviving blocks at ``bits`` with one scale and offset per block (the quantization group equals
   the sparsity group), by GPTQ with the pruned blocks forced to zero so their value is compensated by the
   remaining columns (SparseGPT-style).
4. Store like BSR with 1 x group_size blocks (``group_sparse`` format): per row the kept block indices (int16),
   the packed codes and per-block fp16 scale/offset; ``row_ptr`` int32. Pruned blocks cost nothing.

Official setting: W4 S50% (4 bits, half of the groups pruned), group 16.
Deviations: the paper's two recovery stages (BQPO: block-wise training of weights and quantizer parameters with
the mask fixed; E2E-OQP: end-to-end training of the quantizer parameters) are not run - they need gradient
training; we use GPTQ-style error compensation instead. The decode kernel ("task-centric" GEMV balancing work by
non-zero blocks) is not written; the reference dequantizes row bands.
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
from memfit.weights.quantizer import GroupedLayer


def group_keep_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """``score`` ``(out, n_g)`` -> bool mask keeping each row's top ``round((1 - sparsity) * n_g)`` blocks (>= 1)."""
    n_g = score.shape[1]
    keep_n = max(1, n_g - int(round(sparsity * n_g)))
    top = torch.topk(score, keep_n, dim=1).indices
    return torch.zeros_like(score, dtype=torch.bool).scatter_(1, top, True)


@register_weight_method
@dataclass
class GQSA(WeightMethod):
    name: ClassVar[str] = "gqsa"
    paper: ClassVar[str] = "GQSA: Group Quantization and Sparsity for Accelerating Large Language Model Inference"
    arxiv: ClassVar[str] = "2412.17560"
    family: ClassVar[str] = "weights: group sparsity + quantization"
    summary: ClassVar[str] = "Prune whole 1 x G blocks per row (Wanda-style score), quantize the rest per block (GPTQ)."
    calibrated: ClassVar[bool] = True

    bits: int = 4
    group_size: int = 16
    sparsity: float = 0.5
    percdamp: float = 0.01

    def validate(self) -> None:
        if not 0 <= self.sparsity < 1:
            raise ConfigError(f"gqsa.sparsity must be in [0, 1), got {self.sparsity}")

    def compress(self, linear: nn.Linear, stats: LinearStats | None) -> CompressedLinear:
        w, bias = linear_weight(linear)
        layer = GroupedLayer.of(w, self.group_size, None if stats is None else stats.h, self.percdamp)
        bits = torch.full((layer.n_groups,), self.bits, dtype=torch.uint8)
        magnitude = layer.padded.pow(2)  # plain magnitude when no calibration reached the layer
        keep = group_keep_mask(
            layer.group_sums(magnitude if layer.h is None else magnitude * torch.diag(layer.h)[None, :]),
            self.sparsity,
        )
        codes, s, o = layer.quantize(bits, keep=keep)
        return CompressedLinear.from_group_sparse(codes, s, o, keep, self.bits, w.shape[1], bias)
