"""Reference for lm_head_exit / lm_head_topk: (RMSNorm +) LM head, then the draft token, its confidence and the
exit flag, or the top-k tokens with log-probabilities. Plain PyTorch; the Triton kernels compute the same up to the
summation order of the fp32 GEMV and softmax sums.

Semantics:
- x = RMSNorm(hidden, norm_weight) with HF-Llama rounding (rms_norm_ref: fp32 statistics, normalised value rounded
  to hidden.dtype, times norm_weight rounded again), or hidden when norm_weight is None.
- logits = x @ lm_head_weight.T accumulated in fp32 ([B, V], never rounded to a 16-bit dtype).
- Greedy (temperature None or 0): token = argmax logits, lowest index on ties (torch.argmax).
- conf = max softmax(logits) = exp(max - lse) = 1 / sum(exp(logits - max)); active_out = active & (conf >= threshold).
  Every row gets a token and conf, also rows that exit and inactive rows (whose active_out is False).
- Sampled (temperature T > 0): z = fl32(logits * fl32(1 / T)); token = argmax(z + g) with Gumbel noise
  g = -log(-log(u)), u = lm_head_uniforms_ref(seed, offset, V) (Philox4x32-10, see there); token_prob =
  softmax(z)[token]; conf stays the untempered max softmax (the exit rule). offset += 1 after the draw.
  Greedy rows report token_prob = conf.
- Per-row temperature ([B] tensor): row b as above with its own T_b (inv_t_b = fl32(1 / T_b)); rows with T_b = 0
  are greedy (token = argmax logits, token_prob = conf, probs = softmax(logits)) inside the same call. The
  uniforms are drawn for every row and offset += 1 for every row.
- Filters (sampling only; scalars or [B] tensors, verify_sample's semantics, reference.filters): top_k then top_p
  are thresholds on z (ties kept; top_k = 0 or >= V and top_p >= 1: off; the top-p masses are exp(z - max z) in
  fp64); the sample is the Gumbel-max over the kept tokens only (same uniforms), token_prob and probs are those of
  the filtered distribution softmax(z masked to -inf outside the kept set). Greedy rows ignore them. [B] values
  are taken as the op takes them: top_k int (int64 saturating), top_p float32.
- probs (return_probs): softmax(z) (sampled, filtered) or softmax(logits) (greedy), fp32 [B, V].
- A row whose logits hold a NaN or +inf (or are all -inf) gets conf NaN (so active_out False); its token is
  unspecified (in [0, V)) and its token_prob/probs are NaN or meaningless.
- lm_head_topk: the k largest logits, sorted descending (ties: lower index first), logprobs = logit - lse.
"""

from typing import Optional

import numpy as np
import torch

from kangaroo_kernels.reference.adapter_forward import rms_norm_ref
from kangaroo_kernels.reference.filters import top_k_top_p_keep
from kangaroo_kernels.types import LmHeadExit, LmHeadTopk

__all__ = ["lm_head_exit_ref", "lm_head_topk_ref", "lm_head_logits_ref", "lm_head_uniforms_ref",
           "philox4x32_10_torch"]

_M32 = 0xFFFFFFFF
# counter word 3 of every lm_head_exit draw: keeps its stream apart from verify_sample's (which uses 0)
STREAM_TAG = 0x4C4D4845  # "LMHE"


def lm_head_logits_ref(hidden: torch.Tensor, lm_head_weight: torch.Tensor,
                       norm_weight: Optional[torch.Tensor] = None, eps: float = 1e-6) -> torch.Tensor:
    """hidden[B,D], lm_head_weight[V,D], norm_weight[D] -> fp32 logits [B,V]."""
    x = rms_norm_ref(hidden, norm_weight, eps) if norm_weight is not None else hidden
    return x.float() @ lm_head_weight.float().T


def inv_temperature(temperature):
    """fl32(1 / T) as a Python float (0.0 means greedy: T None or 0), or for a [B] tensor of temperatures the
    [B] float32 tensor of fl32(1 / T_b) with 0 for the greedy rows (T_b <= 0)."""
    if isinstance(temperature, torch.Tensor):
        t = temperature.float()
        return torch.where(t > 0, 1.0 / t, torch.zeros_like(t))
    if temperature is None or temperature == 0:
        return 0.0
    with np.errstate(over="ignore", divide="ignore"):
        return float(np.float32(1.0) / np.float32(temperature))


def _mul_hi_lo(a: torch.Tensor, b: int):
    """(hi, lo) 32-bit words of a * b for uint32 values a (held in int64) and a constant b < 2^32."""
    p = (a >> 16) * b  # < 2^48
    q = (a & 0xFFFF) * b  # < 2^48
    t = ((p & 0xFFFF) << 16) + q  # < 2^49
    return (p >> 16) + (t >> 32), t & _M32


