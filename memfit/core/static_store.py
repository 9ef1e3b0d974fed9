"""The fast backend's KV store: after the prompt, a layer's keys and values live in one preallocated buffer.

`StaticKVLayer` behaves exactly like the dense `KVLayer` (same kept tokens, same order, same validity), but once the
prompt is in (the first single-token append), it moves what the policy kept into buffers of capacity
`held + reserve` (`reserve` = the tokens the runtime will decode). From then on:
- a decode step writes the new token in place (`index_copy_` at a device-side slot counter, or one fused Triton
  launch when a graph is recorded: no `torch.cat`, no reallocation, no host sync — the step can be captured in a
  CUDA graph);
- attention of the single query runs the split-K Triton kernel of `memfit.kernels` on CUDA (the GQA group is read
  from the KV head, never expanded), and its plain-PyTorch reference elsewhere;
- an eviction at decode (StreamingLLM, H2O, ...) compacts the kept tokens to the front of the same buffer.
`nbytes()` counts the whole buffers (capacity, not just the used slots): the bytes the store really holds.
The buffer grows (doubles) only if a caller decodes past the reserve.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from memfit.core.spans import SPAN_KEY
from memfit.core.store import KVLayer, dense_attention, tensor_bytes

DEFAULT_RESERVE = 256


class StaticKVLayer(KVLayer):
    """A dense layer store whose post-prompt tokens live in a fixed buffer (see module docstring)."""

    def __init__(self, index: int = 0, reserve: int = DEFAULT_RESERVE) -> None:
        self._kbuf: torch.Tensor | None = None
        self._vbuf: torch.Tensor | None = None
        self._keys: torch.Tensor | None = None
        self._values: torch.Tensor | None = None
        self.length = 0  # used slots of the buffers (mirror of `slot` on the host)
        self.slot: torch.Tensor | None = None  # (1,) long on the device: where the next token goes
        self.lengths: torch.Tensor | None = None  # (B,) int32 on the device: used slots, for the kernels
        self.reserve = reserve
        self.budget_tokens: int | None = None  # this layer's token budget, told by the cache when the prompt is in
        # single-token attention in memfit's Triton kernel: set by the runtime when it will record a CUDA graph (a
        # long decode). Short eager decodes use SDPA: the kernels' first-use compilation (seconds) would cost more
        # than they save (measured: benchmarks/results/backend_agreement_h200.jsonl).
        self.kernel_attention = False
        self._done: torch.Tensor | None = None  # the fused append's ticket counter (4 bytes, scratch)
        self.stack: Any = None  # the memfit.core.stacks block whose row r holds this store's buffers (views), if any
        self.stack_row = -1
        super().__init__(index)

    # -- the dense view ------------------------------------------------------------------------------------------
    @property
    def frozen(self) -> bool:
        return self._kbuf is not None

    @property
    def keys(self) -> torch.Tensor | None:  # type: ignore[override]
        return self._kbuf[:, :, : self.length] if self._kbuf is not None else self._keys

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self._unfreeze()
        self._keys = value

    @property
    def values(self) -> torch.Tensor | None:  # type: ignore[override]
        return self._vbuf[:, :, : self.length] if self._vbuf is not None else self._values

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self._unfreeze()
        self._values = value

    def _leave_stack(self) -> None:
        """Before anything that replaces the buffers: a stacked store takes its row back as buffers of its own."""
        if self.stack is not None:
            self.stack.leave(self.stack_row, keep=True)

    def _unfreeze(self) -> None:
        self._leave_stack()
        if self._kbuf is not None:  # someone replaces the tensors wholesale: keep the current view as plain tensors
            self._keys, self._values = self.keys, self.values
            self._kbuf = self._vbuf = self.slot = self.lengths = None

    @property
    def capacity(self) -> int:
        return 0 if self._kbuf is None else self._kbuf.shape[2]

    def freeze(self, reserve: int | None = None) -> None:
        """Move the held tokens into buffers with room for `reserve` more (no-op when already frozen)."""
        if self._kbuf is not None or self._keys is None:
            return
        # Span ids (memfit.core.spans) steer selections by score over the prompt. From the first decode step on, the
        # fast backend keeps them no longer: the methods it replays in a graph select nothing more (prompt-only
        # methods) or run a fused rule that ignores spans (H2O), and a per-step concatenation of them cannot live
        # inside a CUDA graph. (A per-step method forced onto this store then selects decode tokens without spans.)
        self.extras.pop(SPAN_KEY, None)
        keys, values = self._keys, self._values
        assert values is not None
        n = keys.shape[2]
        self._alloc(keys, values, n + (self.reserve if reserve is None else reserve))
        self._keys = self._values = None

    def _alloc(self, keys: torch.Tensor, values: torch.Tensor, capacity: int) -> None:
        b, h, n, d = keys.shape
        kbuf = keys.new_empty(b, h, capacity, d)
        vbuf = values.new_empty(b, h, capacity, values.shape[-1])
        kbuf[:, :, :n].copy_(keys)
        vbuf[:, :, :n].copy_(values)
        self._kbuf, self._vbuf, self.length = kbuf, vbuf, n
        self.slot = torch.full((1,), n, dtype=torch.long, device=keys.device)
        self.lengths = torch.full((b,), n, dtype=torch.int32, device=keys.device)

    # -- storage -------------------------------------------------------------------------------------------------
    def append(self, keys: torch.Tensor, values: torch.Tensor, new_valid: torch.Tensor | None) -> None:
        if self._kbuf is None and self._keys is not None and keys.shape[2] == 1:
            self.freeze()  # the prompt is in: from the first single-token step on, the buffer holds the tokens
        if self._kbuf is None:
            return super().append(keys, values, new_valid)
        q = keys.shape[2]
        if self.length + q > self.capacity:  # past the reserve: grow (once in a while, never on a planned run)
            self._leave_stack()
            cur_k, cur_v = self.keys, self.values
            assert cur_k is not None and cur_v is not None
            self._alloc(cur_k, cur_v, 2 * self.capacity + q)
        assert self._vbuf is not None and self.slot is not None and self.lengths is not None
        if q == 1 and self._append_kernel(keys, values):
            pass  # one fused launch (graph-recorded decodes)
        elif q == 1:
            self._kbuf.index_copy_(2, self.slot, keys)  # device-side slot: capturable in a CUDA graph
            self._vbuf.index_copy_(2, self.slot, values)
            self.slot.add_(1)
            self.lengths.add_(1)
        else:
            self._kbuf[:, :, self.length : self.length + q].copy_(keys)
            self._vbuf[:, :, self.length : self.length + q].copy_(values)
            self.slot.fill_(self.length + q)
            self.lengths.fill_(self.length + q)
        self.length += q
        self._append_state(new_valid, keys.shape[0], keys.shape[1], q)

    def _append_kernel(self, keys: torch.Tensor, values: torch.Tensor) -> bool:
        """The single-token append as one Triton launch (`memfit.kernels.fused_ops.append_kv`) where the runtime
        records a CUDA graph (`kernel_attention`, as for the attention kernel: a short eager decode would pay the
        kernel's first compilation); False where it does not apply (the caller then runs the four plain ops)."""
        if not (self.kernel_attention and keys.is_cuda and _triton_here()):
            return False
        from memfit.kernels import fused_ops

        assert self._kbuf is not None and self._vbuf is not None and self.slot is not None
        if not fused_ops.append_kv_supported(self._kbuf, self._vbuf, keys, values):
            return False
        if self._done is None or self._done.device != keys.device:
            self._done = torch.zeros(1, dtype=torch.int32, device=keys.device)
        fused_ops.append_kv(self._kbuf, self._vbuf, keys, values, self.slot, self.lengths, self._done)
        return True

    def advance(self, steps: int = 1) -> None:
        """Host-side bookkeeping of `steps` single-token appends that ran inside a replayed CUDA graph (the graph
        already wrote the tokens and moved the device counters)."""
        self.length += steps
        self.seen += steps

    def keep(self, indices: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        if self._kbuf is None:
            return super().keep(indices, valid)
        assert self._vbuf is not None and self.slot is not None and self.lengths is not None
        d = self._kbuf.shape[-1]
        idx = indices.unsqueeze(-1).expand(*indices.shape, d)
        kept_k = self.keys.gather(2, idx)  # type: ignore[union-attr]
        kept_v = self.values.gather(2, idx)  # type: ignore[union-attr]
        n = indices.shape[2]
        self._kbuf[:, :, :n].copy_(kept_k)
        self._vbuf[:, :, :n].copy_(kept_v)
        self.length = n
        self.slot.fill_(n)
        self.lengths.fill_(n)
        self._keep_state(indices, valid)

    def select_batch(self, rows: torch.Tensor) -> None:
        self._unfreeze()
        super().select_batch(rows)

    # -- attention -----------------------------------------------------------------------------------------------
    def attend(self, queries: torch.Tensor, scaling: float, window: int | None = None) -> torch.Tensor:
        if self._kbuf is None or queries.shape[2] != 1 or self.valid is not None or window is not None:
            return super().attend(queries, scaling, window)
        assert self._vbuf is not None and self.lengths is not None
        if self.kernel_attention and queries.is_cuda and _kernels_ok(queries):
            from memfit.kernels.kivi_attention import decode_attention

            return decode_attention(queries[:, :, 0], self._kbuf, self._vbuf, self.lengths, scale=scaling)[:, :, None]
        return dense_attention(queries, self.keys, self.values, None, scaling)  # type: ignore[arg-type]

    # -- rows of a stack block (memfit.core.stacks) -------------------------------------------------------------
    def stackable(self) -> bool:
        return (type(self) is StaticKVLayer and self._kbuf is not None and self.stack is None and self.valid is None
                and not self.extras and self._kbuf.shape[0] == 1 and getattr(self, "window", None) is None)

    @staticmethod
    def stack_empty() -> dict[str, int]:
        """Counters of a row that holds nothing (a block's free row): its next step writes slot 0 and attends over
        that one token."""
        return {"slot": 0, "lengths": 0}

    def stack_signature(self) -> tuple:
        assert self._kbuf is not None and self._vbuf is not None
        k, v = self._kbuf, self._vbuf
        return ("dense", k.shape[1], k.shape[3], v.shape[3], k.dtype, str(k.device))

    def capacity_unit(self) -> int:
        return 16

    def stack_kernels(self) -> bool:
        """Whether a block of such rows steps in the Triton kernel (else its members step one by one)."""
        assert self._kbuf is not None
        k = self._kbuf
        return k.is_cuda and _kernels_ok(k[:, :, :1])

    def stack_parts(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Buffers (token dimension 2) and step counters ((1,) each) a block copies into a row."""
        assert self._kbuf is not None and self._vbuf is not None and self.slot is not None
        assert self.lengths is not None
        return {"k": self._kbuf, "v": self._vbuf}, {"slot": self.slot, "lengths": self.lengths}

    def set_stack_parts(self, buffers: dict[str, torch.Tensor] | None, counters: dict[str, torch.Tensor] | None) -> None:
        self._kbuf = None if buffers is None else buffers["k"]
        self._vbuf = None if buffers is None else buffers["v"]
        self.slot = None if counters is None else counters["slot"]
        self.lengths = None if counters is None else counters["lengths"]

    def alloc_stack(self, rows: int, capacity: int, device: torch.device | None = None) -> dict[str, torch.Tensor]:
        assert self._kbuf is not None and self._vbuf is not None
        k, v = self._kbuf, self._vbuf
        dev = device or k.device
        return {"k": torch.zeros(rows, k.shape[1], capacity, k.shape[3], dtype=k.dtype, device=dev),
                "v": torch.zeros(rows, v.shape[1], capacity, v.shape[3], dtype=v.dtype, device=dev)}

    @staticmethod
    def stack_step(bufs: dict[str, torch.Tensor], c: dict[str, torch.Tensor], keys: torch.Tensor,
                   values: torch.Tensor, queries: torch.Tensor, scaling: float) -> torch.Tensor:
        """One decode step of n rows of a block: each row's token written at its own length, attention over it,
        the per-row counters advanced. keys/values (n, Hkv, 1, d), queries (n, H, 1, d) -> (n, H, 1, d)."""
        from memfit.kernels.kivi_attention import decode_attention

        at = c["lengths"].clone()  # int32: where each row's token goes
        c["lengths"].add_(1)  # the kernel reads lengths that count the new token
        c["slot"].add_(1)
        out = decode_attention(queries[:, :, 0], bufs["k"], bufs["v"], c["lengths"], scale=scaling,
                               k_new=keys[:, :, 0], v_new=values[:, :, 0], append_at=at)
        return out[:, :, None]

    def nbytes(self) -> int:
        if self._kbuf is None:
            return super().nbytes()
        return tensor_bytes(self._kbuf, self._vbuf, self.slot, self.lengths, self._done, self.valid,
                            *self.extras.values())

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["keys"], state["values"] = self.keys, self.values  # the used slots only
        return state


@functools.cache
def _triton_here() -> bool:
    from memfit.kernels import available

    return available()


def _kernels_ok(queries: torch.Tensor) -> bool:
    d = queries.shape[-1]
    return d >= 16 and d & (d - 1) == 0 and queries.dtype in (torch.bfloat16, torch.float16) and _triton_here()


class AccumulatedStaticLayer(StaticKVLayer):
    """H2O's decode rule on a fixed buffer: capacity = the tokens kept after the prompt + 1, one eviction per step.

    Each decode step (one fused Triton kernel pass on CUDA, `memfit.kernels.h2o_decode`; its plain-PyTorch reference
    elsewhere) writes the new token into the slot the previous step freed, attends over every slot, adds the step's
    attention (summed over the GQA group) to each slot's accumulated score and picks the next victim: the
    unprotected slot with the smallest score, the `recent` newest positions being protected. That is exactly the
    portable H2O step (append, attend, accumulate, evict the lowest unprotected), with the victim overwritten by the
    next token instead of gathered away — static shapes, no host sync, so the step is captured in a CUDA graph.
    The buffer holds budget + 1 slots (the victim until it is overwritten); `nbytes()` counts them. A layer whose
    prompt was shorter than its budget fills its empty slots first (the kernel's victim is then the first empty slot).
    """

    def __init__(self, index: int = 0, reserve: int = 1, *, score_key: str, recent_fraction: float) -> None:
        super().__init__(index, reserve)
        self.score_key = score_key
        self.recent_fraction = recent_fraction
        self.acc: torch.Tensor | None = None  # (B, Hkv, C) fp32 accumulated attention
        self.pos: torch.Tensor | None = None  # (B, Hkv, C) int32 token positions (relative order is what counts)
        self.cur_pos: torch.Tensor | None = None  # (B,) int32 position of the token being decoded
        self.recent = 0
        self._new: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def fused(self) -> bool:
        return self.acc is not None

    def freeze(self, reserve: int | None = None) -> None:
        if self._kbuf is not None or self._keys is None:
            return
        score = self.extras.get(self.score_key)
        if score is None or self.valid is not None:  # nothing to carry over, or padded rows: the plain static store
            return super().freeze(reserve)
        n = self._keys.shape[2]
        budget = max(n, self.budget_tokens or n)
        cap = budget + 1
        super().freeze(cap - n)
        b, h = score.shape[:2]
        dev = score.device
        self.acc = torch.zeros(b, h, cap, dtype=torch.float32, device=dev)
        self.acc[:, :, :n].copy_(score)
        base = self.seen - n  # positions of the kept slots; only the newest `recent` (contiguous) need be exact
        self.pos = (torch.arange(cap, device=dev, dtype=torch.int32) + base).expand(b, h, cap).contiguous()
        self.cur_pos = torch.full((b,), self.seen, dtype=torch.int32, device=dev)
        self.slot_hk = torch.full((b, h), n, dtype=torch.int32, device=dev)  # where the next token goes
        # portable H2O protects round(budget x fraction) newest tokens; the kernel needs one unprotected slot
        self.recent = min(int(round(budget * self.recent_fraction)), budget)
        del self.extras[self.score_key]  # the score now lives in `acc`

    def append(self, keys: torch.Tensor, values: torch.Tensor, new_valid: torch.Tensor | None) -> None:
        if self._kbuf is None and self._keys is not None and keys.shape[2] == 1:
            self.freeze()
        if not self.fused or keys.shape[2] != 1:
            return super().append(keys, values, new_valid)
        self._new = (keys[:, :, 0], values[:, :, 0])  # written by the fused step in `attend`
        self.seen += 1
        self.length = min(self.length + 1, self.capacity)

    def advance(self, steps: int = 1) -> None:
        if not self.fused:
            return super().advance(steps)
        self.seen += steps
        self.length = min(self.length + steps, self.capacity)

    def attend(self, queries: torch.Tensor, scaling: float, window: int | None = None) -> torch.Tensor:
        if not self.fused or self._new is None or queries.shape[2] != 1:
            return super().attend(queries, scaling, window)
        k_new, v_new = self._new
        self._new = None
        assert self._kbuf is not None and self._vbuf is not None and self.acc is not None
        assert self.pos is not None and self.cur_pos is not None and self.lengths is not None
        q = queries[:, :, 0]
        self.lengths.add_(1).clamp_(max=self.capacity)  # the new token counts (until the buffer is full)
        if self.kernel_attention and queries.is_cuda and _kernels_ok(queries):
            from memfit.kernels.h2o_decode import h2o_decode

            out, _ = h2o_decode(q, self._kbuf, self._vbuf, self.lengths, self.acc, self.pos, self.cur_pos,
                                self.recent, scale=scaling, k_new=k_new.contiguous(), v_new=v_new.contiguous(),
                                slot=self.slot_hk, victim=self.slot_hk)
        else:
            from memfit.kernels.reference import h2o_decode_ref

            idx = self.slot_hk.long()[..., None]
            d = self._kbuf.shape[-1]
            self._kbuf.scatter_(2, idx[..., None].expand(*idx.shape, d), k_new[:, :, None].to(self._kbuf.dtype))
            self._vbuf.scatter_(2, idx[..., None].expand(*idx.shape, self._vbuf.shape[-1]),
                                v_new[:, :, None].to(self._vbuf.dtype))
            self.pos.scatter_(2, idx, self.cur_pos[:, None, None].expand_as(idx).to(self.pos.dtype))
            self.acc.scatter_(2, idx, 0.0)
            out, new_acc, victim = h2o_decode_ref(q, self._kbuf, self._vbuf, self.lengths, self.acc, self.pos,
                                                  self.cur_pos, self.recent, scale=scaling)
            self.acc.copy_(new_acc)
            self.slot_hk.copy_(victim)
        self.cur_pos.add_(1)
        return out[:, :, None]

    def held_per_row(self) -> torch.Tensor:
        """Live tokens per (row, KV head): a full buffer's next victim is already evicted (it is only waiting to be
        overwritten), so it is not counted here — its bytes are, in `nbytes()`."""
        held = super().held_per_row()
        return held - 1 if self.fused and self.length == self.capacity else held

    def nbytes(self) -> int:
        base = super().nbytes()
        return base + tensor_bytes(self.acc, self.pos, self.cur_pos, getattr(self, "slot_hk", None))
