"""The weight streamer: three tiers, one asynchronous loader, counters. Policies decide what moves when.

Tiers
- **device**: where compute runs (a CUDA GPU; on a CPU-only machine the CPU itself). Resident units live here
  for the whole run; streamed units only while a policy holds them.
- **cpu**: a host copy of each streamed unit, in pinned (page-locked) memory when the device is CUDA, so copies
  run as DMA on a side stream while the GPU computes. On a CPU device this tier *is* the compute memory: loading is
  a pointer swap and moves no bytes (the counters say 0).
- **disk**: one safetensors file per unit in the offload folder, read through a memory map (safetensors'
  `safe_open`) when the unit is loaded. Reads go through the OS page cache, so a unit read twice may not touch the
  disk the second time; the byte counters count what was read into new tensors either way.

Loader: one background thread reads disk units (and on CUDA, issues their host-to-device copy on a side stream);
pinned-CPU units are copied on the side stream from the calling thread (the copy is asynchronous already). A
load returns a `Pending`; `wait` installs the tensors into the module's parameters. On CUDA the compute stream
waits on the copy's event (no host sync) and `record_stream` tells the allocator the compute stream uses them.

Units: a unit is a module whose parameters move together (a decoder layer, an attention or MLP block, one expert
of a MoE layer). A streamed unit's parameters hold an empty placeholder while it is not loaded, so a forward
that ran without its hook would fail loudly instead of computing with stale weights.

Hooks: `accelerate.hooks.ModelHook` subclasses attached with `add_hook_to_module`; `pre_forward` makes sure the
unit is loaded (and lets the policy prefetch), `post_forward` lets the policy release.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["OffloadStats", "Pending", "Unit", "WeightStreamer"]


@dataclass
class OffloadStats:
    """What the streamer did. Bytes are counted when a load completes; stall time is host time spent waiting."""

    policy: str = ""
    units_streamed: int = 0
    units_resident: int = 0
    bytes_resident_device: int = 0  # parameters that never leave the device
    bytes_cpu_tier: int = 0  # host copies of streamed units (pinned on CUDA)
    bytes_disk_tier: int = 0  # unit files on disk
    window_units: int = 0  # streamed units the policy may hold on the device at once
    loads: int = 0
    prefetch_loads: int = 0
    on_demand_loads: int = 0  # loads not issued by a prediction (the unit was needed now, or next in the call)
    bytes_moved: int = 0  # bytes copied into the device tier (0 for cpu-tier units on a CPU device)
    bytes_read_disk: int = 0
    stall_seconds: float = 0.0  # host time blocked waiting for loads
    peak_streamed_device_bytes: int = 0  # most streamed-unit bytes held (loaded or in flight) on the device at once
    expert_hits: int = 0  # MoE: expert needed and already on the device or in flight (prefetched)
    expert_misses: int = 0
    steps: int = 0  # model forward calls
    decode_steps: int = 0  # forward calls with one new token per row
    decode_bytes_moved: int = 0
    decode_stall_seconds: float = 0.0
    throttle_seconds: float = 0.0  # CUDA: host time waiting for the GPU to finish with released weights
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "extra"}
        d.update(self.extra)
        # peak weight bytes per tier: device (resident + the most streamed units held at once), CPU tier, disk
        d["peak_bytes_per_tier"] = {"device": self.bytes_resident_device + self.peak_streamed_device_bytes,
                                    "cpu": self.bytes_cpu_tier, "disk": self.bytes_disk_tier}
        d["bytes_moved_per_token"] = self.decode_bytes_moved / self.decode_steps if self.decode_steps else 0.0
        d["stall_seconds_per_token"] = self.decode_stall_seconds / self.decode_steps if self.decode_steps else 0.0
        hits = self.expert_hits + self.expert_misses
        if hits:
            d["expert_hit_rate"] = self.expert_hits / hits
        return d


@dataclass
class Unit:
    """Parameters that move together. `params` maps a name to the live Parameter object of the model."""

    index: int
    name: str
    params: dict[str, torch.nn.Parameter]
    nbytes: int
    home: str = "device"  # device | cpu | disk
    host: dict[str, torch.Tensor] | None = None  # cpu tier copy
    file: Path | None = None  # disk tier file
    state: str = "loaded"  # loaded | pending | offloaded
    pending: Pending | None = None
    finished: bool = False  # computed since it was loaded (a policy may release it)
    # tensors of a unit that is not a module's parameters (MoE experts): filled on install
    tensors: dict[str, torch.Tensor] | None = None


class Pending:
    """An in-flight load: a future (disk reads) and/or a CUDA event (host-to-device copy)."""

    def __init__(
        self, tensors: dict[str, torch.Tensor] | None = None, future: Future | None = None,
        event: Any = None, prefetch: bool = False,
    ) -> None:
        self.tensors, self.future, self.event, self.prefetch = tensors, future, event, prefetch

    def result(self) -> dict[str, torch.Tensor]:
        if self.future is not None:
            self.tensors, self.event = self.future.result()
            self.future = None
        assert self.tensors is not None
        return self.tensors


class WeightStreamer:
    """Owns the units, the tiers and the loader; policies call `load`, `wait`, `release`."""

    def __init__(self, device: torch.device, policy_name: str) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memfit-offload")
        self.units: list[Unit] = []
        self.stats = OffloadStats(policy=policy_name)
        self._held = 0  # streamed bytes loaded or in flight on the device
        self._decode = False
        self._frees: deque[Any] = deque()  # CUDA: events after the last use of released units
        self.hooks: list[tuple[torch.nn.Module, Any]] = []

    # -- tiers ---------------------------------------------------------------------------------------------------
    def add_unit(
        self, name: str, params: dict[str, torch.nn.Parameter], home: str, folder: Path | None,
        tensors: dict[str, torch.Tensor] | None = None,
    ) -> Unit:
        """Register a unit and move it to its home tier (device, cpu or disk); returns it. A unit is either a
        module's `params` (installed into them on load) or loose `tensors` (read back from `unit.tensors`)."""
        source = tensors if tensors is not None else {n: p.data for n, p in params.items()}
        nbytes = sum(t.numel() * t.element_size() for t in source.values())
        unit = Unit(len(self.units), name, params, nbytes, home)
        self.units.append(unit)
        if home == "device":
            for p in params.values():
                p.data = p.data.to(self.device)
            if tensors is not None:
                unit.tensors = {n: t.to(self.device) for n, t in tensors.items()}
            self.stats.units_resident += 1
            self.stats.bytes_resident_device += nbytes
            return unit
        host = {n: self._to_host(t) for n, t in source.items()}
        if home == "disk":
            from safetensors.torch import save_file

            assert folder is not None
            unit.file = folder / f"{len(self.units) - 1:05d}-{name.replace('/', '_')}.safetensors"
            save_file({n: t.contiguous() for n, t in host.items()}, str(unit.file))
            self.stats.bytes_disk_tier += unit.file.stat().st_size
            host = None
        else:
            self.stats.bytes_cpu_tier += nbytes
        unit.host = host
        self._offload(unit)
        self.stats.units_streamed += 1
        return unit

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().to("cpu")
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():  # a view (one expert of a 3D tensor)
            t = t.clone()  # own exactly its bytes, so the parent tensor can be freed
        if self.cuda:
            t = t.pin_memory()  # DMA-able: the side-stream copy overlaps compute
        return t

    def _offload(self, unit: Unit) -> None:
        for p in unit.params.values():
            p.data = torch.empty(0, dtype=p.dtype, device=self.device)
        unit.tensors = None
        unit.state = "offloaded"

    # -- loading -------------------------------------------------------------------------------------------------
    def load(self, unit: Unit, prefetch: bool) -> None:
        """Start loading `unit` to the device (no-op if loaded or in flight)."""
        if unit.state != "offloaded":
            return
        if self._frees:  # CUDA: reuse released memory only once the GPU is done with it (see `release`)
            t0 = time.perf_counter()
            while self._frees:
                self._frees.popleft().synchronize()
            self.stats.throttle_seconds += time.perf_counter() - t0
        self.stats.loads += 1
        if prefetch:
            self.stats.prefetch_loads += 1
        else:
            self.stats.on_demand_loads += 1
        self._held += unit.nbytes
        self.stats.peak_streamed_device_bytes = max(self.stats.peak_streamed_device_bytes, self._held)
        if unit.home == "disk" or self.cuda:  # counted when issued, so prefetches during prefill count as prefill
            self._count_moved(unit.nbytes)
        if unit.home == "disk":
            self.stats.bytes_read_disk += unit.nbytes
            unit.pending = Pending(future=self.pool.submit(self._read_disk, unit), prefetch=prefetch)
        elif self.cuda:
            assert unit.host is not None and self.stream is not None
            with torch.cuda.stream(self.stream):
                out = {n: t.to(self.device, non_blocking=True) for n, t in unit.host.items()}
                event = torch.cuda.Event()
                event.record(self.stream)
            unit.pending = Pending(out, event=event, prefetch=prefetch)
        else:  # CPU device, CPU tier: the host copy is the device copy
            assert unit.host is not None
            unit.pending = Pending(dict(unit.host), prefetch=prefetch)
        unit.state = "pending"

    def _read_disk(self, unit: Unit) -> tuple[dict[str, torch.Tensor], Any]:
        """Loader thread: read a unit's file (memory-mapped) into new tensors; on CUDA copy them on the side stream."""
        from safetensors import safe_open

        assert unit.file is not None
        with safe_open(str(unit.file), framework="pt", device="cpu") as f:
            host = {n: f.get_tensor(n) for n in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        if not self.cuda:
            return host, None
        assert self.stream is not None
        with torch.cuda.stream(self.stream):
            out = {n: t.to(self.device, non_blocking=True) for n, t in host.items()}
            event = torch.cuda.Event()
            event.record(self.stream)
        event.synchronize()  # pageable source: keep `host` alive until the copy is done
        return out, None

    def _count_moved(self, n: int) -> None:
        self.stats.bytes_moved += n
        if self._decode:
            self.stats.decode_bytes_moved += n

    def wait(self, unit: Unit) -> None:
        """Make sure `unit` is on the device and installed (loads it on demand if needed)."""
        if unit.state == "loaded":
            return
        if unit.state == "offloaded":
            self.load(unit, prefetch=False)
        assert unit.pending is not None
        t0 = time.perf_counter()
        tensors = unit.pending.result()
        if self.cuda:  # allocated on the side stream, read by the compute stream
            if unit.pending.event is not None:
                torch.cuda.current_stream(self.device).wait_event(unit.pending.event)
            for t in tensors.values():
                t.record_stream(torch.cuda.current_stream(self.device))
        dt = time.perf_counter() - t0
        self.stats.stall_seconds += dt
        if self._decode:
            self.stats.decode_stall_seconds += dt
        for n, p in unit.params.items():
            p.data = tensors[n]
        unit.tensors = tensors
        unit.pending = None
        unit.state = "loaded"
        unit.finished = False

    def release(self, unit: Unit) -> None:
        """Drop the device copy of a streamed unit (its home tier keeps the weights)."""
        if unit.home == "device" or unit.state == "offloaded":
            return
        if unit.state == "pending":  # wait first, so no copy lands in freed memory
            self.wait(unit)
        self._offload(unit)
        unit.finished = False
        self._held -= unit.nbytes
        if self.cuda:
            # The host runs ahead of the GPU: without this, every later load would get fresh memory while the
            # kernels that read this unit are still queued (record_stream defers reuse, it does not bound it), and
            # the window would bound nothing. The next load waits for this event, so the host stays about one
            # unit ahead and the device holds the window's bytes.
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            self._frees.append(ev)

    # -- hooks and steps -----------------------------------------------------------------------------------------
    def begin_step(self, new_tokens: int) -> None:
        """Called before every model forward: counts steps and splits decode from prefill in the counters."""
        self.stats.steps += 1
        self._decode = new_tokens == 1
        if self._decode:
            self.stats.decode_steps += 1

    def attach(self, module: torch.nn.Module, hook: Any) -> None:
        from accelerate.hooks import add_hook_to_module

        add_hook_to_module(module, hook, append=True)
        self.hooks.append((module, hook))

    def close(self) -> None:
        """Stop the loader thread (pending loads finish first) and drop every streamed unit's device copy: the
        window's memory is free when `close` returns, not when the model (which the hooks and caches reference in
        cycles) is garbage-collected. The model cannot run after this."""
        for u in self.units:
            if u.state == "pending":
                self.wait(u)
            self.release(u)
        while self._frees:  # the GPU has finished with the released copies
            self._frees.popleft().synchronize()
        self.pool.shutdown(wait=True)


def make_hook(pre: Callable[[torch.nn.Module, tuple, dict], None] | None = None,
              post: Callable[[torch.nn.Module], None] | None = None) -> Any:
    """An accelerate `ModelHook` calling `pre(module, args, kwargs)` before and `post(module)` after forward."""
    from accelerate.hooks import ModelHook

    class _Hook(ModelHook):
        def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
            if pre is not None:
                pre(module, args, kwargs)
            return args, kwargs

        def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
            if post is not None:
                post(module)
            return output

    return _Hook()


def drop_checkpoint_pages(keep: Path | None = None) -> int:
    """Linux, CPU device: un-map the pages of memory-mapped ``.safetensors`` checkpoints that this process touched.

    transformers loads a checkpoint through a memory map and keeps the map open after loading; once the offload has
    copied the resident weights into their own memory and moved the others to their tier, the checkpoint pages the
    placement touched would stay in the process's resident set (they are file-backed and clean: the kernel reads
    them again from the file if anything still touches them). ``madvise(MADV_DONTNEED)`` drops them. Files under
    `keep` (the offload folder) are left alone. Returns the bytes of the mappings advised (0 elsewhere)."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return 0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return 0
    total = 0
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or not parts[5].endswith(".safetensors") or "w" in parts[1][:2] and "s" in parts[1]:
            continue
        if keep is not None and parts[5].startswith(str(keep)):
            continue
        start, end = (int(x, 16) for x in parts[0].split("-"))
        if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4) == 0:  # 4 = MADV_DONTNEED
            total += end - start
    return total
