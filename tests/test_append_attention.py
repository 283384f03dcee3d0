"""append_attention: Triton kernel (interpreter on CPU, compiled on GPU) and the op vs the reference; the
reference vs an independent SDPA formulation; edge cases (inactive rows, bad lengths, out=), input checks."""

import math

import pytest
import torch
import torch.nn.functional as F

from kangaroo_kernels.ops.append_attention import _append_attention_triton, append_attention
from kangaroo_kernels.reference.append_attention import append_attention_ref, apply_rope_ref
from kangaroo_kernels.rope import make_rope_cos_sin

# Output tolerances (|x - ref| <= atol + rtol * |ref|), reference in fp32 from the same inputs:
# fp32: only summation order differs (split-KV, online softmax) -> ~1e-6.
# fp16: the kernel feeds tf32 dots (q * scale and p are rounded to 10-bit mantissas, relative 2^-11 each) and
#       rounds out to fp16 (2^-11) -> a few 1e-3 at |out| ~ 1.
# bf16: rounding out to bf16 alone is 2^-8 relative; allow 2 ulps (the reference rounds once too).
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def _tree(parents):
    """parents[B][T] (-1: child of the root, else an earlier node) -> (ancestor-or-self bit words [B,T,W] int32,
    depth[B,T] int64 with the root's children at depth 1, visible[B,T,T] bool built by walking parents)."""
    B, T = len(parents), len(parents[0])
    W = (T + 31) // 32
    words = torch.zeros(B, T, W, dtype=torch.int64)
    depth = torch.zeros(B, T, dtype=torch.int64)
    visible = torch.zeros(B, T, T, dtype=torch.bool)
    for b in range(B):
        for j in range(T):
            i, d = j, 0
            while i >= 0:
                visible[b, j, i] = True
                words[b, j, i // 32] |= 1 << (i % 32)
                i, d = parents[b][i], d + 1
            depth[b, j] = d
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
    return words, depth, visible


def _random_parents(B, T, gen):
    return [[-1] + [int(torch.randint(-1, j, (1,), generator=gen)) for j in range(1, T)] for _ in range(B)]


def _inputs(B, T, Hq, Hk, Dh, S, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)

    return rnd(B, T, Hq, Dh), rnd(B, T, Hk, Dh), rnd(B, T, Hk, Dh), rnd(B, Hk, S, Dh), rnd(B, Hk, S, Dh)


# (B, T, Hq, Hk, Dh, S, cache_lens, dtype, num_splits, mode, rope, active)
CASES = [
    (1, 1, 2, 2, 64, 40, [0], torch.float32, None, "chain", False, None),
    (3, 1, 8, 2, 128, 340, [1, 33, 300], torch.float32, 4, "chain", False, [True, False, True]),
    (3, 1, 7, 1, 64, 320, [300, 0, 33], torch.float16, 1, "chain", True, None),
    (1, 1, 8, 2, 64, 301, [300], torch.bfloat16, 3, "chain", False, None),
    (3, 5, 8, 2, 64, 310, [33, 300, 1], torch.float32, 1, "chain", True, None),
    (3, 5, 7, 1, 128, 310, [0, 33, 300], torch.float16, 3, "chain", False, [False, True, True]),
    (1, 5, 2, 2, 64, 305, [300], torch.bfloat16, 2, "chain", True, None),
    (3, 7, 8, 2, 64, 310, [300, 33, 0], torch.float32, 3, "tree", True, None),
    (1, 7, 7, 1, 128, 40, [1], torch.bfloat16, 1, "tree", False, None),
    (3, 7, 2, 2, 64, 310, [33, 1, 300], torch.float16, 5, "tree", True, [True, True, False]),
    (2, 37, 4, 1, 64, 80, [33, 0], torch.float32, 2, "tree", True, None),  # two mask words, two query blocks
]


def _grid():
    """mode x GQA ratio x dtype x split on/off; B = 3 with ragged lengths and one inactive row; Dh, lengths and
    RoPE alternate."""
    cases = []
    combos = [(tm, gqa, dtype, splits) for tm in ((1, "chain"), (5, "chain"), (7, "tree"))
              for gqa in ((1, 2), (4, 1), (7, 1)) for dtype in (torch.float32, torch.float16, torch.bfloat16)
              for splits in (1, 4)]
    for i, ((T, mode), (ratio, Hk), dtype, splits) in enumerate(combos):
        Dh = (64, 128)[i % 2]
        lens = ([0, 1, 33], [300, 33, 1])[i // 2 % 2]
        rope = i // 4 % 2 == 0
        active = [j != i % 3 for j in range(3)]
        cases.append((3, T, Hk * ratio, Hk, Dh, 301 + T, lens, dtype, splits, mode, rope, active))
    return cases


GRID = _grid()


def _run_case(case, device, fn, lens_dtype=torch.int32):
    B, T, Hq, Hk, Dh, S, lens, dtype, num_splits, mode, rope, active = case
    q, k, v, kc, vc = _inputs(B, T, Hq, Hk, Dh, S, dtype, device, seed=T * 1000 + S)
    cache_lens = torch.tensor(lens, dtype=lens_dtype, device=device)
    act = torch.tensor(active, device=device) if active is not None else None
    tree_mask = positions = cs = None
    if mode == "tree":
        words, depth, _ = _tree(_random_parents(B, T, torch.Generator().manual_seed(T)))
        tree_mask = words.to(device)
        positions = (cache_lens.long().cpu()[:, None] + depth - 1).to(torch.int32).to(device)
    if rope:
        cs = make_rope_cos_sin(S + T, Dh, device=device)
    else:
        positions = None
    kc0, vc0 = kc.clone(), vc.clone()
    kr, vr = kc.clone(), vc.clone()
    out = fn(q, k, v, kc, vc, cache_lens, tree_mask=tree_mask, active=act, positions=positions, rope_cos_sin=cs,
             num_splits=num_splits)
    ref = append_attention_ref(q, k, v, kr, vr, cache_lens, tree_mask=tree_mask, active=act, positions=positions,
                               rope_cos_sin=cs)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)
    # without RoPE the written rows are copies; rotated rows may differ by an FMA rounding on the GPU
    torch.testing.assert_close(kc, kr, atol=0 if not rope else None, rtol=0 if not rope else None)
    assert torch.equal(vc, vr)
    for b in range(B):
        written = torch.zeros(S, dtype=torch.bool)
        if active is None or active[b]:
            written[lens[b]:lens[b] + T] = True
        else:
            assert torch.equal(out[b], torch.zeros_like(out[b]))
        keep = (~written).to(device)
        assert torch.equal(kc[b][:, keep], kc0[b][:, keep]) and torch.equal(vc[b][:, keep], vc0[b][:, keep])
    return out


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}T{c[1]}H{c[2]}x{c[3]}D{c[4]}S{c[5]}-"
                         f"{str(c[7])[6:]}-sp{c[8]}-{c[9]}{'-rope' if c[10] else ''}{'-act' if c[11] else ''}")
