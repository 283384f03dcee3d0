"""adapter_forward: the Triton kernels (interpreter on CPU, compiled on GPU) and the op vs the reference over
consecutive decode steps; the reference vs transformers' Llama/Qwen2 attention; inactive rows and cache contents
bit for bit; weight constructors; input checks."""

import math

import pytest
import torch

from kangaroo_kernels.ops.adapter_forward import _adapter_forward_triton, adapter_forward
from kangaroo_kernels.reference.adapter_forward import adapter_forward_ref, rms_norm_ref
from kangaroo_kernels.rope import make_rope_cos_sin
from kangaroo_kernels.types import AdapterWeights

# Tolerances, reference in the same dtype from the same inputs:
# fp32: only the summation order differs (GEMVs over D <= 512, split-KV online softmax) -> ~1e-6; allow 2e-5.
# fp16/bf16: kernel and reference round at the same points (normed x, q/k/v, RoPE, attention, o, o + h, out-norm)
#   from fp32 sums taken in another order, and append_attention feeds tf32 dots and (in the interpreter) truncates
#   its bf16 casts: any rounding may land one ulp apart. Such a flip is at most one ulp of the largest intermediate,
#   whose magnitude is that of the largest output (|h|, |o| and the normed output are all O(1)..8 here), and it can
#   fall on an output near zero (o + h with h ~ -o): allow 2 ulps of the largest |ref| absolute plus 2 eps relative.
FP32_TOL = 2e-5


def _close(name, got, want, dtype):
    if dtype == torch.float32:
        atol = rtol = FP32_TOL
    else:
        eps = torch.finfo(dtype).eps
        top = float(want.float().abs().max()) if want.numel() else 0.0
        atol, rtol = 2 * eps * 2.0 ** math.floor(math.log2(max(top, 1.0))), 2 * eps
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def _weights(D, Hq, Hk, Dh, dtype, device, bias, seed, fused=False):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype=dtype, device=device)

    norm_in, norm_out = 1 + rnd(D, scale=0.2), 1 + rnd(D, scale=0.2)
    wqkv = rnd((Hq + 2 * Hk) * Dh, D, scale=D ** -0.5)
    wo = rnd(D, Hq * Dh, scale=(Hq * Dh) ** -0.5)
    bqkv = rnd((Hq + 2 * Hk) * Dh, scale=0.5) if bias else None
    w = AdapterWeights.from_wqkv(norm_in, wqkv, wo, norm_out, Hq, Hk, bqkv)
    if not fused:  # separate contiguous tensors, as in a state dict
        w = w._replace(**{n: getattr(w, n).clone() for n in ("wq", "wk", "wv", "bq", "bk", "bv")
                          if getattr(w, n) is not None})
    return w


def _check_cache(name, got, want, before, lens, active, dtype):
    """Cache rows written this step (active rows at cache_lens[b]) match the reference's within tolerance; every
    other entry is bit for bit what it was before the step."""
    written = torch.zeros(got.shape[0], got.shape[2], dtype=torch.bool)
    for b in range(got.shape[0]):
        if active is None or bool(active[b]):
            written[b, int(lens[b])] = True
    mask = written[:, None, :, None].expand_as(got).to(got.device)
    assert torch.equal(torch.where(mask, before, got), before), f"{name}: entries outside the written row changed"
    _close(name, torch.where(mask, got, before), torch.where(mask, want, before), dtype)


def _run_steps(fn, B, Hq, Hk, Dh, S, lens0, active, dtype, bias, rope, out_norm, steps, device, fused=False):
    """`steps` consecutive decode steps of fn and of the reference, each on its own caches; lengths advance by one
    per step for active rows (the caller's job), so later steps read back what earlier ones wrote."""
    D = Hq * Dh
    w = _weights(D, Hq, Hk, Dh, dtype, device, bias, seed=B * 100 + Hq * 10 + Hk, fused=fused)
    gen = torch.Generator().manual_seed(7)
    k_cache = torch.randn(B, Hk, S, Dh, generator=gen).to(dtype=dtype, device=device)
    v_cache = torch.randn(B, Hk, S, Dh, generator=gen).to(dtype=dtype, device=device)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    lens = torch.tensor(lens0, dtype=torch.int32, device=device)
    act = None if active is None else torch.tensor(active, device=device)
    offset = torch.arange(B, device=device) * 3  # positions need not equal cache_lens (e.g. left padding)
    table = make_rope_cos_sin(S + 3 * B, Dh, 500000.0, device=device) if rope == "table" else None
    for step in range(steps):
        h = (torch.randn(B, 2 * D, generator=gen) * 2).to(dtype=dtype, device=device)
        h = h[:, ::2] if step % 2 else h[:, :D]  # strided rows, then strided columns
        positions = (lens + offset).to(torch.int64 if step % 2 else torch.int32)
        k_before, v_before = k_cache.clone(), v_cache.clone()
        kw = dict(active=act, rope_cos_sin=table, apply_out_norm=out_norm)
        if rope == "theta":
            kw["rope_theta"] = 1000.0
        want = adapter_forward_ref(h, w, k_ref, v_ref, lens, positions, **kw)
        out = torch.full((B, D), float("nan"), dtype=dtype, device=device)  # inactive rows must be zeroed
        got = fn(h, w, k_cache, v_cache, lens, positions, out=out, **kw)
        assert got is out
        _close(f"out (step {step})", got, want, dtype)
        if act is not None:
            assert torch.equal(got[~act], torch.zeros_like(got[~act])), "inactive rows must be zero"
        _check_cache(f"k_cache (step {step})", k_cache, k_ref, k_before, lens, act, dtype)
        _check_cache(f"v_cache (step {step})", v_cache, v_ref, v_before, lens, act, dtype)
        # continue both from the kernel's cache so that tolerances do not compound over steps
        k_ref.copy_(k_cache)
        v_ref.copy_(v_cache)
        lens = lens + (act.int() if act is not None else 1)


