"""KIVI codes in "plane" order: the layout the plane-order decode kernel reads (`memfit.kernels._kivi_planes_kernel`).

Canonical layout (`memfit.core.quant`, whose packing this module reuses): key byte row j holds tokens j * CPB + k
(k = 0..CPB-1) of each channel, at bits k * BITS; a value byte holds channels j * CPB + k of one token. Plane layout (same bytes, CPB = 8 // BITS codes
per byte), by blocks of 16 * CPB tokens:
- keys (B, H, T / CPB, D): block n's 16 byte rows n * 16 + r hold tokens n * 16 * CPB + 16 * k + r at bits
  k * BITS ("plane" k). Taking one plane of a row block is one shift and one mask per four bytes, and gives the
  (16 tokens, D channels) codes in the order the kernel's tensor-core dot reads them;
- values (B, H, T / (16 * CPB), D, 16): block n holds, for channel d, the same 16 tokens per plane in the 16 bytes
  [n, d, :], so that a plane is a (D, 16) tile whose reduction axis (tokens) is contiguous.
T must be a multiple of 16 * CPB (the stores round their capacity up). Plain PyTorch: used at freeze / unfreeze
and by the PyTorch flush, and as the tests' way back to the canonical form.
"""

from __future__ import annotations

import torch

from memfit.core.quant import _pack, unpack_codes

__all__ = ["block_tokens", "convert_rows", "keys_from_planes", "keys_to_planes", "keys_to_planes_padded",
           "or_key_tokens", "or_value_token", "supported", "token_place", "values_from_planes", "values_to_planes",
           "values_to_planes_padded"]


