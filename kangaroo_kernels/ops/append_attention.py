"""append_attention: append the new K/V to a static cache and attend over prefix + new block.

One op covers decode (T = 1), chain verification (T > 1, causal inside the block) and tree verification
(T > 1 with the ancestor bit mask of build_tree). CPU tensors run the C++ kernel (csrc/cpu/append_attention.cpp:
any head dim, the prefix read in place); CUDA tensors run the Triton split-KV kernel
(kangaroo_kernels/triton/append_attention.py).
"""

import numbers
from typing import Optional

import torch

from kangaroo_kernels import _checks, _ext

__all__ = ["append_attention"]

# The schema lives in csrc/registration.cpp with the C++ CPU kernel (csrc/cpu/append_attention.cpp); this module
# adds the CUDA (Triton) implementation and the fake. num_splits: 0 lets the kernel choose (from B, Hk, T and S,
# never from cache_lens values).
_ext.ops()
_lib = torch.library.Library("kangaroo_kernels", "FRAGMENT")


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


_lib.impl("append_attention", _append_attention_cuda, "CUDA")


@torch.library.register_fake("kangaroo_kernels::append_attention", lib=_lib)
def _append_attention_fake(q, k_new, v_new, k_cache, v_cache, cache_lens, tree_mask, active, positions,
                           rope_cos_sin, sm_scale, num_splits, out):
    return None


def _check_cuda_head_dim(name: str, Dh: int, expected: str) -> None:
    """The Triton kernel's limit (CPU takes any head dim)."""
    if Dh < 2 or Dh > 256 or Dh % 2:  # rotate-half halves, padded to powers of two inside the kernel
        raise ValueError(f"{name}: on CUDA the head dim Dh must be even and in [2, 256] (the Triton kernel pads each "
                         f"half of a head to a power of two; larger heads exceed its register tiles; expected "
                         f"{expected}), got {Dh}; CPU tensors take any head dim")


def _prepare(q, k_new, v_new, k_cache, v_cache, cache_lens, tree_mask, active, sm_scale, positions, rope_cos_sin,
             num_splits, out, validate):
    """Checks every argument (data checks only when validating) and returns the op's argument tuple."""
    _checks.check_tensor("q", q, dtypes=_checks.FLOAT_DTYPES, ndim=4, expected="[B, T, Hq, Dh]")
    B, T, Hq, Dh = q.shape
    dev = q.device
    if T < 1:
        raise ValueError(f"q must hold T >= 1 new tokens (expected [B, T, Hq, Dh]), got shape {tuple(q.shape)}")
    if Dh < 1:
        raise ValueError(f"q must have a head dim Dh >= 1 (expected [B, T, Hq, Dh]), got shape {tuple(q.shape)}")
    if isinstance(k_new, torch.Tensor) and k_new.dim() == 4 and k_new.shape[3] != Dh:
        raise ValueError(f"q: head dim Dh = {Dh} differs from k_new's {k_new.shape[3]} (expected q [B, T, Hq, Dh], "
                         f"k_new [B, T, Hk, Dh])")
    if rope_cos_sin is not None and Dh % 2:
        raise ValueError(f"q: fused RoPE (rotate-half) needs an even head dim, got Dh = {Dh}")
    if dev.type == "cuda":
        _check_cuda_head_dim("q", Dh, "[B, T, Hq, Dh]")
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
    prefix is always visible. GQA: Hq % Hk == 0. Dh: any on CPU (even with fused RoPE); see _check_cuda_head_dim
    for CUDA. q, k/v and caches share one
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

    _check_cuda_head_dim("q", q.shape[-1], "[B, T, Hq, Dh]")
    args = _prepare(q, k_new, v_new, k_cache, v_cache, cache_lens, tree_mask, active, sm_scale, positions,
                    rope_cos_sin, num_splits, out, validate)
    if q.shape[0] > 0:
        append_attention_triton(*args)
    return args[-1]
