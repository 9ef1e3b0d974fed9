"""Decode attention over a KIVI cache read in its packed form (Triton), and over plain slot buffers.

`kivi_decode_attention` computes, for one new query token per row, softmax attention over ``n_q[b]`` quantized
tokens (2/4/8-bit codes in the `memfit.core.quant` layout: keys per channel along tokens, values per token along
channels, fp16/bf16 scales and zero points) followed by ``n_r[b]`` full-precision residual tokens. Codes are
unpacked and dequantized in registers; nothing dequantized touches HBM. `decode_attention` is the same kernel over
a plain (B, Hkv, C, d) slot buffer holding ``lengths[b]`` tokens (evicted caches, full static caches).

Structure (flash-decoding): grid (B * Hkv, splits); each program owns one KV head and its g query heads (GQA,
padded to 16 rows for tensor-core dots) over a contiguous token range, with an online softmax in fp32; a second
small kernel merges the splits. Splits are chosen from the static capacity so that batch-1 decode still fills the
GPU, and lengths are read from device tensors, so the launch is CUDA-graph safe (no host sync, static grid).

Plain-PyTorch references: `memfit.kernels.reference` (tested in CI on CPU; kernels vs references: `-m gpu`).
"""

from __future__ import annotations

import functools
import math
import os

import torch

from memfit.errors import ConfigError

__all__ = ["decode_attention", "kivi_decode_attention", "plan_splits", "variant_spec"]

_LOG2E = 1.4426950408889634


@functools.lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # Triton's CPU interpreter: keep the grid small


_ZEROS: dict[tuple, torch.Tensor] = {}


def _zeros(batch: int, device: torch.device) -> torch.Tensor:
    """Cached int32 zeros (B,) (n_q of a plain slot buffer); never cached from inside a CUDA-graph capture."""
    key = (batch, device)
    z = _ZEROS.get(key)
    if z is None:
        z = torch.zeros(batch, dtype=torch.int32, device=device)
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            _ZEROS[key] = z
    return z


