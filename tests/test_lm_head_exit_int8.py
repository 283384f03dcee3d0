"""quantize_lm_head / lm_head_exit_int8 (the CPU draft head on int8 weights) against the reference: odd shapes
(V below, at and across the kernel's 512-token blocks; D not a multiple of the 4-row unroll), fp32/bf16/fp16 hidden,
with and without the norm, ties across blocks, NaN/inf rows, thread counts, out= buffers and aliasing, bad input;
the quantizer's error bound; that the int8 draft rarely disagrees with the exact head (the premise of using it); and
the kernel's AVX2 and baseline paths (KANGAROO_CPU_ISA) on any machine."""

import math
import os
import subprocess
import sys

import pytest
import torch

from kangaroo_kernels.ops.lm_head_exit import lm_head_exit
from kangaroo_kernels.ops.lm_head_exit_int8 import LmHeadExitInt8Plan, lm_head_exit_int8, quantize_lm_head
from kangaroo_kernels.reference.lm_head_exit import lm_head_logits_ref
from kangaroo_kernels.reference.lm_head_exit_int8 import lm_head_exit_int8_ref, quantize_lm_head_ref
from kangaroo_kernels.types import Int8Weight, LmHeadExit

pytestmark = pytest.mark.usefixtures("one_thread")

# Logit tolerances (abs), as in test_lm_head_exit.py: the kernel and the reference multiply the same values in
# fp32 and differ in summation order (and scale applied after vs before the sum: one more fp32 rounding), < 2e-5
# at these magnitudes; a 16-bit hidden's normalised element can round one ulp apart (rstd computed differently),
# moving one term by 2^-11 (fp16) or 2^-8 (bf16) relative. conf inherits about twice the logit error.
LOGIT_TOL = {torch.float32: 2e-5, torch.float16: 5e-4, torch.bfloat16: 4e-3}


