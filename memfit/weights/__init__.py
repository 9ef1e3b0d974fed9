"""Weights: fit the model itself. Compressed linear layers (`CompressedLinear`) and the methods that build them
(RTN, SliM-LLM, GQSA, SVDQuant-style, Flash-LLM storage), quantize-on-load and saved quantized folders."""

from memfit.weights.base import WeightMethod, parse_weight_spec, quantize_model, weight_methods
from memfit.weights.format import CompressedLinear, model_weight_bytes, register_kernel

__all__ = [
    "CompressedLinear",
    "WeightMethod",
    "model_weight_bytes",
    "parse_weight_spec",
    "quantize_model",
    "register_kernel",
    "weight_methods",
]
