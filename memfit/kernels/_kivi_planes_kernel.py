"""KIVI decode attention over plane-order codes with fp16 tensor-core dots on the codes themselves:
`kivi_decode_attention(..., layout="planes")`, what the fast backend's KIVI store runs from PLANES_MIN_ROWS rows
(`memfit.core.static_quant_store`). This module imports triton: import it lazily.

Why: the canonical tiles (`_decode_kernels`) spend ~89 warp instructions per cached token at large batch, most of
them dequantizing each code alone and moving it into the tensor cores' layout. Here no code is dequantized:

- keys: a token's score is sum_d q[d] * (ks[d] * c[d] + kz[d]) = sum_d (q[d] * ks[d]) * c[d] + sum_d q[d] * kz[d].
  Per scale group q' = (q / max|q|) * ks is rounded to fp16 (in range: key scales are fp16); rows (head, scale
  group, copy) fill the MMA's 16 rows, one dot scores every row against every token of a plane and each token keeps
  its own group's first copy (the other products are discarded: tensor-core work is cheap here, unpacking is not).
- values: out[d] = sum_t p[t] * (vs[t, g(d)] * c[t, d] + vz[t, g(d)]): rows (head, channel group) take p * vs in
  fp16, one dot per plane gives every row's sums over every channel and each channel keeps its own group's row at
  the end; the zero points come from one more small dot of p with vz.
- codes enter the dots as fp16 1024 + code: one PRMT per two codes puts a code byte under the exponent byte 0x64
  (exact), after one shift and one mask per four codes take a field out of plane-order bytes (inline PTX on CUDA,
  plain Triton in the interpreter); the 1024s come back out through the biases, computed from the same rounded
  operands the dots see.
In plane order (`memfit.core.planes`) one field of 16 byte rows is 16 consecutive tokens, so a plane is a
ready dot operand. The residual tokens and the appended one go through bf16 dots with each query row copied to 16
rows. An earlier form of this kernel used int8 dots with q' and p * vs split into two int8 passes (one alone was
too coarse for the tests' bound) and was slower than the canonical tiles (benchmarks/README.md).
"""

from __future__ import annotations

import triton
import triton.language as tl

from memfit.kernels._decode_kernels import _append_new, _new_token_softmax, _split_range


@triton.jit
def _plane16(c, K: tl.constexpr, BITS: tl.constexpr, USE_ASM: tl.constexpr):
    """Plane K of code bytes c (uint8) as fp16 1024 + code (exact): the field masked out of four bytes at once and
    each byte spread into an fp16 lane under the exponent byte 0x64 by one PRMT per two codes."""
    if USE_ASM:
        if BITS == 2:
            if K == 0:
                return tl.inline_asm_elementwise(
                    "{ .reg .b32 t, e; mov.b32 e, 0x64646464; and.b32 t, $2, 0x03030303; "
                    "prmt.b32 $0, t, e, 0x4140; prmt.b32 $1, t, e, 0x4342; }",
                    "=r,=r,r", [c], dtype=tl.float16, is_pure=True, pack=4)
            elif K == 1:
                return tl.inline_asm_elementwise(
                    "{ .reg .b32 t, e; mov.b32 e, 0x64646464; shr.b32 t, $2, 2; and.b32 t, t, 0x03030303; "
                    "prmt.b32 $0, t, e, 0x4140; prmt.b32 $1, t, e, 0x4342; }",
                    "=r,=r,r", [c], dtype=tl.float16, is_pure=True, pack=4)
            elif K == 2:
                return tl.inline_asm_elementwise(
                    "{ .reg .b32 t, e; mov.b32 e, 0x64646464; shr.b32 t, $2, 4; and.b32 t, t, 0x03030303; "
                    "prmt.b32 $0, t, e, 0x4140; prmt.b32 $1, t, e, 0x4342; }",
                    "=r,=r,r", [c], dtype=tl.float16, is_pure=True, pack=4)
            else:
                return tl.inline_asm_elementwise(
                    "{ .reg .b32 t, e; mov.b32 e, 0x64646464; shr.b32 t, $2, 6; and.b32 t, t, 0x03030303; "
                    "prmt.b32 $0, t, e, 0x4140; prmt.b32 $1, t, e, 0x4342; }",
                    "=r,=r,r", [c], dtype=tl.float16, is_pure=True, pack=4)
        else:
            if K == 0:
                return tl.inline_asm_elementwise(
                    "{ .reg .b32 t, e; mov.b32 e, 0x64646464; and.b32 t, $2, 0x0F0F0F0F; "
                    "prmt.b32 $0, t, e, 0x4140; prmt.b32 $1, t, e, 0x4342; }",
                    "=r,=r,r", [c], dtype=tl.float16, is_pure=True, pack=4)
            else:
                return tl.inline_asm_elementwise(
                    "{ .reg .b32 t, e; mov.b32 e, 0x64646464; shr.b32 t, $2, 4; and.b32 t, t, 0x0F0F0F0F; "
                    "prmt.b32 $0, t, e, 0x4140; prmt.b32 $1, t, e, 0x4342; }",
                    "=r,=r,r", [c], dtype=tl.float16, is_pure=True, pack=4)
    return ((c >> (K * BITS)) & ((1 << BITS) - 1)).to(tl.float16) + 1024.0


