"""GQSA: group quantization with structured group sparsity.

Paper: "GQSA: Group Quantization and Sparsity for Accelerating Large Language Model Inference", Zeng et al.,
arXiv 2412.17560 (ACL 2025). No public code (the paper links an anonymous mirror); our reading is in the team's
spec sheet (../shared/specs/weights-offload-methods.md, A2).

Algorithm, in our words:
1. Cut every weight row into small groups of ``group_size`` consecutive input columns (the paper uses 16).
2. Score each (row, group) block by importance and prune whole blocks: per output row, the ``sparsity`` fraction
   of blocks with the lowest score go (row-wise group sparsity, not N:M). Score: Wanda-style
   sum_j (|W_ij| * ||X_j||)^2 over the block's columns, with ||X_j||^2 from the calibration Hessian's diagonal;
   plain magnitude when no calibration reached the layer.
3. Quantize the surviving blocks at ``bits`` with one scale and offset per block (the quantization group equals
   the sparsity group), by GPTQ with the pruned blocks forced to zero so their value is compensated by the
   remaining columns (SparseGPT-style).
4. Store like BSR with 1 x group_size blocks (``group_sparse`` format): per row the kept block indices (int16),
   the packed codes and per-block fp16 scale/offset; ``row_ptr`` int32. Pruned blocks cost nothing.
5. BQPO (block-wise quantization-pruning optimisation; EfficientQAT's Block-AP with the block mask fixed), run
   through `WeightMethod.refine_block`, the hook `quantize_blockwise` calls once a decoder block's linears are all
   compressed: each of the block's layers becomes a trainable fake-quant stand-in whose parameters are the weights
   (all ``out x n_g x G``, pruned blocks multiplied by the fixed mask so they stay zero and get no gradient) and the
   per-block scale and offset; the forward quantizes exactly as the stored layer decodes (scale/offset rounded to
   fp16, ``code = clamp(round((w - offset) / scale), 0, 2**bits - 1)``, ``w_hat = code * scale + offset``) with a
   straight-through estimator on both roundings (the clamp is a real clamp, so the scale and offset get the
   gradient of clipped weights, as in EfficientQAT/LSQ). Training starts from the GPTQ solution (the decoded
   weights with GPTQ's parameters, which re-encode to the same codes), minimises the MSE between the block's output
   and the *full-precision* block's output on the same inputs - the inputs being the outputs of the already
   compressed blocks 0..i-1 that the driver propagates - with AdamW (no weight decay; weights at ``bqpo_lr``, scales
   and offsets at ``bqpo_quant_lr``, cosine decay to 0) for ``bqpo_epochs`` passes over the calibration rows,
   ``bqpo_batch`` rows per step. The trained weights are then re-encoded with the trained fp16 parameters into a
   `CompressedLinear` with the same mask and the same packed bytes. If training did not lower the block's MSE on
   the whole calibration set, the GPTQ solution is kept. ``bqpo_epochs=0`` turns BQPO off (the GPTQ-only method).

Official setting: W4 S50% (4 bits, half of the groups pruned), group 16.
BQPO defaults and why: EfficientQAT's Block-AP trains each block for a couple of epochs over thousands of
2048-token samples (thousands of steps per block) at learning rates around 1e-5..1e-4; memfit calibrates on 512
tokens (2 rows of 256) by default, where 2 epochs would be 2 steps. We keep the cost a few CPU minutes instead:
``bqpo_epochs=20`` x ``bqpo_batch=1`` row per step (40 steps per block at the default calibration) with a 10x
larger learning rate, ``bqpo_lr = bqpo_quant_lr = 1e-3``, chosen on the default model by the block error on held-out
rows of the calibration book for the first blocks at gqsa:4 (it fell 20-45 %, much less at lr 1e-4; lr 3e-3
overfit; a scale/offset lr of 1e-4 or 1e-5 helped less). Measured (benchmarks/weights/table.md, SmolLM2-135M,
PG-19): gqsa:4 perplexity 2405 -> 556 at 3.55 bits/weight, quantizing in ~380 s instead of ~70 s on the shared
2-core CPU; 40 epochs reached 473 (~490 s) and 80 epochs 466 (~780 s) there, but at
gqsa:4:group_size=32:sparsity=0.37 40 epochs (536) did worse than 20 (492), so the default stays at 20. Still short
of plain RTN 3-bit groups of 64 (447 at 3.50 bits/weight) at equal bytes on this model. Not every setting gains: at
gqsa:3:group_size=64:sparsity=0.1 training raised the block error (3-bit groups of 64, little pruning: the GPTQ
start is already close), so the keep-the-start check left it unchanged.
Deviations: E2E-OQP (the paper's second stage: end-to-end training of the quantizer scales only, on the whole
model's next-token loss) is not run. BQPO's data is the calibration set memfit already uses (512 tokens by default,
``calib_tokens`` of `quantize_model`), far less than the paper's, so it can overfit; we do not early-stop beyond the
keep-the-start check. The target is the full-precision block on the compressed inputs (not the full-precision
model's own block-i input). The decode kernel ("task-centric" GEMV balancing work by non-zero blocks) is not
written; the reference dequantizes row bands.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from memfit.errors import ConfigError
from memfit.weights.base import WeightMethod, linear_weight, register_weight_method
from memfit.weights.calibrate import BlockForward, LinearStats
from memfit.weights.format import CompressedLinear
from memfit.weights.quantizer import GroupedLayer, encode


def group_keep_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """``score`` ``(out, n_g)`` -> bool mask keeping each row's top ``round((1 - sparsity) * n_g)`` blocks (>= 1)."""
    n_g = score.shape[1]
    keep_n = max(1, n_g - int(round(sparsity * n_g)))
    top = torch.topk(score, keep_n, dim=1).indices
    return torch.zeros_like(score, dtype=torch.bool).scatter_(1, top, True)


