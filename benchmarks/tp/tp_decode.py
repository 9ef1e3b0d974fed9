"""Tensor-parallel decode through the product CLI: `memfit run [--tp N] --load-format dummy ... --json` (issue #17).

Each row is one `memfit run` process (torchrun ranks under `--tp N`), so the figures are what a user gets from the
command, including the backend it picked (`backend`, `cuda_graphs` in its --json). A short warm-up run per method
first fills Triton's on-disk kernel cache, so no measured run compiles kernels.

Roofline per decode step and GPU: (this rank's weight bytes + its KV bytes held) / the device-to-device copy
bandwidth measured on one GPU in a separate process (reads + writes counted). The slowest rank sets the step, so the
row's roofline uses the largest per-rank byte count. Scaling: a method's tokens/s at N ranks over its tokens/s at 1.

    python benchmarks/tp/tp_decode.py --model llama-3.1-8b --context 32768 --new 256 --tps 1,2 \
        --methods full,snapkv,snapkv+kivi --budget 0.25 --param kivi.bits=2 \
        --out benchmarks/results/tp_decode_h200x2.jsonl
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from memfit.bench.provenance import ResultWriter, run_cli_json

KEEPS_ALL = ("full", "kivi", "gear", "vidkv")  # methods that take no budget
BANDWIDTH = (
    "import sys, torch; sys.path.insert(0, 'benchmarks'); from runtime_gpu import copy_bandwidth; "
    "print(copy_bandwidth(torch.device('cuda')))"
)


def memfit_run(tp: int, method: str, args: argparse.Namespace, context: int, new: int) -> dict:
    cmd = ["run", "--load-format", "dummy", "--model", args.model, "--device", "cuda", "--context", str(context),
           "--max-new-tokens", str(new), "--method", method, "--no-chat", "--json"]
    if tp > 1:
        cmd += ["--tp", str(tp)]
    if method not in KEEPS_ALL:
        cmd += ["--budget", args.budget]
    for p in args.param or []:
        if p.split("=")[0].split(".")[0] in method.split("+"):
            cmd += ["--param", p]
    return run_cli_json(cmd, args.timeout)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--tps", default="1,2", help="comma-separated rank counts (1 = one process, no --tp)")
    ap.add_argument("--methods", default="full,snapkv,snapkv+kivi")
    ap.add_argument("--budget", default="0.25")
    ap.add_argument("--param", action="append", help="KEY=VALUE passed to methods it names (e.g. kivi.bits=2)")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--out", default="benchmarks/results/tp_decode.jsonl")
    args = ap.parse_args()
    tps = [int(x) for x in args.tps.split(",")]
    methods = args.methods.split(",")
    bw = float(subprocess.run([sys.executable, "-c", BANDWIDTH], capture_output=True, text=True,
                              check=True).stdout.split()[-1])
    base: dict[str, float] = {}
    with ResultWriter(args.out) as out:
        out.write({"kind": "machine", "model": args.model, "copy_bandwidth_bytes_per_s": bw})
        for method in methods:  # warm-up: fills Triton's kernel cache for this method (not recorded)
            memfit_run(1, method, args, 1024, 8)
        for tp in tps:
            for method in methods:
                r = memfit_run(tp, method, args, args.context, args.new)
                if "error" in r:
                    out.write({"kind": "error", "tp": tp, "method": method, **r})
                    continue
                weights = r.get("weight_bytes_per_rank") or [r["weight_bytes"]]
                kv = r.get("kv_bytes_held_per_rank") or [r["kv_bytes_held"]]
                per_gpu = max(w + k for w, k in zip(weights, kv, strict=True))
                roof_tok_s = bw / per_gpu
                tok_s = r["decode_tokens_per_second"]
                if tp == tps[0]:
                    base[method] = tok_s
                out.write({
                    "kind": "memfit", "tp": tp, "method": method, "budget": r["budget"], "params": r["params"],
                    "context": r["prompt_tokens"], "new_tokens": r["generated_tokens"], "backend": r["backend"],
                    "backend_reason": r["backend_reason"], "cuda_graphs": r["cuda_graphs"],
                    "decode_tokens_per_second": tok_s, "decode_ms_per_token": 1000 / tok_s if tok_s else None,
                    "prefill_seconds": r["prefill_seconds"], "kv_bytes_full": r["kv_bytes_full"],
                    "kv_bytes_held": r["kv_bytes_held"], "kv_bytes_held_per_rank": kv, "weight_bytes_per_rank": weights,
                    "peak_memory_bytes_per_rank": r.get("peak_memory_bytes_per_rank") or [r["peak_memory_bytes"]],
                    "per_gpu_bytes": per_gpu, "roofline_tokens_per_second": roof_tok_s,
                    "roofline_fraction": tok_s / roof_tok_s, "scaling_vs_first_tp": tok_s / base[method]
                    if base.get(method) else None, "wall_seconds": r["wall_seconds"], "command": r["command"],
                })


if __name__ == "__main__":
    main()
