"""Benchmark lm_head_exit (greedy, sampled, sampled with top-k/top-p) and lm_head_topk (Triton on GPU; the same
kernels in the interpreter on CPU) against same-run baselines.

Shapes: the LM heads of Vicuna-7B (V=32000, D=4096), Llama-3-8B (128256, 4096) and Qwen2.5-7B (152064, 3584), bf16,
with the fused RMSNorm (the adapter's out-norm); batch 1, 4, 16. Headline (--quick on GPU): greedy exit at B=1 for
all three models, top-10, sampled and filtered-sampled (top_k 50, top_p 0.9) exit at B=1 for Vicuna-7B;
torch.compile runs for the Vicuna-7B headline shapes only (each shape is a fresh compile). The filtered case runs
next to the unfiltered one in the same run: their ratio is the cost of the filter pass.

Impls, all in this run on the same inputs:
  torch-eager     HF-style RMSNorm, bf16 logits = x @ W.T upcast to fp32 ([B, V] materialised), then
                  softmax + max (exit), softmax(logits / T) + multinomial (sampled), the same after a top-k
                  threshold and a sort + cumsum top-p cut (filtered), log_softmax + topk (top-k)
  torch-compile   torch.compile of torch-eager
  kangaroo        the op (eager launches, CUDA events per call)
  kangaroo+graph  the op replayed from a CUDA graph
On CPU the kernels run in the Triton interpreter at a small shape: not GPU timings.

Bytes: the LM-head weight read (V * D * 2) plus hidden and norm weight; the floor is that at the measured copy
bandwidth. The goal at B=1, V=32000, D=4096: within ~1.15x of the floor (pct_of_floor >= ~87).

  python bench/bench_lm_head_exit.py [--quick] [--no-compile] [--budget-s S]
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if not torch.cuda.is_available():  # Triton reads this when the kernels are defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

from _common import (  # noqa: E402
    Recorder,
    agree,
    bench_args,
    bench_device,
    compile_call,
    n_input_sets,
    time_rotating,
    try_compile,
    want_compile,
)

MODELS = {"vicuna-7b": (32000, 4096), "llama-3-8b": (128256, 4096), "qwen2.5-7b": (152064, 3584)}
BATCHES = (1, 4, 16)
TOPK, TEMPERATURE, THRESHOLD = 10, 0.7, 0.6
FILTER_K, FILTER_P = 50, 0.9  # a common serving setting


def _rms_norm(h, w, eps: float):
    hf = h.float()
    return w * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)


def eager_exit(h, lm_head, norm_w, threshold: float, eps: float = 1e-6):
    """Baseline: token, conf, continue flag."""
    logits = (_rms_norm(h, norm_w, eps) @ lm_head.T).float()
    conf, token = torch.softmax(logits, dim=-1).max(dim=-1)
    return token, conf, conf >= threshold


def eager_sample(h, lm_head, norm_w, temperature: float, eps: float = 1e-6):
    """Baseline: a token from softmax(logits / T), its probability and the greedy confidence."""
    logits = (_rms_norm(h, norm_w, eps) @ lm_head.T).float()
    p = torch.softmax(logits / temperature, dim=-1)
    token = torch.multinomial(p, 1)[:, 0]
    return token, p.gather(1, token[:, None])[:, 0], torch.softmax(logits, dim=-1).max(dim=-1).values


def filtered_probs(logits, temperature: float, k: int, p: float):
    """softmax(logits / T) after top-k (ties kept) and top-p (the most likely tokens up to mass p, the one that
    crosses it kept), on materialised fp32 logits."""
    z = logits / temperature
    z = z.masked_fill(z < torch.topk(z, k, dim=-1).values[:, -1:], float("-inf"))
    zs, idx = torch.sort(z, dim=-1, descending=True)
    ps = torch.softmax(zs, dim=-1)
    zs = zs.masked_fill(ps.cumsum(-1) - ps >= p, float("-inf"))
    return torch.softmax(torch.full_like(z, float("-inf")).scatter(1, idx, zs), dim=-1)


def eager_sample_filtered(h, lm_head, norm_w, temperature: float, k: int, p: float, eps: float = 1e-6):
    """Baseline of the filtered sample: a token, its probability and the greedy confidence."""
    logits = (_rms_norm(h, norm_w, eps) @ lm_head.T).float()
    q = filtered_probs(logits, temperature, k, p)
    token = torch.multinomial(q, 1)[:, 0]
    return token, q.gather(1, token[:, None])[:, 0], torch.softmax(logits, dim=-1).max(dim=-1).values


def eager_topk(h, lm_head, norm_w, k: int, eps: float = 1e-6):
    logits = (_rms_norm(h, norm_w, eps) @ lm_head.T).float()
    return torch.topk(torch.log_softmax(logits, dim=-1), k, dim=-1)


def cases(on_gpu: bool, quick: bool):
    """(op, model, B, headline, compile), headline first."""
    if not on_gpu:
        yield "exit", "small", 1, True, False
        yield "filtered", "small", 1, False, False
        if not quick:
            yield "topk", "small", 1, False, False
            yield "sample", "small", 1, False, False
            yield "exit", "small", 3, False, False
        return
    yield "exit", "vicuna-7b", 1, True, True
    yield "topk", "vicuna-7b", 1, True, True
    yield "sample", "vicuna-7b", 1, True, False
    yield "filtered", "vicuna-7b", 1, True, False
    yield "exit", "llama-3-8b", 1, True, False
    yield "exit", "qwen2.5-7b", 1, True, False
    if quick:
        return
    for m in MODELS:
        for B in BATCHES:
            if B != 1:
                yield "exit", m, B, False, False
    for m in ("llama-3-8b", "qwen2.5-7b"):
        yield "topk", m, 1, False, False
    for B in (4, 16):
        yield "topk", "vicuna-7b", B, False, False
        yield "sample", "vicuna-7b", B, False, False
        yield "filtered", "vicuna-7b", B, False, False
    yield "sample", "llama-3-8b", 1, False, False
    yield "filtered", "llama-3-8b", 1, False, False


def main(argv=None):
    args = bench_args(__doc__, argv)
    dev = bench_device()
    on_gpu = dev.type == "cuda"
    from kangaroo_kernels.ops.lm_head_exit import _lm_head_exit_triton, _lm_head_topk_triton, lm_head_exit, lm_head_topk
    from kangaroo_kernels.types import LmHeadExit, LmHeadTopk

    dtype = torch.bfloat16
    models = MODELS if on_gpu else {"small": (4096, 256)}
    exit_op, topk_op = (lm_head_exit, lm_head_topk) if on_gpu else (_lm_head_exit_triton, _lm_head_topk_triton)
    rec = Recorder("lm_head_exit", dev, quick=args.quick, budget_s=args.budget_s)
    dgen = torch.Generator(device=dev).manual_seed(0)
    it = dict(iters=args.iters) if args.iters else {}
    weights = {}
    for op, model, B, headline, allow_compile in cases(on_gpu, args.quick):
        V, D = models[model]
        name = {"exit": "lm_head_exit", "sample": "lm_head_exit_sample", "filtered": "lm_head_exit_sample_topk_topp",
                "topk": "lm_head_topk"}[op]
        shape = f"{op} {model} B={B} V={V} D={D}"
        if rec.out_of_time(shape, reserve=8.0):
            continue
        if model not in weights:
            weights.clear()  # one model's LM head at a time (up to 1.1 GB)
            w = (torch.randn(V, D, generator=dgen, device=dev) * D ** -0.5).to(dtype)
            weights[model] = (w, (1 + 0.1 * torch.randn(D, generator=dgen, device=dev)).to(dtype))
        w, norm_w = weights[model]
        w_bytes = V * D * w.element_size()
        n = n_input_sets(w_bytes, dev, max_sets=16)  # the weight (> L2 at model shapes) is what is read
        hs = [torch.randn(B, D, generator=dgen, device=dev, dtype=dtype) for _ in range(n)]
        bytes_moved = w_bytes + (B + 1) * D * w.element_size()
        seed = torch.arange(B, dtype=torch.int64, device=dev)
        offset = torch.zeros(B, dtype=torch.int64, device=dev)
        outs = [LmHeadExit(torch.empty(B, dtype=torch.int32, device=dev), torch.empty(B, device=dev),
                           torch.empty(B, dtype=torch.bool, device=dev), torch.empty(B, device=dev))
                for _ in range(n)]
        touts = [LmHeadTopk(torch.empty(B, TOPK, dtype=torch.int32, device=dev), torch.empty(B, TOPK, device=dev))
                 for _ in range(n)]
        if op == "exit":
            def eager(i):
                return eager_exit(hs[i], w, norm_w, THRESHOLD)

            def kernel(i):
                return exit_op(hs[i], w, THRESHOLD, norm_weight=norm_w, out=outs[i], validate=False)
            eager_fn, eager_args = eager_exit, (w, norm_w, THRESHOLD)
        elif op == "sample":
            def eager(i):
                return eager_sample(hs[i], w, norm_w, TEMPERATURE)

            def kernel(i):
                return exit_op(hs[i], w, THRESHOLD, norm_weight=norm_w, temperature=TEMPERATURE, seed=seed,
                               offset=offset, out=outs[i], validate=False)
            eager_fn, eager_args = eager_sample, (w, norm_w, TEMPERATURE)
        elif op == "filtered":
            def eager(i):
                return eager_sample_filtered(hs[i], w, norm_w, TEMPERATURE, FILTER_K, FILTER_P)

            def kernel(i):
                return exit_op(hs[i], w, THRESHOLD, norm_weight=norm_w, temperature=TEMPERATURE, top_k=FILTER_K,
                               top_p=FILTER_P, seed=seed, offset=offset, out=outs[i], validate=False)
            eager_fn, eager_args = eager_sample_filtered, (w, norm_w, TEMPERATURE, FILTER_K, FILTER_P)
        else:
            def eager(i):
                return eager_topk(hs[i], w, norm_w, TOPK)

            def kernel(i):
                return topk_op(hs[i], w, TOPK, norm_weight=norm_w, out=touts[i])
            eager_fn, eager_args = eager_topk, (w, norm_w, TOPK)

        # the op computes what the baseline computes (fp32 logits vs the baseline's bf16 ones: compare the
        # op's choice against fp32 logits, and the confidences / log-probs loosely)
        logits = _rms_norm(hs[0], norm_w, 1e-6).float() @ w.float().T
        got, ref = kernel(0), eager(0)
        if op == "topk":
            lp = torch.log_softmax(logits, dim=-1)
            ok = bool((lp.gather(1, got.tokens.long()) - got.logprobs).abs().max() < 1e-2) and \
                bool((got.logprobs[:, 0] - ref.values[:, 0]).abs().max() < 5e-2)
            diff = float((got.logprobs - ref.values).abs().max())
        elif op == "exit":
            ok = bool((logits.max(-1).values - logits.gather(1, got.token.long()[:, None])[:, 0]).max() < 5e-2) \
                and torch.allclose(got.conf, ref[1], rtol=5e-2, atol=1e-3)
            diff = float((got.conf - ref[1]).abs().max())
        else:
            q = torch.softmax(logits / TEMPERATURE, -1) if op == "sample" else filtered_probs(
                logits, TEMPERATURE, FILTER_K, FILTER_P)
            ok = torch.allclose(got.conf, ref[2], rtol=5e-2, atol=1e-3) and torch.allclose(
                got.token_prob, q.gather(1, got.token.long()[:, None])[:, 0], rtol=1e-2, atol=1e-4)
            diff = float((got.conf - ref[2]).abs().max())
        note = agree(ok, f"eager vs op (max |diff| {diff:.3g}), {shape}", dev)
        rec.add(name, "torch-eager", shape, "bf16", time_rotating(eager, n, dev, **it), bytes_moved=bytes_moved,
                batch=B, note=note)
        if allow_compile and want_compile(args, rec, dev, headline):
            compiled = try_compile(eager_fn, dynamic=False)
            if compiled is not None:
                _, secs = compile_call(compiled, hs[0], *eager_args)
                if secs is not None:
                    rec.add(name, "torch-compile", shape, "bf16",
                            time_rotating(lambda i: compiled(hs[i], *eager_args), n, dev, **it),
                            bytes_moved=bytes_moved, batch=B, note=f"compile {secs:.1f} s")
        impl = "kangaroo" if on_gpu else "kangaroo-triton-interpreter"
        rec.add(name, impl, shape, "bf16", time_rotating(kernel, n, dev, **it), bytes_moved=bytes_moved, batch=B)
        if on_gpu:
            rec.add(name, "kangaroo+graph", shape, "bf16", time_rotating(kernel, n, dev, graph=True, **it),
                    bytes_moved=bytes_moved, batch=B)
    rec.finish()


if __name__ == "__main__":
    main()
