"""adapter_forward's C++ CPU kernel (csrc/cpu/adapter_forward.cpp) against the reference on head dims the fused
Triton kernels do not take (80, 96, 112, 24; on CUDA those run the composite tested last), GQA, q/k/v bias, table
and theta RoPE, inactive rows, several steps that read back what earlier steps wrote, and the last cache slot.
fp32 with a RoPE table takes the hand-written fp32 path (the decoder's), the rest the ATen path. Tolerances:
tests/test_adapter_forward.py (_close)."""

import pytest
import torch
from test_adapter_forward import _run_steps

from kangaroo_kernels.ops.adapter_forward import adapter_forward

# (B, Hq, Hk, Dh, S, cache_lens, active, dtype, bias, rope, apply_out_norm, steps)
CASES = [
    (3, 4, 2, 80, 40, [0, 17, 36], [True, False, True], torch.float32, True, "theta", True, 3),
    (2, 3, 1, 96, 30, [5, 27], None, torch.bfloat16, False, "table", False, 3),  # ends at the cache's last slot
    (1, 2, 2, 112, 20, [7], None, torch.float16, True, "table", True, 2),
    (3, 6, 3, 24, 16, [0, 3, 12], [False, True, True], torch.float32, False, "theta", False, 2),
    # fp32 with a table: the hand-written fp32 path (what the CPU decoder runs)
    (3, 4, 2, 64, 24, [0, 9, 20], [True, False, True], torch.float32, True, "table", True, 3),
    (2, 2, 1, 80, 20, [4, 18], None, torch.float32, False, "table", False, 2),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-H{c[1]}/{c[2]}-Dh{c[3]}-{str(c[7])[6:]}-{c[9]}")
def test_cpu_kernel_matches_reference(case):
    B, Hq, Hk, Dh, S, lens, active, dtype, bias, rope, out_norm, steps = case
    _run_steps(adapter_forward, B, Hq, Hk, Dh, S, lens, active, dtype, bias, rope, out_norm, steps,
               torch.device("cpu"), fused=B == 3)


@pytest.mark.parametrize("case", [CASES[0], CASES[1]], ids=["Dh80-fp32", "Dh96-bf16"])
def test_cuda_composite_for_unfused_head_dims(case, device, interpret):
    """What adapter_forward runs on CUDA for even head dims the fused kernels do not tile: the reference's maths with
    append_attention's padded Triton kernel (interpreter on CPU tensors)."""
    from kangaroo_kernels.ops.adapter_forward import _adapter_forward_composite, _prepare

    if device.type == "cpu" and not interpret:
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")

    def composite(h, w, k_cache, v_cache, lens, positions, *, active=None, rope_theta=10000.0, rope_cos_sin=None,
                  apply_out_norm=True, out=None):
        args = _prepare(h, w, k_cache, v_cache, lens, positions, active, rope_theta, rope_cos_sin, 1e-6,
                        apply_out_norm, out, False)
        _adapter_forward_composite(*args)
        return args[-1]

    B, Hq, Hk, Dh, S, lens, active, dtype, bias, rope, out_norm, steps = case
    _run_steps(composite, B, Hq, Hk, Dh, S, lens, active, dtype, bias, rope, out_norm, 2, device)
