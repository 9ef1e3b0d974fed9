"""Keyformer — "Keyformer: KV Cache Reduction through Key Tokens Selection for Efficient Generative Inference"
(Adnan et al., MLSys 2024, arXiv 2403.09054).

Algorithm (per layer, per row, per KV head): like H2O, every held token carries an accumulated score, but the score
adds Gumbel-softmax probabilities instead of attention probabilities: for each query row,
`softmax((logits + g) / tau)` over the keys it can see, with i.i.d. Gumbel(0, 1) noise g (the noise regularises the
scores of tokens that were never favoured so far, and the temperature flattens the distribution as generation goes
on). The prompt contributes the column sums over all its queries (fp32, block-wise over queries); each generated
token adds its row. The temperature grows linearly with the decode step t (t = 1 for the first generated token's
forward, 0 during the prompt, reset for every prompt): tau_t = tau_init + t (tau_end - tau_init) / max_new_tokens.
GQA: the query heads' probabilities are summed over each group (`reduce`). Whenever a row holds more than its budget
B — at the end of the prompt and after every generated token — it keeps its floor(recent_fraction * B) most recent
tokens plus the best-scoring others; evicted tokens and their scores are dropped for good.

Official defaults (d-matrix-ai/keyformer-llm, commit f327831, `models/*-keyformer-lib`, `summarization/summarize.py`,
`run_summarization_task.sh`) — verified: recent = 30 % of the budget (`recent_fraction=0.3`, floor), tau_init = 1,
tau_end = 2, tau step = (tau_end - tau_init) / max_new_tokens with max_new_tokens = 128; the prompt pass uses
tau_init and the k-th decode call tau_init + k * step. Budget `kv_cache` = 60 % of the prompt in the script (the
paper's operating point is 50 %); here the budget is memfit's `--budget`. Ours: `seed` = 0, `reduce` = sum.

Deviations and why:
- Real eviction (K/V gathered into smaller tensors). The official code only masks discarded tokens (the cache keeps
  growing) and sums scores over the batch and beams (batch 1 semantics); we keep one score per row and KV head.
- GQA reduction (sum over the group), DESIGN §3; the official models are MHA.
- Noise: instead of one global RNG stream (`F.gumbel_softmax`), each row is scored alone in its unpadded geometry
  and each block of up to 128 of its queries draws its noise from a torch.Generator (on the cache's device) seeded
  from (seed, layer, the block's first real position in the row). So a fixed seed gives identical results run after
  run, different seeds give different selections, and a row in a left-padded batch draws exactly the noise it draws
  alone. (Noise differs between CPU and CUDA generators, and a different prefill chunking changes it.)
- The temperature is held at tau_end beyond max_new_tokens (the official run stops there).

Audit (2026-11-29, `models/gptj-keyformer-lib/modeling_gptj.py` at f327831): the Gumbel softmax is taken over the
scaled, causally masked logits (`raw_attn`), summed over batch and query rows into `score_fn`, accumulated over
steps, and the mask keeps the last int(recent% of the budget) tokens plus the top-scoring others — as ours (we
floor the same way). Discarded tokens there stay in memory behind a -inf mask and their scores are zeroed; here they
are freed, which selects the same tokens. Like H2O the score is question-agnostic and grows with the number of
queries that saw a token, so needles in mid-prompt are dropped; the Gumbel noise (tau 1 at the prompt) adds
randomness on top. The near-zero needle scores at 1/4 are a property of the method on retrieval prompts (the paper
evaluates summarisation and conversation at 50-70 % of the cache), not of this port.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memfit.core import tp
from memfit.core.contract import LayerView, Selection, StepInfo
from memfit.core.method import Method, recent_valid, register
from memfit.core.scoring import attention_logits, reduce_groups
from memfit.errors import ConfigError

SCORE = "keyformer_score"
_CHUNK = 128  # query rows scored at once at prefill
_M32 = 0xFFFFFFFF
_MULT = 0x45D9F3B


def _mix(x: int) -> int:
    """32-bit integer avalanche (deterministic, platform independent)."""
    x = (((x >> 16) ^ x) * _MULT) & _M32
    x = (((x >> 16) ^ x) * _MULT) & _M32
    return (x >> 16) ^ x


def gumbel_noise(
    seed: int, layer_idx: int, position: int, shape: tuple[int, ...], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Gumbel(0, 1) noise (fp32) for the block of queries starting at real position `position` of one sequence:
    drawn from a torch.Generator on `device` seeded from (seed, layer, position) only."""
    gen = torch.Generator(device=device)
    # 32 bits: the CPU generator (MT19937) only uses the low 32 bits of its seed
    gen.manual_seed(_mix(_mix(_mix(seed & _M32) ^ (layer_idx & _M32)) ^ (position & _M32)))
    u = torch.rand(shape, generator=gen, device=device).clamp_(min=1e-10)
    return u.log_().neg_().log_().neg_()


