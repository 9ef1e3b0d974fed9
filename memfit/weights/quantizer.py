"""Group quantizers shared by every weight method: min-max (RTN) parameters, SliM-LLM's salience-weighted search,
1-bit binarisation, a GPTQ loop (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", arXiv 2210.17323) that accepts per-group bit widths and a block mask, and
`GroupedLayer`, the pad / Hessian / GPTQ-or-RTN steps the calibrated group methods share.

Conventions: a group is ``group_size`` consecutive input columns of one output row. Parameters are
``(scale, offset)`` rounded to fp16 *before* the codes are computed, so the fake-quantized weight used for error
feedback is bit-for-bit what `CompressedLinear` will decode: ``w_hat = code * scale + offset``,
``code = clamp(round((w - offset) / scale), 0, 2**bits - 1)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

ParamsFn = Callable[[torch.Tensor, int, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]


def _fp16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).float()


def minmax_params(w: torch.Tensor, bits: int, salience: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric min-max over the last dim of ``w`` (``(..., G)``) -> ``scale``, ``offset`` ``(...)`` (fp16
    values in fp32). 1 bit = binarisation around the mean: ``mu +- mean|w - mu|`` (SliM-LLM / BiLLM)."""
    if bits == 1:
        mu = w.mean(-1)
        alpha = (w - mu[..., None]).abs().mean(-1)
        return _fp16(2 * alpha), _fp16(mu - alpha)
    lo, hi = w.amin(-1), w.amax(-1)
    return _fp16((hi - lo) / (2**bits - 1)), _fp16(lo)


