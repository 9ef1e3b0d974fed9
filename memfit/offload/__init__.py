"""Weight offload: run a model whose weights do not fit in the device memory you give it.

`attach_offload(model, weights_memory, device=..., policy=..., offload_dir=...)` places the weights: everything
that is not a streamed unit (embeddings, final norm, head, and for MoE models every non-expert weight) goes to
the device; as many units as fit next to the streaming window stay resident; the rest lives in pinned CPU memory
or, with `offload_dir`, in safetensors files, and streams through the window. Policies (one module each):

- ``superpipeline`` (memfit/offload/superpipeline.py): decoder layers, window k, prefetch k′; CPU tier.
- ``tpi`` (memfit/offload/tpi_window.py): attention and MLP blocks, TPI-LLM's sliding window; disk tier.
- ``pregated`` (memfit/offload/pregated_moe.py): MoE experts with next-layer prefetch; ``ondemand`` without it.
- ``auto``: ``pregated`` for MoE models, ``tpi`` when `offload_dir` is given, else ``superpipeline``.

`weights_memory` bounds the bytes of weights (parameters and buffers) on the device: resident bytes plus the
window's. KV cache and activations come on top (``memfit plan`` predicts them).
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from memfit import units
from memfit.errors import ConfigError
from memfit.offload.streamer import OffloadStats, WeightStreamer, make_hook

__all__ = ["POLICIES", "Layout", "Offload", "attach_to_run", "layout", "OffloadStats", "attach_offload", "format_bytes", "parse_bytes"]

POLICIES = ("auto", "superpipeline", "tpi", "pregated", "ondemand")

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_bytes(text: str | int | float, what: str = "--weights-memory") -> int:
    """'24GiB', '4GB', '512MiB', '1.5e9' -> bytes (GiB/MiB are powers of 1024, GB/MB of 1000)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise ConfigError(f"{what} {text!r} is not a size: write e.g. 4GiB, 512MiB, 24GB or a number of bytes")
        value, unit = float(m.group(1)), m.group(2).lower()
    n = int(value * _UNITS[unit])
    if n <= 0:
        raise ConfigError(f"{what} must be positive, got {text!r}")
    return n


def format_bytes(n: float) -> str:
    return units.format_bytes(n, digits=2)


@dataclass
class Offload:
    """A model's offload state: the streamer (counters in `.stats`) and what to clean up."""

    streamer: WeightStreamer
    policy: str
    budget: int
    window_bytes: int  # the streaming window's device bytes (k units)
    temp_dir: Path | None = None
    handles: list[Any] = field(default_factory=list)

    @property
    def stats(self) -> OffloadStats:
        return self.streamer.stats

    def report(self) -> dict[str, Any]:
        d = self.stats.to_dict()
        d.update(weights_memory=self.budget, window_bytes=self.window_bytes)
        return d

    def reset_counters(self) -> None:
        """Zero what a run measures (loads, bytes moved, stalls, steps); keep what describes the placement."""
        st = self.stats
        for name in ("loads", "prefetch_loads", "on_demand_loads", "bytes_moved", "bytes_read_disk", "stall_seconds",
                     "expert_hits", "expert_misses", "steps", "decode_steps", "decode_bytes_moved",
                     "decode_stall_seconds"):
            setattr(st, name, type(getattr(st, name))())
        st.peak_streamed_device_bytes = self.streamer._held

    def close(self) -> None:
        self.streamer.close()
        for h in self.handles:
            h.remove()
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def _param_bytes(params: dict[str, torch.nn.Parameter]) -> int:
    return sum(p.numel() * p.element_size() for p in params.values())


def resolve_policy(model: torch.nn.Module, policy: str, offload_dir: str | Path | None) -> str:
    from memfit.adapters.transformers import moe_blocks

    if policy not in POLICIES:
        raise ConfigError(f"unknown offload policy {policy!r}: use one of {', '.join(POLICIES)}")
    is_moe = bool(moe_blocks(model))
    if policy == "auto":
        return "pregated" if is_moe else "tpi" if offload_dir is not None else "superpipeline"
    if policy in ("pregated", "ondemand") and not is_moe:
        raise ConfigError(f"--offload-policy {policy} streams MoE experts, but this model has no MoE layers: "
                          "use superpipeline or tpi")
    return policy


