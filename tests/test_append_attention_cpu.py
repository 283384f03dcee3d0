"""append_attention's C++ CPU kernel (csrc/cpu/append_attention.cpp) against the reference: any head dim (odd ones
too), GQA, T = 1 decode, T > 1 causal chains, tree masks (one and two bit words), inactive rows, cache slots at and
past the end, strided q/k/v and stacked caches, int32/int64 lengths and positions, all three dtypes."""

import pytest
import torch

from kangaroo_kernels.ops.append_attention import append_attention
from kangaroo_kernels.reference.append_attention import append_attention_ref
from kangaroo_kernels.rope import make_rope_cos_sin

# |out - ref| <= atol + rtol * |ref|. Both compute in fp32 from the same rounded inputs (RoPE'd q/k rounded to the
# input dtype as the reference does); only the summation order of the dots and softmax sums differs (~1e-6
# relative in fp32), then out is rounded once to the dtype: allow 2 ulps there (fp16 2^-10, bf16 2^-7).
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (8e-3, 8e-3)}


def _tree_words(B, T, gen):
    """Random parent trees -> ancestor-or-self bit words [B, T, ceil(T/32)] int32 and depths [B, T]."""
    W = (T + 31) // 32
    words = torch.zeros(B, T, W, dtype=torch.int64)
    depth = torch.zeros(B, T, dtype=torch.int64)
    for b in range(B):
        parents = [-1] + [int(torch.randint(-1, j, (1,), generator=gen)) for j in range(1, T)]
        for j in range(T):
            i, d = j, 0
            while i >= 0:
                words[b, j, i // 32] |= 1 << (i % 32)
                i, d = parents[i], d + 1
            depth[b, j] = d
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32), depth


# (B, T, Hq, Hk, Dh, S, lens, dtype, mode, rope, active)
CASES = [
    (1, 1, 4, 2, 64, 40, [0], torch.float32, "chain", True, None),
    (3, 1, 8, 2, 80, 50, [1, 33, 49], torch.float32, "chain", True, [True, False, True]),
    (3, 1, 7, 1, 96, 64, [63, 0, 20], torch.bfloat16, "chain", True, None),
    (2, 1, 2, 2, 17, 30, [5, 29], torch.float32, "chain", False, None),  # odd head dim (no RoPE)
    (3, 5, 8, 2, 96, 45, [40, 0, 12], torch.float32, "chain", True, [False, True, True]),  # slots up to S - 1
    (2, 5, 6, 3, 24, 33, [7, 28], torch.float16, "chain", True, None),
    (1, 5, 4, 1, 112, 70, [64], torch.bfloat16, "chain", False, None),
    (3, 7, 8, 2, 80, 60, [20, 1, 53], torch.float32, "tree", True, None),
    (2, 7, 4, 4, 128, 40, [0, 30], torch.float16, "tree", True, [True, False]),
    (2, 37, 4, 1, 48, 90, [33, 0], torch.float32, "tree", True, None),  # two mask words
    (1, 3, 2, 1, 256, 16, [13], torch.bfloat16, "tree", False, None),
]


def _run(case, lens_dtype=torch.int32):
    B, T, Hq, Hk, Dh, S, lens, dtype, mode, rope, active = case
    gen = torch.Generator().manual_seed(T * 100 + Dh)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    q, k, v, kc, vc = rnd(B, T, Hq, Dh), rnd(B, T, Hk, Dh), rnd(B, T, Hk, Dh), rnd(B, Hk, S, Dh), rnd(B, Hk, S, Dh)
    cache_lens = torch.tensor(lens, dtype=lens_dtype)
    act = torch.tensor(active) if active is not None else None
    tree_mask = positions = cs = None
    if mode == "tree":
        tree_mask, depth = _tree_words(B, T, gen)
        positions = (cache_lens.long()[:, None] + depth - 1).to(lens_dtype)
    if rope:
        cs = make_rope_cos_sin(S + T, Dh)
    else:
        positions = None
    kc0, vc0 = kc.clone(), vc.clone()
    kr, vr = kc.clone(), vc.clone()
    out = append_attention(q, k, v, kc, vc, cache_lens, tree_mask=tree_mask, active=act, positions=positions,
                           rope_cos_sin=cs)
    ref = append_attention_ref(q, k, v, kr, vr, cache_lens, tree_mask=tree_mask, active=act, positions=positions,
                               rope_cos_sin=cs)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)
    # the written K rows are RoPE'd in fp32 and rounded once, as in the reference; V rows are copies
    torch.testing.assert_close(kc, kr, atol=0 if not rope else None, rtol=0 if not rope else None)
    assert torch.equal(vc, vr)
    for b in range(B):
        written = torch.zeros(S, dtype=torch.bool)
        if active is None or active[b]:
            written[max(lens[b], 0):lens[b] + T] = True
        else:
            assert torch.equal(out[b], torch.zeros_like(out[b]))
        assert torch.equal(kc[b][:, ~written], kc0[b][:, ~written])
        assert torch.equal(vc[b][:, ~written], vc0[b][:, ~written])
    return out


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}T{c[1]}H{c[2]}x{c[3]}D{c[4]}S{c[5]}-"
                         f"{str(c[7])[6:]}-{c[8]}{'-rope' if c[9] else ''}{'-act' if c[10] else ''}")
def test_cpu_kernel_matches_reference(case):
    _run(case)


@pytest.mark.parametrize("i", [1, 7])
def test_cpu_kernel_int64_lengths_and_positions(i):
    _run(CASES[i], lens_dtype=torch.int64)


