"""SGLang's EAGLE verification entry points (semantics of sgl-kernel 0.3.x: csrc/speculative/eagle_utils.cu
VerifyTreeGreedy / build_tree_efficient{,_partial_packed}, speculative_sampling.cuh
TreeSpeculativeSamplingTargetOnly), with their signatures and in-place outputs.

Layout (SGLang's): a row of D = num_draft_tokens nodes, node 0 the root (the last verified token);
candidates [bs, D] int64 the nodes' tokens; retrive_index [bs, D] the flat index of each node into the
[bs * D] predicts / target_predict; retrive_next_token / retrive_next_sibling [bs, D] the first child and next
sibling (row-local, -1 = none). Outputs written in place: predicts [bs * D] int32 (at the accepted nodes'
flat indices: the token that follows each; other entries untouched), accept_index [bs, num_spec_step] int32
(flat indices of the root and the accepted nodes; the rest untouched), accept_token_num [bs] int32.

The walk visits at most D nodes per row, so it runs as D static steps of batched torch ops: no host sync,
CUDA-graph capturable, every index clamped so malformed links stop a row instead of reading out of bounds.
SGLang's acceptance rule with thresholds (threshold_single, threshold_acc < 1) is lossy by design and is not
the core verify_sample's rule, which is why these walks are their own code; with both thresholds 1 the
sampling walk is exact speculative sampling for deterministic drafts (tested by chi-squared).
kangaroo_kernels.ops.tree.tree_to_sglang converts a core Tree to this layout; build_tree_from_parents produces
the remaining EAGLE tree-building outputs (positions, the three tree-mask layouts).
"""

import torch

from kangaroo_kernels import _checks

__all__ = ["verify_tree_greedy", "tree_speculative_sampling_target_only", "build_tree_from_parents",
           "FULL_MASK", "QLEN_ONLY", "QLEN_ONLY_BITPACKING"]

FULL_MASK, QLEN_ONLY, QLEN_ONLY_BITPACKING = 0, 1, 2


