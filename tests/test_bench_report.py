"""Bench results store (append, resume) and report outputs (summary.csv, pareto.png, report.md)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from memfit.bench.report import (
    REQUIRED_FIELDS,
    SUMMARY_COLUMNS,
    append_row,
    environment_versions,
    format_bytes,
    load_done_keys,
    quality_points,
    read_rows,
    row_key,
    summarize,
    write_report,
)

VERSIONS = {"memfit": "0.1.0", "torch": "2.13", "transformers": "5.24", "python": "3.11"}
FULL_BYTES = 1_000_000


def make_row(
    method: str,
    budget: Any,
    task: str,
    score: float | None,
    held: int,
    *,
    seed: int = 0,
    samples: int = 10,
    params: dict[str, Any] | None = None,
    context: int = 1024,
    **extra: Any,
) -> dict[str, Any]:
    row = {
        "model": "toy-llama",
        "method": method,
        "params": params or {},
        "budget": budget,
        "context": context,
        "task": task,
        "samples": samples,
        "score": score,
        "kv_bytes_full": FULL_BYTES,
        "kv_bytes_held": held,
        "compression_ratio": FULL_BYTES / held,
        "peak_memory_bytes": 500_000_000 + held,
        "prefill_seconds": 0.5,
        "decode_tokens_per_second": 30.0,
        "seed": seed,
        "device": "cpu",
        "versions": VERSIONS,
        "filler": "natural (pydoc_data.topics)",
    }
    row.update(extra)
    return row


def bench_rows() -> list[dict[str, Any]]:
    """Full cache + two methods x three budgets x two tasks, two seeds each, plus a fidelity row."""
    rows = []
    base = {"niah_single_number": 0.9, "variable_tracking": 0.7}
    for seed in (0, 1):
        for task, s in base.items():
            rows.append(make_row("full", None, task, s, FULL_BYTES, seed=seed))
            for budget, factor in ((0.5, 1.0), (0.25, 0.8), (0.1, 0.5)):
                held = int(FULL_BYTES * budget)
                rows.append(make_row("snapkv", budget, task, s * factor, held, seed=seed, params={"window": 32}))
                rows.append(make_row("streaming", budget, task, s * factor * 0.5, held, seed=seed))
    rows.append(make_row("snapkv", 0.5, "fidelity", None, 500_000, params={"window": 32}, kl=0.02, top1=0.96))
    return rows


# --------------------------------------------------------------------------------------------- resume store


def test_append_read_and_resume(tmp_path: Path) -> None:
    path = tmp_path / "out" / "results.jsonl"
    assert load_done_keys(path) == set()
    rows = bench_rows()[:6]
    for r in rows:
        append_row(path, r)
    assert read_rows(path) == rows
    done = load_done_keys(path)
    assert done == {row_key(r) for r in rows}

    # a re-run over the full job list only runs what is missing, then nothing
    jobs = bench_rows()[:10]
    todo = [j for j in jobs if row_key(j) not in done]
    assert todo == jobs[6:]
    for j in todo:
        append_row(path, j)
    assert [j for j in jobs if row_key(j) not in load_done_keys(path)] == []
    assert len(read_rows(path)) == 10


def test_row_key_fields() -> None:
    a = make_row("snapkv", 0.25, "niah_single_number", 1.0, 250_000, params={"window": 32, "pool": "max"})
    b = dict(a, params={"pool": "max", "window": 32}, score=0.0, kv_bytes_held=1, device="cuda")
    assert row_key(a) == row_key(b)  # params order and measured values do not matter
    for change in ({"seed": 1}, {"budget": 0.5}, {"context": 2048}, {"params": {"window": 64}}, {"model": "x"}):
        assert row_key(dict(a, **change)) != row_key(a), change
    assert row_key(dict(a, filler="noise")) != row_key(a)
    assert row_key(dict(a, sample_set="seed=0,n=50")) != row_key(a)
    assert row_key({k: a[k] for k in ("model", "method", "params", "budget", "context", "task", "seed", "filler")})


def test_torn_last_line_is_skipped_and_repaired(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    first, second, third = bench_rows()[:3]
    append_row(path, first)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(second)[:40])  # the process died mid-write
    with pytest.warns(UserWarning, match="not valid JSON"):
        assert load_done_keys(path) == {row_key(first)}
    append_row(path, third)
    with pytest.warns(UserWarning):
        assert read_rows(path) == [first, third]


def test_append_rejects_incomplete_rows(tmp_path: Path) -> None:
    row = make_row("full", None, "niah_single_number", 1.0, FULL_BYTES)
    del row["kv_bytes_held"], row["versions"]
    with pytest.raises(ValueError, match="kv_bytes_held, versions"):
        append_row(tmp_path / "r.jsonl", row)
    assert not (tmp_path / "r.jsonl").exists()


def test_environment_versions() -> None:
    v = environment_versions()
    assert set(v) == {"memfit", "torch", "transformers", "python"}
    assert v["python"].count(".") == 2
    assert set(REQUIRED_FIELDS) >= {"versions", "device", "seed"}


# ---------------------------------------------------------------------------------------------- aggregation


def test_summary_aggregates_per_configuration() -> None:
    rows = bench_rows()
    rows.append(make_row("full", None, "niah_single_number", 0.5, FULL_BYTES, seed=2, samples=20))
    summary = summarize(rows)
    assert len(summary) == 2 * 7 + 1
    full_niah = next(s for s in summary if s["method"] == "full" and s["task"] == "niah_single_number")
    assert full_niah["rows"] == 3 and full_niah["samples"] == 40
    assert full_niah["score"] == pytest.approx((0.9 * 10 + 0.9 * 10 + 0.5 * 20) / 40)  # sample-weighted
    snap = next(
        s for s in summary if s["method"] == "snapkv" and s["budget"] == 0.25 and s["task"] == "variable_tracking"
    )
    assert snap["score"] == pytest.approx(0.56)
    assert snap["kv_bytes_held"] == 250_000 and snap["compression_ratio"] == pytest.approx(4.0)
    assert snap["peak_memory_bytes"] == 500_250_000
    assert json.loads(snap["params"]) == {"window": 32}


def test_quality_points_and_loss() -> None:
    points = quality_points(bench_rows())
    full = next(p for p in points if p["method"] == "full")
    assert full["quality"] == pytest.approx(0.8) and full["loss"] is None
    snap = {p["budget"]: p for p in points if p["method"] == "snapkv"}
    assert snap[0.5]["quality"] == pytest.approx(0.8)  # the fidelity row is not a task score
    assert snap[0.5]["loss"] == pytest.approx(0.0)
    assert snap[0.5]["kl"] == pytest.approx(0.02) and snap[0.5]["top1"] == pytest.approx(0.96)
    assert snap[0.1]["loss"] == pytest.approx(0.4)
    stream = {p["budget"]: p for p in points if p["method"] == "streaming"}
    assert stream[0.25]["quality"] == pytest.approx(0.32) and stream[0.25]["loss"] == pytest.approx(0.48)
    assert snap[0.25]["label"] == "snapkv(window=32)"


def test_loss_uses_the_tasks_both_have() -> None:
    rows = [r for r in bench_rows() if not (r["method"] == "snapkv" and r["task"] == "variable_tracking")]
    snap = {p["budget"]: p for p in quality_points(rows) if p["method"] == "snapkv"}
    assert snap[0.25]["quality"] == pytest.approx(0.72)  # niah only
    assert snap[0.25]["loss"] == pytest.approx(0.9 - 0.72)  # against the full cache's niah score, not its mean


def test_format_bytes() -> None:
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(3 * 1024**3) == "3.0 GiB"
    assert format_bytes(None) == "–"


# ---------------------------------------------------------------------------------------------------- report


def test_write_report_outputs(tmp_path: Path) -> None:
    rows = bench_rows()
    paths = write_report(rows, tmp_path / "rep", note="SmolLM2 on 2 CPU cores.")
    assert set(paths) == {"summary", "pareto", "report"}

    with open(paths["summary"], newline="", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == SUMMARY_COLUMNS
    assert len(table) == 15
    row = next(
        r for r in table if r["method"] == "streaming" and r["budget"] == "0.1" and r["task"] == "niah_single_number"
    )
    assert float(row["score"]) == pytest.approx(0.225)
    assert row["samples"] == "20" and row["kv_bytes_held"] == "100000" and float(row["compression_ratio"]) == 10.0

    png = paths["pareto"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    md = paths["report"].read_text(encoding="utf-8")
    assert "![Quality vs KV bytes held](pareto.png)" in md
    assert "natural (pydoc_data.topics)" in md and "1024 tokens" in md and "SmolLM2 on 2 CPU cores." in md
    assert "## Full cache" in md and "| toy-llama | 1024 | natural (pydoc_data.topics) | 80.0 |" in md
    assert "| toy-llama | 1024 | streaming | 0.1 | 97.7 KiB | 10.00× | 20.0 | +60.0 |" in md
    assert "| toy-llama | 1024 | snapkv(window=32) | 0.5 | 488.3 KiB | 2.00× | 80.0 | +0.0 | 0.0200 | 96.0 |" in md
    table_lines = [ln for ln in md.splitlines() if ln.startswith("| toy-llama | ")]
    assert len(table_lines) == 1 + 6 + 15
    assert "torch 2.13" in md


def test_report_without_full_cache_and_empty(tmp_path: Path) -> None:
    rows = [r for r in bench_rows() if r["method"] != "full"]
    paths = write_report(rows, tmp_path / "a")
    assert "No full-cache rows" in paths["report"].read_text(encoding="utf-8")
    assert all(p["loss"] is None for p in quality_points(rows))
    empty = write_report([], tmp_path / "b")
    assert empty["pareto"].read_bytes()[:4] == b"\x89PNG"


def test_pareto_panels_per_context(tmp_path: Path) -> None:
    rows = bench_rows() + [dict(r, context=2048) for r in bench_rows()]
    points = quality_points(rows)
    assert {p["context"] for p in points} == {1024, 2048}
    assert sum(p["method"] == "full" for p in points) == 2
    write_report(rows, tmp_path)
    assert (tmp_path / "pareto.png").stat().st_size > 10_000


def test_the_full_cache_is_the_reference_not_scored_against_itself(tmp_path: Path) -> None:
    rows = bench_rows() + [make_row("full", None, "fidelity", None, FULL_BYTES, kl=0.0, top1=1.0, ppl=15.0)]
    md = write_report(rows, tmp_path / "rep")["report"].read_text(encoding="utf-8")
    full = [ln for ln in md.splitlines() if ln.startswith("| toy-llama | full | – | 1024 | fidelity |")]
    assert len(full) == 1 and full[0].endswith("| reference | reference | 15 |"), full
    # other methods keep their measured KL and top-1
    assert "| 0.02 | 96.0 |" in md
