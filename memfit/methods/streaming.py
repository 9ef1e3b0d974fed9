"""StreamingLLM — "Efficient Streaming Language Models with Attention Sinks" (Xiao et al., ICLR 2024, arXiv 2309.17453).

Algorithm: keep the first `sinks` tokens of the sequence (attention sinks) and the most recent tokens; nothing is
scored. Whenever a layer holds more than its budget, the middle is dropped so that `sinks` + (budget - sinks) recent
tokens remain — after the prompt and after every generated token (one eviction per step once full).

Official defaults (mit-han-lab/streaming-llm): start_size=4 sinks, recent_size=2000 (chat demo); the paper's main
setting is 4 sinks + a window. Here the recent window is the budget minus the sinks.
Deviation: positions. The official "pos-shift" stores keys before RoPE and re-numbers cached positions every step
(needed beyond the trained context). We keep post-RoPE keys with their original positions (DESIGN §3 default),
which is exact while the stream stays inside the model's context window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memfit.core.contract import LayerView, Selection, StepInfo
from memfit.core.method import Method, protect_mask, register
from memfit.errors import ConfigError


@register
@dataclass
class StreamingLLM(Method):
    name = "streaming"
    paper = "Efficient Streaming Language Models with Attention Sinks"
    arxiv = "2309.17453"
    family = "eviction"
    acts = "prefill+decode"
    summary = "Attention sinks (first tokens) + a window of recent tokens."

    sinks: int = 4

    # memfit methods: what each parameter means and the values it takes
    param_help = {
        "sinks": ("first tokens of the sequence always kept (attention sinks); the rest of the budget is the most "
                  "recent tokens", "integer >= 0"),
    }

    def validate(self) -> None:
        if self.sinks < 0:
            raise ConfigError("streaming.sinks must be >= 0")

    def after_attention(
        self, layer: LayerView, queries: torch.Tensor, scaling: float, info: StepInfo
    ) -> Selection | None:
        keep = info.keep
        if keep is None or layer.num_slots <= int(keep.min()):
            return None
        # Score = slot index, so the most recent tokens win; sinks are protected.
        t = layer.num_slots
        scores = torch.arange(t, device=layer.keys.device, dtype=torch.float32).expand(*layer.keys.shape[:2], t)
        return Selection(scores, protect_mask(layer, sinks=self.sinks))
