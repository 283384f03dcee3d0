"""Reference for quantize_lm_head / lm_head_exit_int8: the draft step's LM head on an int8 copy of the weights.

Semantics:
- quantize_lm_head_ref(weight [V, D]): per row v, scale[v] = max |weight[v]| / 127 in fp32 (0 for a zero row) and
  qweight[v] = round-half-even(weight[v] / scale[v]) clamped to [-127, 127] (0 for a zero row), so
  |weight - qweight * scale| <= scale / 2 elementwise.
- lm_head_exit_int8_ref: greedy lm_head_exit_ref on the dequantized weight qweight * scale (fp32): the same
  RMSNorm rounding, argmax (lowest index on ties), conf = 1 / sum(exp(logits - max)), exit flag and NaN rules.
  The CPU kernel computes (x . qweight[v]) * scale[v], equal up to fp32 rounding and summation order.
"""

from typing import Optional

import torch

from kangaroo_kernels.reference.lm_head_exit import lm_head_exit_ref
from kangaroo_kernels.types import Int8Weight, LmHeadExit

__all__ = ["quantize_lm_head_ref", "lm_head_exit_int8_ref"]


def quantize_lm_head_ref(weight: torch.Tensor) -> Int8Weight:
    """weight [V, D] float -> Int8Weight(qweight [V, D] int8 (row-major here), scale [V] fp32)."""
    w = weight.float()
    scale = w.abs().amax(dim=1) / 127.0
    q = torch.round(w / torch.where(scale > 0, scale, torch.ones_like(scale))[:, None]).clamp(-127, 127)
    return Int8Weight(q.to(torch.int8), scale)


def lm_head_exit_int8_ref(hidden: torch.Tensor, weight: Int8Weight, threshold: float, *,
                          norm_weight: Optional[torch.Tensor] = None, eps: float = 1e-6,
                          active: Optional[torch.Tensor] = None) -> LmHeadExit:
    """hidden [B, D] fp32/bf16/fp16, weight Int8Weight(qweight [V, D] int8, scale [V] fp32) -> LmHeadExit(token
    [B] i32, conf [B] f32, active [B] bool, token_prob [B] f32 (= conf), probs None)."""
    w = weight.qweight.float() * weight.scale.float()[:, None]
    return lm_head_exit_ref(hidden, w, threshold, norm_weight=norm_weight, eps=eps, active=active)
