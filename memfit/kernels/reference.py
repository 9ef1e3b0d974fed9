"""Plain-PyTorch references for the Triton decode kernels (any device, fp32 math). CI tests these on CPU against
simple dense math, and each kernel against its reference in Triton's CPU interpreter; the `gpu` tests do the same on
CUDA at larger shapes.

Layouts (the bit-packed KIVI layout of `memfit.core.quant`, restricted to what the kernels read):
bits in {2, 4, 8}, group size G a multiple of the codes per byte (cpb = 8 // bits), head dim d a multiple of G.

* keys, quantized per channel along tokens (axis="token"): codes (B, H, Cq/G*bpg, d) uint8 with bpg = G/cpb, so
  token t of channel c sits in byte row ``t // cpb`` at bits ``[(t % cpb)*bits, ...)``; scales / zeros (B, H, Cq/G, d).
* values, quantized per token along channels (axis="channel"): codes (B, H, Cq, d/cpb) uint8, channel c of token t
  in byte ``c // cpb`` at bits ``[(c % cpb)*bits, ...)``; scales / zeros (B, H, Cq, d/G).
* dequantized value = code * scale + zero (zero = the group minimum, a float).
* residual: full-precision keys / values (B, H, R, d).

A row b holds ``n_q[b]`` quantized tokens (slots [0, n_q) of both quantized stores; a multiple of G) followed by
``n_r[b]`` residual tokens (slots [0, n_r) of the residual buffers): ``n_q + n_r`` tokens in order. Capacities
(Cq, R) are static; lengths are device tensors, so one compiled kernel / CUDA graph serves every step.
"""

from __future__ import annotations

import torch

__all__ = [
    "append_slots",
    "decode_attention_ref",
    "dequantize_keys",
    "dequantize_values",
    "h2o_append_ref",
    "h2o_decode_ref",
    "kivi_decode_attention_ref",
    "unpack_bytes",
]


def _check_bits(bits: int, group_size: int) -> int:
    if bits not in (2, 4, 8):
        raise ValueError(f"kernels support 2, 4 or 8-bit codes, got bits={bits!r}")
    cpb = 8 // bits
    if group_size % cpb:
        raise ValueError(f"group_size={group_size} must be a multiple of the {cpb} codes per byte of {bits}-bit codes")
    return cpb


def unpack_bytes(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Split each uint8 along `dim` into its 8 // bits codes (low bits first): that dim grows by 8 // bits."""
    cpb = 8 // bits
    if cpb == 1:
        return packed
    dim = dim % packed.dim()
    shape = [1] * (packed.dim() + 1)
    shape[dim + 1] = cpb
    shifts = (torch.arange(cpb, device=packed.device, dtype=torch.uint8) * bits).view(shape)
    codes = torch.bitwise_right_shift(packed.unsqueeze(dim + 1), shifts) & ((1 << bits) - 1)
    return codes.flatten(dim, dim + 1)


def dequantize_keys(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                    group_size: int) -> torch.Tensor:
    """Token-axis (per-channel) packed keys -> fp32 (B, H, Cq, d), Cq = scales.shape[2] * group_size."""
    _check_bits(bits, group_size)
    c = unpack_bytes(codes, bits, dim=2).float()
    s = scales.float().repeat_interleave(group_size, dim=2)
    z = zeros.float().repeat_interleave(group_size, dim=2)
    return c * s + z


def dequantize_values(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                      group_size: int) -> torch.Tensor:
    """Channel-axis (per-token) packed values -> fp32 (B, H, Cq, d)."""
    _check_bits(bits, group_size)
    c = unpack_bytes(codes, bits, dim=3).float()
    s = scales.float().repeat_interleave(group_size, dim=3)
    z = zeros.float().repeat_interleave(group_size, dim=3)
    return c * s + z


def _lengths(n: torch.Tensor | int, batch: int, device: torch.device) -> torch.Tensor:
    if isinstance(n, int):
        return torch.full((batch,), n, dtype=torch.long, device=device)
    return n.to(device=device, dtype=torch.long).reshape(batch)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, scale: float):
    """fp32 masked softmax attention of q (B, Hq, d) over k, v (B, Hkv, T, d) with valid (B, T) or (B, Hkv, T).
    Returns (out fp32 (B, Hq, d), probs fp32 (B, Hkv, g, T))."""
    b, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    qg = q.float().reshape(b, hkv, g, d)
    logits = torch.einsum("bhgd,bhtd->bhgt", qg, k.float()) * scale
    mask = valid[:, None, None, :] if valid.dim() == 2 else valid[:, :, None, :]
    logits = logits.masked_fill(~mask, float("-inf"))
    probs = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)
    out = torch.einsum("bhgt,bhtd->bhgd", probs, v.float()).reshape(b, hq, d)
    return out, probs


