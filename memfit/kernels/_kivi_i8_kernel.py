"""Integer tensor-core dots over plane-order KIVI codes: `kivi_decode_attention(..., layout="planes")` (this module
imports triton: import it lazily). Opt-in, used by no store: on an H200 it is not faster than the bf16 tiles
(benchmarks/README.md, "Integer tensor-core dots").

Why it was tried: the bf16 tiles (`_decode_kernels`) spend ~89 warp instructions per cached token at large batch,
most of them turning each code into a bf16 element of the tensor cores' layout one at a time. Here codes stay
small integers and int8 MMAs multiply them (exact int32 sums):

- keys: a token's score is sum_d q[d] * (ks[d] * c[d] + kz[d]) = sum_d (q[d] * ks[d]) * c[d] + sum_d q[d] * kz[d].
  Per scale group, q' = q * ks is scaled per query head so that its largest magnitude is 127 and written as
  hi + lo / 254 with hi, lo int8 (one pass alone is too coarse: see the README); the rows (head, scale group) of TG
  groups fill the 16 rows an MMA needs, one dot scores every row against every token of a plane and each token
  keeps its own group's row (the other products are discarded: tensor-core work is cheap here, unpacking is not).
- values: out[d] = sum_t p[t] * (vs[t, g(d)] * c[t, d] + vz[t, g(d)]). p' = p * vs per (head, channel group) row,
  scaled so that its tile maximum is 127, as hi + lo / 254; one dot per plane gives every row's sums over every
  channel and each channel keeps its own group's row; the zero-point term is sum_t p[t] * vz[t, g] in fp32.
In plane order (`memfit.kernels.kivi_planes`) one field of a block of byte rows is 16 consecutive tokens: one shift
and one mask per four bytes (inline PTX on CUDA; plain Triton in the interpreter) turn it into an int8 MMA operand
that Triton loads with ldmatrix. The residual tokens and the appended one are computed in fp32 on CUDA cores.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _round_i8(x):
    """Round half away from zero and convert to int8 (x already within [-127, 127])."""
    return (x + tl.where(x >= 0, 0.5, -0.5)).to(tl.int32).to(tl.int8)


@triton.jit
def _plane(c, K: tl.constexpr, BITS: tl.constexpr, USE_ASM: tl.constexpr):
    """Plane K of code bytes c (uint8): the BITS-bit field at bit K * BITS of every byte, as int8. The asm form works
    on four bytes per 32-bit register (one shift and one AND for four codes); Triton's own form is the same value."""
    if USE_ASM:
        if BITS == 2:
            if K == 0:
                return tl.inline_asm_elementwise("and.b32 $0, $1, 0x03030303;", "=r,r", [c], dtype=tl.int8,
                                                 is_pure=True, pack=4)
            elif K == 1:
                return tl.inline_asm_elementwise("{ .reg .b32 t; shr.b32 t, $1, 2; and.b32 $0, t, 0x03030303; }",
                                                 "=r,r", [c], dtype=tl.int8, is_pure=True, pack=4)
            elif K == 2:
                return tl.inline_asm_elementwise("{ .reg .b32 t; shr.b32 t, $1, 4; and.b32 $0, t, 0x03030303; }",
                                                 "=r,r", [c], dtype=tl.int8, is_pure=True, pack=4)
            else:
                return tl.inline_asm_elementwise("{ .reg .b32 t; shr.b32 t, $1, 6; and.b32 $0, t, 0x03030303; }",
                                                 "=r,r", [c], dtype=tl.int8, is_pure=True, pack=4)
        else:
            if K == 0:
                return tl.inline_asm_elementwise("and.b32 $0, $1, 0x0F0F0F0F;", "=r,r", [c], dtype=tl.int8,
                                                 is_pure=True, pack=4)
            else:
                return tl.inline_asm_elementwise("{ .reg .b32 t; shr.b32 t, $1, 4; and.b32 $0, t, 0x0F0F0F0F; }",
                                                 "=r,r", [c], dtype=tl.int8, is_pure=True, pack=4)
    return ((c >> (K * BITS)) & ((1 << BITS) - 1)).to(tl.int8)


@triton.jit
def _split_i8(x):
    """x in [-127, 127] as hi + lo / 254 with hi, lo int8: two int8 dots then carry ~15 significant bits."""
    hi = _round_i8(x)
    return hi, _round_i8((x - hi.to(tl.float32)) * 254.0)


