"""Reference for append_attention: KV append + attention over prefix and new block (decode, chain, tree).

Semantics (the kernel matches them exactly, including on bad lengths, which the wrapper rejects when validating):
- Row b writes its T new K/V rows at cache positions cache_lens[b] + t; only positions inside [0, S) are written.
  cache_lens is not modified.
- Query t attends to the prefix [0, clamp(cache_lens[b], 0, S)) read from the cache, then to the new block taken
  from k_new/v_new (after RoPE, rounded to the cache dtype: the same values that were written): causally
  (new token j visible iff j <= t) or, with tree_mask, iff bit (j % 32) of word j // 32 of tree_mask[b, t] is set.
- Rows with active[b] False write nothing to the cache and get zeros in out.
- RoPE (HF rotate-half) with rope_cos_sin[max_pos, Dh] = cat(cos(pos * f), sin(pos * f)) over the Dh/2
  frequencies f; positions default to cache_lens[b] + t.
- Softmax in fp32; a query that sees no key gets zeros.
"""

from typing import Optional

import torch

__all__ = ["append_attention_ref", "apply_rope_ref"]


def apply_rope_ref(x: torch.Tensor, positions: torch.Tensor, rope_cos_sin: torch.Tensor) -> torch.Tensor:
    """HF rotate-half RoPE. x[B,T,H,Dh], positions[B,T] -> x rotated in fp32, rounded to x.dtype."""
    half = x.shape[-1] // 2
    cs = rope_cos_sin.float()[positions.long()]  # [B,T,Dh]
    cos, sin = cs[..., None, :half], cs[..., None, half:]
    x1, x2 = x.float()[..., :half], x.float()[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def tree_visible_ref(tree_mask: torch.Tensor, T: int) -> torch.Tensor:
    """Ancestor bit words [B,T,W] int32 -> bool [B,T,T]: [b, t, j] iff bit (j % 32) of word j // 32 is set."""
    j = torch.arange(T, device=tree_mask.device)
    words = tree_mask[:, :, j // 32].long()  # [B,T,T]
    return ((words >> (j % 32)) & 1).bool()


def append_attention_ref(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, cache_lens: torch.Tensor, *, tree_mask: Optional[torch.Tensor] = None,
                         active: Optional[torch.Tensor] = None, sm_scale: Optional[float] = None,
                         positions: Optional[torch.Tensor] = None,
                         rope_cos_sin: Optional[torch.Tensor] = None) -> torch.Tensor:
    """q[B,T,Hq,Dh], k_new/v_new[B,T,Hk,Dh], k_cache/v_cache[B,Hk,S,Dh] (written in place), cache_lens[B]
    -> out[B,T,Hq,Dh] in q.dtype."""
    B, T, Hq, Dh = q.shape
    Hk, S = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hk
    scale = Dh ** -0.5 if sm_scale is None else sm_scale
    lens = cache_lens.long()
    if rope_cos_sin is not None:
        if positions is None:
            positions = lens[:, None] + torch.arange(T, device=q.device)
        max_pos = rope_cos_sin.shape[0]
        positions = positions.long().clamp(0, max_pos - 1)
        q = apply_rope_ref(q, positions, rope_cos_sin)
        k_new = apply_rope_ref(k_new, positions, rope_cos_sin)
    k_new = k_new.to(k_cache.dtype)
    v_new = v_new.to(v_cache.dtype)
    if tree_mask is not None:
        visible_new = tree_visible_ref(tree_mask, T)
    else:
        visible_new = torch.ones(T, T, dtype=torch.bool, device=q.device).tril().expand(B, T, T)
    out = torch.zeros_like(q)
    for b in range(B):
        if active is not None and not bool(active[b]):
            continue
        L = int(lens[b])
        lp = min(max(L, 0), S)
        keys = torch.cat([k_cache[b, :, :lp].float(), k_new[b].transpose(0, 1).float()], dim=1)  # [Hk,lp+T,Dh]
        vals = torch.cat([v_cache[b, :, :lp].float(), v_new[b].transpose(0, 1).float()], dim=1)
        keys = keys.repeat_interleave(G, dim=0)
        vals = vals.repeat_interleave(G, dim=0)
        scores = q[b].transpose(0, 1).float() @ keys.transpose(1, 2) * scale  # [Hq,T,lp+T]
        mask = torch.cat([torch.ones(T, lp, dtype=torch.bool, device=q.device), visible_new[b]], dim=1)
        scores = scores.masked_fill(~mask, float("-inf"))
        p = torch.softmax(scores, dim=-1)
        p = torch.where(mask.any(dim=-1, keepdim=True), p, 0.0)  # a query that sees no key attends to nothing
        out[b] = (p @ vals).transpose(0, 1).to(q.dtype)
        for t in range(T):
            pos = L + t
            if 0 <= pos < S:
                k_cache[b, :, pos] = k_new[b, t]
                v_cache[b, :, pos] = v_new[b, t]
    return out
