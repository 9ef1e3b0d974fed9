"""KVzip — "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction" (Kim et al., 2025, arXiv
2505.23416).

Idea: a KV pair matters if the model needs it to *reproduce the context*, whatever question comes later. So after
the context is prefilled, the model is fed a reconstruction prompt — "Repeat the previous context exactly." then the
assistant turn's opening and the context itself — on top of the cached context, and each cached pair's importance is
the largest attention any reconstruction query pays it.

Algorithm (once, after prefill; per row):
1. The context's slots after the sink (below) are cut into chunks of `chunk` tokens. For chunk i the model runs a
   forward over  instruction_i + assistant header + the chunk's own token ids,  attending over the whole cached
   context (its hidden states are the model's real ones); instruction_0 is "\\n\\nRepeat the previous context
   exactly.", later chunks say "Repeat the part of the previous context exactly, starting with" followed by the
   last `overlap` tokens of the previous chunk. These forwards never enter the cache.
2. In every layer, the reconstruction queries' attention is recomputed (fp32 softmax, from the cached post-RoPE keys)
   over a reduced key set: the sink, the chunk's cached keys and the reconstruction's own keys (causal). A cached
   pair's score is the max of that attention over the queries and over the query heads of its GQA group.
3. Budgets (`budgets=global`, default): every acting layer's pairs of a row are ranked together (the sink first)
   and the row keeps its best `budget x layers x KV heads` pairs, the official "pair" level's single threshold —
   layers whose reconstruction attention is concentrated keep few pairs, diffuse ones many. Each layer's share is
   its budget (`Selection.keep`, same total); within the layer the runtime keeps each KV head's best pairs, head-
   uniform on the dense store, or shared out over the heads by score with `--allocation adakv` (ragged store: the
   official level's ragged heads, with AdaKV's 20 % floor per head). `budgets=layer`: each layer keeps its own
   budget (the official "pair-uniform" level). The pairs are physically gathered; during decoding nothing more is
   evicted (the cache grows by one token per step).
The sink is what precedes the document (the chat template's system prompt and user-turn opening), found by matching
the template's prefix at the start of the prompt, as the official code keeps the system prompt; without a match,
the first `sinks` tokens.

Official defaults (snu-mllab/KVzip): chunk 2000 tokens, overlap 8 tokens, scores max over (group, queries), softmax
in the model dtype; pruning level "pair" (one threshold over every layer and head, so heads and layers get ragged
budgets); compression ratio 0.3.
Deviations:
- Budget shape: the official threshold is exact per (layer, head); we turn it into one budget per layer (largest
  remainders), so on the dense store every head of a layer keeps as many pairs, and with `--allocation adakv` the
  heads split the layer's budget by score with a 20 % floor. Measured on the default model, question outside
  (benchmarks/claims.md, issue #12, `benchmarks/contexts_vs_kvpress.py`): per-layer budgets lost the needle's digits
  at 1/2 already; the global ranking on the ragged store keeps most of the pairs kvpress's KVzipPress keeps and
  answers at least as often as it at 1/2-1/8 (the full cache's score at 1/2 only); head-uniform layer shares on the
  dense store answer far less often, so use `--allocation adakv` with kvzip.
- Scores are computed in fp32 (DESIGN: scores without eager attention), block-wise over the reconstruction queries,
  as exp(max over queries of (logit - logsumexp)): the same values as the max of the softmax, without writing it.
  On CPU the reconstruction's attention is three flash-attention calls (scored context slots, other chunks' slots,
  its own keys) merged by their logsumexps: the output is the dense one, and the scored part's logsumexp is each
  query's normaliser, so a score costs one matmul over the chunk's keys instead of a second softmax over every key
  (same kept pairs as the two-pass form, tested; elsewhere the two-pass form runs).
- The reconstruction prompt needs the tokenizer: `memfit compress`, `memfit run` and `memfit.compress` give it
  (`bind_tokenizer`). Without one (an engine call made without a tokenizer) the reconstruction is the chunk's tokens
  alone.
- `--prefill-chunk N` (bounded memory): the cache never holds more than budget + N tokens, so there is no second
  pass: after each chunk the pairs are scored by the max attention that chunk's own queries paid them (below).
- Without the engine (a bare forward with a memfit cache, as in the core test matrix) there is no second pass: at the
  end of prefill each pair's score is the max attention the prompt's own (causal) queries paid it — the context
  "reconstructing" itself in one pass. `memfit run` / `compress` / `generate` always use the real two-pass method.
Cost: the reconstruction forwards read about as many tokens as the context and attend over twice as many keys, and
the fp32 scores add one matmul over the context's keys, so compression takes 2-3x a plain prefill (measured on a
loaded 2-core CPU at 2K tokens: about 3x, against about 4.4x for the two-pass form; benchmarks/claims.md); the cache
holds the whole context until the scores are in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from memfit.core import tp
from memfit.core.cache import CompressedCache, KVLayer
from memfit.core.contract import Decision, LayerView, Selection, StepInfo
from memfit.core.method import Method, register
from memfit.errors import ConfigError

FIRST_INSTRUCTION = "\n\nRepeat the previous context exactly."
NEXT_INSTRUCTION = "\n\nRepeat the part of the previous context exactly, starting with "
_MARK = "\x00kvzip\x00"
# torch's CPU flash-attention kernel, which also returns each query's logsumexp (the public SDPA does not). Looked up,
# not assumed: without it (another torch, another device) the reconstruction attends and scores in two passes.
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def max_attention(
    queries: torch.Tensor, keys: torch.Tensor, scaling: float, key_valid: torch.Tensor | None, block: int = 256
) -> torch.Tensor:
    """(B, Hkv, T) fp32: for every key, the max causal attention any of the q queries (the last q of the T keys)
    pays it, over the queries and over each KV head's query group.

    Computed without materialising the attention probabilities: max_q softmax(l)_k = exp(max_q (l_qk - lse_q)),
    so each block of queries needs its logits, one logsumexp per query and a max over the block; the causal mask
    only touches the block's own keys (every query sees all earlier keys). fp32, block-wise over queries; each KV
    head's group of queries is scored against its keys at once (keys are never repeated over the group)."""
    b, h, q_len, d = queries.shape
    hkv, t_len = keys.shape[1], keys.shape[2]
    g = h // hkv
    n_ctx = t_len - q_len  # keys before the queries: visible to every query
    k32 = keys.float().transpose(-1, -2)  # (B, Hkv, d, T)
    bias = None
    if key_valid is not None:  # padding keys: -inf logits
        bias = torch.zeros(b, hkv, 1, t_len, device=keys.device).masked_fill_(~key_valid[:, :, None, :], float("-inf"))
    best = torch.full((b, hkv, t_len), float("-inf"), device=keys.device)
    causal = torch.ones(q_len, q_len, dtype=torch.bool, device=keys.device).tril_()
    for start in range(0, q_len, block):
        stop = min(q_len, start + block)
        n, vis = stop - start, n_ctx + stop  # keys at or after `vis` are in every query's future
        q32 = (queries[:, :, start:stop].float() * scaling).reshape(b, hkv, g * n, d)
        logits = torch.matmul(q32, k32[..., :vis])  # (B, Hkv, g*n, vis)
        if bias is not None:
            logits += bias[..., :vis]
        logits.view(b, hkv, g, n, vis)[..., n_ctx:].masked_fill_(~causal[start:stop, :stop], float("-inf"))
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        # a padding query sees no valid key (lse -inf): it pays no attention (+inf makes every l - lse -inf)
        lse.masked_fill_(lse == float("-inf"), float("inf"))
        best[..., :vis] = torch.maximum(best[..., :vis], logits.sub_(lse).amax(dim=2))
    return best.exp_()


