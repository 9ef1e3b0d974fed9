"""Real weights on a GPU: do the fast and the portable backends give the same answers?

Runs `memfit bench` (the product's runner, `run_bench`) twice on one loaded model — once with `backend="fast"`,
once with `backend="portable"` — on the same generated needle prompts, then compares every answer. Greedy tokens
may part only where bf16 rounding makes two logits (near-)tie; the rows say how often the answers differ.

    python benchmarks/backend_agreement.py --model default --device cuda \
        --methods full,snapkv,h2o,snapkv+kivi --budgets 0.25 --context 2048 --samples 8 \
        --out benchmarks/results/backend_agreement_h200.jsonl
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from memfit.bench.provenance import ResultWriter
from memfit.bench.runner import parse_budgets, parse_list, run_bench
from memfit.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--methods", default="full,snapkv,h2o,snapkv+kivi")
    ap.add_argument("--budgets", default="0.25")
    ap.add_argument("--tasks", default="niah_single_number")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results/backend_agreement.jsonl")
    args = ap.parse_args()

    pair = load_model(args.model, device=args.device, progress=False)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in ("fast", "portable"):
            res = run_bench(pair, methods=parse_list(args.methods, "methods"), budgets=parse_budgets(args.budgets),
                            tasks=parse_list(args.tasks, "tasks"), context=args.context, samples=args.samples,
                            out=Path(tmp) / backend, model_name=args.model, progress=False, backend=backend)
            runs[backend] = {(r["method"], str(r["budget"]), r["task"]): r for r in res.rows}
    with ResultWriter(args.out) as out:
        for key, fast in sorted(runs["fast"].items()):
            port = runs["portable"][key]
            pf, pp = fast.get("predictions") or [], port.get("predictions") or []
            same = sum(a == b for a, b in zip(pf, pp, strict=True))
            out.write({"method": key[0], "budget": fast["budget"], "task": key[2], "context": args.context,
                       "samples": len(pf), "backend_fast": fast.get("backend"), "backend_portable": port.get("backend"),
                       "same_answers": same, "answer_agreement": same / len(pf) if pf else None,
                       "score_fast": fast["score"], "score_portable": port["score"],
                       "kv_bytes_held_fast": fast["kv_bytes_held"], "kv_bytes_held_portable": port["kv_bytes_held"],
                       "decode_tokens_per_second_fast": fast["decode_tokens_per_second"],
                       "decode_tokens_per_second_portable": port["decode_tokens_per_second"],
                       "predictions_fast": pf, "predictions_portable": pp})


if __name__ == "__main__":
    main()
