"""kangaroo_kernels.compat.vllm: vLLM's own cases (tests/v1/sample/test_rejection_sampler.py: the greedy
vectors, determinism when seeded, top-k / top-p masking, the target-distribution check as chi-squared with a
planted-bug control), mixed greedy and random requests, and the ragged layout's edge cases."""

from types import SimpleNamespace

import pytest
import torch
from test_verify_sample import _assert_follows, _chi2

from kangaroo_kernels.compat.vllm import PLACEHOLDER_TOKEN_ID as P
from kangaroo_kernels.compat.vllm import rejection_sample, rejection_sample_from_logits


def _logits_for(output_tokens, V=100, override=None):
    """vLLM's create_logits_tensor: rows whose argmax is each request's next output token (all but the last)."""
    rows = [t for toks in output_tokens for t in toks[:-1]]
    lg = torch.full((len(rows), V), -100.0)
    for i, t in enumerate(rows):
        lg[i, t] = 100.0
    if override is not None:
        lg[:, override] = 99.0
    return lg


def _layout(spec_tokens, device):
    n = [len(s) for s in spec_tokens]
    draft = torch.tensor([t for s in spec_tokens for t in s], dtype=torch.int64, device=device)
    cu = torch.cumsum(torch.tensor(n), 0).to(device)
    return draft, n, cu


GREEDY_CASES = [
    ([[1, 2, 3]], [[1, 2, 3, 4]], [[1, 2, 3, 4]]),  # perfect match
    ([[1, 2, 3]], [[1, 5, 3, 4]], [[1, 5, P, P]]),  # early mismatch
    ([[1, 2], [3]], [[1, 2, 5], [3, 4]], [[1, 2, 5], [3, 4, P]]),  # multiple sequences
    ([[1]], [[1, 2]], [[1, 2]]),  # single token
    ([[]], [[5]], [[5]]),  # empty sequence
    ([[1, 2, 3], [4, 5, 6]], [[1, 2, 7, 6], [4, 8, 6, 9]], [[1, 2, 7, P], [4, 8, P, P]]),  # multiple mismatches
    ([[1, 2]], [[1, 2, 3]], [[1, 2, 3]]),
    ([[1]], [[2, 3]], [[2, P]]),
    ([[1, 2], [3, 4]], [[1, 5, 6], [3, 4, 7]], [[1, 5, P], [3, 4, 7]]),
]


@pytest.mark.parametrize("spec, output, expected", GREEDY_CASES)
def test_vllm_greedy_vectors(device, spec, output, expected):
    draft, n, cu = _layout(spec, device)
    S = max(n)
    logits = _logits_for(output).to(device)
    bonus = torch.tensor([[o[-1]] for o in output], device=device)
    meta = SimpleNamespace(all_greedy=True, all_random=False, temperature=None, generators={})
    got = rejection_sample(draft, n, S, cu, None, logits, bonus, meta)
    assert got.dtype == torch.int32 and got.tolist() == expected
    # the same requests as greedy rows of a mixed batch (probabilities, temperature -1 = vLLM's greedy marker)
    meta = SimpleNamespace(all_greedy=False, all_random=False, generators={},
                           temperature=torch.full((len(spec),), -1.0, device=device))
    assert rejection_sample(draft, n, S, cu, None, torch.softmax(logits, -1), bonus, meta).tolist() == expected
    # and through the logits layout with bonus rows (bonus drawn greedily from its row)
    rows, k = [], 0
    for s, o in zip(spec, output):
        rows += [logits[k + i] for i in range(len(s))]
        bonus_row = torch.full((100,), -100.0, device=device)
        bonus_row[o[-1]] = 100.0
        rows.append(bonus_row)
        k += len(s)
    full = torch.stack(rows)
    got = rejection_sample_from_logits(draft, cu, S, full, temperature=torch.zeros(len(spec), device=device))
    assert got.tolist() == expected


def _random_batch(B, k, V, gen, device):
    dp = torch.softmax(torch.rand(B * k, V, generator=gen), -1)
    tl = torch.rand(B * k, V, generator=gen)
    draft = torch.randint(0, V, (B * k,), generator=gen)
    bonus = torch.randint(0, V, (B, 1), generator=gen)
    cu = torch.arange(1, B + 1) * k
    return [t.to(device) for t in (dp, tl, draft, bonus, cu)]


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("batch_size", [1, 4, 8])
@pytest.mark.parametrize("frac_seeded", [0.0, 0.5])
def test_deterministic_when_seeded(device, k, batch_size, frac_seeded):
    """vLLM's test: requests with their own generator give the same tokens on every repetition."""
    gen = torch.Generator().manual_seed(k * 100 + batch_size)
    V = 1000
    dp, tl, draft, bonus, cu = _random_batch(batch_size, k, V, gen, device)
    seeded = torch.rand(batch_size, generator=gen) <= frac_seeded
    results = []
    for _ in range(6):
        gens = {i: torch.Generator(device=device).manual_seed(i) for i in range(batch_size) if seeded[i]}
        meta = SimpleNamespace(all_greedy=False, all_random=True, generators=gens,
                               temperature=torch.ones(batch_size, device=device))
        results.append(rejection_sample(draft, [k] * batch_size, k, cu, None, torch.softmax(tl, -1), bonus, meta))
    for i in range(batch_size):
        if seeded[i]:
            assert all(torch.equal(r[i], results[0][i]) for r in results[1:])


