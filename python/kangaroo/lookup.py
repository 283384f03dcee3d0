"""The lookup branch of a Kangaroo + lookup cycle (issue 12): besides the adapter's chain (or tree), the up to M
tokens that followed the most recent earlier occurrence of the longest suffix (n_min..n_max tokens) of the row's
committed sequence (kangaroo_kernels.ngram_lookup), merged into the cycle's tree (merge_lookup_tree: the tokens it
shares with the chain from the root are the chain's nodes, from the first disagreement on it is its own branch).

Verification runs layers ℓ+1..L on layer-ℓ states, so the merged tree first gets one block through layers 1..ℓ:
[x0, the N+M merged nodes] at cache slots L0.., positions L0 + depth, the merged ancestor mask. That rewrites x0's
and the adapter's nodes' shallow K/V with the same maths (a block, as the deep verify already is) and gives every
node's layer-ℓ state in buf.hbuf; node x sits at slot L0 + 1 + x, so compact_kv of the accepted path lays the
cache out as for a tree. Absent nodes (token -1) run as token 0 and are never accepted.

Static shapes and no host read on the predicated path (CUDA). CPU early exit (cfg.host_exit): the lookup slots are
cut to the longest match, and the block and merge are skipped when no row has a private lookup node: the cycle
then is Kangaroo's (plus the lookup itself).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from kangaroo_kernels import build_tree, merge_lookup_tree

__all__ = ["Branch", "accepted", "branch", "chain_block", "find", "first", "record"]


class Branch(NamedTuple):
    """A cycle's merged tree as the verify block sees it: T = 1 + nodes, positions [B, T], mask [B, T, W]
    ([x0, nodes] ancestor bits), parents / tokens / source [B, T-1] (merge_lookup_tree's)."""

    T: int
    positions: torch.Tensor
    mask: torch.Tensor
    parents: torch.Tensor
    tokens: torch.Tensor
    source: torch.Tensor


def find(st):
    """The lookup of this cycle (ngram_lookup of each row's committed sequence) into buf.lookup.look."""
    return st.lookup_plan.run(st.buf.L0 + 1)


def first(st) -> Optional[torch.Tensor]:
    """cfg.lookup_first: this cycle's lookup (find); the rows that found a continuation [B] bool, which verify it
    alone (sequence drafting: chain_block; a tree: merged by branch) and draft no adapter chain this cycle. None:
    the CPU early exit saw no row match (the cycle is Kangaroo's)."""
    n = find(st).n
    if st.cfg.host_exit and not bool(n.any()):
        return None
    return st.buf.alive & (n > 0)


def chain_block(st, hit: Optional[torch.Tensor]) -> None:
    """cfg.lookup_first with sequence drafting, after the draft loop: each row in `hit` takes its lookup tokens as
    its chain (buf.drafts[:, :M], -1 padded) and one causal block of [x0, tokens] through layers 1..ℓ at L0.. gives
    their shallow K/V and layer-ℓ states (buf.hbuf[:, :M + 1]). Every row's draft is then a chain: verify needs no
    merge, tree mask or compact_kv (branch). CPU early exit: cut to the longest match, skipped without one (or with
    hit None: first found no match)."""
    cfg, b, m = st.cfg, st.buf, st.model
    if hit is None or st.tree is not None:
        return
    look = b.lookup.look
    M = int((look.n * hit).max()) if cfg.host_exit else look.tokens.shape[1]
    if M == 0:
        return
    toks = look.tokens[:, :M]
    b.drafts[:, :M].copy_(torch.where(hit[:, None], toks, b.drafts[:, :M]))
    tokens = torch.cat([b.tok[:, None], toks.clamp_min(0)], 1)
    h = m.forward_layers(m.embed(tokens), 0, cfg.exit_layer, b.cache, b.L0, b.L0[:, None] + b.arange_block[:M + 1],
                         active=hit)
    b.hbuf[:, :M + 1].copy_(torch.where(hit[:, None, None], h, b.hbuf[:, :M + 1]))


def branch(st, n_base: int) -> Optional[Branch]:
    """The lookup (find; with cfg.lookup_first the draft loop already ran it), the merge with the first n_base
    adapter nodes, and the merged tree's shallow pass (layer-ℓ states into buf.hbuf[:, :T]). None: the CPU early
    exit found no private lookup node. cfg.lookup_first with sequence drafting: the chains of chain_block, verified
    as a chain (mask and parents None; source 2 on the rows that took their lookup)."""
    cfg, b, lb, m = st.cfg, st.buf, st.buf.lookup, st.model
    if cfg.lookup_first and st.tree is None:
        m_eff = int((lb.look.n * b.alive).max()) if cfg.host_exit else b.drafts.shape[1]
        if m_eff == 0:
            return None
        hit, width = b.alive & (lb.look.n > 0), max(n_base, m_eff)
        tokens = b.drafts[:, :width]
        source = torch.where(hit[:, None], 2, (tokens >= 0).to(torch.int32))
        return Branch(width + 1, b.L0[:, None] + b.arange_block[:width + 1], None, None, tokens, source)
    look = lb.look if cfg.lookup_first else find(st)
    base, parents = b.drafts[:, :n_base], None if st.tree is None else st.tree.parents
    if cfg.host_exit:  # host reads of CPU tensors are free
        m_eff = int((look.n * b.alive).max())
        if m_eff == 0:
            return None
        merged = merge_lookup_tree(base, look.tokens[:, :m_eff], n_look=look.n, parents=parents, validate=False)
        if not bool(((merged.source[:, n_base:] == 2) & b.alive[:, None]).any()):
            return None
    else:
        merged = merge_lookup_tree(base, look.tokens, n_look=look.n, parents=parents, out=lb.merged, validate=False)
    B, N = merged.tokens.shape
    root = torch.full((B, 1), -1, dtype=torch.int32, device=b.tok.device)
    tree = build_tree(torch.cat([root, torch.where(merged.parents >= 0, merged.parents + 1, 0)], 1), validate=False)
    positions = b.L0[:, None] + tree.depth - 1  # x0 is node 0 of this tree, at depth 1
    tokens = torch.cat([b.tok[:, None], merged.tokens.clamp_min(0)], 1)
    h = m.forward_layers(m.embed(tokens), 0, cfg.exit_layer, b.cache, b.L0, positions, tree_mask=tree.mask,
                         active=b.alive)
    b.hbuf[:, :N + 1].copy_(h)
    return Branch(N + 1, positions, tree.mask, merged.parents, merged.tokens, merged.source)


def accepted(st, lk: Branch, path: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """[B] i32: the accepted nodes of path[:, :a] (verify's Accepted) from the lookup's own branch (source 2)."""
    on_path = st.buf.arange_block[None, :path.shape[1]] < a[:, None]
    return (on_path & (lk.source.gather(1, path.clamp_min(0).long()) == 2)).sum(1, dtype=torch.int32)


def record(st, toks: torch.Tensor, a: torch.Tensor) -> None:
    """Appends a cycle's emitted tokens toks[:, :a+1] to the live rows' committed history (before L0 advances).
    The static-width write also lands toks[:, a+1:] past the new committed length, where nothing reads it."""
    b, h = st.buf, st.buf.lookup.history
    if st.cfg.host_exit:  # CPU (host reads are free): a slice copy per live row instead of gather + where + scatter
        for row, (alive, start) in enumerate(zip(b.alive.tolist(), (b.L0 + 1).tolist())):
            if alive:
                n = min(toks.shape[1], h.shape[1] - start)
                h[row, start:start + n].copy_(toks[row, :n])
        return
    idx = (b.L0[:, None] + 1 + b.arange_block[:toks.shape[1]]).clamp_max(h.shape[1] - 1).long()
    h.scatter_(1, idx, torch.where(b.alive[:, None], toks, h.gather(1, idx)))
