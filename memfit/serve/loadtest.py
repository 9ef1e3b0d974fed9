"""`memfit loadtest`: drive any OpenAI-compatible server (memfit serve, vLLM, SGLang, TGI) and measure it.

C client tasks share N requests (closed loop: a client sends its next request when its last one ends), or, with
`--request-rate R`, requests arrive on their own clock (open loop, as vLLM's benchmark_serving: a Poisson process
of R requests per second, seeded, at most C in flight); each streams one completion of a prompt cut to exactly P tokens (with the
tokenizer given, else about 4 characters per token) and records when it was sent, when the first text arrived
(time to first token) and when every later chunk arrived (inter-token latency = gaps between token chunks; one
chunk per decode step is what memfit serve and vLLM send, an empty one when the token adds no text yet). Output token counts come from the final `usage` (stream_options).

While it runs it samples the server's /metrics (memfit's, if present) every half second, and, with --server-pid,
the server process's RSS from /proc — so a run on the same machine reports the server's peak RSS.
Writes `<out>/requests.jsonl` (one row per request), `<out>/summary.jsonl` (one row per run, appended) and
`<out>/report.md`.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from memfit.errors import ConfigError


@dataclass
class Sample:
    index: int
    ok: bool
    prompt_tokens: int
    output_tokens: int
    sent: float
    ttft: float | None
    latency: float
    itl: list[float] = field(default_factory=list)
    error: str | None = None
    kv_bytes_held: int | None = None
    kv_bytes_full: int | None = None


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo, hi = int(pos), min(int(pos) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def arrival_times(n: int, rate: float, seed: int = 0) -> list[float]:
    """Seconds after the start at which each of n requests is sent: all at 0 for an infinite rate, else a Poisson
    process of `rate` requests per second (exponential gaps, the first request at 0)."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    times, t = [], 0.0
    for _ in range(n):
        times.append(t)
        t += rng.expovariate(rate)
    return times


def make_prompts(n: int, tokens: int, tokenizer: Any | None) -> list[str]:
    """n distinct prompts of `tokens` tokens each from the standard library's pydoc topics (natural prose)."""
    from pydoc_data.topics import topics

    corpus = " ".join(" ".join(v.split()) for _, v in sorted(topics.items()))
    prompts = []
    for i in range(n):
        start = (i * 7919) % max(1, len(corpus) - tokens * 8)  # a different passage per request (no prefix sharing)
        head = f"Request {i}. Summarise the following text.\n\n"
        text = head + corpus[start : start + tokens * 8]
        if tokenizer is not None:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][: max(1, tokens - 1)]
            text = tokenizer.decode(ids)
        else:
            text = text[: tokens * 4]
        prompts.append(text)
    return prompts


def load_tokenizer(spec: str) -> Any | None:
    if spec == "none":
        return None
    if spec == "bytes":  # `--load-format dummy` models: one token per UTF-8 byte
        from memfit.dummy import ByteTokenizer

        return ByteTokenizer(1 << 20, None, None)
    from transformers import AutoTokenizer

    if spec == "default":
        from memfit.models import ensure_default_model

        spec = str(ensure_default_model())
    return AutoTokenizer.from_pretrained(spec)


def _rss(pid: int) -> tuple[int, int] | None:
    """(current RSS, peak RSS) of a process in bytes, from /proc."""
    try:
        vals = {}
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    vals[line.split(":")[0]] = int(line.split()[1]) * 1024
        return vals.get("VmRSS", 0), vals.get("VmHWM", 0)
    except OSError:
        return None


