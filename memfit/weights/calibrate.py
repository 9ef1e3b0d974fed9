"""Calibration for weight methods: which linear layers to compress, calibration token ids, and a block-by-block
driver that gathers each linear's input statistics (GPTQ's Hessian ``H = 2/N X^T X`` and a sample of inputs) and
replaces the block's linears before the next block sees the block's (now compressed) output.

Only plain PyTorch hooks are used: a forward pre-hook on the first decoder block catches the hidden states and the
keyword arguments the model passes its blocks (positions, rotary tables, masks); every later block is called with
the previous block's output and the same keyword arguments, as GPTQ's reference code does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memfit.errors import ConfigError
from memfit.units import return_freed_memory


class _Stop(Exception):
    pass


@dataclass
class LinearStats:
    """Inputs seen by one linear layer: Hessian ``2/N X^T X`` (fp32) and up to ``max_rows`` input rows."""

    in_features: int
    max_rows: int = 512
    h: torch.Tensor | None = None
    n: int = 0
    sample: list[torch.Tensor] = field(default_factory=list)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, self.in_features).float()
        if self.h is None:
            self.h = torch.zeros(self.in_features, self.in_features, device=x.device)
        m = x.shape[0]
        self.h.mul_(self.n / (self.n + m)).add_(x.T @ x, alpha=2.0 / (self.n + m))
        self.n += m
        have = sum(t.shape[0] for t in self.sample)
        if have < self.max_rows:
            self.sample.append(x[: self.max_rows - have].clone())

    @property
    def inputs(self) -> torch.Tensor:
        return torch.cat(self.sample) if self.sample else torch.zeros(0, self.in_features)


def target_linears(model: nn.Module, head: bool = False) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` of the model except the output head (kept full precision, as GPTQ and HQQ do), or with it
    (``head``). A head tied to the input embeddings is compressed as its own copy: the embeddings keep their matrix
    for lookups (`untie_head`), so the bytes held grow by the compressed head while a decode step reads it instead of
    the full-precision matrix."""
    out_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head:
        if not isinstance(out_head, nn.Linear):
            raise ConfigError("head=true: this model has no linear output head to compress")
        out_head = None
    found = {
        name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not out_head and name
    }
    if not found:
        raise ConfigError(
            "this model has no linear layers to quantize (besides its output head): weight methods compress "
            "nn.Linear layers; pass a transformer causal LM"
        )
    return found


def untie_head(model: nn.Module) -> bool:
    """Before the output head is replaced: if it shares its weight with the input embeddings, record the model as
    untied (``config.tie_word_embeddings = False``, so a saved folder reloads with a head of its own and nothing
    re-ties them). Returns whether it was tied."""
    out_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = out_head is not None and inp is not None and getattr(out_head, "weight", None) is getattr(inp, "weight", 0)
    config = getattr(model, "config", None)
    if tied and config is not None:
        config.tie_word_embeddings = False
        text = getattr(config, "get_text_config", lambda: config)()
        if text is not config:
            text.tie_word_embeddings = False
    return tied


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


def find_blocks(model: nn.Module) -> nn.ModuleList | None:
    """The decoder-block list: the ModuleList with ``config.num_hidden_layers`` entries (else the longest one
    whose entries hold linear layers)."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
    lists = [m for m in lists if any(isinstance(x, nn.Linear) for x in m[0].modules())]
    exact = [m for m in lists if len(m) == n]
    if exact:
        return exact[0]
    return max(lists, key=len) if lists else None


def calibration_text(path: str | Path | None = None) -> str:
    """The text calibration runs on: a user file, else the standard library's ``pydoc_data.topics`` prose."""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"calibration file not found: {p}")
        return p.read_text(encoding="utf-8", errors="replace")
    from pydoc_data.topics import topics

    return "\n\n".join(topics.values())


