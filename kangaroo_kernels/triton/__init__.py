"""Triton kernels of the draft side. Import these modules only when a kernel is needed: with
TRITON_INTERPRET=1 set before import they run on CPU tensors (tests)."""

import functools
import os

import torch

# Set by bench/compile_report.py: launch configs are chosen as for a GPU with this many SMs although the tensors
# live on the CPU (the kernels are only compiled for a GPU target, never run).
_compile_only_sms = None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def gpu_config(device: torch.device) -> bool:
    """True when launch configs (block sizes, warps, splits) are chosen for a GPU rather than the interpreter."""
    if _compile_only_sms is not None:
        return True
    return device.type == "cuda" and not interpreting()


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of device (4 for the interpreter: a few programs per split)."""
    if _compile_only_sms is not None:
        return _compile_only_sms
    if device.type != "cuda":
        return 4
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
