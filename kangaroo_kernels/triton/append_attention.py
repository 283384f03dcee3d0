"""Triton append_attention: KV append + split-KV (flash-decoding) attention, then a split merge.

Grid of the main kernel: (B * Hk, query blocks, splits). A program owns one KV head and a block of query rows
r = t * G + g (token t, query head kh * G + g): every K/V tile it loads serves all G query heads sharing it.
Split s covers one contiguous chunk of the prefix [0, cache_len); the last split also covers the new block,
whose K/V come from k_new/v_new (rotated, rounded to the cache dtype) and are written to the cache by the
query block 0 program of that split. Programs read the prefix only and write only [cache_len, cache_len + T),
so no program reads what another writes. With one split the kernel writes out directly; otherwise it writes
fp32 partials (running max m, sum l, unnormalised acc) that the merge kernel combines.
Head dims that are not powers of two (80, 96, 112, ...) run padded: each half of the head to the next power of two
(at least 16, tl.dot's minimum), the padding lanes masked to zero.
Dots run on fp32 operands (tf32 for 16-bit inputs, which convert exactly; IEEE for fp32 inputs): bf16 tl.dot is
wrong in the interpreter, and decode is bound by KV bandwidth, not by the dots.
"""

import torch
import triton
import triton.language as tl

from kangaroo_kernels.triton import num_sms

_LOG2E = 1.4426950408889634


@triton.jit
def _attend_tile(q1, q2, k1, k2, v, valid, m_i, l_i, acc, DOT_PRECISION: tl.constexpr):
    s = tl.dot(q1, tl.trans(k1), input_precision=DOT_PRECISION)
    s += tl.dot(q2, tl.trans(k2), input_precision=DOT_PRECISION)
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _rope(x1, x2, cos, sin, DTYPE: tl.constexpr):
    r1 = x1 * cos - x2 * sin
    r2 = x2 * cos + x1 * sin
    return r1.to(DTYPE).to(tl.float32), r2.to(DTYPE).to(tl.float32)


