"""append_attention: append the new K/V to a static cache and attend over prefix + new block.

One op covers decode (T = 1), chain verification (T > 1, causal inside the block) and tree verification
(T > 1 with the ancestor bit mask of build_tree). CPU tensors run the reference; CUDA tensors run the Triton
split-KV kernel (kangaroo_kernels/triton/append_attention.py).
"""

import numbers
from typing import Optional

import torch

from kangaroo_kernels import _checks
from kangaroo_kernels.reference.append_attention import apply_rope_ref, tree_visible_ref

__all__ = ["append_attention"]

_lib = torch.library.Library("kangaroo_kernels", "FRAGMENT")
# num_splits: 0 lets the kernel choose (from B, Hk, T and S, never from cache_lens values).
_lib.define(
    "append_attention(Tensor q, Tensor k_new, Tensor v_new, Tensor(a!) k_cache, Tensor(b!) v_cache, "
    "Tensor cache_lens, Tensor? tree_mask, Tensor? active, Tensor? positions, Tensor? rope_cos_sin, "
    "float sm_scale, int num_splits, Tensor(c!) out) -> ()")


def _append_attention_cpu(q, k_new, v_new, k_cache, v_cache, cache_lens, tree_mask, active, positions,
                          rope_cos_sin, sm_scale, num_splits, out):
    """append_attention_ref's semantics vectorised over rows (the reference loops over rows and tokens in Python,
    which dominated a small model's CPU decode step). Reading lengths on the host is free for CPU tensors."""
    B, T, Hq, Dh = q.shape
    Hk, S = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hk
    lens = cache_lens.long()
    if rope_cos_sin is not None:
        if positions is None:
            positions = lens[:, None] + torch.arange(T)
        positions = positions.long().clamp(0, rope_cos_sin.shape[0] - 1)
        q = apply_rope_ref(q, positions, rope_cos_sin)
        k_new = apply_rope_ref(k_new, positions, rope_cos_sin)
    k_new = k_new.to(k_cache.dtype)
    v_new = v_new.to(v_cache.dtype)
    act = torch.ones(B, dtype=torch.bool) if active is None else active
    lp = lens.clamp(0, S)
    P = int(lp.masked_fill(~act, 0).max())
    keys = torch.cat([k_cache[:, :, :P].float(), k_new.transpose(1, 2).float()], dim=2)  # [B, Hk, P+T, Dh]
    vals = torch.cat([v_cache[:, :, :P].float(), v_new.transpose(1, 2).float()], dim=2)
    qg = q.float().view(B, T, Hk, G, Dh).permute(0, 2, 3, 1, 4).reshape(B, Hk, G * T, Dh)  # query heads of a kv head
    scores = qg @ keys.transpose(-1, -2) * (Dh ** -0.5 if sm_scale is None else sm_scale)
    if tree_mask is not None:
        visible_new = tree_visible_ref(tree_mask, T)
    else:
        visible_new = torch.ones(T, T, dtype=torch.bool).tril().expand(B, T, T)
    mask = torch.cat([(torch.arange(P) < lp[:, None])[:, None, :].expand(B, T, P), visible_new], dim=2)
    mask = mask[:, None, None].expand(B, Hk, G, T, P + T).reshape(B, Hk, G * T, P + T)
    p = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    p = torch.where(mask.any(dim=-1, keepdim=True), p, 0.0)  # a query that sees no key attends to nothing
    o = (p @ vals).view(B, Hk, G, T, Dh).permute(0, 3, 1, 2, 4).reshape(B, T, Hq, Dh)
    out.copy_(torch.where(act[:, None, None, None], o.to(q.dtype), 0))
    idx = lens[:, None] + torch.arange(T)
    b_i, t_i = (act[:, None] & (idx >= 0) & (idx < S)).nonzero(as_tuple=True)
    k_cache[b_i, :, idx[b_i, t_i]] = k_new[b_i, t_i]
    v_cache[b_i, :, idx[b_i, t_i]] = v_new[b_i, t_i]


def _append_attention_cpu_ref_signature(q, k_new, v_new, k_cache, v_cache, cache_lens, *, tree_mask=None,
                                        active=None, sm_scale=None, positions=None, rope_cos_sin=None):
    """_append_attention_cpu with append_attention_ref's signature (adapter_forward's CPU path uses it)."""
    out = torch.empty_like(q)
    _append_attention_cpu(q, k_new, v_new, k_cache, v_cache, cache_lens, tree_mask, active, positions, rope_cos_sin,
                          sm_scale, 0, out)
    return out


def _append_attention_cuda(q, k_new, v_new, k_cache, v_cache, cache_lens, tree_mask, active, positions,
                           rope_cos_sin, sm_scale, num_splits, out):
    from kangaroo_kernels.triton.append_attention import append_attention_triton

    if q.device.index != torch.cuda.current_device():
        with torch.cuda.device(q.device):
            append_attention_triton(q, k_new, v_new, k_cache, v_cache, cache_lens, tree_mask, active, positions,
                                    rope_cos_sin, sm_scale, num_splits, out)
        return
    append_attention_triton(q, k_new, v_new, k_cache, v_cache, cache_lens, tree_mask, active, positions,
                            rope_cos_sin, sm_scale, num_splits, out)


