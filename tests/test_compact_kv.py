import pytest
import torch
from test_tree import random_parents

from kangaroo_kernels.ops.compact_kv import compact_kv
from kangaroo_kernels.reference import compact_kv_ref, verify_greedy_ref


def random_paths(B: int, N: int, gen: torch.Generator):
    """Accepted root-to-leaf paths of random trees: (path [B, N+1] int32, accept_len [B] int32)."""
    parents = random_parents("random", B, N, gen)
    target = torch.randint(0, 4, (B, N + 1), generator=gen)
    draft = torch.randint(0, 4, (B, N), generator=gen)
    acc = verify_greedy_ref(draft, target, parents=parents)
    return acc.path, acc.accept_len


def make_cache(shape, dtype, gen):
    return torch.randn(shape, generator=gen).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("L,B,H,S,Dh,N", [(2, 3, 2, 40, 8, 12), (1, 1, 1, 70, 3, 64), (3, 2, 4, 24, 128, 6)])
def test_compact_kv_matches_reference(device, dtype, L, B, H, S, Dh, N):
    gen = torch.Generator().manual_seed(S + N)
    k = make_cache((L, B, H, S, Dh), dtype, gen)
    v = make_cache((L, B, H, S, Dh), dtype, gen)
    path, accept_len = random_paths(B, N, gen)
    if N >= 12:  # make sure some rows really move (a deep path that is not the identity)
        path[0, :4] = torch.tensor([1, 3, 4, 9], dtype=torch.int32)
        path[0, 4:] = -1
        accept_len[0] = 4
    lens = torch.randint(0, S - N + 1, (B,), generator=gen).to(torch.int32)
    kw, vw, lw = compact_kv_ref(k, v, lens, path, accept_len)
    kd, vd, ld = k.to(device), v.to(device), lens.to(device)
    compact_kv(kd, vd, ld, path.to(device), accept_len.to(device))
    assert torch.equal(kd.cpu(), kw) and torch.equal(vd.cpu(), vw)  # a copy: bit-exact
    assert torch.equal(ld.cpu(), lw) and ld.dtype == torch.int32


def test_compact_kv_explicit_move(device):
    # independent of the reference: positions lens + i hold node path[i]; positions past them are untouched
    L, B, H, S, Dh = 2, 2, 3, 16, 4
    base = torch.arange(S, dtype=torch.float32).view(1, 1, 1, S, 1).expand(L, B, H, S, Dh).contiguous()
    k, v = base.clone().to(device), (-base).clone().to(device)
    lens = torch.tensor([3, 5], dtype=torch.int32, device=device)
    path = torch.tensor([[0, 2, 5, 6, -1, -1, -1, -1], [1, 2, -1, -1, -1, -1, -1, -1]], dtype=torch.int32,
                        device=device)
    accept_len = torch.tensor([4, 2], dtype=torch.int32, device=device)
    compact_kv(k, v, lens, path, accept_len)
    assert lens.tolist() == [7, 7]
    expect0 = list(range(S))
    expect0[3:7] = [3, 5, 8, 9]
    expect1 = list(range(S))
    expect1[5:7] = [6, 7]
    for b, e in ((0, expect0), (1, expect1)):
        assert k[:, b, :, :, 0].cpu().eq(torch.tensor(e, dtype=torch.float32)).all()
        assert v[:, b, :, :, -1].cpu().eq(-torch.tensor(e, dtype=torch.float32)).all()


