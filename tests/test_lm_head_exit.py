"""lm_head_exit / lm_head_topk: the Triton kernels (interpreter on CPU, compiled on GPU) and the ops vs the
reference on odd shapes (V = 7, 1000, 32001, 151936; D not a power of two; B = 1, 3); the GPU block configs and
multi-chunk / multi-level merges; Gumbel-max sampling bit-for-bit against the reference's Philox numbers, with a
chi-squared test (and planted-bug controls that must fail); top-k / top-p per row mixed with greedy rows (against
the reference, ties, and a per-row chi-squared test in one batch with planted-bug controls); ties, NaN rows,
strides, out= buffers, input checks; the reference against independent formulations."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

import kangaroo_kernels.triton.lm_head_exit as tl_mod
from kangaroo_kernels.ops.lm_head_exit import _lm_head_exit_triton, _lm_head_topk_triton, lm_head_exit, lm_head_topk
from kangaroo_kernels.reference.lm_head_exit import (
    lm_head_exit_ref,
    lm_head_logits_ref,
    lm_head_topk_ref,
    lm_head_uniforms_ref,
    philox4x32_10_torch,
)
from kangaroo_kernels.reference.verify_sample import philox4x32_10
from kangaroo_kernels.types import LmHeadExit, LmHeadTopk

# Logit tolerances (abs). Both sides multiply the same dtype-exact values in fp32; they differ in summation order
# (~sqrt(D) * 2^-24 * |logit terms|, < 1e-5 here) and, with the norm, in rstd (div_rn(1, sqrt) vs rsqrt, 1 fp32 ulp)
# which can flip the rounding of a normalised element by one ulp of the 16-bit dtype: one term |w * x| <~ 0.5 moves
# by 2^-11 (fp16) or 2^-8 (bf16) relative. conf and logprobs inherit about twice the logit error (max - lse).
LOGIT_TOL = {torch.float32: 2e-5, torch.float16: 5e-4, torch.bfloat16: 4e-3}


def _need_triton(device):
    if torch.device(device).type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (the cuda variant covers the kernels)")


@pytest.fixture
def tdev():
    """Where the Triton kernels run: the GPU when there is one, else CPU tensors in the interpreter."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _inputs(B, V, D, dtype, seed=0, scale=4.0, device="cpu"):
    """hidden [B, D], lm_head_weight [V, D], norm_weight [D] in dtype; logits have std ~scale (a peaked softmax)."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(B, D, generator=gen)
    w = torch.randn(V, D, generator=gen) * (scale / math.sqrt(D))
    nw = 1 + 0.1 * torch.randn(D, generator=gen)
    return h.to(dtype).to(device), w.to(dtype).to(device), nw.to(dtype).to(device)


def _assert_gaps(x, k, tol, what):
    """The inputs are tie-free where exactness is asserted: the k + 1 largest values of each row are > 2 tol apart."""
    top = torch.topk(x.double(), min(k + 1, x.shape[1]), dim=-1).values
    if top.shape[1] > 1:
        gap = float((top[:, :-1] - top[:, 1:]).min())
        assert gap > 2 * tol, f"{what}: near tie in the test inputs (gap {gap:.2e}); pick another seed"


def _exit_case(B, V, D, dtype, norm, active, seed, return_probs=False, temperature=None, device="cpu"):
    h, w, nw = _inputs(B, V, D, dtype, seed, device=device)
    nw = nw if norm else None
    act = torch.tensor(active, device=device) if active is not None else None
    tol = LOGIT_TOL[dtype] if norm else LOGIT_TOL[torch.float32]
    logits = lm_head_logits_ref(h.cpu(), w.cpu(), nw.cpu() if nw is not None else None)
    _assert_gaps(logits, 1, tol, "logits")
    conf = (1 / torch.exp(logits - logits.max(-1, keepdim=True).values).sum(-1)).sort().values
    # B = 1: the row continues; B = 3: the least confident row exits, the others continue
    thr = float(conf[0] / 2 if B == 1 else (conf[0] + conf[1]) / 2)
    assert float(((conf - thr).abs() / conf).min()) > 10 * tol, "threshold too close to a conf; pick another seed"
    return h, w, nw, act, thr, tol


def _check_exit(res, ref, tol, exact_tokens=True):
    assert res.token.dtype == torch.int32 and res.conf.dtype == torch.float32 and res.active.dtype == torch.bool
    if exact_tokens:
        assert torch.equal(res.token.cpu(), ref.token)
    assert torch.equal(res.active.cpu(), ref.active)
    torch.testing.assert_close(res.conf.cpu(), ref.conf, rtol=2 * tol, atol=1e-6)
    torch.testing.assert_close(res.token_prob.cpu(), ref.token_prob, rtol=2 * tol, atol=1e-6)
    if ref.probs is not None:
        torch.testing.assert_close(res.probs.cpu(), ref.probs, rtol=2 * tol, atol=1e-7)
    else:
        assert res.probs is None


# (B, V, D, dtype, norm, active, return_probs)
EXIT_CASES = [
    (1, 7, 200, torch.float32, True, None, True),
    (3, 1000, 200, torch.float16, True, [True, False, True], False),
    (3, 1000, 1000, torch.bfloat16, False, None, True),
    (1, 32001, 1000, torch.float32, True, [True], False),
    (3, 32001, 200, torch.float16, False, [False, True, True], False),
    (1, 151936, 64, torch.bfloat16, True, None, False),
]


@pytest.mark.parametrize("case", EXIT_CASES, ids=lambda c: f"B{c[0]}V{c[1]}D{c[2]}-{str(c[3])[6:]}"
                         f"{'-norm' if c[4] else ''}{'-act' if c[5] else ''}{'-probs' if c[6] else ''}")
def test_exit_triton_matches_reference(case, device):
    _need_triton(device)
    B, V, D, dtype, norm, active, probs = case
    h, w, nw, act, thr, tol = _exit_case(B, V, D, dtype, norm, active, seed=V + D, device=device)
    res = _lm_head_exit_triton(h, w, thr, norm_weight=nw, active=act, return_probs=probs)
    ref = lm_head_exit_ref(h.cpu(), w.cpu(), thr, norm_weight=nw.cpu() if nw is not None else None,
                           active=act.cpu() if act is not None else None, return_probs=probs)
    _check_exit(res, ref, tol)
    if active is not None:
        assert not bool(res.active[~act].any())  # inactive rows never continue; their token is still computed
    if B > 1:
        assert 0 < int(ref.active.sum()) < B or active is not None


def _gpu_blocks(B, V, D, device):
    """The GPU configurations of tl_mod._blocks, forced in the interpreter."""
    bb = min(triton_next_pow2(B), 8)
    return {1: (1, 64, 128, 4), 2: (2, 64, 64, 4), 4: (4, 32, 128, 8), 8: (8, 32, 64, 8)}[bb]


def triton_next_pow2(n):
    return 1 << (max(n, 1) - 1).bit_length()


@pytest.mark.parametrize("B", [1, 2, 3, 5])
def test_gpu_block_configs(B, tdev, monkeypatch):
    """The kernels with the GPU block sizes (64/32 vocabulary rows, D tiles of 64/128 with a tail) at V = 1000."""
    monkeypatch.setattr(tl_mod, "_blocks", _gpu_blocks)
    monkeypatch.setattr(tl_mod, "_merge_rows", lambda B, chunk, device: 1)
    V, D = 1000, 200
    h, w, nw = _inputs(B, V, D, torch.float16, seed=B)
    logits = lm_head_logits_ref(h, w, nw)
    _assert_gaps(logits, 8, LOGIT_TOL[torch.float16], "logits")
    res = _lm_head_exit_triton(h.to(tdev), w.to(tdev), 0.2, norm_weight=nw.to(tdev), return_probs=True)
    _check_exit(res, lm_head_exit_ref(h, w, 0.2, norm_weight=nw, return_probs=True), LOGIT_TOL[torch.float16])
    top = _lm_head_topk_triton(h.to(tdev), w.to(tdev), 8, norm_weight=nw.to(tdev))
    ref = lm_head_topk_ref(h, w, 8, norm_weight=nw)
    assert torch.equal(top.tokens.cpu(), ref.tokens)
    torch.testing.assert_close(top.logprobs.cpu(), ref.logprobs, rtol=0, atol=2 * LOGIT_TOL[torch.float16])


def test_many_blocks_merge(tdev, monkeypatch):
    """Tiny blocks and merge tiles: the exit merge loops over 3 chunks of block partials, the top-k merge runs 5
    levels (the GPU shapes: 2 chunks at V = 152064 / 64, 2 top-k levels)."""
    monkeypatch.setattr(tl_mod, "_blocks", lambda B, V, D, device: (2, 16, 16, 4))
    monkeypatch.setattr(tl_mod, "_MERGE_CHUNK", 16)
    monkeypatch.setattr(tl_mod, "_GROUP", 32)
    B, V, D = 2, 700, 24
    h, w, _ = _inputs(B, V, D, torch.float32, seed=7)
    logits = lm_head_logits_ref(h, w)
    _assert_gaps(logits, 16, LOGIT_TOL[torch.float32], "logits")
    seed, offset = torch.tensor([3, -4]), torch.tensor([0, 9])
    res = _lm_head_exit_triton(h.to(tdev), w.to(tdev), 0.05, temperature=0.9, seed=seed.to(tdev),
                               offset=offset.to(tdev, copy=True))
    ref = lm_head_exit_ref(h, w, 0.05, temperature=0.9, seed=seed, offset=offset.clone())
    _check_exit(res, ref, LOGIT_TOL[torch.float32])
    top = _lm_head_topk_triton(h.to(tdev), w.to(tdev), 16)
    ref = lm_head_topk_ref(h, w, 16)
    assert torch.equal(top.tokens.cpu(), ref.tokens)
    torch.testing.assert_close(top.logprobs.cpu(), ref.logprobs, rtol=0, atol=2 * LOGIT_TOL[torch.float32])


# (B, V, D, dtype, norm, k)
TOPK_CASES = [
    (1, 7, 200, torch.float32, True, 7),
    (3, 1000, 200, torch.bfloat16, True, 16),
    (1, 32001, 1000, torch.float16, False, 5),
    (3, 151936, 32, torch.float32, False, 16),  # 2 merge levels in the interpreter (75 blocks x 16 candidates)
]


@pytest.mark.parametrize("case", TOPK_CASES, ids=lambda c: f"B{c[0]}V{c[1]}D{c[2]}-{str(c[3])[6:]}"
                         f"{'-norm' if c[4] else ''}-k{c[5]}")
def test_topk_triton_matches_reference(case, device):
    _need_triton(device)
    B, V, D, dtype, norm, k = case
    h, w, nw = _inputs(B, V, D, dtype, seed=V + k, device=device)
    nw = nw if norm else None
    tol = LOGIT_TOL[dtype] if norm else LOGIT_TOL[torch.float32]
    logits = lm_head_logits_ref(h.cpu(), w.cpu(), nw.cpu() if nw is not None else None)
    _assert_gaps(logits, k, tol, "logits")
    res = _lm_head_topk_triton(h, w, k, norm_weight=nw)
    ref = lm_head_topk_ref(h.cpu(), w.cpu(), k, norm_weight=nw.cpu() if nw is not None else None)
    assert res.tokens.dtype == torch.int32 and res.logprobs.dtype == torch.float32
    assert torch.equal(res.tokens.cpu(), ref.tokens)
    torch.testing.assert_close(res.logprobs.cpu(), ref.logprobs, rtol=0, atol=2 * tol)
    assert bool((res.logprobs[:, :-1] >= res.logprobs[:, 1:]).all())


# ----------------------------------------------------------------------------------------------------------------
# sampling


def _score_margin(logits, seed, offset, temperature):
    """Per row: the gap between the two best Gumbel scores of the reference's draw."""
    z = logits * torch.tensor(1.0 / temperature, dtype=torch.float32)
    s = z - torch.log(-torch.log(lm_head_uniforms_ref(seed, offset, logits.shape[1])))
    top = torch.topk(s.double(), 2, dim=-1).values
    return top[:, 0] - top[:, 1]


