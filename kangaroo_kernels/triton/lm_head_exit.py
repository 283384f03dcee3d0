"""Triton lm_head_exit / lm_head_topk: (RMSNorm +) split-V LM-head GEMV with per-block statistics, then a merge.

1. _lm_head_block_kernel, grid (B groups, V blocks): a program owns BLOCK_V vocabulary rows and BLOCK_B batch rows
   (the B-group axis varies fastest, so programs sharing a weight tile run together and the tile is read from
   DRAM about once). It recomputes the rows' RMSNorm rstd from hidden (L2 hits), runs the GEMV over D in
   BLOCK_D tiles as elementwise FMAs into a [BLOCK_B, BLOCK_V, BLOCK_D] fp32 accumulator reduced once at the end
   (no tl.dot: B is tiny, and bf16 tl.dot is wrong in the interpreter), then reduces its logits in fp32:
   - the argmax as one int64 key max: key = (order-preserving int32 of the fp32 value) << 32 | (2^31 - 1 - index),
     so the larger value wins and, among equal values, the lower index (a NaN beats everything, -0.0 == +0.0);
   - s = sum(exp(logit - m)) at the block max m; sampling also the Gumbel-max key of z + g (z = logit / T, g from
     Philox4x32-10, see reference.lm_head_uniforms_ref), z at that token and sum(exp(z - m / T));
   - top-k: k rounds of key max (each selected key masked out), the block's k best keys.
   With return_probs it writes the raw z (or logits) to probs; no other [B, V] tensor is written.
2. exit: _lm_head_exit_merge_kernel, one program per row on the GPU (several in the interpreter), two passes
   over the row's block partials (max key, then the rescaled sums): token, conf = 1 / S, active_out, token_prob;
   offset += 1 when sampling. (_lm_head_probs_kernel then normalises probs in place when asked.)
   topk: _lm_head_topk_merge_kernel keeps the k best keys of every group of GROUP candidates, repeated while more
   than one group is left, then a final launch (which also sums the blocks' exp partials for the log-sum-exp)
   writes the sorted top-k: one merge launch up to 1024 candidates a row, two at V = 152064 (2376 blocks of 64,
   k = 16).
3. Sampling with top_k / top_p (any [B] filter tensor, or a scalar that cuts): the block kernel writes z = logits / T
   to probs (or a [B, V] fp32 scratch: B * V * 4 bytes, against V * D * 2 bytes of weights) instead of the Gumbel
   partials; the merge gives the unfiltered argmax and conf; _lm_head_filter_kernel (one program a row on the GPU)
   finds each threshold as an exact key by radix select over the row's scratch (8 passes, 16 candidate keys a
   pass; top-k by counts, then top-p by exp masses), then draws the Gumbel-max over the kept tokens (the same
   Philox numbers) and writes token, token_prob, offset += 1 and the filtered probs. Without filters nothing of
   this runs (the path of 1./2. unchanged).
Block sizes are GPU guesses (BLOCK_V 64 / 32 rows, no autotuning; not yet measured on a GPU); the interpreter
takes much wider blocks because it pays per program and per op.
The number of launches and every buffer size depend on shapes only: no host sync, CUDA-graph capturable.
"""

import torch
import triton
import triton.language as tl

from kangaroo_kernels.reference.lm_head_exit import STREAM_TAG
from kangaroo_kernels.triton import gpu_config
from kangaroo_kernels.triton.adapter_forward import _round

_KEY_MIN = tl.constexpr(-(2 ** 63))  # below every real key: masked vocabulary slots
_STREAM_TAG = tl.constexpr(STREAM_TAG)
_GROUP = 1024  # candidates one topk merge program reduces
_MERGE_CHUNK = 1024  # block partials the exit merge loads at a time
_PROBES = tl.constexpr(16)  # thresholds one filter pass tests: 4 bits of the 32-bit key


