"""Bench results: the ``results.jsonl`` store (append, resume) and the report (CSV summary, Pareto plot, markdown).

Row schema
----------
One row per (model, method, params, budget, context, task, sample set), written by the runner:

``model`` str, ``method`` str (``"full"`` is the full-cache reference), ``params`` dict, ``budget`` (number, string
or None), ``context`` int (prompt tokens), ``task`` str, ``samples`` int, ``score`` float in [0, 1] (mean task
score; may be None for ``ppl``/``fidelity`` rows), ``kv_bytes_full`` and ``kv_bytes_held`` int (the cache's own
tensors), ``compression_ratio`` float (``kv_bytes_full / kv_bytes_held``), ``peak_memory_bytes`` int,
``prefill_seconds`` float, ``decode_tokens_per_second`` float, ``seed`` int, ``device`` str, ``versions`` dict
(memfit, torch, transformers, python). Optional: ``kl``, ``top1``, ``ppl`` (floats), ``filler`` (str, which text
filled the context), ``sample_set`` (str, an id of the sample set when the seed alone does not name it).

Resume
------
``row_key`` names what a row measured; ``load_done_keys`` reads the keys already in a results file, so a re-run
skips them; ``append_row`` appends one JSON line (flushed and synced, so an interrupted run loses at most the row
being written; a torn last line is skipped on reading).
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from memfit.bench.tasks import TEXT_TASKS as _TASK_TEXT_TASKS
from memfit.units import format_bytes

__all__ = [
    "FULL_METHOD",
    "OPTIONAL_FIELDS",
    "REQUIRED_FIELDS",
    "SUMMARY_COLUMNS",
    "TEXT_TASKS",
    "append_row",
    "environment_versions",
    "format_bytes",
    "load_done_keys",
    "method_label",
    "plot_pareto",
    "quality_points",
    "read_rows",
    "row_key",
    "summarize",
    "validate_row",
    "write_report",
    "write_report_md",
    "write_summary_csv",
]

FULL_METHOD = "full"
TEXT_TASKS = frozenset(_TASK_TEXT_TASKS)
"""Tasks without an answer score; they report ``ppl``/``kl``/``top1`` and are left out of the quality mean."""

REQUIRED_FIELDS: tuple[str, ...] = (
    "model",
    "method",
    "params",
    "budget",
    "context",
    "task",
    "samples",
    "score",
    "kv_bytes_full",
    "kv_bytes_held",
    "compression_ratio",
    "peak_memory_bytes",
    "prefill_seconds",
    "decode_tokens_per_second",
    "seed",
    "device",
    "versions",
)
OPTIONAL_FIELDS: tuple[str, ...] = ("kl", "top1", "ppl", "filler", "sample_set")

SUMMARY_COLUMNS: tuple[str, ...] = (
    "model",
    "method",
    "params",
    "budget",
    "context",
    "filler",
    "task",
    "samples",
    "score",
    "kv_bytes_full",
    "kv_bytes_held",
    "compression_ratio",
    "peak_memory_bytes",
    "prefill_seconds",
    "decode_tokens_per_second",
    "kl",
    "top1",
    "ppl",
    "rows",
)

RowKey = tuple[str, str, str, str, int, str, str, str]

# ------------------------------------------------------------------------------------------------ rows, resume


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    item = getattr(obj, "item", None)  # numpy / torch scalars
    if callable(item):
        return item()
    tolist = getattr(obj, "tolist", None)
    if callable(tolist):
        return tolist()
    raise TypeError(f"cannot store {type(obj).__name__} in results.jsonl")


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=_json_default)


def validate_row(row: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the missing fields if ``row`` lacks any of ``REQUIRED_FIELDS``."""
    missing = [f for f in REQUIRED_FIELDS if f not in row]
    if missing:
        raise ValueError(f"result row is missing field(s): {', '.join(missing)}")
    if not isinstance(row["params"], Mapping):
        raise ValueError(f"result row field 'params' must be a dict, got {type(row['params']).__name__}")