def philox4x32_10_torch(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 (Random123) on int64 tensors holding uint32 words (broadcast); returns the 4 output words."""
    c0, c1, c2, c3, k0, k1 = (torch.as_tensor(w, dtype=torch.int64) & _M32 for w in (c0, c1, c2, c3, k0, k1))
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(c2, 0xCD9E8D57)
        hi_a, lo_a = _mul_hi_lo(c0, 0xD2511F53)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + 0x9E3779B9) & _M32
        k1 = (k1 + 0xBB67AE85) & _M32
    return c0, c1, c2, c3


def lm_head_uniforms_ref(seed: torch.Tensor, offset: torch.Tensor, V: int) -> torch.Tensor:
    """fp32 uniforms [B, V] in (0, 1) of one draw: u[b, v] from Philox4x32-10 with key (lo32, hi32) of seed[b]
    and counter (lo32, hi32 of offset[b], v, STREAM_TAG); x = output word 0, u = ((x >> 9) + 0.5) * 2^-23
    (exact in fp32, in [2^-24, 1 - 2^-24])."""
    s = seed.long()[:, None]
    o = offset.long()[:, None]
    v = torch.arange(V, dtype=torch.int64, device=seed.device)[None, :]
    x0 = philox4x32_10_torch(o & _M32, (o >> 32) & _M32, v, STREAM_TAG, s & _M32, (s >> 32) & _M32)[0]
    return ((x0 >> 9).to(torch.float32) + 0.5) * 2.0 ** -23


def lm_head_exit_ref(hidden: torch.Tensor, lm_head_weight: torch.Tensor, threshold: float, *,
                     norm_weight: Optional[torch.Tensor] = None, eps: float = 1e-6,
                     active: Optional[torch.Tensor] = None, temperature=None, top_k=0, top_p=1.0,
                     seed: Optional[torch.Tensor] = None, offset: Optional[torch.Tensor] = None,
                     return_probs: bool = False):
    """Reference of kangaroo_kernels.ops.lm_head_exit (seed [B] int64 required when temperature > 0; offset [B] int64
    defaults to zeros and is advanced by 1 in place when given; top_k, top_p numbers or [B] tensors). Returns
    LmHeadExit(token [B] i32, conf [B] f32, active [B] bool, token_prob [B] f32, probs [B, V] f32 or None)."""
    return lm_head_exit_inv_t_ref(hidden, lm_head_weight, threshold, norm_weight, eps, active,
                                  inv_temperature(temperature), seed, offset, return_probs, top_k, top_p)


def _filters_on(top_k, top_p, V: int) -> bool:
    """Whether the filters can cut anything (a [B] tensor counts as on: deciding would read it)."""
    return isinstance(top_k, torch.Tensor) or isinstance(top_p, torch.Tensor) or 0 < top_k < V or top_p < 1.0


def lm_head_exit_inv_t_ref(hidden, lm_head_weight, threshold, norm_weight, eps, active, inv_t, seed, offset,
                           return_probs, top_k=0, top_p=1.0):
    """lm_head_exit_ref with the temperature given as inv_t = fl32(1 / T) (0.0: greedy), as the op takes it, or as a
    [B] float32 tensor of per-row values (0: a greedy row)."""
    B = hidden.shape[0]
    dev = hidden.device
    logits = lm_head_logits_ref(hidden, lm_head_weight, norm_weight, eps)
    V = logits.shape[1]
    m = logits.max(dim=-1, keepdim=True).values
    conf = 1.0 / torch.exp(logits - m).sum(dim=-1)
    act = active if active is not None else torch.ones(B, dtype=torch.bool, device=dev)
    active_out = act & (conf >= threshold)
    rows = isinstance(inv_t, torch.Tensor)
    if rows:
        greedy = ~(inv_t.to(dev) > 0)
        it = torch.where(greedy, torch.ones_like(inv_t), inv_t).to(dev)[:, None]
    if not rows and inv_t == 0.0:
        token = logits.argmax(dim=-1)
        token_prob = conf.clone()
        probs = torch.softmax(logits, dim=-1) if return_probs else None
    else:
        if seed is None:
            raise ValueError("seed [B] int64 is required when temperature > 0")
        off = offset if offset is not None else torch.zeros(B, dtype=torch.int64, device=dev)
        u = lm_head_uniforms_ref(seed, off, V)
        z = logits * (it if rows else inv_t)
        if _filters_on(top_k, top_p, V):
            if isinstance(top_k, torch.Tensor):
                top_k = top_k.to(dev).clamp(-2 ** 31, 2 ** 31 - 1)
            if isinstance(top_p, torch.Tensor):
                top_p = top_p.to(dev, torch.float32)
            e = torch.exp((z - z.max(dim=-1, keepdim=True).values).double())
            keep = top_k_top_p_keep(z, e, top_k, top_p)
            if rows:
                keep = keep | greedy[:, None]
            z = torch.where(keep, z, torch.full_like(z, float("-inf")))
        g = -torch.log(-torch.log(u))
        token = (z + g).argmax(dim=-1)
        p = torch.softmax(z, dim=-1)
        token_prob = p.gather(1, token[:, None])[:, 0]
        if rows:  # greedy rows: z = logits, so p = softmax(logits); their token is the argmax
            token = torch.where(greedy, logits.argmax(dim=-1), token)
            token_prob = torch.where(greedy, conf, token_prob)
        probs = p if return_probs else None
        if offset is not None:
            offset += 1
    return LmHeadExit(token.to(torch.int32), conf.float(), active_out, token_prob.float(), probs)


def lm_head_topk_ref(hidden: torch.Tensor, lm_head_weight: torch.Tensor, k: int, *,
                     norm_weight: Optional[torch.Tensor] = None, eps: float = 1e-6):
    """Reference of kangaroo_kernels.lm_head_topk -> LmHeadTopk(tokens [B, k] i32, logprobs [B, k] f32),
    descending."""
    logits = lm_head_logits_ref(hidden, lm_head_weight, norm_weight, eps)
    # stable descending sort: equal logits keep increasing index order
    order = torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :k]
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    return LmHeadTopk(order.to(torch.int32), (logits.gather(1, order) - lse).float())
