"""Stacks: many requests' frozen static stores in shared buffers, one row each, so that one decode step of a batch
attends (appends, flushes) once per layer for all of them (continuous batching in `memfit serve`, issue #11).

Why. In the server each request keeps its own store (its own length, method and budget). On the fast backend a
KIVI store freezes after its prompt into fixed buffers of one row (`memfit.core.static_quant_store`), and a shared
decode forward (`memfit.core.batch_view.BatchView`) then ran each row's attention, append and flush as launches of
its own: 32 requests x 32 layers x ~6 launches plus their Python per step (468 ms per step for 32 requests of 8K
tokens on an H200, against 47 ms for one request alone: benchmarks/serve/README.md). The kernels already take a
length per row; what was missing is one tensor that holds the rows.

What. A `StackBlock` holds, for every layer of the model, a store's buffers with a leading dimension of `rows`
requests and one set of step counters per row and layer: for `StaticKIVILayer` the codes, scales, zeros and
full-precision ring and its counters (tokens held, keys and values quantized, ring slot, kernel lengths); for the
dense `StaticKVLayer` (the full cache, SnapKV, GemFilter...) the key and value buffers, the write slot and lengths.
A request joins a block once all its layers are frozen: its rows are copied in and each of its layers then *points
into* the block (its buffers and counters become views of row r), so the store keeps working alone exactly as before
(a lone decode step, unfreezing, reading) while `step` decodes every member of the block at once, whatever their
number — KIVI: one attention launch (the new token written into each row's own ring slot), two flush launches and
one counter launch per layer, the kernels of a lone store reading per-row counters (`memfit.kernels.kivi_flush`);
dense: one attention launch that first writes each row's token at its own length, and the counters' increments.
Each store class says how (`stack_step`). Members stay in rows 0..n-1: a leaving member's row is filled with the
last member's (one row copy), so the kernels run on the first n rows.

Which stores. Frozen `StaticKIVILayer`s (KIVI alone or behind a prompt-time eviction: snapkv+kivi) and plain
`StaticKVLayer`s (not per-step rules such as H2O's accumulated store, not sliding-window layers), of caches whose
method never acts during decoding (the runtime decides: `Backend.decode_free`), every layer frozen, same shapes,
layout and dtype. A block's capacity (tokens per row) is the members' largest need rounded up to a 32nd of an
octave (`capacity_class`), so requests of similar lengths share a block and none holds more than 1/32 above its own
capacity (plus the store's rounding unit); other lengths open another block.

Bytes. A member's `nbytes()` counts its row (views: the row's share of each buffer). A block's free rows are
allocated but held by nobody: `StackBlocks.slack_bytes()` reports them, and the server counts them against
`--kv-memory`. Blocks are allocated whole, `first_rows` rows first, each new block of a key twice the last up to
`max_rows` (`MEMFIT_STACK_ROWS`, default 64: larger blocks mean fewer launches per step but larger allocations),
or as many rows as the memory left allows when that is fewer (the server's full-cache mode: a row of an 8K-token
Llama-3.1-8B request is 1.1 GB), and freed when their last member leaves. Small blocks of a key merge into one
once the memory allows it (`StackBlocks.compact`, called by the server every tick).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from memfit.core.store import tensor_bytes
from memfit.errors import ConfigError

__all__ = ["BlockView", "StackBlock", "StackBlocks", "capacity_class", "release"]

def capacity_class(need: int, unit: int) -> int:
    """The smallest m * 2^k >= need (m in 32..64: 32nd octaves, at most 1/32 above need), rounded up to a multiple
    of `unit` (so at most 1.03125 * need + unit). Finer classes waste less of each row (an 8K-token full-cache row of
    Llama-3.1-8B is 1.1 GB) but split requests over more blocks; since a block's step is a graph replay
    (memfit.graphs.BlockGraph), more blocks cost little per step."""
    k = max(need.bit_length() - 6, 0)
    c = -(-max(need, 1) // (1 << k)) << k
    return -(-c // unit) * unit


def _stackable(layer: Any) -> bool:
    return callable(getattr(layer, "stackable", None)) and layer.stackable()


def stack_key(layers: Sequence[Any]) -> tuple | None:
    """What a block of these layers must share (None: they cannot be stacked)."""
    if not layers or not all(_stackable(layer) for layer in layers):
        return None
    signature = layers[0].stack_signature()
    if any(layer.stack_signature() != signature for layer in layers[1:]):
        return None
    need = max(layer.capacity for layer in layers)
    return (len(layers), signature, capacity_class(need, layers[0].capacity_unit()))


def _row_bytes_at(layers: Sequence[Any], capacity: int) -> int:
    """Bytes of one block row of these layers at `capacity` tokens (buffers and counters; nothing allocated)."""
    probe = layers[0].alloc_stack(1, capacity, device=torch.device("meta"))
    _, counters = layers[0].stack_parts()
    return len(layers) * (tensor_bytes(*probe.values()) + sum(t.element_size() for t in counters.values()))


class StackBlock:
    """`rows` rows of every layer's buffers and per-row counters (see module docstring). What the buffers are and
    how a step runs over them is the stores' own (`stack_parts`, `alloc_stack`, `stack_step` of
    `memfit.core.static_store.StaticKVLayer` and `memfit.core.static_quant_store.StaticKIVILayer`)."""

    def __init__(self, layers: Sequence[Any], rows: int, capacity: int) -> None:
        self.rows, self.capacity = rows, capacity
        self.buffers = [layer.alloc_stack(rows, capacity) for layer in layers]
        _, counters = layers[0].stack_parts()
        self.counters = {name: torch.zeros(len(layers), rows, dtype=t.dtype, device=t.device)
                         for name, t in counters.items()}
        self.members: list[list[Any]] = []  # row r -> that request's layers
        self._row_nbytes = self._one_row_nbytes()
        # one call per layer for all members where the kernels run (CUDA, half precision, shapes they take);
        # elsewhere members step one by one
        self.kernels = layers[0].stack_kernels()
        self.adopted = False  # see `adopt`

    @classmethod
    def adopt(cls, layers: Sequence[Any]) -> StackBlock:
        """A one-row block made of a request's own buffers: nothing copied, no new bytes but its layers' counters
        gathered into (layers, 1) tensors. For a server with no room left for a block's new rows (the full cache
        at full memory: a row of a 32K-token Llama-3.1-8B request is 4.3 GB), so its step still joins the blocks'
        graph. Its capacity is the smallest of its layers' (own buffers, no capacity class); no one else joins it."""
        block = cls.__new__(cls)
        block.rows, block.capacity = 1, min(layer.capacity for layer in layers)
        parts = [layer.stack_parts() for layer in layers]
        block.buffers = [dict(own) for own, _ in parts]
        block.counters = {name: torch.stack([c[name].reshape(1) for _, c in parts]) for name in parts[0][1]}
        block.members = [list(layers)]
        block._row_nbytes = block._one_row_nbytes()
        block.kernels = layers[0].stack_kernels()
        block.adopted = True
        block._point(0)
        return block

    def _one_row_nbytes(self) -> int:
        return sum(tensor_bytes(*(t[0] for t in bufs.values())) for bufs in self.buffers) + sum(
            c[:, 0].numel() * c.element_size() for c in self.counters.values())

    # -- membership ----------------------------------------------------------------------------------------------
    @property
    def used(self) -> int:
        return len(self.members)

    def row_nbytes(self) -> int:
        """Bytes of one row: what a member's layers count together."""
        return self._row_nbytes

    def nbytes(self) -> int:
        return sum(tensor_bytes(*bufs.values()) for bufs in self.buffers) + tensor_bytes(*self.counters.values())

    def join(self, layers: Sequence[Any]) -> int:
        """Copy a request's frozen layers into the next free row; each layer then points into it."""
        r = self.used
        if r >= self.rows:
            raise ValueError("stack block is full")
        for li, layer in enumerate(layers):
            own, counters = layer.stack_parts()
            for name, buf in self.buffers[li].items():
                src = own[name][0]
                n = src.shape[1]
                buf[r, :, :n].copy_(src)
                buf[r, :, n:].zero_()  # plane-order flushes OR into zeroed bytes; stale codes never stay
            for name, t in counters.items():
                self.counters[name][li, r].copy_(t[0])
        self.members.append(list(layers))
        self._point(r)
        return r

    def _point(self, r: int) -> None:
        for li, layer in enumerate(self.members[r]):
            layer.set_stack_parts({name: buf[r : r + 1] for name, buf in self.buffers[li].items()},
                                  {name: c[li, r : r + 1] for name, c in self.counters.items()})
            layer.stack, layer.stack_row = self, r

    def leave(self, r: int, keep: bool) -> None:
        """Row r leaves: its layers get buffers of their own again (`keep`: a copy of the row, still frozen) or
        none (the request is done; the caller resets it). The last member moves into row r."""
        for layer in self.members[r]:
            if keep:  # an adopted block's row is the layer's own buffers already: nothing to copy
                own, counters = layer.stack_parts()
                layer.set_stack_parts(dict(own) if self.adopted else {name: t.clone() for name, t in own.items()},
                                      {name: t.clone() for name, t in counters.items()})
            else:
                layer.set_stack_parts(None, None)
            layer.stack, layer.stack_row = None, -1
        last = self.used - 1
        if r != last:
            for li in range(len(self.buffers)):
                for buf in self.buffers[li].values():
                    buf[r].copy_(buf[last])
                for c in self.counters.values():
                    c[li, r].copy_(c[li, last])
            self.members[r] = self.members[last]
            self.members.pop()
            self._point(r)
        else:
            self.members.pop()

    def absorb(self, other: StackBlock) -> None:
        """Move every member of `other` (a block of the same key, or an adopted one-row block of that key) into this
        block's next free rows, in their order; their layers then point here and `other` is left empty. Blocks of
        one capacity move whole rows (their zeroed tails included) in one copy per buffer and counter; an adopted
        row (its own buffers, maybe a smaller capacity) moves as `join` copies it."""
        n, r0 = other.used, self.used
        if other is self or self.adopted:
            raise ValueError("a block merges into another block of shared buffers")
        if r0 + n > self.rows:
            raise ValueError(f"stack block has {self.rows - r0} free rows, {n} members to take")
        if len(other.buffers) != len(self.buffers) or other.capacity > self.capacity:
            raise ValueError("stack blocks of different keys cannot merge")
        if other.adopted or other.capacity != self.capacity:
            for layers in other.members:
                self.join(layers)
            other.members = []
            return
        for mine, theirs in zip(self.buffers, other.buffers, strict=True):
            for name, buf in mine.items():
                buf[r0 : r0 + n].copy_(theirs[name][:n])
        for name, c in self.counters.items():
            c[:, r0 : r0 + n].copy_(other.counters[name][:, :n])
        for layers in other.members:
            self.members.append(layers)
            self._point(len(self.members) - 1)
        other.members = []

    # -- one decode step for every member -------------------------------------------------------------------------
    def step(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor,
             scaling: float) -> torch.Tensor:
        """Append, attend (and flush) for rows 0..n-1 (every member, in row order): keys/values (n, Hkv, 1, d),
        queries (n, H, 1, d); returns (n, H, 1, d). The members' host mirrors advance (`advance(1)`)."""
        out = self.step_rows(layer_idx, keys, values, queries, scaling, self.used)
        for layers in self.members:
            layers[layer_idx].advance(1)
        return out

    def step_rows(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor,
                  scaling: float, n: int) -> torch.Tensor:
        """The device half of `step` on rows 0..n-1 (n may be `rows`: free rows too, see `fill_free_rows`); no host
        mirror moves, so a CUDA graph can record it (`memfit.graphs.BlockGraph`)."""
        bufs = {name: buf[:n] for name, buf in self.buffers[layer_idx].items()}
        counters = {name: t[layer_idx, :n] for name, t in self.counters.items()}
        return self.members[0][layer_idx].stack_step(bufs, counters, keys, values, queries, scaling)

    def fill_free_rows(self) -> None:
        """Set free rows' counters to an empty row's (`stack_empty` of the store), before a step over every row (a
        graph recorded for the block's full size, whatever its member count): each free row then appends one token
        at its first slot and attends over it alone — next to nothing to compute, nothing written past its
        capacity, an output nobody reads. Without this a free row's stale counters (a member that left) would make
        it cost a member's attention and grow past the capacity step after step."""
        n = self.used
        if 0 < n < self.rows:
            empty = self.members[0][0].stack_empty()
            for name, c in self.counters.items():
                c[:, n:].fill_(empty[name])

    def advance_members(self) -> None:
        """Every member's host mirrors of one step (what `step` does per layer), after a graph's replay."""
        for layers in self.members:
            for layer in layers:
                layer.advance(1)

    def room(self, layer_idx: int) -> bool:
        """Every member's layer has room for one more token (checked before a step: a step never grows; layers
        may hold different counts, e.g. under a pyramid budget)."""
        return all(layers[layer_idx].length + 1 <= self.capacity for layers in self.members)

    def room_all(self) -> bool:
        """`room` at every layer."""
        cap = self.capacity - 1
        return all(layer.length <= cap for layers in self.members for layer in layers)


