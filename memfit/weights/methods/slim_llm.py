"""SliM-LLM: salience-driven mixed-precision group quantization.

Paper: "SliM-LLM: Salience-Driven Mixed-Precision Quantization for Large Language Models", Huang et al.,
arXiv 2405.14917 (ICML 2025). Official code: github.com/Aaronhuang-778/SliM-LLM (read for ideas; no license).

Algorithm, in our words (GPTQ-based SliM-LLM, not the OmniQuant-based SliM-LLM+):
1. Calibrate block by block (GPTQ style): for each linear layer, H = 2/N X^T X from its calibration inputs, damped
   by 1% of its mean diagonal; U = upper Cholesky factor of H^-1.
2. Group salience: the input columns are cut into groups of ``group_size``; a group's salience is the OBS
   saliency summed over it, sum over rows and its columns of W_ij^2 / U_jj^2.
3. Salience-Determined Bit Allocation: for k = 0, 1, ..., n_groups/2 - 1, give the k least salient groups b-1
   bits, the k most salient b+1 bits, the rest b - so the average stays exactly b. For each k, round every group
   at its width and measure the KL divergence between softmax(X W^T) and softmax(X W_hat^T) over the calibration
   inputs; keep the k with the lowest KL. One width per column group, shared by every output row.
4. Salience-Weighted Quantizer Calibration: each group's min-max range is scaled by the factor from a grid around 1
   that minimises sum |w_hat - w|^2.4, salient weights (|z| > 2 in the group's salience map) weighted by lambda.
5. GPTQ quantizes column by column with those per-group quantizers, feeding each rounding error forward through U.
Storage: ``group`` format, one bucket of packed codes per width (the paper's "permute columns by width and split
the layer into uniform-width parts" deployment, kept in one module).

Official defaults: groupsize 128, 128 calibration sequences of 2048 tokens (wikitext2), percdamp 0.01, norm 2.4,
lambda_salience 1 (which makes the salience weighting a no-op; kept), bits 2 or 3.
Deviations: calibration is ``--calib-tokens`` (default 512) tokens of the user's text or pydoc prose, not 262K
tokens of wikitext2 (CPU budget); k = 0 (uniform widths) is also a candidate, so a layer never gets a mix that
scores worse than uniform on its own KL; the SQC grid has 21 + 1 points over [0.9, 1.1] instead of 103 (CPU time);
every group is asymmetric (the official code lets low-bit groups inherit a stale ``sym`` flag); the last group of a
layer whose width is not a multiple of ``group_size`` is padded (stored and counted).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch
from torch import nn

from memfit.errors import ConfigError
from memfit.weights.base import WeightMethod, linear_weight, register_weight_method
from memfit.weights.calibrate import LinearStats
from memfit.weights.format import CompressedLinear
from memfit.weights.quantizer import GroupedLayer, decode, minmax_params, rtn_quantize, sqc_params


def allocate_bits(salience: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """SBA candidate: the k least salient groups at bits-1, the k most salient at bits+1, the rest at bits."""
    order = torch.argsort(salience)
    out = torch.full((salience.numel(),), bits, dtype=torch.uint8)
    if k:
        out[order[:k]] = bits - 1
        out[order[-k:]] = bits + 1
    return out


def output_kl(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor, p: torch.Tensor | None = None) -> float:
    """Mean KL(softmax(x w^T) || softmax(x w_hat^T)) over the rows of x (``p``: ``log_softmax(x w^T)`` if known)."""
    p = torch.log_softmax(x @ w.T, dim=-1) if p is None else p
    q = torch.log_softmax(x @ w_hat.T, dim=-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@register_weight_method
@dataclass
class SliMLLM(WeightMethod):
    name: ClassVar[str] = "slim-llm"
    paper: ClassVar[str] = "SliM-LLM: Salience-Driven Mixed-Precision Quantization for Large Language Models"
    arxiv: ClassVar[str] = "2405.14917"
    family: ClassVar[str] = "weights: mixed-precision quantization"
    summary: ClassVar[str] = "Per-group widths b-1/b/b+1 by salience (average exactly b), salience-weighted quantizer, GPTQ."
    calibrated: ClassVar[bool] = True

    bits: int = 3
    group_size: int = 128
    percdamp: float = 0.01
    lambda_salience: float = 1.0
    norm: float = 2.4
    grid: int = 21

    def validate(self) -> None:
        if not 0 <= self.percdamp < 1:
            raise ConfigError(f"slim-llm.percdamp must be in [0, 1), got {self.percdamp}")
        if self.grid < 1 or self.norm <= 0 or self.lambda_salience <= 0:
            raise ConfigError("slim-llm: grid >= 1, norm > 0 and lambda_salience > 0 are required")

    def choose_bits(self, w: torch.Tensor, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Salience-Determined Bit Allocation for one layer (``w`` padded to whole groups)."""
        n_g = w.shape[1] // self.group_size
        sal = (w.pow(2) / torch.diag(u).pow(2)[None, :]).view(w.shape[0], n_g, self.group_size).sum((0, 2))
        ks = range(n_g // 2) if 1 < self.bits < 8 else range(1)
        x = x.float()
        w_real = w[:, : x.shape[1]]
        p = torch.log_softmax(x @ w_real.T, dim=-1)  # the full-precision side is the same for every candidate
        best, best_kl = None, float("inf")
        for k in ks:
            bits = allocate_bits(sal, self.bits, k)
            codes, s, o = rtn_quantize(w, bits, self.group_size)
            w_hat = decode(codes, s, o).view_as(w)[:, : x.shape[1]]
            kl = output_kl(x, w_real, w_hat, p)
            if kl < best_kl:
                best, best_kl = bits, kl
        return best

    def compress(self, linear: nn.Linear, stats: LinearStats | None) -> CompressedLinear:
        w, bias = linear_weight(linear)
        layer = GroupedLayer.of(w, self.group_size, None if stats is None else stats.h, self.percdamp)
        params = partial(sqc_params, lam=self.lambda_salience, norm=self.norm, grid=self.grid)
        if layer.u is None:  # no calibration reached this layer: uniform width, SQC rounding (no salience)
            bits = torch.full((layer.n_groups,), self.bits, dtype=torch.uint8)
        else:
            bits = self.choose_bits(layer.padded, layer.u, stats.inputs)
        codes, s, o = layer.quantize(bits, params=params)
        return CompressedLinear.from_group(codes, s, o, bits, w.shape[1], bias)


__all__ = ["SliMLLM", "allocate_bits", "minmax_params", "output_kl"]