def test_mixed_greedy_and_random_requests(device):
    """One call, greedy (temperature -1 / 0) and random requests interleaved: the greedy rows equal the
    all-greedy result; the random rows follow their own rule (here: p = q, so every draft is accepted)."""
    gen = torch.Generator().manual_seed(3)
    B, k, V = 6, 4, 50
    probs = torch.softmax(torch.randn(B * k, V, generator=gen) * 3, -1)
    draft = torch.stack([torch.multinomial(probs[i], 1, generator=gen)[0] for i in range(B * k)])
    argmax = probs.argmax(-1)
    draft[:8] = argmax[:8]  # the first two (greedy) requests: accepted on their first 4 and 4 positions
    cu = torch.arange(1, B + 1) * k
    bonus = torch.arange(B)[:, None] + 10
    temp = torch.tensor([-1.0, 0.0, 1.0, -1.0, 1.0, 1.0])
    args = [t.to(device) for t in (draft, cu)]
    meta = SimpleNamespace(all_greedy=False, all_random=False, generators={}, temperature=temp.to(device))
    got = rejection_sample(args[0], [k] * B, k, args[1], probs.to(device), probs.to(device), bonus.to(device),
                           meta).cpu()
    greedy_meta = SimpleNamespace(all_greedy=True, all_random=False, generators={}, temperature=None)
    want = rejection_sample(args[0], [k] * B, k, args[1], None, probs.to(device), bonus.to(device),
                            greedy_meta).cpu()
    for b in (0, 1, 3):
        assert torch.equal(got[b], want[b])
    for b in (2, 4, 5):  # p == q: u q < p never fails, all drafts and the bonus
        assert got[b].tolist() == draft[b * k:(b + 1) * k].tolist() + [int(bonus[b])]
    assert got[0].tolist() == draft[:4].tolist() + [10]


def test_ragged_layout_edges(device):
    """Requests without drafts (n_b = 0, even num_tokens = 0) emit their bonus; a short request is -1 padded."""
    V = 7
    draft = torch.tensor([], dtype=torch.int64, device=device)
    meta = SimpleNamespace(all_greedy=False, all_random=True, generators={}, temperature=torch.ones(2, device=device))
    out = rejection_sample(draft, [0, 0], 2, torch.zeros(2, dtype=torch.int64, device=device), None,
                           torch.zeros(0, V, device=device), torch.tensor([[3], [4]], device=device), meta)
    assert out.tolist() == [[3, -1, -1], [4, -1, -1]]
    lg = torch.full((2, V), -50.0, device=device)
    lg[0, 5] = lg[1, 6] = 50.0
    out = rejection_sample_from_logits(draft, torch.zeros(2, dtype=torch.int64, device=device), 2, lg,
                                       temperature=torch.tensor([0.0, 1.0], device=device))
    assert out.tolist() == [[5, -1, -1], [6, -1, -1]]


def _masked_case(gen, B, k, V):
    dp = torch.softmax(torch.rand(B * k, V, generator=gen), -1)
    draft = torch.multinomial(dp, 1, generator=gen)[:, 0]
    return dp, draft, torch.arange(1, B + 1) * k


