import pytest
import torch

from kangaroo_kernels.ops.ngram_lookup import NgramLookupPlan, ngram_lookup
from kangaroo_kernels.reference import ngram_lookup_ref
from kangaroo_kernels.types import NgramMatch


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request):
    """The same bodies on the C++ twin and (marked cuda, skipped without a GPU) on the CUDA kernel."""
    return torch.device(request.param)


def run(rows, lens, n_min, n_max, M, device, dtype=torch.int32, **kw):
    S = max(len(r) for r in rows)
    h = torch.tensor([r + [0] * (S - len(r)) for r in rows], dtype=dtype, device=device)
    res = ngram_lookup(h, torch.tensor(lens, device=device), n_min, n_max, M, **kw)
    assert res.tokens.dtype == torch.int32 and res.n.dtype == torch.int32
    return res.tokens.cpu().tolist(), res.n.cpu().tolist()


def assert_matches_ref(h, lens, n_min, n_max, M, **kw):
    got = ngram_lookup(h, lens, n_min, n_max, M, **kw)
    want = ngram_lookup_ref(h, lens, n_min, n_max, M)
    assert got.tokens.device == h.device and got.n.device == h.device
    assert torch.equal(got.tokens.cpu(), want.tokens.cpu()), (got, want)
    assert torch.equal(got.n.cpu(), want.n.cpu()), (got, want)
    return got


def test_ngram_lookup_hand_cases(device):
    # expectations worked out by hand (independent of the reference)
    cases = [
        # (row, n_min, n_max, M, tokens, n)
        ([1, 1, 1, 1], 1, 4, 3, [1, -1, -1], 1),  # overlapping self-match: "1 1 1" ends at e = 2, one token left
        ([1, 1, 1, 1], 1, 2, 3, [1, -1, -1], 1),  # capped at n_max = 2: most recent e = 2 still
        ([1, 2, 3, 4], 1, 3, 2, [-1, -1], 0),  # no earlier occurrence
        ([7, 8, 9, 1, 2, 7, 8], 2, 3, 3, [9, 1, 2], 3),  # match at the very start (e = 1)
        ([7, 8, 9, 1, 2, 7, 8], 3, 3, 3, [-1, -1, -1], 0),  # "2 7 8" never occurred before
        ([1, 2, 3, 9, 2, 3, 5, 1, 2, 3], 1, 3, 3, [9, 2, 3], 3),  # longest (e = 2) beats more recent "2 3" (e = 5)
        ([1, 2, 3, 9, 2, 3, 5, 1, 2, 3], 1, 2, 3, [5, 1, 2], 3),  # n_max = 2: "2 3", most recent e = 5
        ([4, 5, 1, 4, 5, 2, 4, 5], 2, 2, 3, [2, 4, 5], 3),  # most recent of two occurrences (e = 4, not 1)
        ([3, 1, 3], 1, 4, 5, [1, 3, -1, -1, -1], 2),  # M longer than the continuation, which runs into the suffix
        ([6, 2, 6, 2], 1, 4, 4, [6, 2, -1, -1], 2),  # "6 2" ends at e = 1; the continuation ends at L - 1
        ([5, 5], 2, 2, 2, [-1, -1], 0),  # L < n_min + 1
        ([5, 5], 1, 2, 2, [5, -1], 1),
        ([9], 1, 1, 1, [-1], 0),
    ]
    for row, n_min, n_max, M, tokens, n in cases:
        assert run([row], [len(row)], n_min, n_max, M, device) == ([tokens], [n]), (row, n_min, n_max, M)


def test_ngram_lookup_ragged_batch_ignores_padding(device):
    # entries past lens[b] would create matches if they were read; empty and length-1 rows match nothing
    rows = [[1, 2, 3, 1, 2, 3, 1, 2], [4, 4, 4, 4, 4, 4], [8, 9, 8, 9, 8, 9], [3, 3, 3], [2, 7, 2, 7, 2]]
    lens = [5, 0, 3, 1, 4]
    tokens, n = run(rows, lens, 2, 3, 4, device)
    # row 0: "1 2 3 1 2", suffix "1 2" at e = 1 -> 3 1 2 ; row 2: "8 9 8", no 2-gram repeats
    assert n == [3, 0, 0, 0, 2] and tokens[0] == [3, 1, 2, -1] and tokens[4] == [2, 7, -1, -1]
    assert tokens[1] == tokens[2] == tokens[3] == [-1] * 4


