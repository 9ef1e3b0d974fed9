"""Time the group-format decode matmul (memfit.kernels.group_gemv) per Llama-3.1-8B linear shape, per kernel variant
and launch shape, beside torch's bf16 matmul of the same shape; and the product's layer forward
(`CompressedLinear.forward`, the path `memfit run --weights` takes) at its defaults.

Layers are built by the product's weight methods (`rtn:B` quantizes a random bf16 linear on the GPU; `mixed`
is a SliM-LLM-like layout of 2/3/4-bit groups averaging 3 bits). Each time is the median of
`triton.testing.do_bench_cudagraph` (the call recorded in a CUDA graph, as decode runs it). `per_token_ms` sums the
seven linears of one decoder layer times 32 layers: what the linears of one decode step cost.

    python benchmarks/weights/gemv_variants.py --out benchmarks/results/gemv_variants_h200.jsonl
"""

from __future__ import annotations

import argparse
import itertools
from functools import partial

import torch

from memfit.bench.provenance import ResultWriter

SHAPES = {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096), "o_proj": (4096, 4096),
          "gate_proj": (14336, 4096), "up_proj": (14336, 4096), "down_proj": (4096, 14336)}
GROUPED = {"qkv_proj": (6144, 4096), "gate_up_proj": (28672, 4096)}  # q/k/v and gate/up read as one matrix each
LAYERS = 32


def tinygemm(comp, x: torch.Tensor):
    """The layer's forward after the fast backend's repack for torch's int4 kernel (`aten._weight_int4pack_mm`,
    `memfit.kernels.tinygemm`, via `CompressedLinear.repack_for_kernel` on a copy of the layer): the same 4-bit codes,
    scales and offsets, the path `memfit run --weights rtn:4` takes on CUDA."""
    import copy

    repacked = copy.deepcopy(comp)
    if not repacked.repack_for_kernel():
        raise ValueError("torch's int4 kernel does not serve this layer here")
    return partial(repacked, x)


def pairs_case(comp, x: torch.Tensor, **launch):
    """memfit's pair-order 4-bit kernel (`memfit.kernels.int4_pairs`) on the layer's codes converted to its order
    (same bytes, same fp16 scales and offsets), at one launch shape."""
    from memfit.kernels import int4_pairs

    codes = int4_pairs.to_pairs(comp.codes_4)
    return partial(int4_pairs.gemv, x, codes, comp.scales, comp.offsets, comp.meta["group_size"], **launch)


