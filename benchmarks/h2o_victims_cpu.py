"""Why the H2O self-check of `gpu_decode.py` found the same victims in only 19 of 32 layers (H100, 2026-11-27).

That check runs the whole random-weight model twice (its own PyTorch H2O step, then the Triton kernels) for 6
teacher-forced decode steps and compares each layer's last victims. This script replays one layer's H2O state on the
CPU under the check's settings (batch 2, 32 query / 8 KV heads, d = 128, budget 381 of 1524 tokens: 382 slots,
recent window 190, scores uniform in [0, 4), bf16 keys / values) for 32 independent "layers", and counts the layers
whose victims match after 6 steps when the two sides are given:
- `bf16_logits`: identical queries; one side is `h2o_decode_ref` (fp32 logits, like the kernel), the other the
  PyTorch step of gpu_decode.py (`torch.matmul` of bf16 q and k: logits rounded to bf16 before the softmax);
- `q_noise_<eps>`: both sides `h2o_decode_ref`, but the second side's queries carry a relative error eps, as
  in the self-check, where each side's queries come from its own (bf16-rounded) outputs of the layers below;
- `bf16_logits+q_noise_0.01`: both at once (the self-check's situation);
- `kernel_interpreter` (with --kernel-layers N > 0, slow): the Triton kernel in its CPU interpreter (bf16 emulated as on the
  GPU, see tests/test_kernels.py) against `h2o_decode_ref`, identical queries, for N layers.
One JSONL row per comparison: python benchmarks/h2o_victims_cpu.py [--kernel-layers N] [--out FILE].
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

from memfit.kernels import reference as R

B, HQ, HKV, D, BUDGET, STEPS, LAYERS = 2, 32, 8, 128, 381, 6, 32
CAP, RECENT, SCALE = BUDGET + 1, int(round(BUDGET * 0.5)), 128**-0.5


def layer_state(gen: torch.Generator, context: int = 4 * BUDGET):
    """gpu_decode.H2OStore.fill_random: random keys / values / scores, kept positions = heavy half + recent half."""
    k = torch.randn(B, HKV, CAP, D, generator=gen).bfloat16()
    v = torch.randn(B, HKV, CAP, D, generator=gen).bfloat16()
    acc = torch.rand(B, HKV, CAP, generator=gen) * 4
    heavy = BUDGET - BUDGET // 2
    p = torch.cat([torch.arange(heavy) * max(1, (context - BUDGET // 2) // heavy),
                   torch.arange(context - BUDGET // 2, context)])
    pos = torch.full((B, HKV, CAP), -1, dtype=torch.int32)
    pos[:, :, :BUDGET] = p.to(torch.int32)
    slot = torch.full((B, HKV), BUDGET, dtype=torch.long)
    return [k, v, acc, pos, slot]


def step_reference(state, q, kn, vn, cur):
    k, v, acc, pos, slot = state
    k, v, acc, pos = R.h2o_append_ref(k, v, acc, pos, kn, vn, slot, cur)
    _, acc, victim = R.h2o_decode_ref(q.float(), k, v, CAP, acc, pos, cur, RECENT, scale=SCALE)
    return [k, v, acc, pos, victim]


def step_gpu_decode_torch(state, q, kn, vn, cur):
    """gpu_decode.H2OStore.attend without kernels: the logits come out of a bf16 matmul."""
    k, v, acc, pos, slot = state
    k, v, acc, pos = R.h2o_append_ref(k, v, acc, pos, kn, vn, slot, cur)
    s = torch.matmul(q.view(B, HKV, HQ // HKV, D), k.transpose(-1, -2)).float() * SCALE
    acc = acc + torch.softmax(s, dim=-1).sum(dim=2)
    cand = torch.where(pos > (cur - RECENT)[:, None, None], float("inf"), acc)
    return [k, v, acc, pos, cand.argmin(dim=-1)]


def step_kernel(state, q, kn, vn, cur):
    from memfit.kernels.h2o_decode import h2o_decode

    k, v, acc, pos, slot = state
    n = torch.full((B,), CAP, dtype=torch.int32)
    slot = slot.int()
    h2o_decode(q, k, v, n, acc, pos, cur, RECENT, scale=SCALE, k_new=kn, v_new=vn, slot=slot, victim=slot)
    return [k, v, acc, pos, slot.long()]


def compare(side_a, side_b, layers: int, q_noise: float = 0.0, seed: int = 0) -> dict:
    same_layers, step_mismatch = 0, 0
    gen = torch.Generator().manual_seed(seed)
    for _ in range(layers):
        a = layer_state(gen)
        b = [t.clone() for t in a]
        for step in range(STEPS):
            cur = torch.full((B,), 4 * BUDGET + step, dtype=torch.int32)
            q = torch.randn(B, HQ, D, generator=gen).bfloat16()
            qb = (q.float() * (1 + q_noise * torch.randn(q.shape, generator=gen))).bfloat16() if q_noise else q
            kn = torch.randn(B, HKV, D, generator=gen).bfloat16()
            vn = torch.randn(B, HKV, D, generator=gen).bfloat16()
            a = side_a(a, q, kn, vn, cur)
            b = side_b(b, qb, kn, vn, cur)
            step_mismatch += int((a[4] != b[4]).sum())
        same_layers += int(torch.equal(a[4], b[4]))
    return {"layers": layers, "victims_equal_layers": f"{same_layers}/{layers}",
            "mismatched_victims_over_all_steps": step_mismatch, "victims_compared": layers * STEPS * B * HKV}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kernel-layers", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "h2o_victims_cpu.jsonl"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    meta = {"torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": " ".join(["python", *sys.argv])}
    rows = [{"comparison": "bf16_logits", **compare(step_reference, step_gpu_decode_torch, LAYERS)}]
    for eps in (1e-3, 1e-2, 5e-2):
        rows.append({"comparison": f"q_noise_{eps:g}", **compare(step_reference, step_reference, LAYERS, q_noise=eps)})
    # the self-check's situation: both effects at once
    rows.append({"comparison": "bf16_logits+q_noise_0.01",
                 **compare(step_reference, step_gpu_decode_torch, LAYERS, q_noise=1e-2)})
    if args.kernel_layers:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels (and triton) are first imported
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
        import pytest
        from test_kernels import _bf16_like_the_gpu, _define_kernels_interpreted

        with pytest.MonkeyPatch.context() as mp:
            _bf16_like_the_gpu(mp)
            _define_kernels_interpreted()
            rows.append({"comparison": "kernel_interpreter", **compare(step_reference, step_kernel, args.kernel_layers)})
    with open(args.out, "a") as f:
        for row in rows:
            row.update(meta)
            print(json.dumps(row))
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