def test_compact_kv_single_layer_strided_and_int64_lens(device):
    gen = torch.Generator().manual_seed(3)
    B, H, S, Dh, N = 3, 2, 30, 16, 10
    # [B, S, H, Dh] storage viewed as [B, H, S, Dh]: strided, last dim contiguous
    k = make_cache((B, S, H, Dh), torch.bfloat16, gen).to(device).transpose(1, 2)
    v = make_cache((B, S, H, Dh), torch.bfloat16, gen).to(device).transpose(1, 2)
    path, accept_len = random_paths(B, N, gen)
    path[2, :3] = torch.tensor([2, 5, 7], dtype=torch.int32)
    accept_len[2] = 3
    lens = torch.tensor([0, 7, 20], dtype=torch.int64)
    kw, vw, lw = compact_kv_ref(k.cpu(), v.cpu(), lens, path, accept_len)
    ld = lens.to(device)
    compact_kv(k, v, ld, path.to(device).long(), accept_len.to(device).long())
    assert not k.is_contiguous()
    assert torch.equal(k.cpu(), kw) and torch.equal(v.cpu(), vw)
    assert ld.dtype == torch.int64 and torch.equal(ld.cpu(), lw)


def test_compact_kv_odd_alignment(device):
    # a head dim of 3 fp16 (6 bytes) and an offset view: the narrow-access kernels
    gen = torch.Generator().manual_seed(4)
    big = make_cache((2, 2, 2, 20 * 3 + 1), torch.float16, gen).to(device)
    k = big[..., 1:].unflatten(-1, (20, 3))  # [L, B, H, S, Dh] = [2, 2, 2, 20, 3], storage offset 1
    v = k.clone()
    path = torch.tensor([[1, 2, 4, -1, -1, -1], [0, 3, -1, -1, -1, -1]], dtype=torch.int32)
    accept_len = torch.tensor([3, 2], dtype=torch.int32)
    lens = torch.tensor([4, 11], dtype=torch.int32)
    kw, vw, lw = compact_kv_ref(k.cpu(), v.cpu(), lens, path, accept_len)
    ld = lens.to(device)
    compact_kv(k, v, ld, path.to(device), accept_len.to(device))
    assert torch.equal(k.cpu(), kw) and torch.equal(v.cpu(), vw) and torch.equal(ld.cpu(), lw)


def test_compact_kv_chain_and_empty_rows_only_move_lengths(device):
    gen = torch.Generator().manual_seed(5)
    k = make_cache((2, 3, 2, 12, 8), torch.float32, gen).to(device)
    v = k.clone()
    k0, v0 = k.clone(), v.clone()
    path = torch.tensor([[0, 1, 2, -1], [-1, -1, -1, -1], [0, -1, -1, -1]], dtype=torch.int32, device=device)
    lens = torch.tensor([2, 9, 0], dtype=torch.int32, device=device)
    compact_kv(k, v, lens, path, torch.tensor([3, 0, 1], device=device))
    assert torch.equal(k, k0) and torch.equal(v, v0) and lens.tolist() == [5, 9, 1]


def test_compact_kv_guards_without_validation(device):
    # overflowing / out-of-range entries are skipped, lengths clamped to S; never out of bounds
    L, B, H, S, Dh = 1, 3, 1, 8, 4
    k = torch.arange(S, dtype=torch.float32).view(1, 1, 1, S, 1).expand(L, B, H, S, Dh).contiguous().to(device)
    v = k.clone()
    path = torch.tensor([[1, 3, 5, -1, -1, -1, -1], [0, 9, -1, -1, -1, -1, -1], [1, 2, -1, -1, -1, -1, -1]],
                        dtype=torch.int32, device=device)  # N = 6
    lens = torch.tensor([4, 3, -5], dtype=torch.int32, device=device)
    compact_kv(k, v, lens, path, torch.tensor([3, 9, 2], device=device), validate=False)
    assert lens.tolist() == [7, 8, -5]  # row 1: accept_len clamped to N = 6, then 3 + 6 clamped to S = 8
    assert k[0, 0, 0, :, 0].tolist() == [0, 1, 2, 3, 5, 7, 6, 7]  # step 2 (source 4 + 5 >= S) skipped
    assert k[0, 1, 0, :, 0].tolist() == list(range(S))  # path 9 >= N skipped, 0 is the identity
    assert k[0, 2, 0, :, 0].tolist() == list(range(S))  # negative length: row left alone