def gemlite_layer(lin: torch.nn.Linear, x: torch.Tensor, group: int = 128):
    """The baseline a user would pick for a fast 4-bit decode: gemlite's Triton kernels (`GemLiteLinear`, 4-bit,
    group 128, bf16 in and out) holding the codes of memfit's own RTN quantization of the same weight
    (`memfit.weights.quantizer.rtn_quantize`; gemlite packs HQQ's format, W ~ (q - z) * s, so z = -offset / scale).
    Its autotuner picks the kernel; its bundled H100 configs are loaded first. (`gemv_gemlite_h200.jsonl` came from
    the version of efc4fed, which quantized with its own min-max rounding: the kernels' time does not depend on the
    code values.)"""
    import os

    import gemlite
    from gemlite import DType, GemLiteLinear

    from memfit.weights.quantizer import rtn_quantize

    cfg = os.path.join(os.path.dirname(gemlite.__file__), "configs", "h100.json")
    if os.path.exists(cfg):
        GemLiteLinear.load_config(cfg, print_error=False)
    n, k = lin.weight.shape
    bits = torch.full((k // group,), 4, dtype=torch.uint8)
    codes, scales, offsets = rtn_quantize(lin.weight.float(), bits, group)
    s = scales.float().clamp(min=1e-8)
    layer = GemLiteLinear(4, group_size=group, in_features=k, out_features=n, input_dtype=DType.BF16,
                          output_dtype=DType.BF16)
    layer.pack(codes.view(n, k).to(torch.uint8), s.to(torch.bfloat16), (-offsets.float() / s).to(torch.bfloat16), None)
    return partial(layer, x)


def build(spec: str, out_f: int, in_f: int):
    from memfit.weights.base import parse_weight_spec
    from memfit.weights.format import CompressedLinear

    lin = torch.nn.Linear(in_f, out_f, bias=False, device="cuda", dtype=torch.bfloat16)
    torch.nn.init.normal_(lin.weight, std=0.02)
    if spec != "mixed":
        return lin, parse_weight_spec(spec).compress(lin, None)
    from memfit.weights.quantizer import rtn_quantize

    n_g = in_f // 128
    bits = torch.tensor(([2, 4] * n_g)[: n_g // 2] + [3] * (n_g - n_g // 2), dtype=torch.uint8)
    codes, scales, offsets = rtn_quantize(lin.weight.float(), bits, 128)
    return lin, CompressedLinear.from_group(codes, scales, offsets, bits, in_f)


def bench(fn) -> float:
    import triton.testing

    fn()
    torch.cuda.synchronize()
    return float(triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--specs", default="rtn:4,rtn:3,mixed")
    ap.add_argument("--rows", default="1,4")
    ap.add_argument("--block-n", default="4,8,16,32")
    ap.add_argument("--warps", default="1,2,4")
    ap.add_argument("--variants", default="row1,rows", help="register-kernel forms swept at batch 1")
    ap.add_argument("--grouped", action="store_true", help="also time q/k/v and gate/up as one matrix each")
    ap.add_argument("--tinygemm", action="store_true", help="also time torch's int4 matmul on the 4-bit layers")
    ap.add_argument("--gemlite", action="store_true", help="also time gemlite's 4-bit kernels (a baseline library)")
    ap.add_argument("--pairs", default="", help="launch shapes of the pair-order 4-bit kernel (every --rows), "
                    "';'-separated block_n,gpi,warps[,split] (split 0: automatic), or 'default'")
    ap.add_argument("--no-sweep", action="store_true", help="skip the group_gemv launch-shape sweep")
    ap.add_argument("--out", default="benchmarks/results/gemv_variants.jsonl")
    args = ap.parse_args()
    from memfit.kernels.group_gemv import group_gemv
    from memfit.weights.format import _group_buckets

    totals: dict[tuple, float] = {}
    with ResultWriter(args.out) as out:
        shapes = {**SHAPES, **(GROUPED if args.grouped else {})}
        for spec, (name, (n, k)) in itertools.product(args.specs.split(","), shapes.items()):
            lin, comp = build(spec, n, k)
            buckets = _group_buckets(comp)
            for m in [int(r) for r in args.rows.split(",")]:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                want = lin(x).float()
                qref = comp(x).float()  # the product's output: other kernels on the same codes should match it
                cases = [("bf16", {}, partial(lin, x)), ("forward", {}, partial(comp, x))]
                cases += [("dot", {"variant": "dot"}, None)]
                if args.tinygemm and spec.startswith("rtn:4"):
                    try:
                        cases.append(("tinygemm", {}, tinygemm(comp, x)))
                    except Exception as exc:  # noqa: BLE001 - a torch without the op is a row, not a crash
                        out.write({"spec": spec, "linear": name, "rows": m, "kind": "tinygemm",
                                   "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
                if args.gemlite and spec.startswith("rtn:4"):
                    try:
                        cases.append(("gemlite", {}, gemlite_layer(lin, x)))
                    except Exception as exc:  # noqa: BLE001 - no gemlite here is a row, not a crash
                        out.write({"spec": spec, "linear": name, "rows": m, "kind": "gemlite",
                                   "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
                if args.pairs and spec.startswith("rtn:4"):
                    for shape in args.pairs.split(";"):
                        if shape == "default":
                            cases.append(("pairs", {}, pairs_case(comp, x)))
                            continue
                        bn, gpi, nw, *rest = (int(v) for v in shape.split(","))
                        kw = {"block_n": bn, "gpi": gpi, "num_warps": nw, "split": (rest[0] or None) if rest else None}
                        cases.append(("pairs", kw, pairs_case(comp, x, **kw)))
                if args.no_sweep:
                    pass
                elif m == 1 and spec == args.specs.split(",")[0]:  # the launch-shape sweep: one spec, batch 1
                    for bn, nw, split in itertools.product([int(b) for b in args.block_n.split(",")],
                                                           [int(w) for w in args.warps.split(",")], [1, None]):
                        for variant in args.variants.split(","):
                            cases.append(("rows", {"variant": variant, "block_n": bn, "num_warps": nw,
                                                   "split": split}, None))
                elif m <= 4:
                    cases.append(("rows", {"variant": "auto"}, None))
                for kind, kw, fn in cases:
                    if fn is None:
                        fn = partial(group_gemv, x, buckets, comp.scales, comp.offsets, 128, n, **kw)
                    try:
                        got = fn().float()
                        err = (got - want).abs().max().item() / want.abs().max().item()
                        err_q = (got - qref).abs().max().item() / qref.abs().max().item()
                        ms = bench(fn)
                    except Exception as exc:  # noqa: BLE001 - a launch shape that cannot compile is a row, not a crash
                        out.write({"spec": spec, "linear": name, "rows": m, "kind": kind, **kw,
                                   "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
                        continue
                    nbytes = (sum(t.numel() * t.element_size() for t in comp.buffers()) if kind != "bf16"
                              else lin.weight.numel() * 2)
                    out.write({"spec": spec, "linear": name, "out": n, "in": k, "rows": m, "kind": kind, **kw,
                               "ms": ms, "gb_per_s": nbytes / ms / 1e6, "rel_err_vs_bf16": err,
                               "rel_err_vs_forward": err_q})
                    key = (spec, m, kind, tuple(sorted(kw.items(), key=str)))
                    part = "grouped" if name in GROUPED else "separate"
                    for layout in (["separate", "grouped"] if name in ("o_proj", "down_proj") else [part]):
                        if layout == "grouped" and not args.grouped:
                            continue
                        totals[(*key, layout)] = totals.get((*key, layout), 0.0) + ms
        for (spec, m, kind, kw, layout), ms in sorted(totals.items(), key=lambda t: (t[0][0], t[0][1], t[1])):
            out.write({"spec": spec, "rows": m, "kind": kind, **dict(kw), "summary": "per_token_linears",
                       "projections": layout, "per_token_ms": ms * LAYERS})


if __name__ == "__main__":
    main()
