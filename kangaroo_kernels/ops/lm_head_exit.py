"""lm_head_exit / lm_head_topk: the draft side's LM head. (RMSNorm +) LM-head GEMV split over the vocabulary, fused
with the argmax (or a Gumbel-max sample), the confidence and the early-exit flag, or with the top-k for tree
drafting; the [B, V] logits are never written. CPU tensors run the reference (greedy lm_head_exit: the C++ kernel
csrc/cpu/lm_head_exit.cpp); CUDA tensors run the Triton kernels
(kangaroo_kernels/triton/lm_head_exit.py). Semantics: kangaroo_kernels/reference/lm_head_exit.py.
"""

import math
import numbers
from typing import Optional, Union

import torch

from kangaroo_kernels import _checks, _ext
from kangaroo_kernels.reference.lm_head_exit import inv_temperature, lm_head_exit_inv_t_ref
from kangaroo_kernels.types import LmHeadExit, LmHeadTopk

__all__ = ["lm_head_exit", "lm_head_topk"]


_lib = torch.library.Library("kangaroo_kernels", "FRAGMENT")
# inv_temperature: fl32(1 / T), 0.0 for greedy; offset is advanced by 1 in place when sampling; top_k in [0, V)
# (0: off), top_p (1: off) and their [B] rows (int32 / float32) filter the sampled rows
_lib.define(
    "lm_head_exit(Tensor hidden, Tensor lm_head_weight, Tensor? norm_weight, Tensor? active, Tensor? seed, "
    "Tensor(a!)? offset, float threshold, float eps, float inv_temperature, Tensor(b!) token, Tensor(c!) conf, "
    "Tensor(d!) active_out, Tensor(e!) token_prob, Tensor(f!)? probs, Tensor? inv_temperature_rows=None, "
    "int top_k=0, float top_p=1.0, Tensor? top_k_rows=None, Tensor? top_p_rows=None) -> ()")
_lib.define(
    "lm_head_topk(Tensor hidden, Tensor lm_head_weight, Tensor? norm_weight, int k, float eps, Tensor(a!) tokens, "
    "Tensor(b!) logprobs) -> ()")


def _lm_head_exit_cpu(hidden, lm_head_weight, norm_weight, active, seed, offset, threshold, eps, inv_t, token,
                      conf, active_out, token_prob, probs, inv_t_rows=None, top_k=0, top_p=1.0, top_k_rows=None,
                      top_p_rows=None):
    if inv_t == 0.0 and inv_t_rows is None and probs is None:  # greedy drafting: csrc/cpu/lm_head_exit.cpp
        _ext.ops().lm_head_exit_greedy_cpu(hidden, lm_head_weight, norm_weight, active, threshold, eps, token, conf,
                                           active_out, token_prob)
        return
    res = lm_head_exit_inv_t_ref(hidden, lm_head_weight, threshold, norm_weight, eps, active,
                                 inv_t if inv_t_rows is None else inv_t_rows, seed, offset, probs is not None,
                                 top_k if top_k_rows is None else top_k_rows,
                                 top_p if top_p_rows is None else top_p_rows)
    token.copy_(res.token)
    conf.copy_(res.conf)
    active_out.copy_(res.active)
    token_prob.copy_(res.token_prob)
    if probs is not None:
        probs.copy_(res.probs)


def _lm_head_exit_cuda(hidden, *args):
    from kangaroo_kernels.triton.lm_head_exit import lm_head_exit_triton

    if hidden.device.index != torch.cuda.current_device():
        with torch.cuda.device(hidden.device):
            lm_head_exit_triton(hidden, *args)
        return
    lm_head_exit_triton(hidden, *args)


def _lm_head_topk_cpu(hidden, lm_head_weight, norm_weight, k, eps, tokens, logprobs):
    # csrc/cpu/lm_head_exit.cpp: the reference's logits and logsumexp, a one-pass top-k instead of a full sort
    _ext.ops().lm_head_topk_cpu(hidden, lm_head_weight, norm_weight, k, eps, tokens, logprobs)


def _lm_head_topk_cuda(hidden, *args):
    from kangaroo_kernels.triton.lm_head_exit import lm_head_topk_triton

    if hidden.device.index != torch.cuda.current_device():
        with torch.cuda.device(hidden.device):
            lm_head_topk_triton(hidden, *args)
        return
    lm_head_topk_triton(hidden, *args)


