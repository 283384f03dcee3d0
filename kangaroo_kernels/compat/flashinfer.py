"""FlashInfer's chain_speculative_sampling over verify_sample (semantics of FlashInfer 0.6.x,
flashinfer/sampling.py and include/flashinfer/sampling.cuh, ChainSpeculativeSampling).

Same signature, outputs and in-place counters. What is FlashInfer's and what is ours:
- Acceptance of draft i: u_i * q_i(x_i) < p_i(x_i); the first rejection at position pos emits a sample of
  relu(p_pos - q_pos) (normalised), or of p_N when all N drafts pass (the bonus token); tokens after it are -1.
  Identical for normalised target rows (FlashInfer's contract); verify_sample normalises p_i by its sum, and
  falls back to p_pos where relu(p_pos - q_pos) is all zero (FlashInfer then emits its last valid index).
- Counters, added in place: emitted = accepted drafts before the first rejection; accepted = emitted plus the
  positions pos..N-1 that pass their own test when tested again with fresh uniforms after the first rejection
  (FlashInfer's alignment metric, which ignores that sampling stops at pos).
- RNG contract: one seed and one offset for the batch (ints, or int64 tensors of length 1 or B), row b drawing
  its own stream s_0, s_1, ... in FlashInfer's order (tests of 0..pos, re-tests of pos..N-1, the final sample)
  from Philox4x32-10 keyed by seed + b * 0x9E3779B9 at counters offset + j (a [B] seed tensor keys
  row b by seed[b] itself). FlashInfer draws from curand's Philox with
  subsequence b: the same structure, not the same bits. Like FlashInfer, explicit seed/offset are not advanced:
  the caller moves offset by N + 1 between calls. With neither, seed and offset come from `generator` (or
  torch's default generator) as a device tensor, with no host sync.
- deterministic is accepted and ignored: verify_sample is always deterministic.
Draft token ids outside [0, V) are padding (never accepted, never read out of bounds). No host sync; capturable
in a CUDA graph with tensor seed/offset.
"""

from typing import Optional, Tuple, Union

import torch

from kangaroo_kernels import _checks
from kangaroo_kernels.compat._common import as_row_tensor, check_counter, per_row_seeds, philox_uniforms
from kangaroo_kernels.ops.verify_sample import verify_sample

__all__ = ["chain_speculative_sampling"]


def chain_speculative_sampling(
    draft_probs: torch.Tensor,
    draft_token_ids: torch.Tensor,
    target_probs: torch.Tensor,
    maybe_output_accepted_token_num: Optional[torch.Tensor] = None,
    maybe_output_emitted_draft_token_num: Optional[torch.Tensor] = None,
    deterministic: bool = True,
    generator: Optional[torch.Generator] = None,
    seed: Optional[Union[int, torch.Tensor]] = None,
    offset: Optional[Union[int, torch.Tensor]] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chain speculative sampling with FlashInfer's signature.

    draft_probs [B, N, V] float; draft_token_ids [B, N] int32/int64; target_probs [B, N+1, V] float.
    maybe_output_accepted_token_num / maybe_output_emitted_draft_token_num: [B] int32/int64, incremented in
    place (new zero tensors when None). Returns (output_token_ids [B, N+1] int32, -1 padded,
    output_accepted_token_num [B], output_emitted_draft_token_num [B]).
    """
    _checks.check_tensor("draft_token_ids", draft_token_ids, dtypes=_checks.INDEX_DTYPES, ndim=2,
                         expected="[B, N]")
    B, N = draft_token_ids.shape
    dev = draft_token_ids.device
    _checks.check_tensor("target_probs", target_probs, dtypes=_checks.FLOAT_DTYPES, shape=(B, N + 1, None),
                         device=dev, expected=f"[B={B}, N+1={N + 1}, V]")
    V = target_probs.shape[2]
    _checks.check_tensor("draft_probs", draft_probs, dtypes=_checks.FLOAT_DTYPES, shape=(B, N, V), device=dev,
                         expected=f"[B={B}, N={N}, V={V}]")
    check_counter("maybe_output_accepted_token_num", maybe_output_accepted_token_num, B, dev)
    check_counter("maybe_output_emitted_draft_token_num", maybe_output_emitted_draft_token_num, B, dev)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if (seed is None) != (offset is None):
        raise ValueError("seed and offset must be given together (both ints or both tensors)")
    if seed is not None and isinstance(seed, torch.Tensor) != isinstance(offset, torch.Tensor):
        raise ValueError("seed and offset must both be tensors or both be ints")
    if seed is None:
        seeds = per_row_seeds(torch.randint(-2 ** 63, 2 ** 63 - 1, (1,), dtype=torch.int64, device=dev,
                                            generator=generator), B)
        offset_rows = torch.zeros(B, dtype=torch.int64, device=dev)
    else:
        if isinstance(seed, torch.Tensor) and seed.dim() == 1 and seed.shape[0] == B and B > 1:
            seeds = as_row_tensor("seed", seed, B, dev)
        else:
            seeds = per_row_seeds(as_row_tensor("seed", seed, 1, dev), B)
        offset_rows = as_row_tensor("offset", offset, B, dev)
    # FlashInfer's per-row stream s_0, s_1, ...: tests of positions 0..pos use s_0..s_pos; after the first
    # rejection at pos, positions pos..N-1 are tested again (the accepted metric) with s_{pos+1}..s_N; the
    # final sample uses the next draw: s_{N+1}, or s_N when all N drafts pass.
    s = philox_uniforms(seeds, offset_rows, N + 2)  # [B, N+2] float64
    q = draft_probs.float()
    x = draft_token_ids.long()
    valid = (x >= 0) & (x < V)
    xs = x.clamp(0, max(V - 1, 0)).unsqueeze(-1)
    p_rows = target_probs[:, :N]
    px = p_rows.gather(2, xs).squeeze(-1).double() / p_rows.sum(-1, dtype=torch.float64)  # no [B, N, V] copy
    qx = q.gather(2, xs).squeeze(-1).double()
    passes_first = valid & (s[:, :N] * qx < px)
    all_pass = passes_first.all(1) if N else torch.ones(B, dtype=torch.bool, device=dev)
    final = torch.where(all_pass, s[:, N], s[:, N + 1])
    u = torch.cat([s[:, :N], final[:, None]], 1)

    out = verify_sample(draft_token_ids, target_probs, draft_probs=q, uniforms=u, target_is_probs=True,
                        validate=False)
    emitted = out.accept_len
    retest = valid & (s[:, 1:N + 1] * qx < px)
    after = torch.arange(N, device=dev)[None, :] >= emitted[:, None].long()
    accepted = emitted + (retest & after).sum(1).to(torch.int32)

    acc_out = maybe_output_accepted_token_num
    em_out = maybe_output_emitted_draft_token_num
    if acc_out is None:
        acc_out = torch.zeros(B, dtype=torch.int32, device=dev)
    if em_out is None:
        em_out = torch.zeros(B, dtype=torch.int32, device=dev)
    acc_out.add_(accepted.to(acc_out.dtype))
    em_out.add_(emitted.to(em_out.dtype))
    return out.tokens, acc_out, em_out