@pytest.mark.parametrize("B, V, D, dtype, T", [(3, 1000, 200, torch.float32, 0.7),
                                                (1, 32001, 200, torch.float16, 1.5)])
def test_sampling_matches_reference_bit_for_bit(B, V, D, dtype, T, device):
    """Same Philox numbers: the sampled tokens equal the reference's (scores clear of ties); the offset advances,
    so a second call draws other tokens."""
    _need_triton(device)
    h, w, nw = _inputs(B, V, D, dtype, seed=11, scale=2.0, device=device)
    seed = torch.tensor([5, -7, 2 ** 62][:B], dtype=torch.int64, device=device)
    offset = torch.tensor([2 ** 32 - 1, 0, 2 ** 40][:B], dtype=torch.int64, device=device)
    logits = lm_head_logits_ref(h.cpu(), w.cpu(), nw.cpu())
    tol = LOGIT_TOL[dtype]
    tokens = []
    for _ in range(2):
        start = offset.cpu().clone()
        assert float(_score_margin(logits, seed.cpu(), start, T).min()) > 4 * tol / T
        res = _lm_head_exit_triton(h, w, 0.01, norm_weight=nw, temperature=T, seed=seed, offset=offset,
                                   return_probs=True)
        ref_off = start.clone()
        ref = lm_head_exit_ref(h.cpu(), w.cpu(), 0.01, norm_weight=nw.cpu(), temperature=T, seed=seed.cpu(),
                               offset=ref_off, return_probs=True)
        _check_exit(res, ref, tol / T)
        assert torch.equal(offset.cpu(), start + 1) and torch.equal(ref_off, start + 1)
        torch.testing.assert_close(res.probs.sum(-1).cpu(), torch.ones(B), rtol=1e-5, atol=1e-5)
        tokens.append(res.token.cpu())
    assert not torch.equal(tokens[0], tokens[1])


