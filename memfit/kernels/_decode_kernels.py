"""Triton kernels behind `kivi_attention` and `h2o_decode` (this module imports triton: import it lazily).

Split-K decode attention ("flash-decoding"): program (b * Hkv + h, s) handles the g = Hq / Hkv query heads of KV
head h of row b (padded to GP >= 16 rows for tl.dot) over tokens [s * S, (s + 1) * S) of the row's sequence, where
the sequence is n_q packed-quantized tokens followed by n_r full-precision residual tokens. It writes an
unnormalised partial output and its running max / sum (base-2 logits); `_combine_kernel` merges the splits.
Quantized tiles are unpacked and dequantized in registers (code * scale + zero) and never written back.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _split_kernel(
    Q, KC, KS, KZ, VC, VS, VZ, KR, VR, NQ, NR, PO, PML, LG,
    qk_scale, tokens_per_split, num_splits,
    s_qb, s_qh,
    s_kcb, s_kch, s_ksb, s_ksh,
    s_vcb, s_vch, s_vsb, s_vsh,
    s_krb, s_krh, s_krt,
    s_vrb, s_vrh, s_vrt,
    s_lgb, s_lgh,
    HKV: tl.constexpr, GQ: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
    BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_T: tl.constexpr,
    HAS_QUANT: tl.constexpr, STORE_LOGITS: tl.constexpr,
):
    pid = tl.program_id(0)
    sid = tl.program_id(1)
    b = pid // HKV
    h = pid % HKV
    nq = tl.load(NQ + b)
    nr = tl.load(NR + b)
    total = nq + nr
    start = sid * tokens_per_split
    end = tl.minimum(start + tokens_per_split, total)

    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, D)
    gmask = offs_g < GQ
    q = tl.load(Q + b * s_qb + (h * GQ + offs_g)[:, None] * s_qh + offs_d[None, :], mask=gmask[:, None], other=0.0)
    dt = q.dtype
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    lg_base = LG + b * s_lgb + (h * GQ + offs_g)[:, None] * s_lgh

    if HAS_QUANT:
        CPB: tl.constexpr = 8 // BITS
        LMASK: tl.constexpr = (1 << BITS) - 1
        q_end = tl.minimum(end, nq)
        kc_base = KC + b * s_kcb + h * s_kch
        ks_base = KS + b * s_ksb + h * s_ksh
        kz_base = KZ + b * s_ksb + h * s_ksh
        vc_base = VC + b * s_vcb + h * s_vch
        vs_base = VS + b * s_vsb + h * s_vsh
        vz_base = VZ + b * s_vsb + h * s_vsh
        v_shift = ((offs_d % CPB) * BITS)[None, :]
        for t0 in range(start, q_end, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            tmask = offs_t < q_end
            # keys: byte row t // CPB, bits (t % CPB) * BITS; one scale / zero per (t // GROUP, channel)
            kc = tl.load(kc_base + (offs_t // CPB)[:, None] * D + offs_d[None, :], mask=tmask[:, None], other=0)
            kq = (kc.to(tl.int32) >> ((offs_t % CPB) * BITS)[:, None]) & LMASK
            srow = (offs_t // GROUP)[:, None] * D + offs_d[None, :]
            ks = tl.load(ks_base + srow, mask=tmask[:, None], other=0.0).to(tl.float32)
            kz = tl.load(kz_base + srow, mask=tmask[:, None], other=0.0).to(tl.float32)
            k = (kq.to(tl.float32) * ks + kz).to(dt)
            s = tl.dot(q, tl.trans(k)) * qk_scale
            s = tl.where(tmask[None, :], s, float("-inf"))
            if STORE_LOGITS:
                tl.store(lg_base + offs_t[None, :], s, mask=gmask[:, None] & tmask[None, :])
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            # values: per token, byte c // CPB of the token's row, one scale / zero per (token, c // GROUP)
            vc = tl.load(vc_base + offs_t[:, None] * (D // CPB) + (offs_d // CPB)[None, :], mask=tmask[:, None],
                         other=0)
            vq = (vc.to(tl.int32) >> v_shift) & LMASK
            vrow = offs_t[:, None] * (D // GROUP) + (offs_d // GROUP)[None, :]
            vs = tl.load(vs_base + vrow, mask=tmask[:, None], other=0.0).to(tl.float32)
            vz = tl.load(vz_base + vrow, mask=tmask[:, None], other=0.0).to(tl.float32)
            v = (vq.to(tl.float32) * vs + vz).to(dt)
            acc = acc * alpha[:, None] + tl.dot(p.to(dt), v)
            m_i = m_new

    kr_base = KR + b * s_krb + h * s_krh
    vr_base = VR + b * s_vrb + h * s_vrh
    r_start = tl.maximum(start, nq)
    for t0 in range(r_start, end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        tmask = offs_t < end
        ridx = offs_t - nq
        k = tl.load(kr_base + ridx[:, None] * s_krt + offs_d[None, :], mask=tmask[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k.to(dt))) * qk_scale
        s = tl.where(tmask[None, :], s, float("-inf"))
        if STORE_LOGITS:
            tl.store(lg_base + offs_t[None, :], s, mask=gmask[:, None] & tmask[None, :])
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(vr_base + ridx[:, None] * s_vrt + offs_d[None, :], mask=tmask[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(dt), v.to(dt))
        m_i = m_new

    part = pid * num_splits + sid
    tl.store(PO + (part * GP + offs_g)[:, None] * D + offs_d[None, :], acc)
    tl.store(PML + part * 2 * GP + offs_g, m_i)
    tl.store(PML + part * 2 * GP + GP + offs_g, l_i)


@triton.jit
def _combine_kernel(
    PO, PML, OUT, LSE, num_splits, s_ob, s_oh,
    HKV: tl.constexpr, GQ: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, SP: tl.constexpr,
    STORE_LSE: tl.constexpr,
):
    pid = tl.program_id(0)
    g = tl.program_id(1)
    b = pid // HKV
    h = pid % HKV
    offs_s = tl.arange(0, SP)
    offs_d = tl.arange(0, D)
    smask = offs_s < num_splits
    part = pid * num_splits + offs_s
    m = tl.load(PML + part * 2 * GP + g, mask=smask, other=float("-inf"))
    l_ = tl.load(PML + part * 2 * GP + GP + g, mask=smask, other=0.0)
    mx = tl.max(m, 0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.exp2(m - mx)
    total = tl.sum(w * l_, 0)
    o = tl.load(PO + (part * GP + g)[:, None] * D + offs_d[None, :], mask=smask[:, None], other=0.0)
    out = tl.sum(o * w[:, None], 0) / total
    tl.store(OUT + b * s_ob + (h * GQ + g) * s_oh + offs_d, out.to(OUT.dtype.element_ty))
    if STORE_LSE:
        row = (pid * GQ + g) * 2
        tl.store(LSE + row, mx)
        tl.store(LSE + row + 1, total)


@triton.jit
def _h2o_score_kernel(
    LG, LSE, ACC, POS, NTOK, CUR, VICTIM, recent, cap,
    s_lgb, s_lgh, s_ab, s_ah, s_pb, s_ph,
    HKV: tl.constexpr, GQ: tl.constexpr, GP: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Per (row, KV head): acc += softmax row summed over the query group (from the stored base-2 logits and the
    combined max / sum), then victim = first empty slot, else argmin of acc over unprotected slots."""
    pid = tl.program_id(0)
    b = pid // HKV
    h = pid % HKV
    n = tl.load(NTOK + b)
    cur = tl.load(CUR + b)
    offs_g = tl.arange(0, GP)
    gmask = offs_g < GQ
    row = (pid * GQ + offs_g) * 2
    mx = tl.load(LSE + row, mask=gmask, other=0.0)
    total = tl.load(LSE + row + 1, mask=gmask, other=1.0)
    inv = 1.0 / total
    lg_base = LG + b * s_lgb + (h * GQ + offs_g)[:, None] * s_lgh
    a_base = ACC + b * s_ab + h * s_ah
    p_base = POS + b * s_pb + h * s_ph
    best_val = tl.full([], float("inf"), tl.float32)
    best_idx = tl.full([], 0, tl.int32)
    for t0 in range(0, cap, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        in_cap = offs_t < cap
        valid = offs_t < n
        s = tl.load(lg_base + offs_t[None, :], mask=gmask[:, None] & valid[None, :], other=float("-inf"))
        p = tl.exp2(s - mx[:, None]) * inv[:, None]
        a = tl.load(a_base + offs_t, mask=valid, other=0.0) + tl.sum(p, 0)
        tl.store(a_base + offs_t, a, mask=valid)
        pos = tl.load(p_base + offs_t, mask=valid, other=0)
        cand = tl.where(pos > cur - recent, float("inf"), a)
        cand = tl.where(valid, cand, float("-inf"))
        cand = tl.where(in_cap, cand, float("inf"))
        tmin = tl.min(cand, 0)
        targ = tl.argmin(cand, 0).to(tl.int32)
        better = tmin < best_val
        best_idx = tl.where(better, t0 + targ, best_idx)
        best_val = tl.where(better, tmin, best_val)
    tl.store(VICTIM + pid, best_idx)
