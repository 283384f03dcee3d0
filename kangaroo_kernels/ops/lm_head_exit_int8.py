"""lm_head_exit_int8 / quantize_lm_head: the draft step's LM head on an int8 copy of the weights (CPU).

On a CPU the draft step is memory-bound and the fp32 LM head is its largest read; the draft is only a proposal
(verification runs on the exact weights), so a quantized draft head changes acceptance, never the output. One C++
kernel (csrc/cpu/lm_head_exit_int8.cpp) streams the int8 weight once, fused with lm_head_exit's greedy exit rule; it
is compiled for AVX-512, AVX2 and baseline x86-64 and picks the path the CPU runs. On CUDA, lm_head_exit's Triton
kernel reads the 16-bit weights at the GPU's bandwidth; this op refuses CUDA tensors.
Semantics: kangaroo_kernels/reference/lm_head_exit_int8.py.
"""

import math
import numbers
from typing import Optional

import torch

from kangaroo_kernels import _checks, _ext
from kangaroo_kernels.reference.lm_head_exit_int8 import quantize_lm_head_ref
from kangaroo_kernels.types import Int8Weight, LmHeadExit

__all__ = ["Int8Weight", "LmHeadExitInt8Plan", "lm_head_exit_int8", "quantize_lm_head"]


def _op():
    return _ext.inplace_op("lm_head_exit_int8")


