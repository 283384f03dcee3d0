"""RoPE frequencies and the rope_cos_sin table that append_attention and adapter_forward take. The one place the
op library, the decoder, the tests and the benchmarks build RoPE angles. Imports torch only.
"""

import math
from typing import Any, Mapping, Optional, Union

import torch

__all__ = ["rope_inv_freq", "make_rope_cos_sin"]


def rope_inv_freq(head_dim: int, theta: float = 10000.0, scaling: Optional[Mapping[str, Any]] = None, *,
                  dtype: torch.dtype = torch.float32, device=None):
    """(inv_freq [head_dim/2], attention scale) as HF's rotary embedding computes them for default, linear and
    llama3 RoPE: inv_freq = 1 / theta^(2i/head_dim) evaluated in `dtype` (float32: HF's rounding) on the CPU (as
    HF does at init, so every device gets the same frequencies), then moved to `device`."""
    inv, scale = _inv_freq_cpu(head_dim, theta, scaling, dtype)
    return (inv if device is None else inv.to(device)), scale


def _inv_freq_cpu(head_dim, theta, scaling, dtype):
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(dtype) / head_dim))
    if not scaling:
        return inv, 1.0
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        return inv / float(scaling["factor"]), 1.0
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        old = float(scaling["original_max_position_embeddings"])
        low_wl, high_wl = old / low, old / high
        wavelen = 2 * math.pi / inv
        out = torch.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        return torch.where(medium, smoothed, out), 1.0
    raise NotImplementedError(f"rope_type {kind!r} is not supported (default, linear, llama3)")


def make_rope_cos_sin(positions: Union[int, torch.Tensor], head_dim: int, base: float = 10000.0, device=None,
                      inv_freq: Optional[torch.Tensor] = None, *, scaling: Optional[Mapping[str, Any]] = None,
                      dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The rope_cos_sin table: fp32 [*positions.shape, head_dim] = cat(cos, sin) of angle = position * inv_freq[i],
    i < head_dim/2 (HF rotate-half RoPE), times the attention scale of `scaling`.

    positions: an int max_pos (the table of positions 0..max_pos-1) or a tensor of positions (one row each).
    inv_freq: a model's own frequencies (e.g. HF rotary_emb.inv_freq); default rope_inv_freq(head_dim, base,
    scaling). dtype: where the angles are computed: float64 (default, the most accurate table) or float32 (HF's own
    rounding: fl32(fl32(position) * inv_freq), what a model must use to match transformers bit for bit).
    device: where the table is built (default: the positions' / inv_freq's device, else CPU).
    """
    if isinstance(positions, torch.Tensor):
        pos, shape = positions.reshape(-1), tuple(positions.shape)
    else:
        pos, shape = torch.arange(int(positions), dtype=torch.int64), (int(positions),)
    if device is None:
        device = inv_freq.device if inv_freq is not None and not isinstance(positions, torch.Tensor) else pos.device
    scale = 1.0
    if inv_freq is None:
        inv_freq, scale = rope_inv_freq(head_dim, base, scaling, dtype=dtype, device=device)
    elif inv_freq.shape != (head_dim // 2,):
        raise ValueError(f"inv_freq must have shape [head_dim/2 = {head_dim // 2}], got {tuple(inv_freq.shape)}")
    ang = pos.to(device=device, dtype=dtype)[:, None] * inv_freq.to(device=device, dtype=dtype)[None, :]
    table = torch.cat([ang.cos(), ang.sin()], dim=-1)
    if scale != 1.0:
        table = table * scale
    return table.to(torch.float32).view(*shape, head_dim)
