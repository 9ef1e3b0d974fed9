#!/usr/bin/env python
"""GPU decode benchmark: static-shape decode over evicted and KIVI-quantized caches with memfit's Triton kernels,
against the same path without kernels and against transformers' full DynamicCache, in one run.

Model: Llama-3.1-8B's config with random bf16 weights (timing does not depend on weight values), built once as a
transformers `LlamaForCausalLM` on the GPU; memfit's path is a flat, gpt-fast-style forward over the *same* weight
tensors (q/k/v and gate/up fused into one matrix each; the HF modules get views of them, so weights exist once).

Decode path (`Decoder`): one step = embedding, per layer [RMSNorm + fused QKV + RoPE] -> store.attend (write the
new token into a preallocated buffer, then attention) -> [o-proj + residual + RMSNorm + MLP], greedy argmax fed back
on the device. The dense parts are torch.compile'd per layer (same graph for every layer), the whole step is
captured once in a CUDA graph and replayed; lengths, positions and eviction slots live in device tensors.
Stores (static shapes, sized to the budget):
- `SlotStore`   bf16 slot buffer: the full cache ("full", capacity context + headroom) or a SnapKV-evicted cache
                ("snapkv", capacity budget + headroom); attention: Triton split-K kernel or masked SDPA.
- `KiviStore`   packed KIVI codes (keys per channel along tokens, values per token along channels, fp16 scale and
                zero per group of 32) + a bf16 residual of R = 128 tokens; attention: the Triton kernel reading the
                codes directly, or PyTorch dequantize + SDPA. Every R steps the residual is quantized into the
                packed buffers ("flush", eager, outside the graph; its cost is amortised into ms/token).
- `H2OStore`    H2O with budget + 1 slots: evict one per step into the freed slot; fused Triton scoring (logits
                written once, accumulated in place, argmin victim) or the same in PyTorch.
Decode timings start from caches filled with random values of the right shapes (at 32K x large batches a real
prefill would take minutes); prefill is measured separately at batch 1 with real (random-weight) forwards:
memfit's chunked prefill (2K chunks, SnapKV-style window scoring and eviction after every chunk, per layer, so the
held cache never exceeds the budget) and transformers' one-shot prefill (logits for the last token only).

Roofline: (weight bytes read per step + KV bytes read per step) / copy bandwidth measured here (device-to-device
copy, bytes read + written). Weight bytes read per step = every parameter except the embedding table, of which only
B rows are read. KV bytes = the tokens the cache holds at that context (codes + scales + zeros + residual for
KIVI; + H2O's per-slot score and position). roofline_fraction = roofline_ms / decode_ms_per_token.

Run (on the GPU machine, from the repo root):
    python benchmarks/gpu_decode.py --out benchmarks/results/gpu_decode.jsonl
CPU smoke test of the logic (tiny config, fp32, Triton interpreter for the kernels, no graphs):
    TRITON_INTERPRET=1 python benchmarks/gpu_decode.py --tiny --out /tmp/tiny.jsonl
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import os
import subprocess
import sys
import time
import traceback

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from memfit.bench.provenance import stamp  # noqa: E402
from memfit.core.quant import quantize  # noqa: E402
from memfit.kernels import reference as REF  # noqa: E402

LLAMA3_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_type": "llama3"}
LLAMA_3_1_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
                    rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE, tie_word_embeddings=False)
TINY = dict(LLAMA_3_1_8B, vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=64)

GiB = 1 << 30
KIVI_GROUP = 32
KIVI_RESIDUAL = 128
SNAP_WINDOW, SNAP_KERNEL = 32, 7
H2O_RECENT_FRACTION = 0.5
HEADROOM = 512  # decode slots beyond the prompt's kept tokens (warm-up + timed steps)


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(dev: torch.device):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class Timer:
    """Device-event timer (host clock + sync on CPU)."""

    def __init__(self, dev):
        self.dev = dev

    def __enter__(self):
        if self.dev.type == "cuda":
            self.e0, self.e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.e0.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.dev.type == "cuda":
            self.e1.record()
            self.e1.synchronize()
            self.ms = self.e0.elapsed_time(self.e1)
        else:
            self.ms = (time.perf_counter() - self.t0) * 1e3


# ------------------------------------------------------------------------------------------------ model math


def _rms(x, w, eps: float):
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def _rot(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope_tables(pos, inv_freq, scale: float, dtype: torch.dtype):
    f = pos.float()[..., None] * inv_freq
    emb = torch.cat((f, f), dim=-1)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def _pre(x, ln, wqkv, cos, sin, eps: float, hq: int, hkv: int, dh: int):
    b = x.shape[0]
    qkv = _rms(x, ln, eps) @ wqkv.t()
    q = qkv[:, : hq * dh].view(b, hq, dh)
    k = qkv[:, hq * dh : (hq + hkv) * dh].view(b, hkv, dh)
    v = qkv[:, (hq + hkv) * dh :].view(b, hkv, dh)
    c, s = cos[:, None, :], sin[:, None, :]
    q = q * c + _rot(q) * s
    k = k * c + _rot(k) * s
    return q.contiguous(), k.contiguous(), v  # v stays a view of qkv: the kernels take strided new tokens


def _post(x, o, wo, ln2, wgu, wd, eps: float):
    x = x + o @ wo.t()
    g, u = (_rms(x, ln2, eps) @ wgu.t()).chunk(2, dim=-1)
    return x + (F.silu(g) * u) @ wd.t()


def _mid(x, o, wo, ln2, wgu, wd, ln1n, wqkvn, cos, sin, eps: float, hq: int, hkv: int, dh: int):
    x = _post(x, o, wo, ln2, wgu, wd, eps)
    q, k, v = _pre(x, ln1n, wqkvn, cos, sin, eps, hq, hkv, dh)
    return x, q, k, v


def _argmax(logits):
    """Greedy token: a two-stage argmax (256 chunks, then the best chunk) keeps the 128K-wide row parallel."""
    b, n = logits.shape
    if n % 256:
        return logits.argmax(dim=-1)
    vals, idx = logits.view(b, 256, n // 256).max(dim=-1)
    j = vals.argmax(dim=-1)
    return j * (n // 256) + idx.gather(-1, j[:, None])[:, 0]


def _head(x, o, wo, ln2, wgu, wd, norm, lm_head, eps: float):
    x = _post(x, o, wo, ln2, wgu, wd, eps)
    logits = _rms(x, norm, eps) @ lm_head.t()
    return logits, _argmax(logits)


class Compiled:
    """torch.compile'd function that falls back to eager (for good) if compilation fails."""

    enabled = True
    errors: list[str] = []

    def __init__(self, fn):
        self.fn = fn
        self.compiled = None

    def __call__(self, *args):
        if Compiled.enabled:
            try:
                if self.compiled is None:
                    self.compiled = torch.compile(self.fn, fullgraph=True)
                return self.compiled(*args)
            except Exception as e:  # noqa: BLE001 - any compiler failure: run eager, say so in the rows
                if is_oom(e):
                    raise
                Compiled.enabled = False
                Compiled.errors.append(f"{type(e).__name__}: {str(e)[:300]}")
                log("torch.compile failed, running eager:", Compiled.errors[-1])
        return self.fn(*args)


ROPE, PRE, MID, HEAD = Compiled(_rope_tables), Compiled(_pre), Compiled(_mid), Compiled(_head)


class Model:
    """HF LlamaForCausalLM with random weights + flat views of the same weights for memfit's static path."""

    def __init__(self, cfg: dict, device: torch.device, dtype: torch.dtype):
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(**cfg, attn_implementation="sdpa")
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                hf = LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(prev)
        self.hf = hf.eval().requires_grad_(False)
        self.config, self.device, self.dtype = config, device, dtype
        self.n_layers = config.num_hidden_layers
        self.hq, self.hkv = config.num_attention_heads, config.num_key_value_heads
        self.dh = getattr(config, "head_dim", None) or config.hidden_size // self.hq
        self.eps = float(config.rms_norm_eps)
        self.scale = self.dh**-0.5
        m = hf.model
        self.embed, self.norm, self.lm_head = m.embed_tokens.weight, m.norm.weight, hf.lm_head.weight
        self.inv_freq = m.rotary_emb.inv_freq.float()
        self.rope_scale = float(getattr(m.rotary_emb, "attention_scaling", 1.0))
        self.layers = []
        for layer in m.layers:
            a, mlp = layer.self_attn, layer.mlp
            nq, nk = a.q_proj.weight.shape[0], a.k_proj.weight.shape[0]
            wqkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).contiguous()
            a.q_proj.weight.data, a.k_proj.weight.data = wqkv[:nq], wqkv[nq : nq + nk]
            a.v_proj.weight.data = wqkv[nq + nk :]
            ni = mlp.gate_proj.weight.shape[0]
            wgu = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).contiguous()
            mlp.gate_proj.weight.data, mlp.up_proj.weight.data = wgu[:ni], wgu[ni:]
            self.layers.append((layer.input_layernorm.weight, wqkv, a.o_proj.weight,
                                layer.post_attention_layernorm.weight, wgu, mlp.down_proj.weight))
        free_memory()
        self.weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
        self.embed_bytes = self.embed.numel() * self.embed.element_size()

    def weight_bytes_read(self, batch: int) -> int:
        return self.weight_bytes - self.embed_bytes + batch * self.embed.shape[1] * self.embed.element_size()

    def kv_token_bytes(self) -> int:
        """bf16 K+V bytes of one token across all layers (full cache)."""
        return 2 * self.n_layers * self.hkv * self.dh * torch.finfo(self.dtype).bits // 8


