"""The CPU decoder's packed small-batch GEMM (csrc/cpu/small_gemm.h; kangaroo_kernels pack_gemm_weight /
gemm_packed, what the fp32 CPU model's layers and LM head run): against F.linear on odd shapes, and the property the
decoder's exactness rests on: a row's result is the same bits whatever rows share the call and however many threads
run it."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from kangaroo_kernels._ext import ops


@pytest.mark.parametrize("M,K,N", [(1, 256, 4096), (5, 200, 45), (8, 7, 33), (9, 768, 256), (20, 64, 31),
                                   (3, 1, 1)])
def test_gemm_packed_matches_linear(M, K, N):
    gen = torch.Generator().manual_seed(M * 1000 + N)
    x = torch.randn(M, K, generator=gen)
    w = torch.randn(N, K, generator=gen) * K ** -0.5
    got = ops().gemm_packed(x, ops().pack_gemm_weight(w), N)
    # fp32 sums of K products in another order: a few ulp of the sum's scale (|x| ~ 1, |w| ~ K^-0.5)
    torch.testing.assert_close(got, F.linear(x, w), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_gemm_packed_rows_do_not_depend_on_the_batch(threads, bf16):
    """Every row count takes its own pass structure (AVX-512: 8 rows a pass; AVX2: one full-tile pass up to 3 rows,
    half tiles of 6 beyond, in k blocks of 8 KB past K = 64 / 128; baseline: 1 row): the same bits for each row."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(19, 300, generator=gen)
    w = torch.randn(1000, 300, generator=gen)
    wp = ops().pack_gemm_weight(w.bfloat16().float() if bf16 else w, bf16)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        full = ops().gemm_packed(x, wp, 1000)
        alone = torch.cat([ops().gemm_packed(x[i:i + 1], wp, 1000) for i in range(19)])
        subs = {(a, b): ops().gemm_packed(x[a:b], wp, 1000) for a, b in
                [(3, 10), (0, 2), (0, 3), (1, 5), (2, 7), (0, 6), (5, 17), (4, 16)]}
    finally:
        torch.set_num_threads(before)
    assert torch.equal(full, alone)
    for (a, b), y in subs.items():
        assert torch.equal(full[a:b], y), (a, b)


def test_gemm_packed_keeps_leading_dims_and_refuses_bad_input():
    w = torch.randn(40, 16)
    wp = ops().pack_gemm_weight(w)
    x = torch.randn(2, 3, 16)
    assert ops().gemm_packed(x, wp, 40).shape == (2, 3, 40)
    with pytest.raises(ValueError, match="pack_gemm_weight result"):
        ops().gemm_packed(x, wp, 70)  # n does not fit the tiles
    with pytest.raises(ValueError, match="pack_gemm_weight result"):
        ops().gemm_packed(torch.randn(2, 15), wp, 40)  # K mismatch
    with pytest.raises(ValueError, match="fp32"):
        ops().gemm_packed(x.double(), wp, 40)


def test_cpu_model_packs_fp32_and_round_trips_through_to():
    """LlamaModel on CPU in fp32 keeps the four layer weights packed (and a packed copy of the LM head); .to() of
    another dtype unpacks to the logical weights, and back to fp32 the logits are the same bits."""
    from kangaroo.model import LlamaModel
    from test_decoder_exact import make_hf

    from kangaroo_kernels.reference.adapter_forward import rms_norm_ref

    hf = make_hf("qwen2")  # q/k/v bias, tied head
    m = LlamaModel.from_pretrained(hf, dtype=torch.float32)
    lay = m.layers[0]
    assert all(lay[k].dim() == 3 and lay[k].shape[2] == 32 for k in ("wqkv", "wo", "wgu", "wd"))
    sd = hf.state_dict()
    want = torch.cat([sd[f"model.layers.0.mlp.{n}_proj.weight"] for n in ("gate", "up")], 0)
    assert torch.equal(m.layer_weights(0)["wgu"], want)
    bf = m.to(dtype=torch.bfloat16)
    assert bf.layers[0]["wgu"].dim() == 2 and torch.equal(bf.layers[0]["wgu"], want.bfloat16())
    back = bf.to(dtype=torch.float32)
    assert back.layers[0]["wgu"].dim() == 3
    assert torch.equal(back.to(dtype=torch.bfloat16).layers[0]["wgu"], bf.layers[0]["wgu"])  # bf16 -> fp32 exact
    h = torch.randn(2, 3, m.config.hidden_size)
    ref = F.linear(rms_norm_ref(h, m.norm, m.config.rms_norm_eps), m.lm_head)
    torch.testing.assert_close(m.logits(h), ref, atol=2e-5, rtol=2e-5)  # the packed head: fp32, another sum order
    assert torch.equal(m.to(dtype=torch.float32).logits(h), m.logits(h))  # unpack + repack: the same bits