def kivi_decode_attention_ref(
    q: torch.Tensor,
    k_codes: torch.Tensor,
    k_scales: torch.Tensor,
    k_zeros: torch.Tensor,
    v_codes: torch.Tensor,
    v_scales: torch.Tensor,
    v_zeros: torch.Tensor,
    k_res: torch.Tensor,
    v_res: torch.Tensor,
    n_q: torch.Tensor | int,
    n_r: torch.Tensor | int,
    *,
    bits: int,
    group_size: int,
    scale: float,
) -> torch.Tensor:
    """Attention of one query per row q (B, Hq, d) over n_q quantized + n_r residual tokens: (B, Hq, d) in q.dtype."""
    b = q.shape[0]
    kq = dequantize_keys(k_codes, k_scales, k_zeros, bits, group_size)
    vq = dequantize_values(v_codes, v_scales, v_zeros, bits, group_size)
    cq, r = kq.shape[2], k_res.shape[2]
    nq = _lengths(n_q, b, q.device)
    nr = _lengths(n_r, b, q.device)
    valid = torch.cat([torch.arange(cq, device=q.device)[None] < nq[:, None],
                       torch.arange(r, device=q.device)[None] < nr[:, None]], dim=1)
    k = torch.cat([kq, k_res.float()], dim=2)
    v = torch.cat([vq, v_res.float()], dim=2)
    out, _ = _attend(q, k, v, valid, scale)
    return out.to(q.dtype)


def decode_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor | int, *,
                         scale: float) -> torch.Tensor:
    """Attention of q (B, Hq, d) over the first lengths[b] slots of k, v (B, Hkv, C, d): (B, Hq, d) in q.dtype."""
    b, c = q.shape[0], k.shape[2]
    n = _lengths(lengths, b, q.device)
    valid = torch.arange(c, device=q.device)[None] < n[:, None]
    out, _ = _attend(q, k, v, valid, scale)
    return out.to(q.dtype)


def h2o_decode_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor | int,
    acc: torch.Tensor,
    pos: torch.Tensor,
    cur_pos: torch.Tensor | int,
    recent: int,
    *,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One H2O decode step over a fixed-size slot buffer (the new token already written into its slot).

    q (B, Hq, d); k, v (B, Hkv, C, d) with slots [0, lengths[b]) valid; acc (B, Hkv, C) fp32 accumulated attention;
    pos (B, Hkv, C) int token positions; cur_pos (B,) the new token's position; `recent` newest tokens (position >
    cur_pos - recent) are protected. Returns (out (B, Hq, d) in q.dtype, new acc = acc + this step's attention
    summed over each GQA group (slots past the length unchanged), victim (B, Hkv) long = the slot to free: the
    first empty slot if any, else the unprotected slot with the smallest new score (first on ties)).
    """
    b, _, c, _ = k.shape
    n = _lengths(lengths, b, q.device)
    cur = _lengths(cur_pos, b, q.device)
    valid = torch.arange(c, device=q.device)[None] < n[:, None]
    out, probs = _attend(q, k, v, valid, scale)
    new_acc = acc.float() + probs.sum(dim=2)
    protected = pos.long() > (cur - recent)[:, None, None]
    cand = torch.where(protected, torch.full_like(new_acc, float("inf")), new_acc)
    cand = torch.where(valid[:, None, :], cand, torch.full_like(new_acc, float("-inf")))
    victim = torch.argmin(cand, dim=-1)
    return out.to(q.dtype), new_acc, victim


def _slot_tensor(slot: torch.Tensor | int, b: int, h: int, device: torch.device) -> torch.Tensor:
    if isinstance(slot, int):
        return torch.full((b, h), slot, dtype=torch.long, device=device)
    slot = slot.to(device=device, dtype=torch.long)
    return slot[:, None].expand(b, h) if slot.dim() == 1 else slot


def append_slots(k: torch.Tensor, v: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                 slot: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of k, v (B, Hkv, C, d) with the new token (B, Hkv, d) written at slot (int, (B,) or (B, Hkv))."""
    b, h, _, d = k.shape
    idx = _slot_tensor(slot, b, h, k.device)[..., None, None].expand(b, h, 1, d)
    return (k.clone().scatter_(2, idx, k_new[:, :, None].to(k.dtype)),
            v.clone().scatter_(2, idx, v_new[:, :, None].to(v.dtype)))


def h2o_append_ref(k, v, acc, pos, k_new, v_new, slot, cur_pos):
    """`append_slots` + the new slot's H2O state (pos = cur_pos, acc = 0): returns copies (k, v, acc, pos)."""
    b, h = k.shape[:2]
    k2, v2 = append_slots(k, v, k_new, v_new, slot)
    idx = _slot_tensor(slot, b, h, k.device)[..., None]
    cur = _lengths(cur_pos, b, k.device)
    pos2 = pos.clone().scatter_(2, idx, cur[:, None, None].expand(b, h, 1).to(pos.dtype))
    acc2 = acc.clone().scatter_(2, idx, 0.0)
    return k2, v2, acc2, pos2
