"""Executable spec of ngram_lookup: the tokens that followed the most recent earlier occurrence of the longest
suffix of each row's committed sequence (the hybrid drafter's lookup branch).

Row b's committed sequence is h = history[b, :L] with L = lens[b] (lens outside [0, S] clamped to that range).
An end position e in [0, L-2] has match length m(e) = the largest m <= min(n_max, e + 1) with
h[e-m+1 .. e] == h[L-m .. L-1] (compared as stored, i.e. as int64 for int64 history). Among the e with
m(e) >= n_min, the answer is the one with the largest m(e), then the largest e (the most recent occurrence of the
longest suffix of length n in [n_min, n_max]; occurrences may overlap the suffix itself). Its continuation is
h[e+1 .. min(e+M, L-1)] (never past L; it may run into the suffix), cut before its first value outside
[0, 2^31). n[b] = the number of continuation tokens, tokens[b, :n[b]] = those tokens, everything else -1. No end
position with m(e) >= n_min (e.g. L < n_min + 1): n[b] = 0.
"""

import torch

__all__ = ["ngram_lookup_ref"]

_I32_MAX = 2**31 - 1


def ngram_lookup_ref(history: torch.Tensor, lens: torch.Tensor, n_min: int, n_max: int, M: int):
    """Reference of kangaroo_kernels.ngram_lookup. history [B, S] int32/int64, lens [B] int32/int64.

    Returns NgramMatch(tokens [B, M] int32 (-1 padded), n [B] int32) on history's device.
    """
    from kangaroo_kernels.types import NgramMatch

    B, S = history.shape
    rows = history.cpu().long().tolist()
    lengths = lens.cpu().long().tolist()
    tokens = torch.full((B, M), -1, dtype=torch.int32)
    n = torch.zeros(B, dtype=torch.int32)
    for b in range(B):
        L = min(max(lengths[b], 0), S)
        h = rows[b][:L]
        best = None  # (m, e)
        for e in range(L - 1):  # e = L - 1 is the suffix itself
            m = 0
            while m < min(n_max, e + 1) and h[e - m] == h[L - 1 - m]:
                m += 1
            if m >= n_min and (best is None or (m, e) > best):
                best = (m, e)
        if best is None:
            continue
        e = best[1]
        cont = []
        for t in h[e + 1:min(e + M, L - 1) + 1]:
            if not 0 <= t <= _I32_MAX:
                break
            cont.append(t)
        n[b] = len(cont)
        tokens[b, :len(cont)] = torch.tensor(cont, dtype=torch.int32)
    return NgramMatch(tokens.to(history.device), n.to(history.device))
