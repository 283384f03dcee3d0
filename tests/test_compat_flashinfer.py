"""kangaroo_kernels.compat.flashinfer.chain_speculative_sampling: FlashInfer's own cases (the docstring example,
tests/utils/test_sampling.py::test_chain_speculative_sampling's structural checks), its counters against a
line-by-line Python emulation of FlashInfer's kernel loop on the same uniforms, the batch-seed contract, and
chi-squared checks of the emitted tokens with a planted-bug control."""

import math

import pytest
import torch
from test_verify_sample import _assert_follows, _assert_rate, _chi2

from kangaroo_kernels.compat._common import per_row_seeds, philox_uniforms
from kangaroo_kernels.compat.flashinfer import chain_speculative_sampling
from kangaroo_kernels.reference.verify_sample import philox_uniforms as philox_uniforms_ref
from kangaroo_kernels.reference.verify_sample import verify_sample_ref


def test_device_philox_matches_reference_bits(device):
    seed = torch.tensor([0, 5, -7, 2 ** 62, -2 ** 63, 2 ** 63 - 1], dtype=torch.int64)
    off = torch.tensor([0, 123, 2 ** 40, -1, 2 ** 63 - 5, 7], dtype=torch.int64)
    got = philox_uniforms(seed.to(device), off.to(device), 9).cpu()
    assert torch.equal(got, philox_uniforms_ref(seed, off, 9))


def test_docstring_example(device):
    """FlashInfer's docstring example: draft 2 accepted (p/q = 2), draft 1 rejected (p = 0), residual is
    one-hot at token 0."""
    dp = torch.tensor([[[0.1, 0.2, 0.3, 0.4], [0.2, 0.3, 0.4, 0.1]]], device=device)
    di = torch.tensor([[2, 1]], dtype=torch.int32, device=device)
    tp = torch.tensor([[[0.0, 0.1, 0.6, 0.3], [1.0, 0.0, 0.0, 0.0], [0.7, 0.1, 0.1, 0.1]]], device=device)
    for seed in range(5):
        out, acc, em = chain_speculative_sampling(dp, di, tp, seed=seed, offset=0)
        assert out.tolist() == [[2, 0, -1]] and acc.tolist() == [1] and em.tolist() == [1]


def test_onehot_mismatch_rejects_everything(device):
    """Draft one-hot at 3, target one-hot at 0: nothing is accepted, even when re-tested; token 0 is emitted."""
    di = torch.tensor([[3, 3, 3, 3]], dtype=torch.int32, device=device)
    dp = torch.nn.functional.one_hot(di.long(), 4).float()
    tp = torch.zeros(1, 5, 4, device=device)
    tp[..., 0] = 1
    out, acc, em = chain_speculative_sampling(dp, di, tp)
    assert out.tolist() == [[0, -1, -1, -1, -1]] and acc.tolist() == [0] and em.tolist() == [0]


