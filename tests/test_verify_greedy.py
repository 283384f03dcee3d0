import pytest
import torch
from test_tree import random_parents

from kangaroo_kernels.ops.tree import build_tree
from kangaroo_kernels.ops.verify_greedy import verify_greedy
from kangaroo_kernels.reference import verify_greedy_ref
from kangaroo_kernels.types import Accepted


def planted_drafts(target_tok: torch.Tensor, parents, p_match: float, gen: torch.Generator, V: int):
    """Drafts that equal their parent row's target token with probability p_match (so walks go deep), else a
    different id. parents None: a chain."""
    B, N1 = target_tok.shape
    N = N1 - 1
    par = parents if parents is not None else (torch.arange(N) - 1).expand(B, N)
    want = torch.gather(target_tok, 1, (par + 1).clamp(min=0).long())  # the token that node j must carry
    other = (want + torch.randint(1, max(V, 2), (B, N), generator=gen)) % max(V, 2)
    hit = torch.rand((B, N), generator=gen) < p_match
    return torch.where(hit, want, other if V > 1 else torch.full_like(want, -1))


def assert_accepted_equal(got: Accepted, want: Accepted):
    for name in Accepted._fields:
        assert getattr(got, name).dtype == torch.int32, name
        assert torch.equal(getattr(got, name).cpu(), getattr(want, name).cpu()), name


def check_invariants(acc: Accepted, draft: torch.Tensor):
    # independent of the reference: path and tokens agree with the drafts, padding is -1
    B, N = draft.shape
    for b in range(B):
        a = int(acc.accept_len[b])
        path, tok = acc.path[b].tolist(), acc.tokens[b].tolist()
        assert path[a:] == [-1] * (N + 1 - a) and tok[a + 1:] == [-1] * (N - a)
        assert tok[:a] == [int(draft[b, j]) for j in path[:a]]
        assert tok[a] >= 0 and path[:a] == sorted(path[:a])


