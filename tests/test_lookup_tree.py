import pytest
import torch

from kangaroo_kernels.ops.lookup_tree import merge_lookup_tree
from kangaroo_kernels.ops.tree import build_tree
from kangaroo_kernels.ops.verify_greedy import verify_greedy
from kangaroo_kernels.reference import merge_lookup_tree_ref, verify_greedy_ref
from kangaroo_kernels.types import LookupTree


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request):
    return torch.device(request.param)


def decoder_tree_parents(gamma: int, K: int):
    """The tree layout of python/kangaroo/generate.py (DecodeState.tree_parents): chain nodes 0..γ-1, then the
    K-1 siblings of step i at γ + i (K-1) + r (leaves under chain node i - 1)."""
    parents = list(range(-1, gamma - 1))
    for i in range(gamma):
        parents += [i - 1] * (K - 1)
    return parents


def t32(x, device):
    return torch.tensor(x, dtype=torch.int32, device=device)


def assert_tree_equal(got: LookupTree, want: LookupTree):
    for name in LookupTree._fields:
        g, w = getattr(got, name), getattr(want, name)
        assert g.dtype == torch.int32, name
        assert torch.equal(g.cpu(), w.cpu()), (name, g, w)


def check_invariants(tree: LookupTree, N: int):
    # independent of the reference: topological, absent nodes marked, private nodes form one path
    B, NM = tree.tokens.shape
    M = NM - N
    j = torch.arange(NM)
    par, tok, src = tree.parents.cpu(), tree.tokens.cpu(), tree.source.cpu()
    assert bool(((par >= -1) & (par < j)).all())
    assert bool(((tok[:, N:] >= 0) == (src[:, N:] == 2)).all())  # a lookup slot is a node iff it is private
    assert bool(((tok[:, :N] >= 0) == ((src[:, :N] & 1) == 1)).all())
    for b in range(B):
        nodes = [x for x in tree.lookup_nodes[b].tolist() if x >= 0]
        ns = int(tree.n_shared[b])
        assert all(x < N for x in nodes[:ns]) and nodes[ns:] == list(range(N + ns, N + len(nodes)))
        prev = -1
        for x in nodes:  # the lookup branch is a root path
            assert int(par[b, x]) == prev and (int(src[b, x]) & 2)
            prev = x
        assert int((src[b] & 2).ne(0).sum()) == len(nodes)
    return M


def check_lookup_accepted(tree: LookupTree, look: torch.Tensor, nl, bonus: int = 1000):
    """A target whose next token depends only on the depth and spells the lookup branch: verify_greedy over the
    merged tree (build_tree depth + parents) must accept exactly the lookup nodes, then emit the bonus."""
    B = tree.tokens.shape[0]
    depth = build_tree(tree.parents).depth  # root children 1
    seq = torch.full((B, tree.tokens.shape[1] + 2), bonus, dtype=torch.int64)
    for b in range(B):
        seq[b, :nl[b]] = look[b, :nl[b]].cpu()
    dev = tree.tokens.device
    rows = torch.cat([torch.zeros((B, 1), dtype=torch.int64), depth.cpu().long()], 1)  # the depth of each row
    target = torch.gather(seq, 1, rows).to(dev)
    acc = verify_greedy(tree.tokens, target, parents=tree.parents)
    for b in range(B):
        a = int(acc.accept_len[b])
        assert a == nl[b], f"row {b}: accepted {a} of the {nl[b]} lookup tokens"
        assert acc.path[b, :a].tolist() == tree.lookup_nodes[b, :a].tolist()
        assert acc.tokens[b, :a + 1].tolist() == seq[b, :a].tolist() + [bonus]
        for x in acc.path[b, :a].tolist():
            assert int(tree.source[b, x]) & 2