@pytest.mark.parametrize("batch_size", [1, 99])
@pytest.mark.parametrize("vocab_size", [111, 2000])
@pytest.mark.parametrize("num_speculate_tokens", [1, 3, 5, 7])
@pytest.mark.parametrize("onehot_target", [False, True])
def test_flashinfer_structural_checks(device, batch_size, vocab_size, num_speculate_tokens, onehot_target):
    """FlashInfer's test_chain_speculative_sampling: one-hot targets equal to the drafts emit exactly the target
    tokens; random targets give a -1 tail after the first mismatch; emitted + 1 tokens are not -1. Counters
    given as arguments accumulate in place over the trials."""
    gen = torch.Generator().manual_seed(batch_size * 1000 + vocab_size + 10 * num_speculate_tokens)
    B, N, V = batch_size, num_speculate_tokens, vocab_size
    dp = torch.rand(B, N, V, generator=gen)
    dp = dp / dp.sum(-1, keepdim=True)
    di = torch.randint(V, (B, N), generator=gen)
    if onehot_target:
        tt = torch.randint(V, (B, N + 1), generator=gen)
        tt[:, :N] = di
        tp = torch.zeros(B, N + 1, V).scatter_(2, tt.unsqueeze(-1), 1.0)
    else:
        tp = torch.rand(B, N + 1, V, generator=gen)
        tp = tp / tp.sum(-1, keepdim=True)
    dp, di, tp = dp.to(device), di.to(device), tp.to(device)
    acc_total = torch.zeros(B, dtype=torch.int32, device=device)
    em_total = torch.zeros(B, dtype=torch.int32, device=device)
    for trial in range(4):
        acc = torch.zeros(B, dtype=torch.int32, device=device)
        em = torch.zeros(B, dtype=torch.int32, device=device)
        out, acc_r, em_r = chain_speculative_sampling(dp, di, tp, acc, em, seed=trial, offset=0)
        assert acc_r is acc and em_r is em
        out = out.cpu()
        if onehot_target:
            assert torch.equal(out.long(), tt)
        else:
            assert bool((out[out >= 0] < V).all()) and out.shape == (B, N + 1)
            mism = out[:, :-1].long() != di.cpu()
            for row in range(B):
                idx = torch.nonzero(mism[row])[:, 0]
                if idx.numel():
                    assert bool((idx[1:] == idx[:-1] + 1).all())
                    assert bool((out[row, idx[0] + 1:] == -1).all())
        assert torch.equal(em.cpu() + 1, (out != -1).sum(1).to(torch.int32))
        assert bool((acc >= em).all())
        before = acc_total.clone(), em_total.clone()
        chain_speculative_sampling(dp, di, tp, acc_total, em_total, seed=trial, offset=0)
        assert torch.equal(acc_total, before[0] + acc) and torch.equal(em_total, before[1] + em)


def _flashinfer_loop(dp, di, tp, s):
    """FlashInfer's ChainSpeculativeSampling control flow in Python (fp64, normalised target) on the stream
    s [B, N+2]; the final token drawn like verify_sample (smallest i with cumsum > u * total). Returns
    (tokens, accepted, emitted)."""
    B, N, V = dp.shape
    out = torch.full((B, N + 1), -1, dtype=torch.int32)
    acc = torch.zeros(B, dtype=torch.int32)
    em = torch.zeros(B, dtype=torch.int32)
    for b in range(B):
        k, pos = 0, N
        for i in range(N):
            x = int(di[b, i])
            p = float(tp[b, i, x]) / float(tp[b, i].double().sum())
            u = float(s[b, k])
            k += 1
            if u * float(dp[b, i, x]) < p:
                out[b, i] = x
            else:
                pos = i
                break
        a = pos
        for i in range(pos, N):
            x = int(di[b, i])
            p = float(tp[b, i, x]) / float(tp[b, i].double().sum())
            if float(s[b, k]) * float(dp[b, i, x]) < p:
                a += 1
            k += 1
        acc[b], em[b] = a, pos
        r = tp[b, pos].double() / tp[b, pos].double().sum()
        if pos < N:
            r = (r - dp[b, pos].double()).clamp_min(0)
        cs = torch.cumsum(r, 0)
        hit = torch.nonzero((r > 0) & (cs > float(s[b, k]) * float(r.sum())))
        out[b, pos] = int(hit[0, 0]) if hit.numel() else int(torch.nonzero(r > 0)[-1, 0])
    return out, acc, em


