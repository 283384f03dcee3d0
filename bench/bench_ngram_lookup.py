"""Benchmark ngram_lookup (native op: CUDA kernel on GPU, C++ twin on CPU) against a same-run vectorised PyTorch
baseline.

Shapes: B = 1, 4, 16, 64 rows of S = 1024, 8192, 32768 committed tokens (lens = S), n_min = 1, n_max = 4,
M = 8, int32. Cases:
  text     ids uniform over 32000: few matches, most end positions fail on their first comparison (a full scan)
  repeat   ids uniform over 4: a maximal match (4 tokens) every few hundred positions, so the op stops in its
           first tile (4096 positions on the GPU; at the first maximal match on CPU)
  far      text with the row's last 4 tokens planted once at the start: the longest match is the oldest
           position (a full scan that must keep the long match against the many shorter, more recent ones)
Headline (--quick on GPU; the only shapes with a torch.compile baseline): text, B = 16, S = 8192 and B = 1,
S = 32768. --quick on CPU: S = 1024, B = 1 and 4 (a smoke test).

Impls, all in this run on the same histories:
  torch-eager     unfold + compare: windows [B, S, n_max] of the left-padded history against the suffix window,
                  match length by a cumulative product, the packed key (m * S + e) maxed over e, continuation by a
                  gather; no host sync
  torch-compile   torch.compile of torch-eager (GPU, headline shapes)
  kangaroo        ngram_lookup(validate=False), eager launches (CUDA events per call; perf_counter on CPU)
  kangaroo+graph  the op replayed from a CUDA graph (GPU)

Bytes (text and far only): one read of every row (B * S * 4) + the outputs: the floor of a full scan. The
repeat case stops early, so no floor is given for it.

  python bench/bench_ngram_lookup.py [--quick] [--no-compile] [--budget-s S]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
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

from kangaroo_kernels.ops.ngram_lookup import ngram_lookup  # noqa: E402

BATCHES = (1, 4, 16, 64)
LENGTHS = (1024, 8192, 32768)
N_MIN, N_MAX, M = 1, 4, 8
VOCAB = {"text": 32000, "repeat": 4, "far": 32000}


def eager_ngram_lookup(history: torch.Tensor, lens: torch.Tensor, n_min: int, n_max: int, M: int):
    """(tokens [B, M] i32, n [B] i32) for ids >= 0 and lens in [0, S], all rows and end positions at once."""
    B, S = history.shape
    h = history.long()
    hp = torch.nn.functional.pad(h, (n_max - 1, 0), value=-1)  # windows before the row start never match
    win = hp.unfold(1, n_max, 1)  # [B, S, n_max]: win[b, e] = h[b, e - n_max + 1 .. e]
    L = lens.long()
    last = (L - 1).clamp(min=0)
    suffix = torch.gather(win, 1, last.view(B, 1, 1).expand(B, 1, n_max))  # the window ending at L - 1
    eq = (win == suffix).flip(-1)  # [..., k]: h[e - k] == h[L - 1 - k]
    m = eq.long().cumprod(-1).sum(-1)  # match length of every end position, capped at n_max
    e = torch.arange(S, device=h.device)
    ok = (e[None, :] < (L - 1)[:, None]) & (m >= n_min)
    key = torch.where(ok, m * S + e, -1).amax(1)
    found = key >= 0
    best_e = torch.where(found, key % S, 0)
    n = torch.where(found, torch.minimum(L - 1 - best_e, torch.full_like(L, M)), 0)
    k = torch.arange(M, device=h.device)
    pos = (best_e[:, None] + 1 + k).clamp(max=S - 1)
    tokens = torch.where(k < n[:, None], torch.gather(h, 1, pos), -1)
    return tokens.to(torch.int32), n.to(torch.int32)


def make_history(case: str, B: int, S: int, gen: torch.Generator) -> torch.Tensor:
    h = torch.randint(0, VOCAB[case], (B, S), generator=gen)
    if case == "far":
        h[:, :N_MAX] = h[:, S - N_MAX:]
    return h.to(torch.int32)


def cases(on_gpu: bool, quick: bool):
    """(case, B, S, headline), headline first."""
    if not on_gpu and quick:
        for B in (1, 4):
            yield "text", B, 1024, B == 1
        return
    yield "text", 16, 8192, True
    yield "text", 1, 32768, True
    if on_gpu and quick:
        return
    for case in VOCAB:
        for S in LENGTHS:
            for B in BATCHES:
                if not (case == "text" and (B, S) in ((16, 8192), (1, 32768))):
                    yield case, B, S, False


def main(argv=None):
    args = bench_args(__doc__, argv)
    dev = bench_device()
    on_gpu = dev.type == "cuda"
    rec = Recorder("ngram_lookup", dev, quick=args.quick, budget_s=args.budget_s)
    gen = torch.Generator().manual_seed(0)
    it = dict(iters=args.iters) if args.iters else {}
    for case, B, S, headline in cases(on_gpu, args.quick):
        shape = f"{case} B={B} S={S} n={N_MIN}..{N_MAX} M={M}"
        if rec.out_of_time(shape, reserve=5.0):
            continue
        n = n_input_sets(B * S * 4, dev, max_sets=16)
        sets = [(make_history(case, B, S, gen).to(dev), torch.full((B,), S, dtype=torch.int32, device=dev))
                for _ in range(n)]
        bytes_moved = B * S * 4 + B * (M + 1) * 4 if case != "repeat" else None

        h0, l0 = sets[0]
        got = ngram_lookup(h0, l0, N_MIN, N_MAX, M)
        want = eager_ngram_lookup(h0, l0, N_MIN, N_MAX, M)
        note = agree(torch.equal(got.tokens, want[0]) and torch.equal(got.n, want[1]), f"eager vs op, {shape}", dev)
        hits = f"{int((got.n > 0).sum())}/{B} rows matched"

        def eager(i):
            return eager_ngram_lookup(sets[i][0], sets[i][1], N_MIN, N_MAX, M)

        def op(i):
            return ngram_lookup(sets[i][0], sets[i][1], N_MIN, N_MAX, M, validate=False)

        rec.add("ngram_lookup", "torch-eager", shape, "int32", time_rotating(eager, n, dev, **it),
                bytes_moved=bytes_moved, batch=B, note=note)
        if want_compile(args, rec, dev, headline):
            compiled = try_compile(eager_ngram_lookup, dynamic=False)
            if compiled is not None:
                _, secs = compile_call(compiled, h0, l0, N_MIN, N_MAX, M)
                if secs is not None:
                    t = time_rotating(lambda i: compiled(sets[i][0], sets[i][1], N_MIN, N_MAX, M), n, dev, **it)
                    rec.add("ngram_lookup", "torch-compile", shape, "int32", t, bytes_moved=bytes_moved, batch=B,
                            note=f"compile {secs:.1f} s")
        rec.add("ngram_lookup", "kangaroo", shape, "int32", time_rotating(op, n, dev, **it),
                bytes_moved=bytes_moved, batch=B, note=hits)
        if on_gpu:
            rec.add("ngram_lookup", "kangaroo+graph", shape, "int32", time_rotating(op, n, dev, graph=True, **it),
                    bytes_moved=bytes_moved, batch=B, note=hits)

    rec.finish()


if __name__ == "__main__":
    main()
