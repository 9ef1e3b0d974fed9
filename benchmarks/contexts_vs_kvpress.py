"""Question *outside* the compressed context, memfit's KVzip beside kvpress's KVzipPress on the same token ids.

Issue #12 target: compress a document once (no question in it), then ask; at 1/4 of the KV bytes the full cache's
score, at 1/8 at least 90 % of it, compression time at most 3x a plain prefill.

What it does
- Generates needle documents (`niah_single_number`: a 7-digit "special magic number" in natural prose from a PG-19
  book, `--corpus`) with memfit's bench generator; the question stays out of the document. The document is framed
  by the chat template's opening of a user turn (`memfit.contexts.encode_document`), the question closes the turn
  (`CompressedContext.encode_questions`): both sides get exactly these ids.
- memfit side (this interpreter): `compress_ids` with the full cache (its time is the plain prefill) and with
  `--memfit-methods` (default `kvzip`; `kvzip@adakv` = per-head budgets on the ragged store) at budget 1/n; then the
  question is prefilled on top of the context and 32 tokens are decoded greedily (the model first repeats the
  question's answer stem). Bytes: the context's `nbytes()` (real, evicted pairs are freed).
- kvpress side (its own virtual environment and pinned transformers, `--kvpress-python`): a plain prefill, then for
  each ratio `KVzipPress(compression_ratio=1-1/n)` around the document's prefill (kvpress compresses by masking:
  its "kept" fraction is the share of unmasked pairs, not bytes), then the question and greedy decoding with
  positions continuing the document, as kvpress's pipeline does.
- Both sides time compression in the same process as their own plain prefill (`compress_over_prefill`), and
  record which (layer, KV head, position) pairs they keep; the report gives the overlap of the two kept sets at
  each ratio, and how much of the needle's value tokens each keeps.
- Writes `<out>.jsonl` (one row per side x method x ratio x sample; kept sets are summarised, the book text and the
  kept indices stay in `--tmp`) and `<out>_summary.md`.

    python benchmarks/contexts_vs_kvpress.py --out benchmarks/results/contexts_vs_kvpress_cpu \
        --corpus ../shared/data/pg19/1684.txt --length 1024 --samples 8 --ratios 4,8,2 --memfit-methods "kvzip@adakv"

Resumable: rows already in --tmp are skipped on a re-run of the same prompts. On a slow machine run the sides and
halves of the samples as parallel processes (`--sides kvpress --shard 0/2`, `--sides memfit --shard 1/2`, ...; one
of them with `--skip-full` per extra memfit method list) and write the report with `--report-only`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ANSWER_TOKENS = 32  # the model repeats the question's answer stem (~12 tokens) before the 7 digits
DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "pg19" / "1684.txt"


# ----------------------------------------------------------------------------------------------- kvpress worker
def kvpress_worker(prompts_path: str, out_path: str, ratios: list[int], device: str, shard: str = "0/1") -> None:
    """Runs inside the kvpress venv: no memfit import here."""
    import kvpress
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, DynamicCache

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    spec = json.loads(Path(prompts_path).read_text())
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32).to(device).eval()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    from importlib.metadata import version

    versions = {"kvpress": version("kvpress"), "transformers": transformers.__version__, "torch": torch.__version__}
    done = set()
    if Path(out_path).exists():
        for line in Path(out_path).read_text().splitlines():
            r = json.loads(line)
            done.add((r["method"], r["ratio"], r["sample"]))

    def answer(cache: DynamicCache, doc_len: int, qids: list[int]) -> list[int]:
        q = torch.tensor([qids], device=device)
        pos = torch.arange(doc_len, doc_len + len(qids), device=device)[None]
        logits = model(input_ids=q, past_key_values=cache, position_ids=pos, logits_to_keep=1).logits
        out: list[int] = []
        nxt = int(logits[0, -1].argmax())
        for i in range(ANSWER_TOKENS):
            if nxt in eos:
                break
            out.append(nxt)
            if i == ANSWER_TOKENS - 1:
                break
            p = torch.tensor([[doc_len + len(qids) + i]], device=device)
            logits = model(input_ids=torch.tensor([[nxt]], device=device), past_key_values=cache,
                           position_ids=p).logits
            nxt = int(logits[0, -1].argmax())
        return out

    with open(out_path, "a") as out, torch.no_grad():
        part, parts = (int(x) for x in shard.split("/"))
        for s in spec["samples"]:
            if s["index"] % parts != part:
                continue
            ids = torch.tensor([s["doc_ids"]], device=device)
            t_len = ids.shape[1]
            plain = None
            for n in [None, *ratios]:
                name = "full" if n is None else "KVzipPress"
                if n is not None and (name, n, s["index"]) in done:
                    continue  # resumed: the plain prefill above is re-timed, finished rows are not re-run
                for layer in model.model.layers:  # no mask left over from the previous configuration
                    layer.self_attn.masked_key_indices = None
                cache = DynamicCache()
                t0 = time.perf_counter()
                if n is None:
                    model.model(input_ids=ids, past_key_values=cache)
                else:
                    with kvpress.KVzipPress(compression_ratio=1.0 - 1.0 / n)(model):
                        model.model(input_ids=ids, past_key_values=cache)
                seconds = time.perf_counter() - t0
                if n is None:
                    plain = seconds
                if (name, n, s["index"]) in done:
                    continue
                kept = None
                n_layers, n_heads = len(model.model.layers), model.config.num_key_value_heads
                if n is not None:  # kept = every (layer, head, position) not masked
                    kept = []
                    for layer in model.model.layers:
                        mask = torch.ones(n_heads, t_len, dtype=torch.bool)
                        idx = layer.self_attn.masked_key_indices
                        if idx is not None:
                            mask[idx[1].cpu(), idx[2].cpu()] = False
                        kept.append([torch.nonzero(mask[h]).flatten().tolist() for h in range(n_heads)])
                generated = answer(cache, t_len, s["question_ids"])
                total = n_layers * n_heads * t_len
                row = {"side": "kvpress", "method": name, "ratio": n, "sample": s["index"],
                       "generated_ids": generated, "document_tokens": t_len,
                       "kept_fraction": 1.0 if kept is None else sum(len(h) for lay in kept for h in lay) / total,
                       "kept": kept, "compress_seconds": seconds, "prefill_seconds": plain,
                       "compress_over_prefill": seconds / plain, "versions": versions}
                out.write(json.dumps(row) + "\n")
                out.flush()
                print(f"kvpress {name} 1/{n} sample {s['index']}: x{seconds / plain:.2f}", file=sys.stderr,
                      flush=True)


# ----------------------------------------------------------------------------------------------- memfit side
def kept_positions(ctx, full_ctx) -> list[list[list[int]]]:  # noqa: ANN001
    """(layer, KV head) -> the document positions a dense context holds, found by matching its keys to the full
    cache's (post-RoPE keys differ at every position, so a match is exact)."""
    import torch

    out = []
    for layer, ref in zip(ctx.cache().core.layers, full_ctx.cache().core.layers, strict=True):
        valid = layer.valid_mask()[0]
        heads = []
        for h in range(layer.keys.shape[1]):
            held = layer.keys[0, h][valid[h]].float()
            full = ref.keys[0, h].float()
            dist = torch.cdist(held, full, compute_mode="donot_use_mm_for_euclid_dist")
            pos = dist.argmin(-1)
            assert bool((dist.gather(1, pos[:, None]) < 1e-4).all()), "a held key matches no full-cache key"
            heads.append(sorted(pos.tolist()))
        out.append(heads)
    return out


