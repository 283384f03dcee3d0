"""kangaroo_kernels.compat.sglang: sgl-kernel's own test vectors (tests/speculative/test_eagle_utils.py,
test_speculative_sampling.py), the greedy walk against the core verify_greedy on random trees, a chi-squared
check of the sampling walk with SGLang's lossy thresholds as the planted-bug control, and the EAGLE
tree-building outputs in SGLang's three mask layouts."""

import pytest
import torch
from test_tree import random_parents
from test_verify_sample import _assert_follows, _assert_rate, _chi2

from kangaroo_kernels.compat.sglang import (
    FULL_MASK,
    QLEN_ONLY,
    QLEN_ONLY_BITPACKING,
    build_tree_from_parents,
    tree_speculative_sampling_target_only,
    verify_tree_greedy,
)
from kangaroo_kernels.ops.tree import build_tree, tree_to_sglang
from kangaroo_kernels.ops.verify_greedy import verify_greedy


def _sgl_case(device):
    """The tree and target of sgl-kernel's tests: two rows of 6 nodes, targets peaked at one token."""
    t = lambda x: torch.tensor(x, dtype=torch.int64, device=device)  # noqa: E731
    candidates = t([[0, 1, 2, 3, 4, 5], [7, 8, 9, 10, 11, 12]])
    retrive_index = t([[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]])
    next_token = t([[1, 2, -1, 4, 5, -1], [4, 2, 3, -1, 5, -1]])
    next_sibling = t([[-1, 3, -1, -1, -1, -1], [-1, -1, -1, -1, 1, -1]])
    logits = torch.full((2, 6, 20), 1.0, device=device)
    logits[0, 0, 3] = logits[0, 3, 4] = logits[0, 4, 5] = 10
    logits[1, 0, 11] = logits[1, 4, 12] = 10
    for i in range(2):
        for j in range(6):
            if logits[i, j].max() < 10:
                logits[i, j, 18] = 10
    return candidates, retrive_index, next_token, next_sibling, logits


def _outputs(bs, steps, flat, device):
    return (torch.full((flat,), -1, dtype=torch.int32, device=device),
            torch.full((bs, steps), -1, dtype=torch.int32, device=device),
            torch.zeros(bs, dtype=torch.int32, device=device))


def test_verify_tree_greedy_sgl_vectors(device):
    cand, ridx, nxt, sib, logits = _sgl_case(device)
    predicts, accept_index, accept_num = _outputs(2, 4, 12, device)
    verify_tree_greedy(predicts, accept_index, accept_num, cand, ridx, nxt, sib, torch.argmax(logits, -1))
    assert predicts.tolist() == [3, -1, -1, 4, 5, 18, 11, -1, -1, -1, 12, 18]
    assert accept_index.tolist() == [[0, 3, 4, 5], [6, 10, 11, -1]]
    assert accept_num.tolist() == [3, 2]


@pytest.mark.parametrize("thresholds, predicts_want, accept_index_want, accept_num_want", [
    ((1, 1), [3, -1, -1, 4, 5, 18, 11, -1, -1, -1, 12, 18], [[0, 3, 4, 5], [6, 10, 11, -1]], [3, 2]),
    ((0, 0), [1, 2, 18, -1, -1, -1, 11, -1, -1, -1, 12, 18], [[0, 1, 2, -1], [6, 10, 11, -1]], [2, 2]),
])
def test_tree_speculative_sampling_sgl_vectors(device, thresholds, predicts_want, accept_index_want,
                                               accept_num_want):
    cand, ridx, nxt, sib, logits = _sgl_case(device)
    target_probs = torch.softmax(logits / 0.01, -1)
    draft_probs = torch.zeros_like(target_probs)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        predicts, accept_index, accept_num = _outputs(2, 4, 12, device)
        coins = torch.rand(2, 6, generator=gen).to(device)
        final = torch.rand(2, generator=gen).to(device)
        tree_speculative_sampling_target_only(predicts, accept_index, accept_num, cand, ridx, nxt, sib, coins,
                                              final, target_probs, draft_probs.clone(), thresholds[0],
                                              thresholds[1], True)
        assert predicts.tolist() == predicts_want
        assert accept_index.tolist() == accept_index_want
        assert accept_num.tolist() == accept_num_want


