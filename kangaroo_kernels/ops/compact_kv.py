"""compact_kv: after tree verification, move the accepted nodes' K/V into consecutive cache positions (all
layers in one launch) and advance the cache lengths.

Native op (C++ CPU twin, CUDA kernels: csrc/include/kangaroo/compact_kv.cuh); semantics in
kangaroo_kernels/reference/compact_kv.py.
"""

from typing import Optional

import torch

from kangaroo_kernels import _checks, _ext

__all__ = ["compact_kv"]


def _op():
    return _ext.inplace_op("compact_kv")


def _validate(cache_lens: torch.Tensor, path: torch.Tensor, accept_len: torch.Tensor, S: int) -> None:
    B, N1 = path.shape
    N = N1 - 1
    a = accept_len.long()
    i = torch.arange(N1, device=path.device)
    live = i[None, :] < a[:, None]
    p = path.long()
    bad_a = (a < 0) | (a > N)
    bad_p = live & ((p < 0) | (p >= N))
    # strictly increasing on the accepted prefix (a root-to-leaf path in topological order)
    bad_order = live[:, 1:] & (p[:, 1:] <= p[:, :-1])
    last = torch.where(live, p, torch.full_like(p, -1)).amax(dim=1)  # max(path) over the accepted prefix
    lens = cache_lens.long()
    bad_lens = lens < 0
    overflow = (a > 0) & (lens + last + 1 > S)
    flags = torch.stack([bad_a.any(), bad_p.any(), bad_order.any(), bad_lens.any(), overflow.any()]).tolist()
    if flags[0]:
        raise ValueError(f"accept_len [B] must be in [0, N = {N}], got {accept_len.tolist()}")
    if flags[1] or flags[2]:
        raise ValueError(f"path [B, N+1] must hold increasing node indices in [0, N = {N}) in its first "
                         f"accept_len[b] entries, got {path.tolist()}")
    if flags[3]:
        raise ValueError(f"cache_lens [B] must be >= 0, got {cache_lens.tolist()}")
    if flags[4]:
        raise ValueError(f"cache overflow: cache_lens[b] + max(path[b, :accept_len[b]]) + 1 must be <= S = {S}; "
                         f"cache_lens = {cache_lens.tolist()}, accept_len = {accept_len.tolist()}")


def compact_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, cache_lens: torch.Tensor, path: torch.Tensor,
               accept_len: torch.Tensor, *, validate: Optional[bool] = None) -> None:
    """In place: for i < accept_len[b], the K/V of tree node path[b, i] (at position cache_lens[b] + path[b, i])
    moves to position cache_lens[b] + i, in every layer and head; then cache_lens[b] += accept_len[b].

    k_cache, v_cache [L, B, Hk, S, Dh] (or [B, Hk, S, Dh]: one layer), any float dtype, same shape; any strides
    but the last dim must be contiguous. cache_lens [B] int32 (int64 is accepted and updated too); path
    [B, N+1] and accept_len [B] int32/int64, e.g. from verify_greedy / verify_sample. path must be increasing
    on its accepted prefix (it is for a root-to-leaf path). Identity rows (a chain) only update the length.
    Validation: accept_len in [0, N], path entries in [0, N) and increasing, and no cache overflow
    (cache_lens[b] + max(path[b, :accept_len[b]]) + 1 <= S). Without it, the kernels skip invalid moves:
    accept_len is clamped to [0, N], a path entry outside [0, N) moves nothing, a row whose cache_lens is outside
    [0, S] is left alone; int64 values outside int32 saturate first (they never wrap into range).
    """
    _checks.check_tensor("k_cache", k_cache, expected="[L, B, Hk, S, Dh] or [B, Hk, S, Dh]")
    if k_cache.dim() not in (4, 5) or not k_cache.is_floating_point():
        raise ValueError(f"k_cache must be a float tensor [L, B, Hk, S, Dh] or [B, Hk, S, Dh], got "
                         f"{k_cache.dtype} {tuple(k_cache.shape)}")
    _checks.check_tensor("v_cache", v_cache, dtypes=(k_cache.dtype,), shape=tuple(k_cache.shape),
                         device=k_cache.device, expected=f"{list(k_cache.shape)} like k_cache")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim (head_dim)")
    k5 = k_cache if k_cache.dim() == 5 else k_cache.unsqueeze(0)
    v5 = v_cache if v_cache.dim() == 5 else v_cache.unsqueeze(0)
    B, S = k5.shape[1], k5.shape[3]
    dev = k_cache.device
    _checks.check_tensor("cache_lens", cache_lens, dtypes=_checks.INDEX_DTYPES, shape=(B,), device=dev,
                         expected="[B]")
    _checks.check_tensor("path", path, dtypes=_checks.INDEX_DTYPES, ndim=2, device=dev, expected="[B, N+1]")
    if path.shape[0] != B or path.shape[1] < 1:
        raise ValueError(f"path has shape {tuple(path.shape)} (expected [B, N+1] with B = {B})")
    _checks.check_tensor("accept_len", accept_len, dtypes=_checks.INDEX_DTYPES, shape=(B,), device=dev,
                         expected="[B]")
    if _checks.validating(validate):
        _validate(cache_lens, path, accept_len, S)
    lens32 = cache_lens if cache_lens.dtype == torch.int32 and cache_lens.is_contiguous() else \
        _checks.to_int32(cache_lens)
    _op()(k5, v5, lens32, _checks.to_int32(path), _checks.to_int32(accept_len))
    if lens32 is not cache_lens:
        if cache_lens.dtype == torch.int64:  # a saturated (out-of-range) row was left alone: keep its value
            lens32 = torch.where((cache_lens >= 0) & (cache_lens <= S), lens32.long(), cache_lens)
        cache_lens.copy_(lens32)
