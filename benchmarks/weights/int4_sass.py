"""Compile the product's 4-bit decode kernels for an H100/H200 (sm_90) on any machine and count the machine
instructions of their main loop per weight: no GPU needed (the method of `benchmarks/kivi_kernel_sass.py`).

Kernels: the pair-order kernel (`memfit.kernels.int4_pairs`, at its launch shapes) and memfit's general group
kernel's one-row form (`memfit.kernels.group_gemv`, 4 bits, its default 8 rows and one warp), group 128, one input
row, with the divisibility hints Triton's launcher gives. `per_weight` = loop instructions x warps x 32 threads /
weights the loop iteration covers: instructions each thread issues per weight. Match the H200 machine's compiler with
triton 3.6: `pip install --no-deps --target /tmp/tr36 triton==3.6.0`, then

    PYTHONPATH=/tmp/tr36:. python benchmarks/weights/int4_sass.py --out benchmarks/results/int4_sass_triton36.jsonl
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kivi_kernel_sass import main_loop, opcode, sass_of  # noqa: E402

from memfit.bench.provenance import ResultWriter  # noqa: E402
from memfit.kernels import _group_gemv_kernel as GK  # noqa: E402
from memfit.kernels import _int4_pairs_kernel as PK  # noqa: E402
from memfit.kernels.int4_pairs import resolve_launch  # noqa: E402

G = 128
# Llama-3.1-8B's matrices as the decode step reads them (q/k/v and gate/up stacked)
SHAPES = {"qkv_proj": (6144, 4096), "o_proj": (4096, 4096), "gate_up_proj": (28672, 4096), "down_proj": (4096, 14336)}


def _compile(fn, ptrs: dict[str, str], consts: dict, warps: int):
    names = fn.arg_names
    sig = {n: ptrs.get(n, "constexpr" if n in consts else "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig[n][0] == "*" or sig[n] == "i32"}
    src = ASTSource(fn=fn, signature=sig, attrs=attrs, constexprs={(names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})


def _row(kernel, warps: int, weights: int, top: int) -> dict:
    regs, sass = sass_of(kernel)
    loop = main_loop(sass)
    return {"n_regs": regs, "num_warps": warps, "loop_instructions": len(loop), "weights_per_iteration": weights,
            "per_weight": len(loop) * warps * 32 / weights,
            "top_opcodes": dict(collections.Counter(opcode(t) for t in loop).most_common(top))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/int4_sass.jsonl")
    ap.add_argument("--top", type=int, default=10, help="opcodes listed per row")
    a = ap.parse_args()
    with ResultWriter(a.out) as w:
        for name, (n, k) in SHAPES.items():
            bn, gpi, warps, sp, _ = resolve_launch(n, k, G)  # the product's launch for this shape
            ptrs = {"X32": "*i32", "W": "*i32", "S": "*fp16", "OFF": "*fp16", "Y": "*bf16", "PART": "*fp32",
                    "COUNT": "*i32"}
            kern = _compile(PK.int4_pairs_gemv_kernel, ptrs,
                            dict(G=G, BLOCK_N=bn, GPI=gpi, SPLIT=sp, USE_ASM=True), warps)
            w.write({"kernel": "int4_pairs", "linear": name, "block_n": bn, "gpi": gpi, "split": sp,
                     **_row(kern, warps, bn * gpi * G, a.top), "triton": triton.__version__})
        ptrs = {"X": "*bf16", "W": "*i32", "GIDX": "*i32", "S": "*fp16", "OFF": "*fp16", "Y": "*bf16"}
        from memfit.kernels.group_gemv import ROW1_BLOCK_N, ROW1_NUM_WARPS

        kern = _compile(GK.group_gemv_row1_kernel, ptrs,
                        dict(BITS=4, G=G, SPLIT=1, BLOCK_N=ROW1_BLOCK_N, ATOMIC=False), ROW1_NUM_WARPS)
        w.write({"kernel": "group_gemv_row1", "block_n": ROW1_BLOCK_N,
                 **_row(kern, ROW1_NUM_WARPS, ROW1_BLOCK_N * G, a.top), "triton": triton.__version__})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
