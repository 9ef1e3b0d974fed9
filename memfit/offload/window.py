"""The streaming window shared by Superpipeline and TPI-LLM: streamed units in execution order, at most `k` of them
on the device (loaded or in flight), the next `prefetch` ones loaded ahead while the current one computes.

The order is cyclic: after the last streamed unit of a forward call comes the first one of the next call (the
next token), so decode keeps the loader busy across token boundaries.
"""

from __future__ import annotations

from collections import deque

from memfit.offload.streamer import Unit, WeightStreamer


class Window:
    def __init__(self, streamer: WeightStreamer, order: list[Unit], k: int, prefetch: int,
                 release_before: bool) -> None:
        self.s, self.order, self.k, self.prefetch = streamer, order, k, min(prefetch, max(0, k - 1))
        self.release_before = release_before
        self.pos = {u.index: i for i, u in enumerate(order)}
        self.finished: deque[Unit] = deque()  # computed units still on the device, oldest first

    def held(self) -> int:
        return sum(1 for u in self.order if u.state != "offloaded")

    def before(self, unit: Unit) -> None:
        if self.release_before:  # TPI-LLM's wait_and_release: earlier units go before this one computes
            while self.finished:
                self.s.release(self.finished.popleft())
        if unit in self.finished:  # computing again (next token) while still held: not a release candidate now
            self.finished.remove(unit)
        if unit.state == "offloaded":
            self._make_room(protect={unit.index})
        self.s.wait(unit)
        self._prefetch_after(unit)

    def after(self, unit: Unit) -> None:
        unit.finished = True
        self.finished.append(unit)

    def _make_room(self, protect: set[int]) -> bool:
        while self.held() >= self.k:
            victim = next((u for u in self.finished if u.index not in protect and u.state != "offloaded"), None)
            if victim is None:
                return False
            self.finished.remove(victim)
            self.s.release(victim)
        return True

    def _prefetch_after(self, unit: Unit) -> None:
        i, n = self.pos[unit.index], len(self.order)
        ahead = [self.order[(i + j) % n] for j in range(1, min(self.prefetch, n - 1) + 1)]
        protect = {unit.index} | {u.index for u in ahead}
        for nxt in ahead:
            if nxt.state != "offloaded":
                if nxt in self.finished:  # still held and about to be used again: keep it
                    self.finished.remove(nxt)
                continue
            if not self._make_room(protect):
                return
            self.s.load(nxt, prefetch=True)
