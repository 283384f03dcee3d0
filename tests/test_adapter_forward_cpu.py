"""adapter_forward's C++ CPU kernel (csrc/cpu/adapter_forward.cpp) against the reference on head dims the Triton
kernels do not take (80, 96, 112, 24), GQA, q/k/v bias, table and theta RoPE, inactive rows, several steps that read
back what earlier steps wrote, and the last cache slot. Tolerances: tests/test_adapter_forward.py (_close)."""

import pytest
import torch
from test_adapter_forward import _run_steps

from kangaroo_kernels.adapter_forward import adapter_forward

# (B, Hq, Hk, Dh, S, cache_lens, active, dtype, bias, rope, apply_out_norm, steps)
CASES = [
    (3, 4, 2, 80, 40, [0, 17, 36], [True, False, True], torch.float32, True, "theta", True, 3),
    (2, 3, 1, 96, 30, [5, 27], None, torch.bfloat16, False, "table", False, 3),  # ends at the cache's last slot
    (1, 2, 2, 112, 20, [7], None, torch.float16, True, "table", True, 2),
    (3, 6, 3, 24, 16, [0, 3, 12], [False, True, True], torch.float32, False, "theta", False, 2),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-H{c[1]}/{c[2]}-Dh{c[3]}-{str(c[7])[6:]}-{c[9]}")
def test_cpu_kernel_matches_reference(case):
    B, Hq, Hk, Dh, S, lens, active, dtype, bias, rope, out_norm, steps = case
    _run_steps(adapter_forward, B, Hq, Hk, Dh, S, lens, active, dtype, bias, rope, out_norm, steps,
               torch.device("cpu"), fused=B == 3)