@pytest.mark.parametrize("B,S,V,n_min,n_max,M", [
    (3, 37, 3, 1, 4, 5), (4, 64, 2, 2, 6, 8), (2, 101, 50, 1, 3, 10), (5, 33, 32000, 1, 2, 4), (1, 1, 5, 1, 1, 1),
    (3, 9, 1, 1, 8, 16), (2, 250, 4, 3, 3, 7),
])
def test_ngram_lookup_matches_reference(device, B, S, V, n_min, n_max, M):
    gen = torch.Generator().manual_seed(B * 1000 + S + V)
    for dtype in (torch.int32, torch.int64):
        h = torch.randint(0, V, (B, S), generator=gen).to(dtype)
        lens = torch.randint(0, S + 1, (B,), generator=gen).to(torch.int32)
        lens[0] = S
        got = assert_matches_ref(h.to(device), lens.to(device), n_min, n_max, M)
        if V <= 4 and S >= 30:
            assert int(got.n.min()) > 0 or int(lens.min()) <= n_min  # small vocab: (nearly) every row matches


def test_ngram_lookup_long_rows_across_tiles(device):
    # rows longer than the CUDA kernel's tile (4096 positions), large vocab: few matches
    gen = torch.Generator().manual_seed(7)
    B, S = 4, 9001
    h = torch.randint(0, 150000, (B, S), generator=gen)
    lens = torch.tensor([S, 8000, 4097, 4500], dtype=torch.int32)
    # row 0: the longest match (n_max = 4) only at the very start, shorter ones near the end: a full scan
    h[0, :4] = h[0, S - 4:]
    h[0, S - 100:S - 97] = h[0, S - 3:]
    # row 1: a maximal match near the end and another at the start: the most recent wins
    h[1, 10:14] = h[1, 7996:8000]
    h[1, 7000:7004] = h[1, 7996:8000]
    # row 2: L = 4097 -> the only candidate is e = 0 .. 4095 (the first tile boundary)
    h[2, 0] = h[2, 4096]
    # row 3: no match at all (ids unique in the row)
    h[3] = torch.randperm(S, generator=gen)
    got = assert_matches_ref(h.to(device), lens.to(device), 1, 4, 6)
    n = got.n.cpu().tolist()
    assert n[0] == 6 and n[1] == 6 and n[2] == 6 and n[3] == 0
    assert got.tokens[0].cpu().tolist() == h[0, 4:10].tolist()
    assert got.tokens[1].cpu().tolist() == h[1, 7004:7010].tolist()


def test_ngram_lookup_int64_in_range_and_clamped_lens(device):
    big = 2**31 - 1  # the largest valid id
    h = torch.tensor([[big, 3, big, 3, big], [1, 2, 1, 2, 1]], dtype=torch.int64, device=device)
    got = ngram_lookup(h, torch.tensor([5, 5], dtype=torch.int64, device=device), 1, 3, 2)
    assert got.tokens.cpu().tolist() == [[3, big], [2, 1]] and got.n.cpu().tolist() == [2, 2]
    # without validation, lens outside [0, S] are clamped (int64 beyond 2^31 too: no wrap-around)
    lens = torch.tensor([2**32 + 3, -7], dtype=torch.int64, device=device)
    got = ngram_lookup(h, lens, 1, 3, 2, validate=False)
    assert got.n.cpu().tolist() == [2, 0] and got.tokens[0].cpu().tolist() == [3, big]
    got = ngram_lookup(h.int(), torch.tensor([99, -1], dtype=torch.int32, device=device), 1, 3, 2,
                       validate=False)
    assert got.n.cpu().tolist() == [2, 0]


