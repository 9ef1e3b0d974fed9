"""KIVI — "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache" (Liu et al., ICML 2024, arXiv 2402.02750).

Algorithm: keep every token, in fewer bits. Keys are quantized per channel (for each head channel, G consecutive
tokens share one min-max scale and zero point: key outliers live in a few channels, so grouping along tokens keeps
them apart), values per token (each token's d channels in groups of G). Asymmetric min-max with 2^b - 1 levels,
fp16 scales and minima, codes bit-packed (memfit.core.quant). The newest tokens stay in full precision:
- keys: a block residual — once R full-precision keys accumulate, all of them are quantized at once (prefill of L
  tokens quantizes L - L mod R), so between 0 and R - 1 keys are in full precision;
- values: a sliding residual of exactly the R newest values; each older one is quantized as it leaves the window.
Attention runs over dequantized quantized tokens + the residual (memfit.core.quantized_store); the prompt's own
attention uses full-precision K/V (nothing is quantized before the step ends), as in the official code.

Official defaults (jy-yuan/KIVI): 2 bits (also 4) for keys and values, G = 32, R = 128 (paper's KIVI-2; the
current example.py uses R = 32). Ours: bits=2, group_size=32, residual=128; `key_bits` / `value_bits` override
`bits` per side (the LongBench script takes k_bits and v_bits).
Option ours: `key_residual="sliding"` keeps the R newest keys in full precision too (between R and R + G - 1; the
oldest G are quantized as a group once R + G have accumulated), instead of the block rule under which a prompt whose
length is a multiple of R has *every* key quantized, the newest included. It costs up to R + G - 1 more
full-precision keys per (row, head). Measured on the default model (2048-token prompt, so the block rule quantized
every key; benchmarks/kivi_reference_kl.py): KL of the first decoded token 0.253 -> 0.012; over the bench's 64-token
continuations KL 0.188 -> 0.165 for 15 % more bytes (benchmarks/claims.md). Either way our cache matches a plain
DynamicCache fake-quantized with the paper's grouping (tests/test_quant_methods.py), so what remains of KIVI-2's
loss on this model is the 2-bit codes'.
Deviations: the official cache transposes keys and packs 16 2-bit codes per int32; our packing is uint8 (same bits
per value, scales/zeros identical). Eviction in front of KIVI (`snapkv+kivi`, `h2o+kivi`) is ours: evicted per-channel
key lanes become holes freed group by group (see quantized_store), never re-quantized unless holes pile up.
"""

from __future__ import annotations

from dataclasses import dataclass

from memfit.core.cache import KVLayer
from memfit.core.method import Method, register
from memfit.core.quantized_store import ChannelCodec, Flush, QuantizedKVLayer, SideStore, TokenCodec
from memfit.errors import ConfigError

BITS = (1, 2, 4, 8)


@register
@dataclass
class KIVI(Method):
    name = "kivi"
    paper = "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache"
    arxiv = "2402.02750"
    family = "quantization"
    acts = "prefill+decode"
    summary = "Keys per-channel, values per-token, 2/4-bit min-max groups + a full-precision residual."

    bits: int = 2
    group_size: int = 32
    residual: int = 128
    key_bits: int | None = None
    value_bits: int | None = None
    key_residual: str = "block"

    # memfit methods: what each parameter means and the values it takes
    param_help = {
        "bits": ("bits per key and value code", "1 | 2 | 4 | 8"),
        "group_size": ("tokens per key group (per channel) and channels per value group (per token)", "integer >= 1"),
        "residual": ("newest tokens kept in full precision (R)", "positive multiple of group_size"),
        "key_bits": ("bits for keys, overriding bits", "none | 1 | 2 | 4 | 8"),
        "value_bits": ("bits for values, overriding bits", "none | 1 | 2 | 4 | 8"),
        "key_residual": ("block: keys quantized R at a time (official); sliding: the R newest keys always stay in "
                         "full precision", "block | sliding"),
    }

    def validate(self) -> None:
        for what, b in (("bits", self.bits), ("key_bits", self.key_bits), ("value_bits", self.value_bits)):
            if b is not None and b not in BITS:
                raise ConfigError(f"kivi.{what} must be one of {BITS} (the paper uses 2 and 4), got {b}")
        if self.group_size < 1:
            raise ConfigError("kivi.group_size must be >= 1")
        if self.key_residual not in ("block", "sliding"):
            raise ConfigError(f"kivi.key_residual must be 'block' (official: keys quantized R at a time) or 'sliding' "
                              f"(the R newest keys stay full precision), got {self.key_residual!r}")
        if self.residual < self.group_size or self.residual % self.group_size:
            raise ConfigError(f"kivi.residual must be a positive multiple of group_size={self.group_size} (keys are "
                              f"quantized a residual block at a time, in groups of G tokens), got {self.residual}")

    def make_layer(self, index: int) -> KVLayer:
        kb = self.bits if self.key_bits is None else self.key_bits
        vb = self.bits if self.value_bits is None else self.value_bits
        G, R = self.group_size, self.residual
        key_flush = Flush(R, multiple=G, sliding=True) if self.key_residual == "sliding" else Flush(R, multiple=R)
        keys = SideStore(ChannelCodec(kb, G), key_flush)
        values = SideStore(TokenCodec(vb, G), Flush(R, multiple=1, sliding=True))
        return QuantizedKVLayer(index, keys, values)