def max_attention_given_lse(
    queries: torch.Tensor, keys: torch.Tensor, scaling: float, lse: torch.Tensor, block: int = 256
) -> torch.Tensor:
    """(B, Hkv, K) fp32: `max_attention` for K keys that every query sees, when each query's logsumexp over the keys
    it is normalised by, `lse` (B, H, q), is already known (the attention kernel computed it): one matmul and one max
    per block, no second softmax."""
    b, h, q_len, d = queries.shape
    hkv = keys.shape[1]
    g = h // hkv
    k32 = keys.float().transpose(-1, -2)
    best = torch.full((b, hkv, keys.shape[2]), float("-inf"), device=keys.device)
    for start in range(0, q_len, block):
        stop = min(q_len, start + block)
        q32 = (queries[:, :, start:stop].float() * scaling).reshape(b, hkv, g * (stop - start), d)
        logits = torch.matmul(q32, k32).sub_(lse[:, :, start:stop].float().reshape(b, hkv, -1, 1))
        best = torch.maximum(best, logits.amax(dim=2))
    return best.exp_()


def global_budgets(scores: list[torch.Tensor], totals: torch.Tensor, heads: int) -> torch.Tensor:
    """(L, B) tokens per KV head for each of L layers, from ONE ranking of every (layer, KV head, token) pair of a
    row: the official "pair" level keeps the pairs above a threshold shared by every layer and head, so layers whose
    attention is concentrated keep few pairs and diffuse ones many. `scores`: L tensors (B, Hkv, T) (protected
    pairs +inf, padding -inf); `totals` (B,) pairs a row may keep over all L layers. A layer's pairs above the
    threshold are turned into a per-head count (the store is rectangular per layer; with --allocation adakv the
    layer's heads then share it by score, which is the official ragged split) by largest remainders, so the counts
    add up to the row's total exactly."""
    n_layers = len(scores)
    out = torch.zeros(n_layers, totals.shape[0], dtype=torch.long, device=totals.device)
    for row in range(totals.shape[0]):
        flat = torch.cat([s[row].reshape(-1) for s in scores])
        real = int((flat > float("-inf")).sum())
        total = min(int(totals[row]), real)
        if total <= 0:
            continue
        chosen = torch.topk(flat, total, sorted=False).indices
        sizes = torch.tensor([s[row].numel() for s in scores], device=flat.device)
        layer_of = torch.bucketize(chosen, sizes.cumsum(0), right=True)
        per_layer = torch.bincount(layer_of, minlength=n_layers)
        base = per_layer // heads
        left = total // heads - int(base.sum())  # whole tokens per head still to hand out
        if left > 0:
            order = torch.argsort(per_layer - base * heads, descending=True, stable=True)
            base[order[:left]] += 1
        out[:, row] = base
    return out


