"""vLLM v1's rejection sampler core on its flat ragged layout (semantics of vLLM 0.10/0.11,
vllm/v1/sample/rejection_sampler.py: rejection_sample and the greedy / random kernels), over the core
verify_greedy / verify_sample.

Layout (vLLM's): B requests, request b with n_b draft tokens (n_b <= max_spec_len), flattened:
draft_token_ids [num_tokens], cu_num_draft_tokens [B] the inclusive cumulative sums of n_b (device int),
per-token target / draft rows [num_tokens, V]. Output [B, max_spec_len + 1] int32: the accepted drafts, then
the recovered token at the first rejection (or the bonus token when all n_b pass), -1 (PLACEHOLDER_TOKEN_ID)
after.

- rejection_sample: vLLM's exact signature. target_probs are what vLLM's compute_probs produced (raw logits for
  an all-greedy batch, probabilities otherwise); bonus_token_ids [B, 1] come from vLLM's own sampler; greedy rows
  (sampling_metadata.all_greedy, or temperature <= 0: vLLM's GREEDY_TEMPERATURE -1 or a 0) accept while the
  draft equals the target argmax; random rows accept draft x with probability min(1, p(x) / q(x)) (q one-hot
  without draft_probs: vLLM's n-gram case) and recover from norm(max(p - q, 0)). Same distributions as vLLM,
  not the same random numbers (vLLM draws a uniform per token and an exponential per request; here uniforms
  [B, max_spec_len + 1], per-request torch.Generators from sampling_metadata.generators as vLLM uses them).
  Differences on measure-zero events: vLLM accepts when p / q >= u and rejects a draft with q(x) = 0.
- rejection_sample_from_logits: the same on the layout the issue's engines hold: target logits (or probs)
  [num_tokens + B, V] where request b's n_b draft rows are followed by its bonus row, per-request temperature
  (<= 0: greedy) / top_k / top_p as [B] tensors or scalars applied inside verify_sample, the bonus token
  sampled from the bonus row unless bonus_token_ids is given. One verify_sample call, Philox seed/offset
  tensors for graph-safe randomness.
The ragged rows are gathered into a padded [B, max_spec_len + 1, V] block first (a copy of the target rows).
No host sync (the layout is read on the device); capturable in a CUDA graph without per-request generators.
"""

from typing import Optional, Union

import torch

from kangaroo_kernels import _checks
from kangaroo_kernels.ops.verify_greedy import verify_greedy
from kangaroo_kernels.ops.verify_sample import verify_sample

__all__ = ["rejection_sample", "rejection_sample_from_logits", "PLACEHOLDER_TOKEN_ID"]

PLACEHOLDER_TOKEN_ID = -1


def _layout(draft_token_ids, cu_num_draft_tokens, max_spec_len):
    _checks.check_tensor("draft_token_ids", draft_token_ids, dtypes=_checks.INDEX_DTYPES, ndim=1,
                         expected="[num_tokens]")
    dev = draft_token_ids.device
    _checks.check_tensor("cu_num_draft_tokens", cu_num_draft_tokens, dtypes=_checks.INDEX_DTYPES, ndim=1,
                         device=dev, expected="[B] (inclusive cumulative sums)")
    max_spec_len = _checks.check_int("max_spec_len", max_spec_len, 0, _checks.I32_MAX)
    B = cu_num_draft_tokens.shape[0]
    T = draft_token_ids.shape[0]
    S = max_spec_len
    cu = cu_num_draft_tokens.long()
    n = cu - torch.cat([cu.new_zeros(1), cu[:-1]])
    start = cu - n
    j = torch.arange(S + 1, device=dev)
    valid = j[None, :S] < n[:, None]
    tok_idx = (start[:, None] + j[None, :S]).clamp(0, max(T - 1, 0))
    if T:
        drafts = torch.where(valid, draft_token_ids.long()[tok_idx], torch.full_like(tok_idx, -1))
    else:
        drafts = torch.full((B, S), -1, dtype=torch.long, device=dev)
    return B, T, S, n, start, j, drafts


def _bonus(bonus_token_ids, B, dev):
    _checks.check_tensor("bonus_token_ids", bonus_token_ids, dtypes=_checks.INDEX_DTYPES, device=dev,
                         expected=f"[B={B}, 1] or [B={B}]")
    if bonus_token_ids.shape not in ((B, 1), (B,)):
        raise ValueError(f"bonus_token_ids must have shape [B={B}, 1] or [B={B}], got "
                         f"{tuple(bonus_token_ids.shape)}")
    return bonus_token_ids.reshape(B).to(torch.int32)


def _finish(out, n, bonus):
    tokens = out.tokens
    if bonus is not None:
        col = n.clamp(max=tokens.shape[1] - 1)[:, None]
        full = (out.accept_len.long() == n)[:, None]
        tokens.scatter_(1, col, torch.where(full, bonus[:, None], tokens.gather(1, col)))
    return tokens


