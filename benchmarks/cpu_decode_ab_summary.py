"""Summarise an alternated CPU decode-speed A/B (rows of `cpu_decode_speed.py` from two commits) into one JSON line
per method.

On a shared 2-core box the load changes from one minute to the next, so a single base-vs-head pair says little. The
A/B runs base, head, base, head... (each process times every method `--repeats` times); this script reports, per
method and side, the mean / min / max decode tokens/s and each run's own ratio to the full cache timed in the same
process a few seconds earlier (`rel_full`: the load changes less within one process than between processes), and
head/base of both. Runs whose process got less than `--min-cpu-share` of a core (`cpu_seconds / wall_seconds /
threads`: other processes took the CPU) are left out and counted.

    python benchmarks/cpu_decode_ab_summary.py --base benchmarks/results/cpu_decode_speed_gear_ab_base_*.jsonl \\
        --head benchmarks/results/cpu_decode_speed_gear_ab_head_*.jsonl \\
        --out benchmarks/results/cpu_decode_speed_gear_ab_summary.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from memfit.bench.provenance import ResultWriter


def load(paths: list[str]) -> list[dict[str, Any]]:
    rows = []
    for p in paths:
        for line in Path(p).read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                row["_file"] = Path(p).name
                rows.append(row)
    return rows


def side_stats(rows: list[dict[str, Any]], method: str, min_share: float) -> dict[str, Any]:
    """tokens/s of `method`, and each run's ratio to the full-cache run of the same process and repeat."""
    full = {(r["_file"], r.get("repeat", 0)): r for r in rows if r["method"] == "full"}
    tps, rel, dropped, commits = [], [], 0, set()
    for r in rows:
        if r["method"] != method:
            continue
        share = r["cpu_seconds"] / r["wall_seconds"] / r["threads"] if "cpu_seconds" in r else 1.0
        ref = full.get((r["_file"], r.get("repeat", 0)))
        ref_share = ref["cpu_seconds"] / ref["wall_seconds"] / ref["threads"] if ref and "cpu_seconds" in ref else 1.0
        if share < min_share or ref_share < min_share:
            dropped += 1
            continue
        commits.add(r["provenance"]["commit"]["sha"])
        tps.append(r["decode_tokens_per_second"])
        if ref is not None and method != "full":
            rel.append(r["decode_tokens_per_second"] / ref["decode_tokens_per_second"])
    out: dict[str, Any] = {"commits": sorted(c for c in commits if c), "runs": len(tps), "dropped_loaded": dropped}
    if tps:
        out |= {"tps_mean": statistics.fmean(tps), "tps_min": min(tps), "tps_max": max(tps), "tps": tps}
    if rel:
        out |= {"rel_full_mean": statistics.fmean(rel), "rel_full": rel}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", nargs="+", required=True, help="result files of the base commit")
    ap.add_argument("--head", nargs="+", required=True, help="result files of the head commit")
    ap.add_argument("--min-cpu-share", type=float, default=0.9,
                    help="leave out runs whose process had less than this share of its threads' CPU time")
    ap.add_argument("--out", default=None, help="write the JSON lines here too (the file is started afresh)")
    args = ap.parse_args()
    base, head = load(sorted(args.base)), load(sorted(args.head))
    methods = [m for m in dict.fromkeys(r["method"] for r in base + head)]
    with ResultWriter(args.out) as out:
        for method in methods:
            b, h = side_stats(base, method, args.min_cpu_share), side_stats(head, method, args.min_cpu_share)
            row: dict[str, Any] = {"method": method, "base": b, "head": h,
                                   "base_files": sorted(Path(p).name for p in args.base),
                                   "head_files": sorted(Path(p).name for p in args.head)}
            if b.get("tps_mean") and h.get("tps_mean"):
                row["head_over_base_tps"] = h["tps_mean"] / b["tps_mean"]
            if b.get("rel_full_mean") and h.get("rel_full_mean"):
                row["head_over_base_rel_full"] = h["rel_full_mean"] / b["rel_full_mean"]
            out.write(row)


if __name__ == "__main__":
    main()