def _bf16_exact(*shape, seed=0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.1).bfloat16().float()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("M,K,N", [(1, 256, 4096), (5, 200, 45), (19, 300, 1000), (8, 7, 33)])
def test_bf16_pairs_give_the_fp32_packs_bits(M, K, N, threads):
    """The bf16-pairs layout of a bf16-exact weight: half the bytes, the same products in the same order, so the
    same bits as the fp32 layout (and F.linear within fp32 tolerance)."""
    w = _bf16_exact(N, K, seed=N)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
    w32, w16 = ops().pack_gemm_weight(w), ops().pack_gemm_weight(w, True)
    assert w16.dtype == torch.int32 and w16.shape == (w32.shape[0], K, 16)
    assert w16.numel() * 4 * 2 == w32.numel() * 4
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = ops().gemm_packed(x, w32, N), ops().gemm_packed(x, w16, N)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(a, b)
    torch.testing.assert_close(b, F.linear(x, w), atol=2e-5, rtol=2e-5)
    assert torch.equal(ops().unpack_gemm_weight(w16, N), w)  # exact round trip, signs and all
    assert torch.equal(ops().pack_gemm_weight(w.bfloat16(), True), w16)  # a bf16 tensor packs to the same words


def test_bf16_pairs_refuse_a_weight_they_would_round():
    w = _bf16_exact(40, 16)
    w[3, 5] += 1e-4  # no longer a bf16 value
    with pytest.raises(ValueError, match="not exactly representable in bf16"):
        ops().pack_gemm_weight(w, True)
    with pytest.raises(ValueError, match="floating-point"):
        ops().pack_gemm_weight(torch.ones(4, 4, dtype=torch.int32), True)


def test_cpu_model_packs_a_bf16_checkpoint_as_pairs_and_decodes_the_same():
    """A bf16-exact model in fp32 (a bf16 checkpoint run in fp32) is packed as bf16 pairs; its greedy output equals
    transformers' and its logits equal those of the same model packed fp32, bit for bit."""
    from kangaroo.adapter import KangarooAdapter
    from kangaroo.generate import KangarooDecoder
    from kangaroo.model import LlamaModel
    from test_decoder_exact import hf_greedy, make_hf, make_prompts

    from kangaroo_kernels.reference.adapter_forward import rms_norm_ref

    hf = make_hf("llama", seed=2)
    with torch.no_grad():
        for prm in hf.parameters():
            prm.copy_(prm.bfloat16().float())
    m = LlamaModel.from_pretrained(hf, dtype=torch.float32)
    assert m.layers[0]["wqkv"].dtype == torch.int32 and m._lm_head_packed.dtype == torch.int32
    prompts = make_prompts(hf.config.vocab_size, n=3, seed=4)
    dec = KangarooDecoder(m, KangarooAdapter.for_model(hf, 1))
    ref = hf_greedy(hf, prompts, 12)
    assert [t.tolist() for t in dec.generate(prompts, 12, threshold=0.0, max_draft=3).tokens] == ref
    assert [t.tolist() for t in dec.generate_autoregressive(prompts, 12).tokens] == ref
    h = torch.randn(2, 3, m.config.hidden_size)
    x = rms_norm_ref(h, m.norm, m.config.rms_norm_eps)
    head32 = ops().pack_gemm_weight(m.lm_head)  # the fp32 layout of the same head
    assert torch.equal(m.logits(h), ops().gemm_packed(x, head32, m.config.vocab_size))


