"""The fast backend's KIVI store: packed codes and a full-precision ring in buffers preallocated after the prompt.

`StaticKIVILayer` is the portable `QuantizedKVLayer` (memfit.core.quantized_store) with KIVI's codecs until the
prompt is in, so prefill, eviction (SnapKV... in front of KIVI) and the first flush are exactly the portable ones.
At the first single-token append it moves what the layer holds into fixed buffers and from then on every decode step
is the same handful of fixed-shape kernels, with no host sync, so the step can be recorded in a CUDA graph:

    key codes  (B, H, Cq/G*bpg, d) uint8 + scales / zeros (B, H, Cq/G, d) fp16   per channel, groups of G tokens
    value codes (B, H, Cq, d/G*bpg) uint8 + scales / zeros (B, H, Cq, d/G) fp16   per token, groups of G channels
    ring       keys and values (B, H, W, d) in the model's dtype: the W newest tokens, token t in slot t mod W

Cq (the tokens the codes can hold) is the prompt's kept tokens plus the decode reserve, rounded up to R.

What the portable store does, and how the ring reproduces it. KIVI quantizes the two sides at different times:
values leave a sliding window of the R newest tokens one per step; keys are quantized R at a time (block rule: 0 to
R - 1 keys in full precision) or G at a time (sliding rule: R to R + G - 1). So for up to W = R + 1 (block) or R + G
(sliding) of the newest tokens one side is quantized and the other is not. Attention must read the quantized side as
its dequantized value and the other in full precision. The ring holds exactly these W newest tokens on both sides;
when a side of a ring token is quantized, its ring entry is overwritten with the dequantized value (the value the
portable store's attention reads: decoded in fp32, cast to the model's dtype). Every older token is quantized on
both sides, so one attention call reads codes for tokens [0, T - W) and the ring for the rest: the layout of
`memfit.kernels.kivi_decode_attention` (Triton, on CUDA) and of its reference (elsewhere) with n_q = T - W (not a
multiple of G: the kernel masks tokens, not groups) and n_r = W. The ring is always full once T >= W, so its slot
order does not matter (attention is a sum over tokens); before that the tokens sit in slots [0, T).

A decode step: (1) write the new token in ring slot T mod W (a device-side counter); (2) attention; (3) flushes
decided on the device instead of by host branches: the value at slot qv is quantized (one token, per-token groups)
when the window holds R + 1 values; the R (block) or G (sliding) oldest ring keys are quantized into the next key
groups when that many have accumulated; then the counters advance and the next step's ring slot and kernel lengths
are set. On CUDA that is three Triton launches per layer (`memfit.kernels.kivi_flush`: each flush program returns at
once when its side does not flush); elsewhere the same in PyTorch as masked writes (`torch.where(flush, new, old)`
into the same rows: every step quantizes one value and one key block and keeps them or not), which is also the
reference the Triton flush is tested against, bit for bit. One graph serves every step. The alternative, a second
graph for the flush steps replayed on a host-known schedule, needs a graph per phase and a runtime that switches
between them; the device-side decision keeps `memfit.graphs` unchanged. The host keeps mirrors of T, qk and qv by
running the same rule in Python (`advance` after each replay), so it never reads a device counter.

Exactness: codes, scales and zeros are bit-identical to the portable store's (same `quantize` calls on the same
tokens: per-channel groups never straddle a flush, per-token groups do not depend on when a token is quantized), and
attention reads the same values; `unfreeze()` turns the buffers back into the portable segments and residuals
(tests/test_static_quant.py compares them bit for bit and the logits at every step).

Bytes: `nbytes()` counts every buffer at its capacity (codes and scales for Cq tokens, the 2W ring slots, the
counters): what the store allocates. `used_nbytes()` counts what the portable store would hold for the same tokens
(codes for the quantized tokens, full-precision residuals of 0..R-1 keys and R values); the difference is the
headroom for the tokens still to decode (code rows up to Cq) plus the ring's surplus: it holds 2W token slots (keys
and values) where the portable residuals hold R + rk (rk = 0..R-1 full-precision keys; sliding rule: R..R+G-1), i.e.
3 to R + 2 more slots (sliding: G + 1 to 2G), which hold dequantized copies of the newest quantized tokens — a fixed
ring the step writes in place instead of residuals that grow and shrink. No dequantized copy of any other token
exists: the kernel dequantizes tiles in registers.

Plane order (`memfit.core.planes`, from PLANES_MIN_ROWS rows on CUDA): the same code bytes, arranged so
that one bit field of 16 byte rows holds 16 consecutive tokens, which the plane-order kernel feeds to tensor-core
dots without dequantizing (value codes then sit channel by channel in blocks of 16 x CPB tokens). Freeze converts
the portable codes into it, unfreeze converts back (bit-identical), and a flush ORs a token's codes into their
field of bytes whose other fields belong to neighbouring tokens (an unflushed token's bits are zero).

When the layer does not freeze (and stays the portable store, eagerly): padded rows or evicted placeholders
(`valid`), per-token policy state, holes left by an eviction on quantized tokens (chunked prefill), or a head dim the
kernel cannot read on CUDA. An eviction or a batch reorder after freezing turns the buffers back into the portable
store first (`unfreeze`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from memfit.core import planes as kivi_planes
from memfit.core.cache import StepInfo, tensor_bytes
from memfit.core.quant import QuantizedTensor, bytes_per_group, quantize
from memfit.core.quantized_store import (
    ChannelCodec,
    ChannelSegment,
    Flush,
    QuantizedKVLayer,
    SideStore,
    TokenCodec,
    TokenSegment,
)
from memfit.core.spans import SPAN_KEY
from memfit.errors import ConfigError

__all__ = ["KIVIForm", "StaticKIVILayer", "static_quant_form"]

KERNEL_BITS = (2, 4, 8)  # what the decode kernel (and its reference) unpack


@dataclass(frozen=True)
class KIVIForm:
    """KIVI's parameters as the static store needs them."""

    bits: int
    group_size: int
    residual: int
    sliding_keys: bool  # key_residual="sliding"

    @property
    def ring(self) -> int:
        """W: tokens of which at least one side may still be needed in full precision (see module docstring)."""
        return self.residual + (self.group_size if self.sliding_keys else 1)

    @property
    def key_block(self) -> int:
        """Keys quantized per flush."""
        return self.group_size if self.sliding_keys else self.residual

    @property
    def key_threshold(self) -> int:
        """Full-precision keys at which a block is flushed."""
        return self.residual + self.group_size if self.sliding_keys else self.residual


