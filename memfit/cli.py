"""`memfit` command line: run | methods | bench."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from memfit.errors import ConfigError, MemfitError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Fit LLM inference into the memory you have.")
out = Console(soft_wrap=True)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TB"


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


def _check_device(device: str, dtype: str) -> None:
    """Bad --device/--dtype is one clear error before any model work."""
    from memfit.models import resolve_device, resolve_dtype

    resolve_dtype(dtype, resolve_device(device))


def read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    if prompt is not None and prompt_file is not None:
        raise ConfigError("give either --prompt or --prompt-file, not both")
    if prompt_file is not None:
        if not prompt_file.is_file():
            raise ConfigError(f"prompt file not found: {prompt_file}")
        text = prompt_file.read_text(encoding="utf-8", errors="replace")
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
    device: str = _device_option(),
    dtype: str = _dtype_option(),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Generate an answer with a compressed KV cache and report what it held."""
    from memfit.core.budget import Budget
    from memfit.core.method import build_policy

    text = read_prompt(prompt, prompt_file)
    params = parse_params(param)
    build_policy(method, Budget.parse(budget), params)  # validate (composed names too) before loading the model
    from memfit.core.allocation import parse_allocation

    parse_allocation(allocation)
    _check_device(device, dtype)
    from memfit.engine import run as run_engine

    result = run_engine(
        text,
        model=model,
        method=method,
        budget=budget,
        params=params,
        max_new_tokens=max_new_tokens,
        chat=chat,
        prefill_chunk=prefill_chunk,
        allocation=allocation,
        device=device,
        dtype=dtype,
    )
    if as_json:
        print(json.dumps(result.to_dict()))
        return
    print(result.text)
    out.print(
        f"[dim]memfit[/] {result.method} budget={result.budget} · prompt {result.prompt_tokens} tok · "
        f"KV {human_bytes(result.kv_bytes_full)} full → {human_bytes(result.kv_bytes_held)} held "
        f"({result.compression_ratio:.2f}x) · peak {human_bytes(result.peak_memory_bytes)} · "
        f"prefill {result.prefill_seconds:.2f} s · decode {result.decode_tokens_per_second:.1f} tok/s",
        highlight=False,
    )


@app.command()
def methods(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List every registered method: paper, family, when it acts, parameters and defaults.

    Quantizers (family "quantization") also compose as <eviction>+<quantizer>, e.g. snapkv+kivi."""
    from memfit.core.method import all_methods

    described = [cls.describe() for cls in all_methods().values()]
    if as_json:
        print(json.dumps(described, indent=2, default=str))
        return
    table = Table(
        title="memfit methods",
        caption="Quantizers (family quantization) compose after an eviction method: --method <eviction>+<quantizer> "
        "(e.g. snapkv+kivi); address a component's parameter as --param kivi.bits=2.",
    )
    for col in ("name", "family", "acts", "paper", "parameters (defaults)"):
        table.add_column(col, overflow="fold")
    for d in described:
        params = ", ".join(f"{k}={v['default']}" for k, v in d["params"].items()) or "-"
        paper = d["paper"] + (f" (arXiv {d['arxiv']})" if d["arxiv"] else "")
        table.add_row(d["name"], d["family"], d["acts"], paper, params)
    out.print(table)


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
    device: str = _device_option(),
    dtype: str = _dtype_option(),
    param: list[str] = typer.Option(
        None,
        "--param",
        help="Method parameter KEY=VALUE (repeatable): component.key (kivi.bits=4) reaches every method with that "
        "component, a plain key every method that has it. Rows record their parameters, so runs with different "
        "values share one --out.",
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
    from memfit.bench.report import format_bytes, quality_points
    from memfit.bench.runner import parse_budgets, parse_list, route_params, run_bench

    method_list = parse_list(methods, "methods")
    _check_device(device, dtype)
    result = run_bench(
        model,
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
        device=device,
        dtype=dtype,
    )
    table = Table(title=f"memfit bench · {out_dir}")
    for col in ("method", "budget", "context", "KV held", "ratio", "quality %", "loss pts", "KL", "top-1 %"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for p in quality_points(result.rows):
        table.add_row(
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
    out.print(table)
    out.print(
        f"[dim]memfit bench[/] {len(result.new_rows)} new rows, {result.skipped} already done · "
        f"{result.seconds:.0f} s wall, {result.cpu_seconds:.0f} s CPU · "
        + " · ".join(str(p) for p in result.files.values()),
        highlight=False,
    )


def main() -> None:
    try:
        app(standalone_mode=False)
    except MemfitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except FileNotFoundError as exc:
        print(f"error: file not found: {exc.filename or exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except SystemExit:
        raise
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            raise SystemExit(exc.exit_code) from None
        if isinstance(exc, click.exceptions.Abort):
            raise SystemExit(1) from None
        raise


if __name__ == "__main__":
    main()