@pytest.mark.parametrize("kind,B,N,V,dtype", [
    ("chain", 1, 6, 7, torch.float32), ("chain", 3, 6, 32000, torch.bfloat16), ("chain", 2, 5, 1, torch.float16),
    ("random", 3, 64, 32001, torch.float16), ("kary", 1, 40, 7, torch.float32), ("star", 2, 9, 32, torch.bfloat16),
    ("random", 1, 3, 151936, torch.float32), ("chain", 1, 2, 151936, torch.bfloat16),
    ("random", 3, 17, 33, torch.float32),
])
def test_verify_greedy_matches_reference(device, kind, B, N, V, dtype):
    gen = torch.Generator().manual_seed(V + N)
    logits = torch.randn((B, N + 1, V), generator=gen).to(dtype)
    target_tok = logits.float().argmax(-1)
    parents = None if kind == "chain" else random_parents(kind, B, N, gen, k=3)
    for p_match in (0.9, 0.5):
        draft = planted_drafts(target_tok, parents, p_match, gen, V)
        if B == 3:
            draft[1, N // 2:] = -1  # a ragged row
        got = verify_greedy(draft.to(device), logits.to(device),
                            parents=None if parents is None else parents.to(device))
        want = verify_greedy_ref(draft, logits, parents=parents)
        assert_accepted_equal(got, want)
        check_invariants(got, draft)


def test_verify_greedy_all_accepted_first_rejected_and_empty(device):
    gen = torch.Generator().manual_seed(0)
    B, N, V = 3, 5, 50
    logits = torch.randn((B, N + 1, V), generator=gen)
    am = logits.argmax(-1)
    draft = am[:, :N].clone()  # node i carries argmax of row i: the whole chain is accepted
    draft[1, 0] = (am[1, 0] + 1) % V  # row 1 rejected at the first draft
    draft[2] = -1  # row 2 has no drafts
    got = verify_greedy(draft.to(device), logits.to(device))
    assert got.accept_len.tolist() == [N, 0, 0]
    assert got.path[0].tolist() == [0, 1, 2, 3, 4, -1]
    assert got.tokens[0].tolist() == am[0].tolist()  # the drafts, then the bonus token from the last row
    assert got.tokens[1].tolist() == [int(am[1, 0])] + [-1] * N
    assert got.tokens[2].tolist() == [int(am[2, 0])] + [-1] * N
    # N = 0: only the root row, which gives the next token
    got = verify_greedy(torch.empty((B, 0), dtype=torch.int32, device=device), logits[:, :1].to(device))
    assert got.accept_len.tolist() == [0] * B and got.tokens[:, 0].tolist() == am[:, 0].tolist()
    assert got.path.tolist() == [[-1]] * B
    # B = 0
    got = verify_greedy(torch.empty((0, 4), dtype=torch.int32, device=device), torch.empty((0, 5, V), device=device))
    assert got.path.shape == (0, 5)


def test_verify_greedy_nan_ties_and_signed_zero(device):
    # torch.argmax semantics, checked against explicit expectations (not only the reference)
    V = 37
    rows = torch.randn((6, V), generator=torch.Generator().manual_seed(4))
    rows[0, 11], rows[0, 29] = float("nan"), float("nan")     # first NaN wins
    rows[1, 3] = float("nan")
    rows[1, 4] = float("inf")                                  # NaN beats +inf
    rows[2] = 0.0
    rows[2, 5] = -0.0                                          # ties (and -0 == +0): lowest index
    rows[3] = float("-inf")                                    # all -inf: index 0
    rows[4, 8] = rows[4, 30] = 50.0                            # tie at the max: lowest index
    rows[5, :] = float("nan")
    want = [11, 3, 0, 0, 8, 0]
    assert torch.argmax(rows, -1).tolist() == want  # the semantics we promise
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        logits = rows.to(dtype).view(1, 6, V)
        draft = torch.tensor([want[:5]], dtype=torch.int32)
        got = verify_greedy(draft.to(device), logits.to(device))
        assert got.accept_len.tolist() == [5] and got.tokens[0].tolist() == want
        chain = torch.tensor([[-1, 0, 1, 2, 3]], device=device)
        got = verify_greedy(draft.to(device), logits.to(device), parents=chain)
        assert got.accept_len.tolist() == [5]


def test_verify_greedy_big_vocab_nan_and_alignment(device):
    # odd V (rows not 16-byte aligned) and the maximum near both ends of a row
    V = 32001
    logits = torch.randn((1, 4, V), generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    logits[0, 0, V - 1] = 100.0
    logits[0, 1, 0] = 100.0
    logits[0, 2, 12345] = float("nan")
    logits[0, 3, V - 2] = 100.0
    draft = torch.tensor([[V - 1, 0, 12345]])
    got = verify_greedy(draft.to(device), logits.to(device))
    assert got.accept_len.tolist() == [3] and got.tokens[0].tolist() == [V - 1, 0, 12345, V - 2]


def test_verify_greedy_token_target_and_int64(device):
    gen = torch.Generator().manual_seed(8)
    B, N, V = 3, 64, 1000
    parents = random_parents("random", B, N, gen)
    target = torch.randint(0, V, (B, N + 1), generator=gen)
    draft = planted_drafts(target, parents, 0.8, gen, V)
    want = verify_greedy_ref(draft, target, parents=parents)
    for t in (target, target.to(torch.int32)):
        got = verify_greedy(draft.to(device), t.to(device), parents=parents.to(device))  # int64 drafts/parents
        assert_accepted_equal(got, want)
    # the same walk from logits whose argmax is the target
    logits = torch.nn.functional.one_hot(target, V).float()
    assert_accepted_equal(verify_greedy(draft.to(device), logits.to(device), parents=parents.to(device)), want)


def test_verify_greedy_tree_argument_skips_padding(device):
    parents = torch.tensor([[-1, 0, 1, 1], [-1, 0, 1, 2]])
    target = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 8, 9]])
    draft = torch.tensor([[5, 6, 7, 7], [5, 6, 7, 8]])
    tree = build_tree(parents.to(device), torch.tensor([4, 2], device=device))
    got = verify_greedy(draft.to(device), target.to(device), tree=tree)
    assert got.accept_len.tolist() == [3, 2]  # row 1: nodes 2, 3 are padding although their drafts match
    assert got.path.tolist() == [[0, 1, 2, -1, -1], [0, 1, -1, -1, -1]]
    assert got.tokens.tolist() == [[5, 6, 7, 8, -1], [5, 6, 7, -1, -1]]
    assert_accepted_equal(verify_greedy(draft.to(device), target.to(device), parents=parents.to(device)),
                          verify_greedy_ref(draft, target, parents=parents))


def test_verify_greedy_out_buffers_reused(device):
    gen = torch.Generator().manual_seed(9)
    B, N, V = 3, 12, 100
    out = Accepted(torch.full((B,), 77, dtype=torch.int32, device=device),
                   torch.full((B, N + 1), 77, dtype=torch.int32, device=device),
                   torch.full((B, N + 1), 77, dtype=torch.int32, device=device))
    for p_match in (1.0, 0.3):
        logits = torch.randn((B, N + 1, V), generator=gen)
        parents = random_parents("random", B, N, gen)
        draft = planted_drafts(logits.argmax(-1), parents, p_match, gen, V)
        got = verify_greedy(draft.to(device), logits.to(device), parents=parents.to(device), out=out)
        assert got.path.data_ptr() == out.path.data_ptr()
        assert_accepted_equal(got, verify_greedy_ref(draft, logits, parents=parents))


