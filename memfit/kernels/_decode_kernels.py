"""Triton kernels behind `kivi_attention` and `h2o_decode` (this module imports triton: import it lazily).

Split-K decode attention ("flash-decoding"): program (b * Hkv + h, s) handles the g = Hq / Hkv query heads of KV
head h of row b (padded to GP >= 16 rows for tl.dot) over tokens [s * S, (s + 1) * S) of the row's sequence, where
the sequence is n_q packed-quantized tokens followed by n_r full-precision residual tokens. It writes an
unnormalised partial output and its running max / sum (base-2 logits); `_combine_kernel` merges the splits.
Quantized tiles are unpacked and dequantized in registers (code * scale + zero) and never written back.

PACKED=1 ("packed", the default) loads each tile's packed bytes and group scales once (16-byte vector loads), expands
them in registers (shift / mask / reshape, broadcast of the per-group scales) and prefetches the next tile while the
current one is computed; PACKED=0 ("gather") loads every element's byte and scale directly (simplest, 2x slower).
PACKED=3 ("packed32") is the same with one scale group per tile (key scales become a plain row broadcast);
PACKED=2 ("fold") folds the key scales into q and dequantizes values in fp16 (kept for comparison: slower here).
APPEND=True also writes the new token (k_new, v_new) into residual slot `app` (split 0 does the store): that slot's
old contents are masked out of the tiles and the program whose range holds it adds the new token to its online
softmax from registers, so the cache append costs no separate launch (and no tile rewrite, which cost registers).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _softmax_step(s, offs_t, tmask, m_i, l_i, lg_base, gmask, STORE_LOGITS: tl.constexpr):
    """One tile's logits s (GP, T) into the online softmax: masked past the tile's valid tokens, optionally stored
    (H2O's scores); returns the new running max, the old accumulator's rescale factor, the tile's probabilities and
    the new running sum."""
    s = tl.where(tmask[None, :], s, float("-inf"))
    if STORE_LOGITS:
        tl.store(lg_base + offs_t[None, :], s, mask=gmask[:, None] & tmask[None, :])
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    return m_new, alpha, p, l_i


@triton.jit
def _packed_tile(
    q, kc, ks, kz, vc, vs, vz, t0, q_end, m_i, l_i, acc, qk_scale, lg_base, gmask,
    BITS: tl.constexpr, GROUP: tl.constexpr, QBLOCK: tl.constexpr, D: tl.constexpr, STORE_LOGITS: tl.constexpr,
):
    """One tile of QBLOCK packed tokens (whole scale groups) folded into the online softmax (m_i, l_i, acc).

    kc (QBLOCK / CPB, D) key code bytes, ks / kz (QBLOCK / GROUP, D) key scales / zeros, vc (QBLOCK, D / CPB) value
    code bytes, vs / vz (QBLOCK, D / GROUP) value scales / zeros, as loaded (masked past q_end). Codes are expanded
    in registers (shift / mask / reshape), dequantized in fp32 and fed to the dots in q's dtype."""
    CPB: tl.constexpr = 8 // BITS
    LMASK: tl.constexpr = (1 << BITS) - 1
    NGT: tl.constexpr = QBLOCK // GROUP
    NGD: tl.constexpr = D // GROUP
    dt = q.dtype
    shifts = tl.arange(0, CPB) * BITS
    offs_t = t0 + tl.arange(0, QBLOCK)
    tmask = offs_t < q_end
    # keys: byte row r holds tokens r*CPB .. r*CPB+CPB-1 of each channel
    kq = tl.reshape((kc.to(tl.int32)[:, None, :] >> shifts[None, :, None]) & LMASK, (QBLOCK, D))
    ksb = tl.reshape(tl.broadcast_to(ks.to(tl.float32)[:, None, :], (NGT, GROUP, D)), (QBLOCK, D))
    kzb = tl.reshape(tl.broadcast_to(kz.to(tl.float32)[:, None, :], (NGT, GROUP, D)), (QBLOCK, D))
    k = (kq.to(tl.float32) * ksb + kzb).to(dt)
    s = tl.dot(q, tl.trans(k)) * qk_scale
    m_new, alpha, p, l_i = _softmax_step(s, offs_t, tmask, m_i, l_i, lg_base, gmask, STORE_LOGITS)
    # values: byte j of a token holds channels j*CPB .. j*CPB+CPB-1; one scale per GROUP channels
    vq = tl.reshape((vc.to(tl.int32)[:, :, None] >> shifts[None, None, :]) & LMASK, (QBLOCK, D))
    vsb = tl.reshape(tl.broadcast_to(vs.to(tl.float32)[:, :, None], (QBLOCK, NGD, GROUP)), (QBLOCK, D))
    vzb = tl.reshape(tl.broadcast_to(vz.to(tl.float32)[:, :, None], (QBLOCK, NGD, GROUP)), (QBLOCK, D))
    v = (vq.to(tl.float32) * vsb + vzb).to(dt)
    acc = acc * alpha[:, None] + tl.dot(p.to(dt), v)
    return m_new, l_i, acc


@triton.jit
def _half_tile(
    q16, kc, ks, kz, vc, vs, vz, t0, q_end, m_i, l_i, acc, qk_scale, lg_base, gmask,
    BITS: tl.constexpr, GROUP: tl.constexpr, QBLOCK: tl.constexpr, D: tl.constexpr, STORE_LOGITS: tl.constexpr,
):
    """`_packed_tile` computed in fp16 with no conversion unit ("half"): a code c becomes the fp16 1024 + c by OR-ing
    it into the mantissa of 0x6400 (exact), 1024 is subtracted (exact), and the scale and zero are applied in fp16;
    q16 is q in fp16 and the probabilities enter the value dot in fp16 (fp16 keeps 3 more mantissa bits than bf16;
    its range, 65504, bounds the keys, values and queries this path can take)."""
    CPB: tl.constexpr = 8 // BITS
    LMASK: tl.constexpr = (1 << BITS) - 1
    NGT: tl.constexpr = QBLOCK // GROUP
    NGD: tl.constexpr = D // GROUP
    shifts = (tl.arange(0, CPB) * BITS).to(tl.int16)
    offs_t = t0 + tl.arange(0, QBLOCK)
    tmask = offs_t < q_end
    kq = ((kc.to(tl.int16)[:, None, :] >> shifts[None, :, None]) & LMASK) | 0x6400
    kq = tl.reshape(kq, (QBLOCK, D)).to(tl.float16, bitcast=True) - 1024.0
    ksb = tl.reshape(tl.broadcast_to(ks.to(tl.float16)[:, None, :], (NGT, GROUP, D)), (QBLOCK, D))
    kzb = tl.reshape(tl.broadcast_to(kz.to(tl.float16)[:, None, :], (NGT, GROUP, D)), (QBLOCK, D))
    k = kq * ksb + kzb
    s = tl.dot(q16, tl.trans(k)) * qk_scale
    m_new, alpha, p, l_i = _softmax_step(s, offs_t, tmask, m_i, l_i, lg_base, gmask, STORE_LOGITS)
    vq = ((vc.to(tl.int16)[:, :, None] >> shifts[None, None, :]) & LMASK) | 0x6400
    vq = tl.reshape(vq, (QBLOCK, D)).to(tl.float16, bitcast=True) - 1024.0
    vsb = tl.reshape(tl.broadcast_to(vs.to(tl.float16)[:, :, None], (QBLOCK, NGD, GROUP)), (QBLOCK, D))
    vzb = tl.reshape(tl.broadcast_to(vz.to(tl.float16)[:, :, None], (QBLOCK, NGD, GROUP)), (QBLOCK, D))
    v = vq * vsb + vzb
    acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), v)
    return m_new, l_i, acc