def attach_offload(
    model: torch.nn.Module,
    weights_memory: int | str,
    device: str | torch.device = "cpu",
    policy: str = "auto",
    offload_dir: str | Path | None = None,
    window: int | None = None,
    prefetch: int | None = None,
) -> Offload:
    """Place `model`'s weights on `device` within `weights_memory` bytes and stream the rest (see module doc).

    The model may sit anywhere (CPU memory, typically) when this is called; afterwards its resident weights are on
    `device` and forward calls stream the others. Raises ConfigError when even the smallest window does not fit,
    saying the minimum."""
    budget = parse_bytes(weights_memory)
    dev = torch.device(device)
    name = resolve_policy(model, policy, offload_dir)
    temp_dir = None
    folder: Path | None = None
    if offload_dir is not None:
        folder = Path(offload_dir).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(dir=folder, prefix="memfit-offload-"))
        temp_dir = folder
    elif name == "tpi":  # TPI-LLM streams from disk: without a folder, use a temporary one
        folder = temp_dir = Path(tempfile.mkdtemp(prefix="memfit-offload-"))
    tier = "disk" if folder is not None else "cpu"
    streamer = WeightStreamer(dev, name)

    lay = layout(model, name, budget, window, prefetch)
    _place_resident(model, lay.other, dev)
    if lay.moe_blocks:
        from memfit.adapters.transformers import set_experts_eager
        from memfit.offload.pregated_moe import install_experts

        set_experts_eager(model)
        keys = [(blk.layer, e) for blk in lay.moe_blocks for e in range(int(blk.experts.num_experts))]
        homes = {key: "device" if i < lay.resident else tier for i, key in enumerate(keys)}
        install_experts(lay.moe_blocks, streamer, homes, max(lay.window, 2), folder, prefetch=name == "pregated")
    else:
        from memfit.offload.window import Window

        units = [streamer.add_unit(n, ps, "device" if i < lay.resident else tier, folder)
                 for i, (n, ps) in enumerate(zip(lay.unit_names, lay.unit_params, strict=True))]
        streamed = [u for u in units if u.home != "device"]
        if streamed:
            win = Window(streamer, streamed, lay.window, lay.prefetch, lay.release_before)
            for m, u in zip(lay.unit_modules, units, strict=True):
                if u.home != "device":
                    streamer.attach(m, make_hook(pre=lambda _m, _a, _k, _u=u: win.before(_u),
                                                 post=lambda _m, _u=u: win.after(_u)))
    other_bytes = lay.other_bytes
    window_bytes = lay.window_bytes
    streamer.stats.window_units = lay.window if lay.resident < len(lay.unit_sizes) else 0
    if dev.type == "cpu":  # the checkpoint's memory map would keep every touched weight page resident
        from memfit.offload.streamer import drop_checkpoint_pages

        drop_checkpoint_pages(keep=folder)
    streamer.stats.bytes_resident_device += other_bytes
    streamer.stats.extra["tier"] = tier
    handle = model.register_forward_pre_hook(_step_counter(streamer), with_kwargs=True)
    return Offload(streamer, name, budget, window_bytes, temp_dir, [handle])



@dataclass
class Layout:
    """Where a model's weights go under a weights budget (works on a meta-device model: no weights needed)."""

    policy: str
    budget: int
    other: dict[str, torch.nn.Parameter]  # always on the device
    other_bytes: int  # + buffers
    unit_names: list[str]
    unit_sizes: list[int]
    resident: int  # the first `resident` units stay on the device
    window: int  # streamed units the device holds at once (MoE: the expert cache's capacity)
    prefetch: int = 0
    release_before: bool = False
    unit_modules: list[torch.nn.Module] = field(default_factory=list)
    unit_params: list[dict[str, torch.nn.Parameter]] = field(default_factory=list)
    moe_blocks: list[Any] = field(default_factory=list)
    minimum: int = 0  # the smallest budget this policy accepts for this model

    @property
    def streamed(self) -> int:
        return len(self.unit_sizes) - self.resident

    @property
    def window_bytes(self) -> int:
        return min(self.window, self.streamed) * max(self.unit_sizes, default=0) if self.streamed else 0

    @property
    def device_bytes(self) -> int:
        """Weight bytes on the device at most: resident + a full window."""
        return self.other_bytes + sum(self.unit_sizes[: self.resident]) + self.window_bytes