def _ste_round(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def _ste_fp16(x: torch.Tensor) -> torch.Tensor:
    """Round to fp16 in the forward pass (what `CompressedLinear` stores), identity in the backward pass."""
    return x + (x.to(torch.float16).float() - x).detach()


class _TrainableGroupSparse(nn.Module):
    """A ``group_sparse`` `CompressedLinear` as trainable fake-quant (BQPO's stand-in, used only while a block
    trains): the weights ``w`` ``(out, n_g, G)`` and the per-block ``scale``/``offset`` ``(out, n_g)`` are
    parameters; the forward quantizes exactly as the stored layer decodes (``scale``/``offset`` rounded to fp16,
    ``code = clamp(round((w - offset) / scale), 0, 2**bits - 1)``, ``w_hat = code * scale + offset``), the rounding
    by a straight-through estimator, and multiplies by the fixed block mask so pruned blocks stay zero."""

    def __init__(self, layer: CompressedLinear) -> None:
        super().__init__()
        self.bits, self.in_features = int(layer.meta["bits"]), layer.in_features
        # start from the decoded GPTQ solution: re-quantizing it with the same parameters gives the same codes, so
        # training starts exactly where GPTQ ended (padded columns too: their codes are stored)
        full, scale, offset, keep = layer.group_sparse_blocks()
        self.weight = nn.Parameter(full.clone())
        self.scale = nn.Parameter(scale)
        self.offset = nn.Parameter(offset)
        self.register_buffer("keep", keep)
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())

    def quantized(self) -> torch.Tensor:
        s = _ste_fp16(self.scale.clamp_min(1e-5))
        o = _ste_fp16(self.offset)
        q = _ste_round((self.weight - o[..., None]) / s[..., None]).clamp(0, 2**self.bits - 1)
        return (q * s[..., None] + o[..., None]) * self.keep[..., None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.quantized().reshape(self.weight.shape[0], -1)[:, : self.in_features]
        return nn.functional.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def compressed(self) -> CompressedLinear:
        """Re-encode the trained weights with the trained (fp16-rounded) parameters; same mask, same bytes."""
        s = self.scale.clamp_min(1e-5).to(torch.float16).float()
        o = self.offset.to(torch.float16).float()
        codes = encode(self.weight, s, o, self.bits)
        return CompressedLinear.from_group_sparse(codes, s, o, self.keep, self.bits, self.in_features, self.bias)


def _swap(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


def bqpo(
    block: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    forward: BlockForward,
    epochs: int,
    lr: float,
    quant_lr: float,
    batch: int,
    seed: int = 0,
) -> tuple[float, float]:
    """Block-wise quantization-pruning optimisation (GQSA's BQPO, EfficientQAT's Block-AP with a fixed block mask):
    replace the block's ``group_sparse`` layers by trainable fake-quant stand-ins, minimise the MSE between the
    block's output on ``inputs`` and ``targets`` with AdamW (weights at ``lr``, scales and offsets at ``quant_lr``,
    cosine decay to 0 over ``epochs`` passes of ``batch`` calibration rows per step), then put back
    `CompressedLinear` layers re-encoded from the trained tensors. Keeps the start (the GPTQ solution) when training
    did not lower the loss on the whole calibration set. Returns (MSE before, MSE after) on it."""
    layers = {n: m for n, m in block.named_modules() if isinstance(m, CompressedLinear) and m.fmt == "group_sparse"}
    if not layers or epochs <= 0:
        return math.nan, math.nan
    n = inputs.shape[0]
    every = torch.arange(n)
    params = {p: p.requires_grad for p in block.parameters()}
    stand = {name: _TrainableGroupSparse(m) for name, m in layers.items()}

    def loss_all() -> float:
        with torch.no_grad():
            return sum(
                float(nn.functional.mse_loss(forward(inputs[r], r).float(), targets[r].float(), reduction="sum"))
                for r in every.split(max(1, batch))
            ) / targets.numel()

    try:
        for p in params:
            p.requires_grad_(False)  # only the stand-ins train (norms and embeddings stay as they are)
        for name, m in stand.items():
            _swap(block, name, m)
        before = loss_all()
        start = {k: v.detach().clone() for k, v in _state(stand).items()}
        weights = [m.weight for m in stand.values()]
        quant = [p for m in stand.values() for p in (m.scale, m.offset)]
        opt = torch.optim.AdamW([{"params": weights, "lr": lr}, {"params": quant, "lr": quant_lr}], weight_decay=0.0)
        steps = epochs * math.ceil(n / batch)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * k / steps)))
        gen = torch.Generator().manual_seed(seed)
        with torch.enable_grad():
            for _ in range(epochs):
                for rows in torch.randperm(n, generator=gen).split(batch):
                    loss = nn.functional.mse_loss(forward(inputs[rows], rows).float(), targets[rows].float())
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
        after = loss_all()
        if not after < before:  # training did not help here: keep the GPTQ solution
            with torch.no_grad():
                for k, v in _state(stand).items():
                    v.copy_(start[k])
            after = before
        for name, m in stand.items():
            _swap(block, name, m.compressed())
        return before, after
    except BaseException:
        for name, m in layers.items():
            _swap(block, name, m)
        raise
    finally:
        for p, flag in params.items():
            p.requires_grad_(flag)


