"""End-to-end step costs of Kangaroo at real model shapes (random weights: acceptance does not change step cost).

For each model shape and batch size it times, in the same run:
  decode      one plain decode step (all L layers + LM head + argmax)                  the baseline's unit of work
  draft       one Kangaroo draft step (layers 1..l + adapter_forward + lm_head_exit)    run up to gamma times a cycle
  verify k    one verify step for k = 1..gamma drafts (layers l+1..L on k+1 saved hidden states, LM head,
              verify_greedy)
for this library (kangaroo.model + kangaroo_kernels ops; replayed from CUDA graphs on a GPU) and for a plain
PyTorch eager decoder (transformers' LlamaForCausalLM with its KV cache, one token per forward). Each step also gets
its memory-bandwidth floor: the bytes it must read (weights + KV) over the copy bandwidth measured in this run.

From the measured step costs it models the speedup of a Kangaroo cycle over plain decoding for an acceptance
profile: with per-position acceptance alpha and k drafts a cycle commits E = (1 - alpha^(k+1)) / (1 - alpha)
tokens at a cost of k * t_draft + t_verify(k), against E * t_decode for plain decoding (fixed-length drafting; the
confidence exit only shortens cycles whose later drafts would mostly be rejected). The paper (arXiv 2404.18911,
abstract) reports up to 1.68x end-to-end on Spec-Bench for Vicuna-7B; the mean accepted tokens per cycle behind that
depend on the task, so the model is tabulated over alpha instead of assuming one figure. A second table prices the
predicated (CUDA-graph) path's drafting with measured profiles of the demo model (all gamma steps paid vs the
adaptive cap vs an exact early exit). With --demo, the measured speedup of the embedded demo model (real
acceptance, CPU or GPU) is added when its cache exists.

    python bench/e2e.py [--quick] [--models vicuna-7b,llama-3-8b] [--batch 1,4] [--context 1024] [--no-hf]
Writes bench/results/e2e.csv (the columns of bench/_common.py) and prints the modelled-speedup table.
"""

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))

import torch  # noqa: E402
from _common import Recorder, bench_device, copy_bandwidth_gbs, time_fn, time_graph  # noqa: E402

if not torch.cuda.is_available():  # Triton reads this when the kernels are defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

# name: (layers, hidden, heads, kv heads, intermediate, vocab, exit layer)
SHAPES = {
    "vicuna-7b": (32, 4096, 32, 32, 11008, 32000, 2),
    "llama-3-8b": (32, 4096, 32, 8, 14336, 128256, 2),
    "qwen2.5-7b": (28, 3584, 28, 4, 18944, 152064, 2),
    "tiny": (8, 256, 4, 2, 688, 4096, 1),  # the CPU smoke shape (about the demo model's size)
}
GAMMA = 6


def random_model(name: str, device, dtype):
    """A kangaroo LlamaModel with random weights at a named shape (no transformers model involved)."""
    from kangaroo.model import LlamaModel, ModelConfig

    L, D, H, Hk, I, V, _ = SHAPES[name]
    Dh = D // H
    cfg = ModelConfig(model_type="llama", hidden_size=D, num_hidden_layers=L, num_attention_heads=H,
                      num_key_value_heads=Hk, head_dim=Dh, intermediate_size=I, vocab_size=V,
                      max_position_embeddings=32768)
    g = torch.Generator(device=device).manual_seed(0)

    def w(*shape):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * shape[-1] ** -0.5).to(dtype)

    def ones(n):
        return torch.ones(n, device=device, dtype=dtype)

    layers = [{"ln1": ones(D), "wqkv": w((H + 2 * Hk) * Dh, D), "wo": w(D, H * Dh), "ln2": ones(D),
               "wgu": w(2 * I, D), "wd": w(D, I)} for _ in range(L)]
    return LlamaModel(cfg, {"embed": w(V, D), "layers": layers, "norm": ones(D), "lm_head": w(V, D)})


