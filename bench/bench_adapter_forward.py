"""Benchmark adapter_forward: one Kangaroo adapter decode step at 7B shapes, B=1, bf16.

Impls in the same run: PyTorch eager (RMSNorm, fused QKV linear, RoPE, cache slice write, SDPA with GQA, O-proj,
residual, RMSNorm), the same captured in a CUDA graph, torch.compile of it, and the fused op (eager launches and
CUDA graph), with and without the out-norm (apply_out_norm=False leaves it to lm_head_exit).
Floor: adapter weight bytes + KV bytes read (2 * B * Hk * L * Dh * 2) at the measured copy bandwidth.
On CPU a tiny shape runs with Triton in the interpreter: those are not GPU timings.

    python bench/bench_adapter_forward.py [--no-compile]
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Recorder, bench_device, time_fn, time_graph  # noqa: E402

if not torch.cuda.is_available():  # Triton reads this when the kernels are defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

# name: (D, Hq, Hk, Dh, q/k/v bias)
MODELS = {"vicuna-7b": (4096, 32, 32, 128, False), "qwen2.5-7b": (3584, 28, 4, 128, True)}


def _rms(x, w, eps=1e-6):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rope(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def eager_adapter(h, norm_in, wqkv, bqkv, wo, norm_out, k_cache, v_cache, L: int, cos, sin, Hq: int, Hk: int):
    """Baseline, HF-style: every row at cache length L (a host int); cos/sin [Dh] in h's dtype."""
    B, Dh = h.shape[0], k_cache.shape[-1]
    qkv = F.linear(_rms(h, norm_in), wqkv, bqkv)
    q, k, v = qkv.split([Hq * Dh, Hk * Dh, Hk * Dh], dim=-1)
    q = _rope(q.view(B, Hq, 1, Dh), cos, sin)
    k_cache[:, :, L] = _rope(k.view(B, Hk, Dh), cos, sin)
    v_cache[:, :, L] = v.view(B, Hk, Dh)
    o = F.scaled_dot_product_attention(q, k_cache[:, :, :L + 1], v_cache[:, :, :L + 1], enable_gqa=True)
    return _rms(h + F.linear(o.reshape(B, Hq * Dh), wo), norm_out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    args = ap.parse_args()
    dev = bench_device()
    on_gpu = dev.type == "cuda"
    from kangaroo_kernels.adapter_forward import AdapterWeights, _adapter_forward_triton, adapter_forward
    from kangaroo_kernels.reference.adapter_forward import rope_inv_freq_ref

    dtype = torch.bfloat16
    if on_gpu:
        models, rows, compile_S = MODELS, [(m, S) for m in MODELS for S in (1024, 2048)], {2048}
        fused, timing = adapter_forward, {}
    else:  # the interpreter: a tiny shape keeps this to seconds
        models, rows, compile_S = {"tiny": (256, 4, 2, 64, True)}, [("tiny", 128)], set()
        fused, timing = _adapter_forward_triton, dict(warmup=1, iters=3, max_seconds=1.0)
    if args.no_compile:
        compile_S = set()
    rec = Recorder("adapter_forward", dev)
    torch.manual_seed(0)
    B = 1
    for model, S in rows:
        D, Hq, Hk, Dh, bias = models[model]
        L = S - 1  # the step fills the cache's last slot

        def rnd(*shape, scale=1.0):
            return (torch.randn(*shape, device=dev) * scale).to(dtype)

        wqkv = rnd((Hq + 2 * Hk) * Dh, D, scale=D ** -0.5)
        bqkv = rnd((Hq + 2 * Hk) * Dh) if bias else None
        w = AdapterWeights.from_wqkv(1 + rnd(D, scale=0.1), wqkv, rnd(D, Hq * Dh, scale=(Hq * Dh) ** -0.5),
                                     1 + rnd(D, scale=0.1), Hq, Hk, bqkv)
        h = rnd(B, D)
        k_cache, v_cache = rnd(B, Hk, S, Dh), rnd(B, Hk, S, Dh)
        lens = torch.full((B,), L, dtype=torch.int32, device=dev)
        out = torch.empty(B, D, dtype=dtype, device=dev)
        ang = L * rope_inv_freq_ref(Dh, 10000.0, dev)
        cos, sin = torch.cat([ang.cos()] * 2).to(dtype), torch.cat([ang.sin()] * 2).to(dtype)

        shape = f"{model} B={B} S={S} H={Hq}/{Hk} D={D}"
        w_bytes = sum(t.numel() * t.element_size() for t in (w.norm_in, wqkv, w.wo, w.norm_out)) + \
            (bqkv.numel() * 2 if bias else 0)
        gbytes = (w_bytes + 2 * B * Hk * L * Dh * k_cache.element_size()) / 1e9

        def eager():
            return eager_adapter(h, w.norm_in, wqkv, bqkv, w.wo, w.norm_out, k_cache, v_cache, L, cos, sin, Hq, Hk)

        def kernel(norm=True):
            return fused(h, w, k_cache, v_cache, lens, lens, apply_out_norm=norm, out=out, validate=False)

        eager_us = time_fn(eager, dev, **timing)
        rec.add("adapter", "torch-eager", shape, "bf16", eager_us, gbytes=gbytes, eager_us=eager_us)
        if on_gpu:
            rec.add("adapter", "torch-eager-graph", shape, "bf16", time_graph(eager, dev), gbytes=gbytes,
                    eager_us=eager_us)
        if S in compile_S:
            compiled = torch.compile(eager_adapter)
            rec.add("adapter", "torch-compile", shape, "bf16",
                    time_fn(lambda: compiled(h, w.norm_in, wqkv, bqkv, w.wo, w.norm_out, k_cache, v_cache, L, cos,
                                             sin, Hq, Hk), dev, **timing), gbytes=gbytes, eager_us=eager_us)
        impl = "triton" if on_gpu else "triton-interpreter"
        rec.add("adapter", impl, shape, "bf16", time_fn(kernel, dev, **timing), gbytes=gbytes, eager_us=eager_us)
        if on_gpu:
            rec.add("adapter", "triton-graph", shape, "bf16", time_graph(kernel, dev), gbytes=gbytes,
                    eager_us=eager_us)
            # the out-norm left to lm_head_exit: one launch fewer
            rec.add("adapter-prenorm", "triton-graph", shape, "bf16", time_graph(lambda: kernel(False), dev),
                    gbytes=gbytes, eager_us=eager_us)
    rec.finish()


if __name__ == "__main__":
    main()