def quantize_lm_head(weight: torch.Tensor) -> Int8Weight:
    """weight [V, D] fp32/bf16/fp16 -> Int8Weight(qweight [V, D] int8 column-major, scale [V] fp32): per-row
    symmetric int8 (quantize_lm_head_ref), laid out as lm_head_exit_int8 streams it. V * D bytes, once per model."""
    _checks.check_tensor("weight", weight, dtypes=_checks.FLOAT_DTYPES, ndim=2, expected="[V, D]")
    if weight.shape[0] < 1 or weight.shape[1] < 1:
        raise ValueError(f"weight must be [V, D] with V, D >= 1, got shape {tuple(weight.shape)}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("weight holds NaN or inf values: they have no int8 form")
    q, scale = quantize_lm_head_ref(weight.detach())
    return Int8Weight(q.t().contiguous().t(), scale.contiguous())


def lm_head_exit_int8(hidden: torch.Tensor, weight: Int8Weight, threshold: float, *,
                      norm_weight: Optional[torch.Tensor] = None, eps: float = 1e-6,
                      active: Optional[torch.Tensor] = None, out: Optional[LmHeadExit] = None,
                      validate: Optional[bool] = None) -> LmHeadExit:
    """lm_head_exit's greedy draft decision with the LM head given as an int8 copy (quantize_lm_head).

    hidden      [B, D] fp32/bf16/fp16, CPU
    weight      Int8Weight(qweight [V, D] int8 column-major, scale [V] fp32)
    norm_weight [D] in hidden's dtype: RMSNorm(eps) first (HF rounding), e.g. the adapter's out-norm
    active      [B] bool or None (all rows)
    Returns LmHeadExit(token [B] i32 = argmax of logits = (x . qweight[v]) * scale[v] (lowest index on ties),
    conf [B] f32 = max softmax(logits), active [B] bool = active & (conf >= threshold), token_prob [B] f32 = conf,
    probs None). Every row gets a token and conf; a NaN/inf row gets conf NaN (it exits).
    out: a preallocated LmHeadExit of four [B] tensors (out.active may be `active` itself). validate: accepted for
    uniformity (this op reads no device data on the host).
    """
    _checks.check_tensor("hidden", hidden, dtypes=_checks.FLOAT_DTYPES, ndim=2, expected="[B, D]")
    B, D = hidden.shape
    dev = hidden.device
    if dev.type != "cpu":
        raise ValueError(f"lm_head_exit_int8 runs on CPU tensors (hidden is on {dev}); on CUDA use lm_head_exit, "
                         "whose kernel reads the 16-bit weights")
    if not isinstance(weight, tuple) or len(weight) != 2:
        raise ValueError("weight must be an Int8Weight(qweight [V, D] int8, scale [V] fp32), e.g. "
                         "quantize_lm_head(lm_head_weight)")
    qweight, scale = weight
    if not (isinstance(qweight, torch.Tensor) and qweight.dim() == 2
            and _checks.tensor_ok(qweight, torch.int8, (qweight.shape[0], D), dev)):
        _checks.check_tensor("weight.qweight", qweight, dtypes=(torch.int8,), shape=(None, D), device=dev,
                             expected=f"[V, D={D}] int8")
    V = qweight.shape[0]
    if V < 1 or V >= 2 ** 31 - 1:
        raise ValueError(f"weight.qweight must have 1 <= V < 2^31 - 1 rows, got V = {V}")
    if qweight.stride() != (1, V):
        raise ValueError(f"weight.qweight must be column-major (strides (1, V={V})), got strides {qweight.stride()}: "
                         "build it with quantize_lm_head")
    if not _checks.tensor_ok(scale, torch.float32, (V,), dev):
        _checks.check_tensor("weight.scale", scale, dtypes=(torch.float32,), shape=(V,), device=dev,
                             expected=f"[V={V}] float32")
    if norm_weight is not None and not _checks.tensor_ok(norm_weight, hidden.dtype, (D,), dev):
        _checks.check_tensor("norm_weight", norm_weight, dtypes=(hidden.dtype,), shape=(D,), device=dev,
                             expected=f"[D={D}] in hidden's dtype")
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or math.isnan(threshold):
        raise ValueError(f"threshold must be a number (rows continue iff conf >= threshold), got {threshold!r}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if active is not None and not _checks.tensor_ok(active, torch.bool, (B,), dev):
        _checks.check_tensor("active", active, dtypes=(torch.bool,), shape=(B,), device=dev, expected=f"[B={B}] bool")
    if out is None:
        out = LmHeadExit(torch.empty(B, dtype=torch.int32), torch.empty(B, dtype=torch.float32),
                         torch.empty(B, dtype=torch.bool), torch.empty(B, dtype=torch.float32))
    else:
        if not isinstance(out, tuple) or len(out) not in (4, 5) or (len(out) == 5 and out[4] is not None):
            raise ValueError("out must be LmHeadExit(token [B] i32, conf [B] f32, active [B] bool, token_prob [B] f32)")
        out = LmHeadExit(*out[:4])
        _checks.check_out("out.token", out.token, (B,), torch.int32, dev)
        _checks.check_out("out.conf", out.conf, (B,), torch.float32, dev)
        _checks.check_out("out.active", out.active, (B,), torch.bool, dev)
        _checks.check_out("out.token_prob", out.token_prob, (B,), torch.float32, dev)
    if B > 0:
        _op()(hidden.contiguous(), qweight, scale.contiguous(),
              None if norm_weight is None else norm_weight.contiguous(),
              None if active is None else active.contiguous(), float(threshold), float(eps), *out[:4])
    return out


class LmHeadExitInt8Plan:
    """lm_head_exit_int8 with its static arguments checked once (plan / run, like AdapterForwardPlan): the int8
    weight, norm weight, threshold and eps of a decode, for B rows of D.

        plan = LmHeadExitInt8Plan(weight, threshold, batch=B, dtype=torch.float32, norm_weight=w, eps=1e-6)
        res = plan.run(hidden, active=rows, out=buf)   # == lm_head_exit_int8(hidden, weight, threshold, ...)

    run() tests only hidden [B, D] (contiguous, the plan's dtype, CPU), active [B] bool or None and out (four
    contiguous [B] tensors of LmHeadExit's dtypes) exactly, and hands any other input to lm_head_exit_int8."""

    def __init__(self, weight: Int8Weight, threshold: float, *, batch: int, dtype: torch.dtype = torch.float32,
                 norm_weight: Optional[torch.Tensor] = None, eps: float = 1e-6):
        if not isinstance(weight, tuple) or len(weight) != 2 or not isinstance(weight[0], torch.Tensor):
            raise ValueError("weight must be an Int8Weight(qweight [V, D] int8, scale [V] fp32), e.g. "
                             "quantize_lm_head(lm_head_weight)")
        B, D = _checks.check_int("batch", batch, 0), weight[0].shape[1]
        lm_head_exit_int8(torch.zeros(B, D, dtype=dtype), weight, threshold, norm_weight=norm_weight, eps=eps)
        self._weight, self._threshold, self._norm, self._eps = weight, threshold, norm_weight, eps
        self._static = (weight[0], weight[1].contiguous(), None if norm_weight is None else norm_weight.contiguous())
        self._shape, self._dtype, self._cpu = (B, D), dtype, torch.device("cpu")

    @property
    def native_args(self):
        """The native op's checked static arguments, as run() passes them: (qweight, scale, norm_weight or None,
        threshold, eps); for callers that fuse the head into a larger native call (the CPU decoder's draft_step)."""
        q, scale, norm = self._static
        return q, scale, norm, float(self._threshold), float(self._eps)

    def run(self, hidden: torch.Tensor, *, active: Optional[torch.Tensor] = None,
            out: Optional[LmHeadExit] = None) -> LmHeadExit:
        B, cpu = self._shape[0], self._cpu
        ok = (_checks.tensor_ok(hidden, self._dtype, self._shape, cpu) and hidden.is_contiguous()
              and (active is None or (_checks.tensor_ok(active, torch.bool, (B,), cpu) and active.is_contiguous()))
              and (out is None or (isinstance(out, tuple) and len(out) >= 4 and (len(out) == 4 or out[4] is None)
                                   and all(_checks.tensor_ok(t, d, (B,), cpu) and t.is_contiguous()
                                           for t, d in zip(out, _OUT_DTYPES)))))
        if not ok:
            return lm_head_exit_int8(hidden, self._weight, self._threshold, norm_weight=self._norm, eps=self._eps,
                                     active=active, out=out)
        if out is None:
            out = LmHeadExit(*(torch.empty(B, dtype=d) for d in _OUT_DTYPES))
        else:
            out = LmHeadExit(*out[:4])
        if B > 0:
            q, scale, norm = self._static
            _op()(hidden, q, scale, norm, active, float(self._threshold), float(self._eps), *out[:4])
        return out


_OUT_DTYPES = (torch.int32, torch.float32, torch.bool, torch.float32)  # LmHeadExit's token, conf, active, token_prob
