"""The draft side of a Kangaroo cycle: adapter-cache catch-up and the draft loop (chain or tree).

Every function here works on the static buffers of a `kangaroo.generate.DecodeState` in place, reads no device
data on the host and has fixed shapes, so one cycle can be captured in a CUDA graph; on CPU the same code runs
eagerly. Rows are predicated with boolean masks (finished rows and rows whose draft exited are no-ops for the
kernels).

Chain draft loop (DESIGN.md section 1), γ = st.gamma, ℓ = st.exit_layer, x0 = st.tok at position L0 = st.L0:
  step i = 0..γ: rows in `proc` run layers 1..ℓ on their current token at position L0 + i (appending shallow K/V)
  and save the layer-ℓ hidden state in st.hbuf[:, i]; for i < γ the rows still `drafting` run the adapter
  (appending adapter K/V) and the LM-head exit: d_{i+1} = argmax, c = max softmax; a row keeps drafting while
  c >= η. A row that stopped after k drafts runs one more shallow-only step on d_k (its layer-ℓ hidden state is
  what verification needs), so shallow K/V exists for x0, d_1..d_k and adapter K/V for x0, d_1..d_{k-1}.
Tree mode adds, at every draft step, the top-2..K candidates as leaf siblings of that step's chain draft
(kept when their probability >= st.sibling_threshold: a confidence-guided node budget). They go through the
shallow layers together with the next chain token (a T = K block, each seeing the prefix and itself); their
shallow K/V is parked in side buffers until verification lays the tree out in the cache.

With st.host_exit (CPU models) the loop stops as soon as no row needs another step, reading the exit flags on the
host (free for CPU tensors); nodes never drafted keep token -1 and are never accepted. On CUDA all γ steps run
predicated inside one CUDA graph instead.
"""

from __future__ import annotations

import math

import torch

from kangaroo_kernels.ops.adapter_forward import adapter_forward
from kangaroo_kernels.ops.lm_head_exit import lm_head_exit, lm_head_topk

__all__ = ["draft_head", "draft_topk", "catch_up", "draft_chain", "draft_tree"]


def draft_head(r: torch.Tensor, lm_head: torch.Tensor, threshold: float, norm_weight: torch.Tensor, eps: float,
               active: torch.Tensor):
    """(token [B] i32, conf [B] f32, active_out [B] bool) of the draft distribution softmax(lm_head(norm(r)))."""
    res = lm_head_exit(r, lm_head, threshold, norm_weight=norm_weight, eps=eps, active=active, validate=False)
    return res[0], res[1], res[2]


def draft_topk(r: torch.Tensor, lm_head: torch.Tensor, k: int, norm_weight: torch.Tensor, eps: float):
    """(tokens [B,k] i32, logprobs [B,k] f32): the k most likely draft tokens, most likely first."""
    res = lm_head_topk(r, lm_head, k, norm_weight=norm_weight, eps=eps, validate=False)
    return res[0], res[1]


def _adapter_step(st, h, pos, active):
    """The adapter on h[B,D] at position pos (appending its K/V); returns the pre-norm residual (the out norm is
    applied inside the LM-head exit)."""
    return adapter_forward(h, st.adapter_weights, st.ak, st.av, pos, pos, active=active, rope_cos_sin=st.rope,
                           eps=st.adapter_eps, apply_out_norm=False, validate=False)


def catch_up(st) -> None:
    """Adapter K/V for the last accepted node when the previous cycle accepted a node the adapter never saw
    (all chain drafts accepted, or a tree path ending in the last chain draft or a sibling): its layer-ℓ hidden
    state was saved in st.catch_h; its position is L0 - 1."""
    rows = st.need_catch & st.alive
    if st.host_exit and not bool(rows.any()):  # CPU only: no row needs it (free read of a CPU tensor)
        return
    pos = (st.L0 - 1).clamp_min(0)
    _adapter_step(st, st.catch_h, pos, rows)
    st.need_catch.logical_and_(~st.alive)


def _shallow(st, tokens, pos, active, tree_mask=None):
    """Layers 1..ℓ on tokens[B,T] all at position pos[B] (T > 1: siblings, each sees the prefix and itself)."""
    m = st.model
    T = tokens.shape[1]
    x = m.embed(tokens)
    positions = pos[:, None].expand(-1, T)
    return m.forward_layers(x, 0, st.exit_layer, st.cache, pos, positions, tree_mask=tree_mask, active=active)


