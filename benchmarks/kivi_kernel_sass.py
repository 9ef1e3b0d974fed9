"""Compile the product's KIVI decode-attention kernel for an H100/H200 (sm_90) on any machine and count the machine
instructions of its main loop: no GPU needed.

Why: on the H200 the kernel is issue-bound (Nsight Compute, `kivi_kernel_profile.py`: ~89 warp instructions per
cached token at 461 rows, 8 warps per SM), and the count this script reads from the SASS of the same compile (Triton
with the launch's divisibility hints, ptxas and nvdisasm bundled with triton) matches that profile: ~1,420
instructions per 64-token tile per warp x 4 warps / 64 tokens = ~89. So a tile variant can be compared offline before
spending device time on it. What the count cannot predict: stalls (shared-memory bank conflicts, latency at 8
warps per SM): several variants with 20-30 % fewer instructions ran slower on the H200 (benchmarks/README.md).

    python benchmarks/kivi_kernel_sass.py --variants "packed;pipe;half" --bits 2,4 --out results/kivi_kernel_sass.jsonl

Rows: variant, bits, registers per thread, instructions in the main quantized loop per warp, per cached token (all
warps of the program), and the loop's most frequent opcodes; a `slots-bf16` row gives the plain bf16 slot loop for
comparison (the kernel that reads a bf16 cache at the copy bandwidth).
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from memfit.bench.provenance import ResultWriter
from memfit.kernels import _decode_kernels as K
from memfit.kernels import kivi_attention as KA

# Llama-3.1-8B attention (32 query heads over 8 KV heads, head dim 128), KIVI group 32: the sweep's shapes
SHAPE = dict(HKV=8, GQ=4, GP=16, D=128, GROUP=32, BLOCK_T=64)
_PTRS = {"Q": "*bf16", "KC": "*u8", "KS": "*fp16", "KZ": "*fp16", "VC": "*u8", "VS": "*fp16", "VZ": "*fp16",
         "KR": "*bf16", "VR": "*bf16", "NQ": "*i32", "NR": "*i32", "PO": "*fp32", "PML": "*fp32", "LG": "*fp32",
         "KN": "*bf16", "VN": "*bf16", "APP": "*i32"}  # fmt: skip


def compile_split(spec: tuple[int, ...] | None, bits: int):
    """The split kernel as `kivi_attention._launch` would launch it for this variant (None: the bf16 slot kernel)."""
    names = K._split_kernel.arg_names
    quant = spec is not None
    path, warps = (int(spec[0]), int(spec[1])) if quant else (1, 4)
    groups = int(spec[2]) if quant and len(spec) > 2 else 2
    stages = int(spec[3]) if quant and len(spec) > 3 else 1
    consts = dict(SHAPE, BITS=bits, QBLOCK=max(groups * SHAPE["GROUP"], 16), HAS_QUANT=quant, STORE_LOGITS=False,
                  APPEND=False, PACKED=path, NSTAGES=stages)  # fmt: skip
    sig = {n: _PTRS.get(n, "constexpr" if n in consts else "fp32" if n == "qk_scale" else "i32") for n in names}
    # what Triton's launcher specializes on: 16-byte-aligned pointers, strides and sizes divisible by 16
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig[n][0] == "*" or sig[n] == "i32"}
    src = ASTSource(fn=K._split_kernel, signature=sig, attrs=attrs,
                    constexprs={(names.index(k),): v for k, v in consts.items()})  # fmt: skip
    # tokens one loop iteration covers: "fold" and "packed32" step by one scale group, "gather" and the slot loop by
    # BLOCK_T, the others by a tile of QBLOCK
    step = SHAPE["BLOCK_T"] if not quant or path == 0 else SHAPE["GROUP"] if path in (2, 3) else consts["QBLOCK"]
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}), step, warps


def compile_planes(bits: int, warps: int = 1):
    """The plane-order kernel (`memfit.kernels._kivi_planes_kernel`) as `kivi_attention._launch_planes` launches it
    for these shapes (its default tile: `planes_shape`); returns (kernel, tokens per tile)."""
    from memfit.kernels import _kivi_planes_kernel as KP

    gqp, tg, kdup = KA.planes_shape(SHAPE["GQ"], SHAPE["D"], SHAPE["GROUP"], bits)
    names = KP._split_kernel_planes.arg_names
    consts = dict(HKV=SHAPE["HKV"], GQ=SHAPE["GQ"], GQP=gqp, GP=SHAPE["GP"], D=SHAPE["D"], BITS=bits,
                  GROUP=SHAPE["GROUP"], TG=tg, BLOCK_T=16, KDUP=kdup, APPEND=False, USE_ASM=True, NSTAGES=1)
    sig = {n: _PTRS.get(n, "constexpr" if n in consts else "fp32" if n == "qk_scale" else "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig[n][0] == "*" or sig[n] == "i32"}
    src = ASTSource(fn=KP._split_kernel_planes, signature=sig, attrs=attrs,
                    constexprs={(names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}), tg * SHAPE["GROUP"]


def _tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def sass_of(kernel) -> tuple[int, str]:
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(cubin)], capture_output=True,
                               text=True, check=True).stdout  # fmt: skip
        sass = subprocess.run([_tool("nvdisasm"), "-c", str(cubin)], capture_output=True, text=True, check=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    return int(regs.group(1)) if regs else -1, sass


def main_loop(sass: str, which: int = 0) -> list[str]:
    """Instructions of a loop of the SASS (a backward branch's span): `which`=0 the longest, 1 the next."""
    lines = sass.splitlines()
    ins, labels = [], {}
    pending = []
    for line in lines:
        lab = re.match(r"\s*\.L_x_(\d+):", line)
        if lab:
            pending.append(lab.group(1))
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            addr = int(m.group(1), 16)
            for p in pending:
                labels[p] = addr
            pending = []
            ins.append((addr, m.group(2).strip()))
    loops = []
    for addr, text in ins:
        t = re.search(r"BRA\s.*?\.L_x_(\d+)", text)
        if t and labels.get(t.group(1), addr + 1) < addr:
            loops.append((labels[t.group(1)], addr))
    if len(loops) <= which:
        return []
    lo, hi = sorted(loops, key=lambda x: x[0] - x[1])[which]
    return [t for a, t in ins if lo <= a <= hi]


def opcode(text: str) -> str:
    return re.sub(r"^@!?U?P[T\d]+\s+", "", text).split()[0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default="packed;pipe;half;halfpipe;packed32;gather",
                   help="names from kivi_attention.VARIANTS or path,warps[,groups,stages], ';'-separated")
    p.add_argument("--bits", default="2,4")
    p.add_argument("--out", default="benchmarks/results/kivi_kernel_sass.jsonl")
    p.add_argument("--top", type=int, default=12, help="opcodes listed per row")
    p.add_argument("--planes", action="store_true", help="also the plane-order kernel at its default tile, 1 warp "
                   "(its quantized loop is the one holding the tensor-core dots)")
    a = p.parse_args()
    specs = [(v, KA.variant_spec(v)) for v in a.variants.split(";") if v]
    try:
        with ResultWriter(a.out) as w:
            for bits in [int(b) for b in a.bits.split(",")]:
                for name, spec in specs:
                    kernel, step, warps = compile_split(spec, bits)
                    regs, sass = sass_of(kernel)
                    loop = main_loop(sass)
                    ops = collections.Counter(opcode(t) for t in loop)
                    w.write({"kind": "sass", "variant": name, "spec": list(spec), "bits": bits, "n_regs": regs,
                             "num_warps": warps, "tile_tokens": step, "loop_instructions": len(loop),
                             "instructions_per_token": len(loop) * warps / step,
                             "top_opcodes": dict(ops.most_common(a.top)), "triton": triton.__version__})  # fmt: skip
            for bits in [int(b) for b in a.bits.split(",")] if a.planes else []:
                kernel, step = compile_planes(bits)
                regs, sass = sass_of(kernel)
                loop = next(lp for lp in (main_loop(sass, i) for i in range(3)) if any("HMMA" in t for t in lp))
                spills = sum(1 for line in sass.splitlines() if re.search(r"\b(LDL|STL)", line))
                w.write({"kind": "sass", "variant": "planes", "bits": bits, "n_regs": regs, "num_warps": 1,
                         "tile_tokens": step, "loop_instructions": len(loop),
                         "instructions_per_token": len(loop) / step, "spill_instructions": spills,
                         "top_opcodes": dict(collections.Counter(opcode(t) for t in loop).most_common(a.top)),
                         "triton": triton.__version__})  # fmt: skip
            kernel, step, warps = compile_split(None, 16)
            regs, sass = sass_of(kernel)
            loop = main_loop(sass)
            w.write({"kind": "sass", "variant": "slots-bf16", "bits": 16, "n_regs": regs, "num_warps": warps,
                     "tile_tokens": step, "loop_instructions": len(loop),
                     "instructions_per_token": len(loop) * warps / step,
                     "top_opcodes": dict(collections.Counter(opcode(t) for t in loop).most_common(a.top)),
                     "triton": triton.__version__})  # fmt: skip
    except (subprocess.CalledProcessError, FileNotFoundError, KeyError) as e:
        print(f"error: could not compile or disassemble for sm_90 with triton {triton.__version__}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
