"""`kangaroo demo`: the whole method out of the box, with nothing downloaded.

First run (cached afterwards in $KANGAROO_CACHE or ~/.cache/kangaroo/demo-<version>[-<sizes>]; `--retrain` rebuilds):
  1. a byte-level BPE tokenizer trained on the Python standard library's source (a few % of its files, chosen by a
     hash of their path, are held out for prompts);
  2. a small Llama-architecture LM (transformers' LlamaForCausalLM) pretrained on that source, saved as an HF folder
     (config.json, model.safetensors, tokenizer.json);
  3. its Kangaroo adapter, trained by self-distillation (kangaroo.train), with a held-out report.
Every run then continues held-out code with plain greedy decoding and with Kangaroo on the same model code, and prints
whether the outputs are identical, tokens per cycle, acceptance per draft position, tokens/s of both and the speedup,
beside transformers' own generate on the same weights (plain greedy, `assistant_early_exit`, prompt lookup).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

DEMO_VERSION = "v1"


@dataclass
class DemoSizes:
    vocab_size: int = 4096
    hidden_size: int = 256
    num_layers: int = 8
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 704
    seq_len: int = 256
    tokenizer_bytes: int = 8_000_000
    corpus_bytes: int = 12_000_000
    lm_batch: int = 8
    lm_lr: float = 3e-3
    lm_steps: int = 50000  # upper bound; the time budget usually decides
    lm_minutes: float = 8.5
    lm_min_steps: int = 600  # quality floor: below this the model loops on a few tokens (slow machines run longer)
    exit_layer: int = 1
    adapter_batch: int = 8
    adapter_lr: float = 1e-2
    adapter_steps: int = 20000  # upper bound; the time budget usually decides
    adapter_minutes: float = 3.5
    adapter_min_steps: int = 300
    seed: int = 0


QUICK = dict(vocab_size=512, hidden_size=64, num_layers=4, num_heads=2, num_kv_heads=1, intermediate_size=128,
             seq_len=128, tokenizer_bytes=400_000, corpus_bytes=600_000, lm_batch=8, lm_lr=5e-3, lm_steps=60,
             lm_minutes=0.5, lm_min_steps=0, adapter_batch=8, adapter_lr=3e-3, adapter_steps=40, adapter_minutes=0.25,
             adapter_min_steps=0)


def default_cache_root() -> Path:
    env = os.environ.get("KANGAROO_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "kangaroo"


def cache_dir_for(sizes: DemoSizes, root: Path | None = None) -> Path:
    root = Path(root) if root is not None else default_cache_root()
    if sizes == DemoSizes():
        return root / f"demo-{DEMO_VERSION}"
    tag = hashlib.sha1(json.dumps(asdict(sizes), sort_keys=True).encode()).hexdigest()[:8]
    return root / f"demo-{DEMO_VERSION}-{tag}"


def _log(msg):
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------------------------------
# Building the cached model


def build_tokenizer(sizes: DemoSizes, out: Path):
    from kangaroo import data

    files, _ = data.split_stdlib(data.stdlib_source_files())
    texts = data.sample_texts(files, sizes.tokenizer_bytes, seed=sizes.seed)
    t0 = time.perf_counter()
    tok = data.train_bpe_tokenizer(texts, vocab_size=sizes.vocab_size)
    tok.save_pretrained(str(out))
    _log(f"[1/3] tokenizer: byte-level BPE, {len(tok)} tokens, trained on {sum(map(len, texts)) / 1e6:.1f} MB of "
         f"stdlib source in {time.perf_counter() - t0:.1f} s")
    return tok


def _corpus(tok, sizes: DemoSizes, heldout: bool):
    from kangaroo import data

    train_files, held_files = data.split_stdlib(data.stdlib_source_files())
    files = held_files if heldout else train_files
    texts = data.sample_texts(files, sizes.corpus_bytes if not heldout else 10**12, seed=sizes.seed + 1)
    enc = tok(texts, add_special_tokens=False)["input_ids"]
    exs = [data.Example(ids + [tok.eos_token_id], [1] * (len(ids) + 1)) for ids in enc]
    return data.PackedDataset(exs, sizes.seq_len), texts


def build_base(sizes: DemoSizes, tok, out: Path, progress=None):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kangaroo import train

    t0 = time.perf_counter()
    ds, _ = _corpus(tok, sizes, heldout=False)
    torch.manual_seed(sizes.seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=sizes.hidden_size, intermediate_size=sizes.intermediate_size,
        num_hidden_layers=sizes.num_layers, num_attention_heads=sizes.num_heads,
        num_key_value_heads=sizes.num_kv_heads, max_position_embeddings=2048, rope_theta=10000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    _log(f"[2/3] base LM: Llama, {sizes.num_layers} layers, hidden {sizes.hidden_size}, {n_params / 1e6:.1f}M params; "
         f"corpus {ds.ids.numel() / 1e6:.2f}M tokens (tokenized in {time.perf_counter() - t0:.1f} s); "
         f"training for up to {sizes.lm_minutes:g} min")
    lcfg = train.LMTrainConfig(seq_len=sizes.seq_len, batch_size=sizes.lm_batch, steps=sizes.lm_steps,
                               lr=sizes.lm_lr, warmup=min(30, max(2, sizes.lm_steps // 10)), dtype="auto",
                               seed=sizes.seed, log_file=str(out.parent / "train.log"),
                               time_budget_s=sizes.lm_minutes * 60, min_steps=sizes.lm_min_steps)
    hist = train.train_lm(model, ds, lcfg, progress=progress)
    tail = hist[-20:]
    final = sum(h["loss"] for h in tail) / max(1, len(tail))
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    _log(f"      {len(hist)} steps, {len(hist) * sizes.lm_batch * sizes.seq_len / 1e6:.2f}M tokens, final train "
         f"loss {final:.2f} nats/token, {time.perf_counter() - t0:.0f} s")
    return model


def build_adapter(sizes: DemoSizes, tok, base, out: Path, progress=None):
    from kangaroo import train

    t0 = time.perf_counter()
    ds, _ = _corpus(tok, sizes, heldout=False)
    cfg = train.AdapterTrainConfig(exit_layer=sizes.exit_layer, seq_len=sizes.seq_len,
                                   batch_size=sizes.adapter_batch, steps=sizes.adapter_steps, lr=sizes.adapter_lr,
                                   warmup=min(30, max(2, sizes.adapter_steps // 10)), dtype="auto", seed=sizes.seed,
                                   log_file=str(out.parent / "train.log"),
                                   save_every=0, time_budget_s=sizes.adapter_minutes * 60,
                                   min_steps=sizes.adapter_min_steps)
    tr = train.AdapterTrainer(base, ds, cfg, out_dir=None, progress=progress)
    _log(f"[3/3] adapter: exit layer {sizes.exit_layer}, batches of {cfg.batch_size}x{cfg.seq_len} tokens, "
         f"training for up to {sizes.adapter_minutes:g} min")
    tr.train()
    tr.save(out)
    tail = tr.history[-20:]
    _log(f"      {tr.step} steps in {time.perf_counter() - t0:.0f} s; final train soft-CE "
         f"{sum(h['loss'] for h in tail) / max(1, len(tail)):.3f}, top-1 agreement "
         f"{sum(h['agree'] for h in tail) / max(1, len(tail)):.3f}")
    return tr.adapter


def _heldout_prompts(tok, n: int, prompt_tokens: int, min_len: int, reverse: bool = False):
    """Prompts cut from held-out stdlib files: the code up to and including a `def` line, at most prompt_tokens.
    reverse: from the other end of the (sorted) held-out files (the tuning prompt, disjoint from reported ones)."""
    from kangaroo import data

    _, held = data.split_stdlib(data.stdlib_source_files())
    prompts = []
    for p in reversed(held) if reverse else held:
        text = data.read_text(p)
        if not text or len(text) < 2000:
            continue
        # the second function definition after the first 1500 characters: the model continues its body
        i = text.find("\n    def ", 1500)
        if i < 0:
            i = text.find("\ndef ", 1500)
        if i < 0:
            continue
        j = text.find("\n", i + 1)
        ids = tok(text[:j + 1], add_special_tokens=False)["input_ids"]
        if len(ids) < min_len:
            continue
        prompts.append((p.name, ids[-prompt_tokens:]))
        if len(prompts) >= n:
            break
    return prompts


def ensure_model(sizes: DemoSizes, cache: Path, retrain: bool = False, progress=None) -> dict:
    """The cached tokenizer, base model and adapter (trained if missing). Returns the paths and the manifest."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from kangaroo import train

    if retrain and cache.exists():
        shutil.rmtree(cache)
    cache.mkdir(parents=True, exist_ok=True)
    tok_dir, base_dir, ad_dir = cache / "tokenizer", cache / "base", cache / "adapter"
    manifest_path = cache / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    t_start = time.perf_counter()
    built = False
    if not (tok_dir / "tokenizer.json").exists():
        tok = build_tokenizer(sizes, tok_dir)
        built = True
    else:
        tok = AutoTokenizer.from_pretrained(str(tok_dir))
    if not (base_dir / "model.safetensors").exists():
        shutil.rmtree(ad_dir, ignore_errors=True)  # an adapter belongs to one base model
        base = build_base(sizes, tok, base_dir, progress=progress)
        built = True
    else:
        base = LlamaForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    base.eval()
    if not (ad_dir / "adapter_config.json").exists():
        adapter = build_adapter(sizes, tok, base, ad_dir, progress=progress)
        held, _ = _corpus(tok, sizes, heldout=True)
        prompts = torch.tensor([ids for _, ids in _heldout_prompts(tok, 8, 64, 64)])
        rep = train.evaluate_adapter(base, adapter, sizes.exit_layer, heldout=held, prompts=prompts,
                                     new_tokens=96, etas=(0.2, 0.3, 0.4, 0.5, 0.6), gamma=6, max_rows=16)
        _log(train.format_report(rep))
        manifest["adapter_report"] = rep
        manifest.pop("tuned", None)  # eta/gamma were tuned for the previous adapter
        built = True
    if built:
        manifest.update({"version": DEMO_VERSION, "sizes": asdict(sizes),
                         "build_s": manifest.get("build_s", 0.0) + time.perf_counter() - t_start})
        manifest_path.write_text(json.dumps(manifest, indent=1))
    return {"tokenizer": tok, "base": base, "base_dir": base_dir, "adapter_dir": ad_dir, "manifest": manifest,
            "manifest_path": manifest_path, "built": built}


