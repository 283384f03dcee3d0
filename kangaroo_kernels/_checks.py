"""Input checks shared by the op wrappers. Every failure is a ValueError naming the argument."""

from typing import Iterable, Optional, Sequence

import torch

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
