"""llama_layer's C++ CPU kernel (csrc/cpu/llama_layer.cpp, what kangaroo.model.LlamaModel.layer runs on CPU) against
the layer written out with the references: odd head dims, GQA, q/k/v bias, T = 1 and causal T > 1 blocks, a tree
block, inactive rows, a slot at the cache's end, and only the given layer of the stacked cache written; row-major and
the model's column-major CPU weights. A T-row block reproduces T one-row steps bit for bit (what makes a verify pass
equal the plain decode steps it replaces), whatever the thread count."""

import pytest
import torch
import torch.nn.functional as F

from kangaroo_kernels._ext import ops
from kangaroo_kernels.reference.adapter_forward import rms_norm_ref
from kangaroo_kernels.reference.append_attention import append_attention_ref
from kangaroo_kernels.rope import make_rope_cos_sin


def _layer_ref(x, p, kc, vc, lens, positions, tree_mask, active, rope, eps, Hq, Hk):
    B, T, _ = x.shape
    Dh = kc.shape[-1]
    qkv = F.linear(rms_norm_ref(x, p["ln1"], eps), p["wqkv"], p.get("bqkv"))
    q, k, v = qkv.split([Hq * Dh, Hk * Dh, Hk * Dh], dim=-1)
    a = append_attention_ref(q.reshape(B, T, Hq, Dh), k.reshape(B, T, Hk, Dh), v.reshape(B, T, Hk, Dh), kc, vc,
                             lens, tree_mask=tree_mask, active=active, positions=positions, rope_cos_sin=rope)
    x = x + F.linear(a.reshape(B, T, Hq * Dh), p["wo"])
    gate, up = F.linear(rms_norm_ref(x, p["ln2"], eps), p["wgu"]).chunk(2, dim=-1)
    return x + F.linear(F.silu(gate) * up, p["wd"])


# (B, T, Hq, Hk, Dh, D, inter, S, lens, bias, tree, active)
CASES = [
    (1, 1, 4, 2, 64, 256, 96, 40, [17], False, False, None),
    (3, 1, 8, 2, 16, 128, 80, 20, [0, 7, 19], True, False, [True, False, True]),  # Qwen2-style hidden 128, 8 heads
    (2, 5, 3, 1, 96, 200, 64, 30, [4, 25], False, False, None),  # Phi-3-style head dim, block ends at S
    (2, 4, 4, 4, 80, 96, 48, 24, [3, 11], True, True, [False, True]),
    (1, 8, 2, 1, 64, 300, 600, 20, [2], True, False, None),  # N > 256: several column blocks; the most rows
]


def _lay_out(p, layout):
    """The weights as the op receives them: row-major, column-major (the CPU model's layout in other dtypes) or
    packed by pack_gemm_weight (the fp32 CPU model's: the hand-written path)."""
    if layout == "colmajor":
        return {k: t.t().contiguous().t() if t.dim() == 2 else t for k, t in p.items()}
    if layout == "packed":
        return {k: ops().pack_gemm_weight(t) if t.dim() == 2 else t for k, t in p.items()}
    return p


