"""Fused forms of a decoder layer's small operations, for the fast backend's decode step (Triton).

Measured on an H200 (`benchmarks/decode_step_profile.py`, Llama-3.1-8B config, one token, CUDA graph): a step ran
1,559 kernels, ~1,100 of them elementwise, about 1.8 ms of a 6.6 ms step — in a graph each launch costs no host time
but still a few microseconds of GPU time, and the step reads only ~16 GB. transformers writes RMSNorm as eight
operations (cast, square, mean, add, rsqrt, multiply, cast, scale), rotary embedding as ten per layer (multiply,
negate, concatenate, multiply, add for each of q and k), and the gated MLP's activation as two. Here each is one
kernel, with the same arithmetic as transformers' modules, rounded where they round:
- `rms_norm`: statistics in fp32; Llama-style (`offset=0`) casts the normalised row to the input dtype before scaling
  by the weight in that dtype; Gemma-style (`offset=1`) scales by (1 + weight) in fp32 and casts once.
- `rotary`: q * cos and rotate_half(q) * sin each rounded to the tensor's dtype, then their sum (q and k in one launch).
- `silu_mul`: silu(gate) rounded, then times up (gate and up may be the two halves of one matmul's rows).
- `append_kv`: a static store's decode append — the new key and value written at the device-side slot, the slot
  counter and the per-row lengths advanced — in one launch instead of four (two `index_copy_`, two `add_`): the last
  program to finish its copy (a ticket counter) advances the counters, after every program has read the slot.
The adapter (`memfit.adapters.transformers.install_fused_ops`) also stores an attention's q/k/v weights, and an
MLP's gate/up weights, as row blocks of one matrix each, so a decode step reads them in one matmul.
The sums inside a row reduce in another order than PyTorch's, so outputs may differ in the last bit of a bf16 value
(tests: tests/test_fused_ops.py, in Triton's interpreter). The plain-PyTorch forms are transformers' own modules.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["append_kv", "append_kv_supported", "rms_norm", "rotary", "rotary_supported", "silu_mul"]


@triton.jit
def _rms_norm_kernel(X, W, Y, stride_x, stride_y, N, eps, OFFSET: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < N
    x = tl.load(X + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
    var = tl.sum(x * x, axis=0) / N
    h = x * tl.math.rsqrt(var + eps)
    w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
    if OFFSET:
        y = h * (1.0 + w)
    else:
        y = w * h.to(Y.dtype.element_ty).to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=m)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: bool = False) -> torch.Tensor:
    """RMSNorm over the last dimension of `x` (any leading shape, rows contiguous in the last dimension)."""
    n = x.shape[-1]
    rows = x.reshape(-1, n)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    block = triton.next_power_of_2(n)
    _rms_norm_kernel[(rows.shape[0],)](rows, weight, out, rows.stride(0), out.stride(0), n, eps, OFFSET=offset,
                                       BLOCK=block, num_warps=8 if block >= 4096 else 4)
    return out.view(x.shape)


@triton.jit
def _rotary_kernel(Q, K, C, S, YQ, YK, sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, syq_b, syq_h, syq_s, syk_b, syk_h, syk_s,
                   sc_b, sc_s, HQ, HT, L, HALF: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # one (row, head of q or k, position) per program
    s = pid % L
    hh = (pid // L) % HT
    b = pid // (L * HT)
    if hh < HQ:
        xb = Q + b * sq_b + hh * sq_h + s * sq_s
        yb = YQ + b * syq_b + hh * syq_h + s * syq_s
    else:
        xb = K + b * sk_b + (hh - HQ) * sk_h + s * sk_s
        yb = YK + b * syk_b + (hh - HQ) * syk_h + s * syk_s
    d = tl.arange(0, BLOCK)
    m = d < HALF
    x1 = tl.load(xb + d, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(xb + HALF + d, mask=m, other=0.0).to(tl.float32)
    cb = C + b * sc_b + s * sc_s
    sb = S + b * sc_b + s * sc_s
    c1 = tl.load(cb + d, mask=m, other=0.0).to(tl.float32)
    c2 = tl.load(cb + HALF + d, mask=m, other=0.0).to(tl.float32)
    s1 = tl.load(sb + d, mask=m, other=0.0).to(tl.float32)
    s2 = tl.load(sb + HALF + d, mask=m, other=0.0).to(tl.float32)
    ty = YQ.dtype.element_ty
    # rotate_half(x) = (-x2, x1); every product and the sum round to the dtype, as the unfused ops do
    a1 = (x1 * c1).to(ty).to(tl.float32)
    r1 = (-x2 * s1).to(ty).to(tl.float32)
    a2 = (x2 * c2).to(ty).to(tl.float32)
    r2 = (x1 * s2).to(ty).to(tl.float32)
    tl.store(yb + d, (a1 + r1).to(ty), mask=m)
    tl.store(yb + HALF + d, (a2 + r2).to(ty), mask=m)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' `apply_rotary_pos_emb(q, k, cos, sin)` (unsqueeze_dim=1) in one launch for q and k: q, k
    (B, H, n, d) with unit stride in d, cos/sin (B or 1, n, d) of the same dtype, unit stride in d. Callers check the
    shapes (`rotary_supported`). The outputs keep q's and k's strides (a transposed (B, n, H, d) projection stays one)."""
    b, hq, n, d = q.shape
    hk = k.shape[1]
    out_q, out_k = torch.empty_like(q), torch.empty_like(k)
    cos_b = cos.stride(0) if cos.shape[0] > 1 else 0  # one table for every row
    _rotary_kernel[(b * (hq + hk) * n,)](
        q, k, cos, sin, out_q, out_k, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        out_q.stride(0), out_q.stride(1), out_q.stride(2), out_k.stride(0), out_k.stride(1), out_k.stride(2),
        cos_b, cos.stride(1), hq, hq + hk, n, HALF=d // 2, BLOCK=triton.next_power_of_2(d // 2), num_warps=1)
    return out_q, out_k


def rotary_supported(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    return (q.dim() == 4 and k.dim() == 4 and cos.dim() == 3 and cos.shape == sin.shape
            and cos.stride() == sin.stride() and q.shape[-1] == k.shape[-1] == cos.shape[-1]
            and q.shape[-1] % 2 == 0 and q.shape[0] == k.shape[0] and cos.shape[0] in (1, q.shape[0])
            and q.shape[2] == k.shape[2] == cos.shape[1] and q.dtype == k.dtype == cos.dtype == sin.dtype
            and q.stride(-1) == k.stride(-1) == cos.stride(-1) == 1
            and q.device == k.device == cos.device == sin.device)


@triton.jit
def _silu_mul_kernel(G, U, Y, n, s_g, s_u, s_y, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    g = tl.load(G + row * s_g + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(U + row * s_u + offs, mask=m, other=0.0)
    ty = Y.dtype.element_ty
    act = (g / (1.0 + tl.exp(-g))).to(ty).to(tl.float32)
    tl.store(Y + row * s_y + offs, (act * u.to(tl.float32)).to(ty), mask=m)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, for same-shape tensors; rows may be strided (e.g. the two halves of one gate/up matmul's
    output), the last dimension must have unit stride or is made contiguous."""
    n = gate.shape[-1]
    g, u = gate.reshape(-1, n), up.reshape(-1, n)
    if g.stride(-1) != 1:
        g = g.contiguous()
    if u.stride(-1) != 1:
        u = u.contiguous()
    out = torch.empty(g.shape, dtype=gate.dtype, device=gate.device)
    block = 1024
    _silu_mul_kernel[(g.shape[0], triton.cdiv(n, block))](g, u, out, n, g.stride(0), u.stride(0), out.stride(0),
                                                          BLOCK=block, num_warps=4)
    return out.view(gate.shape)


@triton.jit
def _append_kv_kernel(K, V, KB, VB, SLOT, LENS, DONE, H, n_lens, sk_b, sk_h, sv_b, sv_h, skb_b, skb_h, skb_t,
                      svb_b, svb_h, svb_t, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      BL: tl.constexpr, ADVANCE: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // H).to(tl.int64)
    h = (pid % H).to(tl.int64)
    slot = tl.load(SLOT)
    ck = tl.arange(0, BK)
    tl.store(KB + b * skb_b + h * skb_h + slot * skb_t + ck, tl.load(K + b * sk_b + h * sk_h + ck, mask=ck < DK),
             mask=ck < DK)
    cv = tl.arange(0, BV)
    tl.store(VB + b * svb_b + h * svb_h + slot * svb_t + cv, tl.load(V + b * sv_b + h * sv_h + cv, mask=cv < DV),
             mask=cv < DV)
    if ADVANCE:
        # acq_rel: this program's read of the slot happens before its ticket, so the last ticket sees every read done
        ticket = tl.atomic_add(DONE, 1)
        if ticket == tl.num_programs(0) - 1:
            tl.store(SLOT, slot + 1)
            for start in range(0, n_lens, BL):
                i = start + tl.arange(0, BL)
                m = i < n_lens
                tl.store(LENS + i, tl.load(LENS + i, mask=m, other=0) + 1, mask=m)
            tl.store(DONE, 0)


def append_kv(kbuf: torch.Tensor, vbuf: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot: torch.Tensor,
              lengths: torch.Tensor | None = None, done: torch.Tensor | None = None) -> None:
    """``kbuf[:, :, slot] = k[:, :, 0]``, the same for values, then (given ``lengths`` and ``done``) ``slot += 1``
    and ``lengths += 1``, in one launch. k, v (B, H, 1, d) and the buffers (B, H, C, d) share a dtype and have unit
    stride in d (`append_kv_supported`); slot (1,) int64, lengths (B,) int32, done (1,) int32 scratch holding 0 (the
    kernel leaves it 0). Without them only the two writes run (a store that moves its counters itself)."""
    b, h = k.shape[:2]
    dk, dv = k.shape[-1], v.shape[-1]
    advance = lengths is not None and done is not None
    _append_kv_kernel[(b * h,)](
        k, v, kbuf, vbuf, slot, lengths if advance else slot, done if advance else slot, h,
        lengths.numel() if advance else 0, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kbuf.stride(0), kbuf.stride(1), kbuf.stride(2), vbuf.stride(0), vbuf.stride(1), vbuf.stride(2),
        DK=dk, DV=dv, BK=triton.next_power_of_2(dk), BV=triton.next_power_of_2(dv), BL=128, ADVANCE=advance,
        num_warps=1)


def append_kv_supported(kbuf: torch.Tensor, vbuf: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    return (k.dim() == 4 and k.shape[2] == 1 and v.shape[:3] == k.shape[:3] and kbuf.dtype == k.dtype
            and vbuf.dtype == v.dtype and k.stride(-1) == v.stride(-1) == kbuf.stride(-1) == vbuf.stride(-1) == 1
            and kbuf.shape[:2] == k.shape[:2] and kbuf.shape[-1] == k.shape[-1] and vbuf.shape[-1] == v.shape[-1])