def _chi2_stat(samples, probs):
    """Pearson chi-squared of samples against probs [V] (fp64), bins merged in increasing expectation until each
    expects >= 5. Returns (statistic, df)."""
    n = samples.numel()
    counts = torch.bincount(samples.long(), minlength=probs.numel()).double()
    exp_ = probs * n
    order = torch.argsort(exp_)
    bins_e, bins_c, ge, gc = [], [], 0.0, 0.0
    for e, c in zip(exp_[order].tolist(), counts[order].tolist()):
        ge, gc = ge + e, gc + c
        if ge >= 5:
            bins_e.append(ge)
            bins_c.append(gc)
            ge, gc = 0.0, 0.0
    bins_e[-1] += ge
    bins_c[-1] += gc
    be, bc = torch.tensor(bins_e), torch.tensor(bins_c)
    return float(((bc - be) ** 2 / be).sum()), len(bins_e) - 1


def _chi2_threshold(df, z=4.75):
    """Wilson-Hilferty upper quantile of chi2(df) at one-sided z (4.75: p ~ 1e-6)."""
    a = 2.0 / (9 * df)
    return df * (1 - a + z * math.sqrt(a)) ** 3


def test_sampled_tokens_follow_softmax_chi_squared(tdev):
    """4096 rows share one hidden state and draw with seeds 0..4095 in one launch: the tokens follow
    softmax(logits / T) (chi-squared, p ~ 1e-6 threshold). Controls with the same uniforms: Gumbel noise
    with the wrong sign (a min-Gumbel) and the temperature ignored must both fail."""
    n, V, D, T = 4096, 24, 16, 0.6
    h, w, _ = _inputs(1, V, D, torch.float32, seed=3, scale=1.5)
    h = h.expand(n, D)
    seed = torch.arange(n, dtype=torch.int64)
    offset = torch.full((n,), 17, dtype=torch.int64)
    res = _lm_head_exit_triton(h.to(tdev), w.to(tdev), 0.0, temperature=T, seed=seed.to(tdev),
                               offset=offset.to(tdev, copy=True))
    res = LmHeadExit(*(t.cpu() for t in res[:4]))
    logits = lm_head_logits_ref(h[:1], w)[0]
    p = torch.softmax(logits.double() / T, dim=-1)
    stat, df = _chi2_stat(res.token, p)
    assert stat < _chi2_threshold(df), f"chi2 {stat:.1f} >= {_chi2_threshold(df):.1f} (df {df})"
    # token_prob is the sampled token's probability
    torch.testing.assert_close(res.token_prob.double(), p[res.token.long()], rtol=1e-5, atol=1e-7)

    u = lm_head_uniforms_ref(seed, offset, V)
    z = logits[None, :] / T
    planted = {"gumbel sign flipped": (z + torch.log(-torch.log(u))).argmax(-1),
               "temperature ignored": (logits[None, :] - torch.log(-torch.log(u))).argmax(-1)}
    assert torch.equal((z - torch.log(-torch.log(u))).argmax(-1), res.token.long())  # the same draw, done right
    for what, tokens in planted.items():
        stat, df = _chi2_stat(tokens, p)
        assert stat >= _chi2_threshold(df), f"planted bug '{what}' passed the chi-squared test ({stat:.1f})"


def test_philox_matches_random123():
    kat = [((0, 0, 0, 0), (0, 0)), ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2),
           ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0))]
    for ctr, key in kat:
        got = tuple(int(x) for x in philox4x32_10_torch(*ctr, *key))
        assert got == philox4x32_10(ctr, key)
    seed = torch.tensor([0, -1, 2 ** 40 + 7])
    offset = torch.tensor([0, 2 ** 32 - 1, -3])
    u = lm_head_uniforms_ref(seed, offset, 5)
    assert u.dtype == torch.float32 and bool(((u > 0) & (u < 1)).all())
    for b in range(3):
        s, o = int(seed[b]) % 2 ** 64, int(offset[b]) % 2 ** 64
        for v in range(5):
            x = philox4x32_10((o & 0xFFFFFFFF, o >> 32, v, 0x4C4D4845), (s & 0xFFFFFFFF, s >> 32))[0]
            assert float(u[b, v]) == ((x >> 9) + 0.5) * 2.0 ** -23


# ----------------------------------------------------------------------------------------------------------------
# edge cases


@pytest.mark.parametrize("fn", [lm_head_exit, _lm_head_exit_triton], ids=["op", "triton"])
def test_ties_take_the_lowest_index(fn, tdev, monkeypatch):
    """Duplicated weight rows give bit-identical logits: the lowest index wins, also across blocks; topk keeps
    increasing index order among equals."""
    monkeypatch.setattr(tl_mod, "_blocks", lambda B, V, D, device: (1, 16, 16, 4))
    B, V, D = 2, 100, 40
    h, w, _ = _inputs(B, V, D, torch.float32, seed=5)
    w[[3, 57, 90]] = 10 * h[0] / h[0].norm()  # row 0's best logit, 10 |h0|, three times
    w[[20, 21]] = 10 * h[1] / h[1].norm()
    h, w = h.to(tdev), w.to(tdev)
    res = fn(h, w, 0.5)
    assert res.token.tolist() == [3, 20]
    topk = (lm_head_topk if fn is lm_head_exit else _lm_head_topk_triton)(h, w, 4)
    assert topk.tokens[0, :3].tolist() == [3, 57, 90] and topk.tokens[1, :2].tolist() == [20, 21]
    assert float(topk.logprobs[0, 0]) == float(topk.logprobs[0, 2])


@pytest.mark.parametrize("fn", [lm_head_exit, _lm_head_exit_triton], ids=["op", "triton"])
def test_nan_row_exits(fn, tdev):
    B, V, D = 3, 300, 40
    h, w, nw = _inputs(B, V, D, torch.float32, seed=2)
    h[1, 7] = float("nan")
    res = LmHeadExit(*(t.cpu() for t in fn(h.to(tdev), w.to(tdev), 0.0, norm_weight=nw.to(tdev))[:4]))
    ref = lm_head_exit_ref(h, w, 0.0, norm_weight=nw)
    assert math.isnan(float(res.conf[1])) and not bool(res.active[1])
    assert 0 <= int(res.token[1]) < V
    assert res.token[[0, 2]].tolist() == ref.token[[0, 2]].tolist() and res.active[[0, 2]].all()


