"""Sweep the KIVI decode-attention kernel's tile variants at the shapes the product runs (issue #10's max batch).

At large batch one program streams a whole (row, KV head), so the kernel's speed there depends on how many bytes
each SM keeps in flight (registers held per program, tiles per iteration, pipeline stages) more than at batch 1.
This times every variant of `memfit.kernels.kivi_attention` (the product's kernel, `packed=` argument) replayed
from a CUDA graph, checks each against the plain-PyTorch reference on a small case first, and reports GB/s of
cache read and the fraction of the measured copy bandwidth. Llama-3.1-8B attention shapes (32 query heads, 8 KV
heads, head dim 128), KIVI group 32, a 128-token full-precision residual.

    python benchmarks/kivi_kernel_sweep.py --out benchmarks/results/kivi_kernel_sweep_h200.jsonl

With --print-best the last stdout line is the variant ("path,warps,groups,stages") fastest at the largest batch
(both bit widths summed), for `MEMFIT_KIVI_VARIANT=...` A/B runs of the product path.
"""

from __future__ import annotations

import argparse
import functools
import sys

import torch
from runtime_gpu import copy_bandwidth  # the same measure as the product-path tables

from memfit.bench.provenance import ResultWriter
from memfit.core import planes as KP
from memfit.kernels import kivi_attention as KA
from memfit.kernels import reference as REF

HQ, HKV, D, GROUP, RESIDUAL = 32, 8, 128, 32, 128

# (path, num_warps, scale groups per tile, pipeline stages); names for the ones `VARIANTS` has
SWEEP = [
    (1, 4, 2, 1),  # "packed", the default
    (3, 4),  # "packed32"
    (2, 4),  # "fold"
    (1, 8, 2, 1),
    (4, 4, 2, 1),
    (4, 4, 2, 3),  # "pipe"
    (0, 4, 2, 1),  # "gather"
    (0, 8, 2, 1),
    (0, 4, 4, 1),
    (0, 8, 4, 1),
    (7, 4, 2, 1),  # "half" (fp16 tiles)
    (8, 4, 2, 3),  # "halfpipe"
]


