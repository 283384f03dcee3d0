"""The verify side of a Kangaroo cycle: layers ℓ+1..L on the saved layer-ℓ hidden states, the target's decision
(kangaroo_kernels.verify_greedy / verify_sample), and the commit (a length update; compact_kv for trees).

Like kangaroo.draft, everything works in place on a DecodeState's static buffers, with no host reads and fixed
shapes (CUDA-graph capturable). The verify block starts at the root x0 (position L0): target row 0 scores x0,
row j + 1 scores draft node j.

After acceptance of `a` draft nodes the committed cache length becomes L0 + a + 1 (x0 and the accepted nodes)
and the emitted correction/bonus token is the next cycle's x0. Shallow and deep K/V of every accepted node are in
place (for trees after compact_kv); the adapter K/V is missing only for an accepted node the adapter never ran on
(the last chain draft, or a sibling): its layer-ℓ hidden state goes to st.catch_h and the next cycle starts with
the catch-up (kangaroo.draft.catch_up).
"""

from __future__ import annotations

import torch

from kangaroo_kernels.ops.compact_kv import compact_kv
from kangaroo_kernels.ops.verify_greedy import verify_greedy
from kangaroo_kernels.ops.verify_sample import verify_sample

__all__ = ["verify_chain", "verify_tree", "decide", "commit", "autoregressive_step"]


def decide(st, logits: torch.Tensor, parents=None, drafts=None):
    """verify_greedy (temperature 0) or lossless verify_sample (deterministic drafts = one-hot q). With `drafts`
    (a leading slice of st.drafts) the result is a fresh Accepted of that size, else it is written to st.acc."""
    out = st.acc if drafts is None else None
    drafts = st.drafts if drafts is None else drafts
    if st.temperature > 0:
        return verify_sample(drafts, logits, parents=parents, temperature=st.temperature, top_k=st.top_k,
                             top_p=st.top_p, seed=st.seed, offset=st.offset, out=out, validate=False)
    return verify_greedy(drafts, logits, parents=parents, out=out, validate=False)


def verify_chain(st) -> None:
    """Layers ℓ+1..L on hbuf = layer-ℓ states of x0, d_1..d_γ (causal block at L0), decide, commit."""
    m = st.model
    T = st.gamma + 1
    if st.host_exit:  # CPU only: verify just the drafted block (reading n_chain on the host is free there)
        T = int(st.n_chain.max()) + 1
    positions = st.L0[:, None] + st.arange_block[:T]
    h = m.forward_layers(st.hbuf[:, :T], st.exit_layer, m.config.num_hidden_layers, st.cache, st.L0, positions,
                         active=st.alive)
    if T == st.gamma + 1:
        acc = decide(st, m.logits(h))
    else:
        short = decide(st, m.logits(h), drafts=st.drafts[:, :T - 1])
        acc = st.acc
        acc.accept_len.copy_(short.accept_len)
        acc.path.fill_(-1)
        acc.path[:, :T].copy_(short.path)
        acc.tokens.fill_(-1)
        acc.tokens[:, :T].copy_(short.tokens)
    a = torch.where(st.alive, acc.accept_len, 0)
    last = (a - 1).clamp_min(0).long()
    # the adapter saw x0, d_1..d_{n-1}: catch up when all n drafts were accepted
    need = st.alive & (a > 0) & (a >= st.n_chain)
    commit(st, a, need, st.hbuf[torch.arange(st.B, device=a.device), last + 1])


def verify_tree(st) -> None:
    """Lays the tree out at L0 + 1 + node (siblings' parked shallow K/V scattered into place), runs layers
    ℓ+1..L over [x0, nodes] with the ancestor mask, decides, compacts the accepted path's K/V, commits."""
    m = st.model
    ell = st.exit_layer
    N = st.n_nodes
    g = st.gamma
    ns = N - g
    if ns > 0:
        idx = (st.L0[:, None] + 1 + g + torch.arange(ns, device=st.L0.device)).clamp_max(st.S - 1).long()
        idx = idx[None, :, None, :, None].expand(ell, -1, st.side_k.shape[2], -1, st.side_k.shape[4])
        st.cache.k[:ell].scatter_(3, idx, st.side_k)
        st.cache.v[:ell].scatter_(3, idx, st.side_v)
        h_in = torch.cat([st.hbuf, st.sib_h], dim=1)
    else:
        h_in = st.hbuf
    positions = st.L0[:, None] + st.tree_depth_full
    h = m.forward_layers(h_in, ell, m.config.num_hidden_layers, st.cache, st.L0, positions,
                         tree_mask=st.tree_mask, active=st.alive)
    acc = decide(st, m.logits(h), parents=st.tree_parents)
    a = torch.where(st.alive, acc.accept_len, 0)
    lens = st.L0 + 1
    compact_kv(st.cache.k, st.cache.v, lens, acc.path, a, validate=False)
    last = acc.path.gather(1, (a - 1).clamp_min(0).long()[:, None])[:, 0].long().clamp_min(0)
    # the adapter saw x0 and chain nodes 0..n-2 only
    need = st.alive & (a > 0) & (last >= st.n_chain - 1)
    commit(st, a, need, h_in[torch.arange(st.B, device=a.device), last + 1])


def commit(st, a: torch.Tensor, need_catch: torch.Tensor, catch_h: torch.Tensor) -> None:
    """Length update, next x0, catch-up request, EOS / length bookkeeping, and the packed per-cycle result
    st.out = [accept_len, n_chain, alive_after, tokens[0..N]] (the one device -> host transfer of a cycle)."""
    alive = st.alive
    toks = st.acc.tokens
    nxt = toks.gather(1, a.long()[:, None])[:, 0]
    st.tok.copy_(torch.where(alive, nxt, st.tok))
    st.L0.add_(torch.where(alive, a + 1, 0))
    st.need_catch.copy_(torch.where(alive, need_catch, st.need_catch))  # a finished row keeps its state
    st.catch_h.copy_(torch.where(alive[:, None], catch_h, st.catch_h))
    j = st.arange_block[:toks.shape[1]]
    emitted = j[None, :] <= a[:, None]
    hit = torch.zeros_like(alive)
    if st.eos is not None:
        hit = (emitted & (toks[:, :, None] == st.eos).any(dim=2)).any(dim=1)
    st.n_gen.add_(torch.where(alive, a + 1, 0))
    new_alive = alive & ~hit & (st.n_gen < st.max_new)
    st.out[:, 0].copy_(a)
    st.out[:, 1].copy_(torch.where(alive, st.n_chain, 0))
    st.out[:, 2].copy_(alive.to(torch.int32))
    st.out[:, 3:].copy_(toks)
    alive.copy_(new_alive)


def autoregressive_step(st) -> None:
    """The baseline: all layers on x0 at L0, then the target's token (verify with no drafts), commit."""
    m = st.model
    x = m.embed(st.tok[:, None])
    h = m.forward_layers(x, 0, m.config.num_hidden_layers, st.cache, st.L0, st.L0[:, None], active=st.alive)
    acc = decide(st, m.logits(h))
    a = torch.zeros_like(acc.accept_len)
    commit(st, a, torch.zeros_like(st.alive), st.catch_h)