def test_merge_chain_shared_prefix_cases(device):
    # chain G = 4 (ragged: row 3 drafted 2 tokens), lookup M = 5 with ragged n_look
    draft = t32([[5, 6, 7, 8], [5, 6, 7, 8], [5, 6, 7, 8], [5, 6, -1, -1], [5, 6, 7, 8], [1, 2, 3, 4]], device)
    look = t32([[9, 9, 9, -1, -1],  # shared prefix 0: everything private under the root
                [5, 6, 9, 1, -1],   # partial: 2 shared, then private under chain node 1
                [5, 6, 7, 8, 2],    # full chain shared, lookup longer than the chain: node G + 4 under node 3
                [5, 6, 7, 8, -1],   # ragged chain: shares 2 nodes, the rest private under node 1
                [5, 6, 7, 8, 1],    # n_look = 0: no lookup at all
                [1, 2, 3, -1, -1]], device)  # full lookup shared inside the chain: no private node
    n_look = t32([3, 4, 5, 4, 0, 3], device)
    got = merge_lookup_tree(draft, look, n_look=n_look)
    G = 4
    assert got.n_shared.tolist() == [0, 2, 4, 2, 0, 3]
    assert got.lookup_nodes.tolist() == [[4, 5, 6, -1, -1], [0, 1, 6, 7, -1], [0, 1, 2, 3, 8], [0, 1, 6, 7, -1],
                                         [-1] * 5, [0, 1, 2, -1, -1]]
    assert got.tokens[:, G:].tolist() == [[9, 9, 9, -1, -1], [-1, -1, 9, 1, -1], [-1, -1, -1, -1, 2],
                                          [-1, -1, 7, 8, -1], [-1] * 5, [-1] * 5]
    assert got.parents[:, :G].tolist() == [[-1, 0, 1, 2]] * 6
    assert got.parents[:, G:].tolist() == [[-1, 4, 5, -1, -1], [-1, -1, 1, 6, -1], [-1, -1, -1, -1, 3],
                                           [-1, -1, 1, 6, -1], [-1] * 5, [-1] * 5]
    assert got.source.tolist() == [[1, 1, 1, 1, 2, 2, 2, 0, 0], [3, 3, 1, 1, 0, 0, 2, 2, 0],
                                   [3, 3, 3, 3, 0, 0, 0, 0, 2], [3, 3, 0, 0, 0, 0, 2, 2, 0],
                                   [1, 1, 1, 1, 0, 0, 0, 0, 0], [3, 3, 3, 1, 0, 0, 0, 0, 0]]
    assert torch.equal(got.tokens[:, :G], draft)
    assert_tree_equal(got, merge_lookup_tree_ref(draft, look, n_look=n_look))
    check_invariants(got, G)
    check_lookup_accepted(got, look, n_look.tolist())


def test_merge_tree_mode_shares_siblings(device):
    # the decoder's tree layout γ = 3, K = 2: chain 0,1,2; siblings 3 (under root), 4 (under 0), 5 (under 1)
    parents = t32([decoder_tree_parents(3, 2)] * 4, device)
    draft = t32([[5, 6, 7, 15, 16, 17]] * 4, device)
    look = t32([[15, 1, 2],    # a sibling of step 1 is shared, the rest private under it
                [5, 16, 3],    # chain node 0, then its sibling node 4, then private under 4
                [5, 6, 7],     # the chain
                [5, 9, 9]], device)  # node 0, then private under node 0 (no sibling carries 9)
    got = merge_lookup_tree(draft, look, parents=parents)
    N = 6
    assert got.n_shared.tolist() == [1, 2, 3, 1]
    assert got.lookup_nodes.tolist() == [[3, 7, 8], [0, 4, 8], [0, 1, 2], [0, 7, 8]]
    assert got.parents[:, N:].tolist() == [[-1, 3, 7], [-1, -1, 4], [-1, -1, -1], [-1, 0, 7]]
    assert torch.equal(got.parents[:, :N], parents)
    assert_tree_equal(got, merge_lookup_tree_ref(draft, look, parents=parents))
    check_invariants(got, N)
    check_lookup_accepted(got, look, [3, 3, 3, 3])


