"""Provenance of a benchmark result: the machine, the versions, the commit and the exact command behind each row.

Every script under ``benchmarks/`` writes its raw output as JSON lines through ``ResultWriter``, which adds one
``provenance`` field to each row, so a committed result file says by itself what produced it and how to produce it
again (``benchmarks/check_claims.py`` then checks the documents' figures against these files). Result files are
never edited by hand: re-run the command recorded in their rows.

``MEMFIT_MACHINE_NOTE`` (environment) adds a free-text note on the machine, e.g. "2-core CPU box shared with other
jobs", which the hardware fields cannot tell.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from types import TracebackType
from typing import IO, Any

__all__ = ["ResultWriter", "command_line", "git_commit", "machine", "provenance", "run_cli_json", "stamp", "versions"]

_REPO = Path(__file__).resolve().parents[2]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(_REPO), *args], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


@cache
def git_commit() -> dict[str, Any]:
    """``{"sha": ..., "dirty": bool}`` of the checkout memfit runs from (``sha`` None outside a git checkout).

    ``dirty`` says the tree had uncommitted changes, so the sha alone may not reproduce the run exactly.
    """
    sha = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if sha else None
    return {"sha": sha, "dirty": bool(status) if status is not None else None}


@cache
def versions() -> dict[str, str]:
    """Versions of python, memfit, torch, transformers and triton (those installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("memfit", "torch", "transformers", "triton"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


@cache
def machine() -> dict[str, Any]:
    """The hardware a row was measured on: OS, CPU, core count, and the GPUs torch sees (if torch is loaded)."""
    out: dict[str, Any] = {
        "platform": platform.platform(terse=True),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    torch = sys.modules.get("torch")  # never import torch just for this (the checker must stay light)
    if torch is not None and torch.cuda.is_available():
        out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        out["cuda"] = torch.version.cuda
    if torch is not None:
        out["torch_threads"] = torch.get_num_threads()
    note = os.environ.get("MEMFIT_MACHINE_NOTE")
    if note:
        out["note"] = note
    return out


def command_line() -> str:
    """The command that is running, as a user would retype it from the repository root."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(".py"):
        try:
            argv[0] = str(Path(argv[0]).resolve().relative_to(_REPO))
        except ValueError:
            pass
        return "python " + shlex.join(argv)
    if argv and Path(argv[0]).name == "memfit":
        argv[0] = "memfit"
    return shlex.join(argv)


def provenance() -> dict[str, Any]:
    """Machine, versions, commit, command and UTC time of the current process."""
    return {
        "command": command_line(),
        "commit": git_commit(),
        "machine": machine(),
        "versions": versions(),
        "time": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


def stamp(row: Mapping[str, Any]) -> dict[str, Any]:
    """``row`` with a ``provenance`` field added (kept if the row already has one)."""
    out = dict(row)
    out.setdefault("provenance", provenance())
    return out


class ResultWriter:
    """Write a script's result rows as JSON lines: to ``path`` (if given) and to stdout.

    ``mode="w"`` starts the file afresh (a script whose file is its whole output); ``"a"`` appends (a resumable
    script). Use as a context manager or call ``close()``.
    """

    def __init__(self, path: str | os.PathLike[str] | None, mode: str = "w", *, echo: bool = True) -> None:
        if mode not in ("w", "a"):
            raise ValueError("mode must be 'w' or 'a'")
        self.path = Path(path) if path is not None else None
        self.echo = echo
        self._file: IO[str] | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, mode, encoding="utf-8")

    def write(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """Stamp ``row`` with its provenance, write it (flushed), return the stamped row."""
        stamped = stamp(row)
        line = json.dumps(stamped, default=str)
        if self._file is not None:
            self._file.write(line + "\n")
            self._file.flush()
        if self.echo:
            print(line, flush=True)
        return stamped

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def run_cli_json(args: list[str], timeout: float) -> tuple[dict[str, Any], str]:
    """``memfit <args>`` (a command ending in ``--json``) in a fresh process, as a user runs it; for the benchmark
    scripts that drive the product. Returns (its last JSON row with ``command`` and ``wall_seconds`` added — or
    ``{"error": last stderr lines, "command"}`` when it failed or printed no row — and its whole stderr)."""
    import time

    cmd = [sys.executable, "-m", "memfit.cli", *args]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        err = proc.stderr.strip().splitlines()[-5:] if proc.stderr.strip() else f"rc {proc.returncode}"
        return {"error": err, "command": "memfit " + " ".join(args)}, proc.stderr
    row = json.loads(lines[-1])
    row["command"] = "memfit " + " ".join(args)
    row["wall_seconds"] = wall
    return row, proc.stderr
