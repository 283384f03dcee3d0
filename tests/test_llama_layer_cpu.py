"""llama_layer's C++ CPU kernel (csrc/cpu/llama_layer.cpp, what kangaroo.model.LlamaModel.layer runs on CPU) against
the layer written out with the references: odd head dims, GQA, q/k/v bias, T = 1 and causal T > 1 blocks, a tree
block, inactive rows, a slot at the cache's end, and only the given layer of the stacked cache written; row-major and
the model's column-major CPU weights."""

import pytest
import torch
import torch.nn.functional as F

from kangaroo_kernels.reference.adapter_forward import rms_norm_ref
from kangaroo_kernels.reference.append_attention import append_attention_ref
from kangaroo_kernels.rope import make_rope_cos_sin


def _layer_ref(x, p, kc, vc, lens, positions, tree_mask, active, rope, eps, Hq, Hk):
    B, T, _ = x.shape
    Dh = kc.shape[-1]
    qkv = F.linear(rms_norm_ref(x, p["ln1"], eps), p["wqkv"], p.get("bqkv"))
    q, k, v = qkv.split([Hq * Dh, Hk * Dh, Hk * Dh], dim=-1)
    a = append_attention_ref(q.reshape(B, T, Hq, Dh), k.reshape(B, T, Hk, Dh), v.reshape(B, T, Hk, Dh), kc, vc,
                             lens, tree_mask=tree_mask, active=active, positions=positions, rope_cos_sin=rope)
    x = x + F.linear(a.reshape(B, T, Hq * Dh), p["wo"])
    gate, up = F.linear(rms_norm_ref(x, p["ln2"], eps), p["wgu"]).chunk(2, dim=-1)
    return x + F.linear(F.silu(gate) * up, p["wd"])


# (B, T, Hq, Hk, Dh, D, inter, S, lens, bias, tree, active)
CASES = [
    (1, 1, 4, 2, 64, 256, 96, 40, [17], False, False, None),
    (3, 1, 8, 2, 16, 128, 80, 20, [0, 7, 19], True, False, [True, False, True]),  # Qwen2-style hidden 128, 8 heads
    (2, 5, 3, 1, 96, 200, 64, 30, [4, 25], False, False, None),  # Phi-3-style head dim, block ends at S
    (2, 4, 4, 4, 80, 96, 48, 24, [3, 11], True, True, [False, True]),
    (1, 8, 2, 1, 64, 300, 600, 20, [2], True, False, None),  # N > 256: several column blocks; the most rows
]


@pytest.mark.parametrize("colmajor", [False, True], ids=["rowmajor", "colmajor"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}T{c[1]}H{c[2]}x{c[3]}D{c[4]}"
                         f"{'-bias' if c[9] else ''}{'-tree' if c[10] else ''}{'-act' if c[11] else ''}")
def test_cpu_layer_matches_reference(case, colmajor):
    """colmajor: the model's CPU weight layout (kangaroo.model._cpu_layout)."""
    B, T, Hq, Hk, Dh, D, inter, S, lens, bias, tree, active = case
    gen = torch.Generator().manual_seed(T * 10 + Dh)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    p = {"ln1": 1 + rnd(D, scale=0.1), "wqkv": rnd((Hq + 2 * Hk) * Dh, D, scale=D ** -0.5),
         "wo": rnd(D, Hq * Dh, scale=(Hq * Dh) ** -0.5), "ln2": 1 + rnd(D, scale=0.1),
         "wgu": rnd(2 * inter, D, scale=D ** -0.5), "wd": rnd(D, inter, scale=inter ** -0.5)}
    if bias:
        p["bqkv"] = rnd((Hq + 2 * Hk) * Dh, scale=0.3)
    if colmajor:
        p = {k: t.t().contiguous().t() if t.dim() == 2 else t for k, t in p.items()}
    layers, layer = 3, 1
    kc, vc = rnd(layers, B, Hk, S, Dh), rnd(layers, B, Hk, S, Dh)
    kr, vr = kc[layer].clone(), vc[layer].clone()
    kc0, vc0 = kc.clone(), vc.clone()
    cl = torch.tensor(lens, dtype=torch.int32)
    act = torch.tensor(active) if active is not None else None
    tree_mask = None
    positions = cl.long()[:, None] + torch.arange(T)
    if tree:  # a root with T - 1 children
        bits = [1] + [1 | (1 << j) for j in range(1, T)]
        tree_mask = torch.tensor(bits, dtype=torch.int32)[None, :, None].expand(B, T, 1).contiguous()
        positions = cl.long()[:, None] + torch.tensor([0] + [1] * (T - 1))
    rope = make_rope_cos_sin(S + T, Dh)
    x = rnd(B, T, D)
    got = torch.ops.kangaroo_kernels.llama_layer(x, p["ln1"], p["wqkv"], p.get("bqkv"), p["wo"], p["ln2"], p["wgu"],
                                                 p["wd"], kc, vc, layer, cl, positions, tree_mask, act, rope, 1e-6,
                                                 Hq, Hk)
    want = _layer_ref(x, p, kr, vr, cl, positions, tree_mask, act, rope, 1e-6, Hq, Hk)
    rows = act if act is not None else torch.ones(B, dtype=torch.bool)
    # fp32 throughout: the GEMVs and attention sums differ only in order (~1e-6)
    torch.testing.assert_close(got[rows], want[rows], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(kc[layer], kr, atol=1e-6, rtol=1e-6)
    assert torch.equal(vc[layer], vr)
    for other in (0, 2):
        assert torch.equal(kc[other], kc0[other]) and torch.equal(vc[other], vc0[other])
