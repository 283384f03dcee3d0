"""Input checks shared by the op wrappers. Every failure is a ValueError naming the argument."""

import math
import numbers
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

from kangaroo_kernels.types import Tree

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)


def _names(dtypes: Iterable[torch.dtype]) -> str:
    return "/".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(name: str, t, *, dtypes: Optional[Sequence[torch.dtype]] = None, ndim: Optional[int] = None,
                 shape: Optional[Sequence[Optional[int]]] = None, device: Optional[torch.device] = None,
                 expected: str = "") -> None:
    """Checks type, dtype, rank, shape (None entries are free) and device of `t`.

    `expected` is the human-readable shape, e.g. "[B, N]", used in messages.
    """
    where = f" (expected {expected})" if expected else ""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor{where}, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype {_names(dtypes)}{where}, got {t.dtype}")
    if shape is not None:
        ndim = len(shape)
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D{where}, got shape {tuple(t.shape)}")
    if shape is not None:
        for want, got in zip(shape, t.shape):
            if want is not None and want != got:
                raise ValueError(f"{name} has shape {tuple(t.shape)}{where}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device} like the other inputs, got {t.device}")


def tensor_ok(t, dtype: torch.dtype, shape: Sequence[int], device: torch.device) -> bool:
    """True when t is a tensor of exactly this dtype, shape and device: the cheap test a hot wrapper runs before
    check_tensor (whose message it only builds on a failure; a draft step calls its op wrappers every step)."""
    return isinstance(t, torch.Tensor) and t.dtype == dtype and t.shape == shape and t.device == device


def check_out(name: str, t, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> None:
    """Preallocated output buffers must match exactly and be contiguous."""
    check_tensor(name, t, dtypes=(dtype,), shape=shape, device=device, expected=str(list(shape)))
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def validating(validate: Optional[bool]) -> bool:
    """Data checks (which read device memory, hence sync) run unless disabled or capturing a graph."""
    if validate is not None:
        return validate
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


I32_MIN, I32_MAX = -2 ** 31, 2 ** 31 - 1


def to_int32(t: torch.Tensor, *, pad: Optional[int] = None) -> torch.Tensor:
    """An index tensor narrowed to contiguous int32 on its device (no host sync), never wrapping around.

    int64 values outside the int32 range either saturate to I32_MIN / I32_MAX (pad=None: they stay outside every
    valid range, so the kernels' guards treat them as the docstrings promise: clamped, skipped or padding) or
    become `pad` (e.g. -1 for token ids: padding, never accepted). int32 input is returned as is (contiguous).
    """
    if t.dtype == torch.int32:
        return t.contiguous()
    if pad is None:
        t = t.clamp(I32_MIN, I32_MAX)
    else:
        t = torch.where((t >= I32_MIN) & (t <= I32_MAX), t, pad)
    return t.to(torch.int32).contiguous()


def check_int(name: str, v, lo: Optional[int] = None, hi: Optional[int] = None) -> int:
    """A Python or numpy integer (not a bool) in [lo, hi]; returns it as an int."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {type(v).__name__} {v!r}")
    v = int(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
        raise ValueError(f"{name} must be an int in {rng}, got {v}")
    return v


def check_real(name: str, v, *, lo: Optional[float] = None, lo_open: bool = False, hi: Optional[float] = None,
               finite: bool = True) -> float:
    """A real number (Python or numpy; not a bool, not a string) that is finite (unless finite=False) and >= lo
    (> lo when lo_open) and <= hi; returns it as a float."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise ValueError(f"{name} must be a number, got {type(v).__name__} {v!r}")
    f = float(v)
    if math.isnan(f) or (finite and math.isinf(f)):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    if lo is not None and (f <= lo if lo_open else f < lo):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {v!r}")
    if hi is not None and f > hi:
        raise ValueError(f"{name} must be <= {hi}, got {v!r}")
    return f


def inv_temperature_finite(temperature: float) -> bool:
    """True iff fl32(1 / T) is finite (T > 0): the one rule for how small a sampling temperature may be."""
    if torch.compiler.is_compiling():  # dynamo cannot trace np.errstate: the same bound in float64 (T > 0 here)
        t = float(temperature)
        return t > 0.0 and 1.0 / t < 3.4028235677973366e38  # the largest value that rounds to a finite float32
    # numpy scalars, not torch: host arithmetic that the decoder's host-read counters must not see as a tensor read
    with np.errstate(over="ignore", divide="ignore"):
        return math.isfinite(float(np.float32(1.0) / np.float32(temperature)))


def row_setting(name: str, x: torch.Tensor, B: int, dev: torch.device, *, integral: bool) -> torch.Tensor:
    """A sampling setting (temperature, top_k, top_p) given as a [B] tensor: checked (metadata only) and cast to
    the kernels' dtype, contiguous int32 or float32."""
    kinds = INDEX_DTYPES if integral else (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    check_tensor(name, x, dtypes=kinds, shape=(B,), device=dev, expected=f"a number or [B={B}]")
    # int64 top_k rows saturate (top_k >= V is off either way) instead of wrapping around
    return to_int32(x) if integral else x.to(torch.float32).contiguous()


def top_k_top_p(top_k, top_p, B: int, dev: torch.device):
    """The sampling filters as the ops take them: top_k an int >= 0 (0: off) or a [B] int tensor, top_p in (0, 1]
    (1: off) or a [B] float tensor. Returns (top_k int, top_p float, top_k_rows [B] int32 | None, top_p_rows [B]
    float32 | None); a tensor leaves its scalar off. Reads no device data (check_top_k_top_p_rows does)."""
    top_k_rows = top_p_rows = None
    if isinstance(top_k, torch.Tensor):
        top_k_rows, top_k = row_setting("top_k", top_k, B, dev, integral=True), 0
    elif isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0: off) or a [B] tensor, got {top_k!r}")
    if isinstance(top_p, torch.Tensor):
        top_p_rows, top_p = row_setting("top_p", top_p, B, dev, integral=False), 1.0
    elif isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] (1: off) or a [B] tensor, got {top_p!r}")
    return int(top_k), float(top_p), top_k_rows, top_p_rows


