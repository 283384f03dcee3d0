"""The draft side of a Kangaroo cycle: adapter-cache catch-up and the draft loop.

In place on a DecodeState's static buffers (kangaroo.state), fixed shapes, predicated rows (finished and exited
rows are no-ops for the kernels): CUDA-graph capturable. On CPU the same code runs eagerly; CPU early exit
(cfg.host_exit): host reads of flags (free there) skip work no row needs, where CUDA runs every step predicated in
the graph. A CPU chain on the int8 head runs all of draft() in one native call, the same kernels and bits
(kangaroo_kernels::draft_chain: the one-node catch-up, the resets and the loop of draft_step calls).

Draft loop (DESIGN.md section 1), γ = cfg.gamma, ℓ = cfg.exit_layer, x0 = buf.tok at position L0 = buf.L0, K =
cfg.topk candidates a step (K = 1: the chain; K > 1: a tree):
  step i = 0..γ: rows in `proc` run layers 1..ℓ on their current token at L0 + i (appending shallow K/V) and save
  the layer-ℓ hidden state in buf.hbuf[:, i]; for i < γ the rows still `drafting` run the adapter (appending
  adapter K/V) and the draft head: d_{i+1} = argmax, c = its probability; a row keeps drafting while c >= η. A row
  that stopped after k drafts runs one more shallow-only step on d_k (verification needs its layer-ℓ hidden state),
  so shallow K/V exists for x0, d_1..d_k and adapter K/V for x0, d_1..d_{k-1}.
With K > 1 each step also keeps the top-2..K candidates as leaf siblings of its chain draft (when their probability
>= cfg.sibling_threshold: a confidence-guided node budget). They go through the shallow layers with the next chain
token (a T = K block, each seeing the prefix and itself); their shallow K/V and hidden states are parked in side
buffers until verification lays the tree out in the cache (kangaroo.state.TreeLayout).
"""

from __future__ import annotations

from typing import Optional

import torch

from kangaroo import lookup as _lookup
from kangaroo.adapter import attend_block
from kangaroo_kernels import lm_head_exit, lm_head_topk
from kangaroo_kernels._ext import ops as native_ops

__all__ = ["catch_up", "draft", "draft_head", "host_done", "slots"]


def host_done(st, rows: torch.Tensor) -> bool:
    """The CPU early exit: True when cfg.host_exit is on and no row in `rows` needs the next step."""
    return st.cfg.host_exit and not bool(rows.any())


def _shallow(st, tokens, pos, active, tree_mask=None):
    """Layers 1..ℓ on tokens[B,T] all at position pos[B] (T > 1: siblings, each sees the prefix and itself)."""
    m, positions = st.model, pos[:, None].expand(-1, tokens.shape[1])
    return m.forward_layers(m.embed(tokens), 0, st.cfg.exit_layer, st.buf.cache, pos, positions,
                            tree_mask=tree_mask, active=active)


def catch_up(st) -> None:
    """Adapter K/V of the last accepted nodes the adapter never saw (all chain drafts accepted, a tree path ending in
    the last chain draft or a sibling, a lookup path: buf.catch_n of them, at positions L0 - catch_n .. L0 - 1),
    from their layer-ℓ states saved in buf.catch_h: one adapter step for a single node, else one block of W =
    cfg.catch_width (CPU early exit: W = the longest catch-up this cycle) whose tokens past a row's catch_n land at
    slots from L0 on, which this cycle's draft steps or the next catch-up rewrite before any adapter step reads them."""
    b = st.buf
    rows = b.need_catch & b.alive
    if host_done(st, rows):
        return
    start, W = (b.L0 - b.catch_n).clamp_min(0), b.catch_h.shape[1]
    if st.cfg.host_exit and W > 1:  # CPU: as wide as the longest catch-up (a free read), one step for one node
        W = int(torch.where(rows, b.catch_n, 0).max())
    if W > 1:
        _adapter_block(st, b.catch_h[:, :W], start, rows)
    else:
        st.adapter_plan.run(b.catch_h[:, 0], start, start, active=rows)
    b.need_catch.logical_and_(~b.alive)


def _adapter_block(st, h, start, active) -> None:
    """The adapter's K/V of a block h[B,T,D] at positions start[b] + t (kangaroo.adapter.attend_block: the same
    maths as adapter_forward token by token), appended at those slots; its output unused."""
    b = st.buf
    attend_block(st.adapter, st.adapter_eps, h, b.ak, b.av, start, start[:, None] + b.arange_block[:h.shape[1]],
                 st.rope, active)


