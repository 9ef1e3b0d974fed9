"""A ragged KV store: every (row, KV head) holds its own number of tokens, in real bytes (per-head budgets, AdaKV).

Layout. One layer holds
- a *packed* part: keys `(N, d)` (values likewise), segment (row b, KV head h) at `[offset[b][h], offset[b][h] +
  length[b][h])` in row-major (b, h) order, each segment's tokens in original order, no gaps;
- a *tail*: the tokens appended since the last re-pack, `(B, Hkv, t, d)` — every head gets each new token, so
  they are rectangular.
A (row, head) holds its packed segment followed by the tail. Policy state (`extras`) is split the same way.
Lengths and offsets are host-side shape metadata (Python ints, B x Hkv of them, like a nested tensor's sizes);
`nbytes()` counts the tensors, which hold exactly the held tokens: no padding, no spare capacity.
The packed part holds one row per token; `QuantizedRaggedKVLayer` (below) makes each row the token's group-quantized
codes (KIVI's codes under per-head budgets), so every row operation here moves codes.

Trade-offs we chose (and the alternatives):
- Ragged per (row, head), not rectangular per head across rows. A per-head `(B, max_b n_bh, d)` block would need
  padding to the longest row, and with AdaKV different rows favour different heads, so the sum over heads of the
  per-head maxima can exceed Hkv x budget — more bytes than the uniform store. Fully ragged never holds padding:
  a row never holds more than Hkv x its budget, whatever the batch, and a batch of rows with different budgets
  needs no placeholders nor a validity mask (the uniform store needs both).
- Appends amortised with a tail instead of spare capacity. Re-packing on every decode step would copy the layer
  each step (as the uniform store's concatenation does); spare slots per segment would avoid that but hold
  bytes the budget does not pay for. The tail grows by concatenation (a copy of the tail only) and is folded
  into the packed part once t^2 >= 2 x (tokens per segment): one layer copy every ~sqrt(2n) steps (~28 steps
  at n = 400). An eviction (`keep_mask`) re-packs everything it keeps, tail included. The prompt (all rows valid)
  lands in the tail as is, so a ragged store without eviction holds exactly what the plain store holds.
- Attention loops over (row, head): one call per segment on zero-copy slices (packed segment + tail), the KV
  head's whole GQA group of queries at once — B x Hkv calls per layer (3 on SmolLM2 at batch 1). With a tail the
  softmax spans two key blocks, so it is computed by hand in fp32 (two matmuls, one softmax) rather than by SDPA,
  which cannot take two key tensors; a gather into one padded block would instead copy the layer every step.
  The first forward on an empty store (the prompt) is attended densely on the incoming tensors, exactly as the
  plain store does.
- Policies see the plain store's interface: `keys`, `values`, `valid`, `extras[name]` are *views* materialised as
  `(B, Hkv, T, ...)` with each (row, head) right-aligned (newest token in the last slot, invalid slots on the
  left) — exactly the plain store's layout after a left-padded prompt, so "the q queries are the last q keys"
  holds and every method scores unchanged. A view is a transient copy (cached during one layer's step, dropped
  by `finalize_step`); assigning `extras[name] = view` packs it back. Selection goes through
  `keep_mask((B, Hkv, T) bool)` (AdaKV, from `memfit.core.cache.apply_selection`) or the plain `keep(indices, valid)`.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import Any

import torch
import torch.nn.functional as F

from memfit.core.contract import StepInfo
from memfit.core.quant import QuantizedTensor, bytes_per_group, quantize
from memfit.core.store import KVLayer, dense_attention, tensor_bytes
from memfit.errors import ConfigError


class _RaggedExtras(MutableMapping[str, torch.Tensor]):
    """`layer.extras` of a ragged layer: reads give (B, Hkv, T, ...) views, writes pack them."""

    def __init__(self, layer: RaggedKVLayer) -> None:
        self.layer = layer

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.layer._view("x:" + name, self.layer._x[name], self.layer._tx.get(name))

    def __setitem__(self, name: str, view: torch.Tensor) -> None:
        self.layer._x[name], tail = self.layer._pack(view)
        if tail is not None:
            self.layer._tx[name] = tail
        self.layer._forget("x:" + name)

    def __delitem__(self, name: str) -> None:
        del self.layer._x[name]
        self.layer._tx.pop(name, None)
        self.layer._forget("x:" + name)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self.layer._x))

    def __len__(self) -> int:
        return len(self.layer._x)


def _two_block_attention(
    queries: torch.Tensor, blocks: list[tuple[torch.Tensor, torch.Tensor]], allowed: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """Softmax attention of queries (g, q, d) over the concatenation of key/value blocks [(n_i, d), (n_i, dv)], in
    fp32, without concatenating them. `allowed` (q, sum n_i) bool or None."""
    qf = queries.float()
    scores = torch.cat([torch.matmul(qf, k.float().transpose(0, 1)) for k, _ in blocks], dim=-1) * scaling
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out, at = None, 0
    for k, v in blocks:
        piece = torch.matmul(probs[..., at : at + k.shape[0]], v.float())
        out = piece if out is None else out + piece
        at += k.shape[0]
    assert out is not None
    return out.to(queries.dtype)


class RaggedKVLayer(KVLayer):
    """One layer's KV store with a token count per (row, KV head) (see module docstring)."""

    fold_min = 8  # never fold a tail shorter than this

    def __init__(self, index: int = 0) -> None:  # no super().__init__: keys/values/valid/extras are views here
        self.index = index
        self.seen = 0
        self.window = None  # sliding-window layers are not supported by the ragged store (make_cache refuses)
        self._k: torch.Tensor | None = None  # (N, d) packed keys
        self._v: torch.Tensor | None = None  # (N, dv) packed values
        self._x: dict[str, torch.Tensor] = {}  # packed policy state (N, ...)
        self._tk: torch.Tensor | None = None  # (B, Hkv, t, d) tail keys
        self._tv: torch.Tensor | None = None
        self._tx: dict[str, torch.Tensor] = {}  # tail policy state (B, Hkv, t, ...)
        self._lens: list[list[int]] = []  # packed tokens per (row, head)
        self._offs: list[list[int]] = []  # first packed slot per (row, head)
        self._heads = 0
        self._q_last = 0  # tokens appended in the current step (views stay >= this long)
        self._step_new: torch.Tensor | None = None  # (B, q) validity of this step's tokens
        self._fresh: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None  # prompt K/V of this step
        self._views: dict[str, torch.Tensor] | None = None  # per-step cache of materialised views
        self._dtype: torch.dtype | None = None  # the keys' / values' dtype and widths (packed rows may be codes)
        self._dk = self._dv = 0

    # -- shape -----------------------------------------------------------------------------------------------------
    @property
    def batch(self) -> int:
        return len(self._lens)

    @property
    def tail(self) -> int:
        return 0 if self._tk is None else self._tk.shape[2]

    @property
    def num_slots(self) -> int:
        if self._k is None:
            return 0
        return max(max((max(row) for row in self._lens), default=0) + self.tail, self._q_last)

    def held_per_row(self) -> torch.Tensor:
        """Valid tokens held per (row, KV head): (B, Hkv) long."""
        return torch.tensor(self._lens, dtype=torch.long).reshape(self.batch, self._heads) + self.tail

    def _set_lens(self, lens: list[list[int]]) -> None:
        self._lens = [list(row) for row in lens]
        offs, at = [], 0
        for row in self._lens:
            offs.append([])
            for n in row:
                offs[-1].append(at)
                at += n
        self._offs = offs

    def _meta(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        lens = torch.tensor(self._lens, dtype=torch.long, device=device).reshape(self.batch, self._heads)
        offs = torch.tensor(self._offs, dtype=torch.long, device=device).reshape(self.batch, self._heads)
        return lens, offs

    def _packed_index(self) -> torch.Tensor:
        """Where each packed token (in packed order) sits in the flattened (B * Hkv * T) views: (N,) long."""
        cached = None if self._views is None else self._views.get("idx")
        if cached is not None:
            return cached
        assert self._k is not None
        device = self._k.device
        flat = torch.tensor(self._lens, dtype=torch.long, device=device).flatten()
        seg = torch.repeat_interleave(torch.arange(flat.numel(), device=device), flat)  # row * Hkv + head
        pos = torch.arange(seg.numel(), device=device) - (torch.cumsum(flat, 0) - flat)[seg]
        t_len = self.num_slots
        lin = seg * t_len + (t_len - self.tail - flat[seg]) + pos  # right-aligned before the tail
        if self._views is not None:
            self._views["idx"] = lin
        return lin

    # -- how a packed token row is held ----------------------------------------------------------------------------
    def _encode(self, rows: torch.Tensor, side: str) -> torch.Tensor:
        """Full-precision token rows (N, d) of `side` ("k" or "v") -> the rows the packed part holds (here:
        themselves; `QuantizedRaggedKVLayer` holds codes). Packed-part operations (gather, slice) act on whole rows."""
        return rows

    def _decode(self, rows: torch.Tensor, side: str) -> torch.Tensor:
        """Inverse of `_encode`: held rows -> (N, d) in the keys' dtype."""
        return rows

    # -- views (what policies read) ----------------------------------------------------------------------------------
    def _forget(self, key: str | None = None) -> None:
        if self._views is not None:
            if key is None:
                self._views = {}
            else:
                self._views.pop(key, None)

    def _view(self, key: str, packed: torch.Tensor, tail: torch.Tensor | None) -> torch.Tensor:
        if self._views is not None and key in self._views:
            return self._views[key]
        t_len, rest = self.num_slots, packed.shape[1:]
        out = packed.new_zeros(self.batch * self._heads * t_len, *rest)
        out.index_copy_(0, self._packed_index(), packed)
        out = out.view(self.batch, self._heads, t_len, *rest)
        if tail is not None and tail.shape[2]:
            out[:, :, t_len - tail.shape[2] :] = tail
        if self._views is not None:
            self._views[key] = out
        return out

    def _pack(self, view: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Inverse of `_view`: a (B, Hkv, T, ...) tensor laid out like the views -> (packed (N, ...), tail)."""
        expected = (self.batch, self._heads, self.num_slots)
        if tuple(view.shape[:3]) != expected:
            raise ValueError(f"ragged extras: expected (B, Hkv, T) = {expected}, got {tuple(view.shape)}")
        tail = view[:, :, view.shape[2] - self.tail :].contiguous() if self.tail else None
        packed = view.reshape(-1, *view.shape[3:]).index_select(0, self._packed_index())
        return packed, tail

    @property
    def keys(self) -> torch.Tensor | None:  # type: ignore[override]
        return None if self._k is None else self._view("k", self._decode(self._k, "k"), self._tk)

    @property
    def values(self) -> torch.Tensor | None:  # type: ignore[override]
        return None if self._v is None else self._view("v", self._decode(self._v, "v"), self._tv)

    @property
    def valid(self) -> torch.Tensor | None:  # type: ignore[override]
        if self._k is None:
            return None
        t_len, tail = self.num_slots, self.tail
        if all(n + tail == t_len for row in self._lens for n in row):
            return None
        if self._views is not None and "valid" in self._views:
            return self._views["valid"]
        out = torch.zeros(self.batch * self._heads * t_len, dtype=torch.bool, device=self._k.device)
        out[self._packed_index()] = True
        out = out.view(self.batch, self._heads, t_len)
        if tail:
            out[:, :, t_len - tail :] = True
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
    def append(self, keys: torch.Tensor, values: torch.Tensor, new_valid: torch.Tensor | None) -> None:
        """Append q new tokens (B, Hkv, q, d) to every head; `new_valid` (B, q) or None. Padding is not stored."""
        b, h, q, d = keys.shape
        nv = torch.ones(b, q, dtype=torch.bool, device=keys.device) if new_valid is None else new_valid.bool()
        all_valid = bool(nv.all())
        self._fresh = None
        if self._k is None:  # the prompt (or its first chunk): attended densely on the incoming tensors
            self._heads = h
            self._set_lens([[0] * h for _ in range(b)])
            self._dtype, self._dk, self._dv = keys.dtype, d, values.shape[-1]
            self._k = self._encode(keys.new_zeros(0, d), "k")
            self._v = self._encode(values.new_zeros(0, self._dv), "v")
            self._fresh = (keys, values, None if all_valid else nv[:, None, :].expand(b, h, q))
        if all_valid:
            t = self.tail
            if t >= self.fold_min and t * t >= 2 * (self._k.shape[0] / max(1, b * h) + t):
                self._fold()
            if self._tk is None:
                self._tk, self._tv = keys, values
                self._tx = {name: state.new_zeros(b, h, q, *state.shape[1:]) for name, state in self._x.items()}
            else:
                assert self._tv is not None
                self._tk = torch.cat([self._tk, keys], dim=2)
                self._tv = torch.cat([self._tv, values], dim=2)
                for name, state in self._tx.items():
                    self._tx[name] = torch.cat([state, state.new_zeros(b, h, q, *state.shape[3:])], dim=2)
        else:
            self._fold()
            self._append_packed(keys, values, nv)
        self.seen += q
        self._q_last = q
        self._step_new = nv
        self._views = {}  # start of this layer's step: views may be cached until finalize_step

    def _append_packed(self, keys: torch.Tensor, values: torch.Tensor, nv: torch.Tensor) -> None:
        """Append the valid tokens of (B, Hkv, q, d) into the packed part (re-packed to the exact new size)."""
        assert self._k is not None and self._v is not None
        device, d = self._k.device, keys.shape[-1]
        counts = nv.sum(-1).tolist()
        old_lens, old_offs = self._meta(device)
        self._set_lens([[n + c for n in row] for row, c in zip(self._lens, counts, strict=True)])
        _, new_offs = self._meta(device)
        flat = old_lens.flatten()
        seg = torch.repeat_interleave(torch.arange(flat.numel(), device=device), flat)
        pos = torch.arange(seg.numel(), device=device) - (torch.cumsum(flat, 0) - flat)[seg]
        src, dst = old_offs.flatten()[seg] + pos, new_offs.flatten()[seg] + pos
        total = sum(sum(row) for row in self._lens)

        def move(old: torch.Tensor) -> torch.Tensor:
            new = old.new_zeros(total, *old.shape[1:])
            new[dst] = old[src]
            return new

        self._k, self._v = move(self._k), move(self._v)
        self._x = {name: move(state) for name, state in self._x.items()}
        rows, toks = nv.nonzero(as_tuple=True)
        if rows.numel():
            rank = (nv.long().cumsum(-1) - 1)[rows, toks]
            place = (new_offs[rows] + old_lens[rows] + rank[:, None]).flatten()  # (M * Hkv,), (token, head) order
            self._k[place] = self._encode(keys[rows, :, toks].reshape(-1, d).to(self._dtype), "k")
            self._v[place] = self._encode(values[rows, :, toks].reshape(-1, values.shape[-1]).to(self._dtype), "v")

    def _fold(self) -> None:
        """Move the tail into the packed part (one copy of the layer)."""
        if self.tail:
            self.keep_mask(self.valid_mask())

    def keep_mask(self, mask: torch.Tensor) -> None:
        """Keep the slots of the (B, Hkv, T) bool `mask` (view coordinates), in order; the tail is folded in."""
        assert self._k is not None and self._v is not None
        device, t_len, tail, n_packed = self._k.device, self.num_slots, self.tail, self._k.shape[0]
        b, h = self.batch, self._heads
        source = torch.full((b * h * t_len,), -1, dtype=torch.long, device=device)
        source.index_copy_(0, self._packed_index(), torch.arange(n_packed, device=device))
        source = source.view(b, h, t_len)
        if tail:
            source[:, :, t_len - tail :] = n_packed + torch.arange(b * h * tail, device=device).view(b, h, tail)
        keep = mask.to(device) & (source >= 0)
        pick = source[keep]  # row-major: (row, head) segments in order, tokens in order (packed before tail)
        from_tail = (pick >= n_packed).nonzero().squeeze(1) if tail else None
        from_packed = (pick < n_packed).nonzero().squeeze(1) if tail else None

        def gather(packed: torch.Tensor, tail_part: torch.Tensor | None, side: str | None = None) -> torch.Tensor:
            if tail_part is None or from_tail is None or from_packed is None:
                return packed.index_select(0, pick)
            out = packed.new_empty(pick.numel(), *packed.shape[1:])
            out.index_copy_(0, from_packed, packed.index_select(0, pick.index_select(0, from_packed)))
            tail_rows = pick.index_select(0, from_tail) - n_packed
            picked = tail_part.reshape(-1, *tail_part.shape[3:]).index_select(0, tail_rows)
            # only the kept tail tokens are encoded (policy state `_x` is held as is)
            out.index_copy_(0, from_tail, picked if side is None else self._encode(picked, side))
            return out

        self._k, self._v = gather(self._k, self._tk, "k"), gather(self._v, self._tv, "v")
        self._x = {name: gather(state, self._tx.get(name)) for name, state in self._x.items()}
        self._tk = self._tv = None
        self._tx = {}
        self._set_lens(keep.sum(-1).tolist())
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
        device = self._k.device
        ranges = [torch.arange(self._offs[r][0], self._offs[r][0] + sum(self._lens[r]), device=device) for r in picks]
        src = torch.cat(ranges) if ranges else torch.zeros(0, dtype=torch.long, device=device)
        self._k, self._v = self._k[src], self._v[src]
        self._x = {name: state[src] for name, state in self._x.items()}
        if self._tk is not None and self._tv is not None:
            index = torch.tensor(picks, dtype=torch.long, device=self._tk.device)
            self._tk, self._tv = self._tk.index_select(0, index), self._tv.index_select(0, index)
            self._tx = {name: state.index_select(0, index) for name, state in self._tx.items()}
        self._set_lens([self._lens[r] for r in picks])
        self._forget()

    # -- attention ---------------------------------------------------------------------------------------------------
    def attend(self, queries: torch.Tensor, scaling: float) -> torch.Tensor:
        """Attention of the last appended queries (B, H, q, d) over each (row, head)'s tokens: (B, H, q, dv)."""
        assert self._k is not None and self._v is not None
        if self._fresh is not None:  # the prompt on an empty store: plain causal attention on the incoming K/V
            keys, values, valid = self._fresh
            self._fresh = None
            return dense_attention(queries, keys, values, valid, scaling)
        b, hq, q, d = queries.shape
        g, tail = hq // self._heads, self.tail
        nv = self._step_new
        cum = None if nv is None else nv.long().cumsum(-1)  # (B, q): new real tokens up to each query
        out = queries.new_zeros(b, hq, q, self._dv)
        for r in range(b):
            plain = q == 1 and (nv is None or bool(nv[r, 0]))  # one real new token: it sees everything held
            for h in range(self._heads):
                n, o = self._lens[r][h], self._offs[r][h]
                total = n + tail
                if total == 0:
                    continue
                allowed = None
                if not plain:
                    added = q if cum is None else int(cum[r, -1])
                    step = torch.arange(1, q + 1, device=queries.device) if cum is None else cum[r]
                    limit = (total - added) + step  # query i sees the held tokens and the new real ones up to itself
                    allowed = torch.arange(total, device=queries.device)[None, :] < limit[:, None]
                    allowed[:, 0] |= limit == 0  # a padding query before any token: attend to something finite
                qh = queries[r, h * g : (h + 1) * g]  # (g, q, d)
                if tail and n:
                    assert self._tk is not None and self._tv is not None
                    blocks = [(self._decode(self._k[o : o + n], "k"), self._decode(self._v[o : o + n], "v")),
                              (self._tk[r, h], self._tv[r, h])]
                    out[r, h * g : (h + 1) * g] = _two_block_attention(qh, blocks, allowed, scaling)
                    continue
                if tail:
                    assert self._tk is not None and self._tv is not None
                    k, v = self._tk[r, h], self._tv[r, h]
                else:
                    k, v = self._decode(self._k[o : o + n], "k"), self._decode(self._v[o : o + n], "v")
                res = F.scaled_dot_product_attention(
                    qh[None],
                    k[None, None],
                    v[None, None],
                    attn_mask=None if allowed is None else allowed[None, None],
                    scale=scaling,
                    enable_gqa=g > 1,
                )
                out[r, h * g : (h + 1) * g] = res[0]
        return out

    def finalize_step(self, info: StepInfo) -> None:
        self._views = None
        self._fresh = None
        self._step_new = None
        self._q_last = 0

    # -- persistence (memfit.contexts) -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"k": self._k, "v": self._v, "x": dict(self._x), "tk": self._tk, "tv": self._tv, "tx": dict(self._tx),
                "lens": [list(row) for row in self._lens], "heads": self._heads, "seen": self.seen,
                "dtype": self._dtype, "dk": self._dk, "dv": self._dv}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._k, self._v, self._tk, self._tv = state["k"], state["v"], state["tk"], state["tv"]
        self._x, self._tx = dict(state["x"]), dict(state["tx"])
        self._set_lens([[int(n) for n in row] for row in state["lens"]])
        self._heads, self.seen = int(state["heads"]), int(state["seen"])
        if "dk" in state:
            self._dtype, self._dk, self._dv = state["dtype"], int(state["dk"]), int(state["dv"])
        elif self._k is not None and self._v is not None:  # a context file written before packed rows could be codes
            self._dtype, self._dk, self._dv = self._k.dtype, self._k.shape[-1], self._v.shape[-1]
        self._q_last, self._step_new, self._fresh, self._views = 0, None, None, None

    # -- accounting --------------------------------------------------------------------------------------------------
    def nbytes(self) -> int:
        return tensor_bytes(self._k, self._v, self._tk, self._tv, *self._x.values(), *self._tx.values())

    def full_nbytes(self) -> int:
        if self._k is None:
            return 0
        assert self._dtype is not None
        width = torch.empty(0, dtype=self._dtype).element_size()
        return self.batch * self._heads * self.seen * (self._dk + self._dv) * width


class QuantizedRaggedKVLayer(RaggedKVLayer):
    """The ragged store (per-head budgets, AdaKV) holding its packed tokens as group-quantized codes: KIVI's codes
    under a ragged layout (`<eviction>+kivi` with `--allocation adakv`).

    Each packed token row is its own quantization unit: its d channels in groups of `group_size`, asymmetric
    min-max over 2^bits - 1 levels, fp16 scale and minimum (memfit.core.quant, axis "channel"), held as one uint8
    row [codes | scales | minima], so every row operation of the ragged store (gather after an eviction, fold of
    the tail, batch selection) moves codes, never dequantized copies. The tail, the newest tokens (at least
    `residual` of them before a fold quantizes them together), stays in full precision like KIVI's residual.
    Deviation from KIVI: keys are grouped per token too. KIVI groups a channel over G consecutive tokens, which a
    ragged segment (whose length differs per head and changes at every eviction) cannot keep aligned; per-token key
    groups cost quality where a few channels carry outliers (the KIVI paper's argument), least at 4 and 8 bits.
    Attention dequantizes one (row, head) segment at a time (the store's per-segment loop)."""

    def __init__(self, index: int = 0, key_bits: int = 4, value_bits: int = 4, group_size: int = 32,
                 residual: int = 128) -> None:
        super().__init__(index)
        for what, bits in (("key", key_bits), ("value", value_bits)):
            if bits not in (2, 4, 8):
                raise ConfigError(f"the ragged quantized store (--allocation adakv with kivi) takes {what} bits 2, 4 "
                                  f"or 8, got {bits}")
        self.bits = {"k": int(key_bits), "v": int(value_bits)}
        self.group_size = int(group_size)
        self.fold_min = max(int(residual), RaggedKVLayer.fold_min)

    def _widths(self, side: str, d: int) -> tuple[int, int]:
        if d % self.group_size:
            raise ConfigError(f"kivi.group_size={self.group_size} must divide the head dim {d} with --allocation "
                              f"adakv (its keys and values are grouped per token)")
        groups = d // self.group_size
        return groups * bytes_per_group(self.bits[side], self.group_size), groups

    def _encode(self, rows: torch.Tensor, side: str) -> torch.Tensor:
        n, d = rows.shape
        code_bytes, groups = self._widths(side, d)
        if n == 0:
            return torch.zeros(0, code_bytes + 4 * groups, dtype=torch.uint8, device=rows.device)
        qt = quantize(rows[None, None], self.bits[side], axis="channel", group_size=self.group_size)
        assert qt.zeros is not None
        parts = [qt.codes[0, 0], qt.scales[0, 0].contiguous().view(torch.uint8),
                 qt.zeros[0, 0].contiguous().view(torch.uint8)]
        return torch.cat(parts, dim=1)

    def _decode(self, rows: torch.Tensor, side: str) -> torch.Tensor:
        d = self._dk if side == "k" else self._dv
        assert self._dtype is not None
        code_bytes, groups = self._widths(side, d)
        n = rows.shape[0]
        scales = rows[:, code_bytes : code_bytes + 2 * groups].contiguous().view(torch.float16)
        zeros = rows[:, code_bytes + 2 * groups :].contiguous().view(torch.float16)
        qt = QuantizedTensor(codes=rows[:, :code_bytes][None, None], scales=scales[None, None],
                             zeros=zeros[None, None], shape=(1, 1, n, d), bits=self.bits[side], axis="channel",
                             group_size=self.group_size, dtype=self._dtype)
        return qt.dequantize()[0, 0]
