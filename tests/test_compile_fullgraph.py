"""torch.compile(fullgraph=True) over verify steps built from the ops (per-row verify_sample on a tree,
verify_greedy, compact_kv; the FlashInfer and vLLM drop-ins) compiles without graph breaks and matches eager
bit for bit, in-place outputs (the Philox offset, the KV cache and its lengths) included: the fake
implementations are right. Each op runs once eagerly first (that loads the library and registers its fake)."""

import pytest
import torch

from kangaroo_kernels.compat.flashinfer import chain_speculative_sampling
from kangaroo_kernels.compat.vllm import rejection_sample_from_logits
from kangaroo_kernels.ops.compact_kv import compact_kv
from kangaroo_kernels.ops.verify_greedy import verify_greedy
from kangaroo_kernels.ops.verify_sample import verify_sample


def _tree_step(draft, logits, parents, temperature, top_k, top_p, seed, offset, k_cache, v_cache, cache_lens):
    out = verify_sample(draft, logits, parents=parents, temperature=temperature, top_k=top_k, top_p=top_p,
                        seed=seed, offset=offset, validate=False)
    greedy = verify_greedy(draft, logits, parents=parents, validate=False)
    compact_kv(k_cache, v_cache, cache_lens, out.path, out.accept_len, validate=False)
    return out.accept_len, out.path, out.tokens, greedy.tokens


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_tree_verify_step_compiles_and_matches_eager():
    gen = torch.Generator().manual_seed(0)
    B, N, V, L, Hk, S, Dh = 3, 6, 80, 2, 2, 24, 8
    draft = torch.randint(0, V, (B, N), generator=gen, dtype=torch.int32)
    logits = torch.randn(B, N + 1, V, generator=gen) * 3
    parents = torch.tensor([[-1, 0, 0, 1, 3, -1]] * B, dtype=torch.int32)
    for b in range(B):  # make some drafts the argmax of their parent's row: accepted paths of length > 0
        for j in (0, 1, 3):
            logits[b, int(parents[b, j]) + 1, draft[b, j]] = 20.0
    temperature = torch.tensor([0.0, 0.7, 1.3])
    top_k = torch.tensor([0, 5, 0], dtype=torch.int32)
    top_p = torch.tensor([1.0, 0.9, 0.6])
    seed = torch.tensor([3, 4, 5])
    k0 = torch.randn(L, B, Hk, S, Dh, generator=gen)
    v0 = torch.randn(L, B, Hk, S, Dh, generator=gen)
    lens0 = torch.tensor([4, 7, 9], dtype=torch.int32)

    def state():
        return torch.zeros(B, dtype=torch.int64), k0.clone(), v0.clone(), lens0.clone()

    off_e, k_e, v_e, lens_e = state()
    eager = _tree_step(draft, logits, parents, temperature, top_k, top_p, seed, off_e, k_e, v_e, lens_e)
    compiled = torch.compile(_tree_step, fullgraph=True)
    off_c, k_c, v_c, lens_c = state()
    got = compiled(draft, logits, parents, temperature, top_k, top_p, seed, off_c, k_c, v_c, lens_c)
    for a, b in zip(got, eager):
        assert torch.equal(a, b)
    assert torch.equal(off_c, off_e) and torch.equal(off_c, torch.full((B,), N + 1))
    assert torch.equal(lens_c, lens_e) and torch.equal(k_c, k_e) and torch.equal(v_c, v_e)
    assert int(eager[0][0]) > 0  # the greedy row accepted drafts: compact_kv moved entries
    assert torch.equal(eager[2][0], eager[3][0])  # and its sampled tokens are verify_greedy's
    # a second call draws from the advanced offset in both modes
    again_e = _tree_step(draft, logits, parents, temperature, top_k, top_p, seed, off_e, k_e, v_e, lens_e)
    again_c = compiled(draft, logits, parents, temperature, top_k, top_p, seed, off_c, k_c, v_c, lens_c)
    for a, b in zip(again_c, again_e):
        assert torch.equal(a, b)


def test_drop_ins_compile_and_match_eager():
    gen = torch.Generator().manual_seed(1)
    B, N, V = 4, 3, 40
    tp = torch.softmax(torch.randn(B, N + 1, V, generator=gen), -1)
    dp = torch.softmax(torch.randn(B, N, V, generator=gen), -1)
    di = torch.randint(0, V, (B, N), generator=gen)
    seed, offset = torch.tensor([7]), torch.tensor([11])

    def fi(dp, di, tp, seed, offset):
        acc = torch.zeros(B, dtype=torch.int32)
        em = torch.zeros(B, dtype=torch.int32)
        return chain_speculative_sampling(dp, di, tp, acc, em, seed=seed, offset=offset)

    want = fi(dp, di, tp, seed, offset)
    got = torch.compile(fi, fullgraph=True)(dp, di, tp, seed, offset)
    for a, b in zip(got, want):
        assert torch.equal(a, b)

    cu = torch.tensor([3, 3, 5, 8])  # request 1 has no drafts
    T = 8
    draft = torch.randint(0, V, (T,), generator=gen)
    logits = torch.randn(T + B, V, generator=gen)
    temp = torch.tensor([0.0, 1.0, 0.8, 1.2])

    def vl(draft, cu, logits, temp, seed, off):
        return rejection_sample_from_logits(draft, cu, 3, logits, temperature=temp, top_k=10, seed=seed, offset=off)

    seeds = torch.arange(B)
    want = vl(draft, cu, logits, temp, seeds, torch.zeros(B, dtype=torch.int64))
    got = torch.compile(vl, fullgraph=True)(draft, cu, logits, temp, seeds, torch.zeros(B, dtype=torch.int64))
    assert torch.equal(got, want)