@triton.jit
def _quant_tile(
    q, q16, kc, ks, kz, vc, vs, vz, t0, q_end, m_i, l_i, acc, qk_scale, lg_base, gmask,
    BITS: tl.constexpr, GROUP: tl.constexpr, QBLOCK: tl.constexpr, D: tl.constexpr, STORE_LOGITS: tl.constexpr,
    HALF: tl.constexpr,
):
    """The "packed" / "pipe" paths' tile: fp32 dequantization (`_packed_tile`) or the fp16 tile (`_half_tile`)."""
    if HALF:
        return _half_tile(q16, kc, ks, kz, vc, vs, vz, t0, q_end, m_i, l_i, acc, qk_scale, lg_base, gmask,
                          BITS, GROUP, QBLOCK, D, STORE_LOGITS)
    return _packed_tile(q, kc, ks, kz, vc, vs, vz, t0, q_end, m_i, l_i, acc, qk_scale, lg_base, gmask,
                        BITS, GROUP, QBLOCK, D, STORE_LOGITS)


@triton.jit
def _load_tile(kc_base, ks_base, kz_base, vc_base, vs_base, vz_base, t0, q_end, offs_d,
               BITS: tl.constexpr, GROUP: tl.constexpr, QBLOCK: tl.constexpr, D: tl.constexpr):
    """The packed bytes and scales of the QBLOCK tokens from t0 (whole scale groups) as `_packed_tile` takes them:
    key bytes (QBLOCK / CPB, D), key scales / zeros (QBLOCK / GROUP, D), value bytes (QBLOCK, D / CPB), value scales /
    zeros (QBLOCK, D / GROUP); rows past q_end masked (a tile may straddle it)."""
    CPB: tl.constexpr = 8 // BITS
    VB: tl.constexpr = D // CPB
    NGD: tl.constexpr = D // GROUP
    rows = tl.arange(0, QBLOCK // CPB)
    srows = tl.arange(0, QBLOCK // GROUP)
    tq = tl.arange(0, QBLOCK)
    km = ((t0 // CPB + rows) * CPB < q_end)[:, None]
    kc = tl.load(kc_base + (t0 // CPB + rows)[:, None] * D + offs_d[None, :], mask=km, other=0)
    sm = ((t0 // GROUP + srows) * GROUP < q_end)[:, None]
    srow = (t0 // GROUP + srows)[:, None] * D + offs_d[None, :]
    ks = tl.load(ks_base + srow, mask=sm, other=0.0)
    kz = tl.load(kz_base + srow, mask=sm, other=0.0)
    vm = (t0 + tq < q_end)[:, None]
    vc = tl.load(vc_base + (t0 + tq)[:, None] * VB + tl.arange(0, VB)[None, :], mask=vm, other=0)
    vrow = (t0 + tq)[:, None] * NGD + tl.arange(0, NGD)[None, :]
    vs = tl.load(vs_base + vrow, mask=vm, other=0.0)
    vz = tl.load(vz_base + vrow, mask=vm, other=0.0)
    return kc, ks, kz, vc, vs, vz


@triton.jit
def _split_range(NQ, NR, tokens_per_split, HKV: tl.constexpr):
    """Program (row * Hkv + head, split)'s row, KV head, quantized / residual lengths and token range."""
    pid = tl.program_id(0)
    sid = tl.program_id(1)
    b = (pid // HKV).to(tl.int64)  # int64: a large batch's buffers pass 2^31 elements
    h = pid % HKV
    nq = tl.load(NQ + b)
    nr = tl.load(NR + b)
    start = sid * tokens_per_split
    end = tl.minimum(start + tokens_per_split, nq + nr)
    return pid, sid, b, h, nq, nr, start, end


@triton.jit
def _append_new(APP, KN, VN, kr_base, vr_base, b, h, sid, offs_d, s_apb, s_aph, s_knb, s_knh, s_vnb, s_vnh, s_krt,
                s_vrt, KR_T, VR_T):
    """The appended token's residual slot, key and value; split 0 writes them into that slot."""
    app = tl.load(APP + b * s_apb + h * s_aph)
    kn = tl.load(KN + b * s_knb + h * s_knh + offs_d)
    vn = tl.load(VN + b * s_vnb + h * s_vnh + offs_d)
    if sid == 0:
        tl.store(kr_base + app * s_krt + offs_d, kn.to(KR_T))
        tl.store(vr_base + app * s_vrt + offs_d, vn.to(VR_T))
    return app, kn, vn


@triton.jit
def _new_token_softmax(s_new, vn, m_i, l_i, acc, dt):
    """The appended token (logits s_new per query row, value vn) into the online softmax."""
    m_new = tl.maximum(m_i, s_new)
    alpha = tl.exp2(m_i - m_new)
    p_new = tl.exp2(s_new - m_new)
    l_i = l_i * alpha + p_new
    acc = acc * alpha[:, None] + p_new[:, None] * vn.to(dt).to(tl.float32)[None, :]
    return m_new, l_i, acc


@triton.jit
def _split_kernel(
    Q, KC, KS, KZ, VC, VS, VZ, KR, VR, NQ, NR, PO, PML, LG, KN, VN, APP,
    qk_scale, tokens_per_split, num_splits,
    s_qb, s_qh,
    s_kcb, s_kch, s_ksb, s_ksh,
    s_vcb, s_vch, s_vsb, s_vsh,
    s_krb, s_krh, s_krt,
    s_vrb, s_vrh, s_vrt,
    s_lgb, s_lgh,
    s_knb, s_knh, s_vnb, s_vnh, s_apb, s_aph,
    HKV: tl.constexpr, GQ: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
    BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_T: tl.constexpr, QBLOCK: tl.constexpr,
    HAS_QUANT: tl.constexpr, STORE_LOGITS: tl.constexpr, APPEND: tl.constexpr, PACKED: tl.constexpr,
    NSTAGES: tl.constexpr = 1,
):
    pid, sid, b, h, nq, nr, start, end = _split_range(NQ, NR, tokens_per_split, HKV)

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
        q16 = q.to(tl.float16)
        CPB: tl.constexpr = 8 // BITS
        LMASK: tl.constexpr = (1 << BITS) - 1
        q_end = tl.minimum(end, nq)
        kc_base = KC + b * s_kcb + h * s_kch
        ks_base = KS + b * s_ksb + h * s_ksh
        kz_base = KZ + b * s_ksb + h * s_ksh
        vc_base = VC + b * s_vcb + h * s_vch
        vs_base = VS + b * s_vsb + h * s_vsh
        vz_base = VZ + b * s_vsb + h * s_vsh
        if PACKED == 2:
            # one scale group per tile; key scales folded into q: s = (q * ks) . codes + q . kz;
            # values dequantized in fp16 (codes, scales and zeros are exact / stored in fp16)
            KR2: tl.constexpr = GROUP // CPB
            VB2: tl.constexpr = D // CPB
            NGD2: tl.constexpr = D // GROUP
            rows2 = tl.arange(0, KR2)
            tq2 = tl.arange(0, GROUP)
            vbytes2 = tl.arange(0, VB2)
            vgrp2 = tl.arange(0, NGD2)
            shifts2 = tl.arange(0, CPB) * BITS
            qf = q.to(tl.float32)
            tn = start
            pm = (offs_d * 0 + tn) < q_end
            km = ((tn // CPB + rows2) * CPB < q_end)[:, None]
            kc_n = tl.load(kc_base + (tn // CPB + rows2)[:, None] * D + offs_d[None, :], mask=km, other=0)
            ks_n = tl.load(ks_base + (tn // GROUP) * D + offs_d, mask=pm, other=0.0)
            kz_n = tl.load(kz_base + (tn // GROUP) * D + offs_d, mask=pm, other=0.0)
            vm = (tn + tq2 < q_end)[:, None]
            vc_n = tl.load(vc_base + (tn + tq2)[:, None] * VB2 + vbytes2[None, :], mask=vm, other=0)
            vrow_n = (tn + tq2)[:, None] * NGD2 + vgrp2[None, :]
            vs_n = tl.load(vs_base + vrow_n, mask=vm, other=0.0)
            vz_n = tl.load(vz_base + vrow_n, mask=vm, other=0.0)
            for t0 in range(start, q_end, GROUP):
                kc_c, ks_c, kz_c, vc_c, vs_c, vz_c = kc_n, ks_n, kz_n, vc_n, vs_n, vz_n
                tn = t0 + GROUP
                pm = (offs_d * 0 + tn) < q_end
                km = ((tn // CPB + rows2) * CPB < q_end)[:, None]
                kc_n = tl.load(kc_base + (tn // CPB + rows2)[:, None] * D + offs_d[None, :], mask=km, other=0)
                ks_n = tl.load(ks_base + (tn // GROUP) * D + offs_d, mask=pm, other=0.0)
                kz_n = tl.load(kz_base + (tn // GROUP) * D + offs_d, mask=pm, other=0.0)
                vm = (tn + tq2 < q_end)[:, None]
                vc_n = tl.load(vc_base + (tn + tq2)[:, None] * VB2 + vbytes2[None, :], mask=vm, other=0)
                vrow_n = (tn + tq2)[:, None] * NGD2 + vgrp2[None, :]
                vs_n = tl.load(vs_base + vrow_n, mask=vm, other=0.0)
                vz_n = tl.load(vz_base + vrow_n, mask=vm, other=0.0)
                kq = (kc_c.to(tl.int32)[:, None, :] >> shifts2[None, :, None]) & LMASK
                kq = tl.reshape(kq, (GROUP, D)).to(dt)
                qs = (qf * ks_c.to(tl.float32)[None, :]).to(dt)
                bias = tl.sum(qf * kz_c.to(tl.float32)[None, :], 1)
                s = (tl.dot(qs, tl.trans(kq)) + bias[:, None]) * qk_scale
                offs_t = t0 + tq2
                tmask = offs_t < q_end
                m_new, alpha, p, l_i = _softmax_step(s, offs_t, tmask, m_i, l_i, lg_base, gmask, STORE_LOGITS)
                vq = (vc_c.to(tl.int32)[:, :, None] >> shifts2[None, None, :]) & LMASK
                vq = tl.reshape(vq, (GROUP, D)).to(tl.float16)
                vsb = tl.reshape(tl.broadcast_to(vs_c[:, :, None], (GROUP, NGD2, GROUP)), (GROUP, D))
                vzb = tl.reshape(tl.broadcast_to(vz_c[:, :, None], (GROUP, NGD2, GROUP)), (GROUP, D))
                v = vq * vsb.to(tl.float16) + vzb.to(tl.float16)
                acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), v)
                m_i = m_new
        elif PACKED == 3:
            # "packed32": one scale group per tile, so key scales / zeros are one row broadcast over the tile
            KR3: tl.constexpr = GROUP // CPB
            VB3: tl.constexpr = D // CPB
            NGD3: tl.constexpr = D // GROUP
            rows3 = tl.arange(0, KR3)
            tq3 = tl.arange(0, GROUP)
            vbytes3 = tl.arange(0, VB3)
            vgrp3 = tl.arange(0, NGD3)
            shifts3 = tl.arange(0, CPB) * BITS
            tn = start
            pm = (offs_d * 0 + tn) < q_end
            km = ((tn // CPB + rows3) * CPB < q_end)[:, None]
            kc_n = tl.load(kc_base + (tn // CPB + rows3)[:, None] * D + offs_d[None, :], mask=km, other=0)
            ks_n = tl.load(ks_base + (tn // GROUP) * D + offs_d, mask=pm, other=0.0)
            kz_n = tl.load(kz_base + (tn // GROUP) * D + offs_d, mask=pm, other=0.0)
            vm = (tn + tq3 < q_end)[:, None]
            vc_n = tl.load(vc_base + (tn + tq3)[:, None] * VB3 + vbytes3[None, :], mask=vm, other=0)
            vrow_n = (tn + tq3)[:, None] * NGD3 + vgrp3[None, :]
            vs_n = tl.load(vs_base + vrow_n, mask=vm, other=0.0)
            vz_n = tl.load(vz_base + vrow_n, mask=vm, other=0.0)
            for t0 in range(start, q_end, GROUP):
                kc_c, ks_c, kz_c, vc_c, vs_c, vz_c = kc_n, ks_n, kz_n, vc_n, vs_n, vz_n
                tn = t0 + GROUP
                pm = (offs_d * 0 + tn) < q_end
                km = ((tn // CPB + rows3) * CPB < q_end)[:, None]
                kc_n = tl.load(kc_base + (tn // CPB + rows3)[:, None] * D + offs_d[None, :], mask=km, other=0)
                ks_n = tl.load(ks_base + (tn // GROUP) * D + offs_d, mask=pm, other=0.0)
                kz_n = tl.load(kz_base + (tn // GROUP) * D + offs_d, mask=pm, other=0.0)
                vm = (tn + tq3 < q_end)[:, None]
                vc_n = tl.load(vc_base + (tn + tq3)[:, None] * VB3 + vbytes3[None, :], mask=vm, other=0)
                vrow_n = (tn + tq3)[:, None] * NGD3 + vgrp3[None, :]
                vs_n = tl.load(vs_base + vrow_n, mask=vm, other=0.0)
                vz_n = tl.load(vz_base + vrow_n, mask=vm, other=0.0)
                kq = (kc_c.to(tl.int32)[:, None, :] >> shifts3[None, :, None]) & LMASK
                kq = tl.reshape(kq, (GROUP, D))
                k = (kq.to(tl.float32) * ks_c.to(tl.float32)[None, :] + kz_c.to(tl.float32)[None, :]).to(dt)
                s = tl.dot(q, tl.trans(k)) * qk_scale
                offs_t = t0 + tq3
                tmask = offs_t < q_end
                m_new, alpha, p, l_i = _softmax_step(s, offs_t, tmask, m_i, l_i, lg_base, gmask, STORE_LOGITS)
                vq = (vc_c.to(tl.int32)[:, :, None] >> shifts3[None, None, :]) & LMASK
                vq = tl.reshape(vq, (GROUP, D))
                vsb = tl.reshape(tl.broadcast_to(vs_c.to(tl.float32)[:, :, None], (GROUP, NGD3, GROUP)), (GROUP, D))
                vzb = tl.reshape(tl.broadcast_to(vz_c.to(tl.float32)[:, :, None], (GROUP, NGD3, GROUP)), (GROUP, D))
                v = (vq.to(tl.float32) * vsb + vzb).to(dt)
                acc = acc * alpha[:, None] + tl.dot(p.to(dt), v)
                m_i = m_new
        elif PACKED == 1 or PACKED == 7:
            # one tile prefetched in registers while the current one is computed (rows past q_end masked: tiles may
            # straddle it)
            kc_n, ks_n, kz_n, vc_n, vs_n, vz_n = _load_tile(kc_base, ks_base, kz_base, vc_base, vs_base, vz_base,
                                                            start, q_end, offs_d, BITS, GROUP, QBLOCK, D)
            for t0 in range(start, q_end, QBLOCK):
                kc_c, ks_c, kz_c, vc_c, vs_c, vz_c = kc_n, ks_n, kz_n, vc_n, vs_n, vz_n
                kc_n, ks_n, kz_n, vc_n, vs_n, vz_n = _load_tile(kc_base, ks_base, kz_base, vc_base, vs_base, vz_base,
                                                                t0 + QBLOCK, q_end, offs_d, BITS, GROUP, QBLOCK, D)
                m_i, l_i, acc = _quant_tile(q, q16, kc_c, ks_c, kz_c, vc_c, vs_c, vz_c, t0, q_end, m_i, l_i, acc,
                                            qk_scale, lg_base, gmask, BITS, GROUP, QBLOCK, D, STORE_LOGITS,
                                            PACKED == 7)
        elif PACKED == 4 or PACKED == 8:
            # "pipe": the "packed" tile math without the hand-written one-tile prefetch; Triton's software pipeliner
            # keeps NSTAGES tiles in flight through shared memory
            for t0 in tl.range(start, q_end, QBLOCK, num_stages=NSTAGES):
                kc_c, ks_c, kz_c, vc_c, vs_c, vz_c = _load_tile(kc_base, ks_base, kz_base, vc_base, vs_base, vz_base,
                                                                t0, q_end, offs_d, BITS, GROUP, QBLOCK, D)
                m_i, l_i, acc = _quant_tile(q, q16, kc_c, ks_c, kz_c, vc_c, vs_c, vz_c, t0, q_end, m_i, l_i, acc,
                                            qk_scale, lg_base, gmask, BITS, GROUP, QBLOCK, D, STORE_LOGITS,
                                            PACKED == 8)
        else:
            v_shift = ((offs_d % CPB) * BITS)[None, :]
            for t0 in range(start, q_end, BLOCK_T):
                offs_t = t0 + tl.arange(0, BLOCK_T)
                tmask = offs_t < q_end
                kc = tl.load(kc_base + (offs_t // CPB)[:, None] * D + offs_d[None, :], mask=tmask[:, None], other=0)
                kq = (kc.to(tl.int32) >> ((offs_t % CPB) * BITS)[:, None]) & LMASK
                srow = (offs_t // GROUP)[:, None] * D + offs_d[None, :]
                ks = tl.load(ks_base + srow, mask=tmask[:, None], other=0.0).to(tl.float32)
                kz = tl.load(kz_base + srow, mask=tmask[:, None], other=0.0).to(tl.float32)
                k = (kq.to(tl.float32) * ks + kz).to(dt)
                s = tl.dot(q, tl.trans(k)) * qk_scale
                m_new, alpha, p, l_i = _softmax_step(s, offs_t, tmask, m_i, l_i, lg_base, gmask, STORE_LOGITS)
                vc = tl.load(
                    vc_base + offs_t[:, None] * (D // CPB) + (offs_d // CPB)[None, :], mask=tmask[:, None], other=0
                )
                vq = (vc.to(tl.int32) >> v_shift) & LMASK
                vrow = offs_t[:, None] * (D // GROUP) + (offs_d // GROUP)[None, :]
                vs = tl.load(vs_base + vrow, mask=tmask[:, None], other=0.0).to(tl.float32)
                vz = tl.load(vz_base + vrow, mask=tmask[:, None], other=0.0).to(tl.float32)
                v = (vq.to(tl.float32) * vs + vz).to(dt)
                acc = acc * alpha[:, None] + tl.dot(p.to(dt), v)
                m_i = m_new

    kr_base = KR + b * s_krb + h * s_krh
    vr_base = VR + b * s_vrb + h * s_vrh
    if APPEND:
        app, kn, vn = _append_new(APP, KN, VN, kr_base, vr_base, b, h, sid, offs_d, s_apb, s_aph, s_knb, s_knh, s_vnb,
                                  s_vnh, s_krt, s_vrt, KR.dtype.element_ty, VR.dtype.element_ty)
    r_start = tl.maximum(start, nq)
    for t0 in range(r_start, end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        ridx = offs_t - nq
        tmask = offs_t < end
        if APPEND:  # the new token's old slot contents are not used: it enters below, from kn / vn
            smask = tmask & (ridx != app)
        else:
            smask = tmask
        k = tl.load(kr_base + ridx[:, None] * s_krt + offs_d[None, :], mask=smask[:, None], other=0.0).to(dt)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        s = tl.where(smask[None, :], s, float("-inf"))
        if STORE_LOGITS:
            tl.store(lg_base + offs_t[None, :], s, mask=gmask[:, None] & smask[None, :])
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a tile holding only the new token: all -inf
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(vr_base + ridx[:, None] * s_vrt + offs_d[None, :], mask=smask[:, None], other=0.0).to(dt)
        acc = acc * alpha[:, None] + tl.dot(p.to(dt), v)
        m_i = m_new
    if APPEND:
        own = (nq + app >= start) & (nq + app < end)
        if own:  # the program whose range holds the new token adds it to its online softmax
            s_new = tl.sum(q.to(tl.float32) * kn.to(dt).to(tl.float32)[None, :], 1) * qk_scale
            if STORE_LOGITS:
                tl.store(lg_base + (nq + app) + 0 * offs_g[:, None], s_new[:, None], mask=gmask[:, None])
            m_i, l_i, acc = _new_token_softmax(s_new, vn, m_i, l_i, acc, dt)

    part = pid * num_splits + sid
    tl.store(PO + (part * GP + offs_g)[:, None] * D + offs_d[None, :], acc)
    tl.store(PML + part * 2 * GP + offs_g, m_i)
    tl.store(PML + part * 2 * GP + GP + offs_g, l_i)


@triton.jit
def _combine_kernel(
    PO, PML, OUT, num_splits, s_ob, s_oh,
    HKV: tl.constexpr, GQ: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, SP: tl.constexpr,
):
    pid = tl.program_id(0)
    g = tl.program_id(1)
    b = (pid // HKV).to(tl.int64)  # int64: a large batch's buffers pass 2^31 elements
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


@triton.jit
def _h2o_score_kernel(
    LG, PML, ACC, POS, NTOK, CUR, SLOT, PVAL, PIDX, recent, cap, num_splits, chunk,
    s_lgb, s_lgh, s_ab, s_ah, s_pb, s_ph, s_sb, s_sh,
    HKV: tl.constexpr, GQ: tl.constexpr, GP: tl.constexpr, BLOCK_T: tl.constexpr, SP: tl.constexpr,
    APPEND: tl.constexpr,
):
    """Program (row * Hkv + head, chunk): acc += this step's softmax row summed over the query group, for the slots
    of one chunk (max / sum of each head's row recomputed from the split partials); then the chunk's candidate
    victim: first empty slot, else the smallest acc among unprotected slots. `_victim_kernel` reduces the chunks."""
    pid = tl.program_id(0)
    cid = tl.program_id(1)
    nch = tl.num_programs(1)
    b = (pid // HKV).to(tl.int64)  # int64: a large batch's buffers pass 2^31 elements
    h = pid % HKV
    n = tl.load(NTOK + b)
    cur = tl.load(CUR + b)
    offs_g = tl.arange(0, GP)
    gmask = offs_g < GQ
    offs_s = tl.arange(0, SP)
    smask = offs_s < num_splits
    part = pid * num_splits + offs_s
    m = tl.load(PML + (part * 2 * GP)[:, None] + offs_g[None, :], mask=smask[:, None], other=float("-inf"))
    l_ = tl.load(PML + (part * 2 * GP + GP)[:, None] + offs_g[None, :], mask=smask[:, None], other=0.0)
    mx = tl.max(m, 0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    total = tl.sum(tl.exp2(m - mx[None, :]) * l_, 0)
    inv = tl.where(gmask & (total > 0), 1.0 / total, 0.0)
    lg_base = LG + b * s_lgb + (h * GQ + offs_g)[:, None] * s_lgh
    a_base = ACC + b * s_ab + h * s_ah
    p_base = POS + b * s_pb + h * s_ph
    if APPEND:
        slot = tl.load(SLOT + b * s_sb + h * s_sh)
    best_val = tl.full([], float("inf"), tl.float32)
    best_idx = tl.full([], 0, tl.int32)
    c0 = cid * chunk
    c1 = tl.minimum(c0 + chunk, cap)
    for t0 in range(c0, c1, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        in_cap = offs_t < c1
        # a tile may run past its chunk (chunk not a multiple of BLOCK_T): those slots belong to the next chunk's
        # program, so they are neither updated nor candidates here (else they would be counted twice)
        valid = in_cap & (offs_t < n)
        s = tl.load(lg_base + offs_t[None, :], mask=gmask[:, None] & valid[None, :], other=float("-inf"))
        p = tl.exp2(s - mx[:, None]) * inv[:, None]
        a = tl.load(a_base + offs_t, mask=valid, other=0.0)
        pos = tl.load(p_base + offs_t, mask=valid, other=0)
        if APPEND:
            is_new = offs_t == slot
            a = tl.where(is_new, 0.0, a)
            pos = tl.where(is_new, cur, pos)
            tl.store(p_base + offs_t, pos, mask=valid & is_new)
        a = a + tl.sum(p, 0)
        tl.store(a_base + offs_t, a, mask=valid)
        cand = tl.where(pos > cur - recent, float("inf"), a)
        cand = tl.where(valid, cand, float("-inf"))
        cand = tl.where(in_cap, cand, float("inf"))
        tmin = tl.min(cand, 0)
        targ = tl.argmin(cand, 0).to(tl.int32)
        better = tmin < best_val
        best_idx = tl.where(better, t0 + targ, best_idx)
        best_val = tl.where(better, tmin, best_val)
    tl.store(PVAL + pid * nch + cid, best_val)
    tl.store(PIDX + pid * nch + cid, best_idx)


@triton.jit
def _victim_kernel(PVAL, PIDX, VICTIM, nch, s_vb, s_vh, HKV: tl.constexpr, NCP: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // HKV).to(tl.int64)  # int64: a large batch's buffers pass 2^31 elements
    h = pid % HKV
    offs = tl.arange(0, NCP)
    msk = offs < nch
    val = tl.load(PVAL + pid * nch + offs, mask=msk, other=float("inf"))
    idx = tl.load(PIDX + pid * nch + offs, mask=msk, other=0)
    best = tl.argmin(val, 0)
    win = tl.sum(tl.where(offs == best, idx, 0), 0)
    tl.store(VICTIM + b * s_vb + h * s_vh, win)
