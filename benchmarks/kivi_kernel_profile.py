"""Launch the product's KIVI decode-attention kernel at one shape, for a profiler (Nsight Compute) to read.

`kivi_kernel_sweep.py` times the variants; this one exists so that `ncu` can say *why* a variant takes the time it
does (instructions issued per token, warp stalls, occupancy, shared-memory bank conflicts). The H200 machine has
`ncu` under /usr/local/cuda/bin:

    ncu --kernel-name _split_kernel --launch-skip 2 --launch-count 1 --section SpeedOfLight \
        --section WarpStateStats --section SchedulerStats --section Occupancy --section InstructionStats \
        --section MemoryWorkloadAnalysis_Tables --section LaunchStats \
        python benchmarks/kivi_kernel_profile.py --variant packed --batch 461 --tokens 8192 --bits 2

The cache is `kivi_kernel_sweep.case` (random codes, Llama-3.1-8B attention shapes); the kernel runs three times
(the first compiles it: skip two launches).
"""

from __future__ import annotations

import argparse
import sys

import torch
from kivi_kernel_sweep import GROUP, D, case

from memfit.core import planes as KP
from memfit.kernels import kivi_attention as KA


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--variant", default="packed", help="a name from kivi_attention.VARIANTS or path,warps[,groups,stages]"
    )
    p.add_argument("--batch", type=int, default=461)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--bits", type=int, default=2, choices=(2, 4, 8))
    p.add_argument("--launches", type=int, default=3)
    p.add_argument("--layout", default="canonical", choices=("canonical", "planes"),
                   help="planes: the plane-order kernel (its knobs: MEMFIT_KIVI_PLANES_WARPS / _STAGES / _TG)")
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("error: needs a CUDA device", file=sys.stderr)
        return 2
    spec = KA.variant_spec(a.variant)
    args = case(a.batch, a.tokens, a.bits, torch.device("cuda"))
    if a.layout == "planes":  # the same bytes seen in the plane shape: the values do not matter for speed
        b, h, t = args[4].shape[:3]
        args = (*args[:4], args[4].view(b, h, t // KP.block_tokens(a.bits), D, 16), *args[5:])
    for _ in range(a.launches):
        KA.kivi_decode_attention(*args, bits=a.bits, group_size=GROUP, scale=D**-0.5, packed=spec,
                                 layout=a.layout)
    torch.cuda.synchronize()
    what = f"variant {a.variant} {spec}" if a.layout == "canonical" else "the plane-order tile"  # --variant: canonical only
    print(f"{a.launches} launches of {what}, {a.batch} rows x {a.tokens} tokens, {a.bits}-bit")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