def static_quant_form(policy: Any) -> KIVIForm | None:
    """The static form of a method's quantized store, or None where it has none yet.

    KIVI alone, or behind an eviction method that acts only on the prompt (SnapKV, GemFilter, KVzip...: its
    decoding adds no eviction the fixed buffers would have to apply), with the same bit width for keys and values
    in {2, 4, 8} and groups of whole bytes (G a multiple of 8 / bits). GEAR, VidKV, and evictions during decoding
    (H2O, StreamingLLM... in front of KIVI) stay on the portable store."""
    quantizer = getattr(policy, "quantizer", policy)
    if getattr(quantizer, "name", None) != "kivi":
        return None
    evictor = getattr(policy, "evictor", None)
    if evictor is not None and evictor.acts not in ("prefill", "never"):
        return None
    kb = quantizer.bits if quantizer.key_bits is None else quantizer.key_bits
    vb = quantizer.bits if quantizer.value_bits is None else quantizer.value_bits
    g = int(quantizer.group_size)
    if kb != vb or kb not in KERNEL_BITS or g % (8 // kb):
        return None
    return KIVIForm(int(kb), g, int(quantizer.residual), quantizer.key_residual == "sliding")


def _kernel_head_ok(d: int, group_size: int) -> bool:
    return d >= 16 and d & (d - 1) == 0 and group_size & (group_size - 1) == 0 and d % group_size == 0


class StaticKIVILayer(QuantizedKVLayer):
    """KIVI's store in fixed buffers after the prompt (see module docstring)."""

    def __init__(self, index: int, form: KIVIForm, reserve: int = 256) -> None:
        g, r = form.group_size, form.residual
        key_flush = Flush(r, multiple=g, sliding=True) if form.sliding_keys else Flush(r, multiple=r)
        super().__init__(index, SideStore(ChannelCodec(form.bits, g), key_flush),
                         SideStore(TokenCodec(form.bits, g), Flush(r, multiple=1, sliding=True)))
        self.form = form
        self.reserve = reserve
        self.kernel_attention = False  # set by memfit.graphs; the kernel runs on CUDA either way (see attend)
        self.layout = "canonical"  # of the frozen codes: "planes" where the plane-order kernel reads them (freeze)
        # rows the frozen codes will be read with when more than this store's own (the server sets it: its requests
        # are one row each, decoded in stack blocks of up to StackBlocks.max_rows rows); steers the layout only
        self.layout_rows = 0
        self.buffers: dict[str, torch.Tensor] | None = None  # kc ks kz vc vs vz kr vr; None until frozen
        self.t_dev: torch.Tensor | None = None  # (1,) long: tokens held (T)
        self.qk_dev: torch.Tensor | None = None  # (1,) long: keys quantized
        self.qv_dev: torch.Tensor | None = None  # (1,) long: values quantized
        self.slot: torch.Tensor | None = None  # (1,) long: the ring slot of the next token (T mod W)
        self.n_q: torch.Tensor | None = None  # (B,) int32: tokens the kernel reads as codes at the next step
        self.n_r: torch.Tensor | None = None  # (B,) int32: ring tokens it reads (n_q + n_r = T + 1)
        # the flush and counter updates as three Triton launches (memfit.kernels.kivi_flush) instead of ~80 small
        # PyTorch ones: on CUDA where the shapes allow (decided at freeze); tests may force it in the interpreter
        self.triton_flush: bool | None = None
        self.stack: Any = None  # the memfit.core.stacks block whose row r holds this store's buffers (views), if any
        self.stack_row = -1
        self.freezes = 0  # times the buffers were built (1 for a whole decode; more means something unfroze them)
        self.length = 0  # host mirrors of T, qk, qv (the same rule run in Python: no device reads)
        self.qk = 0
        self.qv = 0

    # -- shape -------------------------------------------------------------------------------------------------
    @property
    def frozen(self) -> bool:
        return self.buffers is not None

    @property
    def capacity(self) -> int:
        """Tokens the codes can hold (Cq); a CUDA graph is recorded only when the decode fits."""
        return 0 if self.buffers is None else self.buffers["vs"].shape[2]  # one value scale row per token

    @property
    def num_slots(self) -> int:
        return self.length if self.frozen else self.k.slots

    def valid_mask(self) -> torch.Tensor:
        if not self.frozen:
            return super().valid_mask()
        assert self._shape is not None and self.buffers is not None
        b, h, _ = self._shape
        return torch.ones(b, h, self.length, dtype=torch.bool, device=self.buffers["kr"].device)

    # -- freezing ----------------------------------------------------------------------------------------------
    def _can_freeze(self) -> bool:
        k, v = self.k, self.v
        if k.residual is None or self.valid is not None or self.extras or self._shape is None:
            return False
        if not isinstance(k.q, int) or not isinstance(v.q, int) or k.lanes is not None or v.lanes is not None:
            return False
        if k.physical_lanes != k.q or v.physical_lanes != v.q:  # holes from an eviction on quantized tokens
            return False
        if not all(isinstance(s, ChannelSegment) for s in k.segments):
            return False
        if not all(isinstance(s, TokenSegment) for s in v.segments):
            return False
        d = self._shape[2]
        return not k.residual.is_cuda or _kernel_head_ok(d, self.form.group_size)

    def freeze(self, reserve: int | None = None) -> None:
        """Move the held tokens into fixed buffers with room for `reserve` more (no-op when frozen or not possible)."""
        if not self.frozen:
            self.extras.pop(SPAN_KEY, None)  # as StaticKVLayer.freeze: span ids steer no selection after the prompt
        if self.frozen or not self._can_freeze():
            return
        assert self._shape is not None and self.k.residual is not None
        f = self.form
        b, h, d = self._shape
        t, qk, qv = self.k.slots, int(self.k.q), int(self.v.q)
        room = self.reserve if reserve is None else reserve
        self.layout = "planes" if _use_planes(f, d, self.k.residual.device, max(b, self.layout_rows)) else "canonical"
        unit = self.capacity_unit()
        cap = -(-max(t + room, 1) // unit) * unit
        dev, dtype = self.k.residual.device, self.k.residual.dtype
        bufs = self._alloc(b, h, d, cap, dev, dtype)
        kq = _cat_qt([s.qt for s in self.k.segments])  # type: ignore[attr-defined]
        vq = _cat_qt([s.qt for s in self.v.segments])  # type: ignore[attr-defined]
        if kq is not None:
            if self.layout == "planes":
                kivi_planes.convert_rows(kivi_planes.keys_to_planes_padded, kq.codes, bufs["kc"], f.bits)
            else:
                bufs["kc"][:, :, : kq.codes.shape[2]].copy_(kq.codes)
            bufs["ks"][:, :, : kq.scales.shape[2]].copy_(kq.scales)
            bufs["kz"][:, :, : kq.scales.shape[2]].copy_(kq.zeros)  # type: ignore[arg-type]
        if vq is not None:
            if self.layout == "planes":
                kivi_planes.convert_rows(kivi_planes.values_to_planes_padded, vq.codes, bufs["vc"], f.bits)
            else:
                bufs["vc"][:, :, :qv].copy_(vq.codes)
            bufs["vs"][:, :, :qv].copy_(vq.scales)
            bufs["vz"][:, :, :qv].copy_(vq.zeros)  # type: ignore[arg-type]
        w = f.ring
        lo = max(0, t - w)
        slots = torch.arange(lo, t, device=dev) % w
        # what the portable store's attention reads for tokens lo..t: dequantized (fp32 -> dtype) or the residual
        bufs["kr"].index_copy_(2, slots, _tail(kq, self.k.residual, lo, qk))
        bufs["vr"].index_copy_(2, slots, _tail(vq, self.v.residual, lo, qv))
        self.buffers = bufs
        self.freezes += 1
        self.length, self.qk, self.qv = t, qk, qv
        self.t_dev = torch.full((1,), t, dtype=torch.long, device=dev)
        self.qk_dev = torch.full((1,), qk, dtype=torch.long, device=dev)
        self.qv_dev = torch.full((1,), qv, dtype=torch.long, device=dev)
        self.slot = torch.full((1,), t % w, dtype=torch.long, device=dev)
        self.n_q = torch.full((b,), max(t + 1 - w, 0), dtype=torch.int32, device=dev)
        self.n_r = torch.full((b,), min(t + 1, w), dtype=torch.int32, device=dev)
        if self.triton_flush is None:
            self.triton_flush = dev.type == "cuda" and _kernels_here() and _flush_supported(f, d) and self._dry_flush()
        self.k = SideStore(self.k.codec, self.k.flush_rule)  # the buffers hold everything now
        self.v = SideStore(self.v.codec, self.v.flush_rule)
        self._step = self._probe = None

    def capacity_unit(self) -> int:
        """Capacities are multiples of this (the residual R; plane order: also whole 16 x CPB-token blocks)."""
        f = self.form
        return math.lcm(f.residual, kivi_planes.block_tokens(f.bits)) if self.layout == "planes" else f.residual

    # -- rows of a stack block (memfit.core.stacks) -------------------------------------------------------------
    STACK_COUNTERS = ("t_dev", "qk_dev", "qv_dev", "slot", "n_q", "n_r")

    def stack_empty(self) -> dict[str, int]:
        """Counters of a row that holds nothing (a block's free row): its next step appends into ring slot 0 and
        attends over that one token; nothing flushes (the values `advance_counters` gives from t = 0)."""
        return {"t_dev": 0, "qk_dev": 0, "qv_dev": 0, "slot": 0, "n_q": 0, "n_r": 1}

    def stackable(self) -> bool:
        return (type(self) is StaticKIVILayer and self.frozen and self.stack is None and self.valid is None
                and not self.extras and self._shape is not None and self._shape[0] == 1)

    def stack_signature(self) -> tuple:
        assert self._shape is not None and self.buffers is not None
        kr = self.buffers["kr"]
        return ("kivi", self.form, self.layout, self._shape[1:], kr.dtype, str(kr.device))

    def stack_kernels(self) -> bool:
        """Whether a block of such rows steps in the Triton kernels (else its members step one by one)."""
        assert self.buffers is not None
        kr = self.buffers["kr"]
        return (kr.is_cuda and _kernels_here() and kr.dtype in (torch.bfloat16, torch.float16)
                and _flush_supported(self.form, kr.shape[-1]))

    def stack_parts(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Buffers (token dimension 2) and step counters ((1,) each) a block copies into a row."""
        assert self.buffers is not None
        return self.buffers, {name: getattr(self, name) for name in self.STACK_COUNTERS}

    def set_stack_parts(self, buffers: dict[str, torch.Tensor] | None, counters: dict[str, torch.Tensor] | None) -> None:
        self.buffers = buffers
        for name in self.STACK_COUNTERS:
            setattr(self, name, None if counters is None else counters[name])

    def alloc_stack(self, rows: int, capacity: int, device: torch.device | None = None) -> dict[str, torch.Tensor]:
        assert self._shape is not None and self.buffers is not None
        kr = self.buffers["kr"]
        return self._alloc(rows, self._shape[1], self._shape[2], capacity, device or kr.device, kr.dtype)

    def stack_step(self, bufs: dict[str, torch.Tensor], c: dict[str, torch.Tensor], keys: torch.Tensor,
                   values: torch.Tensor, queries: torch.Tensor, scaling: float) -> torch.Tensor:
        """One decode step of n rows of a block (this layer's form): append into each row's ring slot, attend,
        flush, advance the per-row counters. keys/values (n, Hkv, 1, d), queries (n, H, 1, d) -> (n, H, 1, d)."""
        from memfit.kernels import kivi_flush as K
        from memfit.kernels.kivi_attention import kivi_decode_attention

        f, planes = self.form, self.layout == "planes"
        # the kernel writes the new token into the row's ring slot, then attends over it (n_r already counts it)
        out = kivi_decode_attention(
            queries[:, :, 0], bufs["kc"], bufs["ks"], bufs["kz"], bufs["vc"], bufs["vs"], bufs["vz"], bufs["kr"],
            bufs["vr"], c["n_q"], c["n_r"], bits=f.bits, group_size=f.group_size, scale=scaling,
            k_new=keys[:, :, 0], v_new=values[:, :, 0], append_at=c["slot"].to(torch.int32), layout=self.layout)
        K.flush_values(bufs["vr"], bufs["vc"], bufs["vs"], bufs["vz"], c["t_dev"], c["qv_dev"], ring=f.ring,
                       residual=f.residual, group_size=f.group_size, bits=f.bits, planes=planes)
        K.flush_keys(bufs["kr"], bufs["kc"], bufs["ks"], bufs["kz"], c["t_dev"], c["qk_dev"], ring=f.ring,
                     threshold=f.key_threshold, block=f.key_block, group_size=f.group_size, bits=f.bits,
                     planes=planes)
        K.advance_counters(c["t_dev"], c["qk_dev"], c["qv_dev"], c["slot"], c["n_q"], c["n_r"], ring=f.ring,
                           residual=f.residual, threshold=f.key_threshold, block=f.key_block)
        return out[:, :, None]

    def _leave_stack(self) -> None:
        """Before anything that replaces the buffers: a stacked store takes its row back as buffers of its own."""
        if self.stack is not None:
            self.stack.leave(self.stack_row, keep=True)

    def _dry_flush(self) -> bool:
        """Launch the three flush kernels once on scratch counters that flush nothing (compiling them here, outside
        any graph, with the buffers' strides); if Triton cannot build them, the PyTorch flush serves instead."""
        from memfit.kernels import kivi_flush as K

        assert self.buffers is not None and self.n_q is not None
        f, bufs, dev = self.form, self.buffers, self.n_q.device
        far = torch.full((1,), 1 << 40, dtype=torch.long, device=dev)  # quantized counts past any token: no flush
        t, slot = torch.zeros(1, dtype=torch.long, device=dev), torch.zeros(1, dtype=torch.long, device=dev)
        n_q, n_r = torch.zeros_like(self.n_q), torch.zeros_like(self.n_q)
        try:
            K.flush_values(bufs["vr"], bufs["vc"], bufs["vs"], bufs["vz"], t, far, ring=f.ring, residual=f.residual,
                           group_size=f.group_size, bits=f.bits, planes=self.layout == "planes")
            K.flush_keys(bufs["kr"], bufs["kc"], bufs["ks"], bufs["kz"], t, far, ring=f.ring,
                         threshold=f.key_threshold, block=f.key_block, group_size=f.group_size, bits=f.bits,
                         planes=self.layout == "planes")
            K.advance_counters(t, far.clone(), far.clone(), slot, n_q, n_r, ring=f.ring, residual=f.residual,
                               threshold=f.key_threshold, block=f.key_block)
        except Exception as exc:  # noqa: BLE001  (a Triton build error of any kind: the PyTorch path is exact)
            import warnings

            warnings.warn(f"memfit: KIVI's Triton flush is unavailable here ({type(exc).__name__}: {exc}); the fast "
                          "backend flushes in PyTorch instead (slower per step)", RuntimeWarning, stacklevel=2)
            return False
        return True

    def _alloc(self, b: int, h: int, d: int, cap: int, dev: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Zeroed buffers (unused rows decode to 0, never NaN: the reference multiplies masked slots by 0)."""
        f = self.form
        g, bpg = f.group_size, bytes_per_group(f.bits, f.group_size)
        sd = torch.float16  # KIVI's scale dtype (ChannelCodec / TokenCodec default)

        def z(*shape: int, dt: torch.dtype) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dt, device=dev)

        return {
            "kc": z(b, h, cap // g * bpg, d, dt=torch.uint8), "ks": z(b, h, cap // g, d, dt=sd),
            "kz": z(b, h, cap // g, d, dt=sd),
            "vc": (z(b, h, cap // kivi_planes.block_tokens(f.bits), d, 16, dt=torch.uint8) if self.layout == "planes"
                   else z(b, h, cap, d // g * bpg, dt=torch.uint8)),
            "vs": z(b, h, cap, d // g, dt=sd),
            "vz": z(b, h, cap, d // g, dt=sd),
            "kr": z(b, h, f.ring, d, dt=dtype), "vr": z(b, h, f.ring, d, dt=dtype),
        }

    def _grow(self) -> None:
        """Decoding past the reserve (eager only: a recorded graph never runs past its capacity): double Cq."""
        self._leave_stack()
        assert self.buffers is not None and self._shape is not None
        old = self.buffers
        b, h, d = self._shape
        new = self._alloc(b, h, d, 2 * self.capacity, old["kr"].device, old["kr"].dtype)
        for name, t in old.items():
            new[name][:, :, : t.shape[2]].copy_(t)
        self.buffers = new

    def unfreeze(self) -> None:
        """Turn the buffers back into the portable store's segments and residuals (bit-identical)."""
        if self.buffers is None:
            return
        self._leave_stack()
        f, bufs = self.form, self.buffers
        assert self._shape is not None
        b, h, d = self._shape
        g, bpg = f.group_size, bytes_per_group(f.bits, f.group_size)
        t, qk, qv = self.length, self.qk, self.qv
        keys = SideStore(self.k.codec, self.k.flush_rule)
        values = SideStore(self.v.codec, self.v.flush_rule)
        kr, vr = self._ring_tokens(bufs["kr"], qk, t), self._ring_tokens(bufs["vr"], qv, t)
        kc, vc = self._canonical_codes(qk, qv)
        if qk:
            keys.segments = [ChannelSegment(QuantizedTensor(
                kc[:, :, : qk // g * bpg].clone(), bufs["ks"][:, :, : qk // g].clone(),
                bufs["kz"][:, :, : qk // g].clone(), (b, h, qk, d), f.bits, "token", g, kr.dtype))]
        if qv:
            values.segments = [TokenSegment(QuantizedTensor(
                vc[:, :, :qv].clone(), bufs["vs"][:, :, :qv].clone(), bufs["vz"][:, :, :qv].clone(),
                (b, h, qv, d), f.bits, "channel", g, vr.dtype))]
        for side, q, res in ((keys, qk, kr), (values, qv, vr)):
            side.residual, side.slots, side.q, side.tq = res, t, q, q
        self.k, self.v = keys, values
        self.buffers = None
        self.t_dev = self.qk_dev = self.qv_dev = self.slot = self.n_q = self.n_r = None

    def _canonical_codes(self, qk: int, qv: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Key and value codes in the canonical layout, for at least the first qk keys and qv values."""
        bufs = self.buffers
        assert bufs is not None
        if self.layout != "planes":
            return bufs["kc"], bufs["vc"]
        bits = self.form.bits
        blk, cpb = kivi_planes.block_tokens(bits), 8 // bits
        nk, nv = -(-qk // blk), -(-qv // blk)  # whole blocks
        kc_p, vc_p = bufs["kc"][:, :, : nk * 16], bufs["vc"][:, :, :nv]
        b, h, _, d = kc_p.shape
        kc = torch.empty(b, h, nk * 16, d, dtype=torch.uint8, device=kc_p.device)
        vc = torch.empty(b, h, nv * blk, d // cpb, dtype=torch.uint8, device=vc_p.device)
        kivi_planes.convert_rows(kivi_planes.keys_from_planes, kc_p, kc, bits)
        kivi_planes.convert_rows(kivi_planes.values_from_planes, vc_p, vc, bits)
        return kc, vc

    def _ring_tokens(self, ring: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Ring entries of tokens start..end (in order), as an owned tensor."""
        slots = torch.arange(start, end, device=ring.device) % self.form.ring
        return ring.index_select(2, slots).contiguous()

    # -- decode step -------------------------------------------------------------------------------------------
    def append(self, keys: torch.Tensor, values: torch.Tensor, new_valid: torch.Tensor | None) -> None:
        if not self.frozen and keys.shape[2] == 1 and self.k.residual is not None:
            self.freeze()  # the prompt is in
        if not self.frozen or keys.shape[2] != 1:
            self.unfreeze()
            return super().append(keys, values, new_valid)
        # decode tokens are real tokens (never padding): new_valid is not read, so the step never syncs
        if self.length + 1 > self.capacity:
            self._grow()
        assert self.buffers is not None and self.slot is not None
        kr, vr = self.buffers["kr"], self.buffers["vr"]
        if self.triton_flush and self._fused_append_ok(kr, vr, keys, values):
            from memfit.kernels import fused_ops

            fused_ops.append_kv(kr, vr, keys, values, self.slot)  # one launch; the flush step moves the counters
        else:
            kr.index_copy_(2, self.slot, keys)
            vr.index_copy_(2, self.slot, values)
        self.length += 1
        self.seen += 1

    @staticmethod
    def _fused_append_ok(kr: torch.Tensor, vr: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> bool:
        from memfit.kernels import fused_ops

        return keys.is_cuda and fused_ops.append_kv_supported(kr, vr, keys, values)

    def attend(self, queries: torch.Tensor, scaling: float, window: int | None = None) -> torch.Tensor:
        if not self.frozen or queries.shape[2] != 1 or window is not None:
            return super().attend(queries, scaling, window)
        bufs = self.buffers
        assert bufs is not None and self.n_q is not None and self.n_r is not None
        args = (queries[:, :, 0], bufs["kc"], bufs["ks"], bufs["kz"], bufs["vc"], bufs["vs"], bufs["vz"],
                bufs["kr"], bufs["vr"], self.n_q, self.n_r)
        if queries.is_cuda and _kernels_here() and queries.dtype in (torch.bfloat16, torch.float16):
            from memfit.kernels.kivi_attention import kivi_decode_attention

            out = kivi_decode_attention(*args, bits=self.form.bits, group_size=self.form.group_size, scale=scaling,
                                        layout=self.layout)
        else:
            from memfit.kernels.reference import kivi_decode_attention_ref

            if self.layout == "planes":  # the reference reads the canonical layout (every code: whole capacity)
                kc, vc = self._canonical_codes(self.capacity, self.capacity)
                args = (*args[:1], kc, *args[2:4], vc, *args[5:])
            out = kivi_decode_attention_ref(*args, bits=self.form.bits, group_size=self.form.group_size,
                                            scale=scaling)
        return out[:, :, None]

    def finalize_step(self, info: StepInfo) -> None:
        if not self.frozen or info.is_prefill:
            self.unfreeze()
            return super().finalize_step(info)
        bufs = self.buffers
        assert bufs is not None and self.t_dev is not None and self.qk_dev is not None and self.qv_dev is not None
        assert self.slot is not None and self.n_q is not None and self.n_r is not None
        f = self.form
        if self.triton_flush:
            from memfit.kernels import kivi_flush as K

            planes = self.layout == "planes"
            K.flush_values(bufs["vr"], bufs["vc"], bufs["vs"], bufs["vz"], self.t_dev, self.qv_dev, ring=f.ring,
                           residual=f.residual, group_size=f.group_size, bits=f.bits, planes=planes)
            K.flush_keys(bufs["kr"], bufs["kc"], bufs["ks"], bufs["kz"], self.t_dev, self.qk_dev, ring=f.ring,
                         threshold=f.key_threshold, block=f.key_block, group_size=f.group_size, bits=f.bits,
                         planes=planes)
            K.advance_counters(self.t_dev, self.qk_dev, self.qv_dev, self.slot, self.n_q, self.n_r, ring=f.ring,
                               residual=f.residual, threshold=f.key_threshold, block=f.key_block)
        else:
            self._flush_torch()
            self._advance_torch()
        self._host_flush()

    def _flush_torch(self) -> None:
        """The flush in plain PyTorch, as masked writes (the reference of memfit.kernels.kivi_flush)."""
        bufs = self.buffers
        assert bufs is not None and self.t_dev is not None and self.qk_dev is not None and self.qv_dev is not None
        f = self.form
        w, g, r = f.ring, f.group_size, f.residual
        bpg = bytes_per_group(f.bits, g)
        t = self.t_dev + 1
        dev = t.device
        # values: the oldest of R + 1 full-precision values is quantized (one token, its own groups)
        flush_v = (t - self.qv_dev) > r
        row = self.qv_dev.clamp(max=self.capacity - 1)
        slot = self.qv_dev % w
        x = bufs["vr"].index_select(2, slot)
        qt = quantize(x, f.bits, "channel", g)
        if self.layout == "planes":
            kivi_planes.or_value_token(bufs["vc"], self.qv_dev, qt.codes, f.bits, flush_v)
        else:
            _masked_rows(bufs["vc"], row, qt.codes, flush_v)
        _masked_rows(bufs["vs"], row, qt.scales, flush_v)
        _masked_rows(bufs["vz"], row, qt.zeros, flush_v)  # type: ignore[arg-type]
        _masked_rows(bufs["vr"], slot, qt.dequantize(torch.float32).to(x.dtype), flush_v)
        # keys: a block of R (block rule) or G (sliding rule) once that many wait beyond the window
        n = f.key_block
        flush_k = (t - self.qk_dev) >= f.key_threshold
        slots = (self.qk_dev + torch.arange(n, device=dev)) % w
        x = bufs["kr"].index_select(2, slots)
        qt = quantize(x, f.bits, "token", g)
        rows = ((self.qk_dev // g) * bpg + torch.arange(n // g * bpg, device=dev)).clamp(max=bufs["kc"].shape[2] - 1)
        groups = (self.qk_dev // g + torch.arange(n // g, device=dev)).clamp(max=bufs["ks"].shape[2] - 1)
        if self.layout == "planes":
            kivi_planes.or_key_tokens(bufs["kc"], self.qk_dev, qt.codes, f.bits, flush_k)
        else:
            _masked_rows(bufs["kc"], rows, qt.codes, flush_k)
        _masked_rows(bufs["ks"], groups, qt.scales, flush_k)
        _masked_rows(bufs["kz"], groups, qt.zeros, flush_k)  # type: ignore[arg-type]
        _masked_rows(bufs["kr"], slots, qt.dequantize(torch.float32).to(x.dtype), flush_k)

    def _advance_torch(self) -> None:
        """Counters after the step, and the next step's ring slot and kernel lengths (memfit.kernels.kivi_flush)."""
        assert self.t_dev is not None and self.qk_dev is not None and self.qv_dev is not None
        assert self.slot is not None and self.n_q is not None and self.n_r is not None
        f = self.form
        t = self.t_dev + 1
        self.qv_dev.add_(((t - self.qv_dev) > f.residual).long())
        self.qk_dev.add_(((t - self.qk_dev) >= f.key_threshold).long() * f.key_block)
        self.t_dev.add_(1)
        self.slot.copy_(self.t_dev % f.ring)
        nxt = self.t_dev + 1
        self.n_q.copy_((nxt - f.ring).clamp(min=0).to(torch.int32).expand_as(self.n_q))
        self.n_r.copy_(nxt.clamp(max=f.ring).to(torch.int32).expand_as(self.n_r))

    def _host_flush(self) -> None:
        """The same flush rule on the host mirrors (self.length already counts the new token)."""
        f = self.form
        if self.length - self.qv > f.residual:
            self.qv += 1
        if self.length - self.qk >= f.key_threshold:
            self.qk += f.key_block

    def advance(self, steps: int = 1) -> None:
        """Host bookkeeping of `steps` decode steps replayed from a CUDA graph (the graph did the device work)."""
        for _ in range(steps):
            self.length += 1
            self.seen += 1
            self._host_flush()

    # -- what policies and callers see -------------------------------------------------------------------------
    def _read(self, which: int) -> torch.Tensor | None:
        if not self.frozen:
            return super()._read(which)
        self.unfreeze()  # rare (inspection, saving): the portable form reads it exactly
        return super()._read(which)

    def keep(self, indices: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        self.unfreeze()
        super().keep(indices, valid)

    def select_batch(self, rows: torch.Tensor) -> None:
        self.unfreeze()
        super().select_batch(rows)

    def state_dict(self) -> dict[str, Any]:
        self.unfreeze()
        return super().state_dict()

    # -- accounting --------------------------------------------------------------------------------------------
    def nbytes(self) -> int:
        if not self.frozen:
            return super().nbytes()
        assert self.buffers is not None
        return tensor_bytes(*self.buffers.values(), self.t_dev, self.qk_dev, self.qv_dev, self.slot, self.n_q, self.n_r,
                            self.valid, *self.extras.values())

    def used_nbytes(self) -> int:
        """Bytes the portable store holds for the same tokens (see module docstring); = nbytes() before freezing."""
        if not self.frozen:
            return super().nbytes()
        assert self.buffers is not None and self._shape is not None
        f, bufs = self.form, self.buffers
        b, h, d = self._shape
        g, bpg = f.group_size, bytes_per_group(f.bits, f.group_size)
        scale = 2 * bufs["ks"].element_size()  # scales + zeros
        keys = b * h * d * (self.qk // g * bpg + self.qk // g * scale)
        values = b * h * self.qv * (d // g * bpg + d // g * scale)
        residual = b * h * d * (2 * self.length - self.qk - self.qv) * bufs["kr"].element_size()
        return keys + values + residual

    def describe(self) -> dict[str, Any]:
        if not self.frozen:
            return super().describe()
        return {"slots": self.length, "key_quantized": self.qk, "key_residual": self.length - self.qk,
                "value_quantized": self.qv, "value_residual": self.length - self.qv, "capacity": self.capacity,
                "ring": self.form.ring, "allocated_bytes": self.nbytes(), "used_bytes": self.used_nbytes()}


def _masked_rows(buf: torch.Tensor, index: torch.Tensor, new: torch.Tensor, flush: torch.Tensor) -> None:
    """buf[:, :, index] = new where the device flag `flush` (1,) is set, else unchanged: no host branch."""
    old = buf.index_select(2, index)
    buf.index_copy_(2, index, torch.where(flush, new.to(buf.dtype), old))


def _tail(qt: QuantizedTensor | None, residual: torch.Tensor, lo: int, q: int) -> torch.Tensor:
    """Tokens lo.. of one side as the portable store's attention reads them: quantized ones (< q) decoded in fp32
    and cast to the residual's dtype, then the residual (only the groups covering lo..q are decoded)."""
    if qt is None or lo >= q:
        return residual[:, :, max(0, lo - q) :]
    old = qt.dequantize(torch.float32, token_slice=slice(lo, q)).to(residual.dtype)
    return torch.cat([old, residual], dim=2)


def _cat_qt(parts: list[QuantizedTensor]) -> QuantizedTensor | None:
    return QuantizedTensor.concat(parts) if parts else None


_KERNELS: bool | None = None


def _flush_supported(form: KIVIForm, head_dim: int) -> bool:
    from memfit.kernels.kivi_flush import supported

    return supported(form.key_block, form.group_size, form.bits, head_dim)


def _kernels_here() -> bool:
    global _KERNELS
    if _KERNELS is None:
        from memfit.kernels import available

        _KERNELS = available()
    return _KERNELS


# Rows from which plane order pays on the H200. With the tile's pipeline stages (kivi_kernel_sweep_planes5_h200.jsonl)
# it is faster than the canonical tiles at every shape swept from 16 rows of 32K tokens on (2-bit 589 against 763 us,
# 4-bit 587 against 790 us; 1.6-1.8x at 64-461 rows of 8K), where the codes far exceed L2; at one row the kernel alone
# is faster too, but the product replays slower (runtime_kivi_layout_{planes,canonical}_stages3.jsonl: 5.46 against
# 5.20 ms per token at 32K; one row's codes of a layer stay in L2 in the kernel-only replay), and 2-15 rows are not
# measured. Before the stages: 64 rows at 2 bits, 256 at 4 (kivi_kernel_sweep_planes3_h200.jsonl).
PLANES_MIN_ROWS = {2: 16, 4: 16}


def _use_planes(form: KIVIForm, head_dim: int, device: torch.device, rows: int) -> bool:
    """Whether frozen codes go in plane order (`memfit.core.planes`): where the plane-order kernel serves
    them faster (CUDA, 2 or 4 bits, shapes of whole 16-token slices, batches of at least PLANES_MIN_ROWS rows).
    MEMFIT_KIVI_LAYOUT=canonical keeps the canonical layout and its kernel, =planes forces plane order wherever the
    shapes allow (A/B runs; the CPU tests, where the reference then reads a canonical copy)."""
    choice = os.environ.get("MEMFIT_KIVI_LAYOUT", "auto")
    if choice not in ("auto", "planes", "canonical"):
        raise ConfigError(f"MEMFIT_KIVI_LAYOUT={choice!r}: use auto, planes or canonical")
    ok = kivi_planes.supported(form.bits, form.group_size, form.key_block, head_dim)
    if choice != "auto":
        return ok and choice == "planes"
    return ok and device.type == "cuda" and _kernels_here() and rows >= PLANES_MIN_ROWS[form.bits]
