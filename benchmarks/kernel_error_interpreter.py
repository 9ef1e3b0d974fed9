"""Relative error of the KIVI decode kernel against its fp32 reference at the GPU test's shape, on a CPU.

Runs `kivi_decode_attention` in Triton's CPU interpreter (bf16 computed as on the GPU, as tests/test_kernels.py does)
at the shape of the `-m gpu` kernel test (batch 3: 2048 quantized tokens / 32 + 35 residual / 128 residual only;
32 query heads, 8 KV heads, d = 128, 2-bit codes, groups of 32) and writes, per tile code path, the worst relative
L2 error of an output vector and the tolerance tests/test_kernels.py applies to it. Used to set that tolerance.

    python benchmarks/kernel_error_interpreter.py [PATH ...]   (default: packed packed32 fold gather)
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import pytest  # noqa: E402
import torch  # noqa: E402
from test_kernels import (  # noqa: E402
    Setup,
    _bf16_like_the_gpu,
    _define_kernels_interpreted,
    _kivi_case,
    _kivi_lengths,
    _rel_err,
    _tolerance,
)

from memfit.kernels import reference as R  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "kernel_error_interpreter.jsonl")


def main() -> None:
    paths = sys.argv[1:] or ["packed", "packed32", "fold", "gather"]
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        _bf16_like_the_gpu(mp)
        _define_kernels_interpreted()
        import triton

        from memfit.kernels.kivi_attention import kivi_decode_attention

        s = Setup("cpu", torch.bfloat16, 3, 32, 8, 128, 2048, 128, 64, 1)
        bits, g, scale = 2, 32, s.d**-0.5
        for packed in paths:
            q, qk, qv, kr, vr = _kivi_case(s.b, s.hq, s.hkv, s.d, s.cq, s.r, bits, g, s.dtype, s.dev, seed=20)
            n_q, n_r = _kivi_lengths(s, g)
            args = (q, qk.codes, qk.scales, qk.zeros, qv.codes, qv.scales, qv.zeros, kr, vr, n_q, n_r)
            ref = R.kivi_decode_attention_ref(q.float(), *args[1:], bits=bits, group_size=g, scale=scale)
            t = time.process_time()
            out = kivi_decode_attention(*args, bits=bits, group_size=g, scale=scale, block_t=s.block_t, packed=packed)
            err = _rel_err(out, ref)
            row = {"kernel": "kivi_decode_attention", "packed": packed, "bits": bits, "dtype": "bfloat16",
                   "shape": [s.b, s.hq, s.hkv, s.d, s.cq, s.r], "n_q": n_q.tolist(), "n_r": n_r.tolist(),
                   "max_rel_err": err.max().item(), "max_rel_err_per_row": err.amax(1).tolist(),
                   "test_tolerance": _tolerance(s.dtype, 6 if packed == "fold" else 4),
                   "cpu_s": round(time.process_time() - t, 1), "triton": triton.__version__, "torch": torch.__version__,
                   "machine": platform.machine(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                   "command": " ".join(["python", *sys.argv])}
            print(json.dumps(row), flush=True)
            with open(OUT, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