def replay_us(fn, reps: int = 10) -> float:
    """Median microseconds per call of `fn`, captured `reps` times in one CUDA graph."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps)
    return sorted(times)[2]


def instruction_mix(spec: tuple[int, ...], bits: int, args: tuple) -> dict:
    """Registers and spills per thread of the split kernel compiled for this variant (what bounds how many programs
    share an SM). The instructions themselves: `kivi_kernel_sass.py`, which compiles and disassembles offline (the
    disassembly came back empty on the H200 machine)."""
    from memfit.kernels import _decode_kernels as K

    seen: dict = {}
    run = K._split_kernel.run

    def keep(*a, **kw):
        seen["k"] = run(*a, **kw)
        return seen["k"]

    K._split_kernel.run = keep
    try:
        KA.kivi_decode_attention(*args, bits=bits, group_size=GROUP, scale=D**-0.5, packed=spec)
    finally:
        K._split_kernel.run = run
    k = seen["k"]
    return {"n_regs": getattr(k, "n_regs", None), "n_spills": getattr(k, "n_spills", None)}


def case(batch: int, tokens: int, bits: int, device: torch.device, seed: int = 0):
    """Random packed codes with plausible scales (the kernel's speed does not depend on the values)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    cpb = 8 // bits
    u8 = dict(dtype=torch.uint8, device=device, generator=gen)
    h = dict(dtype=torch.float16, device=device, generator=gen)
    q = torch.randn(batch, HQ, D, dtype=torch.bfloat16, device=device, generator=gen)
    kc = torch.randint(0, 256, (batch, HKV, tokens // cpb, D), **u8)
    vc = torch.randint(0, 256, (batch, HKV, tokens, D // cpb), **u8)
    ks = torch.rand(batch, HKV, tokens // GROUP, D, **h) * 0.1
    kz = torch.randn(batch, HKV, tokens // GROUP, D, **h)
    vs = torch.rand(batch, HKV, tokens, D // GROUP, **h) * 0.1
    vz = torch.randn(batch, HKV, tokens, D // GROUP, **h)
    kr = torch.randn(batch, HKV, RESIDUAL, D, dtype=torch.bfloat16, device=device, generator=gen)
    vr = torch.randn(batch, HKV, RESIDUAL, D, dtype=torch.bfloat16, device=device, generator=gen)
    nq = torch.full((batch,), tokens, dtype=torch.int32, device=device)
    nr = torch.full((batch,), RESIDUAL, dtype=torch.int32, device=device)
    return q, kc, ks, kz, vc, vs, vz, kr, vr, nq, nr


def planes_call(args: tuple, bits: int, warps: int, convert: bool):
    """The integer-dot kernel over the same codes in plane order (`layout="planes"`, MEMFIT_KIVI_PLANES_WARPS):
    converted (for the check) or the same bytes seen in the plane shape (for timing: the values do not matter)."""
    import os

    q, kc, ks, kz, vc, vs, vz, kr, vr, nq, nr = args
    b, h, t = vc.shape[:3]
    if convert:
        kc, vc = KP.keys_to_planes(kc, bits), KP.values_to_planes(vc, bits)
    else:
        vc = vc.view(b, h, t // KP.block_tokens(bits), D, 16)
    os.environ["MEMFIT_KIVI_PLANES_WARPS"] = str(warps)
    return functools.partial(KA.kivi_decode_attention, q, kc, ks, kz, vc, vs, vz, kr, vr, nq, nr, bits=bits,
                             group_size=GROUP, scale=D**-0.5, layout="planes")


def name_of(spec: tuple[int, ...]) -> str:
    full = tuple(spec) + (2, 1)[len(spec) - 2:] if len(spec) < 4 else tuple(spec)
    for name, v in KA.VARIANTS.items():
        vf = tuple(v) + (2, 1)[len(v) - 2:] if len(v) < 4 else tuple(v)
        if vf == full:
            return name
    return ",".join(map(str, spec))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results/kivi_kernel_sweep.jsonl")
    p.add_argument("--shapes", default="1x32768,64x8192,256x8192,461x8192", help="BATCHxTOKENS,...")
    p.add_argument("--bits", default="2,4")
    p.add_argument("--print-best", action="store_true")
    p.add_argument("--sass", action="store_true", help="also record each variant's registers and spills (kind 'sass' rows)")
    p.add_argument("--variants", default=None, help="only these (names or path,warps,groups,stages), ';'-separated")
    p.add_argument("--planes", default="", help="also the integer-dot kernel over plane-order codes at these "
                   "num_warps (comma-separated), rows with variant 'planes-wN'")
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("error: needs a CUDA device (the kernels' speed is what this measures)", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    shapes = [tuple(int(x) for x in s.split("x")) for s in a.shapes.split(",")]
    bits_list = [int(b) for b in a.bits.split(",")]
    if a.variants:
        SWEEP[:] = [KA.variant_spec(v) for v in a.variants.split(";")]
    bw = copy_bandwidth(dev)
    scale = D**-0.5
    ok: dict[tuple[int, tuple], bool] = {}
    largest: dict[tuple, float] = {}
    with ResultWriter(a.out) as w:
        w.write({"kind": "machine", "device": torch.cuda.get_device_name(dev), "copy_bandwidth_bytes_per_s": bw})
        for bits in bits_list:  # correctness first, on a small ragged case
            args = case(3, 1024, bits, dev, seed=bits)
            args[9][1] = 512
            args[10][2] = 37
            ref = REF.kivi_decode_attention_ref(args[0].float(), *args[1:], bits=bits, group_size=GROUP, scale=scale)
            for spec in SWEEP:
                try:
                    out = KA.kivi_decode_attention(*args, bits=bits, group_size=GROUP, scale=scale, packed=spec)
                    err = (out.float() - ref).abs().max().item()
                except Exception as e:  # noqa: BLE001 - a variant that does not compile is reported, not fatal
                    err, msg = float("nan"), f"{type(e).__name__}: {e}"[:300]
                    w.write({"kind": "check", "variant": name_of(spec), "bits": bits, "error": msg})
                ok[(bits, spec)] = err < 5e-2
                if a.sass and ok[(bits, spec)]:
                    w.write({"kind": "sass", "variant": name_of(spec), "spec": list(spec), "bits": bits,
                             **instruction_mix(spec, bits, args)})
                w.write({"kind": "check", "variant": name_of(spec), "spec": list(spec), "bits": bits,
                         "max_abs_err_vs_ref": err, "passed": ok[(bits, spec)]})
        planes = [int(x) for x in a.planes.split(",") if x]
        for bits in bits_list:
            args = case(3, 1024, bits, dev, seed=bits)
            args[9][1] = 512
            args[10][2] = 37
            ref = REF.kivi_decode_attention_ref(args[0].float(), *args[1:], bits=bits, group_size=GROUP, scale=scale)
            for warps in planes:
                try:
                    err = (planes_call(args, bits, warps, True)().float() - ref).abs().max().item()
                except Exception as e:  # noqa: BLE001 - reported, not fatal
                    err = float("nan")
                    w.write({"kind": "check", "variant": f"planes-w{warps}", "bits": bits,
                             "error": f"{type(e).__name__}: {e}"[:300]})
                ok[(bits, ("planes", warps))] = err < 5e-2
                w.write({"kind": "check", "variant": f"planes-w{warps}", "bits": bits, "max_abs_err_vs_ref": err,
                         "passed": ok[(bits, ("planes", warps))]})
        for batch, tokens in shapes:
            for bits in bits_list:
                args = case(batch, tokens, bits, dev)
                nbytes = sum(t.numel() * t.element_size() for t in args[1:9])
                for warps in planes:
                    if not ok[(bits, ("planes", warps))]:
                        continue
                    us = replay_us(planes_call(args, bits, warps, False))
                    w.write({"kind": "kernel", "variant": f"planes-w{warps}", "bits": bits, "batch": batch,
                             "tokens": tokens, "kernel_us": us, "cache_bytes": nbytes, "gbps": nbytes / us / 1e3,
                             "bw_fraction": nbytes / (us * 1e-6) / bw})
                for spec in SWEEP:
                    if not ok[(bits, spec)]:
                        continue
                    us = replay_us(functools.partial(KA.kivi_decode_attention, *args, bits=bits, group_size=GROUP,
                                                     scale=scale, packed=spec))
                    w.write({"kind": "kernel", "variant": name_of(spec), "spec": list(spec), "bits": bits,
                             "batch": batch, "tokens": tokens, "kernel_us": us, "cache_bytes": nbytes,
                             "gbps": nbytes / us / 1e3, "bw_fraction": nbytes / (us * 1e-6) / bw})
                    if (batch, tokens) == shapes[-1]:
                        largest[spec] = largest.get(spec, 0.0) + us
                del args
                torch.cuda.empty_cache()
            # the bf16 slot kernel over the same token count: what plain slots reach at this batch
            k = torch.randn(batch, HKV, tokens + RESIDUAL, D, dtype=torch.bfloat16, device=dev)
            v = torch.randn_like(k)
            q = torch.randn(batch, HQ, D, dtype=torch.bfloat16, device=dev)
            n = torch.full((batch,), tokens + RESIDUAL, dtype=torch.int32, device=dev)
            nbytes = 2 * k.numel() * k.element_size()
            us = replay_us(functools.partial(KA.decode_attention, q, k, v, n, scale=scale))
            w.write({"kind": "kernel", "variant": "slots-bf16", "bits": 16, "batch": batch, "tokens": tokens,
                     "kernel_us": us, "cache_bytes": nbytes, "gbps": nbytes / us / 1e3,
                     "bw_fraction": nbytes / (us * 1e-6) / bw})
            del k, v, q
            torch.cuda.empty_cache()
    if a.print_best and largest:
        best = [s for s in sorted(largest, key=largest.get) if all(ok[(b, s)] for b in bits_list)][0]
        print(",".join(map(str, best)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