def row_key(row: Mapping[str, Any]) -> RowKey:
    """What a row measured: (model, method, params-json, budget-json, context, task, sample set, filler).

    Only the key fields are read, so the runner can build the key of a pending job from a partial dict. The sample
    set is ``row["sample_set"]`` if given, else ``"seed=<seed>"``.
    """
    sample_set = row.get("sample_set")
    if sample_set is None:
        sample_set = f"seed={row['seed']}"
    return (
        str(row["model"]),
        str(row["method"]),
        _canon(row.get("params") or {}),
        _canon(row.get("budget")),
        int(row["context"]),
        str(row["task"]),
        str(sample_set),
        str(row.get("filler") or ""),
    )


def append_row(path: Path | str, row: Mapping[str, Any]) -> None:
    """Validate ``row`` and append it to the JSON-lines file ``path`` (created with its folder if needed)."""
    validate_row(row)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(dict(row), default=_json_default)
    with open(p, "ab") as f:
        if f.tell() > 0:
            with open(p, "rb") as r:  # a torn last line (interrupted write) must not swallow this row
                r.seek(-1, os.SEEK_END)
                if r.read(1) != b"\n":
                    f.write(b"\n")
        f.write(line.encode("utf-8") + b"\n")
        f.flush()
        os.fsync(f.fileno())


def read_rows(path: Path | str) -> list[dict[str, Any]]:
    """All rows of a results file (missing file: none). Lines that do not parse are skipped with a warning."""
    p = Path(path)
    if not p.exists():
        return []
    rows: list[dict[str, Any]] = []
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                warnings.warn(f"{p}:{lineno}: skipping a line that is not valid JSON", stacklevel=2)
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def load_done_keys(path: Path | str) -> set[RowKey]:
    """Keys (``row_key``) of the rows already stored in ``path``; empty if the file does not exist."""
    done: set[RowKey] = set()
    for row in read_rows(path):
        try:
            done.add(row_key(row))
        except (KeyError, TypeError, ValueError):
            warnings.warn(f"{path}: skipping a row without key fields", stacklevel=2)
    return done