def plan_splits(
    batch: int, kv_heads: int, capacity: int, device: torch.device, block_t: int = 64, max_splits: int = 128
) -> tuple[int, int]:
    """(num_splits, tokens_per_split) for a static token capacity.

    Decode attention at small batch is latency-bound (few bytes per program): aim for ~8 programs per SM, each
    owning at least one tile; at large batch one split per (row, KV head) already fills the GPU.
    """
    tiles = max(1, -(-capacity // block_t))
    want = max(1, -(-8 * _sm_count(device) // max(1, batch * kv_heads)))
    splits = max(1, min(want, tiles, max_splits))
    tps = -(-tiles // splits) * block_t
    splits = -(-capacity // tps) if capacity > 0 else 1
    return max(1, splits), tps


# Quantized-tile code paths (the kernel's PACKED switch), each with a number of warps:
#   1 "packed":   two scale groups per tile; packed 16-byte loads expanded in registers, keys and values dequantized
#                 in fp32, next tile prefetched;
#   3 "packed32": the same with one group per tile (key scales are a plain row broadcast; fewer registers);
#   2 "fold":     one group per tile, key scales folded into q, values dequantized in fp16;
#   0 "gather":   every element loads its own byte and scale (simplest);
#   4 "pipe":     the "packed" math, tiles kept in flight by Triton's software pipeliner (num_stages) instead of
#                 the one-tile register prefetch;
#   7 "half":     the "packed" loads, tiles computed in fp16 with no conversion unit (codes OR-ed into an fp16
#                 mantissa, scales applied in fp16, fp16 dots): `_half_tile`; 8 "halfpipe": the same pipelined.
#                 fp16's range (65504) bounds the keys, values and queries these take: the default for fp16 models
#                 only (H200: 4-bit 7 % faster than "pipe" at batch 1, 64 and 461; 2-bit within 2 % of "packed").
# (A "magic" path turning codes into floats by bit operations instead of the int-to-float unit measured no faster
# and was removed: benchmarks/results/kivi_kernel_sweep_h200.jsonl. So were "foldmagic" (key scales folded into q,
# value scales into p, batched dots over the scale groups, codes made floats by a bit OR: 255 registers with spills,
# 1.6x slower at 461 rows, kivi_kernel_sweep_foldmagic_h200.jsonl) and "perm" (tokens in the packed keys' order so key
# codes need no reshape, one softmax step per bit field: 2.3x slower, kivi_kernel_sweep_perm_h200.jsonl). Removing
# the fp32 conversions ("half") gained 0-7 %, so neither conversions nor the scale broadcasts bound the kernel. A
# "join" path (one scale group per step, key codes loaded transposed, every expansion a tl.join so that no reshape
# moves data) halved the registers (128) and still ran 1.4-2.3x slower: kivi_kernel_sweep_join_h200.jsonl. The
# expansion alone written with tl.join inside the "packed"/"pipe" tiles ("packedj", "pipej"; with 2^23-bit-pattern
# conversions "packedjm", "pipejm") makes the tile's shared-memory stores 16-byte vectors instead of one bf16 each
# (18 % fewer instructions), yet ran 10-35 % slower on the H200: kivi_kernel_sweep_joinexpand_h200.jsonl; Nsight
# Compute found 11.6-way bank conflicts on those stores. Instruction counts per variant, offline:
# benchmarks/kivi_kernel_sass.py.)
# A variant is (path, num_warps[, scale groups per tile, pipeline stages]). `packed_policy(programs, bits)` picks
# one from the number of (row, KV head) programs and the code width; benchmarks/gpu_decode.py times them all and
# installs what it measured; benchmarks/kivi_kernel_sweep.py sweeps the tile shapes. On an H100, "packed" beat
# "fold" and "gather" at every size measured (batch 1..256, 8K-32K tokens). On an H200 at the 32K max batch (461
# rows x 8192 tokens) no variant reads more than 14 % (2-bit) / 22 % (4-bit) of the copy bandwidth: the per-code work
# (unpack, fp32 dequantization, the tile's conversion to the MMA layout), not the bytes, bounds it.
VARIANTS: dict[str, tuple[int, ...]] = {
    "packed": (1, 4),
    "packed32": (3, 4),
    "fold": (2, 4),
    "packed-w8": (1, 8),
    "gather": (0, 4),
    "pipe": (4, 4, 2, 3),
    "pipe-w8": (4, 8, 2, 3),
    "half": (7, 4),
    "halfpipe": (8, 4, 2, 3),
}


def variant_spec(text: str) -> tuple[int, ...]:
    """A variant from its name in `VARIANTS` or its numbers written "path,warps[,groups,stages]"."""
    if text in VARIANTS:
        return VARIANTS[text]
    try:
        spec = tuple(int(x) for x in text.split(","))
    except ValueError:
        spec = ()
    if not 2 <= len(spec) <= 4:
        raise ConfigError(f"unknown KIVI kernel variant {text!r} (MEMFIT_KIVI_VARIANT): one of {sorted(VARIANTS)} or "
                          f"'path,warps[,groups,stages]'")
    return spec


def _default_packed(programs: int, bits: int) -> tuple[int, ...]:
    # MEMFIT_KIVI_VARIANT forces one variant everywhere (A/B runs of the product path)
    forced = os.environ.get("MEMFIT_KIVI_VARIANT")
    if forced:
        return variant_spec(forced)
    # H200 sweep (benchmarks/results/kivi_kernel_sweep_h200.jsonl): 4-bit codes run 7-9 % faster pipelined at batch
    # 1, 256 and 461; 2-bit codes are fastest with the register prefetch (pipelined they spill). fp16 models take
    # the fp16 tiles (kivi_kernel_sweep_half_h200.jsonl), which bf16 models cannot: their range passes fp16's
    return VARIANTS["pipe" if bits == 4 else "packed"]


def _policy(programs: int, bits: int, dtype: torch.dtype) -> tuple[int, ...]:
    """`packed_policy`'s variant, swapped for its fp16 twin ("half" / "halfpipe") when the queries are fp16."""
    spec = packed_policy(programs, bits)
    if dtype == torch.float16 and not os.environ.get("MEMFIT_KIVI_VARIANT") and spec in (VARIANTS["packed"], VARIANTS["pipe"]):
        return VARIANTS["halfpipe" if spec == VARIANTS["pipe"] else "half"]
    return spec


packed_policy = _default_packed


def _as_len(x: torch.Tensor | int, batch: int, device: torch.device) -> torch.Tensor:
    if isinstance(x, int):
        return torch.full((batch,), x, dtype=torch.int32, device=device)
    if x.dtype != torch.int32 or x.device != device or not x.is_contiguous():
        x = x.to(device=device, dtype=torch.int32).contiguous()
    return x.reshape(batch)


def _slot_index(x: torch.Tensor | int, batch: int, kv_heads: int, device: torch.device):
    """Append slot per (row, KV head) as (tensor, stride_b, stride_h): (B,), (B, Hkv) or an int."""
    if isinstance(x, int):
        x = torch.full((batch,), x, dtype=torch.int32, device=device)
    if x.dtype != torch.int32:
        raise ValueError("append slot indices must be int32")
    if x.dim() == 1:
        return x, x.stride(0), 0
    if x.shape != (batch, kv_heads):
        raise ValueError(f"append slots must be (B,) or (B, Hkv) = {(batch, kv_heads)}, got {tuple(x.shape)}")
    return x, x.stride(0), x.stride(1)


def _inner_contig(t: torch.Tensor, what: str) -> None:
    if t.stride(-1) != 1 or t.stride(-2) != t.shape[-1]:
        raise ValueError(f"{what} must be contiguous in its last two dims (got strides {tuple(t.stride())})")


def _launch(
    q,
    k_res,
    v_res,
    n_q,
    n_r,
    quant,
    scale,
    *,
    bits=8,
    group_size=32,
    store_logits=False,
    logits=None,
    block_t=64,
    num_splits=None,
    out=None,
    k_new=None,
    v_new=None,
    append_at=None,
    packed=None,
    combine=True,
    layout="canonical",
):
    """Launch the split kernel (+ the combine kernel). Returns (out, pml, splits)."""
    from memfit.kernels import _decode_kernels as K

    if q.dim() != 3:
        raise ValueError(f"q must be (B, Hq, d) (one query token per row), got shape {tuple(q.shape)}")
    b, hq, d = q.shape
    hkv = k_res.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads {hq} must be a multiple of KV heads {hkv}")
    if d & (d - 1) or d < 16:
        raise ValueError(f"head dim must be a power of two >= 16, got {d}")
    g = hq // hkv
    gp = max(16, triton_next_pow2(g))
    if q.stride(-1) != 1:
        q = q.contiguous()
    for t, name in ((k_res, "k_res"), (v_res, "v_res")):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim")
    dev = q.device
    nq = _as_len(n_q, b, dev)
    nr = _as_len(n_r, b, dev)
    qblock = group_size
    if quant is not None:
        kc, ks, kz, vc, vs, vz = quant
        if bits not in (2, 4, 8):
            raise ValueError(f"bits must be 2, 4 or 8, got {bits}")
        cpb = 8 // bits
        if group_size % cpb or d % group_size or group_size & (group_size - 1):
            raise ValueError(f"group_size {group_size} must be a power of two dividing d={d}, a multiple of {cpb}")
        for t, name in (
            (kc, "k_codes"),
            (ks, "k_scales"),
            (kz, "k_zeros"),
            (vc, "v_codes"),
            (vs, "v_scales"),
            (vz, "v_zeros"),
        ):
            _inner_contig(t, name)
        if ks.stride() != kz.stride() or vs.stride() != vz.stride():
            raise ValueError("scales and zeros must share strides")
        cap_q = ks.shape[2] * group_size
        if layout == "planes":
            if bits not in (2, 4) or group_size % 16 or store_logits:
                raise ValueError("plane-order codes need 2 or 4 bits, groups of a multiple of 16 tokens, no logits")
            vshape_ok = vc.dim() == 5 and vc.shape[2] * 16 * cpb == cap_q and tuple(vc.shape[3:]) == (d, 16)
        else:
            vshape_ok = vc.dim() == 4 and vc.shape[2] == cap_q and vc.shape[3] * cpb == d
        if kc.shape[2] * cpb != cap_q or not vshape_ok or vs.shape[3] * group_size != d:
            raise ValueError(f"packed key/value shapes do not match the KIVI {layout} layout for these bits / group size")
    else:
        kc = ks = kz = vc = vs = vz = k_res
        cap_q = 0
    if layout == "planes":
        # three pipeline stages: the next tiles' codes stream into shared memory while this one computes (H200,
        # 461 rows x 8192 tokens: 2-bit 4.42 -> 3.04 ms, 4-bit 4.99 -> 2.96 ms; kivi_kernel_sweep_planes3 / _planes5
        # _h200.jsonl, benchmarks/README.md)
        spec = (9, int(os.environ.get("MEMFIT_KIVI_PLANES_WARPS", "1")), 2,
                int(os.environ.get("MEMFIT_KIVI_PLANES_STAGES", "3")))
    elif packed is None:
        spec = _policy(b * hkv, bits, q.dtype)
    elif isinstance(packed, str):
        spec = VARIANTS[packed]
    elif isinstance(packed, bool):
        spec = (1 if packed else 0, 4)
    else:
        spec = tuple(packed)
    path, warps = int(spec[0]), int(spec[1])
    tile_groups = int(spec[2]) if len(spec) > 2 else 2
    stages = int(spec[3]) if len(spec) > 3 else 1
    if path not in ((9,) if layout == "planes" else (0, 1, 2, 3, 4, 7, 8)) or warps not in (1, 2, 4, 8, 16) or tile_groups < 2 or stages < 1:
        raise ValueError(f"bad kernel variant {spec}: (path 0-4, 7, 8; num_warps 1-16, scale groups per tile >= 2, stages >= 1)")
    if quant is not None:
        qblock = max(tile_groups * group_size, 16)  # >= two scale groups per tile (no size-1 ranges); "fold": one
        if path == 9:  # the plane-order tile's own size: splits start on its tiles
            qblock = planes_shape(g, d, group_size, bits)[1] * group_size
        if block_t % qblock:
            block_t = qblock * max(1, -(-block_t // qblock))
    capacity = cap_q + k_res.shape[2]
    if num_splits is None:
        splits, tps = plan_splits(b, hkv, capacity, dev, block_t)
    else:
        splits = max(1, int(num_splits))
        tps = -(-max(1, -(-capacity // splits)) // block_t) * block_t
        splits = max(1, -(-capacity // tps))
    append = k_new is not None
    if append:
        if v_new is None or append_at is None:
            raise ValueError("k_new needs v_new and append_at")
        if k_new.shape != (b, hkv, d) or v_new.shape != (b, hkv, d) or k_new.stride(-1) != 1 or v_new.stride(-1) != 1:
            raise ValueError(f"k_new / v_new must be (B, Hkv, d) = {(b, hkv, d)} with a contiguous last dim")
        app, s_apb, s_aph = _slot_index(append_at, b, hkv, dev)
        kn, vn = k_new, v_new
    else:
        app, s_apb, s_aph = nq, 0, 0
        kn = vn = q
    po = torch.empty(b * hkv * splits * gp * d, dtype=torch.float32, device=dev)
    pml = torch.empty(b * hkv * splits * 2 * gp, dtype=torch.float32, device=dev)
    lg = logits if logits is not None else po
    s_lg = (logits.stride(0), logits.stride(1)) if logits is not None else (0, 0)
    if path == 9:
        _launch_planes(q, kc, ks, kz, vc, vs, vz, k_res, v_res, nq, nr, po, pml, kn, vn, app, s_apb, s_aph, scale, tps,
                   splits, hkv, g, gp, d, bits, group_size, block_t, append, warps, stages)
    else:
        _launch_split(q, kc, ks, kz, vc, vs, vz, k_res, v_res, nq, nr, po, pml, lg, kn, vn, app, s_apb, s_aph, s_lg,
                      scale, tps, splits, hkv, g, gp, d, bits, group_size, block_t, qblock, quant is not None,
                      store_logits, append, path, warps, stages)
    if out is None:
        out = torch.empty(b, hq, d, dtype=q.dtype, device=dev)
    if combine:
        K._combine_kernel[(b * hkv, g)](
            po, pml, out, splits, out.stride(0), out.stride(1),
            HKV=hkv, GQ=g, GP=gp, D=d, SP=max(2, triton_next_pow2(splits)), num_warps=4,
        )  # fmt: skip
    return out, pml, splits, gp


def _launch_split(q, kc, ks, kz, vc, vs, vz, k_res, v_res, nq, nr, po, pml, lg, kn, vn, app, s_apb, s_aph, s_lg,
                  scale, tps, splits, hkv, g, gp, d, bits, group_size, block_t, qblock, has_quant, store_logits,
                  append, path, warps, stages):
    from memfit.kernels import _decode_kernels as K

    b = q.shape[0]
    K._split_kernel[(b * hkv, splits)](
        q, kc, ks, kz, vc, vs, vz, k_res, v_res, nq, nr, po, pml, lg, kn, vn, app,
        scale * _LOG2E, tps, splits,
        q.stride(0), q.stride(1),
        kc.stride(0), kc.stride(1), ks.stride(0), ks.stride(1),
        vc.stride(0), vc.stride(1), vs.stride(0), vs.stride(1),
        k_res.stride(0), k_res.stride(1), k_res.stride(2),
        v_res.stride(0), v_res.stride(1), v_res.stride(2),
        s_lg[0], s_lg[1],
        kn.stride(0), kn.stride(1), vn.stride(0), vn.stride(1), s_apb, s_aph,
        HKV=hkv, GQ=g, GP=gp, D=d, BITS=bits, GROUP=group_size, BLOCK_T=block_t, QBLOCK=qblock,
        HAS_QUANT=has_quant, STORE_LOGITS=store_logits, APPEND=append, PACKED=path,
        NSTAGES=stages if has_quant else 1, num_warps=warps if has_quant else 4,
    )  # fmt: skip


def planes_shape(gq: int, d: int, group_size: int, bits: int = 2) -> tuple[int, int, int]:
    """(GQP, TG, KDUP) of the plane-order tile: query rows padded to a power of two (and so that the value dot's
    GQP x d / group_size rows are at least 16), scale groups per tile, and copies of each key row so that the key
    dot's GQP x TG x KDUP rows are at least 16."""
    gqp = max(triton_next_pow2(gq), -(-16 // (d // group_size)))
    least = max(1, 16 * (8 // bits) // group_size)  # a tile holds whole plane blocks (16 tokens per field)
    # H200 (kivi_kernel_sweep_planes3_h200.jsonl): 2-bit fastest with the key rows filled by scale groups (4 groups
    # of 32 for 4 query heads), 4-bit with one group and its rows copied
    tg = int(os.environ.get("MEMFIT_KIVI_PLANES_TG", "0")) or (max(least, 16 // gqp) if bits == 2 else least)
    tg = max(tg, least)
    return gqp, tg, max(1, 16 // (gqp * tg))


def _launch_planes(q, kc, ks, kz, vc, vs, vz, k_res, v_res, nq, nr, po, pml, kn, vn, app, s_apb, s_aph, scale, tps,
               splits, hkv, g, gp, d, bits, group_size, block_t, append, warps, stages):
    from memfit.kernels import _kivi_planes_kernel as KP

    b = q.shape[0]
    gqp, tg, kdup = planes_shape(g, d, group_size, bits)
    KP._split_kernel_planes[(b * hkv, splits)](
        q, kc, ks, kz, vc, vs, vz, k_res, v_res, nq, nr, po, pml, kn, vn, app,
        scale * _LOG2E, tps, splits,
        q.stride(0), q.stride(1),
        kc.stride(0), kc.stride(1), ks.stride(0), ks.stride(1),
        vc.stride(0), vc.stride(1), vs.stride(0), vs.stride(1),
        k_res.stride(0), k_res.stride(1), k_res.stride(2),
        v_res.stride(0), v_res.stride(1), v_res.stride(2),
        kn.stride(0), kn.stride(1), vn.stride(0), vn.stride(1), s_apb, s_aph,
        HKV=hkv, GQ=g, GQP=gqp, GP=gp, D=d, BITS=bits, GROUP=group_size, TG=tg, BLOCK_T=16,
        KDUP=kdup, APPEND=append, USE_ASM=q.is_cuda, NSTAGES=stages, num_warps=warps,
    )  # fmt: skip


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def kivi_decode_attention(
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
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    append_at: torch.Tensor | int | None = None,
    block_t: int = 64,
    num_splits: int | None = None,
    packed: bool | str | tuple[int, ...] | None = None,
    out: torch.Tensor | None = None,
    layout: str = "canonical",
) -> torch.Tensor:
    """Attention (B, Hq, d) of q (B, Hq, d) over n_q packed tokens + n_r residual tokens per row.

    `layout="planes"`: the codes are in `memfit.core.planes` order (values (B, Hkv, Cq / (16 * CPB), d, 16))
    and the plane-order kernel reads them (2 and 4 bits; fp16 dots on the codes themselves).

    `packed`: the quantized-tile code path, a name from `VARIANTS` ("fold", "packed", "gather", ...), True / False
    (packed / gather) or None (``packed_policy``).

    Shapes as in `memfit.kernels.reference` (quantized capacity Cq = k_scales.shape[2] * group_size; n_q a multiple
    of group_size). With `k_new`, `v_new` (B, Hkv, d) and `append_at` (residual slot per row (B,) or per (row, KV
    head) (B, Hkv), int32), the new token is first written into that residual slot (n_r must already count it).
    Same result as `kivi_decode_attention_ref` up to bf16 rounding of the dequantized tiles fed to the dots.
    """
    return _launch(
        q, k_res, v_res, n_q, n_r, (k_codes, k_scales, k_zeros, v_codes, v_scales, v_zeros), scale,
        bits=bits, group_size=group_size, block_t=block_t, num_splits=num_splits, out=out,
        k_new=k_new, v_new=v_new, append_at=append_at, packed=packed, layout=layout,
    )[0]  # fmt: skip


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor | int,
    *,
    scale: float,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    append_at: torch.Tensor | int | None = None,
    block_t: int = 64,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention (B, Hq, d) of q over the first lengths[b] slots of a plain k, v buffer (B, Hkv, C, d);
    optionally writing (k_new, v_new) into slot `append_at` first (lengths must already count it)."""
    zero = _zeros(q.shape[0], q.device)
    return _launch(
        q, k, v, zero, lengths, None, scale, block_t=block_t, num_splits=num_splits, out=out,
        k_new=k_new, v_new=v_new, append_at=append_at,
    )[0]  # fmt: skip