@triton.jit
def _append_attention_kernel(
    Q, K_NEW, V_NEW, K_CACHE, V_CACHE, CACHE_LENS, TREE_MASK, ACTIVE, POSITIONS, COS_SIN, OUT, PART_M, PART_L,
    PART_ACC,
    s_qb, s_qt, s_qh, s_qd,
    s_knb, s_knt, s_knh, s_knd,
    s_vnb, s_vnt, s_vnh, s_vnd,
    s_kcb, s_kch, s_kcs, s_kcd,
    s_vcb, s_vch, s_vcs, s_vcd,
    s_tmb, s_tmt, s_tmw,
    s_pb, s_pt,
    s_cs,
    T, S, HQ, HK, G, MAX_POS, NUM_SPLITS, qk_scale,
    HALF: tl.constexpr, HALF_P: tl.constexpr, DH_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    TREE: tl.constexpr, HAS_ACTIVE: tl.constexpr, ROPE: tl.constexpr, HAS_POSITIONS: tl.constexpr,
    SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    DH: tl.constexpr = 2 * HALF
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
    b = (pid_bh // HK).to(tl.int64)
    kh = pid_bh % HK

    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = r < G * T
    t = r // G
    h = kh * G + r % G
    # head dims that are not powers of two are padded to HALF_P / DH_P lanes, masked (zeros in every dot)
    d = tl.arange(0, HALF_P)
    d_ok = d < HALF
    dv = tl.arange(0, DH_P)
    dv_ok = dv < DH

    cache_len = tl.load(CACHE_LENS + b).to(tl.int32)
    prefix_len = tl.minimum(tl.maximum(cache_len, 0), S)
    n_new = T
    if HAS_ACTIVE:
        act = tl.load(ACTIVE + b) != 0
        prefix_len = tl.where(act, prefix_len, 0)
        n_new = tl.where(act, T, 0)

    q_off = b * s_qb + t[:, None].to(tl.int64) * s_qt + h[:, None].to(tl.int64) * s_qh
    q_ok = row_ok[:, None] & d_ok[None, :]
    q1 = tl.load(Q + q_off + d[None, :] * s_qd, mask=q_ok, other=0.0).to(tl.float32)
    q2 = tl.load(Q + q_off + (d[None, :] + HALF) * s_qd, mask=q_ok, other=0.0).to(tl.float32)
    if ROPE:
        if HAS_POSITIONS:
            pos_q = tl.load(POSITIONS + b * s_pb + t * s_pt, mask=row_ok, other=0).to(tl.int32)
        else:
            pos_q = cache_len + t
        pos_q = tl.minimum(tl.maximum(pos_q, 0), MAX_POS - 1).to(tl.int64)
        cos_q = tl.load(COS_SIN + pos_q[:, None] * s_cs + d[None, :], mask=d_ok[None, :], other=0.0)
        sin_q = tl.load(COS_SIN + pos_q[:, None] * s_cs + HALF + d[None, :], mask=d_ok[None, :], other=0.0)
        q1, q2 = _rope(q1, q2, cos_q, sin_q, Q.dtype.element_ty)
    # softmax in base 2: fold log2(e) into the scale
    q1 = q1 * qk_scale
    q2 = q2 * qk_scale

    # a finite start keeps exp2(m_i - m_new) a number when a whole tile is masked
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DH_P], dtype=tl.float32)

    # prefix chunk of this split (BLOCK_N-aligned)
    chunk = tl.cdiv(tl.cdiv(prefix_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, prefix_len)
    kc_base = K_CACHE + b * s_kcb + kh.to(tl.int64) * s_kch
    vc_base = V_CACHE + b * s_vcb + kh.to(tl.int64) * s_vch
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < hi
        k_ptr = kc_base + n[:, None].to(tl.int64) * s_kcs
        k_ok = n_ok[:, None] & d_ok[None, :]
        k1 = tl.load(k_ptr + d[None, :] * s_kcd, mask=k_ok, other=0.0).to(tl.float32)
        k2 = tl.load(k_ptr + (d[None, :] + HALF) * s_kcd, mask=k_ok, other=0.0).to(tl.float32)
        v = tl.load(vc_base + n[:, None].to(tl.int64) * s_vcs + dv[None, :] * s_vcd,
                    mask=n_ok[:, None] & dv_ok[None, :], other=0.0).to(tl.float32)
        m_i, l_i, acc = _attend_tile(q1, q2, k1, k2, v, n_ok[None, :], m_i, l_i, acc, DOT_PRECISION)

    # the new block: last split only; query block 0 also appends it to the cache
    new_hi = tl.where(split == NUM_SPLITS - 1, n_new, 0)
    writer = pid_m == 0
    kn_base = K_NEW + b * s_knb + kh.to(tl.int64) * s_knh
    vn_base = V_NEW + b * s_vnb + kh.to(tl.int64) * s_vnh
    for start in range(0, new_hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        j_ok = j < new_hi
        k_ptr = kn_base + j[:, None].to(tl.int64) * s_knt
        kj_ok = j_ok[:, None] & d_ok[None, :]
        k1 = tl.load(k_ptr + d[None, :] * s_knd, mask=kj_ok, other=0.0).to(tl.float32)
        k2 = tl.load(k_ptr + (d[None, :] + HALF) * s_knd, mask=kj_ok, other=0.0).to(tl.float32)
        v = tl.load(vn_base + j[:, None].to(tl.int64) * s_vnt + dv[None, :] * s_vnd,
                    mask=j_ok[:, None] & dv_ok[None, :], other=0.0)
        if ROPE:
            if HAS_POSITIONS:
                pos_k = tl.load(POSITIONS + b * s_pb + j * s_pt, mask=j_ok, other=0).to(tl.int32)
            else:
                pos_k = cache_len + j
            pos_k = tl.minimum(tl.maximum(pos_k, 0), MAX_POS - 1).to(tl.int64)
            cos_k = tl.load(COS_SIN + pos_k[:, None] * s_cs + d[None, :], mask=d_ok[None, :], other=0.0)
            sin_k = tl.load(COS_SIN + pos_k[:, None] * s_cs + HALF + d[None, :], mask=d_ok[None, :], other=0.0)
            k1, k2 = _rope(k1, k2, cos_k, sin_k, K_CACHE.dtype.element_ty)
        dst = cache_len + j
        w_ok = j_ok & writer & (dst >= 0) & (dst < S)
        dst = tl.where(w_ok, dst, 0).to(tl.int64)
        kc_ptr = kc_base + dst[:, None] * s_kcs
        wk_ok = w_ok[:, None] & d_ok[None, :]
        tl.store(kc_ptr + d[None, :] * s_kcd, k1.to(K_CACHE.dtype.element_ty), mask=wk_ok)
        tl.store(kc_ptr + (d[None, :] + HALF) * s_kcd, k2.to(K_CACHE.dtype.element_ty), mask=wk_ok)
        tl.store(vc_base + dst[:, None] * s_vcs + dv[None, :] * s_vcd, v.to(V_CACHE.dtype.element_ty),
                 mask=w_ok[:, None] & dv_ok[None, :])
        if TREE:
            word = tl.load(TREE_MASK + b * s_tmb + t[:, None].to(tl.int64) * s_tmt + (j[None, :] // 32) * s_tmw,
                           mask=row_ok[:, None] & j_ok[None, :], other=0)
            visible = ((word >> (j[None, :] % 32)) & 1) != 0
        else:
            visible = j[None, :] <= t[:, None]
        visible = visible & j_ok[None, :]
        m_i, l_i, acc = _attend_tile(q1, q2, k1, k2, v.to(tl.float32), visible, m_i, l_i, acc, DOT_PRECISION)

    # rows in [B, T, HQ] order; out is contiguous [B, T, HQ, DH]
    row = (b * T + t.to(tl.int64)) * HQ + h
    if SPLIT:
        part = row * NUM_SPLITS + split
        tl.store(PART_M + part, m_i, mask=row_ok)
        tl.store(PART_L + part, l_i, mask=row_ok)
        tl.store(PART_ACC + part[:, None] * DH + dv[None, :], acc, mask=row_ok[:, None] & dv_ok[None, :])
    else:
        o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        tl.store(OUT + row[:, None] * DH + dv[None, :], o.to(OUT.dtype.element_ty),
                 mask=row_ok[:, None] & dv_ok[None, :])


@triton.jit
def _append_attention_merge_kernel(PART_M, PART_L, PART_ACC, OUT, NUM_SPLITS, DH: tl.constexpr, DH_P: tl.constexpr,
                                   SPLITS_P2: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, SPLITS_P2)
    s_ok = s < NUM_SPLITS
    part = row * NUM_SPLITS + s
    m = tl.load(PART_M + part, mask=s_ok, other=float("-inf"))
    l = tl.load(PART_L + part, mask=s_ok, other=0.0)
    w = tl.exp2(m - tl.max(m, axis=0))
    l_tot = tl.sum(l * w, axis=0)
    d = tl.arange(0, DH_P)
    d_ok = d < DH
    acc = tl.load(PART_ACC + part[:, None] * DH + d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    o = tl.sum(acc * w[:, None], axis=0) / tl.where(l_tot > 0.0, l_tot, 1.0)
    tl.store(OUT + row * DH + d, o.to(OUT.dtype.element_ty), mask=d_ok)


def _blocks(rows: int, Dh: int):
    """(BLOCK_M, BLOCK_N). tl.dot needs M >= 16. With fp32 tiles and num_stages=2 these stay under ~160 KB of
    shared memory (A100) for every dtype (checked by compiling for sm_80/sm_90); decode at Dh = 128 (rows <= 16)
    gets the widest KV tile."""
    block_m = max(16, min(64 if Dh <= 128 else 16, triton.next_power_of_2(rows)))
    block_n = 64 if Dh <= 64 or (Dh == 128 and block_m == 16) else 32
    return block_m, block_n


def default_num_splits(B: int, Hk: int, rows: int, Dh: int, S: int, device: torch.device) -> int:
    """Splits of the prefix so that about two waves of programs fill the GPU; at least 128 keys per split.

    Depends only on shapes (S is the longest possible prefix), never on cache_lens values: no host sync.
    """
    programs = B * Hk * triton.cdiv(rows, _blocks(rows, Dh)[0])
    sms = num_sms(device)
    want = triton.cdiv(2 * sms, programs)
    return max(1, min(want, triton.cdiv(S, 128), 64))


def append_attention_triton(q, k_new, v_new, k_cache, v_cache, cache_lens, tree_mask, active, positions,
                            rope_cos_sin, sm_scale, num_splits, out):
    """Launches the kernels on checked arguments (kangaroo_kernels.ops.append_attention._prepare); out is written."""
    B, T, Hq, Dh = q.shape
    Hk, S = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hk
    rows = G * T
    half_p = max(16, triton.next_power_of_2(Dh // 2))  # tl.dot takes K >= 16
    dh_p = 2 * half_p
    if num_splits <= 0:
        num_splits = default_num_splits(B, Hk, rows, dh_p, S, q.device)
    BLOCK_M, BLOCK_N = _blocks(rows, dh_p)
    if dh_p != Dh and dh_p >= 128:  # the padding masks cost registers: the narrower KV tile (no spill on sm_90)
        BLOCK_N = min(BLOCK_N, 32)
    split = num_splits > 1
    if split:
        part_m = torch.empty((B * T * Hq * num_splits,), dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty((B * T * Hq * num_splits, Dh), dtype=torch.float32, device=q.device)
    else:
        part_m = part_l = part_acc = out
    tm = tree_mask if tree_mask is not None else cache_lens
    tm_strides = tree_mask.stride() if tree_mask is not None else (0, 0, 0)
    act = active if active is not None else cache_lens
    pos = positions if positions is not None else cache_lens
    pos_strides = positions.stride() if positions is not None else (0, 0)
    cs = rope_cos_sin if rope_cos_sin is not None else q
    max_pos = rope_cos_sin.shape[0] if rope_cos_sin is not None else 1
    s_cs = rope_cos_sin.stride(0) if rope_cos_sin is not None else 0
    if rope_cos_sin is not None and rope_cos_sin.stride(1) != 1:
        cs = rope_cos_sin.contiguous()
        s_cs = cs.stride(0)
    grid = (B * Hk, triton.cdiv(rows, BLOCK_M), num_splits)
    _append_attention_kernel[grid](
        q, k_new, v_new, k_cache, v_cache, cache_lens, tm, act, pos, cs, out, part_m, part_l, part_acc,
        *q.stride(), *k_new.stride(), *v_new.stride(), *k_cache.stride(), *v_cache.stride(),
        *tm_strides, *pos_strides, s_cs,
        T, S, Hq, Hk, G, max_pos, num_splits, sm_scale * _LOG2E,
        HALF=Dh // 2, HALF_P=half_p, DH_P=dh_p, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        TREE=tree_mask is not None, HAS_ACTIVE=active is not None, ROPE=rope_cos_sin is not None,
        HAS_POSITIONS=positions is not None, SPLIT=split,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=8 if dh_p >= 128 else 4,  # fp32 K/V tiles: spread them over more registers
        num_stages=2,
    )
    if split:
        _append_attention_merge_kernel[(B * T * Hq,)](
            part_m, part_l, part_acc, out, num_splits, DH=Dh, DH_P=dh_p, SPLITS_P2=triton.next_power_of_2(num_splits),
            num_warps=4 if dh_p >= 128 else 2,
        )