def test_ngram_lookup_out_of_range_ids_without_validation(device):
    # int64 ids are compared as int64: 2^32 + 7 does not match 7; a continuation stops before an invalid id
    rows = [[2**32 + 7, 1, 7, 0, 0], [5, 9, -4, 2, 5]]
    h = torch.tensor(rows, dtype=torch.int64, device=device)
    got = ngram_lookup(h, torch.tensor([3, 5], device=device), 1, 2, 3, validate=False)
    assert got.n.cpu().tolist() == [0, 1] and got.tokens[1].cpu().tolist() == [9, -1, -1]
    ref = ngram_lookup_ref(h, torch.tensor([3, 5]), 1, 2, 3)
    assert torch.equal(ref.n, got.n.cpu()) and torch.equal(ref.tokens, got.tokens.cpu())
    with pytest.raises(ValueError, match=r"history\[0, 0\]"):
        ngram_lookup(h, torch.tensor([3, 5], device=device), 1, 2, 3)
    with pytest.raises(ValueError, match=r"history\[1, 2\]"):
        ngram_lookup(h, torch.tensor([0, 5], device=device), 1, 2, 3)
    # ids past lens[b] are never read, so they are not validated either
    got = ngram_lookup(h, torch.tensor([0, 2], device=device), 1, 2, 3)
    assert got.n.cpu().tolist() == [0, 0]


def test_ngram_lookup_out_buffers_in_place(device):
    h = torch.tensor([[1, 2, 3, 1, 2], [4, 4, 4, 0, 0]], dtype=torch.int32, device=device)
    lens = torch.tensor([5, 3], dtype=torch.int32, device=device)
    tokens = torch.full((2, 4), 77, dtype=torch.int32, device=device)
    n = torch.full((2,), 77, dtype=torch.int32, device=device)
    res = ngram_lookup(h, lens, 1, 3, 4, out=(tokens, n))
    assert isinstance(res, NgramMatch) and res.tokens is tokens and res.n is n
    assert tokens.cpu().tolist() == [[3, 1, 2, -1], [4, -1, -1, -1]] and n.cpu().tolist() == [3, 1]
    with pytest.raises(ValueError, match="out.tokens"):
        ngram_lookup(h, lens, 1, 3, 5, out=(tokens, n))
    with pytest.raises(ValueError, match="out.n"):
        ngram_lookup(h, lens, 1, 3, 4, out=(tokens, n.long()))
    with pytest.raises(ValueError, match="out.tokens"):
        ngram_lookup(h, lens, 1, 3, 2, out=(tokens[:, ::2], n))
    with pytest.raises(ValueError, match="out must be a pair"):
        ngram_lookup(h, lens, 1, 3, 4, out=tokens)


def test_ngram_lookup_bad_inputs(device):
    h = torch.tensor([[1, 2, 1, 2]], dtype=torch.int32, device=device)
    lens = torch.tensor([4], dtype=torch.int32, device=device)
    bad = [
        ("history", dict(history=h.float())),
        ("history", dict(history=h[0])),
        ("history", dict(history=[[1, 2]])),
        ("lens", dict(lens=lens.float())),
        ("lens", dict(lens=torch.tensor([4, 4], dtype=torch.int32, device=device))),
        ("lens", dict(lens=torch.tensor([[4]], dtype=torch.int32, device=device))),
        ("lens", dict(lens=torch.tensor([5], dtype=torch.int32, device=device))),  # > S
        ("lens", dict(lens=torch.tensor([-1], dtype=torch.int32, device=device))),
        ("lens", dict(lens=torch.tensor([2**31 + 1], dtype=torch.int64, device=device))),  # no wrap to negative
        ("n_min", dict(n_min=0)),
        ("n_min", dict(n_min=1.0)),
        ("n_min", dict(n_min=True)),
        ("n_max", dict(n_max=0)),
        ("n_max", dict(n_min=3, n_max=2)),
        ("n_max", dict(n_max=2**31)),
        ("M", dict(M=0)),
        ("M", dict(M=None)),
    ]
    for name, kw in bad:
        args = dict(history=h, lens=lens, n_min=1, n_max=2, M=2)
        args.update(kw)
        with pytest.raises(ValueError, match=name):
            ngram_lookup(args.pop("history"), args.pop("lens"), args.pop("n_min"), args.pop("n_max"),
                         args.pop("M"))
    if device.type == "cuda":
        with pytest.raises(ValueError, match="lens"):
            ngram_lookup(h, lens.cpu(), 1, 2, 2)