def test_merge_duplicate_sibling_tokens_follow_the_verifier(device):
    # two children of the root carry 4: the verifier always takes node 0, so the lookup shares node 0 and its
    # continuation goes under node 0, never under the unreachable duplicate (node 1, whose child 2 matches)
    parents = t32([[-1, -1, 1]], device)
    draft = t32([[4, 4, 8]], device)
    look = t32([[4, 8]], device)
    got = merge_lookup_tree(draft, look, parents=parents)
    assert got.lookup_nodes.tolist() == [[0, 4]] and got.parents[0, 4].item() == 0
    assert_tree_equal(got, merge_lookup_tree_ref(draft, look, parents=parents))
    check_lookup_accepted(got, look, [2])


def test_merge_planted_wrong_parent_is_caught(device):
    # control: the composition check must fail when a lookup token hangs under the wrong parent
    draft = t32([[5, 6, 7, 8], [5, 6, 7, 8]], device)
    look = t32([[5, 6, 9, 1], [3, 4, 5, -1]], device)
    good = merge_lookup_tree(draft, look)
    check_lookup_accepted(good, look, [4, 3])
    bugs = []
    p = good.parents.clone()
    p[0, 4 + 2] = 0  # first private node under chain node 0 instead of node 1
    bugs.append(p)
    p = good.parents.clone()
    p[1, 4 + 2] = -1  # third private node under the root instead of the previous lookup node
    bugs.append(p)
    p = good.parents.clone()
    p[0, 4 + 2] = 2  # under the chain node that disagreed
    bugs.append(p)
    for p in bugs:
        with pytest.raises(AssertionError):
            check_lookup_accepted(good._replace(parents=p), look, [4, 3])
    # and a lookup token duplicated instead of shared: its private subtree is unreachable
    dup = good._replace(tokens=good.tokens.clone(), parents=good.parents.clone())
    dup.tokens[0, 4:6] = t32([5, 6], device)
    dup.parents[0, 4:7] = t32([-1, 4, 5], device)
    with pytest.raises(AssertionError):
        check_lookup_accepted(dup, look, [4, 3])


def test_merge_chain_target_accepts_as_without_lookup(device):
    # a target that follows the chain: the merged tree accepts what the chain alone accepts (lookup nodes come
    # after the chain nodes, so the verifier prefers the chain)
    gen = torch.Generator().manual_seed(5)
    B, G, M, V = 5, 6, 5, 3
    draft = torch.randint(0, V, (B, G), generator=gen).to(torch.int32)
    look = torch.randint(0, V, (B, M), generator=gen).to(torch.int32)
    target_chain = torch.randint(0, V, (B, G + 1), generator=gen).to(torch.int32)
    target_chain[:, :G] = torch.where(torch.rand(B, G, generator=gen) < 0.8, draft, target_chain[:, :G])
    tree = merge_lookup_tree(draft.to(device), look.to(device))
    depth = build_tree(tree.parents).depth.cpu()
    # the chain target extended to every node by depth (lookup nodes at depth d see the chain's row d)
    rows = torch.cat([torch.zeros((B, 1), dtype=torch.long), depth.long().clamp(max=G)], 1)
    target = torch.gather(target_chain, 1, rows)
    got = verify_greedy(tree.tokens, target.to(device), parents=tree.parents)
    alone = verify_greedy_ref(draft, target_chain)
    for b in range(B):
        a = int(alone.accept_len[b])
        assert int(got.accept_len[b]) >= a
        assert got.path[b, :a].tolist() == alone.path[b, :a].tolist()