def run_memfit(model, tok, spec: dict, methods: list[str], ratios: list[int], out_path: Path,  # noqa: ANN001
               with_full: bool = True, tmp: Path | None = None) -> None:
    """Each method spec is `name[@allocation][(key=value,...)][:n,n,...]`, e.g. `kvzip@adakv` (per-head budgets,
    ragged store) or `kvzip+kivi(kivi.bits=4):2,4` (KVzip keeps 1/2 and 1/4 of the tokens, KIVI stores them in 4
    bits; `:1` keeps every token, e.g. `kivi(bits=4):1`). Without `:...` a method runs at every `--ratios`.
    `spans=on|off|auto` among the parameters sets memfit.core.spans (default auto: on for an eviction with a budget).

    Outside mode as a user runs it (`memfit compress -o F`, then `memfit run --kv F`): each compressed context is
    saved to a file in `tmp` and loaded back, and the question is answered from the loaded context; the bytes
    reported are the loaded context's counted `nbytes()` (checked equal to the bytes held right after compression)."""
    import torch

    from memfit.contexts import CompressedContext, compress_ids
    from memfit.engine import generate

    eos = model.generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    done = set()
    if out_path.exists():
        done = {(r["method"], r["ratio"], r["sample"]) for r in map(json.loads, out_path.read_text().splitlines())}
    runs = [(m, n) for m in methods for n in (_method_ratios(m) or ratios)]
    ctx_file = (tmp or out_path.parent) / f"context-{os.getpid()}.mfkv"  # one per process (shards run at once)
    for s in spec["samples"]:
        full = compress_ids(model, tok, s["doc_ids"], "full", None, chat=True)
        plain = full.info["compress_seconds"]
        elem = full.cache().core.layers[0].keys.element_size()  # the model's KV dtype (fp32 on CPU)
        for method, n in [("full", None)] * with_full + runs:
            if (method, n, s["index"]) in done:
                continue
            name, _, allocation = method.split("(")[0].split(":")[0].partition("@")
            budget = None if n in (None, 1) else 1.0 / n
            params = _params(method) or {}
            spans = params.pop("spans", "auto")  # not a method parameter: memfit.core.spans on / off / auto
            ctx = full if n is None else compress_ids(model, tok, s["doc_ids"], name, budget, params or None,
                                                      allocation or "uniform", chat=True, spans=spans)
            held = ctx.info["kv_bytes_held"]
            file_bytes = None
            if n is not None:  # through a file, as `memfit compress -o` / `memfit run --kv` do
                ctx.save(ctx_file)
                file_bytes = ctx_file.stat().st_size
                loaded = CompressedContext.load(ctx_file, model, tok)
                assert loaded.nbytes() == held, (loaded.nbytes(), held)
            else:
                loaded = ctx
            q = torch.tensor([s["question_ids"]])
            gen = generate(model, q, torch.ones_like(q), loaded.cache(), ANSWER_TOKENS, eos)
            # kept positions are read from dense keys; a quantized store holds codes (its pairs are KVzip's choice
            # at the same ratio, so the plain kvzip row at that ratio has them)
            kept = None if n is None or "+" in name or name == "kivi" else kept_positions(ctx, full)
            full_bytes = ctx.info["kv_bytes_full"]
            row = {"side": "memfit", "method": method, "ratio": n, "sample": s["index"],
                   "generated_ids": gen.tokens[0], "document_tokens": len(s["doc_ids"]),
                   "kv_bytes_full": full_bytes, "kv_bytes_held": held, "context_file_bytes": file_bytes,
                   "kept_fraction": held / full_bytes, "kept_known": n is None or kept is not None,
                   "kv_element_bytes": elem, "spans": ctx.info.get("spans", False),
                   # the same held bytes over a 16-bit full cache: an upper bound of the ratio a 16-bit model
                   # would get (its quantization scales and codes are the same, its residual tokens half as big)
                   "bytes_vs_16bit_full": held / (full_bytes * 2 / elem), "kept": kept,
                   "compress_seconds": ctx.info["compress_seconds"], "prefill_seconds": plain,
                   "compress_over_prefill": ctx.info["compress_seconds"] / plain}
            with out_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"memfit {method} 1/{n} sample {s['index']}: x{row['compress_over_prefill']:.2f} bytes "
                  f"{row['kept_fraction']:.3f}", file=sys.stderr, flush=True)