_lib.impl("lm_head_exit", _lm_head_exit_cpu, "CPU")
_lib.impl("lm_head_exit", _lm_head_exit_cuda, "CUDA")
_lib.impl("lm_head_topk", _lm_head_topk_cpu, "CPU")
_lib.impl("lm_head_topk", _lm_head_topk_cuda, "CUDA")


@torch.library.register_fake("kangaroo_kernels::lm_head_exit", lib=_lib)
def _lm_head_exit_fake(hidden, lm_head_weight, norm_weight, active, seed, offset, threshold, eps, inv_t, token,
                       conf, active_out, token_prob, probs, inv_t_rows=None, top_k=0, top_p=1.0, top_k_rows=None,
                       top_p_rows=None):
    return None


@torch.library.register_fake("kangaroo_kernels::lm_head_topk", lib=_lib)
def _lm_head_topk_fake(hidden, lm_head_weight, norm_weight, k, eps, tokens, logprobs):
    return None


def _check_common(hidden, lm_head_weight, norm_weight, eps):
    _checks.check_tensor("hidden", hidden, dtypes=_checks.FLOAT_DTYPES, ndim=2, expected="[B, D]")
    B, D = hidden.shape
    dev = hidden.device
    if D < 1:
        raise ValueError(f"hidden must have D >= 1 (expected [B, D]), got shape {tuple(hidden.shape)}")
    _checks.check_tensor("lm_head_weight", lm_head_weight, dtypes=_checks.FLOAT_DTYPES, shape=(None, D), device=dev,
                         expected=f"[V, D={D}]")
    V = lm_head_weight.shape[0]
    if V < 1 or V >= 2 ** 31 - 1:
        raise ValueError(f"lm_head_weight must have 1 <= V < 2^31 - 1 rows (expected [V, D]), got V = {V}")
    if norm_weight is not None:
        _checks.check_tensor("norm_weight", norm_weight, dtypes=(hidden.dtype,), shape=(D,), device=dev,
                             expected=f"[D={D}] in hidden's dtype")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    return B, D, V, dev


def _prepare_exit(hidden, lm_head_weight, threshold, norm_weight, eps, active, temperature, seed, offset,
                  return_probs, out, validate=None, top_k=0, top_p=1.0):
    """Checks every argument and returns the op's argument tuple (outputs last)."""
    B, D, V, dev = _check_common(hidden, lm_head_weight, norm_weight, eps)
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or math.isnan(threshold):
        raise ValueError(f"threshold must be a number (rows continue iff conf >= threshold), got {threshold!r}")
    inv_t_rows = None
    if isinstance(temperature, torch.Tensor):
        _checks.check_tensor("temperature", temperature, dtypes=(torch.float32, torch.float64, torch.bfloat16,
                                                                  torch.float16), shape=(B,), device=dev,
                             expected=f"a number or [B={B}] (0: a greedy row)")
        if _checks.validating(validate):
            t = temperature  # in its own dtype: a float64 1e-50 must not pass as a greedy 0 after narrowing
            if not bool((torch.isfinite(t) & (t >= 0) & ((t == 0) | torch.isfinite(1.0 / t.float()))).all()):
                raise ValueError("temperature rows must be finite, >= 0 (0: greedy) and not so small that 1 / T "
                                 "overflows float32")
        inv_t_rows = inv_temperature(temperature).contiguous()
        temperature = 1.0  # the kernels sample; the rows carry the values
    elif temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, numbers.Real)
                                      or not (math.isfinite(temperature) and temperature >= 0)):
        raise ValueError(f"temperature must be None, 0 (greedy), a finite number > 0 or a [B] tensor, got "
                         f"{temperature!r}")
    inv_t = inv_temperature(temperature)
    if inv_t > 0 and not math.isfinite(inv_t):
        raise ValueError(f"temperature {temperature!r} is too small: 1 / T overflows float32")
    top_k, top_p, top_k_rows, top_p_rows = _checks.top_k_top_p(top_k, top_p, B, dev)
    if _checks.validating(validate):
        _checks.check_top_k_top_p_rows(top_k_rows, top_p_rows)
    if inv_t == 0.0:  # greedy: the filters change nothing
        top_k, top_p, top_k_rows, top_p_rows = 0, 1.0, None, None
    top_k = 0 if top_k >= V else top_k  # top_k >= V keeps every token: off (and never wraps in the kernel)
    if active is not None:
        _checks.check_tensor("active", active, dtypes=(torch.bool,), shape=(B,), device=dev, expected=f"[B={B}] bool")
    for name, t in (("seed", seed), ("offset", offset)):
        if t is not None:
            _checks.check_tensor(name, t, dtypes=(torch.int64,), shape=(B,), device=dev, expected=f"[B={B}] int64")
    if inv_t == 0.0 and (seed is not None or offset is not None):
        raise ValueError("seed/offset are only used when sampling (temperature > 0); greedy takes neither")
    if offset is not None:
        if seed is None:
            raise ValueError("offset needs seed (expected seed [B] int64)")
        if not offset.is_contiguous():
            raise ValueError("offset must be contiguous (it is advanced in place)")
    if inv_t > 0:
        if seed is None:  # host work: not capturable; pass seed/offset tensors in a CUDA graph
            seed = torch.randint(-2 ** 63, 2 ** 63 - 1, (B,), dtype=torch.int64).to(dev)
        if offset is None:
            offset = torch.zeros(B, dtype=torch.int64, device=dev)
        seed = seed.contiguous()
    if out is None:
        out = LmHeadExit(torch.empty(B, dtype=torch.int32, device=dev), torch.empty(B, dtype=torch.float32, device=dev),
                         torch.empty(B, dtype=torch.bool, device=dev), torch.empty(B, dtype=torch.float32, device=dev),
                         torch.empty(B, V, dtype=torch.float32, device=dev) if return_probs else None)
    else:
        if not isinstance(out, tuple) or len(out) not in (4, 5):
            raise ValueError("out must be LmHeadExit(token [B] i32, conf [B] f32, active [B] bool, token_prob [B] f32"
                             "[, probs [B, V] f32])")
        out = LmHeadExit(*out)
        _checks.check_out("out.token", out.token, (B,), torch.int32, dev)
        _checks.check_out("out.conf", out.conf, (B,), torch.float32, dev)
        _checks.check_out("out.active", out.active, (B,), torch.bool, dev)
        _checks.check_out("out.token_prob", out.token_prob, (B,), torch.float32, dev)
        if return_probs:
            if out.probs is None:
                raise ValueError(f"out.probs must be a [B={B}, V={V}] float32 buffer when return_probs is True")
            _checks.check_out("out.probs", out.probs, (B, V), torch.float32, dev)
        elif out.probs is not None:
            raise ValueError("out.probs is given but return_probs is False")
    return (hidden, lm_head_weight, norm_weight, active, seed, offset, float(threshold), float(eps), inv_t,
            *out[:4], out.probs, inv_t_rows, top_k, top_p, top_k_rows, top_p_rows), out


