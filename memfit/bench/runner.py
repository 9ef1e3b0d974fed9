"""The bench runner: every method against the full cache, on the same prompts, in one call (``memfit bench``).

``run_bench`` generates each task's samples once (seeded, at the target context length), runs the full cache on
them as the reference, then every (method, budget) on the *identical* token ids, and appends one row per
(method, budget, task) to ``results.jsonl`` (see ``memfit.bench.report`` for the schema). Rows already in the file
are skipped, so an interrupted bench resumes where it stopped; at the end ``summary.csv``, ``pareto.png`` and
``report.md`` are rewritten from every row in the file.

What is measured
----------------
- Answer tasks (needles, variable tracking, common words): greedy generation; ``score`` is the task metric
  (``memfit.bench.metrics.score_prediction``) and ``answer_agreement`` the agreement of the generated answer with
  the full cache's answer (``metrics.answer_agreement``).
- ``fidelity`` and ``ppl``: the prompt is a prefix of natural text; the continuation is fed token by token
  (teacher-forced), so methods that evict during decoding act exactly as in generation. ``ppl`` is the perplexity
  of the continuation (exp of the mean negative log-likelihood over all its tokens); ``top1`` is the fraction of
  positions where the next-token argmax equals the full cache's; ``kl`` (``fidelity`` only, where the reference
  logits are kept) the mean KL(P_full || P_method) in nats.
- Memory and speed, per sample: ``kv_bytes_full``/``kv_bytes_held`` are read from the cache after the last token
  (``cache.full_nbytes()``, ``cache.nbytes()``) and divided by the batch size; ``prefill_seconds`` is the batch's
  prefill time divided by its size; ``decode_tokens_per_second`` counts the tokens of every row of the batch;
  ``peak_memory_bytes`` is the largest peak of the runs (peak RSS of the process on CPU, allocated memory on GPU).

The full cache is always run (``full`` is added when it is missing from ``methods``), once per task, with no
budget. When a bench resumes and some rows of a task are still to do, the full cache's outputs are recomputed as
the reference for them (its row is not written again).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memfit.bench.provenance import provenance
from memfit.bench.report import (
    FULL_METHOD,
    TEXT_TASKS,
    append_row,
    format_bytes,
    load_done_keys,
    quality_points,
    read_rows,
    row_key,
    write_report,
)
from memfit.bench.tasks import ALL_TASKS, TaskSample, filler_description, generate_samples
from memfit.errors import ConfigError

if TYPE_CHECKING:  # torch is imported when a bench runs, so `memfit --help` stays fast
    import torch

__all__ = [
    "ANSWER_TOKENS",
    "CHAT_EXTRA_TOKENS",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_BUDGETS",
    "DEFAULT_CHAT",
    "DEFAULT_CONTEXT",
    "DEFAULT_FILLER",
    "DEFAULT_METHODS",
    "DEFAULT_SAMPLES",
    "DEFAULT_TASKS",
    "DEFAULTS_NOTE",
    "BenchResult",
    "parse_budgets",
    "parse_list",
    "route_params",
    "run_bench",
    "validate_methods",
]

# ---------------------------------------------------------------------------------------------------- defaults

DEFAULT_METHODS: tuple[str, ...] = ("full", "streaming", "snapkv", "h2o")
DEFAULT_BUDGETS: tuple[float, ...] = (0.125, 0.25, 0.5)
DEFAULT_CONTEXT = 2048
DEFAULT_TASKS: tuple[str, ...] = ("niah_single_number", "fidelity")
DEFAULT_SAMPLES = 4
DEFAULT_FILLER = "natural"
DEFAULT_CHAT = False
DEFAULT_BATCH_SIZE = 4
ALLOCATION_PARAM = "allocation"
"""Row parameter that records a non-uniform budget allocation (``--allocation`` on ``memfit bench``)."""
SPANS_PARAM = "spans"
"""Row parameter that records span-aware selection (``--spans on`` on ``memfit bench``; memfit.core.spans)."""

DEFAULTS_NOTE = (
    "Why these defaults (measured on SmolLM2-135M-Instruct, 2048 tokens, natural pydoc_data.topics filler, "
    "20 needles at depths 2.5-97.5%): the full cache found the single needle in 100% of plain-text prompts but "
    "only in 75% through the chat template (the model often restates the question instead of answering), so "
    "answer prompts are plain text unless --chat. Natural prose, not RULER's noise, so that eviction damage "
    "shows. Tasks: niah_single_number (the answer score) and fidelity (KL / top-1 / ppl over a 64-token "
    "teacher-forced continuation: graded losses that a pass/fail needle hides). 4 samples per task keep "
    "`memfit bench --methods full,streaming,snapkv,h2o --budgets 0.125,0.25,0.5 --context 2048` near 20 min of "
    "single-thread CPU time (about 2/3 of that on 2 dedicated cores); with 4 needles one miss moves a score by "
    "25 points, so read needle scores together with KL and top-1. Batches hold up to 4 samples of one prompt "
    "length on CPU: a padded batch of four 1.9-2K prompts prefills in 1.2x the CPU time of the rows one by one "
    "(20.4 s vs 16.6 s, 2 threads, benchmarks/padded_prefill_cpu.py; the padded rows attend row by row), "
    "while equal-length batches of 4 (fidelity) cost 0.85x."
)
"""How the defaults were chosen; `memfit bench --help` and every report repeat it."""

ANSWER_TOKENS: dict[str, int] = {
    "niah_single_number": 16,
    "niah_single_word": 12,
    "niah_single_uuid": 32,
    "niah_multikey": 16,
    "niah_multivalue": 48,
    "niah_multiquery": 48,
    "variable_tracking": 32,
    "common_words": 48,
}
"""Default greedy answer length per task for plain prompts (the answer follows "... is:"); generation stops at EOS.
Through the chat template the model tends to restate the question first, so ``CHAT_EXTRA_TOKENS`` are added."""
CHAT_EXTRA_TOKENS = 16


# ------------------------------------------------------------------------------------------------- input checks


def parse_list(text: str | Sequence[str] | None, what: str) -> list[str]:
    """``"a,b , c"`` (or a list) -> ``["a", "b", "c"]``; empty items and an empty list are a ConfigError."""
    if text is None:
        raise ConfigError(f"no {what} given")
    items = text.split(",") if isinstance(text, str) else list(text)
    out = [str(i).strip() for i in items]
    if not out or any(not i for i in out):
        raise ConfigError(f"--{what} must be a comma-separated list without empty items, got {text!r}")
    return list(dict.fromkeys(out))  # de-duplicate, keep order


def parse_budgets(text: str | Sequence[float | int | str | None]) -> list[float | int | None]:
    """``"0.125,0.25,512"`` -> ``[0.125, 0.25, 512]``: fractions in (0, 1] or token counts > 1; ``none`` is no
    token budget (for methods that compress without evicting, e.g. a quantizer alone). ConfigError otherwise."""
    from memfit.core.budget import Budget

    items = parse_list(text if isinstance(text, str) else [str(b) for b in text], "budgets")
    out: list[float | int | None] = []
    for item in items:
        b = Budget.parse(item)
        out.append(None if b.unlimited else b.tokens if b.tokens is not None else b.fraction)
    return out


def _policy(method: str, budget: float | int | None, params: Mapping[str, Any] | None) -> Any:
    """Build the method's policy without a model (validates the name, the budget and the parameters)."""
    from memfit.core.method import build_policy

    return build_policy(method, budget, dict(params or {}))[0]


