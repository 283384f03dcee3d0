"""merge_lookup_tree: the hybrid drafter's lookup branch (ngram_lookup's tokens) merged into the cycle's draft
tree, so that verify_greedy / verify_sample check both in one pass.

Design note.
  Semantics (exact spec: kangaroo_kernels/reference/lookup_tree.py). The base tree is the cycle's own draft:
  draft [B, N] with parents [B, N] (the tree mode's DecodeState.tree_parents: chain nodes 0..γ-1, then the
  siblings), or a chain (parents None). The lookup branch look [B, M] is walked down the base tree exactly as
  the verifier would walk it: token j is shared with the first child (lowest index) of the current node that
  carries the same token, so where the lookup agrees with the chain (or with a sibling) the nodes are the same
  nodes, and a private lookup node never duplicates a token the verifier would reach first (which would make
  the private node's subtree unreachable). From the first disagreement on, lookup token j is the new node
  N + j under the previous lookup node (the first one under the last shared node, or the root). Lookup node
  N + j therefore always has depth j + 1 (its position is root + j + 1 whatever was shared), and the layout is
  topological, so the merged parents go straight to build_tree / verify_greedy(parents=...) / append_attention.
  Nodes N .. N + n_shared - 1 and those past the live lookup are absent (token -1: never accepted).
  Appending after any base: N is the base's width (chain: γ; tree: γ·K); the base part of the output is the
  base unchanged, so a caller with a fixed layout of N nodes gets N + M nodes with the lookup at N.. N + M - 1.
  `source` marks each node (1: base drafter, 2: lookup, 3: both) so the decoder can count acceptances by
  source from verify's path: accepted node x came from the lookup iff source[x] & 2.
  Cost: one native launch (CUDA kernel and CPU twin: csrc/include/kangaroo/lookup_tree.cuh), one thread per
  row walking O(nl·N) compares, static shapes, no host sync, CUDA-graph capturable. It replaced a pure-torch
  formulation of ~40 small ops (chain) to ~140 (tree, by pointer jumping), which bench/bench_lookup_tree.py keeps
  as its baseline.
"""

from typing import Optional

import torch

from kangaroo_kernels import _checks, _ext
from kangaroo_kernels.types import LookupTree

__all__ = ["LookupTree", "merge_lookup_tree"]


def _validate(draft, look, n_look, parents) -> None:
    B, N = draft.shape
    M = look.shape[1]
    top = 2**31 - 1  # ids are narrowed to int32: an int64 id above it must not wrap
    checks = [((draft < -1) | (draft > top)).any(), ((look < -1) | (look > top)).any()]
    checks.append(((n_look < 0) | (n_look > M)).any() if n_look is not None else
                  torch.zeros((), dtype=torch.bool, device=draft.device))
    if parents is not None:
        i = torch.arange(N, device=draft.device)
        checks.append(((parents < -1) | (parents >= i)).any())
    flags = torch.stack(checks).tolist()
    if flags[0]:
        raise ValueError("draft [B, N] must hold token ids in [-1, 2^31) (-1 = absent node)")
    if flags[1]:
        raise ValueError("look [B, M] must hold token ids in [-1, 2^31) (-1 = padding)")
    if flags[2]:
        raise ValueError(f"n_look [B] must be in [0, M = {M}], got {n_look.tolist()}")
    if parents is not None and flags[3]:
        raise ValueError("parents [B, N] must satisfy -1 <= parents[b, i] < i (topological order)")


def merge_lookup_tree(draft: torch.Tensor, look: torch.Tensor, *, n_look: Optional[torch.Tensor] = None,
                      parents: Optional[torch.Tensor] = None, out: Optional[LookupTree] = None,
                      validate: Optional[bool] = None) -> LookupTree:
    """Merges the lookup branch look [B, M] into the base draft tree draft [B, N] (semantics: module docstring).

    draft [B, N] int32/int64: the base nodes' tokens, -1 = absent (the decoder's -1 padded drafts; a chain's
    first n_chain entries). parents [B, N] int32/int64 (-1 = child of the root, parents[b, i] < i) or None: a
    chain, node i under node i - 1. look [B, M] int32/int64 and n_look [B] (optional): ngram_lookup's tokens and
    n; the live lookup is the longest prefix of entries >= 0 and < n_look[b]. Returns LookupTree (int32, on
    draft's device); `out`: a LookupTree of buffers ([B, N+M] x 3, [B], [B, M]) written in place.
    Validation (validate=None: unless capturing a CUDA graph; it syncs): ids in [-1, 2^31), n_look in [0, M],
    parents topological. Without it, a base node whose parent is out of range is never shared (as verify_greedy never
    reaches it), and int64 ids outside int32 count as absent (-1).
    """
    _checks.check_tensor("draft", draft, dtypes=_checks.INDEX_DTYPES, ndim=2, expected="[B, N]")
    B, N = draft.shape
    dev = draft.device
    _checks.check_tensor("look", look, dtypes=_checks.INDEX_DTYPES, ndim=2, device=dev, expected="[B, M]")
    if look.shape[0] != B or look.shape[1] < 1:
        raise ValueError(f"look has shape {tuple(look.shape)} (expected [B, M] with B = {B}, M >= 1)")
    M = look.shape[1]
    if n_look is not None:
        _checks.check_tensor("n_look", n_look, dtypes=_checks.INDEX_DTYPES, shape=(B,), device=dev, expected="[B]")
    if parents is not None:
        _checks.check_tensor("parents", parents, dtypes=_checks.INDEX_DTYPES, shape=(B, N), device=dev,
                             expected="[B, N]")
    if out is not None:
        if not isinstance(out, LookupTree):
            raise ValueError(f"out must be a LookupTree of buffers, got {type(out).__name__}")
        for name, shape in (("tokens", (B, N + M)), ("parents", (B, N + M)), ("source", (B, N + M)),
                            ("n_shared", (B,)), ("lookup_nodes", (B, M))):
            _checks.check_out(f"out.{name}", getattr(out, name), shape, torch.int32, dev)
    if _checks.validating(validate):
        _validate(draft, look, n_look, parents)
    # int64 ids outside int32 are absent (-1) and int64 parents saturate (out of range): nothing wraps around
    draft, look = _checks.to_int32(draft, pad=-1), _checks.to_int32(look, pad=-1)
    if parents is not None:
        parents = _checks.to_int32(parents)

    i32 = dict(dtype=torch.int32, device=dev)
    res = out if out is not None else LookupTree(*(torch.empty((B, N + M), **i32) for _ in range(3)),
                                                 torch.empty((B,), **i32), torch.empty((B, M), **i32))
    if n_look is not None:  # the kernel clamps int32 counts to [0, M]; int64 ones are clamped before narrowing
        n_look = _checks.to_int32(n_look if n_look.dtype == torch.int32 else n_look.clamp(0, M))
    _ext.inplace_op("merge_lookup_tree")(draft, look, n_look, parents, *res)
    return res