async def _run(
    url: str, model: str | None, prompts: list[str], concurrency: int, max_tokens: int, chat: bool,
    extra_body: dict[str, Any], server_pid: int | None, progress: Any, request_rate: float = math.inf,
    seed: int = 0,
) -> tuple[list[Sample], dict[str, Any], float]:
    import httpx2
    from openai import AsyncOpenAI

    base = url.rstrip("/")
    if base.endswith("/v1"):
        base = base[:-3]
    client = AsyncOpenAI(base_url=base + "/v1", api_key="not-needed", max_retries=0, timeout=3600)
    if model is None:
        listed = await client.models.list()
        model = listed.data[0].id
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(prompts)):
        queue.put_nowait(i)
    samples: list[Sample] = []
    server: dict[str, Any] = {"peak_kv_bytes_held": 0, "peak_kv_bytes_full": 0, "peak_running": 0, "peak_waiting": 0,
                              "peak_rss_bytes": None, "metrics": None}
    done = asyncio.Event()

    async def watch() -> None:
        async with httpx2.AsyncClient(timeout=5) as http:
            while not done.is_set():
                try:
                    from memfit.serve.app import parse_metrics

                    m = parse_metrics((await http.get(base + "/metrics")).text)
                    server["metrics"] = m
                    for key, name in (("kv_bytes_held", "peak_kv_bytes_held"), ("kv_bytes_full", "peak_kv_bytes_full"),
                                      ("requests_running", "peak_running"), ("requests_waiting", "peak_waiting")):
                        server[name] = max(server[name], m.get(key, 0))
                except Exception:  # not a memfit server, or busy: metrics are optional
                    pass
                if server_pid is not None and (rss := _rss(server_pid)) is not None:
                    server["peak_rss_bytes"] = max(server["peak_rss_bytes"] or 0, rss[1])
                await asyncio.sleep(0.5)

    async def one(i: int) -> Sample:
        t0 = time.perf_counter()
        first = last = None
        gaps: list[float] = []
        usage = None
        chunks = 0
        try:
            if chat:
                stream = await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": prompts[i]}], max_tokens=max_tokens,
                    temperature=0, stream=True, stream_options={"include_usage": True}, extra_body=extra_body or None)
            else:
                stream = await client.completions.create(
                    model=model, prompt=prompts[i], max_tokens=max_tokens, temperature=0, stream=True,
                    stream_options={"include_usage": True}, extra_body=extra_body or None)
            async for chunk in stream:
                now = time.perf_counter()
                if chunk.usage is not None:
                    usage = chunk.usage
                if not chunk.choices:
                    continue
                c = chunk.choices[0]
                text = c.delta.content if chat else c.text
                # a token event: a chunk with text, or an empty one mid-stream (a token with no text of its own);
                # not the chat role header, not the closing chunk
                if text or (c.finish_reason is None and (not chat or c.delta.role is None)):
                    chunks += 1
                    if first is None:
                        first = now
                    else:
                        gaps.append(now - last)
                    last = now
            latency = time.perf_counter() - t0
            extra = usage.model_extra or {} if usage is not None else {}
            return Sample(i, True, usage.prompt_tokens if usage else -1, usage.completion_tokens if usage else chunks,
                          t0, None if first is None else first - t0, latency, gaps,
                          kv_bytes_held=extra.get("kv_bytes_held"), kv_bytes_full=extra.get("kv_bytes_full"))
        except Exception as exc:
            return Sample(i, False, -1, 0, t0, None, time.perf_counter() - t0, error=f"{type(exc).__name__}: {exc}")

    async def worker() -> None:
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            samples.append(await one(i))
            progress()

    async def arrivals() -> None:  # open loop: each request at its time, at most `concurrency` in flight
        slots = asyncio.Semaphore(concurrency)

        async def send(i: int) -> None:
            async with slots:
                samples.append(await one(i))
                progress()

        tasks = []
        for i, at in enumerate(arrival_times(len(prompts), request_rate, seed)):
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            tasks.append(asyncio.create_task(send(i)))
        await asyncio.gather(*tasks)

    watcher = asyncio.create_task(watch())
    t0 = time.perf_counter()
    if math.isinf(request_rate):
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    else:
        await arrivals()
    wall = time.perf_counter() - t0
    done.set()
    await watcher
    await client.close()
    server["model"] = model
    for sample in samples:  # sent: seconds after the run's start
        sample.sent -= t0
    return sorted(samples, key=lambda s: s.index), server, wall


