"""`memfit run` on a CPU shared with other work: OpenMP's wait policy against background load, in one run.

On a 2-core machine where other processes keep cores busy, torch's OpenMP threads that spin while they wait for
each other at every parallel region lose their core to the other work and stall the step: the README's first-run
example (load average ~18) showed a 48-token prefill of 37 s and 0.3 tokens/s. This script measures the product
command (`memfit run --json`, the default model, the README's first prompt) under each OpenMP wait setting, with 0, 1
or 2 background processes each spinning one core (plain Python loops, no torch), the settings interleaved within
each load level so that drifting load hits every setting alike. Each row is one run's `--json` figures.

Settings (environment of the `memfit run` process):
  * ``spin``: ``OMP_WAIT_POLICY=ACTIVE`` (threads spin while waiting: GNU OpenMP's behaviour before memfit chose);
  * ``passive``: ``OMP_WAIT_POLICY=PASSIVE`` (threads sleep while waiting);
  * ``one-thread``: ``OMP_NUM_THREADS=1``;
  * ``spin10k`` / ``spin100k``: ``GOMP_SPINCOUNT=10000`` / ``100000`` (spin that many rounds, then sleep);
  * ``product``: nothing set: what memfit does by itself (`memfit.openmp_defaults`: PASSIVE when the 1-minute load
    average is at least half the cores, else ``GOMP_SPINCOUNT=10000``; ``--settle`` lets the load average see the
    background load first).

    python benchmarks/cpu_contention.py --out benchmarks/results/cpu_contention.jsonl
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "Explain in two sentences why the KV cache of a transformer grows with the context length."
SETTINGS = {
    "spin": {"OMP_WAIT_POLICY": "ACTIVE"},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "one-thread": {"OMP_NUM_THREADS": "1"},
    "spin10k": {"GOMP_SPINCOUNT": "10000"},
    "spin100k": {"GOMP_SPINCOUNT": "100000"},
    "product": {},
}
OMP_VARS = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT", "MKL_NUM_THREADS")


def _spin() -> None:  # one busy core of "other work"
    while True:
        pass


def one_run(setting: str, args: argparse.Namespace) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in OMP_VARS}
    env.update(SETTINGS[setting])
    cmd = [sys.executable, "-c", "from memfit.cli import main; main()", "run", "--method", args.method, "--budget",
           str(args.budget), "--max-new-tokens", str(args.new_tokens), "--prompt", PROMPT, "--json"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"memfit run failed ({setting}): {done.stderr[-2000:]}")
    res = json.loads(done.stdout)
    return {"prefill_seconds": res["prefill_seconds"], "decode_tokens_per_second": res["decode_tokens_per_second"],
            "new_tokens": res.get("new_tokens"), "backend": res.get("backend"), "wall_seconds": round(wall, 2),
            "device": res.get("device")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--loads", default="0,1,2", help="background busy processes, comma-separated")
    ap.add_argument("--settings", default="spin,passive,one-thread,product")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--method", default="snapkv")
    ap.add_argument("--budget", default="0.5")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--settle", type=float, default=0.0, help="seconds between starting the background load and the "
                    "first run (memfit reads the 1-minute load average when it starts)")
    args = ap.parse_args()
    settings = args.settings.split(",")
    for s in settings:
        if s not in SETTINGS:
            raise SystemExit(f"unknown setting {s!r}: one of {sorted(SETTINGS)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from memfit.engine import versions

    for load in (int(x) for x in args.loads.split(",")):
        busy = [mp.Process(target=_spin, daemon=True) for _ in range(load)]
        for p in busy:
            p.start()
        time.sleep(args.settle if load else 0)
        try:
            for rep in range(args.repeats):
                for setting in settings:
                    row = {"setting": setting, "env": SETTINGS[setting], "background_busy": load, "repeat": rep,
                           "cores": os.cpu_count(), "load_average_1min": os.getloadavg()[0]}
                    row.update(one_run(setting, args))
                    row.update({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "versions": versions()})
                    with args.out.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(json.dumps({k: row[k] for k in ("setting", "background_busy", "prefill_seconds",
                                                          "decode_tokens_per_second")}), flush=True)
        finally:
            for p in busy:
                p.terminate()


if __name__ == "__main__":
    main()