def test_strided_inputs_and_out_reuse(tdev):
    """hidden a column slice of a wider buffer, lm_head_weight a transposed [D, V] matrix (unit stride over V);
    out= buffers (NaN-filled) reused across calls, out.active aliasing active (an in-place exit update)."""
    B, V, D = 3, 500, 72
    gen = torch.Generator().manual_seed(9)
    big = torch.randn(B, 2 * D, generator=gen).to(tdev)
    h = big[:, 1::2]
    w_t = (torch.randn(D, V, generator=gen) * 0.5).to(torch.float16).to(tdev)
    w = w_t.T
    assert h.stride() == (2 * D, 2) and w.stride() == (1, V)
    active = torch.tensor([True, True, False], device=tdev)
    out = LmHeadExit(torch.full((B,), -5, dtype=torch.int32, device=tdev), torch.full((B,), float("nan"), device=tdev),
                     active, torch.full((B,), float("nan"), device=tdev),
                     torch.full((B, V), float("nan"), device=tdev))
    h_cpu, w_cpu = h.cpu(), w.cpu()
    logits = lm_head_logits_ref(h_cpu, w_cpu)
    for step in range(2):
        assert float(_score_margin(logits, torch.tensor([1, 2, 3]), torch.full((B,), step), 0.5).min()) > 1e-3
        want = lm_head_exit_ref(h_cpu, w_cpu, 0.05, active=active.cpu(), temperature=0.5,
                                seed=torch.tensor([1, 2, 3]), offset=torch.full((B,), step), return_probs=True)
        offset = torch.full((B,), step, device=tdev)
        res = _lm_head_exit_triton(h, w, 0.05, active=active, temperature=0.5,
                                   seed=torch.tensor([1, 2, 3], device=tdev), offset=offset, return_probs=True, out=out)
        assert all(a is b for a, b in zip(res, out)) and res.active is active
        _check_exit(res, want, LOGIT_TOL[torch.float32])
    top_out = LmHeadTopk(torch.full((B, 3), -5, dtype=torch.int32, device=tdev),
                         torch.full((B, 3), float("nan"), device=tdev))
    res = _lm_head_topk_triton(h, w, 3, out=top_out)
    assert res.tokens is top_out.tokens
    assert torch.equal(res.tokens.cpu(), lm_head_topk_ref(h_cpu, w_cpu, 3).tokens)


def test_public_ops_on_cpu_run_the_reference():
    """The ops' CPU impls (through torch.ops) against the reference, with out= and the offset advance."""
    B, V, D = 3, 200, 48
    h, w, nw = _inputs(B, V, D, torch.bfloat16, seed=4)
    act = torch.tensor([True, False, True])
    res = lm_head_exit(h, w, 0.3, norm_weight=nw, active=act)
    ref = lm_head_exit_ref(h, w, 0.3, norm_weight=nw, active=act)
    assert isinstance(res, LmHeadExit) and res.probs is None
    for a, b in zip(res[:4], ref[:4]):
        assert torch.equal(a, b)
    token, conf, act_out = res[:3]
    assert token.shape == (B,) and act_out.dtype == torch.bool
    seed, offset = torch.tensor([1, 2, 3]), torch.tensor([0, 5, 9])
    res = lm_head_exit(h, w, 0.3, temperature=2.0, seed=seed, offset=offset, return_probs=True)
    ref = lm_head_exit_ref(h, w, 0.3, temperature=2.0, seed=seed, offset=torch.tensor([0, 5, 9]), return_probs=True)
    assert offset.tolist() == [1, 6, 10]
    for a, b in zip(res, ref):
        assert torch.equal(a, b)
    top = lm_head_topk(h, w, 16, norm_weight=nw)
    want = lm_head_topk_ref(h, w, 16, norm_weight=nw)
    assert isinstance(top, LmHeadTopk) and torch.equal(top.tokens, want.tokens)
    assert torch.equal(top.logprobs, want.logprobs)
    # seed drawn from torch's default generator when not given: reproducible under manual_seed
    torch.manual_seed(0)
    t1 = lm_head_exit(h, w, 0.3, temperature=1.0).token
    torch.manual_seed(0)
    assert torch.equal(lm_head_exit(h, w, 0.3, temperature=1.0).token, t1)
    # empty batch
    empty = lm_head_exit(h[:0], w, 0.3)
    assert empty.token.shape == (0,) and lm_head_topk(h[:0], w, 2).tokens.shape == (0, 2)


@pytest.mark.parametrize("k", [1, 2, 5, 16])
def test_topk_cpu_kernel_ties_nan_and_bit_equality(k):
    """lm_head_topk's CPU kernel (a one-pass top-k over the reference's own logits) against the reference's full
    stable sort, exactly: duplicated weight rows give exactly equal logits (lower index first), a NaN row ranks its
    NaNs first by index (as torch.sort), fp32 and bf16, ragged B."""
    B, V, D = 4, 300, 32
    h, w, nw = _inputs(B, V, D, torch.float32, seed=11)
    w[7], w[250], w[251] = w[3], w[3], w[3]  # four exactly equal logits per row
    w[100] = w[120]
    h[2] = float("nan")
    for dt in (torch.float32, torch.bfloat16):
        hh, ww, nn = h.to(dt), w.to(dt), nw.to(dt)
        got = lm_head_topk(hh, ww, k, norm_weight=nn)
        want = lm_head_topk_ref(hh, ww, k, norm_weight=nn)
        assert torch.equal(got.tokens, want.tokens), (dt, got.tokens, want.tokens)
        torch.testing.assert_close(got.logprobs, want.logprobs, rtol=0, atol=0, equal_nan=True)
    row = lm_head_logits_ref(h[:1], w)[0]
    tied = lm_head_topk(h[:1], w, 16)
    order = tied.tokens[0].tolist()
    for a, b in zip(order, order[1:]):  # descending, ties by index: a stronger check than agreeing with the sort
        assert row[a] > row[b] or (row[a] == row[b] and a < b)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        h, w = torch.empty(2, 64), torch.empty(1000, 64)
        res = lm_head_exit(h, w, 0.5, temperature=0.7, seed=torch.zeros(2, dtype=torch.int64), return_probs=True)
        assert res.token.shape == (2,) and res.probs.shape == (2, 1000)
        res = lm_head_exit(h, w, 0.5, temperature=torch.empty(2), top_k=torch.zeros(2, dtype=torch.int64),
                           top_p=torch.empty(2), seed=torch.zeros(2, dtype=torch.int64), return_probs=True,
                           validate=False)
        assert res.token_prob.shape == (2,) and res.probs.shape == (2, 1000)
        assert lm_head_topk(h, w, 4).logprobs.shape == (2, 4)


def test_reference_against_independent_formulation():
    """conf = max softmax, token_prob = softmax(z)[token], topk = torch.topk of log_softmax; HF-style RMSNorm."""
    B, V, D = 3, 300, 64
    h, w, nw = _inputs(B, V, D, torch.float16, seed=8)
    hf = h.float()
    x = nw * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.float16)
    logits = x.float() @ w.float().T
    ref = lm_head_exit_ref(h, w, 0.1, norm_weight=nw)
    torch.testing.assert_close(ref.conf, torch.softmax(logits, -1).max(-1).values, rtol=1e-5, atol=0)
    assert torch.equal(ref.token.long(), logits.argmax(-1)) and torch.equal(ref.active, ref.conf >= 0.1)
    lp = F.log_softmax(logits, -1)
    top = lm_head_topk_ref(h, w, 5, norm_weight=nw)
    torch.testing.assert_close(top.logprobs, torch.topk(lp, 5).values, rtol=0, atol=1e-5)
    assert torch.equal(top.tokens.long(), torch.topk(lp, 5).indices)