def _start_cycle(st):
    """Resets the per-cycle draft buffers (current token x0, no drafts); returns (proc, drafting): the rows that run
    the next shallow step and the rows still drafting, both every live row at first."""
    st.cur.copy_(st.tok)
    st.n_chain.zero_()
    st.drafts.fill_(-1)
    return st.alive.clone(), st.alive.clone()


def draft_chain(st, steps=None) -> int:
    """The chain draft loop (see the module docstring). Fills st.drafts[:, :γ] (-1 padded), st.n_chain, st.hbuf.
    steps (<= γ, default γ): at most this many draft steps this cycle (the adaptive cap of the predicated path).
    Returns the number of draft steps run."""
    n_steps = st.gamma if steps is None else steps
    lm = st.model.lm_head
    nw = st.adapter_weights.norm_out
    cur = st.cur
    proc, drafting = _start_cycle(st)
    for i in range(n_steps + 1):
        pos = st.L0 + i
        h = _shallow(st, cur[:, None], pos, proc)[:, 0]
        st.hbuf[:, i].copy_(h)
        if i == n_steps or (st.host_exit and not bool(drafting.any())):  # the last shallow-only step was this one
            return i
        r = _adapter_step(st, h, pos, drafting)
        tok, conf, act_out = draft_head(r, lm, st.threshold, nw, st.adapter_eps, drafting)
        st.drafts[:, i].copy_(torch.where(drafting, tok, -1))
        st.n_chain.add_(drafting.to(torch.int32))
        cur.copy_(torch.where(drafting, tok, cur))
        proc = drafting
        drafting = act_out & drafting


def draft_tree(st, steps=None) -> int:
    """The tree draft loop: the chain as in draft_chain plus K-1 leaf siblings per step.

    Node layout (fixed for the whole generation, see DecodeState.tree_parents): chain nodes 0..γ-1 (node c is
    d_{c+1}), then the siblings of step i at γ + i (K-1) + j - 1 (j = 2..K by rank). Fills st.drafts (-1 for
    absent nodes), st.hbuf (chain), st.sib_h, and the parked shallow K/V st.side_k/side_v of the siblings.
    steps: as in draft_chain. Returns the number of draft steps run."""
    g, K = st.gamma, st.topk
    n_steps = g if steps is None else steps
    lm = st.model.lm_head
    nw = st.adapter_weights.norm_out
    cur = st.cur
    proc, drafting = _start_cycle(st)
    sib = torch.full_like(st.drafts[:, :K - 1], -1)
    log_sib = math.log(st.sibling_threshold) if st.sibling_threshold > 0 else -math.inf
    ell = st.exit_layer
    for i in range(n_steps + 1):
        pos = st.L0 + i
        if i == 0:
            h = _shallow(st, cur[:, None], pos, proc)
        else:
            block = torch.cat([cur[:, None], sib.clamp_min(0)], dim=1)
            h = _shallow(st, block, pos, proc, tree_mask=st.diag_mask)
            # park the siblings' shallow K/V (slots pos+1..pos+K-1 are overwritten by the next chain step)
            idx = (pos[:, None] + torch.arange(1, K, device=pos.device)).clamp_max(st.S - 1).long()
            idx = idx[None, :, None, :, None].expand(ell, -1, st.side_k.shape[2], -1, st.side_k.shape[4])
            sl = slice((i - 1) * (K - 1), i * (K - 1))
            st.side_k[:, :, :, sl].copy_(torch.gather(st.cache.k[:ell], 3, idx))
            st.side_v[:, :, :, sl].copy_(torch.gather(st.cache.v[:ell], 3, idx))
            st.sib_h[:, sl].copy_(h[:, 1:])
        st.hbuf[:, i].copy_(h[:, 0])
        if i == n_steps or (st.host_exit and not bool(drafting.any())):  # the last shallow-only step was this one
            return i
        r = _adapter_step(st, h[:, 0], pos, drafting)
        toks, logp = draft_topk(r, lm, K, nw, st.adapter_eps)
        tok = toks[:, 0]
        act_out = drafting & (logp[:, 0].exp() >= st.threshold)
        st.drafts[:, i].copy_(torch.where(drafting, tok, -1))
        keep = drafting[:, None] & (logp[:, 1:] >= log_sib)
        sib = torch.where(keep, toks[:, 1:], -1)
        st.drafts[:, g + i * (K - 1):g + (i + 1) * (K - 1)].copy_(sib)
        st.n_chain.add_(drafting.to(torch.int32))
        cur.copy_(torch.where(drafting, tok, cur))
        proc = drafting
        drafting = act_out
