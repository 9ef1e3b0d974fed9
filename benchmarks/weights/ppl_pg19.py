"""Weight compression on the default model: perplexity on PG-19 prose, packed bytes, peak memory.

For each spec, in fresh processes (so each peak-RSS figure is that configuration's own):
  * ``fp32``: the default model as memfit loads it on CPU;
  * a memfit weight spec (``slim-llm:3:group_size=64``...): quantize the default model (calibrated on another
    PG-19 book), save the folder with `save_quantized`, then load that folder in a *new* process with
    `memfit.load_model(DIR)` and measure perplexity and peak RSS there (so the figures are those of the saved,
    packed model, and the save/reload path is exercised);
  * ``hqq:B``: HQQ (``pip install hqq``, its pure-PyTorch CPU path) at B bits, group 64, on the same linears.

Perplexity: non-overlapping windows of ``--window`` tokens over ``--tokens`` tokens of PG-19 book ``--eval-book``
(from character 20,000 on, past the Gutenberg front matter); exp(mean next-token NLL) over every predicted token.
Rows are appended to ``--out`` (JSONL); specs already there with the same ``--calib-tokens`` are skipped.

Run (2-core CPU box, shared):
  OMP_NUM_THREADS=1 PYTHONPATH=/tmp/hqq_pkg python benchmarks/weights/ppl_pg19.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
PG19 = ROOT.parent / "shared" / "data" / "pg19"
DEFAULT_SPECS = [
    "fp32",
    "rtn:4:group_size=64", "hqq:4", "slim-llm:4:group_size=64", "svdquant:4:group_size=64",
    "rtn:3:group_size=64", "hqq:3", "slim-llm:3:group_size=64", "svdquant:3:group_size=64:rank=16", "gqsa:4",
    "rtn:2:group_size=64", "hqq:2", "slim-llm:2:group_size=64", "svdquant:2:group_size=64:rank=16", "gqsa:2",
    "flash-llm:sparsity=0.5", "flash-llm:sparsity=0.7",
]  # fmt: skip


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def eval_ids(tok, book: str, tokens: int) -> torch.Tensor:
    text = (PG19 / f"{book}.txt").read_text(encoding="utf-8", errors="replace")[20000:]
    ids = tok(text[: tokens * 8], add_special_tokens=False)["input_ids"][:tokens]
    if len(ids) < tokens:
        raise SystemExit(f"book {book} has fewer than {tokens} tokens")
    return torch.tensor(ids)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, window: int) -> tuple[float, float]:
    nll, n = 0.0, 0
    for i in range(0, ids.numel() - 1, window):
        chunk = ids[i : i + window][None]
        if chunk.shape[1] < 2:
            break
        logits = model(input_ids=chunk, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], chunk[0, 1:], reduction="sum")
        nll, n = nll + float(loss), n + chunk.shape[1] - 1
    return math.exp(nll / n), n


def linear_bytes(model) -> tuple[int, int]:
    """(bytes held by the linear layers other than the head, their weight count)."""
    from memfit.weights import CompressedLinear

    head = model.get_output_embeddings()
    held, count = 0, 0
    for m in model.modules():
        if m is head:
            continue
        if isinstance(m, CompressedLinear):
            held += m.weight_bytes
            count += m.in_features * m.out_features
        elif isinstance(m, torch.nn.Linear):
            held += sum(t.numel() * t.element_size() for t in m.parameters())
            count += m.in_features * m.out_features
        elif type(m).__name__ == "HQQLinear":
            ts = [m.W_q] + [v for v in m.meta.values() if torch.is_tensor(v)] + ([m.bias] if m.bias is not None else [])
            held += sum(t.numel() * t.element_size() for t in ts)
            count += m.in_features * m.out_features
    return held, count


def one(args: argparse.Namespace) -> dict:
    """Run one configuration in this process; return its row."""
    from memfit.models import load_model
    from memfit.weights import model_weight_bytes

    spec = args.one
    row: dict = {"spec": spec}
    t0 = time.perf_counter()
    if spec.startswith("load:"):
        model, tok = load_model(spec[5:], progress=False)
    else:
        model, tok = load_model("default", progress=False)
    row["load_seconds"] = round(time.perf_counter() - t0, 2)
    if spec.startswith("hqq:"):
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        from memfit.weights.calibrate import set_module, target_linears

        t0 = time.perf_counter()
        cfg = BaseQuantizeConfig(nbits=int(spec.split(":")[1]), group_size=64)
        for name, lin in target_linears(model).items():
            set_module(model, name, HQQLinear(lin, cfg, compute_dtype=torch.float32, device="cpu"))
        row["quantize_seconds"] = round(time.perf_counter() - t0, 2)
        import hqq

        row["hqq"] = getattr(hqq, "__version__", "?")
    elif spec != "fp32" and not spec.startswith("load:"):
        from memfit.weights import quantize_model
        from memfit.weights.calibrate import calibration_ids
        from memfit.weights.io import save_quantized

        ids = calibration_ids(tok, (PG19 / f"{args.calib_book}.txt").read_text()[20000:], args.calib_tokens, 256)
        t0 = time.perf_counter()
        quantize_model(model, spec, calib_ids=ids)
        row["quantize_seconds"] = round(time.perf_counter() - t0, 2)
        save_quantized(model, tok, args.save_dir)
        row["saved"] = str(args.save_dir)
        return row
    held, count = linear_bytes(model)
    row.update(linear_bytes=held, linear_weights=count, linear_bits_per_weight=round(8 * held / count, 4))
    row["model_weight_bytes"] = model_weight_bytes(model) if not spec.startswith("hqq:") else None
    t0 = time.perf_counter()
    ppl, n = perplexity(model, eval_ids(tok, args.eval_book, args.tokens), args.window)
    row.update(ppl=round(ppl, 4), eval_tokens=n, eval_seconds=round(time.perf_counter() - t0, 1))
    row["peak_rss_bytes"] = peak_rss()
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--specs", default=",".join(DEFAULT_SPECS))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "weights" / "results.jsonl")
    ap.add_argument("--eval-book", default="7433")
    ap.add_argument("--calib-book", default="1684")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--calib-tokens", type=int, default=512)
    ap.add_argument("--work", type=Path, default=Path("/tmp/memfit-weights-bench"))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--save-dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args)))
        return
    import platform

    import transformers

    done = set()
    if args.out.exists():
        rows = [json.loads(line) for line in args.out.read_text().splitlines() if line.strip()]
        done = {(r["spec"], r.get("calib_tokens", 512)) for r in rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    common = [f"--eval-book={args.eval_book}", f"--calib-book={args.calib_book}", f"--tokens={args.tokens}",
              f"--window={args.window}", f"--calib-tokens={args.calib_tokens}"]  # fmt: skip

    def child(spec: str, save: Path | None = None) -> dict:
        cmd = [sys.executable, __file__, "--one", spec, *common] + ([f"--save-dir={save}"] if save else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        if proc.returncode:
            return {"spec": spec, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
        return json.loads(proc.stdout.strip().splitlines()[-1])

    for spec in [s.strip() for s in args.specs.split(",") if s.strip()]:
        if (spec, args.calib_tokens) in done:
            continue
        t0 = time.perf_counter()
        if spec == "fp32" or spec.startswith("hqq:"):
            row = child(spec)
        else:
            folder = args.work / (spec.replace(":", "_").replace("=", "-") + f"-calib{args.calib_tokens}")
            made = child(spec, folder)
            row = child(f"load:{folder}") if "error" not in made else made
            row.update({k: v for k, v in made.items() if k in ("quantize_seconds", "error")})
            row["spec"] = spec
        row.update(
            eval_book=args.eval_book, calib_book=args.calib_book, calib_tokens=args.calib_tokens,
            window=args.window, wall_seconds=round(time.perf_counter() - t0, 1),
            machine=f"{platform.machine()} cpu, {os.cpu_count()} cores (shared), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}",
            torch=torch.__version__, transformers=transformers.__version__,
            date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )  # fmt: skip
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