def rejection_sample(draft_token_ids: torch.Tensor, num_draft_tokens, max_spec_len: int,
                     cu_num_draft_tokens: torch.Tensor, draft_probs: Optional[torch.Tensor],
                     target_probs: torch.Tensor, bonus_token_ids: torch.Tensor, sampling_metadata) -> torch.Tensor:
    """vllm.v1.sample.rejection_sampler.rejection_sample.

    draft_token_ids [num_tokens]; num_draft_tokens: list of B ints (host; vLLM's, used to skip seeded draws of
    requests without drafts); cu_num_draft_tokens [B]; draft_probs [num_tokens, V] or None; target_probs
    [num_tokens, V]; bonus_token_ids [B, 1]; sampling_metadata: any object with vLLM's fields all_greedy,
    all_random, temperature ([B] or None), generators ({request index: torch.Generator}).
    Returns [B, max_spec_len + 1] int32, -1 padded.
    """
    B, T, S, n, start, j, drafts = _layout(draft_token_ids, cu_num_draft_tokens, max_spec_len)
    dev = draft_token_ids.device
    if len(num_draft_tokens) != B:
        raise ValueError(f"num_draft_tokens must hold B = {B} ints, got {len(num_draft_tokens)}")
    _checks.check_tensor("target_probs", target_probs, dtypes=_checks.FLOAT_DTYPES, shape=(T, None), device=dev,
                         expected=f"[num_tokens={T}, V]")
    V = target_probs.shape[1]
    if V < 1:
        raise ValueError("target_probs must have V >= 1")
    if draft_probs is not None:
        _checks.check_tensor("draft_probs", draft_probs, dtypes=_checks.FLOAT_DTYPES, shape=(T, V), device=dev,
                             expected=f"[num_tokens={T}, V={V}]")
    bonus = _bonus(bonus_token_ids, B, dev)
    all_greedy = bool(getattr(sampling_metadata, "all_greedy"))
    temperature = getattr(sampling_metadata, "temperature", None)
    if not all_greedy:
        _checks.check_tensor("sampling_metadata.temperature", temperature, dtypes=_checks.FLOAT_DTYPES,
                             shape=(B,), device=dev, expected=f"[B={B}]")
    # padded target rows: request b's draft rows, then any valid row (the bonus is given: a draw from the row after
    # the last draft is always replaced); a uniform row only when there are no target rows at all
    src = target_probs if T else torch.full((1, V), 1.0 / V, dtype=target_probs.dtype, device=dev)
    rows = torch.where(j[None, :] < n[:, None], start[:, None] + j[None, :], torch.zeros_like(start[:, None]))
    target = src[rows]  # [B, S+1, V]
    if all_greedy:
        return _finish(verify_greedy(drafts, target, validate=False), n, bonus)
    q = None
    if draft_probs is not None and T:
        q = draft_probs.float()[rows[:, :S]]  # rows past n_b are never tested (their drafts are -1)
    elif draft_probs is not None:
        q = torch.zeros(B, S, V, device=dev)
    u = torch.rand(B, S + 1, dtype=torch.float64, device=dev)
    for i, g in (getattr(sampling_metadata, "generators", None) or {}).items():
        if num_draft_tokens[i] > 0:
            u[i] = torch.rand(S + 1, dtype=torch.float64, device=dev, generator=g)
    u.clamp_(min=2.0 ** -53)
    t_rows = torch.where(temperature.float() > 0, 1.0, 0.0).to(torch.float32)
    out = verify_sample(drafts, target, draft_probs=q, uniforms=u, temperature=t_rows, target_is_probs=True,
                        validate=False)
    return _finish(out, n, bonus)


def rejection_sample_from_logits(draft_token_ids: torch.Tensor, cu_num_draft_tokens: torch.Tensor,
                                 max_spec_len: int, target_logits: torch.Tensor, *,
                                 draft_probs: Optional[torch.Tensor] = None,
                                 bonus_token_ids: Optional[torch.Tensor] = None,
                                 temperature: Union[float, torch.Tensor] = 1.0,
                                 top_k: Union[int, torch.Tensor] = 0, top_p: Union[float, torch.Tensor] = 1.0,
                                 seed: Optional[torch.Tensor] = None, offset: Optional[torch.Tensor] = None,
                                 target_is_probs: bool = False) -> torch.Tensor:
    """Rejection sampling of a ragged batch from target logits (or probs) that include each request's bonus row.

    draft_token_ids [num_tokens]; cu_num_draft_tokens [B]; target_logits [num_tokens + B, V] (request b: its
    n_b draft rows, then its bonus row); draft_probs [num_tokens, V] float32 or None (one-hot drafts);
    temperature / top_k / top_p: scalars or [B] tensors (temperature <= 0: a greedy request, mixed freely with
    sampled ones; a scalar temperature must be > 0); bonus_token_ids [B] / [B, 1] replaces the bonus drawn from
    the bonus row; seed / offset [B] int64 as in verify_sample (offset advanced by max_spec_len + 1).
    Returns [B, max_spec_len + 1] int32, -1 padded.
    """
    B, T, S, n, start, j, drafts = _layout(draft_token_ids, cu_num_draft_tokens, max_spec_len)
    dev = draft_token_ids.device
    _checks.check_tensor("target_logits", target_logits, dtypes=_checks.FLOAT_DTYPES, shape=(T + B, None),
                         device=dev, expected=f"[num_tokens + B = {T + B}, V]")
    V = target_logits.shape[1]
    if draft_probs is not None:
        _checks.check_tensor("draft_probs", draft_probs, dtypes=(torch.float32,), shape=(T, V), device=dev,
                             expected=f"[num_tokens={T}, V={V}] float32")
    bonus = _bonus(bonus_token_ids, B, dev) if bonus_token_ids is not None else None
    b_idx = torch.arange(B, device=dev)
    rows = start[:, None] + b_idx[:, None] + torch.minimum(j[None, :], n[:, None])
    target = target_logits[rows.clamp(0, max(T + B - 1, 0))]
    q = None
    if draft_probs is not None and T:
        q = draft_probs[(start[:, None] + j[None, :S]).clamp(0, T - 1)]  # rows past n_b: never tested
    elif draft_probs is not None:
        q = torch.zeros(B, S, V, device=dev)
    out = verify_sample(drafts, target, draft_probs=q, temperature=temperature, top_k=top_k, top_p=top_p,
                        seed=seed, offset=offset, target_is_probs=target_is_probs, validate=False)
    return _finish(out, n, bonus)
