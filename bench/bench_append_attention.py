"""Benchmark append_attention: decode (T=1) at model shapes, plus T=6 chain and T=64 tree verification.

Baselines in the same run: PyTorch eager (cache slice write + SDPA with GQA) and torch.compile of it.
Floor: KV bytes read (2 * B * Hk * S * Dh * elt) at the measured copy bandwidth.
On CPU the model shapes are skipped: a tiny shape runs, Triton in the interpreter (not GPU timings).

    python bench/bench_append_attention.py [--no-compile] [--quick]
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

MODELS = {"vicuna-7b": (32, 32, 128), "llama-3-8b": (32, 8, 128), "qwen2.5-7b": (28, 4, 128)}


def tree_masks(parents: torch.Tensor):
    """parents[T] (-1: root child) -> (ancestor-or-self bool [T, T], int32 bit words [T, ceil(T/32)])."""
    T = parents.numel()
    anc = torch.eye(T, dtype=torch.bool)
    for j in range(T):
        if parents[j] >= 0:
            anc[j] |= anc[parents[j]]
    bits = anc.to(torch.int64) << (torch.arange(T) % 32)
    W = (T + 31) // 32
    words = torch.zeros(T, W, dtype=torch.int64).index_add_(1, torch.arange(T) // 32, bits)
    return anc, torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def eager_append_attention(q, k_new, v_new, k_cache, v_cache, L: int, mask):
    """Baseline: rows share one length L (a host int); mask [T, L+T] bool or None (T = 1)."""
    T = q.shape[1]
    k_cache[:, :, L:L + T] = k_new.transpose(1, 2)
    v_cache[:, :, L:L + T] = v_new.transpose(1, 2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k_cache[:, :, :L + T], v_cache[:, :, :L + T],
                                         attn_mask=mask, enable_gqa=True)
    return out.transpose(1, 2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--quick", action="store_true", help="decode at S=2048 only")
    args = ap.parse_args()
    dev = bench_device()
    on_gpu = dev.type == "cuda"
    from kangaroo_kernels.append_attention import _append_attention_triton, append_attention

    dtype = torch.bfloat16
    if on_gpu:
        models = MODELS
        rows = [(m, B, S, 1) for S in ((2048,) if args.quick else (512, 2048, 8192)) for m in MODELS
                for B in (1, 8)]
        rows += [(m, B, 2048, T) for T in (6, 64) for m in ("llama-3-8b",) for B in (1, 8)]
        compile_S = {2048}
        attn = append_attention
        timing = dict()
    else:
        # CPU: Triton runs in the interpreter; a tiny shape keeps this to seconds
        models = {"tiny": (8, 2, 64)}
        rows = [("tiny", 1, 128, T) for T in (1, 6, 64)]
        compile_S = set()
        attn = _append_attention_triton
        timing = dict(warmup=1, iters=3, max_seconds=1.0)
    if args.no_compile:
        compile_S = set()
    compiled = torch.compile(eager_append_attention, dynamic=True) if compile_S else None

    rec = Recorder("append_attention", dev)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    for model, B, S, T in rows:
        Hq, Hk, Dh = models[model]
        L = S - T
        q = torch.randn(B, T, Hq, Dh, device=dev, dtype=dtype)
        k_new = torch.randn(B, T, Hk, Dh, device=dev, dtype=dtype)
        v_new = torch.randn(B, T, Hk, Dh, device=dev, dtype=dtype)
        k_cache = torch.randn(B, Hk, S, Dh, device=dev, dtype=dtype)
        v_cache = torch.randn(B, Hk, S, Dh, device=dev, dtype=dtype)
        lens = torch.full((B,), L, dtype=torch.int32, device=dev)
        out = torch.empty(B, T, Hq, Dh, dtype=dtype, device=dev)
        tree_mask = mask = None
        if T == 64:
            parents = torch.cat([torch.tensor([-1]), torch.randint(0, 64, (63,), generator=gen)])
            parents = torch.minimum(parents, torch.arange(64) - 1)  # topological
            anc, words = tree_masks(parents)
            tree_mask = words.expand(B, T, -1).contiguous().to(dev)
            mask = torch.cat([torch.ones(T, L, dtype=torch.bool), anc], dim=1).to(dev)
        elif T > 1:
            mask = torch.cat([torch.ones(T, L, dtype=torch.bool), torch.ones(T, T, dtype=torch.bool).tril()],
                             dim=1).to(dev)
        op = {1: "decode", 6: "chain6", 64: "tree64"}[T]
        shape = f"{model} B={B} S={S} T={T} H={Hq}/{Hk} D={Dh}"
        gbytes = 2 * B * Hk * S * Dh * k_cache.element_size() / 1e9

        def eager():
            return eager_append_attention(q, k_new, v_new, k_cache, v_cache, L, mask)

        def kernel():
            return attn(q, k_new, v_new, k_cache, v_cache, lens, tree_mask=tree_mask, out=out, validate=False)

        eager_us = time_fn(eager, dev, **timing)
        rec.add(op, "torch-eager", shape, "bf16", eager_us, gbytes=gbytes, eager_us=eager_us)
        if compiled is not None and S in compile_S and T == 1:  # compile time: decode rows only
            rec.add(op, "torch-compile", shape, "bf16",
                    time_fn(lambda: compiled(q, k_new, v_new, k_cache, v_cache, L, mask), dev, **timing),
                    gbytes=gbytes, eager_us=eager_us)
        rec.add(op, "triton" if on_gpu else "triton-interpreter", shape, "bf16", time_fn(kernel, dev, **timing),
                gbytes=gbytes, eager_us=eager_us)
        if on_gpu:
            rec.add(op, "triton-graph", shape, "bf16", time_graph(kernel, dev), gbytes=gbytes, eager_us=eager_us)
    rec.finish()


if __name__ == "__main__":
    main()