_lib.impl("append_attention", _append_attention_cpu, "CPU")
_lib.impl("append_attention", _append_attention_cuda, "CUDA")


@torch.library.register_fake("kangaroo_kernels::append_attention", lib=_lib)
def _append_attention_fake(q, k_new, v_new, k_cache, v_cache, cache_lens, tree_mask, active, positions,
                           rope_cos_sin, sm_scale, num_splits, out):
    return None


def _prepare(q, k_new, v_new, k_cache, v_cache, cache_lens, tree_mask, active, sm_scale, positions, rope_cos_sin,
             num_splits, out, validate):
    """Checks every argument (data checks only when validating) and returns the op's argument tuple."""
    _checks.check_tensor("q", q, dtypes=_checks.FLOAT_DTYPES, ndim=4, expected="[B, T, Hq, Dh]")
    B, T, Hq, Dh = q.shape
    dev = q.device
    if T < 1:
        raise ValueError(f"q must hold T >= 1 new tokens (expected [B, T, Hq, Dh]), got shape {tuple(q.shape)}")
    if Dh < 32 or Dh > 256 or Dh & (Dh - 1):  # the kernel's dots take Dh/2 >= 16 columns
        raise ValueError(f"q: head dim Dh must be a power of two in [32, 256] (expected [B, T, Hq, Dh]), got {Dh}")
    _checks.check_tensor("k_new", k_new, dtypes=(q.dtype,), shape=(B, T, None, Dh), device=dev,
                         expected=f"[B={B}, T={T}, Hk, Dh={Dh}] in q's dtype")
    Hk = k_new.shape[2]
    if Hk < 1 or Hq % Hk:
        raise ValueError(f"k_new: the number of KV heads Hk={Hk} must divide the query heads Hq={Hq} (GQA)")
    _checks.check_tensor("v_new", v_new, dtypes=(q.dtype,), shape=(B, T, Hk, Dh), device=dev,
                         expected=f"[B={B}, T={T}, Hk={Hk}, Dh={Dh}] in q's dtype")
    _checks.check_tensor("k_cache", k_cache, dtypes=(q.dtype,), shape=(B, Hk, None, Dh), device=dev,
                         expected=f"[B={B}, Hk={Hk}, S, Dh={Dh}] in q's dtype")
    S = k_cache.shape[2]
    _checks.check_tensor("v_cache", v_cache, dtypes=(q.dtype,), shape=(B, Hk, S, Dh), device=dev,
                         expected=f"[B={B}, Hk={Hk}, S={S}, Dh={Dh}] in q's dtype")
    _checks.check_tensor("cache_lens", cache_lens, dtypes=_checks.INDEX_DTYPES, shape=(B,), device=dev,
                         expected=f"[B={B}] int32")
    if tree_mask is not None:
        W = (T + 31) // 32
        _checks.check_tensor("tree_mask", tree_mask, dtypes=(torch.int32,), shape=(B, T, W), device=dev,
                             expected=f"[B={B}, T={T}, ceil(T/32)={W}] int32 ancestor bit words")
    if active is not None:
        _checks.check_tensor("active", active, dtypes=(torch.bool,), shape=(B,), device=dev,
                             expected=f"[B={B}] bool")
    if rope_cos_sin is not None:
        if isinstance(rope_cos_sin, (tuple, list)):
            raise ValueError("rope_cos_sin must be one fp32 tensor [max_pos, Dh] = cat(cos, sin) over the Dh/2 "
                             "frequencies (see make_rope_cos_sin), not a tuple")
        _checks.check_tensor("rope_cos_sin", rope_cos_sin, dtypes=(torch.float32,), shape=(None, Dh), device=dev,
                             expected=f"[max_pos, Dh={Dh}] float32 = cat(cos, sin)")
        if rope_cos_sin.shape[0] < 1:
            raise ValueError("rope_cos_sin must have max_pos >= 1 rows (expected [max_pos, Dh])")
    if positions is not None:
        if rope_cos_sin is None:
            raise ValueError("positions is only used with rope_cos_sin (fused RoPE); pass both or neither")
        _checks.check_tensor("positions", positions, dtypes=_checks.INDEX_DTYPES, shape=(B, T), device=dev,
                             expected=f"[B={B}, T={T}] int32")
    sm_scale = Dh ** -0.5 if sm_scale is None else _checks.check_real("sm_scale", sm_scale, lo=0.0, lo_open=True)
    if num_splits is None:
        num_splits = 0
    elif isinstance(num_splits, bool) or not isinstance(num_splits, numbers.Integral) or num_splits < 1:
        raise ValueError(f"num_splits must be a positive int or None (automatic), got {num_splits!r}")
    num_splits = int(num_splits)
    if out is None:
        out = torch.empty((B, T, Hq, Dh), dtype=q.dtype, device=dev)
    else:
        _checks.check_out("out", out, (B, T, Hq, Dh), q.dtype, dev)

    if _checks.validating(validate) and B > 0:
        lens = cache_lens.long()
        rows = active if active is not None else torch.ones(B, dtype=torch.bool, device=dev)
        bad = rows & ((lens < 0) | (lens + T > S))
        if bool(bad.any()):
            b = int(bad.nonzero()[0, 0])
            raise ValueError(f"cache overflow: cache_lens[{b}] = {int(lens[b])}, T = {T}: need "
                             f"0 <= cache_lens[b] and cache_lens[b] + T <= S = {S} (k_cache [B, Hk, S, Dh])")
        if rope_cos_sin is not None:
            max_pos = rope_cos_sin.shape[0]
            pos = positions.long() if positions is not None else lens[:, None] + torch.arange(T, device=dev)
            bad = rows[:, None] & ((pos < 0) | (pos >= max_pos))
            if bool(bad.any()):
                b, t = (int(i) for i in bad.nonzero()[0])
                what = "positions" if positions is not None else "cache_lens[b] + t (default positions)"
                raise ValueError(f"{what} out of range of rope_cos_sin [max_pos={max_pos}, Dh]: row {b}, "
                                 f"t {t}: {int(pos[b, t])}")
    if cache_lens.dtype == torch.int64:  # the kernels read int32: saturate, so that 2^32 + 1 never means 1
        cache_lens = _checks.to_int32(cache_lens)
    if positions is not None and positions.dtype == torch.int64:
        positions = _checks.to_int32(positions)
    return (q, k_new, v_new, k_cache, v_cache, cache_lens, tree_mask, active, positions, rope_cos_sin,
            float(sm_scale), num_splits, out)


