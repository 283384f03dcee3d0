"""One Kangaroo draft step with validate=False never synchronises the host with the device.

The step: embedding -> 2 shallow decoder layers (RMSNorm, QKV matmul, append_attention, O-proj, SwiGLU MLP in torch)
-> adapter_forward (pre-norm residual) -> lm_head_exit (RMSNorm_out fused) -> lengths/positions/active advanced on
the device. It runs under NoHostSync, a dispatch mode that fails on every op that reads device data on the host
(.item(), int(), bool(), .tolist(), nonzero, is_nonzero, equal, data-dependent shapes, device -> host copies):
- through the public ops (CPU tensors: their reference impls; the mode sees the wrappers' own aten calls),
- through the Triton launchers in the interpreter (the mode sees every aten call the launchers make),
- on a GPU additionally with torch.cuda.set_sync_debug_mode("error"), and captured whole in a CUDA graph whose
  replays with new inputs equal eager runs.
Controls show the guard catches planted syncs, including the validating path of adapter_forward.
"""


import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from kangaroo_kernels.ops.adapter_forward import _adapter_forward_triton, adapter_forward
from kangaroo_kernels.ops.append_attention import _append_attention_triton, append_attention
from kangaroo_kernels.ops.lm_head_exit import _lm_head_exit_triton, lm_head_exit
from kangaroo_kernels.rope import make_rope_cos_sin
from kangaroo_kernels.types import AdapterWeights

aten = torch.ops.aten


class HostSyncError(AssertionError):
    pass


class NoHostSync(TorchDispatchMode):
    """Raises HostSyncError on any op that makes the host wait for device data: reads of values
    (_local_scalar_dense: .item(), int(), float(), bool()), ops whose output shape depends on the data (nonzero,
    boolean-mask indexing, unique, masked_select), equal/is_nonzero, device -> host copies, and Tensor.tolist
    (which reads CPU tensors without dispatching an op, so it is patched while the mode is on)."""

    SYNC_OPS = {aten._local_scalar_dense, aten.nonzero, aten.is_nonzero, aten.equal, aten.masked_select,
                aten._unique, aten._unique2, aten.unique_dim, aten.unique_consecutive}
    MASK_INDEX_OPS = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}

    def __enter__(self):
        self._tolist = torch.Tensor.tolist

        def tolist(t):
            raise HostSyncError("host sync: Tensor.tolist")

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in self.SYNC_OPS:
            raise HostSyncError(f"host sync: {func}")
        if func.overloadpacket in self.MASK_INDEX_OPS and any(
                isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1]):
            raise HostSyncError(f"boolean-mask indexing (data-dependent shape): {func}")
        if func.overloadpacket in (aten._to_copy, aten.copy_, aten._copy_from):
            src = args[1] if func.overloadpacket is aten.copy_ else args[0]
            if func.overloadpacket is aten._to_copy:
                dst_dev = kwargs.get("device")
                dst_cpu = dst_dev is not None and torch.device(dst_dev).type == "cpu"
            elif func.overloadpacket is aten.copy_:
                dst_cpu = args[0].device.type == "cpu"
            else:
                dst_cpu = args[1].device.type == "cpu"
            if isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst_cpu:
                raise HostSyncError(f"device -> host copy: {func}")
        return func(*args, **kwargs)


B, D, HQ, HK, DH, INTER, V, LAYERS, S = 3, 128, 2, 1, 64, 192, 97, 2, 32


def _model(device, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device)

    layers = [dict(norm1=1 + rnd(D, scale=0.1), wqkv=rnd((HQ + 2 * HK) * DH, D, scale=D ** -0.5),
                   wo=rnd(D, HQ * DH, scale=(HQ * DH) ** -0.5), norm2=1 + rnd(D, scale=0.1),
                   wg=rnd(INTER, D, scale=D ** -0.5), wu=rnd(INTER, D, scale=D ** -0.5),
                   wd=rnd(D, INTER, scale=INTER ** -0.5)) for _ in range(LAYERS)]
    adapter = AdapterWeights.from_wqkv(1 + rnd(D, scale=0.1), rnd((HQ + 2 * HK) * DH, D, scale=D ** -0.5),
                                       rnd(D, HQ * DH, scale=(HQ * DH) ** -0.5), 1 + rnd(D, scale=0.1), HQ, HK)
    return dict(embed=rnd(V, D), layers=layers, adapter=adapter, lm_head=rnd(V, D, scale=3 * D ** -0.5),
                rope=make_rope_cos_sin(2 * S, DH, device=device))


