"""ngram_lookup: the hybrid drafter's lookup branch, on device: the up to M tokens that followed the most recent
earlier occurrence of the longest suffix (n_min..n_max tokens) of each row's committed sequence.

Design note.
  Semantics (exact spec: kangaroo_kernels/reference/ngram_lookup.py). Row b's committed sequence is
  h = history[b, :L], L = lens[b]. For an end position e in [0, L-2] (never the suffix itself, which ends at
  L-1) let m(e) be the number of trailing tokens h[..e] shares with h[..L-1], capped at n_max (and at e + 1).
  The match is the e with m(e) >= n_min maximising (m(e), e): the longest suffix of n in [n_min, n_max] tokens
  that occurs earlier, at its most recent earlier occurrence (occurrences may overlap the suffix: in "a a a a"
  the suffix "a a a" ends at e = 2). The result is its continuation h[e+1 .. min(e+M, L-1)]: at least one
  token, fewer than M when the row ends first (it may run into the suffix itself, never past L). n[b] is the
  number of tokens returned, tokens[b, n[b]:] = -1; no match (including L < n_min + 1): n[b] = 0.
  Complexity: O(L) loads per row plus, per end position whose token equals h[L-1], up to n_max more
  comparisons (O(L * n_max) worst case: a row of one repeated token, which however stops at once, see below).
  Kernel shape: one CTA per row, threads taking end positions from the end backwards in coalesced tiles, all n
  at once (one backward comparison per position gives m(e), i.e. every n <= m(e) at the same time), then one
  max-reduction of the packed key (m << 32 | e) over the CTA: longest first, then most recent, no global
  atomics and no workspace. A CTA stops after the tile in which some thread reached the longest possible
  length min(n_max, L-1), since nothing earlier can beat it. At S = 32k a row is 128 KB of int32, 8 tiles of 4096
  positions (16 KB) with 8 loads in flight per thread; B up to 64 rows give up to 64 CTAs. A row per CTA keeps
  the reduction in shared memory; splitting long rows of small batches over several CTAs would need a second
  pass (or a zeroed global workspace for atomics) and is left until a GPU profile asks for it.

Not a host sync: outputs have static shapes [B, M] and [B]; validate=False (or CUDA-graph capture) reads no
device data on the host. Native op (C++ CPU twin, CUDA kernel: csrc/include/kangaroo/ngram_lookup.cuh).
"""

from typing import Optional, Tuple

import torch

from kangaroo_kernels import _checks, _ext
from kangaroo_kernels.types import NgramMatch

__all__ = ["NgramMatch", "NgramLookupPlan", "ngram_lookup"]

_I32_MAX = 2**31 - 1




def _op():
    return _ext.inplace_op("ngram_lookup")


def _check_int(name: str, v, lo: int, hi: int = _I32_MAX) -> int:
    return _checks.check_int(name, v, lo, hi)


def _validate(history: torch.Tensor, lens: torch.Tensor) -> None:
    B, S = history.shape
    ln = lens.long()
    live = torch.arange(S, device=history.device)[None, :] < ln.clamp(0, S)[:, None]
    h = history.long()
    bad_ids = live & ((h < 0) | (h > _I32_MAX))
    flags = torch.stack([((ln < 0) | (ln > S)).any(), bad_ids.any()]).tolist()
    if flags[0]:
        raise ValueError(f"lens [B] must be in [0, S = {S}], got {lens.tolist()}")
    if flags[1]:
        b, j = (int(x) for x in bad_ids.nonzero()[0])
        raise ValueError(f"history [B, S] must hold token ids in [0, 2^31) in its first lens[b] entries; "
                         f"history[{b}, {j}] = {int(history[b, j])}")