# --------------------------------------------------------------------------------------------------------------------
# The comparison


def _time_hf(model, ids, new_tokens, **kw):
    import torch

    x = torch.tensor([ids])
    t0 = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, num_beams=1, **kw)
    dt = time.perf_counter() - t0
    return out[0, len(ids):].tolist(), dt


def tune_decoding(dec, ids, new_tokens: int = 64, etas=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8),
                  gammas=(2, 3, 4, 6, 8), progress=None) -> dict:
    """(eta, gamma) with the most tokens/s on one tuning prompt (held out, not among the reported prompts); each
    setting is timed twice and the faster run counts (the machine may be shared)."""
    from kangaroo.train import _bar

    grid = [(e, g) for g in gammas for e in etas]
    best, table = None, []
    bar = _bar(len(grid), "tuning eta, gamma", disable=None if progress is None else not progress)
    for eta, gamma in grid:
        tps = 0.0
        for _ in range(2):
            out = dec.generate(ids, new_tokens, threshold=eta, max_draft=gamma)
            tps = max(tps, out.stats.tokens_per_s)
        table.append({"eta": eta, "gamma": gamma, "tps": tps, "tokens_per_cycle": out.stats.mean_tokens_per_cycle})
        if best is None or tps > best["tps"]:
            best = table[-1]
        bar.update(1)
    bar.close()
    return {"eta": best["eta"], "gamma": best["gamma"], "table": table}


