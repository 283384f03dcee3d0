"""adapter_forward: the Kangaroo adapter a(h) = RMSNorm_out(h + O(attn(RoPE(QKV(RMSNorm_in(h)))))) for one decode
step, with its own static KV cache. CPU tensors run the C++ kernel (csrc/cpu/adapter_forward.cpp: the reference's
maths, attention by append_attention's CPU kernel); CUDA tensors run the Triton kernels
(kangaroo_kernels/triton/adapter_forward.py), whose attention is append_attention's kernel.
"""

from typing import Optional

import torch

from kangaroo_kernels import _checks, _ext
from kangaroo_kernels.types import AdapterWeights

__all__ = ["AdapterForwardPlan", "adapter_forward"]


# The schema lives in csrc/registration.cpp with the C++ CPU kernel (csrc/cpu/adapter_forward.cpp, the reference's
# maths with append_attention's CPU kernel); this module adds the CUDA (Triton) implementation and the fake.
_ext.ops()
_lib = torch.library.Library("kangaroo_kernels", "FRAGMENT")


def _fused_head_dim(Dh: int) -> bool:
    """Head dims the fused Triton kernels tile: powers of two in [32, 256]."""
    return 32 <= Dh <= 256 and not Dh & (Dh - 1)


def _adapter_forward_composite(h, norm_in, wq, wk, wv, bq, bk, bv, wo, norm_out, k_cache, v_cache, cache_lens,
                               positions, active, rope_cos_sin, rope_theta, eps, apply_out_norm, out):
    """Other even head dims (e.g. 80, 96, 112) on CUDA: the reference's maths (torch ops) with append_attention's
    Triton kernel, which pads the head inside the kernel. No host sync, fixed shapes: CUDA-graph capturable."""
    from kangaroo_kernels.ops.append_attention import _append_attention_triton
    from kangaroo_kernels.reference.adapter_forward import adapter_forward_ref

    Hk, Dh = k_cache.shape[1], k_cache.shape[3]
    w = AdapterWeights(norm_in, wq, wk, wv, wo, norm_out, wq.shape[0] // Dh, Hk, bq, bk, bv)

    def attention(q, k, v, kc, vc, lens, *, tree_mask=None, active=None, sm_scale=None, positions=None,
                  rope_cos_sin=None):
        return _append_attention_triton(q, k, v, kc, vc, lens, tree_mask=tree_mask, active=active, sm_scale=sm_scale,
                                        positions=positions, rope_cos_sin=rope_cos_sin, validate=False)

    out.copy_(adapter_forward_ref(h, w, k_cache, v_cache, cache_lens, positions, active=active, rope_theta=rope_theta,
                                  rope_cos_sin=rope_cos_sin, eps=eps, apply_out_norm=apply_out_norm,
                                  attention=attention))


def _adapter_forward_cuda(h, *args):
    from kangaroo_kernels.triton.adapter_forward import adapter_forward_triton

    impl = adapter_forward_triton if _fused_head_dim(args[9].shape[3]) else _adapter_forward_composite  # k_cache
    if h.device.index != torch.cuda.current_device():
        with torch.cuda.device(h.device):
            impl(h, *args)
        return
    impl(h, *args)


_lib.impl("adapter_forward", _adapter_forward_cuda, "CUDA")


@torch.library.register_fake("kangaroo_kernels::adapter_forward", lib=_lib)
def _adapter_forward_fake(h, norm_in, wq, wk, wv, bq, bk, bv, wo, norm_out, k_cache, v_cache, cache_lens,
                          positions, active, rope_cos_sin, rope_theta, eps, apply_out_norm, out):
    return None


def _check_cuda_head_dim(Dh: int, fused: bool = False) -> None:
    """CUDA's limit: an even head dim <= 256 (append_attention's padded kernel); the fused kernels
    (_adapter_forward_triton) take powers of two in [32, 256] only. CPU takes any even head dim."""
    if fused and not _fused_head_dim(Dh):
        raise ValueError(f"k_cache: the fused Triton kernels take a head dim Dh that is a power of two in [32, 256] "
                         f"(expected [B, Hk, S, Dh]), got {Dh}; adapter_forward runs other even head dims on CUDA "
                         f"through append_attention's padded kernel")
    if Dh > 256:
        raise ValueError(f"k_cache: on CUDA the head dim Dh must be <= 256 (append_attention's register tiles; "
                         f"expected [B, Hk, S, Dh]), got {Dh}; CPU tensors take any even head dim")


def _prepare(h, weights, k_cache, v_cache, cache_lens, positions, active, rope_theta, rope_cos_sin, eps,
             apply_out_norm, out, validate):
    """Checks every argument (data checks only when validating) and returns the op's argument tuple."""
    _checks.check_tensor("h", h, dtypes=_checks.FLOAT_DTYPES, ndim=2, expected="[B, D]")
    B, D = h.shape
    dev, dt = h.device, h.dtype
    if not isinstance(weights, AdapterWeights):
        raise ValueError(f"weights must be an AdapterWeights, got {type(weights).__name__}")
    Hq = _checks.check_int("weights.num_heads", weights.num_heads, 1)
    Hk = _checks.check_int("weights.num_kv_heads", weights.num_kv_heads, 1)
    if not (isinstance(k_cache, torch.Tensor) and k_cache.dim() == 4
            and _checks.tensor_ok(k_cache, dt, (B, Hk, *k_cache.shape[2:]), dev)):
        _checks.check_tensor("k_cache", k_cache, dtypes=(dt,), ndim=4, device=dev,
                             expected=f"[B={B}, Hk, S, Dh] in h's dtype")
        _checks.check_tensor("k_cache", k_cache, shape=(B, Hk, None, None),
                             expected=f"[B={B}, Hk=weights.num_kv_heads={Hk}, S, Dh]")
    _, _, S, Dh = k_cache.shape
    if Dh < 1 or Dh % 2:  # rotate-half RoPE
        raise ValueError(f"k_cache: head dim Dh must be even (rotate-half RoPE; expected [B, Hk, S, Dh]), got {Dh}")
    if dev.type == "cuda":
        _check_cuda_head_dim(Dh)
    if Hk < 1 or Hq < 1 or Hq % Hk:
        raise ValueError(f"weights.num_kv_heads={Hk} must divide weights.num_heads={Hq} (GQA)")
    if not _checks.tensor_ok(v_cache, dt, (B, Hk, S, Dh), dev):
        _checks.check_tensor("v_cache", v_cache, dtypes=(dt,), shape=(B, Hk, S, Dh), device=dev,
                             expected=f"[B={B}, Hk={Hk}, S={S}, Dh={Dh}] in h's dtype")
    NQ, NK = Hq * Dh, Hk * Dh
    shapes = {"norm_in": (D,), "wq": (NQ, D), "wk": (NK, D), "wv": (NK, D), "wo": (D, NQ), "norm_out": (D,),
              "bq": (NQ,), "bk": (NK,), "bv": (NK,)}
    biases = [weights.bq, weights.bk, weights.bv]
    if any(b is not None for b in biases) and any(b is None for b in biases):
        raise ValueError("weights.bq/bk/bv: give all three q/k/v biases or none")
    for name, want in shapes.items():
        t = getattr(weights, name)
        if t is None or _checks.tensor_ok(t, dt, want, dev):
            continue
        _checks.check_tensor(f"weights.{name}", t, dtypes=(dt,), shape=want, device=dev,
                             expected=f"{list(want)} in h's dtype (Hq={Hq}, Hk={Hk}, Dh={Dh}, D={D})")
    for name, t in (("cache_lens", cache_lens), ("positions", positions)):
        if not _checks.tensor_ok(t, torch.int32, (B,), dev):
            _checks.check_tensor(name, t, dtypes=_checks.INDEX_DTYPES, shape=(B,), device=dev,
                                 expected=f"[B={B}] int32")
    if active is not None and not _checks.tensor_ok(active, torch.bool, (B,), dev):
        _checks.check_tensor("active", active, dtypes=(torch.bool,), shape=(B,), device=dev,
                             expected=f"[B={B}] bool")
    if rope_cos_sin is not None:
        if not (isinstance(rope_cos_sin, torch.Tensor) and rope_cos_sin.dim() == 2 and _checks.tensor_ok(
                rope_cos_sin, torch.float32, (rope_cos_sin.shape[0], Dh), dev)):
            _checks.check_tensor("rope_cos_sin", rope_cos_sin, dtypes=(torch.float32,), shape=(None, Dh),
                                 device=dev, expected=f"[max_pos, Dh={Dh}] float32 = cat(cos, sin) (make_rope_cos_sin)")
        if rope_cos_sin.shape[0] < 1:
            raise ValueError("rope_cos_sin must have max_pos >= 1 rows (expected [max_pos, Dh])")
    else:
        rope_theta = _checks.check_real("rope_theta", rope_theta, lo=0.0, lo_open=True)
    eps = _checks.check_real("eps", eps, lo=0.0)
    if out is None:
        out = torch.empty((B, D), dtype=dt, device=dev)
    else:
        _checks.check_out("out", out, (B, D), dt, dev)

    if _checks.validating(validate) and B > 0:
        lens = cache_lens.long()
        rows = active if active is not None else torch.ones(B, dtype=torch.bool, device=dev)
        bad = rows & ((lens < 0) | (lens >= S))
        if bool(bad.any()):
            b = int(bad.nonzero()[0, 0])
            raise ValueError(f"cache overflow: cache_lens[{b}] = {int(lens[b])}: need 0 <= cache_lens[b] < S = {S} "
                             f"(k_cache [B, Hk, S, Dh]) to append this step's K/V")
        pos = positions.long()
        bad = (pos < 0) | (pos > _checks.I32_MAX)
        rng = "in [0, 2^31)"
        if rope_cos_sin is not None:
            bad |= pos >= rope_cos_sin.shape[0]
            rng = f"in [0, max_pos={rope_cos_sin.shape[0]}) of rope_cos_sin"
        bad &= rows
        if bool(bad.any()):
            b = int(bad.nonzero()[0, 0])
            raise ValueError(f"positions[{b}] = {int(pos[b])} out of range: need {rng}")
    if cache_lens.dtype == torch.int64:  # the kernels read int32: saturate, so that 2^32 + 1 never means 1
        cache_lens = _checks.to_int32(cache_lens)
    if positions.dtype == torch.int64:
        positions = _checks.to_int32(positions)
    return (h, weights.norm_in, weights.wq, weights.wk, weights.wv, weights.bq, weights.bk, weights.bv, weights.wo,
            weights.norm_out, k_cache, v_cache, cache_lens, positions, active, rope_cos_sin, float(rope_theta),
            float(eps), bool(apply_out_norm), out)


def adapter_forward(h: torch.Tensor, weights: AdapterWeights, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    cache_lens: torch.Tensor, positions: torch.Tensor, *, active: Optional[torch.Tensor] = None,
                    rope_theta: float = 10000.0, rope_cos_sin: Optional[torch.Tensor] = None, eps: float = 1e-6,
                    apply_out_norm: bool = True, out: Optional[torch.Tensor] = None,
                    validate: Optional[bool] = None) -> torch.Tensor:
    """One decode step of the Kangaroo adapter: h[B,D] (hidden state after the shallow layers) -> out[B,D].

    Appends this step's K/V (RoPE'd k) to k_cache/v_cache[B,Hk,S,Dh] at cache_lens[b] (int32/int64); does NOT
    advance cache_lens (the caller does, once per step, like append_attention). Attends over the prefix
    [0, cache_lens[b]) plus the new token. positions[B] (int32/int64) are the RoPE positions. weights and caches are
    in h's dtype (fp32/fp16/bf16); every reduction in fp32 with HF-Llama roundings (see the reference).
    RoPE: rope_cos_sin (fp32 [max_pos, Dh] = cat(cos, sin), e.g. make_rope_cos_sin, for scaled RoPE) or else the
    default frequencies of rope_theta, evaluated at each row's position (any position, no table).
    apply_out_norm=False returns the pre-norm residual h + O(attn) so lm_head_exit(norm_weight=weights.norm_out)
    applies RMSNorm_out inside its GEMV (one launch fewer, same maths).
    active[B] bool: inactive rows write nothing to the caches and get zeros in out (also in a given out=).
    validate (default: on unless capturing a CUDA graph) checks 0 <= cache_lens[b] < S and the positions on the
    device data (a host sync); the kernels mask every access either way (int64 lengths and positions outside
    int32 saturate instead of wrapping). eps: finite >= 0; rope_theta: finite > 0.
    """
    args = _prepare(h, weights, k_cache, v_cache, cache_lens, positions, active, rope_theta, rope_cos_sin, eps,
                    apply_out_norm, out, validate)
    if h.shape[0] > 0:
        torch.ops.kangaroo_kernels.adapter_forward(*args)
    return args[-1]


def _adapter_forward_triton(h, weights, k_cache, v_cache, cache_lens, positions, *, active=None,
                            rope_theta=10000.0, rope_cos_sin=None, eps=1e-6, apply_out_norm=True, out=None,
                            validate=None) -> torch.Tensor:
    """adapter_forward forced onto the Triton kernels (CPU tensors need TRITON_INTERPRET=1): tests, benchmarks."""
    from kangaroo_kernels.triton.adapter_forward import adapter_forward_triton

    _check_cuda_head_dim(k_cache.shape[-1] if isinstance(k_cache, torch.Tensor) and k_cache.dim() == 4 else 64,
                         fused=True)
    args = _prepare(h, weights, k_cache, v_cache, cache_lens, positions, active, rope_theta, rope_cos_sin, eps,
                    apply_out_norm, out, validate)
    if h.shape[0] > 0:
        adapter_forward_triton(*args)
    return args[-1]


class AdapterForwardPlan:
    """adapter_forward with its static arguments checked once (plan / run, as FlashInfer's wrappers): a decoder
    calls the adapter every draft step with the same weights, caches, RoPE table and eps, and on a CPU the full
    argument check costs about as much as the small model's adapter kernel.

        plan = AdapterForwardPlan(weights, k_cache, v_cache, rope_cos_sin=table, eps=1e-6, apply_out_norm=False)
        out = plan.run(h, cache_lens, positions, active=rows, out=buf)   # == adapter_forward(h, weights, ...)

    The constructor runs every check adapter_forward runs on these arguments (for B = k_cache.shape[0] rows). run()
    tests only the per-step tensors (h [B, D], int32 cache_lens / positions [B], bool active [B] or None, a contiguous
    out [B, D]) for exact dtype, shape and device, and hands any other input to adapter_forward itself, which then
    converts it or raises its precise error. No data checks (validate=False): the kernels mask every access."""

    def __init__(self, weights: AdapterWeights, k_cache: torch.Tensor, v_cache: torch.Tensor, *,
                 rope_cos_sin: torch.Tensor, eps: float = 1e-6, apply_out_norm: bool = True):
        if not isinstance(k_cache, torch.Tensor) or k_cache.dim() != 4:
            raise ValueError("k_cache must be a [B, Hk, S, Dh] tensor")
        if not isinstance(weights, AdapterWeights):
            raise ValueError(f"weights must be an AdapterWeights, got {type(weights).__name__}")
        if rope_cos_sin is None:
            raise ValueError("AdapterForwardPlan needs rope_cos_sin (the RoPE table the decoder shares)")
        B, dev = k_cache.shape[0], k_cache.device
        D = weights.norm_in.shape[0] if isinstance(weights.norm_in, torch.Tensor) else 0
        h = torch.empty(B, D, dtype=k_cache.dtype, device=dev)
        lens = torch.zeros(B, dtype=torch.int32, device=dev)
        args = _prepare(h, weights, k_cache, v_cache, lens, lens, None, 10000.0, rope_cos_sin, eps, apply_out_norm,
                        None, False)
        self._static = args[1:12], args[15:19]  # weights .. v_cache; rope table, theta, eps, apply_out_norm
        self._kw = dict(rope_cos_sin=rope_cos_sin, eps=eps, apply_out_norm=apply_out_norm)
        self._weights, self._k, self._v = weights, k_cache, v_cache
        self._shape, self._dtype, self._device = (B, D), k_cache.dtype, dev

    @property
    def native_args(self):
        """The native op's checked static arguments, as run() passes them: ((norm_in, wq, wk, wv, bq, bk, bv, wo,
        norm_out, k_cache, v_cache), (rope_cos_sin, rope_theta, eps, apply_out_norm)); for callers that fuse the
        adapter step into a larger native call (the CPU decoder's draft_step)."""
        return self._static

    def run(self, h: torch.Tensor, cache_lens: torch.Tensor, positions: torch.Tensor, *,
            active: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, dt, dev = self._shape[0], self._dtype, self._device
        ok = (_checks.tensor_ok(h, dt, self._shape, dev)
              and _checks.tensor_ok(cache_lens, torch.int32, (B,), dev)
              and _checks.tensor_ok(positions, torch.int32, (B,), dev)
              and (active is None or _checks.tensor_ok(active, torch.bool, (B,), dev))
              and (out is None or (_checks.tensor_ok(out, dt, self._shape, dev) and out.is_contiguous())))
        if not ok:
            return adapter_forward(h, self._weights, self._k, self._v, cache_lens, positions, active=active, out=out,
                                   validate=False, **self._kw)
        if out is None:
            out = torch.empty(self._shape, dtype=dt, device=dev)
        if B > 0:
            w, tail = self._static
            torch.ops.kangaroo_kernels.adapter_forward(h, *w, cache_lens, positions, active, *tail, out)
        return out