class StackBlocks:
    """The blocks of a server: which block a request joins, and the bytes they hold (see module docstring)."""

    def __init__(self, first_rows: int = 4, max_rows: int | None = None) -> None:
        if max_rows is None:
            raw = os.environ.get("MEMFIT_STACK_ROWS", "64")
            try:
                max_rows = int(raw)
            except ValueError:
                raise ConfigError(f"MEMFIT_STACK_ROWS={raw!r}: give the most rows of one stack block (>= 1)") from None
        if max_rows < 1 or first_rows < 1:
            raise ConfigError("stack blocks need at least one row")
        self.first_rows, self.max_rows = min(first_rows, max_rows), max_rows
        self.blocks: dict[tuple, list[StackBlock]] = {}
        self._row_bytes: dict[tuple, int] = {}

    def can_join(self, layers: Sequence[Any]) -> bool:
        return stack_key(layers) is not None

    def new_block_bytes(self, layers: Sequence[Any]) -> int:
        """Bytes a new block for these layers would allocate (0 if a block of theirs has a free row)."""
        key = stack_key(layers)
        if key is None:
            return 0
        blocks = self.blocks.get(key, [])
        if any(b.used < b.rows for b in blocks):
            return 0
        return self._next_rows(blocks) * self.row_bytes(layers)

    def _next_rows(self, blocks: list[StackBlock]) -> int:
        return min(self.max_rows, 2 * blocks[-1].rows) if blocks else self.first_rows

    def row_bytes(self, layers: Sequence[Any]) -> int:
        """Bytes of one row of a block for these layers (0 if they cannot be stacked). Cached per block key: the
        server asks for every request that waits for a block, every tick."""
        key = stack_key(layers)
        if key is None:
            return 0
        return self._key_row_bytes(key, layers)

    def _key_row_bytes(self, key: tuple, layers: Sequence[Any]) -> int:
        """`row_bytes` by key, for layers of that key (members of a block too: their own `stack_key` is None)."""
        cached = self._row_bytes.get(key)
        if cached is None:
            cached = self._row_bytes[key] = _row_bytes_at(layers, key[-1])
        return cached

    def join(self, layers: Sequence[Any], rows: int | None = None) -> StackBlock:
        """Put a request's layers into a free row of their block, or into a new block of `rows` rows (default:
        twice the last block's, `first_rows` for the first, at most `max_rows`; a caller short of memory asks for
        fewer, as few as 1)."""
        key = stack_key(layers)
        if key is None:
            raise ValueError("these layers cannot be stacked (see memfit.core.stacks.stack_key)")
        blocks = self.blocks.setdefault(key, [])
        block = next((b for b in blocks if b.used < b.rows), None)
        if block is None:
            n = self._next_rows(blocks) if rows is None else max(1, min(int(rows), self.max_rows))
            block = StackBlock(layers, n, key[-1])
            blocks.append(block)
        block.join(layers)
        return block

    def adopt(self, layers: Sequence[Any]) -> StackBlock:
        """A one-row block of the request's own buffers (`StackBlock.adopt`): no new bytes."""
        key = stack_key(layers)
        if key is None:
            raise ValueError("these layers cannot be stacked (see memfit.core.stacks.stack_key)")
        block = StackBlock.adopt(layers)
        self.blocks.setdefault((*key, "own"), []).append(block)  # never a free row for `join` to find
        return block

    def compact(self, room: int) -> int:
        """Merge each key's emptiest blocks (adopted one-row blocks included) into one new block of at most
        `max_rows` rows whose bytes fit in `room`: their members' rows, plus the free rows they had where `room`
        allows; returns how many blocks went. What a merge frees (the old blocks' free rows) makes room for the
        next one, a tick later.

        Why: a server short of memory while prompts are being read builds blocks as small as the memory then left
        allows (`join(rows=...)`, or a request's own buffers, `adopt`), and every block costs its own launches per
        layer (attention, flushes, counters) and graph nodes: 96 requests of 32K tokens in 19 blocks stepped in
        63 ms on an H200, 71 % of its GPU time in the attention kernel's 608 launches, a one-row launch costing
        ~5x a row of a large one (benchmarks/serve/README.md). Free rows are kept because the next joiners take
        them (no merge per join). The old blocks go once the caller drops its references (the server forgets its
        recorded graph when the blocks change); until then both exist, hence `room`."""
        gone = 0
        for base in dict.fromkeys(k[:-1] if k[-1] == "own" else k for k in self.blocks):
            pool = [b for k in (base, (*base, "own")) for b in self.blocks.get(k, []) if b.used]
            if len(pool) < 2:
                continue
            row = self._key_row_bytes(base, pool[0].members[0])
            take: list[StackBlock] = []
            used = held = 0
            for b in sorted(pool, key=lambda b: b.used):  # the emptiest first: most blocks per merge
                if used + b.used > self.max_rows or (used + b.used) * row > room:
                    break
                take.append(b)
                used += b.used
                held += b.rows
            if len(take) < 2:
                continue
            # the free rows they had stay free where the memory allows (the next joiners take them), else go
            total = max(used, min(self.max_rows, held, room // row))
            merged = StackBlock(take[0].members[0], total, base[-1])
            for b in take:
                merged.absorb(b)
            for k in (base, (*base, "own")):
                if k in self.blocks:
                    self.blocks[k] = [b for b in self.blocks[k] if b.used]
            self.blocks.setdefault(base, []).append(merged)
            room -= total * row
            gone += len(take) - 1
        return gone

    def drop_empty(self) -> None:
        for key in list(self.blocks):
            self.blocks[key] = [b for b in self.blocks[key] if b.used]
            if not self.blocks[key]:
                del self.blocks[key]

    def all_blocks(self) -> list[StackBlock]:
        return [b for blocks in self.blocks.values() for b in blocks]

    def nbytes(self) -> int:
        return sum(b.nbytes() for b in self.all_blocks())

    def slack_bytes(self) -> int:
        """Bytes of allocated rows no request holds."""
        return sum((b.rows - b.used) * b.row_nbytes() for b in self.all_blocks())


def release(layers: Sequence[Any], keep: bool = False) -> None:
    """Take a request's layers out of their stack block (no-op if they are in none)."""
    first = layers[0] if layers else None
    block = getattr(first, "stack", None)
    if block is not None:
        block.leave(first.stack_row, keep)


class _BlockLayerStub:
    """What the transformers Cache bookkeeping reads of one layer of a `BlockView` (see batch_view._LayerStub)."""

    def __init__(self, blocks: list[StackBlock], index: int) -> None:
        self.blocks, self.index = blocks, index

    @property
    def keys(self) -> torch.Tensor | None:
        return self.blocks[0].members[0][self.index].keys

    @property
    def seen(self) -> int:
        return max(layers[self.index].seen for b in self.blocks for layers in b.members)


class BlockView:
    """Whole stack blocks, every row (members and free rows, `StackBlock.fill_free_rows`), seen by the model as one
    cache of sum(rows) rows, block after block: each layer runs each block's one call over all its rows and no host
    mirror moves (`StackBlock.step_rows`), so one decode forward through it can be recorded in a CUDA graph and
    replayed while the blocks stay the same, whatever their member counts (`memfit.graphs.BlockGraph`)."""

    tensor_parallel = False

    def __init__(self, blocks: Sequence[StackBlock]) -> None:
        if not blocks:
            raise ValueError("a block view needs at least one stack block")
        self.blocks = list(blocks)
        n_layers = {len(b.buffers) for b in self.blocks}
        if len(n_layers) != 1:
            raise ValueError(f"stack blocks of one forward must have the same layer count, got {sorted(n_layers)}")
        self.layers = [_BlockLayerStub(self.blocks, i) for i in range(n_layers.pop())]
        self.offsets = [0]
        for b in self.blocks:
            self.offsets.append(self.offsets[-1] + b.rows)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def rows(self) -> int:
        return self.offsets[-1]

    def step(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor, scaling: float,
             new_valid: torch.Tensor | None) -> torch.Tensor:
        if keys.shape[0] != self.rows or keys.shape[2] != 1:
            raise ValueError(f"a block view decodes one token for each of its {self.rows} rows, "
                             f"got keys {tuple(keys.shape)}")
        if len(self.blocks) == 1:
            return self.blocks[0].step_rows(layer_idx, keys, values, queries, scaling, self.blocks[0].rows)
        out = torch.empty_like(queries)
        for b, lo, hi in zip(self.blocks, self.offsets, self.offsets[1:], strict=False):
            out[lo:hi] = b.step_rows(layer_idx, keys[lo:hi], values[lo:hi], queries[lo:hi], scaling, b.rows)
        return out
