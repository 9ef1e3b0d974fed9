"""One kvpress row for `runtime_gpu.py`: prefill with a kvpress press, then greedy decode, timed like the
transformers row there (plain forwards over transformers' `DynamicCache`, which kvpress prunes in place).

kvpress 0.5.5 pins transformers < 5.3, so this runs in its own interpreter with kvpress and its transformers first
on `PYTHONPATH`; it does not import memfit. `runtime_gpu.py --kvpress-path DIR` starts it with the model's config
(JSON) and the prompt's token ids (a `torch.save` file) that the memfit rows use, and reads one JSON line back.
The weights are random, as on the memfit side: decode time does not depend on their values.

kvpress imports `datasets` at package import for two presses this row never builds (DuoAttention's and
ExpectedAttention's statistics download); when `datasets` is absent a placeholder module stands in, and building
either of those presses would fail loudly.

    PYTHONPATH=/tmp/kvp python benchmarks/kvpress_speed_row.py --config cfg.json --ids ids.pt --new 256 \
        --press SnapKVPress --ratio 0.75
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import sys
import time
import types

import torch


def _placeholder_datasets() -> None:
    if importlib.util.find_spec("datasets") is not None:
        return
    mod = types.ModuleType("datasets")

    def load_dataset(*_a, **_k):  # pragma: no cover - only a press this row never builds calls it
        raise RuntimeError("datasets is not installed in the kvpress environment of this benchmark")

    mod.load_dataset = load_dataset
    sys.modules["datasets"] = mod


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="the model's config.json")
    ap.add_argument("--ids", required=True, help="torch.save'd prompt token ids, shape (1, T)")
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--press", default="SnapKVPress")
    ap.add_argument("--ratio", type=float, default=0.75, help="kvpress compression_ratio (fraction removed)")
    ap.add_argument("--device", default="cuda", help="cpu only to check the script itself (no memory figures)")
    args = ap.parse_args()

    _placeholder_datasets()
    import kvpress
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

    device = torch.device(args.device)
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    config = AutoConfig.from_pretrained(args.config)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    ids = torch.load(args.ids).to(device)
    press = getattr(kvpress, args.press)(compression_ratio=args.ratio)
    resident = torch.cuda.memory_allocated(device) if cuda else 0

    def one_run() -> dict:
        cache = DynamicCache(config=model.config)
        t0 = time.perf_counter()
        with press(model):
            logits = model(input_ids=ids, past_key_values=cache, logits_to_keep=1).logits[:, -1]
        sync()
        prefill = time.perf_counter() - t0
        pos = torch.tensor([[ids.shape[1]]], device=device)
        t1 = time.perf_counter()
        for _ in range(args.new - 1):
            tok = logits.argmax(-1, keepdim=True)
            logits = model(input_ids=tok, position_ids=pos, past_key_values=cache, logits_to_keep=1).logits[:, -1]
            pos = pos + 1
        sync()
        decode = time.perf_counter() - t1
        kv = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
        return {"prefill_seconds": prefill, "decode_ms_per_token": 1000 * decode / (args.new - 1), "kv_bytes_held": kv}

    one_run()  # warm-up (kernel selection, allocator): the memfit rows are warmed up the same way
    if cuda:
        sync()
        torch.cuda.reset_peak_memory_stats(device)
    row = one_run()
    peak = torch.cuda.max_memory_allocated(device) if cuda else 0
    print(json.dumps({"kind": "kvpress", "method": f"{args.press}(compression_ratio={args.ratio})",
                      "context": int(ids.shape[1]), "new_tokens": args.new, **row, "peak_memory_bytes": peak,
                      "peak_above_resident_bytes": peak - resident,
                      "kvpress_version": importlib.metadata.version("kvpress"),
                      "transformers_version": transformers.__version__}))


if __name__ == "__main__":
    main()
