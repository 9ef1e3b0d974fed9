"""Bench runner on a tiny random model + the toy tokenizer: rows, the full-cache reference, resume, report files."""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from memfit.bench.report import OPTIONAL_FIELDS, REQUIRED_FIELDS, read_rows, row_key
from memfit.bench.runner import run_bench
from memfit.bench.testing import toy_tokenizer
from memfit.core.spans import spans_default
from memfit.errors import ConfigError

METHODS = ["streaming", "snapkv", "h2o"]
BUDGETS = [0.25, 0.5]
TASKS = ["niah_single_number", "fidelity", "ppl"]
SAMPLES = 3
BATCH = 2


def same_metric(got: Any, want: Any, rel: float, abs: float = 0.0) -> bool:
    """`got` equals `want` within tolerance; a metric a task does not produce is None on both sides.

    (pytest 9.2 raises TypeError for pytest.approx(None), so None never goes through approx.)"""
    if want is None or got is None:
        return got is None and want is None
    return got == pytest.approx(want, rel=rel, abs=abs)


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[torch.nn.Module, Any]]:
    # One thread: the model is tiny, and on a loaded shared machine 2-thread barriers make it ~10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tok = toy_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        attn_implementation="sdpa",
    )
    try:
        yield LlamaForCausalLM(config).eval(), tok
    finally:
        torch.set_num_threads(threads)


