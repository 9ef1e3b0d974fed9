"""Fingerprint every method's behaviour, to check that a refactor changes nothing: for every registered method (and
allocations, compositions, chunked prefill, the bare-forward fallbacks, the fast backend's CPU form, batch 1 and 2)
on the tiny random Llama / Qwen2 / Gemma-3 models of the tests, a hash of everything each layer's store holds, the
bytes, the greedy tokens and the first logits; `--default`: the default model on one prose prompt (spans, adakv,
pyramid). Hashes are bit-exact, so compare two runs of the same torch build on the same machine.

    python benchmarks/method_fingerprint.py before.json [--default]     # on the old code
    python benchmarks/method_fingerprint.py after.json [--default]      # on the new code
    python benchmarks/method_fingerprint.py --compare before.json after.json

Used for the one-way method contract (issue #10 item 3): 258 tiny configs + 26 default-model configs identical.
To fingerprint another checkout, run with PYTHONPATH=<that checkout> (its tests/ folder is used for the models).
"""

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

import memfit as _memfit

sys.path.insert(0, str(Path(_memfit.__file__).resolve().parents[1] / "tests"))  # the tests' tiny models
os.environ["MEMFIT_FAST_ON_CPU"] = "1"
torch.set_num_threads(1)

from conftest import tiny_gemma3, tiny_llama, tiny_qwen  # noqa: E402

from memfit.adapters.transformers import forward  # noqa: E402
from memfit.api import make_cache  # noqa: E402
from memfit.core.method import all_methods  # noqa: E402
from memfit.engine import generate, pad_left, positions_from_mask  # noqa: E402


def h(obj, acc):
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        acc.update(f"{tuple(t.shape)}{t.dtype}".encode())
        acc.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            acc.update(str(k).encode())
            h(obj[k], acc)
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            h(x, acc)
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("memfit"):
        acc.update(type(obj).__name__.encode())
        h(vars(obj), acc)
    else:
        acc.update(repr(obj).encode())


def digest(obj):
    acc = hashlib.sha256()
    h(obj, acc)
    return acc.hexdigest()[:16]


def record(cache, gen=None, logits=None):
    core = cache.core
    out = {
        "layers": [digest(layer.state_dict()) for layer in core.layers],
        "held": core.held_tokens(),
        "nbytes": core.nbytes(),
        "full": core.full_nbytes(),
    }
    if gen is not None:
        out["tokens"] = gen.tokens
        out["logits"] = digest(gen.first_logits)
    if logits is not None:
        out["logits"] = digest(logits)
    return out


def run(model, spec, budget, params=None, allocation="uniform", backend="portable", batch=2, chunk=None,
        bare=False, ids=None, tok=None, spans=False, steps=6):
    tiny = ids is None
    if ids is None:
        g = torch.Generator().manual_seed(1)
        rows = [torch.randint(3, 120, (n,), generator=g).tolist() for n in (40, 33)[:batch]]
        ids, mask = pad_left(rows)
    else:
        ids, mask = ids
    params = dict(params or {})
    qp = {"kivi": {"group_size": 16, "residual": 32}, "gear": {"group_size": 16, "gap": 16},
          "vidkv": {"group_size": 8, "residual": 16, "stp_window": 8}}
    if tiny:  # tiny models: head dim 16
        for part in spec.split("+"):
            for k, v in qp.get(part, {}).items():
                params[f"{part}.{k}" if "+" in spec else k] = v
    cache = make_cache(model, spec, budget, params, allocation=allocation, backend=backend, reserve=steps)
    if tok is not None and hasattr(cache.core.method, "bind_tokenizer"):
        cache.core.method.bind_tokenizer(tok)
    if spans:
        from memfit.core.spans import enable_spans

        enable_spans(cache, tok)
    if bare:  # a plain forward, no engine hooks (the methods' single-pass fallbacks)
        with torch.no_grad():
            logits = forward(model, ids, mask, cache, positions_from_mask(mask), logits_to_keep=1)
        return record(cache, logits=logits)
    gen = generate(model, ids, mask, cache, max_new_tokens=steps, prefill_chunk=chunk)
    return record(cache, gen)


