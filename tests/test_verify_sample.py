"""verify_sample: the native op (C++ CPU twin; CUDA kernel where a GPU is) vs the reference token for token,
Philox bits, edge cases, input checks, and seeded chi-squared tests that the emitted tokens follow the filtered
target (the losslessness claim), with a planted-bug sampler that must fail the same check."""

import math

import numpy as np
import pytest
import torch

from kangaroo_kernels.ops.verify_sample import verify_sample
from kangaroo_kernels.reference.verify_sample import (
    filtered_probs_ref,
    philox4x32_10,
    philox_uniforms,
    sample_exp_ref,
    verify_sample_ref,
)

SETTINGS = [(t, k, p) for t in (0.7, 1.0) for k in (0, 5, 50) for p in (1.0, 0.9, 0.5)]
# each value of T, top_k and top_p, and several pairs, for the large vocabulary
SETTINGS_LARGE_V = [(0.7, 0, 1.0), (1.0, 5, 0.9), (0.7, 50, 0.5), (1.0, 0, 0.5), (0.7, 5, 1.0), (1.0, 50, 0.9)]


def _assert_same(got, want):
    for name in ("accept_len", "path", "tokens"):
        g, w = getattr(got, name).cpu(), getattr(want, name).cpu()
        assert g.dtype == torch.int32, name
        assert torch.equal(g, w), f"{name}:\n{g}\nvs reference\n{w}"


def _random_parents(N, gen):
    return [int(torch.randint(-1, j, (1,), generator=gen)) if j else -1 for j in range(N)]


