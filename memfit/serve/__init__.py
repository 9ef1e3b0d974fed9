"""`memfit serve`: an OpenAI-compatible server whose running batch is sized by compressed KV bytes.

- `admission.py`: predict a request's compressed KV bytes (prompt length, method, budget, max_tokens) and keep the
  pool's books;
- `scheduler.py`: continuous batching in one thread (chunked prefill, per-request stores decoded together in one
  forward per step through `memfit.core.batch_view`, FIFO admission, preemption when memory runs over);
- `app.py`: the HTTP API (Starlette + uvicorn), OpenAI-style errors, SSE streaming, Prometheus /metrics;
- `loadtest.py`: `memfit loadtest`, a client for any OpenAI-compatible server.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from typing import Any

import torch

from memfit.errors import ConfigError

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4, "tb": 1000**4}


def parse_bytes(text: str) -> int:
    """'20GiB', '512MiB', '2GB', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"--kv-memory {text!r} is not a size: write e.g. 20GiB, 512MiB or a number of bytes")
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise ConfigError("--kv-memory must be more than 0 bytes")
    return value


def default_kv_memory(model: torch.nn.Module) -> int:
    """No --kv-memory: 90 % of the GPU memory left after the weights, or a quarter of the RAM available on CPU."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.9)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 4
    except OSError:
        pass
    return 2 << 30


def build_server(
    model: torch.nn.Module,
    tokenizer: Any,
    model_name: str,
    method: str = "full",
    budget: str | None = None,
    params: dict[str, Any] | None = None,
    kv_memory: int | None = None,
    max_batch: int = 64,
    prefill_chunk: int = 512,
    default_max_tokens: int = 256,
    batch_decode: bool = True,
    spans: str = "auto",
    tensor_parallel: bool = False,
    stack_decode: bool = True,
    decode_graphs: bool = True,
) -> Any:
    """The ASGI app for a loaded model (its scheduler starts with the app). `batch_decode=False`: one decode forward
    per running request per step instead of one for all (to measure what batching buys). `tensor_parallel`: this is
    rank 0 of a split model (memfit.serve.tp); the other ranks run `make_scheduler(...).follow()`.
    `stack_decode=False`: frozen KIVI stores stay on their own instead of joining stack blocks (memfit.core.stacks).
    `decode_graphs=False`: the blocks' step stays eager instead of a recorded CUDA graph (memfit.graphs.BlockGraph)."""
    from memfit.core.budget import Budget
    from memfit.core.method import build_policy
    from memfit.serve.app import ServerConfig, create_app

    build_policy(method, Budget.parse(budget), params or {})  # a bad default is a start-up error, not a 400 later
    if prefill_chunk < 1 or max_batch < 1:
        raise ConfigError("--prefill-chunk and --max-batch must be at least 1")
    from memfit.core.spans import resolve_spans

    resolve_spans(spans, method, budget)  # a bad --spans value is a start-up error too
    scheduler = make_scheduler(model, tokenizer, kv_memory, max_batch, prefill_chunk, batch_decode, tensor_parallel,
                               stack_decode, decode_graphs)
    scheduler.predictor.byte_model(method, params or {})  # calibrate the default method now, not on a request
    config = ServerConfig(model_name, method, budget, params or {}, default_max_tokens, spans)
    return create_app(model, tokenizer, scheduler, config)


def make_scheduler(model: torch.nn.Module, tokenizer: Any, kv_memory: int | None = None, max_batch: int = 64,
                   prefill_chunk: int = 512, batch_decode: bool = True, tensor_parallel: bool = False,
                   stack_decode: bool = True, decode_graphs: bool = True) -> Any:
    """The server's scheduler (memfit.serve.scheduler), or under tensor parallelism one that follows rank 0."""
    from memfit.serve.scheduler import Scheduler
    from memfit.serve.tp import TensorParallelScheduler

    if tensor_parallel:  # split stores decode in forwards of their own (Scheduler.alone_reason): nothing to stack
        return TensorParallelScheduler(model, kv_memory or default_kv_memory(model), max_batch, prefill_chunk,
                                       batch_decode, tokenizer)
    return Scheduler(model, kv_memory or default_kv_memory(model), max_batch, prefill_chunk, batch_decode, tokenizer,
                     stack_decode=stack_decode, decode_graphs=decode_graphs)


def free_port(host: str = "127.0.0.1") -> socket.socket:
    """A bound listening socket on a free port (uvicorn serves on it; no race for the port)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


ALLOC_CONF = "expandable_segments:True"


def configure_cuda_allocator(device: str) -> str | None:
    """Before CUDA starts in this process: let PyTorch's caching allocator grow segments in place
    (`PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`) unless the user set an allocator config. Returns the line
    for the startup log (None when no CUDA device is in play).

    Why: a server's stores come and go in every size (prompt chunks of each request, stores that grow a token per step
    on the portable backend, buffers sized to each prompt on the fast one); with fixed segments a freed block rarely
    fits the next, slightly larger request, and on an H200 29 GiB sat reserved but unallocated when a full-cache
    server ran out of memory (issue #11). Expandable segments map freed pages back into a growing segment instead."""
    if str(device).startswith("cpu") or not torch.cuda.is_available():
        return None
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        if os.environ.get(name):
            return f"memfit serve: CUDA allocator config {name}={os.environ[name]} (yours; left as it is)"
    if torch.cuda.is_initialized():
        return ("memfit serve: CUDA was already initialised in this process, so its allocator keeps its settings; set "
                f"PYTORCH_CUDA_ALLOC_CONF={ALLOC_CONF} before starting to avoid fragmentation")
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = ALLOC_CONF
    return (f"memfit serve: set PYTORCH_CUDA_ALLOC_CONF={ALLOC_CONF} (less fragmentation from stores of every size; "
            "set PYTORCH_CUDA_ALLOC_CONF yourself to choose otherwise)")


def serve(
    model_spec: str = "default",
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "cpu",
    dtype: str = "auto",
    load_format: str | None = None,
    log_level: str = "info",
    **kwargs: Any,
) -> None:
    """Load the model and serve until interrupted (what `memfit serve` runs)."""
    import uvicorn

    from memfit.models import DEFAULT_MODEL_NAME, load_model

    note = configure_cuda_allocator(device)  # before load_model: the allocator reads its config when CUDA starts
    if note:
        print(note, file=sys.stderr, flush=True)
    load_kwargs: dict[str, Any] = {"device": device, "dtype": dtype}
    if load_format is not None:
        load_kwargs["load_format"] = load_format
    from memfit import distributed

    split = distributed.in_torchrun()  # one rank of `memfit serve --tp N` (memfit.serve.tp)
    if split:
        distributed.init(device)
        load_kwargs.update(tp=True, progress=distributed.rank() == 0)
    model, tok = load_model(model_spec, **load_kwargs)
    name = DEFAULT_MODEL_NAME if model_spec == "default" else os.path.basename(model_spec.rstrip("/")) or model_spec
    if split and distributed.rank() != 0:  # a follower: no HTTP, the same ticks as rank 0
        make_scheduler(model, tok, kwargs.get("kv_memory"), kwargs.get("max_batch", 64),
                       kwargs.get("prefill_chunk", 512), kwargs.get("batch_decode", True), True).follow()
        return
    app = build_server(model, tok, name, tensor_parallel=bool(split), **kwargs)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