def summarize(samples: list[Sample], wall: float, server: dict[str, Any], setup: dict[str, Any]) -> dict[str, Any]:
    ok = [s for s in samples if s.ok]
    ttft = [s.ttft for s in ok if s.ttft is not None]
    itl = [g for s in ok for g in s.itl]
    out_tokens = sum(s.output_tokens for s in ok)
    row = {
        **setup,
        "requests_ok": len(ok),
        "requests_failed": len(samples) - len(ok),
        "errors": sorted({s.error for s in samples if s.error})[:5],
        "wall_seconds": wall,
        "output_tokens": out_tokens,
        "output_tokens_per_second": out_tokens / wall if wall > 0 else 0.0,
        "requests_per_second": len(ok) / wall if wall > 0 else 0.0,
        "mean_prompt_tokens": statistics.mean(s.prompt_tokens for s in ok) if ok else None,
    }
    for name, values in (("ttft", ttft), ("itl", itl), ("latency", [s.latency for s in ok])):
        for q in (50, 90, 99):
            row[f"{name}_p{q}_seconds"] = percentile(values, q)
    held = [s.kv_bytes_held for s in ok if s.kv_bytes_held is not None]
    full = [s.kv_bytes_full for s in ok if s.kv_bytes_full is not None]
    row["mean_kv_bytes_held"] = statistics.mean(held) if held else None
    row["mean_kv_bytes_full"] = statistics.mean(full) if full else None
    row["server"] = {k: v for k, v in server.items() if k != "metrics"}
    row["server_metrics_final"] = server.get("metrics")
    return row


def markdown(row: dict[str, Any]) -> str:
    def f(v: Any, scale: float = 1.0, unit: str = "") -> str:
        return "–" if v is None else f"{v * scale:.3g}{unit}"

    mib = 1 / 2**20
    srv = row["server"]
    lines = [
        f"# Load test: {row['url']}",
        "",
        f"- when: {row['when']} · machine: {row['machine']}",
        f"- command: `{row['command']}`",
        f"- model `{srv.get('model')}` · concurrency {row['concurrency']} · "
        f"request rate {'all at once' if row.get('request_rate') is None else str(row['request_rate']) + '/s'} · "
        f"{row['requests']} requests · prompt "
        f"{row['prompt_tokens']} tokens (measured mean {f(row['mean_prompt_tokens'])}) · max_tokens {row['max_tokens']}"
        f" · memfit field {json.dumps(row['memfit']) if row['memfit'] else '–'}",
        "",
        "| metric | value |",
        "|---|---|",
        f"| requests ok / failed | {row['requests_ok']} / {row['requests_failed']} |",
        f"| wall time | {row['wall_seconds']:.1f} s |",
        f"| output tokens/s | {row['output_tokens_per_second']:.2f} ({row['output_tokens']} tokens) |",
        f"| TTFT p50 / p90 / p99 | {f(row['ttft_p50_seconds'], 1, ' s')} / {f(row['ttft_p90_seconds'], 1, ' s')} / "
        f"{f(row['ttft_p99_seconds'], 1, ' s')} |",
        f"| inter-token latency p50 / p90 / p99 | {f(row['itl_p50_seconds'], 1e3, ' ms')} / "
        f"{f(row['itl_p90_seconds'], 1e3, ' ms')} / {f(row['itl_p99_seconds'], 1e3, ' ms')} |",
        f"| request latency p50 / p99 | {f(row['latency_p50_seconds'], 1, ' s')} / "
        f"{f(row['latency_p99_seconds'], 1, ' s')} |",
        f"| KV held / full per request (mean, from usage) | {f(row['mean_kv_bytes_held'], mib, ' MiB')} / "
        f"{f(row['mean_kv_bytes_full'], mib, ' MiB')} |",
        f"| server peak KV held / full (sampled /metrics) | {f(srv['peak_kv_bytes_held'] or None, mib, ' MiB')} / "
        f"{f(srv['peak_kv_bytes_full'] or None, mib, ' MiB')} |",
        f"| server peak running / waiting | {srv['peak_running']:g} / {srv['peak_waiting']:g} |",
        f"| server peak RSS (/proc VmHWM) | {f(srv['peak_rss_bytes'], mib, ' MiB')} |",
    ]
    final = row.get("server_metrics_final") or {}
    if final:
        lines.append(f"| server preemptions / cancelled | {final.get('preemptions_total', 0):g} / "
                     f"{final.get('cancelled_total', 0):g} |")
        if final.get("decode_forwards_total"):  # memfit serve: how its decode steps ran
            rows = final.get("decode_batched_rows_total", 0)
            lines.append(f"| server decode forwards / tokens decoded in shared forwards / steps alone | "
                         f"{final['decode_forwards_total']:g} / {rows:g} / {final.get('decode_alone_steps_total', 0):g} |")
        if final.get("device_peak_allocated_bytes"):  # CUDA: live tensors vs the weights (#11)
            lines.append(f"| server CUDA allocated / peak allocated / reserved, last /metrics sample (weights) | "
                         f"{final.get('device_allocated_bytes', 0) * mib:.0f} / "
                         f"{final['device_peak_allocated_bytes'] * mib:.0f} / "
                         f"{final.get('device_reserved_bytes', 0) * mib:.0f} MiB "
                         f"({final.get('model_weight_bytes', 0) * mib:.0f} MiB) |")
        if srv["peak_rss_bytes"] and final.get("kv_memory_bytes") and final.get("model_weight_bytes"):
            bound = final["kv_memory_bytes"] + final["model_weight_bytes"] + 300 * 2**20
            lines.append(f"| peak RSS vs --kv-memory + weights + 300 MiB | {srv['peak_rss_bytes'] * mib:.0f} MiB vs "
                         f"{bound * mib:.0f} MiB: {'within' if srv['peak_rss_bytes'] <= bound else 'OVER'} |")
    if row["errors"]:
        lines += ["", "Errors (first five kinds):", *(f"- {e}" for e in row["errors"])]
    return "\n".join(lines) + "\n"


