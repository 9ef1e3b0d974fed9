"""Quantized KV storage: one layer's keys and values kept as packed codes plus a full-precision residual.

A `QuantizedKVLayer` is a `KVLayer` (same contract: `append`, `attend`, `keep`, `finalize_step`, `nbytes`) whose
keys and values each live in a `SideStore`:

    logical slots  0 ............................ q | ............ T
                   quantized (segments of codes)     full-precision residual (the newest tokens)

What happens in one forward call (see `CompressedCache.step`):
1. `append`: the new tokens join the full-precision residual. Nothing is quantized yet, so an eviction policy that
   acts in `after_attention` (SnapKV, H2O at prefill...) sees full-precision prompt tokens.
2. `attend`: each quantized token that attention reads is dequantized exactly once, never re-quantized (whole
   segments at once while every physical lane is live; per-lane gathers from the packed codes once eviction left
   holes, so dead lanes are never decoded), concatenated with the residual into one transient
   (B, Hkv, T, d) tensor per side, and SDPA runs over it. That tensor is what the policy sees as `layer.keys` /
   `layer.values` during the same step (no second dequantization); it is dropped in `finalize_step`.
   Counters: `step_dequantized` (tokens dequantized by the last `attend`, per (row, KV head) summed, keys + values)
   and `dequantized_tokens` (running total). They equal the quantized slots attention read: never more.
3. the policy may `keep` a subset of slots (eviction on a quantized store, below);
4. `finalize_step`: tokens that left the residual window are quantized, once (`quantized_tokens` counts them).

Segments and lanes. A flush turns a block of residual tokens into one or more immutable `Segment`s (a KIVI block,
a GEAR block with its low-rank factors and outliers, VidKV's 2-bit / 1-bit parts...). A segment holds `lanes`
physical token slots per (row, KV head). `SideStore.lanes` (B, Hkv, Tq) maps each quantized logical slot to its
physical lane (over the concatenated segments); None means the identity (no eviction happened since the tokens were
quantized), which costs no bytes.

Eviction on quantized data (`keep`), the design choice:
* per-token data (KIVI values: groups of G channels inside one token) is freed exactly: kept rows are gathered,
  codes bit-identical;
* per-channel data (KIVI keys: one group = G consecutive tokens of one channel) cannot drop one token without
  re-quantizing its group. We do NOT re-quantize: `keep` only rewrites the lane map (codes stay bit-identical, no
  error is added), and physical groups whose lanes are all dead are freed at once (exact; e.g. StreamingLLM evicts
  oldest-first, so its groups empty whole). Dead lanes inside still-live groups ("holes") cost bytes until their
  share exceeds `repack_waste` of the quantized tokens (and at least two groups); then the live quantized tokens
  are dequantized and quantized again into dense groups (counted in `requantized_tokens`; each such repack happens
  at most once per `repack_waste * held` evictions). `nbytes()` always counts holes: they are real memory, as is
  the lane map (int16 per quantized token and head, only while it is not the identity). Freeing is lazy: it runs
  once dead lanes reach a group or 1/32 of the quantized tokens, so per-step evictors pay it every few steps.
* per (row, head) eviction may leave different numbers of quantized tokens in different heads. `q` (per row and
  head) says where each one's quantized prefix ends; the residual buffer covers the last `r` logical slots and rows
  that are already quantized for some head are dead there (zeroed). After the next flush they are gone.

Batches: padding and evicted placeholders are quantized too (they are slots), but never enter a group's statistics:
before quantizing, invalid entries are replaced by the mean of the valid entries of their group. A row's quantized
values still depend on where its tokens fall on group boundaries, so a left-padded row is not bit-identical to the
same row alone once quantization starts (group boundaries and flush times follow the padded layout).

Memory: `attend` materialises one layer's dequantized K and V (the size of that layer in a full cache) for the
duration of one layer's attention; a fused kernel (memfit.kernels) reads the packed form directly on GPU.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from memfit.core.cache import KVLayer, StepInfo, dense_attention, tensor_bytes
from memfit.core.quant import (
    TERNARY_BITS,
    QuantError,
    QuantizedTensor,
    bytes_per_group,
    codes_per_byte,
    quantize,
)
from memfit.core.scoring import attention_probs, reduce_groups
from memfit.errors import ConfigError

# The most full-precision bytes one `attend` dequantizes at once (keys and values, fp32). A step over more rows than
# this covers reads them in row blocks: the transient stays bounded whatever the batch.
READ_BLOCK_BYTES = 1 << 30

__all__ = [
    "ChannelCodec",
    "ChannelSegment",
    "Codec",
    "Flush",
    "FlushContext",
    "QuantizedKVLayer",
    "Segment",
    "SideStore",
    "TokenCodec",
    "TokenSegment",
    "decode_channel_lanes",
    "decode_token_lanes",
    "fill_invalid",
    "gather_rows",
    "lane_codes",
    "owned",
    "qt_select_rows",
    "qt_take_groups",
    "qt_take_rows",
    "take_groups",
]


# ------------------------------------------------------------------------------------------------ helpers


def owned(t: torch.Tensor) -> torch.Tensor:
    """`t` as a contiguous tensor that owns exactly its storage (so counted bytes are held bytes)."""
    if t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone(memory_format=torch.contiguous_format)


def fill_invalid(x: torch.Tensor, valid: torch.Tensor | None, group: int) -> torch.Tensor:
    """Replace invalid tokens of x (B, H, n, d) by the mean of the valid tokens of their group of `group` tokens
    (per channel; 0 when a group has none), so padding never widens a group's range. n % group == 0."""
    if valid is None or bool(valid.all()):
        return x
    B, H, n, d = x.shape
    xg = x.float().reshape(B, H, n // group, group, d)
    vg = valid.reshape(B, H, n // group, group, 1)
    total = torch.where(vg, xg, 0.0).sum(3, keepdim=True)
    mean = total / vg.sum(3, keepdim=True).clamp(min=1)
    return torch.where(vg, xg, mean).reshape(B, H, n, d).to(x.dtype)


def take_groups(t: torch.Tensor, idx: torch.Tensor, per: int) -> torch.Tensor:
    """t (B, H, ng*per, ...) -> (B, H, m*per, ...): per (row, head) the groups `idx` (B, H, m) of `per` rows."""
    B, H = t.shape[:2]
    rest = tuple(t.shape[3:])
    v = t.reshape(B, H, t.shape[2] // per, per, *rest)
    ix = idx.reshape(B, H, idx.shape[2], *([1] * (v.dim() - 3))).expand(B, H, idx.shape[2], per, *rest)
    return v.gather(2, ix).reshape(B, H, idx.shape[2] * per, *rest).contiguous()


def lane_codes(codes: torch.Tensor, bits: float, group_size: int, bh: torch.Tensor, lanes: torch.Tensor) -> torch.Tensor:
    """Integer codes (N, c) of token `lanes[i]` of flattened (row*H + head) `bh[i]`, read from per-channel packed
    codes (B, H, ng*bpg, c) (the `quantize(axis="token")` layout): one byte row per token, never a whole group."""
    B, H, rows, c = codes.shape
    per = codes_per_byte(bits)
    bpg = bytes_per_group(bits, group_size)
    g = torch.div(lanes, group_size, rounding_mode="floor")
    j = lanes - g * group_size
    byte = codes.reshape(B * H, rows, c)[bh, g * bpg + torch.div(j, per, rounding_mode="floor")].long()
    k = (j % per)[:, None]
    if bits == TERNARY_BITS:
        return torch.div(byte, torch.pow(3, k), rounding_mode="floor") % 3
    return (byte >> (k * int(bits))) & ((1 << int(bits)) - 1)


def gather_rows(t: torch.Tensor, bh: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """t (B, H, n, ...) -> (N, ...): row `rows[i]` of flattened (row, head) `bh[i]`."""
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])[bh, rows]


# ------------------------------------------------------------------------------------------------ segments


class Segment:
    """An immutable block of compressed tokens of one side: `lanes` physical token slots per (row, KV head).

    Subclasses decode any set of lanes exactly (`decode`), and keep whole groups of `group` lanes (`take`).
    """

    lanes: int
    group: int

    def decode(self, bh: torch.Tensor, lanes: torch.Tensor) -> torch.Tensor:
        """fp32 (N, d) reconstruction of lane `lanes[i]` of flattened (row, head) `bh[i]`."""
        raise NotImplementedError

    def decode_all(self, batch: int, heads: int) -> torch.Tensor:
        """fp32 (B, H, lanes, d): every lane (vectorized; used when every lane is live)."""
        dev = self.tensors()[0].device
        bh = torch.arange(batch * heads, device=dev).repeat_interleave(self.lanes)
        lanes = torch.arange(self.lanes, device=dev).repeat(batch * heads)
        return self.decode(bh, lanes).reshape(batch, heads, self.lanes, -1)

    def take(self, groups: torch.Tensor) -> Segment:
        """Keep only groups `groups` (B, H, m) (group indices, per row and head), in that order."""
        raise NotImplementedError

    def select_rows(self, rows: torch.Tensor) -> Segment:
        raise NotImplementedError

    def merge(self, other: Segment) -> Segment | None:
        """One segment holding our lanes then `other`'s (same lane numbering), or None if they cannot merge."""
        return None

    def tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def nbytes(self) -> int:
        return tensor_bytes(*self.tensors())

    # persistence (memfit.contexts): a segment is plain data (tensors, QuantizedTensors, ints), so its attributes
    # are its state, whatever the subclass (GEAR's low-rank factors, VidKV's parts...)
    def state_dict(self) -> dict[str, Any]:
        return {"class": f"{type(self).__module__}:{type(self).__qualname__}", "fields": dict(vars(self))}

    @staticmethod
    def from_state(state: dict[str, Any]) -> Segment:
        """Rebuild a segment from `state_dict()`; only memfit's own Segment subclasses are accepted."""
        cls = _segment_class(str(state["class"]))
        seg = cls.__new__(cls)
        seg.__dict__.update(state["fields"])
        return seg


def _segment_class(name: str) -> type[Segment]:
    module, _, qualname = name.partition(":")
    if not module.startswith("memfit."):
        raise ValueError(f"unknown segment class {name!r}")
    import importlib

    importlib.import_module(module)  # a memfit module (e.g. memfit.methods.gear) defines its segments
    todo, found = list(Segment.__subclasses__()), {}
    while todo:
        c = todo.pop()
        found[f"{c.__module__}:{c.__qualname__}"] = c
        todo.extend(c.__subclasses__())
    if name not in found:
        raise ValueError(f"unknown segment class {name!r}")
    return found[name]


def qt_take_groups(qt: QuantizedTensor, groups: torch.Tensor) -> QuantizedTensor:
    """Per-channel QuantizedTensor restricted to token groups `groups` (B, H, m) (exact, codes untouched)."""
    bpg = bytes_per_group(qt.bits, qt.group_size)
    B, H, _, d = qt.shape
    zeros = None if qt.zeros is None else take_groups(qt.zeros, groups, 1)
    return QuantizedTensor(take_groups(qt.codes, groups, bpg), take_groups(qt.scales, groups, 1), zeros,
                           (B, H, groups.shape[2] * qt.group_size, d), qt.bits, qt.axis, qt.group_size, qt.dtype)


def qt_take_rows(qt: QuantizedTensor, rows: torch.Tensor) -> QuantizedTensor:
    """Per-token QuantizedTensor restricted to tokens `rows` (B, H, m) (exact)."""
    B, H, _, d = qt.shape
    zeros = None if qt.zeros is None else take_groups(qt.zeros, rows, 1)
    return QuantizedTensor(take_groups(qt.codes, rows, 1), take_groups(qt.scales, rows, 1), zeros,
                           (B, H, rows.shape[2], d), qt.bits, qt.axis, qt.group_size, qt.dtype)


def qt_select_rows(qt: QuantizedTensor, rows: torch.Tensor) -> QuantizedTensor:
    zeros = None if qt.zeros is None else qt.zeros.index_select(0, rows)
    _, H, T, d = qt.shape
    return QuantizedTensor(qt.codes.index_select(0, rows), qt.scales.index_select(0, rows), zeros,
                           (rows.numel(), H, T, d), qt.bits, qt.axis, qt.group_size, qt.dtype)


def decode_channel_lanes(qt: QuantizedTensor, bh: torch.Tensor, lanes: torch.Tensor) -> torch.Tensor:
    """fp32 (N, d) of lanes of a per-channel (axis='token') QuantizedTensor; equals `qt.dequantize()` there."""
    code = lane_codes(qt.codes, qt.bits, qt.group_size, bh, lanes).float()
    g = torch.div(lanes, qt.group_size, rounding_mode="floor")
    s = gather_rows(qt.scales, bh, g).float()
    if qt.bits == TERNARY_BITS:
        return (code - 1.0) * s
    assert qt.zeros is not None
    return torch.addcmul(gather_rows(qt.zeros, bh, g).float(), code, s)


def decode_token_lanes(qt: QuantizedTensor, bh: torch.Tensor, lanes: torch.Tensor) -> torch.Tensor:
    """fp32 (N, d) of tokens of a per-token (axis='channel') QuantizedTensor (row gathers + `dequantize`)."""
    n = bh.numel()
    d = qt.shape[3]
    zeros = None if qt.zeros is None else gather_rows(qt.zeros, bh, lanes).reshape(1, 1, n, -1)
    sub = QuantizedTensor(gather_rows(qt.codes, bh, lanes).reshape(1, 1, n, -1),
                          gather_rows(qt.scales, bh, lanes).reshape(1, 1, n, -1), zeros, (1, 1, n, d),
                          qt.bits, qt.axis, qt.group_size, qt.dtype)
    return sub.dequantize(torch.float32).reshape(n, d)


def _same_qt(a: Segment, b: Segment, kind: type) -> bool:
    if type(a) is not kind or type(b) is not kind:
        return False
    x, y = a.qt, b.qt  # type: ignore[attr-defined]
    return (x.bits, x.axis, x.group_size, x.scales.dtype) == (y.bits, y.axis, y.group_size, y.scales.dtype)


class ChannelSegment(Segment):
    """Per-channel quantized tokens (KIVI keys): a QuantizedTensor with axis='token'; group = G tokens."""

    def __init__(self, qt: QuantizedTensor) -> None:
        self.qt = qt
        self.lanes = qt.num_tokens
        self.group = qt.group_size

    def decode(self, bh: torch.Tensor, lanes: torch.Tensor) -> torch.Tensor:
        return decode_channel_lanes(self.qt, bh, lanes)

    def decode_all(self, batch: int, heads: int) -> torch.Tensor:
        return self.qt.dequantize(torch.float32)

    def take(self, groups: torch.Tensor) -> Segment:
        return ChannelSegment(qt_take_groups(self.qt, groups))

    def select_rows(self, rows: torch.Tensor) -> Segment:
        return ChannelSegment(qt_select_rows(self.qt, rows))

    def merge(self, other: Segment) -> Segment | None:
        return ChannelSegment(self.qt.cat(other.qt)) if _same_qt(self, other, ChannelSegment) else None

    def tensors(self) -> list[torch.Tensor]:
        return self.qt.tensors()


class TokenSegment(Segment):
    """Per-token quantized tokens (KIVI values): a QuantizedTensor with axis='channel'; group = 1 token."""

    def __init__(self, qt: QuantizedTensor) -> None:
        self.qt = qt
        self.lanes = qt.num_tokens
        self.group = 1

    def decode(self, bh: torch.Tensor, lanes: torch.Tensor) -> torch.Tensor:
        return decode_token_lanes(self.qt, bh, lanes)

    def decode_all(self, batch: int, heads: int) -> torch.Tensor:
        return self.qt.dequantize(torch.float32)

    def take(self, groups: torch.Tensor) -> Segment:
        return TokenSegment(qt_take_rows(self.qt, groups))

    def select_rows(self, rows: torch.Tensor) -> Segment:
        return TokenSegment(qt_select_rows(self.qt, rows))

    def merge(self, other: Segment) -> Segment | None:
        return TokenSegment(self.qt.cat(other.qt)) if _same_qt(self, other, TokenSegment) else None

    def tensors(self) -> list[torch.Tensor]:
        return self.qt.tensors()


# ------------------------------------------------------------------------------------------------ codecs


@dataclass
class FlushContext:
    """What a codec may use when it quantizes a block: the step (prefill/decode), and on demand the attention the
    current step's queries pay to the flushed tokens (VidKV's salient-token choice)."""

    kind: str  # "prefill" | "decode" | "repack"
    saliency: Callable[[], torch.Tensor] | None = None  # -> (B, Hkv, n) fp32 scores of the flushed tokens


class Codec:
    """Turns a block of full-precision tokens (B, H, n, d) into segments. Blocks are a multiple of `multiple`."""

    multiple: int = 1

    def encode(
        self, x: torch.Tensor, valid: torch.Tensor | None, ctx: FlushContext
    ) -> tuple[list[Segment], torch.Tensor | None]:
        """Segments, and each token's lane (B, H, n) over their concatenation (None = token i is lane i).
        `valid` (B, H, n) marks tokens that must not influence statistics (padding, placeholders, dead rows)."""
        raise NotImplementedError

    def check(self, head_dim: int) -> None:
        """Raise ConfigError if this codec cannot store heads of `head_dim` channels."""


class ChannelCodec(Codec):
    """Per-channel group quantization along tokens (KIVI keys): groups of G tokens of one channel."""

    def __init__(self, bits: float, group_size: int, scale_dtype: torch.dtype = torch.float16) -> None:
        self.bits, self.group_size, self.scale_dtype = bits, group_size, scale_dtype
        self.multiple = group_size

    def encode(
        self, x: torch.Tensor, valid: torch.Tensor | None, ctx: FlushContext
    ) -> tuple[list[Segment], torch.Tensor | None]:
        x = fill_invalid(x, valid, self.group_size)
        return [ChannelSegment(quantize(x, self.bits, "token", self.group_size, self.scale_dtype))], None


class TokenCodec(Codec):
    """Per-token group quantization along channels (KIVI values): groups of G channels of one token."""

    def __init__(self, bits: float, group_size: int, scale_dtype: torch.dtype = torch.float16) -> None:
        self.bits, self.group_size, self.scale_dtype = bits, group_size, scale_dtype
        self.multiple = 1

    def check(self, head_dim: int) -> None:
        if head_dim % self.group_size:
            raise ConfigError(f"group_size={self.group_size} must divide the head dim {head_dim} (per-token value "
                              f"groups of G channels): pass a divisor of {head_dim}, e.g. --param group_size="
                              f"{_largest_divisor(head_dim, self.group_size)}")

    def encode(
        self, x: torch.Tensor, valid: torch.Tensor | None, ctx: FlushContext
    ) -> tuple[list[Segment], torch.Tensor | None]:
        x = fill_invalid(x, valid, 1)
        return [TokenSegment(quantize(x, self.bits, "channel", self.group_size, self.scale_dtype))], None


def _largest_divisor(n: int, at_most: int) -> int:
    return max(k for k in range(1, min(n, at_most) + 1) if n % k == 0)


@dataclass(frozen=True)
class Flush:
    """When residual tokens are quantized (checked in `finalize_step`).

    sliding=False (block): once the residual holds >= `residual` tokens, quantize the oldest `r - r % multiple`
    (KIVI keys: multiple = residual, so exactly `r mod R` stay; GEAR / VidKV: multiple = G).
    sliding=True: keep the `residual` newest tokens; quantize the rest (in multiples of `multiple`) (KIVI values).
    """

    residual: int
    multiple: int = 1
    sliding: bool = False

    def count(self, r: int) -> int:
        if self.sliding:
            n = max(0, r - self.residual)
            return n - n % self.multiple
        if r < self.residual:
            return 0
        return r - r % self.multiple


# ------------------------------------------------------------------------------------------------ one side


def _lane_dtype(total: int) -> torch.dtype:
    return torch.int16 if total < 2**15 else torch.int32


class SideStore:
    """Keys or values of one layer: quantized segments (+ lane map) for the old tokens, a residual for the new.

    Logical slots [0, q[b,h]) are quantized (`lanes` maps them to physical lanes), the residual (B, H, r, d) holds
    slots [T - r, T); rows of the residual below q[b,h] are dead (already quantized for that head). See the module
    docstring.
    """

    def __init__(self, codec: Codec, flush: Flush, repack_waste: float = 0.25) -> None:
        if flush.multiple % codec.multiple:
            raise QuantError(f"flush multiple {flush.multiple} must be a multiple of the codec's {codec.multiple}")
        self.codec, self.flush_rule, self.repack_waste = codec, flush, repack_waste
        self.residual: torch.Tensor | None = None
        self.segments: list[Segment] = []
        self.lanes: torch.Tensor | None = None  # (B, H, Tq) physical lane per quantized slot; None = identity
        self.q: int | torch.Tensor = 0  # quantized slots per (row, head): an int when uniform, else (B, H) long
        self.tq = 0  # length of the lane map (max of q)
        self.slots = 0  # logical slots T
        self.dequantized = 0  # (row, head, token) reconstructions, total
        self.quantized = 0  # (row, head, token) quantizations of residual tokens (each token once)
        self.requantized = 0  # (row, head, token) re-quantizations (repacks after eviction)
        self.repacks = 0

    # -- shape ---------------------------------------------------------------------------------------------------
    @property
    def residual_len(self) -> int:
        return 0 if self.residual is None else self.residual.shape[2]

    @property
    def physical_lanes(self) -> int:
        return sum(s.lanes for s in self.segments)

    def q_rows(self) -> torch.Tensor:
        """(B, H) long: quantized slots per row and head."""
        if isinstance(self.q, torch.Tensor):
            return self.q
        assert self.residual is not None
        b, h = self.residual.shape[:2]
        return torch.full((b, h), self.q, dtype=torch.long, device=self.residual.device)

    def _set_q(self, q: torch.Tensor) -> None:
        qmin, qmax = int(q.min()), int(q.max())
        self.q = qmin if qmin == qmax else q.contiguous()
        self.tq = qmax

    def lane_map(self) -> torch.Tensor:
        """(B, H, tq) long lane map (materialised)."""
        assert self.residual is not None
        if self.lanes is not None:
            return self.lanes.long()
        b, h = self.residual.shape[:2]
        return torch.arange(self.tq, device=self.residual.device).expand(b, h, self.tq)

    def _store_lanes(self, lanes: torch.Tensor) -> None:
        b, h, t = lanes.shape
        if t and not bool((lanes == torch.arange(t, device=lanes.device)).all()):
            self.lanes = lanes.to(_lane_dtype(self.physical_lanes)).contiguous()
        else:
            self.lanes = None

    # -- storage -------------------------------------------------------------------------------------------------
    def append(self, x: torch.Tensor) -> None:
        self.residual = x.clone(memory_format=torch.contiguous_format) if self.residual is None else torch.cat(
            [self.residual, x], dim=2)
        self.slots += x.shape[2]

    def flush_count(self) -> int:
        return self.flush_rule.count(self.residual_len)

    def flush(self, n: int, valid: torch.Tensor | None, ctx: FlushContext) -> None:
        """Quantize the `n` oldest residual rows (slots T-r .. T-r+n); `valid` (B, H, n) their validity."""
        assert self.residual is not None and 0 < n <= self.residual_len
        start = self.slots - self.residual_len
        q = self.q_rows()
        slot = start + torch.arange(n, device=self.residual.device)
        live = slot[None, None, :] >= q[:, :, None]  # rows still in the residual for that head
        stats_valid = live if valid is None else live & valid
        segs, local = self.codec.encode(self.residual[:, :, :n], None if bool(stats_valid.all()) else stats_valid, ctx)
        offset = self.physical_lanes
        for seg in segs:  # concatenate with the previous block when the codec allows (one copy, like KIVI's cat)
            merged = self.segments[-1].merge(seg) if self.segments else None
            if merged is None:
                self.segments.append(seg)
            else:
                self.segments[-1] = merged
        b, h = q.shape
        new = (torch.arange(n, device=slot.device).expand(b, h, n) if local is None else local.long()) + offset
        identity_tail = isinstance(self.q, int) and self.q == start and self.lanes is None and local is None \
            and offset == start
        if not identity_tail:
            old = self.lane_map()
            # slots start.. may already be quantized for some heads (after eviction): those keep their old lane
            m = min(self.tq - start, n)
            mixed = torch.where(live[:, :, :m], new[:, :, :m], old[:, :, start : start + m])
            lanes = torch.cat([old[:, :, :start], mixed, old[:, :, start + m :], new[:, :, m:]], dim=2)
            self._store_lanes(lanes)
        self.quantized += int(live.sum())
        self._set_q(torch.maximum(q, torch.full_like(q, start + n)))
        self.residual = owned(self.residual[:, :, n:])
        if not bool(live.all()):
            self.compact(ctx)

    # -- reading -------------------------------------------------------------------------------------------------
    def read(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Every slot in logical order (B, H, T, d): quantized slots dequantized once each, then the residual."""
        assert self.residual is not None
        res = self.residual
        dtype = res.dtype if dtype is None else dtype
        b, h, r, d = res.shape
        if self.tq == 0:
            return res.to(dtype)
        if isinstance(self.q, int) and self.physical_lanes == self.tq and self.tq + r == self.slots:
            # every physical lane is live exactly once: dequantize whole segments (vectorized), then put the
            # lanes in logical order (a row gather, skipped when the lane map is the identity). The decoded parts
            # and the residual go into the result with one concatenation: this runs for every layer at every
            # decode step, and each extra pass over a (B, H, T, d) fp32 tensor was a visible share of CPU decode.
            parts = [seg.decode_all(b, h) for seg in self.segments]
            if self.lanes is not None:
                phys = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
                parts = [phys.gather(2, self.lanes.long()[..., None].expand(b, h, self.tq, d))]
            self.dequantized += b * h * self.tq
            return torch.cat([*(p.to(dtype) for p in parts), res.to(dtype)], dim=2)
        out = torch.empty(b, h, self.slots, d, dtype=dtype, device=res.device)
        if r:
            out[:, :, self.slots - r :] = res.to(dtype)
        if isinstance(self.q, int):
            flat_pos = None
            bh = torch.arange(b * h, device=res.device).repeat_interleave(self.tq)
            lanes = self.lane_map().reshape(-1)
        else:
            mask = torch.arange(self.tq, device=res.device)[None, None, :] < self.q[:, :, None]
            flat_pos = mask.reshape(b * h, self.tq).nonzero(as_tuple=True)
            bh = flat_pos[0]
            lanes = self.lane_map().reshape(b * h, self.tq)[flat_pos]
        vals = self.decode(bh, lanes)
        view = out.reshape(b * h, self.slots, d)
        if flat_pos is None:
            view[:, : self.tq] = vals.reshape(b * h, self.tq, d).to(dtype)
        else:
            view[flat_pos] = vals.to(dtype)
        self.dequantized += bh.numel()
        return out

    def read_rows(self, lo: int, hi: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """`read()` of rows lo..hi only: a shallow copy keeps just those rows (their codes are copied, a small
        compressed share) and reads them, so the full-precision transient covers hi - lo rows."""
        assert self.residual is not None
        view = copy.copy(self)
        view.select_rows(torch.arange(lo, hi, device=self.residual.device))
        out = view.read(dtype)
        self.dequantized += view.dequantized - self.dequantized
        return out

    def decode(self, bh: torch.Tensor, lanes: torch.Tensor) -> torch.Tensor:
        """fp32 (N, d) of global lanes `lanes` of flattened (row, head) `bh` (each decoded exactly once)."""
        if len(self.segments) == 1:
            return self.segments[0].decode(bh, lanes)
        assert self.residual is not None
        out = torch.empty(bh.numel(), self.residual.shape[3], dtype=torch.float32, device=bh.device)
        offset = 0
        for seg in self.segments:
            sel = ((lanes >= offset) & (lanes < offset + seg.lanes)).nonzero(as_tuple=True)[0]
            if sel.numel():
                out[sel] = seg.decode(bh[sel], lanes[sel] - offset)
            offset += seg.lanes
        return out

    # -- eviction ------------------------------------------------------------------------------------------------
    def gather(self, indices: torch.Tensor, ctx: FlushContext) -> None:
        """Keep logical slots `indices` (B, H, K) (sorted per row and head). Quantized codes are never rewritten
        here: the lane map is gathered, fully dead groups are freed, holes trigger a repack past `repack_waste`."""
        assert self.residual is not None
        k = indices.shape[2]
        q = self.q_rows()
        r, start = self.residual_len, self.slots - self.residual_len
        is_q = indices < q[:, :, None]
        q_new = is_q.sum(-1)
        tq_new = int(q_new.max()) if k else 0
        if tq_new:
            src = indices[:, :, :tq_new].clamp(max=max(self.tq - 1, 0))
            lanes = self.lane_map().gather(2, src)
        r_new = k - int(q_new.min()) if k else 0
        start_new = k - r_new
        if r_new:
            src_slot = indices[:, :, start_new:]
            row = (src_slot - start).clamp(0, max(r - 1, 0))
            d = self.residual.shape[3]
            res = self.residual.gather(2, row[..., None].expand(*row.shape, d))
            alive = (torch.arange(start_new, k, device=indices.device)[None, None, :] >= q_new[:, :, None])
            self.residual = owned(torch.where(alive[..., None], res, torch.zeros((), dtype=res.dtype)))
        else:
            self.residual = self.residual[:, :, :0].contiguous()
        self.slots = k
        self._set_q(q_new)
        if tq_new:
            self._store_lanes(lanes)
            self.compact(ctx)
        else:
            self.segments, self.lanes = [], None

    def compact(self, ctx: FlushContext) -> None:
        """Free physical groups no quantized slot points to (exact); repack when holes exceed the waste limit.

        Lazy: nothing happens while the dead lanes are fewer than max(largest group, 1/32 of the quantized tokens),
        so one-token-per-step evictors (H2O) pay the compaction every few steps, not every step."""
        if not self.segments:
            return
        assert self.residual is not None
        b, h = self.residual.shape[:2]
        dev = self.residual.device
        total = self.physical_lanes
        q = self.q_rows()
        if total - int(q.min()) < max(max(s.group for s in self.segments), self.tq // 32):
            return
        lanes = self.lane_map()
        alive_slot = torch.arange(self.tq, device=dev)[None, None, :] < q[:, :, None]
        live = torch.zeros(b, h, total + 1, dtype=torch.bool, device=dev)
        live.scatter_(2, torch.where(alive_slot, lanes, total), True)
        live = live[:, :, :total]
        remap = torch.full((b, h, total), -1, dtype=torch.long, device=dev)
        kept: list[Segment] = []
        offset = new_offset = 0
        for seg in self.segments:
            g, n = seg.group, seg.lanes
            ng = n // g
            live_g = live[:, :, offset : offset + n].reshape(b, h, ng, g).any(-1)
            m = int(live_g.sum(-1).max())
            if m:
                pos = torch.arange(ng, device=dev).expand(b, h, ng)
                if m < ng:  # free the groups no head needs; heads with fewer live groups keep some dead ones
                    order = torch.argsort((~live_g).to(torch.int8), dim=-1, stable=True)[:, :, :m]
                    pos = torch.full((b, h, ng), -1, dtype=torch.long, device=dev)
                    pos.scatter_(2, order, torch.arange(m, device=dev).expand(b, h, m))
                    seg = seg.take(order)
                lane = torch.arange(n, device=dev)
                p = pos[:, :, lane // g]
                remap[:, :, offset : offset + n] = torch.where(p >= 0, p * g + lane % g + new_offset, -1)
                kept.append(seg)
                new_offset += seg.lanes
            offset += n
        self.segments = kept
        new_lanes = remap.gather(2, lanes).clamp(min=0)
        self._store_lanes(torch.where(alive_slot, new_lanes, 0))
        waste = self.physical_lanes - int(q.min())
        group = max(s.group for s in self.segments) if self.segments else 1
        if group > 1 and waste > max(2 * group, self.repack_waste * self.tq):
            self.repack(ctx)

    def repack(self, ctx: FlushContext) -> None:
        """Dequantize the live quantized tokens and quantize them again into dense groups (counted)."""
        assert self.residual is not None
        b, h, _, d = self.residual.shape
        dev = self.residual.device
        q = self.q_rows()
        tq = self.tq
        mult = self.codec.multiple
        n = -(-tq // mult) * mult
        x = torch.zeros(b, h, n, d, dtype=torch.float32, device=dev)
        alive = torch.arange(n, device=dev)[None, None, :] < q[:, :, None]
        pos = alive[:, :, :tq].reshape(b * h, tq).nonzero(as_tuple=True)
        x.reshape(b * h, n, d)[pos] = self.decode(pos[0], self.lane_map().reshape(b * h, tq)[pos])
        segs, local = self.codec.encode(x.to(self.residual.dtype), alive, FlushContext("repack", None))
        self.segments = segs
        self.requantized += int(alive.sum())
        self.repacks += 1
        lanes = torch.arange(tq, device=dev).expand(b, h, tq) if local is None else local[:, :, :tq].long()
        self._store_lanes(lanes)

    def select_rows(self, rows: torch.Tensor) -> None:
        if self.residual is None:
            return
        self.residual = self.residual.index_select(0, rows)
        self.segments = [s.select_rows(rows) for s in self.segments]
        if self.lanes is not None:
            self.lanes = self.lanes.index_select(0, rows)
        if isinstance(self.q, torch.Tensor):
            self._set_q(self.q.index_select(0, rows))

    # -- accounting ----------------------------------------------------------------------------------------------
    def tensors(self) -> list[torch.Tensor]:
        out = [t for s in self.segments for t in s.tensors()]
        for t in (self.residual, self.lanes, self.q):
            if isinstance(t, torch.Tensor):
                out.append(t)
        return out

    def nbytes(self) -> int:
        return tensor_bytes(*self.tensors())

    # -- persistence (memfit.contexts); the codec and flush rule are configuration, rebuilt by the method ----------
    def state_dict(self) -> dict[str, Any]:
        return {"residual": self.residual, "segments": [s.state_dict() for s in self.segments], "lanes": self.lanes,
                "q": self.q, "tq": self.tq, "slots": self.slots,
                "counters": [self.dequantized, self.quantized, self.requantized, self.repacks]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.residual, self.lanes, self.q = state["residual"], state["lanes"], state["q"]
        self.segments = [Segment.from_state(s) for s in state["segments"]]
        self.tq, self.slots = int(state["tq"]), int(state["slots"])
        self.dequantized, self.quantized, self.requantized, self.repacks = (int(c) for c in state["counters"])


# ------------------------------------------------------------------------------------------------ the layer


class QuantizedKVLayer(KVLayer):
    """A KVLayer whose keys and values are `SideStore`s (see module docstring).

    `keys` / `values` stay readable for policies: during a step they are the tensors attention just read (no extra
    work); outside a step they are dequantized on demand (counted in `on_demand_dequantized`).
    """

    def __init__(self, index: int, key_store: SideStore, value_store: SideStore, saliency_window: int = 0) -> None:
        self.k = key_store
        self.v = value_store
        self.saliency_window = saliency_window  # queries kept for FlushContext.saliency (0: none needed)
        self._step: tuple[torch.Tensor, torch.Tensor] | None = None  # what attend read (transient, one step)
        self._probe: tuple[torch.Tensor, float] | None = None  # last queries of this step (transient)
        self._shape: tuple[int, int, int] | None = None  # B, Hkv, d
        self._dtype: torch.dtype | None = None
        self.step_dequantized = 0  # tokens dequantized by the last attend (keys + values, per row and head)
        self.on_demand_dequantized = 0
        super().__init__(index)

    # keys/values: computed, not stored (KVLayer.__init__ assigns None)
    @property  # type: ignore[override]
    def keys(self) -> torch.Tensor | None:
        return self._read(0)

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        if value is not None:
            raise AttributeError("a quantized store's keys are written through append/keep, not assigned")

    @property  # type: ignore[override]
    def values(self) -> torch.Tensor | None:
        return self._read(1)

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        if value is not None:
            raise AttributeError("a quantized store's values are written through append/keep, not assigned")

    def _read(self, which: int) -> torch.Tensor | None:
        if self.k.residual is None:
            return None
        if self._step is not None:
            return self._step[which]
        side = self.k if which == 0 else self.v
        before = side.dequantized
        out = side.read()
        self.on_demand_dequantized += side.dequantized - before
        return out

    # -- counters ------------------------------------------------------------------------------------------------
    @property
    def dequantized_tokens(self) -> int:
        return self.k.dequantized + self.v.dequantized

    @property
    def quantized_tokens(self) -> int:
        return self.k.quantized + self.v.quantized

    @property
    def requantized_tokens(self) -> int:
        return self.k.requantized + self.v.requantized

    # -- shape helpers -------------------------------------------------------------------------------------------
    @property
    def num_slots(self) -> int:
        return self.k.slots

    def valid_mask(self) -> torch.Tensor:
        assert self._shape is not None and self.k.residual is not None
        if self.valid is not None:
            return self.valid
        b, h, _ = self._shape
        return torch.ones(b, h, self.num_slots, dtype=torch.bool, device=self.k.residual.device)

    # -- storage -------------------------------------------------------------------------------------------------
    def append(self, keys: torch.Tensor, values: torch.Tensor, new_valid: torch.Tensor | None) -> None:
        b, h, q, d = keys.shape
        if self._shape is None:
            self.k.codec.check(d)
            self.v.codec.check(d)
            self._shape, self._dtype = (b, h, d), keys.dtype
        self._step = self._probe = None
        self.k.append(keys)
        self.v.append(values)
        self._append_state(new_valid, b, h, q)  # validity, per-token policy state, seen (shared with every store)

    def attend(self, queries: torch.Tensor, scaling: float, window: int | None = None) -> torch.Tensor:
        before = self.dequantized_tokens
        if self.saliency_window:
            self._probe = (queries[:, :, -self.saliency_window :], scaling)
        b = queries.shape[0]
        rows = self._rows_per_read(b)
        if rows >= b:
            keys, values = self.k.read(), self.v.read()
            self.step_dequantized = self.dequantized_tokens - before
            self._step = (keys, values)
            return dense_attention(queries, keys, values, self.valid, scaling, window)
        # A large batch (e.g. hundreds of questions prefilled on copies of one compressed document): dequantizing
        # every row at once would need a transient larger than the compressed store itself, so attention runs over
        # row blocks and nothing is kept for the step (a policy that reads `keys` afterwards dequantizes again).
        outs = []
        for lo in range(0, b, rows):
            hi = min(b, lo + rows)
            keys, values = self.k.read_rows(lo, hi), self.v.read_rows(lo, hi)
            valid = None if self.valid is None else self.valid[lo:hi]
            outs.append(dense_attention(queries[lo:hi], keys, values, valid, scaling, window))
            del keys, values
        self.step_dequantized = self.dequantized_tokens - before
        self._step = None
        return torch.cat(outs, dim=0)

    def _rows_per_read(self, batch: int) -> int:
        """Rows whose keys and values fit `READ_BLOCK_BYTES` at full precision (at least one)."""
        res = self.k.residual
        assert res is not None
        h, d = res.shape[1], res.shape[3]
        per_row = 2 * h * self.k.slots * d * 4  # fp32 keys and values of one row
        return max(1, READ_BLOCK_BYTES // max(1, per_row))

    def keep(self, indices: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        ctx = FlushContext("repack", None)
        self.k.gather(indices, ctx)
        self.v.gather(indices, ctx)
        if self._step is not None:
            d = self._step[0].shape[-1]
            idx = indices.unsqueeze(-1).expand(*indices.shape, d)
            self._step = (self._step[0].gather(2, idx), self._step[1].gather(2, idx))
        self._keep_state(indices, valid)

    def finalize_step(self, info: StepInfo) -> None:
        if info.is_prefill and not info.prefill_done and info.keep is not None:
            # A chunked prompt with an eviction in front: the eviction may still drop any token of this layer at
            # the next chunk, so nothing is quantized until the prompt is in. Quantizing now would leave the
            # eviction holes inside quantized groups (the fast backend's static store cannot freeze such a layer,
            # so the request would decode on this store's slower path), and the eviction would score dequantized
            # keys where an unchunked prefill scores exact ones. Memory while prefilling stays what admission
            # reserves for it (the kept tokens plus a chunk, at full precision: memfit.serve.admission).
            self._step = self._probe = None
            return
        kind = "prefill" if info.is_prefill else "decode"
        for side in (self.k, self.v):
            n = side.flush_count()
            if n:
                start = side.slots - side.residual_len
                valid = None if self.valid is None else self.valid[:, :, start : start + n]
                side.flush(n, valid, FlushContext(kind, self._saliency_fn(info, start, n)))
        self._step = self._probe = None

    def _saliency_fn(self, info: StepInfo, start: int, n: int) -> Callable[[], torch.Tensor] | None:
        """Attention (fp32 softmax over every held slot) that this step's last queries pay to slots
        start..start+n, summed over those queries and averaged over each GQA group: (B, Hkv, n)."""
        if self._probe is None:
            return None
        queries, scaling = self._probe

        def scores() -> torch.Tensor:
            keys = self.keys
            assert keys is not None
            probs = attention_probs(queries, keys, scaling, self.valid)  # (B, H, w, T)
            if info.new_valid is not None:
                probs = probs * info.new_valid[:, None, -queries.shape[2] :, None].to(probs.dtype)
            return reduce_groups(probs.sum(2), keys.shape[1], "mean")[:, :, start : start + n]

        return scores

    def select_batch(self, rows: torch.Tensor) -> None:
        if self.k.residual is None:
            return
        self.k.select_rows(rows)
        self.v.select_rows(rows)
        if self.valid is not None:
            self.valid = self.valid.index_select(0, rows)
        self.extras = {k: v.index_select(0, rows) for k, v in self.extras.items()}
        assert self._shape is not None
        self._shape = (rows.numel(), *self._shape[1:])

    # -- persistence (memfit.contexts) -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"k": self.k.state_dict(), "v": self.v.state_dict(), "valid": self.valid, "extras": dict(self.extras),
                "seen": self.seen, "shape": self._shape, "dtype": self._dtype,
                "counters": [self.step_dequantized, self.on_demand_dequantized]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.k.load_state_dict(state["k"])
        self.v.load_state_dict(state["v"])
        self.valid, self.extras, self.seen = state["valid"], dict(state["extras"]), int(state["seen"])
        self._shape = None if state["shape"] is None else tuple(int(x) for x in state["shape"])  # type: ignore[assignment]
        self._dtype = state["dtype"]
        self.step_dequantized, self.on_demand_dequantized = (int(c) for c in state["counters"])
        self._step = self._probe = None

    # -- accounting ----------------------------------------------------------------------------------------------
    def nbytes(self) -> int:
        return self.k.nbytes() + self.v.nbytes() + tensor_bytes(self.valid, *self.extras.values())

    def full_nbytes(self) -> int:
        if self._shape is None or self._dtype is None:
            return 0
        b, h, d = self._shape
        return 2 * b * h * self.seen * d * self._dtype.itemsize  # no tensor per call: the server sums this per tick

    def describe(self) -> dict[str, Any]:
        """Where the layer's bytes are (for reports and tests)."""
        return {
            "slots": self.num_slots,
            "key_quantized": self.k.tq,
            "key_residual": self.k.residual_len,
            "value_quantized": self.v.tq,
            "value_residual": self.v.residual_len,
            "key_bytes": self.k.nbytes(),
            "value_bytes": self.v.nbytes(),
            "requantized_tokens": self.requantized_tokens,
        }
