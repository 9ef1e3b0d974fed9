"""WindowKV — "WindowKV: Task-Adaptive Group-Wise KV Cache Window Selection for Efficient LLM Inference"
(Zuo et al., 2025, arXiv 2503.17922).

Algorithm (at the end of the prompt, or after every chunk of a chunked prefill; the cache then grows normally while
decoding):
1. *Task type.* "qa" (information localisation) uses the `max` window strategy with a 32-token suffix; "other"
   (aggregation: summaries, code, few-shot) uses `average` with a 16-token suffix.
2. *Scores.* As in SnapKV, the last `suffix` prompt queries (the observation window) attend over the prompt (fp32
   softmax, causal inside the suffix); summing over those queries gives each earlier token a score per query head.
3. *Windows.* The tokens before the suffix (the "review" region) are cut into consecutive, non-overlapping windows
   of `window_size` tokens counted from the row's first token (the last window may be shorter). A window gets ONE
   score shared by all heads: `average` = mean of its token scores over the window and all query heads; `max` =
   per head the top `window_size // 2` token scores of the window, averaged over those and over the heads.
4. *Selection.* The suffix is always kept; the rest of the row's budget goes to the best windows, whole, in score
   order. One index set serves every KV head of the layer (as the official code, which scores all heads together).
   Budgets are per layer (`StepInfo.keep`, so allocation schedules apply).
5. *Index sharing.* Layers form groups of `shared_layers`; only a group's first layer scores, the others reuse its
   selection (stored on the method object for the current prompt, keyed by group).
6. *Layer budgets.* `uniform`: every layer keeps the row's budget. `decay`: the official arithmetic decay over
   groups (last group floor(C * shared_layers / beta), first 2C - last, evenly spaced between, C = the row's budget),
   rescaled so that the largest group budget is C.

Official defaults (optim996/WindowKV): review window 8, top-(8/2) scores per head for `max`, suffix 32 (max) / 16
(average), 8 shared layers, arithmetic decay with beta 14, budgets C in {512, 1024, 2048}; the task type comes
from a BERT classifier.
Ours: the same numbers; `task="qa"` by default, `strategy`/`suffix` override the task's choice, and
`layer_budgets="uniform"` by default.

Deviations:
- No classifier: its checkpoint is not released. The user names the task (`task`, an oracle label), default "qa".
- Budget includes the suffix: the official code keeps C review tokens + the suffix; we keep exactly C in all (the
  suffix, or the row's C most recent tokens when C < suffix, plus C - suffix review tokens), so held <= budget.
- Exact fill: the official code drops ceil((review - C) / window) whole windows, keeping up to window-1 fewer tokens
  than C. We take whole windows best-first until the budget is reached and trim the window that crosses it to its
  best tokens (token score summed over heads), so a row keeps exactly its budget.
- `decay` is rescaled (largest group = C, so the average is ≈ 0.7 C instead of ≈ C): a method never lets a layer
  hold more than its budget (`StepInfo.keep`), and the official first group gets ≈ 1.43 C. The mean-preserving
  official decay would be a layer schedule in `memfit.core.allocation` (like PyramidKV's). Groups are
  ceil(layers / shared_layers) (the official code assumes the layer count is a multiple); one group means uniform. Default `uniform`, which returns scores for the runtime to select
  (so `--allocation` schedules apply); `decay` applies its own group budgets on top of the layer's budget.
- GQA: the official code repeats K/V per query head before compressing (g copies stored); the selection is shared
  by all heads anyway, so we score with all query heads and store each KV head once.
- Windows are counted from each row's first real token, so a left-padded row selects what it would alone.
- Chunked prefill (not in the official code): each chunk's last `suffix` queries score, and windows are cut from
  the tokens held at that point (after earlier chunks' evictions they need not be contiguous in the prompt).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memfit.core.contract import LayerView, Selection, StepInfo, select_tokens
from memfit.core.method import Method, register
from memfit.core.scoring import attention_probs
from memfit.errors import ConfigError

TASKS = {"qa": ("max", 32), "other": ("average", 16)}


def group_budgets(keep: torch.Tensor, groups: int, shared_layers: int, beta: int, mode: str) -> torch.Tensor:
    """(groups, B) per-group budgets from per-row budgets `keep` (B,): uniform, or the official arithmetic decay
    rescaled so that the largest group keeps exactly the row's budget."""
    if mode == "uniform" or groups == 1:
        return keep[None].expand(groups, -1).clone()
    last = keep * shared_layers // beta
    first = 2 * keep - last
    step = (first - last) // (groups - 1)
    raw = torch.stack([first - i * step for i in range(groups - 1)] + [last])  # (G, B), official arithmetic
    top = raw.amax(0).clamp(min=1)
    return (keep[None] * raw.clamp(min=0) // top).clamp(min=1)


def window_priority(scores: torch.Tensor, valid: torch.Tensor, suffix: int, window: int, strategy: str) -> torch.Tensor:
    """Rank each row's tokens for WindowKV's selection: (B, T) float, higher is kept first.

    scores (B, H, T) suffix attention per query head; valid (B, T). Order: the row's last `suffix` valid tokens,
    most recent first; then the review windows, best window first, inside a window its best token first (by the
    score summed over heads). Keeping a row's top-k of this order keeps the suffix (or its k most recent tokens)
    and fills the rest with whole windows, trimming only the last one. Independent of the budget."""
    b, h, t = scores.shape
    rank = valid.long().cumsum(-1) - 1  # position of each slot among the row's real tokens
    review_len = (valid.sum(-1) - suffix).clamp(min=0)
    review = valid & (rank < review_len[:, None])
    nwin = -(-t // window)
    # lay each row's review tokens out from its first real token: window i = grid[..., i, :]
    pos = torch.where(review, rank, nwin * window)  # non-review slots go to a dump column, dropped below
    grid = scores.new_zeros(b, h, nwin * window + 1).scatter_(-1, pos[:, None].expand(b, h, t), scores)
    grid = grid[..., :-1].reshape(b, h, nwin, window)
    filled = torch.zeros(b, nwin * window + 1, dtype=torch.bool, device=scores.device).scatter_(-1, pos, review)
    filled = filled[:, :-1].reshape(b, 1, nwin, window)
    count = filled.sum(-1)  # (B, 1, nwin) tokens per window
    if strategy == "average":
        denom = count
        summed = grid.masked_fill(~filled, 0.0).sum((1, 3))
    else:  # max: per head the top window // 2 token scores of the window
        top = max(1, window // 2)
        vals = grid.masked_fill(~filled, float("-inf")).topk(top, dim=-1).values
        denom = count.clamp(max=top)
        used = torch.arange(top, device=scores.device) < denom[..., None]
        summed = vals.masked_fill(~used, 0.0).sum((1, 3))
    win_score = (summed / (denom[:, 0] * h).clamp(min=1)).masked_fill(count[:, 0] == 0, float("-inf"))  # (B, nwin)
    order = torch.sort(win_score, dim=-1, descending=True, stable=True).indices
    win_rank = torch.empty_like(order).scatter_(-1, order, torch.arange(nwin, device=order.device).expand(b, -1))
    major = torch.where(review, win_rank.gather(-1, (rank.clamp(min=0) // window).clamp(max=nwin - 1)), nwin)
    by_token = torch.sort(scores.sum(1), dim=-1, descending=True, stable=True).indices
    by_window = torch.sort(major.gather(-1, by_token), dim=-1, stable=True).indices
    ranked = by_token.gather(-1, by_window)  # slots: best window first, suffix and padding last
    levels = torch.arange(t, 0, -1, device=scores.device, dtype=torch.float32).expand(b, -1)
    priority = torch.empty(b, t, device=scores.device).scatter_(-1, ranked, levels)
    in_suffix = valid & ~review
    return torch.where(in_suffix, t + 1 + rank.float(), priority)


@register
@dataclass
class WindowKV(Method):
    name = "windowkv"
    paper = "WindowKV: Task-Adaptive Group-Wise KV Cache Window Selection for Efficient LLM Inference"
    arxiv = "2503.17922"
    family = "eviction"
    acts = "prefill"
    summary = "Suffix-attention scores pooled into 8-token windows; whole windows kept, indices shared by layer groups."

    task: str = "qa"
    strategy: str | None = None
    suffix: int | None = None
    window_size: int = 8
    shared_layers: int = 8
    layer_budgets: str = "uniform"
    beta: int = 14

    def __post_init__(self) -> None:
        super().__post_init__()
        # group -> (priority (B, T), the slots' validity it was computed for), for the current forward call
        self._shared: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    # memfit methods: what each parameter means and the values it takes
    param_help = {
        "task": ("task type: qa (max strategy, 32-token suffix) or other (average, 16)", "qa | other"),
        "strategy": ("window score, overriding the task's (none: from task)", "none | max | average"),
        "suffix": ("observation suffix: last prompt queries that score (none: from task)", "none | integer >= 1"),
        "window_size": ("tokens per window; windows are kept or dropped whole", "integer >= 1"),
        "shared_layers": ("layers per group sharing one selection", "integer >= 1"),
        "layer_budgets": ("uniform: every layer keeps the budget; decay: the official decay over layer groups",
                          "uniform | decay"),
        "beta": ("decay parameter of layer_budgets=decay", "integer >= 1"),
    }

    def validate(self) -> None:
        if self.task not in TASKS:
            raise ConfigError("windowkv.task must be 'qa' or 'other'")
        if self.strategy not in (None, "max", "average"):
            raise ConfigError("windowkv.strategy must be 'max' or 'average' (or none: from the task)")
        if self.suffix is not None and self.suffix < 1:
            raise ConfigError("windowkv.suffix must be >= 1")
        if self.window_size < 1:
            raise ConfigError("windowkv.window_size must be >= 1")
        if self.shared_layers < 1:
            raise ConfigError("windowkv.shared_layers must be >= 1")
        if self.layer_budgets not in ("uniform", "decay"):
            raise ConfigError("windowkv.layer_budgets must be 'uniform' or 'decay'")
        if self.beta < 1:
            raise ConfigError("windowkv.beta must be >= 1")

    @property
    def window_strategy(self) -> str:
        return self.strategy or TASKS[self.task][0]

    @property
    def suffix_size(self) -> int:
        if self.suffix is not None:
            return self.suffix
        return TASKS["qa" if self.window_strategy == "max" else "other"][1]

    def after_attention(
        self, layer: LayerView, queries: torch.Tensor, scaling: float, info: StepInfo
    ) -> Selection | None:
        # Acts on the prompt only: once after a one-shot prefill, or after every chunk of a chunked prefill.
        if info.layer_idx == 0:
            self._shared = {}
        keep = info.keep
        if not info.is_prefill or keep is None:
            return None
        group = info.layer_idx // self.shared_layers
        groups = -(-info.num_layers // self.shared_layers)
        budgets = group_budgets(keep, groups, self.shared_layers, self.beta, self.layer_budgets)[group]
        budgets = budgets.to(layer.keys.device)
        if bool((layer.held_per_row() <= budgets[:, None]).all()):
            return None  # every row fits
        valid = layer.valid_mask()[:, 0]
        shared = self._shared.get(group)
        if shared is None or not torch.equal(shared[1], valid):  # the group's first layer scores
            s = min(self.suffix_size, queries.shape[2])
            probs = attention_probs(queries[:, :, -s:], layer.keys, scaling, layer.valid)  # (B, H, s, T)
            if info.new_valid is not None:  # padding queries (rows shorter than the suffix) do not vote
                probs = probs * info.new_valid[:, None, -s:, None].to(probs.dtype)
            priority = window_priority(probs.sum(2), valid, self.suffix_size, self.window_size, self.window_strategy)
            shared = self._shared[group] = (priority, valid)
        priority = shared[0][:, None].expand(-1, layer.keys.shape[1], -1)
        if self.layer_budgets == "uniform":  # scores: the runtime selects (per-head allocation, when set, applies)
            return Selection(priority)
        indices, kept_valid = select_tokens(priority, budgets, layer.valid)  # its own group budgets
        return Selection(indices=indices, valid=kept_valid)

    def reset(self) -> None:
        self._shared = {}