def _state(device, seed=1):
    """Caches with a prefix of ragged lengths, the last committed tokens, positions, active rows."""
    gen = torch.Generator().manual_seed(seed)
    return dict(k=torch.randn(LAYERS + 1, B, HK, S, DH, generator=gen).to(device),
                v=torch.randn(LAYERS + 1, B, HK, S, DH, generator=gen).to(device),
                lens=torch.tensor([5, 0, 17], dtype=torch.int32, device=device),
                positions=torch.tensor([5, 0, 20], dtype=torch.int32, device=device),
                token=torch.tensor([3, 50, 96], dtype=torch.int32, device=device),
                active=torch.tensor([True, True, False], device=device))


def _clone(state):
    return {k: v.clone() for k, v in state.items()}


def _rms(x, w, eps=1e-6):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def draft_step(m, st, ops, threshold):
    """One greedy draft step; st (caches, lens, positions, token, active) is updated in place, so the step can be
    captured in a CUDA graph. Returns (layer-l hidden x, token, conf, active before, active after)."""
    attend, adapter, lm_head_exit = ops
    act = st["active"].clone()
    x = F.embedding(st["token"], m["embed"])
    for i, p in enumerate(m["layers"]):
        qkv = _rms(x, p["norm1"]) @ p["wqkv"].T
        q, k, v = qkv.split([HQ * DH, HK * DH, HK * DH], dim=-1)
        a = attend(q.view(B, 1, HQ, DH), k.view(B, 1, HK, DH), v.view(B, 1, HK, DH), st["k"][i], st["v"][i],
                   st["lens"], active=act, positions=st["positions"][:, None], rope_cos_sin=m["rope"],
                   validate=False)
        x = x + a.view(B, HQ * DH) @ p["wo"].T
        hn = _rms(x, p["norm2"])
        x = x + (F.silu(hn @ p["wg"].T) * (hn @ p["wu"].T)) @ p["wd"].T
    r = adapter(x, m["adapter"], st["k"][LAYERS], st["v"][LAYERS], st["lens"], st["positions"], active=act,
                rope_cos_sin=m["rope"], apply_out_norm=False, validate=False)
    token, conf, act_out = lm_head_exit(r, m["lm_head"], threshold, norm_weight=m["adapter"].norm_out, eps=1e-6,
                                        active=act)[:3]
    st["lens"] += act.int()
    st["positions"] += act.int()
    st["token"].copy_(torch.where(act, token, st["token"]))
    st["active"].copy_(act_out)
    return x, token, conf, act, act_out


def _public_ops():
    return append_attention, adapter_forward, lm_head_exit


def _triton_ops():
    return _append_attention_triton, _adapter_forward_triton, _lm_head_exit_triton


def _threshold(m, device):
    """Between the two active rows' first-step confidences: one of them exits after step 1."""
    conf = draft_step(m, _state(device), _public_ops(), 0.0)[2]
    return float((conf[0] + conf[1]) / 2)


def _run(m, st, ops, threshold, steps=3):
    with NoHostSync():
        return [draft_step(m, st, ops, threshold) for _ in range(steps)]


def _compare(got, want, got_state, want_state, tol):
    for (x1, t1, c1, a1, o1), (x2, t2, c2, a2, o2) in zip(got, want):
        torch.testing.assert_close(x1, x2, atol=tol, rtol=tol)
        assert torch.equal(a1, a2) and torch.equal(o1, o2)
        assert torch.equal(t1[a1], t2[a1])  # inactive rows' outputs are unspecified
        torch.testing.assert_close(c1[a1], c2[a1], atol=tol, rtol=tol)
    for key in ("lens", "positions", "token", "active"):
        assert torch.equal(got_state[key], want_state[key]), key
    torch.testing.assert_close(got_state["k"], want_state["k"], atol=tol, rtol=tol)
    torch.testing.assert_close(got_state["v"], want_state["v"], atol=tol, rtol=tol)


def test_draft_step_public_ops_no_sync():
    device = torch.device("cpu")
    m = _model(device)
    threshold = _threshold(m, device)
    st, st0 = _state(device), _state(device)
    outs = _run(m, st, _public_ops(), threshold)
    assert outs[0][4].sum() == 1 and outs[0][3].sum() == 2, "exactly one active row should exit after step 1"
    assert torch.equal(st["lens"], st0["lens"] + sum(o[3].int() for o in outs))
    assert torch.equal(st["active"], outs[-1][4])


