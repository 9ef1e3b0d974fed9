"""Continuous batching over compressed caches: requests join and leave at token granularity.

One scheduler thread owns the model. Each tick it
1. drops cancelled requests (a client that went away) and frees their stores at once;
2. admits waiting requests in FIFO order while their byte reservation (`admission.BytePredictor`) fits what is left
   of `kv_memory` (and `max_batch` allows): the head of the queue is never overtaken, so nobody starves;
3. runs ONE prefill chunk of the oldest admitted request that is still reading its prompt, so a long prompt never
   stalls the running requests for more than a chunk;
4. runs one greedy decode step for every request whose prompt is in: ONE model forward over all of them
   (`memfit.core.batch_view.BatchView`: each row is a request's own store, its own method and length, at its own
   next position; per-step eviction and quantization run per store exactly as alone), or one forward per request
   with `batch_decode=False`;
   Requests whose stores are the fast backend's frozen static buffers (KIVI's codes and ring: snapkv+kivi, kivi;
   dense: the full cache, SnapKV, GemFilter...) and whose method never acts while decoding are moved, once their
   first decode step froze them, into stack blocks (`memfit.core.stacks`): rows of shared buffers, so that inside
   that one forward each layer attends, appends (and flushes) once for all of them instead of once per request
   (`decode_stacked_row_layers_total`). A block's free rows count against `kv_memory` (`kv_stack_slack_bytes`); a
   new block has as many rows as what is left of `kv_memory` allows (if not even two, the request's own buffers
   become a one-row block: no new bytes). While the set of blocks stays the same, their step is one CUDA graph replay (`memfit.graphs.BlockGraph`,
   `decode_graph_replays_total`; `decode_graphs=False` keeps it eager). `stack_decode=False` (`memfit serve
   --no-stack-decode`) keeps every store on its own;
5. if the stores together hold more than `kv_memory` (a prediction was low), preempts the newest running request
   that holds bytes: its store is freed and it goes back to the front of the queue, reserving at least what it
   held; greedy decoding regenerates the same tokens, and the ones already streamed are not sent twice. A request
   running alone is never preempted.

A request decodes in its own forward only when it runs alone, when batching is off, or when its store cannot share
a forward (`alone_reason`: today a tensor-parallel store); /metrics counts such steps (`decode_alone_steps_total`)
and the response's usage says how many of its steps were batched (`decode_steps_batched`, `decode_steps_alone`).
Inside the shared forward, rows of plain dense stores attend in one padded SDPA and the others (quantized,
ragged, static, sliding-window) attend by their store's own call (`attention_own_row_layers_total`). The padded view
is a per-layer transient (`decode_view_bytes`); admission counts only the stores' own bytes.

Each prefill/decode call mirrors `memfit.engine` exactly (prompt selection, `begin_prompt` only when chunking,
`after_prefill`, mask growing by one column per step, positions continuing), so greedy text equals `memfit run`
with the same settings and the same `--prefill-chunk`. A batched step computes the same values up to the order of
floating-point sums (matrix products over n rows, a padded SDPA), so its greedy tokens are those of `memfit run`
too (tests/test_serve.py checks it for every kind of store).
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from memfit.adapters.transformers import MemfitCache, forward
from memfit.api import make_cache
from memfit.core.batch_view import BatchView
from memfit.core.budget import Budget
from memfit.core.spans import enable_spans
from memfit.core.stacks import StackBlocks, release
from memfit.engine import positions_from_mask
from memfit.errors import ConfigError
from memfit.graphs import BlockGraph
from memfit.serve.admission import BytePredictor, ModelShape

Event = tuple[str, Any]  # ("tokens", [ids]) | ("done", finish_reason) | ("error", message)
_ids = itertools.count(1)


@dataclass
class Request:
    """One generation request and its runtime state (owned by the scheduler thread once submitted)."""

    prompt_ids: list[int]
    max_tokens: int
    method: str
    budget: Budget
    params: dict[str, Any]
    sink: Callable[[Event], None]
    eos: frozenset[int] = frozenset()
    id: int = field(default_factory=lambda: next(_ids))
    cancelled: bool = False
    arrived: float = field(default_factory=time.perf_counter)
    reserve_bytes: int = 0  # set aside while the prompt is read
    predicted_bytes: int = 0  # set aside once decoding
    emitted: int = 0  # tokens already sent to the client (survives preemption)
    preemptions: int = 0
    # runtime (reset on preemption)
    cache: Any = None
    tokens: list[int] = field(default_factory=list)
    _prefill: Any = None  # (ids, mask, positions, next_start, chunk) while the prompt is being read
    # host-side decode state: the prompt's mask (decode tokens extend it by ones), the next position and token; a
    # batched step builds its ids and positions in one host-to-device copy each instead of a copy per request
    _mask: torch.Tensor | None = None
    _decoded: int = 0  # decode steps run (columns of ones after _mask)
    _pos: int | None = None  # position of the next input token
    _next: int | None = None  # next input token
    finished: str | None = None
    kv_bytes_held: int = 0
    kv_bytes_full: int = 0
    held_bytes: int = 0  # what its store holds, measured once per tick (Scheduler._measure)
    decode_steps_batched: int = 0  # decode steps that shared one forward with other requests
    decode_steps_alone: int = 0  # decode steps in a forward of its own (running alone, or it cannot share)
    spans: bool = False  # the store keeps whole words/numbers (memfit.core.spans; needs the scheduler's tokenizer)

    @property
    def prefilled(self) -> bool:
        return self.cache is not None and self._prefill is None

    def reserved(self) -> int:
        """Bytes this running request counts against the pool: its reservation or what it holds, if more."""
        want = self.predicted_bytes if self.prefilled else self.reserve_bytes
        return max(want, self.held_bytes)

    def reset(self) -> None:
        if self.cache is not None:
            # empty the store now (its tensors go back to the allocator this tick) rather than trusting that nothing
            # else still refers to the cache: a cache kept alive by any reference cycle would hold its bytes until
            # Python's next full gc pass, outside --kv-memory (issue #11)
            release(self.cache.core.layers)  # its row of a stack block goes to the block's last member
            self.cache.core.reset()
        self.cache = None
        self.held_bytes = 0
        self.tokens = []
        self._prefill = self._mask = self._pos = self._next = None
        self._decoded = 0


class Scheduler:
    """Owns the model; runs prefill chunks and decode steps for every admitted request (see module docstring)."""

    def __init__(
        self,
        model: torch.nn.Module,
        kv_memory: int,
        max_batch: int = 64,
        prefill_chunk: int = 512,
        batch_decode: bool = True,
        tokenizer: Any = None,
        stack_decode: bool = True,
        decode_graphs: bool = True,
    ) -> None:
        self.model = model
        # frozen static stores decode as rows of shared buffers (memfit.core.stacks); only inside batched forwards
        self.stacks = StackBlocks() if stack_decode and batch_decode else None
        self.device = next(model.parameters()).device
        # the stack blocks' step recorded in a CUDA graph and replayed (memfit.graphs.BlockGraph)
        self.block_graph = (BlockGraph(model) if decode_graphs and self.stacks is not None
                            and self.device.type == "cuda" else None)
        self.tokenizer = tokenizer  # span ids of prompts (requests with spans on)
        self.batch_decode = bool(batch_decode)  # False: one forward per request per step (for comparison)
        self.kv_memory = int(kv_memory)
        self.max_batch = int(max_batch)
        self.prefill_chunk = int(prefill_chunk)
        self.predictor = BytePredictor(ModelShape.of(model))
        self.weight_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []  # admission order (oldest first)
        self._inbox: list[Request] = []
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.stats = collections.Counter()  # requests_total, preemptions_total, tokens_generated_total, ...
        self._recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens) for tokens/s
        self.last_error: str | None = None
        # a failed prompt chunk fails only its request (False: the tick raises and every running request fails,
        # as tensor-parallel ranks need: one rank must not go on alone)
        self.isolate_failures = True
        self._snapshot: dict[str, int] = {"kv_bytes_held": 0, "kv_bytes_full": 0, "kv_bytes_reserved": 0,
                                          "decode_batch_size": 0, "decode_view_bytes": 0, "kv_stack_blocks": 0,
                                          "kv_stack_slack_bytes": 0}

    # -- called from the server's threads ------------------------------------------------------------------------
    def reserve_for(self, method: str, budget: Budget, params: dict[str, Any], prompt: int, max_tokens: int,
                    spans: bool = False) -> int:
        return self.predictor.reserve(method, budget, params, prompt, max_tokens, self.prefill_chunk, spans)

    def submit(self, req: Request) -> None:
        if req.spans and self.tokenizer is None:
            raise ConfigError("a request with spans on needs the scheduler's tokenizer (Scheduler(tokenizer=...))")
        req.reserve_bytes = self.reserve_for(req.method, req.budget, req.params, len(req.prompt_ids), req.max_tokens,
                                             req.spans)
        req.predicted_bytes = self.predictor.predict(
            req.method, req.budget, req.params, len(req.prompt_ids), req.max_tokens, req.spans
        )
        with self._cv:
            self._inbox.append(req)
            self._cv.notify()

    def cancel(self, req: Request) -> None:
        req.cancelled = True
        with self._cv:
            self._cv.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="memfit-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def snapshot(self) -> dict[str, Any]:
        """Numbers for /metrics (read without stopping the scheduler; they are a tick old at most)."""
        now = time.perf_counter()
        recent = [(t, n) for t, n in list(self._recent) if now - t <= 10.0]
        span = (now - recent[0][0]) if recent else 0.0
        tps = sum(n for _, n in recent) / max(span, 1.0) if recent else 0.0
        return {
            **self._snapshot,
            "running": len(self.running),
            "waiting": len(self.waiting) + len(self._inbox),
            "kv_memory": self.kv_memory,
            "weight_bytes": self.weight_bytes,
            "tokens_per_second": tps,
            **dict(self.stats),
        }

    # -- the scheduler thread ------------------------------------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._stop and not self._inbox and not self.running and not self.waiting:
                        self._cv.wait(timeout=0.5)
                    if self._stop:
                        break
                try:
                    self.tick()
                except Exception as exc:  # a bug must not take the server down: fail the requests in flight
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    self.stats["scheduler_errors_total"] += 1
                    for req in self.running:
                        self._finish(req, None, error=f"internal error: {self.last_error}")
                    self.running.clear()
        for req in list(self.running) + list(self.waiting) + self._inbox:
            self._finish(req, None, error="the server is shutting down")

    def tick(self) -> None:
        """One scheduler tick (see module docstring): what the scheduler thread runs in a loop. Tests may drive a
        scheduler that was not started by calling it directly."""
        self._take_inbox()
        self._drop_cancelled()
        self._admit()
        reading = next((r for r in self.running if not r.prefilled), None)
        decoding = [r for r in self.running if r.prefilled]  # before the chunk: a request just prefilled waits a tick
        if reading is not None:
            try:
                self._prefill_chunk(reading)
            except Exception as exc:  # noqa: BLE001 - one prompt's failure (a CUDA OOM on its chunk) is its own
                if not self.isolate_failures:
                    raise
                self._fail(reading, exc)
        self._decode_step([r for r in decoding if not r.cancelled and r.finished is None])
        self.running = [r for r in self.running if r.finished is None]
        self._stack()
        self._measure()
        self._enforce_memory()
        self._publish()

    def _take_inbox(self) -> None:
        """Submitted requests join the waiting queue (memfit.serve.tp: rank 0 also tells the other ranks)."""
        with self._cv:
            self.waiting.extend(self._inbox)
            self._inbox.clear()

    def _fail(self, req: Request, exc: Exception) -> None:
        """`req` alone gets the error (its store goes now); the other requests keep running."""
        self.last_error = f"{type(exc).__name__}: {exc}"
        self.stats["scheduler_errors_total"] += 1
        self._finish(req, None, error=f"internal error: {self.last_error}")
        if self.device.type == "cuda":  # what the failed chunk had allocated goes back before the next tick
            torch.cuda.empty_cache()

    def _drop_cancelled(self) -> None:
        for req in [r for r in self.running if r.cancelled]:
            self.running.remove(req)
            req.reset()  # the store goes now: its bytes return to the pool this tick
            self.stats["cancelled_total"] += 1
        if any(r.cancelled for r in self.waiting):
            self.stats["cancelled_total"] += sum(r.cancelled for r in self.waiting)
            self.waiting = collections.deque(r for r in self.waiting if not r.cancelled)

    def _measure(self) -> None:
        """Each running request's held bytes, once per tick: summing every store's tensors costs ~1 ms per 32
        layers on the host, too much to repeat in each check of a tick at a batch of hundreds."""
        for req in self.running:
            block = getattr(req.cache.core.layers[0], "stack", None) if req.cache is not None else None
            # a stacked request holds its row (its layers' nbytes() sum to exactly that: tests/test_stacks.py)
            req.held_bytes = (block.row_nbytes() if block is not None
                              else req.cache.nbytes() if req.cache is not None else 0)

    def _slack(self) -> int:
        return 0 if self.stacks is None else self.stacks.slack_bytes()

    def _stack(self) -> None:
        """Requests whose stores froze this tick join a stack block (see module docstring)."""
        if self.stacks is None:
            return
        self.stacks.drop_empty()
        for req in self.running:
            cache = req.cache
            if (cache is None or not req.prefilled or self.alone_reason(req) is not None
                    or not getattr(getattr(cache, "backend", None), "decode_free", False)):
                continue  # a method that acts while decoding (or no fast backend): its own step must run
            layers = cache.core.layers
            if not self.stacks.can_join(layers):
                continue
            rows = None
            extra = self.stacks.new_block_bytes(layers)
            if extra:
                free = self.kv_memory - sum(r.reserved() for r in self.running) - self._slack()
                if extra > free:  # a smaller block; if not even two rows fit, its own buffers become a block
                    rows = free // self.stacks.row_bytes(layers)
                    if rows < 2:
                        self.stacks.adopt(layers)
                        continue
            self.stacks.join(layers, rows)
        # blocks built small while prompts held the memory merge once it is back (fewer launches per step)
        free = self.kv_memory - sum(r.reserved() for r in self.running) - self._slack()
        merged = self.stacks.compact(free)
        if merged:  # a moved member holds a row of the same bytes: nothing to recount
            self.stats["stack_blocks_merged_total"] += merged
        self._forget_graph()

    def _forget_graph(self) -> None:
        """A recorded block step whose blocks changed (one emptied and freed, a new one) is dropped now: it holds
        the blocks it was recorded on, whose memory would otherwise stay allocated outside `kv_memory`."""
        graph = self.block_graph
        if graph is not None and graph.key is not None and graph.key != BlockGraph.key_of(self.stacks.all_blocks()):
            graph.drop()

    def _admit(self) -> None:
        used = sum(r.reserved() for r in self.running) + self._slack()
        while self.waiting and len(self.running) < self.max_batch:
            head = self.waiting[0]
            need = head.reserve_bytes
            if used + need > self.kv_memory and self.running:
                break  # FIFO: nobody overtakes the head; it goes in once enough bytes come back
            self.waiting.popleft()
            if head.preemptions == 0:
                self.stats["requests_total"] += 1
            self.running.append(head)
            used += need

    def _prefill_chunk(self, req: Request) -> None:
        model = self.model
        if req.cache is None:
            ids = torch.tensor([req.prompt_ids], dtype=torch.long, device=self.device)
            mask = torch.ones_like(ids)
            req.cache = make_cache(model, req.method, req.budget, req.params)
            core = req.cache.core
            for layer in core.layers:  # static stores leave room for exactly this answer (stack rows are that long);
                if hasattr(layer, "reserve"):  # not make_cache's reserve=: that also steers `auto` by decode length
                    layer.reserve = req.max_tokens + 1
                if self.stacks is not None and hasattr(layer, "layout_rows"):
                    # its codes will be read in stack blocks of up to max_rows rows: their layout is chosen for
                    # those (2-bit KIVI in plane order, 18 % faster per step at 128 requests on the H200:
                    # benchmarks/serve/README.md), not for a lone row
                    layer.layout_rows = self.stacks.max_rows
            if req.spans:
                enable_spans(req.cache, self.tokenizer)
            prompt_lens = mask.sum(-1)
            chosen = core.select_prompt(model, ids, mask)
            if chosen is not None:  # GemFilter: prefill only the chosen tokens; the budget still uses the prompt
                core.skipped_prompt_tokens = int(ids.shape[1] - chosen[0].shape[1])
                ids, mask = chosen
            if core.span_rule is not None:  # span ids of what is prefilled, as memfit.engine.prefill_prompt does
                core.prompt_spans = core.span_rule(ids, mask)
            total = ids.shape[1]
            chunk = total if self.prefill_chunk >= total else self.prefill_chunk
            if chunk < total or chosen is not None:
                core.begin_prompt(prompt_lens, total)
            req._prefill = (ids, mask, positions_from_mask(mask), 0, chunk)
        ids, mask, positions, start, chunk = req._prefill
        total = ids.shape[1]
        stop = min(total, start + chunk)
        logits = forward(model, ids[:, start:stop], mask[:, :stop], req.cache, positions[:, start:stop], logits_to_keep=1)
        self.stats["prompt_tokens_total"] += stop - start
        if stop < total:
            req._prefill = (ids, mask, positions, stop, chunk)
            return
        req.cache.core.after_prefill(model, ids, mask)
        req._prefill = None
        req._mask, req._pos, req._decoded = mask, int(positions[0, -1]), 0
        self._take(req, logits[:, -1])

    @staticmethod
    def alone_reason(req: Request) -> str | None:
        """Why this request's store cannot share a batched decode forward, or None."""
        if req.cache.core.tensor_parallel:
            return "tensor-parallel store (its collectives run per forward)"
        return None

    def _decode_step(self, reqs: list[Request]) -> None:
        """One decode step for `reqs`: one shared forward for all that can share it, one forward for each other."""
        if self.block_graph is not None and reqs:
            reqs = self._decode_blocks(reqs)
        shared: list[Request] = []
        alone: list[Request] = []
        for req in reqs:
            (shared if self.batch_decode and self.alone_reason(req) is None else alone).append(req)
        if len(shared) == 1:
            alone, shared = shared + alone, []
        if reqs:
            self._snapshot["decode_batch_size"] = max(len(shared), 1)
            self._snapshot["decode_view_bytes"] = 0
        if shared:
            self._decode_batch(shared)
        for req in alone:
            self._decode(req)
            if len(reqs) > 1:  # it ran alone although others were decoding: say so
                self.stats["decode_alone_steps_total"] += 1

    def _advance(self, req: Request) -> None:
        assert req._mask is not None and req._pos is not None and req._next is not None
        req._decoded += 1
        req._pos += 1

    def _decode(self, req: Request) -> None:
        self._advance(req)
        assert req._mask is not None
        mask = torch.cat([req._mask, req._mask.new_ones(1, req._decoded)], dim=1)
        ids = torch.tensor([[req._next]], dtype=torch.long).to(self.device, non_blocking=True)
        pos = torch.tensor([[req._pos]], dtype=torch.long).to(self.device, non_blocking=True)
        logits = forward(self.model, ids, mask, req.cache, pos, logits_to_keep=1)[:, -1]
        req.decode_steps_alone += 1
        self.stats["decode_forwards_total"] += 1
        self._take(req, logits)

    def _decode_batch(self, reqs: list[Request]) -> None:
        """ONE forward for every request of `reqs`: row i is request i's next token at its own next position,
        attending over its own store (memfit.core.batch_view)."""
        for req in reqs:
            self._advance(req)
        ids = torch.tensor([[r._next] for r in reqs], dtype=torch.long).to(self.device, non_blocking=True)
        positions = torch.tensor([[r._pos] for r in reqs], dtype=torch.long).to(self.device, non_blocking=True)
        new = torch.ones(len(reqs), 1, dtype=torch.long, device=self.device)  # every row's new token is real
        view = BatchView([r.cache.core for r in reqs])
        logits = forward(self.model, ids, new, MemfitCache(view), positions, logits_to_keep=1)[:, -1]
        self.stats["decode_forwards_total"] += 1
        self.stats["decode_batched_rows_total"] += len(reqs)
        self.stats["attention_padded_row_layers_total"] += view.padded_rows
        self.stats["attention_own_row_layers_total"] += view.own_rows
        self.stats["decode_stacked_row_layers_total"] += view.stacked_rows
        self._snapshot["decode_view_bytes"] = view.view_bytes
        for req, tok in zip(reqs, logits.argmax(-1).tolist(), strict=True):  # one host sync for the batch
            req.decode_steps_batched += 1
            self._take_token(req, tok)

    def _decode_blocks(self, reqs: list[Request]) -> list[Request]:
        """Every stacked request's step in the blocks' recorded graph (memfit.graphs.BlockGraph), when every block
        can run it (all its members here, room for the token, kernels on this device); returns the requests left
        for the eager forwards. Free rows get token 0 at position 0; their logits are not read."""
        assert self.stacks is not None and self.block_graph is not None
        blocks = self.stacks.all_blocks()
        if not blocks:
            return reqs
        by_layers = {id(r.cache.core.layers[0]): r for r in reqs if r.cache is not None}
        rows: list[Request | None] = []
        for block in blocks:
            if not block.kernels or not block.room_all():
                return reqs
            for layers in block.members:
                req = by_layers.get(id(layers[0]))
                if req is None:  # a member is not in this step
                    return reqs
                rows.append(req)
            rows.extend([None] * (block.rows - block.used))
        ids = torch.tensor([0 if r is None else r._next for r in rows], dtype=torch.long)
        # each request's next position (what `_advance` gives it below, once the step ran)
        positions = torch.tensor([[0 if r is None else r._pos + 1] for r in rows], dtype=torch.long)
        try:
            logits = self.block_graph.step(blocks, ids.to(self.device, non_blocking=True),
                                           positions.to(self.device, non_blocking=True))
        except Exception as exc:  # noqa: BLE001 - a graph that cannot be recorded here: the eager forward serves
            self.last_error = f"decode graph off: {type(exc).__name__}: {exc}"
            self.block_graph = None
            return reqs
        taken = [r for r in rows if r is not None]
        for req in taken:
            self._advance(req)
        self.stats["decode_forwards_total"] += 1
        self.stats["decode_batched_rows_total"] += len(taken)
        self.stats["decode_stacked_row_layers_total"] += len(taken) * len(blocks[0].buffers)
        self.stats["decode_graph_replays_total"] = self.block_graph.replays
        self.stats["decode_graph_captures_total"] = self.block_graph.captures
        self.stats["decode_graph_capture_seconds_total"] = round(self.block_graph.capture_seconds, 3)
        for req, tok in zip(rows, logits.argmax(-1).tolist(), strict=True):  # one host sync for the step
            if req is not None:
                req.decode_steps_batched += 1
                self._take_token(req, tok)
        done = {id(r) for r in taken}
        return [r for r in reqs if id(r) not in done]

    def _take(self, req: Request, logits: torch.Tensor) -> None:
        """Greedy choice, exactly as the engine: EOS ends the request, else the token counts and is emitted."""
        self._take_token(req, int(logits.argmax(-1)[0]))

    def _take_token(self, req: Request, tok: int) -> None:
        if tok in req.eos:
            self._finish(req, "stop")
            return
        req.tokens.append(tok)
        self.stats["tokens_generated_total"] += 1
        self._recent.append((time.perf_counter(), 1))
        while self._recent and time.perf_counter() - self._recent[0][0] > 10.0:
            self._recent.popleft()
        if len(req.tokens) > req.emitted:  # after a preemption, the regenerated tokens were already sent
            req.sink(("tokens", req.tokens[req.emitted :]))
            req.emitted = len(req.tokens)
        if len(req.tokens) >= req.max_tokens:
            self._finish(req, "length")
            return
        req._next = tok

    def _finish(self, req: Request, reason: str | None, error: str | None = None) -> None:
        if req.cache is not None:
            req.kv_bytes_held, req.kv_bytes_full = req.cache.nbytes(), req.cache.full_nbytes()
        req.finished = reason or "error"
        req.reset()
        try:
            req.sink(("error", error) if error else ("done", reason))
        except Exception:  # the client's event loop is gone; nothing to tell
            pass

    def _enforce_memory(self) -> None:
        held = sum(r.held_bytes for r in self.running) + self._slack()
        while held > self.kv_memory and len(self.running) > 1:
            # the newest request that holds bytes (an admitted one that holds nothing yet frees nothing)
            victim = next((r for r in reversed(self.running[1:]) if r.cache is not None), None)
            if victim is None:
                break
            self.running.remove(victim)
            freed = victim.held_bytes
            held -= freed
            # it comes back only when what it really held fits (no admit-preempt ping-pong on a low prediction)
            victim.reserve_bytes = max(victim.reserve_bytes, freed)
            victim.predicted_bytes = max(victim.predicted_bytes, freed)
            victim.reset()
            victim.preemptions += 1
            self.stats["preemptions_total"] += 1
            self.waiting.appendleft(victim)  # it was admitted before everyone still waiting

    def _publish(self) -> None:
        caches = [r.cache for r in self.running if r.cache is not None]
        self._snapshot = {
            **self._snapshot,
            "kv_bytes_held": sum(r.held_bytes for r in self.running),
            "kv_bytes_full": sum(c.full_nbytes() for c in caches),
            "kv_bytes_reserved": sum(r.reserved() for r in self.running) + self._slack(),
            "kv_stack_blocks": 0 if self.stacks is None else len(self.stacks.all_blocks()),
            "kv_stack_slack_bytes": self._slack(),
        }
        if self.device.type == "cuda":  # what the device really holds, to compare with weights + kv_bytes_held (#11)
            self._snapshot.update(device_allocated_bytes=torch.cuda.memory_allocated(self.device),
                                  device_reserved_bytes=torch.cuda.memory_reserved(self.device),
                                  device_peak_allocated_bytes=torch.cuda.max_memory_allocated(self.device))