def run_comparison(built: dict, n_prompts: int, new_tokens: int, threshold: float | None = None,
                   max_draft: int | None = None, hf_peers: bool = True, hf_prompts: int = 2, progress=None,
                   retune: bool = False) -> dict:
    """Plain vs Kangaroo on held-out prompts (and transformers' generate peers). threshold / max_draft None: the
    tuned values cached in the manifest (tuned now on a separate held-out prompt if missing or `retune`)."""
    import torch

    from kangaroo.adapter import KangarooAdapter
    from kangaroo.generate import KangarooDecoder
    from kangaroo.train import _bar

    tok, base = built["tokenizer"], built["base"]
    adapter = KangarooAdapter.from_pretrained(built["adapter_dir"])
    dec = KangarooDecoder.from_pretrained(str(built["base_dir"]), adapter=adapter, exit_layer=adapter.exit_layer,
                                          dtype=torch.float32, device="cpu")
    prompts = _heldout_prompts(tok, n_prompts, 128, 32)
    tune_name, tune_ids = _heldout_prompts(tok, 1, 128, 32, reverse=True)[0]
    # warm-up (allocations, lazy inits) on a short run of each mode
    dec.generate_autoregressive(tune_ids, 8)
    dec.generate(tune_ids, 8)
    tuned = built["manifest"].get("tuned")
    if (threshold is None or max_draft is None) and (tuned is None or retune):
        tuned = tune_decoding(dec, tune_ids, progress=progress)
        tuned["prompt"] = tune_name
        built["manifest"]["tuned"] = tuned
        mp = built.get("manifest_path")
        if mp is not None:
            Path(mp).write_text(json.dumps(built["manifest"], indent=1))
    threshold = tuned["eta"] if threshold is None else threshold
    max_draft = tuned["gamma"] if max_draft is None else max_draft
    rows = []
    totals = {"plain": [0, 0.0], "kangaroo": [0, 0.0]}
    cyc = {"tokens": 0, "cycles": 0}
    acc_num, acc_den = [0.0] * max_draft, [0.0] * max_draft
    hist = [0] * (max_draft + 1)
    bar = _bar(len(prompts), "generating", disable=None if progress is None else not progress)
    for name, ids in prompts:
        a = dec.generate_autoregressive(ids, new_tokens)
        k = dec.generate(ids, new_tokens, threshold=threshold, max_draft=max_draft)
        ta, tk = a.tokens.tolist(), k.tokens.tolist()
        same = ta == tk
        s = k.stats
        rows.append({"prompt": name, "identical": same, "tokens": len(tk), "plain_tps": a.stats.tokens_per_s,
                     "kangaroo_tps": s.tokens_per_s, "tokens_per_cycle": s.mean_tokens_per_cycle,
                     "cycles": s.cycles, "draft_s": s.draft_time_s, "verify_s": s.verify_time_s,
                     "text": tok.decode(tk), "ids": tk})
        totals["plain"][0] += a.stats.new_tokens
        totals["plain"][1] += a.stats.time_s
        totals["kangaroo"][0] += s.new_tokens
        totals["kangaroo"][1] += s.time_s
        cyc["tokens"] += s.new_tokens
        cyc["cycles"] += s.cycles
        for i, (p, n) in enumerate(zip(s.accept_per_position[:max_draft], s.drafted_per_position)):
            acc_num[i] += p * n  # P(accepted | drafted) pooled over prompts: accepted / drafted
            acc_den[i] += n
        for i, c in enumerate(s.accept_hist[: max_draft + 1]):
            hist[i] += c
        bar.update(1)
    bar.close()
    res = {"rows": rows, "threshold": threshold, "max_draft": max_draft, "exit_layer": adapter.exit_layer,
           "new_tokens": new_tokens, "tuned": tuned}
    res["plain_tps"] = totals["plain"][0] / max(totals["plain"][1], 1e-9)
    res["kangaroo_tps"] = totals["kangaroo"][0] / max(totals["kangaroo"][1], 1e-9)
    res["speedup"] = res["kangaroo_tps"] / max(res["plain_tps"], 1e-9)
    res["tokens_per_cycle"] = cyc["tokens"] / max(1, cyc["cycles"])
    res["accept_per_position"] = [n / d if d else None for n, d in zip(acc_num, acc_den)]
    res["accept_hist"] = hist
    res["distinct_tokens"] = len({t for r in rows for t in r["ids"]})
    tot = max(1, sum(hist))
    res["accept_at_least"] = [sum(hist[i:]) / tot for i in range(1, max_draft + 1)]
    res["identical"] = sum(r["identical"] for r in rows)
    res["draft_s"] = sum(r["draft_s"] for r in rows)
    res["verify_s"] = sum(r["verify_s"] for r in rows)
    res["kangaroo_s"] = totals["kangaroo"][1]

    if hf_peers:
        peers = {"transformers greedy": {},
                 f"transformers assistant_early_exit={adapter.exit_layer}": {
                     "assistant_early_exit": adapter.exit_layer},
                 "transformers prompt_lookup_num_tokens=10": {"prompt_lookup_num_tokens": 10}}
        _time_hf(base, prompts[0][1], 4)  # warm-up
        hf = {}
        ours = {name: r for (name, _), r in zip(prompts, rows)}
        for label, kw in peers.items():
            n_tok, dt, same = 0, 0.0, 0
            for name, ids in prompts[:hf_prompts]:
                try:
                    out, t = _time_hf(base, ids, new_tokens, **kw)
                except Exception as e:  # noqa: BLE001 - a peer that does not run here is reported, not fatal
                    hf[label] = {"error": f"{type(e).__name__}: {e}"[:200]}
                    break
                n_tok += len(out)
                dt += t
                same += int(tok.decode(out) == ours[name]["text"])
            else:
                hf[label] = {"tps": n_tok / max(dt, 1e-9), "identical": same, "prompts": hf_prompts}
        # our plain and Kangaroo figures on the same prompts, for a like-for-like column
        sub = rows[:hf_prompts]
        res["hf"] = hf
        res["ours_on_hf_prompts"] = {
            "plain_tps": sum(r["tokens"] for r in sub) / sum(r["tokens"] / r["plain_tps"] for r in sub),
            "kangaroo_tps": sum(r["tokens"] for r in sub) / sum(r["tokens"] / r["kangaroo_tps"] for r in sub)}
    return res