def test_triton_matches_reference(case, device):
    _run_case(case, device, _append_attention_triton)


@pytest.mark.parametrize("i", range(len(GRID)))
def test_triton_grid(i, device):
    _run_case(GRID[i], device, _append_attention_triton, lens_dtype=(torch.int32, torch.int64)[i % 2])


@pytest.mark.parametrize("case", [CASES[1], CASES[7]], ids=["decode", "tree"])
def test_op_matches_reference(case, device):
    # CPU: the op's reference impl through torch.ops; CUDA: the Triton impl
    _run_case(case, device, append_attention)


def test_split_and_unsplit_agree():
    case = list(CASES[4])
    case[10] = False
    outs = []
    for splits in (1, 2, 7):
        case[8] = splits
        outs.append(_run_case(tuple(case), torch.device("cpu"), _append_attention_triton))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[0], outs[2], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fn", [append_attention, _append_attention_triton], ids=["op", "triton"])
def test_out_reuse_and_inactive_rows_zero(fn, device):
    B, T, Hq, Hk, Dh, S = 3, 5, 4, 2, 64, 50
    q, k, v, kc, vc = _inputs(B, T, Hq, Hk, Dh, S, torch.float16, device)
    lens = torch.tensor([3, 40, 0], dtype=torch.int32, device=device)
    active = torch.tensor([True, False, True], device=device)
    out = torch.full((B, T, Hq, Dh), float("nan"), dtype=torch.float16, device=device)
    kc0, vc0 = kc.clone(), vc.clone()
    for step in range(2):  # the same out buffer twice; the second call overwrites the new rows with others
        kr, vr = kc.clone(), vc.clone()
        res = fn(q, k, v, kc, vc, lens, active=active, out=out, num_splits=2)
        ref = append_attention_ref(q, k, v, kr, vr, lens, active=active)
        assert res is out
        torch.testing.assert_close(out.float(), ref.float(), atol=TOL[torch.float16][0], rtol=TOL[torch.float16][1])
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        assert torch.equal(kc[1], kc0[1]) and torch.equal(vc[1], vc0[1])
        assert torch.equal(kc, kr) and torch.equal(vc, vr)
        q, k, v = q.flip(1), k.flip(1), v.flip(1)


