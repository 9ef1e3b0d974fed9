"""Decode speed with compressed weights on the GPU, through the product CLI (issue #15's speed target).

Each row is one `memfit run --load-format dummy --model M --weights W --device cuda --json` process (random weights
from the built-in config, quantized on load), so the figures are what a user gets from the command, with the backend
it picked (`backend`, `cuda_graphs`, and whether the group-format Triton kernel fell back: `kernel_fallback`).
A short warm-up run per weight spec first fills Triton's on-disk kernel cache, so no measured run compiles kernels.

Roofline per decode step: the bytes a step must read — every weight the model holds except the input embedding
table (a step reads one row of it; Llama-3.1-8B's lm_head is a separate, unquantized matrix and is read in full) plus
the KV bytes held — over the device-to-device copy bandwidth measured in a separate process (reads + writes
counted). Target (issue #15): 4-bit weights decode at >= 1.8x the bf16 model's tokens/s and >= 70 % of this roofline.

    python benchmarks/weights/gpu_decode_speed.py --model llama-3.1-8b --weights none,rtn:4,rtn:3 \
        --context 2048 --new 256 --out benchmarks/results/weights_decode_h200.jsonl
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from memfit.backend import MIN_GRAPH_STEPS
from memfit.bench.provenance import ResultWriter, run_cli_json

BANDWIDTH = (
    "import sys, torch; sys.path.insert(0, 'benchmarks'); from runtime_gpu import copy_bandwidth; "
    "print(copy_bandwidth(torch.device('cuda')))"
)
FALLBACK = "memfit: the Triton kernel for group-quantized weights failed here"


def memfit_run(weights: str, args: argparse.Namespace, context: int, new: int) -> dict:
    cmd = ["run", "--load-format", "dummy", "--model", args.model, "--device", "cuda", "--context", str(context),
           "--max-new-tokens", str(new), "--method", args.method, "--no-chat", "--backend", args.backend, "--json"]
    if weights != "none":
        cmd += ["--weights", weights]
    row, stderr = run_cli_json(cmd, args.timeout)
    if "error" not in row:
        row["kernel_fallback"] = next((line for line in stderr.splitlines() if line.startswith(FALLBACK)), None)
    return row


def embedding_bytes(model: str) -> int:
    """The input embedding table's bytes in bf16 (0 when it is tied to the lm_head, which reads it every step)."""
    from memfit.dummy import dummy_config

    config = dummy_config(model)
    text = getattr(config, "text_config", config)
    if getattr(text, "tie_word_embeddings", False):
        return 0
    return int(text.vocab_size) * int(text.hidden_size) * 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--weights", default="none,rtn:4,rtn:3", help="comma-separated --weights specs (none = bf16)")
    ap.add_argument("--method", default="full", help="the KV method (full: the weights alone are compared)")
    ap.add_argument("--backend", default="auto", choices=["auto", "fast", "portable"])
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--out", default="benchmarks/results/weights_decode.jsonl")
    args = ap.parse_args()
    specs = args.weights.split(",")
    bw = float(subprocess.run([sys.executable, "-c", BANDWIDTH], capture_output=True, text=True,
                              check=True).stdout.split()[-1])
    embed = embedding_bytes(args.model)
    base = base_steady = None
    with ResultWriter(args.out) as out:
        out.write({"kind": "machine", "model": args.model, "copy_bandwidth_bytes_per_s": bw,
                   "embedding_bytes_not_read": embed})
        for spec in specs:  # warm-up: fills Triton's kernel cache for this spec (not recorded); enough new tokens
            memfit_run(spec, args, 256, MIN_GRAPH_STEPS + 4)  # that the graph path's kernels compile here too
        for spec in specs:
            r = memfit_run(spec, args, args.context, args.new)
            if "error" in r:
                out.write({"kind": "error", "weights": spec, **r})
                continue
            read = r["weight_bytes"] - embed + r["kv_bytes_held"]
            tok_s = r["decode_tokens_per_second"]
            if spec == "none":
                base = tok_s
            roof = bw / read
            steady = r.get("decode_steady_tokens_per_second")  # after the first eager step and graph recording
            if spec == "none":
                base_steady = steady
            out.write({
                "kind": "memfit", "weights": spec, "method": r["method"], "context": r["prompt_tokens"],
                "new_tokens": r["generated_tokens"], "backend": r["backend"], "backend_reason": r["backend_reason"],
                "cuda_graphs": r["cuda_graphs"], "kernel_fallback": r["kernel_fallback"],
                "weight_kernels": r.get("weight_kernels"),
                "decode_tokens_per_second": tok_s, "decode_ms_per_token": 1000 / tok_s if tok_s else None,
                "weight_bytes": r["weight_bytes"], "kv_bytes_held": r["kv_bytes_held"], "bytes_read_per_step": read,
                "roofline_tokens_per_second": roof, "roofline_fraction": tok_s / roof,
                "speedup_vs_bf16": tok_s / base if base else None, "peak_memory_bytes": r["peak_memory_bytes"],
                "decode_setup_seconds": r.get("decode_setup_seconds"),
                "decode_capture_seconds": r.get("decode_capture_seconds"), "steady_tokens_per_second": steady,
                "steady_ms_per_token": 1000 / steady if steady else None,
                "steady_roofline_fraction": steady / roof if steady else None,
                "steady_speedup_vs_bf16": steady / base_steady if steady and base_steady else None,
                "tinygemm": os.environ.get("MEMFIT_TINYGEMM", "1") != "0",
                "prefill_seconds": r["prefill_seconds"], "wall_seconds": r["wall_seconds"], "command": r["command"],
            })


if __name__ == "__main__":
    main()
