"""RTN: round-to-nearest group quantization, the baseline every weight paper compares against.

Algorithm: cut each weight row into groups of ``group_size`` consecutive input columns; per group take the min and
max, map them to codes 0 and 2^bits - 1 (asymmetric, real-valued offset), round every weight to the nearest code.
No calibration data. Defaults: 4 bits, group 128 (the GPTQ/AWQ convention; HQQ defaults to 64).
Storage: ``group`` format, bits * weights + 32 bits (fp16 scale and offset) per group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from memfit.weights.base import WeightMethod, linear_weight, register_weight_method
from memfit.weights.calibrate import LinearStats
from memfit.weights.format import CompressedLinear
from memfit.weights.quantizer import rtn_quantize


@register_weight_method
@dataclass
class RTN(WeightMethod):
    name: ClassVar[str] = "rtn"
    paper: ClassVar[str] = "Round-to-nearest group quantization (baseline)"
    family: ClassVar[str] = "weights: quantization"
    summary: ClassVar[str] = "Min-max asymmetric rounding per group of input columns; no calibration."

    bits: int = 4
    group_size: int = 128

    def compress(self, linear: nn.Linear, stats: LinearStats | None) -> CompressedLinear:
        w, bias = linear_weight(linear)
        n_g = -(-w.shape[1] // self.group_size)
        bits = torch.full((n_g,), self.bits, dtype=torch.uint8)
        codes, scales, offsets = rtn_quantize(w, bits, self.group_size)
        return CompressedLinear.from_group(codes, scales, offsets, bits, w.shape[1], bias)
