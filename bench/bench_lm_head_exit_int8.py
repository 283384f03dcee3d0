"""Benchmark lm_head_exit_int8 (the CPU draft head on an int8 LM-head copy) against same-run baselines on CPU.

Shapes (B = 1, the draft step; B = 4 a small batch): the shipped demo model's head (V=4096, D=256), a mid-size one
(32000 x 1024) and, without --quick, Vicuna-7B's (32000 x 4096). fp32 hidden with the fused RMSNorm (the adapter's
out-norm).

Impls, all in this run on the same inputs:
  torch-eager     RMSNorm, fp32 logits = x @ W.T ([B, V] materialised, W fp32 column-major as the decoder keeps
                  it), softmax + max + argmax (the draft decision)
  torch-compile   torch.compile of torch-eager
  kangaroo-exact  lm_head_exit on the fp32 weight (the exact draft head)
  kangaroo-int8   lm_head_exit_int8 on quantize_lm_head(W)
Bytes: each impl's own weight read (fp32: 4 V D, int8: V D + 4 V): the floor is that at the measured copy
bandwidth. A CPU timing (one thread unless OMP_NUM_THREADS says otherwise), not a GPU one.

  python bench/bench_lm_head_exit_int8.py [--quick] [--no-compile] [--budget-s S]
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _common import Recorder, agree, bench_args, compile_call, time_rotating, try_compile  # noqa: E402

THRESHOLD, EPS = 0.6, 1e-6


def eager_exit(h, w, norm_w):
    hf = h.float()
    x = norm_w * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + EPS)).to(h.dtype)
    p = torch.softmax((x @ w.T).float(), dim=-1)
    conf, token = p.max(dim=-1)
    return token, conf, conf >= THRESHOLD


def main(argv=None):
    args = bench_args(__doc__, argv)
    dev = torch.device("cpu")
    from kangaroo_kernels.ops.lm_head_exit import lm_head_exit
    from kangaroo_kernels.ops.lm_head_exit_int8 import lm_head_exit_int8, quantize_lm_head

    shapes = [(4096, 256, 1), (4096, 256, 4), (32000, 1024, 1)]
    if not args.quick:
        shapes.append((32000, 4096, 1))
    rec = Recorder("lm_head_exit_int8", dev, quick=args.quick, budget_s=args.budget_s)
    gen = torch.Generator().manual_seed(0)
    it = dict(iters=args.iters or (3 if args.quick else 30))
    for V, D, B in shapes:
        shape = f"V={V} D={D} B={B}"
        if rec.out_of_time(shape, reserve=5.0):
            continue
        w = (torch.randn(V, D, generator=gen) * D ** -0.5).t().contiguous().t()
        norm_w = 1 + 0.1 * torch.randn(D, generator=gen)
        q = quantize_lm_head(w)
        hs = [torch.randn(B, D, generator=gen) for _ in range(2)]
        fp32_bytes, int8_bytes = 4 * V * D, V * D + 4 * V

        exact = lm_head_exit(hs[0], w, THRESHOLD, norm_weight=norm_w)
        got = lm_head_exit_int8(hs[0], q, THRESHOLD, norm_weight=norm_w)
        base = eager_exit(hs[0], w, norm_w)
        ok = torch.allclose(exact.conf, base[1], rtol=1e-4, atol=1e-6) and torch.allclose(
            got.conf, exact.conf, rtol=0.05, atol=0.01)
        note = agree(ok, f"eager vs ops (int8 conf max |diff| {float((got.conf - exact.conf).abs().max()):.3g}, "
                         f"tokens equal {int((got.token == exact.token).sum())}/{B}), {shape}", dev)
        rec.add("lm_head_exit_int8", "torch-eager", shape, "fp32",
                time_rotating(lambda i: eager_exit(hs[i], w, norm_w), 2, dev, **it), bytes_moved=fp32_bytes,
                batch=B, note=note)
        if not args.no_compile and not args.quick:
            compiled = try_compile(eager_exit, dynamic=False)
            if compiled is not None:
                _, secs = compile_call(compiled, hs[0], w, norm_w)
                if secs is not None:
                    rec.add("lm_head_exit_int8", "torch-compile", shape, "fp32",
                            time_rotating(lambda i: compiled(hs[i], w, norm_w), 2, dev, **it),
                            bytes_moved=fp32_bytes, batch=B, note=f"compile {secs:.1f} s")
        rec.add("lm_head_exit_int8", "kangaroo-exact", shape, "fp32",
                time_rotating(lambda i: lm_head_exit(hs[i], w, THRESHOLD, norm_weight=norm_w, validate=False), 2,
                              dev, **it), bytes_moved=fp32_bytes, batch=B)
        rec.add("lm_head_exit_int8", "kangaroo-int8", shape, "int8",
                time_rotating(lambda i: lm_head_exit_int8(hs[i], q, THRESHOLD, norm_weight=norm_w, validate=False),
                              2, dev, **it), bytes_moved=int8_bytes, batch=B)
    rec.finish()


if __name__ == "__main__":
    main()