def _params(method: str) -> dict[str, str] | None:
    """'kvzip@adakv(chunk=512)' -> {'chunk': '512'}."""
    if "(" not in method:
        return None
    inner = method.split("(", 1)[1].split(")")[0]
    return dict(kv.split("=", 1) for kv in inner.split(","))


def _without_ratios(method: str) -> str:
    """'kvzip+kivi(kivi.bits=4):2,4' -> 'kvzip+kivi(kivi.bits=4)' (the report's method name; the ratio is a column)."""
    head, close, tail = method.rpartition(")")
    return head + close + tail.split(":", 1)[0] if close else method.split(":", 1)[0]


def _method_ratios(method: str) -> list[int] | None:
    """'kvzip+kivi(kivi.bits=4):2,4' -> [2, 4]; None when the spec names no ratios."""
    tail = method.rsplit(")", 1)[-1]
    if ":" not in tail:
        return None
    return [int(x) for x in tail.split(":", 1)[1].split(",")]


# ----------------------------------------------------------------------------------------------- report
def _overlap(a: list, b: list) -> tuple[int, int]:
    inter = total = 0
    for la, lb in zip(a, b, strict=True):
        for ha, hb in zip(la, lb, strict=True):
            inter += len(set(ha) & set(hb))
            total += len(hb)
    return inter, total


def _coverage(kept: list | None, span: list[int], known: bool = True) -> float | None:
    """Share of (layer, head, needle-value token) triples kept (None: not read, a quantized store)."""
    if not known:
        return None
    if kept is None:
        return 1.0
    want = set(span)
    hits = sum(len(want & set(h)) for layer in kept for h in layer)
    return hits / (len(want) * sum(len(layer) for layer in kept))