# (B, Hq, Hk, Dh, S, cache_lens, active, dtype, bias, rope, apply_out_norm, steps)
CASES = [
    (1, 3, 3, 64, 40, [0], None, torch.float32, False, "theta", True, 3),  # D = 192
    (3, 3, 3, 64, 40, [0, 17, 36], [True, False, True], torch.float32, True, "theta", True, 3),
    (3, 4, 1, 64, 300, [1, 130, 296], [False, True, True], torch.float16, False, "table", True, 2),
    (3, 7, 1, 32, 300, [260, 0, 33], [True, True, False], torch.bfloat16, True, "theta", False, 2),  # D = 224
    (1, 7, 1, 64, 50, [47], None, torch.float16, True, "theta", False, 2),  # D = 448, ends at the cache's end
    (1, 4, 2, 128, 40, [5], None, torch.bfloat16, False, "table", True, 2),  # D = 512
    (17, 2, 1, 32, 12, [i % 12 for i in range(17)], [i % 5 != 2 for i in range(17)], torch.float32, True,
     "theta", True, 1),  # two batch blocks of the GEMV kernels
]


def _case_id(c):
    return f"B{c[0]}-H{c[1]}/{c[2]}-Dh{c[3]}-{str(c[7])[6:]}-{'bias' if c[8] else 'nobias'}-{c[9]}-" \
           f"{'norm' if c[10] else 'prenorm'}"


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_triton_matches_reference(case, interpret):
    if not interpret and not torch.cuda.is_available():
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    device = torch.device("cpu" if interpret else "cuda")
    B, Hq, Hk, Dh, S, lens, active, dtype, bias, rope, out_norm, steps = case
    _run_steps(_adapter_forward_triton, B, Hq, Hk, Dh, S, lens, active, dtype, bias, rope, out_norm, steps, device,
               fused=B == 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_matches_reference(device, dtype):
    """The public op (CPU: the reference through torch.library; CUDA: the compiled kernels)."""
    _run_steps(adapter_forward, 3, 4, 2, 64, 70, [0, 9, 66], [True, True, False], dtype, True, "theta", True, 2,
               device)


def test_out_norm_split_equals_fused(interpret):
    """apply_out_norm=False returns the residual r with RMSNorm_out(r) == the apply_out_norm=True output."""
    if not interpret and not torch.cuda.is_available():
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    device = torch.device("cpu" if interpret else "cuda")
    dtype = torch.bfloat16
    B, Hq, Hk, Dh, S = 2, 3, 1, 64, 20
    w = _weights(Hq * Dh, Hq, Hk, Dh, dtype, device, False, seed=3)
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(B, Hq * Dh, generator=gen).to(dtype=dtype, device=device)
    k_cache = torch.randn(B, Hk, S, Dh, generator=gen).to(dtype=dtype, device=device)
    v_cache = torch.randn(B, Hk, S, Dh, generator=gen).to(dtype=dtype, device=device)
    lens = torch.tensor([3, 11], dtype=torch.int32, device=device)
    r = _adapter_forward_triton(h, w, k_cache.clone(), v_cache.clone(), lens, lens, apply_out_norm=False)
    y = _adapter_forward_triton(h, w, k_cache.clone(), v_cache.clone(), lens, lens, apply_out_norm=True)
    _close("normed", y, rms_norm_ref(r, w.norm_out, 1e-6), dtype)


def test_empty_batch():
    w = _weights(192, 3, 3, 64, torch.float32, "cpu", False, seed=0)
    cache = torch.zeros(0, 3, 8, 64)
    out = adapter_forward(torch.zeros(0, 192), w, cache, cache.clone(), torch.zeros(0, dtype=torch.int32),
                          torch.zeros(0, dtype=torch.int32))
    assert out.shape == (0, 192)


# ---- the reference against transformers ------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_reference_matches_transformers(family):
    """a(h) = norm_out(h + Attn(norm_in(h))) with transformers' attention (eager, causal over a prefix of T
    tokens) equals T decode steps of adapter_forward_ref on a static cache, position by position (fp32)."""
    tf = pytest.importorskip("transformers")
    B, T, Hq, Hk, Dh, S = 2, 6, 4, 2, 32, 16
    D, theta = Hq * Dh, 5000.0
    kw = dict(hidden_size=D, num_attention_heads=Hq, num_key_value_heads=Hk, head_dim=Dh, rope_theta=theta,
              rms_norm_eps=1e-5, intermediate_size=64, num_hidden_layers=1, vocab_size=32)
    if family == "llama":
        from transformers.models.llama import modeling_llama as hf

        Attn, Norm, Rope, cfg = hf.LlamaAttention, hf.LlamaRMSNorm, hf.LlamaRotaryEmbedding, tf.LlamaConfig(**kw)
    else:
        from transformers.models.qwen2 import modeling_qwen2 as hf

        Attn, Norm, Rope, cfg = hf.Qwen2Attention, hf.Qwen2RMSNorm, hf.Qwen2RotaryEmbedding, tf.Qwen2Config(**kw)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)

    class Adapter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.input_layernorm = Norm(D, eps=cfg.rms_norm_eps)
            self.self_attn = Attn(cfg, layer_idx=0)
            self.norm = Norm(D, eps=cfg.rms_norm_eps)
            self.config = cfg

    ad = Adapter().eval()
    with torch.no_grad():
        for p in (ad.input_layernorm.weight, ad.norm.weight):
            p.copy_(1 + 0.2 * torch.randn(D))
        for name, p in ad.self_attn.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.5 * torch.randn_like(p))
            elif name.startswith(("q_proj", "k_proj")):
                p.mul_(4)  # scores of several units: softmax far from uniform, so RoPE matters
    h = torch.randn(B, T, D) * 2
    pos = torch.arange(T)[None, :] + torch.tensor([[0], [5]])  # row 1 starts at position 5
    with torch.no_grad():
        x = ad.input_layernorm(h)
        cos_sin = Rope(cfg)(x, pos)
        mask = torch.full((T, T), float("-inf")).triu(1).expand(B, 1, T, T)
        attn, _ = ad.self_attn(x, cos_sin, mask)
        want = ad.norm(h + attn)

    w = AdapterWeights.from_module(ad)
    assert (w.bq is not None) == (family == "qwen2")
    k_cache, v_cache = torch.zeros(B, Hk, S, Dh), torch.zeros(B, Hk, S, Dh)
    for t in range(T):
        lens = torch.full((B,), t, dtype=torch.int32)
        got = adapter_forward_ref(h[:, t], w, k_cache, v_cache, lens, pos[:, t], rope_theta=theta,
                                  eps=cfg.rms_norm_eps)
        torch.testing.assert_close(got, want[:, t], atol=1e-5, rtol=1e-5)
    assert want.std(dim=1).min() > 0.1  # the positions differ: a comparison of something


