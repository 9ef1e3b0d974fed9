"""SVDQuant, weight-only form: a 16-bit low-rank branch absorbs the weight's dominant directions (and outliers),
the residual is quantized to 4 bits.

Paper: "SVDQuant: Absorbing Outliers by Low-Rank Components for 4-Bit Diffusion Models", Li et al.,
arXiv 2411.05007 (ICLR 2025). Official code: github.com/mit-han-lab/deepcompressor (calib/lowrank.py) and the
Nunchaku engine.

Algorithm, in our words: W ~= L1 L2 + Q(W - L1 L2), with L1 = U_r S_r (out x r) and L2 = V_r^T (r x in) the rank-r
SVD of W, kept in fp16, and Q a group quantizer of the residual. Then iterate: recompute L1 L2 as the rank-r SVD
of W - Q(R) and re-quantize R = W - L1 L2, keeping the candidate with the lowest error, stopping early when the
error stops falling. Inference: y = x Q(R)^T + (x L2^T) L1^T.

Official defaults: rank 32, INT4 residual in groups of 64 along the input, up to 100 iterations with early stop.
Deviations: weight-only (W4A16): the smoothing step that migrates activation outliers into the weights, and the
4-bit activations, are dropped - activations stay 16/32-bit here, so there is no activation outlier to move.
The iteration objective is the weight reconstruction error ||W - L1 L2 - Q(R)||_F (the official code measures
the layer-output error on calibration data), at most ``iters`` = 8 iterations with an RTN residual; the rank-r
factors come from a randomized SVD (torch.svd_lowrank, fixed seed) for CPU speed. With calibration (``gptq``, on
by default, as deepcompressor's GPTQ option for the residual) the final residual W - L1 L2 is then quantized by
GPTQ on the layer's calibration Hessian - the same quantizer SliM-LLM and GQSA use - so the branch absorbs the
dominant directions and GPTQ spreads the rounding error over the rest; without calibration it stays RTN.
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
from memfit.weights.quantizer import GroupedLayer, rtn_quantize


def low_rank(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors (L1 (out, r), L2 (r, in)) of ``w``, fp16-rounded as they will be stored."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        u, s, v = torch.svd_lowrank(w, q=min(rank + 8, *w.shape), niter=4)
    l1, l2 = (u[:, :rank] * s[:rank]).half().float(), v[:, :rank].T.half().float()
    return l1, l2


@register_weight_method
@dataclass
class SVDQuant(WeightMethod):
    name: ClassVar[str] = "svdquant"
    paper: ClassVar[str] = "SVDQuant: Absorbing Outliers by Low-Rank Components for 4-Bit Diffusion Models (weight-only)"
    arxiv: ClassVar[str] = "2411.05007"
    family: ClassVar[str] = "weights: quantization + low rank"
    summary: ClassVar[str] = "fp16 rank-r branch from the SVD + group-quantized residual (GPTQ when calibrated)."
    calibrated: ClassVar[bool] = True

    bits: int = 4
    group_size: int = 64
    rank: int = 32
    iters: int = 8
    gptq: bool = True
    percdamp: float = 0.01

    def needs_calibration(self) -> bool:
        return self.gptq  # an RTN residual reads no statistics: no calibration pass

    def validate(self) -> None:
        if not 0 <= self.percdamp < 1:
            raise ConfigError(f"svdquant.percdamp must be in [0, 1), got {self.percdamp}")
        if self.rank < 1 or self.iters < 1:
            raise ConfigError(f"svdquant: rank and iters must be >= 1 (got rank={self.rank}, iters={self.iters})")

    def compress(self, linear: nn.Linear, stats: LinearStats | None) -> CompressedLinear:
        w, bias = linear_weight(linear)
        rank = min(self.rank, *w.shape)
        n_g = -(-w.shape[1] // self.group_size)
        bits = torch.full((n_g,), self.bits, dtype=torch.uint8)
        l1, l2 = low_rank(w, rank)
        best = None
        for _ in range(self.iters):
            codes, s, o = rtn_quantize(w - l1 @ l2, bits, self.group_size)
            q = (codes.float() * s[..., None] + o[..., None]).view(w.shape[0], -1)[:, : w.shape[1]]
            err = float((w - l1 @ l2 - q).norm())
            if best is not None and err >= best[0]:
                break
            best = (err, codes, s, o, l1, l2)
            l1, l2 = low_rank(w - q, rank)
        _, codes, s, o, l1, l2 = best
        if self.gptq and stats is not None:  # the residual by GPTQ: its rounding error fed forward through H^-1
            codes, s, o = GroupedLayer.of(w - l1 @ l2, self.group_size, stats.h, self.percdamp).quantize(bits)
        layer = CompressedLinear.from_group(codes, s, o, bits, w.shape[1], bias)
        return layer.add_lowrank(l1, l2)
