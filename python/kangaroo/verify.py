"""The verify side of a Kangaroo cycle: layers ℓ+1..L on the saved layer-ℓ hidden states, the target's decision
(kangaroo_kernels.verify_greedy / verify_sample), and the commit (a length update; compact_kv for trees).

In place on a DecodeState's static buffers, no host reads, fixed shapes (CUDA-graph capturable). The verify block
starts at the root x0 (position L0): target row 0 scores x0, row j + 1 scores draft node j. Accepting `a` nodes
commits L0 + a + 1 slots; the emitted correction/bonus token is the next x0. Only the adapter K/V of accepted
nodes the adapter never ran on (the last chain draft, a sibling, with lookup every node from where the path left the
chain) is missing: their layer-ℓ states go to buf.catch_h for the next cycle's catch-up (kangaroo.draft.catch_up).
"""

from __future__ import annotations

from typing import Optional

import torch

from kangaroo import lookup as _lookup
from kangaroo.draft import slots
from kangaroo_kernels import compact_kv, verify_greedy, verify_sample
from kangaroo_kernels._ext import ops as native_ops

__all__ = ["verify", "decide", "commit", "autoregressive_step"]


def decide(st, logits: torch.Tensor, parents=None, drafts=None):
    """verify_greedy (temperature 0) or lossless verify_sample (deterministic drafts = one-hot q). drafts: buf.drafts
    by default; the result goes to buf.acc when it has the drafts' width, else it is a fresh Accepted."""
    cfg, b = st.cfg, st.buf
    drafts = b.drafts if drafts is None else drafts
    out = b.acc if b.acc.path.shape[1] == drafts.shape[1] + 1 else None
    if cfg.temperature > 0:
        return verify_sample(drafts, logits, parents=parents, temperature=cfg.temperature, top_k=cfg.top_k,
                             top_p=cfg.top_p, seed=b.seed, offset=b.offset, out=out, validate=False)
    return verify_greedy(drafts, logits, parents=parents, out=out, validate=False)


def verify(st, n_drafted: Optional[int] = None) -> None:
    """Layers ℓ+1..L over [x0, draft nodes] at L0, decide, commit. Chain: a causal block of x0, d_1..d_γ (only
    x0, d_1..d_n with n_drafted = n: the CPU early exit). Tree: all nodes, the siblings' parked shallow K/V
    scattered to L0 + 1 + node, the ancestor mask; compact_kv then moves the accepted path's K/V into place.
    Lookup (cfg.lookup_max > 0): the merged tree of kangaroo.lookup.branch instead, laid out like a tree."""
    m, cfg, b, tree = st.model, st.cfg, st.buf, st.tree
    ell, g, Nb = cfg.exit_layer, cfg.gamma, cfg.n_base
    T = Nb + 1 if n_drafted is None or tree is not None else n_drafted + 1
    lk = _lookup.branch(st, T - 1) if b.lookup is not None else None
    drafts = b.drafts[:, :T - 1]
    if lk is not None:
        T, positions, mask, parents, drafts = lk.T, lk.positions, lk.mask, lk.parents, lk.tokens
    elif tree is None:
        positions, mask, parents = b.L0[:, None] + b.arange_block[:T], None, None
    else:
        idx = slots(st, b.L0 + 1 + g, Nb - g)
        b.cache.k[:ell].scatter_(3, idx, b.side_k)
        b.cache.v[:ell].scatter_(3, idx, b.side_v)
        positions, mask, parents = b.L0[:, None] + tree.depth, tree.mask, tree.parents
    h = m.forward_layers(b.hbuf[:, :T], ell, m.config.num_hidden_layers, b.cache, b.L0, positions, tree_mask=mask,
                         active=b.alive)
    acc = decide(st, m.logits(h), parents, drafts)
    a = torch.where(b.alive, acc.accept_len, 0)
    if parents is not None:  # a tree layout: the accepted path's K/V into place
        compact_kv(b.cache.k, b.cache.v, b.L0 + 1, acc.path, a, validate=False)
    look = None if lk is None else (_catch(st, acc.path, a), _lookup.accepted(st, lk, acc.path, a))
    commit(st, acc.tokens, a, None if tree is None else acc.path, *(look or (None, None)))


def _catch_leaf(st, path: Optional[torch.Tensor], a: torch.Tensor):
    """_catch without a lookup branch: only the path's (None: the chain's) last node, a leaf, can lack it."""
    b = st.buf
    last = (a - 1).clamp_min(0).long()
    if path is not None:
        last = path.gather(1, last[:, None])[:, 0].long().clamp_min(0)
    need = b.alive & (a > 0) & (last >= b.n_chain - 1)
    return need.to(torch.int32), b.hbuf.gather(1, (last + 1)[:, None, None].expand(-1, 1, b.hbuf.shape[2]))


