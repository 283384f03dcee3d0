"""`kangaroo demo`: the whole method out of the box, with nothing downloaded.

The default model ships inside the package (kangaroo/default_model: bf16 weights, tokenizer, adapter and a manifest
with sha256s, the command that built it and its quality figures), so `kangaroo demo` trains nothing. `--retrain`
rebuilds it from scratch with the same code, in $KANGAROO_CACHE or ~/.cache/kangaroo/demo-<version>[-<sizes>]
(`--quick`: tiny sizes, seconds, for tests), in three steps:
  1. a byte-level BPE tokenizer trained on the Python standard library's source (a few % of its files, chosen by a
     hash of their path, are held out for prompts);
  2. a small Llama-architecture LM (transformers' LlamaForCausalLM) pretrained on that source, saved as an HF folder
     (config.json, model.safetensors, tokenizer.json);
  3. its Kangaroo adapter, trained by self-distillation (kangaroo.train), with a held-out report.
Every run then continues held-out code with plain greedy decoding and with Kangaroo (sequence and tree) on the same
model code, and transformers' own generate on the same weights (plain greedy, `assistant_early_exit`, prompt lookup),
all measured alike (same threads, a warm-up excluded, every prompt, interleaved), and prints tokens/s per method,
whether each output is identical to plain greedy, tokens per cycle, acceptance per draft position and the goals,
and writes a PNG and a JSON of the run.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

DEMO_VERSION = "v2"


@dataclass
class DemoSizes:
    vocab_size: int = 4096
    hidden_size: int = 256
    num_layers: int = 12
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 768
    seq_len: int = 256
    tokenizer_bytes: int = 8_000_000
    corpus_bytes: int = 24_000_000
    lm_batch: int = 8
    lm_lr: float = 3e-3
    lm_steps: int = 50000  # upper bound; the time budget usually decides
    lm_minutes: float = 75.0
    lm_min_steps: int = 600  # quality floor: below this the model loops on a few tokens (slow machines run longer)
    exit_layer: int = 1
    adapter_batch: int = 8
    adapter_lr: float = 6e-3
    adapter_steps: int = 20000  # upper bound; the time budget usually decides
    adapter_minutes: float = 70.0
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
    wall = time.perf_counter() - t0
    _log(f"      {len(hist)} steps, {len(hist) * sizes.lm_batch * sizes.seq_len / 1e6:.2f}M tokens, final train "
         f"loss {final:.2f} nats/token, {wall:.0f} s")
    model.train_info = {"steps": len(hist), "tokens": len(hist) * sizes.lm_batch * sizes.seq_len,
                        "final_train_loss": final, "wall_s": wall, "params": n_params}
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
    tr.adapter.train_info = {"steps": tr.step, "wall_s": time.perf_counter() - t0, "dtype": tr.dtype_reason,
                             "final_train_soft_ce": sum(h["loss"] for h in tail) / max(1, len(tail)),
                             "final_train_top1": sum(h["agree"] for h in tail) / max(1, len(tail))}
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


def ensure_model(sizes: DemoSizes, cache: Path, retrain: bool = False, progress=None,
                 command: str | None = None) -> dict:
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
    built = built_base = False
    if not (tok_dir / "tokenizer.json").exists():
        tok = build_tokenizer(sizes, tok_dir)
        built = True
    else:
        tok = AutoTokenizer.from_pretrained(str(tok_dir))
    if not (base_dir / "model.safetensors").exists():
        shutil.rmtree(ad_dir, ignore_errors=True)  # an adapter belongs to one base model
        base = build_base(sizes, tok, base_dir, progress=progress)
        manifest["lm_train"] = base.train_info
        built = built_base = True
    else:
        base = LlamaForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    base.eval()
    if not (ad_dir / "adapter_config.json").exists():
        adapter = build_adapter(sizes, tok, base, ad_dir, progress=progress)
        manifest["adapter_train"] = adapter.train_info
        held, _ = _corpus(tok, sizes, heldout=True)
        prompts = torch.tensor([ids for _, ids in _heldout_prompts(tok, 8, 64, 64)])
        rep = train.evaluate_adapter(base, adapter, sizes.exit_layer, heldout=held, prompts=prompts,
                                     new_tokens=96, etas=(0.2, 0.3, 0.4, 0.5, 0.6), gamma=6, max_rows=16)
        _log(train.format_report(rep))
        manifest["adapter_report"] = rep
        manifest.pop("tuned", None)  # eta/gamma were tuned for the previous adapter
        built = True
    if built:
        if command is None:
            argv = sys.argv[1:]
            argv = argv[1:] if argv[:1] == ["demo"] else argv  # python -m kangaroo.cli demo ... or kangaroo-demo ...
            command = " ".join(["kangaroo", "demo"] + argv)
        run = {"code_revision": _git_revision(), "command": command}
        if "lm_train" in manifest and "command" in manifest and not built_base:  # an adapter-only rebuild
            run = {"adapter_" + k: v for k, v in run.items()}
        manifest.update({"version": DEMO_VERSION, "sizes": asdict(sizes), "machine": machine_info(), **run,
                         "build_s": manifest.get("build_s", 0.0) + time.perf_counter() - t_start})
        manifest_path.write_text(json.dumps(manifest, indent=1))
    return {"tokenizer": tok, "base": base, "base_dir": base_dir, "adapter_dir": ad_dir, "manifest": manifest,
            "manifest_path": manifest_path, "built": built}


# --------------------------------------------------------------------------------------------------------------------
# The shipped default model


def shipped_dir() -> Path:
    """The default model inside the package (tokenizer/, base/, adapter/, manifest.json)."""
    return Path(__file__).resolve().parent / "default_model"


SHIPPED_FILES = ("tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
                 "base/config.json", "base/generation_config.json", "base/model.safetensors",
                 "adapter/adapter_config.json", "adapter/adapter.safetensors")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_shipped(root: Path | None = None) -> list[str]:
    """The shipped files that are missing or whose sha256 differs from the manifest's (empty: all good)."""
    root = Path(root) if root is not None else shipped_dir()
    mp = root / "manifest.json"
    if not mp.exists():
        return ["manifest.json"]
    want = json.loads(mp.read_text()).get("files", {})
    bad = [f for f in SHIPPED_FILES if f not in want]
    for rel, sha in want.items():
        p = root / rel
        if not p.exists() or sha256_of(p) != sha:
            bad.append(rel)
    return bad


