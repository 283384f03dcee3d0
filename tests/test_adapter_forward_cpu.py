"""adapter_forward's C++ CPU kernel (csrc/cpu/adapter_forward.cpp) against the reference on head dims the fused
Triton kernels do not take (80, 96, 112, 24; on CUDA those run the composite tested last), GQA, q/k/v bias, table
and theta RoPE, inactive rows, several steps that read back what earlier steps wrote, and the last cache slot.
fp32 with a RoPE table takes the hand-written fp32 path (the decoder's), the rest the ATen path. Tolerances:
tests/test_adapter_forward.py (_close)."""

import pytest
import torch
from test_adapter_forward import _run_steps

from kangaroo_kernels.ops.adapter_forward import AdapterForwardPlan, adapter_forward

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


def _via_plan(h, w, k_cache, v_cache, lens, positions, *, out=None, active=None, rope_cos_sin=None,
              apply_out_norm=True):
    """adapter_forward's signature on an AdapterForwardPlan (built per call here: the plan checks, run runs)."""
    plan = AdapterForwardPlan(w, k_cache, v_cache, rope_cos_sin=rope_cos_sin, apply_out_norm=apply_out_norm)
    return plan.run(h, lens, positions, active=active, out=out)


@pytest.mark.parametrize("case", [c for c in CASES if c[9] == "table"],
                         ids=lambda c: f"B{c[0]}-Dh{c[3]}-{str(c[7])[6:]}")
def test_plan_matches_reference(case):
    """The decoder's AdapterForwardPlan: int32 steps take its direct path, int64 positions (odd steps) the wrapper."""
    B, Hq, Hk, Dh, S, lens, active, dtype, bias, rope, out_norm, steps = case
    _run_steps(_via_plan, B, Hq, Hk, Dh, S, lens, active, dtype, bias, rope, out_norm, steps, torch.device("cpu"))


def test_plan_equals_the_wrapper_and_refuses_what_it_refuses():
    from test_adapter_forward import _weights

    from kangaroo_kernels.rope import make_rope_cos_sin

    B, Hq, Hk, Dh, S = 2, 4, 2, 32, 16
    w = _weights(Hq * Dh, Hq, Hk, Dh, torch.float32, torch.device("cpu"), False, seed=3)
    table = make_rope_cos_sin(S, Dh)
    caches = [torch.randn(B, Hk, S, Dh, generator=torch.Generator().manual_seed(1)) for _ in range(4)]
    h = torch.randn(B, Hq * Dh)
    lens = torch.tensor([3, 9], dtype=torch.int32)
    act = torch.tensor([True, False])
    plan = AdapterForwardPlan(w, caches[0], caches[1], rope_cos_sin=table, eps=1e-5, apply_out_norm=False)
    got = plan.run(h, lens, lens, active=act)
    want = adapter_forward(h, w, caches[2], caches[3], lens, lens, active=act, rope_cos_sin=table, eps=1e-5,
                           apply_out_norm=False)
    assert torch.equal(got, want) and torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    with pytest.raises(ValueError, match="h"):
        plan.run(h.double(), lens, lens)
    with pytest.raises(ValueError, match="cache_lens"):
        plan.run(h, lens[:1], lens)
    with pytest.raises(ValueError, match="rope_cos_sin"):
        AdapterForwardPlan(w, caches[0], caches[1], rope_cos_sin=None)
    with pytest.raises(ValueError, match="v_cache"):
        AdapterForwardPlan(w, caches[0], caches[1][:, :, :8], rope_cos_sin=table)