def test_counters_and_stream_match_flashinfer_loop(device):
    """Tokens and both counters equal the emulated FlashInfer loop on the documented per-row stream (seed +
    b * 0x9E3779B9, counters offset + j), including the re-test of positions after a rejection."""
    gen = torch.Generator().manual_seed(5)
    B, N, V = 40, 5, 60
    logits = torch.randn(B, N + 1, V, generator=gen)
    tp = torch.softmax(logits, -1)
    dp = torch.softmax(logits[:, :N] + 0.8 * torch.randn(B, N, V, generator=gen), -1)
    di = torch.stack([torch.multinomial(dp[b], 1, generator=gen)[:, 0] for b in range(B)])
    seed, offset = 1234567, 99
    out, acc, em = chain_speculative_sampling(*(t.to(device) for t in (dp, di, tp)), seed=seed, offset=offset)
    s = philox_uniforms_ref(per_row_seeds(torch.tensor([seed]), B), torch.full((B,), offset), N + 2)
    w_out, w_acc, w_em = _flashinfer_loop(dp, di, tp, s)
    assert torch.equal(out.cpu(), w_out) and torch.equal(em.cpu(), w_em) and torch.equal(acc.cpu(), w_acc)
    assert int((acc > em).sum()) > 0 and int((em < N).sum()) > 0  # the re-test path is exercised
    # the tokens are verify_sample's on the same uniforms
    all_pass = em.cpu() == N
    u = torch.cat([s[:, :N], torch.where(all_pass, s[:, N], s[:, N + 1])[:, None]], 1)
    ref = verify_sample_ref(di, tp, draft_probs=dp, uniforms=u, target_is_probs=True)
    assert torch.equal(ref.tokens, out.cpu())


def test_seed_contract(device):
    """One batch seed: rows draw their own streams (identical rows differ), row b equals a one-row call keyed
    seed + b * 0x9E3779B9; the same seed/offset repeats, another offset differs; a [B] seed tensor keys row b by
    seed[b]; a generator reproduces."""
    B, N, V = 64, 2, 16
    tp = torch.full((B, N + 1, V), 1.0 / V, device=device)
    dp = tp[:, :N].clone()
    di = torch.zeros(B, N, dtype=torch.int64, device=device)
    a = chain_speculative_sampling(dp, di, tp, seed=7, offset=3)[0]
    assert torch.equal(a, chain_speculative_sampling(dp, di, tp, seed=7, offset=3)[0])
    assert not torch.equal(a, chain_speculative_sampling(dp, di, tp, seed=7, offset=4)[0])
    assert len(set(a[:, N].tolist())) >= 10  # identical rows, different streams: the tokens spread
    keys = per_row_seeds(torch.tensor([7]), B)
    for b in (0, 5, 63):
        one = chain_speculative_sampling(dp[:1], di[:1], tp[:1], seed=keys[b:b + 1].to(device),
                                         offset=torch.tensor([3], device=device))[0]
        assert torch.equal(one[0], a[b])
    st = keys.to(device)
    assert torch.equal(a, chain_speculative_sampling(dp, di, tp, seed=st, offset=torch.full((B,), 3, device=device))[0])
    g1 = torch.Generator(device=device).manual_seed(11)
    g2 = torch.Generator(device=device).manual_seed(11)
    assert torch.equal(chain_speculative_sampling(dp, di, tp, generator=g1)[0],
                       chain_speculative_sampling(dp, di, tp, generator=g2)[0])


def test_bad_inputs_raise_value_errors(device):
    B, N, V = 2, 3, 5
    dp = torch.full((B, N, V), 0.2, device=device)
    di = torch.zeros(B, N, dtype=torch.int32, device=device)
    tp = torch.full((B, N + 1, V), 0.2, device=device)

    def bad(match, *args, **kw):
        with pytest.raises(ValueError, match=match):
            chain_speculative_sampling(*args, **kw)

    bad("draft_token_ids", dp, di.float(), tp)
    bad("target_probs", dp, di, tp[:, :N])
    bad("draft_probs", dp[..., :V - 1], di, tp)
    bad("maybe_output_accepted_token_num", dp, di, tp, torch.zeros(B + 1, dtype=torch.int32, device=device))
    bad("maybe_output_emitted_draft_token_num", dp, di, tp, None, torch.zeros(B, device=device))
    bad("seed and offset", dp, di, tp, seed=1)
    bad("seed and offset", dp, di, tp, seed=1, offset=torch.zeros(1, dtype=torch.int64, device=device))
    bad("seed", dp, di, tp, seed=torch.zeros(B + 1, dtype=torch.int64, device=device),
        offset=torch.zeros(1, dtype=torch.int64, device=device))
    bad("offset", dp, di, tp, seed=1, offset=1.5)


