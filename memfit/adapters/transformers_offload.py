"""What the weight streamer needs to know about transformers models (kept apart from the KV-cache adapter).

- `decoder_layers(model)`: the repeated blocks, in execution order (``model.model.layers`` for every decoder-only
  architecture transformers 5.x ships: Llama, Qwen2, Mistral, Mixtral, Qwen2-MoE, ...).
- `layer_parts(layer)`: a block's attention and MLP submodules (TPI-LLM streams these as separate units).
- `moe_blocks(model)`: for sparse-MoE models, per layer the block, its router and its fused experts module
  (transformers 5 stores the experts of a layer as 3D tensors ``gate_up_proj`` (E, 2I, h) and ``down_proj``
  (E, h, I)).
- `run_experts(...)`: the experts' eager forward (the loop of ``MixtralExperts.forward``) with each expert's
  weights fetched through a callback, so a streamer can hand in only the experts that are on the device. The
  arithmetic is the same ops in the same order as transformers' eager loop, so logits are bit-identical.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from memfit.errors import ConfigError

__all__ = ["MoEBlock", "decoder_layers", "layer_parts", "moe_blocks", "run_experts", "set_experts_eager"]


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder blocks of a causal LM, in order."""
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None) if base is not None else None
    if layers is None:
        layers = getattr(getattr(base, "decoder", None), "layers", None)
    if layers is None:
        raise ConfigError(
            f"weight offload does not know where the decoder layers of {type(model).__name__} are "
            "(expected model.model.layers); run without --weights-memory"
        )
    return list(layers)


def layer_parts(layer: torch.nn.Module) -> list[torch.nn.Module]:
    """A block's attention and MLP (or sparse-MoE) submodules, in execution order."""
    parts = [getattr(layer, n) for n in ("self_attn", "mlp") if isinstance(getattr(layer, n, None), torch.nn.Module)]
    if len(parts) != 2:
        raise ConfigError(f"{type(layer).__name__} has no self_attn/mlp pair: use --offload-policy superpipeline")
    return parts


@dataclass
class MoEBlock:
    layer: int
    block: torch.nn.Module  # the sparse-MoE block (its forward gets the normed hidden state)
    router: torch.nn.Module  # returns (logits, scores, indices)
    experts: torch.nn.Module  # fused experts: gate_up_proj (E, 2I, h), down_proj (E, h, I)


def _is_fused_experts(m: torch.nn.Module) -> bool:
    gu, dn = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
    return (
        isinstance(gu, torch.Tensor) and isinstance(dn, torch.Tensor) and gu.dim() == 3 and dn.dim() == 3
        and getattr(m, "has_gate", True) and not getattr(m, "has_bias", False)
        and not getattr(m, "is_transposed", False) and getattr(m, "is_concatenated", True)
        and not getattr(m, "has_post_expert_norm", False)
    )


def moe_blocks(model: torch.nn.Module) -> list[MoEBlock]:
    """Every sparse-MoE block with fused experts, by layer ([] for dense models)."""
    found = []
    for i, layer in enumerate(decoder_layers(model)):
        block = getattr(layer, "mlp", None) or getattr(layer, "block_sparse_moe", None)
        experts, router = getattr(block, "experts", None), getattr(block, "gate", None)
        if isinstance(experts, torch.nn.Module) and isinstance(router, torch.nn.Module) and _is_fused_experts(experts):
            found.append(MoEBlock(i, block, router, experts))
    return found


def set_experts_eager(model: torch.nn.Module) -> None:
    """Use transformers' eager experts loop (the one `run_experts` mirrors) for the resident parts too."""
    cfg = model.config
    for c in (cfg, getattr(cfg, "text_config", None)):
        if c is not None and hasattr(c, "_experts_implementation"):
            c._experts_implementation = "eager"


def run_experts(
    experts: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    weights_of: Callable[[int, list[int]], tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """transformers' eager experts loop; `weights_of(e, hit)` returns expert e's (gate_up (2I, h), down (h, I)) on
    the compute device (`hit` = every expert this call uses, ascending, so a streamer may fetch ahead)."""
    num_experts = int(experts.num_experts)
    out = torch.zeros_like(hidden_states)
    with torch.no_grad():
        mask = F.one_hot(top_k_index, num_classes=num_experts + 1).permute(2, 1, 0)
        hit = [int(e) for e in torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()[:, 0].tolist() if e != num_experts]
    for e in hit:
        top_k_pos, token_idx = torch.where(mask[e])
        gate_up, down = weights_of(e, hit)
        state = hidden_states[token_idx]
        gate, up = F.linear(state, gate_up).chunk(2, dim=-1)
        h = experts.act_fn(gate) * up
        h = F.linear(h, down)
        h = h * top_k_weights[token_idx, top_k_pos, None]
        out.index_add_(0, token_idx, h.to(out.dtype))
    return out
