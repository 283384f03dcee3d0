"""Triton adapter_forward: the Kangaroo adapter for one decode step.

1. _adapter_qkv_kernel: RMSNorm_in + QKV GEMV (+ bias) -> qkv[B, (Hq + 2 Hk) Dh]. Programs split the output
   rows (BLOCK_N rows of one of wq/wk/wv each), so B = 1 fills the GPU; every program recomputes the rows' rstd
   from h (2 B D elements, L2 hits; 1/16 of its weight bytes at B = 1) instead of a separate norm launch. With
   rope_theta the first row block also writes the per-row cos/sin table [B, Dh] the attention kernel rotates with.
2. append_attention (its Triton launcher; a second, merge launch when it splits the KV): RoPE of q and k, append
   of k/v at cache_lens[b], split-KV attention.
   Rotating there instead of here keeps the row split free of head alignment and is HF's order anyway
   (projection rounded to the dtype, then RoPE).
3. _adapter_out_kernel: O-proj GEMV + residual -> r[B, D], split over output rows like kernel 1.
4. (apply_out_norm) _adapter_out_norm_kernel: one program per row normalises r in place. RMSNorm needs whole
   rows, which kernel 3 splits across programs; lm_head_exit(norm_weight=...) can do it instead for free.
GEMVs are elementwise products + tl.sum in fp32 (B is tiny; bf16 tl.dot is wrong in the interpreter).
"""

import functools

import torch
import triton
import triton.language as tl

from kangaroo_kernels.rope import rope_inv_freq


