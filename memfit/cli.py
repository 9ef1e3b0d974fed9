"""`memfit` command line: run | compress | methods | bench."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console

from memfit.errors import ConfigError, MemfitError
from memfit.units import format_bytes

# rich_markup_mode=None: click's plain help and usage errors ("Usage: ... Error: No such option"), which read the
# same in a narrow terminal, a pipe or a log, and show no type tag such as <bool> after flags that take no value.
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Fit LLM inference into the memory you have.",
)
out = Console(soft_wrap=True)


def _print_version(value: bool) -> None:
    if value:
        from memfit import __version__

        print(f"memfit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print memfit's version and exit."
    ),
) -> None:
    """Fit LLM inference into the memory you have: real KV-cache compression, measured."""


def parse_params(items: list[str] | None) -> dict[str, str]:
    params: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--param {item!r} must look like KEY=VALUE")
        key, value = item.split("=", 1)
        if not key.strip():
            raise ConfigError(f"--param {item!r} has an empty key")
        params[key.strip()] = value.strip()
    return params


def _device_option() -> Any:
    return typer.Option("cpu", "--device", help="cpu | cuda | cuda:N | auto (CUDA when there is one).")


def _dtype_option() -> Any:
    return typer.Option(
        "auto", "--dtype",
        help="Model and KV precision: auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16 | float16.",
    )


def check_range(option: str, value: int, low: int, high: int | None = None) -> None:
    """A numeric option outside [low, high] is one ConfigError, raised before any model work."""
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"{option} must be {bound}, got {value}")


def _interrupted(where: str) -> NoReturn:
    """Ctrl-C: one line saying what was kept, and the shell's conventional status for SIGINT (128 + 2)."""
    print(f"interrupted: {where}", file=sys.stderr)
    raise SystemExit(130)


def _check_device(device: str, dtype: str) -> None:
    """Bad --device/--dtype is one clear error before any model work."""
    from memfit.models import resolve_device, resolve_dtype

    resolve_dtype(dtype, resolve_device(device))


def _check_tp(tp: int | None, backend: str, unsupported: dict[str, bool]) -> None:
    """What --tp (or a rank under torchrun) cannot run with: one clear error before any rank is launched."""
    if tp is not None and tp < 2:
        raise ConfigError("--tp must be at least 2 (or leave it out for one process)")
    bad = [option for option, given in unsupported.items() if given]
    if bad:
        raise ConfigError(f"--tp does not combine with {', '.join(bad)} yet: run without --tp, or without them")


def read_text_file(path: Path, what: str = "prompt file") -> str:
    """A UTF-8 text file's contents; a missing, unreadable or binary file is one ConfigError.

    A binary file (say /bin/ls) decoded with replacement characters becomes a >100K-token prompt that runs for
    many minutes before anyone sees a problem, so it is refused up front."""
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror or e}") from None
    if b"\x00" in data[:65536]:
        raise ConfigError(f"{what} {path} is not a text file (it holds NUL bytes): give a UTF-8 text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{what} {path} is not a text file (invalid UTF-8 at byte {e.start}): give a UTF-8 text file "
            "(convert with e.g. `iconv -f latin1 -t utf-8`)"
        ) from None


def read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    if prompt is not None and prompt_file is not None:
        raise ConfigError("give either --prompt or --prompt-file, not both")
    if prompt_file is not None:
        text = read_text_file(prompt_file)
    elif prompt is not None:
        text = prompt
    elif not sys.stdin.isatty():
        text = sys.stdin.read()
    else:
        raise ConfigError("no prompt: use --prompt TEXT, --prompt-file PATH or pipe text on stdin")
    if not text.strip():
        raise ConfigError("the prompt is empty")
    return text