def hf_model(kmodel, device, dtype):
    """transformers' LlamaForCausalLM sharing the kangaroo model's shape (its own random weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = kmodel.config
    cfg = LlamaConfig(hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
                      num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
                      intermediate_size=c.intermediate_size, vocab_size=c.vocab_size,
                      max_position_embeddings=c.max_position_embeddings)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            m = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return m.eval()


def weight_bytes(model, first: int, last: int, lm_head: bool) -> int:
    """Bytes of layers [first, last) plus the LM head (the embedding row read is negligible)."""
    n = sum(t.numel() * t.element_size() for lay in model.layers[first:last] for t in lay.values())
    if lm_head:
        n += model.lm_head.numel() * model.lm_head.element_size() + model.norm.numel() * model.norm.element_size()
    return n


def kv_bytes(model, layers: int, B: int, S: int) -> int:
    c = model.config
    return 2 * layers * B * c.num_key_value_heads * S * c.head_dim * model.dtype.itemsize


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens committed per cycle with k drafts and per-position acceptance alpha (accepted + 1 target token)."""
    return float(k + 1) if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


def bench_shape(name, B, S, dev, dtype, rec, args, timing, summary):
    from kangaroo.adapter import KangarooAdapter

    from kangaroo_kernels.ops.adapter_forward import adapter_forward
    from kangaroo_kernels.ops.lm_head_exit import lm_head_exit
    from kangaroo_kernels.ops.verify_greedy import verify_greedy

    on_gpu = dev.type == "cuda"
    model = random_model(name, dev, dtype)
    c = model.config
    L, D, V, ell = c.num_hidden_layers, c.hidden_size, c.vocab_size, SHAPES[name][-1]
    adapter = KangarooAdapter(D, c.num_attention_heads, c.num_key_value_heads, c.head_dim, exit_layer=ell)
    adapter = adapter.to(device=dev, dtype=dtype)
    aw = adapter.weights()
    Smax = S + GAMMA + 2
    cache = model.new_cache(B, Smax)
    ak = torch.zeros(B, c.num_key_value_heads, Smax, c.head_dim, device=dev, dtype=dtype)
    av = torch.zeros_like(ak)
    lens = torch.full((B,), S, dtype=torch.int32, device=dev)
    rope = model.rope_cos_sin(Smax)
    tok = torch.randint(0, V, (B,), device=dev, dtype=torch.int32)
    pos = lens.long()
    hid = torch.randn(B, GAMMA + 1, D, device=dev, dtype=dtype)
    drafts = torch.randint(0, V, (B, GAMMA), device=dev, dtype=torch.int32)
    blk = pos[:, None] + torch.arange(GAMMA + 1, device=dev)

    def decode():
        x = model.forward_layers(model.embed(tok[:, None]), 0, L, cache, lens, pos[:, None])
        return model.logits(x).argmax(-1)

    def draft():
        x = model.forward_layers(model.embed(tok[:, None]), 0, ell, cache, lens, pos[:, None])
        r = adapter_forward(x[:, 0], aw, ak, av, lens, pos, rope_cos_sin=rope, apply_out_norm=False, validate=False)
        return lm_head_exit(r, model.lm_head, 0.6, norm_weight=aw.norm_out, validate=False)

    def make_verify(k):
        def verify():
            y = model.forward_layers(hid[:, :k + 1], ell, L, cache, lens, blk[:, :k + 1])
            return verify_greedy(drafts[:, :k], model.logits(y), validate=False)
        return verify

    bw = copy_bandwidth_gbs(dev)
    shape = f"{name} B={B} S={S} l={ell}"
    dt = str(dtype).replace("torch.", "")
    steps = [("decode", decode, weight_bytes(model, 0, L, True) + kv_bytes(model, L, B, S))]
    steps.append(("draft", draft, weight_bytes(model, 0, ell, True) + kv_bytes(model, ell + 1, B, S)
                  + sum(t.numel() * t.element_size() for t in aw[:6])))
    for k in range(1, GAMMA + 1):
        steps.append((f"verify{k}", make_verify(k), weight_bytes(model, ell, L, True) + kv_bytes(model, L - ell, B, S)))

    hf_us = None
    if not args.no_hf:
        try:
            from transformers import DynamicCache

            hf = hf_model(model, dev, dtype)
            ids = torch.randint(0, V, (B, S), device=dev)
            with torch.no_grad():
                past = DynamicCache()
                hf(input_ids=ids, past_key_values=past, use_cache=True)
            step_ids = tok[:, None].long()

            @torch.no_grad()
            def hf_decode():
                out = hf(input_ids=step_ids, past_key_values=past, use_cache=True)
                past.crop(-step_ids.shape[1])
                return out.logits.argmax(-1)

            hf_us = time_fn(hf_decode, dev, **timing)
            rec.add("decode", "hf-eager", shape, dt, hf_us, gbytes=steps[0][2] / 1e9)
            del hf, past
        except Exception as e:  # noqa: BLE001  (the baseline is optional; say why it is missing)
            print(f"# transformers baseline skipped for {shape}: {type(e).__name__}: {e}")

    us = {}
    with torch.no_grad():
        for op, fn, nbytes in steps:
            eager = time_fn(fn, dev, **timing)
            best = eager
            rec.add(op, "kangaroo-eager", shape, dt, eager, gbytes=nbytes / 1e9, eager_us=hf_us if op == "decode"
                    else None)
            if on_gpu:
                g = time_graph(fn, dev)
                if g is not None:
                    rec.add(op, "kangaroo-graph", shape, dt, g, gbytes=nbytes / 1e9,
                            eager_us=hf_us if op == "decode" else None)
                    best = min(best, g)
            us[op] = best
            us[op + "_floor"] = nbytes / (bw * 1e9) * 1e6
    summary.append((shape, us, hf_us))