def _state(stand: dict[str, _TrainableGroupSparse]) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": p for n, m in stand.items() for k, p in (("w", m.weight), ("s", m.scale), ("o", m.offset))}


@register_weight_method
@dataclass
class GQSA(WeightMethod):
    name: ClassVar[str] = "gqsa"
    paper: ClassVar[str] = "GQSA: Group Quantization and Sparsity for Accelerating Large Language Model Inference"
    arxiv: ClassVar[str] = "2412.17560"
    family: ClassVar[str] = "weights: group sparsity + quantization"
    summary: ClassVar[str] = "Prune whole 1 x G blocks per row (Wanda-style score), quantize the rest per block (GPTQ)."
    calibrated: ClassVar[bool] = True

    bits: int = 4
    group_size: int = 16
    sparsity: float = 0.5
    percdamp: float = 0.01
    bqpo_epochs: int = 20
    bqpo_lr: float = 1e-3
    bqpo_quant_lr: float = 1e-3
    bqpo_batch: int = 1

    def validate(self) -> None:
        if not 0 <= self.sparsity < 1:
            raise ConfigError(f"gqsa.sparsity must be in [0, 1), got {self.sparsity}")
        if self.bqpo_epochs < 0:
            raise ConfigError(f"gqsa.bqpo_epochs must be >= 0 (0 = no BQPO training), got {self.bqpo_epochs}")
        for key in ("bqpo_lr", "bqpo_quant_lr"):
            value = getattr(self, key)
            if not value > 0 or not math.isfinite(value):
                raise ConfigError(f"gqsa.{key} must be a positive learning rate, got {value}")
        if self.bqpo_batch < 1:
            raise ConfigError(f"gqsa.bqpo_batch must be >= 1 calibration row per step, got {self.bqpo_batch}")

    def refine_block(
        self, block: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, forward: BlockForward
    ) -> None:
        """BQPO on one block whose linears `compress` just replaced (see `bqpo`)."""
        bqpo(block, inputs, targets, forward, self.bqpo_epochs, self.bqpo_lr, self.bqpo_quant_lr, self.bqpo_batch)

    def compress(self, linear: nn.Linear, stats: LinearStats | None) -> CompressedLinear:
        w, bias = linear_weight(linear)
        layer = GroupedLayer.of(w, self.group_size, None if stats is None else stats.h, self.percdamp)
        bits = torch.full((layer.n_groups,), self.bits, dtype=torch.uint8)
        magnitude = layer.padded.pow(2)  # plain magnitude when no calibration reached the layer
        keep = group_keep_mask(
            layer.group_sums(magnitude if layer.h is None else magnitude * torch.diag(layer.h)[None, :]),
            self.sparsity,
        )
        codes, s, o = layer.quantize(bits, keep=keep)
        return CompressedLinear.from_group_sparse(codes, s, o, keep, self.bits, w.shape[1], bias)
