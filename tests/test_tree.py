import numpy as np
import pytest
import torch

from kangaroo_kernels.ops.tree import build_tree, tree_to_flashinfer_mask, tree_to_sglang
from kangaroo_kernels.reference import build_tree_ref
from kangaroo_kernels.types import Tree


def random_parents(kind: str, B: int, N: int, gen: torch.Generator, k: int = 2) -> torch.Tensor:
    """[B, N] int64 topological parents of a chain, a star, a k-ary tree (BFS order) or a random tree."""
    j = torch.arange(N)
    if kind == "chain":
        p = j - 1
    elif kind == "star":
        p = torch.full((N,), -1)
    elif kind == "kary":
        p = j // k - 1
    elif kind == "random":
        return torch.stack([torch.tensor([int(torch.randint(-1, i, (1,), generator=gen)) if i > 0 else -1
                                          for i in range(N)], dtype=torch.int64) for _ in range(B)]) \
            if N > 0 else torch.zeros((B, 0), dtype=torch.int64)
    else:
        raise AssertionError(kind)
    return p.unsqueeze(0).expand(B, N).clone()


def ancestors_bool(parents: list, n: int, N: int) -> np.ndarray:
    """[N, N] bool: row j has i set iff i is an ancestor of j or i == j (independent of the library)."""
    m = np.zeros((N, N), dtype=bool)
    for j in range(n):
        i = j
        while i != -1:
            m[j, i] = True
            i = parents[i]
    return m


def assert_tree_equal(got: Tree, want: Tree):
    for name in Tree._fields:
        assert torch.equal(getattr(got, name).cpu(), getattr(want, name).cpu()), name


@pytest.mark.parametrize("kind,B,N", [("chain", 1, 1), ("chain", 3, 6), ("chain", 2, 33), ("star", 2, 7),
                                      ("kary", 1, 40), ("random", 3, 64), ("random", 3, 31), ("kary", 2, 0),
                                      ("chain", 0, 5)])