@triton.jit
def _key(x, idx):
    """int64 key of fp32 x and int32 idx: ordered by x (total order, NaN on top), then by lower idx."""
    x = tl.where(x == 0.0, 0.0, x)  # -0.0 -> +0.0 (torch.argmax treats them as equal)
    bits = x.to(tl.int32, bitcast=True)
    k32 = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (k32.to(tl.int64) << 32) | (2147483647 - idx).to(tl.int64)


@triton.jit
def _key_value(key):
    k32 = (key >> 32).to(tl.int32)
    return (k32 ^ ((k32 >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _key_index(key):
    return 2147483647 - (key & 0xFFFFFFFF).to(tl.int32)


@triton.jit
def _philox_uniform(seed, offset, v):
    """Uniform fp32 in (0, 1) of reference.lm_head_uniforms_ref: seed/offset int64 [BB, 1], v int32 [1, BV]."""
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c0 = (offset & 0xFFFFFFFF).to(tl.uint32) + tl.zeros_like(v).to(tl.uint32)
    c1 = ((offset >> 32) & 0xFFFFFFFF).to(tl.uint32) + tl.zeros_like(v).to(tl.uint32)
    c2 = v.to(tl.uint32) + tl.zeros_like(k0)
    c3 = tl.full(c2.shape, _STREAM_TAG, tl.uint32)
    ka = tl.full(c2.shape, 0x9E3779B9, tl.uint32)
    kb = tl.full(c2.shape, 0xBB67AE85, tl.uint32)
    ra = tl.full(c2.shape, 0xD2511F53, tl.uint32)
    rb = tl.full(c2.shape, 0xCD9E8D57, tl.uint32)
    k0 = k0 + tl.zeros_like(c2)
    k1 = k1 + tl.zeros_like(c2)
    for _ in tl.static_range(10):
        _c0 = c0
        _c2 = c2
        c0 = tl.umulhi(rb, _c2) ^ c1 ^ k0
        c2 = tl.umulhi(ra, _c0) ^ c3 ^ k1
        c1 = rb * _c2
        c3 = ra * _c0
        k0 = k0 + ka
        k1 = k1 + kb
    return ((c0 >> 9).to(tl.int32).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # 2^-23


@triton.jit
def _lm_head_block_kernel(
    H, NORM, W, SEED, OFFSET, PROBS, PART_F, PART_K, INV_T,
    s_hb, s_hd, s_wv, s_wd,
    B, V, D, NB, eps, inv_t,
    BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, HAS_NORM: tl.constexpr,
    SAMPLE: tl.constexpr, WRITE_PROBS: tl.constexpr, TOPK: tl.constexpr, PER_ROW: tl.constexpr,
    SCALE: tl.constexpr,
):
    DTYPE: tl.constexpr = H.dtype.element_ty
    pid_b = tl.program_id(0)
    pid_v = tl.program_id(1)
    bb = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = bb < B
    vv = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    v_ok = vv < V
    dd0 = tl.arange(0, BLOCK_D)
    h_row = H + bb[:, None].to(tl.int64) * s_hb
    w_row = W + vv[:, None].to(tl.int64) * s_wv

    if HAS_NORM:
        ss = tl.zeros([BLOCK_B], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + dd0
            x = tl.load(h_row + dd[None, :] * s_hd, mask=b_ok[:, None] & (dd[None, :] < D), other=0.0)
            x = x.to(tl.float32)
            ss += tl.sum(x * x, axis=1)
        rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.div_rn(ss, D * 1.0) + eps))

    acc = tl.zeros([BLOCK_B, BLOCK_V, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + dd0
        d_ok = dd < D
        x = tl.load(h_row + dd[None, :] * s_hd, mask=b_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        if HAS_NORM:
            g = tl.load(NORM + dd, mask=d_ok, other=0.0).to(tl.float32)
            # HF rounding: normalised x to the dtype, times the weight, rounded again
            x = _round(_round(x * rstd[:, None], DTYPE) * g[None, :], DTYPE)
        w = tl.load(w_row + dd[None, :] * s_wd, mask=v_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        acc += x[:, None, :] * w[None, :, :]
    logits = tl.sum(acc, axis=2)  # [BLOCK_B, BLOCK_V]

    valid = b_ok[:, None] & v_ok[None, :]
    key = tl.where(valid, _key(logits, vv[None, :]), _KEY_MIN)
    kmax = tl.max(key, axis=1)
    m = _key_value(kmax)  # the block max (NaN if the block holds one)
    s = tl.sum(tl.where(valid, tl.exp(logits - m[:, None]), 0.0), axis=1)
    part = bb.to(tl.int64) * NB + pid_v

    if TOPK > 0:
        tl.store(PART_F + part * 2, m, mask=b_ok)
        tl.store(PART_F + part * 2 + 1, s, mask=b_ok)
        kp = PART_K + part * TOPK
        for r in tl.static_range(TOPK):
            top = tl.max(key, axis=1)
            tl.store(kp + r, top, mask=b_ok)
            key = tl.where(key == top[:, None], _KEY_MIN, key)
    else:
        tl.store(PART_F + part * 4, m, mask=b_ok)
        tl.store(PART_F + part * 4 + 1, s, mask=b_ok)
        tl.store(PART_K + part * 2, kmax, mask=b_ok)
        z = logits
        if SCALE:
            if PER_ROW:  # a greedy row (0) samples with 1 here; the merge takes its argmax instead
                it = tl.load(INV_T + bb, mask=b_ok, other=1.0)
                it = tl.where(it > 0.0, it, 1.0)
            else:
                it = tl.full([BLOCK_B], inv_t, tl.float32)
            z = logits * it[:, None]
        if SAMPLE:
            seed = tl.load(SEED + bb, mask=b_ok, other=0)
            offset = tl.load(OFFSET + bb, mask=b_ok, other=0)
            u = _philox_uniform(seed[:, None], offset[:, None], vv[None, :])
            score = z - tl.log(-tl.log(u))
            skey = tl.where(valid, _key(score, vv[None, :]), _KEY_MIN)
            smax = tl.max(skey, axis=1)
            z_best = tl.max(tl.where(skey == smax[:, None], z, float("-inf")), axis=1)
            s_z = tl.sum(tl.where(valid, tl.exp(z - (m * it)[:, None]), 0.0), axis=1)
            tl.store(PART_F + part * 4 + 2, s_z, mask=b_ok)
            tl.store(PART_F + part * 4 + 3, z_best, mask=b_ok)
            tl.store(PART_K + part * 2 + 1, smax, mask=b_ok)
        if WRITE_PROBS:
            tl.store(PROBS + bb[:, None].to(tl.int64) * V + vv[None, :], z, mask=valid)


@triton.jit
def _lm_head_exit_merge_kernel(
    PART_F, PART_K, ACTIVE, OFFSET, TOKEN, CONF, ACTIVE_OUT, TOKEN_PROB, ROW_STATS, INV_T,
    B, V, NB, threshold, inv_t,
    ROWS: tl.constexpr, CHUNK: tl.constexpr, HAS_ACTIVE: tl.constexpr, SAMPLE: tl.constexpr,
    WRITE_STATS: tl.constexpr, PER_ROW: tl.constexpr,
):
    b = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    b_ok = b < B
    base = b.to(tl.int64)[:, None] * NB
    c0 = tl.arange(0, CHUNK)
    best = tl.full([ROWS, CHUNK], _KEY_MIN, tl.int64)
    sbest = tl.full([ROWS, CHUNK], _KEY_MIN, tl.int64)
    for n0 in range(0, NB, CHUNK):
        n = n0 + c0[None, :]
        ok = b_ok[:, None] & (n < NB)
        best = tl.maximum(best, tl.load(PART_K + (base + n) * 2, mask=ok, other=_KEY_MIN))
        if SAMPLE:
            sbest = tl.maximum(sbest, tl.load(PART_K + (base + n) * 2 + 1, mask=ok, other=_KEY_MIN))
    kmax = tl.max(best, axis=1)
    M = _key_value(kmax)
    S = tl.zeros([ROWS, CHUNK], dtype=tl.float32)
    if SAMPLE:
        smax = tl.max(sbest, axis=1)
        if PER_ROW:
            it_raw = tl.load(INV_T + b, mask=b_ok, other=1.0)
            greedy = ~(it_raw > 0.0)
            it = tl.where(greedy, 1.0, it_raw)
        else:
            it = tl.full([ROWS], inv_t, tl.float32)
        Mz = M * it
        Sz = tl.zeros([ROWS, CHUNK], dtype=tl.float32)
        z_tok = tl.full([ROWS, CHUNK], float("-inf"), tl.float32)
    for n0 in range(0, NB, CHUNK):
        n = n0 + c0[None, :]
        ok = b_ok[:, None] & (n < NB)
        p = PART_F + (base + n) * 4
        m = tl.load(p, mask=ok, other=float("-inf"))
        s = tl.load(p + 1, mask=ok, other=0.0)
        S += tl.where(ok, s * tl.exp(m - M[:, None]), 0.0)
        if SAMPLE:
            Sz += tl.where(ok, tl.load(p + 2, mask=ok, other=0.0) * tl.exp(m * it[:, None] - Mz[:, None]), 0.0)
            sk = tl.load(PART_K + (base + n) * 2 + 1, mask=ok, other=_KEY_MIN)
            z_tok = tl.maximum(z_tok, tl.where(ok & (sk == smax[:, None]), tl.load(p + 3, mask=ok, other=0.0),
                                               float("-inf")))
    S_tot = tl.where(b_ok, tl.sum(S, axis=1), 1.0)
    conf = 1.0 / S_tot
    act = conf >= threshold
    if HAS_ACTIVE:
        act = act & (tl.load(ACTIVE + b, mask=b_ok, other=0) != 0)
    if SAMPLE:
        Sz_tot = tl.where(b_ok, tl.sum(Sz, axis=1), 1.0)
        tok = _key_index(smax)
        tok_prob = tl.exp(tl.max(z_tok, axis=1) - Mz) / Sz_tot
        if PER_ROW:
            tok = tl.where(greedy, _key_index(kmax), tok)
            tok_prob = tl.where(greedy, conf, tok_prob)
        tl.store(OFFSET + b, tl.load(OFFSET + b, mask=b_ok, other=0) + 1, mask=b_ok)
        stat_m = Mz
        stat_s = Sz_tot
    else:
        tok = _key_index(kmax)
        tok_prob = conf
        stat_m = M
        stat_s = S_tot
    tok = tl.minimum(tl.maximum(tok, 0), V - 1)
    tl.store(TOKEN + b, tok, mask=b_ok)
    tl.store(CONF + b, conf, mask=b_ok)
    tl.store(ACTIVE_OUT + b, act, mask=b_ok)
    tl.store(TOKEN_PROB + b, tok_prob, mask=b_ok)
    if WRITE_STATS:
        tl.store(ROW_STATS + b * 2, stat_m, mask=b_ok)
        tl.store(ROW_STATS + b * 2 + 1, stat_s, mask=b_ok)


@triton.jit
def _lm_head_probs_kernel(PROBS, ROW_STATS, V, BLOCK: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    v = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = v < V
    m = tl.load(ROW_STATS + b * 2)
    s = tl.load(ROW_STATS + b * 2 + 1)
    p = PROBS + b * V + v
    z = tl.load(p, mask=ok, other=0.0)
    tl.store(p, tl.exp(z - m) / s, mask=ok)


@triton.jit
def _lm_head_topk_merge_kernel(
    IN_K, OUT_K, PART_F, TOKENS, LOGPROBS,
    n_in, NB,
    K: tl.constexpr, GROUP: tl.constexpr, FINAL: tl.constexpr,
):
    g = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    i = g * GROUP + tl.arange(0, GROUP)
    key = tl.load(IN_K + b * n_in + i, mask=i < n_in, other=_KEY_MIN)
    if FINAL:
        top = tl.max(key, axis=0)
        M = _key_value(top)
        c0 = tl.arange(0, GROUP)
        S = tl.zeros([GROUP], dtype=tl.float32)
        for n0 in range(0, NB, GROUP):
            n = n0 + c0
            ok = n < NB
            p = PART_F + (b * NB + n) * 2
            m = tl.load(p, mask=ok, other=float("-inf"))
            s = tl.load(p + 1, mask=ok, other=0.0)
            S += tl.where(ok, s * tl.exp(m - M), 0.0)
        lse = M + tl.log(tl.sum(S, axis=0))
        for r in tl.static_range(K):
            top = tl.max(key, axis=0)
            tl.store(TOKENS + b * K + r, _key_index(top))
            tl.store(LOGPROBS + b * K + r, _key_value(top) - lse)
            key = tl.where(key == top, _KEY_MIN, key)
    else:
        n_out = tl.num_programs(0) * K
        for r in tl.static_range(K):
            top = tl.max(key, axis=0)
            tl.store(OUT_K + b * n_out + g * K + r, top)
            key = tl.where(key == top, _KEY_MIN, key)


@triton.jit
def _key32(x):
    """The high word of _key as an int64: order-preserving int32 of fp32 x (-0.0 == +0.0, NaN above +inf)."""
    x = tl.where(x == 0.0, 0.0, x)
    bits = x.to(tl.int32, bitcast=True)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64)


@triton.jit
def _radix_threshold(ZROW, OK_B, V, base, goal, Mz, c0,
                     ROWS: tl.constexpr, CHUNK: tl.constexpr, MASS: tl.constexpr):
    """The largest key t >= base with F(t) >= goal, per row, for the non-increasing F(t) = #{key >= t} (MASS
    False) or sum_{key >= t} exp(z - Mz) (MASS True, and F(t) > 0), given F(base) >= goal: 8 passes over the row,
    each testing 16 candidates (4 bits of the 32-bit key offset from base)."""
    j = tl.arange(0, _PROBES)
    for s in range(8):  # not unrolled: the pass is long, the code would be 8 times larger
        step = (j.to(tl.int64) << (28 - 4 * s))[None, :]
        probe = base[:, None] + step  # [ROWS, 16]
        acc = tl.zeros([ROWS, _PROBES, CHUNK], dtype=tl.float32)  # reduced once a pass, not once a chunk
        for v0 in range(0, V, CHUNK):
            v = v0 + c0
            ok = OK_B[:, None] & (v < V)
            z = tl.load(ZROW + v, mask=ok, other=float("-inf"))
            ge = ok[:, None, :] & (_key32(z)[:, None, :] >= probe[:, :, None])
            if MASS:
                e = tl.exp(z - Mz[:, None])
                acc += tl.where(ge, e[:, None, :], 0.0)
            else:
                acc += ge.to(tl.float32)  # counts exact in fp32 for V <= 2^24
        f = tl.sum(acc, axis=2)
        valid = f >= goal[:, None]
        if MASS:
            valid = valid & (f > 0.0)
        base = base + tl.max(tl.where(valid, step, 0), axis=1)
    return base


@triton.jit
def _lm_head_filter_kernel(
    Z, SEED, OFFSET, INV_T, TOPK_ROWS, TOPP_ROWS, TOKEN, TOKEN_PROB,
    B, V, top_k, top_p,
    ROWS: tl.constexpr, CHUNK: tl.constexpr, PER_ROW: tl.constexpr, K_ROWS: tl.constexpr, P_ROWS: tl.constexpr,
    WRITE_PROBS: tl.constexpr,
):
    """Top-k / top-p sampling of ROWS rows from their z = logits / T in Z [B, V] (written by the block kernel):
    the thresholds by _radix_threshold on the keys of z, then the Gumbel-max over the kept tokens with the same
    Philox numbers as the unfiltered path, token_prob of the filtered softmax, offset += 1, and (WRITE_PROBS) the
    filtered probabilities in place of z. Greedy rows (PER_ROW, 1 / T = 0) keep the merge's argmax and conf and
    get softmax(logits)."""
    b = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    b_ok = b < B
    zrow = Z + b.to(tl.int64)[:, None] * V
    c0 = tl.arange(0, CHUNK)[None, :]
    if PER_ROW:
        greedy = ~(tl.load(INV_T + b, mask=b_ok, other=1.0) > 0.0)
    else:
        greedy = b < 0
    if K_ROWS:
        k = tl.load(TOPK_ROWS + b, mask=b_ok, other=0)
    else:
        k = tl.zeros([ROWS], dtype=tl.int32) + top_k
    if P_ROWS:
        p = tl.load(TOPP_ROWS + b, mask=b_ok, other=1.0)
    else:
        p = tl.zeros([ROWS], dtype=tl.float32) + top_p
    k_on = b_ok & ~greedy & (k > 0) & (k < V)
    p_on = b_ok & ~greedy & (p < 1.0)

    mx = tl.full([ROWS, CHUNK], float("-inf"), tl.float32)
    for v0 in range(0, V, CHUNK):
        v = v0 + c0
        mx = tl.maximum(mx, tl.load(zrow + v, mask=b_ok[:, None] & (v < V), other=float("-inf")))
    Mz = tl.where(b_ok, tl.max(mx, axis=1), 0.0)

    lowest = tl.zeros([ROWS], dtype=tl.int64) - 2147483648  # below every key: keep all
    thr = lowest
    if tl.max(k_on.to(tl.int32), axis=0) > 0:
        t_k = _radix_threshold(zrow, b_ok, V, lowest, k.to(tl.float32), Mz, c0, ROWS, CHUNK, False)
        thr = tl.where(k_on, t_k, lowest)
    if tl.max(p_on.to(tl.int32), axis=0) > 0:
        sk = tl.zeros([ROWS, CHUNK], dtype=tl.float32)
        for v0 in range(0, V, CHUNK):
            v = v0 + c0
            ok = b_ok[:, None] & (v < V)
            z = tl.load(zrow + v, mask=ok, other=float("-inf"))
            sk += tl.where(ok & (_key32(z) >= thr[:, None]), tl.exp(z - Mz[:, None]), 0.0)
        goal = p * tl.sum(sk, axis=1)
        t_p = _radix_threshold(zrow, b_ok, V, thr, goal, Mz, c0, ROWS, CHUNK, True)
        thr = tl.where(p_on, t_p, thr)

    seed = tl.load(SEED + b, mask=b_ok, other=0)
    offset = tl.load(OFFSET + b, mask=b_ok, other=0)
    best = tl.full([ROWS, CHUNK], _KEY_MIN, tl.int64)
    sz = tl.zeros([ROWS, CHUNK], dtype=tl.float32)
    for v0 in range(0, V, CHUNK):
        v = v0 + c0
        ok = b_ok[:, None] & (v < V)
        z = tl.load(zrow + v, mask=ok, other=float("-inf"))
        keep = ok & (_key32(z) >= thr[:, None])
        u = _philox_uniform(seed[:, None], offset[:, None], v)
        best = tl.maximum(best, tl.where(keep, _key(z - tl.log(-tl.log(u)), v), _KEY_MIN))
        sz += tl.where(keep, tl.exp(z - Mz[:, None]), 0.0)
    tok = tl.minimum(tl.maximum(_key_index(tl.max(best, axis=1)), 0), V - 1)
    S = tl.where(b_ok, tl.sum(sz, axis=1), 1.0)
    z_tok = tl.load(Z + b.to(tl.int64) * V + tok, mask=b_ok, other=0.0)
    sampled = b_ok & ~greedy
    tl.store(TOKEN + b, tok, mask=sampled)
    tl.store(TOKEN_PROB + b, tl.exp(z_tok - Mz) / S, mask=sampled)
    tl.store(OFFSET + b, offset + 1, mask=b_ok)
    if WRITE_PROBS:
        for v0 in range(0, V, CHUNK):
            v = v0 + c0
            ok = b_ok[:, None] & (v < V)
            z = tl.load(zrow + v, mask=ok, other=float("-inf"))
            keep = _key32(z) >= thr[:, None]
            tl.store(zrow + v, tl.where(keep, tl.exp(z - Mz[:, None]) / S[:, None], 0.0), mask=ok)


def _blocks(B: int, V: int, D: int, device: torch.device):
    """(BLOCK_B, BLOCK_V, BLOCK_D, num_warps). GPU: the fp32 accumulator stays at 8K elements (64 registers a
    thread at 4 warps) or 16K at 8 warps; B = 1 takes 64 vocabulary rows x 128 columns (16 KB of bf16 weights a
    program per D step, 128-bit loads; 500 programs at V = 32000). The interpreter takes wide blocks: its cost is
    per op, not per element."""
    if not gpu_config(device):
        block_b = min(triton.next_power_of_2(max(B, 1)), 64)
        block_v = min(2048, triton.next_power_of_2(V), 2 ** 14 // block_b)
        block_d = min(triton.next_power_of_2(D), max(16, 2 ** 18 // (block_b * block_v)))
        return block_b, block_v, block_d, 4
    block_b = min(triton.next_power_of_2(max(B, 1)), 8)
    if block_b == 1:
        return 1, 64, 128, 4
    if block_b == 2:
        return 2, 64, 64, 4
    if block_b == 4:
        return 4, 32, 128, 8
    return 8, 32, 64, 8


def _merge_rows(B: int, chunk: int, device: torch.device) -> int:
    """Rows per exit-merge program. GPU: one (B is small, a row's merge is short); the interpreter pays per
    program, so it takes up to 4096 partials at a time."""
    if gpu_config(device):
        return 1
    return min(triton.next_power_of_2(B), max(1, 4096 // chunk))


def _filter_blocks(B: int, V: int, device: torch.device):
    """(ROWS, CHUNK) of the filter kernel. GPU: one row a program (8 warps), 512 vocabulary entries at a time (a
    [16, 512] candidate test a step, accumulated in registers); the interpreter takes up to 4096 entries of several
    rows at a time. Not yet measured on a GPU."""
    if gpu_config(device):
        return 1, min(512, triton.next_power_of_2(V))
    chunk = min(4096, triton.next_power_of_2(V))
    return min(triton.next_power_of_2(B), max(1, 4096 // chunk)), chunk


def lm_head_exit_triton(hidden, weight, norm_weight, active, seed, offset, threshold, eps, inv_t, token, conf,
                        active_out, token_prob, probs, inv_t_rows=None, top_k=0, top_p=1.0, top_k_rows=None,
                        top_p_rows=None):
    """Launches the kernels on checked arguments (kangaroo_kernels.ops.lm_head_exit._prepare_exit); outputs written,
    offset advanced by 1 when sampling (inv_t > 0). inv_t_rows [B] f32: per-row fl32(1 / T) (0: a greedy row).
    top_k in [0, V) / top_p (0 / 1: off) or their [B] rows (int32 / float32) filter the sampled rows: the block
    kernel then writes z = logits / T to probs (or a [B, V] fp32 scratch) instead of the Gumbel partials, the merge
    takes the unfiltered conf and argmax, and _lm_head_filter_kernel samples (one launch more, shapes only)."""
    B, D = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    block_b, block_v, block_d, warps = _blocks(B, V, D, dev)
    NB = triton.cdiv(V, block_v)
    sample = inv_t > 0.0
    per_row = sample and inv_t_rows is not None
    filt = sample and (top_k_rows is not None or top_p_rows is not None or 0 < top_k < V or top_p < 1.0)
    gumbel = sample and not filt
    part_f = torch.empty((B, NB, 4), dtype=torch.float32, device=dev)
    part_k = torch.empty((B, NB, 2), dtype=torch.int64, device=dev)
    write_probs = probs is not None
    z_buf = probs if write_probs else (torch.empty((B, V), dtype=torch.float32, device=dev) if filt else part_f)
    _lm_head_block_kernel[(triton.cdiv(B, block_b), NB)](
        hidden, norm_weight if norm_weight is not None else hidden, weight,
        seed if sample else part_k, offset if sample else part_k, z_buf,
        part_f, part_k, inv_t_rows if per_row else part_f,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        B, V, D, NB, eps, inv_t,
        BLOCK_B=block_b, BLOCK_V=block_v, BLOCK_D=block_d, HAS_NORM=norm_weight is not None, SAMPLE=gumbel,
        WRITE_PROBS=write_probs or filt, TOPK=0, PER_ROW=per_row, SCALE=sample, num_warps=warps,
    )
    write_stats = write_probs and not filt
    stats = torch.empty((B, 2), dtype=torch.float32, device=dev) if write_stats else part_f
    chunk = min(_MERGE_CHUNK, triton.next_power_of_2(NB))
    rows = _merge_rows(B, chunk, dev)
    _lm_head_exit_merge_kernel[(triton.cdiv(B, rows),)](
        part_f, part_k, active if active is not None else part_k, offset if gumbel else part_k,
        token, conf, active_out, token_prob, stats, inv_t_rows if per_row else part_f,
        B, V, NB, threshold, inv_t,
        ROWS=rows, CHUNK=chunk, HAS_ACTIVE=active is not None, SAMPLE=gumbel, WRITE_STATS=write_stats,
        PER_ROW=per_row, num_warps=4,
    )
    if filt:
        f_rows, f_chunk = _filter_blocks(B, V, dev)
        _lm_head_filter_kernel[(triton.cdiv(B, f_rows),)](
            z_buf, seed, offset, inv_t_rows if per_row else part_f,
            top_k_rows if top_k_rows is not None else part_f, top_p_rows if top_p_rows is not None else part_f,
            token, token_prob, B, V, int(top_k), float(top_p),
            ROWS=f_rows, CHUNK=f_chunk, PER_ROW=per_row, K_ROWS=top_k_rows is not None,
            P_ROWS=top_p_rows is not None, WRITE_PROBS=write_probs, num_warps=8 if gpu_config(dev) else 4,
        )
    elif write_probs:
        block = min(1024 if gpu_config(dev) else 4096, triton.next_power_of_2(V))
        _lm_head_probs_kernel[(triton.cdiv(V, block), B)](probs, stats, V, BLOCK=block, num_warps=4)


def lm_head_topk_triton(hidden, weight, norm_weight, k, eps, tokens, logprobs):
    """Launches the kernels on checked arguments (kangaroo_kernels.ops.lm_head_exit._prepare_topk); outputs written."""
    B, D = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    block_b, block_v, block_d, warps = _blocks(B, V, D, dev)
    NB = triton.cdiv(V, block_v)
    part_f = torch.empty((B, NB, 2), dtype=torch.float32, device=dev)
    keys = torch.empty((B, NB * k), dtype=torch.int64, device=dev)
    _lm_head_block_kernel[(triton.cdiv(B, block_b), NB)](
        hidden, norm_weight if norm_weight is not None else hidden, weight, keys, keys, part_f, part_f, keys, part_f,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        B, V, D, NB, eps, 0.0,
        BLOCK_B=block_b, BLOCK_V=block_v, BLOCK_D=block_d, HAS_NORM=norm_weight is not None, SAMPLE=False,
        WRITE_PROBS=False, TOPK=k, PER_ROW=False, SCALE=False, num_warps=warps,
    )
    n = NB * k
    while n > _GROUP:
        groups = triton.cdiv(n, _GROUP)
        nxt = torch.empty((B, groups * k), dtype=torch.int64, device=dev)
        _lm_head_topk_merge_kernel[(groups, B)](keys, nxt, part_f, tokens, logprobs, n, NB, K=k, GROUP=_GROUP,
                                                FINAL=False, num_warps=4)
        keys, n = nxt, groups * k
    _lm_head_topk_merge_kernel[(1, B)](keys, keys, part_f, tokens, logprobs, n, NB, K=k,
                                       GROUP=max(16, triton.next_power_of_2(n)), FINAL=True, num_warps=4)
