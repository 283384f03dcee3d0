"""Executable spec of verify_sample: lossless speculative sampling over a chain or a tree of drafts.

Plain PyTorch, one batch row and one visited node at a time. The native ops (C++ CPU twin, CUDA kernel)
compute exactly this, bit for bit up to the summation order of fp64 sums (see
csrc/include/kangaroo/verify_sample.cuh):

- Scaled logits z = fl32(logit * fl32(1 / T)); e = sample_exp_ref(z - max z) (a reproducible fp32 exp;
  exactly 0 more than 87 below the max); all sums in fp64.
- Filters are thresholds on z: top-k keeps z >= the k-th largest z (ties kept; k = 0 or k >= V: off); top-p
  then keeps z >= t, t the largest z whose mass sum_{z_j >= t} e_j reaches top_p times the top-k mass (ties
  kept; top_p = 1: off; reference.filters, shared with lm_head_exit). r0 = e on the kept tokens, 0 elsewhere;
  S = sum r0.
- Children of the current node (parents == node, chain: the next node; drafts of -1 or outside [0, V) are
  padding and never tried) in index order: accept child c with token x iff u[c] * q_c(x) < r(x) / n, where
  q_c = draft_probs[b, c] or one-hot(x), r = r0 and n = S at first; on rejection r <- max(0, r / n - q_c),
  n <- sum r. A zero residual (e.g. p == q) ends the node and falls back to r0.
- With no accepted child the final token is the smallest i with r_i > 0 and cumsum(r)_i > u[N] * n (the
  largest i with r_i > 0 if rounding leaves none).
- Per-row settings ([B] tensors) replace the scalars row by row; a row with temperature <= 0 is greedy: its
  target is one-hot at the first argmax of the raw row, which makes the same walk exact greedy verification
  (a child is accepted iff its token is the argmax; the final token is the argmax).
- target_is_probs: the rows are probabilities (unnormalised weights are fine) used as they are: e = p, the
  filters are thresholds on p; no exp/log round trip, so zeros stay zeros.
- A target row with a NaN or +inf, or with no finite value (probs: a negative entry or no positive one),
  emits -1 when the walk reaches it.
- Randomness: uniforms[b, j] (child j's test; j = N: the final sample), or philox_uniforms(seed, offset, N + 1),
  after which offset += N + 1 in place.
"""

from typing import Optional, Sequence

import numpy as np
import torch

from kangaroo_kernels.reference.filters import top_k_top_p_keep
from kangaroo_kernels.types import Accepted

__all__ = ["verify_sample_ref", "filtered_probs_ref", "philox_uniforms", "philox4x32_10", "sample_exp_ref"]

# float32 constants of sample_exp (exact Python floats)
_LOG2E = float.fromhex("0x1.715476p+0")
_LN2_HI = float.fromhex("0x1.63p-1")
_LN2_LO = -float.fromhex("0x1.bd0106p-13")
_TAYLOR = [float.fromhex(h) for h in ("0x1.a01a02p-13", "0x1.6c16c2p-10", "0x1.111112p-7", "0x1.555556p-5",
                                      "0x1.555556p-3")] + [0.5, 1.0, 1.0]
_ROUND = 12582912.0  # 1.5 * 2^23: (t + R) - R rounds t to the nearest integer, ties to even
_EXP_FLOOR = -87.0


def sample_exp_ref(x: torch.Tensor) -> torch.Tensor:
    """exp(x) for x <= 0 in fp32, bit-identical to kangaroo::vsample::sample_exp (0 below -87)."""
    x = x.float()
    xc = x.clamp_min(_EXP_FLOOR)
    k = (xc * _LOG2E + _ROUND) - _ROUND
    r = (xc - k * _LN2_HI) - k * _LN2_LO
    p = torch.full_like(xc, _TAYLOR[0])
    for c in _TAYLOR[1:]:
        p = p * r + c
    scale = torch.bitwise_left_shift(k.to(torch.int32) + 127, 23).view(torch.float32)
    return torch.where(x >= _EXP_FLOOR, p * scale, torch.zeros_like(p))


def _inv_temperature(temperature: float) -> float:
    return float(np.float32(1.0) / np.float32(temperature))


