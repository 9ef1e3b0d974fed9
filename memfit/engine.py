"""The generation loop: (chunked) prefill, greedy decoding, and the measurements every run reports.

We drive the model ourselves instead of `model.generate` so prefill and decode are timed separately, position ids
are exact for left-padded batches, and only the last position's logits are computed (a full-vocabulary logits
tensor for a 2K prompt would dwarf the KV cache we are trying to shrink).
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from memfit.adapters.transformers import MemfitCache, forward
from memfit.errors import ConfigError


# -- peak memory ---------------------------------------------------------------------------------------------------
def reset_peak_memory(device: torch.device) -> None:
    """Start a fresh peak-memory window (CUDA allocator stats, or the process's peak RSS on Linux)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 to clear_refs resets VmHWM (peak RSS) for this process
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory(device: torch.device) -> int:
    """Peak bytes since the last reset: GPU allocated memory, or peak RSS of the process on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- inputs --------------------------------------------------------------------------------------------------------
def encode_prompts(tokenizer: Any, prompts: Sequence[str], chat: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize prompts (optionally through the chat template) into left-padded ids and a 0/1 mask."""
    if not prompts or any(not p or not p.strip() for p in prompts):
        raise ConfigError("the prompt is empty: give text with --prompt, --prompt-file or on stdin")
    rows: list[list[int]] = []
    for text in prompts:
        if chat and getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
            )
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
        else:
            ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        rows.append(list(ids))
    return pad_left(rows, pad_id=_pad_id(tokenizer))