def ngram_lookup(history: torch.Tensor, lens: torch.Tensor, n_min: int, n_max: int, M: int, *,
                 out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                 validate: Optional[bool] = None) -> NgramMatch:
    """The up to M tokens that followed the most recent earlier occurrence of the longest suffix of n in
    [n_min, n_max] tokens of each row's committed sequence history[b, :lens[b]] (semantics: module docstring).

    history [B, S] int32/int64 (token ids in [0, 2^31) in the committed part; the rest is never read), lens [B]
    int32/int64. 1 <= n_min <= n_max, M >= 1 (Python ints; n_max may exceed S). Returns NgramMatch(tokens [B, M]
    int32 -1 padded, n [B] int32) on history's device; `out`: a pair (tokens, n) of such buffers, written in
    place and returned. int64 history is compared as int64 (never narrowed).
    Validation (validate=None: unless capturing a CUDA graph; it syncs): lens in [0, S], committed ids in
    [0, 2^31). Without it: lens are clamped to [0, S] (int64 lens too, before narrowing: no wrap-around), ids
    are compared as stored and a continuation ends before its first id outside [0, 2^31).
    """
    _checks.check_tensor("history", history, dtypes=_checks.INDEX_DTYPES, ndim=2, expected="[B, S]")
    B, S = history.shape
    dev = history.device
    _checks.check_tensor("lens", lens, dtypes=_checks.INDEX_DTYPES, shape=(B,), device=dev, expected="[B]")
    n_min = _check_int("n_min", n_min, 1)
    n_max = _check_int("n_max", n_max, n_min)
    M = _check_int("M", M, 1)
    if S >= 2**31:
        raise ValueError(f"history [B, S] needs S < 2^31, got S = {S}")
    if _checks.validating(validate):
        _validate(history, lens)
    if out is None:
        out = NgramMatch(torch.empty((B, M), dtype=torch.int32, device=dev),
                         torch.empty((B,), dtype=torch.int32, device=dev))
    else:
        if not isinstance(out, tuple) or len(out) != 2:
            raise ValueError(f"out must be a pair (tokens [B, M], n [B]) of int32 buffers, got {type(out).__name__}")
        _checks.check_out("out.tokens", out[0], (B, M), torch.int32, dev)
        _checks.check_out("out.n", out[1], (B,), torch.int32, dev)
        out = NgramMatch(*out)
    lens32 = lens if lens.dtype == torch.int32 else lens.clamp(0, S).to(torch.int32)
    _op()(history.contiguous(), lens32.contiguous(), n_min, n_max, out.tokens, out.n)
    return out


class NgramLookupPlan:
    """ngram_lookup on a decoder's static history and output buffers, checked once (plan / run, like
    AdapterForwardPlan): the decoder runs the lookup every cycle on the same [B, S] history and (tokens, n) buffers.

        plan = NgramLookupPlan(history, n_min, n_max, M, out=(tokens, n))
        plan.run(lens)   # == ngram_lookup(history, lens, n_min, n_max, M, out=(tokens, n), validate=False)

    run() tests only lens (int32 [B] on history's device, contiguous) and hands any other lens to ngram_lookup."""

    def __init__(self, history: torch.Tensor, n_min: int, n_max: int, M: int, *,
                 out: Tuple[torch.Tensor, torch.Tensor]):
        B = history.shape[0] if isinstance(history, torch.Tensor) and history.dim() == 2 else 0
        lens = torch.zeros(B, dtype=torch.int32, device=getattr(history, "device", None))
        self._out = ngram_lookup(history, lens, n_min, n_max, M, out=out, validate=False)  # every static check
        if not history.is_contiguous() or history.dtype != torch.int32:
            raise ValueError("NgramLookupPlan needs a contiguous int32 history (the decoder's buffer)")
        self._args = (history, int(n_min), int(n_max), M)
        self._shape, self._device = (B,), history.device

    def run(self, lens: torch.Tensor) -> NgramMatch:
        if not (_checks.tensor_ok(lens, torch.int32, self._shape, self._device) and lens.is_contiguous()):
            history, n_min, n_max, M = self._args
            return ngram_lookup(history, lens, n_min, n_max, M, out=tuple(self._out), validate=False)
        history, n_min, n_max, _ = self._args
        _op()(history, lens, n_min, n_max, self._out.tokens, self._out.n)
        return self._out