def test_compact_kv_bad_inputs(device):
    L, B, H, S, Dh = 1, 2, 1, 8, 4
    k = torch.zeros((L, B, H, S, Dh), device=device)
    v = torch.zeros_like(k)
    lens = torch.tensor([2, 3], dtype=torch.int32, device=device)
    path = torch.tensor([[0, 1, -1], [0, -1, -1]], dtype=torch.int32, device=device)
    acc = torch.tensor([2, 1], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="cache_lens"):
        compact_kv(k, v, torch.tensor([7, 3], dtype=torch.int32, device=device), path, acc)  # 7 + 1 + 1 > 8
    with pytest.raises(ValueError, match="cache overflow"):
        compact_kv(k, v, torch.tensor([2, 8], dtype=torch.int32, device=device), path, acc)
    with pytest.raises(ValueError, match="cache_lens"):
        compact_kv(k, v, lens.float(), path, acc)
    with pytest.raises(ValueError, match="cache_lens"):
        compact_kv(k, v, lens[:1], path, acc)
    with pytest.raises(ValueError, match="accept_len"):
        compact_kv(k, v, lens, path, torch.tensor([3, 1], device=device))
    with pytest.raises(ValueError, match="path"):
        compact_kv(k, v, lens, torch.tensor([[1, 0, -1], [0, -1, -1]], device=device), acc)  # not increasing
    with pytest.raises(ValueError, match="path"):
        compact_kv(k, v, lens, torch.tensor([[0, 2, -1], [0, -1, -1]], device=device), acc)  # node 2 >= N
    with pytest.raises(ValueError, match="v_cache"):
        compact_kv(k, v[..., :2], lens, path, acc)
    with pytest.raises(ValueError, match="v_cache"):
        compact_kv(k, v.half(), lens, path, acc)
    with pytest.raises(ValueError, match="k_cache"):
        compact_kv(k.int(), v.int(), lens, path, acc)
    with pytest.raises(ValueError, match="k_cache"):
        compact_kv(k[0, 0], v[0, 0], lens, path, acc)
    with pytest.raises(ValueError, match="last dim"):
        kt = torch.zeros((L, B, H, Dh, S), device=device).transpose(-1, -2)
        compact_kv(kt, kt.clone(), lens, path, acc)
    if device.type == "cuda":
        with pytest.raises(ValueError, match="path"):
            compact_kv(k, v, lens, path.cpu(), acc)


def test_compact_kv_opcheck(device):
    from kangaroo_kernels.ops.compact_kv import _op

    _op()  # loads the library and registers the fake
    k = torch.randn((2, 1, 2, 10, 4), device=device)
    v = torch.randn((2, 1, 2, 10, 4), device=device)
    torch.library.opcheck(torch.ops.kangaroo_kernels.compact_kv.default,
                          (k, v, torch.tensor([2], dtype=torch.int32, device=device),
                           torch.tensor([[1, 3, -1, -1, -1]], dtype=torch.int32, device=device),
                           torch.tensor([2], dtype=torch.int32, device=device)))


@pytest.mark.cuda
def test_compact_kv_cuda_graph_capture():
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(13)
    L, B, H, S, Dh, N = 4, 3, 2, 64, 64, 16
    k = make_cache((L, B, H, S, Dh), torch.bfloat16, gen).to(dev)
    v = make_cache((L, B, H, S, Dh), torch.bfloat16, gen).to(dev)
    path, accept_len = random_paths(B, N, gen)
    path, accept_len = path.to(dev), accept_len.to(dev)
    lens = torch.tensor([0, 5, 30], dtype=torch.int32, device=dev)
    kw, vw, lw = compact_kv_ref(k.cpu(), v.cpu(), lens.cpu(), path.cpu(), accept_len.cpu())
    g = torch.cuda.CUDAGraph()
    k0, v0, l0 = k.clone(), v.clone(), lens.clone()
    with torch.cuda.graph(g):
        compact_kv(k, v, lens, path, accept_len)
    k.copy_(k0), v.copy_(v0), lens.copy_(l0)  # capture does not run the kernels; start from the same state
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(k.cpu(), kw) and torch.equal(v.cpu(), vw) and torch.equal(lens.cpu(), lw)