def _filtered_mass(row: torch.Tensor, inv_t: float, top_k: int, top_p: float, probs: bool = False,
                   greedy: bool = False) -> Optional[torch.Tensor]:
    """r0 [V] fp64 (the filtered target, unnormalised) of one target row; None for an invalid row.

    probs: the row holds probabilities (weights, used as they are: no exp, no log); greedy: one-hot at the first
    argmax of the raw row."""
    z = row.float() if (probs or greedy) else row.float() * inv_t
    m = z.max()
    if bool(torch.isnan(z).any()) or not bool(torch.isfinite(m)):
        return None
    if probs and (bool((z < 0).any()) or not bool(m > 0)):
        return None
    V = z.numel()
    if greedy:
        out = torch.zeros(V, dtype=torch.float64, device=z.device)
        out[int(torch.argmax(z))] = 1.0
        return out
    e = z.double() if probs else sample_exp_ref(z - m).double()
    if not (0 < top_k < V or top_p < 1.0):
        return e
    keep = top_k_top_p_keep(z[None], e[None], top_k, top_p)[0]
    return torch.where(keep, e, torch.zeros_like(e))


def _row_settings(B: int, V: int, temperature, top_k, top_p):
    """Per-row (inv_t, top_k, top_p, greedy) from scalars or [B] tensors, as the native ops read them: a
    temperature row <= 0 is greedy, top_k rows outside (0, V) and top_p rows >= 1 are off; tensor values are
    taken in float32 / int32."""
    def col(x, dtype):
        if isinstance(x, torch.Tensor):
            return x.detach().cpu().to(dtype).tolist()
        return [x] * B

    out = []
    for t, k, p in zip(col(temperature, torch.float32), col(top_k, torch.int32), col(top_p, torch.float32)):
        if isinstance(temperature, torch.Tensor):
            greedy = not (t > 0)
            inv_t = 1.0 if greedy else _inv_temperature(t)
        else:
            greedy, inv_t = False, _inv_temperature(t)
        k = int(k) if 0 < int(k) < V else 0
        p = float(p) if float(p) < 1.0 else 1.0
        out.append((inv_t, k, p, greedy))
    return out


def filtered_probs_ref(target_logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                       top_p: float = 1.0, *, probs: bool = False) -> torch.Tensor:
    """The filtered target distribution p (fp64, [..., V]) of every row; NaN rows give NaN.

    temperature 0: one-hot at the first argmax (a greedy row); probs: target_logits holds probabilities."""
    greedy = temperature == 0
    inv_t = 1.0 if greedy else _inv_temperature(temperature)
    rows = target_logits.reshape(-1, target_logits.shape[-1])
    out = torch.empty(rows.shape, dtype=torch.float64, device=rows.device)
    for i in range(rows.shape[0]):
        r0 = _filtered_mass(rows[i], inv_t, top_k, top_p, probs, greedy)
        out[i] = float("nan") if r0 is None else r0 / r0.sum()
    return out.reshape(target_logits.shape)


_M32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(counter: Sequence[int], key: Sequence[int]) -> tuple:
    """Philox4x32-10 of one 4-word counter and 2-word key (Random123's philox4x32 with R = 10)."""
    c = [np.array([w], dtype=np.uint64) for w in counter]
    k = [np.array([w], dtype=np.uint64) for w in key]
    return tuple(int(w[0]) for w in _philox(c, k))


def _philox(c, k):
    c0, c1, c2, c3 = c
    k0, k1 = k
    for _ in range(10):
        p0 = np.uint64(0xD2511F53) * c0
        p1 = np.uint64(0xCD9E8D57) * c2
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & _M32, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & _M32
        k0 = (k0 + np.uint64(0x9E3779B9)) & _M32
        k1 = (k1 + np.uint64(0xBB67AE85)) & _M32
    return c0, c1, c2, c3


def philox_uniforms(seed: torch.Tensor, offset: torch.Tensor, n: int) -> torch.Tensor:
    """Uniforms [B, n] fp64 in (0, 1): u[b, j] from Philox4x32-10 with key (lo32, hi32) of seed[b] and counter
    block (lo32, hi32, 0, 0) of offset[b] + j (mod 2^64); m = (x0 << 20) | (x1 >> 12), u = (m + 0.5) * 2^-52."""
    s = seed.detach().cpu().numpy().astype(np.int64).view(np.uint64)[:, None]
    o = offset.detach().cpu().numpy().astype(np.int64).view(np.uint64)[:, None]
    with np.errstate(over="ignore"):
        ctr = o + np.arange(n, dtype=np.uint64)[None, :]
        zero = np.zeros_like(ctr)
        x0, x1, _, _ = _philox((ctr & _M32, ctr >> np.uint64(32), zero, zero.copy()),
                               (s & _M32, s >> np.uint64(32)))
    m = (x0 << np.uint64(20)) | (x1 >> np.uint64(12))
    u = (m.astype(np.float64) + 0.5) * 2.0 ** -52
    return torch.from_numpy(u).to(seed.device)