def compare(a_path: str, b_path: str) -> int:
    a, b = json.load(open(a_path)), json.load(open(b_path))
    bad = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    for k in bad:
        print("DIFF", k, json.dumps(a.get(k))[:200], json.dumps(b.get(k))[:200])
    print(f"{len(a)} vs {len(b)} configurations, {len(bad)} differ")
    return 1 if bad else 0


def main():
    if sys.argv[1] == "--compare":
        raise SystemExit(compare(sys.argv[2], sys.argv[3]))
    out_path = sys.argv[1]
    results = {}
    methods = all_methods()
    quant = sorted(n for n, c in methods.items() if c.family == "quantization")
    evict = sorted(n for n, c in methods.items() if c.family not in ("quantization", "reference"))

    def go(name, *args, **kwargs):
        try:
            results[name] = run(*args, **kwargs)
        except Exception as e:  # an error is part of the fingerprint too
            results[name] = {"error": f"{type(e).__name__}: {e}"}
        print(name, json.dumps(results[name])[:120], flush=True)

    if "--default" not in sys.argv:
        for mname, make in (("llama", tiny_llama), ("qwen2", tiny_qwen), ("gemma3", tiny_gemma3)):
            model = make()
            for spec in ["full", *quant]:
                go(f"{mname}/{spec}", model, spec, None)
            for spec in evict:
                go(f"{mname}/{spec}", model, spec, 0.4)
                go(f"{mname}/{spec}/tokens12", model, spec, 12)
                if mname != "gemma3":
                    for alloc in ("pyramid", "adakv", "pyramid+adakv"):
                        go(f"{mname}/{spec}/{alloc}", model, spec, 0.4, allocation=alloc)
                go(f"{mname}/{spec}/chunk16", model, spec, 0.4, chunk=16)
                go(f"{mname}/{spec}/bare", model, spec, 0.4, bare=True)
                go(f"{mname}/{spec}/fast", model, spec, 0.4, backend="fast")
                go(f"{mname}/{spec}/batch1", model, spec, 0.5, batch=1)
            for comp in ("snapkv+kivi", "h2o+gear", "tova+vidkv", "streaming+kivi", "scissorhands+kivi"):
                go(f"{mname}/{comp}", model, comp, 0.4)
            go(f"{mname}/snapkv/fast-full", model, "full", None, backend="fast")
            go(f"{mname}/h2o/fast12", model, "h2o", 12, backend="fast", batch=1, steps=10)
            go(f"{mname}/windowkv/decay", model, "windowkv", 0.4, {"layer_budgets": "decay",
                                                                               "shared_layers": 2})
            go(f"{mname}/tova/kv", model, "tova", 0.4, {"heads": "kv"})
            go(f"{mname}/scissorhands/released", model, "scissorhands", 0.4, {"mode": "released"})
    else:
        from memfit.engine import encode_prompts
        from memfit.models import load_model

        model, tok = load_model("default")
        text = ("The old lighthouse keeper climbed the spiral stairs every evening, counting one hundred and twelve "
                "steps, to light the lamp that guided fishing boats home. One night a storm arrived early. "
                "The secret code for the supply shed is 48213. He remembered his daughter, who had sailed to the "
                "far harbour years ago, and wondered whether she still watched the sea. ") * 2
        text += "What is the secret code for the supply shed?"
        ids = encode_prompts(tok, [text])
        for spec in ["full", *quant]:
            go(f"default/{spec}", model, spec, None, ids=ids, tok=tok)
        for spec in evict:
            go(f"default/{spec}", model, spec, 0.3, ids=ids, tok=tok)
        for spec in ("snapkv", "h2o", "tova"):
            go(f"default/{spec}/adakv", model, spec, 0.3, ids=ids, tok=tok, allocation="adakv")
            go(f"default/{spec}/pyramid", model, spec, 0.3, ids=ids, tok=tok, allocation="pyramid")
            go(f"default/{spec}/spans", model, spec, 0.3, ids=ids, tok=tok, spans=True)
            go(f"default/{spec}/spans-adakv", model, spec, 0.3, ids=ids, tok=tok, spans=True,
                                                         allocation="adakv")
        go("default/snapkv+kivi", model, "snapkv+kivi", 0.3, ids=ids, tok=tok)
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