@pytest.mark.parametrize("kind,B,N,M,V", [
    ("chain", 3, 6, 5, 3), ("chain", 4, 1, 8, 2), ("chain", 2, 0, 3, 4), ("chain", 3, 9, 2, 50),
    ("decoder", 3, 12, 6, 3), ("decoder", 2, 6, 7, 2), ("random", 4, 17, 6, 3), ("random", 2, 33, 9, 2),
    ("random", 3, 1, 1, 2), ("decoder", 70, 8, 8, 2),  # B = 70: more rows than one CPU work chunk (64)
])
def test_merge_matches_reference(device, kind, B, N, M, V):
    gen = torch.Generator().manual_seed(N * 100 + M * 10 + V)
    for trial in range(6):
        if kind == "chain":
            parents = None
        elif kind == "decoder":
            K = 3 if N % 3 == 0 and trial % 2 else 2
            parents = torch.tensor([decoder_tree_parents(N // K, K)] * B)
        else:
            parents = torch.stack([torch.tensor([int(torch.randint(-1, max(i, 0), (1,), generator=gen)) if i else -1
                                                 for i in range(N)], dtype=torch.long) for _ in range(B)]) \
                if N else torch.zeros((B, 0), dtype=torch.long)
        draft = torch.randint(-1, V, (B, N), generator=gen)
        look = torch.randint(0, V, (B, M), generator=gen)
        if trial % 3 == 1:
            look[torch.rand((B, M), generator=gen) < 0.2] = -1
        n_look = torch.randint(0, M + 1, (B,), generator=gen) if trial % 2 else None
        dtype = torch.int64 if trial % 2 else torch.int32
        kw = dict(n_look=n_look.to(device) if n_look is not None else None,
                  parents=parents.to(device).to(dtype) if parents is not None else None)
        got = merge_lookup_tree(draft.to(dtype).to(device), look.to(dtype).to(device), **kw)
        assert_tree_equal(got, merge_lookup_tree_ref(draft, look, n_look=n_look, parents=parents))
        check_invariants(got, N)
        if kind == "chain":  # the same chain passed as an explicit tree: the general path agrees
            chain_par = (torch.arange(N) - 1).expand(B, N).to(device)
            assert_tree_equal(merge_lookup_tree(draft.to(device), look.to(device), n_look=kw["n_look"],
                                                parents=chain_par), got)
        live = (look >= 0).long().cumprod(1)
        if n_look is not None:
            live &= (torch.arange(M) < n_look[:, None]).long()
        check_lookup_accepted(got, look, live.sum(1).tolist())


def test_merge_out_buffers_and_guards(device):
    draft = t32([[5, 6, 7], [1, 2, 3]], device)
    look = t32([[5, 9], [1, 2]], device)
    out = LookupTree(*(torch.full(s, 77, dtype=torch.int32, device=device) for s in ((2, 5), (2, 5), (2, 5), (2,),
                                                                                     (2, 2))))
    res = merge_lookup_tree(draft, look, out=out)
    assert res is out
    assert_tree_equal(out, merge_lookup_tree_ref(draft, look))
    # without validation, a base node whose parent is not topological is never shared (the verifier never
    # reaches it either), and nothing is read out of bounds
    parents = t32([[-1, 5, 1], [-1, 0, 1]], device)
    draft, look = t32([[5, 9, 9], [1, 2, 3]], device), t32([[5, 9], [1, 2]], device)
    got = merge_lookup_tree(draft, look, parents=parents, validate=False)
    assert got.lookup_nodes.tolist() == [[0, 4], [0, 1]]
    assert_tree_equal(got, merge_lookup_tree_ref(draft, look, parents=parents))


def test_merge_bad_inputs(device):
    draft = t32([[5, 6, 7]], device)
    look = t32([[5, 9]], device)
    bad = [
        ("draft", dict(draft=draft.float())),
        ("draft", dict(draft=draft[0])),
        ("draft", dict(draft=t32([[5, -2, 7]], device))),
        ("look", dict(look=look.float())),
        ("look", dict(look=t32([[5, 9], [1, 1]], device))),
        ("look", dict(look=t32([[-3, 9]], device))),
        ("look", dict(look=torch.tensor([[5, 2**32 + 5]], device=device))),  # would wrap to 5 in int32
        ("draft", dict(draft=torch.tensor([[5, 6, 2**31]], device=device))),
        ("look", dict(look=torch.zeros((1, 0), dtype=torch.int32, device=device))),
        ("n_look", dict(n_look=t32([3], device))),
        ("n_look", dict(n_look=t32([1, 1], device))),
        ("n_look", dict(n_look=torch.tensor([1.0], device=device))),
        ("parents", dict(parents=t32([[-1, 1, 0]], device))),
        ("parents", dict(parents=t32([[-1, 0]], device))),
        ("parents", dict(parents=t32([[-2, 0, 1]], device))),
        ("out must be a LookupTree", dict(out=(1, 2))),
        ("out.source", dict(out=LookupTree(*(torch.zeros(s, dtype=torch.int32, device=device)
                                             for s in ((1, 5), (1, 5), (1, 4), (1,), (1, 2)))))),
    ]
    for name, kw in bad:
        args = dict(draft=draft, look=look)
        args.update(kw)
        with pytest.raises(ValueError, match=name):
            merge_lookup_tree(args.pop("draft"), args.pop("look"), **args)
    if device.type == "cuda":
        with pytest.raises(ValueError, match="look"):
            merge_lookup_tree(draft, look.cpu())


def test_merge_torch_compile_fullgraph(device):
    import torch._dynamo

    def step(draft, look, n_look, parents):
        return merge_lookup_tree(draft, look, n_look=n_look, parents=parents, validate=False)

    parents = t32([decoder_tree_parents(3, 2)] * 2, device)
    draft = t32([[5, 6, 7, 15, 16, 17], [1, 2, 3, 4, 5, 6]], device)
    look = t32([[15, 1, 2], [1, 2, 9]], device)
    n_look = t32([3, 2], device)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for par in (parents, None):
        assert_tree_equal(LookupTree(*compiled(draft, look, n_look, par)), step(draft, look, n_look, par))


@pytest.mark.cuda
def test_lookup_branch_cuda_graph_capture():
    # ngram_lookup -> merge_lookup_tree -> verify_greedy captured in one CUDA graph (no host sync anywhere)
    from kangaroo_kernels.ops.ngram_lookup import ngram_lookup

    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(1)
    B, S, G, M = 4, 300, 5, 4
    hist = torch.randint(0, 4, (B, S), generator=gen).to(torch.int32).to(dev)
    lens = torch.full((B,), S, dtype=torch.int32, device=dev)
    draft = torch.randint(0, 4, (B, G), generator=gen).to(torch.int32).to(dev)
    target = torch.randint(0, 4, (B, G + M + 1), generator=gen).to(torch.int32).to(dev)
    match = ngram_lookup(hist, lens, 1, 3, M)
    tree = merge_lookup_tree(draft, match.tokens, n_look=match.n)
    acc = verify_greedy(tree.tokens, target, parents=tree.parents)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        ngram_lookup(hist, lens, 1, 3, M, out=match)
        merge_lookup_tree(draft, match.tokens, n_look=match.n, out=tree)
        verify_greedy(tree.tokens, target, parents=tree.parents, out=acc)
    hist.copy_(torch.randint(0, 4, (B, S), generator=gen))
    g.replay()
    torch.cuda.synchronize()
    m = ngram_lookup(hist.cpu(), lens.cpu(), 1, 3, M)
    t = merge_lookup_tree_ref(draft.cpu(), m.tokens, n_look=m.n)
    assert_tree_equal(tree, t)
    want = verify_greedy_ref(t.tokens, target.cpu(), parents=t.parents)
    assert torch.equal(acc.accept_len.cpu(), want.accept_len) and torch.equal(acc.path.cpu(), want.path)