def check_top_k_top_p_rows(top_k_rows: Optional[torch.Tensor], top_p_rows: Optional[torch.Tensor]) -> None:
    """Data checks of per-row filters (a host sync: only when validating)."""
    if top_k_rows is not None and not bool((top_k_rows >= 0).all()):
        raise ValueError("top_k rows must be >= 0 (0: off)")
    if top_p_rows is not None and not bool(((top_p_rows > 0) & (top_p_rows <= 1)).all()):
        raise ValueError("top_p rows must lie in (0, 1] (1: off)")


def check_tree(name: str, tree, *, device: Optional[torch.device] = None):
    """A Tree (normally from build_tree) whose fields have build_tree's metadata: int32 depth/first_child/
    next_sibling/parents [B, N], mask [B, N, ceil(N/32)], root_first_child [B], all on one device. Reads no device
    data (a hand-built tree with consistent metadata but a wrong topology is only as safe as the kernels' guards).
    Returns (B, N)."""
    if not isinstance(tree, Tree):
        raise ValueError(f"{name} must be a Tree from build_tree, got {type(tree).__name__}")
    check_tensor(f"{name}.depth", tree.depth, dtypes=(torch.int32,), ndim=2, device=device, expected="[B, N] int32")
    B, N = tree.depth.shape
    dev = tree.depth.device
    W = (N + 31) // 32
    check_tensor(f"{name}.mask", tree.mask, dtypes=(torch.int32,), shape=(B, N, W), device=dev,
                 expected=f"[B={B}, N={N}, ceil(N/32)={W}] int32")
    for field in ("first_child", "next_sibling", "parents"):
        check_tensor(f"{name}.{field}", getattr(tree, field), dtypes=(torch.int32,), shape=(B, N), device=dev,
                     expected=f"[B={B}, N={N}] int32")
    check_tensor(f"{name}.root_first_child", tree.root_first_child, dtypes=(torch.int32,), shape=(B,), device=dev,
                 expected=f"[B={B}] int32")
    return B, N