def _pad_id(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    return int(pad or 0)


def pad_left(rows: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, width - len(r) :] = torch.tensor(list(r), dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids, mask


def synthetic_prompt(tokenizer: Any, tokens: int, rows: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """`rows` identical prompts of exactly `tokens` tokens of natural text (the standard library's pydoc topics,
    repeated if needed): `--context N` for speed and memory runs."""
    if tokens < 1:
        raise ConfigError("--context must be a positive number of tokens")
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))[: 8 * tokens + 1000]  # >= 1 character per token
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    while len(ids) < tokens:
        ids = ids + ids
    return pad_left([ids[:tokens]] * rows, pad_id=_pad_id(tokenizer))


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


# -- generation ----------------------------------------------------------------------------------------------------
@dataclass
class Generation:
    tokens: list[list[int]]  # generated ids per row (up to and excluding EOS)
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    peak_memory_bytes: int
    first_logits: torch.Tensor | None = None  # (B, V) next-token logits after the prompt
    graph_replays: int = 0  # decode steps replayed from a CUDA graph (fast backend)
    setup_seconds: float = 0.0  # the decode steps up to the first replay: the eager step(s) and the graph's recording
    setup_steps: int = 0
    capture_seconds: float = 0.0  # the part of setup_seconds spent recording the graph (and its first replay)

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def steady_tokens_per_second(self) -> float | None:
        """Decode steps per second after the graph was recorded (None without a graph or no step after it)."""
        steps, seconds = self.decode_steps - self.setup_steps, self.decode_seconds - self.setup_seconds
        return steps / seconds if self.setup_steps and steps > 0 and seconds > 0 else None


@torch.no_grad()
def prefill(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    cache: MemfitCache,
    prefill_chunk: int | None = None,
) -> torch.Tensor:
    """Feed the prompt (in chunks of `prefill_chunk` tokens if given); returns the last position's logits (B, V)."""
    return prefill_prompt(model, input_ids, attention_mask, cache, prefill_chunk)[0]


def prefill_prompt(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    cache: MemfitCache,
    prefill_chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`prefill`, also returning the attention mask of what was actually prefilled (decoding continues from it)."""
    if prefill_chunk is not None and prefill_chunk < 1:
        raise ConfigError("--prefill-chunk must be a positive number of tokens")
    past = cache.core.seen_tokens()
    if past:  # the cache already holds a context (memfit.contexts): these tokens continue it
        return _continue(model, input_ids, attention_mask, cache, past)
    prompt_lens = attention_mask.sum(-1)
    from memfit.core import tp

    with tp.scope(cache.core.tensor_parallel):  # GemFilter's filter score sums every rank's heads
        chosen = cache.core.select_prompt(model, input_ids, attention_mask)
    if chosen is not None:  # the method shortened the prompt (GemFilter); budgets still resolve from the original
        # a full cache would have held the original prompt: count it in full_nbytes()
        cache.core.skipped_prompt_tokens = int(input_ids.shape[1] - chosen[0].shape[1])
        input_ids, attention_mask = chosen
    if getattr(cache.core, "span_rule", None) is not None:  # keep whole words/numbers: ids of what is prefilled
        cache.core.prompt_spans = cache.core.span_rule(input_ids, attention_mask)
    positions = positions_from_mask(attention_mask)
    total = input_ids.shape[1]
    chunk = total if not prefill_chunk or prefill_chunk >= total else int(prefill_chunk)
    if chunk < total or chosen is not None:
        cache.core.begin_prompt(prompt_lens, total)
    logits = None
    for start in range(0, total, chunk):
        stop = min(total, start + chunk)
        logits = forward(
            model,
            input_ids[:, start:stop],
            attention_mask[:, :stop],
            cache,
            positions[:, start:stop],
            logits_to_keep=1,
        )
    assert logits is not None
    # methods that score with extra forward passes over the whole prompt (KVzip's context reconstruction) act here
    with tp.scope(cache.core.tensor_parallel):
        cache.core.after_prefill(model, input_ids, attention_mask)
    return logits[:, -1], attention_mask


def _continue(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: MemfitCache, past: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Feed new (left-padded) tokens on top of a cache that already holds `past` logical tokens, as decoding does:
    positions follow the context's logical length; the returned mask covers context + new tokens."""
    rows = cache.core.layers[0].held_per_row().shape[0]
    if rows != input_ids.shape[0]:
        raise ConfigError(f"the cache holds {rows} context row(s) but {input_ids.shape[0]} prompts were given: "
                          "take one copy per prompt (CompressedContext.cache(batch=...))")
    full = torch.cat([attention_mask.new_ones(attention_mask.shape[0], past), attention_mask], dim=1)
    positions = positions_from_mask(attention_mask) + past
    logits = forward(model, input_ids, full, cache, positions, logits_to_keep=1)
    return logits[:, -1], full


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    cache: MemfitCache,
    max_new_tokens: int = 64,
    eos_token_ids: Sequence[int] = (),
    prefill_chunk: int | None = None,
) -> Generation:
    """Greedy generation with a memfit cache, timed and memory-measured."""
    if max_new_tokens < 0:
        raise ConfigError("--max-new-tokens must be >= 0")
    device = next(model.parameters()).device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    reset_peak_memory(device)
    _sync(device)
    t0 = time.perf_counter()
    logits, attention_mask = prefill_prompt(model, input_ids, attention_mask, cache, prefill_chunk)
    _sync(device)
    prefill_seconds = time.perf_counter() - t0
    first_logits = logits.float().cpu()

    batch = input_ids.shape[0]
    eos = set(int(e) for e in eos_token_ids)
    out: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    mask = attention_mask
    last_pos = positions_from_mask(attention_mask)[:, -1:]
    steps = 0
    from memfit.graphs import DecodeSteps

    step = DecodeSteps(model, cache, steps=max_new_tokens - 1)
    t1 = time.perf_counter()
    ahead: torch.Tensor | None = None  # logits of a step launched before its input token was read on the host
    setup_seconds, setup_steps = 0.0, 0
    for i in range(max_new_tokens):
        next_tok = logits.argmax(-1)
        if step.graph is not None and i < max_new_tokens - 1:
            # A replayed step needs no host decision: launch it before reading this token, so the host's work
            # (the read-back, the EOS check, the next inputs) overlaps the GPU's. If every row has now ended, the
            # launched step is wasted work (its token is in the cache, never in the output).
            host_tok = next_tok.to("cpu", non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            last_pos = last_pos + 1  # (a replay reads no mask: it is not grown from here on)
            ahead = step(next_tok, mask, last_pos)
            ready.synchronize()
            tokens = host_tok.tolist()
        else:
            ahead = None
            tokens = next_tok.tolist()
        for b, tok in enumerate(tokens):
            if not done[b]:
                if tok in eos:
                    done[b] = True
                else:
                    out[b].append(tok)
        if all(done) or i == max_new_tokens - 1:
            break
        if ahead is not None:
            logits = ahead
        else:
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
            last_pos = last_pos + 1
            logits = step(next_tok, mask, last_pos)
            if step.graph is not None and not setup_steps:  # just recorded: time the set-up apart (one sync)
                _sync(device)
                setup_seconds, setup_steps = time.perf_counter() - t1, steps + 1
        steps += 1
    _sync(device)
    decode_seconds = time.perf_counter() - t1
    return Generation(out, prefill_seconds, decode_seconds, steps, peak_memory(device), first_logits,
                      graph_replays=step.replays, setup_seconds=setup_seconds, setup_steps=setup_steps,
                      capture_seconds=step.capture_seconds)


# -- one call that does what `memfit run` does ---------------------------------------------------------------------
@dataclass
class RunResult:
    text: str
    texts: list[str]
    model: str
    method: str
    budget: str
    params: dict[str, Any]
    prompt_tokens: int
    generated_tokens: int
    kv_bytes_full: int
    kv_bytes_held: int
    compression_ratio: float
    held_tokens_per_layer: list[int]
    peak_memory_bytes: int
    prefill_seconds: float
    decode_tokens_per_second: float
    device: str
    versions: dict[str, str] = field(default_factory=dict)
    tp: int = 1  # tensor-parallel ranks (memfit.distributed); KV bytes are then the sum over ranks
    kv_bytes_held_per_rank: list[int] | None = None
    weight_bytes_per_rank: list[int] | None = None  # under tp: each rank's shard (weight_bytes is rank 0's)
    peak_memory_bytes_per_rank: list[int] | None = None  # under tp: each rank's own peak (peak_memory_bytes: rank 0)
    backend: str = "portable"  # which runtime backend ran (memfit.backend)
    backend_reason: str = ""
    cuda_graphs: bool = False
    fused_ops: bool = False  # the layers' norms, rotary and MLP activation ran as fused kernels (memfit.backend)
    decode_graph_replays: int = 0
    # with a CUDA graph: the first decode steps (eager step, recording) apart, and the replayed steps' rate after them
    decode_setup_seconds: float = 0.0
    decode_capture_seconds: float = 0.0  # the part of it spent recording the CUDA graph
    decode_steady_tokens_per_second: float | None = None
    # methods scoring the prompt's whole attention (H2O...): the fused kernel that returned its log-sum-exp
    # ("cudnn", "flash"), "none" when the column sums computed it themselves; None for other methods
    prefill_lse_kernel: str | None = None
    weights: str = "none"  # the weight method the model's linear layers carry (memfit.weights), or none
    weight_bytes: int = 0  # bytes of every parameter and buffer of the model (packed codes as stored)
    weight_kernels: dict[str, Any] | None = None  # compressed layers per decode path (memfit.weights.format)
    # the fast backend's KIVI layers by the code layout their decode kernel read ("planes", "canonical"); None
    # when no layer decoded from the static KIVI store
    kivi_layout: dict[str, int] | None = None
    offload: dict[str, Any] | None = None  # weight streaming counters (memfit.offload) with --weights-memory
    predicted_peak_memory_bytes: int | None = None  # memfit.plan's prediction for this run (beside the measured)
    predicted: dict[str, Any] | None = None  # its parts: weights, KV, activations, runtime

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def versions() -> dict[str, str]:
    import transformers

    import memfit

    return {
        "memfit": getattr(memfit, "__version__", "0"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    # how OpenMP's threads wait (memfit.openmp_defaults, or the user's setting): it decides the speed on a busy machine
    waits = ("spin " + os.environ["GOMP_SPINCOUNT"] if "GOMP_SPINCOUNT" in os.environ
             else os.environ.get("OMP_WAIT_POLICY", "default").lower())
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads, OpenMP waits: {waits})"


def run(
    prompt: str | Sequence[str],
    model: str | tuple[torch.nn.Module, Any] = "default",
    method: str = "full",
    budget: float | int | str | None = None,
    params: dict[str, Any] | None = None,
    max_new_tokens: int = 64,
    chat: bool = True,
    prefill_chunk: int | None = None,
    allocation: str = "uniform",
    device: str = "cpu",
    dtype: str = "auto",
    kv: Any = None,
    backend: str = "auto",
    load_format: str = "auto",
    context: int | None = None,
    spans: bool | str | None = "auto",
    weights: str | None = None,
    weights_memory: int | str | None = None,
    offload_dir: str | None = None,
    offload_policy: str = "auto",
) -> RunResult:
    """Load (or take) a model, compress its KV cache with `method` at `budget`, generate, and measure.

    `device` and `dtype` apply when `model` is a spec to load (``"auto"`` device = CUDA when there is one;
    ``"auto"`` dtype = bfloat16 on CUDA, float32 on CPU).
    `kv`: a `memfit.contexts.CompressedContext` (a compressed document): the prompts are questions about it,
    answered from a copy of its cache with its model and method (`model`, `method`, `budget`... are ignored).
    `backend`: auto | fast | portable (memfit.backend). `load_format="dummy"`: random weights from a config (a
    built-in name such as ``llama-3.1-8b``). `context`: ignore `prompt` and feed a `context`-token prompt of natural
    text (speed and memory runs at a chosen length). `spans`: when a token is kept, keep the rest of its word or
    number within the same budget (memfit.core.spans); ``"auto"`` (the default here, in `memfit run` and in `memfit
    serve`) = on for an eviction method with a budget.
    `weights`: a weight spec such as ``"slim-llm:3"`` (memfit.weights): the model's linear layers are compressed in
    place before generating."""
    from memfit.api import make_cache
    from memfit.backend import check_backend

    check_backend(backend)

    if kv is not None:
        model = (kv.model, kv.tokenizer)
        method = kv.method
    if isinstance(model, str):
        from memfit.models import load_model

        model_name = model
        load_on = "cpu" if weights_memory is not None else device  # offload places the weights itself
        mdl, tok = load_model(model, device=load_on, dtype=dtype if weights_memory is None or dtype != "auto" else
                              ("bfloat16" if str(device).startswith("cuda") else "auto"), load_format=load_format)
    else:
        mdl, tok = model
        model_name = getattr(mdl.config, "_name_or_path", "") or type(mdl).__name__
    if weights and kv is None:
        from memfit.weights import quantize_model

        quantize_model(mdl, weights, tokenizer=tok)
    offload = None
    if weights_memory is not None and kv is None:  # stream what does not fit (memfit.offload); load it on the CPU
        from memfit.offload import attach_to_run

        offload, backend = attach_to_run(mdl, weights_memory, device, offload_policy, offload_dir, backend)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if kv is not None:
        ids, mask = kv.encode_questions(prompts)
        cache = kv.cache(batch=len(prompts))
    else:
        cache = make_cache(mdl, method, budget, params, allocation=allocation, backend=backend,
                           reserve=max_new_tokens, rows=len(prompts))
        from memfit.core.spans import enable_spans, resolve_spans

        spans = resolve_spans(spans, method, budget)
        if spans:  # keep whole words/numbers (memfit.core.spans)
            enable_spans(cache, tok)
        bind = getattr(cache.method, "bind_tokenizer", None)
        if bind is not None:
            bind(tok)  # KVzip words its reconstruction prompt with the tokenizer
        ids, mask = synthetic_prompt(tok, context, len(prompts)) if context else encode_prompts(tok, prompts, chat)
    eos = getattr(mdl.generation_config, "eos_token_id", None) or tok.eos_token_id
    eos_ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    gen = generate(mdl, ids, mask, cache, max_new_tokens, eos_ids, prefill_chunk)
    texts = [tok.decode(t, skip_special_tokens=True) for t in gen.tokens]
    full, held = cache.full_nbytes(), cache.nbytes()
    device = next(mdl.parameters()).device
    predicted = _predict(mdl, method, budget, params, mask, gen.decode_steps, prefill_chunk, offload, kv, weights,
                         spans=bool(spans) and kv is None)
    return RunResult(
        text=texts[0],
        texts=texts,
        model=model_name,
        method=method,
        budget=str(cache.core.budget),
        params=cache.method.params(),
        prompt_tokens=int(mask.sum(-1).max()),
        generated_tokens=sum(len(t) for t in gen.tokens),
        kv_bytes_full=full,
        kv_bytes_held=held,
        compression_ratio=(full / held) if held else float("inf"),
        held_tokens_per_layer=cache.held_tokens(),
        peak_memory_bytes=gen.peak_memory_bytes,
        prefill_seconds=gen.prefill_seconds,
        decode_tokens_per_second=gen.decode_tokens_per_second,
        device=device_name(device),
        versions=versions(),
        **(cache.backend.to_dict() if getattr(cache, "backend", None) else {}),
        decode_graph_replays=gen.graph_replays,
        decode_setup_seconds=gen.setup_seconds,
        decode_capture_seconds=gen.capture_seconds,
        decode_steady_tokens_per_second=gen.steady_tokens_per_second,
        prefill_lse_kernel=cache.core.prefill_lse_kernel,
        weights=getattr(mdl, "memfit_weights", "") or "none",
        weight_bytes=_weight_bytes(mdl),
        weight_kernels=_weight_kernels(mdl),
        kivi_layout=_kivi_layout(cache),
        offload=None if offload is None else offload.report(),
        predicted_peak_memory_bytes=None if predicted is None else predicted["peak_bytes"],
        predicted=predicted,
    )


def _predict(mdl: torch.nn.Module, method: str, budget: Any, params: Any, mask: torch.Tensor, steps: int,
             prefill_chunk: int | None, offload: Any, kv: Any, weights: str | None,
             spans: bool = False) -> dict[str, Any] | None:
    """memfit.plan's prediction of this run's peak; None where it has no formula (a compressed context, compressed
    weights, a padded batch) or fails: a prediction never fails a run."""
    if kv is not None or weights or not bool(mask.all()):
        return None
    try:
        from memfit.plan import predict_run

        return predict_run(mdl, method=method, budget=budget, params=params, prompt_tokens=int(mask.shape[1]),
                           new_tokens=steps, batch=int(mask.shape[0]), prefill_chunk=prefill_chunk,
                           offload=offload, spans=spans).to_dict()
    except Exception:  # noqa: BLE001
        return None


def _kivi_layout(cache: Any) -> dict[str, int] | None:
    """Layers of the static KIVI store that froze (decoded from its buffers), counted by code layout."""
    counts: dict[str, int] = {}
    for layer in getattr(getattr(cache, "core", None), "layers", ()):
        if getattr(layer, "freezes", 0) and isinstance(getattr(layer, "layout", None), str):
            counts[layer.layout] = counts.get(layer.layout, 0) + 1
    return counts or None


def _weight_kernels(model: torch.nn.Module) -> dict[str, Any] | None:
    from memfit.weights.format import decode_kernels

    return decode_kernels(model)


def _weight_bytes(model: torch.nn.Module) -> int:
    from memfit.weights import model_weight_bytes

    return model_weight_bytes(model)