def format_results(res: dict) -> str:
    L = []
    tuned = res.get("tuned")
    how = (f" (tuned for tokens/s on the held-out prompt {tuned['prompt']}, not reported below)"
           if tuned and tuned.get("eta") == res["threshold"] and tuned.get("gamma") == res["max_draft"] else "")
    L.append(f"Kangaroo (exit layer {res['exit_layer']}, eta={res['threshold']}, gamma={res['max_draft']}{how}), "
             f"greedy, {res['new_tokens']} new tokens per prompt, CPU:")
    L.append(f"  {'prompt':<28} {'identical':>9} {'tok/cycle':>9} {'plain tok/s':>12} {'kangaroo tok/s':>15}")
    for r in res["rows"]:
        L.append(f"  {r['prompt']:<28} {'yes' if r['identical'] else 'NO':>9} {r['tokens_per_cycle']:>9.2f} "
                 f"{r['plain_tps']:>12.1f} {r['kangaroo_tps']:>15.1f}")
    n = len(res["rows"])
    acc = " ".join(f"{a:.2f}" if a is not None else "-" for a in res["accept_per_position"])
    L.append(f"  identical output: {res['identical']}/{n} prompts")
    atl = " ".join(f"{a:.2f}" for a in res["accept_at_least"])
    L.append(f"  mean tokens per cycle: {res['tokens_per_cycle']:.2f}; acceptance per draft position "
             f"(P(accepted | drafted)): {acc}")
    L.append(f"  share of cycles accepting >= 1..{res['max_draft']} drafts: {atl}")
    L.append(f"  tokens/s: plain {res['plain_tps']:.1f}, Kangaroo {res['kangaroo_tps']:.1f} -> speedup "
             f"{res['speedup']:.2f}x (draft {res['draft_s'] / max(res['kangaroo_s'], 1e-9):.0%} / verify "
             f"{res['verify_s'] / max(res['kangaroo_s'], 1e-9):.0%} of Kangaroo's time)")
    first = res["rows"][0]
    sample = first["text"].rstrip("\n").split("\n")[:8]
    L.append(f"  sample: the first {len(sample)} lines Kangaroo wrote after the prompt from {first['prompt']}:")
    L.extend("    | " + line for line in sample)
    if res.get("distinct_tokens") is not None:
        L.append(f"  distinct tokens in all outputs: {res['distinct_tokens']} (a weak model loops on a few)")
    if "hf" in res:
        o = res["ours_on_hf_prompts"]
        L.append(f"  on the first {next(iter(res['hf'].values())).get('prompts', '?')} prompts, tokens/s:")
        L.append(f"    {'kangaroo (this library)':<44} {o['kangaroo_tps']:>8.1f}")
        L.append(f"    {'plain greedy (this library)':<44} {o['plain_tps']:>8.1f}")
        for label, v in res["hf"].items():
            if "error" in v:
                L.append(f"    {label:<44} failed: {v['error']}")
            else:
                L.append(f"    {label:<44} {v['tps']:>8.1f}   (same text as ours: {v['identical']}/{v['prompts']})")
    return "\n".join(L)