def test_ngram_lookup_plan_equals_the_op(device):
    """NgramLookupPlan (the decoder's per-cycle call) gives ngram_lookup's result in its buffers, for int32 lens and
    (through the wrapper) any other lens; static arguments are checked once, at construction."""
    g = torch.Generator().manual_seed(4)
    B, S, M = 3, 57, 5
    hist = torch.randint(0, 4, (B, S), generator=g, dtype=torch.int32).to(device)
    out = (torch.full((B, M), -1, dtype=torch.int32, device=device), torch.zeros(B, dtype=torch.int32, device=device))
    plan = NgramLookupPlan(hist, 1, 3, M, out=out)
    for _ in range(5):
        lens = torch.randint(0, S + 1, (B,), generator=g, dtype=torch.int32).to(device)
        want = ngram_lookup(hist, lens, 1, 3, M)
        got = plan.run(lens)
        assert got.tokens is out[0] and got.n is out[1]
        assert torch.equal(got.tokens, want.tokens) and torch.equal(got.n, want.n)
        got64 = plan.run(lens.long())
        assert torch.equal(got64.tokens, want.tokens) and torch.equal(got64.n, want.n)
    with pytest.raises(ValueError, match="n_max"):
        NgramLookupPlan(hist, 3, 2, M, out=out)
    with pytest.raises(ValueError, match="out.tokens"):
        NgramLookupPlan(hist, 1, 3, M + 1, out=out)
    with pytest.raises(ValueError, match="contiguous int32"):
        NgramLookupPlan(hist.long(), 1, 3, M, out=out)


def test_ngram_lookup_opcheck(device):
    from kangaroo_kernels.ops.ngram_lookup import _op

    _op()
    h = torch.tensor([[1, 2, 1, 2, 1], [3, 3, 3, 0, 0]], dtype=torch.int32, device=device)
    lens = torch.tensor([5, 3], dtype=torch.int32, device=device)
    outs = (torch.empty((2, 3), dtype=torch.int32, device=device), torch.empty((2,), dtype=torch.int32, device=device))
    for hist in (h, h.long()):
        torch.library.opcheck(torch.ops.kangaroo_kernels.ngram_lookup.default, (hist, lens, 1, 3, *outs))


def test_ngram_lookup_torch_compile_fullgraph(device):
    import torch._dynamo

    def step(h, lens):
        res = ngram_lookup(h, lens, 1, 3, 4, validate=False)
        return res.tokens + 1, res.n * 2  # something to fuse around the op

    gen = torch.Generator().manual_seed(3)
    h = torch.randint(0, 4, (3, 29), generator=gen).to(torch.int32).to(device)
    lens = torch.tensor([29, 11, 2], dtype=torch.int32, device=device)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(h, lens)
    want = step(h, lens)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    h2 = torch.randint(0, 4, (3, 29), generator=gen).to(torch.int32).to(device)
    assert torch.equal(compiled(h2, lens)[0], step(h2, lens)[0])


@pytest.mark.cuda
def test_ngram_lookup_cuda_graph_capture():
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(12)
    B, S = 8, 5000
    h = torch.randint(0, 5, (B, S), generator=gen).to(torch.int32).to(dev)
    lens = torch.randint(0, S + 1, (B,), generator=gen).to(torch.int32).to(dev)
    out = ngram_lookup(h, lens, 2, 5, 6)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        ngram_lookup(h, lens, 2, 5, 6, out=out)  # validate=None: capturing, so no host read
    h.copy_(torch.randint(0, 5, (B, S), generator=gen))
    lens.copy_(torch.randint(0, S + 1, (B,), generator=gen))
    g.replay()
    torch.cuda.synchronize()
    want = ngram_lookup_ref(h.cpu(), lens.cpu(), 2, 5, 6)
    assert torch.equal(out.tokens.cpu(), want.tokens) and torch.equal(out.n.cpu(), want.n)