# ---- weights and input checks ----------------------------------------------------------------------------------

def test_weights_constructors():
    D, Hq, Hk, Dh = 128, 2, 1, 64
    w = _weights(D, Hq, Hk, Dh, torch.float32, "cpu", True, seed=0, fused=True)
    assert w.head_dim == Dh and w.wq.data_ptr() == w.wk.data_ptr() - Hq * Dh * D * 4  # views, no copy
    sd = {"ad.input_layernorm.weight": w.norm_in, "ad.self_attn.q_proj.weight": w.wq,
          "ad.self_attn.k_proj.weight": w.wk, "ad.self_attn.v_proj.weight": w.wv, "ad.self_attn.q_proj.bias": w.bq,
          "ad.self_attn.k_proj.bias": w.bk, "ad.self_attn.v_proj.bias": w.bv, "ad.self_attn.o_proj.weight": w.wo,
          "ad.norm.weight": w.norm_out, "other.weight": w.wo}
    w2 = AdapterWeights.from_state_dict(sd, Hq, Hk, prefix="ad.")
    assert all(a is b for a, b in zip(w, w2))
    fused = {"qkv_proj.weight": torch.cat([w.wq, w.wk, w.wv]), "qkv_proj.bias": torch.cat([w.bq, w.bk, w.bv]),
             "o_proj.weight": w.wo, "input_layernorm.weight": w.norm_in, "post_layernorm.weight": w.norm_out}
    w3 = AdapterWeights.from_state_dict(fused, Hq, Hk)
    assert all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b for a, b in zip(w, w3))
    with pytest.raises(ValueError, match="o_proj"):
        AdapterWeights.from_state_dict({k: v for k, v in fused.items() if "o_proj" not in k}, Hq, Hk)


