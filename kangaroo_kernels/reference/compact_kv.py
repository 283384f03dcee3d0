"""Executable spec of compact_kv: move the accepted tree nodes' K/V into consecutive cache positions.

Caches [L, B, Hk, S, Dh] (or [B, Hk, S, Dh]: one layer). Tree node j of row b sits at cache_lens[b] + j. For
i < accept_len[b], position cache_lens[b] + i receives the K/V of node path[b, i] (sequentially in i, which is
the same as all at once because path is increasing); then cache_lens[b] += accept_len[b]. Positions outside
cache_lens[b] .. cache_lens[b] + accept_len[b] - 1 are unchanged.
"""

import torch

__all__ = ["compact_kv_ref"]


def compact_kv_ref(k_cache: torch.Tensor, v_cache: torch.Tensor, cache_lens: torch.Tensor, path: torch.Tensor,
                   accept_len: torch.Tensor):
    """Reference of kangaroo_kernels.compact_kv, out of place: returns (k_cache, v_cache, cache_lens) new tensors."""
    k, v = k_cache.clone(), v_cache.clone()
    one_layer = k.dim() == 4
    if one_layer:
        k, v = k.unsqueeze(0), v.unsqueeze(0)
    lens = cache_lens.cpu().long().tolist()
    acc = accept_len.cpu().long().tolist()
    pth = path.cpu().long().tolist()
    for b, (n0, a) in enumerate(zip(lens, acc)):
        for i in range(a):
            j = pth[b][i]
            k[:, b, :, n0 + i] = k[:, b, :, n0 + j]
            v[:, b, :, n0 + i] = v[:, b, :, n0 + j]
    new_lens = (cache_lens.long() + accept_len.long()).to(cache_lens.dtype)
    if one_layer:
        k, v = k.squeeze(0), v.squeeze(0)
    return k, v, new_lens