# fp32 throughout; the paths differ in summation order only (GEMVs over D = 128, split-KV softmax)
TOL = 1e-5


def test_draft_step_triton_interpreter_no_sync(interpret):
    """The Triton launchers (interpreter on CPU) under the guard equal the public ops' CPU path."""
    if not interpret:
        pytest.skip("runs the Triton kernels in the interpreter (the CUDA test covers the compiled ones)")
    device = torch.device("cpu")
    m = _model(device)
    threshold = _threshold(m, device)
    st_triton, st_ref = _state(device), _state(device)
    got = _run(m, st_triton, _triton_ops(), threshold)
    want = _run(m, st_ref, _public_ops(), threshold)
    _compare(got, want, st_triton, st_ref, TOL)


@pytest.mark.cuda
def test_draft_step_cuda_no_sync_and_graph():
    device, cpu = torch.device("cuda"), torch.device("cpu")
    m = _model(device)
    ops = _public_ops()
    threshold = _threshold(m, device)  # also compiles the kernels, outside the guards
    st = _state(device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        eager = _run(m, st, ops, threshold)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    # the same steps through the CPU paths on the same weights (GPU fp32: IEEE dots, other summation orders)
    st_cpu = _state(cpu)
    want = _run(_model(cpu), st_cpu, ops, threshold)
    _compare([tuple(t.cpu() for t in o) for o in eager], want, {k: v.cpu() for k, v in st.items()}, st_cpu, 1e-4)

    # capture one step on a static state (nothing runs during capture), then replay it with new inputs
    st = _state(device)
    static = _clone(st)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        draft_step(m, _clone(st), ops, threshold)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_static = draft_step(m, static, ops, threshold)
    gen = torch.Generator().manual_seed(5)
    for step in range(3):
        static["token"].copy_(torch.randint(0, V, (B,), generator=gen, dtype=torch.int32))
        static["active"].copy_(torch.tensor([True, step != 1, step != 2]))
        want_state = _clone(static)
        want = draft_step(m, want_state, ops, threshold)
        graph.replay()
        # same kernels on the same inputs: equal up to reduction-order nondeterminism across launches
        _compare([tuple(t.clone() for t in out_static)], [want], static, want_state, 1e-6)


def test_guard_catches_planted_syncs():
    """The test of the test: each planted host read fails under NoHostSync; plain device ops pass."""
    x = torch.arange(6, dtype=torch.float32)
    planted = [lambda: x.sum().item(), lambda: int(x[2]), lambda: bool(x.any()), lambda: x.tolist(),
               lambda: x.nonzero(), lambda: torch.equal(x, x), lambda: x[x > 2], lambda: float(x.max()),
               lambda: x.clone().__setitem__(x > 2, 0.0), lambda: torch.unique(x)]
    for fn in planted:
        with pytest.raises(HostSyncError):
            with NoHostSync():
                fn()
    with NoHostSync():
        y = torch.where(x > 2, x, 0.0).cumsum(0) + x[torch.tensor([1, 2])].sum()  # no host read: passes
    assert y.shape == (6,) and torch.Tensor.tolist is not None and y.tolist()[0] == 3.0  # tolist restored


def test_guard_catches_validating_adapter_forward():
    """adapter_forward's data checks (validate=True) read device values: the guard must see them."""
    device = torch.device("cpu")
    m, st = _model(device), _state(device)
    x = torch.randn(B, D)
    args = (x, m["adapter"], st["k"][LAYERS], st["v"][LAYERS], st["lens"], st["positions"])
    with NoHostSync():
        adapter_forward(*args, rope_cos_sin=m["rope"], validate=False)
    with pytest.raises(HostSyncError):
        with NoHostSync():
            adapter_forward(*args, rope_cos_sin=m["rope"], validate=True)


@pytest.mark.cuda
def test_guard_catches_device_to_host_copy():
    x = torch.arange(6, device="cuda")
    with pytest.raises(HostSyncError):
        with NoHostSync():
            x.cpu()
    with pytest.raises(HostSyncError):
        with NoHostSync():
            torch.empty(6, dtype=x.dtype).copy_(x)
