"""`memfit plan` against measurement: run the plan, then run its first N suggested commands (`--json`) and record
predicted and measured peaks side by side (results appended to plan_vs_measured.jsonl next to this script).

    OMP_NUM_THREADS=2 python benchmarks/offload/plan_vs_measured.py --memory 1.2GiB --context 512 --top 3
    python benchmarks/offload/plan_vs_measured.py --model llama-3.1-8b --device cuda --memory 24GiB \
        --context 32768 --top 4        # the GPU machine (each suggested run loads the 8B config with random weights)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--memory", required=True)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--top", type=int, default=3)
    ap.add_argument("--out", type=Path, default=HERE / "plan_vs_measured.jsonl")
    args = ap.parse_args()
    plan_cmd = [sys.executable, "-m", "memfit.cli", "plan", "--model", args.model, "--memory", args.memory,
                "--context", str(args.context), "--device", args.device, "--max-new-tokens", str(args.max_new_tokens),
                "--json"]
    plan = json.loads(subprocess.run(plan_cmd, capture_output=True, text=True, check=True).stdout)
    picked, seen = [], set()
    for f in plan["fits"]:  # one per (method, budget, weights streamed or not): the list is long otherwise
        key = (f["method"], f["budget"], json.dumps(f["params"]), f["weights_memory"] is None)
        if key not in seen:
            seen.add(key)
            picked.append(f)
    for f in picked[: args.top]:
        cmd = shlex.split(f["command"])[1:] + ["--json"]  # drop "memfit"
        t0, load0 = time.time(), os.getloadavg()[0]
        r = subprocess.run([sys.executable, "-m", "memfit.cli", *cmd], capture_output=True, text=True)
        row = {"plan_command": " ".join(["memfit", *plan_cmd[3:]]), "memory": plan["memory"],
               "command": f["command"], "predicted_in_plan": f["peak_bytes"], "returncode": r.returncode,
               "wall_seconds": time.time() - t0, "loadavg_1min_before_after": [load0, os.getloadavg()[0]]}
        if r.returncode == 0:
            d = json.loads(r.stdout.strip().splitlines()[-1])
            d.pop("text", None), d.pop("texts", None)
            row.update(measured_peak=d["peak_memory_bytes"], predicted_in_run=d.get("predicted_peak_memory_bytes"),
                       kv_bytes_held=d["kv_bytes_held"], kv_predicted=(d.get("predicted") or {}).get("kv_bytes"),
                       within_memory=d["peak_memory_bytes"] <= plan["memory"], run=d)
            row["error_vs_measured"] = (row["predicted_in_run"] - row["measured_peak"]) / row["measured_peak"]
        else:
            row["stderr"] = r.stderr[-2000:]
        print(json.dumps({k: v for k, v in row.items() if k != "run"}), flush=True)
        with open(args.out, "a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