def load_shipped(root: Path | None = None) -> dict:
    """The shipped tokenizer, base model (fp32 in memory; stored bf16) and adapter, checked against the manifest."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    root = Path(root) if root is not None else shipped_dir()
    bad = check_shipped(root)
    if bad:
        raise RuntimeError(f"the shipped demo model in {root} is incomplete or modified ({', '.join(bad)}); "
                           f"reinstall the package or rebuild it with `kangaroo demo --retrain`")
    tok = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
    base = LlamaForCausalLM.from_pretrained(str(root / "base"), dtype=torch.float32).eval()
    manifest = json.loads((root / "manifest.json").read_text())
    return {"tokenizer": tok, "base": base, "base_dir": root / "base", "adapter_dir": root / "adapter",
            "manifest": manifest, "manifest_path": None, "built": False, "shipped": True}


def _git_revision() -> str:
    import subprocess

    try:
        here = Path(__file__).resolve().parent
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
        if rev.returncode:
            return "unknown (not a git checkout)"
        return rev.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info() -> dict:
    import platform

    import torch

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:  # the builds the library's own CPU loops run here (csrc/cpu/simd.h)
        from kangaroo_kernels._ext import ops

        isa = f"{ops().cpu_isa()} (GEMM: {ops().gemm_isa()} build)"
    except (ImportError, RuntimeError, AttributeError):
        isa = "unknown (the native extension is not built)"
    return {"cpu": model, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "kernel_isa": isa,
            "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform()}


def ship(built: dict, dest: Path, command: str) -> dict:
    """Writes the built model into `dest` as the shipped default: bf16 base weights, tokenizer, adapter (no
    optimizer state) and a manifest (sha256 per file, the command and code revision that built it, corpus and
    held-out split, steps, wall time, machine, held-out quality, tuned eta/gamma)."""
    import torch

    from kangaroo import data
    from kangaroo.adapter import KangarooAdapter

    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok, base = built["tokenizer"], built["base"]
    tok.save_pretrained(str(tmp / "tokenizer"))
    for extra in ("vocab.json", "merges.txt", "chat_template.jinja"):
        (tmp / "tokenizer" / extra).unlink(missing_ok=True)
    b16 = type(base)(base.config)
    b16.load_state_dict(base.state_dict())
    b16 = b16.to(torch.bfloat16)
    b16.generation_config = base.generation_config
    b16.save_pretrained(str(tmp / "base"))
    adapter = KangarooAdapter.from_pretrained(str(built["adapter_dir"]))
    adapter.save_pretrained(str(tmp / "adapter"), base_fingerprint=adapter.base_fingerprint)
    m = dict(built["manifest"])
    train_files, held_files = data.split_stdlib(data.stdlib_source_files())
    m.update({
        "command": m.get("command", command), "ship_command": command,
        "code_revision": m.get("code_revision", _git_revision()), "ship_code_revision": _git_revision(),
        "corpus": {"source": "the Python standard library's .py files of the interpreter that trained it",
                   "stdlib_root": str(data.stdlib_root()), "train_files": len(train_files),
                   "heldout_files": len(held_files), "heldout_split": "3 % of files by a hash of their path "
                   "(kangaroo.data.split_stdlib)", "heldout_names": [p.name for p in held_files]},
        "machine": m.get("machine", machine_info()),
        "files": {},
    })
    for rel in SHIPPED_FILES:
        if not (tmp / rel).exists():
            raise RuntimeError(f"ship: {rel} was not written")
        m["files"][rel] = sha256_of(tmp / rel)
    (tmp / "manifest.json").write_text(json.dumps(m, indent=1, default=str))
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return m


# --------------------------------------------------------------------------------------------------------------------
# The comparison


def _hf_generate(model, ids, new_tokens, **kw):
    import torch

    x = torch.tensor([ids])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, num_beams=1, **kw)
    return out[0, len(ids):].tolist()


def pick_threads(fn) -> int:
    """1 thread or all of torch's, whichever runs fn() faster here (small models often decode faster on one; on a
    shared machine two threads can be much slower). Every method of the comparison then runs on that count."""
    import torch

    n = torch.get_num_threads()
    if n == 1:
        return 1
    best = {}
    for k in (n, 1, n, 1):
        torch.set_num_threads(k)
        t = time.perf_counter()
        fn()
        best[k] = min(best.get(k, 1e9), time.perf_counter() - t)
    pick = 1 if best[1] <= best[n] else n
    torch.set_num_threads(pick)
    return pick


def tune_decoding(dec, ids, new_tokens: int = 64, etas=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8),
                  gammas=(2, 3, 4, 6, 8), tree: bool = False, progress=None) -> dict:
    """(eta, gamma) with the most tokens/s over the tuning prompt(s) `ids` (held out, not among the reported
    prompts; one id list or a list of them); each setting is timed twice per prompt and the faster run counts."""
    from kangaroo.train import _bar

    grid = [(e, g) for g in gammas for e in etas]
    prompts = ids if isinstance(ids[0], list) else [ids]
    best, table = None, []
    bar = _bar(len(grid), "tuning eta, gamma" + (" (tree)" if tree else ""),
               disable=None if progress is None else not progress)
    for eta, gamma in grid:
        tps, tpc = _tokens_per_s(lambda p: dec.generate(p, new_tokens, threshold=eta, max_draft=gamma, tree=tree),
                                 prompts)
        table.append({"eta": eta, "gamma": gamma, "tps": tps, "tokens_per_cycle": tpc})
        if best is None or tps > best["tps"]:
            best = table[-1]
        bar.update(1)
    bar.close()
    return {"eta": best["eta"], "gamma": best["gamma"], "table": table}


def _tokens_per_s(run, prompts, repeats: int = 2):
    """(tokens/s, tokens per cycle) of run(prompt) over all prompts, each timed `repeats` times, its fastest run
    counting (a shared machine's hiccups fall out)."""
    tokens = cycles = 0
    secs = 0.0
    for p in prompts:
        best = None
        for _ in range(repeats):
            out = run(p)
            if best is None or out.stats.time_s < best.stats.time_s:
                best = out
        tokens, cycles, secs = tokens + best.stats.new_tokens, cycles + best.stats.cycles, secs + best.stats.time_s
    return tokens / max(secs, 1e-9), tokens / max(cycles, 1)


def tune_lookup(dec, ids, eta: float, gamma: int, new_tokens: int = 64, sizes=(2, 4, 6, 8),
                ngrams=((1, 3), (2, 3), (3, 4), (4, 6))) -> dict:
    """The lookup branch's size M and n-gram range with the most tokens/s for Kangaroo + lookup at the sequence
    mode's (eta, gamma), over the tuning prompt(s) (each timed twice, the faster run counts). On a CPU a verify
    block costs more the wider it is, so the best M is a measurement, not a constant."""
    best, table = None, []
    prompts = ids if isinstance(ids[0], list) else [ids]
    for n in ngrams:
        for M in sizes:
            tps, tpc = _tokens_per_s(lambda p: dec.generate(p, new_tokens, threshold=eta, max_draft=gamma,
                                                            lookup=True, lookup_max=M, lookup_ngram=n), prompts)
            table.append({"lookup_max": M, "lookup_ngram": list(n), "tps": tps, "tokens_per_cycle": tpc})
            if best is None or tps > best["tps"]:
                best = table[-1]
    return {"lookup_max": best["lookup_max"], "lookup_ngram": best["lookup_ngram"], "eta": eta, "gamma": gamma,
            "table": table}


@dataclass
class Method:
    label: str
    run: object  # callable(ids) -> (token ids, GenerateStats or None)
    ours: bool
    speculative: bool = False


def _methods(dec, base, exit_layer, new_tokens, seq, tree, hf_peers, lookup):
    def ours(kind, **kw):
        def run(ids):
            o = dec.generate_autoregressive(ids, new_tokens) if kind == "plain" else dec.generate(ids, new_tokens, **kw)
            return o.tokens.tolist(), o.stats
        return run

    def hf(**kw):
        return lambda ids: (_hf_generate(base, ids, new_tokens, **kw), None)

    ms = [Method("plain greedy (this library)", ours("plain"), True),
          Method("Kangaroo, sequence (this library)", ours("seq", threshold=seq["eta"], max_draft=seq["gamma"]),
                 True, True),
          Method("Kangaroo, tree (this library)", ours("tree", threshold=tree["eta"], max_draft=tree["gamma"],
                                                       tree=True), True, True),
          Method("Kangaroo + lookup, sequence (this library)", ours("lookup", threshold=seq["eta"],
                                                                    max_draft=seq["gamma"], lookup=True, **lookup),
                 True, True)]
    if hf_peers:
        ms += [Method("transformers greedy", hf(), False),
               Method(f"transformers assistant_early_exit={exit_layer}", hf(assistant_early_exit=exit_layer), False),
               Method("transformers prompt_lookup_num_tokens=10", hf(prompt_lookup_num_tokens=10), False)]
    return ms


def run_comparison(built: dict, n_prompts: int, new_tokens: int, threshold: float | None = None,
                   max_draft: int | None = None, hf_peers: bool = True, repeats: int = 1, progress=None,
                   retune: bool = False, threads: int | None = None, tree: bool = True) -> dict:
    """Every method on the same held-out prompts, on the same weights, threads and machine, a warm-up call of each
    excluded, methods interleaved prompt by prompt (so a machine that slows down slows all of them), each prompt
    timed `repeats` times per method (the median counts). threshold / max_draft None: the tuned values in the
    manifest (tuned now on a separate held-out prompt if missing or `retune`)."""
    import statistics

    import torch

    from kangaroo.adapter import KangarooAdapter
    from kangaroo.generate import KangarooDecoder
    from kangaroo.train import _bar

    tok, base = built["tokenizer"], built["base"]
    adapter = KangarooAdapter.from_pretrained(built["adapter_dir"])
    dec = KangarooDecoder.from_pretrained(str(built["base_dir"]), adapter=adapter, exit_layer=adapter.exit_layer,
                                          dtype=torch.float32, device="cpu")
    prompts = _heldout_prompts(tok, n_prompts, 128, 32)
    if not prompts:
        raise RuntimeError("no held-out prompts found (the held-out stdlib files are missing)")
    tuning = _heldout_prompts(tok, 3, 128, 32, reverse=True)  # from the other end: disjoint from the reported ones
    tune_name, tune_ids = ", ".join(n for n, _ in tuning), [ids for _, ids in tuning]
    if threads:
        torch.set_num_threads(threads)
    else:
        threads = pick_threads(lambda: dec.generate_autoregressive(tune_ids[0], 16))
    manifest = built["manifest"]
    tuned = dict(manifest.get("tuned") or {})
    given = threshold is not None and max_draft is not None
    changed = False
    for mode in ("seq", "tree") if tree else ("seq",):
        if given and not retune:
            tuned.setdefault(mode, {"eta": threshold, "gamma": max_draft, "prompt": "(given)"})
        elif mode not in tuned or retune or tuned[mode].get("prompt") == "(given)":
            dec.generate(tune_ids[0], 8, tree=mode == "tree")  # warm-up
            tuned[mode] = tune_decoding(dec, tune_ids, tree=mode == "tree", progress=progress,
                                        etas=(0.1, 0.2, 0.3, 0.4, 0.6), gammas=(3, 4, 6) if mode == "seq" else (3, 4))
            tuned[mode]["prompt"] = tune_name
            changed = True
    if "lookup" not in tuned or retune or "seq" in tuned and tuned["lookup"].get("eta") != tuned["seq"]["eta"]:
        tuned["lookup"] = tune_lookup(dec, tune_ids, tuned["seq"]["eta"], tuned["seq"]["gamma"])
        tuned["lookup"]["prompt"] = tune_name
        changed = True
    if changed:  # values given on the command line are used, never stored as tuned
        manifest["tuned"] = tuned
        if built.get("manifest_path") is not None:
            Path(built["manifest_path"]).write_text(json.dumps(manifest, indent=1, default=str))
    seq, tr = dict(tuned["seq"]), dict(tuned.get("tree", tuned["seq"]))
    for d in (seq, tr):
        d.update({k: v for k, v in (("eta", threshold), ("gamma", max_draft)) if v is not None})
    lk = {"lookup_max": tuned["lookup"]["lookup_max"], "lookup_ngram": tuple(tuned["lookup"]["lookup_ngram"])}
    methods = _methods(dec, base, adapter.exit_layer, new_tokens, seq, tr, hf_peers, lk)
    if not tree:
        methods = [m for m in methods if "tree" not in m.label]
    for m in methods:  # warm-up: allocations, lazy inits, kernel selection
        m.run(prompts[0][1][:48])
    per = {m.label: {"tokens": 0, "time": 0.0, "identical": 0, "rows": []} for m in methods}
    spec = {m.label: {"tokens": 0, "cycles": 0, "acc": [0.0] * 16, "den": [0.0] * 16} for m in methods
            if m.speculative}
    rows = []
    gc.collect()
    gc.freeze()  # the imports' ~400k objects out of the collector: a full pass (0.4 s) inside a timing is noise
    bar = _bar(len(prompts), "generating", disable=None if progress is None else not progress)
    for i, (name, ids) in enumerate(prompts):
        order = methods[i % len(methods):] + methods[:i % len(methods)]
        outs = {}
        for m in order:
            times = []
            for _ in range(max(1, repeats)):
                t0 = time.perf_counter()
                toks, st = m.run(ids)
                times.append(time.perf_counter() - t0)
            outs[m.label] = (toks, st, statistics.median(times))
        ref = outs[methods[0].label][0]
        row = {"prompt": name, "tokens": len(ref), "ids": ref, "text": tok.decode(ref), "methods": {}}
        for m in methods:
            toks, st, dt = outs[m.label]
            same = toks == ref
            p = per[m.label]
            p["tokens"] += len(toks)
            p["time"] += dt
            p["identical"] += int(same)
            row["methods"][m.label] = {"tps": len(toks) / max(dt, 1e-9), "identical": same}
            if st is not None and m.speculative:
                sp = spec[m.label]
                sp["tokens"] += st.new_tokens
                sp["cycles"] += st.cycles
                row["methods"][m.label]["tokens_per_cycle"] = st.mean_tokens_per_cycle
                for j, (a, n) in enumerate(zip(st.accept_per_position, st.drafted_per_position)):
                    if j < 16:
                        sp["acc"][j] += a * n
                        sp["den"][j] += n
        rows.append(row)
        bar.update(1)
    bar.close()
    plain = per[methods[0].label]
    plain_tps = plain["tokens"] / max(plain["time"], 1e-9)
    res = {"rows": rows, "new_tokens": new_tokens, "exit_layer": adapter.exit_layer, "threads": threads,
           "repeats": repeats, "tuned": tuned, "seq": seq, "tree": tr, "methods": {}, "n_prompts": len(prompts)}
    for m in methods:
        p = per[m.label]
        tps = p["tokens"] / max(p["time"], 1e-9)
        per_prompt = [r["methods"][m.label]["tps"] / r["methods"][methods[0].label]["tps"] for r in rows]
        d = {"tps": tps, "speedup": tps / max(plain_tps, 1e-9), "identical": p["identical"], "ours": m.ours,
             "speedup_min": min(per_prompt), "speedup_max": max(per_prompt)}
        if m.label in spec:
            sp = spec[m.label]
            d["tokens_per_cycle"] = sp["tokens"] / max(1, sp["cycles"])
            d["accept_per_position"] = [a / n for a, n in zip(sp["acc"], sp["den"]) if n]
        res["methods"][m.label] = d
    res["distinct_tokens"] = len({t for r in rows for t in r["ids"]})
    return res


GOALS = {"identical": "identical output on every prompt", "tpc": 2.5, "vs_plain": 1.6, "vs_peer": 1.1}


def goal_lines(res: dict) -> list[str]:
    ms = res["methods"]
    n = res["n_prompts"]
    best_label = max((k for k, v in ms.items() if v["ours"] and "tokens_per_cycle" in v), key=lambda k: ms[k]["tps"])
    best = ms[best_label]
    peers = {k: v for k, v in ms.items() if not v["ours"]}
    L = []

    def line(ok, text):
        L.append(f"  [{'met' if ok else 'MISSED'}] {text}")

    ident = all(v["identical"] == n for k, v in ms.items() if v["ours"])
    line(ident, "identical output: " + ", ".join(f"{k.split(' (')[0]} {v['identical']}/{n}" for k, v in ms.items()
                                                 if v["ours"]))
    tpc = best["tokens_per_cycle"]
    line(tpc >= GOALS["tpc"], f"tokens per cycle >= {GOALS['tpc']}: {tpc:.2f} ({best_label})")
    line(best["speedup"] >= GOALS["vs_plain"], f"Kangaroo >= {GOALS['vs_plain']}x our plain decoding: "
         f"{best['speedup']:.2f}x ({best_label})")
    if peers:
        top = max(peers, key=lambda k: peers[k]["tps"])
        r = best["tps"] / max(peers[top]["tps"], 1e-9)
        line(r >= GOALS["vs_peer"], f"Kangaroo >= {GOALS['vs_peer']}x the fastest transformers peer: {r:.2f}x "
             f"({top}, {peers[top]['tps']:.1f} tokens/s)")
    return L


def format_results(res: dict) -> str:
    ms = res["methods"]
    n = res["n_prompts"]
    seq, tr, lk = res["seq"], res["tree"], res.get("tuned", {}).get("lookup", {})
    L = [f"{n} held-out prompts x {res['new_tokens']} new tokens, greedy, CPU, {res['threads']} thread(s), "
         f"median of {res['repeats']} run(s) per prompt and method, a warm-up run of each excluded; exit layer "
         f"{res['exit_layer']}; sequence eta={seq['eta']} gamma={seq['gamma']}, tree eta={tr['eta']} "
         f"gamma={tr['gamma']}, lookup M={lk.get('lookup_max', '?')} n-gram {lk.get('lookup_ngram', '?')} (tuned on "
         f"the held-out prompts {seq.get('prompt', '?')}, not reported below)"]
    L.append(f"  {'method':<46} {'tokens/s':>9} {'vs plain':>9} {'per prompt':>13} {'identical':>9} "
             f"{'tok/cycle':>9}")
    for k, v in ms.items():
        tpc = f"{v['tokens_per_cycle']:.2f}" if "tokens_per_cycle" in v else "-"
        L.append(f"  {k:<46} {v['tps']:>9.1f} {v['speedup']:>8.2f}x {v['speedup_min']:>5.2f}-{v['speedup_max']:<5.2f}x"
                 f" {v['identical']:>5}/{n:<3} {tpc:>9}")
    for k, v in ms.items():
        if v.get("accept_per_position"):
            acc = " ".join(f"{a:.2f}" for a in v["accept_per_position"])
            L.append(f"  acceptance per draft position, {k.split(' (')[0]} (P(accepted | drafted)): {acc}")
    kl = next(k for k in ms if "sequence" in k)
    L.append("  per prompt (tokens/s; identical to plain):")
    L.append(f"    {'prompt':<28} " + " ".join(f"{k.split(' (')[0][:18]:>18}" for k in ms))
    for r in res["rows"]:
        L.append(f"    {r['prompt']:<28} " + " ".join(
            f"{r['methods'][k]['tps']:>14.1f} {'=' if r['methods'][k]['identical'] else 'x':>3}" for k in ms))
    first = res["rows"][0]
    sample = first["text"].rstrip("\n").split("\n")[:8]
    L.append(f"  sample: the first {len(sample)} lines written after the prompt from {first['prompt']} "
             f"({kl.split(' (')[0]} wrote the same: {first['methods'][kl]['identical']}):")
    L.extend("    | " + line for line in sample)
    L.append(f"  distinct tokens in all outputs: {res['distinct_tokens']} (a weak model loops on a few)")
    L.append("goals:")
    L.extend(goal_lines(res))
    return "\n".join(L)


def plot_results(res: dict, path: Path) -> Path | None:
    """tokens/s per method and acceptance per draft position, as a PNG (None without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ms = res["methods"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1.5, 1]})
    labels = list(ms)
    vals = [ms[k]["tps"] for k in labels]
    colors = ["#4c72b0" if ms[k]["ours"] else "#999999" for k in labels]
    a.barh(range(len(labels)), vals, color=colors)
    a.set_yticks(range(len(labels)), [k.replace(" (this library)", "\n(this library)") for k in labels], fontsize=8)
    a.invert_yaxis()
    for i, v in enumerate(vals):
        a.text(v, i, f" {v:.0f} ({ms[labels[i]]['speedup']:.2f}x)", va="center", fontsize=8)
    a.set_xlabel("tokens/s (CPU, greedy)")
    a.set_title(f"{res['n_prompts']} held-out prompts x {res['new_tokens']} tokens, {res['threads']} thread(s)")
    for k, v in ms.items():
        if v.get("accept_per_position"):
            acc = v["accept_per_position"]
            b.plot(range(1, len(acc) + 1), acc, marker="o", label=k.split(" (")[0])
    b.set_xlabel("draft position")
    b.set_ylabel("P(accepted | drafted)")
    b.set_ylim(0, 1.02)
    b.legend(fontsize=8)
    b.set_title("acceptance per draft position")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------------------------
# CLI


def _parser():
    p = argparse.ArgumentParser(prog="kangaroo demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--cache-dir", default=None, help="where --retrain / --quick builds go (default: $KANGAROO_CACHE "
                                                     "or ~/.cache/kangaroo)")
    p.add_argument("--retrain", action="store_true", help="rebuild tokenizer, model and adapter from scratch (into "
                                                          "the cache; the shipped model is left as it is)")
    p.add_argument("--retrain-adapter", action="store_true",
                   help="train only the adapter again, on the shipped tokenizer and base model (into the cache; "
                        "--adapter-minutes sets its budget)")
    p.add_argument("--budget-minutes", type=float, default=None,
                   help="with --retrain: the training time budget, split 52 %% base LM / 48 %% adapter (default: "
                        "the shipped model's 75 + 70 min)")
    p.add_argument("--ship", action="store_true", help="maintainers: write the built model into the package "
                                                       "(kangaroo/default_model) with a new manifest")
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds; for tests and smoke runs)")
    for f in fields(DemoSizes):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None, dest=f.name,
                       help=f"model/training size for --retrain (default {f.default})")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=1, help="runs per prompt and method; the median counts")
    p.add_argument("--threshold", type=float, default=None,
                   help="eta (default: tuned for tokens/s on a held-out tuning prompt, in the manifest)")
    p.add_argument("--max-draft", type=int, default=None, help="gamma (default: tuned with eta)")
    p.add_argument("--retune", action="store_true", help="tune eta and gamma again")
    p.add_argument("--no-tree", action="store_true", help="skip Kangaroo's tree mode")
    p.add_argument("--no-hf", action="store_true", help="skip transformers' generate peers")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for every method (default: 1 or all, whichever decodes faster here)")
    p.add_argument("--out-dir", default="kangaroo-demo-results", help="the run's PNG and JSON go here")
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
    if args.budget_minutes is not None:
        if not args.retrain:
            raise SystemExit("kangaroo demo: --budget-minutes only applies to --retrain")
        kw["lm_minutes"], kw["adapter_minutes"] = 0.52 * args.budget_minutes, 0.48 * args.budget_minutes
    sizes = DemoSizes(**kw)
    progress = False if args.no_progress else None
    if args.retrain_adapter and (args.retrain or args.quick):
        raise SystemExit("kangaroo demo: --retrain-adapter trains on the shipped base; it excludes --retrain/--quick")
    use_shipped = not (args.retrain or args.retrain_adapter or args.quick or kw) and (
        shipped_dir() / "manifest.json").exists()
    if use_shipped:
        _log(f"kangaroo demo: the shipped default model ({shipped_dir()})")
        built = load_shipped()
    else:
        cache = cache_dir_for(sizes, args.cache_dir)
        _log(f"kangaroo demo: model cache {cache}" + (" (rebuilding)" if args.retrain else ""))
        if args.retrain_adapter:  # the shipped tokenizer and base; ensure_model then trains the adapter only
            shutil.rmtree(cache, ignore_errors=True)
            cache.mkdir(parents=True)
            for sub in ("tokenizer", "base"):
                shutil.copytree(shipped_dir() / sub, cache / sub)
            shipped_manifest = json.loads((shipped_dir() / "manifest.json").read_text())
            (cache / "manifest.json").write_text(json.dumps(
                {k: shipped_manifest[k] for k in ("lm_train", "command", "code_revision") if k in shipped_manifest},
                indent=1))
        built = ensure_model(sizes, cache, retrain=args.retrain, progress=progress,
                             command=" ".join(["kangaroo", "demo"] + argv))
        if built["built"] and not args.quick:
            shipped = shipped_dir() / "manifest.json"
            if shipped.exists():
                _log(compare_with_shipped(built["manifest"], json.loads(shipped.read_text())))
    t_build = time.perf_counter() - t0
    if args.build_only and not args.ship:
        _log(f"model ready in {t_build:.0f} s")
        return 0
    res = run_comparison(built, args.prompts, args.new_tokens, args.threshold, args.max_draft,
                         hf_peers=not args.no_hf, repeats=args.repeats, progress=progress, retune=args.retune,
                         threads=args.threads, tree=not args.no_tree)
    _log(format_results(res))
    if args.ship:
        m = ship(built, shipped_dir(), " ".join(["kangaroo", "demo"] + argv))
        _log(f"shipped: {shipped_dir()} ({sum((shipped_dir() / f).stat().st_size for f in m['files']) / 1e6:.1f} MB)")
    total = time.perf_counter() - t0
    res.update({"total_s": total, "build_s": t_build if built["built"] else 0.0, "sizes": asdict(sizes),
                "machine": machine_info()})
    _log(f"total {total:.0f} s" + (f" (of which building the model {t_build:.0f} s)" if built["built"] else ""))
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.json").write_text(json.dumps(res, indent=1, default=str))
    png = plot_results(res, out / "demo.png")
    _log(f"wrote {out / 'demo.json'}" + (f" and {png}" if png else " (no PNG: matplotlib is not installed)"))
    ok = all(v["identical"] == res["n_prompts"] for v in res["methods"].values() if v["ours"])
    return 0 if ok else 1


def compare_with_shipped(new: dict, shipped: dict) -> str:
    """The rebuilt model's quality figures beside the shipped manifest's (reproduction within noise)."""
    keys = ("heldout_top1_agreement", "heldout_loss", "base_heldout_nll", "trajectory_top1_agreement")
    a, b = new.get("adapter_report", {}), shipped.get("adapter_report", {})
    parts = [f"{k} {a[k]:.3f} (shipped {b[k]:.3f})" for k in keys if k in a and k in b]
    return "rebuilt vs shipped: " + ("; ".join(parts) if parts else "no comparable figures")


if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
