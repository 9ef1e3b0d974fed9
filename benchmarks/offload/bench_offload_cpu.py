"""CPU measurement of weight streaming on the default model (SmolLM2-135M, float32): resident vs disk tier.

Each configuration is a separate `memfit run --json` process (the CPU peak is the process's peak RSS), so the
rows compare like with like. Writes one JSON row per configuration to results.jsonl (raw `memfit run` output plus
the command) and a markdown table to table.md, both next to this script.

    OMP_NUM_THREADS=2 python benchmarks/offload/bench_offload_cpu.py [--context 256] [--new 16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
CONFIGS = [
    ("resident", []),
    ("tpi (disk, 250MiB)", ["--weights-memory", "250MiB", "--offload-policy", "tpi"]),
    ("superpipeline (disk, 300MiB)", ["--weights-memory", "300MiB", "--offload-policy", "superpipeline",
                                      "--offload-dir", "{tmp}"]),
    ("superpipeline (cpu tier, 300MiB)", ["--weights-memory", "300MiB", "--offload-policy", "superpipeline"]),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--new", type=int, default=16)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, extra in CONFIGS:
            cmd = [sys.executable, "-m", "memfit.cli", "run", "--model", "default", "--context", str(args.context),
                   "--max-new-tokens", str(args.new), "--json", *[e.format(tmp=tmp) for e in extra]]
            t0, load0 = time.time(), os.getloadavg()[0]
            r = subprocess.run(cmd, capture_output=True, text=True, check=True)
            d = json.loads(r.stdout.strip().splitlines()[-1])
            d.pop("text", None), d.pop("texts", None)
            row = {"label": label, "command": " ".join(["memfit", *cmd[3:]]), "wall_seconds": time.time() - t0,
                   "machine": "2-core CPU box shared by ~9 engineers (loaded)",
                   "loadavg_1min_before_after": [load0, os.getloadavg()[0]], **d}
            rows.append(row)
            print(label, row["decode_tokens_per_second"], row["peak_memory_bytes"], flush=True)
    with open(HERE / "results.jsonl", "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    write_table()


def write_table() -> None:
    rows = [json.loads(line) for line in (HERE / "results.jsonl").read_text().splitlines() if line.strip()]
    mib = 2**20
    lines = ["| configuration | decode tok/s | prefill s | peak RSS MiB | predicted MiB | weights on device MiB | "
             "bytes moved / token MiB | stall s / token | loads | on-demand | load avg |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        o = r.get("offload") or {}
        lines.append(
            f"| {r['label']} | {r['decode_tokens_per_second']:.2f} | {r['prefill_seconds']:.1f} | "
            f"{r['peak_memory_bytes'] / mib:.0f} | {(r.get('predicted_peak_memory_bytes') or 0) / mib:.0f} | "
            f"{(o.get('bytes_resident_device', r.get('weight_bytes', 0)) + o.get('window_bytes', 0)) / mib:.0f} | "
            f"{o.get('bytes_moved_per_token', 0) / mib:.1f} | {o.get('stall_seconds_per_token', 0):.3f} | "
            f"{o.get('loads', 0)} | {o.get('on_demand_loads', 0)} | "
            f"{'/'.join(f'{x:.1f}' for x in r.get('loadavg_1min_before_after', []))} |")
    v = rows[-1].get("versions", {})
    lines.append("")
    lines.append(f"Machine: {rows[-1].get('device')}; {rows[-1]['machine']}; versions {v}. Context "
                 f"{rows[-1]['prompt_tokens']} tokens, {rows[-1]['generated_tokens']} generated. Disk reads go through "
                 "the OS page cache (the files were just written), so 'disk' here measures the read path, not a cold "
                 "disk. Commands: the `command` field of each row in results.jsonl.")
    (HERE / "table.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