def test_cpu_kernel_is_not_the_reference_by_accident():
    """A planted bug (one prefix key dropped) must be caught by the comparison above."""
    case = CASES[1]
    B, T, Hq, Hk, Dh, S, lens = case[:7]
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, T, h, Dh, generator=gen) for h in (Hq, Hk, Hk))
    kc, vc = torch.randn(B, Hk, S, Dh, generator=gen), torch.randn(B, Hk, S, Dh, generator=gen)
    cl = torch.tensor(lens, dtype=torch.int32)
    out = append_attention(q, k, v, kc.clone(), vc.clone(), cl)
    short = append_attention_ref(q, k, v, kc.clone(), vc.clone(), cl - 1)
    assert not torch.allclose(out, short, atol=1e-3, rtol=1e-3)


def test_cpu_kernel_strided_views_and_stacked_cache():
    """q/k/v as views of one fused QKV output, the caches one layer of [L, B, Hk, S, Dh], column-major positions."""
    B, T, Hq, Hk, Dh, S, layers = 3, 5, 8, 2, 80, 70, 3
    gen = torch.Generator().manual_seed(5)
    qkv = torch.randn(B, T, (Hq + 2 * Hk) * Dh, generator=gen)
    q = qkv[..., :Hq * Dh].view(B, T, Hq, Dh)
    k = qkv[..., Hq * Dh:(Hq + Hk) * Dh].view(B, T, Hk, Dh)
    v = qkv[..., (Hq + Hk) * Dh:].view(B, T, Hk, Dh)
    kc_all = torch.randn(layers, B, Hk, S, Dh, generator=gen)
    vc_all = torch.randn(layers, B, Hk, S, Dh, generator=gen)
    kc0, vc0 = kc_all.clone(), vc_all.clone()
    lens = torch.tensor([0, 33, 60], dtype=torch.int32)
    positions = torch.randint(0, 80, (B, T), generator=gen).t().contiguous().t()
    cs = make_rope_cos_sin(80, Dh)
    kr, vr = kc_all[1].clone(), vc_all[1].clone()
    out = append_attention(q, k, v, kc_all[1], vc_all[1], lens, positions=positions, rope_cos_sin=cs)
    ref = append_attention_ref(q, k, v, kr, vr, lens, positions=positions, rope_cos_sin=cs)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kc_all[1], kr)
    assert torch.equal(vc_all[1], vr)
    for other in (0, 2):
        assert torch.equal(kc_all[other], kc0[other]) and torch.equal(vc_all[other], vc0[other])
    # a cache whose head dim is strided (a transposed buffer) gives the same result
    kt = kc0[1].transpose(-1, -2).contiguous().transpose(-1, -2)
    vt = vc0[1].transpose(-1, -2).contiguous().transpose(-1, -2)
    out2 = append_attention(q, k, v, kt, vt, lens, positions=positions, rope_cos_sin=cs)
    torch.testing.assert_close(out2, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kt, kr)


def test_cpu_kernel_bad_lengths_stay_in_bounds():
    """Lengths past the cache or negative (validate=False): writes only inside [0, S), a guard region after the
    cache stays intact, and the result matches the reference."""
    B, T, Hq, Hk, Dh, S, pad = 3, 5, 4, 2, 40, 30, 8
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(B, T, h, Dh, generator=gen) for h in (Hq, Hk, Hk))
    big_k, big_v = torch.randn(B, Hk, S + pad, Dh, generator=gen), torch.randn(B, Hk, S + pad, Dh, generator=gen)
    big_k0, big_v0 = big_k.clone(), big_v.clone()
    kc, vc = big_k[:, :, :S], big_v[:, :, :S]
    lens = torch.tensor([S - 2, -3, S + 100], dtype=torch.int32)
    kr, vr = kc.clone(), vc.clone()
    out = append_attention(q, k, v, kc, vc, lens, validate=False)
    ref = append_attention_ref(q, k, v, kr, vr, lens)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(kc, kr) and torch.equal(vc, vr)
    assert torch.equal(big_k[:, :, S:], big_k0[:, :, S:]) and torch.equal(big_v[:, :, S:], big_v0[:, :, S:])


def test_cpu_any_head_dim_but_cuda_limits_stay_explicit():
    """CPU accepts an odd head dim (without RoPE) that the Triton kernel cannot take; the Triton path names its
    limit (even, at most 256); an odd head dim cannot take rotate-half RoPE anywhere."""
    from kangaroo_kernels.ops.append_attention import _append_attention_triton

    lens = torch.zeros(1, dtype=torch.int32)
    for Dh in (23, 258):
        q, k, v = torch.randn(1, 1, 2, Dh), torch.randn(1, 1, 1, Dh), torch.randn(1, 1, 1, Dh)
        kc, vc = torch.zeros(1, 1, 8, Dh), torch.zeros(1, 1, 8, Dh)
        append_attention(q, k, v, kc, vc, lens)
        with pytest.raises(ValueError, match="head dim"):
            _append_attention_triton(q, k, v, kc, vc, lens)
    with pytest.raises(ValueError, match="even head dim"):
        q3, k3 = torch.randn(1, 1, 2, 23), torch.randn(1, 1, 1, 23)
        append_attention(q3, k3, k3.clone(), torch.zeros(1, 1, 8, 23), torch.zeros(1, 1, 8, 23), lens,
                         rope_cos_sin=torch.zeros(8, 23))
