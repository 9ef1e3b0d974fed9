"""The fast backend's KV store: after the prompt, a layer's keys and values live in one preallocated buffer.

`StaticKVLayer` behaves exactly like the dense `KVLayer` (same kept tokens, same order, same validity), but once the
prompt is in (the first single-token append), it moves what the policy kept into buffers of capacity
`held + reserve` (`reserve` = the tokens the runtime will decode). From then on:
- a decode step writes the new token in place (`index_copy_` at a device-side slot counter: no `torch.cat`, no
  reallocation, no host sync — the step can be captured in a CUDA graph);
- attention of the single query runs the split-K Triton kernel of `memfit.kernels` on CUDA (the GQA group is read
  from the KV head, never expanded), and its plain-PyTorch reference elsewhere;
- an eviction at decode (StreamingLLM, H2O, ...) compacts the kept tokens to the front of the same buffer.
`nbytes()` counts the whole buffers (capacity, not just the used slots): the bytes the store really holds.
The buffer grows (doubles) only if a caller decodes past the reserve.
"""

from __future__ import annotations

from typing import Any

import torch

from memfit.core.cache import KVLayer, dense_attention, tensor_bytes

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

    def _unfreeze(self) -> None:
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
            cur_k, cur_v = self.keys, self.values
            assert cur_k is not None and cur_v is not None
            self._alloc(cur_k, cur_v, 2 * self.capacity + q)
        assert self._vbuf is not None and self.slot is not None and self.lengths is not None
        if q == 1:
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
        b, h = keys.shape[:2]
        if new_valid is not None and not bool(new_valid.all()):
            step_valid = new_valid[:, None, :].expand(b, h, q)
            self.valid = torch.cat([self.valid_mask()[:, :, : self.length - q], step_valid], dim=2)
        elif self.valid is not None:
            self.valid = torch.cat([self.valid, self.valid.new_ones(b, h, q)], dim=2)
        for name, state in self.extras.items():
            pad = state.new_zeros(*state.shape[:2], q, *state.shape[3:])
            self.extras[name] = torch.cat([state, pad], dim=2)
        self.seen += q

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
        old_valid = None if self.valid is None else self.valid.gather(2, indices)
        if valid is not None:
            old_valid = valid if old_valid is None else old_valid & valid
        self.valid = None if old_valid is None or bool(old_valid.all()) else old_valid.contiguous()
        for name, state in self.extras.items():
            sidx = indices.reshape(*indices.shape, *([1] * (state.dim() - 3))).expand(*indices.shape, *state.shape[3:])
            self.extras[name] = state.gather(2, sidx).contiguous()

    def select_batch(self, rows: torch.Tensor) -> None:
        self._unfreeze()
        super().select_batch(rows)

    # -- attention -----------------------------------------------------------------------------------------------
    def attend(self, queries: torch.Tensor, scaling: float, window: int | None = None) -> torch.Tensor:
        if self._kbuf is None or queries.shape[2] != 1 or self.valid is not None or window is not None:
            return super().attend(queries, scaling, window)
        assert self._vbuf is not None and self.lengths is not None
        if queries.is_cuda and _kernels_ok(queries):
            from memfit.kernels.kivi_attention import decode_attention

            return decode_attention(queries[:, :, 0], self._kbuf, self._vbuf, self.lengths, scale=scaling)[:, :, None]
        return dense_attention(queries, self.keys, self.values, None, scaling)  # type: ignore[arg-type]

    def nbytes(self) -> int:
        if self._kbuf is None:
            return super().nbytes()
        return tensor_bytes(self._kbuf, self._vbuf, self.slot, self.lengths, self.valid, *self.extras.values())

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["keys"], state["values"] = self.keys, self.values  # the used slots only
        return state


def _kernels_ok(queries: torch.Tensor) -> bool:
    from memfit.kernels import available

    d = queries.shape[-1]
    return available() and d >= 16 and d & (d - 1) == 0 and queries.dtype in (torch.bfloat16, torch.float16)