@pytest.mark.parametrize("kind", ["chain", "star", "kary", "random"])
def test_verify_tree_greedy_equals_core_verify_greedy(device, kind):
    """Random trees through tree_to_sglang: SGLang's greedy walk accepts the same path and emits the same tokens
    as the core verify_greedy (num_spec_step = N + 1: no cap), and a cap truncates the path."""
    gen = torch.Generator().manual_seed(len(kind))
    B, N, V = 5, 12, 6  # a small vocabulary: many accepted drafts
    parents = random_parents(kind, B, N, gen)
    draft = torch.randint(0, V, (B, N), generator=gen)
    target = torch.randint(0, V, (B, N + 1), generator=gen)
    for b in range(B):  # make the argmax path long: each node's first child carries the target token
        for j in range(N):
            if torch.rand(1, generator=gen) < 0.8:
                draft[b, j] = target[b, parents[b, j] + 1]
    parents, draft, target = parents.to(device), draft.to(device), target.to(device)
    tree = build_tree(parents)
    sg = tree_to_sglang(tree, draft, root_tokens=target[:, 0] * 0)
    # SGLang's target_predict at node i (local) = the target's token at our row i (row 0 = root)
    want = verify_greedy(draft, target, parents=parents)
    for steps in (N + 1, 3):
        predicts, accept_index, accept_num = _outputs(B, steps, B * (N + 1), device)
        verify_tree_greedy(predicts, accept_index, accept_num, sg.candidates, sg.retrive_index,
                           sg.retrive_next_token, sg.retrive_next_sibling, target)
        n = want.accept_len.cpu().clamp(max=steps - 1)
        assert torch.equal(accept_num.cpu(), n)
        for b in range(B):
            k = int(n[b])
            nodes = [0] + [int(x) + 1 for x in want.path[b, :k].cpu()]
            assert accept_index[b, :k + 1].cpu().tolist() == [b * (N + 1) + i for i in nodes]
            assert bool((accept_index[b, k + 1:] == -1).all())
            flat = predicts.cpu().view(B, N + 1)[b]
            emitted = [int(flat[i]) for i in nodes]
            assert emitted[:k] == want.tokens[b, :k].cpu().tolist()  # the accepted drafts
            assert emitted[k] == int(target[b, nodes[k]])  # the target's token after the last one
            untouched = [i for i in range(N + 1) if i not in nodes]
            assert bool((flat[untouched] == -1).all())
        if steps == N + 1:
            assert int(n.sum()) >= B  # not vacuous: one accepted draft a row on average


def test_sampling_thresholds_one_is_lossless_and_lossy_thresholds_fail(device):
    """Root with 3 one-hot children (distinct tokens, tried in sibling order) and thresholds 1: the token emitted
    after the root follows the target (chi-squared, 12 V trials) and the root's children are accepted with
    probability sum p(children). SGLang's lossy setting threshold_acc = 0.5 (the planted-bug control) must fail
    the same check."""
    gen = torch.Generator().manual_seed(123)
    V, D = 300, 4
    p = torch.softmax(torch.randn(V, generator=gen) * 1.5, -1)
    kids = torch.argsort(p, descending=True)[torch.tensor([0, 5, 40])]
    T = 12 * V
    cand = torch.cat([torch.zeros(1, dtype=torch.long), kids]).expand(T, D).contiguous()
    ridx = (torch.arange(T)[:, None] * D + torch.arange(D)).contiguous()
    nxt = torch.tensor([1, -1, -1, -1]).expand(T, D).contiguous()
    sib = torch.tensor([-1, 2, 3, -1]).expand(T, D).contiguous()
    tp = torch.stack([p] + [torch.softmax(torch.randn(V, generator=gen), -1) for _ in range(3)])
    tp = tp[None].expand(T, D, V).contiguous()
    coins = torch.rand(T, D, generator=gen)
    final = torch.rand(T, generator=gen)
    args = [x.to(device) for x in (cand, ridx, nxt, sib, coins, final, tp)]

    def run(thr_acc):
        predicts, accept_index, accept_num = _outputs(T, 2, T * D, device)
        tree_speculative_sampling_target_only(predicts, accept_index, accept_num, *args,
                                              torch.zeros(T, D, V, device=device), 1.0, thr_acc, True)
        return predicts.cpu().view(T, D)[:, 0], accept_num.cpu()

    tok, acc = run(1.0)
    p64 = p.double()
    _assert_follows(tok, p64 / p64.sum(), "token after the root")
    _assert_rate(acc == 1, float(p64[kids].sum()), "acceptance at the root")
    tok_bad, _ = run(0.5)
    stat, thr, off = _chi2(tok_bad, p64 / p64.sum())
    assert stat >= thr or off > 0, f"the lossy thresholds passed ({stat:.1f} < {thr:.1f})"