def encode(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (int16) of ``w`` ``(..., G)`` for per-group ``scale``/``offset`` ``(...)``."""
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round((w - offset[..., None]) / safe[..., None]).clamp_(0, 2**bits - 1)
    return torch.where(scale[..., None] > 0, q, torch.zeros_like(q)).to(torch.int16)


def decode(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale[..., None] + offset[..., None]


def fake_quant(w: torch.Tensor, bits: int, params: ParamsFn = minmax_params, salience: torch.Tensor | None = None) -> torch.Tensor:
    s, o = params(w, bits, salience)
    return decode(encode(w, s, o, bits), s, o)


def sqc_params(
    w: torch.Tensor,
    bits: int,
    salience: torch.Tensor | None,
    lam: float = 1.0,
    norm: float = 2.4,
    grid: int = 21,
    span: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SliM-LLM's Salience-Weighted Quantizer Calibration: scale the min-max range by a factor ``p`` from a grid
    around 1 (``1 +- span``) and keep, per group, the ``p`` minimising ``sum |w_hat - w|^norm`` with salient
    elements (salience above the first |z| > 2 outlier of the group's salience map) weighted by ``lam``."""
    if bits == 1:
        return minmax_params(w, bits)
    lo, hi = w.amin(-1), w.amax(-1)
    weight = torch.ones_like(w)
    if salience is not None and lam != 1.0:
        z = (salience - salience.mean(-1, keepdim=True)) / salience.std(-1, keepdim=True).clamp_min(1e-12)
        weight = torch.where(z.abs() > 2, torch.full_like(w, lam), weight)
    factors = torch.cat([torch.ones(1), torch.linspace(1 - span, 1 + span, grid)]).tolist()
    best_err = torch.full(lo.shape, float("inf"), device=w.device)
    best_s, best_o = torch.zeros_like(lo), torch.zeros_like(lo)
    for p in factors:
        s, o = _fp16((hi - lo) * p / (2**bits - 1)), _fp16(lo * p)
        err = ((decode(encode(w, s, o, bits), s, o) - w).abs().pow(norm) * weight).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s, best_o = torch.where(better, s, best_s), torch.where(better, o, best_o)
    return best_s, best_o


def pad_columns(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Pad ``(out, in)`` to a multiple of ``group_size`` columns by repeating each row's last real value, so the
    padding never widens a group's min-max range (the padded codes are stored, decoded, then sliced off)."""
    extra = (-w.shape[1]) % group_size
    if not extra:
        return w
    return torch.cat([w, w[:, -1:].expand(-1, extra)], dim=1)


def rtn_quantize(
    w: torch.Tensor, group_bits: torch.Tensor, group_size: int, params: ParamsFn = minmax_params
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest every group of ``w`` ``(out, in)`` at its width -> codes ``(out, n_g, G)``, scales,
    offsets ``(out, n_g)``."""
    wp = pad_columns(w.float(), group_size)
    out, n_g = wp.shape[0], wp.shape[1] // group_size
    g = wp.view(out, n_g, group_size)
    codes = torch.empty(out, n_g, group_size, dtype=torch.int16, device=w.device)
    scales = torch.empty(out, n_g, device=w.device)
    offsets = torch.empty(out, n_g, device=w.device)
    for b in sorted(set(group_bits.tolist())):
        idx = (group_bits == b).nonzero().flatten()
        s, o = params(g[:, idx], b, None)
        codes[:, idx], scales[:, idx], offsets[:, idx] = encode(g[:, idx], s, o, b), s, o
    return codes, scales, offsets


def inverse_hessian_factor(h: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp I)^-1`` (GPTQ). Dead columns (zero diagonal) get a unit diagonal."""
    h = h.clone().double()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    damp = percdamp * torch.mean(torch.diag(h))
    h += damp * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for extra in (0.0, 0.1, 1.0):  # escalate damping if H is numerically not positive definite
        try:
            hh = h + extra * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
            hinv = torch.cholesky_inverse(torch.linalg.cholesky(hh))
            return torch.linalg.cholesky(hinv, upper=True).float()
        except torch.linalg.LinAlgError:
            continue
    raise torch.linalg.LinAlgError("Hessian is not positive definite even with heavy damping")


def pad_hessian(h: torch.Tensor, n: int) -> torch.Tensor:
    """Pad ``H`` to ``n`` columns with zero rows/columns (GPTQ treats them as dead)."""
    extra = n - h.shape[0]
    return torch.nn.functional.pad(h, (0, extra, 0, extra)) if extra else h


def gptq_quantize(
    w: torch.Tensor,
    u: torch.Tensor,
    group_bits: torch.Tensor,
    group_size: int,
    params: ParamsFn = minmax_params,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ over column groups: ``w`` ``(out, in)`` (padded here to whole groups), ``u`` the upper Cholesky
    factor of the padded inverse Hessian. Each group's parameters come from its columns *after* the error feedback
    of the earlier groups (GPTQ's non-static groups), at that group's width; ``params`` receives the OBS salience
    ``w^2 / u_jj^2``. ``keep`` ``(out, n_g)`` bool: pruned blocks decode to 0 and their whole value is fed back
    as error (SparseGPT-style compensation for GQSA). Returns codes ``(out, n_g, G)``, scales, offsets."""
    wq = pad_columns(w.float(), group_size).clone()
    out, n = wq.shape
    n_g = n // group_size
    if keep is None:
        keep = torch.ones(out, n_g, dtype=torch.bool, device=w.device)
    codes = torch.empty(out, n_g, group_size, dtype=torch.int16, device=w.device)
    scales = torch.empty(out, n_g, device=w.device)
    offsets = torch.empty(out, n_g, device=w.device)
    diag = torch.diag(u)
    for g in range(n_g):
        i1, i2 = g * group_size, (g + 1) * group_size
        bits = int(group_bits[g])
        block = wq[:, i1:i2].clone()
        sal = block.pow(2) / diag[i1:i2].pow(2)
        s, o = params(block, bits, sal)
        scales[:, g], offsets[:, g] = s, o
        kept = keep[:, g].float()
        err = torch.zeros_like(block)
        u1 = u[i1:i2, i1:i2]
        for i in range(group_size):
            col = block[:, i]
            c = encode(col[:, None], s, o, bits)[:, 0]
            codes[:, g, i] = c
            q = (c.float() * s + o) * kept
            e = (col - q) / u1[i, i]
            block[:, i:] -= e[:, None] * u1[i, i:][None, :]
            err[:, i] = e
        wq[:, i2:] -= err @ u[i1:i2, i2:]
    return codes, scales, offsets


@dataclass
class GroupedLayer:
    """One linear layer's weight cut into column groups, plus the GPTQ factor when calibration reached it.

    The step every calibrated group method (SliM-LLM, GQSA) shares: pad the columns to whole groups, pad and damp
    the Hessian, then quantize by GPTQ with that factor - or by round-to-nearest when the layer got no statistics
    (a linear outside the decoder blocks). The methods only decide each group's width and which blocks survive."""

    w: torch.Tensor  # (out, in) fp32, as the layer holds it
    padded: torch.Tensor  # (out, n_groups * group_size): `pad_columns(w)`
    group_size: int
    h: torch.Tensor | None  # Hessian padded to whole groups; None without calibration
    u: torch.Tensor | None  # upper Cholesky factor of its damped inverse (`inverse_hessian_factor`)

    @classmethod
    def of(cls, w: torch.Tensor, group_size: int, h: torch.Tensor | None, percdamp: float = 0.01) -> GroupedLayer:
        padded = pad_columns(w, group_size)
        if h is None:
            return cls(w, padded, group_size, None, None)
        h = pad_hessian(h, padded.shape[1])
        return cls(w, padded, group_size, h, inverse_hessian_factor(h, percdamp))

    @property
    def n_groups(self) -> int:
        return self.padded.shape[1] // self.group_size

    def group_sums(self, per_weight: torch.Tensor) -> torch.Tensor:
        """``(out, n_groups * G)`` per-weight values -> their sums per (row, group) ``(out, n_groups)``."""
        return per_weight.view(per_weight.shape[0], self.n_groups, self.group_size).sum(-1)

    def quantize(
        self, group_bits: torch.Tensor, params: ParamsFn = minmax_params, keep: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """GPTQ (`gptq_quantize`) with the calibration factor, else round-to-nearest (`rtn_quantize`, where
        ``keep`` plays no part: the storage drops pruned blocks). Returns codes ``(out, n_g, G)``, scales,
        offsets."""
        if self.u is None:
            return rtn_quantize(self.w, group_bits, self.group_size, params=params)
        return gptq_quantize(self.w, self.u, group_bits, self.group_size, params=params, keep=keep)
