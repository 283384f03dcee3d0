"""`kangaroo` command line: generate (here), train and demo (kangaroo.train / kangaroo.demo, imported lazily).

    python -m kangaroo.cli generate MODEL_DIR --adapter ADAPTER_DIR --prompt "def fib(n):" --max-new-tokens 64
    python -m kangaroo.cli generate MODEL_DIR --ids "1 15043 29892" --tree --temperature 0.7 --seed 0 --baseline
    torchrun --nproc_per_node 8 -m kangaroo.cli train --model MODEL_DIR --data corpus.jsonl --out ADAPTER_DIR
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

USAGE = """usage: kangaroo <command> [options]

commands:
  generate   Kangaroo decoding with a local HF checkpoint folder (+ adapter); prints the text/ids and stats
  train      train a Kangaroo adapter for a base model (kangaroo.train); on several devices or nodes run it
             under torchrun: torchrun --nproc_per_node N -m kangaroo.cli train ...
  demo       the self-contained demo: small LM + adapter, exactness, acceptance and speedup (kangaroo.demo)

`kangaroo <command> --help` for the options of a command."""


def _lazy(module: str, argv: List[str]) -> int:
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        print(f"kangaroo: `{module.rsplit('.', 1)[-1]}` is not available in this installation ({module} is missing).",
              file=sys.stderr)
        return 2
    fn = getattr(mod, "cli_main", None)
    if fn is None:
        print(f"kangaroo: {module} has no cli_main(argv)", file=sys.stderr)
        return 2
    return int(fn(argv) or 0)


def _generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kangaroo generate", description="Kangaroo self-speculative decoding.")
    p.add_argument("model", help="local HF checkpoint folder (config.json + *.safetensors [+ tokenizer])")
    p.add_argument("--adapter", default=None, help="adapter folder (save_pretrained); default: a random adapter")
    p.add_argument("--exit-layer", type=int, default=None,
                   help="exit layer (default: the adapter's; 2 for a random adapter)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="prompt text (needs the folder's tokenizer); repeat for "
                                                       "a batch")
    src.add_argument("--ids", action="append", help="prompt token ids, space separated; repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threshold", type=float, default=0.6, help="dynamic-exit confidence η (default 0.6)")
    p.add_argument("--max-draft", type=int, default=6, help="γ, the most draft steps per cycle (default 6)")
    p.add_argument("--tree", action="store_true", help="tree drafting (top-k siblings per step)")
    p.add_argument("--lookup", action="store_true",
                   help="Kangaroo + lookup: also verify the continuation of the last earlier occurrence of the "
                        "sequence's suffix (prompt + output n-gram lookup)")
    p.add_argument("--lookup-max", type=int, default=4, help="most lookup tokens per cycle (default 4)")
    p.add_argument("--lookup-ngram", type=int, nargs=2, default=[3, 4], metavar=("N_MIN", "N_MAX"),
                   help="suffix lengths the lookup matches (default 3 4)")
    p.add_argument("--lookup-policy", choices=["auto", "merge", "first"], default="auto",
                   help="merge: the lookup merged with the adapter's chain every cycle; first: a matched lookup is "
                        "verified alone (no chain that cycle); auto: first on CPU, merge on CUDA")
    p.add_argument("--draft-head", choices=["auto", "int8", "exact"], default="auto",
                   help="the chain's draft LM head: int8 copy (CPU), exact, or auto (int8 where it measures faster)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--eos", type=int, action="append", default=None,
                   help="EOS id(s) (default: the tokenizer's, when a text prompt is given)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--baseline", action="store_true",
                   help="also run plain autoregressive decoding on the same code; report speedup and exactness")
    return p


def _generate(argv: List[str]) -> int:
    args = _generate_parser().parse_args(argv)
    import torch

    from kangaroo.generate import KangarooDecoder

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    tok = None
    if args.prompt:
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(args.model)
        except Exception as e:  # noqa: BLE001 - any tokenizer failure gets the same advice
            print(f"kangaroo generate: cannot load a tokenizer from {args.model!r} ({e}); pass --ids instead",
                  file=sys.stderr)
            return 2
        prompts = [tok(t)["input_ids"] for t in args.prompt]
    else:
        try:
            prompts = [[int(x) for x in s.replace(",", " ").split()] for s in args.ids]
        except ValueError:
            print("kangaroo generate: --ids takes integers separated by spaces", file=sys.stderr)
            return 2
    eos = args.eos
    if eos is None and tok is not None and tok.eos_token_id is not None:
        eos = [tok.eos_token_id]
    try:
        dec = KangarooDecoder.from_pretrained(args.model, adapter=args.adapter, exit_layer=args.exit_layer,
                                              dtype=dtype, device=device, draft_head=args.draft_head)
        kw = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed, eos=eos)
        out = dec.generate(prompts, args.max_new_tokens, threshold=args.threshold, max_draft=args.max_draft,
                           tree=args.tree, lookup=args.lookup, lookup_max=args.lookup_max,
                           lookup_ngram=tuple(args.lookup_ngram), lookup_policy=args.lookup_policy, **kw)
        base = dec.generate_autoregressive(prompts, args.max_new_tokens, **kw) if args.baseline else None
    except ValueError as e:
        print(f"kangaroo generate: {e}", file=sys.stderr)
        return 2
    for b, t in enumerate(out.tokens):
        ids = t.tolist()
        head = f"[{b}] " if len(prompts) > 1 else ""
        print(head + (tok.decode(ids) if tok is not None else " ".join(map(str, ids))))
    s = out.stats
    print(f"# {s.mode}: {s.new_tokens} tokens in {s.time_s:.3f} s = {s.tokens_per_s:.1f} tok/s; {s.cycles} cycles, "
          f"{s.mean_tokens_per_cycle:.2f} tokens/cycle (accepted {s.mean_accepted:.2f} of {s.mean_drafted:.2f} "
          f"drafted); draft {s.draft_time_s:.3f} s, verify {s.verify_time_s:.3f} s", file=sys.stderr)
    if args.lookup:
        print(f"# lookup: accepted {s.accepted_from_chain} from the chain, {s.accepted_from_lookup} from the lookup "
              f"branch; lookup hit in {100 * s.lookup_hit_rate:.0f} % of row-cycles", file=sys.stderr)
    if s.accept_per_position:
        print("# acceptance per position: " + " ".join(f"{x:.2f}" for x in s.accept_per_position), file=sys.stderr)
    if base is not None:
        same = all(a.tolist() == b.tolist() for a, b in zip(out.tokens, base.tokens))
        exact = "identical output" if same else (
            "outputs differ (expected when sampling)" if args.temperature > 0 else "OUTPUTS DIFFER")
        print(f"# baseline: {base.stats.tokens_per_s:.1f} tok/s; speedup "
              f"{s.tokens_per_s / max(base.stats.tokens_per_s, 1e-9):.2f}x; {exact}", file=sys.stderr)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "generate":
        return _generate(rest)
    if cmd == "train":
        return _lazy("kangaroo.train", rest)
    if cmd == "demo":
        return _lazy("kangaroo.demo", rest)
    print(f"kangaroo: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