def test_sampling_writes_draft_probs_in_place(device):
    """A rejected child's draft probability becomes its target probability (SGLang's in-place update), so the
    final token is drawn from relu(p - that), i.e. never a rejected child."""
    V = 8
    cand = torch.tensor([[0, 2, 3]], device=device)
    ridx = torch.tensor([[0, 1, 2]], device=device)
    nxt = torch.tensor([[1, -1, -1]], device=device)
    sib = torch.tensor([[-1, 2, -1]], device=device)
    tp = torch.full((1, 3, V), 1.0 / V, device=device)
    dp = torch.zeros(1, 3, V, device=device)
    coins = torch.full((1, 3), 0.99, device=device)  # above p(2) + p(3): both children rejected
    for u in torch.linspace(0.01, 0.99, 9):
        d = dp.clone()
        predicts, accept_index, accept_num = _outputs(1, 3, 3, device)
        tree_speculative_sampling_target_only(predicts, accept_index, accept_num, cand, ridx, nxt, sib, coins,
                                              u.reshape(1).to(device), tp, d)
        assert accept_num.tolist() == [0] and int(predicts[0]) not in (2, 3)
        assert d[0, 0, 2] == tp[0, 0, 2] and d[0, 0, 3] == tp[0, 0, 3] and float(d.sum()) == pytest.approx(2 / V)


def _anc_lists(parents):
    """SGLang-local visibility: node 0 (root) and node j + 1 = our draft j; each node sees the root, its
    ancestors and itself."""
    N = len(parents)
    rows = [[0]]
    for j in range(N):
        seen, a = {0, j + 1}, parents[j]
        while a >= 0:
            seen.add(a + 1)
            a = parents[a]
        rows.append(sorted(seen))
    return rows