def _make_case(B, N, V, tree, probs, gen, *, dtype=torch.float32, ragged=True):
    """Random drafts that are often accepted: ~70% of the nodes get their token's logit raised above the
    maximum of their parent's row (with draft_probs the tokens are drawn from a q close to that row instead).
    Rows are ragged (tail padding) and ~10% of the nodes are -1 padding."""
    parents = torch.tensor([_random_parents(N, gen) for _ in range(B)], dtype=torch.int64) if tree else None
    par = parents if tree else torch.arange(-1, N - 1).expand(B, N)
    logits = torch.randn(B, N + 1, V, generator=gen) * 3
    draft = torch.randint(0, V, (B, N), generator=gen)
    boost = torch.rand(B, N, generator=gen) < 0.7
    for b in range(B):
        for c in range(N):
            if boost[b, c]:
                row = logits[b, par[b, c] + 1]
                row[draft[b, c]] = row.max() + 2.0
    q = None
    if probs:
        noisy = logits + torch.randn(B, N + 1, V, generator=gen)
        q = torch.softmax(torch.stack([noisy[b, par[b] + 1] for b in range(B)]), -1)
        for b in range(B):
            for c in range(N):
                draft[b, c] = int(torch.multinomial(q[b, c], 1, generator=gen))
    pad = torch.rand(B, N, generator=gen) < 0.1
    if ragged:
        for b in range(B):
            pad[b, N - (N * b) // B:] = True  # row b keeps about N (1 - b/B) nodes
    draft = torch.where(pad, torch.full_like(draft, -1), draft)
    uniforms = torch.rand(B, N + 1, generator=gen).clamp(2 ** -24, 1 - 2 ** -24)
    return draft, logits.to(dtype), q, parents, uniforms


def _to(device, *ts):
    return [t.to(device) if isinstance(t, torch.Tensor) else t for t in ts]


# --------------------------------------------------------------------------------------------------------------
# exact equality with the reference


@pytest.mark.parametrize("V", [1, 7, 32001])
@pytest.mark.parametrize("tree", [False, True], ids=["chain", "tree"])
@pytest.mark.parametrize("probs", [False, True], ids=["onehot", "q"])
def test_matches_reference(device, V, tree, probs):
    gen = torch.Generator().manual_seed(1000 * V + 10 * tree + probs)
    settings = SETTINGS_LARGE_V if V > 1000 else SETTINGS
    for i, (temperature, top_k, top_p) in enumerate(settings):
        for B in (1, 3):
            N = int(torch.randint(1, 33 if tree else 9, (1,), generator=gen))
            draft, logits, q, parents, u = _make_case(B, N, V, tree, probs, gen)
            if i % 2:
                draft = draft.to(torch.int32)
            kw = dict(draft_probs=q, parents=parents, temperature=temperature, top_k=top_k, top_p=top_p)
            want = verify_sample_ref(draft, logits, uniforms=u, **kw)
            d_, l_, q_, p_, u_ = _to(device, draft, logits, q, parents, u)
            got = verify_sample(d_, l_, uniforms=u_, **{**kw, "draft_probs": q_, "parents": p_})
            _assert_same(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_logits_match_reference(device, dtype):
    gen = torch.Generator().manual_seed(7)
    for tree, probs in ((False, False), (True, True)):
        draft, logits, q, parents, u = _make_case(3, 12, 1000, tree, probs, gen, dtype=dtype)
        kw = dict(draft_probs=q, parents=parents, temperature=0.7, top_k=50, top_p=0.9)
        want = verify_sample_ref(draft, logits, uniforms=u, **kw)
        d_, l_, q_, p_, u_ = _to(device, draft, logits, q, parents, u)
        _assert_same(verify_sample(d_, l_, uniforms=u_, **{**kw, "draft_probs": q_, "parents": p_}), want)


def test_acceptance_boundary_is_bit_exact(device):
    """accept iff u < p(x): with fp64 uniforms exactly at the reference's p(x) and one ulp below it, the op must
    reject and accept respectively, so its fp32 exp and fp64 division are bit-identical to the reference."""
    gen = torch.Generator().manual_seed(3)
    B = 600
    logits = torch.rand(B, 2, 2, generator=gen) * 24 - 12  # |z0 - z1| <= 24 / T: p(x) stays inside (0, 1)
    draft = torch.zeros(B, 1, dtype=torch.int64)
    for temperature in (0.7, 1.0, 1.3):
        p = filtered_probs_ref(logits[:, 0], temperature)[:, 0]
        assert bool(((p > 0) & (p < 1)).all())
        below = torch.from_numpy(np.nextafter(p.numpy(), 0.0))
        for u0, want in ((p, 0), (below, 1)):
            u = torch.stack([u0, torch.full_like(u0, 0.5)], 1)
            got = verify_sample(*_to(device, draft, logits), uniforms=u.to(device), temperature=temperature)
            assert bool((got.accept_len.cpu() == want).all()), (temperature, want)


def test_sample_exp_ref_accuracy():
    x = torch.cat([-torch.rand(200000, generator=torch.Generator().manual_seed(0)) * 87,
                   torch.tensor([0.0, -0.0, -87.0, -1e-30])])
    got, want = sample_exp_ref(x).double(), torch.exp(x.double())
    assert float(((got - want) / want).abs().max()) < 3 * 2 ** -24
    assert torch.equal(sample_exp_ref(torch.tensor([-87.01, -1e4, -math.inf])), torch.zeros(3))


# --------------------------------------------------------------------------------------------------------------
# Philox


def test_philox_known_answers():
    # Random123 tests/kat_vectors, philox4x32 R=10: counter, key -> output
    kat = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
           ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
           ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for ctr, key, want in kat:
        assert philox4x32_10(ctr, key) == want


def test_philox_uniforms_mapping():
    seed = torch.tensor([0, -1, 2 ** 40 + 7], dtype=torch.int64)
    offset = torch.tensor([0, 2 ** 32 - 1, -3], dtype=torch.int64)
    u = philox_uniforms(seed, offset, 5)
    assert u.dtype == torch.float64 and u.shape == (3, 5)
    assert bool(((u > 0) & (u < 1)).all())
    for b in range(3):
        s, o = int(seed[b]) % 2 ** 64, int(offset[b])
        for j in range(5):
            c = (o + j) % 2 ** 64
            x = philox4x32_10((c & 0xFFFFFFFF, c >> 32, 0, 0), (s & 0xFFFFFFFF, s >> 32))
            m = (x[0] << 20) | (x[1] >> 12)
            assert float(u[b, j]) == (m + 0.5) * 2.0 ** -52
    # rough uniformity: 4096 draws, mean and variance of U(0, 1) within 5 sigma
    v = philox_uniforms(torch.arange(64), torch.zeros(64, dtype=torch.int64), 64).flatten()
    assert abs(float(v.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / v.numel())
    assert abs(float(v.var()) - 1 / 12) < 0.01


@pytest.mark.parametrize("tree", [False, True], ids=["chain", "tree"])
def test_philox_path_matches_reference_and_advances_offset(device, tree):
    gen = torch.Generator().manual_seed(11)
    B, N, V = 3, 10, 500
    draft, logits, q, parents, _ = _make_case(B, N, V, tree, tree, gen)
    seed = torch.tensor([5, -7, 2 ** 62], dtype=torch.int64)
    offset = torch.tensor([0, 123, 2 ** 40], dtype=torch.int64)
    kw = dict(draft_probs=q, parents=parents, temperature=0.7, top_p=0.9)
    for _ in range(2):  # the second call draws fresh numbers from the advanced offsets
        start = offset.clone()
        want = verify_sample_ref(draft, logits, uniforms=philox_uniforms(seed, start, N + 1), **kw)
        ref_offset = start.clone()
        want_seeded = verify_sample_ref(draft, logits, seed=seed, offset=ref_offset, **kw)
        _assert_same(want_seeded, want)
        assert torch.equal(ref_offset, start + N + 1)
        d_, l_, q_, p_, s_, o_ = _to(device, draft, logits, q, parents, seed, offset)
        got = verify_sample(d_, l_, seed=s_, offset=o_, **{**kw, "draft_probs": q_, "parents": p_})
        _assert_same(got, want)
        assert torch.equal(o_.cpu(), start + N + 1)
        offset = o_.cpu()


def test_philox_reveals_uniform_bits(device):
    """Flat logits: the final token is floor(u * V) exactly, so 12 bits of every uniform must agree."""
    B, V = 256, 4096
    seed, offset = torch.arange(B, dtype=torch.int64) * 7919 - 99, torch.arange(B, dtype=torch.int64) * 3
    draft = torch.full((B, 0), -1, dtype=torch.int32)
    logits = torch.zeros(1, 1, V).expand(B, 1, V)
    want = (philox_uniforms(seed, offset, 1)[:, 0] * V).floor().to(torch.int32)
    got = verify_sample(*_to(device, draft, logits), seed=seed.to(device), offset=offset.to(device))
    assert torch.equal(got.tokens[:, 0].cpu(), want)


def test_default_generator_is_reproducible(device):
    gen = torch.Generator().manual_seed(2)
    draft, logits, _, _, _ = _make_case(3, 5, 300, False, False, gen)
    d_, l_ = _to(device, draft, logits)
    torch.manual_seed(1234)
    a = verify_sample(d_, l_, temperature=1.0)
    torch.manual_seed(1234)
    b = verify_sample(d_, l_, temperature=1.0)
    _assert_same(a, b)
    seed_only = verify_sample(d_, l_, seed=torch.tensor([1, 2, 3], device=device))
    want = verify_sample_ref(draft, logits, uniforms=philox_uniforms(torch.tensor([1, 2, 3]),
                                                                     torch.zeros(3, dtype=torch.int64), 6))
    _assert_same(seed_only, want)


# --------------------------------------------------------------------------------------------------------------
# edge cases


def test_all_accepted_and_bonus(device):
    """top_k = 1 makes every target one-hot at its argmax; argmax drafts are accepted whatever u is."""
    gen = torch.Generator().manual_seed(4)
    B, N, V = 3, 6, 97
    logits = torch.randn(B, N + 1, V, generator=gen)
    draft = logits[:, :N].argmax(-1)
    u = torch.rand(B, N + 1, generator=gen).clamp(2 ** -24, 1 - 2 ** -24)
    got = verify_sample(*_to(device, draft, logits), uniforms=u.to(device), top_k=1)
    assert torch.equal(got.accept_len.cpu(), torch.full((B,), N, dtype=torch.int32))
    assert torch.equal(got.path.cpu()[:, :N], torch.arange(N, dtype=torch.int32).expand(B, N))
    assert torch.equal(got.path.cpu()[:, N], torch.full((B,), -1, dtype=torch.int32))
    assert torch.equal(got.tokens.cpu(), logits.argmax(-1).to(torch.int32))
    # one-hot q equal to the target: accepted too
    q = torch.nn.functional.one_hot(draft, V).float()
    got = verify_sample(*_to(device, draft, logits), draft_probs=q.to(device), uniforms=u.to(device), top_k=1)
    assert torch.equal(got.tokens.cpu(), logits.argmax(-1).to(torch.int32))


def test_first_rejected(device):
    """A draft outside the top-k set has p = 0: always rejected; the token comes from the top-k set."""
    gen = torch.Generator().manual_seed(5)
    B, N, V = 3, 4, 200
    logits = torch.randn(B, N + 1, V, generator=gen)
    draft = logits[:, :N].argmin(-1)
    for probs in (False, True):
        q = torch.softmax(torch.randn(B, N, V, generator=gen), -1) if probs else None
        u = torch.rand(B, N + 1, generator=gen).clamp(2 ** -24, 1 - 2 ** -24)
        got = verify_sample(*_to(device, draft, logits), uniforms=u.to(device), top_k=10,
                            **({"draft_probs": q.to(device)} if probs else {}))
        assert torch.equal(got.accept_len.cpu(), torch.zeros(B, dtype=torch.int32))
        top10 = logits[:, 0].topk(10, -1).indices
        assert bool((top10 == got.tokens.cpu()[:, :1]).any(-1).all())
        assert bool((got.tokens.cpu()[:, 1:] == -1).all()) and bool((got.path.cpu() == -1).all())
        _assert_same(got, verify_sample_ref(draft, logits, draft_probs=q, uniforms=u, top_k=10))


def test_empty_and_padded_drafts(device):
    gen = torch.Generator().manual_seed(6)
    V = 50
    for N in (0, 5):
        logits = torch.randn(2, N + 1, V, generator=gen)
        draft = torch.full((2, N), -1, dtype=torch.int64)
        parents = torch.full((2, N), -1, dtype=torch.int64)
        u = torch.rand(2, N + 1, generator=gen).clamp(2 ** -24, 1 - 2 ** -24)
        for par in (None, parents):
            got = verify_sample(*_to(device, draft, logits), uniforms=u.to(device),
                                **({"parents": par.to(device)} if par is not None else {}))
            want = verify_sample_ref(draft, logits, parents=par, uniforms=u)
            _assert_same(got, want)
            assert torch.equal(got.accept_len.cpu(), torch.zeros(2, dtype=torch.int32))
            assert bool((got.tokens.cpu()[:, 0] >= 0).all()) and bool((got.tokens.cpu()[:, 1:] == -1).all())
    # chain: a padded node ends the chain even if later nodes hold tokens
    logits = torch.zeros(1, 4, 10)
    logits[0, 0, 3] = logits[0, 2, 5] = 50.0
    got = verify_sample(*_to(device, torch.tensor([[3, -1, 5]]), logits), uniforms=torch.full((1, 4), 0.5,
                                                                                              device=device))
    assert got.accept_len.tolist() == [1] and got.path.tolist()[0][:2] == [0, -1]


def test_vocab_of_one(device):
    draft = torch.tensor([[0, 0, -1], [0, -1, 0]])
    logits = torch.randn(2, 4, 1)
    got = verify_sample(*_to(device, draft, logits), uniforms=torch.full((2, 4), 0.9, device=device))
    assert got.accept_len.tolist() == [2, 1]
    assert got.tokens.tolist() == [[0, 0, 0, -1], [0, 0, -1, -1]]


def test_nan_and_inf_rows(device):
    """A reached row with NaN / +inf / no finite value emits -1 and ends the walk; unreached rows don't matter."""
    V = 20
    logits = torch.zeros(1, 4, V)
    logits[0, 0, 7] = logits[0, 1, 8] = 40.0  # drafts 7, 8 accepted for sure
    draft = torch.tensor([[7, 8, 9]])
    u = torch.full((1, 4), 0.5)
    for bad in (float("nan"), float("inf")):
        lg = logits.clone()
        lg[0, 2, 3] = bad
        got = verify_sample(*_to(device, draft, lg), uniforms=u.to(device))
        assert got.accept_len.tolist() == [2] and got.tokens.tolist() == [[7, 8, -1, -1]]
        _assert_same(got, verify_sample_ref(draft, lg, uniforms=u))
        lg = logits.clone()
        lg[0, 0, 0] = bad  # the root row
        got = verify_sample(*_to(device, draft, lg), uniforms=u.to(device))
        assert got.accept_len.tolist() == [0] and got.tokens.tolist() == [[-1] * 4]
    lg = logits.clone()
    lg[0, 2] = -float("inf")
    got = verify_sample(*_to(device, draft, lg), uniforms=u.to(device))
    assert got.tokens.tolist() == [[7, 8, -1, -1]]
    # an unreached NaN row (node 2 is never reached when node 1 is rejected) changes nothing
    lg = logits.clone()
    lg[0, 1, 8] = -40.0
    lg2 = lg.clone()
    lg2[0, 3, 1] = float("nan")
    _assert_same(verify_sample(*_to(device, draft, lg2), uniforms=u.to(device)),
                 verify_sample(*_to(device, draft, lg), uniforms=u.to(device)))


def test_ties_at_thresholds_are_kept(device):
    """10 tokens at logit 2, 15 at 1, the rest at 0: top-k 12 and top-p 0.6 (0.7 after top-k) cut inside the group at 1,
    so the whole group is kept (25 tokens); the tokens at 0 are never emitted."""
    B, V = 400, 40
    row = torch.zeros(V)
    row[:10], row[10:25] = 2.0, 1.0
    logits = row.expand(B, 1, V)
    draft = torch.zeros(B, 0, dtype=torch.int32)
    for top_k, top_p in ((12, 1.0), (0, 0.6), (12, 0.7)):
        p = filtered_probs_ref(row[None], 1.0, top_k, top_p)[0]
        assert torch.equal(p > 0, row > 0)
        got = verify_sample(*_to(device, draft, logits), seed=torch.arange(B, device=device), top_k=top_k,
                            top_p=top_p)
        emitted = got.tokens.cpu()[:, 0]
        assert bool((emitted < 25).all()) and int((emitted >= 10).sum()) > 0
    # top-p 0.5 stops inside the first group (10 e^2 / (10 e^2 + 15 e + 15) = 0.57 >= 0.5): only it is kept
    assert torch.equal(filtered_probs_ref(row[None], 1.0, 0, 0.5)[0] > 0, row > 1)


def test_masked_vocab_never_sampled(device):
    gen = torch.Generator().manual_seed(8)
    B, V = 512, 64
    logits = torch.randn(1, 1, V, generator=gen).expand(B, 1, V).clone()
    logits[:, :, ::3] = -float("inf")
    draft = torch.zeros(B, 0, dtype=torch.int32)
    got = verify_sample(*_to(device, draft, logits), seed=torch.arange(B, device=device))
    assert bool((got.tokens.cpu()[:, 0] % 3 != 0).all())


def test_degenerate_residual_falls_back_to_target(device):
    """q = 2 * p (unnormalised): accepted with probability 1/2, and the rejection residual max(0, p - q) is all
    zero, so the final token comes from the filtered target (one-hot here: token a)."""
    V, a = 30, 11
    logits = torch.randn(2, 2, V, generator=torch.Generator().manual_seed(9))
    logits[:, 0, a] = 20.0
    q = torch.zeros(2, 1, V)
    q[:, 0, a] = 2.0
    draft = torch.full((2, 1), a)
    u = torch.tensor([[0.25, 0.6], [0.75, 0.6]])
    got = verify_sample(*_to(device, draft, logits), draft_probs=q.to(device), uniforms=u.to(device), top_k=1)
    assert got.accept_len.tolist() == [1, 0]
    assert got.tokens.cpu()[:, 0].tolist() == [a, a]
    _assert_same(got, verify_sample_ref(draft, logits, draft_probs=q, uniforms=u, top_k=1))


def test_expanded_inputs_and_out(device):
    gen = torch.Generator().manual_seed(10)
    B, N, V = 5, 4, 300
    draft, logits, q, parents, u = _make_case(B, N, V, True, True, gen, ragged=False)
    lg1, q1 = logits[:1].expand(B, N + 1, V), q[:1].expand(B, N, V)
    want = verify_sample_ref(draft, lg1.contiguous(), draft_probs=q1.contiguous(), parents=parents, uniforms=u)
    d_, p_, u_ = _to(device, draft, parents, u)
    l_, q_ = logits[:1].to(device).expand(B, N + 1, V), q[:1].to(device).expand(B, N, V)
    assert l_.stride(0) == 0 and q_.stride(0) == 0
    out = tuple(torch.full(s, 77, dtype=torch.int32, device=device) for s in ((B,), (B, N + 1), (B, N + 1)))
    got = verify_sample(d_, l_, draft_probs=q_, parents=p_, uniforms=u_, out=out)
    assert got.tokens.data_ptr() == out[2].data_ptr()
    _assert_same(got, want)
    # a non-contiguous vocabulary dim is handled too
    lt = torch.randn(B, N + 1, V * 2, generator=gen)
    _assert_same(verify_sample(d_, lt.to(device)[:, :, ::2], parents=p_, uniforms=u_),
                 verify_sample_ref(draft, lt[:, :, ::2].contiguous(), parents=parents, uniforms=u))


def test_bad_data_without_validation_stays_in_bounds(device):
    """validate=False: ids outside [0, V) are padding; a parent that is not an earlier node makes no child."""
    V = 10
    logits = torch.randn(1, 4, V, generator=torch.Generator().manual_seed(13))
    logits[0, 0, 2] = logits[0, 0, 3] = 30.0
    u = torch.full((1, 4), 0.5)
    for draft, parents in (([[12, 2, 3]], None), ([[-5, 2, 3]], None), ([[2, 2, 3]], [[2, 1, -1]]),
                           ([[2, 3, 3]], [[-1, 7, -3]])):
        d, par = torch.tensor(draft), None if parents is None else torch.tensor(parents)
        got = verify_sample(*_to(device, d, logits), parents=None if par is None else par.to(device),
                            uniforms=u.to(device), validate=False)
        _assert_same(got, verify_sample_ref(d, logits, parents=par, uniforms=u))
        assert bool((got.tokens.cpu() < V).all())


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    verify_sample(torch.zeros(1, 1, dtype=torch.int32), torch.zeros(1, 2, 3), uniforms=torch.full((1, 2), 0.5))
    with FakeTensorMode():
        out = verify_sample(torch.zeros(2, 3, dtype=torch.int32), torch.zeros(2, 4, 9),
                            uniforms=torch.full((2, 4), 0.5), validate=False)
        assert out.tokens.shape == (2, 4) and out.accept_len.shape == (2,)


@pytest.mark.cuda
def test_cuda_graph_replay_draws_fresh_numbers():
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(12)
    B, N, V = 4, 6, 1000
    draft, logits, q, parents, _ = _make_case(B, N, V, True, True, gen, ragged=False)
    d_, l_, q_, p_ = _to(dev, draft, logits, q, parents)
    seed = torch.arange(B, device=dev) + 17
    offset = torch.zeros(B, dtype=torch.int64, device=dev)
    kw = dict(draft_probs=q_, parents=p_, temperature=0.7, top_k=50)
    verify_sample(d_, l_, seed=seed, offset=offset, **kw)  # warm-up (loads the op, registers the fake)
    offset.zero_()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = verify_sample(d_, l_, seed=seed, offset=offset, validate=False, **kw)
    offset.zero_()
    for r in range(3):
        g.replay()
        torch.cuda.synchronize()
        want = verify_sample_ref(draft, logits, draft_probs=q, parents=parents, temperature=0.7, top_k=50,
                                 uniforms=philox_uniforms(seed.cpu(), torch.full((B,), r * (N + 1)), N + 1))
        _assert_same(out, want)
    assert torch.equal(offset.cpu(), torch.full((B,), 3 * (N + 1)))


# --------------------------------------------------------------------------------------------------------------
# input checks


def test_bad_inputs_raise_value_errors(device):
    B, N, V = 2, 3, 11
    d = torch.zeros(B, N, dtype=torch.int32, device=device)
    lg = torch.zeros(B, N + 1, V, device=device)
    u = torch.full((B, N + 1), 0.5, device=device)

    def bad(match, *args, **kw):
        kw.setdefault("uniforms", u)
        with pytest.raises(ValueError, match=match):
            verify_sample(*args, **kw)

    bad("draft_tokens", d.float(), lg)
    bad("draft_tokens", d[0], lg)
    bad("target_logits", d, lg[:, :N])
    bad("target_logits", d, lg.to(torch.int32))
    bad("target_logits", d, torch.zeros(B, N + 1, 0, device=device))
    bad("temperature", d, lg, temperature=0.0)
    bad("temperature", d, lg, temperature=-1.0)
    bad("temperature", d, lg, temperature=float("nan"))
    bad("top_k", d, lg, top_k=-1)
    bad("top_p", d, lg, top_p=0.0)
    bad("top_p", d, lg, top_p=1.5)
    bad("draft_probs", d, lg, draft_probs=torch.zeros(B, N, V + 1, device=device))
    bad("draft_probs", d, lg, draft_probs=torch.zeros(B, N, V, dtype=torch.float64, device=device))
    bad("draft_probs", d, lg, draft_probs=torch.full((B, N, V), -0.1, device=device))
    bad("parents", d, lg, parents=torch.zeros(B, N + 1, dtype=torch.int32, device=device))
    bad("parents", d, lg, parents=torch.tensor([[-1, 1, 0], [-1, 0, 0]], device=device))  # node 1 its own parent
    bad("parents", d, lg, parents=torch.tensor([[-1, -2, 0], [-1, 0, 0]], device=device))
    bad("draft_tokens", torch.full((B, N), V, device=device), lg)
    bad("draft_tokens", torch.full((B, N), -2, device=device), lg)
    bad("uniforms", d, lg, uniforms=torch.zeros(B, N + 1, device=device))
    bad("uniforms", d, lg, uniforms=torch.ones(B, N + 1, device=device))
    bad("uniforms", d, lg, uniforms=torch.full((B, N), 0.5, device=device))
    bad("uniforms", d, lg, uniforms=torch.full((B, N + 1), 0.5, dtype=torch.float16, device=device))
    bad("either uniforms or seed", d, lg, seed=torch.zeros(B, dtype=torch.int64, device=device))
    bad("seed", d, lg, uniforms=None, seed=torch.zeros(B, dtype=torch.int32, device=device))
    bad("offset", d, lg, uniforms=None, seed=torch.zeros(B, dtype=torch.int64, device=device),
        offset=torch.zeros(B + 1, dtype=torch.int64, device=device))
    bad("offset needs seed", d, lg, uniforms=None, offset=torch.zeros(B, dtype=torch.int64, device=device))
    bad("out.tokens", d, lg, out=(torch.zeros(B, dtype=torch.int32, device=device),
                                  torch.zeros(B, N + 1, dtype=torch.int32, device=device),
                                  torch.zeros(B, N, dtype=torch.int32, device=device)))
    # the native op checks metadata itself (ValueError, not a crash) when called directly
    from kangaroo_kernels.ops.verify_sample import _op

    outs = (torch.empty(B, dtype=torch.int32, device=device), torch.empty(B, N + 1, dtype=torch.int32,
                                                                          device=device),
            torch.empty(B, N + 1, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="target_logits"):
        _op()(d, lg[:, :N], None, None, u, None, None, 1.0, 0, 1.0, *outs)
    with pytest.raises(ValueError, match="uniforms"):
        _op()(d, lg, None, None, None, None, None, 1.0, 0, 1.0, *outs)
    with pytest.raises(ValueError, match="temperature"):
        _op()(d, lg, None, None, u, None, None, 0.0, 0, 1.0, *outs)


# --------------------------------------------------------------------------------------------------------------
# statistics: the emitted tokens follow the filtered target


def _chi2(samples: torch.Tensor, probs: torch.Tensor):
    """Pearson chi-squared of integer samples against probs [V] (fp64), bins merged (in increasing expected
    count) until each expects >= 5. Returns (stat, threshold = df + 10 sqrt(2 df), samples at p == 0)."""
    V = probs.numel()
    n = samples.numel()
    counts = torch.bincount(samples.cpu().long().clamp(0, V - 1), minlength=V).double()
    counts[V - 1] += int((samples < 0).sum())  # -1 would be a failure: count it against the last token
    off = int(counts[probs == 0].sum())
    exp_ = probs.cpu() * n
    order = torch.argsort(exp_[probs.cpu() > 0])
    e_pos, c_pos = exp_[probs.cpu() > 0][order], counts[probs.cpu() > 0][order]
    ge, gc, bins_e, bins_c = 0.0, 0.0, [], []
    for e, c in zip(e_pos.tolist(), c_pos.tolist()):
        ge, gc = ge + e, gc + c
        if ge >= 5:
            bins_e.append(ge)
            bins_c.append(gc)
            ge, gc = 0.0, 0.0
    if ge > 0:
        bins_e[-1] += ge
        bins_c[-1] += gc
    be, bc = torch.tensor(bins_e), torch.tensor(bins_c)
    stat = float(((bc - be) ** 2 / be).sum())
    df = len(bins_e) - 1
    return stat, df + 10 * math.sqrt(2 * df), off


def _assert_follows(samples, probs, what):
    stat, thr, off = _chi2(samples, probs)
    assert off == 0, f"{what}: {off} samples of zero-probability tokens"
    assert stat < thr, f"{what}: chi2 {stat:.1f} >= {thr:.1f}"


def _assert_rate(hits: torch.Tensor, p: float, what):
    n = hits.numel()
    rate = float(hits.double().mean())
    assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / n) + 1e-12, f"{what}: rate {rate:.4f} vs {p:.4f}"


def _tree_accept_prob(p, q, x=None, children=3):
    """P(some child of the root is accepted): one-hot distinct drafts x -> sum p(x); i.i.d. drafts from q ->
    b1 + (1 - b1) b2 + ..., b_i = sum min(r_i, q), r_{i+1} = norm(max(0, r_i - q))."""
    if q is None:
        return float(p[x].sum())
    r, total, miss = p.clone(), 0.0, 1.0
    for _ in range(children):
        beta = float(torch.minimum(r, q).sum())
        total += miss * beta
        miss *= 1 - beta
        r = (r - q).clamp_min(0)
        r = r / r.sum()
    return total


def _sample_root(p, q, drafts, u, bug=None):
    """A vectorised Python copy of the sampler at the root (children = drafts' columns), for trials whose
    residual after k rejections is the same (a shared q row, or the same one-hot drafts in every trial).
    bug="resample_target": keep sampling from p after a rejection (the classic mistake: no residual).
    Returns the emitted token of each trial."""
    T, C = drafts.shape
    V = p.numel()
    onehot = torch.nn.functional.one_hot
    residuals = [p]
    for c in range(C):
        r = residuals[-1]
        qc = q if q is not None else onehot(drafts[0, c], V).double()
        nxt = r if bug == "resample_target" else (r / r.sum() - qc).clamp_min(0)
        assert float(nxt.sum()) > 0  # no degenerate residual in these configurations
        residuals.append(nxt)
    tok = torch.full((T,), -1, dtype=torch.int64)
    done = torch.zeros(T, dtype=torch.bool)
    for c in range(C):
        x, r = drafts[:, c], residuals[c]
        qx = q[x] if q is not None else torch.ones(T, dtype=torch.float64)
        acc = ~done & (u[:, c] * qx < r[x] / r.sum())
        tok[acc] = x[acc]
        done |= acc
    cs = torch.cumsum(residuals[C], 0)
    final = torch.searchsorted(cs, u[:, C] * cs[-1], right=True).clamp_max(V - 1)
    return torch.where(done, tok, final)


V_STAT = 4096


def _stat_target(gen, boost_tokens=()):
    logits = torch.randn(V_STAT, generator=gen) * 1.5
    for t, b in boost_tokens:
        logits[t] += b
    return logits


@pytest.mark.parametrize("probs", [False, True], ids=["onehot", "q"])
def test_chain_emits_target_distribution(device, probs):
    """Chain of 2 drafts: the first emitted token follows filtered p_0 and, given the first draft was accepted,
    the second follows filtered p_1 (>= 10 V trials each); acceptance at position 0 is p(d0) or sum min(p, q)."""
    gen = torch.Generator().manual_seed(20 + probs)
    temperature, top_k, top_p = (1.0, 0, 1.0) if not probs else (0.7, 1000, 0.9)
    d0, d1 = 17, 333
    boost = 0.0 if probs else 10.0
    rows = torch.stack([_stat_target(gen, [(d0, boost)]), _stat_target(gen, [(d1, boost)]), _stat_target(gen)])
    p = filtered_probs_ref(rows, temperature, top_k, top_p)
    if probs:
        q = torch.softmax((rows[:2] + 0.5 * torch.randn(2, V_STAT, generator=gen)) / temperature, -1)
        beta0 = float(torch.minimum(p[0], q[0].double()).sum())
    else:
        beta0 = float(p[0, d0])
    B = int(math.ceil(10 * V_STAT / beta0 * 1.05))
    if probs:
        draft = torch.stack([torch.multinomial(q[j], B, replacement=True, generator=gen) for j in range(2)], 1)
    else:
        draft = torch.tensor([d0, d1]).expand(B, 2)
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, validate=False)
    if probs:
        kw["draft_probs"] = q[None].to(device).expand(B, 2, V_STAT)
    seed = torch.arange(B, dtype=torch.int64, device=device) * 104729 + 1
    out = verify_sample(draft.to(device), rows[None].to(device).expand(B, 3, V_STAT), seed=seed, **kw)
    toks, acc = out.tokens.cpu(), out.accept_len.cpu()
    _assert_follows(toks[:, 0], p[0], "position 0")
    _assert_rate(acc >= 1, beta0, "acceptance at position 0")
    second = toks[acc >= 1, 1]
    assert second.numel() >= 10 * V_STAT
    _assert_follows(second, p[1], "position 1 given position 0 accepted")

    # Test of the test: position 0 of a chain is a root with one child; a sampler that resamples from p (not the
    # residual) after a rejection must fail the same check, while the correct copy passes it.
    u = torch.rand(B, 2, generator=gen, dtype=torch.float64).clamp_min(2 ** -53)
    q0 = q[0].double() if probs else None
    _assert_follows(_sample_root(p[0], q0, draft[:, :1], u), p[0], "correct Python sampler")
    stat, thr, off = _chi2(_sample_root(p[0], q0, draft[:, :1], u, bug="resample_target"), p[0])
    assert stat >= thr or off > 0, f"the planted bug passed the chi-squared check ({stat:.1f} < {thr:.1f})"


@pytest.mark.parametrize("probs", [False, True], ids=["onehot", "q"])
def test_tree_emits_target_distribution(device, probs):
    """Root with 3 children (one-hot: distinct tokens, one outside the top-k set; q: i.i.d. draws): the emitted
    token follows filtered p_0; acceptance matches the closed form. The planted-bug sampler fails the same check
    and the correct Python copy passes it."""
    gen = torch.Generator().manual_seed(30 + probs)
    temperature, top_k, top_p = (0.7, 200, 1.0) if not probs else (1.0, 0, 0.8)
    root = _stat_target(gen, [] if probs else [(5, 6.0), (6, 5.5), (7, 5.0)])
    p0 = filtered_probs_ref(root[None], temperature, top_k, top_p)[0]
    B = 12 * V_STAT
    if probs:
        q = torch.softmax((root + 1.5 * torch.randn(V_STAT, generator=gen)) / temperature, -1)
        draft = torch.multinomial(q, 3 * B, replacement=True, generator=gen).view(B, 3)
        expected_acc = _tree_accept_prob(p0, q.double())
    else:
        q = None
        order = torch.argsort(p0, descending=True)
        outside = int(order[-1])  # p0 == 0 there (outside the top-k set)
        assert float(p0[outside]) == 0.0
        x = torch.tensor([int(order[0]), outside, int(order[1])])
        draft = x.expand(B, 3)
        expected_acc = _tree_accept_prob(p0, None, x)
    logits = root.to(device)[None, None].expand(B, 4, V_STAT)
    kw = dict(parents=torch.full((B, 3), -1, device=device), temperature=temperature, top_k=top_k, top_p=top_p,
              validate=False)
    if probs:
        kw["draft_probs"] = q[None, None].to(device).expand(B, 3, V_STAT)
    out = verify_sample(draft.to(device), logits, seed=torch.arange(B, device=device) + 7, **kw)
    _assert_follows(out.tokens.cpu()[:, 0], p0, "position 0")
    _assert_rate(out.accept_len.cpu() >= 1, expected_acc, "acceptance at position 0")

    u = torch.rand(B, 4, generator=gen, dtype=torch.float64).clamp_min(2 ** -53)
    qd = None if q is None else q.double()
    _assert_follows(_sample_root(p0, qd, draft, u), p0, "correct Python sampler")
    broken = _sample_root(p0, qd, draft, u, bug="resample_target")
    stat, thr, off = _chi2(broken, p0)
    assert stat >= thr or off > 0, f"the planted bug passed the chi-squared check ({stat:.1f} < {thr:.1f})"


# --------------------------------------------------------------------------------------------------------------
# per-row sampling settings (serving batches), greedy rows in the same call, probabilities as the target

def _row_settings_case(B, gen):
    """[B] temperature (about a third 0: greedy rows), top_k (0, 1, 5, V-ish) and top_p tensors."""
    t = torch.tensor([0.0, 0.7, 1.0, 1.3, 0.0, 0.5])[torch.randint(0, 6, (B,), generator=gen)]
    k = torch.tensor([0, 0, 5, 50, 1])[torch.randint(0, 5, (B,), generator=gen)].to(torch.int32)
    p = torch.tensor([1.0, 0.9, 0.5, 1.0])[torch.randint(0, 4, (B,), generator=gen)]
    return t, k, p


def _as_probs(logits):
    """Probabilities with exact zeros (a top-k-renormalised softmax, as engines hold them)."""
    pr = torch.softmax(logits.float(), -1)
    kth = pr.topk(min(7, pr.shape[-1]), -1).values[..., -1:]
    pr = torch.where(pr >= kth, pr, torch.zeros_like(pr))
    return pr / pr.sum(-1, keepdim=True)


@pytest.mark.parametrize("tree", [False, True], ids=["chain", "tree"])
@pytest.mark.parametrize("probs", [False, True], ids=["onehot", "q"])
@pytest.mark.parametrize("target_is_probs", [False, True], ids=["logits", "probs"])
def test_per_row_settings_match_reference(device, tree, probs, target_is_probs):
    """[B] temperature/top_k/top_p (greedy rows mixed in) equal the reference bit for bit, and each sampled row
    equals a one-row call with that row's settings as scalars."""
    gen = torch.Generator().manual_seed(40 + 4 * tree + 2 * probs + target_is_probs)
    for V in (7, 1000):
        B = 9
        N = int(torch.randint(1, 20 if tree else 8, (1,), generator=gen))
        draft, logits, q, parents, u = _make_case(B, N, V, tree, probs, gen)
        t, k, p = _row_settings_case(B, gen)
        if target_is_probs:
            logits, t = _as_probs(logits), (t > 0).float()
        kw = dict(draft_probs=q, parents=parents, target_is_probs=target_is_probs)
        want = verify_sample_ref(draft, logits, uniforms=u, temperature=t, top_k=k, top_p=p, **kw)
        d_, l_, q_, p_, u_, t_, k_, pp_ = _to(device, draft, logits, q, parents, u, t, k, p)
        got = verify_sample(d_, l_, uniforms=u_, temperature=t_, top_k=k_, top_p=pp_,
                            **{**kw, "draft_probs": q_, "parents": p_})
        _assert_same(got, want)
        for b in range(B):
            if not t[b] > 0:
                continue
            one = lambda x: None if x is None else x[b:b + 1]  # noqa: E731
            single = verify_sample(one(d_), one(l_), uniforms=one(u_), draft_probs=one(q_), parents=one(p_),
                                   temperature=float(t[b]), top_k=int(k[b]), top_p=float(p[b]),
                                   target_is_probs=target_is_probs)
            for name in ("accept_len", "path", "tokens"):
                assert torch.equal(getattr(single, name)[0].cpu(), getattr(got, name)[b].cpu()), (b, name)


@pytest.mark.parametrize("tree", [False, True], ids=["chain", "tree"])
@pytest.mark.parametrize("probs", [False, True], ids=["onehot", "q"])
def test_greedy_rows_equal_verify_greedy(device, tree, probs):
    """temperature 0 rows inside a sampling call give exactly verify_greedy's result, whatever the uniforms,
    the draft_probs and the other rows' settings are."""
    from kangaroo_kernels.ops.verify_greedy import verify_greedy

    gen = torch.Generator().manual_seed(50 + 2 * tree + probs)
    B, N, V = 8, 12, 300
    draft, logits, q, parents, u = _make_case(B, N, V, tree, probs, gen)
    t = torch.tensor([0.0, 0.8] * (B // 2))
    d_, l_, q_, p_, u_, t_ = _to(device, draft, logits, q, parents, u, t)
    got = verify_sample(d_, l_, uniforms=u_, draft_probs=q_, parents=p_, temperature=t_, top_k=20, top_p=0.9)
    want = verify_greedy(d_, l_, parents=p_)
    g = t == 0
    for name in ("accept_len", "path", "tokens"):
        assert torch.equal(getattr(got, name).cpu()[g], getattr(want, name).cpu()[g]), name
    assert int(want.accept_len.cpu()[g].sum()) > 0  # the drafts are often accepted: not a vacuous check


def test_probs_target_keeps_zeros(device):
    """target_is_probs: tokens with probability exactly 0 are never emitted (no log round trip), even with
    uniforms next to 1 and rejected drafts; denormal probabilities stay sampleable."""
    B, V = 64, 50
    pr = torch.zeros(B, 2, V)
    pr[:, :, 3] = 0.5
    pr[:, :, 4] = 0.5 - 1e-39
    pr[:, :, 5] = 1e-39  # denormal in fp32: a log would survive, an exp(log) might not
    draft = torch.full((B, 1), 7, dtype=torch.int64)  # probability 0: always rejected
    u = torch.rand(B, 2, generator=torch.Generator().manual_seed(9)).clamp(2 ** -24, 1 - 2 ** -24)
    u[:, 1] = torch.linspace(2 ** -24, 1 - 2 ** -24, B)
    got = verify_sample(*_to(device, draft, pr), uniforms=u.to(device), target_is_probs=True)
    want = verify_sample_ref(draft, pr, uniforms=u, target_is_probs=True)
    _assert_same(got, want)
    toks = got.tokens[:, 0].cpu()
    assert bool((got.accept_len.cpu() == 0).all())
    assert set(toks.tolist()) <= {3, 4, 5} and {3, 4} <= set(toks.tolist())


def test_per_row_bad_inputs_raise_value_errors(device):
    B, N, V = 2, 3, 11
    d = torch.zeros(B, N, dtype=torch.int32, device=device)
    lg = torch.zeros(B, N + 1, V, device=device)
    u = torch.full((B, N + 1), 0.5, device=device)

    def bad(match, **kw):
        with pytest.raises(ValueError, match=match):
            verify_sample(d, lg, uniforms=u, **kw)

    bad("temperature", temperature=torch.zeros(B + 1, device=device))
    bad("temperature", temperature=torch.zeros(B, dtype=torch.int32, device=device))
    bad("temperature", temperature=torch.tensor([0.5, -1.0], device=device))
    bad("temperature", temperature=torch.tensor([0.5, float("nan")], device=device))
    bad("top_k", top_k=torch.zeros(B, device=device))
    bad("top_k", top_k=torch.tensor([1, -1], device=device))
    bad("top_p", top_p=torch.tensor([0.5, 0.0], device=device))
    bad("top_p", top_p=torch.tensor([0.5, 1.5], device=device))
    bad("temperature", temperature=0.7, target_is_probs=True)
    bad("temperature", temperature=torch.tensor([0.0, 0.7], device=device), target_is_probs=True)
    from kangaroo_kernels.ops.verify_sample import _op

    outs = (torch.empty(B, dtype=torch.int32, device=device), torch.empty(B, N + 1, dtype=torch.int32,
                                                                          device=device),
            torch.empty(B, N + 1, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="top_k"):
        _op()(d, lg, None, None, u, None, None, 1.0, 0, 1.0, *outs, None, torch.zeros(B, device=device), None)
    with pytest.raises(ValueError, match="temperature"):
        _op()(d, lg, None, None, u, None, None, 1.0, 0, 1.0, *outs, torch.zeros(B + 1, device=device))


V_ROWS = 512
# (temperature, top_k, top_p) per group of rows in one call; the last group is greedy
ROW_GROUPS = [(0.7, 0, 1.0), (1.0, 40, 1.0), (1.4, 0, 0.8), (1.0, 0, 1.0), (0.0, 0, 1.0)]


@pytest.mark.parametrize("probs", [False, True], ids=["onehot", "q"])
@pytest.mark.parametrize("target_is_probs", [False, True], ids=["logits", "probs"])
def test_per_row_settings_emit_each_rows_target(device, probs, target_is_probs):
    """One call, one shared target row, five groups of rows with different settings (one greedy): each group's
    first emitted token follows its own filtered target (chi-squared, >= 12 V trials a group) and its acceptance
    rate is its own p(d) or sum min(p, q). Planted bug: the same call with the first group's settings as scalars
    (per-row values ignored) must fail the check of the other groups."""
    gen = torch.Generator().manual_seed(60 + 2 * probs + target_is_probs)
    logits = torch.randn(V_ROWS, generator=gen) * 1.5
    groups = ROW_GROUPS
    if target_is_probs:  # probs are taken as given: the groups differ by their filters only
        logits = torch.softmax(logits, -1)
        logits[torch.randperm(V_ROWS, generator=gen)[:40]] = 0.0
        groups = [(1.0, 0, 1.0), (1.0, 40, 1.0), (1.0, 0, 0.6), (1.0, 5, 0.9), (0.0, 0, 1.0)]
    rows = torch.stack([logits, torch.randn(V_ROWS, generator=gen)])
    ps = [filtered_probs_ref(logits[None], t, k, p, probs=target_is_probs)[0] for t, k, p in groups]
    d0 = int(torch.argsort(ps[0], descending=True)[3])  # a likely token that is not the argmax
    R = 12 * V_ROWS
    B = R * len(groups)
    g_of = torch.arange(B) // R
    t = torch.tensor([g[0] for g in groups])[g_of]
    k = torch.tensor([g[1] for g in groups], dtype=torch.int32)[g_of]
    p = torch.tensor([g[2] for g in groups])[g_of]
    kw = dict(validate=False, target_is_probs=target_is_probs)
    if probs:
        base = torch.log(logits.clamp_min(1e-30)) if target_is_probs else logits
        qrow = torch.softmax(base + 0.7 * torch.randn(V_ROWS, generator=gen), -1)
        draft = torch.multinomial(qrow, B, replacement=True, generator=gen)[:, None]
        kw["draft_probs"] = qrow.to(device)[None, None].expand(B, 1, V_ROWS)
    else:
        draft = torch.full((B, 1), d0)
    target = rows.to(device)[None].expand(B, 2, V_ROWS)
    seed = torch.arange(B, dtype=torch.int64, device=device) * 7919 + 5
    out = verify_sample(draft.to(device), target, seed=seed, temperature=t.to(device), top_k=k.to(device),
                        top_p=p.to(device), **kw)
    toks, acc = out.tokens[:, 0].cpu(), out.accept_len.cpu()
    for gi, pg in enumerate(ps):
        sel = g_of == gi
        what = f"group {gi} {groups[gi]}"
        if groups[gi][0] == 0:
            assert bool((toks[sel] == int(torch.argmax(logits))).all()), what
            continue
        _assert_follows(toks[sel], pg, what)
        beta = float(torch.minimum(pg, qrow.double()).sum()) if probs else float(pg[d0])
        _assert_rate(acc[sel] >= 1, beta, what + " acceptance")

    # the planted bug: one scalar setting for the whole batch
    t0, k0, p0 = groups[0]
    broken = verify_sample(draft.to(device), target, seed=seed, temperature=t0, top_k=k0, top_p=p0, **kw)
    btoks = broken.tokens[:, 0].cpu()
    failed = []
    for gi in range(1, len(groups)):
        stat, thr, off = _chi2(btoks[g_of == gi], ps[gi])
        failed.append(stat >= thr or off > 0)
    assert all(failed), f"the planted bug passed the per-row check of some group: {failed}"


@pytest.mark.cuda
def test_cuda_graph_replay_with_per_row_settings():
    """Per-row temperature (greedy rows included) / top_k / top_p tensors and a probs target, captured in a CUDA
    graph: every replay equals the reference on the advanced offsets, with new settings written into the same
    tensors between replays (read on the device, not baked into the graph)."""
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(13)
    B, N, V = 6, 5, 700
    draft, logits, q, parents, _ = _make_case(B, N, V, True, True, gen, ragged=False)
    t, k, p = _row_settings_case(B, gen)
    probs = _as_probs(logits)
    d_, pr_, q_, p_ = _to(dev, draft, probs, q, parents)
    t_, k_, pp_ = (t > 0).float().to(dev), k.to(dev), p.to(dev)
    seed = torch.arange(B, device=dev) * 3 + 1
    offset = torch.zeros(B, dtype=torch.int64, device=dev)
    kw = dict(draft_probs=q_, parents=p_, target_is_probs=True)
    verify_sample(d_, pr_, seed=seed, offset=offset, temperature=t_, top_k=k_, top_p=pp_, **kw)  # warm-up
    offset.zero_()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = verify_sample(d_, pr_, seed=seed, offset=offset, temperature=t_, top_k=k_, top_p=pp_, validate=False,
                            **kw)
    offset.zero_()
    for r in range(3):
        if r == 2:  # new per-row settings in place
            t_.copy_(1 - t_)
            k_.fill_(3)
        g.replay()
        torch.cuda.synchronize()
        want = verify_sample_ref(draft, probs, draft_probs=q, parents=parents, temperature=t_.cpu(),
                                 top_k=k_.cpu(), top_p=pp_.cpu(), target_is_probs=True,
                                 uniforms=philox_uniforms(seed.cpu(), torch.full((B,), r * (N + 1)), N + 1))
        _assert_same(out, want)
