"""append_attention's Triton kernel on head dims that are not powers of two (Phi-3-style 96, 80, 112, 24): each half
of a head is padded to a power of two inside the kernel. Interpreter on CPU, compiled on a GPU; the same checks as
tests/test_append_attention.py (_run_case: output, written and untouched cache rows) against the reference."""

import pytest
import torch
from test_append_attention import _append_attention_triton, _run_case

# (B, T, Hq, Hk, Dh, S, cache_lens, dtype, num_splits, mode, rope, active)
CASES = [
    (2, 1, 4, 2, 96, 70, [5, 66], torch.float32, 2, "chain", True, [True, False]),
    (1, 5, 2, 1, 80, 40, [30], torch.float16, 1, "chain", True, None),
    (2, 7, 2, 2, 112, 40, [3, 20], torch.float32, 3, "tree", True, None),
    (1, 3, 4, 4, 24, 20, [9], torch.bfloat16, 1, "chain", False, None),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"D{c[4]}-T{c[1]}-{str(c[7])[6:]}-sp{c[8]}-{c[9]}")
def test_triton_padded_head_dims_match_reference(case, device, interpret):
    if device.type == "cpu" and not interpret:
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    _run_case(case, device, _append_attention_triton)