def loadtest(
    url: str,
    concurrency: int,
    requests: int,
    prompt_tokens: int,
    max_tokens: int,
    out: Path | None = None,
    model: str | None = None,
    chat: bool = False,
    tokenizer: str = "default",
    memfit: dict[str, Any] | None = None,
    ignore_eos: bool = True,
    server_pid: int | None = None,
    command: str = "",
    show_progress: bool = True,
    request_rate: float = math.inf,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the load test and write its reports; returns the summary row. `request_rate`: requests per second
    arriving as a Poisson process (seeded by `seed`), at most `concurrency` in flight; infinite: closed loop."""
    if concurrency < 1 or requests < 1 or prompt_tokens < 1 or max_tokens < 1:
        raise ConfigError("--concurrency, --requests, --prompt-tokens and --max-tokens must be at least 1")
    if not request_rate > 0:
        raise ConfigError(f"--request-rate must be above 0 requests per second (or inf), got {request_rate}")
    import os
    import platform

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    prompts = make_prompts(requests, prompt_tokens, load_tokenizer(tokenizer))
    extra: dict[str, Any] = {}
    if memfit:
        extra["memfit"] = memfit
    if ignore_eos:
        extra["ignore_eos"] = True  # vLLM and memfit serve honour it: every request generates max_tokens
    with Progress(TextColumn("loadtest"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  disable=not show_progress, transient=False) as bar:
        task = bar.add_task("requests", total=requests)
        samples, server, wall = asyncio.run(_run(url, model, prompts, concurrency, max_tokens, chat, extra, server_pid,
                                                 lambda: bar.advance(task), request_rate, seed))
    setup = {
        "url": url, "concurrency": concurrency, "requests": requests, "prompt_tokens": prompt_tokens,
        "request_rate": None if math.isinf(request_rate) else request_rate, "seed": seed,
        "max_tokens": max_tokens, "chat": chat, "memfit": memfit, "ignore_eos": ignore_eos,
        "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": f"{platform.node()} ({os.cpu_count()} CPUs)", "command": command,
        "load_average_1m_at_end": os.getloadavg()[0],  # other jobs on the machine (a loaded box runs slower)
    }
    row = summarize(samples, wall, server, setup)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "requests.jsonl", "w") as f:
            for s in samples:
                f.write(json.dumps(asdict(s)) + "\n")
        with open(out / "summary.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        (out / "report.md").write_text(markdown(row))
    return row