@triton.jit
def _plane_scores(q8h, q8l, qscale, bias, kc, t0, q_end, qk_scale, K: tl.constexpr,
                  GQP: tl.constexpr, TG: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
                  USE_ASM: tl.constexpr):
    """Logits (GQP, NR) of the tile's plane-K tokens: int8 dots of every (head, scale group) row of q' with the
    plane's codes (exact int32 sums, 254 * hi + lo); each token keeps its own group's row. Also returns the tokens'
    offsets in the tile."""
    CPB: tl.constexpr = 8 // BITS
    NR: tl.constexpr = TG * GROUP // CPB
    k8 = tl.trans(_plane(kc, K, BITS, USE_ASM))  # (D, NR): column r of the tile's byte rows
    si = tl.dot(q8l, k8, tl.dot(q8h, k8, out_dtype=tl.int32) * 254, out_dtype=tl.int32)  # (GQP * TG, NR) int32
    r = tl.arange(0, NR)
    tok = (r // 16) * (16 * CPB) + 16 * K + r % 16  # plane layout: token of row r, plane K
    own = (tok // GROUP)[None, None, :] == tl.arange(0, TG)[None, :, None]
    s3 = tl.reshape(si, (GQP, TG, NR)).to(tl.float32) * qscale[:, :, None] + bias[:, :, None]
    s = tl.sum(tl.where(own, s3, 0.0), 1) * qk_scale
    return tl.where((t0 + tok < q_end)[None, :], s, float("-inf")), tok


@triton.jit
def _plane_pv(p, tok, vs_base, vz_base, t0, q_end, zt, NGD: tl.constexpr):
    """p (GQP, NR) times the plane's value scales: (GQP, NGD, NR) >= 0; zero-point sums added into zt."""
    tmask = t0 + tok < q_end
    vrow = (t0 + tok)[None, :] * NGD + tl.arange(0, NGD)[:, None]  # (NGD, NR)
    vs = tl.load(vs_base + vrow, mask=tmask[None, :], other=0.0).to(tl.float32)
    vz = tl.load(vz_base + vrow, mask=tmask[None, :], other=0.0).to(tl.float32)
    return p[:, None, :] * vs[None, :, :], zt + tl.sum(p[:, None, :] * vz[None, :, :], 2)


@triton.jit
def _plane_values(pv, pinv, vc, oh, ol, K: tl.constexpr, BITS: tl.constexpr, USE_ASM: tl.constexpr):
    """Adds plane K's scaled probabilities pv (GQP, NGD, NR) times its value codes into the int32 sums oh, ol
    (GQP * NGD, D), rows (head, channel group): pv * pinv in [0, 127] as hi + lo / 254."""
    GQP: tl.constexpr = pv.shape[0]
    NGD: tl.constexpr = pv.shape[1]
    NR: tl.constexpr = pv.shape[2]
    hi, lo = _split_i8(pv * pinv[:, :, None])
    v8 = tl.trans(_plane(vc, K, BITS, USE_ASM))  # (NR, D)
    oh = tl.dot(tl.reshape(hi, (GQP * NGD, NR)), v8, oh, out_dtype=tl.int32)
    ol = tl.dot(tl.reshape(lo, (GQP * NGD, NR)), v8, ol, out_dtype=tl.int32)
    return oh, ol


@triton.jit
def _planes_tile(
    qf, kc_base, ks_base, kz_base, vc_base, vs_base, vz_base, t0, q_end, m_i, l_i, acc, qk_scale,
    GQP: tl.constexpr, TG: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
    USE_ASM: tl.constexpr,
):
    """One tile of TG * GROUP quantized tokens (plane layout) into the online softmax (m_i, l_i (GQP,), acc (GQP, D))."""
    CPB: tl.constexpr = 8 // BITS
    NR: tl.constexpr = TG * GROUP // CPB
    NGD: tl.constexpr = D // GROUP
    offs_d = tl.arange(0, D)
    r = tl.arange(0, NR)
    # codes: key byte rows t0 / CPB + r (D bytes each); value blocks of 16 * CPB tokens, (D, 16) bytes each
    vcol = t0 // CPB + r
    rmask = (vcol // 16) * (16 * CPB) < q_end
    kc = tl.load(kc_base + vcol[:, None] * D + offs_d[None, :], mask=rmask[:, None], other=0)
    vc = tl.load(vc_base + (vcol // 16)[None, :] * (D * 16) + offs_d[:, None] * 16 + (vcol % 16)[None, :],
                 mask=rmask[None, :], other=0)
    sg = tl.arange(0, TG)
    smask = (t0 // GROUP + sg) * GROUP < q_end
    srow = (t0 // GROUP + sg)[:, None] * D + offs_d[None, :]
    ks = tl.load(ks_base + srow, mask=smask[:, None], other=0.0).to(tl.float32)
    kz = tl.load(kz_base + srow, mask=smask[:, None], other=0.0).to(tl.float32)
    # q' = q * key scale per (head, scale group): int8 hi + lo / 254 with one scale per row
    qs = qf[:, None, :] * ks[None, :, :]  # (GQP, TG, D)
    qmax = tl.max(tl.abs(qs), 2)
    qscale = tl.where(qmax > 0, qmax / 127.0, 1.0)
    q8h, q8l = _split_i8(qs * (1.0 / qscale)[:, :, None])
    q8h = tl.reshape(q8h, (GQP * TG, D))
    q8l = tl.reshape(q8l, (GQP * TG, D))
    qscale = qscale * (1.0 / 254.0)
    bias = tl.sum(qf[:, None, :] * kz[None, :, :], 2)  # (GQP, TG)
    s0, tok0 = _plane_scores(q8h, q8l, qscale, bias, kc, t0, q_end, qk_scale, 0, GQP, TG, BITS, GROUP, USE_ASM)
    s1, tok1 = _plane_scores(q8h, q8l, qscale, bias, kc, t0, q_end, qk_scale, 1, GQP, TG, BITS, GROUP, USE_ASM)
    mt = tl.maximum(tl.max(s0, 1), tl.max(s1, 1))
    if CPB == 4:
        s2, tok2 = _plane_scores(q8h, q8l, qscale, bias, kc, t0, q_end, qk_scale, 2, GQP, TG, BITS, GROUP, USE_ASM)
        s3, tok3 = _plane_scores(q8h, q8l, qscale, bias, kc, t0, q_end, qk_scale, 3, GQP, TG, BITS, GROUP, USE_ASM)
        mt = tl.maximum(mt, tl.maximum(tl.max(s2, 1), tl.max(s3, 1)))
    m_new = tl.maximum(m_i, mt)
    alpha = tl.exp2(m_i - m_new)
    zt = tl.zeros([GQP, NGD], tl.float32)
    p0 = tl.exp2(s0 - m_new[:, None])
    p1 = tl.exp2(s1 - m_new[:, None])
    psum = tl.sum(p0, 1) + tl.sum(p1, 1)
    pv0, zt = _plane_pv(p0, tok0, vs_base, vz_base, t0, q_end, zt, NGD)
    pv1, zt = _plane_pv(p1, tok1, vs_base, vz_base, t0, q_end, zt, NGD)
    pmax = tl.maximum(tl.max(pv0, 2), tl.max(pv1, 2))  # (GQP, NGD)
    if CPB == 4:
        p2 = tl.exp2(s2 - m_new[:, None])
        p3 = tl.exp2(s3 - m_new[:, None])
        psum += tl.sum(p2, 1) + tl.sum(p3, 1)
        pv2, zt = _plane_pv(p2, tok2, vs_base, vz_base, t0, q_end, zt, NGD)
        pv3, zt = _plane_pv(p3, tok3, vs_base, vz_base, t0, q_end, zt, NGD)
        pmax = tl.maximum(pmax, tl.maximum(tl.max(pv2, 2), tl.max(pv3, 2)))
    pinv = tl.where(pmax > 0, 127.0 / pmax, 0.0)
    oh = tl.zeros([GQP * NGD, D], tl.int32)
    ol = tl.zeros([GQP * NGD, D], tl.int32)
    oh, ol = _plane_values(pv0, pinv, vc, oh, ol, 0, BITS, USE_ASM)
    oh, ol = _plane_values(pv1, pinv, vc, oh, ol, 1, BITS, USE_ASM)
    if CPB == 4:
        oh, ol = _plane_values(pv2, pinv, vc, oh, ol, 2, BITS, USE_ASM)
        oh, ol = _plane_values(pv3, pinv, vc, oh, ol, 3, BITS, USE_ASM)
    l_i = l_i * alpha + psum
    oscale = pmax * (1.0 / (127.0 * 254.0))
    o3 = tl.reshape(oh * 254 + ol, (GQP, NGD, D)).to(tl.float32) * oscale[:, :, None]
    mine = (offs_d // GROUP)[None, None, :] == tl.arange(0, NGD)[None, :, None]
    o = tl.sum(tl.where(mine, o3, 0.0), 1)  # (GQP, D): each channel its own group's row
    zd = tl.reshape(tl.broadcast_to(zt[:, :, None], (GQP, NGD, GROUP)), (GQP, D))
    acc = acc * alpha[:, None] + o + zd
    return m_new, l_i, acc


@triton.jit
def _split_kernel_i8(
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
    APPEND: tl.constexpr, USE_ASM: tl.constexpr, NSTAGES: tl.constexpr = 1,
):
    """`_decode_kernels._split_kernel`'s contract (same partial outputs for `_combine_kernel`, GP rows per part) with
    the quantized tokens scored by `_i8_tile`; the residual tokens and the appended one in fp32 on CUDA cores (at
    most a few hundred per row)."""
    pid = tl.program_id(0)
    sid = tl.program_id(1)
    b = (pid // HKV).to(tl.int64)
    h = pid % HKV
    nq = tl.load(NQ + b)
    nr = tl.load(NR + b)
    total = nq + nr
    start = sid * tokens_per_split
    end = tl.minimum(start + tokens_per_split, total)
    offs_g = tl.arange(0, GQP)
    offs_d = tl.arange(0, D)
    gmask = offs_g < GQ
    qf = tl.load(Q + b * s_qb + (h * GQ + offs_g)[:, None] * s_qh + offs_d[None, :], mask=gmask[:, None],
                 other=0.0).to(tl.float32)
    m_i = tl.full([GQP], float("-inf"), tl.float32)
    l_i = tl.zeros([GQP], tl.float32)
    acc = tl.zeros([GQP, D], tl.float32)
    QB: tl.constexpr = TG * GROUP
    q_end = tl.minimum(end, nq)
    kc_base = KC + b * s_kcb + h * s_kch
    ks_base = KS + b * s_ksb + h * s_ksh
    kz_base = KZ + b * s_ksb + h * s_ksh
    vc_base = VC + b * s_vcb + h * s_vch
    vs_base = VS + b * s_vsb + h * s_vsh
    vz_base = VZ + b * s_vsb + h * s_vsh
    for t0 in tl.range(start, q_end, QB, num_stages=NSTAGES):
        m_i, l_i, acc = _planes_tile(qf, kc_base, ks_base, kz_base, vc_base, vs_base, vz_base, t0, q_end, m_i, l_i,
                                     acc, qk_scale, GQP, TG, BITS, GROUP, D, USE_ASM)
    # residual tokens in full precision (fp32 on CUDA cores)
    kr_base = KR + b * s_krb + h * s_krh
    vr_base = VR + b * s_vrb + h * s_vrh
    if APPEND:
        app = tl.load(APP + b * s_apb + h * s_aph)
        kn = tl.load(KN + b * s_knb + h * s_knh + offs_d)
        vn = tl.load(VN + b * s_vnb + h * s_vnh + offs_d)
        if sid == 0:
            tl.store(kr_base + app * s_krt + offs_d, kn.to(KR.dtype.element_ty))
            tl.store(vr_base + app * s_vrt + offs_d, vn.to(VR.dtype.element_ty))
    dt = Q.dtype.element_ty
    qd = qf.to(dt).to(tl.float32)  # the bf16 kernels' dots see q in its own dtype
    r_start = tl.maximum(start, nq)
    for t0 in range(r_start, end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        ridx = offs_t - nq
        tmask = offs_t < end
        if APPEND:
            smask = tmask & (ridx != app)
        else:
            smask = tmask
        k = tl.load(kr_base + ridx[:, None] * s_krt + offs_d[None, :], mask=tmask[:, None], other=0.0)
        s = tl.sum(qd[:, None, :] * k.to(dt).to(tl.float32)[None, :, :], 2) * qk_scale  # (GQP, BLOCK_T)
        s = tl.where(smask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(vr_base + ridx[:, None] * s_vrt + offs_d[None, :], mask=tmask[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v.to(dt).to(tl.float32)[None, :, :], 1)
        m_i = m_new
    if APPEND:
        own = (nq + app >= start) & (nq + app < end)
        if own:
            s_new = tl.sum(qd * kn.to(dt).to(tl.float32)[None, :], 1) * qk_scale
            m_new = tl.maximum(m_i, s_new)
            alpha = tl.exp2(m_i - m_new)
            p_new = tl.exp2(s_new - m_new)
            l_i = l_i * alpha + p_new
            acc = acc * alpha[:, None] + p_new[:, None] * vn.to(dt).to(tl.float32)[None, :]
            m_i = m_new
    part = pid * num_splits + sid
    tl.store(PO + (part * GP + offs_g)[:, None] * D + offs_d[None, :], acc, mask=gmask[:, None])
    tl.store(PML + part * 2 * GP + offs_g, m_i, mask=gmask)
    tl.store(PML + part * 2 * GP + GP + offs_g, l_i, mask=gmask)