# --------------------------------------------------------------------------------------------------------------------
# CLI


def _parser():
    p = argparse.ArgumentParser(prog="kangaroo demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--cache-dir", default=None, help="cache folder (default: $KANGAROO_CACHE or ~/.cache/kangaroo)")
    p.add_argument("--retrain", action="store_true", help="rebuild tokenizer, model and adapter")
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds; for tests and smoke runs)")
    for f in fields(DemoSizes):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None, dest=f.name,
                       help=f"model/training size (default {f.default})")
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threshold", type=float, default=None,
                   help="eta (default: tuned for tokens/s on a held-out tuning prompt, cached)")
    p.add_argument("--max-draft", type=int, default=None, help="gamma (default: tuned with eta)")
    p.add_argument("--retune", action="store_true", help="tune eta and gamma again")
    p.add_argument("--no-hf", action="store_true", help="skip transformers' generate peers")
    p.add_argument("--hf-prompts", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--build-only", action="store_true", help="build (or load) the model, then stop")
    return p


def cli_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from kangaroo.train import tune_malloc

    tune_malloc()
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    kw = dict(QUICK) if args.quick else {}
    kw.update({f.name: getattr(args, f.name) for f in fields(DemoSizes) if getattr(args, f.name) is not None})
    sizes = DemoSizes(**kw)
    cache = cache_dir_for(sizes, args.cache_dir)
    progress = False if args.no_progress else None
    _log(f"kangaroo demo: model cache {cache}" + (" (rebuilding)" if args.retrain else ""))
    built = ensure_model(sizes, cache, retrain=args.retrain, progress=progress)
    t_build = time.perf_counter() - t0
    if args.build_only:
        _log(f"built in {t_build:.0f} s: {cache}")
        return 0
    res = run_comparison(built, args.prompts, args.new_tokens, args.threshold, args.max_draft,
                         hf_peers=not args.no_hf, hf_prompts=args.hf_prompts, progress=progress,
                         retune=args.retune)
    _log(format_results(res))
    total = time.perf_counter() - t0
    res.update({"total_s": total, "build_s": t_build if built["built"] else 0.0, "sizes": asdict(sizes)})
    _log(f"total {total:.0f} s" + (f" (of which building the model {t_build:.0f} s)" if built["built"] else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    return 0 if res["identical"] == len(res["rows"]) else 1


if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
