"""Helpers shared by the compat wrappers: Philox uniforms on the device (the numbers verify_sample draws from
seed/offset, as plain torch ops, so a wrapper can use the same uniforms for its own bookkeeping) and argument
checks."""

import numbers
from typing import Optional, Union

import torch

_M32 = 0xFFFFFFFF
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
# spreads one seed into per-row Philox keys; a 32-bit multiplier: torch.compile's CPU backend (torch 2.14)
# miscompiled the product with the 64-bit golden ratio 0x9E3779B97F4A7C15 into a crashing kernel
_GOLDEN = 0x9E3779B9


def _mulhilo(a: torch.Tensor, m: int):
    p = a * m  # a < 2^32, m < 2^32: the product wraps mod 2^64 in int64, its bit pattern is exact
    return (p >> 32) & _M32, p & _M32


def philox_uniforms(seed: torch.Tensor, offset: torch.Tensor, n: int) -> torch.Tensor:
    """Uniforms [B, n] float64 in (0, 1), bit-identical to kangaroo_kernels.reference.verify_sample.
    philox_uniforms (and to the draws of verify_sample from seed/offset), computed with torch int64 ops on the
    tensors' device: no host sync, capturable in a CUDA graph. seed, offset: [B] int64."""
    ctr = offset.to(torch.int64)[:, None] + torch.arange(n, dtype=torch.int64, device=offset.device)[None, :]
    c0, c1 = ctr & _M32, (ctr >> 32) & _M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    s = seed.to(torch.int64)[:, None]
    k0, k1 = s & _M32, (s >> 32) & _M32
    for _ in range(10):
        hi0, lo0 = _mulhilo(c0, _PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, _PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _PHILOX_W0) & _M32
        k1 = (k1 + _PHILOX_W1) & _M32
    m = (c0 << 20) | (c1 >> 12)  # 52 bits
    return (m.to(torch.float64) + 0.5) * 2.0 ** -52


def per_row_seeds(seed: torch.Tensor, B: int) -> torch.Tensor:
    """[B] int64 Philox keys from one seed (a [1] tensor): row b gets seed + b * 0x9E3779B9 (mod 2^64), so one
    batch seed gives every row its own stream (rows with equal keys would draw alike)."""
    rows = torch.arange(B, dtype=torch.int64, device=seed.device)
    return seed.to(torch.int64).expand(B) + rows * _GOLDEN


def as_row_tensor(name: str, x: Union[int, torch.Tensor], B: int, device: torch.device) -> torch.Tensor:
    """An int or a [1] / [B] int64 tensor (on `device`) as a fresh [B] int64 tensor (device op, no sync)."""
    if isinstance(x, torch.Tensor):
        if x.dtype not in (torch.int64, torch.uint64) or x.dim() != 1 or x.shape[0] not in (1, B):
            raise ValueError(f"{name} must be an int or a 1-D int64 tensor of length 1 or B={B}, got "
                             f"{x.dtype} {tuple(x.shape)}")
        if x.device != device:
            raise ValueError(f"{name} must be on {device}, got {x.device}")
        return x.view(torch.int64).expand(B).clone()
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise ValueError(f"{name} must be an int or a 1-D int64 tensor, got {type(x).__name__}")
    x = int(x) & 0xFFFFFFFFFFFFFFFF
    x = x - (1 << 64) if x >= 1 << 63 else x
    return torch.full((B,), x, dtype=torch.int64, device=device)


def check_counter(name: str, t: Optional[torch.Tensor], B: int, device: torch.device) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or t.shape != (B,) or t.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be an int32/int64 tensor of shape [B={B}]")
    if t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")
