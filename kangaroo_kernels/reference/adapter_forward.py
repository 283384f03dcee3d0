"""Reference for adapter_forward: one decode step (T = 1) of the Kangaroo adapter
a(h) = RMSNorm_out(h + O(attn(RoPE(QKV(RMSNorm_in(h)))))).

HF-Llama maths and roundings, every reduction in fp32 (x.dtype = h.dtype = weight dtype):
- RMSNorm(x, w) = (x * rsqrt(mean(x^2) + eps)) rounded to x.dtype, times w (product rounded to x.dtype).
- q/k/v = xn @ W.T (+ bias), accumulated in fp32, rounded once.
- RoPE (HF rotate-half) at positions[b], then append + attention as append_attention_ref with T = 1: K/V are
  written at cache_lens[b] (cache_lens is not advanced), q attends over the prefix [0, cache_lens[b]) and itself.
  The cos/sin come from rope_cos_sin[positions[b]] when a table is given, else from
  angle = float32(positions[b]) * inv_freq, inv_freq = 1 / rope_theta^(2i/Dh) in fp32 (as HF computes it).
- o = attn @ Wo.T rounded; r = o + h rounded (HF's residual add in x.dtype); out = RMSNorm(r, norm_out) or r when
  apply_out_norm is False (the caller fuses the norm into lm_head_exit).
- Rows with active[b] False write nothing to the caches and get zeros.
"""

from typing import Optional

import torch

from kangaroo_kernels.reference.append_attention import append_attention_ref
from kangaroo_kernels.rope import make_rope_cos_sin

__all__ = ["adapter_forward_ref"]  # rms_norm_ref stays module-level


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LlamaRMSNorm: fp32 statistics, normalised value rounded to x.dtype, then times weight."""
    xf = x.float()
    xn = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return weight * xn


def _linear(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    y = x.float() @ w.float().T
    if b is not None:
        y = y + b.float()
    return y.to(x.dtype)


def adapter_forward_ref(h: torch.Tensor, weights, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        cache_lens: torch.Tensor, positions: torch.Tensor, *, active: Optional[torch.Tensor] = None,
                        rope_theta: float = 10000.0, rope_cos_sin: Optional[torch.Tensor] = None,
                        eps: float = 1e-6, apply_out_norm: bool = True, attention=append_attention_ref) -> torch.Tensor:
    """h[B,D], weights: AdapterWeights, k_cache/v_cache[B,Hk,S,Dh] (written in place), cache_lens[B],
    positions[B] -> out[B,D] in h.dtype. `attention` (append_attention_ref's signature) lets the CPU op plug in
    its vectorised attention; the spec is append_attention_ref."""
    B, D = h.shape
    Hq, Hk = weights.num_heads, weights.num_kv_heads
    Dh = weights.wq.shape[0] // Hq
    x = rms_norm_ref(h, weights.norm_in, eps)
    q = _linear(x, weights.wq, weights.bq).view(B, 1, Hq, Dh)
    k = _linear(x, weights.wk, weights.bk).view(B, 1, Hk, Dh)
    v = _linear(x, weights.wv, weights.bv).view(B, 1, Hk, Dh)
    if rope_cos_sin is None:
        # one table row per batch row, in HF's fp32 rounding
        rope_cos_sin = make_rope_cos_sin(positions, Dh, rope_theta, device=h.device, dtype=torch.float32)
        rope_pos = torch.arange(B, device=h.device)[:, None]
    else:
        rope_pos = positions.long()[:, None]
    attn = attention(q, k, v, k_cache, v_cache, cache_lens, active=active, positions=rope_pos,
                                rope_cos_sin=rope_cos_sin)
    o = _linear(attn.reshape(B, Hq * Dh), weights.wo, None)
    r = (o.float() + h.float()).to(h.dtype)
    out = rms_norm_ref(r, weights.norm_out, eps) if apply_out_norm else r
    if active is not None:
        out = torch.where(active[:, None], out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out