def _bad_exit_inputs():
    B, V, D = 2, 50, 16
    h, w, nw = _inputs(B, V, D, torch.float32)
    seed = torch.zeros(B, dtype=torch.int64)
    return [
        ("hidden", dict(hidden=h[0])),
        ("hidden", dict(hidden=h.double())),
        ("hidden", dict(hidden=h[:, :0], lm_head_weight=w[:, :0])),
        ("lm_head_weight", dict(lm_head_weight=w[:, :8])),
        ("lm_head_weight", dict(lm_head_weight=w.int())),
        ("lm_head_weight", dict(lm_head_weight=w[:0])),
        ("norm_weight", dict(norm_weight=nw.half())),
        ("norm_weight", dict(norm_weight=nw[:8])),
        ("eps", dict(eps=-1.0)),
        ("threshold", dict(threshold=float("nan"))),
        ("threshold", dict(threshold=torch.tensor(0.5))),
        ("temperature", dict(temperature=-1.0)),
        ("temperature", dict(temperature=float("inf"))),
        ("temperature", dict(temperature=1e-45)),
        ("active", dict(active=torch.ones(B, dtype=torch.int32))),
        ("active", dict(active=torch.ones(B + 1, dtype=torch.bool))),
        ("seed", dict(temperature=1.0, seed=seed.int())),
        ("seed", dict(seed=seed)),
        ("offset", dict(temperature=1.0, seed=seed, offset=seed[:1])),
        ("offset", dict(temperature=1.0, offset=seed)),
        ("offset", dict(temperature=1.0, seed=seed, offset=torch.zeros(B, 2, dtype=torch.int64)[:, 0])),
        ("top_k", dict(temperature=1.0, top_k=-1)),
        ("top_k", dict(temperature=1.0, top_k=2.0)),
        ("top_k", dict(top_k=True)),
        ("top_k", dict(temperature=1.0, top_k=torch.ones(B))),
        ("top_k", dict(temperature=1.0, top_k=torch.ones(B + 1, dtype=torch.int64))),
        ("top_k", dict(temperature=1.0, top_k=torch.tensor([2, -1]))),
        ("top_p", dict(temperature=1.0, top_p=0.0)),
        ("top_p", dict(top_p=1.5)),
        ("top_p", dict(temperature=1.0, top_p=float("nan"))),
        ("top_p", dict(temperature=1.0, top_p=torch.ones(B, dtype=torch.int32))),
        ("top_p", dict(temperature=1.0, top_p=torch.ones(1))),
        ("top_p", dict(temperature=1.0, top_p=torch.tensor([0.5, 0.0]))),
        ("top_p", dict(temperature=torch.tensor([1.0, 0.0]), top_p=torch.tensor([0.5, 1.5]))),
        ("out", dict(out=(torch.empty(B, dtype=torch.int32),))),
        ("out.token", dict(out=LmHeadExit(torch.empty(B), torch.empty(B), torch.empty(B, dtype=torch.bool),
                                          torch.empty(B)))),
        ("out.conf", dict(out=LmHeadExit(torch.empty(B, dtype=torch.int32), torch.empty(B + 1),
                                         torch.empty(B, dtype=torch.bool), torch.empty(B)))),
        ("out.probs", dict(return_probs=True, out=LmHeadExit(torch.empty(B, dtype=torch.int32), torch.empty(B),
                                                             torch.empty(B, dtype=torch.bool), torch.empty(B)))),
    ], dict(hidden=h, lm_head_weight=w, threshold=0.5)


@pytest.mark.parametrize("i", range(len(_bad_exit_inputs()[0])))
@pytest.mark.parametrize("fn", [lm_head_exit, _lm_head_exit_triton], ids=["op", "triton"])
def test_bad_exit_inputs_raise_value_error(i, fn):
    (name, override), base = _bad_exit_inputs()[0][i], _bad_exit_inputs()[1]
    kwargs = {**base, **override}
    args = [kwargs.pop(n) for n in ("hidden", "lm_head_weight", "threshold")]
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        fn(*args, **kwargs)


@pytest.mark.parametrize("fn", [lm_head_topk, _lm_head_topk_triton], ids=["op", "triton"])
def test_bad_topk_inputs_raise_value_error(fn):
    h, w, nw = _inputs(2, 10, 16, torch.float32)
    for k in (0, 11, 17, 2.0, True):
        with pytest.raises(ValueError, match=r"^k\b"):
            fn(h, w, k)
    with pytest.raises(ValueError, match=r"^lm_head_weight\b"):
        fn(h, w.T, 2)
    with pytest.raises(ValueError, match=r"^out.logprobs\b"):
        fn(h, w, 2, out=LmHeadTopk(torch.empty(2, 2, dtype=torch.int32), torch.empty(2, 3)))
    with pytest.raises(ValueError, match=r"^norm_weight\b"):
        fn(h, w, 2, norm_weight=nw.bfloat16())


# --------------------------------------------------------------------------------------------------------------
# per-row temperature (serving batches): greedy rows mixed with sampled ones in one call