def test_strided_inputs(device):
    """q/k/v as views of a fused QKV projection output; caches as one layer of a stacked [L,B,Hk,S,Dh] cache."""
    B, T, Hq, Hk, Dh, S, layers = 3, 5, 8, 2, 64, 70, 3
    gen = torch.Generator().manual_seed(5)
    qkv = torch.randn(B, T, (Hq + 2 * Hk) * Dh, generator=gen).to(device)
    q = qkv[..., :Hq * Dh].view(B, T, Hq, Dh)
    k = qkv[..., Hq * Dh:(Hq + Hk) * Dh].view(B, T, Hk, Dh)
    v = qkv[..., (Hq + Hk) * Dh:].view(B, T, Hk, Dh)
    kc_all = torch.randn(layers, B, Hk, S, Dh, generator=gen).to(device)
    vc_all = torch.randn(layers, B, Hk, S, Dh, generator=gen).to(device)
    kc0, vc0 = kc_all.clone(), vc_all.clone()
    lens = torch.tensor([0, 33, 60], dtype=torch.int32, device=device)
    positions = torch.randint(0, 80, (B, T), generator=gen).to(device).t().contiguous().t()  # column-major
    cs = make_rope_cos_sin(80, Dh, device=device)
    kr, vr = kc_all[1].clone(), vc_all[1].clone()
    out = _append_attention_triton(q, k, v, kc_all[1], vc_all[1], lens, positions=positions, rope_cos_sin=cs,
                                   num_splits=2)
    ref = append_attention_ref(q, k, v, kr, vr, lens, positions=positions, rope_cos_sin=cs)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kc_all[1], kr, atol=1e-6, rtol=1e-6)
    assert torch.equal(vc_all[1], vr)
    for other in (0, 2):  # neighbouring layers untouched
        assert torch.equal(kc_all[other], kc0[other]) and torch.equal(vc_all[other], vc0[other])


def test_bad_lengths_are_masked_without_validate():
    """Lengths past the cache: the kernel writes only inside [0, S) and matches the reference; a guard region
    after the cache (the cache is a view of a longer buffer) stays bit-for-bit intact."""
    B, T, Hq, Hk, Dh, S, pad = 3, 5, 4, 2, 64, 40, 16
    q, k, v, big_k, big_v = _inputs(B, T, Hq, Hk, Dh, S + pad, torch.float32, "cpu")
    lens = torch.tensor([S - 2, -3, S + 100], dtype=torch.int32)
    big_k0, big_v0 = big_k.clone(), big_v.clone()
    kc, vc = big_k[:, :, :S], big_v[:, :, :S]
    with pytest.raises(ValueError, match="cache overflow"):
        _append_attention_triton(q, k, v, kc, vc, lens)
    assert torch.equal(big_k, big_k0)
    kr, vr = kc.clone(), vc.clone()
    out = _append_attention_triton(q, k, v, kc, vc, lens, validate=False, num_splits=3)
    ref = append_attention_ref(q, k, v, kr, vr, lens)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(kc, kr) and torch.equal(vc, vr)
    assert torch.equal(big_k[:, :, S:], big_k0[:, :, S:]) and torch.equal(big_v[:, :, S:], big_v0[:, :, S:])


@pytest.mark.parametrize("fn", [append_attention, _append_attention_triton], ids=["op", "triton"])
def test_validate_cache_overflow(fn):
    B, T, Hq, Hk, Dh, S = 2, 4, 2, 1, 32, 16
    q, k, v, kc, vc = _inputs(B, T, Hq, Hk, Dh, S, torch.float32, "cpu")
    for bad in ([S - T + 1, 0], [0, -1]):
        with pytest.raises(ValueError, match="cache overflow"):
            fn(q, k, v, kc, vc, torch.tensor(bad, dtype=torch.int32))
    # exactly full is fine; an overflowing row that is inactive is not checked (it writes nothing)
    fn(q, k, v, kc, vc, torch.tensor([S - T, 0], dtype=torch.int64))
    fn(q, k, v, kc, vc, torch.tensor([S, 0], dtype=torch.int32), active=torch.tensor([False, True]))
    cs = make_rope_cos_sin(8, Dh)
    with pytest.raises(ValueError, match="rope_cos_sin"):
        fn(q, k, v, kc, vc, torch.tensor([5, 0], dtype=torch.int32), rope_cos_sin=cs)
    with pytest.raises(ValueError, match="positions"):
        fn(q, k, v, kc, vc, torch.tensor([0, 0], dtype=torch.int32), rope_cos_sin=cs,
           positions=torch.tensor([[0, 1, 2, 8], [0, 1, 2, 3]], dtype=torch.int32))