def draft_head(st, r: torch.Tensor, drafting: torch.Tensor):
    """The draft decision on the adapter's pre-norm output r [B, D]: (token [B] i32, rows that keep drafting [B]
    bool, siblings [B, K-1] i32 with -1 for dropped ones, or None for the chain)."""
    cfg, nw, lm = st.cfg, st.adapter.norm_out, st.model.lm_head
    if cfg.topk == 1:  # the fused argmax + confidence + exit flag (on an int8 head copy: a CPU draft's largest read)
        if st.head_plan is not None:
            res = st.head_plan.run(r, active=drafting)
        else:
            res = lm_head_exit(r, lm, cfg.threshold, norm_weight=nw, eps=st.adapter_eps, active=drafting,
                               validate=False)
        return res.token, res.active, None
    toks, logp = lm_head_topk(r, lm, cfg.topk, norm_weight=nw, eps=st.adapter_eps, validate=False)
    keep = drafting[:, None] & (logp[:, 1:] >= cfg.log_sibling_threshold)
    return toks[:, 0], drafting & (logp[:, 0].exp() >= cfg.threshold), torch.where(keep, toks[:, 1:], -1)


def slots(st, start: torch.Tensor, n: int) -> torch.Tensor:
    """Cache slots start[b] + 0..n-1 (clamped into the cache) as a gather/scatter index over the shallow layers'
    K/V [ℓ, B, Hk, S, Dh]."""
    b = st.buf
    idx = (start[:, None] + b.arange_block[:n]).clamp_max(st.S - 1).long()
    return idx[None, :, None, :, None].expand(st.cfg.exit_layer, -1, b.cache.k.shape[2], -1, b.cache.k.shape[4])


def draft(st, n_steps: int) -> Optional[int]:
    """Catch-up, then the draft loop (module docstring) of at most n_steps <= γ steps (the adaptive cap). Fills
    buf.drafts (-1 padded), n_chain, hbuf, the parked siblings (with cfg.lookup_first a row whose lookup matched
    takes it as its chain: kangaroo.lookup.chain_block). The steps run if the CPU early exit stopped them, else None."""
    cfg, b, native = st.cfg, st.buf, st.draft_chain is not None  # native: a CPU chain, in one call (draft_chain)
    one = cfg.catch_width == 1 or cfg.host_exit  # draft_chain runs one-node catch-ups itself (-1: a wider one)
    if not native or not one:
        catch_up(st)
    hit = _lookup.first(st) if cfg.lookup_first else None  # rows that verify their lookup alone: no chain
    if native:
        passes = native_ops().draft_chain(*st.draft_step, *st.draft_chain, hit, one, n_steps, cfg.host_exit)
        if passes < 0:
            catch_up(st)
            passes = native_ops().draft_chain(*st.draft_step, *st.draft_chain, hit, False, n_steps, cfg.host_exit)
        ran = None if passes == n_steps + 1 else max(passes - 1, 0)
    else:
        b.cur.copy_(b.tok)
        b.n_chain.zero_()
        b.drafts.fill_(-1)
        proc = b.alive.clone() if hit is None else b.alive & ~hit
        ran = 0 if host_done(st, proc) else _loop(st, n_steps, proc, proc.clone())
    _lookup.chain_block(st, hit)
    return ran


def _loop(st, n_steps: int, proc: torch.Tensor, drafting: torch.Tensor) -> Optional[int]:
    cfg, b = st.cfg, st.buf
    K, g, ell = cfg.topk, cfg.gamma, cfg.exit_layer
    sib = None
    for i in range(n_steps + 1):
        pos = b.L0 + i
        if sib is None:
            h = _shallow(st, b.cur[:, None], pos, proc)
        else:
            h = _shallow(st, torch.cat([b.cur[:, None], sib.clamp_min(0)], dim=1), pos, proc, st.tree.siblings)
            # park the siblings' shallow K/V (slots pos+1..pos+K-1: the next chain step overwrites them) and states
            idx, sl = slots(st, pos + 1, K - 1), slice((i - 1) * (K - 1), i * (K - 1))
            b.side_k[:, :, :, sl].copy_(torch.gather(b.cache.k[:ell], 3, idx))
            b.side_v[:, :, :, sl].copy_(torch.gather(b.cache.v[:ell], 3, idx))
            b.hbuf[:, g + 1:][:, sl].copy_(h[:, 1:])
        b.hbuf[:, i].copy_(h0 := h[:, 0])
        if i == n_steps:
            return None
        if host_done(st, drafting):
            return i
        r = st.adapter_plan.run(h0, pos, pos, active=drafting)  # the adapter's pre-norm residual [B, D]
        tok, keep, sib = draft_head(st, r, drafting)
        b.drafts[:, i].copy_(torch.where(drafting, tok, -1))
        if sib is not None:
            b.drafts[:, g + i * (K - 1):g + (i + 1) * (K - 1)].copy_(sib)
        b.n_chain.add_(drafting.to(torch.int32))
        b.cur.copy_(torch.where(drafting, tok, b.cur))
        proc, drafting = drafting, keep
