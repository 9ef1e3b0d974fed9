"""memfit beside NVIDIA kvpress on the same prompts, the same model and the same ratios (issue #12, part 5).

What it does
- Generates needle prompts (`niah_single_number`: a 7-digit "special magic number" in natural prose) with memfit's
  bench generator, from a PG-19 book (`--corpus`, default ../shared/data/pg19/2021.txt; the book text stays out of
  the repository: only token counts, answers and predictions are written), plain text (no chat template: the full
  cache is strongest that way on this model), question *inside* the compressed prompt.
- memfit side (this interpreter): each method at each ratio keeps 1/n of the prompt's tokens per layer
  (`budget = 1/n`), optionally with `spans` on (`name+spans`); greedy answer of 16 tokens; the samples of a
  configuration run as one left-padded batch (exact).
- kvpress side (its own virtual environment, its pinned transformers): the same token ids through
  `press(model)` around the prefill (compression_ratio = 1 - 1/n, the whole prompt is compressed, as on the memfit
  side), then greedy decoding with explicit positions exactly like kvpress's pipeline `generate_answer`.
- Both sides load the same safetensors folder (memfit's cached copy of SmolLM2-135M-Instruct), fp32 on CPU, and
  measure the KV bytes they hold after the prompt (memfit: `cache.nbytes()`; kvpress: the DynamicCache's tensors).
- Writes `<out>/results.jsonl` (one row per sample × configuration) and `<out>/report.md` (mean needle score per
  ratio, full cache beside each row), an equal-bytes table (memfit's best configuration holding no more bytes than
  kvpress's presses hold at a ratio) and `<out>/summary.jsonl` (one row per side, configuration and ratio).
- Configurations: `name`, `name+spans`, `name(k=v,...)`, and `...@Kx` = keep K times the ratio's tokens (a
  composition such as `snapkv+kivi+spans(kivi.bits=4,kivi.residual=32)@4x` whose quantizer brings the bytes down).
  Both sides run ratio by ratio (every configuration at the first ratio first), resume from `--tmp`, and `--only
  memfit|kvpress` runs one side (e.g. two processes in parallel on a CPU box).

CPU-feasible by default (512 tokens, 4 samples: a small sample, each row is 0.25 of a score); the lead can re-run larger on a GPU
(`--device cuda --context 4096 --samples 36`).

Set-up of the kvpress environment (once; the CPU torch wheel is on this machine's disk):
    python -m venv /tmp/kvpress-venv && /tmp/kvpress-venv/bin/pip install torch==2.13.0 \
        && /tmp/kvpress-venv/bin/pip install kvpress==0.5.5
Run:
    python benchmarks/vs_kvpress.py --out benchmarks/vs_kvpress
The 2K-token tables of benchmarks/claims.md (issue #12): benchmarks/vs_kvpress/ctx2048/ and, every ratio on both
sides, benchmarks/vs_kvpress/ctx2048_all/ (commands in claims.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "pg19" / "2021.txt"
ANSWER_TOKENS = 16
MEMFIT_METHODS = ["snapkv", "snapkv+spans", "tova", "tova+spans", "h2o", "h2o+spans"]
KVPRESS_PRESSES = ["SnapKVPress", "TOVAPress", "StreamingLLMPress"]


# ----------------------------------------------------------------------------------------------- kvpress worker
def kvpress_worker(prompts_path: str, out_path: str, presses: list[str], ratios: list[int], device: str) -> None:
    """Runs inside the kvpress venv: no memfit import here."""
    import kvpress
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, DynamicCache

    spec = json.loads(Path(prompts_path).read_text())
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32).to(device).eval()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    versions = {"kvpress": getattr(kvpress, "__version__", "?"), "transformers": transformers.__version__,
                "torch": torch.__version__}
    try:
        from importlib.metadata import version

        versions["kvpress"] = version("kvpress")
    except Exception:  # noqa: BLE001 - version is informational only
        pass
    configs: list[tuple[str, int | None]] = [("none", None)] + [(p, n) for n in ratios for p in presses]
    done = set()  # rows already written by an interrupted run of the same prompts: resume
    if Path(out_path).exists():
        for line in Path(out_path).read_text().splitlines():
            r = json.loads(line)
            done.add((r["method"], r["ratio"], r["sample"]))
    with open(out_path, "a") as out, torch.no_grad():
        for press_name, n in configs:
            press = None if n is None else getattr(kvpress, press_name)(compression_ratio=1.0 - 1.0 / n)
            for s in spec["samples"]:
                if ("full" if n is None else press_name, n, s["index"]) in done:
                    continue
                ids = torch.tensor([s["ids"]], device=device)
                t_len = ids.shape[1]
                cache = DynamicCache()
                t0 = time.perf_counter()
                if press is None:
                    logits = model(input_ids=ids, past_key_values=cache, logits_to_keep=1).logits
                else:
                    with press(model):
                        logits = model(input_ids=ids, past_key_values=cache, logits_to_keep=1).logits
                prefill = time.perf_counter() - t0
                kept = int(cache.layers[0].keys.shape[2])
                # greedy decoding, positions continuing the *uncompressed* prompt (kvpress pipeline's generate_answer)
                generated: list[int] = []
                nxt = int(logits[0, -1].argmax())
                for i in range(ANSWER_TOKENS):
                    if nxt in eos:
                        break
                    generated.append(nxt)
                    if i == ANSWER_TOKENS - 1:
                        break
                    pos = torch.tensor([[t_len + i]], device=device)
                    logits = model(input_ids=torch.tensor([[nxt]], device=device), past_key_values=cache,
                                   position_ids=pos).logits
                    nxt = int(logits[0, -1].argmax())
                # bytes held at the end, answer tokens included (as memfit's cache.nbytes() after generate)
                held = sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel()
                           * layer.values.element_size() for layer in cache.layers)
                row = {"side": "kvpress", "method": "full" if n is None else press_name, "ratio": n,
                       "sample": s["index"], "generated_ids": generated, "kv_bytes_held": held,
                       "kept_tokens_layer0": kept, "prompt_tokens": t_len, "prefill_seconds": round(prefill, 3),
                       "versions": versions}
                out.write(json.dumps(row) + "\n")
                out.flush()
            print(f"kvpress {press_name} 1/{n}: done", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- memfit driver
def _memfit_config(name: str) -> tuple[str, dict[str, str], bool, int]:
    """'snapkv+spans' -> ('snapkv', {}, True, 1); 'snapkv(kernel=15)' -> ('snapkv', {'kernel': '15'}, False, 1);
    'snapkv+kivi+spans(kivi.bits=4)@4x' -> (..., True, 4): keep 4x the tokens of the ratio's row (a composition
    whose quantizer brings the *bytes* down to that row; the table compares measured bytes, not token counts)."""
    base, tokens_mult = name, 1
    if base.endswith("x") and "@" in base:
        base, _, mult = base.rpartition("@")
        tokens_mult = int(mult[:-1])
    params: dict[str, str] = {}
    if "(" in base:
        base, _, inner = base.partition("(")
        params = dict(kv.split("=", 1) for kv in inner.rstrip(")").split(","))
    spans = base.endswith("+spans")
    return base.removesuffix("+spans"), params, spans, tokens_mult


def run_memfit(model, tok, samples, methods, ratios, rows_path, device, full=True) -> None:  # noqa: ANN001
    """All samples of a configuration as one left-padded batch (exact: each row keeps what it would alone). Rows are
    appended to `rows_path` as each configuration finishes; configurations already there are skipped (resume)."""
    from memfit.api import make_cache
    from memfit.bench import metrics
    from memfit.core.spans import enable_spans
    from memfit.engine import generate, pad_left

    eos = model.generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    ids, mask = pad_left([s["ids"] for s in samples], tok.pad_token_id or 0)
    configs: list[tuple[str, int | None]] = [("full", None)] * full + [(m, n) for n in ratios for m in methods]
    rows_path = Path(rows_path)
    done = set()
    if rows_path.exists():
        done = {(r["method"], r["ratio"]) for r in map(json.loads, rows_path.read_text().splitlines())}
    for name, n in configs:
        if (name, n) in done:
            continue
        rows_out: list[dict] = []
        base, params, spans, mult = _memfit_config(name)
        cache = make_cache(model, base, None if n is None else min(1.0, mult / n), params or None)
        if spans:
            enable_spans(cache, tok)
        gen = generate(model, ids.to(device), mask.to(device), cache, ANSWER_TOKENS, eos)
        held, full = cache.nbytes(), cache.full_nbytes()
        for s, toks in zip(samples, gen.tokens, strict=True):
            pred = tok.decode(toks, skip_special_tokens=True)
            rows_out.append({
                "side": "memfit", "method": name, "ratio": n, "sample": s["index"], "prediction": pred,
                "answer": s["answers"], "score": metrics.score_prediction("niah_single_number", pred, s["answers"]),
                # bytes of the batch's cache, per row (rows are the same length here: one prompt length ±2 %)
                "kv_bytes_held": held / len(samples), "kv_bytes_full": full / len(samples),
                "prompt_tokens": len(s["ids"]), "prefill_seconds": round(gen.prefill_seconds / len(samples), 3),
            })
        with open(rows_path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows_out)
        mean = sum(r["score"] for r in rows_out) / len(rows_out)
        print(f"memfit {name} 1/{n}: {mean:.2f}", file=sys.stderr, flush=True)


def report(rows: list[dict], out: Path, args: argparse.Namespace, versions: dict) -> str:
    def mean_score(side: str, method: str, n: int | None) -> float | None:
        sel = [r["score"] for r in rows if r["side"] == side and r["method"] == method and r["ratio"] == n]
        return sum(sel) / len(sel) if sel else None

    def mean_bytes(side: str, method: str, n: int | None) -> float | None:
        sel = [r["kv_bytes_held"] for r in rows if r["side"] == side and r["method"] == method and r["ratio"] == n]
        return sum(sel) / len(sel) if sel else None

    def fmt(v: float | None) -> str:
        return "–" if v is None else f"{v:.2f}"

    full_m, full_k = mean_score("memfit", "full", None), mean_score("kvpress", "full", None)
    fulls = [r["kv_bytes_full"] for r in rows if r["side"] == "memfit"]  # what a full cache holds (any memfit row)
    full_bytes = sum(fulls) / len(fulls) if fulls else 1.0
    def order(names: list[str]):  # noqa: ANN202 - the order asked for, then any other configuration in the rows
        return lambda m: (names.index(m) if m in names else len(names), m)

    ms = sorted({r["method"] for r in rows if r["side"] == "memfit" and r["ratio"]}, key=order(args.methods))
    ks = sorted({r["method"] for r in rows if r["side"] == "kvpress" and r["ratio"]}, key=order(args.presses))
    lines = [
        "# memfit vs kvpress: needle score at equal KV ratios (question inside the compressed prompt)",
        "",
        f"Model: SmolLM2-135M-Instruct (memfit's safetensors copy), fp32, {args.device}. Prompts: "
        f"{args.samples} × niah_single_number (7-digit value), {args.context} tokens of natural prose from PG-19 "
        f"book {Path(args.corpus).stem}, seed {args.seed}, depths spread evenly, plain text (no chat template), "
        f"{ANSWER_TOKENS} answer tokens, greedy. Same token ids on both sides. Score = exact value found in the "
        "answer (memfit.bench.metrics). Machine: the shared 2-core CPU box (loaded), so times are indicative only.",
        f"Versions: memfit side torch {versions.get('memfit_torch')} / transformers {versions.get('memfit_tf')}; "
        f"kvpress side kvpress {versions.get('kvpress')} / transformers {versions.get('transformers')} / torch "
        f"{versions.get('torch')}.",
        "Command: `python benchmarks/vs_kvpress.py " + " ".join(
            f"'{a}'" if ";" in a else a for a in sys.argv[1:] if a != "--report-only") + "`",
        "",
        f"Full cache: memfit {fmt(full_m)} · kvpress {fmt(full_k)} (mean KV of a full cache {full_bytes / 2**20:.1f} "
        "MiB; memfit's full row is '–' when run with --skip-full: same model, same ids as kvpress's).",
        "",
        "| KV kept | " + " | ".join(f"memfit {m}" for m in ms) + " | " + " | ".join(f"kvpress {k}" for k in ks)
        + " | best memfit | best kvpress | full |",
        "|---" * (len(ms) + len(ks) + 4) + "|",
    ]
    for n in args.ratios:
        mvals = [mean_score("memfit", m, n) for m in ms]
        kvals = [mean_score("kvpress", k, n) for k in ks]

        def cell(v: float | None, side: str, name: str, n: int = n) -> str:
            if v is None:
                return "–"
            b = mean_bytes(side, name, n)
            return f"{v:.2f}" + (f" ({full_bytes / b:.1f}×)" if b else "")

        bm = max((v for v in mvals if v is not None), default=None)
        bk = max((v for v in kvals if v is not None), default=None)
        lines.append(
            f"| 1/{n} | " + " | ".join(cell(v, "memfit", m) for v, m in zip(mvals, ms, strict=True)) + " | "
            + " | ".join(cell(v, "kvpress", k) for v, k in zip(kvals, ks, strict=True))
            + f" | {fmt(bm)} | {fmt(bk)} | {fmt(full_m)} / {fmt(full_k)} |"
        )
    # Bytes are what count: at each ratio, memfit's best configuration among those holding no more bytes than
    # kvpress's presses hold at that ratio (any memfit row: a composition at 4x the tokens may hold 1/16 of the bytes)
    n_samples = {(r["method"], r["ratio"]) for r in rows if r["side"] == "memfit"}
    lines += [
        "",
        "## At equal bytes",
        "",
        "Cap = the largest mean KV bytes a kvpress press holds at that ratio (full/n when no kvpress row): every "
        "memfit configuration (of any row) holding at most the cap competes. n = samples per configuration.",
        "",
        "| ratio | cap (×) | best memfit at ≤ cap | best kvpress at the ratio | full | memfit / full |",
        "|---|---|---|---|---|---|",
    ]
    for n in args.ratios:
        kb = [b for k in ks if (b := mean_bytes("kvpress", k, n)) is not None]
        cap = max(kb) if kb else full_bytes / n
        cands = [(mean_score("memfit", m, r), m, r) for m, r in n_samples if r and (b := mean_bytes("memfit", m, r))
                 is not None and b <= cap]
        bm = max(cands, key=lambda c: (c[0], -(mean_bytes("memfit", c[1], c[2]) or 0)), default=None)
        kc = [(v, k) for k in ks if (v := mean_score("kvpress", k, n)) is not None]
        bk = max(kc, default=None)
        ref = full_k if full_k is not None else full_m

        def cnt(side: str, m: str, r: int) -> int:
            return sum(1 for x in rows if x["side"] == side and x["method"] == m and x["ratio"] == r)

        mtxt = "–" if bm is None else (f"{bm[0]:.2f} {bm[1]} @1/{bm[2]} "
                                        f"({full_bytes / mean_bytes('memfit', bm[1], bm[2]):.1f}×, n={cnt('memfit', bm[1], bm[2])})")
        ktxt = "–" if bk is None else f"{bk[0]:.2f} {bk[1]} ({full_bytes / mean_bytes('kvpress', bk[1], n):.1f}×, n={cnt('kvpress', bk[1], n)})"
        frac = "–" if bm is None or not ref else f"{bm[0] / ref:.2f}"
        lines.append(f"| 1/{n} | {full_bytes / cap:.1f}× | {mtxt} | {ktxt} | {fmt(ref)} | {frac} |")
    lines += [
        "",
        "(×) = the full cache's mean KV bytes over the configuration's mean bytes held after answering (both sides "
        "count the answer tokens). memfit's "
        "bytes include its per-token policy state (e.g. span ids, 2 bytes per token and KV head).",
        "Not measured here: the question *outside* the compressed context (compress a document once, then ask); "
        "that needs memfit's reusable contexts (issue #12 part 4).",
    ]
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", nargs=2, metavar=("PROMPTS", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ratios", type=lambda s: [int(x) for x in s.split(",")], default=[2, 4, 8, 16, 32])
    ap.add_argument("--methods", type=lambda s: s.split(";"), default=MEMFIT_METHODS,
                    help="memfit configurations separated by ';' (name, name+spans, name(k=v,...))")
    ap.add_argument("--presses", type=lambda s: s.split(","), default=KVPRESS_PRESSES)
    ap.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    ap.add_argument("--kvpress-python", default="/tmp/kvpress-venv/bin/python")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="benchmarks/vs_kvpress")
    ap.add_argument("--tmp", default="/tmp/memfit-vs-kvpress", help="where the prompts (book text) go: not committed")
    ap.add_argument("--skip-full", action="store_true",
                    help="no memfit full-cache run (the kvpress side's full cache is the same model on the same ids)")
    ap.add_argument("--only", choices=["both", "memfit", "kvpress"], default="both",
                    help="run one side only (rows of the other side already in --tmp are still reported)")
    ap.add_argument("--report-only", action="store_true",
                    help="write results.jsonl and report.md from the rows finished so far in --tmp")
    args = ap.parse_args()
    if args.worker:
        kvpress_worker(args.worker[0], args.worker[1], args.presses, args.ratios, args.device)
        return

    import torch
    import transformers

    from memfit.bench.tasks import generate_samples
    from memfit.engine import encode_prompts
    from memfit.models import HF_DIR_NAME, cache_dir, load_model

    torch.manual_seed(0)
    model, tok = load_model("default", device=args.device, dtype="float32")
    model_dir = cache_dir() / HF_DIR_NAME
    out, tmp = Path(args.out), Path(args.tmp)
    out.mkdir(parents=True, exist_ok=True)
    tmp.mkdir(parents=True, exist_ok=True)
    samples = []
    prompts_path = tmp / "prompts.json"
    if args.report_only:  # the prompts of the run being reported
        samples = json.loads(prompts_path.read_text())["samples"]
    for i, s in enumerate([] if args.report_only else generate_samples("niah_single_number", tok, args.context, args.samples, args.seed,
                                           filler="natural", corpus=args.corpus)):
        ids, _ = encode_prompts(tok, [s.prompt], chat=False)
        samples.append({"index": i, "ids": ids[0].tolist(), "answers": s.answers, "depth": s.depth})
    spec = json.dumps({"model_dir": str(model_dir), "samples": samples})
    kv_out = tmp / "kvpress_rows.jsonl"
    if not args.report_only and (not prompts_path.exists() or prompts_path.read_text() != spec):
        prompts_path.write_text(spec)
        kv_out.unlink(missing_ok=True)  # other prompts: the kvpress rows of an earlier run do not apply

    mf_out = tmp / "memfit_rows.jsonl"
    if not args.report_only:
        # kvpress in its own interpreter, in parallel with the memfit side (on CUDA, run them one after the other)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
        worker = None
        if args.only != "memfit":
            worker = subprocess.Popen([args.kvpress_python, __file__, "--worker", str(prompts_path), str(kv_out),
                                       "--presses", ",".join(args.presses), "--ratios",
                                       ",".join(map(str, args.ratios)), "--device", args.device], env=env)
            if args.device != "cpu":
                worker.wait()
        if args.only != "kvpress":
            run_memfit(model, tok, samples, args.methods, args.ratios, mf_out, args.device, full=not args.skip_full)
        if worker is not None and worker.wait() != 0:
            raise SystemExit(f"the kvpress worker failed (exit {worker.returncode})")
    from memfit.bench import metrics

    rows: list[dict] = [json.loads(line) for line in mf_out.read_text().splitlines()] if mf_out.exists() else []

    kv_versions: dict = {}
    by_index = {s["index"]: s for s in samples}
    for line in kv_out.read_text().splitlines() if kv_out.exists() else []:
        r = json.loads(line)
        kv_versions = r.pop("versions")
        s = by_index[r["sample"]]
        pred = tok.decode(r.pop("generated_ids"), skip_special_tokens=True)
        r.update(prediction=pred, answer=s["answers"],
                 score=metrics.score_prediction("niah_single_number", pred, s["answers"]))
        rows.append(r)
    with open(out / "results.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({**r, "context": args.context, "corpus": Path(args.corpus).name, "seed": args.seed})
                    + "\n")
    versions = {**kv_versions, "memfit_torch": torch.__version__, "memfit_tf": transformers.__version__}
    write_summary(rows, out / "summary.jsonl", args)
    print(report(rows, out, args, versions))


def write_summary(rows: list[dict], path: Path, args: argparse.Namespace) -> None:
    """One row per (side, configuration, ratio), computed from results.jsonl: n, mean score, mean bytes held, the
    compression against the full cache's mean bytes. `key` names the configuration without commas or brackets (the
    claims checker's selectors split on commas)."""
    import re

    fulls = [r["kv_bytes_full"] for r in rows if r["side"] == "memfit"]
    full_kv = [r["kv_bytes_held"] for r in rows if r["side"] == "kvpress" and r["method"] == "full"]
    full_bytes = sum(fulls) / len(fulls) if fulls else sum(full_kv) / max(len(full_kv), 1)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["side"], r["method"], r["ratio"]), []).append(r)
    with open(path, "w") as f:
        for (side, method, n), sel in groups.items():
            held = sum(r["kv_bytes_held"] for r in sel) / len(sel)
            mult = _memfit_config(method)[3] if side == "memfit" else 1
            f.write(json.dumps({
                "side": side, "method": method, "key": re.sub(r"[^A-Za-z0-9+]+", "_", method).strip("_"),
                "ratio": n, "tokens_fraction": None if n is None else min(1.0, mult / n), "n": len(sel),
                "score": sum(r["score"] for r in sel) / len(sel), "kv_bytes_held": held,
                "kv_bytes_full": full_bytes, "compression": full_bytes / held, "context": args.context,
                "seed": args.seed, "corpus": Path(args.corpus).name,
            }) + "\n")


if __name__ == "__main__":
    main()
