"""Kangaroo + lookup against Kangaroo alone on the shipped demo model, measured in one run (issue 12's goals, CPU).

On held-out code prompts of the demo (the shipped model, its tuned η / γ and lookup settings from the manifest), in
one process, methods interleaved prompt by prompt (in an order rotated per prompt and repetition) and each
prompt's time the median of --reps runs:
  plain      our plain greedy decoding (the baseline of every ratio)
  kangaroo   Kangaroo alone (sequence)
  hybrid     Kangaroo + lookup (the tuned lookup_max / n-gram range, lookup_policy "auto")
  nomatch    Kangaroo + lookup with an n-gram range of 100..100 tokens, so the lookup finds nothing: what the
             branch costs where text does not repeat (its lookup hits are counted and printed)
Every output must equal plain greedy decoding. Prints tokens/s, the hybrid's and nomatch's ratio over Kangaroo alone
(overall and per prompt: median and range) against the goals (>= 1.15 and >= 0.97), and writes
e2e_lookup_cpu.csv + .png (bench/results, or $KANGAROO_BENCH_RESULTS). A CPU timing, one thread by default.

    python bench/e2e_lookup_cpu.py [--prompts 16] [--new-tokens 128] [--reps 3] [--threads 1] [--quick]
"""

import argparse
import csv
import gc
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))

from e2e_cpu import cpu_name, git_sha  # noqa: E402

GOALS = {"hybrid": 1.15, "nomatch": 0.97}  # over Kangaroo alone


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="2 prompts, 16 tokens, 1 rep")
    args = ap.parse_args()
    if args.quick:
        args.prompts, args.new_tokens, args.reps = 2, 16, 1
    torch.set_num_threads(args.threads)
    from kangaroo import demo
    from kangaroo.generate import KangarooDecoder

    built = demo.load_shipped()
    tuned = built["manifest"]["tuned"]
    seq = dict(threshold=tuned["seq"]["eta"], max_draft=tuned["seq"]["gamma"])
    lk = dict(lookup=True, lookup_max=tuned["lookup"]["lookup_max"])
    prompts = [ids for _, ids in demo._heldout_prompts(built["tokenizer"], args.prompts, 192, 64)]
    dec = KangarooDecoder.from_pretrained(str(built["base_dir"]), adapter=str(built["adapter_dir"]),
                                          dtype=torch.float32)
    n = args.new_tokens
    methods = {
        "plain": lambda p: dec.generate_autoregressive(p, n),
        "kangaroo": lambda p: dec.generate(p, n, **seq),
        "hybrid": lambda p: dec.generate(p, n, lookup_ngram=tuple(tuned["lookup"]["lookup_ngram"]), **lk, **seq),
        "nomatch": lambda p: dec.generate(p, n, lookup_ngram=(100, 100), **lk, **seq),
    }
    with torch.no_grad():
        for f in methods.values():  # warm-up
            f(prompts[0][:48])
        t = {k: [[0.0] * len(prompts) for _ in range(args.reps)] for k in methods}
        hits = {k: 0 for k in methods}
        identical = True
        gc.collect()
        gc.freeze()  # the imports' ~400k objects out of the collector: a full pass (0.4 s) inside a timing is noise
        names = list(methods)
        for r in range(args.reps):
            for i, p in enumerate(prompts):
                ref = None
                # rotated per prompt and repetition: no method always runs first or after the same neighbour
                for k in names[(i + r) % len(names):] + names[:(i + r) % len(names)]:
                    f = methods[k]
                    s = time.perf_counter()
                    out = f(p)
                    t[k][r][i] = time.perf_counter() - s
                    toks = out.tokens.tolist()
                    ref = toks if ref is None else ref
                    identical &= toks == ref
                    hits[k] += getattr(out.stats, "accepted_from_lookup", 0)
    med = {k: [statistics.median(t[k][r][i] for r in range(args.reps)) for i in range(len(prompts))] for k in t}
    total = {k: sum(v) for k, v in med.items()}
    tokens = n * len(prompts)
    env = {"cpu": cpu_name(), "capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
           "threads": args.threads, "git_sha": git_sha()}
    rows = [{"metric": f"{k}_tokens_per_s", "value": tokens / total[k]} for k in methods]
    print(f"# Kangaroo + lookup vs Kangaroo alone -- CPU: {env['cpu']} ({env['capability']}), torch {env['torch']}, "
          f"{args.threads} thread(s); {len(prompts)} held-out prompts x {n} tokens, median of {args.reps} run(s) "
          f"per prompt, methods interleaved; identical to plain: {identical}")
    for k in methods:
        print(f"  {k:9s} {tokens / total[k]:8.1f} tokens/s  {total['plain'] / total[k]:.3f}x plain  "
              f"(accepted from lookup: {hits[k]})")
    ok = True
    for k, goal in GOALS.items():
        per = sorted(med["kangaroo"][i] / med[k][i] for i in range(len(prompts)))
        ratio = total["kangaroo"] / total[k]
        met = ratio >= goal
        ok &= met
        rows += [{"metric": f"{k}_over_kangaroo", "value": ratio},
                 {"metric": f"{k}_over_kangaroo_prompt_median", "value": statistics.median(per)},
                 {"metric": f"{k}_over_kangaroo_prompt_min", "value": per[0]},
                 {"metric": f"{k}_over_kangaroo_prompt_max", "value": per[-1]}]
        print(f"  {k} / kangaroo: {ratio:.3f}x overall, per prompt median {statistics.median(per):.3f}, range "
              f"{per[0]:.2f}-{per[-1]:.2f} (goal >= {goal}: {'met' if met else 'MISSED'})")
    rows += [{"metric": "identical_to_plain", "value": identical}, {"metric": "nomatch_lookup_hits",
                                                                    "value": hits["nomatch"]}]
    out_dir = os.environ.get("KANGAROO_BENCH_RESULTS") or os.path.join(ROOT, "bench", "results")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "e2e_lookup_cpu.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["metric", "value", *env])
        w.writeheader()
        for r in rows:
            w.writerow({**r, **env})
    _plot(med, total, env, os.path.join(out_dir, "e2e_lookup_cpu.png"))
    print(f"wrote {os.path.join(out_dir, 'e2e_lookup_cpu.csv')} and e2e_lookup_cpu.png; goals "
          f"{'met' if ok else 'not all met'}")
    return 0 if identical else 1


def _plot(med, total, env, path):
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = [k for k in med if k != "plain"]
    ax.bar(names, [total["plain"] / total[k] for k in names])
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_ylabel("tokens/s over plain decoding")
    ax.set_title(f"Kangaroo + lookup, CPU ({env['capability']}, {env['threads']} thread(s))", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