def print_model(summary):
    print("\n# Modelled Kangaroo speedup over plain decoding (same-run step costs; fixed-length drafting of k tokens;"
          "\n# per-position acceptance alpha; E = (1 - alpha^(k+1)) / (1 - alpha) tokens per cycle)")
    for shape, us, hf_us in summary:
        t_dec = us["decode"]
        floor = ", ".join(f"{op} {us[op]:.0f}/{us[op + '_floor']:.0f}" for op in ("decode", "draft", "verify1",
                                                                                  f"verify{GAMMA}"))
        print(f"\n{shape}: step us measured/floor: {floor}" + (f"; transformers decode {hf_us:.0f}" if hf_us else ""))
        print(f"  draft/decode = {us['draft'] / t_dec:.3f}, verify{GAMMA}/decode = {us[f'verify{GAMMA}'] / t_dec:.3f}")
        print("  alpha  " + "  ".join(f"k={k}" for k in range(1, GAMMA + 1)) + "   best k  speedup  vs transformers")
        for alpha in (0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
            sp = []
            for k in range(1, GAMMA + 1):
                cost = k * us["draft"] + us[f"verify{k}"]
                sp.append(expected_tokens(alpha, k) * t_dec / cost)
            kb = max(range(GAMMA), key=lambda i: sp[i])
            vs_hf = f"{sp[kb] * hf_us / t_dec:.2f}x" if hf_us else "-"
            print(f"  {alpha:.1f}    " + "  ".join(f"{s:.2f}" for s in sp) + f"   {kb + 1}       {sp[kb]:.2f}x    "
                  + vs_hf)


# Measured drafting profiles (demo model, CPU, 6 held-out prompts x 64 tokens, gamma 6, eta 0.6; README "Early exit
# without a host sync"): tokens per cycle and adapter + LM-head draft steps run per cycle on the predicated path.
DRAFT_PROFILES = (("all gamma steps (predicated)", 1.634, 6.00), ("adaptive cap (predicated)", 1.607, 2.56),
                  ("exact early exit (host read)", 1.634, 1.26))


def print_draft_profiles(summary):
    """What paying for every predicated draft step costs, at this run's step costs: a cycle costs
    n_draft * t_draft + t_verify(gamma) (the predicated path verifies the whole block) and commits E tokens."""
    print("\n# Drafting cost on the predicated path (measured profiles of the demo model, eta 0.6, gamma "
          f"{GAMMA}; speedup = E * t_decode / (n_draft * t_draft + t_verify{GAMMA}))")
    for shape, us, _ in summary:
        row = ", ".join(f"{name}: E {e:.3f}, {n:.2f} steps -> "
                        f"{e * us['decode'] / (n * us['draft'] + us[f'verify{GAMMA}']):.2f}x"
                        for name, e, n in DRAFT_PROFILES)
        print(f"  {shape}: {row}")


def run_demo(dev):
    """The embedded demo model with real acceptance, when `make demo` has built and cached it (never trains here).
    The demo decoder runs on the CPU in fp32 (kangaroo.demo), so these are CPU figures whatever `dev` is."""
    from kangaroo import demo

    sizes = demo.DemoSizes()
    cache = demo.cache_dir_for(sizes)
    if not (cache / "base" / "model.safetensors").exists() or not (cache / "adapter" / "adapter_config.json").exists():
        print(f"# demo model: no cached model in {cache}; run `make demo` once to build it")
        return
    built = demo.ensure_model(sizes, cache)
    print(f"\n# demo model (CPU, real acceptance; {dev.type} step costs above are separate)")
    print(demo.format_results(demo.run_comparison(built, n_prompts=3, new_tokens=96, hf_peers=False)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CPU: the tiny shape only; GPU: vicuna-7b at B=1")
    ap.add_argument("--models", default=None, help=f"comma list of {sorted(SHAPES)}")
    ap.add_argument("--batch", default=None, help="comma list of batch sizes (default 1,4 on GPU, 1 on CPU)")
    ap.add_argument("--context", type=int, default=None, help="tokens already in the cache (default 1024)")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--demo", action="store_true", help="also measure the demo model with real acceptance")
    args = ap.parse_args()
    dev = bench_device()
    on_gpu = dev.type == "cuda"
    if on_gpu:
        models = ["vicuna-7b"] if args.quick else ["vicuna-7b", "llama-3-8b"]
        batches = [1] if args.quick else [1, 4]
        dtype, S = torch.bfloat16, 1024
        timing = dict(warmup=5, iters=30)
    else:
        models, batches, dtype, S = ["tiny"], [1], torch.float32, 128
        timing = dict(warmup=1, iters=5, max_seconds=1.0)
    models = args.models.split(",") if args.models else models
    batches = [int(b) for b in args.batch.split(",")] if args.batch else batches
    S = args.context or S
    for m in models:
        if m not in SHAPES:
            raise SystemExit(f"unknown model shape {m!r}; choose from {sorted(SHAPES)}")
    budget = float(os.environ.get("KANGAROO_BENCH_BUDGET_S", "0") or 0)  # set by run_gpu_suite.sh
    t0 = time.perf_counter()
    rec = Recorder("e2e", dev)
    summary = []
    for B in batches:  # batch 1 of every model first: the headline rows survive a tight budget
        for m in models:
            if budget and summary and time.perf_counter() - t0 > 0.5 * budget:
                print(f"# e2e: budget {budget:.0f} s half spent; skipping {m} B={B} and later shapes")
                break
            bench_shape(m, B, S, dev, dtype, rec, args, timing, summary)
            if on_gpu:
                torch.cuda.empty_cache()
    rec.finish()
    print_model(summary)
    print_draft_profiles(summary)
    if args.demo:
        run_demo(dev)
    return 0 if all(math.isfinite(us["decode"]) for _, us, _ in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