def summarize(rows: list[dict], spec: dict, out: Path, command: str) -> str:
    from collections import defaultdict

    by_key = {(r["side"], r["method"], r["ratio"], r["sample"]): r for r in rows}
    spans = {s["index"]: s["value_positions"] for s in spec["samples"]}
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["side"], r["method"], r["ratio"])].append(r)
    lines = [
        "# Question outside the compressed context: memfit vs kvpress KVzip (same token ids)",
        "",
        f"Model: SmolLM2-135M-Instruct (memfit's safetensors copy), fp32, {spec['device']}. Documents: "
        f"{len(spec['samples'])} x niah_single_number (7-digit value) in natural prose from PG-19 "
        f"{Path(spec['corpus']).name}, ~{spec['length']} tokens, seed {spec['seed']}, chat template framing, "
        f"question outside, {ANSWER_TOKENS} answer tokens, greedy. Machine: shared 2-core CPU box (loaded).",
        f"Command: `python benchmarks/contexts_vs_kvpress.py {command}`",
        "",
        "| side | method | tokens kept | n | score | n both sides | score on them | kept (bytes or pairs) "
        "| bytes / 16-bit full | needle value kept | overlap with kvpress KVzip | compress / prefill |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    summary = []
    for (side, method, n), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or 0)):
        score = sum(r["score"] for r in rs) / len(rs)
        kept = sum(r["kept_fraction"] for r in rs) / len(rs)
        covs = [_coverage(r["kept"], spans[r["sample"]], r.get("kept_known", True)) for r in rs]
        cov = None if None in covs else sum(covs) / len(covs)
        bytes16 = [r["bytes_vs_16bit_full"] for r in rs if r.get("bytes_vs_16bit_full") is not None]
        inter = total = 0
        if side == "memfit" and n is not None:
            for r in rs:
                other = by_key.get(("kvpress", "KVzipPress", n, r["sample"]))
                if other is not None and r["kept"] is not None:
                    i, t = _overlap(r["kept"], other["kept"])
                    inter, total = inter + i, total + t
        ratio = sum(r["compress_over_prefill"] for r in rs) / len(rs)
        # the same documents on both sides: samples that both memfit and kvpress finished at this ratio
        sides = {sd for sd, _, rn, _ in by_key if rn == n}
        shared = [r for r in rs if all(any(k[0] == sd and k[2] == n and k[3] == r["sample"] for k in by_key)
                                       for sd in sides)]
        row = {"side": side, "method": method, "ratio": n, "n": len(rs), "score": score, "kept_fraction": kept,
               "needle_value_kept": cov, "overlap_with_kvpress": inter / total if total else None,
               "bytes_vs_16bit_full": sum(bytes16) / len(bytes16) if len(bytes16) == len(rs) else None,
               "compress_over_prefill": ratio, "n_shared": len(shared),
               "score_shared": sum(r["score"] for r in shared) / len(shared) if shared else None}
        summary.append(row)
        both = "–" if row["score_shared"] is None else f"{row['score_shared']:.2f}"
        b16 = "–" if row["bytes_vs_16bit_full"] is None else f"{row['bytes_vs_16bit_full']:.3f}"
        lines.append(f"| {side} | {method} | {'1/' + str(n) if n else 'all'} | {len(rs)} | {score:.2f} | "
                     f"{len(shared)} | {both} | {kept:.3f} | "
                     f"{b16} | "
                     f"{'–' if cov is None else f'{cov:.2f}'} | {'–' if not total else f'{inter / total:.2f}'} | "
                     f"{ratio:.2f} |")
    lines += ["", "kept: memfit = KV bytes held / full (real); kvpress = unmasked pairs / all (kvpress masks, it "
              "frees nothing). needle value kept: share of (layer, KV head, value token) pairs kept. overlap: of the "
              "pairs kvpress keeps, the share memfit keeps too. compress / prefill: compression time over the same "
              "side's plain prefill of the same document, in one process."]
    text = "\n".join(lines) + "\n"
    out.with_name(out.name + "_summary.md").write_text(text)
    out.with_name(out.name + "_summary.json").write_text(json.dumps({"rows": summary}, indent=1) + "\n")
    return text