def _check_tree(predicts, accept_index, accept_token_num, candidates, retrive_index, retrive_next_token,
                retrive_next_sibling):
    _checks.check_tensor("candidates", candidates, dtypes=_checks.INDEX_DTYPES, ndim=2, expected="[bs, D]")
    bs, D = candidates.shape
    dev = candidates.device
    for name, t in (("retrive_index", retrive_index), ("retrive_next_token", retrive_next_token),
                    ("retrive_next_sibling", retrive_next_sibling)):
        _checks.check_tensor(name, t, dtypes=_checks.INDEX_DTYPES, shape=(bs, D), device=dev,
                             expected=f"[bs={bs}, D={D}]")
    _checks.check_tensor("predicts", predicts, dtypes=(torch.int32,), ndim=1, device=dev,
                         expected="[bs * D] int32")
    _checks.check_tensor("accept_index", accept_index, dtypes=(torch.int32,), ndim=2, device=dev,
                         expected=f"[bs={bs}, num_spec_step] int32")
    if accept_index.shape[0] != bs or accept_index.shape[1] < 1:
        raise ValueError(f"accept_index must have shape [bs={bs}, num_spec_step >= 1], got "
                         f"{tuple(accept_index.shape)}")
    _checks.check_tensor("accept_token_num", accept_token_num, dtypes=(torch.int32,), shape=(bs,), device=dev,
                         expected=f"[bs={bs}] int32")
    for name, t in (("predicts", predicts), ("accept_index", accept_index), ("accept_token_num", accept_token_num)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (it is written in place)")
    return bs, D, dev


class _Walk:
    """The per-row walk state shared by the greedy and the sampling walks (all [bs] int64 / bool)."""

    def __init__(self, accept_index, candidates, retrive_index, retrive_next_token, retrive_next_sibling,
                 flat_size):
        self.bs, self.D = candidates.shape
        dev = candidates.device
        self.rows = torch.arange(self.bs, device=dev)
        self.cand = candidates.long()
        self.ridx = retrive_index.long()
        self.nxt = retrive_next_token.long()
        self.sib = retrive_next_sibling.long()
        self.flat_size = flat_size
        self.steps = accept_index.shape[1]
        self.last = self._flat(self.ridx[:, 0])
        self.node = torch.zeros(self.bs, dtype=torch.long, device=dev)  # local index of the last accepted node
        self.n = torch.zeros(self.bs, dtype=torch.long, device=dev)
        self.cur = self._link(self.nxt[:, 0])
        self.done = (self.cur < 0) | (self.steps <= 1)

    def _flat(self, i):
        return i.clamp(0, max(self.flat_size - 1, 0))

    def _link(self, c):
        return torch.where((c >= 0) & (c < self.D), c, torch.full_like(c, -1))

    def probe(self):
        """(active rows, the probed local node clamped, its token, its flat index)."""
        act = ~self.done
        c = self.cur.clamp_min(0)
        return act, c, self.cand[self.rows, c], self._flat(self.ridx[self.rows, c])

    def advance(self, act, c, acc, flat, accept_index):
        take = act & acc
        self.n = torch.where(take, self.n + 1, self.n)
        col = self.n.clamp(max=self.steps - 1)[:, None]
        old = accept_index.gather(1, col)
        accept_index.scatter_(1, col, torch.where(take[:, None], flat[:, None].to(torch.int32), old))
        self.last = torch.where(take, flat, self.last)
        self.node = torch.where(take, c, self.node)
        nxt = torch.where(take, self._link(self.nxt[self.rows, c]), self._link(self.sib[self.rows, c]))
        self.cur = torch.where(act, nxt, self.cur)
        self.done = self.done | (act & ((self.cur < 0) | (take & (self.n >= self.steps - 1))))


def _put(flat_out: torch.Tensor, idx: torch.Tensor, mask: torch.Tensor, value: torch.Tensor) -> None:
    """flat_out[idx[b]] = value[b] where mask[b] (a no-op write of the old value elsewhere)."""
    old = flat_out.gather(0, idx)
    flat_out.scatter_(0, idx, torch.where(mask, value.to(flat_out.dtype), old))


def verify_tree_greedy(predicts: torch.Tensor, accept_index: torch.Tensor, accept_token_num: torch.Tensor,
                       candidates: torch.Tensor, retrive_index: torch.Tensor, retrive_next_token: torch.Tensor,
                       retrive_next_sibling: torch.Tensor, target_predict: torch.Tensor) -> None:
    """sgl_kernel.verify_tree_greedy: from the root, descend while some child (tried in sibling order) has the
    token the target predicts at the current node, at most num_spec_step - 1 levels.

    target_predict [bs, D] int64: the target's argmax at every node (indexed by the flat retrive index).
    Writes accept_index[:, 0] = the root's flat index, accept_index[:, 1:n+1] the accepted nodes',
    accept_token_num = n, predicts[flat(node)] = the target's token after each accepted node and the root.
    """
    bs, D, dev = _check_tree(predicts, accept_index, accept_token_num, candidates, retrive_index,
                             retrive_next_token, retrive_next_sibling)
    _checks.check_tensor("target_predict", target_predict, dtypes=_checks.INDEX_DTYPES, shape=(bs, D), device=dev,
                         expected=f"[bs={bs}, D={D}]")
    tp = target_predict.reshape(-1).long()
    size = min(predicts.numel(), tp.numel())
    w = _Walk(accept_index, candidates, retrive_index, retrive_next_token, retrive_next_sibling, size)
    accept_index[:, 0] = w.last.to(torch.int32)
    for _ in range(D):
        act, c, tok, flat = w.probe()
        target_tok = tp[w.last]
        acc = tok == target_tok
        _put(predicts, w.last, act & acc, target_tok)
        w.advance(act, c, acc, flat, accept_index)
    accept_token_num.copy_(w.n.to(torch.int32))
    _put(predicts, w.last, torch.ones_like(w.done), tp[w.last])


def tree_speculative_sampling_target_only(
    predicts: torch.Tensor, accept_index: torch.Tensor, accept_token_num: torch.Tensor,
    candidates: torch.Tensor, retrive_index: torch.Tensor, retrive_next_token: torch.Tensor,
    retrive_next_sibling: torch.Tensor, uniform_samples: torch.Tensor,
    uniform_samples_for_final_sampling: torch.Tensor, target_probs: torch.Tensor, draft_probs: torch.Tensor,
    threshold_single: float = 1.0, threshold_acc: float = 1.0, deterministic: bool = True,
) -> None:
    """sgl_kernel.tree_speculative_sampling_target_only: SGLang's tree sampling with deterministic drafts.

    uniform_samples [bs, D] float32 (the coin of node i is uniform_samples[b, i], drawn once per visited
    node); uniform_samples_for_final_sampling [bs]; target_probs, draft_probs [bs, D, V] float32 (row i: the
    distributions at node i). At the current node the children are tried in sibling order with a running sum
    prob_acc of their target probabilities; a child is accepted iff coin <= prob_acc / max(threshold_acc, 1e-9)
    or its own target probability >= threshold_single. A rejected child's draft probability is set to its target
    probability in draft_probs (in place, as SGLang does). The final token at the last accepted node is drawn
    from relu(target_probs - draft_probs) there (from target_probs when num_spec_step - 1 drafts were
    accepted) by inverse CDF with the final coin. deterministic is accepted and ignored (always deterministic).
    """
    bs, D, dev = _check_tree(predicts, accept_index, accept_token_num, candidates, retrive_index,
                             retrive_next_token, retrive_next_sibling)
    _checks.check_tensor("uniform_samples", uniform_samples, dtypes=(torch.float32,), shape=(bs, D), device=dev,
                         expected=f"[bs={bs}, D={D}] float32")
    _checks.check_tensor("uniform_samples_for_final_sampling", uniform_samples_for_final_sampling,
                         dtypes=(torch.float32,), shape=(bs,), device=dev, expected=f"[bs={bs}] float32")
    _checks.check_tensor("target_probs", target_probs, dtypes=(torch.float32,), shape=(bs, D, None), device=dev,
                         expected=f"[bs={bs}, D={D}, V] float32")
    V = target_probs.shape[2]
    _checks.check_tensor("draft_probs", draft_probs, dtypes=(torch.float32,), shape=(bs, D, V), device=dev,
                         expected=f"[bs={bs}, D={D}, V={V}] float32")
    for name, x in (("threshold_single", threshold_single), ("threshold_acc", threshold_acc)):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or x != x:
            raise ValueError(f"{name} must be a number, got {x!r}")
    if not draft_probs.is_contiguous():
        raise ValueError("draft_probs must be contiguous (it is written in place)")
    thr_acc = torch.tensor(max(float(threshold_acc), 1e-9), dtype=torch.float32, device=dev)
    thr_single = torch.tensor(float(threshold_single), dtype=torch.float32, device=dev)
    w = _Walk(accept_index, candidates, retrive_index, retrive_next_token, retrive_next_sibling, predicts.numel())
    accept_index[:, 0] = w.last.to(torch.int32)
    rows = w.rows
    coin = uniform_samples[:, 0].clone()
    prob_acc = torch.zeros(bs, dtype=torch.float32, device=dev)
    dflat = draft_probs.view(-1)
    for _ in range(D):
        act, c, tok, flat = w.probe()
        tokc = tok.clamp(0, V - 1)
        p_single = target_probs[rows, w.node, tokc]
        pa = prob_acc + p_single
        acc = (coin <= pa / thr_acc) | (p_single >= thr_single)
        take = act & acc
        _put(predicts, w.last, take, tok)
        rej = act & ~acc
        _put(dflat, (rows * D + w.node) * V + tokc, rej, p_single)
        prob_acc = torch.where(take, torch.zeros_like(pa), torch.where(act, pa, prob_acc))
        coin = torch.where(take, uniform_samples[rows, c], coin)
        w.advance(act, c, acc, flat, accept_index)
    accept_token_num.copy_(w.n.to(torch.int32))
    p = target_probs[rows, w.node].double()
    q = draft_probs[rows, w.node].double()
    full = (w.n == w.steps - 1)[:, None]
    r = torch.where(full, p, (p - q).clamp_min(0))
    cs = torch.cumsum(r, 1)
    u = uniform_samples_for_final_sampling.double()[:, None] * cs[:, -1:]
    hit = (r > 0) & (cs > u)
    idx = torch.arange(V, device=dev).expand(bs, V)
    first = torch.where(hit, idx, torch.full_like(idx, V)).amin(1)
    last_valid = torch.where(r > 0, idx, torch.full_like(idx, -1)).amax(1)
    tok = torch.where(first < V, first, torch.where(last_valid >= 0, last_valid, torch.full_like(first, V - 1)))
    _put(predicts, w.last, torch.ones_like(w.done), tok)


def build_tree_from_parents(parents: torch.Tensor, verified_seq_len: torch.Tensor, tree_mask: torch.Tensor,
                            positions: torch.Tensor, retrive_index: torch.Tensor,
                            retrive_next_token: torch.Tensor, retrive_next_sibling: torch.Tensor,
                            tree_mask_mode: int = FULL_MASK) -> None:
    """The outputs of sgl_kernel.build_tree_kernel_efficient, written in place, from a core parents tensor.

    parents [bs, N] (-1 = child of the root, topological; N drafts): SGLang's row has D = N + 1 nodes, node 0
    the root and node j + 1 our draft j. verified_seq_len [bs] int64 (device). Outputs:
    positions [bs * D] int64 = verified_seq_len[b] + depth (root depth 0); retrive_index [bs, D] = b * D + i;
    retrive_next_token / retrive_next_sibling [bs, D] int64 (children in increasing index order, as SGLang's
    kernel links them; -1 = none); tree_mask (each node sees the root, its ancestors and itself) in one of
    SGLang's layouts:
    - FULL_MASK (0): bool [sum_b D * (seq_len_b + D)], request b's [D, seq_len_b + D] block row-major after the
      blocks of the requests before it; the prefix columns are left as the caller set them (SGLang fills the
      buffer with True), the tree columns are written.
    - QLEN_ONLY (1): bool [bs * D * D], request b's [D, D] block.
    - QLEN_ONLY_BITPACKING (2): uint8 [bs * D * nbytes] with nbytes = 1, 2 or 4 for D <= 8, <= 16, > 16
      (bit k of a row little-endian: node k visible), D <= 32.
    Index arithmetic on the device: no host sync.
    """
    from kangaroo_kernels.ops.tree import _unpack_mask, build_tree

    _checks.check_tensor("parents", parents, dtypes=_checks.INDEX_DTYPES, ndim=2, expected="[bs, N]")
    bs, N = parents.shape
    D = N + 1
    dev = parents.device
    _checks.check_tensor("verified_seq_len", verified_seq_len, dtypes=_checks.INDEX_DTYPES, shape=(bs,),
                         device=dev, expected=f"[bs={bs}]")
    _checks.check_tensor("positions", positions, dtypes=(torch.int64,), shape=(bs * D,), device=dev,
                         expected=f"[bs * D = {bs * D}] int64")
    for name, t in (("retrive_index", retrive_index), ("retrive_next_token", retrive_next_token),
                    ("retrive_next_sibling", retrive_next_sibling)):
        _checks.check_tensor(name, t, dtypes=(torch.int64,), shape=(bs, D), device=dev,
                             expected=f"[bs={bs}, D={D}] int64")
    if tree_mask_mode not in (FULL_MASK, QLEN_ONLY, QLEN_ONLY_BITPACKING):
        raise ValueError(f"tree_mask_mode must be 0 (FULL_MASK), 1 (QLEN_ONLY) or 2 (QLEN_ONLY_BITPACKING), "
                         f"got {tree_mask_mode!r}")
    nbytes = 1 if D <= 8 else 2 if D <= 16 else 4
    if tree_mask_mode == QLEN_ONLY_BITPACKING:
        if D > 32:
            raise ValueError(f"QLEN_ONLY_BITPACKING holds at most 32 nodes (D = N + 1 = {D})")
        _checks.check_tensor("tree_mask", tree_mask, dtypes=(torch.uint8,), shape=(bs * D * nbytes,), device=dev,
                             expected=f"[bs * D * {nbytes}] uint8")
    else:
        _checks.check_tensor("tree_mask", tree_mask, dtypes=(torch.bool,), ndim=1, device=dev,
                             expected="[bool flat mask]")
        if tree_mask_mode == QLEN_ONLY and tree_mask.numel() != bs * D * D:
            raise ValueError(f"tree_mask must have bs * D * D = {bs * D * D} entries for QLEN_ONLY")
    from kangaroo_kernels.ops.tree import tree_to_sglang

    tree = build_tree(parents, validate=False)
    sg = tree_to_sglang(tree, torch.zeros(bs, N, dtype=torch.int64, device=dev))
    retrive_index.copy_(sg.retrive_index)
    retrive_next_token.copy_(sg.retrive_next_token)
    retrive_next_sibling.copy_(sg.retrive_next_sibling)
    seq = verified_seq_len.long()
    depth = torch.cat([torch.zeros(bs, 1, dtype=torch.long, device=dev), tree.depth.long().clamp_min(0)], 1)
    positions.copy_((seq[:, None] + depth).reshape(-1))
    anc = _unpack_mask(tree.mask, N)  # [bs, N, N]: column i is an ancestor of row j or j itself
    vis = torch.zeros(bs, D, D, dtype=torch.bool, device=dev)
    vis[:, :, 0] = True
    vis[:, 1:, 1:] = anc
    if tree_mask_mode == QLEN_ONLY:
        tree_mask.copy_(vis.reshape(-1))
    elif tree_mask_mode == QLEN_ONLY_BITPACKING:
        bits = vis.to(torch.int64) << torch.arange(D, device=dev)
        word = bits.sum(-1)  # [bs, D]
        shifts = 8 * torch.arange(nbytes, device=dev)
        tree_mask.copy_(((word[..., None] >> shifts) & 0xFF).to(torch.uint8).reshape(-1))
    else:
        start = torch.cumsum(seq * D, 0) - seq * D + torch.arange(bs, device=dev) * D * D  # block of request b
        row = torch.arange(D, device=dev)
        sq = seq[:, None, None]
        idx = start[:, None, None] + (sq + D) * row[None, :, None] + sq + row[None, None, :]
        if tree_mask.numel():
            safe = idx.clamp(0, tree_mask.numel() - 1)
            tree_mask.scatter_(0, safe.reshape(-1), vis.reshape(-1))
