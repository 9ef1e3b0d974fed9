"""KVzip's compression time over a plain prefill of the same document, interleaved in one process.

On a shared machine the load drifts within minutes, so each KVzip compression is timed between two plain prefills
of the same document (prefill, compress, prefill, ...) and divided by their mean. Documents: the needle documents of
`benchmarks/contexts_vs_kvpress.py` (chat-framed, question left out). `--paths split,reference` alternates KVzip's
CPU fast path (the reconstruction's attention as flash calls whose logsumexps the scores reuse) with the two-pass
reference form (dense attention, then a second softmax for the scores) in the same process: a before/after of that
change on the same load.

    python benchmarks/kvzip_compress_time.py --corpus ../shared/data/pg19/1684.txt --length 1024 --samples 2 \
        --out benchmarks/results/kvzip_compress_time_cpu.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--of", type=int, default=8, help="the sample set's size (depths are spread over it)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--allocation", default="adakv")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--paths", default="split", help="comma-separated: split (the CPU fast path, when this torch has "
                    "the kernel) and/or reference (the two-pass form), alternated per repeat")
    args = ap.parse_args()
    from memfit.methods import kvzip

    kernel = kvzip._FLASH_CPU

    from memfit.bench.tasks import generate_samples
    from memfit.contexts import compress_ids, encode_document
    from memfit.engine import versions
    from memfit.models import load_model

    torch.set_grad_enabled(False)
    model, tok = load_model("default", dtype="float32")
    samples = generate_samples("niah_single_number", tok, args.length, args.of, args.seed, filler="natural",
                               corpus=args.corpus)[: args.samples]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(samples):
        ids = encode_document(tok, s.context, chat=True)
        prefill = [compress_ids(model, tok, ids, "full", None, chat=True).info["compress_seconds"]]
        for rep, path in ((r, p) for r in range(args.repeats) for p in args.paths.split(",")):
            kvzip._FLASH_CPU = kernel if path == "split" else None
            ctx = compress_ids(model, tok, ids, "kvzip", args.budget, None, args.allocation, chat=True)
            kvzip._FLASH_CPU = kernel
            prefill.append(compress_ids(model, tok, ids, "full", None, chat=True).info["compress_seconds"])
            around = (prefill[-2] + prefill[-1]) / 2
            row = {"sample": i, "repeat": rep, "document_tokens": len(ids), "method": "kvzip",
                   "allocation": args.allocation, "budget": args.budget, "spans": ctx.info.get("spans"),
                   "path": path if path == "reference" or kernel is not None else "reference (no kernel)",
                   "compress_seconds": ctx.info["compress_seconds"], "prefill_seconds_before": prefill[-2],
                   "prefill_seconds_after": prefill[-1], "compress_over_prefill": ctx.info["compress_seconds"] / around,
                   "load_average_1min": os.getloadavg()[0], "threads": torch.get_num_threads(),
                   "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "versions": versions()}
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps({k: row[k] for k in ("sample", "repeat", "path", "compress_over_prefill")}), flush=True)


if __name__ == "__main__":
    main()