@app.command()
def run(
    model: str = typer.Option("default", "--model", help="HF folder, hub id, .gguf file, or 'default'."),
    method: str = typer.Option(
        "full", "--method", help="Compression method (see `memfit methods`), or <eviction>+<quantizer>: snapkv+kivi."
    ),
    budget: str = typer.Option(None, "--budget", help="Fraction of the prompt in (0, 1] or tokens per layer (> 1)."),
    param: list[str] = typer.Option(None, "--param", help="Method parameter KEY=VALUE (repeatable)."),
    prompt: str = typer.Option(None, "--prompt", help="Prompt text."),
    prompt_file: Path = typer.Option(None, "--prompt-file", help="Read the prompt from a file."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Tokens to generate."),
    chat: bool = typer.Option(True, "--chat/--no-chat", help="Wrap the prompt in the model's chat template."),
    prefill_chunk: int = typer.Option(None, "--prefill-chunk", help="Prefill in chunks of N tokens, evicting after each."),
    allocation: str = typer.Option(
        "uniform", "--allocation", help="Share the budget: uniform | pyramid (layers) | adakv (heads) | pyramid+adakv."
    ),
    spans: str = typer.Option(
        "auto", "--spans", help="auto | on | off: when a token is kept, keep the rest of its word or number (same "
        "budget); auto = on for eviction methods with a budget."
    ),
    device: str = _device_option(),
    dtype: str = _dtype_option(),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    truncate: str = typer.Option(
        None,
        "--truncate",
        help="A prompt longer than the model's context window is refused; --truncate left drops its beginning, "
        "right its end, until it fits.",
    ),
    backend: str = typer.Option(
        "auto", "--backend",
        help="auto (fast on CUDA for supported architectures, else portable) | fast (static stores, Triton decode "
        "kernels, CUDA graphs) | portable (any transformers model, any device). --json names the one that ran.",
    ),
    load_format: str = typer.Option(
        "auto", "--load-format",
        help="auto (the model's weights) | dummy (random weights from a config: --model llama-3.1-8b, qwen2.5-7b, "
        "gemma-3-1b, smollm2-135m or a config.json; for speed and memory runs).",
    ),
    context: int = typer.Option(
        None, "--context", help="Without a prompt: feed an N-token prompt of natural text (speed and memory runs)."
    ),
    kv: Path = typer.Option(
        None, "--kv", help="Answer from a compressed context made by `memfit compress` (the prompt is the question)."
    ),
    weights: str = typer.Option(
        None, "--weights",
        help="Compress the model's linear layers on load: NAME[:BITS][:KEY=VALUE...], e.g. slim-llm:3, rtn:4, "
        "gqsa:4:sparsity=0.5 (see `memfit methods`).",
    ),
    weights_memory: str = typer.Option(
        None, "--weights-memory",
        help="Device memory for weights (e.g. 4GiB): what does not fit streams from CPU memory or --offload-dir.",
    ),
    offload_dir: Path = typer.Option(None, "--offload-dir", help="Disk tier for streamed weights (safetensors files)."),
    offload_policy: str = typer.Option(
        "auto", "--offload-policy",
        help="auto | superpipeline (layers, pinned CPU) | tpi (attention/MLP blocks from disk) | pregated (MoE "
        "experts, next-layer prefetch) | ondemand (MoE experts, no prefetch).",
    ),
    tp: int = typer.Option(
        None, "--tp",
        help="Tensor parallelism over N processes (torchrun; NCCL on GPUs, gloo on CPUs): each rank holds and "
        "compresses its own KV heads. --json reports per-rank and total KV bytes.",
    ),
) -> None:
    """Generate an answer with a compressed KV cache and report what it held."""
    if kv is not None:  # the document is already compressed: the prompt is a question about it
        _reject_with_kv(method=method != "full", budget=budget is not None, param=bool(param),
                        allocation=allocation != "uniform", prefill_chunk=prefill_chunk is not None)
        return _answer_from_context(kv, model, read_prompt(prompt, prompt_file), max_new_tokens, device, dtype,
                                    as_json)
    from memfit.backend import check_backend
    from memfit.core.budget import Budget
    from memfit.core.method import build_policy
    from memfit.models import check_load_format
    from memfit.window import TRUNCATE_SIDES

    check_backend(backend)
    check_load_format(load_format)
    if context is not None:
        check_range("--context", context, 1)
        if prompt is not None or prompt_file is not None:
            raise ConfigError("give either --context N (a generated N-token prompt) or a prompt, not both")
    if backend == "fast":  # before any model work: a CPU run cannot use the fast backend
        from memfit.backend import fast_on_cpu
        from memfit.models import resolve_device

        if resolve_device(device).type != "cuda" and not fast_on_cpu():
            raise ConfigError("--backend fast needs a CUDA device (its kernels and CUDA graphs are GPU-only): use "
                              "--device cuda on a machine with a GPU, or --backend portable")
    text = read_prompt(prompt, prompt_file) if context is None else ""
    if weights:
        from memfit.weights import parse_weight_spec

        parse_weight_spec(weights)  # a bad weight spec is one clear error before any model work
    params = parse_params(param)
    build_policy(method, Budget.parse(budget), params)  # validate (composed names too) before loading the model
    from memfit.core.spans import resolve_spans

    resolve_spans(spans, method, budget)  # a bad --spans value too
    from memfit.core.allocation import parse_allocation

    parse_allocation(allocation)
    check_range("--max-new-tokens", max_new_tokens, 0)
    if prefill_chunk is not None:
        check_range("--prefill-chunk", prefill_chunk, 1)
    if truncate is not None and truncate not in TRUNCATE_SIDES:
        raise ConfigError(f"--truncate must be 'left' (drop the beginning) or 'right' (drop the end), got {truncate!r}")
    _check_device(device, dtype)
    from memfit import distributed

    ranks = distributed.in_torchrun()
    if tp is not None or ranks:
        _check_tp(tp, backend, {"--weights": bool(weights), "--weights-memory": weights_memory is not None})
        if not ranks:  # launch the ranks; each re-enters here under torchrun
            distributed.check_model(model, int(tp), load_format)
            raise SystemExit(distributed.launch(int(tp), distributed.strip_tp(sys.argv[1:])))
        distributed.init(device)
    if weights_memory is not None:
        from memfit.offload import POLICIES, parse_bytes

        parse_bytes(weights_memory)
        if offload_policy not in POLICIES:
            raise ConfigError(f"--offload-policy must be one of {', '.join(POLICIES)}, got {offload_policy!r}")
    elif offload_dir is not None or offload_policy != "auto":
        raise ConfigError("--offload-dir and --offload-policy need --weights-memory (the device memory for weights)")
    from memfit.engine import run as run_engine
    from memfit.models import load_model
    from memfit.window import context_window, fit_prompts

    try:
        pair = load_model(model, device="cpu" if weights_memory else device, load_format=load_format,
                          dtype=dtype if weights_memory is None or dtype != "auto" or device == "cpu" else "bfloat16",
                          tp=ranks, progress=not ranks or distributed.rank() == 0)
        window = context_window(pair[0])
        if context is not None and window is not None and context + max_new_tokens > window:
            raise ConfigError(f"--context {context} + --max-new-tokens {max_new_tokens} is more than the model's "
                              f"context window ({window} positions): use a smaller --context")
        fitted = text if context is not None else fit_prompts(
            pair[1], [text], chat=chat, window=context_window(pair[0]), new_tokens=max_new_tokens,
            truncate=truncate, method=method, budget=budget, prefill_chunk=prefill_chunk,
        )[0]
        if fitted != text:
            print(f"memfit: --truncate {truncate}: the prompt was cut to fit the model's context window", file=sys.stderr)
        result = run_engine(
            fitted,
            model=pair,
            method=method,
            budget=budget,
            params=params,
            max_new_tokens=max_new_tokens,
            chat=chat,
            prefill_chunk=prefill_chunk,
            allocation=allocation,
            spans=spans,
            backend=backend,
            context=context,
            weights=weights,
            device=device,
            weights_memory=weights_memory,
            offload_dir=None if offload_dir is None else str(offload_dir),
            offload_policy=offload_policy,
        )
    except KeyboardInterrupt:
        _interrupted("nothing was written")
    result.model = model  # the spec the user gave ("default"), not the cache folder it resolved to
    if ranks:  # every rank holds its own KV heads: report the per-rank bytes and their sum, from rank 0 only
        held, full = distributed.gather_ints(result.kv_bytes_held), distributed.gather_ints(result.kv_bytes_full)
        result.tp = len(held)
        result.kv_bytes_held_per_rank = held
        result.weight_bytes_per_rank = distributed.gather_ints(result.weight_bytes)
        result.peak_memory_bytes_per_rank = distributed.gather_ints(result.peak_memory_bytes)
        result.kv_bytes_held, result.kv_bytes_full = sum(held), sum(full)
        result.compression_ratio = result.kv_bytes_full / result.kv_bytes_held if result.kv_bytes_held else 0.0
        if distributed.rank() != 0:
            return
    if as_json:
        print(json.dumps(result.to_dict()))
        return
    print(result.text)
    out.print(
        f"[dim]memfit[/] {result.method} budget={result.budget} · prompt {result.prompt_tokens} tok · "
        f"KV {format_bytes(result.kv_bytes_full)} full → {format_bytes(result.kv_bytes_held)} held "
        f"({result.compression_ratio:.2f}x) · peak {format_bytes(result.peak_memory_bytes)} · "
        f"prefill {result.prefill_seconds:.2f} s · decode {result.decode_tokens_per_second:.1f} tok/s"
        + (f" ({result.decode_steady_tokens_per_second:.1f} after {result.decode_setup_seconds:.2f} s of graph "
           "set-up)" if result.decode_steady_tokens_per_second else "")
        + (f" · weights {result.weights} {format_bytes(result.weight_bytes)}" if result.weights != "none" else "")
        + _kernel_note(result.weight_kernels),
        highlight=False,
    )


def _kernel_note(kernels: dict[str, Any] | None) -> str:
    """" (pairs 224)" — which decode paths the compressed layers took; a kernel failure is said in full."""
    if not kernels:
        return ""
    paths = ", ".join(f"{k} {v}" for k, v in kernels.items() if k != "kernel_error")
    error = kernels.get("kernel_error")
    return f" ({paths})" + (f" · weight kernel failed: {error}" if error else "")


def _reject_with_kv(**given: bool) -> None:
    """Options that describe how to compress do not apply to an already compressed context."""
    bad = [f"--{k.replace('_', '-')}" for k, v in given.items() if v]
    if bad:
        raise ConfigError(f"{', '.join(bad)} cannot be used with --kv: the context file fixes the method, budget and "
                          "parameters (make another one with `memfit compress`)")


def _answer_from_context(path: Path, model: str, question: str, max_new_tokens: int, device: str, dtype: str,
                         as_json: bool) -> None:
    from memfit.contexts import CompressedContext
    from memfit.engine import run as run_engine
    from memfit.models import load_model

    check_range("--max-new-tokens", max_new_tokens, 0)
    _check_device(device, dtype)
    try:
        pair = load_model(model, device=device, dtype=dtype)
        ctx = CompressedContext.load(path, pair)
        result = run_engine(question, max_new_tokens=max_new_tokens, kv=ctx)
    except KeyboardInterrupt:
        _interrupted("nothing was written")
    result.model = model
    if as_json:
        print(json.dumps({**result.to_dict(), "kv_file": str(path), "context_tokens": ctx.seen}))
        return
    print(result.text)
    out.print(
        f"[dim]memfit[/] {result.method} budget={result.budget} · context {ctx.seen} tok from {path} · question "
        f"{result.prompt_tokens} tok · KV {format_bytes(result.kv_bytes_full)} full → "
        f"{format_bytes(result.kv_bytes_held)} held ({result.compression_ratio:.2f}x) · prefill "
        f"{result.prefill_seconds:.2f} s · decode {result.decode_tokens_per_second:.1f} tok/s",
        highlight=False,
    )


@app.command()
def compress(
    model: str = typer.Option("default", "--model", help="HF folder, hub id, .gguf file, or 'default'."),
    method: str = typer.Option(
        "kvzip", "--method", help="Compression method (see `memfit methods`), or <eviction>+<quantizer>."
    ),
    budget: str = typer.Option(None, "--budget", help="Fraction of the document in (0, 1] or tokens per layer (> 1)."),
    param: list[str] = typer.Option(None, "--param", help="Method parameter KEY=VALUE (repeatable)."),
    prompt: str = typer.Option(None, "--prompt", help="Document text."),
    prompt_file: Path = typer.Option(None, "--prompt-file", help="Read the document from a file."),
    output: Path = typer.Option(..., "-o", "--output", help="Context file to write (e.g. doc.mfkv)."),
    chat: bool = typer.Option(
        True, "--chat/--no-chat", help="Open a chat-template user turn before the document (questions close it)."
    ),
    prefill_chunk: int = typer.Option(None, "--prefill-chunk", help="Prefill in chunks of N tokens, evicting after each."),
    allocation: str = typer.Option(
        "uniform", "--allocation", help="Share the budget: uniform | pyramid (layers) | adakv (heads) | pyramid+adakv."
    ),
    spans: str = typer.Option(
        "auto", "--spans", help="auto | on | off: when a token is kept, keep the rest of its word or number (same "
        "budget); auto = on for eviction methods with a budget."
    ),
    device: str = _device_option(),
    dtype: str = _dtype_option(),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Compress a document once into a context file; answer questions from it with `memfit run --kv FILE`."""
    from memfit.core.allocation import parse_allocation
    from memfit.core.budget import Budget
    from memfit.core.method import build_policy

    text = read_prompt(prompt, prompt_file)
    params = parse_params(param)
    build_policy(method, Budget.parse(budget), params)  # validate before loading the model
    parse_allocation(allocation)
    from memfit.core.spans import resolve_spans

    resolve_spans(spans, method, budget)  # a bad --spans value too
    if prefill_chunk is not None:
        check_range("--prefill-chunk", prefill_chunk, 1)
    if output.is_dir():
        raise ConfigError(f"-o {output} is a folder: give a file name, e.g. {output / 'doc.mfkv'}")
    if not output.parent.is_dir():
        raise ConfigError(f"-o {output}: the folder {output.parent} does not exist")
    _check_device(device, dtype)
    from memfit.contexts import compress as compress_document
    from memfit.models import load_model

    try:
        pair = load_model(model, device=device, dtype=dtype)
        ctx = compress_document(text, pair, method, budget, params, allocation=allocation, chat=chat,
                                prefill_chunk=prefill_chunk, spans=spans)
        path = ctx.save(output)
    except KeyboardInterrupt:
        _interrupted(f"{output} was not written")
    info = ctx.info
    full, held = int(info["kv_bytes_full"]), int(info["kv_bytes_held"])
    summary = {"output": str(path), "file_bytes": path.stat().st_size, "method": method, "budget": info["budget_resolved"],
               "params": params, "allocation": allocation, "document_tokens": ctx.seen, "kv_bytes_full": full,
               "kv_bytes_held": held, "compression_ratio": full / held if held else float("inf"),
               "compress_seconds": info["compress_seconds"], "model": model}
    if as_json:
        print(json.dumps(summary))
        return
    out.print(
        f"[dim]memfit compress[/] {method} budget={info['budget_resolved']} · document {ctx.seen} tok · KV "
        f"{format_bytes(full)} full → {format_bytes(held)} held ({summary['compression_ratio']:.2f}x) · "
        f"{info['compress_seconds']:.2f} s · wrote {path} ({format_bytes(summary['file_bytes'])})",
        highlight=False,
    )


@app.command()
def methods(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List every registered method: paper, family, when it acts, parameters and defaults.

    Quantizers (family "quantization") also compose as <eviction>+<quantizer>, e.g. snapkv+kivi."""
    from memfit.core.method import all_methods
    from memfit.weights import weight_methods

    described = [describe_method(cls) for cls in all_methods().values()]
    described += [describe_method(cls) for cls in weight_methods().values()]  # family "weights: ..." (--weights)
    if as_json:
        print(json.dumps(described, indent=2, default=str))
        return
    # plain text, one block per method: reads the same in a narrow terminal, a pipe or a file
    print(
        "memfit methods: --method NAME, --param KEY=VALUE. Quantizers (family quantization) compose after an "
        "eviction method: --method <eviction>+<quantizer> (e.g. snapkv+kivi), parameters as --param kivi.bits=2. "
        "Weight methods (family weights: ...) compress the model's linear layers: --weights NAME:BITS on run and "
        "bench, or `memfit quantize`."
    )
    for d in described:
        print(f"\n{d['name']} · {d['family']} · acts: {d['acts']}")
        print(f"  {d['paper']}" + (f" (arXiv {d['arxiv']})" if d["arxiv"] else ""))
        if d["summary"]:
            print(f"  {d['summary']}")
        rows = [(f"{k}={v['default']}", v["allowed"], v["help"]) for k, v in d["params"].items()]
        if rows:
            widths = [max(len(r[i]) for r in rows) for i in range(2)]
            for name_default, allowed, meaning in rows:
                print(f"  {name_default.ljust(widths[0])}  {allowed.ljust(widths[1])}  {meaning}".rstrip())


def describe_method(cls: type) -> dict[str, Any]:
    """``Method.describe()`` plus, per parameter, ``help`` (what it means) and ``allowed`` (the values it takes),
    from the class's ``param_help`` = {name: (meaning, allowed values)}; empty strings where a class has none."""
    d = cls.describe()
    docs = getattr(cls, "param_help", {})
    for name, entry in d["params"].items():
        meaning, allowed = docs.get(name, ("", ""))
        entry["help"], entry["allowed"] = meaning, allowed
    return d


@app.command()
def quantize(
    model: str = typer.Option("default", "--model", help="HF folder, hub id, .gguf file, or 'default'."),
    method: str = typer.Option(..., "--method", help="Weight method: rtn | slim-llm | gqsa | svdquant | flash-llm."),
    bits: int = typer.Option(None, "--bits", help="Bits per weight (1-8; the method's default if omitted)."),
    out_dir: Path = typer.Option(..., "--out", help="Folder to write (safetensors + memfit-weights.json)."),
    param: list[str] = typer.Option(None, "--param", help="Method parameter KEY=VALUE (repeatable), e.g. group_size=64."),
    calib_file: Path = typer.Option(
        None, "--calib-file", help="Calibration text (calibrated methods; default: the standard library's pydoc prose)."
    ),
    calib_tokens: int = typer.Option(512, "--calib-tokens", help="Calibration tokens (calibrated methods)."),
    dtype: str = _dtype_option(),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Compress a model's linear layers and save the result; load it with `memfit run --model DIR`."""
    import time

    from memfit.weights import model_weight_bytes, parse_weight_spec, quantize_model
    from memfit.weights.io import save_quantized

    spec = method if bits is None else f"{method}:{bits}"
    weight_method = parse_weight_spec(spec, parse_params(param))
    if weight_method is None:
        raise ConfigError("--method none compresses nothing: pick a weight method (see `memfit methods`)")
    check_range("--calib-tokens", calib_tokens, 256)
    if calib_file is not None:
        read_text_file(calib_file, "calibration file")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(f"--out {out_dir} exists and is not an empty folder: pick a new folder")
    _check_device("cpu", dtype)
    from rich.progress import Progress

    from memfit.models import load_model

    mdl, tok = load_model(model, dtype=dtype)
    before = model_weight_bytes(mdl)
    t0 = time.perf_counter()
    with Progress(console=Console(stderr=True), transient=True, disable=as_json) as bar:
        task = bar.add_task(f"quantizing with {weight_method.spec()}", total=None)
        quantize_model(mdl, weight_method, tokenizer=tok, calib_file=calib_file, calib_tokens=calib_tokens,
                       progress=lambda msg: bar.update(task, description=f"{weight_method.spec()}: {msg}"))
    seconds = time.perf_counter() - t0
    save_quantized(mdl, tok, out_dir, weight_method.spec())
    after = model_weight_bytes(mdl)
    info = {"out": str(out_dir), "weights": weight_method.spec(), "weight_bytes_before": before,
            "weight_bytes": after, "quantize_seconds": round(seconds, 2)}
    if as_json:
        print(json.dumps(info))
        return
    out.print(f"[dim]memfit[/] quantized {model} with {info['weights']} in {seconds:.1f} s · weights "
              f"{format_bytes(before)} → {format_bytes(after)} · saved to {out_dir} (memfit run --model {out_dir})",
              highlight=False)


BENCH_TASKS_HELP = (
    "niah_single_number, niah_single_word, niah_single_uuid, niah_multikey, niah_multivalue, niah_multiquery, "
    "variable_tracking, common_words, ppl, fidelity"
)


@app.command()
def bench(
    model: str = typer.Option("default", "--model", help="HF folder, hub id, .gguf file, or 'default'."),
    methods: str = typer.Option(
        "full,streaming,snapkv,h2o",
        "--methods",
        help="Comma-separated methods (see `memfit methods`; composed names like snapkv+kivi pass through). "
        "The full cache always runs once, unbudgeted, as the reference.",
    ),
    budgets: str = typer.Option(
        "0.125,0.25,0.5",
        "--budgets",
        help="Comma-separated budgets: fractions of the prompt in (0, 1] or tokens per layer (> 1); 'none' = no "
        "token budget. A quantizer alone (kivi, gear, vidkv) keeps every token and runs once, without a budget.",
    ),
    tasks: str = typer.Option(
        "niah_single_number,fidelity", "--tasks", help=f"Comma-separated tasks: {BENCH_TASKS_HELP}."
    ),
    context: int = typer.Option(2048, "--context", help="Prompt length in tokens (±2%)."),
    samples: int = typer.Option(4, "--samples", help="Samples per task (needle depths spread evenly)."),
    corpus: Path = typer.Option(
        None, "--corpus", help="Natural filler from this text file instead of pydoc_data.topics (e.g. a PG-19 book)."
    ),
    out_dir: Path = typer.Option(
        Path("bench"),
        "--out",
        help="Output folder: results.jsonl (appended; finished rows are skipped), summary.csv, pareto.png, report.md.",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the generated samples."),
    filler: str = typer.Option(
        "natural", "--filler", help="natural (pydoc or --corpus) | noise (RULER's repeated sentences)."
    ),
    batch_size: int = typer.Option(4, "--batch-size", help="Samples run together (left padding; results are exact)."),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", help="Answer length (default: per task, 12-48; +16 with --chat)."),
    chat: bool = typer.Option(
        False, "--chat/--no-chat", help="Wrap answer-task prompts in the model's chat template (default: plain text)."
    ),
    allocation: str = typer.Option(
        "uniform",
        "--allocation",
        help="Comma-separated budget allocations to bench each eviction method with: uniform | pyramid (layers) | "
        "adakv (heads) | pyramid+adakv; non-uniform rows record it as the parameter 'allocation'.",
    ),
    spans: str = typer.Option(
        "auto", "--spans", help="auto | off | on | off,on: keep whole words/numbers when one token is selected (rows "
        "with spans on record the parameter 'spans'); auto = on for eviction methods with a budget."
    ),
    device: str = _device_option(),
    dtype: str = _dtype_option(),
    param: list[str] = typer.Option(
        None,
        "--param",
        help="Method parameter KEY=VALUE (repeatable): component.key (kivi.bits=4) reaches every method with that "
        "component, a plain key every method that has it. Rows record their parameters, so runs with different "
        "values share one --out.",
    ),
    weights: str = typer.Option(
        None, "--weights",
        help="Compress the model's linear layers on load: NAME[:BITS][:KEY=VALUE...], e.g. slim-llm:3, rtn:4, "
        "gqsa:4:sparsity=0.5 (see `memfit methods`).",
    ),
    backend: str = typer.Option(
        "auto", "--backend", help="auto | fast | portable (as on `memfit run`; rows record the backend that ran)."
    ),
    load_format: str = typer.Option(
        "auto", "--load-format", help="auto | dummy (random weights from a config such as llama-3.1-8b)."
    ),
    tp: int = typer.Option(
        None, "--tp",
        help="Tensor parallelism over N processes (torchrun, as on `memfit run`): rank 0 writes the rows, which add "
        "tp and kv_bytes_held_per_rank.",
    ),
) -> None:
    """Memory, speed and quality of every method against the full cache, on the same generated prompts.

    Tasks are generated locally (seeded, at --context tokens). Writes results.jsonl (appended; rows already there
    are skipped, so an interrupted bench resumes), summary.csv, pareto.png and report.md into --out.

    Why these defaults (SmolLM2-135M-Instruct, 2048 tokens, natural pydoc_data.topics filler): the full cache
    finds the single needle in 100% of plain-text prompts (20 depths) but in 75% through the chat template, so
    prompts are plain text unless --chat; natural prose rather than --filler noise, which hides eviction damage.
    niah_single_number gives the answer score, fidelity the KL / top-1 / ppl against the full cache over a
    64-token continuation. 4 samples per task keep the 4-method x 3-budget bench near 20 min of single-thread
    CPU time (less on 2 cores).
    """
    from memfit.bench.report import quality_points
    from memfit.bench.runner import parse_budgets, parse_list, route_params, run_bench

    method_list = parse_list(methods, "methods")
    check_range("--context", context, 64)
    check_range("--samples", samples, 1)
    check_range("--batch-size", batch_size, 1)
    if max_new_tokens is not None:
        check_range("--max-new-tokens", max_new_tokens, 1)
    if corpus is not None:
        read_text_file(corpus, "corpus file")
    _check_device(device, dtype)
    from memfit.backend import check_backend
    from memfit.models import check_load_format

    check_backend(backend)
    check_load_format(load_format)
    from memfit import distributed

    ranks = distributed.in_torchrun()
    if tp is not None or ranks:
        _check_tp(tp, backend, {"--weights": bool(weights)})
    created = make_out_dir(out_dir)  # last check: a folder we cannot write is refused before any model work
    try:
        bench_args: dict[str, Any] = dict(
            methods=method_list,
            budgets=parse_budgets(budgets),
            tasks=parse_list(tasks, "tasks"),
            context=context,
            samples=samples,
            corpus=corpus,
            out=out_dir,
            seed=seed,
            filler=filler,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            chat=chat,
            params=route_params(method_list, parse_params(param)) if param else None,
            allocations=parse_list(allocation, "allocation"),
            spans=parse_list(spans, "spans"),
            device=device,
            dtype=dtype,
            weights=weights,
            backend=backend,
            load_format=load_format,
        )
        if tp is not None and not ranks:  # every bad input is one error here, not one per rank; then launch
            run_bench(model, check_only=True, **bench_args)
            distributed.check_model(model, int(tp), load_format)
            raise SystemExit(distributed.launch(int(tp), distributed.strip_tp(sys.argv[1:])))
        if ranks:
            distributed.init(device)
        result = run_bench(model, **bench_args)
    except MemfitError:
        for d in created:  # a bad option found later: leave no empty folder behind
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    except KeyboardInterrupt:
        _interrupted(
            f"every finished row is in {out_dir / 'results.jsonl'}; run the same command again to resume "
            "(summary.csv and report.md are written when a run completes)"
        )
    if ranks and distributed.rank() != 0:  # rank 0 prints the table
        return
    headers = ("method", "budget", "context", "KV held", "ratio", "quality %", "loss pts", "KL", "top-1 %")
    rows = [
        (
            p["label"],
            "–" if p["budget"] is None else str(p["budget"]),
            str(p["context"]),
            format_bytes(p["kv_bytes_held"]),
            "–" if not p["compression_ratio"] else f"{p['compression_ratio']:.2f}x",
            "–" if p["quality"] is None else f"{100 * p['quality']:.1f}",
            "–" if p["loss"] is None else f"{100 * p['loss']:+.1f}",
            "–" if p["kl"] is None else f"{p['kl']:.4f}",
            "–" if p["top1"] is None else f"{100 * p['top1']:.1f}",
        )
        for p in quality_points(result.rows)
    ]
    print(f"memfit bench · {out_dir}")
    print(plain_table(headers, rows))
    out.print(
        f"[dim]memfit bench[/] {len(result.new_rows)} new rows, {result.skipped} already done · "
        f"{result.seconds:.0f} s wall, {result.cpu_seconds:.0f} s CPU · "
        + " · ".join(str(p) for p in result.files.values()),
        highlight=False,
    )


@app.command()
def serve(
    model: str = typer.Option("default", "--model", help="HF folder, hub id, .gguf file, 'default', or a dummy config."),
    method: str = typer.Option("full", "--method", help="Default compression method (requests may override it)."),
    budget: str = typer.Option(None, "--budget", help="Default budget: fraction of the prompt or tokens per layer."),
    param: list[str] = typer.Option(None, "--param", help="Default method parameter KEY=VALUE (repeatable)."),
    kv_memory: str = typer.Option(
        None, "--kv-memory", help="KV bytes shared by running requests, e.g. 20GiB (default: 90% of free GPU memory "
        "after the weights, or a quarter of available RAM on CPU)."),
    max_batch: int = typer.Option(64, "--max-batch", help="At most this many requests running at once."),
    prefill_chunk: int = typer.Option(512, "--prefill-chunk", help="Prompt tokens read per scheduler tick."),
    batch_decode: bool = typer.Option(
        True, "--batch-decode/--no-batch-decode",
        help="Decode every running request in one forward per step (default), or one forward per request."),
    stack_decode: bool = typer.Option(
        True, "--stack-decode/--no-stack-decode",
        help="Inside a batched step, frozen static stores (fast backend: KIVI, dense) decode as rows of shared "
        "buffers, one call per layer for all of them (default), or each in calls of its own."),
    decode_graphs: bool = typer.Option(
        True, "--decode-graphs/--no-decode-graphs",
        help="On CUDA, record the stack blocks' decode step in a CUDA graph and replay it while the blocks stay "
        "the same (default), or run it eagerly."),
    max_tokens: int = typer.Option(256, "--max-tokens", help="Default max_tokens of chat requests."),
    spans: str = typer.Option(
        "auto", "--spans", help="auto | on | off: default for requests (their memfit.spans overrides it); auto = keep "
        "whole words/numbers for an eviction method with a budget, as memfit run."),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port"),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn's log level: debug | info | warning | error."),
    load_format: str = typer.Option(None, "--load-format", help="'dummy': random weights from a config (speed runs)."),
    device: str = _device_option(),
    dtype: str = _dtype_option(),
    tp: int = typer.Option(
        None, "--tp",
        help="Tensor parallelism over N processes (torchrun, as on `memfit run`): rank 0 serves HTTP and schedules, "
        "the others follow; --kv-memory is then per GPU."),
) -> None:
    """Serve an OpenAI-compatible API whose running batch is sized by compressed KV bytes."""
    from memfit.core.budget import Budget
    from memfit.core.method import build_policy
    from memfit.core.spans import resolve_spans
    from memfit.serve import parse_bytes
    from memfit.serve import serve as run_server

    params = parse_params(param)
    build_policy(method, Budget.parse(budget), params)  # a bad default fails before the model loads
    resolve_spans(spans, method, budget)
    _check_device(device, dtype)
    from memfit import distributed

    if tp is not None and not distributed.in_torchrun():  # one error here for a bad --tp, then launch the ranks
        _check_tp(tp, "auto", {})
        distributed.check_model(model, int(tp), load_format or "auto")
        raise SystemExit(distributed.launch(int(tp), distributed.strip_tp(sys.argv[1:])))
    run_server(model, host=host, port=port, device=device, dtype=dtype, load_format=load_format, log_level=log_level,
               method=method,
               budget=budget, params=params, kv_memory=parse_bytes(kv_memory) if kv_memory else None,
               max_batch=max_batch, prefill_chunk=prefill_chunk, default_max_tokens=max_tokens,
               batch_decode=batch_decode, spans=spans, stack_decode=stack_decode, decode_graphs=decode_graphs)


@app.command()
def loadtest(
    url: str = typer.Option("http://127.0.0.1:8000", "--url", help="Base URL of any OpenAI-compatible server."),
    concurrency: int = typer.Option(16, "--concurrency", help="Clients sending at once (with --request-rate: the "
                                    "most requests in flight)."),
    requests: int = typer.Option(64, "--requests", help="Requests in all."),
    request_rate: float = typer.Option(
        float("inf"), "--request-rate", help="Requests per second arriving as a Poisson process (open loop, as "
        "vLLM's benchmark_serving); inf (default): every client sends its next request when its last one ends."),
    seed: int = typer.Option(0, "--seed", help="Seed of the --request-rate arrivals."),
    prompt_tokens: int = typer.Option(1024, "--prompt-tokens", help="Prompt length in tokens."),
    max_tokens: int = typer.Option(64, "--max-tokens", help="Tokens to generate per request."),
    model: str = typer.Option(None, "--model", help="Model name to send (default: the server's first model)."),
    chat: bool = typer.Option(False, "--chat/--completions", help="Use /v1/chat/completions."),
    tokenizer: str = typer.Option("default", "--tokenizer", help="Cut prompts with this tokenizer: default | "
                                  "HF folder or hub id | bytes (dummy models) | none (about 4 characters per token)."),
    memfit_field: str = typer.Option(None, "--memfit", help='JSON for the request\'s memfit field, e.g. '
                                     '\'{"method": "snapkv+kivi", "budget": 0.25}\'.'),
    ignore_eos: bool = typer.Option(True, "--ignore-eos/--stop-at-eos", help="Ask for exactly max_tokens tokens."),
    server_pid: int = typer.Option(None, "--server-pid", help="Sample this local process's peak RSS."),
    out_dir: Path = typer.Option(None, "--out", help="Folder for requests.jsonl, summary.jsonl and report.md."),
) -> None:
    """Drive an OpenAI-compatible server: throughput, time to first token and inter-token latency percentiles."""
    from memfit.serve.loadtest import loadtest as run_loadtest

    extra = None
    if memfit_field:
        try:
            extra = json.loads(memfit_field)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--memfit is not valid JSON: {exc}") from None
    row = run_loadtest(url, concurrency, requests, prompt_tokens, max_tokens, out=out_dir, model=model, chat=chat,
                       tokenizer=tokenizer, memfit=extra, ignore_eos=ignore_eos, server_pid=server_pid,
                       command="memfit loadtest " + " ".join(sys.argv[2:]), request_rate=request_rate, seed=seed)
    from memfit.serve.loadtest import markdown

    print(markdown(row))


def plain_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, first column left-aligned, the rest right-aligned.

    Plain text rather than a rich Table: rich squeezes a table to 80 columns when output is redirected and cuts
    the headers; this reads the same in a terminal, a pipe or a log file (wide terminals not needed)."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def make_out_dir(path: Path) -> list[Path]:
    """Create the output folder (with its parents) or raise one ConfigError saying why it cannot be used.

    Returns the folders it created, outermost first, so a caller that fails later can remove them again."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {path} is a file: give a folder (results.jsonl, summary.csv... are written inside)")
    missing = [p for p in [path, *path.parents] if not p.exists()][::-1]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {path}: cannot create this folder ({e.strerror or e}); give a writable folder") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {path}: the folder is not writable; give a writable folder")
    return missing


@app.command()
def plan(
    model: str = typer.Option(
        "default", "--model", help="'default', a built-in config (llama-3.1-8b, qwen2.5-7b, ...), a folder or config.json."
    ),
    memory: str = typer.Option(..., "--memory", help="Memory to fit in, e.g. 24GiB (GPU memory, or RAM on CPU)."),
    context: int = typer.Option(4096, "--context", help="Prompt tokens."),
    batch: int = typer.Option(1, "--batch", help="Rows decoded together (commands are for one row)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Tokens to generate."),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda (what the memory is)."),
    dtype: str = _dtype_option(),
    offload_dir: Path = typer.Option(None, "--offload-dir", help="Streamed weights may live on this disk."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """What fits in --memory, predicted from the model's config alone (no weights loaded), fastest first.

    Predicts bytes of weights (per bit width too), of the KV cache under each method and budget, of activations at
    the prefill chunk, and of the weight-streaming window; prints each configuration that fits as a ready
    `memfit run` command. `memfit run --json` reports its own prediction beside the measured peak."""
    from rich.table import Table

    from memfit.offload import parse_bytes
    from memfit.plan import plan as make_plan

    check_range("--context", context, 1)
    check_range("--batch", batch, 1)
    check_range("--max-new-tokens", max_new_tokens, 1)
    result = make_plan(model, parse_bytes(memory, "--memory"), context, batch, device, dtype, max_new_tokens,
                       offload_dir=offload_dir is not None)
    if offload_dir is not None:
        for p in result.fits:
            p.command = p.command.replace("--offload-dir /tmp/memfit-offload", f"--offload-dir {offload_dir}")
    if as_json:
        print(json.dumps(result.to_dict(), default=str))
        return
    table = Table(title=f"memfit plan · {result.model} · {format_bytes(result.memory)} · {context} tokens x {batch} "
                        f"· {result.dtype} on {result.device}")
    for col in ("#", "peak", "weights on device", "KV", "act.", "ms/token*", "command"):
        table.add_column(col, justify="left" if col == "command" else "right", overflow="fold")
    for i, p in enumerate(result.fits, 1):
        table.add_row(str(i), format_bytes(p.peak_bytes), format_bytes(p.weight_device_bytes),
                      format_bytes(p.kv_bytes) + ("" if p.kv_exact else " ~"), format_bytes(p.activation_bytes),
                      f"{1000 * p.decode_seconds_per_token:.2f}", p.command)
    out.print(table)
    bits = " · ".join(f"{b}-bit {format_bytes(n)}" for b, n in result.weights_by_bits.items())
    out.print(f"[dim]weights[/] {format_bytes(result.weights_bytes)} as {result.dtype}; by bit width: {bits}",
              highlight=False)
    out.print("[dim]* rough decode time per token (bytes read / bandwidth) for ranking only; ~ = KV bytes estimated, "
              "not an exact store formula.[/]", highlight=False)


def main() -> None:
    """Console entry point. Click prints usage errors (usage text, exit 2) and --help itself; memfit's own errors
    are one `error:` line on stderr and exit 2; Ctrl-C is exit 130 (commands say what they kept)."""
    try:
        app(prog_name="memfit")
    except MemfitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except FileNotFoundError as exc:
        print(f"error: file not found: {exc.filename or exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:  # outside a command (while importing or parsing)
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
        # success: click always exits; return instead, so callers (and tests) can call main() like a function


if __name__ == "__main__":
    main()