_ISA_SCRIPT = r"""
import hashlib, torch
from kangaroo_kernels._ext import ops
torch.set_num_threads(1)
worst, h = 0.0, hashlib.sha256()
for M, N, K in [(1, 512, 256), (5, 1536, 256), (8, 256, 768), (3, 70, 33), (13, 100, 64), (2, 64, 5)]:
    g = torch.Generator().manual_seed(M * N + K)
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) / K ** 0.5
    for bf16 in (False, True):
        wq = w.bfloat16().float() if bf16 else w
        y = ops().gemm_packed(x, ops().pack_gemm_weight(wq, bf16), N)
        worst = max(worst, float((y.double() - x.double() @ wq.double().T).abs().max()))
        h.update(y.numpy().tobytes())
from kangaroo_kernels import append_attention
for B, T, Hq, Hk, Dh, P in [(1, 1, 4, 2, 64, 130), (2, 5, 4, 2, 64, 77), (1, 3, 8, 8, 128, 40), (1, 2, 2, 1, 24, 9)]:
    g = torch.Generator().manual_seed(T * Dh + P)
    q, k, v = (torch.randn(B, T, H, Dh, generator=g) for H in (Hq, Hk, Hk))
    kc, vc = torch.randn(B, Hk, P + T, Dh, generator=g), torch.randn(B, Hk, P + T, Dh, generator=g)
    out = append_attention(q, k, v, kc, vc, torch.full((B,), P, dtype=torch.int32))
    h.update(out.numpy().tobytes())
print(ops().cpu_isa(), ops().gemm_isa(), worst, h.hexdigest())
"""


def _run_isa(cap, gemm=None):
    env = dict(os.environ)
    env.pop("KANGAROO_CPU_ISA", None)
    env.pop("KANGAROO_GEMM_ISA", None)
    if cap:
        env["KANGAROO_CPU_ISA"] = cap
    if gemm:
        env["KANGAROO_GEMM_ISA"] = gemm
    proc = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    isa, gemm, worst, digest = proc.stdout.split()[-4:]
    return isa, gemm, float(worst), digest


def test_cpu_isa_is_what_torch_reports_and_the_caps_run_each_fallback():
    """The dispatched loops (simd.h cpu_isa) run the ISA torch's own dispatch picks, KANGAROO_CPU_ISA caps it, the
    GEMM's build is one the CPU runs (on AVX-512 the faster of its AVX-512 and AVX2 builds), every build matches an
    fp64 product (fp32 sums of K <= 768 terms of size ~1: |error| < 1e-4), and the AVX-512 and AVX2 builds of the
    GEMM and of the attention give the same bits (the same FMA chains per lane, the same pairwise lane sums), so
    which one a machine picks never changes a result."""
    want = {"AVX512": "avx512", "AVX2": "avx2"}.get(torch.backends.cpu.get_cpu_capability(), "baseline")
    isa, gemm, worst, full = _run_isa(None)
    assert isa == want and worst < 1e-4, (isa, want, worst)
    assert gemm in ({"avx512", "avx2"} if want == "avx512" else {want}), gemm
    isa, gemm, worst, capped = _run_isa("avx2")
    assert isa == gemm == ("baseline" if want == "baseline" else "avx2") and worst < 1e-4, (isa, gemm, worst)
    if want == "avx512":  # both GEMM builds, forced: the same bits
        assert _run_isa(None, "avx512")[1] == "avx512" and _run_isa(None, "avx2")[1] == "avx2"
        assert _run_isa(None, "avx512")[3] == capped == full
    isa, gemm, worst, _ = _run_isa("baseline")
    assert isa == gemm == "baseline" and worst < 1e-4, (isa, gemm, worst)
