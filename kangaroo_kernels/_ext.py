"""Loads the native library kangaroo_kernels._C on first use (never at import of the package)."""

import functools
import os

import torch


@functools.lru_cache(maxsize=None)
def ops():
    """torch.ops.kangaroo_kernels with the native ops registered.

    KANGAROO_KERNELS_C_PATH=/path/to/lib.so loads a library built elsewhere (development builds).
    """
    path = os.environ.get("KANGAROO_KERNELS_C_PATH")
    if path:
        torch.ops.load_library(path)
    else:
        try:
            from kangaroo_kernels import _C  # noqa: F401  (registers the ops)
        except ImportError as e:
            raise ImportError(
                "kangaroo_kernels._C is not built: run `pip install --no-build-isolation -e .` "
                f"(or `make build`) in the repository ({e})"
            ) from e
    return torch.ops.kangaroo_kernels


def has_cuda_kernels() -> bool:
    """True when the CUDA kernels were compiled into the native library."""
    return bool(ops().has_cuda_kernels())


def build_info() -> dict:
    try:
        from kangaroo_kernels import _build_info as bi
    except ImportError:
        return {"WITH_CUDA": False, "CUDA_SKIP_REASON": "no build info (not built by setup.py)", "CUDA_ARCHS": []}
    return {"WITH_CUDA": bi.WITH_CUDA, "CUDA_SKIP_REASON": bi.CUDA_SKIP_REASON, "CUDA_ARCHS": bi.CUDA_ARCHS}


_INPLACE = {}  # a plain dict, not lru_cache: torch.compile traces a hit of it as a constant


def inplace_op(name: str):
    """torch.ops.kangaroo_kernels.<name>.default for a native op that only writes its outputs in place (returns
    nothing), with its fake (meta) kernel registered on first use, so torch.compile can trace calls to it."""
    op = _INPLACE.get(name)
    if op is None:
        op = getattr(ops(), name).default
        torch.library.register_fake(f"kangaroo_kernels::{name}")(_returns_nothing)
        _INPLACE[name] = op
    return op


def _returns_nothing(*args, **kwargs):
    return None
