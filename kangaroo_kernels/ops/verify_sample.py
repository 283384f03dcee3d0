"""verify_sample: lossless speculative sampling (T > 0) of a chain or a tree of drafts in one op.

Native op (C++ CPU twin, CUDA kernel with one CTA per batch row); the exact semantics, shared bit for bit
with the reference, are in kangaroo_kernels/reference/verify_sample.py.
"""

import math
import numbers
from typing import Optional, Union

import torch

from kangaroo_kernels import _checks, _ext
from kangaroo_kernels.types import Accepted

__all__ = ["verify_sample"]


def _verify_sample_fake(draft_tokens, target_logits, draft_probs, parents, uniforms, seed, offset, temperature,
                        top_k, top_p, accept_len, path, tokens, temperature_rows=None, top_k_rows=None,
                        top_p_rows=None, probs=False):
    return None


_OP = None


def _op():
    # a module global, not functools.lru_cache: once loaded, torch.compile reads it as a constant (it cannot trace
    # the first call, which loads the library and registers the fake: run the op once eagerly before compiling)
    global _OP
    if _OP is None:
        ops = _ext.ops()
        torch.library.register_fake("kangaroo_kernels::verify_sample", _verify_sample_fake)
        _OP = ops.verify_sample
    return _OP


def _unexpanded(t: torch.Tensor) -> torch.Tensor:
    """The distinct elements of an expanded (stride-0) view, so data checks do not materialise it."""
    for d in range(t.dim()):
        if t.stride(d) == 0 and t.shape[d] > 1:
            t = t.narrow(d, 0, 1)
    return t


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def verify_sample(draft_tokens: torch.Tensor, target_logits: torch.Tensor, *,
                  draft_probs: Optional[torch.Tensor] = None, parents: Optional[torch.Tensor] = None,
                  temperature: Union[float, torch.Tensor] = 1.0, top_k: Union[int, torch.Tensor] = 0,
                  top_p: Union[float, torch.Tensor] = 1.0,
                  uniforms: Optional[torch.Tensor] = None, seed: Optional[torch.Tensor] = None,
                  offset: Optional[torch.Tensor] = None, target_is_probs: bool = False, out=None,
                  validate: Optional[bool] = None) -> Accepted:
    """Accept a prefix of the drafts by rejection sampling against the (filtered) target; emit one more token.

    draft_tokens [B, N] int32/int64 (-1 = padding, never accepted); target_logits [B, N+1, V] fp32/bf16/fp16
    (row 0 scores the root, row j+1 node j; batch/node strides may be 0); draft_probs [B, N, V] fp32, the
    distribution each draft was sampled from (None: deterministic drafts, i.e. one-hot q); parents [B, N]
    (-1 = child of the root, topological; None = chain). The target is softmax(logits / temperature) with top-k
    then top-p applied as logit thresholds (ties kept; top_k = 0 and top_p = 1 mean off).
    Per-row settings (serving batches): temperature [B] float (0 = a greedy row: a child is accepted iff its
    token is the row's argmax and the final token is the argmax, as verify_greedy on rows without NaN/inf),
    top_k [B] int, top_p [B] float, each independently a number or a tensor; read on the device (no host sync,
    graph-safe). A scalar temperature must be > 0 (all-greedy batches: verify_greedy).
    target_is_probs: target_logits holds probabilities [B, N+1, V] (FlashInfer / vLLM style; unnormalised
    weights are fine) used as they are (no log/exp round trip, zeros stay zeros): temperature is then only the
    greedy switch (1 = sample from the given probs, 0 = greedy); top-k/top-p are thresholds on the probs.
    Randomness: uniforms [B, N+1] fp32/fp64 in (0, 1) (column c tests child c, column N draws the final token),
    or Philox4x32-10 from seed [B] int64 and counter offset [B] int64, advanced by N+1 in place (so a replayed
    CUDA graph draws fresh numbers; offset defaults to zeros). With neither, seeds are drawn from torch's
    default CPU generator (host work, not capturable).
    Returns Accepted(accept_len [B] i32, path [B, N+1] i32, tokens [B, N+1] i32): path[b, :accept_len] are the
    accepted nodes, tokens[b, :accept_len+1] their tokens then the final one; -1 padded. A target row with a
    NaN or +inf (or no finite value; with probs a negative entry or no positive one) reached by the walk emits
    -1 as its token. Temperatures follow lm_head_exit's rule: fl32(1 / T) must be finite (a scalar is checked
    always, [B] rows when validating; an unvalidated row that breaks it emits -1 like a NaN row). Without
    validation int64 draft ids outside int32 are padding and int64 parents / top_k rows saturate (never wrap).
    """
    _checks.check_tensor("draft_tokens", draft_tokens, dtypes=_checks.INDEX_DTYPES, ndim=2, expected="[B, N]")
    B, N = draft_tokens.shape
    dev = draft_tokens.device
    _checks.check_tensor("target_logits", target_logits, dtypes=_checks.FLOAT_DTYPES, shape=(B, N + 1, None),
                         device=dev, expected=f"[B={B}, N+1={N + 1}, V]")
    V = target_logits.shape[2]
    if V < 1:
        raise ValueError("target_logits must have V >= 1 (expected [B, N+1, V])")
    temperature_rows = None
    if isinstance(temperature, torch.Tensor):
        temperature_in = temperature
        temperature_rows, temperature = _checks.row_setting("temperature", temperature, B, dev, integral=False), 1.0
    elif isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not (
            math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0 or a [B] tensor (use verify_greedy for an "
                         f"all-greedy batch), got {temperature!r}")
    elif not _checks.inv_temperature_finite(temperature):
        raise ValueError(f"temperature {temperature!r} is too small: 1 / T overflows float32")
    elif target_is_probs and temperature != 1.0:
        raise ValueError(f"temperature must be 1 with target_is_probs (the probs are used as given), got "
                         f"{temperature}")
    top_k, top_p, top_k_rows, top_p_rows = _checks.top_k_top_p(top_k, top_p, B, dev)
    if draft_probs is not None:
        _checks.check_tensor("draft_probs", draft_probs, dtypes=(torch.float32,), shape=(B, N, V), device=dev,
                             expected=f"[B={B}, N={N}, V={V}] float32")
    if parents is not None:
        _checks.check_tensor("parents", parents, dtypes=_checks.INDEX_DTYPES, shape=(B, N), device=dev,
                             expected=f"[B={B}, N={N}]")
    if uniforms is not None:
        _checks.check_tensor("uniforms", uniforms, dtypes=(torch.float32, torch.float64), shape=(B, N + 1),
                             device=dev, expected=f"[B={B}, N+1={N + 1}] float32/float64")
        if seed is not None or offset is not None:
            raise ValueError("pass either uniforms or seed/offset, not both")
    for name, t in (("seed", seed), ("offset", offset)):
        if t is not None:
            _checks.check_tensor(name, t, dtypes=(torch.int64,), shape=(B,), device=dev, expected=f"[B={B}] int64")
    if offset is not None:
        if seed is None:
            raise ValueError("offset needs seed (expected seed [B] int64)")
        if not offset.is_contiguous():
            raise ValueError("offset must be contiguous (it is advanced in place)")
    if out is None:
        out = Accepted(torch.empty(B, dtype=torch.int32, device=dev),
                       torch.empty(B, N + 1, dtype=torch.int32, device=dev),
                       torch.empty(B, N + 1, dtype=torch.int32, device=dev))
    else:
        if not isinstance(out, tuple) or len(out) != 3:
            raise ValueError("out must be Accepted(accept_len [B], path [B, N+1], tokens [B, N+1])")
        out = Accepted(*out)
        _checks.check_out("out.accept_len", out.accept_len, (B,), torch.int32, dev)
        _checks.check_out("out.path", out.path, (B, N + 1), torch.int32, dev)
        _checks.check_out("out.tokens", out.tokens, (B, N + 1), torch.int32, dev)

    if _checks.validating(validate):
        if N and not bool(((draft_tokens >= -1) & (draft_tokens < V)).all()):
            raise ValueError(f"draft_tokens must hold ids in [-1, V={V}) (expected [B, N], -1 = padding)")
        if parents is not None and N:
            j = torch.arange(N, device=dev)
            if not bool(((parents >= -1) & (parents < j)).all()):
                raise ValueError("parents must be topological: -1 <= parents[b, j] < j (expected [B, N])")
        if uniforms is not None and not bool(((uniforms > 0) & (uniforms < 1)).all()):
            raise ValueError(f"uniforms must lie in the open interval (0, 1) (expected [B={B}, N+1={N + 1}])")
        if draft_probs is not None and N and V:
            q = _unexpanded(draft_probs)
            if not bool(((q >= 0) & torch.isfinite(q)).all()):
                raise ValueError("draft_probs must be finite and non-negative (expected [B, N, V] float32)")
        if temperature_rows is not None:
            t = temperature_in  # in its own dtype: a float64 1e-50 must not pass as a greedy 0 after narrowing
            ok = ((t == 0) | (t == 1)) if target_is_probs else (
                torch.isfinite(t) & (t >= 0) & ((t == 0) | torch.isfinite(1.0 / t.float())))
            if not bool(ok.all()):
                raise ValueError("temperature rows must be " + (
                    "0 (greedy) or 1 with target_is_probs" if target_is_probs else
                    "finite, >= 0 (0: greedy) and not so small that 1 / T overflows float32"))
        _checks.check_top_k_top_p_rows(top_k_rows, top_p_rows)

    if uniforms is None and seed is None:
        seed = torch.randint(-2 ** 63, 2 ** 63 - 1, (B,), dtype=torch.int64).to(dev)
    if seed is not None and offset is None:
        offset = torch.zeros(B, dtype=torch.int64, device=dev)
    draft_tokens = _checks.to_int32(draft_tokens, pad=-1)  # an int64 id outside int32 is padding, never wraps
    if parents is not None:
        parents = _checks.to_int32(parents)
    if uniforms is not None:
        uniforms = uniforms.contiguous()
    if seed is not None:
        seed = seed.contiguous()
    target_logits = _last_dim_contiguous(target_logits)
    if draft_probs is not None:
        draft_probs = _last_dim_contiguous(draft_probs)
    top_k = 0 if top_k >= V else int(top_k)  # top_k >= V keeps every token: off (and never wraps in the kernel)
    _op()(draft_tokens, target_logits, draft_probs, parents, uniforms, seed, offset, float(temperature),
          top_k, float(top_p), out.accept_len, out.path, out.tokens, temperature_rows, top_k_rows,
          top_p_rows, bool(target_is_probs))
    return out