class _ReadThrough(KVLayer):
    """A scratch layer for one reconstruction forward: reads row `row` of the real layer when the forward reaches
    it (so only one layer's copy exists at a time) and is emptied right after scoring."""

    def __init__(self, index: int, base: LayerView, row: int, scored: torch.Tensor | None = None) -> None:
        super().__init__(index)
        self.base, self.row = base, row
        self.window = getattr(base, "window", None)  # a sliding-window layer attends (and trims) as the real one
        self.scored = scored  # the context slots the scores are normalised over (sink + chunk), ascending
        self.scored_lse: torch.Tensor | None = None  # (1, H, q) logsumexp over scored + own keys (fast path)

    def append(self, keys: torch.Tensor, values: torch.Tensor, new_valid: torch.Tensor | None) -> None:
        base_k, base_v, valid = self.base.keys, self.base.values, self.base.valid
        assert base_k is not None and base_v is not None
        r = self.row
        self.keys, self.values = base_k[r : r + 1], base_v[r : r + 1]
        self.valid = None if valid is None else valid[r : r + 1]
        self.seen = self.base.seen
        super().append(keys, values, new_valid)

    def attend(self, queries: torch.Tensor, scaling: float, window: int | None = None) -> torch.Tensor:
        out = self._split_attention(queries, scaling) if window is None else None
        return super().attend(queries, scaling, window) if out is None else out

    def _split_attention(self, queries: torch.Tensor, scaling: float) -> torch.Tensor | None:
        """The same attention output as `attend`, from three flash-attention calls whose logsumexps are kept: over
        the scored context slots, over the other context slots, and over the reconstruction's own keys (causal).
        Their outputs merge exactly by softmax weights; the scored + own logsumexp is what the scores need, so
        scoring needs no second softmax over every key (the cost that made compression ~4x a prefill at 2K).
        None (the caller attends as usual) off CPU, without the kernel, or with slots masked per head."""
        keys, values, valid, scored = self.keys, self.values, self.valid, self.scored
        if _FLASH_CPU is None or scored is None or queries.device.type != "cpu" or queries.shape[0] != 1:
            return None
        assert keys is not None and values is not None
        t_len, q_len = keys.shape[2], queries.shape[2]
        n_ctx = t_len - q_len
        ctx_ok = torch.ones(n_ctx, dtype=torch.bool, device=keys.device)
        if valid is not None:
            if not bool(valid[0, :, n_ctx:].all()) or not bool((valid[0] == valid[0, :1]).all()):
                return None
            ctx_ok = valid[0, 0, :n_ctx]
        if not bool(ctx_ok[scored].all()):
            return None
        other = ctx_ok.clone()
        other[scored] = False
        other = other.nonzero().flatten()

        def part(idx: torch.Tensor | slice, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
            out, lse = _FLASH_CPU(queries, keys[:, :, idx], values[:, :, idx], 0.0, causal, scale=scaling)
            return out, lse

        parts = [part(scored, False), part(slice(n_ctx, t_len), True)]
        self.scored_lse = torch.logaddexp(parts[0][1], parts[1][1])
        lse = self.scored_lse
        if other.numel():
            parts.append(part(other, False))
            lse = torch.logaddexp(lse, parts[2][1])
        out = sum(o.float() * (part_lse - lse).exp_()[..., None] for o, part_lse in parts)
        return out.to(queries.dtype)  # type: ignore[union-attr]

    def finalize_step(self, info: StepInfo) -> None:
        self.keys = self.values = self.valid = None  # this forward never decodes: free the copy at once
        self.scored_lse = None


class _Reconstruction(Method):
    """Not registered: the policy of the scratch cache — scores one chunk in every layer, then frees the layer."""

    def __init__(self, scores: list[torch.Tensor], row: int, sink: torch.Tensor, chunk: torch.Tensor) -> None:
        super().__init__()
        self.scores, self.row, self.sink, self.chunk = scores, row, sink, chunk
        self.scratch: list[_ReadThrough] = []  # the scratch layers (their split attention's logsumexp)

    def after_attention(self, layer: LayerView, queries: torch.Tensor, scaling: float, info: StepInfo) -> None:
        assert layer.keys is not None
        lse = self.scratch[info.layer_idx].scored_lse if self.scratch else None
        if lse is not None:  # the attention kernel gave each query's normaliser: score the chunk's keys only
            best = max_attention_given_lse(queries, layer.keys[:, :, self.chunk], scaling, lse)
            self.scores[info.layer_idx][self.row, :, self.chunk] = best[0]
            return
        t_len, q_len = layer.keys.shape[2], queries.shape[2]
        own = torch.arange(t_len - q_len, t_len, device=layer.keys.device)
        sel = torch.cat([self.sink, self.chunk, own])
        valid = None if layer.valid is None else layer.valid[:, :, sel]
        best = max_attention(queries, layer.keys[:, :, sel], scaling, valid)  # (1, Hkv, len(sel))
        n_sink = self.sink.numel()
        self.scores[info.layer_idx][self.row, :, self.chunk] = best[0, :, n_sink : n_sink + self.chunk.numel()]


@register
@dataclass
class KVzip(Method):
    name = "kvzip"
    paper = "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction"
    arxiv = "2505.23416"
    family = "eviction"
    acts = "prefill"
    summary = "Question-agnostic: keeps the pairs the model attends to most while repeating the context."
    # memfit methods: what each parameter means and the values it takes
    param_help = {
        "chunk": ("context tokens reconstructed per scoring forward", "integer >= 1"),
        "overlap": ("tokens of the previous chunk quoted in the next chunk's instruction", "integer >= 0"),
        "sinks": ("first tokens always kept when the chat template's prefix is not found", "integer >= 0"),
        "budgets": ("global: one ranking of every layer's pairs sets each layer's share (official); layer: each "
                    "layer keeps its own budget", "global | layer"),
    }

    chunk: int = 2000
    overlap: int = 8
    sinks: int = 4
    budgets: str = "global"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._prompts: dict[str, list[int]] | None = None  # token ids of the instructions (bind_tokenizer)
        self._engine = False  # the engine will call after_prefill (set by select_prompt)
        self._chunked = False  # the prompt came in chunks (--prefill-chunk): one-pass scores after each chunk

    def validate(self) -> None:
        if self.chunk < 1:
            raise ConfigError("kvzip.chunk must be >= 1 token")
        if self.overlap < 0:
            raise ConfigError("kvzip.overlap must be >= 0")
        if self.sinks < 0:
            raise ConfigError("kvzip.sinks must be >= 0")
        if self.budgets not in ("global", "layer"):
            raise ConfigError(f"kvzip.budgets must be global or layer, got {self.budgets!r}")

    def bind_tokenizer(self, tokenizer: Any) -> None:
        """Word the reconstruction prompt with the model's tokenizer (and its chat template, if any)."""
        def enc(text: str) -> list[int]:
            return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

        before = after = ""
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": "user", "content": _MARK}], add_generation_prompt=True,
                                                 tokenize=False)
            if isinstance(text, str) and text.count(_MARK) == 1:
                before, after = text.split(_MARK)
                # the reconstruction request closes the user turn that holds the document, then the assistant
                # starts repeating; `after` is that closing + the assistant header
        self._prompts = {"first": enc(FIRST_INSTRUCTION), "next": enc(NEXT_INSTRUCTION), "postfix": enc(after),
                         "prefix": enc(before)}

    # -- engine path: two passes -----------------------------------------------------------------------------------
    def select_prompt(
        self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_layers: int
    ) -> None:
        self._engine = True  # the engine calls after_prefill: defer eviction to the reconstruction scores
        return None

    def after_prefill(
        self,
        model: torch.nn.Module,
        layers: Sequence[LayerView],
        keep_rows: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> Decision:
        chunked, self._engine, self._chunked = self._chunked, False, False
        keep = keep_rows
        if chunked:
            return None  # evicted chunk by chunk already (bounded memory)
        lens = attention_mask.sum(-1).cpu().long()
        if keep is None or bool((keep >= lens).all()):
            return None  # everything fits: the full cache (exact)
        from memfit.adapters.transformers import MemfitCache, forward

        slots = input_ids.shape[1]  # a global layer holds every prompt slot until we evict
        device = input_ids.device
        scores = [torch.full((input_ids.shape[0], layer.held_per_row().shape[1], slots), float("-inf"),
                             device=device) for layer in layers]
        protect = torch.zeros(input_ids.shape[0], slots, dtype=torch.bool, device=device)
        prompts = self._prompts or {"first": [], "next": [], "postfix": [], "prefix": []}
        for row in range(input_ids.shape[0]):
            real = attention_mask[row].bool().nonzero().flatten()  # this row's slots (left padding first)
            if real.numel() == 0:
                continue
            ids = input_ids[row, real]
            n_sink = self._sink_len(ids.tolist(), prompts["prefix"])
            sink = real[:n_sink]
            protect[row, sink] = True
            rest = real[n_sink:]
            previous: list[int] = []
            for start in range(0, rest.numel(), self.chunk):
                chunk = rest[start : start + self.chunk]
                chunk_ids = input_ids[row, chunk].tolist()
                instruction = prompts["first"] if start == 0 else prompts["next"] + previous[-self.overlap :]
                text = instruction + prompts["postfix"] + chunk_ids
                previous = chunk_ids
                reconstruction = _Reconstruction(scores, row, sink, chunk)
                scratch = CompressedCache(len(layers), reconstruction)
                scored = torch.cat([sink, chunk])
                scratch.layers = [_ReadThrough(i, layer, row, scored) for i, layer in enumerate(layers)]
                reconstruction.scratch = scratch.layers
                scratch.prefill_done = True  # a continuation of the cached context, not a prompt
                step = torch.tensor([text], dtype=torch.long, device=device)
                positions = torch.arange(real.numel(), real.numel() + len(text), device=device)[None]
                mask = torch.ones(1, slots + len(text), dtype=torch.long, device=device)
                forward(model, step, mask, MemfitCache(scratch), positions, logits_to_keep=1)
        # a sliding-window layer keeps its own window; methods act on global layers
        acting = [layer.index for layer in layers if layer.window is None]
        budgets: dict[int, torch.Tensor | None] = dict.fromkeys(acting)  # None: the layer's own budget applies
        if self.budgets == "global" and acting:
            # one ranking over every acting layer's pairs, the same total as per-layer budgets (pyramid schedules
            # keep the mean, so the total is theirs too)
            # Under tensor parallelism every rank ranks every head's pairs (one all-gather per layer), so each rank
            # gets the single process's per-layer shares and keeps its own heads' part of them.
            ranked = [tp.all_heads(scores[i].masked_fill(protect[:, None, :], float("inf"))) for i in acting]
            heads = ranked[0].shape[1]
            totals = keep.to(device) * len(acting) * heads
            budgets.update(zip(acting, global_budgets(ranked, totals, heads), strict=True))
        return {i: Selection(scores[i], protect[:, None, :].expand_as(scores[i]), keep=budgets[i]) for i in acting}

    def _sink_len(self, ids: list[int], prefix: list[int]) -> int:
        if prefix and len(ids) > len(prefix) and ids[: len(prefix)] == prefix:
            return len(prefix)
        return min(self.sinks, len(ids))

    # -- bare-forward fallback: one pass -------------------------------------------------------------------------
    def after_attention(
        self, layer: LayerView, queries: torch.Tensor, scaling: float, info: StepInfo
    ) -> Selection | None:
        keep = info.keep
        if not info.is_prefill or keep is None:
            return None
        if not info.prefill_done:
            self._chunked = True  # a chunked prefill bounds the cache: score each chunk now, no second pass
        elif self._engine and not self._chunked:
            return None  # the engine calls after_prefill: the reconstruction scores decide
        if layer.num_slots <= int(keep.min()):
            return None
        scores = max_attention(queries, layer.keys, scaling, layer.valid)
        valid = layer.valid_mask()
        order = valid.long().cumsum(-1)
        return Selection(scores, valid & (order <= self.sinks))

    def reset(self) -> None:
        self._engine = self._chunked = False
