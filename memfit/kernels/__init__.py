"""GPU decode kernels (Triton), each with a plain-PyTorch reference in `memfit.kernels.reference`.

- `kivi_attention`: split-K (flash-decoding) attention of one query token per row over a cache stored as
  bit-packed KIVI codes (keys per channel along tokens, values per token along channels) plus a full-precision
  residual; also serves plain bf16/fp16 slot buffers (`decode_attention`).
- `h2o_decode`: the same attention pass, fused with H2O's accumulated-attention update and an argmin eviction
  (evict one slot per step in a fixed-size buffer).
- `kivi_flush`: the static KIVI store's decode-time quantization of its oldest full-precision value and key block,
  decided on the device (reference: the store's PyTorch path, `memfit.core.static_quant_store`).
- `fused_ops`: a decode step's RMSNorm, rotary embedding and gated-MLP activation, one kernel each (the fast
  backend installs them through `memfit.adapters.transformers.install_fused_ops`; reference: transformers' modules).
- `column_sums`: H2O's prefill scores — the attention each key receives summed over the prompt's queries — in two
  passes without storing probabilities (reference: `memfit.core.scoring.column_sums`'s PyTorch path).
- `group_gemv`: decode-sized matmul of group-quantized weights (`memfit.weights.format`'s "group" format, every
  bit width 1..8 in one layer), dequantized in registers (reference: `CompressedLinear.reference_forward`).
- `int4_pairs`: batch-1 decode matmul of uniform 4-bit "group" layers of bf16 models, codes reordered in place
  into pair order so that two become a bf16 pair with one instruction (the fast backend's default for those layers;
  reference: the same).
- `tinygemm`: not a Triton kernel — uniform 4-bit "group" layers of bf16 models through torch's built-in int4
  matmul (`aten._weight_int4pack_mm`), their codes reordered in place into its tile order (faster than
  `group_gemv` at 4 bits; reference: the same).

Triton is imported lazily (inside the kernel modules, on first launch), so `import memfit.kernels` and the
references work on CPU-only installs. `available()` says whether the Triton kernels can run here.
"""

from __future__ import annotations

import importlib.util
import os

__all__ = ["available", "interpret_mode"]


def interpret_mode() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1): used by tests without a GPU."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available() -> bool:
    """True when Triton is installed and a CUDA device (or Triton's CPU interpreter) can run the kernels."""
    if importlib.util.find_spec("triton") is None:
        return False
    if interpret_mode():
        return True
    import torch

    return torch.cuda.is_available()