def test_build_tree_matches_reference(device, kind, B, N):
    gen = torch.Generator().manual_seed(N * 7 + B)
    parents = random_parents(kind, B, N, gen, k=3)
    num_nodes = torch.randint(0, N + 1, (B,), generator=gen)
    for nn in (None, num_nodes):
        got = build_tree(parents.to(device), None if nn is None else nn.to(device))
        assert got.mask.shape == (B, N, (N + 31) // 32) and got.mask.dtype == torch.int32
        assert_tree_equal(got, build_tree_ref(parents, nn))


def test_build_tree_semantics_independent(device):
    # depth, links and mask checked against a direct construction, not the reference
    gen = torch.Generator().manual_seed(1)
    B, N = 2, 45
    parents = random_parents("random", B, N, gen)
    t = build_tree(parents.to(torch.int32).to(device))
    bits = ((t.mask.cpu().unsqueeze(-1).long() >> torch.arange(32)) & 1).flatten(-2)[..., :N].bool().numpy()
    for b in range(B):
        p = parents[b].tolist()
        assert np.array_equal(bits[b], ancestors_bool(p, N, N))
        assert t.depth[b].tolist() == [int(ancestors_bool(p, N, N)[j].sum()) for j in range(N)]
        kids = {q: [j for j in range(N) if p[j] == q] for q in range(-1, N)}
        assert t.root_first_child[b].item() == (kids[-1][0] if kids[-1] else -1)
        for q in range(N):
            assert t.first_child[b, q].item() == (kids[q][0] if kids[q] else -1)
            sib = kids[p[q]]
            pos = sib.index(q)
            assert t.next_sibling[b, q].item() == (sib[pos + 1] if pos + 1 < len(sib) else -1)


def test_build_tree_padding_and_invalid_parents_without_validation(device):
    # out-of-range / non-topological parents are padding, and so is their subtree (documented kernel guard)
    parents = torch.tensor([[-1, 0, 5, 2, -7, 1, 1 << 20, 0], [-1, -1, 0, 1, 2, 3, 4, 5]])
    num_nodes = torch.tensor([8, 3])
    got = build_tree(parents.to(device), num_nodes.to(device), validate=False)
    assert_tree_equal(got, build_tree_ref(parents, num_nodes))
    assert got.depth[0].tolist() == [1, 2, -1, -1, -1, 3, -1, 2]
    assert got.depth[1].tolist() == [1, 1, 2, -1, -1, -1, -1, -1]
    assert got.first_child[0].tolist() == [1, 5, -1, -1, -1, -1, -1, -1]
    assert got.next_sibling[0].tolist() == [-1, 7, -1, -1, -1, -1, -1, -1]
    # garbage num_nodes is clamped to [0, N]
    got = build_tree(parents.to(device), torch.tensor([-3, 99]).to(device), validate=False)
    assert_tree_equal(got, build_tree_ref(parents, torch.tensor([0, 8])))


def test_build_tree_random_garbage_matches_reference(device):
    gen = torch.Generator().manual_seed(5)
    parents = torch.randint(-3, 70, (3, 64), generator=gen)
    got = build_tree(parents.to(device), validate=False)
    assert_tree_equal(got, build_tree_ref(parents))


def test_build_tree_out_buffers_reused(device):
    gen = torch.Generator().manual_seed(2)
    B, N = 3, 40
    out = Tree(*(torch.full(s, 123, dtype=torch.int32, device=device)
                 for s in ((B, N), (B, N, 2), (B, N), (B, N), (B,))), None)
    for kind in ("random", "chain"):
        parents = random_parents(kind, B, N, gen)
        got = build_tree(parents.to(device), out=out)
        assert got.depth.data_ptr() == out.depth.data_ptr() and got.mask.data_ptr() == out.mask.data_ptr()
        assert_tree_equal(got, build_tree_ref(parents))


def test_build_tree_bad_inputs(device):
    good = torch.tensor([[-1, 0, 1]], device=device)
    with pytest.raises(ValueError, match="parents"):
        build_tree(good.float())
    with pytest.raises(ValueError, match="parents"):
        build_tree(good[0])
    with pytest.raises(ValueError, match="parents"):
        build_tree(torch.tensor([[-1, 1, 0]], device=device))  # not topological
    with pytest.raises(ValueError, match="parents"):
        build_tree(torch.tensor([[-1, -2, 0]], device=device))
    with pytest.raises(ValueError, match="num_nodes"):
        build_tree(good, torch.tensor([4], device=device))
    with pytest.raises(ValueError, match="num_nodes"):
        build_tree(good, torch.tensor([1, 2], device=device))
    # a non-topological parent beyond num_nodes is padding, hence allowed
    build_tree(torch.tensor([[-1, 0, 7]], device=device), torch.tensor([2], device=device))
    bad_out = Tree(*(torch.empty(s, dtype=torch.int32, device=device) for s in ((1, 3), (1, 3, 2), (1, 3),
                                                                                 (1, 3), (1,))), None)
    with pytest.raises(ValueError, match="out.mask"):
        build_tree(good, out=bad_out)
    if device.type == "cuda":
        with pytest.raises(ValueError, match="num_nodes"):
            build_tree(good, torch.tensor([3]))


def _flashinfer_expected(parents, num_nodes, prefix, N):
    """custom_mask and per-request np.packbits(bitorder='little') segments, built without the library."""
    flat, packed, indptr = [], [], [0]
    for b, p in enumerate(parents.tolist()):
        m = np.concatenate([np.ones((N, prefix[b]), dtype=bool), ancestors_bool(p, num_nodes[b], N)], axis=1)
        seg = m.reshape(-1)
        flat.append(seg)
        pk = np.packbits(seg, bitorder="little")
        packed.append(pk)
        indptr.append(indptr[-1] + len(pk))
    return np.concatenate(flat), np.concatenate(packed), indptr


@pytest.mark.parametrize("kind,B,N,prefix", [("random", 3, 13, [0, 5, 17]), ("chain", 1, 6, 9),
                                             ("kary", 2, 40, [3, 0]), ("star", 1, 1, [2])])
def test_tree_to_flashinfer_mask(device, kind, B, N, prefix):
    gen = torch.Generator().manual_seed(N)
    parents = random_parents(kind, B, N, gen)
    num_nodes = torch.randint(0, N + 1, (B,), generator=gen) if kind == "random" else torch.full((B,), N)
    tree = build_tree(parents.to(device), num_nodes.to(device))
    fm = tree_to_flashinfer_mask(tree, prefix)
    plist = [prefix] * B if isinstance(prefix, int) else prefix
    flat, packed, indptr = _flashinfer_expected(parents, num_nodes.tolist(), plist, N)
    assert fm.custom_mask.dtype == torch.bool and fm.packed_custom_mask.dtype == torch.uint8
    assert np.array_equal(fm.custom_mask.cpu().numpy(), flat)
    assert np.array_equal(fm.packed_custom_mask.cpu().numpy(), packed)
    assert fm.mask_indptr.tolist() == indptr and fm.mask_indptr.dtype == torch.int32
    # a CPU tensor of prefix lengths is accepted; a device tensor or a wrong count is not
    assert torch.equal(tree_to_flashinfer_mask(tree, torch.tensor(plist)).packed_custom_mask, fm.packed_custom_mask)
    with pytest.raises(ValueError, match="prefix_lens"):
        tree_to_flashinfer_mask(tree, plist + [1])


def _parents_from_sglang(sg, N):
    """Walk retrive_next_token / retrive_next_sibling from SGLang's root (index 0) back to our parents."""
    B = sg.retrive_index.shape[0]
    out = torch.full((B, N), -9, dtype=torch.int64)
    nt, ns = sg.retrive_next_token.cpu().tolist(), sg.retrive_next_sibling.cpu().tolist()
    for b in range(B):
        stack = [0]
        while stack:
            q = stack.pop()
            c, prev = nt[b][q], -1
            while c != -1:
                assert c > prev  # children in increasing index order
                out[b, c - 1] = q - 1
                stack.append(c)
                prev, c = c, ns[b][c]
    return out


@pytest.mark.parametrize("kind,B,N", [("random", 3, 64), ("chain", 2, 5), ("star", 1, 9), ("kary", 1, 0)])
def test_tree_to_sglang(device, kind, B, N):
    gen = torch.Generator().manual_seed(3 + N)
    parents = random_parents(kind, B, N, gen)
    num_nodes = torch.randint(0, N + 1, (B,), generator=gen)
    tree = build_tree(parents.to(device), num_nodes.to(device))
    draft = torch.randint(0, 1000, (B, N), generator=gen)
    root = torch.randint(0, 1000, (B,), generator=gen)
    sg = tree_to_sglang(tree, draft.to(device), root.to(device))
    for t in sg:
        assert t.dtype == torch.int64 and t.shape == (B, N + 1) and t.device == device
    want = torch.where(torch.arange(N) < num_nodes[:, None], parents, torch.full_like(parents, -9))
    assert torch.equal(_parents_from_sglang(sg, N), want)
    assert torch.equal(sg.retrive_index.cpu(), torch.arange(B * (N + 1)).view(B, N + 1))
    assert torch.equal(sg.candidates.cpu(), torch.cat([root[:, None], draft], 1))
    assert (tree_to_sglang(tree, draft.to(device)).candidates[:, 0] == -1).all()


def test_build_tree_opcheck(device):
    from kangaroo_kernels.ops.tree import _op

    _op()  # loads the library and registers the fake
    parents = torch.tensor([[-1, 0, 0, 1, -1], [-1, 0, 1, 7, 2]], dtype=torch.int32, device=device)
    outs = [torch.empty(s, dtype=torch.int32, device=device) for s in ((2, 5), (2, 5, 1), (2, 5), (2, 5), (2,))]
    torch.library.opcheck(torch.ops.kangaroo_kernels.build_tree.default,
                          (parents, torch.tensor([5, 4], dtype=torch.int32, device=device), *outs))