def layout(
    model: torch.nn.Module, policy: str, budget: int, window: int | None = None, prefetch: int | None = None,
) -> Layout:
    """Split `model`'s weights for `policy` ('superpipeline', 'tpi', 'pregated'/'ondemand') under `budget` bytes.
    Raises ConfigError, saying the minimum, when the budget is below it."""
    from memfit.adapters.transformers import moe_blocks

    all_params = dict(model.named_parameters(remove_duplicate=False))
    buffers_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    if policy in ("pregated", "ondemand"):
        blocks = moe_blocks(model)
        expert_ids = {id(p) for b in blocks for p in (b.experts.gate_up_proj, b.experts.down_proj)}
        other = {n: p for n, p in all_params.items() if id(p) not in expert_ids}
        other_bytes = _param_bytes({str(id(p)): p for p in other.values()}) + buffers_bytes
        ex = blocks[0].experts
        unit_bytes = (ex.gate_up_proj[0].numel() + ex.down_proj[0].numel()) * ex.gate_up_proj.element_size()
        names = [f"layer{b.layer}.expert{e}" for b in blocks for e in range(int(b.experts.num_experts))]
        n_units = len(names)
        need = other_bytes + 2 * unit_bytes
        if budget < need:
            raise ConfigError(
                f"--weights-memory {format_bytes(budget)} is below the minimum for streaming this MoE model's "
                f"experts: {format_bytes(need)} (non-expert weights {format_bytes(other_bytes)} stay on the device, "
                f"plus 2 experts of {format_bytes(unit_bytes)}). Pass --weights-memory {format_bytes(need)} or more."
            )
        room = (budget - other_bytes) // unit_bytes
        # the cache holds up to two layers' experts (the paper: about two blocks of active experts); what the
        # budget allows beyond it stays resident, first layers first
        capacity = 0 if room >= n_units else min(room, 2 * int(ex.num_experts))
        resident = n_units if room >= n_units else room - capacity
        return Layout(policy, budget, other, other_bytes, names, [unit_bytes] * n_units, int(resident),
                      int(capacity), moe_blocks=blocks, minimum=need)
    from memfit.offload.superpipeline import Superpipeline
    from memfit.offload.tpi_window import TPIWindow

    pol = Superpipeline() if policy == "superpipeline" else TPIWindow()
    if window is not None:
        if window < 1:
            raise ConfigError("--offload-window must be >= 1")
        pol.window = window
        if isinstance(pol, TPIWindow):
            pol.__post_init__()
    if prefetch is not None and isinstance(pol, Superpipeline):
        pol.prefetch = prefetch
    modules = pol.unit_modules(model)
    unit_params = [dict(m.named_parameters()) for _, m in modules]
    in_units = {id(p) for ps in unit_params for p in ps.values()}
    # a weight also reached from outside its unit (tied) stays resident with the rest
    ids = {id(m) for _, m in modules}
    prefixes = [n + "." for n, m in model.named_modules() if id(m) in ids]
    outside = {id(p) for n, p in all_params.items() if id(p) in in_units and not _owned_by(n, prefixes)}
    unit_params = [{n: p for n, p in ps.items() if id(p) not in outside} for ps in unit_params]
    in_units -= outside
    other = {n: p for n, p in all_params.items() if id(p) not in in_units}
    other_bytes = _param_bytes({str(id(p)): p for p in other.values()}) + buffers_bytes
    sizes = [_param_bytes(ps) for ps in unit_params]
    largest, total = max(sizes), sum(sizes)
    k = pol.window
    need = other_bytes + k * largest
    if budget < need:
        raise ConfigError(
            f"--weights-memory {format_bytes(budget)} is below the minimum for this model with --offload-policy "
            f"{policy}: {format_bytes(need)} (embeddings, norms and head stay on the device: "
            f"{format_bytes(other_bytes)}; plus a window of {k} units of {format_bytes(largest)}). Pass "
            f"--weights-memory {format_bytes(need)} or more."
        )
    if budget >= other_bytes + total:
        resident = len(modules)
    else:
        resident = int(min(len(modules), (budget - other_bytes - k * largest) // largest))
    return Layout(policy, budget, other, other_bytes, [n for n, _ in modules], sizes, resident, k, pol.prefetch,
                  pol.release_before, [m for _, m in modules], unit_params, minimum=need)


def _owned_by(name: str, prefixes: list[str]) -> bool:
    """Whether parameter `name` (of the model) lies inside one of the unit modules (`prefixes` end with '.')."""
    return any(name.startswith(p) for p in prefixes)


def _place_resident(model: torch.nn.Module, params: dict[str, torch.nn.Parameter], dev: torch.device) -> None:
    for p in params.values():
        if p.device != dev:
            p.data = p.data.to(dev)
        elif dev.type == "cpu":  # own the bytes: a weight loaded from safetensors may be a view of the file's
            p.data = p.data.clone()  # memory map, which would keep every streamed unit's pages mapped too
    for mod in model.modules():
        for n, b in list(mod._buffers.items()):
            if b is not None and b.device != dev:
                mod._buffers[n] = b.to(dev)


def _step_counter(streamer: WeightStreamer) -> Any:
    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        x = kwargs.get("input_ids")
        if x is None:
            x = args[0] if args else kwargs.get("inputs_embeds")
        streamer.begin_step(int(x.shape[1]) if x is not None and x.dim() >= 2 else 0)

    return hook


def attach_to_run(
    model: torch.nn.Module, weights_memory: int | str, device: str | torch.device, policy: str = "auto",
    offload_dir: str | Path | None = None, backend: str = "auto",
) -> tuple[Offload, str]:
    """What `memfit.engine.run` calls for `--weights-memory`: attach (or reuse) an offload and pick the portable
    backend (CUDA graphs would replay stale weight addresses). Returns (offload, backend). Counters start at 0."""
    from memfit.models import resolve_device

    if backend == "fast":
        raise ConfigError("--weights-memory streams weights between forward calls, which the fast backend's CUDA "
                          "graphs cannot follow: use --backend auto or portable")
    off = getattr(model, "_memfit_offload", None)
    if off is None:
        off = attach_offload(model, weights_memory, resolve_device(device), policy, offload_dir)
        model._memfit_offload = off  # type: ignore[assignment]
    off.reset_counters()
    return off, "portable"
