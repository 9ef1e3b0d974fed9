"""Question *outside* the compressed context: compress a document once (no question in it), then ask.

For each generated needle document (memfit.bench.tasks `niah_single_number`, natural prose filler, the question
kept out of the document), every method compresses the document alone with `memfit.compress`, and the question is
answered from the compressed context (`memfit.run(question, kv=ctx)`). Methods: the full cache, KVzip, SnapKV
(its observation window is then the document's end, not the question) and StreamingLLM, at fractions of the
document's KV bytes. Each row also records the compression time next to the same document's plain prefill (the
full cache's compression time), so KVzip's cost is measured as a ratio to a prefill.

    python benchmarks/contexts_needle.py --out benchmarks/results/contexts_needle_cpu.jsonl \
        --corpus ../shared/data/pg19/1684.txt --length 1024 --samples 6

Rows are appended to --out (JSONL) and finished rows are skipped on a re-run; a summary table is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import memfit
from memfit.bench.metrics import score_prediction
from memfit.bench.tasks import generate_samples
from memfit.contexts import compress
from memfit.engine import device_name, versions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--length", type=int, default=1024, help="document + question length in tokens")
    ap.add_argument("--samples", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--corpus", type=Path, default=None, help="filler text file (default: pydoc topics)")
    ap.add_argument("--methods", default="full,kvzip,snapkv,streaming")
    ap.add_argument("--budgets", default="0.5,0.25,0.125")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--summarize-only", action="store_true", help="only rewrite the summary of --out")
    args = ap.parse_args()
    if args.summarize_only:
        summarize(args.out)
        return

    model, tok = memfit.load_model(args.model, device=args.device, dtype=args.dtype)
    samples = generate_samples("niah_single_number", tok, args.length, args.samples, args.seed, filler="natural",
                               corpus=args.corpus)
    done = set()
    if args.out.exists():
        for line in args.out.read_text().splitlines():
            r = json.loads(line)
            done.add((r["method"], r["budget"], r["sample"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    common = {"model": args.model, "device": device_name(device), "dtype": str(next(model.parameters()).dtype),
              "length": args.length, "corpus": str(args.corpus or "pydoc"), "versions": versions()}
    budgets = [float(b) for b in args.budgets.split(",")]
    for i, sample in enumerate(samples):
        full_seconds = None
        for method in args.methods.split(","):
            for budget in [None] if method == "full" else budgets:
                key = (method, budget, i)
                if key in done and method != "full":
                    continue
                t0 = time.perf_counter()
                ctx = compress(sample.context, (model, tok), method, budget)
                wall = time.perf_counter() - t0
                if method == "full":
                    full_seconds = ctx.info["compress_seconds"]
                    if key in done:
                        continue
                result = memfit.run(sample.question, kv=ctx, max_new_tokens=args.max_new_tokens)
                row = {
                    "method": method, "budget": budget, "sample": i, "depth": sample.depth, "seed": sample.seed,
                    "document_tokens": ctx.seen, "question": sample.question, "answers": sample.answers,
                    "prediction": result.text, "score": score_prediction(sample.task, result.text, sample.answers),
                    "kv_bytes_full": ctx.info["kv_bytes_full"], "kv_bytes_held": ctx.info["kv_bytes_held"],
                    "bytes_fraction": ctx.info["kv_bytes_held"] / ctx.info["kv_bytes_full"],
                    "compress_seconds": ctx.info["compress_seconds"], "compress_wall_seconds": wall,
                    "prefill_seconds_full_cache": full_seconds,
                    "compress_over_prefill": ctx.info["compress_seconds"] / full_seconds if full_seconds else None,
                    **common,
                }
                with args.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{method:10s} {budget!s:6s} sample {i} score {row['score']:.0f} bytes "
                      f"{row['bytes_fraction']:.3f} time x{row['compress_over_prefill'] or 0:.2f} {result.text!r}",
                      flush=True)
    summarize(args.out)


def summarize(path: Path) -> None:
    """Print one line per (method, budget) and write them to <out stem>_summary.json ({"rows": [...]})."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    groups: dict[tuple[str, float | None], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["budget"]), []).append(r)
    summary = []
    print("\nmethod      budget  n  accuracy  bytes held  compress / prefill (mean)")
    for (method, budget), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], -(kv[0][1] or 2))):
        ratios = [r["compress_over_prefill"] for r in rs if r["compress_over_prefill"]]
        row = {"method": method, "budget": budget, "n": len(rs), "accuracy": sum(r["score"] for r in rs) / len(rs),
               "bytes_fraction": sum(r["bytes_fraction"] for r in rs) / len(rs),
               "compress_over_prefill": (sum(ratios) / len(ratios)) if ratios else None,
               "compress_seconds": sum(r["compress_seconds"] for r in rs) / len(rs),
               "length": rs[0]["length"], "device": rs[0]["device"], "corpus": rs[0]["corpus"]}
        summary.append(row)
        print(f"{method:10s}  {budget!s:6s} {len(rs):2d}  {row['accuracy']:.2f}      {row['bytes_fraction']:.3f}"
              f"       {row['compress_over_prefill'] or float('nan'):.2f}")
    out = path.with_name(path.stem + "_summary.json")
    out.write_text(json.dumps({"source": str(path), "rows": summary}, indent=1) + "\n")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