def block_tokens(bits: int) -> int:
    """Tokens per plane block (16 per plane, 8 // bits planes)."""
    return 16 * (8 // bits)


def keys_to_planes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Canonical key codes (B, H, T / CPB, D) -> plane order (same shape)."""
    b, h, rows, d = codes.shape
    cpb = 8 // bits
    t = rows * cpb
    if t % block_tokens(bits):
        raise ValueError(f"{t} tokens: plane blocks hold {block_tokens(bits)}")
    c = unpack_codes(codes, bits, t, dim=2)  # (B, H, T, D), token order
    c = c.reshape(b, h, t // (16 * cpb), cpb, 16, d).transpose(3, 4).reshape(b, h, t, d)  # (block, row, plane)
    return _pack(c, bits, 2)


def keys_from_planes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `keys_to_planes`."""
    b, h, rows, d = codes.shape
    cpb = 8 // bits
    t = rows * cpb
    c = unpack_codes(codes, bits, t, dim=2).reshape(b, h, t // (16 * cpb), 16, cpb, d)
    return _pack(c.transpose(3, 4).reshape(b, h, t, d), bits, 2)  # token = block * 16 * CPB + 16 * plane + row


def values_to_planes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Canonical value codes (B, H, T, D / CPB) -> plane order (B, H, T / (16 * CPB), D, 16)."""
    b, h, t, nb = codes.shape
    cpb = 8 // bits
    if t % block_tokens(bits):
        raise ValueError(f"{t} tokens: plane blocks hold {block_tokens(bits)}")
    d = nb * cpb
    c = unpack_codes(codes, bits, d, dim=3).reshape(b, h, t // (16 * cpb), cpb, 16, d)
    return _pack(c.permute(0, 1, 2, 5, 4, 3).reshape(b, h, t // (16 * cpb), d, 16 * cpb), bits, 4)  # (n, D, row, plane)


def values_from_planes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `values_to_planes`: (B, H, T / (16 * CPB), D, 16) -> (B, H, T, D / CPB)."""
    b, h, n, d, _ = codes.shape
    cpb = 8 // bits
    c = unpack_codes(codes, bits, 16 * cpb, dim=4).reshape(b, h, n, d, 16, cpb)
    return _pack(c.permute(0, 1, 2, 5, 4, 3).reshape(b, h, n * 16 * cpb, d), bits, 3)


def token_place(t: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(plane row of keys, bit shift) of token indices t; the value byte is [t // (16 * CPB), d, t % 16] at the
    same shift."""
    cpb = 8 // bits
    row = (t // (16 * cpb)) * 16 + t % 16
    return row, ((t // 16) % cpb) * bits


def supported(bits: int, group_size: int, key_block: int, head_dim: int) -> bool:
    """Shapes the plane-order store and kernel take: 2 or 4 bits, key groups and flush blocks of whole 16-token
    slices, a power-of-two head dim made of whole channel groups."""
    return (bits in (2, 4) and group_size % 16 == 0 and key_block % 16 == 0 and head_dim & (head_dim - 1) == 0
            and head_dim % group_size == 0 and (head_dim // group_size) & (head_dim // group_size - 1) == 0)


def keys_to_planes_padded(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """`keys_to_planes` of canonical key codes for any number of 16-token slices, padded with zero codes to whole
    blocks (the store's unflushed tokens are zero bits)."""
    rows = codes.shape[2]
    blk_rows = 16  # byte rows per block
    pad = -rows % blk_rows
    if pad:
        codes = torch.nn.functional.pad(codes, (0, 0, 0, pad))
    return keys_to_planes(codes, bits)


def values_to_planes_padded(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """`values_to_planes` of canonical value codes padded with zero codes to whole blocks."""
    pad = -codes.shape[2] % block_tokens(bits)
    if pad:
        codes = torch.nn.functional.pad(codes, (0, 0, 0, pad))
    return values_to_planes(codes, bits)


def or_value_token(vc: torch.Tensor, t: torch.Tensor, codes: torch.Tensor, bits: int, flush: torch.Tensor) -> None:
    """Write token t's value codes (canonical (B, H, 1, D / CPB)) into plane-order vc (B, H, NB, D, 16) where `flush`
    ((1,) bool, on the device: no host sync) holds; the token's bits must still be zero (OR-ed in)."""
    b, h, nb, d, _ = vc.shape
    cpb = 8 // bits
    c = unpack_codes(codes, bits, d, dim=3).reshape(b, h, d).to(torch.int32)
    blk = (t // (16 * cpb)).clamp(max=nb - 1)
    idx = blk * (d * 16) + torch.arange(d, device=vc.device) * 16 + t % 16  # (D,)
    flat = vc.view(b, h, nb * d * 16)
    old = flat.index_select(2, idx)
    new = old | (c << ((t // 16) % cpb) * bits).to(torch.uint8)
    flat.index_copy_(2, idx, torch.where(flush, new, old))


def or_key_tokens(kc: torch.Tensor, t0: torch.Tensor, codes: torch.Tensor, bits: int, flush: torch.Tensor) -> None:
    """Write the key codes of tokens t0 .. t0 + n - 1 (canonical (B, H, n / CPB, D); n a multiple of 16, t0 a
    multiple of n) into plane-order kc (B, H, Tq / CPB, D) where `flush` holds; their bits must still be zero."""
    b, h, rows, d = kc.shape
    cpb = 8 // bits
    n = codes.shape[2] * cpb
    c = unpack_codes(codes, bits, n, dim=2).to(torch.int32)  # (B, H, n, D), token order
    pw = min(cpb, n // 16)  # planes this write fills per byte row (all of them once n spans a block)
    nbk = n // 16 // pw
    planes = (t0 // 16 + torch.arange(pw, device=kc.device)) % cpb  # (pw,): 0..CPB-1 when n spans whole blocks
    c = c.reshape(b, h, nbk, pw, 16, d) << (planes * bits).view(1, 1, 1, pw, 1, 1)
    new_bytes = c.sum(3).reshape(b, h, nbk * 16, d).to(torch.uint8)
    idx = ((t0 // (16 * cpb) + torch.arange(nbk, device=kc.device)) * 16)[:, None] + torch.arange(16, device=kc.device)
    idx = idx.reshape(-1).clamp(max=rows - 1)
    old = kc.index_select(2, idx)
    kc.index_copy_(2, idx, torch.where(flush, old | new_bytes, old))


def convert_rows(fn, src: torch.Tensor, out: torch.Tensor, bits: int, budget: int = 256 << 20) -> None:
    """out[:, :, :n] = fn(src, bits) (n: the converted size along dim 2), a few batch rows at a time: the
    conversions unpack every code to int32 (16x the bytes of 2-bit codes), which a full batch at the memory's limit
    has no room for."""
    per_row = max(1, src[:1].numel() * (8 // bits) * 4 * 3)  # int32 codes and two temporaries per row
    step = max(1, budget // per_row)
    for i in range(0, src.shape[0], step):
        part = fn(src[i : i + step], bits)
        out[i : i + step, :, : part.shape[2]].copy_(part)