def lm_head_exit(hidden: torch.Tensor, lm_head_weight: torch.Tensor, threshold: float, *,
                 norm_weight: Optional[torch.Tensor] = None, eps: float = 1e-6,
                 active: Optional[torch.Tensor] = None, temperature: Optional[Union[float, torch.Tensor]] = None,
                 top_k: Union[int, torch.Tensor] = 0, top_p: Union[float, torch.Tensor] = 1.0,
                 seed: Optional[torch.Tensor] = None, offset: Optional[torch.Tensor] = None,
                 return_probs: bool = False, out: Optional[LmHeadExit] = None,
                 validate: Optional[bool] = None) -> LmHeadExit:
    """One draft step's LM head with the Kangaroo exit rule, never writing the [B, V] logits.

    hidden [B, D] and lm_head_weight [V, D] fp32/bf16/fp16 (any strides; maths in fp32); norm_weight [D] in
    hidden's dtype applies RMSNorm(eps) first (HF rounding), e.g. the adapter's out-norm.
    Returns LmHeadExit(token [B] i32, conf [B] f32, active [B] bool, token_prob [B] f32, probs [B, V] f32 | None):
    token = argmax (lowest index on ties) or, with temperature T > 0, a Gumbel-max sample of the sampling
    distribution p = softmax(logits / T) filtered by top_k / top_p; conf = max softmax(logits) (untempered,
    unfiltered: the exit rule); active = active_in & (conf >= threshold). Every row gets a token and conf, also
    rows that exit and inactive rows (active_in False: still computed, active False).
    token_prob = p[token] (conf when greedy); probs = p when return_probs (zeros outside the filters).
    Filters (verify_sample's): top_k int >= 0 or [B] int32/int64 (0 or >= V: off; int64 rows saturate), top_p in
    (0, 1] or [B] float (1: off); top-k then top-p as thresholds on logits / T, ties kept. Greedy rows ignore them.
    Sampling randomness: Philox4x32-10 keyed by seed [B] int64 at counter offset [B] int64, which is advanced by 1
    in place (so CUDA-graph replays draw fresh numbers); without seed one is drawn from torch's default CPU
    generator (host work, not capturable). A row with a NaN or +inf logit gets conf NaN and exits.
    temperature may be a [B] tensor (serving batches): row b samples with its own T_b (and its own top_k / top_p
    rows when those are tensors), rows with T_b = 0 are greedy in the same call (token = argmax, token_prob = conf,
    probs = softmax(logits)); seed/offset as for sampling, the offset of every row advances by 1; every [B]
    setting is read on the device (no host sync, capturable).
    out: a preallocated LmHeadExit (out.active may be `active` itself). validate: checks per-row temperatures,
    top_k and top_p (reads them: a host sync; skipped in graph capture); nothing else reads device data on the
    host, and every kernel access is bounded by the shapes.
    """
    args, out = _prepare_exit(hidden, lm_head_weight, threshold, norm_weight, eps, active, temperature, seed,
                              offset, return_probs, out, validate, top_k, top_p)
    if hidden.shape[0] > 0:
        torch.ops.kangaroo_kernels.lm_head_exit(*args)
    return out