@triton.jit
def _plane16_scores(q16, zb, kc, t0, q_end, sscale, K: tl.constexpr, GQP: tl.constexpr, TG: tl.constexpr,
                    KDUP: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, USE_ASM: tl.constexpr):
    """Logits (GQP, NR) of plane K's tokens: the fp16 dot of every (head, scale group, copy) row of q' with
    1024 + code, plus that row's bias zb (which takes the 1024s back out); each token keeps its own group's first
    copy (KDUP copies of a row fill the MMA's 16 rows when heads x groups are fewer). Also the tokens' offsets."""
    CPB: tl.constexpr = 8 // BITS
    NR: tl.constexpr = TG * GROUP // CPB
    sd = tl.dot(q16, tl.trans(_plane16(kc, K, BITS, USE_ASM)))  # (GQP * TG * KDUP, NR) fp32
    r = tl.arange(0, NR)
    tok = (r // 16) * (16 * CPB) + 16 * K + r % 16  # plane layout: token of byte row r, field K
    j = tl.arange(0, TG * KDUP)
    own = ((tok // GROUP)[None, None, :] == (j // KDUP)[None, :, None]) & ((j % KDUP) == 0)[None, :, None]
    s3 = tl.reshape(sd, (GQP, TG * KDUP, NR)) + zb[:, :, None]
    s = tl.sum(tl.where(own, s3, 0.0), 1) * sscale[:, None]
    return tl.where((t0 + tok < q_end)[None, :], s, float("-inf")), tok


@triton.jit
def _plane16_values(p, tok, vc, vs_base, vz_base, t0, q_end, oacc, zacc, K: tl.constexpr, GQP: tl.constexpr,
                    NGD: tl.constexpr, BITS: tl.constexpr, USE_ASM: tl.constexpr):
    """oacc (GQP * NGD, D) += (p * vs) @ (1024 + code) per (head, channel group) row; zacc (GQP * NGD, 16) +=
    p @ vz (column g: group g's zero points) - 1024 * sum_t (p * vs) (the 1024s back out, from the same rounded
    p * vs), all fp16 dots."""
    NR: tl.constexpr = p.shape[1]
    tmask = t0 + tok < q_end
    vrow = (t0 + tok)[None, :] * NGD + tl.arange(0, NGD)[:, None]  # (NGD, NR)
    vs = tl.load(vs_base + vrow, mask=tmask[None, :], other=0.0).to(tl.float32)
    pv = tl.reshape((p[:, None, :] * vs[None, :, :]).to(tl.float16), (GQP * NGD, NR))
    oacc = tl.dot(pv, tl.trans(_plane16(vc, K, BITS, USE_ASM)), oacc)
    zc = tl.arange(0, 16)
    zmask = tmask[:, None] & (zc < NGD)[None, :]
    vz = tl.load(vz_base + (t0 + tok)[:, None] * NGD + zc[None, :], mask=zmask, other=0.0)  # (NR, 16)
    prep = tl.reshape(tl.broadcast_to(p[:, None, :], (GQP, NGD, NR)), (GQP * NGD, NR)).to(tl.float16)
    zacc = tl.dot(prep, vz.to(tl.float16), zacc)
    zacc = zacc - 1024.0 * tl.dot(pv, tl.full([NR, 16], 1.0, tl.float16))  # sum_t p * vs in every column
    return oacc, zacc


@triton.jit
def _planes16_tile(
    qn, sscale, kc_base, ks_base, kz_base, vc_base, vs_base, vz_base, t0, q_end, m_i, l_i, oacc, zacc,
    GQP: tl.constexpr, TG: tl.constexpr, KDUP: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
    D: tl.constexpr, USE_ASM: tl.constexpr,
):
    """One tile of TG * GROUP quantized tokens (plane layout) into the online softmax (m_i, l_i (GQP,)) and the value
    sums kept in rows (head, channel group) across tiles, oacc (GQP * NGD, D) and zacc (`_planes16_out` makes the
    output). q' = (q / max|q|) * key scale in fp16 (qn: q / max|q|; key scales are fp16, so q' stays in range),
    codes as fp16 1024 + code, p * value scale in fp16; the 1024s come back out through the biases."""
    CPB: tl.constexpr = 8 // BITS
    NGD: tl.constexpr = D // GROUP
    NR: tl.constexpr = TG * GROUP // CPB
    offs_d = tl.arange(0, D)
    r = tl.arange(0, NR)
    vcol = t0 // CPB + r  # the tile's key byte rows; value blocks of 16 * CPB tokens, (D, 16) bytes each
    rmask = (vcol // 16) * (16 * CPB) < q_end
    kc = tl.load(kc_base + vcol[:, None] * D + offs_d[None, :], mask=rmask[:, None], other=0)
    vc = tl.load(vc_base + (vcol // 16)[None, :] * (D * 16) + offs_d[:, None] * 16 + (vcol % 16)[None, :],
                 mask=rmask[None, :], other=0)
    sg = tl.arange(0, TG)
    smask = (t0 // GROUP + sg) * GROUP < q_end
    srow = (t0 // GROUP + sg)[:, None] * D + offs_d[None, :]
    ks = tl.load(ks_base + srow, mask=smask[:, None], other=0.0).to(tl.float32)
    kz = tl.load(kz_base + srow, mask=smask[:, None], other=0.0).to(tl.float32)
    q16 = (qn[:, None, :] * ks[None, :, :]).to(tl.float16)  # (GQP, TG, D)
    # the bias takes sum_d q' * 1024 back out with the same rounded q' the dot sees
    zb = tl.sum(qn[:, None, :] * kz[None, :, :] - 1024.0 * q16.to(tl.float32), 2)  # (GQP, TG)
    if KDUP > 1:
        q16 = tl.reshape(tl.broadcast_to(q16[:, :, None, :], (GQP, TG, KDUP, D)), (GQP * TG * KDUP, D))
        zb = tl.reshape(tl.broadcast_to(zb[:, :, None], (GQP, TG, KDUP)), (GQP, TG * KDUP))
    else:
        q16 = tl.reshape(q16, (GQP * TG, D))
    s0, tok0 = _plane16_scores(q16, zb, kc, t0, q_end, sscale, 0, GQP, TG, KDUP, BITS, GROUP, USE_ASM)
    s1, tok1 = _plane16_scores(q16, zb, kc, t0, q_end, sscale, 1, GQP, TG, KDUP, BITS, GROUP, USE_ASM)
    mt = tl.maximum(tl.max(s0, 1), tl.max(s1, 1))
    if CPB == 4:
        s2, tok2 = _plane16_scores(q16, zb, kc, t0, q_end, sscale, 2, GQP, TG, KDUP, BITS, GROUP, USE_ASM)
        s3, tok3 = _plane16_scores(q16, zb, kc, t0, q_end, sscale, 3, GQP, TG, KDUP, BITS, GROUP, USE_ASM)
        mt = tl.maximum(mt, tl.maximum(tl.max(s2, 1), tl.max(s3, 1)))
    m_new = tl.maximum(m_i, mt)
    alpha = tl.exp2(m_i - m_new)
    p0 = tl.exp2(s0 - m_new[:, None])
    p1 = tl.exp2(s1 - m_new[:, None])
    psum = tl.sum(p0, 1) + tl.sum(p1, 1)
    a16 = tl.reshape(tl.broadcast_to(alpha[:, None], (GQP, NGD)), (GQP * NGD,))
    oacc = oacc * a16[:, None]
    zacc = zacc * a16[:, None]
    oacc, zacc = _plane16_values(p0, tok0, vc, vs_base, vz_base, t0, q_end, oacc, zacc, 0, GQP, NGD, BITS, USE_ASM)
    oacc, zacc = _plane16_values(p1, tok1, vc, vs_base, vz_base, t0, q_end, oacc, zacc, 1, GQP, NGD, BITS, USE_ASM)
    if CPB == 4:
        p2 = tl.exp2(s2 - m_new[:, None])
        p3 = tl.exp2(s3 - m_new[:, None])
        psum += tl.sum(p2, 1) + tl.sum(p3, 1)
        oacc, zacc = _plane16_values(p2, tok2, vc, vs_base, vz_base, t0, q_end, oacc, zacc, 2, GQP, NGD, BITS,
                                     USE_ASM)
        oacc, zacc = _plane16_values(p3, tok3, vc, vs_base, vz_base, t0, q_end, oacc, zacc, 3, GQP, NGD, BITS,
                                     USE_ASM)
    l_i = l_i * alpha + psum
    return m_new, l_i, oacc, zacc


@triton.jit
def _planes16_out(oacc, zacc, GQP: tl.constexpr, NGD: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr):
    """(GQP, D) from the rows (head, channel group): each channel its own group's row, plus that group's zero-point
    sums (column g of row (head, g) of zacc)."""
    zsel = (tl.arange(0, GQP * NGD) % NGD)[:, None] == tl.arange(0, 16)[None, :]
    zt = tl.sum(tl.where(zsel, zacc, 0.0), 1)  # (GQP * NGD,)
    o3 = tl.reshape(oacc + zt[:, None], (GQP, NGD, D))
    mine = (tl.arange(0, D) // GROUP)[None, None, :] == tl.arange(0, NGD)[None, :, None]
    return tl.sum(tl.where(mine, o3, 0.0), 1)


@triton.jit
def _split_kernel_planes(
    Q, KC, KS, KZ, VC, VS, VZ, KR, VR, NQ, NR, PO, PML, KN, VN, APP,
    qk_scale, tokens_per_split, num_splits,
    s_qb, s_qh,
    s_kcb, s_kch, s_ksb, s_ksh,
    s_vcb, s_vch, s_vsb, s_vsh,
    s_krb, s_krh, s_krt,
    s_vrb, s_vrh, s_vrt,
    s_knb, s_knh, s_vnb, s_vnh, s_apb, s_aph,
    HKV: tl.constexpr, GQ: tl.constexpr, GQP: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
    BITS: tl.constexpr, GROUP: tl.constexpr, TG: tl.constexpr, BLOCK_T: tl.constexpr,
    KDUP: tl.constexpr, APPEND: tl.constexpr, USE_ASM: tl.constexpr, NSTAGES: tl.constexpr = 1,
):
    """`_decode_kernels._split_kernel`'s contract (same partial outputs for `_combine_kernel`, GP rows per part) over
    plane-order codes: quantized tokens by `_planes16_tile`, then the residual tokens and the appended one."""
    pid, sid, b, h, nq, nr, start, end = _split_range(NQ, NR, tokens_per_split, HKV)
    offs_g = tl.arange(0, GQP)
    offs_d = tl.arange(0, D)
    gmask = offs_g < GQ
    qptr = Q + b * s_qb + (h * GQ + offs_g)[:, None] * s_qh + offs_d[None, :]
    m_i = tl.full([GQP], float("-inf"), tl.float32)
    l_i = tl.zeros([GQP], tl.float32)
    QB: tl.constexpr = TG * GROUP
    q_end = tl.minimum(end, nq)
    kc_base = KC + b * s_kcb + h * s_kch
    ks_base = KS + b * s_ksb + h * s_ksh
    kz_base = KZ + b * s_ksb + h * s_ksh
    vc_base = VC + b * s_vcb + h * s_vch
    vs_base = VS + b * s_vsb + h * s_vsh
    vz_base = VZ + b * s_vsb + h * s_vsh
    # q / max|q| per row keeps q * key scale within fp16's range (key scales are fp16); the scores get it back
    qf = tl.load(qptr, mask=gmask[:, None], other=0.0).to(tl.float32)
    qm = tl.max(tl.abs(qf), 1)
    qm = tl.where(qm > 0, qm, 1.0)
    qn = qf / qm[:, None]
    sscale = qm * qk_scale
    NGD: tl.constexpr = D // GROUP
    oacc = tl.zeros([GQP * NGD, D], tl.float32)
    zacc = tl.zeros([GQP * NGD, 16], tl.float32)
    for t0 in tl.range(start, q_end, QB, num_stages=NSTAGES):
        m_i, l_i, oacc, zacc = _planes16_tile(qn, sscale, kc_base, ks_base, kz_base, vc_base, vs_base, vz_base, t0,
                                              q_end, m_i, l_i, oacc, zacc, GQP, TG, KDUP, BITS, GROUP, D, USE_ASM)
    acc = _planes16_out(oacc, zacc, GQP, NGD, GROUP, D)
    # residual tokens in full precision: tensor-core dots with each query row copied KR times to fill 16 rows (the
    # first copy is kept), BLOCK_T tokens at a time
    kr_base = KR + b * s_krb + h * s_krh
    vr_base = VR + b * s_vrb + h * s_vrh
    if APPEND:
        app, kn, vn = _append_new(APP, KN, VN, kr_base, vr_base, b, h, sid, offs_d, s_apb, s_aph, s_knb, s_knh, s_vnb,
                                  s_vnh, s_krt, s_vrt, KR.dtype.element_ty, VR.dtype.element_ty)
    dt = Q.dtype.element_ty
    q = tl.load(qptr, mask=gmask[:, None], other=0.0)  # reloaded: not held in registers through the tiles
    qd = q.to(tl.float32)
    KR_: tl.constexpr = max(1, 16 // GQP)
    qrep = tl.reshape(tl.broadcast_to(q[:, None, :], (GQP, KR_, D)), (GQP * KR_, D))
    first = (tl.arange(0, KR_) == 0)[None, :, None]
    r_start = tl.maximum(start, nq)
    for t0 in range(r_start, end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        ridx = offs_t - nq
        tmask = offs_t < end
        if APPEND:
            smask = tmask & (ridx != app)
        else:
            smask = tmask
        k = tl.load(kr_base + ridx[:, None] * s_krt + offs_d[None, :], mask=smask[:, None], other=0.0).to(dt)
        sr = tl.reshape(tl.dot(qrep, tl.trans(k)), (GQP, KR_, BLOCK_T))
        s = tl.sum(tl.where(first, sr, 0.0), 1) * qk_scale  # (GQP, BLOCK_T)
        s = tl.where(smask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(vr_base + ridx[:, None] * s_vrt + offs_d[None, :], mask=smask[:, None], other=0.0).to(dt)
        prep = tl.reshape(tl.broadcast_to(p.to(dt)[:, None, :], (GQP, KR_, BLOCK_T)), (GQP * KR_, BLOCK_T))
        pv = tl.sum(tl.where(first, tl.reshape(tl.dot(prep, v), (GQP, KR_, D)), 0.0), 1)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    if APPEND:
        own = (nq + app >= start) & (nq + app < end)
        if own:
            s_new = tl.sum(qd * kn.to(dt).to(tl.float32)[None, :], 1) * qk_scale
            m_i, l_i, acc = _new_token_softmax(s_new, vn, m_i, l_i, acc, dt)
    part = pid * num_splits + sid
    tl.store(PO + (part * GP + offs_g)[:, None] * D + offs_d[None, :], acc, mask=gmask[:, None])
    tl.store(PML + part * 2 * GP + offs_g, m_i, mask=gmask)
    tl.store(PML + part * 2 * GP + GP + offs_g, l_i, mask=gmask)