def test_verify_greedy_guards_without_validation(device):
    # invalid parents are never reached, out-of-vocabulary drafts never match: same as the reference
    gen = torch.Generator().manual_seed(10)
    B, N, V = 3, 40, 64
    logits = torch.randn((B, N + 1, V), generator=gen)
    parents = torch.randint(-4, N + 5, (B, N), generator=gen)
    draft = planted_drafts(logits.argmax(-1), parents.clamp(-1, N - 1), 0.9, gen, V)
    draft[:, ::5] += V
    got = verify_greedy(draft.to(device), logits.to(device), parents=parents.to(device), validate=False)
    assert_accepted_equal(got, verify_greedy_ref(draft, logits, parents=parents))


def test_verify_greedy_bad_inputs(device):
    B, N, V = 2, 3, 10
    draft = torch.zeros((B, N), dtype=torch.int32, device=device)
    logits = torch.zeros((B, N + 1, V), device=device)
    with pytest.raises(ValueError, match="draft_tokens"):
        verify_greedy(draft.float(), logits)
    with pytest.raises(ValueError, match="draft_tokens"):
        verify_greedy(draft[0], logits)
    with pytest.raises(ValueError, match="target"):
        verify_greedy(draft, logits[:, :N])
    with pytest.raises(ValueError, match="target"):
        verify_greedy(draft, logits.to(torch.float64))
    with pytest.raises(ValueError, match="target"):
        verify_greedy(draft, torch.zeros((B, N + 1, 0), device=device))
    with pytest.raises(ValueError, match="draft_tokens"):
        verify_greedy(draft + V, logits)  # ids >= V
    with pytest.raises(ValueError, match="draft_tokens"):
        verify_greedy(draft - 2, logits)
    with pytest.raises(ValueError, match="target"):
        verify_greedy(draft, torch.full((B, N + 1), -1, device=device))
    with pytest.raises(ValueError, match="parents"):
        verify_greedy(draft, logits, parents=torch.tensor([[-1, 0, 2], [-1, 0, 1]], device=device))
    with pytest.raises(ValueError, match="parents"):
        verify_greedy(draft, logits, parents=torch.tensor([[-1, 0]], device=device))
    with pytest.raises(ValueError, match="parents or tree"):
        tree = build_tree(torch.tensor([[-1, 0, 1], [-1, 0, 1]], device=device))
        verify_greedy(draft, logits, parents=tree.parents, tree=tree)
    bad = Accepted(torch.empty((B,), dtype=torch.int32, device=device),
                   torch.empty((B, N), dtype=torch.int32, device=device),
                   torch.empty((B, N + 1), dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="out.path"):
        verify_greedy(draft, logits, out=bad)
    if device.type == "cuda":
        with pytest.raises(ValueError, match="target"):
            verify_greedy(draft, logits.cpu())


def test_verify_greedy_opcheck(device):
    from kangaroo_kernels.ops.verify_greedy import _op

    _op()  # loads the library and registers the fake
    draft = torch.tensor([[1, 2, 3, 4]], dtype=torch.int32, device=device)
    logits = torch.randn((1, 5, 9), device=device)
    parents = torch.tensor([[-1, 0, 0, 1]], dtype=torch.int32, device=device)
    outs = (torch.empty((1,), dtype=torch.int32, device=device), torch.empty((1, 5), dtype=torch.int32, device=device),
            torch.empty((1, 5), dtype=torch.int32, device=device))
    for target, par in ((logits, parents), (logits.argmax(-1).int(), None)):
        torch.library.opcheck(torch.ops.kangaroo_kernels.verify_greedy.default, (draft, target, par, *outs))


def test_verify_greedy_large_tree(device):
    # B * (N+1) * V * 2 bytes = 40 MB > 32 MB: the CUDA path walks lazily (one CTA per row, visited rows only)
    gen = torch.Generator().manual_seed(11)
    B, N, V = 2, 64, 151936
    logits = torch.randn((B, N + 1, V), generator=gen).to(torch.bfloat16)
    parents = random_parents("random", B, N, gen)
    draft = planted_drafts(logits.float().argmax(-1), parents, 0.9, gen, V)
    got = verify_greedy(draft.to(device), logits.to(device), parents=parents.to(device))
    assert_accepted_equal(got, verify_greedy_ref(draft, logits, parents=parents))
    assert int(got.accept_len.max()) >= 2


@pytest.mark.cuda
def test_verify_greedy_cuda_graph_capture():
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(12)
    B, N, V = 3, 6, 32000
    logits = torch.randn((B, N + 1, V), generator=gen).to(dev)
    draft = planted_drafts(logits.cpu().argmax(-1), None, 0.8, gen, V).to(dev)
    out = verify_greedy(draft, logits)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        verify_greedy(draft, logits, out=out)
    logits.copy_(torch.randn((B, N + 1, V), generator=gen))
    draft.copy_(planted_drafts(logits.cpu().argmax(-1), None, 0.8, gen, V))
    g.replay()
    torch.cuda.synchronize()
    assert_accepted_equal(out, verify_greedy_ref(draft.cpu(), logits.cpu()))