def test_emitted_tokens_follow_target_and_counter_rates(device):
    """N = 1, drafts from q: the first token follows p (chi-squared, 12 V trials); P(emitted) = sum min(p, q);
    P(accepted) = sum min(p, q) + sum q (1 - a) a with a = min(1, p / q) (the re-test of a rejected draft
    with a fresh uniform). Planted bug: dropping the draft probabilities (q = 0 accepts every draft) must fail
    the same chi-squared check."""
    gen = torch.Generator().manual_seed(77)
    V = 400
    lg = torch.randn(V, generator=gen) * 1.5
    p = torch.softmax(lg.double(), -1)
    q = torch.softmax(lg.double() + 0.9 * torch.randn(V, generator=gen, dtype=torch.float64), -1)
    B = 12 * V
    di = torch.multinomial(q, B, replacement=True, generator=gen)[:, None]
    tp = torch.stack([p, torch.softmax(torch.randn(V, generator=gen, dtype=torch.float64), -1)]).float()
    qf = q.float()
    tp_, dp_ = tp.to(device)[None].expand(B, 2, V), qf.to(device)[None, None].expand(B, 1, V)
    out, acc, em = chain_speculative_sampling(dp_, di.to(device), tp_, seed=2024, offset=0)
    pe = tp[0].double() / tp[0].double().sum()
    qe = qf.double()
    _assert_follows(out[:, 0].cpu(), pe, "first emitted token")
    beta = float(torch.minimum(pe, qe).sum())
    a = torch.clamp(pe / qe, max=1.0)
    _assert_rate(em.cpu() == 1, beta, "emitted")
    _assert_rate(acc.cpu() == 1, beta + float((qe * (1 - a) * a).sum()), "accepted")
    broken = chain_speculative_sampling(torch.zeros_like(dp_), di.to(device), tp_, seed=2024, offset=0)[0]
    stat, thr, off = _chi2(broken[:, 0].cpu(), pe)
    assert stat >= thr or off > 0, f"the planted bug passed ({stat:.1f} < {thr:.1f})"
    assert math.isfinite(stat)


@pytest.mark.cuda
def test_cuda_graph_capture_with_tensor_seed_offset():
    """With seed/offset tensors the wrapper captures in a CUDA graph (no host sync); a replay after the caller
    moves offset equals an eager call at that offset."""
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(8)
    B, N, V = 8, 4, 300
    tp = torch.softmax(torch.randn(B, N + 1, V, generator=gen), -1).to(dev)
    dp = torch.softmax(torch.randn(B, N, V, generator=gen), -1).to(dev)
    di = torch.randint(0, V, (B, N), generator=gen).to(dev)
    seed = torch.tensor([5], device=dev)
    offset = torch.tensor([0], device=dev)
    acc = torch.zeros(B, dtype=torch.int32, device=dev)
    em = torch.zeros(B, dtype=torch.int32, device=dev)
    chain_speculative_sampling(dp, di, tp, acc, em, seed=seed, offset=offset)  # warm-up
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out, _, _ = chain_speculative_sampling(dp, di, tp, acc, em, seed=seed, offset=offset)
    for off in (0, N + 2, 3 * (N + 2)):
        offset.fill_(off)
        acc.zero_()
        em.zero_()
        g.replay()
        want, w_acc, w_em = chain_speculative_sampling(dp, di, tp, seed=5, offset=off)
        assert torch.equal(out, want) and torch.equal(acc, w_acc) and torch.equal(em, w_em)