@register
@dataclass
class Keyformer(Method):
    name = "keyformer"
    paper = "Keyformer: KV Cache Reduction through Key Tokens Selection for Efficient Generative Inference"
    arxiv = "2403.09054"
    family = "eviction"
    acts = "prefill+decode"
    # the Gumbel scoring lays every KV head's valid tokens out in one (Hkv, n) grid, so heads must hold the same
    # number of tokens: no per-head (AdaKV) allocation
    ragged_heads = False
    summary = "Accumulated Gumbel-softmax scores (rising temperature) + recent window, evicting at every step."

    recent_fraction: float = 0.3
    tau_init: float = 1.0
    tau_end: float = 2.0
    max_new_tokens: int = 128
    seed: int = 0
    reduce: str = "sum"

    def __post_init__(self) -> None:
        super().__post_init__()
        # per-sequence state, per layer: slots seen when the prompt ended (decode step counter for tau) and
        # real (non-padding) tokens seen per row (query positions for the noise)
        self._prompt_end: dict[int, int] = {}
        self._real_seen: dict[int, torch.Tensor] = {}

    # memfit methods: what each parameter means and the values it takes
    param_help = {
        "recent_fraction": ("share of the budget kept for the most recent tokens", "number in [0, 1]"),
        "tau_init": ("Gumbel-softmax temperature for the prompt and the first generated token", "number > 0"),
        "tau_end": ("temperature reached after max_new_tokens generated tokens", "number > 0"),
        "max_new_tokens": ("generated tokens over which the temperature rises from tau_init to tau_end", "integer >= 1"),
        "seed": ("seed of the Gumbel noise (fixed seed: the same selection every run)", "integer"),
        "reduce": ("how the query heads of a GQA group combine into one score per KV head", "sum | mean | max"),
    }

    def validate(self) -> None:
        if not 0.0 <= self.recent_fraction <= 1.0:
            raise ConfigError("keyformer.recent_fraction must be in [0, 1]")
        if self.tau_init <= 0 or self.tau_end <= 0:
            raise ConfigError("keyformer.tau_init and tau_end must be > 0")
        if self.max_new_tokens < 1:
            raise ConfigError("keyformer.max_new_tokens must be >= 1")
        if self.reduce not in ("sum", "mean", "max"):
            raise ConfigError("keyformer.reduce must be sum, mean or max")

    def reset(self) -> None:
        self._prompt_end = {}
        self._real_seen = {}

    def temperature(self, step: int) -> float:
        """tau at decode step `step` (0 = the prompt, 1 = the first generated token's forward)."""
        step = min(max(step, 0), self.max_new_tokens)
        return self.tau_init + step * (self.tau_end - self.tau_init) / self.max_new_tokens

    def _gumbel_sums(
        self,
        layer: LayerView,
        queries: torch.Tensor,
        scaling: float,
        taus: torch.Tensor,
        new_valid: torch.Tensor,
        positions: torch.Tensor,
        layer_idx: int,
    ) -> torch.Tensor:
        """Sum over this call's real queries of their Gumbel-softmax rows: (B, H, T) fp32.

        Each row is scored alone in its own unpadded geometry (its valid keys in order, its real queries, which are
        the last of those keys), in blocks of `_CHUNK` queries whose noise comes from a generator seeded by
        (seed, layer, the block's first real position) — so a row draws the same noise alone or in any batch.
        taus (q,), new_valid (B, q) bool, positions (B,) real position of each row's first new query."""
        keys = layer.keys
        b, h, _, d = queries.shape
        hkv, t_len = keys.shape[1], keys.shape[2]
        groups = h // hkv
        valid = layer.valid_mask()
        total = torch.zeros(b, h, t_len, dtype=torch.float32, device=keys.device)
        for r in range(b):
            rows = new_valid[r].nonzero().squeeze(-1)  # this call's real queries
            n_new = rows.numel()
            if n_new == 0:
                continue
            n = int(valid[r, 0].sum())  # every KV head holds the same number of valid tokens
            slots = valid[r].nonzero()[:, 1].view(hkv, n)  # valid slots in order, per KV head
            row_keys = keys[r].gather(1, slots[..., None].expand(hkv, n, d))[None]  # (1, Hkv, n, d)
            row_queries = queries[r, :, rows][None]  # (1, H, n_new, d)
            row_taus = taus[rows]
            head_slots = slots.repeat_interleave(groups, dim=0)  # (H, n)
            for start in range(0, n_new, _CHUNK):
                stop = min(n_new, start + _CHUNK)
                visible = n - n_new + stop  # the block's queries are the last of these keys
                logits = attention_logits(row_queries[:, :, start:stop], row_keys[:, :, :visible], scaling)[0]
                # drawn for every head of the layer, so a tensor-parallel rank takes the noise its heads get alone
                noise = tp.own_heads(gumbel_noise(
                    self.seed, layer_idx, int(positions[r]) + start, (h * tp.world()[1], stop - start, visible),
                    keys.device,
                ), h, dim=0)
                probs = torch.softmax((logits + noise) / row_taus[start:stop, None], dim=-1)
                total[r].scatter_add_(1, head_slots[:, :visible], probs.sum(dim=1))
        return total

    def after_attention(
        self, layer: LayerView, queries: torch.Tensor, scaling: float, info: StepInfo
    ) -> Selection | None:
        keep = info.keep
        if keep is None:
            return None  # unlimited: no need to even score
        dev = layer.keys.device
        b, q_len = queries.shape[0], info.q_len
        new_valid = torch.ones(b, q_len, dtype=torch.bool, device=dev) if info.new_valid is None else info.new_valid
        new_valid = new_valid.to(dev).bool()
        before = self._real_seen.get(info.layer_idx)
        if before is None or layer.seen == q_len:  # a new sequence (or a store built by hand): count what is held
            before = layer.valid_mask()[:, 0, : layer.num_slots - q_len].long().sum(-1).cpu()
        self._real_seen[info.layer_idx] = before + new_valid.long().sum(-1).cpu()
        if info.is_prefill:
            taus = torch.full((q_len,), self.tau_init, device=dev)
            self._prompt_end[info.layer_idx] = layer.seen
        else:
            end = self._prompt_end.get(info.layer_idx, layer.seen - q_len)
            steps = [layer.seen - end - q_len + 1 + i for i in range(q_len)]  # 1 = first generated token
            taus = torch.tensor([self.temperature(s) for s in steps], device=dev)
        sums = self._gumbel_sums(layer, queries, scaling, taus, new_valid, before, info.layer_idx)
        step = reduce_groups(sums, layer.keys.shape[1], self.reduce)
        score = step if SCORE not in layer.extras else layer.extras[SCORE] + step
        # Evict at the end of the prompt (after every chunk of a chunked prefill) and after every generated token.
        recent = (keep.double() * self.recent_fraction).floor().long()
        return Selection(score, recent_valid(layer.valid_mask(), recent), state={SCORE: score})