def environment_versions() -> dict[str, str]:
    """Versions for the ``versions`` field: memfit, torch, transformers, python."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str] = {}
    for name in ("memfit", "torch", "transformers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "unknown"
    out["python"] = platform.python_version()
    return out


# ----------------------------------------------------------------------------------------------- aggregation


def _num(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _wmean(pairs: Iterable[tuple[Any, Any]]) -> float | None:
    """Weighted mean of (value, weight) pairs, skipping missing values."""
    total = weight = 0.0
    for value, w in pairs:
        v, wf = _num(value), _num(w)
        if v is None:
            continue
        wf = wf if wf is not None and wf > 0 else 1.0
        total += v * wf
        weight += wf
    return total / weight if weight else None


def _mean(values: Iterable[Any]) -> float | None:
    return _wmean((v, 1.0) for v in values)


def method_label(method: str, params: Mapping[str, Any] | str | None) -> str:
    """``method`` or ``method(k=v, ...)`` when it has parameters."""
    if isinstance(params, str):
        params = json.loads(params) if params else {}
    if not params:
        return method
    return f"{method}({', '.join(f'{k}={params[k]}' for k in sorted(params))})"


def _group_key(row: Mapping[str, Any]) -> tuple[str, str, str, str, int, str, str]:
    return (
        str(row["model"]),
        str(row["method"]),
        _canon(row.get("params") or {}),
        _canon(row.get("budget")),
        int(row["context"]),
        str(row.get("filler") or ""),
        str(row["task"]),
    )


def summarize(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Aggregate rows per (model, method, params, budget, context, filler, task).

    Score, kl, top1 and ppl are sample-weighted means; KV bytes, prefill time and decode speed are means; peak
    memory is the maximum; ``compression_ratio`` is mean full bytes / mean held bytes; ``samples`` is summed.
    """
    groups: dict[tuple[str, str, str, str, int, str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(_group_key(row), []).append(row)
    out: list[dict[str, Any]] = []
    for key, grp in groups.items():
        model, method, params, _, context, filler, task = key
        w = [r.get("samples", 1) for r in grp]
        full = _mean(r.get("kv_bytes_full") for r in grp)
        held = _mean(r.get("kv_bytes_held") for r in grp)
        peaks = [p for p in (_num(r.get("peak_memory_bytes")) for r in grp) if p is not None]
        out.append(
            {
                "model": model,
                "method": method,
                "params": params,
                "budget": grp[0].get("budget"),
                "context": context,
                "filler": filler,
                "task": task,
                "samples": int(sum(_num(x) or 0 for x in w)),
                "score": _wmean(zip((r.get("score") for r in grp), w, strict=True)),
                "kv_bytes_full": full,
                "kv_bytes_held": held,
                "compression_ratio": (full / held) if full is not None and held else None,
                "peak_memory_bytes": max(peaks) if peaks else None,
                "prefill_seconds": _mean(r.get("prefill_seconds") for r in grp),
                "decode_tokens_per_second": _mean(r.get("decode_tokens_per_second") for r in grp),
                "kl": _wmean(zip((r.get("kl") for r in grp), w, strict=True)),
                "top1": _wmean(zip((r.get("top1") for r in grp), w, strict=True)),
                "ppl": _wmean(zip((r.get("ppl") for r in grp), w, strict=True)),
                "rows": len(grp),
            }
        )
    out.sort(
        key=lambda s: (
            s["model"],
            s["context"],
            s["filler"],
            s["task"],
            s["method"] != FULL_METHOD,
            s["method"],
            s["params"],
            -(s["kv_bytes_held"] or 0.0),
        )
    )
    return out


def quality_points(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One point per (model, context, filler, method, params, budget): quality and KV bytes held.

    ``quality`` is the mean over answer-scored tasks of each task's mean score (``ppl``/``fidelity`` left out);
    without such tasks it is the mean top-1 agreement (``metric`` says which). ``loss`` is the full cache's quality
    minus this point's, over the tasks both have (None for the full cache or when no full-cache rows exist).
    """
    points: dict[tuple[Any, ...], dict[str, Any]] = {}
    for s in summarize(rows):
        key = (s["model"], s["context"], s["filler"], s["method"], s["params"], _canon(s["budget"]))
        p = points.setdefault(
            key,
            {
                "model": s["model"],
                "context": s["context"],
                "filler": s["filler"],
                "method": s["method"],
                "params": s["params"],
                "label": method_label(s["method"], s["params"]),
                "budget": s["budget"],
                "task_scores": {},
                "task_top1": {},
                "held": [],
                "full": [],
                "kl": [],
                "top1": [],
            },
        )
        if s["task"] not in TEXT_TASKS and s["score"] is not None:
            p["task_scores"][s["task"]] = s["score"]
        if s["top1"] is not None:
            p["task_top1"][s["task"]] = s["top1"]
        p["held"].append(s["kv_bytes_held"])
        p["full"].append(s["kv_bytes_full"])
        p["kl"].append(s["kl"])
        p["top1"].append(s["top1"])
    out = []
    for p in points.values():
        metric, per_task = ("score", p["task_scores"]) if p["task_scores"] else ("top1", p["task_top1"])
        held = _mean(p.pop("held"))
        full = _mean(p.pop("full"))
        p.update(
            metric=metric,
            per_task=per_task,
            quality=_mean(per_task.values()),
            kv_bytes_held=held,
            kv_bytes_full=full,
            compression_ratio=(full / held) if full is not None and held else None,
            kl=_mean(p.pop("kl")),
            top1=_mean(p.pop("top1")),
        )
        out.append(p)
    refs = {(p["model"], p["context"], p["filler"]): p for p in out if p["method"] == FULL_METHOD}
    for p in out:
        ref = refs.get((p["model"], p["context"], p["filler"]))
        p["loss"] = None
        if ref is not None and p is not ref and p["metric"] == ref["metric"]:
            common = sorted(set(ref["per_task"]) & set(p["per_task"]))
            if common:
                p["loss"] = _mean(ref["per_task"][t] - p["per_task"][t] for t in common)
    out.sort(
        key=lambda p: (
            p["model"],
            p["context"],
            p["filler"],
            p["method"] != FULL_METHOD,
            p["label"],
            -(p["kv_bytes_held"] or 0.0),
        )
    )
    return out


# --------------------------------------------------------------------------------------------------- outputs


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() and abs(v) < 1e15 else f"{v:.6g}"
    if isinstance(v, dict | list):
        return _canon(v)
    return v


def write_summary_csv(rows: Sequence[Mapping[str, Any]], path: Path | str) -> Path:
    """Write ``summarize(rows)`` as CSV with ``SUMMARY_COLUMNS``."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(SUMMARY_COLUMNS))
        writer.writeheader()
        for s in summarize(rows):
            writer.writerow({c: _csv_value(s.get(c)) for c in SUMMARY_COLUMNS})
    return p


def plot_pareto(rows: Sequence[Mapping[str, Any]], path: Path | str) -> Path:
    """Quality vs KV bytes held (log x): one panel per (model, context, filler), one line per method across
    budgets, the full cache as a star. Rendered with the Agg canvas (no display, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points = quality_points(rows)
    panels: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for p in points:
        panels.setdefault((p["model"], p["context"], p["filler"]), []).append(p)
    n = max(1, len(panels))
    cols = min(n, 2)
    nrows = math.ceil(n / cols)
    fig = Figure(figsize=(6.4 * cols, 4.4 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    if not panels:
        axes[0].set_visible(True)
        axes[0].text(0.5, 0.5, "no results", ha="center", va="center", transform=axes[0].transAxes)
    for ax, ((model, context, filler), pts) in zip(axes, panels.items(), strict=False):
        metric = "score"
        by_label: dict[str, list[dict[str, Any]]] = {}
        for p in pts:
            if p["quality"] is None or not p["kv_bytes_held"]:
                continue
            metric = p["metric"]
            by_label.setdefault(p["label"], []).append(p)
        for label, line in by_label.items():
            line.sort(key=lambda p: p["kv_bytes_held"])
            xs = [p["kv_bytes_held"] for p in line]
            ys = [100.0 * p["quality"] for p in line]
            if line[0]["method"] == FULL_METHOD:
                ax.scatter(
                    xs,
                    ys,
                    marker="*",
                    s=260,
                    color="black",
                    zorder=5,
                    label="full cache" if label == FULL_METHOD else f"{label} (full cache)",
                )
                for y in ys:
                    ax.axhline(y, color="black", linewidth=0.6, linestyle=":", zorder=1)
            else:
                ax.plot(xs, ys, marker="o", linewidth=1.5, label=label)
        ax.set_xscale("log")
        ax.set_xlabel("KV cache bytes held (log scale)")
        ax.set_ylabel("mean task score (%)" if metric == "score" else "top-1 agreement with full cache (%)")
        title = f"{model} · {context} tokens"
        ax.set_title(title + (f"\n{filler}" if filler else ""), fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        if by_label:
            ax.legend(fontsize=8, loc="best")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def _md_escape(v: Any) -> str:
    return str(v).replace("|", "\\|")


def _md_table(header: Sequence[str], body: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_md_escape(c) for c in r) + " |" for r in body]
    return "\n".join(lines)


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100.0 * v:.1f}"


def _fmt(v: float | None, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def _budget(v: Any) -> str:
    return "–" if v is None else str(v)


def write_report_md(
    rows: Sequence[Mapping[str, Any]],
    path: Path | str,
    *,
    plot_name: str | None = "pareto.png",
    note: str | None = None,
) -> Path:
    """Markdown report: data note, the Pareto plot, full-cache quality, each method's loss, the summary table."""
    summary = summarize(rows)
    points = quality_points(rows)
    models = sorted({s["model"] for s in summary})
    contexts = sorted({s["context"] for s in summary})
    tasks = sorted({s["task"] for s in summary})
    scored = [t for t in tasks if t not in TEXT_TASKS]
    fillers = sorted({s["filler"] for s in summary if s["filler"]})
    devices = sorted({str(r.get("device")) for r in rows if r.get("device")})

    parts = ["# memfit bench report", ""]
    parts.append(
        f"Models: {', '.join(models) or '–'}. Contexts: {', '.join(f'{c} tokens' for c in contexts) or '–'}. "
        f"Tasks: {', '.join(tasks) or '–'}. Devices: {', '.join(devices) or '–'}."
    )
    parts.append("")
    parts.append(
        "Filler: "
        + ("; ".join(fillers) if fillers else "not recorded in the rows")
        + ". Repeated-noise filler is easy for attention-based eviction and hides damage; natural prose shows it, "
        "so read every figure together with its filler."
    )
    if note:
        parts += ["", note.strip()]
    parts += [
        "",
        "Quality is the mean task score in % (string match against the answers) over "
        + (", ".join(scored) if scored else "no answer-scored task (top-1 agreement with the full cache instead)")
        + ", on the same prompts for every method. KV bytes count every tensor the cache holds; "
        "ratio = full bytes / held bytes.",
    ]
    if plot_name:
        parts += ["", "## Quality vs KV memory", "", f"![Quality vs KV bytes held]({plot_name})"]

    fulls = [p for p in points if p["method"] == FULL_METHOD]
    parts += ["", "## Full cache", ""]
    if fulls:
        parts.append(
            _md_table(
                ["model", "context", "filler", "quality %", "KV bytes", "per task %"],
                (
                    [
                        p["model"],
                        p["context"],
                        p["filler"] or "–",
                        _pct(p["quality"]),
                        format_bytes(p["kv_bytes_full"]),
                        ", ".join(f"{t} {_pct(v)}" for t, v in sorted(p["per_task"].items())),
                    ]
                    for p in fulls
                ),
            )
        )
    else:
        parts.append("No full-cache rows: losses cannot be computed.")

    others = [p for p in points if p["method"] != FULL_METHOD]
    if others:
        parts += ["", "## Loss vs full cache", "", "loss = full-cache quality − method quality, in points (% scale)."]
        parts.append("")
        parts.append(
            _md_table(
                ["model", "context", "method", "budget", "KV held", "ratio", "quality %", "loss pts", "KL", "top-1 %"],
                (
                    [
                        p["model"],
                        p["context"],
                        p["label"],
                        _budget(p["budget"]),
                        format_bytes(p["kv_bytes_held"]),
                        _fmt(p["compression_ratio"], ".2f") + ("×" if p["compression_ratio"] else ""),
                        _pct(p["quality"]),
                        _fmt(None if p["loss"] is None else 100.0 * p["loss"], "+.1f"),
                        _fmt(p["kl"], ".4f"),
                        _pct(p["top1"]),
                    ]
                    for p in others
                ),
            )
        )

    extra = [c for c in ("kl", "top1", "ppl") if any(s[c] is not None for s in summary)]
    parts += ["", "## All results", ""]
    header = ["model", "method", "budget", "context", "task", "score %", "samples", "KV held", "KV full", "ratio"]
    header += ["peak mem", "prefill s", "decode tok/s"] + extra
    body = []
    for s in summary:
        r = [
            s["model"],
            method_label(s["method"], s["params"]),
            _budget(s["budget"]),
            s["context"],
            s["task"],
            _pct(s["score"]),
            s["samples"],
            format_bytes(s["kv_bytes_held"]),
            format_bytes(s["kv_bytes_full"]),
            _fmt(s["compression_ratio"], ".2f"),
            format_bytes(s["peak_memory_bytes"]),
            _fmt(s["prefill_seconds"], ".3f"),
            _fmt(s["decode_tokens_per_second"], ".1f"),
        ]
        # The full cache is the reference of KL and top-1: comparing it with itself measures nothing.
        reference = s["method"] == FULL_METHOD
        for c in extra:
            if reference and c != "ppl" and s[c] is not None:
                r.append("reference")
            else:
                r.append(_pct(s[c]) if c == "top1" else _fmt(s[c], ".4g"))
        body.append(r)
    parts.append(_md_table(header, body))

    versions = sorted({_canon(r.get("versions") or {}) for r in rows})
    if versions:
        parts += ["", "## Environment", ""]
        for v in versions:
            d = json.loads(v)
            parts.append("- " + (", ".join(f"{k} {d[k]}" for k in sorted(d)) or "versions not recorded"))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return out


def write_report(
    rows: Sequence[Mapping[str, Any]],
    out_dir: Path | str,
    *,
    note: str | None = None,
) -> dict[str, Path]:
    """Write ``summary.csv``, ``pareto.png`` and ``report.md`` into ``out_dir``; returns their paths."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    return {
        "summary": write_summary_csv(rows, d / "summary.csv"),
        "pareto": plot_pareto(rows, d / "pareto.png"),
        "report": write_report_md(rows, d / "report.md", plot_name="pareto.png", note=note),
    }