def _random_layer(D, Hq, Hk, Dh, inter, bias, seed):
    """A layer's row-major weights and the generator-bound randn that made them (for the inputs that follow)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    p = {"ln1": 1 + rnd(D, scale=0.1), "wqkv": rnd((Hq + 2 * Hk) * Dh, D, scale=D ** -0.5),
         "wo": rnd(D, Hq * Dh, scale=(Hq * Dh) ** -0.5), "ln2": 1 + rnd(D, scale=0.1),
         "wgu": rnd(2 * inter, D, scale=D ** -0.5), "wd": rnd(D, inter, scale=inter ** -0.5)}
    if bias:
        p["bqkv"] = rnd((Hq + 2 * Hk) * Dh, scale=0.3)
    return p, rnd


@pytest.mark.parametrize("layout", ["rowmajor", "colmajor", "packed"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}T{c[1]}H{c[2]}x{c[3]}D{c[4]}"
                         f"{'-bias' if c[9] else ''}{'-tree' if c[10] else ''}{'-act' if c[11] else ''}")
def test_cpu_layer_matches_reference(case, layout):
    B, T, Hq, Hk, Dh, D, inter, S, lens, bias, tree, active = case
    p, rnd = _random_layer(D, Hq, Hk, Dh, inter, bias, seed=T * 10 + Dh)
    layers, layer = 3, 1
    kc, vc = rnd(layers, B, Hk, S, Dh), rnd(layers, B, Hk, S, Dh)
    kr, vr = kc[layer].clone(), vc[layer].clone()
    kc0, vc0 = kc.clone(), vc.clone()
    cl = torch.tensor(lens, dtype=torch.int32)
    act = torch.tensor(active) if active is not None else None
    tree_mask = None
    positions = cl.long()[:, None] + torch.arange(T)
    if tree:  # a root with T - 1 children
        bits = [1] + [1 | (1 << j) for j in range(1, T)]
        tree_mask = torch.tensor(bits, dtype=torch.int32)[None, :, None].expand(B, T, 1).contiguous()
        positions = cl.long()[:, None] + torch.tensor([0] + [1] * (T - 1))
    rope = make_rope_cos_sin(S + T, Dh)
    x = rnd(B, T, D)
    q = _lay_out(p, layout)
    got = ops().llama_layer(x, q["ln1"], q["wqkv"], q.get("bqkv"), q["wo"], q["ln2"], q["wgu"], q["wd"], kc, vc,
                            layer, cl, positions, tree_mask, act, rope, 1e-6, Hq, Hk)
    want = _layer_ref(x, p, kr, vr, cl, positions, tree_mask, act, rope, 1e-6, Hq, Hk)
    rows = act if act is not None else torch.ones(B, dtype=torch.bool)
    # fp32 throughout: the GEMVs and attention sums differ only in order (~1e-6)
    torch.testing.assert_close(got[rows], want[rows], atol=2e-5, rtol=2e-5)
    # the cached K/V are GEMV outputs too (K also rotated): same order-of-summation tolerance, at the values' scale
    torch.testing.assert_close(kc[layer], kr, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(vc[layer], vr, atol=1e-6, rtol=1e-6)
    for other in (0, 2):
        assert torch.equal(kc[other], kc0[other]) and torch.equal(vc[other], vc0[other])


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(256, 4, 2, 64, 768, False, 11), (200, 3, 1, 96, 100, True, 13)],
                         ids=["demo", "odd-bias"])
def test_cpu_block_equals_one_row_steps(shape, threads):
    """Greedy Kangaroo output equals plain decoding only if verifying a block computes what the plain steps would:
    here exactly (torch.equal), outputs and cache, for a T-row causal block against T single-row calls, B = 2."""
    D, Hq, Hk, Dh, inter, bias, T = shape
    p, rnd = _random_layer(D, Hq, Hk, Dh, inter, bias, seed=D + T)
    p = _lay_out(p, "packed")
    B, S, L0 = 2, 64, [5, 30]
    kc, vc = rnd(1, B, Hk, S, Dh), rnd(1, B, Hk, S, Dh)
    kc2, vc2 = kc.clone(), vc.clone()
    x = rnd(B, T, D)
    rope = make_rope_cos_sin(S + T, Dh)
    lens = torch.tensor(L0, dtype=torch.int32)
    args = lambda: (p["ln1"], p["wqkv"], p.get("bqkv"), p["wo"], p["ln2"], p["wgu"], p["wd"])  # noqa: E731
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        block = ops().llama_layer(x, *args(), kc, vc, 0, lens, lens.long()[:, None] + torch.arange(T), None, None,
                                  rope, 1e-6, Hq, Hk)
        steps = []
        for t in range(T):
            lt = lens + t
            steps.append(ops().llama_layer(x[:, t:t + 1].contiguous(), *args(), kc2, vc2, 0, lt, lt.long()[:, None],
                                           None, None, rope, 1e-6, Hq, Hk))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(block, torch.cat(steps, 1))
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)


def test_pack_gemm_weight_round_trip_and_bad_input():
    w = torch.randn(45, 7)  # 45 rows: one full tile and a padded one
    wp = ops().pack_gemm_weight(w)
    assert wp.shape == (2, 7, 32) and torch.equal(wp[1, :, 13:], torch.zeros(7, 19))
    assert torch.equal(wp[0, 3], w[:32, 3]) and torch.equal(ops().unpack_gemm_weight(wp, 45), w)
    with pytest.raises(ValueError, match="rows do not pack"):
        ops().unpack_gemm_weight(wp, 70)
    with pytest.raises(ValueError, match=r"must be \[N, K\]"):
        ops().pack_gemm_weight(torch.randn(3))
    p = _lay_out(_random_layer(64, 2, 1, 32, 48, False, seed=1)[0], "packed")
    p["wd"] = p["wd"].double()  # one weight of the wrong dtype: refused, not misread
    x = torch.randn(1, 1, 64)
    kc = torch.zeros(1, 1, 1, 8, 32)
    with pytest.raises(ValueError, match="packed weights"):
        ops().llama_layer(x, p["ln1"], p["wqkv"], None, p["wo"], p["ln2"], p["wgu"], p["wd"], kc, kc.clone(), 0,
                          torch.zeros(1, dtype=torch.int32), torch.zeros(1, 1, dtype=torch.long), None, None,
                          make_rope_cos_sin(8, 32), 1e-6, 2, 1)


def test_bf16_pairs_layout_gives_the_same_bits():
    """The fp32 CPU model packs a bf16-exact weight (a bf16 checkpoint run in fp32) as bf16 pairs: the layer's
    outputs and caches are the fp32-packed layer's, bit for bit, with GQA, bias and a causal block."""
    D, Hq, Hk, Dh, inter, T = 200, 4, 2, 48, 96, 5
    p, rnd = _random_layer(D, Hq, Hk, Dh, inter, True, seed=5)
    p = {k: t.bfloat16().float() if t.dim() == 2 else t for k, t in p.items()}
    B, S = 2, 32
    caches = [rnd(1, B, Hk, S, Dh) for _ in range(2)]
    lens = torch.tensor([3, 20], dtype=torch.int32)
    x, rope = rnd(B, T, D), make_rope_cos_sin(S + T, Dh)
    outs = []
    for bf16 in (False, True):
        q = {k: ops().pack_gemm_weight(t, bf16) if t.dim() == 2 else t for k, t in p.items()}
        kc, vc = caches[0].clone(), caches[1].clone()
        y = ops().llama_layer(x, q["ln1"], q["wqkv"], q["bqkv"], q["wo"], q["ln2"], q["wgu"], q["wd"], kc, vc, 0,
                              lens, lens.long()[:, None] + torch.arange(T), None, None, rope, 1e-6, Hq, Hk)
        outs.append((y, kc, vc))
    assert outs[1][0].data_ptr() != outs[0][0].data_ptr()
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("layout", ["rowmajor", "packed"])
def test_llama_layers_is_the_layers_one_by_one(layout):
    """llama_layers (LlamaModel.forward_layers on CPU: one crossing for layers first..first+n-1) gives llama_layer's
    bits layer by layer, output and cache, with a tree mask, inactive rows and a bias; only its layers' cache
    slices change. Bad weight lists raise ValueError."""
    B, T, Hq, Hk, Dh, D, inter, S = 2, 4, 4, 2, 32, 96, 80, 24
    rnd = None
    lays = []
    for i in range(3):
        p, rnd = _random_layer(D, Hq, Hk, Dh, inter, i == 1, seed=100 + i)
        lays.append(_lay_out(p, layout))
    kc, vc = rnd(5, B, Hk, S, Dh), rnd(5, B, Hk, S, Dh)
    kc2, vc2, kc0 = kc.clone(), vc.clone(), kc.clone()
    cl = torch.tensor([3, 11], dtype=torch.int32)
    bits = [1] + [1 | (1 << j) for j in range(1, T)]
    tree_mask = torch.tensor(bits, dtype=torch.int32)[None, :, None].expand(B, T, 1).contiguous()
    positions = cl.long()[:, None] + torch.tensor([0] + [1] * (T - 1))
    act = torch.tensor([True, False])
    rope = make_rope_cos_sin(S + T, Dh)
    x = rnd(B, T, D)
    names = ("ln1", "wqkv", "bqkv", "wo", "ln2", "wgu", "wd")
    flat = [q.get(k) for q in lays for k in names]
    got = ops().llama_layers(x, flat, kc, vc, 1, cl, positions, tree_mask, act, rope, 1e-6, Hq, Hk)
    want = x
    for i, q in enumerate(lays):
        want = ops().llama_layer(want, *[q.get(k) for k in names], kc2, vc2, 1 + i, cl, positions, tree_mask, act,
                                 rope, 1e-6, Hq, Hk)
    assert torch.equal(got, want) and torch.equal(kc, kc2) and torch.equal(vc, vc2)
    for other in (0, 4):
        assert torch.equal(kc[other], kc0[other])
    assert not torch.equal(kc[1][0], kc0[1][0])  # the active row's K was appended
    with pytest.raises(ValueError, match="7 tensors per layer"):
        ops().llama_layers(x, flat[:-1], kc, vc, 1, cl, positions, tree_mask, act, rope, 1e-6, Hq, Hk)
    with pytest.raises(ValueError, match="out of range"):
        ops().llama_layers(x, flat, kc, vc, 3, cl, positions, tree_mask, act, rope, 1e-6, Hq, Hk)
    with pytest.raises(ValueError, match="weight 1 is missing"):
        ops().llama_layers(x, flat[:1] + [None] + flat[2:], kc, vc, 1, cl, positions, tree_mask, act, rope, 1e-6,
                           Hq, Hk)