@pytest.mark.parametrize("top_k", [1, 5, 99])
def test_top_k_masks(device, top_k):
    """vLLM's test_top_k: the top-k tokens get +0.1 over a flat row; no token outside them is ever emitted."""
    gen = torch.Generator().manual_seed(top_k)
    B, k, V = 100, 3, 100
    T = B * k
    idx = torch.stack([torch.randperm(V, generator=gen)[:top_k] for _ in range(T)])
    lg = torch.zeros(T, V).scatter_(1, idx, 0.1)
    dp, draft, cu = _masked_case(gen, B, k, V)
    full = torch.cat([lg.view(B, k, V), torch.zeros(B, 1, V)], 1).reshape(-1, V)  # bonus rows, not checked
    out = rejection_sample_from_logits(draft.to(device), cu.to(device), k, full.to(device),
                                       draft_probs=dp.to(device), top_k=torch.full((B,), top_k, device=device),
                                       seed=torch.arange(B, device=device))
    toks = out[:, :-1].reshape(-1).cpu()
    for i in range(T):
        if toks[i] != P:
            assert int(toks[i]) in idx[i].tolist()


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.99])
def test_top_p_masks(device, top_p):
    """vLLM's test_top_p: the kept set is the smallest top mass >= top_p; nothing outside it is emitted."""
    gen = torch.Generator().manual_seed(int(top_p * 100))
    B, k, V = 100, 3, 100
    T = B * k
    lg = torch.randn(T, V, generator=gen)
    srt, order = lg.sort(-1)
    mask = srt.softmax(-1).cumsum(-1) <= 1 - top_p
    mask[:, -1] = False
    keep = [set(order[i][~mask[i]].tolist()) for i in range(T)]
    dp, draft, cu = _masked_case(gen, B, k, V)
    full = torch.cat([lg.view(B, k, V), torch.zeros(B, 1, V)], 1).reshape(-1, V)
    out = rejection_sample_from_logits(draft.to(device), cu.to(device), k, full.to(device),
                                       draft_probs=dp.to(device), top_p=torch.full((B,), top_p, device=device),
                                       seed=torch.arange(B, device=device))
    toks = out[:, :-1].reshape(-1).cpu()
    for i in range(T):
        if toks[i] != P:
            assert int(toks[i]) in keep[i]


def test_rejection_sampling_approximates_target_distribution(device):
    """vLLM's distribution test, as chi-squared: drafts from q, target p; the first output token follows p
    (12 V requests). Planted bug: telling the sampler a wrong q (uniform) biases it and must fail."""
    gen = torch.Generator().manual_seed(10)
    V, k = 64, 2
    q = torch.softmax(torch.rand(V, generator=gen) * 4, -1)
    p = torch.softmax(torch.rand(V, generator=gen) * 4, -1)
    B = 12 * V
    draft = torch.multinomial(q, B * k, replacement=True, generator=gen)
    cu = torch.arange(1, B + 1) * k
    meta = SimpleNamespace(all_greedy=False, all_random=True, generators={}, temperature=torch.ones(B, device=device))
    tp = p[None].expand(B * k, V).contiguous().to(device)
    bonus = torch.zeros(B, 1, dtype=torch.int64, device=device)
    torch.manual_seed(0)
    out = rejection_sample(draft.to(device), [k] * B, k, cu.to(device), q[None].expand(B * k, V).to(device), tp,
                           bonus, meta)
    p64 = p.double() / p.double().sum()
    _assert_follows(out[:, 0].cpu(), p64, "first output token")
    wrong = torch.full((B * k, V), 1.0 / V, device=device)
    bad = rejection_sample(draft.to(device), [k] * B, k, cu.to(device), wrong, tp, bonus, meta)
    stat, thr, off = _chi2(bad[:, 0].cpu(), p64)
    assert stat >= thr or off > 0, f"the planted bug passed ({stat:.1f} < {thr:.1f})"


def test_bad_inputs_raise_value_errors(device):
    draft, n, cu = _layout([[1, 2], [3]], device)
    tp = torch.softmax(torch.randn(3, 10, device=device), -1)
    bonus = torch.zeros(2, 1, dtype=torch.int64, device=device)
    meta = SimpleNamespace(all_greedy=False, all_random=True, generators={}, temperature=torch.ones(2, device=device))

    def bad(match, fn, *args, **kw):
        with pytest.raises(ValueError, match=match):
            fn(*args, **kw)

    bad("draft_token_ids", rejection_sample, draft.float(), n, 2, cu, None, tp, bonus, meta)
    bad("cu_num_draft_tokens", rejection_sample, draft, n, 2, cu.float(), None, tp, bonus, meta)
    bad("max_spec_len", rejection_sample, draft, n, -1, cu, None, tp, bonus, meta)
    bad("num_draft_tokens", rejection_sample, draft, [2], 2, cu, None, tp, bonus, meta)
    bad("target_probs", rejection_sample, draft, n, 2, cu, None, tp[:2], bonus, meta)
    bad("draft_probs", rejection_sample, draft, n, 2, cu, tp[:, :5], tp, bonus, meta)
    bad("bonus_token_ids", rejection_sample, draft, n, 2, cu, None, tp, bonus[:1], meta)
    bad("temperature", rejection_sample, draft, n, 2, cu, None, tp, bonus,
        SimpleNamespace(all_greedy=False, all_random=True, generators={}, temperature=None))
    bad("target_logits", rejection_sample_from_logits, draft, cu, 2, tp)
    bad("top_k", rejection_sample_from_logits, draft, cu, 2, torch.zeros(5, 10, device=device), top_k=-1)
