"""`memfit` command line: run | methods | bench."""

from __future__ import annotations

import json
import sys
from pathlib import Path

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