def _lm_head_exit_triton(hidden, lm_head_weight, threshold, *, norm_weight=None, eps=1e-6, active=None,
                         temperature=None, top_k=0, top_p=1.0, seed=None, offset=None, return_probs=False, out=None,
                         validate=None) -> LmHeadExit:
    """lm_head_exit forced onto the Triton kernels (CPU tensors need TRITON_INTERPRET=1): tests, benchmarks."""
    from kangaroo_kernels.triton.lm_head_exit import lm_head_exit_triton

    args, out = _prepare_exit(hidden, lm_head_weight, threshold, norm_weight, eps, active, temperature, seed,
                              offset, return_probs, out, validate, top_k, top_p)
    if hidden.shape[0] > 0:
        lm_head_exit_triton(*args)
    return out


def _prepare_topk(hidden, lm_head_weight, k, norm_weight, eps, out):
    B, D, V, dev = _check_common(hidden, lm_head_weight, norm_weight, eps)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not (1 <= k <= min(16, V)):
        raise ValueError(f"k must be an int in [1, min(16, V={V})], got {k!r}")
    k = int(k)
    if out is None:
        out = LmHeadTopk(torch.empty(B, k, dtype=torch.int32, device=dev),
                         torch.empty(B, k, dtype=torch.float32, device=dev))
    else:
        if not isinstance(out, tuple) or len(out) != 2:
            raise ValueError("out must be LmHeadTopk(tokens [B, k] i32, logprobs [B, k] f32)")
        out = LmHeadTopk(*out)
        _checks.check_out("out.tokens", out.tokens, (B, k), torch.int32, dev)
        _checks.check_out("out.logprobs", out.logprobs, (B, k), torch.float32, dev)
    return (hidden, lm_head_weight, norm_weight, k, float(eps), out.tokens, out.logprobs), out


def lm_head_topk(hidden: torch.Tensor, lm_head_weight: torch.Tensor, k: int, *,
                 norm_weight: Optional[torch.Tensor] = None, eps: float = 1e-6, out: Optional[LmHeadTopk] = None,
                 validate: Optional[bool] = None) -> LmHeadTopk:
    """The k <= 16 best tokens of (RMSNorm +) LM head for tree drafting, never writing the [B, V] logits.

    hidden [B, D], lm_head_weight [V, D], norm_weight [D] as in lm_head_exit; k <= V.
    Returns LmHeadTopk(tokens [B, k] int32, logprobs [B, k] fp32 = logit - logsumexp(logits)), sorted descending,
    lower index first among equal logits. out: a preallocated LmHeadTopk. validate: accepted for uniformity (no
    data checks exist for this op).
    """
    args, out = _prepare_topk(hidden, lm_head_weight, k, norm_weight, eps, out)
    if hidden.shape[0] > 0:
        torch.ops.kangaroo_kernels.lm_head_topk(*args)
    return out


def _lm_head_topk_triton(hidden, lm_head_weight, k, *, norm_weight=None, eps=1e-6, out=None,
                         validate=None) -> LmHeadTopk:
    """lm_head_topk forced onto the Triton kernels (CPU tensors need TRITON_INTERPRET=1): tests, benchmarks."""
    from kangaroo_kernels.triton.lm_head_exit import lm_head_topk_triton

    args, out = _prepare_topk(hidden, lm_head_weight, k, norm_weight, eps, out)
    if hidden.shape[0] > 0:
        lm_head_topk_triton(*args)
    return out