def calibration_ids(tokenizer: Any, text: str, n_tokens: int = 512, seq_len: int = 256) -> torch.Tensor:
    """``n_tokens`` token ids of ``text`` cut into rows of ``seq_len`` -> ``(n_tokens // seq_len, seq_len)``."""
    if n_tokens < seq_len or seq_len < 8:
        raise ConfigError(f"calibration needs n_tokens >= seq_len >= 8 (got {n_tokens}, {seq_len})")
    ids = tokenizer(text[: n_tokens * 12], add_special_tokens=False)["input_ids"]
    rows = min(n_tokens, len(ids)) // seq_len
    if rows < 1:
        raise ConfigError(f"the calibration text is too short: {len(ids)} tokens, need at least {seq_len}")
    return torch.tensor(ids[: rows * seq_len]).view(rows, seq_len)


ReplaceFn = Callable[[str, nn.Linear, LinearStats], nn.Module]
# ``forward(x, rows)``: the block's output hidden states for input hidden states ``x`` that are the calibration rows
# ``rows`` (int64 indices) - the driver slices the keyword arguments it passes the block (masks) to those rows.
BlockForward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# ``refine(block, inputs, targets, forward)``: called once a block's linears are replaced, to train the block so its
# output on ``inputs`` (the compressed previous blocks' outputs) approaches ``targets`` (the full-precision block's
# output on the same inputs). It edits the block in place.
RefineFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, BlockForward], None]


def _rows_of(value: Any, rows: torch.Tensor, n: int) -> Any:
    """``value`` (a keyword argument of the block) cut to the calibration ``rows``: tensors whose first dimension is
    the calibration batch ``n`` (> 1) are indexed, tuples/lists recursively, anything else passes unchanged."""
    if torch.is_tensor(value):
        return value.index_select(0, rows.to(value.device)) if n > 1 and value.dim() and value.shape[0] == n else value
    if isinstance(value, (tuple, list)):
        return type(value)(_rows_of(v, rows, n) for v in value)
    return value


def _hidden(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def quantize_blockwise(
    model: nn.Module,
    ids: torch.Tensor,
    replace: ReplaceFn,
    progress: Callable[[str], None] | None = None,
    refine: RefineFn | None = None,
) -> None:
    """Run the calibration ids block by block; for each block gather its linears' input statistics, replace every
    linear by ``replace(name, linear, stats)``, optionally let ``refine`` train the compressed block towards the
    full-precision block's output on the same inputs (GQSA's BQPO), then re-run the block so the next one sees
    compressed outputs."""
    blocks = find_blocks(model)
    if blocks is None:
        raise ConfigError("calibrated weight methods need a model with a list of decoder blocks; use rtn instead")
    targets = target_linears(model)
    captured: dict[str, Any] = {}

    def catch(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        captured["args"], captured["kwargs"] = args, kwargs
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        model(input_ids=ids.to(device), use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    if "args" not in captured:
        raise ConfigError("calibration could not reach the model's decoder blocks")
    hidden, rest, kwargs = captured["args"][0], captured["args"][1:], captured["kwargs"]
    block_names = {id(b): n for n, b in model.named_modules() if any(b is x for x in blocks)}
    for i, block in enumerate(blocks):
        prefix = block_names[id(block)] + "."
        names = [n for n in targets if n.startswith(prefix)]
        stats = {n: LinearStats(targets[n].in_features) for n in names}
        hooks = [
            targets[n].register_forward_hook(lambda _m, a, _o, s=stats[n]: s.add(a[0])) for n in names
        ]
        try:
            target = _hidden(block(hidden, *rest, **kwargs))  # the full-precision block's output: BQPO's target
        finally:
            for h in hooks:
                h.remove()
        for n in names:
            set_module(model, n, replace(n, targets.pop(n), stats[n]))  # the dense weight is freed here
            stats[n] = None  # type: ignore[assignment]  # free the Hessian before the next layer
            return_freed_memory()
        if refine is not None:
            n_rows = hidden.shape[0]

            def forward(x: torch.Tensor, rows: torch.Tensor, block: nn.Module = block, n: int = n_rows) -> torch.Tensor:
                part = {k: _rows_of(v, rows, n) for k, v in kwargs.items()}
                return _hidden(block(x, *_rows_of(rest, rows, n), **part))

            refine(block, hidden, target, forward)
        del target
        hidden = _hidden(block(hidden, *rest, **kwargs))
        if progress is not None:
            progress(f"block {i + 1}/{len(blocks)}")