def _sample_row(d, parents, logits, q, u, inv_t, top_k, top_p, probs, greedy):
    """One batch row: (path, tokens) lists."""
    N, V = len(d), logits.shape[-1]
    path, toks = [], []

    def children(v):
        for c in range(v + 1, N):
            if (parents[c] if parents is not None else c - 1) == v and 0 <= d[c] < V:
                yield c
            if parents is None:
                return

    v = -1
    while True:
        r0 = _filtered_mass(logits[v + 1], inv_t, top_k, top_p, probs, greedy)
        if r0 is None:
            toks.append(-1)
            return path, toks
        r, n = r0, r0.sum()
        acc = None
        for c in children(v):
            x = d[c]
            qc = q[c].double() if q is not None else torch.nn.functional.one_hot(
                torch.tensor(x), V).to(device=r.device, dtype=torch.float64)
            if float(u[c]) * float(qc[x]) < float(r[x] / n):
                acc = c
                break
            r = r / n - qc
            r = torch.where(r > 0, r, torch.zeros_like(r))
            n = r.sum()
            if not bool(n > 0):
                r, n = r0, r0.sum()
                break
        if acc is not None:
            path.append(acc)
            toks.append(d[acc])
            v = acc
            continue
        cs = torch.cumsum(r, 0)
        hit = torch.nonzero((r > 0) & (cs > float(u[N]) * n))
        toks.append(int(hit[0, 0]) if hit.numel() else int(torch.nonzero(r > 0)[-1, 0]))
        return path, toks


def verify_sample_ref(draft_tokens: torch.Tensor, target_logits: torch.Tensor, *,
                      draft_probs: Optional[torch.Tensor] = None, parents: Optional[torch.Tensor] = None,
                      temperature=1.0, top_k=0, top_p=1.0,
                      uniforms: Optional[torch.Tensor] = None, seed: Optional[torch.Tensor] = None,
                      offset: Optional[torch.Tensor] = None, target_is_probs: bool = False):
    """Reference of kangaroo_kernels.ops.verify_sample (same arguments; uniforms or seed/offset required).

    temperature, top_k, top_p: scalars or [B] tensors (a row with temperature <= 0 is greedy: its target is
    one-hot at the first argmax). target_is_probs: target_logits holds probabilities, used as they are.

    Returns Accepted(accept_len [B] i32, path [B, N+1] i32, tokens [B, N+1] i32), -1 padded.
    """
    B, N = draft_tokens.shape
    dev = draft_tokens.device
    if uniforms is None:
        if offset is None:
            offset = torch.zeros(B, dtype=torch.int64, device=dev)
        u = philox_uniforms(seed, offset, N + 1)
        offset += N + 1
    else:
        u = uniforms.double()
    u = u.cpu()
    settings = _row_settings(B, target_logits.shape[-1], temperature, top_k, top_p)
    accept_len = torch.zeros(B, dtype=torch.int32)
    path = torch.full((B, N + 1), -1, dtype=torch.int32)
    tokens = torch.full((B, N + 1), -1, dtype=torch.int32)
    d_all = draft_tokens.cpu().long().tolist()
    p_all = parents.cpu().long().tolist() if parents is not None else None
    for b in range(B):
        q = draft_probs[b].cpu() if draft_probs is not None else None
        pth, toks = _sample_row(d_all[b], p_all[b] if p_all is not None else None, target_logits[b].cpu(), q,
                                u[b], *settings[b][:3], target_is_probs, settings[b][3])
        accept_len[b] = len(pth)
        path[b, :len(pth)] = torch.tensor(pth, dtype=torch.int32)
        tokens[b, :len(toks)] = torch.tensor(toks, dtype=torch.int32)
    return Accepted(accept_len.to(dev), path.to(dev), tokens.to(dev))
