"""TPI-LLM's sliding-window memory scheduler, single machine (arXiv 2410.00531; code Lizonghang/TPI-LLM).

Our reading of `MemoryManager`: the model is an ordered list of units — each layer's attention block and MLP block
separately; the embeddings, final norm and head stay resident — stored as files on disk. A background thread
loads units from disk into a bounded window of `memory_window` units; compute waits for its unit, first frees
every earlier unit (`wait_and_release`), runs it, and the loader refills the window. Disk reads thus overlap
compute, and RAM holds at most `memory_window` units at once. The window wraps around at the end of a token.

Defaults (official CLI): memory_window = 2. Units: attention and MLP blocks (our `layer_parts`), one safetensors
file each, read through a memory map.
Deviations: the loader refills when compute reaches a unit (ahead by `memory_window - 1` units) rather than
polling; the result is the same bound and overlap. Units that fit in `--weights-memory` next to the window stay
resident. The tensor-parallel split and the star all-reduce across devices are not implemented (one machine).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memfit.adapters.transformers import decoder_layers, layer_parts


@dataclass
class TPIWindow:
    name = "tpi"
    paper = "TPI-LLM: Serving 70B-scale LLMs Efficiently on Low-resource Edge Devices (arXiv 2410.00531)"
    release_before = True
    default_tier = "disk"

    window: int = 2  # memory_window: units on the device (loaded or in flight)
    prefetch: int = 1  # always window - 1 (set in __post_init__)

    def __post_init__(self) -> None:
        self.prefetch = max(0, self.window - 1)

    def unit_modules(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        out = []
        for i, layer in enumerate(decoder_layers(model)):
            attn, mlp = layer_parts(layer)
            out += [(f"layer{i}.attn", attn), (f"layer{i}.mlp", mlp)]
        return out