def append_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, cache_lens: torch.Tensor, *, tree_mask: Optional[torch.Tensor] = None,
                     active: Optional[torch.Tensor] = None, sm_scale: Optional[float] = None,
                     positions: Optional[torch.Tensor] = None, rope_cos_sin: Optional[torch.Tensor] = None,
                     num_splits: Optional[int] = None, out: Optional[torch.Tensor] = None,
                     validate: Optional[bool] = None) -> torch.Tensor:
    """Writes k_new/v_new[B,T,Hk,Dh] into k_cache/v_cache[B,Hk,S,Dh] at cache_lens[b] .. cache_lens[b]+T-1 and
    returns out[B,T,Hq,Dh] = attention of q[B,T,Hq,Dh] over the prefix [0, cache_lens[b]) plus the new block.

    cache_lens[B] (int32/int64) is NOT advanced: layers sharing one lengths tensor read the same value and the
    caller advances it once per step. Inside the block attention is causal, or follows tree_mask[B,T,ceil(T/32)]
    int32 (bit j%32 of word j//32 of row t: new token j visible to t; build_tree's ancestor-or-self mask); the
    prefix is always visible. GQA: Hq % Hk == 0. Dh: power of two in [32, 256]. q, k/v and caches share one
    dtype (fp32/fp16/bf16); softmax in fp32; sm_scale defaults to 1/sqrt(Dh).
    active[B] bool: inactive rows write nothing to the cache and get zeros in out (also in a given out=).
    RoPE (HF rotate-half) is fused when rope_cos_sin (fp32 [max_pos, Dh] = cat(cos, sin), see make_rope_cos_sin)
    is given: q and k_new are rotated at positions[B,T] (default cache_lens[b] + t; for a tree pass
    cache_len + depth) and the rotated k is what the cache receives.
    num_splits: KV splits of the flash-decoding kernel (None: chosen from B, Hk, T and S; no host sync).
    validate (default: on unless capturing a CUDA graph) checks 0 <= cache_lens[b], cache_lens[b] + T <= S
    and positions < max_pos on the device data; the kernel masks every access either way (int64 lengths and
    positions outside int32 saturate, so they stay out of range instead of wrapping). sm_scale: finite, > 0.
    """
    args = _prepare(q, k_new, v_new, k_cache, v_cache, cache_lens, tree_mask, active, sm_scale, positions,
                    rope_cos_sin, num_splits, out, validate)
    if q.shape[0] > 0:
        torch.ops.kangaroo_kernels.append_attention(*args)
    return args[-1]


def _append_attention_triton(q, k_new, v_new, k_cache, v_cache, cache_lens, *, tree_mask=None, active=None,
                             sm_scale=None, positions=None, rope_cos_sin=None, num_splits=None, out=None,
                             validate=None) -> torch.Tensor:
    """append_attention forced onto the Triton kernel (CPU tensors need TRITON_INTERPRET=1): tests, benchmarks."""
    from kangaroo_kernels.triton.append_attention import append_attention_triton

    args = _prepare(q, k_new, v_new, k_cache, v_cache, cache_lens, tree_mask, active, sm_scale, positions,
                    rope_cos_sin, num_splits, out, validate)
    if q.shape[0] > 0:
        append_attention_triton(*args)
    return args[-1]