@triton.jit
def _round(x, DTYPE: tl.constexpr):
    """fp32 x rounded to DTYPE (to nearest even), returned as fp32. bf16 by hand: the interpreter truncates
    fp32 -> bf16 casts (the GPU rounds to nearest), which would put the tests one ulp off the reference."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    else:
        return x.to(DTYPE).to(tl.float32)


@triton.jit
def _adapter_qkv_kernel(
    H, NORM_IN, WQ, WK, WV, BQ, BK, BV, QKV, POSITIONS, INV_FREQ, COS_SIN, ROPE_POS,
    s_hb, s_hd, s_wqn, s_wqk, s_wkn, s_wkk, s_wvn, s_wvk, s_p,
    B, D, NQ, NK, eps,
    HALF: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, MAKE_ROPE: tl.constexpr,
):
    DTYPE: tl.constexpr = QKV.dtype.element_ty
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    bb = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = bb < B
    h_row = H + bb[:, None].to(tl.int64) * s_hb
    kk0 = tl.arange(0, BLOCK_K)

    # BLOCK_N divides Dh, so a row block lies inside one of wq / wk / wv
    n0 = pid_n * BLOCK_N
    if n0 < NQ:
        w_ptr = WQ
        bias_ptr = BQ
        row0 = n0
        s_wn = s_wqn
        s_wk = s_wqk
    elif n0 < NQ + NK:
        w_ptr = WK
        bias_ptr = BK
        row0 = n0 - NQ
        s_wn = s_wkn
        s_wk = s_wkk
    else:
        w_ptr = WV
        bias_ptr = BV
        row0 = n0 - NQ - NK
        s_wn = s_wvn
        s_wk = s_wvk
    rows = row0 + tl.arange(0, BLOCK_N)
    w_rows = w_ptr + rows[:, None].to(tl.int64) * s_wn

    ss = tl.zeros([BLOCK_B], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + kk0
        x = tl.load(h_row + kk[None, :] * s_hd, mask=b_ok[:, None] & (kk[None, :] < D), other=0.0).to(tl.float32)
        ss += tl.sum(x * x, axis=1)
    rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.div_rn(ss, D * 1.0) + eps))

    acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + kk0
        k_ok = kk < D
        x = tl.load(h_row + kk[None, :] * s_hd, mask=b_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        g = tl.load(NORM_IN + kk, mask=k_ok, other=0.0).to(tl.float32)
        # HF rounding: normalised x to the dtype, times the weight, rounded again
        xn = _round(_round(x * rstd[:, None], DTYPE) * g[None, :], DTYPE)
        w = tl.load(w_rows + kk[None, :] * s_wk, mask=k_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(xn[:, None, :] * w[None, :, :], axis=2)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows).to(tl.float32)[None, :]
    nn = n0 + tl.arange(0, BLOCK_N)
    qkv_ptr = QKV + bb[:, None].to(tl.int64) * (NQ + 2 * NK) + nn[None, :]
    tl.store(qkv_ptr, _round(acc, DTYPE).to(DTYPE), mask=b_ok[:, None])

    if MAKE_ROPE:
        if pid_n == 0:
            # cos/sin of float32(position) * inv_freq, one table row per batch row (append_attention indexes it
            # with ROPE_POS[b] = b): exact for any position, no table size to outgrow
            i = tl.arange(0, HALF)
            pos = tl.load(POSITIONS + bb.to(tl.int64) * s_p, mask=b_ok, other=0).to(tl.float32)
            ang = pos[:, None] * tl.load(INV_FREQ + i)[None, :]
            cs = COS_SIN + bb[:, None].to(tl.int64) * (2 * HALF) + i[None, :]
            tl.store(cs, tl.cos(ang), mask=b_ok[:, None])
            tl.store(cs + HALF, tl.sin(ang), mask=b_ok[:, None])
            tl.store(ROPE_POS + bb, bb, mask=b_ok)


@triton.jit
def _adapter_out_kernel(
    ATTN, WO, H, ACTIVE, OUT,
    s_won, s_wok, s_hb, s_hd,
    B, D, NQ,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_ACTIVE: tl.constexpr,
):
    DTYPE: tl.constexpr = OUT.dtype.element_ty
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    bb = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = bb < B
    nn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = nn < D
    kk0 = tl.arange(0, BLOCK_K)
    a_row = ATTN + bb[:, None].to(tl.int64) * NQ
    w_rows = WO + nn[:, None].to(tl.int64) * s_won
    acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, NQ, BLOCK_K):
        kk = k0 + kk0
        k_ok = kk < NQ
        a = tl.load(a_row + kk[None, :], mask=b_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        w = tl.load(w_rows + kk[None, :] * s_wok, mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(a[:, None, :] * w[None, :, :], axis=2)
    io_ok = b_ok[:, None] & n_ok[None, :]
    res = tl.load(H + bb[:, None].to(tl.int64) * s_hb + nn[None, :] * s_hd, mask=io_ok, other=0.0).to(tl.float32)
    # HF rounding: o_proj output to the dtype, residual add in the dtype
    r = _round(_round(acc, DTYPE) + res, DTYPE).to(DTYPE)
    if HAS_ACTIVE:
        act = tl.load(ACTIVE + bb, mask=b_ok, other=0) != 0
        r = tl.where(act[:, None], r, tl.zeros_like(r))
    tl.store(OUT + bb[:, None].to(tl.int64) * D + nn[None, :], r, mask=io_ok)


@triton.jit
def _adapter_out_norm_kernel(OUT, NORM_OUT, ACTIVE, D, eps, BLOCK: tl.constexpr, HAS_ACTIVE: tl.constexpr):
    DTYPE: tl.constexpr = OUT.dtype.element_ty
    b = tl.program_id(0).to(tl.int64)
    live = True
    if HAS_ACTIVE:
        live = tl.load(ACTIVE + b) != 0  # an inactive row stays zero (no -0.0 from a negative weight)
    row = OUT + b * D
    ss = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, D, BLOCK):
        kk = k0 + tl.arange(0, BLOCK)
        x = tl.load(row + kk, mask=kk < D, other=0.0).to(tl.float32)
        ss += x * x
    rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.div_rn(tl.sum(ss, axis=0), D * 1.0) + eps))
    for k0 in range(0, D, BLOCK):
        kk = k0 + tl.arange(0, BLOCK)
        k_ok = kk < D
        x = tl.load(row + kk, mask=k_ok, other=0.0).to(tl.float32)
        g = tl.load(NORM_OUT + kk, mask=k_ok, other=0.0).to(tl.float32)
        y = _round(_round(x * rstd, DTYPE) * g, DTYPE)
        tl.store(row + kk, y.to(DTYPE), mask=k_ok & live)


def _gemv_blocks(B: int):
    """(BLOCK_B, BLOCK_N, BLOCK_K): the [BLOCK_B, BLOCK_N, BLOCK_K] fp32 product stays at 8K elements
    (64 registers a thread at 4 warps); wide K tiles at B = 1 keep enough weight bytes in flight."""
    block_b = min(triton.next_power_of_2(max(B, 1)), 16)
    block_n = 32 if block_b <= 2 else 16  # divides every head dim (>= 32)
    block_k = max(16, min(256, 8192 // (block_b * block_n)))
    return block_b, block_n, block_k


@functools.lru_cache(maxsize=None)
def _inv_freq(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    # built on first use for this device (keep that first call outside CUDA-graph capture)
    return rope_inv_freq(head_dim, theta, device=device)[0]


def adapter_forward_triton(h, norm_in, wq, wk, wv, bq, bk, bv, wo, norm_out, k_cache, v_cache, cache_lens,
                           positions, active, rope_cos_sin, rope_theta, eps, apply_out_norm, out):
    """Launches the kernels on checked arguments (kangaroo_kernels.ops.adapter_forward._prepare); out is written."""
    from kangaroo_kernels.triton.append_attention import append_attention_triton

    B, D = h.shape
    Hk, Dh = k_cache.shape[1], k_cache.shape[3]
    NQ, NK = wq.shape[0], wk.shape[0]
    Hq = NQ // Dh
    dev, dtype = h.device, h.dtype
    block_b, block_n, block_k = _gemv_blocks(B)
    grid_b = triton.cdiv(B, block_b)

    qkv = torch.empty((B, NQ + 2 * NK), dtype=dtype, device=dev)
    make_rope = rope_cos_sin is None
    if make_rope:
        cos_sin = torch.empty((B, Dh), dtype=torch.float32, device=dev)
        rope_pos = torch.empty((B, 1), dtype=torch.int32, device=dev)
        inv_freq = _inv_freq(Dh, float(rope_theta), dev)
    else:
        cos_sin, rope_pos, inv_freq = rope_cos_sin, positions[:, None], positions
    has_bias = bq is not None
    _adapter_qkv_kernel[(triton.cdiv(NQ + 2 * NK, block_n), grid_b)](
        h, norm_in, wq, wk, wv, bq if has_bias else wq, bk if has_bias else wk, bv if has_bias else wv, qkv,
        positions, inv_freq, cos_sin, rope_pos,
        h.stride(0), h.stride(1), *wq.stride(), *wk.stride(), *wv.stride(), positions.stride(0),
        B, D, NQ, NK, eps,
        HALF=Dh // 2, BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_K=block_k, HAS_BIAS=has_bias, MAKE_ROPE=make_rope,
        num_warps=4,
    )

    q = qkv[:, :NQ].view(B, 1, Hq, Dh)
    k_new = qkv[:, NQ:NQ + NK].view(B, 1, Hk, Dh)
    v_new = qkv[:, NQ + NK:].view(B, 1, Hk, Dh)
    attn = torch.empty((B, 1, Hq, Dh), dtype=dtype, device=dev)
    append_attention_triton(q, k_new, v_new, k_cache, v_cache, cache_lens, None, active, rope_pos, cos_sin,
                            Dh ** -0.5, 0, attn)

    _adapter_out_kernel[(triton.cdiv(D, block_n), grid_b)](
        attn, wo, h, active if active is not None else cache_lens, out,
        *wo.stride(), h.stride(0), h.stride(1),
        B, D, NQ,
        BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_K=block_k, HAS_ACTIVE=active is not None, num_warps=4,
    )
    if apply_out_norm:
        _adapter_out_norm_kernel[(B,)](
            out, norm_out, active if active is not None else cache_lens, D, eps,
            BLOCK=min(1024, triton.next_power_of_2(D)), HAS_ACTIVE=active is not None, num_warps=4,
        )
    return out