def _args(B=2, Hq=2, Hk=1, Dh=64, S=8, dtype=torch.float32):
    w = _weights(Hq * Dh, Hq, Hk, Dh, dtype, "cpu", False, seed=0)
    return dict(h=torch.zeros(B, Hq * Dh, dtype=dtype), weights=w, k_cache=torch.zeros(B, Hk, S, Dh, dtype=dtype),
                v_cache=torch.zeros(B, Hk, S, Dh, dtype=dtype), cache_lens=torch.zeros(B, dtype=torch.int32),
                positions=torch.zeros(B, dtype=torch.int32))


@pytest.mark.parametrize("change, match", [
    (lambda a: a.update(h=a["h"][:, :-1]), "weights.norm_in"),
    (lambda a: a.update(h=a["h"].long()), "h must have dtype"),
    (lambda a: a.update(weights=a["weights"]._replace(wo=a["weights"].wo.T.contiguous()[:, :100])), "weights.wo"),
    (lambda a: a.update(weights=a["weights"]._replace(bq=torch.zeros(128))), "bq/bk/bv"),
    (lambda a: a.update(weights=a["weights"]._replace(num_kv_heads=2)), "k_cache"),
    (lambda a: a.update(weights=tuple(a["weights"])), "AdapterWeights"),
    (lambda a: a.update(k_cache=a["k_cache"].half()), "k_cache must have dtype"),
    (lambda a: a.update(v_cache=a["v_cache"][:, :, :4]), "v_cache"),
    (lambda a: a.update(cache_lens=a["cache_lens"].float()), "cache_lens"),
    (lambda a: a.update(positions=a["positions"][:1]), "positions"),
    (lambda a: a.update(active=torch.ones(2, dtype=torch.int32)), "active"),
    (lambda a: a.update(out=torch.zeros(2, 100)), "out"),
    (lambda a: a.update(rope_cos_sin=torch.zeros(16, 32)), "rope_cos_sin"),
    (lambda a: a.update(cache_lens=torch.tensor([0, 8], dtype=torch.int32)), "cache overflow.*cache_lens\\[1\\]"),
    (lambda a: a.update(cache_lens=torch.tensor([-1, 0], dtype=torch.int32)), "cache overflow.*cache_lens\\[0\\]"),
    (lambda a: a.update(positions=torch.tensor([0, -2])), "positions\\[1\\]"),
    (lambda a: a.update(positions=torch.tensor([16, 0]), rope_cos_sin=torch.zeros(16, 64)), "positions\\[0\\]"),
])
def test_input_checks(change, match):
    a = _args()
    change(a)
    with pytest.raises(ValueError, match=match):
        adapter_forward(**a)


def test_head_dim_checks():
    """CPU takes any even head dim (issue 10: the Triton kernels' limit must not leak into the CPU path); the Triton
    path names its limit; an odd head dim cannot take rotate-half RoPE anywhere."""
    a = _args(Hq=4, Dh=16)
    with pytest.raises(ValueError, match="head dim"):
        _adapter_forward_triton(**a)
    adapter_forward(**a)
    a = _args(Hq=2, Dh=15)
    with pytest.raises(ValueError, match="head dim"):
        adapter_forward(**a)


def test_validation_skips_inactive_rows_and_can_be_disabled():
    a = _args()
    a.update(cache_lens=torch.tensor([0, 8], dtype=torch.int32), active=torch.tensor([True, False]))
    adapter_forward(**a)  # the overflowing row is inactive
    a.update(active=None, validate=False)
    adapter_forward(**a)  # not checked: the kernels mask the out-of-range write instead


def test_opcheck(device):
    """Schema, fake (meta) impl and autograd/functionalization registration agree with the real op."""
    from kangaroo_kernels.ops.adapter_forward import _prepare

    a = _args(B=3)
    a["weights"] = _weights(128, 2, 1, 64, torch.float32, "cpu", True, seed=0)
    a = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in a.items()}
    a["weights"] = AdapterWeights(*(t.to(device) if isinstance(t, torch.Tensor) else t for t in a["weights"]))
    args = _prepare(a["h"], a["weights"], a["k_cache"], a["v_cache"], a["cache_lens"], a["positions"],
                    torch.tensor([True, False, True], device=device), 10000.0, None, 1e-6, True, None, False)
    torch.library.opcheck(torch.ops.kangaroo_kernels.adapter_forward.default, args)