def _inputs(B, V, D, dtype, seed=0, scale=4.0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(B, D, generator=gen)
    w = torch.randn(V, D, generator=gen) * (scale / math.sqrt(D))
    nw = 1 + 0.1 * torch.randn(D, generator=gen)
    return h.to(dtype), w, nw.to(dtype)


def _check_against_ref(res, ref, logits, tol):
    """conf within tolerance; the token equal to the reference's where its top-2 gap exceeds the logit tolerance,
    else a token whose reference logit is within tolerance of the max (a near-tie may go either way)."""
    torch.testing.assert_close(res.conf, ref.conf, rtol=2 * tol, atol=2 * tol, equal_nan=True)
    top2 = logits.topk(min(2, logits.shape[1]), dim=1).values
    gap = top2[:, 0] - top2[:, -1] if logits.shape[1] > 1 else torch.full_like(top2[:, 0], math.inf)
    clear = gap > 2 * tol
    assert torch.equal(res.token[clear], ref.token[clear])
    picked = logits.gather(1, res.token.long()[:, None])[:, 0]
    assert bool((picked >= top2[:, 0] - 2 * tol).all())
    assert torch.equal(res.token_prob, res.conf)


@pytest.mark.parametrize("B,V,D", [(1, 7, 5), (3, 1000, 64), (2, 4096, 256), (1, 1537, 96), (4, 513, 3), (6, 2100, 40),
                                   (2, 512, 130)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm", [False, True])
def test_matches_reference(B, V, D, dtype, norm):
    h, w, nw = _inputs(B, V, D, dtype, seed=B * V + D)
    qw = quantize_lm_head(w)
    active = torch.tensor([True, False, True, True, False, True][:B])
    thr = 0.3
    res = lm_head_exit_int8(h, qw, thr, norm_weight=nw if norm else None, active=active)
    ref = lm_head_exit_int8_ref(h, qw, thr, norm_weight=nw if norm else None, active=active)
    deq = qw.qweight.float() * qw.scale[:, None]
    logits = lm_head_logits_ref(h, deq, nw if norm else None)
    _check_against_ref(res, ref, logits, LOGIT_TOL[dtype])
    assert res.token.dtype == torch.int32 and bool(((res.token >= 0) & (res.token < V)).all())
    near = (ref.conf - thr).abs() <= 2 * LOGIT_TOL[dtype]
    assert torch.equal(res.active[~near], ref.active[~near])
    assert not bool(res.active[~active].any())


def test_quantizer_error_bound_and_layout():
    _, w, _ = _inputs(1, 300, 70, torch.float32, seed=3)
    w[5] = 0  # a zero row: scale 0, q 0
    w[7, 3] = -40.0  # an outlier only widens its own row's scale
    q, scale = quantize_lm_head(w)
    rq, rscale = quantize_lm_head_ref(w)
    assert torch.equal(q, rq) and torch.equal(scale, rscale)
    assert q.dtype == torch.int8 and q.stride() == (1, 300) and scale.dtype == torch.float32
    assert int(q.abs().max()) <= 127 and bool((q[5] == 0).all()) and float(scale[5]) == 0.0
    assert torch.allclose(scale, w.abs().amax(1) / 127)
    err = (q.float() * scale[:, None] - w).abs()
    assert bool((err <= scale[:, None] / 2 * (1 + 1e-5) + 1e-12).all())
    assert bool((q.abs().amax(1)[scale > 0] == 127).all())  # the largest element of each row uses the full range
    with pytest.raises(ValueError, match="weight"):
        quantize_lm_head(torch.full((3, 4), math.nan))
    with pytest.raises(ValueError, match="weight"):
        quantize_lm_head(torch.ones(3, 4, dtype=torch.int32))


def test_ties_go_to_the_lowest_index_across_blocks():
    """Integer weights with a 127 in every row (scale exactly 1) and integer hidden: every logit is exact, so the
    copies of one row tie exactly in the kernel and the reference alike."""
    V, D = 1500, 16
    g = torch.Generator().manual_seed(1)
    w = torch.randint(-20, 21, (V, D), generator=g).float()
    w[:, 0] = 127
    h = torch.randint(-3, 4, (1, D), generator=g).float()
    h[0, 0] = 0
    best = int((h @ w.T).argmax())
    for i in (700, 3, 1499):  # the best row copied into blocks 0, 1 and 2
        w[i] = w[best]
    w[best, 1:] = 0
    qw = quantize_lm_head(w)
    assert torch.equal(qw.scale, torch.ones(V))
    res = lm_head_exit_int8(h, qw, 0.0)
    ref = lm_head_exit_int8_ref(h, qw, 0.0)
    assert int(res.token[0]) == 3 == int(ref.token[0])


def test_nan_and_inf_rows_exit():
    h, w, nw = _inputs(3, 600, 32, torch.float32)
    h[0, 4] = math.nan
    h[1, 2] = math.inf
    qw = quantize_lm_head(w)
    res = lm_head_exit_int8(h, qw, 0.0)
    ref = lm_head_exit_int8_ref(h, qw, 0.0)
    assert bool(res.conf[:2].isnan().all()) and bool(ref.conf[:2].isnan().all())
    assert res.active.tolist() == [False, False, True] == ref.active.tolist()
    assert bool(((res.token >= 0) & (res.token < 600)).all())
    torch.testing.assert_close(res.conf[2], ref.conf[2], rtol=4e-5, atol=4e-5)


def test_threads_and_out_buffers():
    h, w, nw = _inputs(5, 4100, 48, torch.float32, seed=9)
    qw = quantize_lm_head(w)
    one = lm_head_exit_int8(h, qw, 0.2, norm_weight=nw)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = lm_head_exit_int8(h, qw, 0.2, norm_weight=nw)
    finally:
        torch.set_num_threads(old)
    for a, b in zip(one[:4], two[:4]):  # blocks merge in a fixed order: bit-identical whatever the threads
        assert torch.equal(a, b)
    active = torch.tensor([True, True, False, True, True])
    out = LmHeadExit(torch.full((5,), 7, dtype=torch.int32), torch.zeros(5), active, torch.zeros(5))
    res = lm_head_exit_int8(h, qw, 0.2, norm_weight=nw, active=active, out=out)
    assert res.active is active and res.token.data_ptr() == out.token.data_ptr()
    assert torch.equal(res.token, one.token) and torch.equal(res.conf, one.conf)
    assert torch.equal(active, torch.tensor([True, True, False, True, True]) & (one.conf >= 0.2))


def test_int8_draft_agrees_with_the_exact_head():
    """The premise of a quantized draft head: it picks the exact head's token almost always (a near-tie aside)."""
    h, w, nw = _inputs(512, 4096, 256, torch.float32, seed=4)
    exact = lm_head_exit(h, w, 0.0, norm_weight=nw)
    q8 = lm_head_exit_int8(h, quantize_lm_head(w), 0.0, norm_weight=nw)
    agree = (exact.token == q8.token).float().mean().item()
    assert agree >= 0.97, agree
    torch.testing.assert_close(q8.conf, exact.conf, rtol=0.05, atol=0.01)


def test_bad_input_names_the_argument():
    h, w, nw = _inputs(2, 50, 8, torch.float32)
    qw = quantize_lm_head(w)
    cases = [
        (dict(hidden=h.to("meta")), "CPU"),
        (dict(hidden=h[:, :7]), "weight.qweight"),
        (dict(hidden=h.double()), "hidden"),
        (dict(weight=Int8Weight(qw.qweight.contiguous(), qw.scale)), "column-major"),
        (dict(weight=Int8Weight(qw.qweight.float(), qw.scale)), "weight.qweight"),
        (dict(weight=Int8Weight(qw.qweight, qw.scale.double())), "weight.scale"),
        (dict(weight=Int8Weight(qw.qweight, qw.scale[:-1])), "weight.scale"),
        (dict(weight=w), "Int8Weight"),
        (dict(threshold=math.nan), "threshold"),
        (dict(threshold="x"), "threshold"),
        (dict(eps=-1.0), "eps"),
        (dict(norm_weight=nw.half()), "norm_weight"),
        (dict(active=torch.ones(3, dtype=torch.bool)), "active"),
        (dict(out=LmHeadExit(torch.zeros(2, dtype=torch.int64), torch.zeros(2), torch.zeros(2, dtype=torch.bool),
                             torch.zeros(2))), "out.token"),
    ]
    for over, needle in cases:
        kw = dict(hidden=h, weight=qw, threshold=0.5, norm_weight=None, active=None, eps=1e-6, out=None)
        kw.update(over)
        with pytest.raises(ValueError, match=needle):
            lm_head_exit_int8(kw.pop("hidden"), kw.pop("weight"), kw.pop("threshold"), **kw)
    empty = lm_head_exit_int8(h[:0], qw, 0.5)
    assert empty.token.shape == (0,)


def test_plan_equals_the_op_and_refuses_what_it_refuses():
    """LmHeadExitInt8Plan (what the decoder's draft loop calls): the op's results bit for bit, with and without
    out buffers and active rows; inputs its direct path does not take go to the op, which converts or refuses."""
    h, w, nw = _inputs(3, 700, 40, torch.float32, seed=4)
    qw = quantize_lm_head(w)
    plan = LmHeadExitInt8Plan(qw, 0.3, batch=3, norm_weight=nw, eps=1e-5)
    active = torch.tensor([True, False, True])
    want = lm_head_exit_int8(h, qw, 0.3, norm_weight=nw, eps=1e-5, active=active)
    out = LmHeadExit(torch.zeros(3, dtype=torch.int32), torch.zeros(3), torch.zeros(3, dtype=torch.bool),
                     torch.zeros(3))
    for got in (plan.run(h, active=active), plan.run(h, active=active, out=out)):
        for a, b in zip(got[:4], want[:4]):
            assert torch.equal(a, b)
    assert plan.run(h, active=active, out=out).token.data_ptr() == out.token.data_ptr()
    strided = torch.randn(3, 80)[:, ::2]  # not contiguous: the op's path (it copies), same result as contiguous
    assert torch.equal(plan.run(strided).conf, lm_head_exit_int8(strided.contiguous(), qw, 0.3, norm_weight=nw,
                                                                 eps=1e-5).conf)
    with pytest.raises(ValueError, match=r"D=30"):  # the op's message: hidden's D against the weight's
        plan.run(h[:, :30])
    with pytest.raises(ValueError, match="active"):
        plan.run(h, active=active[:2])
    with pytest.raises(ValueError, match="norm_weight"):
        LmHeadExitInt8Plan(qw, 0.3, batch=3, norm_weight=nw[:5])
    with pytest.raises(ValueError, match="threshold"):
        LmHeadExitInt8Plan(qw, float("nan"), batch=3)


_ISA_SCRIPT = r"""
import math, torch
from kangaroo_kernels.ops.lm_head_exit_int8 import lm_head_exit_int8, quantize_lm_head
from kangaroo_kernels.reference.lm_head_exit_int8 import lm_head_exit_int8_ref
torch.set_num_threads(1)
worst = 0.0
for B, V, D in [(1, 4096, 256), (1, 1537, 96), (2, 513, 3), (3, 1000, 64), (4, 2100, 40), (1, 4099, 130)]:
    gen = torch.Generator().manual_seed(V + D)
    h, w = torch.randn(B, D, generator=gen), torch.randn(V, D, generator=gen) * (4 / math.sqrt(D))
    w[7] = w[3]  # an exact tie: the lower index wins on every path
    qw = quantize_lm_head(w)
    res, ref = lm_head_exit_int8(h, qw, 0.3), lm_head_exit_int8_ref(h, qw, 0.3)
    worst = max(worst, float((res.conf - ref.conf).abs().max()))
    assert torch.equal(res.token, ref.token), (B, V, D, res.token, ref.token)
print(worst)
"""


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_fallback_isa_paths_match_the_reference(isa):
    """The GEMV picks AVX-512, AVX2 + FMA or the compiler's clones by the CPU; KANGAROO_CPU_ISA caps the pick, so each
    fallback runs here too (on a CPU without AVX2 both caps run the baseline)."""
    env = dict(os.environ, KANGAROO_CPU_ISA=isa)
    proc = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout.split()[-1]) < 4e-5