@pytest.mark.parametrize("N", [3, 7, 15, 20])
def test_build_tree_from_parents_layouts(device, N):
    gen = torch.Generator().manual_seed(N)
    bs, D = 3, N + 1
    parents = random_parents("random", bs, N, gen)
    seq = torch.tensor([5, 0, 2])
    par, seq_ = parents.to(device), seq.to(device)
    pos = torch.empty(bs * D, dtype=torch.int64, device=device)
    ri, nt, ns = (torch.empty(bs, D, dtype=torch.int64, device=device) for _ in range(3))
    full = torch.ones(int((seq + D).sum()) * D, dtype=torch.bool, device=device)
    build_tree_from_parents(par, seq_, full, pos, ri, nt, ns, FULL_MASK)
    qlen = torch.ones(bs * D * D, dtype=torch.bool, device=device)
    build_tree_from_parents(par, seq_, qlen, pos, ri, nt, ns, QLEN_ONLY)
    nbytes = 1 if D <= 8 else 2 if D <= 16 else 4
    packed = torch.full((bs * D * nbytes,), 255, dtype=torch.uint8, device=device)
    build_tree_from_parents(par, seq_, packed, pos, ri, nt, ns, QLEN_ONLY_BITPACKING)
    full, qlen, packed, pos, ri, nt, ns = (t.cpu() for t in (full, qlen, packed, pos, ri, nt, ns))
    start = 0
    for b in range(bs):
        rows = _anc_lists(parents[b].tolist())
        L = int(seq[b])
        want = torch.zeros(D, D, dtype=torch.bool)
        for i, r in enumerate(rows):
            want[i, r] = True
        assert torch.equal(qlen.view(bs, D, D)[b], want)
        blk = full[start:start + D * (L + D)].view(D, L + D)
        assert bool(blk[:, :L].all()) and torch.equal(blk[:, L:], want)
        start += D * (L + D)
        words = packed.view(bs, D, nbytes)[b].long()
        word = sum(words[:, k] << (8 * k) for k in range(nbytes))
        assert word.tolist() == [sum(1 << c for c in r) for r in rows]
        assert pos.view(bs, D)[b].tolist() == [L + len(r) - 1 for r in rows]
        assert ri[b].tolist() == [b * D + i for i in range(D)]
        # children lists: every child exactly once, increasing order, parent of node j + 1 is parents[j] + 1
        for v in range(D):
            kids, c = [], int(nt[b, v])
            while c >= 0:
                kids.append(c)
                c = int(ns[b, c])
            assert kids == [j + 1 for j in range(N) if int(parents[b, j]) + 1 == v]


def test_bad_inputs_raise_value_errors(device):
    cand, ridx, nxt, sib, logits = _sgl_case(device)
    tpred = torch.argmax(logits, -1)
    predicts, accept_index, accept_num = _outputs(2, 4, 12, device)

    def bad(match, fn, *args):
        with pytest.raises(ValueError, match=match):
            fn(*args)

    bad("predicts", verify_tree_greedy, predicts.long(), accept_index, accept_num, cand, ridx, nxt, sib, tpred)
    bad("accept_index", verify_tree_greedy, predicts, accept_index[:1], accept_num, cand, ridx, nxt, sib, tpred)
    bad("accept_token_num", verify_tree_greedy, predicts, accept_index, accept_num[:1], cand, ridx, nxt, sib,
        tpred)
    bad("retrive_next_sibling", verify_tree_greedy, predicts, accept_index, accept_num, cand, ridx, nxt,
        sib[:, :3], tpred)
    bad("target_predict", verify_tree_greedy, predicts, accept_index, accept_num, cand, ridx, nxt, sib,
        tpred.float())
    tp = torch.softmax(logits, -1)
    u = torch.rand(2, 6, device=device)
    uf = torch.rand(2, device=device)
    bad("uniform_samples", tree_speculative_sampling_target_only, predicts, accept_index, accept_num, cand,
        ridx, nxt, sib, u.double(), uf, tp, tp.clone())
    bad("draft_probs", tree_speculative_sampling_target_only, predicts, accept_index, accept_num, cand, ridx,
        nxt, sib, u, uf, tp, tp[..., :5].clone())
    bad("draft_probs", tree_speculative_sampling_target_only, predicts, accept_index, accept_num, cand, ridx,
        nxt, sib, u, uf, tp, tp.transpose(0, 1).contiguous().transpose(0, 1))
    par = torch.full((2, 5), -1, device=device)
    pos = torch.empty(12, dtype=torch.int64, device=device)
    r3 = [torch.empty(2, 6, dtype=torch.int64, device=device) for _ in range(3)]
    bad("tree_mask_mode", build_tree_from_parents, par, torch.zeros(2, device=device, dtype=torch.int64),
        torch.ones(72, dtype=torch.bool, device=device), pos, *r3, 5)
    bad("tree_mask", build_tree_from_parents, par, torch.zeros(2, device=device, dtype=torch.int64),
        torch.ones(71, dtype=torch.bool, device=device), pos, *r3, QLEN_ONLY)
    bad("positions", build_tree_from_parents, par, torch.zeros(2, device=device, dtype=torch.int64),
        torch.ones(72, dtype=torch.bool, device=device), pos[:5], *r3, QLEN_ONLY)
