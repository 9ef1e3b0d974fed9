"""A ragged KV store: every (row, KV head) holds its own number of tokens, in real bytes (per-head budgets, AdaKV).

Layout. One layer's keys are one packed tensor `(N, d)` (values likewise; policy state in `extras` as `(N, ...)`).
Segment (row b, KV head h) occupies `[offset[b][h], offset[b][h] + capacity[b][h])`, in row-major (b, h) order;
its first `length[b][h]` slots are its tokens in original order. Lengths / capacities / offsets are host-side
shape metadata (Python ints, B x Hkv of them, like a nested tensor's sizes), so `nbytes()` counts the packed
tensors only — and every slot of them, spare capacity included.

Trade-offs we chose (and the alternatives):
- Ragged per (row, head), not rectangular per head across rows. A per-head `(B, max_b n_bh, d)` block would need
  padding to the longest row, and with AdaKV different rows favour different heads, so the sum over heads of the
  per-head maxima can exceed Hkv x budget — more bytes than the uniform store. Fully ragged never holds padding:
  the held tokens of a row never exceed Hkv x its budget, whatever the batch.
- Attention loops over (row, head) segments: one SDPA call per segment on a zero-copy slice, the head's GQA group
  of queries at once (B x Hkv calls per layer: 3 on SmolLM2 at batch 1). A gather into a padded block would be
  one call but copies the whole layer every step. The first forward on an empty store (the prompt) is attended
  densely on the incoming tensors, exactly as the plain store does.
- Decode appends write in place into spare capacity. When a segment is full the layer is re-packed and that
  segment gets `growth` (1/16) of its length as free slots (at least one): one copy of the layer every n/16 tokens
  instead of one per token (the plain store concatenates, i.e. copies, every step), for at most 1/16 more bytes.
  Eviction (`keep_mask`) re-packs exactly, without spare, so right after the policy acted the store holds
  exactly the kept tokens (and methods that evict every step never carry spare). Spare slots count in `nbytes()`.
- Policies see the plain store's interface: `keys`, `values`, `valid`, `extras[name]` are *views* materialised as
  `(B, Hkv, T, ...)` with each segment right-aligned (its newest token in the last slot, invalid slots on the
  left), which is exactly the plain store's layout after a left-padded prompt — so "the q queries are the last q
  keys" holds and every method scores unchanged. A view is a transient copy (cached during one layer's step,
  dropped by `finalize_step`); assigning `extras[name] = view` packs it back. Selection goes through
  `keep_mask((B, Hkv, T) bool)` (AdaKV in `Method.evict`) or the usual `keep(indices, valid)`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, MutableMapping

import torch
import torch.nn.functional as F

from memfit.core.cache import KVLayer, StepInfo, dense_attention, tensor_bytes


class _RaggedExtras(MutableMapping[str, torch.Tensor]):
    """`layer.extras` of a ragged layer: reads give (B, Hkv, T, ...) views, writes pack them."""

    def __init__(self, layer: RaggedKVLayer) -> None:
        self.layer = layer

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.layer._view("x:" + name, self.layer._x[name])

    def __setitem__(self, name: str, view: torch.Tensor) -> None:
        self.layer._x[name] = self.layer._pack(view)
        self.layer._forget("x:" + name)

    def __delitem__(self, name: str) -> None:
        del self.layer._x[name]
        self.layer._forget("x:" + name)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self.layer._x))

    def __len__(self) -> int:
        return len(self.layer._x)


class RaggedKVLayer(KVLayer):
    """One layer's KV store with a token count per (row, KV head) (see module docstring)."""

    growth: float = 1 / 16  # a full segment grows by this share of its length (at least 1 slot) on a decode append

    def __init__(self, index: int = 0) -> None:  # no super().__init__: keys/values/valid/extras are views here
        self.index = index
        self.seen = 0
        self._k: torch.Tensor | None = None  # (N, d) packed keys
        self._v: torch.Tensor | None = None  # (N, dv) packed values
        self._x: dict[str, torch.Tensor] = {}  # packed policy state (N, ...)
        self._lens: list[list[int]] = []  # tokens per (row, head)
        self._caps: list[list[int]] = []  # slots per (row, head)
        self._offs: list[list[int]] = []  # first slot per (row, head)
        self._heads = 0
        self._q_last = 0  # tokens appended in the current step (views stay >= this long)
        self._step_new: torch.Tensor | None = None  # (B, q) validity of this step's tokens
        self._fresh: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None  # prompt K/V of this step
        self._views: dict[str, torch.Tensor] | None = None  # per-step cache of materialised views

    # -- shape -----------------------------------------------------------------------------------------------------
    @property
    def batch(self) -> int:
        return len(self._lens)

    @property
    def num_slots(self) -> int:
        if self._k is None:
            return 0
        return max(max((max(row) for row in self._lens), default=0), self._q_last)

    def held_per_row(self) -> torch.Tensor:
        """Valid tokens held per (row, KV head): (B, Hkv) long."""
        return torch.tensor(self._lens, dtype=torch.long).reshape(self.batch, self._heads)

    def _set_caps(self, caps: list[list[int]]) -> None:
        self._caps = caps
        offs, at = [], 0
        for row in caps:
            offs.append([])
            for c in row:
                offs[-1].append(at)
                at += c
        self._offs = offs

    def _total(self) -> int:
        return sum(sum(row) for row in self._caps)

    def _meta(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        lens = torch.tensor(self._lens, dtype=torch.long, device=device).reshape(self.batch, self._heads)
        offs = torch.tensor(self._offs, dtype=torch.long, device=device).reshape(self.batch, self._heads)
        return lens, offs

    def _index(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """For every held token: (row, head, view slot, packed position), in packed order."""
        cached = None if self._views is None else self._views.get("idx")
        if cached is not None:
            return cached.unbind(0)  # type: ignore[return-value]
        assert self._k is not None
        device = self._k.device
        lens, offs = self._meta(device)
        flat_lens = lens.flatten()
        seg = torch.repeat_interleave(torch.arange(flat_lens.numel(), device=device), flat_lens)
        start = torch.cumsum(flat_lens, 0) - flat_lens
        pos = torch.arange(seg.numel(), device=device) - start[seg]
        src = offs.flatten()[seg] + pos
        slot = self.num_slots - flat_lens[seg] + pos
        idx = torch.stack([seg // self._heads, seg % self._heads, slot, src])
        if self._views is not None:
            self._views["idx"] = idx
        return idx.unbind(0)  # type: ignore[return-value]

    # -- views (what policies read) ----------------------------------------------------------------------------------
    def _forget(self, key: str | None = None) -> None:
        if self._views is not None:
            if key is None:
                self._views = {}
            else:
                self._views.pop(key, None)

    def _view(self, key: str, packed: torch.Tensor) -> torch.Tensor:
        if self._views is not None and key in self._views:
            return self._views[key]
        rows, heads, slots, src = self._index()
        out = packed.new_zeros(self.batch, self._heads, self.num_slots, *packed.shape[1:])
        out[rows, heads, slots] = packed[src]
        if self._views is not None:
            self._views[key] = out
        return out

    def _pack(self, view: torch.Tensor) -> torch.Tensor:
        """Inverse of `_view`: a (B, Hkv, T, ...) tensor laid out like the views -> packed (N, ...)."""
        assert self._k is not None
        if tuple(view.shape[:3]) != (self.batch, self._heads, self.num_slots):
            raise ValueError(
                f"ragged extras: expected (B, Hkv, T) = {(self.batch, self._heads, self.num_slots)}, got {tuple(view.shape)}"
            )
        rows, heads, slots, src = self._index()
        packed = view.new_zeros(self._total(), *view.shape[3:])
        packed[src] = view[rows, heads, slots]
        return packed

    @property
    def keys(self) -> torch.Tensor | None:  # type: ignore[override]
        return None if self._k is None else self._view("k", self._k)

    @property
    def values(self) -> torch.Tensor | None:  # type: ignore[override]
        return None if self._v is None else self._view("v", self._v)

    @property
    def valid(self) -> torch.Tensor | None:  # type: ignore[override]
        if self._k is None:
            return None
        t = self.num_slots
        if all(n == t for row in self._lens for n in row):
            return None
        if self._views is not None and "valid" in self._views:
            return self._views["valid"]
        rows, heads, slots, _ = self._index()
        out = torch.zeros(self.batch, self._heads, t, dtype=torch.bool, device=self._k.device)
        out[rows, heads, slots] = True
        if self._views is not None:
            self._views["valid"] = out
        return out

    @property
    def extras(self) -> MutableMapping[str, torch.Tensor]:  # type: ignore[override]
        return _RaggedExtras(self)

    def valid_mask(self) -> torch.Tensor:
        assert self._k is not None
        valid = self.valid
        if valid is not None:
            return valid
        return torch.ones(self.batch, self._heads, self.num_slots, dtype=torch.bool, device=self._k.device)

    # -- storage -----------------------------------------------------------------------------------------------------
    def _repack(self, caps: list[list[int]]) -> None:
        """Move every segment into a fresh packed layout with capacities `caps` (>= lengths)."""
        assert self._k is not None and self._v is not None
        device = self._k.device
        old_lens, old_offs = self._meta(device)
        self._set_caps(caps)
        _, new_offs = self._meta(device)
        flat_lens = old_lens.flatten()
        seg = torch.repeat_interleave(torch.arange(flat_lens.numel(), device=device), flat_lens)
        pos = torch.arange(seg.numel(), device=device) - (torch.cumsum(flat_lens, 0) - flat_lens)[seg]
        src = old_offs.flatten()[seg] + pos
        dst = new_offs.flatten()[seg] + pos
        total = self._total()

        def move(old: torch.Tensor) -> torch.Tensor:
            new = old.new_zeros(total, *old.shape[1:])
            new[dst] = old[src]
            return new

        self._k, self._v = move(self._k), move(self._v)
        self._x = {name: move(state) for name, state in self._x.items()}

    def append(self, keys: torch.Tensor, values: torch.Tensor, new_valid: torch.Tensor | None) -> None:
        """Append q new tokens (B, Hkv, q, d) to every head; `new_valid` (B, q) or None. Padding is not stored."""
        b, h, q, d = keys.shape
        nv = torch.ones(b, q, dtype=torch.bool, device=keys.device) if new_valid is None else new_valid.bool()
        counts = nv.sum(-1).tolist()
        self._fresh = None
        first = self._k is None
        if first:
            self._heads = h
            self._lens = [[0] * h for _ in range(b)]
            self._set_caps([[0] * h for _ in range(b)])
            self._k = keys.new_zeros(0, d)
            self._v = values.new_zeros(0, values.shape[-1])
            self._fresh = (
                keys,
                values,
                None if new_valid is None or bool(nv.all()) else nv[:, None, :].expand(b, h, q),
            )
        need = [[n + c for n in row] for row, c in zip(self._lens, counts, strict=True)]
        if any(n > cap for nrow, crow in zip(need, self._caps, strict=True) for n, cap in zip(nrow, crow, strict=True)):
            self._repack(
                [
                    [
                        cap if n <= cap else n + (0 if first else max(1, math.ceil(n * self.growth)))
                        for n, cap in zip(nrow, crow, strict=True)
                    ]
                    for nrow, crow in zip(need, self._caps, strict=True)
                ]
            )
        assert self._k is not None and self._v is not None
        rows, toks = nv.nonzero(as_tuple=True)
        if rows.numel():
            lens, offs = self._meta(keys.device)
            rank = (nv.long().cumsum(-1) - 1)[rows, toks]
            dst = (offs[rows] + lens[rows] + rank[:, None]).flatten()  # (M * Hkv,) in (token, head) order
            self._k[dst] = keys[rows, :, toks].reshape(-1, d).to(self._k.dtype)
            self._v[dst] = values[rows, :, toks].reshape(-1, values.shape[-1]).to(self._v.dtype)
            for state in self._x.values():
                state[dst] = 0
        self._lens = need
        self.seen += q
        self._q_last = q
        self._step_new = nv
        self._views = {}  # start of this layer's step: views may be cached until finalize_step

    def keep_mask(self, mask: torch.Tensor) -> None:
        """Keep the slots of the (B, Hkv, T) bool `mask` (view coordinates), in order; re-packed without spare."""
        assert self._k is not None and self._v is not None
        t = self.num_slots
        mask = mask.to(self._k.device) & self.valid_mask()
        rows, heads, slots = mask.nonzero(as_tuple=True)  # row-major: segments in packed order, tokens in order
        lens, offs = self._meta(self._k.device)
        src = offs[rows, heads] + slots - (t - lens[rows, heads])
        new_lens = mask.sum(-1).tolist()
        self._k = self._k[src].contiguous()
        self._v = self._v[src].contiguous()
        self._x = {name: state[src].contiguous() for name, state in self._x.items()}
        self._lens = new_lens
        self._set_caps([list(row) for row in new_lens])
        self._q_last = 0
        self._forget()

    def keep(self, indices: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """The plain store's interface: keep slots `indices` (B, Hkv, K) of the current views."""
        assert self._k is not None
        mask = torch.zeros(self.batch, self._heads, self.num_slots, dtype=torch.bool, device=self._k.device)
        mask.scatter_(2, indices.to(mask.device), True if valid is None else valid.to(mask.device))
        self.keep_mask(mask)

    def select_batch(self, rows: torch.Tensor) -> None:
        if self._k is None:
            return
        picks = [int(r) for r in rows.tolist()]
        ranges = [
            torch.arange(self._offs[r][0], self._offs[r][0] + sum(self._caps[r]), device=self._k.device) for r in picks
        ]
        src = torch.cat(ranges) if ranges else torch.zeros(0, dtype=torch.long, device=self._k.device)
        self._k, self._v = self._k[src], self._v[src]
        self._x = {name: state[src] for name, state in self._x.items()}
        self._lens = [list(self._lens[r]) for r in picks]
        self._set_caps([list(self._caps[r]) for r in picks])
        self._forget()

    # -- attention ---------------------------------------------------------------------------------------------------
    def attend(self, queries: torch.Tensor, scaling: float) -> torch.Tensor:
        """Attention of the last appended queries (B, H, q, d) over each (row, head) segment: (B, H, q, dv)."""
        assert self._k is not None and self._v is not None
        if self._fresh is not None:  # the prompt on an empty store: plain causal attention on the incoming K/V
            keys, values, valid = self._fresh
            self._fresh = None
            return dense_attention(queries, keys, values, valid, scaling)
        b, hq, q, d = queries.shape
        g = hq // self._heads
        nv = self._step_new
        cum = None if nv is None else nv.long().cumsum(-1)  # (B, q) new real tokens up to each query
        out = queries.new_zeros(b, hq, q, self._v.shape[-1])
        for r in range(b):
            plain = q == 1 and (nv is None or bool(nv[r, 0]))
            for h in range(self._heads):
                n, o = self._lens[r][h], self._offs[r][h]
                if n == 0:
                    continue
                k = self._k[o : o + n].view(1, 1, n, d)
                v = self._v[o : o + n].view(1, 1, n, -1)
                qh = queries[r : r + 1, h * g : (h + 1) * g]
                if plain:
                    res = F.scaled_dot_product_attention(qh, k, v, scale=scaling, enable_gqa=g > 1)
                else:
                    added = q if cum is None else int(cum[r, -1])
                    step = torch.arange(1, q + 1, device=k.device) if cum is None else cum[r].to(k.device)
                    limit = (n - added) + step  # query i sees the held tokens and the new real ones up to itself
                    allowed = torch.arange(n, device=k.device)[None, :] < limit[:, None]
                    allowed[:, 0] |= limit == 0  # a padding query before any token: attend to something finite
                    res = F.scaled_dot_product_attention(
                        qh, k, v, attn_mask=allowed[None, None], scale=scaling, enable_gqa=g > 1
                    )
                out[r : r + 1, h * g : (h + 1) * g] = res
        return out

    def finalize_step(self, info: StepInfo) -> None:
        self._views = None
        self._fresh = None
        self._step_new = None
        self._q_last = 0

    # -- accounting --------------------------------------------------------------------------------------------------
    def nbytes(self) -> int:
        return tensor_bytes(self._k, self._v, *self._x.values())

    def full_nbytes(self) -> int:
        if self._k is None:
            return 0
        return 2 * self.batch * self._heads * self.seen * self._k.shape[-1] * self._k.element_size()