def _catch(st, path: torch.Tensor, a: torch.Tensor):
    """(catch_n [B], catch_h [B, W, D]): the accepted positions without adapter K/V and their layer-ℓ states. The
    adapter ran on x0 and chain nodes 0..n_chain-2 only: the path lacks it from its first other node (the last chain
    draft, a sibling, a lookup node) on, and from x0 on in a row that drafted no chain (lookup_first)."""
    b, W = st.buf, st.cfg.catch_width
    i = b.arange_block[None, :path.shape[1]]
    seen = (path == i) & (i < b.n_chain[:, None] - 1) & (i < a[:, None])
    first = torch.cumprod(seen, 1, dtype=torch.int32).sum(1, dtype=torch.int32)
    x0 = (b.n_chain == 0).to(torch.int32)  # lookup_first: the adapter did not run on x0 either (hbuf row 0)
    j = b.arange_block[None, :W] - x0[:, None]
    idx = (first[:, None] + j).clamp(0, path.shape[1] - 1).long()
    nodes = torch.where(j < 0, 0, path.gather(1, idx).clamp_min(0).long() + 1)
    h = b.hbuf.gather(1, nodes[:, :, None].expand(-1, -1, b.hbuf.shape[2]))
    return torch.where(b.alive, a - first + x0, 0), h


def commit(st, toks: torch.Tensor, a: torch.Tensor, path: Optional[torch.Tensor] = None, catch=None,
           n_look: Optional[torch.Tensor] = None) -> None:
    """Length update, next x0, catch-up request (catch: _catch's, None: _catch_leaf's), EOS / length ends, the lookup
    history, the packed result buf.out = [accept_len, n_chain, alive_after, accepted lookup nodes, lookup hit,
    tokens...] (a cycle's one device -> host transfer; the host reads toks[:a + 1]). a [B]: 0 on finished rows. CPU
    early exit: one native call (csrc/cpu/commit_step.cpp), the same bits."""
    if st.commit_step is not None:
        return native_ops().commit_step(toks, a, path, *(catch or (None, None)), n_look, *st.commit_step)
    b = st.buf
    alive = b.alive
    catch_n, catch_h = _catch_leaf(st, path, a) if catch is None else catch
    if b.lookup is not None:
        _lookup.record(st, toks, a)
    b.tok.copy_(torch.where(alive, toks.gather(1, a.long()[:, None])[:, 0], b.tok))
    b.L0.add_(torch.where(alive, a + 1, 0))
    b.catch_n.copy_(torch.where(alive, catch_n, b.catch_n))  # a finished row keeps its state
    b.need_catch.copy_(b.catch_n > 0)
    b.catch_h.copy_(torch.where(alive[:, None, None], catch_h, b.catch_h))
    emitted = b.arange_block[None, :toks.shape[1]] <= a[:, None]  # an emitted EOS ends the row
    hit = torch.zeros_like(alive) if b.eos is None else (emitted & (toks[:, :, None] == b.eos).any(dim=2)).any(dim=1)
    b.n_gen.add_(torch.where(alive, a + 1, 0))
    new_alive = alive & ~hit & (b.n_gen < b.max_new)
    b.out[:, 0].copy_(a)
    b.out[:, 1].copy_(torch.where(alive, b.n_chain, 0))
    b.out[:, 2].copy_(alive.to(torch.int32))
    if b.lookup is not None:  # n_look is 0 on finished rows already (a is 0 there)
        b.out[:, 3].copy_(torch.zeros_like(a) if n_look is None else n_look)
        b.out[:, 4].copy_((alive & (b.lookup.look.n > 0)).to(torch.int32))
    b.out[:, 5:5 + toks.shape[1]].copy_(toks)
    alive.copy_(new_alive)


def autoregressive_step(st, n_drafted: Optional[int] = None) -> None:
    """The baseline: all layers on x0 at L0, then the target's token (verify with no drafts), commit."""
    m, b = st.model, st.buf
    h = m.forward_layers(m.embed(b.tok[:, None]), 0, m.config.num_hidden_layers, b.cache, b.L0, b.L0[:, None],
                         active=b.alive)
    acc = decide(st, m.logits(h))
    zero = torch.zeros_like(acc.accept_len)
    commit(st, acc.tokens, zero, catch=(zero, b.catch_h))