def _bad_inputs():
    B, T, Hq, Hk, Dh, S = 2, 3, 4, 2, 32, 16
    q, k, v, kc, vc = _inputs(B, T, Hq, Hk, Dh, S, torch.float32, "cpu")
    lens = torch.zeros(B, dtype=torch.int32)
    base = dict(q=q, k_new=k, v_new=v, k_cache=kc, v_cache=vc, cache_lens=lens)
    return [
        ("q", dict(q=q[..., :24])),
        ("q", dict(q=q[..., :16])),
        ("q", dict(q=q[:, :0])),
        ("q", dict(q=q.double())),
        ("k_new", dict(k_new=k.half())),
        ("k_new", dict(k_new=torch.randn(B, T, 3, Dh))),  # 4 % 3: no GQA ratio
        ("v_new", dict(v_new=v[:, :2])),
        ("k_cache", dict(k_cache=kc[:, :1])),
        ("v_cache", dict(v_cache=vc[:, :, :8])),
        ("cache_lens", dict(cache_lens=lens.float())),
        ("cache_lens", dict(cache_lens=lens[:1])),
        ("tree_mask", dict(tree_mask=torch.zeros(B, T + 1, 1, dtype=torch.int32))),
        ("tree_mask", dict(tree_mask=torch.zeros(B, T, 1, dtype=torch.int64))),
        ("active", dict(active=torch.ones(B, dtype=torch.int32))),
        ("positions", dict(positions=torch.zeros(B, T, dtype=torch.int32))),
        ("rope_cos_sin", dict(rope_cos_sin=(torch.ones(8, Dh // 2), torch.zeros(8, Dh // 2)))),
        ("rope_cos_sin", dict(rope_cos_sin=torch.ones(8, Dh // 2))),
        ("num_splits", dict(num_splits=0)),
        ("out", dict(out=torch.empty(B, T, Hq, Dh, dtype=torch.float16))),
        ("out", dict(out=torch.empty(B, T, Hq, Dh * 2)[..., ::2])),
    ], base


@pytest.mark.parametrize("i", range(len(_bad_inputs()[0])))
def test_bad_inputs_raise_value_error(i):
    (name, override), base = _bad_inputs()[0][i], _bad_inputs()[1]
    kwargs = {**base, **override}
    args = [kwargs.pop(n) for n in ("q", "k_new", "v_new", "k_cache", "v_cache", "cache_lens")]
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        append_attention(*args, **kwargs)


def test_reference_matches_sdpa():
    """The spec against an independent formulation: write the cache, then SDPA over [0, L + T) with the mask
    from walking parents (tree) or tril (chain), RoPE as in HF (rotate_half with duplicated frequencies)."""
    B, T, Hq, Hk, Dh, S = 2, 6, 6, 2, 32, 24
    lens = [5, 11]
    q, k, v, kc, vc = _inputs(B, T, Hq, Hk, Dh, S, torch.float32, "cpu", seed=3)
    parents = [[-1, 0, 0, 1, -1, 4], [-1, 0, 1, 2, 3, 4]]
    words, depth, visible = _tree(parents)
    positions = torch.tensor(lens)[:, None] + depth - 1
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, Dh, 2, dtype=torch.float64) / Dh)
    emb = torch.cat([positions[..., None] * inv_freq] * 2, dim=-1)
    cos, sin = emb.cos()[:, :, None].float(), emb.sin()[:, :, None].float()

    def hf_rope(x):
        return x * cos + torch.cat([-x[..., Dh // 2:], x[..., :Dh // 2]], dim=-1) * sin

    qr, kr = hf_rope(q), hf_rope(k)
    for tree in (True, False):
        kc1, vc1 = kc.clone(), vc.clone()
        out = append_attention_ref(q, k, v, kc1, vc1, torch.tensor(lens, dtype=torch.int32),
                                   tree_mask=words if tree else None, positions=positions,
                                   rope_cos_sin=make_rope_cos_sin(S, Dh))
        for b, L in enumerate(lens):
            kc2, vc2 = kc[b].clone(), vc[b].clone()
            kc2[:, L:L + T], vc2[:, L:L + T] = kr[b].transpose(0, 1), v[b].transpose(0, 1)
            torch.testing.assert_close(kc1[b], kc2, atol=1e-6, rtol=1e-6)
            assert torch.equal(vc1[b], vc2)
            new = visible[b] if tree else torch.ones(T, T, dtype=torch.bool).tril()
            mask = torch.cat([torch.ones(T, L, dtype=torch.bool), new], dim=1)
            keys = kc2[:, :L + T].repeat_interleave(Hq // Hk, dim=0)
            vals = vc2[:, :L + T].repeat_interleave(Hq // Hk, dim=0)
            want = F.scaled_dot_product_attention(qr[b].transpose(0, 1), keys, vals, attn_mask=mask)
            torch.testing.assert_close(out[b], want.transpose(0, 1), atol=1e-5, rtol=1e-5)
    assert not torch.equal(visible[0], torch.ones(T, T, dtype=torch.bool).tril())  # the tree is not a chain


def test_apply_rope_ref_is_rotate_half():
    x = torch.randn(1, 3, 2, 8)
    pos = torch.tensor([[0, 5, 9]])
    out = apply_rope_ref(x, pos, make_rope_cos_sin(10, 8))
    ang = pos[0, 1].item() * 10000.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    x1, x2 = x[0, 1, 0, :4].double(), x[0, 1, 0, 4:].double()
    want = torch.cat([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()])
    torch.testing.assert_close(out[0, 1, 0], want.float(), atol=1e-6, rtol=1e-6)
    assert torch.equal(out[0, 0], x[0, 0])  # position 0 is the identity
    inv_freq = 10000.0 ** (-torch.arange(0, 8, 2, dtype=torch.float32) / 8)
    torch.testing.assert_close(make_rope_cos_sin(10, 8, inv_freq=inv_freq), make_rope_cos_sin(10, 8),
                               atol=1e-6, rtol=0)


def test_default_num_splits():
    from kangaroo_kernels.triton.append_attention import default_num_splits

    cpu = torch.device("cpu")
    assert default_num_splits(1, 8, 4, 128, 64, cpu) == 1  # short caches: no split
    assert default_num_splits(64, 32, 1, 128, 8192, cpu) == 1  # enough programs already
    n = default_num_splits(1, 1, 1, 128, 1 << 20, cpu)
    assert 1 < n <= 64


def test_opcheck_and_fake():
    B, T, Hq, Hk, Dh, S = 2, 3, 4, 2, 32, 12
    q, k, v, kc, vc = _inputs(B, T, Hq, Hk, Dh, S, torch.float32, "cpu")
    args = (q, k, v, kc, vc, torch.tensor([2, 5], dtype=torch.int32), None, torch.tensor([True, False]), None,
            None, 1 / math.sqrt(Dh), 0, torch.empty(B, T, Hq, Dh))
    torch.library.opcheck(torch.ops.kangaroo_kernels.append_attention.default, args)


def test_batch_zero():
    q, k, v, kc, vc = _inputs(0, 2, 2, 1, 32, 8, torch.float32, "cpu")
    out = append_attention(q, k, v, kc, vc, torch.zeros(0, dtype=torch.int32))
    assert out.shape == (0, 2, 2, 32)


@pytest.mark.cuda
def test_cuda_graph_capture():
    dev = torch.device("cuda")
    B, T, Hq, Hk, Dh, S = 2, 1, 8, 2, 128, 512
    q, k, v, kc, vc = _inputs(B, T, Hq, Hk, Dh, S, torch.bfloat16, dev)
    lens = torch.tensor([100, 300], dtype=torch.int32, device=dev)
    out = torch.empty(B, T, Hq, Dh, dtype=torch.bfloat16, device=dev)
    kr, vr = kc.clone(), vc.clone()
    ref = append_attention_ref(q, k, v, kr, vr, lens)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        append_attention(q, k, v, kc, vc, lens, out=out, validate=False)  # warm-up compiles the kernels
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        append_attention(q, k, v, kc, vc, lens, out=out)  # validate defaults to off while capturing
    out.zero_()
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[torch.bfloat16][0], rtol=TOL[torch.bfloat16][1])
    assert torch.equal(kc, kr) and torch.equal(vc, vr)