# ----------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", nargs=2, metavar=("PROMPTS", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/contexts_vs_kvpress_cpu"),
                    help="output stem: <out>.jsonl, <out>_summary.md, <out>_summary.json")
    ap.add_argument("--length", type=int, default=1536)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ratios", type=lambda s: [int(x) for x in s.split(",")], default=[2, 4, 8])
    ap.add_argument("--memfit-methods", type=lambda s: s.split(";"), default=["kvzip"])
    ap.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    ap.add_argument("--kvpress-python", default="/tmp/kvpress-venv/bin/python")
    ap.add_argument("--sides", default="kvpress,memfit", help="which sides to run (rows already written are kept)")
    ap.add_argument("--skip-full", action="store_true", help="no memfit full-cache row (another process writes it)")
    ap.add_argument("--shard", default="0/1", help="i/n: run only the samples whose index is i modulo n (parallel "
                    "processes append to the same rows; the report reads them all)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tmp", type=Path, default=Path("/tmp/memfit-contexts-vs-kvpress"),
                    help="prompts (book text) and raw rows with kept indices: not committed")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    if args.worker:
        kvpress_worker(args.worker[0], args.worker[1], args.ratios, args.device, args.shard)
        return

    import torch

    from memfit.bench import metrics
    from memfit.bench.tasks import generate_samples
    from memfit.contexts import _chat_parts, encode_document
    from memfit.models import HF_DIR_NAME, cache_dir, load_model

    torch.set_grad_enabled(False)
    model, tok = load_model("default", device=args.device, dtype="float32")
    args.tmp.mkdir(parents=True, exist_ok=True)
    prompts_path = args.tmp / "prompts.json"
    samples = []
    before, after = _chat_parts(tok)
    for i, s in enumerate(generate_samples("niah_single_number", tok, args.length, args.samples, args.seed,
                                           filler="natural", corpus=args.corpus)):
        doc_ids = encode_document(tok, s.context, chat=True)
        text = before + s.context.strip()
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        assert list(enc["input_ids"]) == doc_ids
        at = text.rindex(s.answers[0])  # the needle's value: which document tokens spell it
        value_positions = [j for j, (a, b) in enumerate(enc["offset_mapping"]) if a < at + len(s.answers[0]) and b > at]
        qids = list(tok(f"\n\n{s.question.strip()}{after}", add_special_tokens=False)["input_ids"])
        samples.append({"index": i, "doc_ids": doc_ids, "question_ids": qids, "answers": s.answers,
                        "depth": s.depth, "value_positions": value_positions})
    spec = {"model_dir": str(cache_dir() / HF_DIR_NAME), "samples": samples, "corpus": args.corpus,
            "length": args.length, "seed": args.seed, "device": args.device}
    kv_out, mf_out = args.tmp / "kvpress_rows.jsonl", args.tmp / "memfit_rows.jsonl"
    if not prompts_path.exists() or json.loads(prompts_path.read_text()) != spec:
        prompts_path.write_text(json.dumps(spec))
        kv_out.unlink(missing_ok=True)
        mf_out.unlink(missing_ok=True)
    shard, shards = (int(x) for x in args.shard.split("/"))
    run_spec = {**spec, "samples": [s for s in samples if s["index"] % shards == shard]}
    if not args.report_only:
        worker = None
        if "kvpress" in args.sides:  # one after the other: both sides time their own prefill on a shared box
            env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            worker = subprocess.run([args.kvpress_python, __file__, "--worker", str(prompts_path), str(kv_out),
                                     "--ratios", ",".join(map(str, args.ratios)), "--device", args.device,
                                     "--shard", args.shard], env=env)
            if worker.returncode != 0:
                raise SystemExit(f"the kvpress worker failed (exit {worker.returncode})")
        if "memfit" in args.sides:
            run_memfit(model, tok, run_spec, args.memfit_methods, args.ratios, mf_out, not args.skip_full, args.tmp)
    rows = []
    by_index = {s["index"]: s for s in samples}
    for path in (mf_out, kv_out):
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            r = json.loads(line)
            r["method"] = _without_ratios(r["method"])
            s = by_index[r["sample"]]
            pred = tok.decode(r["generated_ids"], skip_special_tokens=True)
            r.update(prediction=pred, answers=s["answers"], depth=s["depth"],
                     score=metrics.score_prediction("niah_single_number", pred, s["answers"]))
            rows.append(r)
    command = " ".join(a for a in sys.argv[1:] if a != "--report-only")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(summarize(rows, spec, args.out, command))
    with args.out.with_name(args.out.name + ".jsonl").open("w") as f:
        for r in rows:  # the kept indices stay in --tmp (large); the summary has their overlap and coverage
            r = {k: v for k, v in r.items() if k not in ("kept", "generated_ids")}
            f.write(json.dumps({**r, "length": args.length, "corpus": Path(args.corpus).name, "seed": args.seed,
                                "model": "SmolLM2-135M-Instruct fp32", "device": args.device}) + "\n")


if __name__ == "__main__":
    main()