def route_params(methods: Sequence[str], params: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Give each bench method the ``--param`` entries that belong to it: ``comp.key=value`` goes to every method
    with the component ``comp`` (``kivi.bits=4`` reaches ``kivi`` and ``snapkv+kivi``), a plain ``key=value`` to
    every method that has that parameter. A parameter no method takes is a ConfigError (a typo would otherwise
    silently bench the defaults)."""
    import dataclasses

    from memfit.core.method import get_method

    routed: dict[str, dict[str, Any]] = {m: {} for m in methods}
    for key, value in (params or {}).items():
        takers = []
        for m in methods:
            names = [n.strip() for n in m.split("+")]
            if "." in key:
                comp, _, sub = key.partition(".")
                if comp not in names:
                    continue
                # a single method is addressed by its bare key, so its rows read like `memfit run`'s
                routed[m][sub if len(names) == 1 else key] = value
                takers.append(m)
                continue
            owners = [n for n in names if key in {f.name for f in dataclasses.fields(get_method(n))}]
            if owners:
                routed[m][key if len(names) == 1 else f"{owners[0]}.{key}"] = value
                takers.append(m)
        if not takers:
            raise ConfigError(f"--param {key}={value} applies to none of the methods {', '.join(methods)} "
                              "(write component.key, e.g. kivi.bits=4; see `memfit methods`)")
    return routed


def validate_methods(
    methods: Sequence[str], budgets: Sequence[float | int | None], params: Mapping[str, Mapping[str, Any]] | None = None
) -> dict[str, dict[str, Any]]:
    """Check every method name, budget and parameter before any model work; returns each method's effective
    parameters (defaults included), recorded in its rows as ``method_params``."""
    from memfit.core.method import evicts

    resolved: dict[str, dict[str, Any]] = {}
    for m in methods:
        p = (params or {}).get(m)
        if m == FULL_METHOD:
            resolved[m] = dict(_policy(m, None, p).params())
            continue
        for b in budgets if evicts(m) else [None]:  # a quantizer alone keeps every token: no budget to vary
            resolved[m] = dict(_policy(m, b, p).params())
    return resolved


# --------------------------------------------------------------------------------------------------- results


@dataclass
class BenchResult:
    """What ``run_bench`` did: every row now in ``results.jsonl``, the rows this call added, the report files."""

    rows: list[dict[str, Any]]
    new_rows: list[dict[str, Any]]
    files: dict[str, Path]
    seconds: float  # wall time of the call
    cpu_seconds: float  # CPU time of this process during the call (all threads)
    skipped: int = 0

    @property
    def out_dir(self) -> Path:
        return self.files["results"].parent


@dataclass
class _Config:
    method: str
    budget: float | int | None
    params: dict[str, Any]  # the parameters the user set (they name the row; defaults are implied by the version)
    method_params: dict[str, Any] = field(default_factory=dict)  # every effective parameter, defaults included

    @property
    def label(self) -> str:
        return self.method if self.budget is None else f"{self.method}@{self.budget:g}"

    @property
    def is_reference(self) -> bool:
        return self.method == FULL_METHOD


@dataclass
class _Stats:
    """Accumulates one configuration's measurements over the batches of a task."""

    scores: list[float] = field(default_factory=list)
    agreement: list[float] = field(default_factory=list)
    predictions: list[str] = field(default_factory=list)
    nll_sum: float = 0.0
    nll_count: int = 0
    top1_hits: int = 0
    top1_count: int = 0
    kl_sum: float = 0.0
    kl_count: int = 0
    kv_full: int = 0
    kv_held: int = 0
    backend: str = ""
    rows: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_tokens: int = 0
    peak: int = 0
    prompt_tokens: int = 0


@dataclass
class _Reference:
    """The full cache's outputs for one batch: answers (answer tasks) or argmax ids and logits (text tasks)."""

    predictions: list[str] | None = None
    argmax: torch.Tensor | None = None  # (B, C)
    logits: torch.Tensor | None = None  # (B, C, V) float32 (fidelity), until saved to logits_file
    logits_file: Path | None = None  # saved to disk so it does not inflate the peak memory of later runs

    def stash(self, path: Path) -> None:
        """Move the logits to ``path`` (a temporary file) and drop them from memory."""
        import torch

        if self.logits is not None:
            torch.save(self.logits, path)
            self.logits_file, self.logits = path, None

    def load_logits(self) -> torch.Tensor:
        if self.logits is not None:
            return self.logits
        if self.logits_file is None:
            raise RuntimeError("the reference kept no logits")
        import torch

        return torch.load(self.logits_file)


# ---------------------------------------------------------------------------------------------------- runner


def run_bench(
    model: str | tuple[torch.nn.Module, Any] = "default",
    methods: Sequence[str] = DEFAULT_METHODS,
    budgets: Sequence[float | int | str | None] = DEFAULT_BUDGETS,
    tasks: Sequence[str] = DEFAULT_TASKS,
    context: int = DEFAULT_CONTEXT,
    samples: int = DEFAULT_SAMPLES,
    corpus: Path | str | None = None,
    out: Path | str = "bench",
    *,
    seed: int = 0,
    filler: str = DEFAULT_FILLER,
    batch_size: int = DEFAULT_BATCH_SIZE,
    pad_batches: bool | None = None,
    max_new_tokens: int | None = None,
    chat: bool = DEFAULT_CHAT,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    allocations: Sequence[str] = ("uniform",),
    spans: Sequence[str] = ("auto",),
    task_options: Mapping[str, Mapping[str, Any]] | None = None,
    model_name: str | None = None,
    progress: bool = True,
    note: str | None = None,
    device: str = "cpu",
    dtype: str = "auto",
    weights: str | None = None,
    backend: str = "auto",
    load_format: str = "auto",
    check_only: bool = False,
) -> BenchResult:
    """Bench ``methods`` × ``budgets`` against the full cache on ``tasks`` and write the report into ``out``.

    ``model``: a spec for ``memfit.models.load_model`` (``"default"``, a folder, a ``.gguf``, a hub id) or a
    loaded ``(model, tokenizer)`` pair (then ``model_name`` names it in the rows). ``budgets``: fractions of the
    prompt in (0, 1] or tokens per layer (> 1); ``full`` always runs once, unbudgeted, as the reference.
    ``samples`` per task, generated from ``seed`` at ``context`` tokens with ``filler`` (``natural``: pydoc, or
    ``corpus`` if given; ``noise``: RULER's repeated sentences). ``batch_size`` samples run together (left
    padding, exact). ``max_new_tokens`` overrides the per-task answer length (``ANSWER_TOKENS``). ``chat`` wraps
    answer-task prompts in the tokenizer's chat template (text tasks never are). ``params``: method name ->
    parameters. ``allocations``: how each eviction method shares its budget (``uniform``, ``pyramid``, ``adakv``,
    ``pyramid+adakv``; see ``memfit.core.allocation``); every non-uniform one adds rows whose ``params`` carry
    ``"allocation"`` (methods without a budget, such as a quantizer alone, run uniform only). ``spans``: ``auto``
    (default: on for eviction methods with a budget, memfit.core.spans.spans_default), ``off`` and/or ``on`` (keep
    whole words/numbers, memfit.core.spans); rows with spans on carry ``"spans": "on"``. ``task_options``: task -> generator options (e.g. ``{"ppl": {"continuation_tokens": 128}}``).
    ``device``/``dtype``: where and in what precision a model spec is loaded (``"auto"``: CUDA if present;
    bfloat16 on CUDA, float32 on CPU); rows record the device and the KV bytes follow the dtype.
    ``weights``: a weight spec (``"slim-llm:3"``, memfit.weights): the model's linear layers are compressed on
    load and every row's ``model`` names the spec, so rows with and without it share one results file.
    ``backend``: auto | fast | portable (memfit.backend; rows record the one that ran); ``load_format="dummy"``:
    random weights from a config (memfit.dummy), for speed and memory rows.
    Under torchrun (``memfit bench --tp N``, memfit.distributed) every rank loads its shard and runs every
    configuration; rank 0 alone writes the rows, which add ``tp`` and ``kv_bytes_held_per_rank`` (the KV bytes
    fields are then the sum over the ranks) and whose ``model`` ends in ``[tp N]``.
    ``check_only``: validate every input, then return an empty result without loading anything.
    Returns a :class:`BenchResult`; raises ``ConfigError`` on bad input before loading anything.
    """
    from memfit import distributed
    from memfit.backend import check_backend
    from memfit.models import check_load_format

    check_backend(backend)
    check_load_format(load_format)
    world, lead = distributed.world_size(), distributed.rank() == 0
    progress = progress and lead  # one progress bar, not one per rank
    t_start, cpu_start = time.perf_counter(), time.process_time()
    method_list = parse_list(list(methods), "methods")
    if FULL_METHOD in method_list:
        method_list.remove(FULL_METHOD)
    method_list.insert(0, FULL_METHOD)
    budget_list = parse_budgets(budgets) if len(method_list) > 1 else []
    task_list = parse_list(list(tasks), "tasks")
    unknown = [t for t in task_list if t not in ALL_TASKS]
    if unknown:
        raise ConfigError(f"unknown task(s) {', '.join(map(repr, unknown))}; known tasks: {', '.join(ALL_TASKS)}")
    if int(context) < 64:
        raise ConfigError(f"--context must be at least 64 tokens, got {context}")
    if int(samples) < 1:
        raise ConfigError(f"--samples must be >= 1, got {samples}")
    if int(batch_size) < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    if max_new_tokens is not None and int(max_new_tokens) < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if filler not in ("natural", "noise"):
        raise ConfigError(f"unknown filler {filler!r}: use 'natural' (with an optional --corpus) or 'noise'")
    if corpus is not None and filler == "noise":
        raise ConfigError("--corpus gives natural filler text; it cannot be combined with --filler noise")
    if corpus is not None and not Path(corpus).is_file():
        raise ConfigError(f"corpus file not found: {corpus}")
    resolved = validate_methods(method_list, budget_list, params)
    alloc_list = _parse_allocations(allocations)
    span_list = parse_list(spans if spans is not None else ["auto"], "spans")
    if any(s not in ("auto", "on", "off") for s in span_list):
        raise ConfigError(f"--spans takes auto, on and/or off (comma-separated), got {','.join(span_list)}")

    out_dir = Path(out)
    results_path = out_dir / "results.jsonl"
    name = _model_name(model, model_name)
    from memfit.weights import parse_weight_spec

    weight_method = parse_weight_spec(weights) if weights else None
    if weight_method is not None:
        name = f"{name} [weights {weight_method.spec()}]"
    if world > 1:  # a split model's rows are their own: same answers, but bytes per rank
        if weight_method is not None:
            raise ConfigError("--tp does not combine with --weights yet")
        name = f"{name} [tp {world}]"
    filler_label = filler_description(filler, corpus)  # type: ignore[arg-type]
    given = {m: _given_params((params or {}).get(m), resolved[m]) for m in method_list}
    from memfit.core.method import evicts
    from memfit.core.spans import spans_default

    configs = [_Config(FULL_METHOD, None, given[FULL_METHOD], resolved[FULL_METHOD])]
    for m in method_list[1:]:
        if not evicts(m):  # a quantizer alone keeps every token: once, no budget, nothing to allocate
            configs.append(_Config(m, None, given[m], resolved[m]))
            continue
        for alloc in alloc_list:
            for span in span_list:
                # a non-uniform allocation (spans on) is recorded as the row parameter "allocation" ("spans"), so it
                # names the row (key, label)
                for b in budget_list:
                    extra = {} if alloc == "uniform" else {ALLOCATION_PARAM: alloc}
                    if span == "on" or (span == "auto" and spans_default(m, b)):
                        extra[SPANS_PARAM] = "on"
                    cfg = _Config(m, b, {**given[m], **extra}, {**resolved[m], **extra})
                    # without a budget there is nothing to share out (or to span); `auto` may repeat `on`/`off`
                    if (not extra or b is not None) and cfg not in configs:
                        configs.append(cfg)
    if check_only:
        return BenchResult([], [], {"results": results_path}, time.perf_counter() - t_start, 0.0)

    # -- what is left to do ----------------------------------------------------------------------------------
    done = load_done_keys(results_path)
    plan: list[tuple[str, str, list[_Config]]] = []  # (task, sample set id, pending configs)
    skipped = 0
    for task in task_list:
        sample_set = _sample_set_id(task, seed, samples, chat, max_new_tokens, (task_options or {}).get(task))
        pending = []
        for cfg in configs:
            key = row_key(
                {
                    "model": name,
                    "method": cfg.method,
                    "params": cfg.params,
                    "budget": cfg.budget,
                    "context": int(context),
                    "task": task,
                    "sample_set": sample_set,
                    "seed": seed,
                    "filler": filler_label,
                }
            )
            if key in done:
                skipped += 1
            else:
                pending.append(cfg)
        if pending:
            plan.append((task, sample_set, pending))

    new_rows: list[dict[str, Any]] = []
    if plan:
        mdl, tok = _load(model, progress, device, dtype, load_format, tp=world > 1)
        from memfit.window import context_window

        window = context_window(mdl)  # refuse before generating: past the window the rows would be noise
        if window is not None and int(context) + int(max_new_tokens or 0) > window:
            raise ConfigError(
                f"--context {context}{f' + --max-new-tokens {max_new_tokens}' if max_new_tokens else ''} is more "
                f"than the model's context window ({window:,} positions): use a smaller --context"
            )
        if weight_method is not None:
            from memfit.weights import quantize_model

            quantize_model(mdl, weight_method, tokenizer=tok)
        device = next(mdl.parameters()).device
        pad = (device.type != "cpu") if pad_batches is None else bool(pad_batches)
        runs = [
            _prepare_task(
                mdl,
                tok,
                name,
                task,
                sample_set,
                context=int(context),
                n=int(samples),
                seed=seed,
                filler=filler,
                corpus=corpus,
                filler_label=filler_label,
                batch_size=int(batch_size),
                pad_batches=pad,
                max_new_tokens=max_new_tokens,
                chat=chat,
                options=dict((task_options or {}).get(task) or {}),
                results_path=results_path,
                backend=backend,
            )
            for task, sample_set, _ in plan
        ]
        # the reference is recomputed (not written again) when its row is done but others are not
        total = sum(
            len(run.batches) * (len(p) + (0 if p[0].is_reference else 1))
            for run, (_, _, p) in zip(runs, plan, strict=True)
        )
        with _progress(progress, total) as advance:
            for run, (_, _, pending) in zip(runs, plan, strict=True):
                new_rows += _run_task(mdl, tok, run, pending, advance)
    if not lead:  # the other ranks of a tensor-parallel bench write nothing
        return BenchResult(new_rows, new_rows, {"results": results_path}, time.perf_counter() - t_start,
                           time.process_time() - cpu_start, skipped)
    rows = read_rows(results_path)
    files = write_report(rows, out_dir, note=_report_note(rows, note))
    _append_agreement_section(rows, files["report"])
    files = {"results": results_path, **files}
    return BenchResult(rows, new_rows, files, time.perf_counter() - t_start, time.process_time() - cpu_start, skipped)


# ------------------------------------------------------------------------------------------------- one task


@dataclass
class _Batch:
    samples: list[TaskSample]
    ids: torch.Tensor  # (B, T) left-padded prompt ids, identical for every configuration
    mask: torch.Tensor  # (B, T)
    cont: torch.Tensor | None  # (B, C) continuation ids of text tasks


@dataclass
class _TaskRun:
    """One task's samples, batches and what every row of it shares."""

    model_name: str
    task: str
    sample_set: str
    samples: list[TaskSample]
    batches: list[_Batch]
    context: int
    seed: int
    filler_label: str
    batch_size: int
    new_tokens: int
    chat: bool
    device: str
    versions: dict[str, str]
    results_path: Path
    backend: str = "auto"

    @property
    def text_task(self) -> bool:
        return self.task in TEXT_TASKS


def _prepare_task(
    model: torch.nn.Module,
    tok: Any,
    name: str,
    task: str,
    sample_set: str,
    *,
    context: int,
    n: int,
    seed: int,
    filler: str,
    corpus: Path | str | None,
    filler_label: str,
    batch_size: int,
    pad_batches: bool,
    max_new_tokens: int | None,
    chat: bool,
    options: dict[str, Any],
    results_path: Path,
    backend: str = "auto",
) -> _TaskRun:
    """Generate the task's samples and cut them into batches of token ids (shared by every configuration)."""
    from memfit.engine import device_name, versions

    samples = generate_samples(task, tok, context, n, seed, filler=filler, corpus=corpus, **options)  # type: ignore[arg-type]
    text_task = task in TEXT_TASKS
    rows = [_encode(tok, s, text_task, chat) for s in samples]
    return _TaskRun(
        model_name=name,
        task=task,
        sample_set=sample_set,
        samples=samples,
        batches=[
            _collate(tok, [samples[i] for i in g], [rows[i] for i in g]) for g in _group(rows, batch_size, pad_batches)
        ],
        context=context,
        seed=seed,
        filler_label=filler_label,
        batch_size=batch_size,
        new_tokens=int(max_new_tokens or ANSWER_TOKENS.get(task, 32) + (CHAT_EXTRA_TOKENS if chat else 0)),
        chat=chat,
        device=device_name(next(model.parameters()).device),
        versions=versions(),
        results_path=results_path,
        backend=backend,
    )


def _group(rows: Sequence[Sequence[int]], batch_size: int, pad: bool) -> list[list[int]]:
    """Consecutive sample indices in batches of at most ``batch_size``; without ``pad``, a batch only holds prompts
    of one length. (On CPU a padded batch still costs more than its rows alone: measured on the default model, four
    1.9-2K prompts prefill in 20.4 s padded vs 16.6 s one by one, 2 threads; 46.5 s before memfit attended padded
    rows one by one; benchmarks/padded_prefill_cpu.py.)"""
    groups: list[list[int]] = []
    for i, r in enumerate(rows):
        g = groups[-1] if groups else None
        if g is not None and len(g) < batch_size and (pad or len(rows[g[0]]) == len(r)):
            g.append(i)
        else:
            groups.append([i])
    return groups


def _run_task(
    model: torch.nn.Module,
    tok: Any,
    run: _TaskRun,
    pending: list[_Config],
    advance: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Run the full cache on the task's batches (the reference), then every pending configuration."""
    eos = _eos_ids(model, tok)
    full_cfg = next((c for c in pending if c.is_reference), None)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="memfit-bench-") as tmp:
        refs: list[_Reference] = []
        stats = _Stats()
        ref_cfg = full_cfg or _Config(FULL_METHOD, None, {})  # params of "full" cannot change its output
        for bi, batch in enumerate(run.batches):
            ref = _run_batch(model, tok, ref_cfg, run, batch, None, stats, eos)
            ref.stash(Path(tmp) / f"reference-{bi}.pt")
            refs.append(ref)
            advance(f"{run.task} · full" + ("" if full_cfg else " (reference, recomputed)"))
        if full_cfg is not None:
            rows.append(_finish_row(run, full_cfg, stats))
        for cfg in pending:
            if cfg.is_reference:
                continue
            stats = _Stats()
            for batch, ref in zip(run.batches, refs, strict=True):
                _run_batch(model, tok, cfg, run, batch, ref, stats, eos)
                advance(f"{run.task} · {cfg.label}")
            rows.append(_finish_row(run, cfg, stats))
    return rows


def _run_batch(
    model: torch.nn.Module,
    tok: Any,
    cfg: _Config,
    run: _TaskRun,
    batch: _Batch,
    ref: _Reference | None,
    stats: _Stats,
    eos: list[int],
) -> _Reference:
    """Run one configuration on one batch, add its measurements to ``stats``; returns what a reference keeps."""
    ids, mask, cont = batch.ids, batch.mask, batch.cont
    from memfit.api import make_cache
    from memfit.bench import metrics
    from memfit.engine import generate

    method_params = {k: v for k, v in cfg.params.items() if k not in (ALLOCATION_PARAM, SPANS_PARAM)}
    allocation = str(cfg.params.get(ALLOCATION_PARAM, "uniform"))
    cache = make_cache(model, cfg.method, cfg.budget, method_params or None, allocation=allocation,
                       backend=run.backend, reserve=run.new_tokens if cont is None else cont.shape[1])
    stats.backend = cache.backend.name
    if cfg.params.get(SPANS_PARAM) == "on":
        from memfit.core.spans import enable_spans

        enable_spans(cache, tok)
    b = ids.shape[0]
    out = _Reference()
    if cont is None:  # answer task: greedy generation
        gen = generate(model, ids, mask, cache, run.new_tokens, eos)
        preds = [tok.decode(t, skip_special_tokens=True) for t in gen.tokens]
        for s, p in zip(batch.samples, preds, strict=True):
            stats.scores.append(metrics.score_prediction(run.task, p, s.answers))
        stats.predictions += preds
        if ref is not None and ref.predictions is not None:
            stats.agreement += [metrics.answer_agreement(r, p) for r, p in zip(ref.predictions, preds, strict=True)]
        elif ref is None:
            stats.agreement += [1.0] * len(preds)
        out.predictions = preds
        prefill_s, decode_s, peak = gen.prefill_seconds, gen.decode_seconds, gen.peak_memory_bytes
        decode_tokens = gen.decode_steps * b
    else:  # text task: teacher-forced continuation
        keep_logits = run.task == "fidelity"
        import torch

        with torch.no_grad():
            tf = _teacher_force(model, cache, ids, mask, cont, keep_logits)
        stats.nll_sum += float(tf["nll"].sum())
        stats.nll_count += int(tf["nll"].numel())
        ref_argmax = tf["argmax"] if ref is None else ref.argmax
        assert ref_argmax is not None
        stats.top1_hits += int((tf["argmax"] == ref_argmax).sum())
        stats.top1_count += int(ref_argmax.numel())
        if keep_logits:
            ref_logits = tf["logits"] if ref is None else ref.load_logits()
            kl = metrics.kl_divergence(ref_logits, tf["logits"])
            stats.kl_sum += kl * tf["nll"].numel()
            stats.kl_count += int(tf["nll"].numel())
            if ref is None:
                out.logits = tf["logits"]
        out.argmax = tf["argmax"]
        prefill_s, decode_s, peak = tf["prefill_seconds"], tf["decode_seconds"], tf["peak"]
        decode_tokens = tf["steps"] * b
    stats.kv_full += cache.full_nbytes()
    stats.kv_held += cache.nbytes()
    stats.rows += b
    stats.prefill_seconds += prefill_s
    stats.decode_seconds += decode_s
    stats.decode_tokens += decode_tokens
    stats.peak = max(stats.peak, int(peak))
    stats.prompt_tokens += int(mask.sum())
    return out


def _teacher_force(
    model: torch.nn.Module,
    cache: Any,
    ids: torch.Tensor,
    mask: torch.Tensor,
    cont: torch.Tensor,
    keep_logits: bool,
) -> dict[str, Any]:
    """Prefill the prompt, then feed the continuation one token at a time (decode-time eviction applies).

    Returns per-position NLL (B, C) and argmax (B, C) of the predictions for the C continuation tokens, their
    logits (B, C, V) if asked, prefill/decode seconds, decode steps and the peak memory."""
    import torch

    from memfit import engine
    from memfit.adapters.transformers import forward

    device = next(model.parameters()).device
    ids, mask, cont = ids.to(device), mask.to(device), cont.to(device)
    engine.reset_peak_memory(device)
    _sync(device)
    t0 = time.perf_counter()
    logits, mask = engine.prefill_prompt(model, ids, mask, cache)  # and the mask decoding continues from (GemFilter)
    _sync(device)
    prefill_seconds = time.perf_counter() - t0
    b, c = cont.shape
    nll = torch.empty(b, c)
    argmax = torch.empty(b, c, dtype=torch.long)
    kept: list[torch.Tensor] = []
    pos = engine.positions_from_mask(mask)[:, -1:]
    t1 = time.perf_counter()
    for t in range(c):
        step = logits.float().cpu()
        logp = torch.log_softmax(step, dim=-1)
        nll[:, t] = -logp.gather(-1, cont[:, t : t + 1].cpu()).squeeze(-1)
        argmax[:, t] = step.argmax(-1)
        if keep_logits:
            kept.append(step)
        if t == c - 1:
            break
        mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
        pos = pos + 1
        logits = forward(model, cont[:, t : t + 1], mask, cache, pos, logits_to_keep=1)[:, -1]
    _sync(device)
    return {
        "nll": nll,
        "argmax": argmax,
        "logits": torch.stack(kept, dim=1) if keep_logits else None,
        "prefill_seconds": prefill_seconds,
        "decode_seconds": time.perf_counter() - t1,
        "steps": c - 1,
        "peak": engine.peak_memory(device),
    }


def _finish_row(run: _TaskRun, cfg: _Config, st: _Stats) -> dict[str, Any]:
    """The result row of one configuration on one task (appended to results.jsonl at once; by rank 0 alone in a
    tensor-parallel bench, where every rank calls this in the same order)."""
    from memfit import distributed

    n = max(1, st.rows)
    held_ranks = distributed.gather_ints(st.kv_held)  # each rank's cache holds only its own KV heads
    full_b, held_b = sum(distributed.gather_ints(st.kv_full)) / n, sum(held_ranks) / n
    answers = not run.text_task
    row: dict[str, Any] = {
        "model": run.model_name,
        "method": cfg.method,
        "params": cfg.params,
        "method_params": cfg.method_params,
        "budget": cfg.budget,
        "context": run.context,
        "task": run.task,
        "samples": len(run.samples),
        "score": _mean(st.scores) if answers else None,
        "kv_bytes_full": int(round(full_b)),
        "kv_bytes_held": int(round(held_b)),
        "compression_ratio": full_b / held_b if held_b else None,
        "peak_memory_bytes": st.peak,
        "prefill_seconds": st.prefill_seconds / n,
        "decode_tokens_per_second": st.decode_tokens / st.decode_seconds if st.decode_seconds > 0 else None,
        "seed": run.seed,
        "device": run.device,
        "backend": st.backend,
        "versions": run.versions,
        "kl": st.kl_sum / st.kl_count if st.kl_count else None,
        "top1": st.top1_hits / st.top1_count if st.top1_count else None,
        "ppl": math.exp(st.nll_sum / st.nll_count) if st.nll_count else None,
        "filler": run.filler_label,
        "sample_set": run.sample_set,
        "answer_agreement": _mean(st.agreement) if answers else None,
        "batch_size": run.batch_size,
        "batches": len(run.batches),
        "chat": run.chat if answers else False,
        "max_new_tokens": run.new_tokens if answers else None,
        "prompt_tokens": st.prompt_tokens / n,
        "sample_scores": st.scores if answers else None,
        "depths": [s.depth for s in run.samples] if answers else None,
        "predictions": st.predictions if answers else None,
        "provenance": provenance(),  # machine, versions, commit and the command that wrote this row
    }
    if len(held_ranks) > 1:
        row["tp"] = len(held_ranks)
        row["kv_bytes_held_per_rank"] = [int(round(h / n)) for h in held_ranks]
    if distributed.rank() == 0:
        append_row(run.results_path, row)
    return row


# -------------------------------------------------------------------------------------------------- helpers


def _given_params(given: Mapping[str, Any] | None, effective: Mapping[str, Any]) -> dict[str, Any]:
    """The user's parameters with the method's own (converted) values, e.g. ``{"window": "16"}`` -> ``16``."""
    return {k: effective.get(k, v) for k, v in sorted((given or {}).items())}


def _parse_allocations(allocations: str | Sequence[str] | None) -> list[str]:
    from memfit.core.allocation import parse_allocation

    out = []
    for a in parse_list(allocations if allocations is not None else ["uniform"], "allocation"):
        pyramid, adakv = parse_allocation(a)
        out.append("+".join(n for n, on in (("pyramid", pyramid), ("adakv", adakv)) if on) or "uniform")
    return list(dict.fromkeys(out))


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def _sample_set_id(
    task: str, seed: int, n: int, chat: bool, max_new_tokens: int | None, options: Mapping[str, Any] | None
) -> str:
    """Names what the prompts of a row were: seed, sample count and everything that changes the measurement."""
    parts = [f"seed={seed}", f"n={n}"]
    if task not in TEXT_TASKS:
        parts.append("chat" if chat else "plain")
        if max_new_tokens is not None:
            parts.append(f"new={max_new_tokens}")
    if options:
        parts.append(json.dumps(dict(options), sort_keys=True, separators=(",", ":")))
    return ",".join(parts)


def _model_name(model: str | tuple[torch.nn.Module, Any], given: str | None) -> str:
    if given:
        return given
    if isinstance(model, str):
        if model.strip() in ("", "default"):
            from memfit.models import DEFAULT_MODEL_NAME

            return DEFAULT_MODEL_NAME
        return model.strip()
    mdl = model[0]
    return str(getattr(mdl.config, "_name_or_path", "") or type(mdl).__name__)


def _load(
    model: str | tuple[torch.nn.Module, Any], progress: bool, device: str = "cpu", dtype: str = "auto",
    load_format: str = "auto", tp: bool = False,
) -> tuple[torch.nn.Module, Any]:
    if isinstance(model, str):
        from memfit.models import load_model

        return load_model(model, progress=progress, device=device, dtype=dtype, load_format=load_format, tp=tp)
    return model


def _eos_ids(model: torch.nn.Module, tok: Any) -> list[int]:
    gen_cfg = getattr(model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
    if eos is None:
        eos = getattr(tok, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, list | tuple) else [int(eos)]


def _encode(tok: Any, sample: TaskSample, text_task: bool, chat: bool) -> list[int]:
    """The prompt's token ids: through the chat template (answer tasks, if ``chat``), or the text task's ids."""
    from memfit.engine import encode_prompts

    if text_task:
        return list(sample.prompt_ids or [])
    ids, _ = encode_prompts(tok, [sample.prompt], chat=chat)
    return ids[0].tolist()


def _collate(tok: Any, samples: list[TaskSample], rows: list[list[int]]) -> _Batch:
    """Left-pad a batch (+ the continuation ids (B, C) of text tasks)."""
    import torch

    from memfit.engine import pad_left

    pad = getattr(tok, "pad_token_id", None)
    if pad is None:
        pad = getattr(tok, "eos_token_id", None) or 0
    ids, mask = pad_left(rows, pad_id=int(pad))
    cont = None
    if samples[0].continuation_ids is not None:
        lengths = {len(s.continuation_ids or []) for s in samples}
        if len(lengths) != 1 or 0 in lengths:
            raise ConfigError("text-task samples of one batch must have continuations of the same, non-zero length")
        cont = torch.tensor([list(s.continuation_ids or []) for s in samples], dtype=torch.long)
    return _Batch(samples, ids, mask, cont)


@contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Callable[[str], None]]:
    """A rich progress bar with ETA over (configuration × sample batch); yields ``advance(description)``."""
    if not enabled or total <= 0:
        yield lambda _desc: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn("[bold]bench[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("batches"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("{task.description}"),
        console=Console(stderr=True),
        transient=False,
    )
    with bar:
        job = bar.add_task("starting", total=total)

        def advance(desc: str) -> None:
            bar.update(job, advance=1, description=desc)

        yield advance


# --------------------------------------------------------------------------------------------------- report


def _report_note(rows: Sequence[Mapping[str, Any]], extra: str | None) -> str:
    batch = sorted({int(r["batch_size"]) for r in rows if r.get("batch_size")})
    chat = sorted({bool(r["chat"]) for r in rows if r.get("task") not in TEXT_TASKS and "chat" in r})
    samples = sorted({int(r["samples"]) for r in rows if r.get("samples")})
    answer_prompts = (
        "went through the model's chat template"
        if chat == [True]
        else "were plain text (no chat template)"
        if chat == [False]
        else "used the chat template in some rows and plain text in others (see the `chat` field)"
    )
    parts = [
        "How to read it: every method ran on the identical token ids as the full cache (the reference), "
        f"{' or '.join(map(str, samples)) or '?'} samples per task. KV bytes are per sample, read from the cache "
        "after the last token. prefill s is per sample (batch time / batch size; batches of up to "
        f"{', '.join(map(str, batch)) or '?'} samples of one prompt length on CPU); decode tok/s counts the tokens "
        f"of every row of a batch. Answer prompts {answer_prompts}; fidelity/ppl prompts are raw text whose "
        "continuation is teacher-forced token by token, so decode-time eviction acts. KL = mean "
        "KL(P_full ‖ P_method) in nats over the fidelity continuation; top-1 = next-token argmax agreement with "
        "the full cache. Timings come from a shared machine: compare them within one report only.",
        DEFAULTS_NOTE,
    ]
    if extra:
        parts.append(extra.strip())
    return "\n\n".join(parts)


def _canon(value: Any) -> str:
    """The canonical JSON ``memfit.bench.report`` keys its summaries with."""
    if isinstance(value, str):  # already canonical (summaries hold params as canonical JSON)
        return value
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _append_agreement_section(rows: Sequence[Mapping[str, Any]], report: Path) -> None:
    """Insert a table of fidelity to the full cache (answer agreement, KL, top-1, ppl) per method and budget into
    the report, before its table of all results."""
    if not rows:
        return
    groups: dict[tuple[Any, ...], dict[str, list[float]]] = {}
    for r in rows:
        key = (
            r["model"],
            r["context"],
            r.get("filler") or "",
            r["method"],
            _canon(r.get("params") or {}),
            json.dumps(r.get("budget")),
        )
        g = groups.setdefault(key, {"agreement": [], "kl": [], "top1": [], "ppl": []})
        for col, field_name in (("agreement", "answer_agreement"), ("kl", "kl"), ("top1", "top1"), ("ppl", "ppl")):
            v = r.get(field_name)
            if isinstance(v, int | float) and math.isfinite(float(v)):
                g[col].append(float(v))
    points = {
        (
            p["model"],
            p["context"],
            p["filler"] or "",
            p["method"],
            _canon(p["params"] or {}),
            json.dumps(p["budget"]),
        ): p
        for p in quality_points(rows)
    }
    order = [k for k in points if k in groups] + [k for k in groups if k not in points]
    lines = [
        "",
        "## Fidelity to the full cache",
        "",
        "answer agreement = common word prefix of the generated answer and the full cache's, over the longer one "
        "(mean over the answer tasks); KL, top-1 and ppl over the teacher-forced continuation of the text tasks.",
        "",
        "| model | context | method | budget | KV held | answer agreement % | KL | top-1 % | ppl |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def mean(vals: list[float], spec: str, scale: float = 1.0) -> str:
        return "–" if not vals else format(scale * sum(vals) / len(vals), spec)

    for key in order:
        g, p = groups[key], points.get(key)
        budget = json.loads(key[5])
        if key[3] == FULL_METHOD:  # the reference itself: agreement, KL and top-1 against itself measure nothing
            versus = "reference | reference | reference"
        else:
            versus = f"{mean(g['agreement'], '.1f', 100.0)} | {mean(g['kl'], '.4f')} | {mean(g['top1'], '.1f', 100.0)}"
        lines.append(
            f"| {key[0]} | {key[1]} | {p['label'] if p else key[3]} | {'–' if budget is None else budget} | "
            f"{format_bytes(p['kv_bytes_held']) if p else '–'} | {versus} | {mean(g['ppl'], '.3f')} |"
        )
    text = report.read_text(encoding="utf-8")
    at = text.find("\n## All results")  # before the long table, right after the losses
    section = "\n".join(lines) + "\n"
    text = text + section if at < 0 else text[:at] + "\n" + section.strip("\n") + "\n" + text[at:]
    report.write_text(text, encoding="utf-8")