@pytest.mark.parametrize("fn", [lm_head_exit, _lm_head_exit_triton], ids=["op", "triton"])
def test_per_row_temperature_matches_reference_and_scalar_calls(fn, tdev):
    """[B] temperatures (0 = greedy) equal the reference, and every row equals a one-row call with its own
    temperature as a scalar (greedy rows: temperature None, the argmax with token_prob = conf)."""
    B, V, D = 6, 500, 48
    h, w, nw = _inputs(B, V, D, torch.float32, seed=21, scale=2.0)
    t = torch.tensor([0.0, 0.7, 1.3, 0.0, 1.0, 0.5])
    seed = torch.arange(B, dtype=torch.int64) * 31 + 2
    offset = torch.tensor([0, 5, 2 ** 33, 7, 1, 3], dtype=torch.int64)
    logits = lm_head_logits_ref(h, w, nw)
    for b in range(B):
        if t[b] > 0:
            assert float(_score_margin(logits[b:b + 1], seed[b:b + 1], offset[b:b + 1], float(t[b])).min()) > 1e-4
    off_dev = offset.to(tdev, copy=True)
    res = fn(h.to(tdev), w.to(tdev), 0.01, norm_weight=nw.to(tdev), temperature=t.to(tdev), seed=seed.to(tdev),
             offset=off_dev, return_probs=True)
    ref_off = offset.clone()
    ref = lm_head_exit_ref(h, w, 0.01, norm_weight=nw, temperature=t, seed=seed, offset=ref_off, return_probs=True)
    _check_exit(res, ref, 1e-5)
    assert torch.equal(off_dev.cpu(), offset + 1) and torch.equal(ref_off, offset + 1)
    greedy = t == 0
    assert torch.equal(ref.token[greedy], logits[greedy].argmax(-1).to(torch.int32))
    assert torch.equal(ref.token_prob[greedy], ref.conf[greedy])
    for b in range(B):
        kw = dict(temperature=float(t[b]), seed=seed[b:b + 1].to(tdev), offset=offset[b:b + 1].to(tdev, copy=True)) \
            if t[b] > 0 else {}
        one = fn(h[b:b + 1].to(tdev), w.to(tdev), 0.01, norm_weight=nw.to(tdev), return_probs=True, **kw)
        assert int(one.token[0]) == int(res.token[b]), b
        torch.testing.assert_close(one.token_prob.cpu()[0], res.token_prob.cpu()[b], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(one.probs.cpu()[0], res.probs.cpu()[b], rtol=1e-5, atol=1e-7)


def test_per_row_temperature_chi_squared(tdev):
    """One launch, one hidden state, four groups of 1536 rows with temperatures 0.5, 1.0, 2.0 and 0 (greedy): each
    sampled group follows its own softmax(logits / T) (chi-squared), the greedy group is all argmax. Planted
    bug: the same launch with the first group's temperature as a scalar (per-row values ignored) must fail the
    other groups' checks."""
    V, D, R = 24, 16, 1536
    temps = [0.5, 1.0, 2.0, 0.0]
    h, w, _ = _inputs(1, V, D, torch.float32, seed=3, scale=1.5)
    n = R * len(temps)
    hx = h.expand(n, D)
    group = torch.arange(n) // R
    t = torch.tensor(temps)[group]
    seed = torch.arange(n, dtype=torch.int64) + 1000
    res = _lm_head_exit_triton(hx.to(tdev), w.to(tdev), 0.0, temperature=t.to(tdev), seed=seed.to(tdev),
                               offset=torch.zeros(n, dtype=torch.int64, device=tdev))
    tok = res.token.cpu()
    logits = lm_head_logits_ref(h, w)[0].double()
    for g, T in enumerate(temps):
        sel = tok[group == g]
        if T == 0:
            assert bool((sel == int(logits.argmax())).all())
            continue
        p = torch.softmax(logits / T, -1)
        stat, df = _chi2_stat(sel, p)
        assert stat < _chi2_threshold(df), f"T={T}: chi2 {stat:.1f} >= {_chi2_threshold(df):.1f}"
    broken = _lm_head_exit_triton(hx.to(tdev), w.to(tdev), 0.0, temperature=temps[0], seed=seed.to(tdev),
                                  offset=torch.zeros(n, dtype=torch.int64, device=tdev)).token.cpu()
    for g, T in enumerate(temps[1:3], start=1):
        stat, df = _chi2_stat(broken[group == g], torch.softmax(logits / T, -1))
        assert stat >= _chi2_threshold(df), f"the planted bug passed group T={T} ({stat:.1f})"
    assert not bool((broken[group == 3] == int(logits.argmax())).all())


def test_per_row_temperature_bad_inputs():
    h, w, _ = _inputs(2, 10, 8, torch.float32)
    for bad_t in (torch.zeros(3), torch.zeros(2, dtype=torch.int32), torch.tensor([0.5, -1.0]),
                  torch.tensor([0.5, float("nan")]), torch.tensor([1e-45, 1.0])):
        with pytest.raises(ValueError, match="temperature"):
            lm_head_exit(h, w, 0.5, temperature=bad_t, seed=torch.zeros(2, dtype=torch.int64))


# --------------------------------------------------------------------------------------------------------------
# top-k / top-p: numbers or [B] tensors, greedy rows (T = 0) in the same call ignore them


def _filtered_expected(logits, T, k, p):
    """An independent formulation of one row's sampling distribution [V] fp64: q = softmax(logits / T); keep the
    k most likely tokens (ties kept; k = 0 or >= V: all); then the fewest most-likely-first tokens of those whose
    mass reaches p of theirs (ties kept); renormalise."""
    q = torch.softmax(logits.double() / T, -1)
    keep = torch.ones_like(q, dtype=torch.bool)
    if 0 < k < q.numel():
        keep = q >= torch.sort(q, descending=True).values[k - 1]
    if p < 1:
        kept = torch.where(keep, q, torch.zeros_like(q))
        vals = torch.sort(kept, descending=True).values
        n = int((torch.cumsum(vals, 0) / kept.sum() < p).sum()) + 1
        keep = keep & (q >= vals[n - 1])
    r = torch.where(keep, q, torch.zeros_like(q))
    return r / r.sum()


def _top_p_keeping(logits, T, k, n):
    """A top_p that keeps exactly the n most likely of the top-k tokens of the row, midway between two cumulative
    masses (so float summation order cannot move the cut)."""
    q = _filtered_expected(logits, T, k, 1.0)
    cum = torch.cumsum(torch.sort(q, descending=True).values, 0)
    lo = float(cum[n - 2]) if n > 1 else 0.0
    return (lo + float(cum[n - 1])) / 2


def _row_settings_for(logits, T, k, n):
    """(top_k, top_p) rows: k[b], and a top_p keeping n[b] tokens (None: top_p off)."""
    p = [1.0 if n_b is None or t_b == 0 else _top_p_keeping(logits[b], t_b, k_b, n_b)
         for b, (t_b, k_b, n_b) in enumerate(zip(T, k, n))]
    return torch.tensor(k, dtype=torch.int64), torch.tensor(p, dtype=torch.float32)


def _assert_kept_margin(logits, T, probs, seed, offset, tol):
    """Per sampled row: the best two Gumbel scores among the kept tokens are > 4 tol / T apart, and the top-k cut
    has no near tie (tie-free inputs where tokens are compared exactly)."""
    u = lm_head_uniforms_ref(seed, offset, logits.shape[1])
    for b in range(logits.shape[0]):
        if T[b] == 0:
            continue
        keep = probs[b] > 0
        s = (logits[b] / T[b] - torch.log(-torch.log(u[b]))).double()[keep]
        if s.numel() > 1:
            top = torch.topk(s, 2).values
            assert float(top[0] - top[1]) > 4 * tol / T[b], f"row {b}: near tie of Gumbel scores; pick another seed"
        out = logits[b][~keep]
        if out.numel():
            assert float(logits[b][keep].min() - out.max()) > 2 * tol, f"row {b}: near tie at the filter cut"


# (B, V, D, dtype, norm, T rows (None: scalar T[0]), top_k, tokens top_p keeps (None: off))
FILTER_CASES = [
    (3, 1000, 200, torch.float16, True, [0.8, 0.0, 1.3], [20, 5, 0], [7, 3, 12]),
    (4, 7, 16, torch.float32, True, [0.5, 1.0, 2.0, 0.7], [7, 1, 3, 0], [None, None, 2, 4]),
    (1, 32001, 64, torch.bfloat16, False, None, [50], [10]),
    (2, 151936, 32, torch.float32, False, [1.0, 0.0], [100, 0], [None, None]),
]


@pytest.mark.parametrize("case", FILTER_CASES, ids=lambda c: f"B{c[0]}V{c[1]}D{c[2]}-{str(c[3])[6:]}"
                         f"{'-rows' if c[5] is not None else '-scalars'}")
@pytest.mark.parametrize("fn", [lm_head_exit, _lm_head_exit_triton], ids=["op", "triton"])
def test_filters_match_reference(case, fn, device):
    """top-k / top-p per row (or as numbers) with greedy rows in the same call: tokens equal the reference's (same
    Philox numbers, scores and cuts clear of ties), probs are the filtered distribution, conf stays unfiltered."""
    if fn is _lm_head_exit_triton:
        _need_triton(device)
    B, V, D, dtype, norm, T, k, n = case
    if fn is lm_head_exit and device.type == "cpu" and V > 50000:
        pytest.skip("on CPU the op runs the reference itself: the small shapes cover its plumbing")
    h, w, nw = _inputs(B, V, D, dtype, seed=V + B, scale=3.0, device=device)
    nw = nw if norm else None
    tol = LOGIT_TOL[dtype] if norm else LOGIT_TOL[torch.float32]
    logits = lm_head_logits_ref(h.cpu(), w.cpu(), nw.cpu() if nw is not None else None)
    scalar = T is None
    T_rows = [0.9] * B if scalar else T
    top_k, top_p = _row_settings_for(logits, T_rows, k, n)
    settings = (dict(temperature=T_rows[0], top_k=int(top_k[0]), top_p=float(top_p[0])) if scalar else
                dict(temperature=torch.tensor(T_rows), top_k=top_k, top_p=top_p))
    seed = torch.arange(B, dtype=torch.int64) * 7 + 1
    offset = torch.arange(B, dtype=torch.int64) + 2 ** 32 - 2
    ref_off = offset.clone()
    ref = lm_head_exit_ref(h.cpu(), w.cpu(), 0.01, norm_weight=nw.cpu() if nw is not None else None, seed=seed,
                           offset=ref_off, return_probs=True, **settings)
    _assert_kept_margin(logits, T_rows, ref.probs, seed, offset, tol)
    dev_settings = {a: (v.to(device) if isinstance(v, torch.Tensor) else v) for a, v in settings.items()}
    off_dev = offset.to(device, copy=True)
    res = fn(h, w, 0.01, norm_weight=nw, seed=seed.to(device), offset=off_dev, return_probs=True, **dev_settings)
    _check_exit(res, ref, tol / min(t for t in T_rows if t > 0))
    assert torch.equal(off_dev.cpu(), offset + 1) and torch.equal(ref_off, offset + 1)
    # the exit rule ignores T and the filters. Against float64: torch's fp32 softmax sums V terms in an order set by
    # its vector width (on an AVX2 CPU 2e-5 off the reference's at V = 151936: its own error, not the reference's)
    conf = torch.softmax(logits.double(), -1).max(-1).values.float()
    torch.testing.assert_close(ref.conf, conf, rtol=1e-5, atol=0)
    for b in range(B):
        kept = int((ref.probs[b] > 0).sum())
        if T_rows[b] == 0:  # greedy: argmax, token_prob = conf, the full softmax
            assert int(ref.token[b]) == int(logits[b].argmax()) and kept == V
            assert float(ref.token_prob[b]) == float(ref.conf[b])
        else:
            want = _filtered_expected(logits[b], T_rows[b], int(top_k[b]), float(top_p[b]))
            assert kept == int((want > 0).sum()) == (n[b] or (k[b] if 0 < k[b] < V else V))
            torch.testing.assert_close(ref.probs[b].double(), want, rtol=1e-4, atol=1e-7)
            assert float(ref.probs[b, int(ref.token[b])]) > 0


@pytest.mark.parametrize("fn", [lm_head_exit, _lm_head_exit_triton], ids=["op", "triton"])
def test_filters_keep_ties(fn, tdev, monkeypatch):
    """Equal logits at the cut are all kept: three tokens tie for the best logit of row 0 (top_k = 2 keeps the
    three), row 1 has one best and two tied second (top_k = 2 keeps three), row 2's three tied best survive a tiny
    top_p; across filter chunks (16 entries) and rows sharing a program."""
    monkeypatch.setattr(tl_mod, "_filter_blocks", lambda B, V, device: (2, 16))
    B, V, D = 3, 100, 40
    h, w, _ = _inputs(B, V, D, torch.float32, seed=5)
    w[[3, 57, 90]] = 10 * h[0] / h[0].norm()
    w[20] = 12 * h[1] / h[1].norm()
    w[[21, 70]] = 10 * h[1] / h[1].norm()
    w[[5, 6, 99]] = 10 * h[2] / h[2].norm()
    seed = torch.tensor([1, 2, 3])
    res = fn(h.to(tdev), w.to(tdev), 0.0, temperature=1.0, top_k=torch.tensor([2, 2, 0], device=tdev),
             top_p=torch.tensor([1.0, 1.0, 0.01], device=tdev), seed=seed.to(tdev), return_probs=True)
    kept = [sorted(torch.nonzero(res.probs[b].cpu() > 0)[:, 0].tolist()) for b in range(B)]
    assert kept == [[3, 57, 90], [20, 21, 70], [5, 6, 99]]
    assert float(res.probs[1, 21]) == float(res.probs[1, 70])
    assert [int(t) in kk for t, kk in zip(res.token.cpu(), kept)] == [True] * 3


def test_filter_kernel_gpu_configs(tdev, monkeypatch):
    """The filter kernel with the GPU configuration (one row a program, 512-entry chunks: 2 at V = 1000, the
    block kernel's GPU tiles) and with tiny chunks (several rows a program, the last one partial)."""
    B, V, D = 3, 1000, 48
    h, w, nw = _inputs(B, V, D, torch.float16, seed=31, scale=3.0)
    logits = lm_head_logits_ref(h, w, nw)
    T = [0.9, 1.2, 0.0]
    top_k, top_p = _row_settings_for(logits, T, [40, 0, 9], [6, 25, None])
    seed, offset = torch.tensor([4, 5, 6]), torch.tensor([0, 1, 2])
    ref = lm_head_exit_ref(h, w, 0.05, norm_weight=nw, temperature=torch.tensor(T), top_k=top_k, top_p=top_p,
                           seed=seed, offset=offset.clone(), return_probs=True)
    tol = LOGIT_TOL[torch.float16]
    _assert_kept_margin(logits, T, ref.probs, seed, offset, tol)
    for blocks, filt in ((_gpu_blocks, lambda B, V, device: (1, 512)), (None, lambda B, V, device: (2, 64))):
        if blocks is not None:
            monkeypatch.setattr(tl_mod, "_blocks", blocks)
            monkeypatch.setattr(tl_mod, "_merge_rows", lambda B, chunk, device: 1)
        monkeypatch.setattr(tl_mod, "_filter_blocks", filt)
        for return_probs in (True, False):  # without probs the kernel samples from a scratch buffer
            res = _lm_head_exit_triton(h.to(tdev), w.to(tdev), 0.05, norm_weight=nw.to(tdev),
                                       temperature=torch.tensor(T, device=tdev), top_k=top_k.to(tdev),
                                       top_p=top_p.to(tdev), seed=seed.to(tdev), offset=offset.to(tdev, copy=True),
                                       return_probs=return_probs)
            _check_exit(res, ref if return_probs else ref._replace(probs=None), tol)


@pytest.mark.parametrize("fn", [lm_head_exit, _lm_head_exit_triton], ids=["op", "triton"])
def test_per_row_filters_chi_squared(fn, tdev):
    """One launch, one hidden state, five groups of rows with their own (T, top_k, top_p): top-k only, top-p only,
    both (1536 rows each), greedy (T = 0 with filters that it must ignore, 128 rows) and unfiltered (512 rows).
    Each sampled group follows its own filtered softmax (chi-squared, p ~ 1e-6 threshold, against an independent
    formulation of the filters) and token_prob is that distribution's probability of the token; the greedy group
    is all argmax with token_prob = conf. Planted bugs, the same launch with each filtered group's cut moved by one
    token (top_k + 1: a wrong top-k cutoff; a top_p keeping one token more: a shifted top-p threshold), must fail
    those groups' chi-squared tests."""
    V, D = 24, 16
    h, w, _ = _inputs(1, V, D, torch.float32, seed=3, scale=1.5)
    logits = lm_head_logits_ref(h, w)[0]
    # (T, top_k, tokens top_p keeps (None: off), rows); the cuts sit where the next token holds >= 8 % of the mass
    groups = [(1.0, 4, None, 1536), (1.0, 0, 5, 1536), (1.5, 10, 4, 1536), (0.0, 3, None, 128), (1.2, 0, None, 512)]
    T_g = [gr[0] for gr in groups]
    k_g = [gr[1] for gr in groups]
    p_g = [1.0 if nk is None else _top_p_keeping(logits, T, k, nk) for T, k, nk, _ in groups]
    p_g[3] = 0.5  # the greedy group's top_p, ignored
    g = torch.repeat_interleave(torch.arange(len(groups)), torch.tensor([gr[3] for gr in groups]))
    n = g.numel()
    hx = h.expand(n, D).to(tdev)
    seed = torch.arange(n, dtype=torch.int64) + 77

    def run(k_rows, p_rows):
        res = fn(hx, w.to(tdev), 0.0, temperature=torch.tensor(T_g)[g].to(tdev),
                 top_k=torch.tensor(k_rows)[g].to(tdev), top_p=torch.tensor(p_rows)[g].to(tdev),
                 seed=seed.to(tdev), offset=torch.zeros(n, dtype=torch.int64, device=tdev))
        return res.token.cpu(), res.token_prob.cpu(), res.conf.cpu()

    tok, tok_prob, conf = run(k_g, p_g)
    want = [None if T == 0 else _filtered_expected(logits, T, k, p) for T, k, p in zip(T_g, k_g, p_g)]
    for i, (T, k, nk, _) in enumerate(groups):
        sel = g == i
        if T == 0:
            assert bool((tok[sel] == int(logits.argmax())).all()) and torch.equal(tok_prob[sel], conf[sel])
            continue
        assert int((want[i] > 0).sum()) == (nk or k or V)
        stat, df = _chi2_stat(tok[sel], want[i])
        assert stat < _chi2_threshold(df), f"group {i}: chi2 {stat:.1f} >= {_chi2_threshold(df):.1f} (df {df})"
        torch.testing.assert_close(tok_prob[sel].double(), want[i][tok[sel].long()], rtol=1e-5, atol=1e-7)

    k_bug = [k + 1 if 0 < k and nk is None else k for T, k, nk, _ in groups]
    p_bug = [p if nk is None else _top_p_keeping(logits, T, k, nk + 1) for (T, k, nk, _), p in zip(groups, p_g)]
    bad, _, _ = run(k_bug, p_bug)
    for i in (0, 1, 2):
        stat, df = _chi2_stat(bad[g == i], want[i])
        assert stat >= _chi2_threshold(df), f"the planted cut bug passed group {i} ({stat:.1f})"


@pytest.mark.cuda
def test_filters_cuda_graph_replay_without_host_sync():
    """Per-row temperature (a greedy row included) / top_k / top_p tensors captured in a CUDA graph (validate=False,
    no host sync allowed while capturing): every replay equals an eager call at the advanced offset bit for bit,
    with new settings written into the same tensors between replays (read on the device, not baked into the
    graph); greedy rows are the argmax and conf matches the reference."""
    dev = torch.device("cuda")
    B, V, D = 4, 3000, 128
    h, w, nw = _inputs(B, V, D, torch.bfloat16, seed=17, scale=3.0)
    h_, w_, nw_ = h.to(dev), w.to(dev), nw.to(dev)
    t_ = torch.tensor([0.8, 0.0, 1.2, 1.0], device=dev)
    k_ = torch.tensor([40, 5, 0, 200], dtype=torch.int32, device=dev)
    p_ = torch.tensor([0.9, 0.5, 0.7, 1.0], device=dev)
    seed = torch.arange(B, dtype=torch.int64, device=dev) * 5 + 3
    offset = torch.zeros(B, dtype=torch.int64, device=dev)

    def call(off, validate=None):
        return lm_head_exit(h_, w_, 0.1, norm_weight=nw_, temperature=t_, top_k=k_, top_p=p_, seed=seed, offset=off,
                            return_probs=True, validate=validate)

    call(offset)  # warm-up: compiles the kernels
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(g):
            out = call(offset, validate=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    offset.zero_()
    logits = lm_head_logits_ref(h, w, nw)
    for r in range(3):
        if r == 2:
            t_.copy_(torch.tensor([0.0, 0.9, 1.2, 0.6], device=dev))
            k_.fill_(7)
        g.replay()
        want = call(torch.full((B,), r, dtype=torch.int64, device=dev))
        torch.cuda.synchronize()
        assert offset.cpu().tolist() == [r + 1] * B
        for a, b in zip(out, want):
            assert torch.equal(a, b)
        greedy = (t_ == 0).cpu()
        assert torch.equal(out.token.cpu()[greedy], logits[greedy].argmax(-1).to(torch.int32))
        if r == 2:  # the new top_k rows cut every sampled row to at most 7 tokens
            assert int((out.probs[~greedy.to(dev)] > 0).sum(-1).max()) <= 7
        torch.testing.assert_close(out.conf.cpu(), torch.softmax(logits, -1).max(-1).values, rtol=2e-2, atol=1e-6)