# ----------------------------------------------------------------------------------------------------- stores


def _sdpa_grouped(q, k, v, mask, scale):
    """Decode SDPA without expanding KV heads: the g query heads of a KV head act as g queries of that head."""
    b, hq, dh = q.shape
    hkv = k.shape[1]
    o = F.scaled_dot_product_attention(q.view(b, hkv, hq // hkv, dh), k, v, attn_mask=mask, scale=scale)
    return o.reshape(b, hq * dh)


class SlotStore:
    """bf16 slots (B, Hkv, cap, d) per layer; slots [0, n) hold tokens; the new token goes to slot n."""

    def __init__(self, m: Model, batch: int, cap: int, n0: int, kernels: bool):
        self.m, self.kernels, self.cap = m, kernels, cap
        shape = (batch, m.hkv, cap, m.dh)
        self.k = [torch.zeros(shape, dtype=m.dtype, device=m.device) for _ in range(m.n_layers)]
        self.v = [torch.zeros(shape, dtype=m.dtype, device=m.device) for _ in range(m.n_layers)]
        self.n = torch.full((batch,), n0, dtype=torch.int32, device=m.device)
        self.n_after = self.n.clone()
        self.n_host = n0

    def fill_random(self):
        for t in self.k + self.v:
            t.normal_()

    def load(self, ks, vs):
        for l_, (k, v) in enumerate(zip(ks, vs, strict=True)):
            self.k[l_][:, :, : k.shape[2]].copy_(k)
            self.v[l_][:, :, : v.shape[2]].copy_(v)

    def begin(self, pos):
        torch.add(self.n, 1, out=self.n_after)
        if not self.kernels:
            b = self.n.shape[0]
            self.idx = self.n.long()[:, None, None, None].expand(b, self.m.hkv, 1, self.m.dh)
            ar = torch.arange(self.cap, device=self.n.device)
            self.mask = (ar[None, :] < self.n_after[:, None])[:, None, None, :]

    def attend(self, layer, q, k, v):
        if self.kernels:  # the kernel writes the new token into slot n itself
            from memfit.kernels.kivi_attention import decode_attention

            o = decode_attention(q, self.k[layer], self.v[layer], self.n_after, scale=self.m.scale, k_new=k,
                                 v_new=v, append_at=self.n)
            return o.reshape(q.shape[0], -1)
        self.k[layer].scatter_(2, self.idx, k[:, :, None])
        self.v[layer].scatter_(2, self.idx, v[:, :, None])
        return _sdpa_grouped(q, self.k[layer], self.v[layer], self.mask, self.m.scale)

    def end(self):
        self.n.copy_(self.n_after)

    def host_step(self):
        self.n_host += 1

    def steps_until_flush(self):
        return 1 << 30

    def kv_bytes(self, tokens: int) -> int:
        b = self.n.shape[0]
        return b * tokens * self.m.kv_token_bytes()

    def alloc_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class KiviStore:
    """Packed KIVI buffers per layer + a bf16 residual of R slots; n_q quantized + n_r residual tokens per row."""

    def __init__(self, m: Model, batch: int, cap_q: int, nq0: int, nr0: int, bits: int, kernels: bool,
                 group: int = KIVI_GROUP, residual: int = KIVI_RESIDUAL, allocate: bool = True):
        self.m, self.kernels, self.bits, self.group, self.R = m, kernels, bits, group, residual
        b, dev = batch, m.device
        assert cap_q % residual == 0 and residual % group == 0 and nq0 % residual == 0
        self.cap_q, self.batch = cap_q, batch
        L_ = m.n_layers
        self.kc, self.ks, self.kz, self.vc, self.vs, self.vz, self.kr, self.vr = ([None] * L_ for _ in range(8))
        if allocate:
            for layer in range(L_):
                self.alloc_layer(layer)
        self.nq = torch.full((b,), nq0, dtype=torch.int32, device=dev)
        self.nr = torch.full((b,), nr0, dtype=torch.int32, device=dev)
        self.nr_after = self.nr.clone()
        self.nq_host, self.nr_host = nq0, nr0
        self.flush_ms: list[float] = []

    def alloc_layer(self, layer: int):
        """Allocate one layer's buffers (zeroed): prefill converts layer by layer, so bf16 + packed never coexist."""
        b, h, d, dev, cap_q, G, R = self.batch, self.m.hkv, self.m.dh, self.m.device, self.cap_q, self.group, self.R
        cpb = 8 // self.bits
        self.kc[layer] = torch.zeros(b, h, cap_q // cpb, d, dtype=torch.uint8, device=dev)
        self.ks[layer] = torch.zeros(b, h, cap_q // G, d, dtype=torch.float16, device=dev)
        self.kz[layer] = torch.zeros(b, h, cap_q // G, d, dtype=torch.float16, device=dev)
        self.vc[layer] = torch.zeros(b, h, cap_q, d // cpb, dtype=torch.uint8, device=dev)
        self.vs[layer] = torch.zeros(b, h, cap_q, d // G, dtype=torch.float16, device=dev)
        self.vz[layer] = torch.zeros(b, h, cap_q, d // G, dtype=torch.float16, device=dev)
        self.kr[layer] = torch.zeros(b, h, R, d, dtype=self.m.dtype, device=dev)
        self.vr[layer] = torch.zeros(b, h, R, d, dtype=self.m.dtype, device=dev)

    def tensors(self):
        ts = self.kc + self.ks + self.kz + self.vc + self.vs + self.vz + self.kr + self.vr
        return [t for t in ts if t is not None]

    def fill_random(self):
        for t in self.kc + self.vc:
            t.random_(0, 256)
        for t in self.ks + self.vs:
            t.uniform_(0.01, 0.1)
        for t in self.kz + self.vz:
            t.normal_(0.0, 0.5)
        for t in self.kr + self.vr:
            t.normal_()

    def load(self, ks, vs):
        """Quantize kept bf16 tokens (B, Hkv, n, d) per layer: n_q = n // R * R packed, the rest residual."""
        n = ks[0].shape[2]
        nq = n // self.R * self.R
        for l_, (k, v) in enumerate(zip(ks, vs, strict=True)):
            self._write_quant(l_, k[:, :, :nq], v[:, :, :nq], 0)
            self.kr[l_][:, :, : n - nq].copy_(k[:, :, nq:])
            self.vr[l_][:, :, : n - nq].copy_(v[:, :, nq:])
        self.nq_host, self.nr_host = nq, n - nq
        self.nq.fill_(nq)
        self.nr.fill_(n - nq)

    def _write_quant(self, layer, k, v, at):
        if k.shape[2] == 0:
            return
        cpb, G, t = 8 // self.bits, self.group, k.shape[2]
        qk = quantize(k, self.bits, "token", G)
        qv = quantize(v, self.bits, "channel", G)
        self.kc[layer][:, :, at // cpb : (at + t) // cpb].copy_(qk.codes)
        self.ks[layer][:, :, at // G : (at + t) // G].copy_(qk.scales)
        self.kz[layer][:, :, at // G : (at + t) // G].copy_(qk.zeros)
        self.vc[layer][:, :, at : at + t].copy_(qv.codes)
        self.vs[layer][:, :, at : at + t].copy_(qv.scales)
        self.vz[layer][:, :, at : at + t].copy_(qv.zeros)

    def begin(self, pos):
        torch.add(self.nr, 1, out=self.nr_after)
        if not self.kernels:
            b = self.nr.shape[0]
            self.idx = self.nr.long()[:, None, None, None].expand(b, self.m.hkv, 1, self.m.dh)
            dev = self.nr.device
            self.mask = torch.cat([torch.arange(self.cap_q, device=dev)[None] < self.nq[:, None],
                                   torch.arange(self.R, device=dev)[None] < self.nr_after[:, None]],
                                  dim=1)[:, None, None, :]

    def attend(self, layer, q, k, v):
        if self.kernels:  # the kernel writes the new token into residual slot n_r itself
            from memfit.kernels.kivi_attention import kivi_decode_attention

            o = kivi_decode_attention(q, self.kc[layer], self.ks[layer], self.kz[layer], self.vc[layer],
                                      self.vs[layer], self.vz[layer], self.kr[layer], self.vr[layer], self.nq,
                                      self.nr_after, bits=self.bits, group_size=self.group, scale=self.m.scale,
                                      k_new=k, v_new=v, append_at=self.nr)
            return o.reshape(q.shape[0], -1)
        self.kr[layer].scatter_(2, self.idx, k[:, :, None])
        self.vr[layer].scatter_(2, self.idx, v[:, :, None])
        kd = REF.dequantize_keys(self.kc[layer], self.ks[layer], self.kz[layer], self.bits, self.group)
        vd = REF.dequantize_values(self.vc[layer], self.vs[layer], self.vz[layer], self.bits, self.group)
        kk = torch.cat([kd.to(q.dtype), self.kr[layer]], dim=2)
        vv = torch.cat([vd.to(q.dtype), self.vr[layer]], dim=2)
        return _sdpa_grouped(q, kk, vv, self.mask, self.m.scale)

    def end(self):
        self.nr.copy_(self.nr_after)

    def host_step(self):
        self.nr_host += 1
        if self.nr_host == self.R:
            self.flush()

    def steps_until_flush(self):
        return self.R - self.nr_host

    def flush(self):
        """Quantize the full residual (R tokens) into the packed buffers at n_q (eager, outside the graph)."""
        if self.nq_host + self.R > self.cap_q:
            raise RuntimeError("KIVI store full: raise cap_q")
        sync(self.m.device)
        t0 = time.perf_counter()
        b = self.nr.shape[0]
        step = max(1, min(b, 64))
        for layer in range(self.m.n_layers):
            for r0 in range(0, b, step):  # in row chunks: bounded fp32 temporaries at large batch
                kr, vr = self.kr[layer][r0 : r0 + step], self.vr[layer][r0 : r0 + step]
                qk = quantize(kr, self.bits, "token", self.group)
                qv = quantize(vr, self.bits, "channel", self.group)
                cpb, G, at, R = 8 // self.bits, self.group, self.nq_host, self.R
                self.kc[layer][r0 : r0 + step, :, at // cpb : (at + R) // cpb].copy_(qk.codes)
                self.ks[layer][r0 : r0 + step, :, at // G : (at + R) // G].copy_(qk.scales)
                self.kz[layer][r0 : r0 + step, :, at // G : (at + R) // G].copy_(qk.zeros)
                self.vc[layer][r0 : r0 + step, :, at : at + R].copy_(qv.codes)
                self.vs[layer][r0 : r0 + step, :, at : at + R].copy_(qv.scales)
                self.vz[layer][r0 : r0 + step, :, at : at + R].copy_(qv.zeros)
        self.nq_host += self.R
        self.nr_host = 0
        self.nq.fill_(self.nq_host)
        self.nr.zero_()
        sync(self.m.device)
        self.flush_ms.append((time.perf_counter() - t0) * 1e3)

    def kv_bytes(self, tokens: int) -> int:
        """Bytes a KIVI cache holding `tokens` tokens keeps: packed codes + scales + zeros + the bf16 residual."""
        b, L_, h, d = self.nr.shape[0], self.m.n_layers, self.m.hkv, self.m.dh
        nq = tokens // self.R * self.R
        nr = tokens - nq
        cpb, G = 8 // self.bits, self.group
        per_head = (nq // cpb * d + 2 * 2 * (nq // G) * d) + (nq * d // cpb + 2 * 2 * nq * (d // G))
        per_head += 2 * nr * d * torch.finfo(self.m.dtype).bits // 8
        return b * L_ * h * per_head

    def alloc_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


class H2OStore:
    """H2O with budget + 1 slots per layer: the new token takes the slot the previous step evicted."""

    def __init__(self, m: Model, batch: int, budget: int, kernels: bool, recent: int):
        self.m, self.kernels, self.recent = m, kernels, recent
        self.cap = cap = budget + 1
        b, h, d, dev, L_ = batch, m.hkv, m.dh, m.device, m.n_layers
        self.k = [torch.zeros(b, h, cap, d, dtype=m.dtype, device=dev) for _ in range(L_)]
        self.v = [torch.zeros(b, h, cap, d, dtype=m.dtype, device=dev) for _ in range(L_)]
        self.acc = [torch.zeros(b, h, cap, dtype=torch.float32, device=dev) for _ in range(L_)]
        self.pos = [torch.full((b, h, cap), -1, dtype=torch.int32, device=dev) for _ in range(L_)]
        self.free = [torch.full((b, h), budget, dtype=torch.int32, device=dev) for _ in range(L_)]
        self.n = torch.full((b,), budget, dtype=torch.int32, device=dev)
        self.n_after = self.n.clone()

    def fill_random(self, context: int | None = None):
        budget = self.cap - 1
        context = context or budget
        for layer in range(self.m.n_layers):
            self.k[layer].normal_()
            self.v[layer].normal_()
            self.acc[layer].uniform_(0.0, 4.0)
            # kept tokens: the most recent half of the budget + older heavy hitters, in increasing position
            heavy = budget - budget // 2
            p = torch.cat([torch.arange(heavy, device=self.m.device) * max(1, (context - budget // 2) // heavy),
                           torch.arange(context - budget // 2, context, device=self.m.device)])
            self.pos[layer][:, :, :budget] = p.to(torch.int32)

    def begin(self, pos):
        self.cur = pos
        torch.clamp(self.n + 1, max=self.cap, out=self.n_after)
        if not self.kernels:
            self.valid = (torch.arange(self.cap, device=pos.device)[None] < self.n_after[:, None])[:, None, :]

    def attend(self, layer, q, k, v):
        b, h, d = q.shape[0], self.m.hkv, self.m.dh
        if self.kernels:  # new token written into the freed slot (k, v, pos, acc) inside the kernels
            from memfit.kernels.h2o_decode import h2o_decode

            o, _ = h2o_decode(q, self.k[layer], self.v[layer], self.n_after, self.acc[layer], self.pos[layer],
                              self.cur, self.recent, scale=self.m.scale, k_new=k, v_new=v, slot=self.free[layer],
                              victim=self.free[layer])
            return o.reshape(b, -1)
        idx = self.free[layer].long()
        self.k[layer].scatter_(2, idx[..., None, None].expand(b, h, 1, d), k[:, :, None])
        self.v[layer].scatter_(2, idx[..., None, None].expand(b, h, 1, d), v[:, :, None])
        self.pos[layer].scatter_(2, idx[..., None], self.cur[:, None, None].expand(b, h, 1))
        self.acc[layer].scatter_(2, idx[..., None], 0.0)
        hq = q.shape[1]
        qg = q.view(b, h, hq // h, d)
        s = torch.matmul(qg, self.k[layer].transpose(-1, -2)).float() * self.m.scale
        s = s.masked_fill(~self.valid[:, :, None, :], float("-inf"))
        p = torch.softmax(s, dim=-1)
        o = torch.matmul(p.to(q.dtype), self.v[layer])
        self.acc[layer].add_(p.sum(dim=2))
        cand = torch.where(self.pos[layer] > (self.cur - self.recent)[:, None, None], float("inf"), self.acc[layer])
        cand = torch.where(self.valid, cand, float("-inf"))
        self.free[layer].copy_(cand.argmin(dim=-1))
        return o.reshape(b, -1)

    def end(self):
        self.n.copy_(self.n_after)

    def host_step(self):
        pass

    def steps_until_flush(self):
        return 1 << 30

    def kv_bytes(self, tokens: int) -> int:
        b = self.n.shape[0]
        return b * min(tokens, self.cap) * self.m.kv_token_bytes()

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.acc + self.pos)

    def alloc_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v + self.acc + self.pos + self.free)


# --------------------------------------------------------------------------------------------------- decoder


class Decoder:
    """One greedy decode step for the whole batch over a store; `capture()` records it in a CUDA graph."""

    def __init__(self, m: Model, store, batch: int, context: int, seed: int = 0):
        self.m, self.store = m, store
        gen = torch.Generator(device="cpu").manual_seed(seed)
        self.tokens = torch.randint(0, m.embed.shape[0], (batch,), generator=gen).to(m.device)
        self.pos = torch.full((batch,), context, dtype=torch.int32, device=m.device)
        self.graph = None
        self.logits = None

    def step(self):
        m, st = self.m, self.store
        x = F.embedding(self.tokens, m.embed)
        cos, sin = ROPE(self.pos, m.inv_freq, m.rope_scale, m.dtype)
        st.begin(self.pos)
        ln1, wqkv = m.layers[0][:2]
        q, k, v = PRE(x, ln1, wqkv, cos, sin, m.eps, m.hq, m.hkv, m.dh)
        for layer in range(m.n_layers):
            o = st.attend(layer, q, k, v)
            _, _, wo, ln2, wgu, wd = m.layers[layer]
            if layer < m.n_layers - 1:
                ln1n, wqkvn = m.layers[layer + 1][:2]
                x, q, k, v = MID(x, o, wo, ln2, wgu, wd, ln1n, wqkvn, cos, sin, m.eps, m.hq, m.hkv, m.dh)
            else:
                logits, nxt = HEAD(x, o, wo, ln2, wgu, wd, m.norm, m.lm_head, m.eps)
        self.tokens.copy_(nxt)
        st.end()
        self.pos.add_(1)
        self.logits = logits
        return logits

    def run_eager(self, n=1):
        for _ in range(n):
            self.step()
            self.store.host_step()

    def capture(self, warmup=2):
        dev = self.m.device
        if dev.type != "cuda":
            self.run_eager(warmup)
            return False
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            self.run_eager(warmup)
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        free_memory()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            self.step()
        self.graph = g
        return True

    def replay(self):
        if self.graph is not None:
            self.graph.replay()
        else:
            self.step()
        self.store.host_step()


def time_decoder(dec: Decoder, target_s: float, min_steps=8, max_steps=200) -> float:
    dev = dec.m.device
    with Timer(dev) as t:
        for _ in range(3):
            dec.replay()
    est = t.ms / 3
    n = int(max(min_steps, min(max_steps, target_s * 1e3 / max(est, 1e-3))))
    # room left before the store overflows
    st = dec.store
    if isinstance(st, SlotStore):
        n = min(n, st.cap - st.n_host - 1)
    times = []
    left = n
    while left > 0:
        until = st.steps_until_flush()
        k = min(left, until - 1)
        if k <= 0:
            dec.replay()  # triggers a flush in host_step
            left -= 1
            continue
        with Timer(dev) as tt:
            for _ in range(k):
                if dec.graph is not None:
                    dec.graph.replay()
                else:
                    dec.step()
        for _ in range(k):
            st.host_step()
        times.append((tt.ms, k))
        left -= k
    steps = sum(k for _, k in times)
    return sum(ms for ms, _ in times) / max(1, steps)


# ---------------------------------------------------------------------------------------------------- prefill


def _chunk_attention(q, k, v, scale):
    """Causal attention of c new queries (the last c of T keys), per KV head group (KV heads never expanded whole)."""
    from torch.nn.attention.bias import causal_lower_right

    b, hq, c, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    g = hq // hkv
    mask = causal_lower_right(c, t)
    outs = []
    for h in range(hkv):
        kh = k[:, h : h + 1].expand(b, g, t, d).contiguous()
        vh = v[:, h : h + 1].expand(b, g, t, d).contiguous()
        outs.append(F.scaled_dot_product_attention(q[:, h * g : (h + 1) * g], kh, vh, attn_mask=mask, scale=scale))
        del kh, vh
    return torch.cat(outs, dim=1)


def _snap_select(qw, k, budget: int, window: int, kernel: int, scale: float):
    """SnapKV-style selection: the last `window` queries' fp32 attention over all held keys, summed over the window,
    averaged over the GQA group, max-pooled; the window itself is protected. Returns sorted indices (B, Hkv, budget)."""
    b, hq, w, d = qw.shape
    hkv, t = k.shape[1], k.shape[2]
    g = hq // hkv
    logits = torch.matmul(qw.float().reshape(b, hkv, g * w, d), k.float().transpose(-1, -2)) * scale
    qi = (torch.arange(w, device=k.device) + t - w).repeat(g)
    logits.masked_fill_(torch.arange(t, device=k.device)[None, :] > qi[:, None], float("-inf"))
    scores = torch.softmax(logits, dim=-1).sum(dim=2) / g
    del logits
    scores = F.max_pool1d(scores.view(-1, 1, t), kernel, stride=1, padding=kernel // 2)[..., :t].view(b, hkv, t)
    scores[..., t - min(window, t) :] = float("inf")
    return scores.topk(budget, dim=-1).indices.sort(dim=-1).values


@torch.no_grad()
def flat_prefill(m: Model, ids, budget: int | None, chunk: int, window=SNAP_WINDOW, kernel=SNAP_KERNEL):
    """memfit's chunked prefill: returns per-layer kept K/V (B, Hkv, n, d) and the last token's logits.
    budget None: full cache (written in place into a preallocated buffer); else evict after every chunk."""
    b, n_tok = ids.shape
    L_ = m.n_layers
    if budget is None:
        ks = [torch.empty(b, m.hkv, n_tok, m.dh, dtype=m.dtype, device=m.device) for _ in range(L_)]
        vs = [torch.empty(b, m.hkv, n_tok, m.dh, dtype=m.dtype, device=m.device) for _ in range(L_)]
    else:
        ks, vs = [None] * L_, [None] * L_
    for c0 in range(0, n_tok, chunk):
        c1 = min(n_tok, c0 + chunk)
        c = c1 - c0
        x = F.embedding(ids[:, c0:c1], m.embed)
        pos = torch.arange(c0, c1, device=m.device)[None].expand(b, c)
        cos, sin = _rope_tables(pos, m.inv_freq, m.rope_scale, m.dtype)
        cos, sin = cos[:, None], sin[:, None]
        for layer, (ln1, wqkv, wo, ln2, wgu, wd) in enumerate(m.layers):
            qkv = _rms(x, ln1, m.eps) @ wqkv.t()
            q = qkv[..., : m.hq * m.dh].view(b, c, m.hq, m.dh).transpose(1, 2)
            k = qkv[..., m.hq * m.dh : (m.hq + m.hkv) * m.dh].view(b, c, m.hkv, m.dh).transpose(1, 2)
            v = qkv[..., (m.hq + m.hkv) * m.dh :].view(b, c, m.hkv, m.dh).transpose(1, 2)
            del qkv
            q = q * cos + _rot(q) * sin
            k = k * cos + _rot(k) * sin
            if budget is None:
                ks[layer][:, :, c0:c1] = k
                vs[layer][:, :, c0:c1] = v
                ka, va = ks[layer][:, :, :c1], vs[layer][:, :, :c1]
            else:
                ka = k if ks[layer] is None else torch.cat([ks[layer], k], dim=2)
                va = v.contiguous() if vs[layer] is None else torch.cat([vs[layer], v], dim=2)
                ks[layer] = vs[layer] = None
            del k, v
            o = _chunk_attention(q, ka, va, m.scale)
            if budget is not None:
                if ka.shape[2] > budget:
                    idx = _snap_select(q[:, :, -window:], ka, budget, window, kernel, m.scale)
                    idx = idx[..., None].expand(-1, -1, -1, m.dh)
                    ka, va = ka.gather(2, idx), va.gather(2, idx)
                    del idx
                ks[layer], vs[layer] = ka.contiguous(), va.contiguous()
            del ka, va, q
            x = x + o.transpose(1, 2).reshape(b, c, m.hq * m.dh) @ wo.t()
            del o
            g_, u_ = (_rms(x, ln2, m.eps) @ wgu.t()).chunk(2, dim=-1)
            x = x + (F.silu(g_) * u_) @ wd.t()
            del g_, u_
    logits = _rms(x[:, -1], m.norm, m.eps) @ m.lm_head.t()
    return ks, vs, logits


def _call_kw(hf):
    import inspect

    return "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"


def _new_dynamic_cache(m: Model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=m.config)
    except TypeError:
        return DynamicCache()


@torch.no_grad()
def hf_forward(m: Model, ids, cache, position_ids=None):
    kw = {_call_kw(m.hf): cache}
    out = m.hf(input_ids=ids, position_ids=position_ids, use_cache=True, logits_to_keep=1, **kw)
    return out.logits[:, -1]


def measure_peak(m: Model, fn):
    """(result, peak bytes allocated above the weights, ms)."""
    dev = m.device
    free_memory()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    sync(dev)
    t0 = time.perf_counter()
    res = fn()
    sync(dev)
    ms = (time.perf_counter() - t0) * 1e3
    peak = torch.cuda.max_memory_allocated(dev) - m.weight_bytes if dev.type == "cuda" else None
    return res, peak, ms


# ----------------------------------------------------------------------------------------------- benchmark


SPECS = {
    # name: (store kind, bits, budget fraction)
    "full": ("full", None, None),
    "snapkv": ("evict", None, 0.25),
    "snapkv+kivi2": ("kivi", 2, 0.25),
    "snapkv+kivi4": ("kivi", 4, 0.25),
    "h2o": ("h2o", None, 0.25),
}


def budget_tokens(frac, context):
    return None if frac is None else int(round(frac * context))


def make_store(m: Model, method: str, context: int, batch: int, kernels: bool):
    kind, bits, frac = SPECS[method]
    budget = budget_tokens(frac, context)
    if kind == "full":
        return SlotStore(m, batch, context + HEADROOM, context, kernels), context
    if kind == "evict":
        return SlotStore(m, batch, budget + HEADROOM, budget, kernels), budget
    if kind == "kivi":
        nq0 = budget // KIVI_RESIDUAL * KIVI_RESIDUAL
        cap_q = nq0 + -(-HEADROOM // KIVI_RESIDUAL) * KIVI_RESIDUAL + KIVI_RESIDUAL
        return KiviStore(m, batch, cap_q, nq0, budget - nq0, bits, kernels), budget
    if kind == "h2o":
        return H2OStore(m, batch, budget, kernels, recent=int(round(budget * H2O_RECENT_FRACTION))), budget
    raise ValueError(method)


def per_row_bytes(m: Model, method: str, context: int, kernels: bool) -> int:
    """Estimate of the memory one batch row needs at decode (store + transient work), for the max-batch search."""
    kind, bits, frac = SPECS[method]
    budget = budget_tokens(frac, context)
    tok = m.kv_token_bytes()
    act = 4 * m.embed.shape[0] * 2 + 64 * m.config.hidden_size * 2  # logits etc.
    if kind == "full":
        return (context + HEADROOM) * tok + act
    if kind == "evict":
        return (budget + HEADROOM) * tok + act + (0 if kernels else 0)
    if kind == "h2o":
        extra = (budget + 1) * m.hkv * 8 * m.n_layers + (m.hq * (budget + 1) * 4 * (1 if kernels else 6))
        return (budget + 1) * tok + extra + act
    cap_q = budget + 2 * HEADROOM
    cpb = 8 // bits
    per_tok_layer = m.hkv * (m.dh // cpb * 2 + 2 * 2 * m.dh // KIVI_GROUP * 2)
    store = m.n_layers * (cap_q * per_tok_layer + 2 * KIVI_RESIDUAL * m.hkv * m.dh * 2)
    work = 0 if kernels else cap_q * m.hkv * m.dh * 2 * (4 + 2 + 2 + 2)  # fp32 dequant + bf16 + cat, K and V
    return store + work + act


def free_bytes(dev) -> int:
    free_memory()
    if dev.type != "cuda":
        return 8 * GiB
    return torch.cuda.mem_get_info(dev)[0]


def search_max_batch(ok, estimate: int, max_probes: int = 5, tol: float = 0.04) -> int:
    """Largest batch b with ok(b) (ok is monotone), starting from an estimate; within `tol` of the true maximum."""
    probes = 0
    b = max(1, estimate)
    lo, hi = 0, None
    if ok(b):
        lo = b
        probes += 1
        while probes < max_probes:
            nb = max(lo + 1, int(lo * (1 + 2 * tol)))
            probes += 1
            if ok(nb):
                lo = nb
            else:
                hi = nb
                break
    else:
        hi = b
        probes += 1
        while probes < max_probes and lo == 0:
            nb = max(1, int(hi * 0.85))
            probes += 1
            if nb == hi:
                break
            if ok(nb):
                lo = nb
            else:
                hi = nb
    while hi is not None and probes < max_probes and hi - lo > max(1, int(tol * lo)):
        mid = (lo + hi) // 2
        probes += 1
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo


class Bench:
    def __init__(self, args):
        self.args = args
        self.t_start = time.time()
        self.dev = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
        self.dtype = torch.bfloat16 if self.dev.type == "cuda" else torch.float32
        self.rows: list[dict] = []
        self.prefill: dict = {}
        Compiled.enabled = not args.no_compile and self.dev.type == "cuda"
        self.env = self._env()

    def left(self) -> float:
        return self.args.time_limit - (time.time() - self.t_start)

    def _env(self):
        import transformers

        env = {"torch": torch.__version__, "transformers": transformers.__version__}
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError:
            env["triton"] = None
        env["device"] = torch.cuda.get_device_name(self.dev) if self.dev.type == "cuda" else "cpu"
        try:
            env["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                               text=True).stdout.strip() or None
        except OSError:
            env["git_commit"] = None
        return env

    def write(self, row: dict):
        row = {**row, **self.env, "compiled": Compiled.enabled, "kivi_variant": getattr(self, "kivi_variant", None),
               "time": datetime.datetime.now().isoformat()}
        row = stamp(row)  # + provenance: machine, versions, commit (and whether the tree was dirty), command
        self.rows.append(row)
        with open(self.args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        short = {k: row.get(k) for k in ("method", "impl", "context", "batch", "decode_ms_per_token",
                                         "roofline_fraction", "tokens_per_second", "prefill_peak_bytes_above_weights",
                                         "error") if row.get(k) is not None}
        log("ROW", json.dumps(short))

    # ---------------------------------------------------------------------------------------- measurements
    def measure_bandwidth(self):
        dev = self.dev
        if dev.type != "cuda":
            self.bw = 50e9
            return
        n = (4 * GiB) // 2
        x = torch.empty(n, dtype=torch.bfloat16, device=dev).normal_()
        y = torch.empty_like(x)
        for _ in range(3):
            y.copy_(x)
        times = []
        for _ in range(10):
            with Timer(dev) as t:
                y.copy_(x)
            times.append(t.ms)
        times.sort()
        ms = times[len(times) // 2]
        self.bw = 2 * x.numel() * x.element_size() / (ms * 1e-3)
        del x, y
        free_memory()
        log(f"copy bandwidth {self.bw / 1e12:.3f} TB/s (median of 10 x 4 GiB copies)")

    def roofline_ms(self, batch: int, kv_bytes: int) -> float:
        return (self.m.weight_bytes_read(batch) + kv_bytes) / self.bw * 1e3

    def base_row(self, method, impl, context, batch, kernels):
        kind, bits, frac = SPECS.get(method, ("full", None, None))
        return {"method": method, "impl": impl, "kernels": kernels, "budget": frac, "bits": bits,
                "context": context, "batch": batch, "weight_bytes": self.m.weight_bytes,
                "weight_bytes_read": self.m.weight_bytes_read(batch), "bandwidth_bytes_per_s": self.bw,
                "kv_bytes_full": batch * context * self.m.kv_token_bytes()}

    def decode_row(self, method, context, batch, kernels, is_max=False, from_prefill=None):
        m = self.m
        impl = "memfit-kernels" if kernels else "memfit-torch"
        row = self.base_row(method, impl, context, batch, kernels)
        row["is_max_batch"] = is_max
        store = dec = None
        if self.dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            store, held = make_store(m, method, context, batch, kernels)
            if from_prefill is not None:
                store.load(*from_prefill)
            else:
                store.fill_random(context) if isinstance(store, H2OStore) else store.fill_random()
            dec = Decoder(m, store, batch, context)
            try:
                row["cuda_graph"] = dec.capture()
            except Exception as e:  # noqa: BLE001 - capture of compiled code failed: retry with eager functions
                if is_oom(e) or not Compiled.enabled:
                    raise
                Compiled.enabled = False
                Compiled.errors.append(f"capture: {type(e).__name__}: {str(e)[:300]}")
                log("CUDA graph capture failed with compiled functions; eager functions from now on:", e)
                torch.cuda.synchronize()
                dec = Decoder(m, store, batch, context)
                row["cuda_graph"] = dec.capture()
            step_ms = time_decoder(dec, self.args.target_s)
            flush_ms = None
            if isinstance(store, KiviStore):
                if not store.flush_ms:
                    store.flush()
                flush_ms = sorted(store.flush_ms)[len(store.flush_ms) // 2]
            ms = step_ms + (flush_ms / store.R if flush_ms else 0.0)
            kv = store.kv_bytes(held)
            state = store.state_bytes() if isinstance(store, H2OStore) else 0
            roof = self.roofline_ms(batch, kv + state)
            row.update(decode_ms_per_token=ms, step_ms=step_ms, flush_ms=flush_ms, held_tokens=held, kv_bytes=kv,
                       state_bytes=state, kv_alloc_bytes=store.alloc_bytes(), roofline_ms=roof,
                       roofline_fraction=roof / ms, tokens_per_second=batch / ms * 1e3,
                       decode_start="prefill" if from_prefill is not None else "random-fill")
            if self.dev.type == "cuda":
                row["peak_bytes_above_weights"] = torch.cuda.max_memory_allocated() - m.weight_bytes
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            if not is_oom(e):
                traceback.print_exc()
        finally:
            del store, dec
            free_memory()
        pf = self.prefill.get((method, context))
        if batch == 1 and pf:
            row.update(pf)
        return row

    def hf_row(self, context, batch, is_max=False, cache=None):
        m = self.m
        row = self.base_row("full", "transformers", context, batch, False)
        row["is_max_batch"] = is_max
        row["cuda_graph"] = False
        if self.dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            if cache is None:
                cache = self.hf_random_cache(context, batch)
            tok = torch.randint(0, m.embed.shape[0], (batch, 1), device=m.device)
            pos = torch.full((batch, 1), context, dtype=torch.long, device=m.device)
            for _ in range(2):
                tok = hf_forward(m, tok, cache, pos).argmax(-1, keepdim=True)
                pos = pos + 1
            with Timer(self.dev) as t:
                hf_forward(m, tok, cache, pos)
            n = int(max(3, min(20, self.args.target_s * 1e3 / max(t.ms, 1e-3))))
            with Timer(self.dev) as t:
                for _ in range(n):
                    tok = hf_forward(m, tok, cache, pos).argmax(-1, keepdim=True)
                    pos = pos + 1
            ms = t.ms / n
            kv = batch * context * m.kv_token_bytes()
            roof = self.roofline_ms(batch, kv)
            row.update(decode_ms_per_token=ms, step_ms=ms, held_tokens=context, kv_bytes=kv, kv_alloc_bytes=kv,
                       roofline_ms=roof, roofline_fraction=roof / ms, tokens_per_second=batch / ms * 1e3)
            if self.dev.type == "cuda":
                row["peak_bytes_above_weights"] = torch.cuda.max_memory_allocated() - m.weight_bytes
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            if not is_oom(e):
                traceback.print_exc()
        finally:
            del cache
            free_memory()
        pf = self.prefill.get(("hf-full", context))
        if batch == 1 and pf:
            row.update(pf)
        return row

    def hf_random_cache(self, context, batch):
        m = self.m
        cache = _new_dynamic_cache(m)
        for layer in range(m.n_layers):
            k = torch.randn(batch, m.hkv, context, m.dh, dtype=m.dtype, device=m.device)
            v = torch.randn(batch, m.hkv, context, m.dh, dtype=m.dtype, device=m.device)
            cache.update(k, v, layer)
            del k, v
        return cache

    def hf_ok(self, context, batch) -> bool:
        cache = None
        try:
            cache = self.hf_random_cache(context, batch)
            tok = torch.zeros(batch, 1, dtype=torch.long, device=self.dev)
            pos = torch.full((batch, 1), context, dtype=torch.long, device=self.dev)
            hf_forward(self.m, tok, cache, pos)
            sync(self.dev)
            return True
        except Exception as e:  # noqa: BLE001
            if not is_oom(e):
                raise
            return False
        finally:
            del cache
            free_memory()

    def store_ok(self, method, context, batch, kernels) -> bool:
        store = dec = None
        try:
            store, _ = make_store(self.m, method, context, batch, kernels)
            dec = Decoder(self.m, store, batch, context)
            dec.step()
            sync(self.dev)
            return True
        except Exception as e:  # noqa: BLE001
            if not is_oom(e):
                raise
            return False
        finally:
            del store, dec
            free_memory()

    def max_batch(self, method, context, kernels) -> int:
        reserve = int(self.args.reserve_gib * GiB)
        avail = free_bytes(self.dev) - reserve
        cap = self.args.max_batch_cap
        if method == "hf-full":
            per = context * self.m.kv_token_bytes() * 1.12
            est = min(cap, int(avail // per))
            return search_max_batch(lambda b: b <= cap and self.hf_ok(context, b), est, max_probes=4)
        per = per_row_bytes(self.m, method, context, kernels)
        est = min(cap, int(avail // per))
        return search_max_batch(lambda b: b <= cap and self.store_ok(method, context, b, kernels), est)

    # -------------------------------------------------------------------------------------------- prefills
    def run_prefills(self, context, kivi_bits=(2, 4)):
        """memfit's chunked prefill at batch 1: evicted (snapkv / h2o rows) and evicted + quantized (KIVI rows)."""
        m = self.m
        gen = torch.Generator(device="cpu").manual_seed(context)
        ids = torch.randint(0, m.embed.shape[0], (1, context), generator=gen).to(m.device)
        chunk = self.args.chunk
        budget = budget_tokens(0.25, context)
        policy = "chunked, SnapKV window scores, evict after every chunk"
        _, peak, ms = measure_peak(m, lambda: flat_prefill(m, ids, budget, chunk)[2])
        log(f"prefill evict ctx={context}: peak above weights {peak / GiB if peak else 0:.3f} GiB, {ms:.0f} ms")
        for meth in ("snapkv", "h2o"):
            self.prefill[(meth, context)] = {"prefill_peak_bytes_above_weights": peak, "prefill_ms": ms,
                                             "prefill_chunk": chunk, "prefill_policy": policy}

        def kivi_prefill(bits):
            # quantize the kept tokens layer by layer at the end, dropping each layer's bf16 copy as it goes
            ks, vs, _ = flat_prefill(m, ids, budget, chunk)
            nq0 = budget // KIVI_RESIDUAL * KIVI_RESIDUAL
            cap_q = nq0 + -(-HEADROOM // KIVI_RESIDUAL) * KIVI_RESIDUAL + KIVI_RESIDUAL
            st = KiviStore(m, 1, cap_q, nq0, budget - nq0, bits, kernels=True, allocate=False)
            n = ks[0].shape[2]
            nq = n // KIVI_RESIDUAL * KIVI_RESIDUAL
            for layer in range(m.n_layers):
                k, v = ks[layer], vs[layer]
                ks[layer] = vs[layer] = None
                st.alloc_layer(layer)
                st._write_quant(layer, k[:, :, :nq], v[:, :, :nq], 0)
                st.kr[layer][:, :, : n - nq].copy_(k[:, :, nq:])
                st.vr[layer][:, :, : n - nq].copy_(v[:, :, nq:])
                del k, v
            return st.alloc_bytes()

        for bits in kivi_bits:
            _, peak_k, ms_k = measure_peak(m, lambda b=bits: kivi_prefill(b))
            log(f"prefill kivi{bits} ctx={context}: peak above weights {peak_k / GiB if peak_k else 0:.3f} GiB")
            self.prefill[(f"snapkv+kivi{bits}", context)] = {
                "prefill_peak_bytes_above_weights": peak_k, "prefill_ms": ms_k, "prefill_chunk": chunk,
                "prefill_policy": policy + ", then quantize"}
        free_memory()

    def run_hf_prefill(self, context):
        m = self.m
        gen = torch.Generator(device="cpu").manual_seed(context)
        ids = torch.randint(0, m.embed.shape[0], (1, context), generator=gen).to(m.device)

        def run():
            cache = _new_dynamic_cache(m)
            hf_forward(m, ids, cache)
            return cache

        cache, peak, ms = measure_peak(m, run)
        self.prefill[("hf-full", context)] = {"prefill_peak_bytes_above_weights": peak, "prefill_ms": ms,
                                              "prefill_chunk": None, "prefill_policy": "one forward"}
        log(f"prefill transformers ctx={context}: peak above weights {peak / GiB if peak else 0:.3f} GiB, {ms:.0f} ms")
        return cache

    # ------------------------------------------------------------------------------------------ self-check
    def selfcheck(self):
        """memfit's flat path vs transformers (same weights), and kernels vs PyTorch per store: one JSONL row."""
        m = self.m
        res = {"method": "selfcheck"}
        n = 300 if self.dev.type == "cuda" else 100
        gen = torch.Generator(device="cpu").manual_seed(1)
        ids = torch.randint(0, m.embed.shape[0], (1, n), generator=gen).to(m.device)
        cache = _new_dynamic_cache(m)
        ref = hf_forward(m, ids, cache).float()
        ks, vs, logits = flat_prefill(m, ids, None, chunk=128)
        res["prefill_vs_transformers_rel_err"] = ((logits.float() - ref).abs().max() / ref.abs().max()).item()
        forced = torch.randint(0, m.embed.shape[0], (4,), generator=gen).to(m.device)
        for kernels in (False, True):
            st = SlotStore(m, 1, n + 16, n, kernels)
            st.load(ks, vs)
            dec = Decoder(m, st, 1, n)
            c2 = _new_dynamic_cache(m)
            hf_forward(m, ids, c2)
            errs = []
            for i in range(4):
                dec.tokens.fill_(int(forced[i]))
                out = dec.step().float()
                r = hf_forward(m, forced[i].view(1, 1), c2, torch.tensor([[n + i]], device=m.device)).float()
                errs.append(((out - r).abs().max() / r.abs().max()).item())
            res[f"decode_vs_transformers_rel_err_{'kernels' if kernels else 'torch'}"] = max(errs)
            del st, dec, c2
        del ks, vs, cache
        free_memory()
        # kernels vs torch on the same random store contents, teacher-forced through a KIVI flush
        # budget = 2R + R - 3 tokens: the KIVI residual holds R - 3, so the 3rd step flushes it
        ctx = 4 * (3 * KIVI_RESIDUAL - 3)
        for method in ("snapkv", "snapkv+kivi2", "snapkv+kivi4", "h2o"):
            outs = {}
            for kernels in (False, True):
                torch.manual_seed(7)
                st, _ = make_store(m, method, ctx, 2, kernels)
                st.fill_random(ctx) if isinstance(st, H2OStore) else st.fill_random()
                dec = Decoder(m, st, 2, ctx, seed=3)
                steps = 6
                gen = torch.Generator(device="cpu").manual_seed(5)
                lg = []
                for _ in range(steps):
                    dec.tokens.copy_(torch.randint(0, m.embed.shape[0], (2,), generator=gen).to(m.device))
                    lg.append(dec.step().float())
                    st.host_step()
                outs[kernels] = (torch.stack(lg), [f.clone() for f in st.free] if isinstance(st, H2OStore) else None)
                del st, dec
            a, b = outs[False][0], outs[True][0]
            res[f"{method}_kernels_vs_torch_logits_rel_err"] = ((a - b).abs().max() / a.abs().max()).item()
            if outs[False][1] is not None:
                same = sum(int(torch.equal(x, y)) for x, y in zip(outs[False][1], outs[True][1], strict=True))
                res[f"{method}_victims_equal_layers"] = f"{same}/{m.n_layers}"
            free_memory()
        self.write(res)
        return res

    def kernel_bench(self):
        """The attention kernels alone, each replayed from a CUDA graph of 20 launches: us per call, GB/s of cache
        read, fraction of copy bandwidth. Also picks the KIVI tile path (packed / gather) per regime."""
        from memfit.kernels import kivi_attention as KA
        from memfit.kernels.h2o_decode import h2o_decode

        dev, hq, hkv, d, G, R, reps = self.dev, 32, 8, 128, KIVI_GROUP, KIVI_RESIDUAL, 20
        scale = d**-0.5

        def bench(fn):
            fn()
            sync(dev)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(reps):
                    fn()
            g.replay()
            sync(dev)
            times = []
            for _ in range(5):
                with Timer(dev) as t:
                    g.replay()
                times.append(t.ms / reps)
            del g
            return sorted(times)[2] * 1e3

        best = {}
        for batch, tokens in ((1, 8192), (1, 32768), (64, 8192), (256, 8192)):
            if self.left() < 60:
                break
            q = torch.randn(batch, hq, d, device=dev, dtype=self.dtype)
            for bits in (2, 4):
                cpb = 8 // bits
                kc = torch.randint(0, 256, (batch, hkv, tokens // cpb, d), dtype=torch.uint8, device=dev)
                vc = torch.randint(0, 256, (batch, hkv, tokens, d // cpb), dtype=torch.uint8, device=dev)
                ks = torch.rand(batch, hkv, tokens // G, d, device=dev, dtype=torch.float16) * 0.1
                kz = torch.randn(batch, hkv, tokens // G, d, device=dev, dtype=torch.float16)
                vs = torch.rand(batch, hkv, tokens, d // G, device=dev, dtype=torch.float16) * 0.1
                vz = torch.randn(batch, hkv, tokens, d // G, device=dev, dtype=torch.float16)
                kr = torch.randn(batch, hkv, R, d, device=dev, dtype=self.dtype)
                vr = torch.randn(batch, hkv, R, d, device=dev, dtype=self.dtype)
                nq = torch.full((batch,), tokens, dtype=torch.int32, device=dev)
                nr = torch.full((batch,), R, dtype=torch.int32, device=dev)
                args = (q, kc, ks, kz, vc, vs, vz, kr, vr, nq, nr)
                nbytes = sum(t.numel() * t.element_size() for t in args[1:9])
                ref = None
                if batch * tokens <= 64 * 8192:
                    ref = REF.kivi_decode_attention_ref(*args, bits=bits, group_size=G, scale=scale).float()
                for name in KA.VARIANTS:
                    if name == "gather" and (batch, tokens) != (1, 8192):
                        continue
                    fn = functools.partial(KA.kivi_decode_attention, *args, bits=bits, group_size=G, scale=scale,
                                           packed=name)
                    try:
                        err = None
                        if ref is not None:
                            err = (fn().float() - ref).abs().max().item()
                            if not err < 5e-2:
                                log(f"kernel variant {name} bits={bits} rejected: max abs err {err}")
                                continue
                        us = bench(fn)
                    except Exception as e:  # noqa: BLE001
                        log("kernel bench failed", name, bits, e)
                        continue
                    best.setdefault((batch, tokens, bits), []).append((us, name))
                    self.write({"method": f"kernel:kivi{bits}", "impl": name, "batch": batch, "context": tokens,
                                "kernel_us": us, "kv_bytes": nbytes, "gbps": nbytes / us / 1e3,
                                "bw_fraction": nbytes / (us * 1e-6) / self.bw, "max_abs_err_vs_ref": err})
                del kc, vc, ks, kz, vs, vz, kr, vr, args, ref
                free_memory()
            k = torch.randn(batch, hkv, tokens + 1, d, device=dev, dtype=self.dtype)
            v = torch.randn(batch, hkv, tokens + 1, d, device=dev, dtype=self.dtype)
            n = torch.full((batch,), tokens + 1, dtype=torch.int32, device=dev)
            nbytes = 2 * k.numel() * k.element_size()
            us = bench(functools.partial(KA.decode_attention, q, k, v, n, scale=scale))
            self.write({"method": "kernel:slots-bf16", "impl": "split-K", "batch": batch, "context": tokens,
                        "kernel_us": us, "kv_bytes": nbytes, "gbps": nbytes / us / 1e3,
                        "bw_fraction": nbytes / (us * 1e-6) / self.bw})
            if batch <= 64:
                acc = torch.rand(batch, hkv, tokens + 1, device=dev)
                pos = torch.arange(tokens + 1, device=dev, dtype=torch.int32).repeat(batch, hkv, 1)
                cur = torch.full((batch,), tokens + 1, dtype=torch.int32, device=dev)
                kn = torch.randn(batch, hkv, d, device=dev, dtype=self.dtype)
                slot = torch.zeros(batch, hkv, dtype=torch.int32, device=dev)
                nb = nbytes + 2 * acc.numel() * 4 + pos.numel() * 4
                us = bench(functools.partial(h2o_decode, q, k, v, n, acc, pos, cur, tokens // 2, scale=scale, k_new=kn,
                                             v_new=kn, slot=slot, victim=slot))
                self.write({"method": "kernel:h2o", "impl": "fused", "batch": batch, "context": tokens,
                            "kernel_us": us, "kv_bytes": nb, "gbps": nb / us / 1e3,
                            "bw_fraction": nb / (us * 1e-6) / self.bw})
                del acc, pos
            del k, v
            free_memory()
        choice = {}
        for bits in (2, 4):
            small = best.get((1, 8192, bits))
            large = best.get((256, 8192, bits)) or best.get((64, 8192, bits))
            choice[("small", bits)] = min(small)[1] if small else "fold"
            choice[("large", bits)] = min(large)[1] if large else choice[("small", bits)]
        sms = torch.cuda.get_device_properties(dev).multi_processor_count

        def policy(programs, bits):
            return KA.VARIANTS[choice[("small" if programs < sms else "large", bits if bits in (2, 4) else 4)]]

        KA.packed_policy = policy
        self.kivi_variant = {f"{r}-{b}bit": v for (r, b), v in choice.items()}
        log("KIVI kernel variant:", self.kivi_variant)

    def profile(self, path):
        """Kernel-time breakdown (torch.profiler) of eager decode steps: where a step's time goes."""
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.dev.type == "cuda" else [])
        with open(path, "w") as f:
            for method, context, kernels in (("snapkv+kivi2", 32768, True), ("full", 256, True)):
                store, _ = make_store(self.m, method, context, 1, kernels)
                store.fill_random()
                dec = Decoder(self.m, store, 1, context)
                dec.run_eager(3)
                sync(self.dev)
                with profile(activities=acts) as prof:
                    for _ in range(5):
                        dec.step()
                    sync(self.dev)
                key = "cuda_time_total" if self.dev.type == "cuda" else "cpu_time_total"
                f.write(f"## {method} ctx={context} kernels={kernels} batch=1, 5 eager steps\n")
                f.write(prof.key_averages().table(sort_by=key, row_limit=30) + "\n\n")
                del store, dec, prof
                free_memory()
        log("profile written to", path)

    # ------------------------------------------------------------------------------------------------ main
    def run(self):
        args = self.args
        log("env", self.env)
        self.measure_bandwidth()
        self.kivi_variant = None
        if self.dev.type == "cuda" and not args.skip_kernel_bench:
            try:
                self.kernel_bench()
            except Exception as e:  # noqa: BLE001
                log("kernel bench failed", e)
                traceback.print_exc()
            free_memory()
        t0 = time.time()
        self.m = Model(TINY if args.tiny else LLAMA_3_1_8B, self.dev, self.dtype)
        log(f"model built in {time.time() - t0:.1f}s: {self.m.weight_bytes / 1e9:.2f} GB of weights")
        if not args.skip_selfcheck:
            log("selfcheck", self.selfcheck())
        if args.profile:
            try:
                self.profile(args.profile)
            except Exception as e:  # noqa: BLE001
                log("profile failed", e)
                traceback.print_exc()
            free_memory()
        methods_b1 = [("full", True), ("snapkv", False), ("snapkv", True), ("snapkv+kivi2", False),
                      ("snapkv+kivi2", True), ("snapkv+kivi4", True), ("h2o", False), ("h2o", True)]
        methods_max = [("snapkv+kivi2", True), ("snapkv+kivi4", True), ("snapkv", True), ("h2o", True),
                       ("snapkv+kivi2", False), ("full", True)]
        if args.floor:  # the dense-path floor: attention over 256 tokens costs next to nothing
            self.write(self.decode_row("full", 256, 1, True))
        for context in args.contexts:
            if self.left() < 30:
                log("time limit: stopping before context", context)
                break
            big = context > 32768
            cache = None
            if not big or self.left() > 200:
                try:
                    self.run_prefills(context)
                except Exception as e:  # noqa: BLE001
                    log("prefill failed", context, e)
                    traceback.print_exc()
                free_memory()
                try:
                    cache = self.run_hf_prefill(context)
                except Exception as e:  # noqa: BLE001
                    log("transformers prefill failed", context, e)
                    cache = None
                    free_memory()
            self.write(self.hf_row(context, 1, cache=cache))
            cache = None
            free_memory()
            for method, kernels in methods_b1:
                if self.left() < 20:
                    break
                self.write(self.decode_row(method, context, 1, kernels))
            if (big and self.left() < 120) or args.no_max_batch:
                continue
            # largest batches
            if self.left() > 60:
                try:
                    b_hf = self.max_batch("hf-full", context, False)
                    log(f"max batch transformers ctx={context}: {b_hf}")
                    if b_hf > 1:
                        self.write(self.hf_row(context, b_hf, is_max=True))
                except Exception as e:  # noqa: BLE001
                    log("hf max batch failed", e)
                    traceback.print_exc()
            for method, kernels in methods_max:
                if self.left() < 40:
                    break
                try:
                    b = self.max_batch(method, context, kernels)
                    log(f"max batch {method} kernels={kernels} ctx={context}: {b}")
                    row = self.decode_row(method, context, b, kernels, is_max=True)
                    tries = 0
                    while "error" in row and is_oom_str(row["error"]) and tries < 2 and b > 1:
                        b = max(1, int(b * 0.93))
                        tries += 1
                        row = self.decode_row(method, context, b, kernels, is_max=True)
                    self.write(row)
                except Exception as e:  # noqa: BLE001
                    log("max batch failed", method, e)
                    traceback.print_exc()
        self.finish()

    def finish(self):
        table = make_table(self.rows) + "\n\n" + make_kernel_table(self.rows)
        print(table)
        if self.args.table:
            with open(self.args.table, "w") as f:
                f.write(table + "\n")
        if Compiled.errors:
            log("compile errors:", Compiled.errors)


def is_oom_str(s: str) -> bool:
    return "out of memory" in s.lower() or "OutOfMemory" in s


def _ctx(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 else str(n)


def make_table(rows) -> str:
    """Markdown table of decode rows (+ the max batch and throughput ratio vs transformers at each context)."""
    hdr = ("| method | impl | ctx | batch | ms/token | roofline ms | % roofline | tokens/s | KV bytes | "
           "prefill peak above weights |")
    out = [hdr, "|" + "---|" * 10]
    for r in rows:
        if r.get("method") == "selfcheck" or str(r.get("method")).startswith("kernel:"):
            continue
        if "decode_ms_per_token" not in r:
            out.append(f"| {r.get('method')} | {r.get('impl')} | {r.get('context')} | {r.get('batch')} | "
                       f"error: {str(r.get('error'))[:60]} | | | | | |")
            continue
        pf = r.get("prefill_peak_bytes_above_weights")
        budget = "" if r.get("budget") is None else f" @{r['budget']}"
        out.append(
            f"| {r['method']}{budget} | {r['impl']} | "
            f"{_ctx(r['context'])} | {r['batch']}{' (max)' if r.get('is_max_batch') else ''} | "
            f"{r['decode_ms_per_token']:.2f} | {r['roofline_ms']:.2f} | {100 * r['roofline_fraction']:.0f}% | "
            f"{r['tokens_per_second']:.0f} | {r['kv_bytes'] / GiB:.3f} GiB | "
            f"{'' if pf is None else f'{pf / GiB:.2f} GiB'} |")
    return "\n".join(out)


def make_kernel_table(rows) -> str:
    out = ["| kernel | path | batch | tokens | us / call | cache bytes | GB/s | % of copy bandwidth |", "|" + "---|" * 8]
    for r in rows:
        if str(r.get("method")).startswith("kernel:"):
            out.append(f"| {r['method'][7:]} | {r['impl']} | {r['batch']} | {_ctx(r['context'])} | {r['kernel_us']:.1f} | "
                       f"{r['kv_bytes'] / 1e6:.1f} MB | {r['gbps']:.0f} | {100 * r['bw_fraction']:.0f}% |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "gpu_decode.jsonl"))
    p.add_argument("--table", default=None, help="also write the markdown table here")
    p.add_argument("--contexts", default="32768,8192,131072")
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--time-limit", type=float, default=480.0, help="seconds; remaining configurations are skipped")
    p.add_argument("--target-s", type=float, default=0.8, help="seconds of timed decode per configuration")
    p.add_argument("--reserve-gib", type=float, default=2.5, help="GPU memory kept free in the max-batch search")
    p.add_argument("--max-batch-cap", type=int, default=100000, help="upper bound for the max-batch search")
    p.add_argument("--tiny", action="store_true", help="tiny config (CPU smoke test)")
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--skip-selfcheck", action="store_true")
    p.add_argument("--skip-kernel-bench", action="store_true")
    p.add_argument("--no-max-batch", action="store_true")
    p.add_argument("--profile", default=None, help="write a torch.profiler kernel table of decode steps here")
    p.add_argument("--floor", action="store_true", help="also time the full static path at a 256-token context")
    args = p.parse_args(argv)
    args.contexts = [int(c) for c in args.contexts.split(",") if c]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    torch.manual_seed(0)
    with torch.inference_mode():
        Bench(args).run()


if __name__ == "__main__":
    main()
