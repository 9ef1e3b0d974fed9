"""Memory, time and disk of writing a dummy spec's random-weight checkpoint (what `--load-format dummy --tp N` loads).

Two writers, each in a fresh process (so its peak resident set and CUDA peak are its own):
- `stream`: `memfit.dummy.dummy_checkpoint`, one tensor at a time from a meta-device model;
- `whole`: the previous writer, kept here for the comparison: `load_dummy` builds the whole model on the device,
  then `save_pretrained(max_shard_size="2GB")`.
With `--compare`, every tensor of the two folders is checked bit for bit (one shard in memory at a time).

    python benchmarks/tp/dummy_checkpoint_memory.py --spec smollm2-135m --device cpu --compare \
        --out benchmarks/results/dummy_checkpoint_memory_cpu.jsonl
    python benchmarks/tp/dummy_checkpoint_memory.py --spec llama-3.1-8b --device cuda --compare \
        --out benchmarks/results/dummy_checkpoint_memory_h200.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from memfit.bench.provenance import ResultWriter

CHILD = r"""
import json, os, resource, sys, time
from pathlib import Path
import torch
from memfit.dummy import dummy_checkpoint, load_dummy
mode, spec, dtype, device, out = sys.argv[1:6]
dtype, device = getattr(torch, dtype), torch.device(device)
t = time.perf_counter()
if mode == "stream":
    folder = dummy_checkpoint(spec, dtype, device)
else:
    model, _ = load_dummy(spec, dtype, device)
    folder = Path(out)
    model.save_pretrained(folder, max_shard_size="2GB")
    params = {n: p.numel() * p.element_size() for n, p in model.named_parameters()}
    del model
wall = time.perf_counter() - t
if device.type == "cuda":
    torch.cuda.synchronize()
files = sorted(p for p in Path(folder).iterdir() if p.suffix == ".safetensors")
print(json.dumps({
    "folder": str(folder), "wall_seconds": wall,
    "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    "cuda_peak_allocated_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    "files": [p.name for p in files], "disk_bytes": sum(p.stat().st_size for p in files),
}))
"""


def meta_sizes(spec: str, dtype: str) -> dict[str, int]:
    """Parameter bytes by name, from a meta-device build (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    from memfit.dummy import dummy_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(dummy_config(spec), dtype=getattr(torch, dtype))
    return {n: p.numel() * p.element_size() for n, p in model.named_parameters()}


def compare(a: Path, b: Path) -> dict[str, object]:
    """Bit-for-bit equality of every tensor in two safetensors folders (keys and values)."""
    import torch
    from safetensors import safe_open

    def where(folder: Path) -> dict[str, Path]:
        out: dict[str, Path] = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(f, "pt") as h:
                out.update({k: f for k in h.keys()})  # noqa: SIM118 (safe_open has no __iter__)
        return out

    wa, wb = where(a), where(b)
    differ = []
    for f in sorted(set(wa.values())):
        with safe_open(f, "pt") as h:
            for k in h.keys():  # noqa: SIM118
                if k not in wb:
                    continue
                with safe_open(wb[k], "pt") as g:
                    if not torch.equal(h.get_tensor(k), g.get_tensor(k)):
                        differ.append(k)
    return {"same_keys": set(wa) == set(wb), "keys": len(wa), "differing_tensors": differ}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", default="smollm2-135m")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--modes", default="stream,whole")
    ap.add_argument("--compare", action="store_true", help="check the two writers' tensors are bit-identical")
    ap.add_argument("--workdir", default=None, help="where the checkpoints go (deleted at the end)")
    ap.add_argument("--out", default="benchmarks/results/dummy_checkpoint_memory.jsonl")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="memfit-dummy-ckpt-", dir=args.workdir))
    sizes = meta_sizes(args.spec, args.dtype)
    folders: dict[str, Path] = {}
    try:
        with ResultWriter(args.out) as out:
            for mode in args.modes.split(","):
                env = dict(os.environ, MEMFIT_CACHE=str(work / "cache"))
                cmd = [sys.executable, "-c", CHILD, mode, args.spec, args.dtype, args.device, str(work / mode)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    out.write({"kind": "error", "mode": mode, "stderr": proc.stderr.strip().splitlines()[-5:]})
                    continue
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                folders[mode] = Path(row.pop("folder"))
                out.write({"kind": "write", "mode": mode, "spec": args.spec, "dtype": args.dtype,
                           "device": args.device, "model_bytes": sum(sizes.values()),
                           "largest_tensor_bytes": max(sizes.values()), **row})
            if args.compare and len(folders) == 2:
                out.write({"kind": "compare", "spec": args.spec, "dtype": args.dtype, "device": args.device,
                           **compare(*folders.values())})
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