@pytest.mark.parametrize("shape", [(1, 1, 96), (5, 96), (2, 3, 96)])
def test_lm_logits_is_the_norm_then_the_packed_head(shape):
    """lm_logits (LlamaModel.logits on CPU): rms_norm_ref's bits, then gemm_packed's, in one call; bad input raises."""
    gen = torch.Generator().manual_seed(sum(shape))
    h, w = torch.randn(*shape, generator=gen) * 3, 1 + 0.1 * torch.randn(96, generator=gen)
    head = torch.randn(333, 96, generator=gen) / 10
    packed = ops().pack_gemm_weight(head)
    got = ops().lm_logits(h, w, 1e-5, packed, 333)
    assert got.shape == (*shape[:-1], 333)
    assert torch.equal(got, ops().gemm_packed(rms_norm_ref(h, w, 1e-5), packed, 333))
    torch.testing.assert_close(got, F.linear(rms_norm_ref(h, w, 1e-5), head), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="packed"):
        ops().lm_logits(h, w, 1e-5, packed, 400)
    with pytest.raises(ValueError, match="fp32"):
        ops().lm_logits(h.double(), w, 1e-5, packed, 333)
    with pytest.raises(ValueError, match="norm_weight"):
        ops().lm_logits(h, w[:50], 1e-5, packed, 333)
