"""`memfit serve --tp N`: one OpenAI-compatible server over N tensor-parallel ranks (issue #17).

Every rank holds a shard of the model (transformers' tensor-parallel plan, `memfit.distributed`) and, per request,
a store of its own KV heads. Rank 0 runs the HTTP API and makes every scheduling decision; the other ranks run the
same scheduler without HTTP and follow. Each tick rank 0 broadcasts, over a gloo group of its own (small Python
objects on the CPU, a timeout long enough for an idle server):
1. the requests that arrived and the ones cancelled since the last tick (the HTTP side's cancellations are held
   back until this point, so every rank drops the same requests on the same tick);
2. after admission, the running requests in order;
3. after the memory check, the running requests again (the preempted ones go back to waiting).
So every rank prefills the same chunk and decodes the same requests in the same order, and the model's own
collectives (one all-reduce per block) always pair up. Token choice needs no message: the logits are whole on every
rank, so each takes the same greedy token and meets the same end of sequence.

Bytes: each rank holds 1/N of the KV heads, so `--kv-memory` is per GPU here and the admission's predictions (made
for the whole model's heads) are divided by N. `/metrics` reports rank 0's stores.

Limits: a request's decode step runs in a forward of its own (the batched view does not shard its padded attention
yet); an error inside a tick on one rank only (a CUDA out-of-memory on one GPU) can leave the others waiting in a
collective — the server then has to be restarted.
"""

from __future__ import annotations

import collections
from datetime import timedelta
from typing import Any

from memfit.serve.scheduler import Request, Scheduler


class _Stop(Exception):
    """Rank 0 shut down: the followers leave their loop."""


def _spec(req: Request) -> dict[str, Any]:
    return {"prompt_ids": req.prompt_ids, "max_tokens": req.max_tokens, "method": req.method, "budget": req.budget,
            "params": req.params, "eos": req.eos, "id": req.id, "spans": req.spans}


def _discard(_event: Any) -> None:
    """A follower's request has no client: its events go nowhere (rank 0 answers the client)."""


class TensorParallelScheduler(Scheduler):
    """A `Scheduler` whose decisions rank 0 makes and every other rank mirrors (see module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        import torch.distributed as dist

        super().__init__(*args, **kwargs)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        # every rank creates this group, in the same order; a long timeout: a follower waits out an idle server
        self._group = dist.new_group(backend="gloo", timeout=timedelta(days=365))
        self._pending_cancel: set[int] = set()
        self.isolate_failures = False  # a failure on one rank only would leave the ranks' schedules apart

    def _bcast(self, obj: Any) -> Any:
        import torch.distributed as dist

        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0, group=self._group)
        return box[0]

    # -- rank 0's HTTP side ----------------------------------------------------------------------------------------
    def reserve_for(self, *args: Any, **kwargs: Any) -> int:
        return -(-super().reserve_for(*args, **kwargs) // self.world)  # this GPU's share of the heads, rounded up

    def submit(self, req: Request) -> None:
        super().submit(req)
        req.predicted_bytes = -(-req.predicted_bytes // self.world)

    def cancel(self, req: Request) -> None:
        with self._cv:  # applied at the next tick's broadcast, on every rank at once
            self._pending_cancel.add(req.id)
            self._cv.notify()

    def stop(self) -> None:
        super().stop()
        if self.rank == 0:
            self._bcast({"stop": True})

    # -- every rank: the tick's decisions ----------------------------------------------------------------------------
    def _take_inbox(self) -> None:
        if self.rank == 0:
            with self._cv:
                new, self._inbox = self._inbox, []
                cancel, self._pending_cancel = self._pending_cancel, set()
            self._bcast({"stop": False, "new": [_spec(r) for r in new], "cancel": sorted(cancel)})
        else:
            msg = self._bcast(None)
            if msg["stop"]:
                raise _Stop
            new = [Request(s["prompt_ids"], s["max_tokens"], s["method"], s["budget"], s["params"], _discard,
                           eos=s["eos"], id=s["id"], spans=s["spans"]) for s in msg["new"]]
            cancel = set(msg["cancel"])
        self.waiting.extend(new)
        for req in (*self.running, *self.waiting):
            if req.id in cancel:
                req.cancelled = True

    def _admit(self) -> None:
        self._decide(super()._admit)

    def _enforce_memory(self) -> None:
        self._decide(super()._enforce_memory)

    def _decide(self, decision: Any) -> None:
        """Rank 0 runs the scheduler's `decision` and sends the running list it leaves; the others take that list."""
        if self.rank == 0:
            decision()
            self._bcast([r.id for r in self.running])
        else:
            self._mirror(self._bcast(None))

    def _mirror(self, running_ids: list[int]) -> None:
        """Take rank 0's running list: admitted requests leave the waiting queue, preempted ones rejoin its front."""
        by_id = {r.id: r for r in (*self.running, *self.waiting)}
        keep = set(running_ids)
        preempted = [r for r in self.running if r.id not in keep]
        for req in preempted:
            req.reset()
            req.preemptions += 1
        self.running = [by_id[i] for i in running_ids]
        self.waiting = collections.deque([*preempted, *(r for r in self.waiting if r.id not in keep)])

    def follow(self) -> None:
        """A follower rank's loop: one tick per tick of rank 0, until rank 0 stops."""
        import torch

        with torch.inference_mode():
            while True:
                try:
                    self.tick()
                except _Stop:
                    return
