"""The CPU decoder's packed small-batch GEMM (csrc/cpu/small_gemm.h; kangaroo_kernels pack_gemm_weight /
gemm_packed, what the fp32 CPU model's layers and LM head run): against F.linear on odd shapes, and the property the
decoder's exactness rests on: a row's result is the same bits whatever rows share the call and however many threads
run it."""

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


@pytest.mark.parametrize("threads", [1, 2])
def test_gemm_packed_rows_do_not_depend_on_the_batch(threads):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(19, 300, generator=gen)  # 8 + 8 + 3 rows per weight pass
    wp = ops().pack_gemm_weight(torch.randn(1000, 300, generator=gen))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        full = ops().gemm_packed(x, wp, 1000)
        alone = torch.cat([ops().gemm_packed(x[i:i + 1], wp, 1000) for i in range(19)])
        sub = ops().gemm_packed(x[3:10], wp, 1000)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(full, alone) and torch.equal(full[3:10], sub)


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