class Recorder:
    """Forward pre-hook: counts model calls and records each prefill's token ids by (method, budget)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls = 0
        self.prefills: dict[tuple[str, str], list[torch.Tensor]] = {}
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self.calls += 1
        ids = kwargs["input_ids"]
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        if ids.shape[1] > 1 and cache is not None:
            key = (cache.method.name, str(cache.core.budget))
            self.prefills.setdefault(key, []).append(ids.clone())

    def close(self) -> None:
        self.handle.remove()


def bench(pair: tuple[torch.nn.Module, Any], out: Path, **overrides: Any):
    kwargs: dict[str, Any] = dict(
        methods=METHODS,
        budgets=BUDGETS,
        tasks=TASKS,
        context=160,
        samples=SAMPLES,
        out=out,
        batch_size=BATCH,
        pad_batches=True,  # exercise left-padded batches (on CPU the runner only batches equal lengths by default)
        max_new_tokens=4,
        model_name="tiny-llama",
        progress=False,
        task_options={"fidelity": {"continuation_tokens": 8}, "ppl": {"continuation_tokens": 12}},
    )
    kwargs.update(overrides)
    return run_bench(pair, **kwargs)


@pytest.fixture(scope="module")
def first_run(pair, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rec = Recorder(pair[0])
    try:
        result = bench(pair, out)
    finally:
        rec.close()
    return out, result, rec


def test_rows_have_every_field(first_run) -> None:
    _, result, _ = first_run
    rows = result.rows
    assert len(rows) == len(TASKS) * (1 + len(METHODS) * len(BUDGETS)) == len(result.new_rows)
    for r in rows:
        for f in REQUIRED_FIELDS + OPTIONAL_FIELDS + ("answer_agreement", "batch_size"):
            assert f in r, f
        assert r["model"] == "tiny-llama" and r["context"] == 160 and r["samples"] == SAMPLES
        assert r["kv_bytes_full"] > 0 and r["kv_bytes_held"] > 0
        assert r["compression_ratio"] == pytest.approx(r["kv_bytes_full"] / r["kv_bytes_held"], rel=1e-3)
        assert r["peak_memory_bytes"] > 0 and r["prefill_seconds"] > 0 and r["decode_tokens_per_second"] > 0
        assert set(r["versions"]) >= {"memfit", "torch", "transformers", "python"} and r["device"]
        assert r["filler"].startswith("natural")
        if r["task"] == "niah_single_number":
            assert 0.0 <= r["score"] <= 1.0 and 0.0 <= r["answer_agreement"] <= 1.0
            assert len(r["sample_scores"]) == SAMPLES and r["kl"] is None
        else:
            assert r["score"] is None and r["ppl"] > 1.0 and 0.0 <= r["top1"] <= 1.0
            assert (r["kl"] is not None) == (r["task"] == "fidelity")
        if r["method"] == "full":
            assert r["budget"] is None
        else:
            # no parameter set: the row is named by the method (and the default spans, on for eviction methods)
            spans = {"spans": "on"} if spans_default(r["method"], r["budget"]) else {}
            assert r["budget"] in BUDGETS and r["params"] == spans
            assert r["method_params"]  # ... and records every effective parameter
    fulls = [r for r in rows if r["method"] == "full"]
    assert sorted(r["task"] for r in fulls) == sorted(TASKS)  # once per task, not once per budget
    for r in rows:  # eviction really holds less
        if r["method"] != "full":
            assert r["kv_bytes_held"] < r["kv_bytes_full"]


def test_full_against_itself_is_exact(first_run) -> None:
    _, result, _ = first_run
    fulls = {r["task"]: r for r in result.rows if r["method"] == "full"}
    assert fulls["fidelity"]["kl"] == 0.0
    assert fulls["fidelity"]["top1"] == 1.0 and fulls["ppl"]["top1"] == 1.0
    assert fulls["niah_single_number"]["answer_agreement"] == 1.0
    scored = [r for r in result.rows if r["task"] == "fidelity" and r["method"] != "full"]
    assert all(r["kl"] >= 0.0 for r in scored) and any(r["kl"] > 0.0 for r in scored)


def test_full_runs_once_on_the_identical_prompts(first_run) -> None:
    _, _, rec = first_run
    batches_per_task = -(-SAMPLES // BATCH)
    full = rec.prefills[("full", "full")]
    assert len(full) == len(TASKS) * batches_per_task
    configs = [k for k in rec.prefills if k[0] != "full"]
    assert len(configs) == len(METHODS) * len(BUDGETS)
    for key in configs:
        got = rec.prefills[key]
        assert len(got) == len(full)
        for a, b in zip(full, got, strict=True):
            assert torch.equal(a, b), key


def test_four_files_written(first_run) -> None:
    out, result, _ = first_run
    for name in ("results.jsonl", "summary.csv", "pareto.png", "report.md"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    for heading in ("## Full cache", "## Loss vs full cache", "## Fidelity to the full cache"):
        assert heading in report
    assert set(result.files) == {"results", "summary", "pareto", "report"}


def test_resume_skips_finished_rows(pair, first_run, tmp_path) -> None:
    out, result, _ = first_run
    rec = Recorder(pair[0])
    try:
        again = bench(pair, out)
    finally:
        rec.close()
    assert again.new_rows == [] and rec.calls == 0  # nothing left: no model work at all
    assert again.skipped == len(result.rows)
    assert len(read_rows(out / "results.jsonl")) == len(result.rows)

    # an interrupted bench: keep the first rows only, then resume
    lines = (out / "results.jsonl").read_text().splitlines()
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "results.jsonl").write_text("\n".join(lines[:9]) + "\n" + lines[9][:40])  # + a torn line
    rec = Recorder(pair[0])
    try:
        with pytest.warns(UserWarning, match="not valid JSON"):
            resumed = bench(pair, partial)
    finally:
        rec.close()
    assert len(resumed.new_rows) == len(result.rows) - 9
    keys = Counter(row_key(r) for r in resumed.rows)
    assert set(keys) == {row_key(r) for r in result.rows} and max(keys.values()) == 1  # no duplicates
    before = {row_key(r): r for r in result.rows}
    for r in resumed.new_rows:  # the same numbers as the uninterrupted run (recomputed reference included)
        b = before[row_key(r)]
        for f in ("score", "top1", "ppl", "answer_agreement", "kv_bytes_held"):
            assert same_metric(r[f], b[f], rel=1e-5, abs=1e-6), f
        assert same_metric(r["kl"], b["kl"], rel=1e-3, abs=1e-6)
    assert rec.calls > 0


def test_given_params_take_the_methods_types() -> None:
    from memfit.bench.runner import _given_params, validate_methods

    effective = validate_methods(["snapkv"], [0.5], {"snapkv": {"window": "8"}})["snapkv"]
    assert effective["window"] == 8 and "kernel" in effective
    assert _given_params({"window": "8"}, effective) == {"window": 8}


def test_route_params_reach_every_method_with_the_component() -> None:
    from memfit.bench.runner import route_params, validate_methods

    methods = ["snapkv", "kivi", "snapkv+kivi", "h2o+gear"]
    routed = route_params(methods, {"kivi.bits": "4", "window": "16"})
    assert routed["kivi"] == {"bits": "4"}
    assert routed["snapkv+kivi"] == {"kivi.bits": "4", "snapkv.window": "16"}
    assert routed["snapkv"] == {"window": "16"}
    assert routed["h2o+gear"] == {}
    effective = validate_methods(methods, [0.25], routed)
    assert effective["kivi"]["bits"] == 4 and effective["snapkv+kivi"]["kivi.bits"] == 4
    assert effective["snapkv+kivi"]["snapkv.window"] == 16
    with pytest.raises(ConfigError, match="applies to none"):
        route_params(["snapkv", "h2o"], {"kivi.bits": "4"})


def test_allocations_add_rows_that_hold_no_more_bytes(pair, tmp_path) -> None:
    result = bench(
        pair, tmp_path, methods=["snapkv", "kivi"], budgets=[0.25], tasks=["fidelity"],
        allocations=["uniform", "adakv", "pyramid"], params={"kivi": {"group_size": 16}},
    )
    rows = {(r["method"], (r["params"] or {}).get("allocation", "uniform")): r for r in result.rows}
    # the quantizer alone keeps every token: it runs once, with no budget and uniform only
    assert rows[("kivi", "uniform")]["budget"] is None
    assert set(rows) == {("full", "uniform"), ("snapkv", "uniform"), ("snapkv", "adakv"), ("snapkv", "pyramid"),
                         ("kivi", "uniform")}
    uniform = rows[("snapkv", "uniform")]["kv_bytes_held"]
    assert rows[("snapkv", "adakv")]["kv_bytes_held"] <= uniform
    assert rows[("snapkv", "pyramid")]["kv_bytes_held"] <= uniform * 1.01
    assert rows[("snapkv", "adakv")]["kv_bytes_held"] < rows[("full", "uniform")]["kv_bytes_held"]
    with pytest.raises(ConfigError, match="allocation"):
        bench(pair, tmp_path, methods=["snapkv"], allocations=["lopsided"])
    # asking for adakv alone still benches the quantizer (once) and adds no new rows for what is done
    again = bench(
        pair, tmp_path, methods=["snapkv", "kivi"], budgets=[0.25], tasks=["fidelity"], allocations=["adakv"],
        params={"kivi": {"group_size": 16}},
    )
    assert again.new_rows == [] and again.skipped == 3


def test_group_batches() -> None:
    from memfit.bench.runner import _group

    rows = [[1] * 5, [1] * 5, [1] * 6, [1] * 6, [1] * 6, [1] * 5]
    assert _group(rows, 2, pad=True) == [[0, 1], [2, 3], [4, 5]]
    assert _group(rows, 2, pad=False) == [[0, 1], [2, 3], [4], [5]]
    assert _group(rows, 8, pad=False) == [[0, 1], [2, 3, 4], [5]]


def test_batching_is_exact(pair, first_run, tmp_path) -> None:
    _, result, _ = first_run
    one = bench(pair, tmp_path, methods=["h2o"], budgets=[0.25], tasks=["niah_single_number", "fidelity"], batch_size=1)
    before = {row_key(r): r for r in result.rows}
    for r in one.rows:
        b = before[row_key(r)]
        assert r["sample_scores"] == b["sample_scores"] and r["predictions"] == b["predictions"]
        assert r["top1"] == b["top1"]
        assert same_metric(r["kl"], b["kl"], rel=1e-3, abs=1e-6)
        assert same_metric(r["ppl"], b["ppl"], rel=1e-5)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"methods": ["nope"]}, "unknown method 'nope'"),
        ({"tasks": ["niah_nope"]}, "unknown task"),
        ({"budgets": [0]}, "out of range"),
        ({"budgets": ["abc"]}, "not a number"),
        ({"budgets": []}, "budgets"),
        ({"methods": ["snapkv"], "params": {"snapkv": {"bogus": 1}}}, "unknown parameter"),
        ({"samples": 0}, "samples"),
        ({"corpus": "/definitely/not/here.txt"}, "not found"),
    ],
)
def test_bad_input_is_a_config_error(tmp_path, overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        run_bench("/no/model/needed", out=tmp_path, progress=False, **{"methods": ["snapkv"], **overrides})
    assert not (tmp_path / "results.jsonl").exists()


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--methods", "full,nope"], "unknown method 'nope'"),
        (["--tasks", "niah_nope"], "unknown task"),
        (["--budgets", "0.25,2.5"], "budget"),
        (["--budgets", "0.25,,0.5"], "empty"),
        (["--filler", "lorem"], "filler"),
        (["--methods", "snapkv", "--param", "kivi.bits=4"], "applies to none"),
        (["--methods", "kivi", "--param", "bits"], "KEY=VALUE"),
        (["--methods", "kivi", "--budgets", "none", "--param", "kivi.bits=3"], "bits"),
    ],
)
def test_cli_bad_input_is_one_line(monkeypatch, capsys, tmp_path, args, expected) -> None:
    from memfit.cli import main

    monkeypatch.setattr(sys, "argv", ["memfit", "bench", "--out", str(tmp_path), *args])
    with pytest.raises(SystemExit) as exc:
        main()
    captured = capsys.readouterr()
    assert exc.value.code != 0
    lines = [ln for ln in captured.err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], captured.err
    assert "Traceback" not in captured.err + captured.out


def test_cli_help_names_the_defaults(monkeypatch, capsys) -> None:
    from memfit.cli import main

    monkeypatch.setattr(sys, "argv", ["memfit", "bench", "--help"])
    try:
        main()
    except SystemExit as exc:
        assert not exc.code
    text = capsys.readouterr().out
    for flag in ("--model", "--methods", "--budgets", "--tasks", "--context", "--samples", "--corpus", "--out"):
        assert flag in text
    assert "chat" in text and "pydoc" in text


def test_rows_are_json(first_run) -> None:
    out, _, _ = first_run
    for line in (out / "results.jsonl").read_text().splitlines():
        json.loads(line)


def test_cli_defaults_are_the_runner_defaults() -> None:
    import inspect

    from memfit.bench import runner
    from memfit.cli import bench as bench_command

    opts = {name: p.default.default for name, p in inspect.signature(bench_command).parameters.items()}
    assert opts["methods"] == ",".join(runner.DEFAULT_METHODS)
    assert opts["budgets"] == ",".join(f"{b:g}" for b in runner.DEFAULT_BUDGETS)
    assert opts["tasks"] == ",".join(runner.DEFAULT_TASKS)
    assert opts["context"] == runner.DEFAULT_CONTEXT and opts["samples"] == runner.DEFAULT_SAMPLES
    assert opts["filler"] == runner.DEFAULT_FILLER and opts["chat"] == runner.DEFAULT_CHAT
    assert opts["batch_size"] == runner.DEFAULT_BATCH_SIZE
