"""verify_greedy: greedy (T = 0) acceptance of a chain or a tree of drafts against the target model.

Native op (C++ CPU twin, CUDA kernels: csrc/include/kangaroo/verify_greedy.cuh); semantics in
kangaroo_kernels/reference/verify_greedy.py.
"""

from typing import Optional

import torch

from kangaroo_kernels import _checks, _ext
from kangaroo_kernels.types import Accepted

__all__ = ["verify_greedy"]



def _op():
    return _ext.inplace_op("verify_greedy")


def _validate(draft: torch.Tensor, target: torch.Tensor, parents: Optional[torch.Tensor], V: Optional[int]):
    N = draft.shape[1]
    top = V - 1 if V is not None else _checks.I32_MAX  # int64 ids are narrowed to int32: no id may wrap
    checks = [(draft < -1) | (draft > top)]
    checks.append((target < 0) | (target > _checks.I32_MAX) if V is None else
                  torch.zeros((), dtype=torch.bool, device=draft.device))
    if parents is not None:
        j = torch.arange(N, device=draft.device)
        checks.append((parents < -1) | (parents >= j))
    flags = torch.stack([c.any() for c in checks]).tolist()
    if flags[0]:
        rng = f"[-1, V = {V})" if V is not None else "in [-1, 2^31)"
        raise ValueError(f"draft_tokens [B, N] must hold token ids {rng} (-1 = padding); got "
                         f"min {int(draft.min())}, max {int(draft.max())}")
    if flags[1]:
        raise ValueError(f"target tokens [B, N+1] must be in [0, 2^31), got min {int(target.min())}, "
                         f"max {int(target.max())}")
    if parents is not None and flags[2]:
        raise ValueError("parents [B, N] must satisfy -1 <= parents[b, j] < j (topological order)")


def verify_greedy(draft_tokens: torch.Tensor, target: torch.Tensor, *, parents: Optional[torch.Tensor] = None,
                  tree=None, out: Optional[Accepted] = None, validate: Optional[bool] = None) -> Accepted:
    """Greedy verification of B rows of N draft nodes.

    draft_tokens [B, N] int32/int64, -1 = padding (never accepted: ragged rows are -1 padded). target: logits
    [B, N+1, V] fp32/bf16/fp16 or target tokens [B, N+1] int32/int64; row 0 scores the root (the last committed
    token), row j+1 scores draft node j. Chain when parents and tree are None: accept the longest prefix with
    draft_tokens[b, i] == argmax(target[b, i]). Tree (parents [B, N], -1 = child of the root, parents[j] < j, or
    a Tree from build_tree, whose padding nodes are then never accepted): from the root, take the first child in
    index order whose draft equals the argmax of the current node's row; stop when none does. argmax is
    torch.argmax in fp32: ties go to the lowest index and NaN compares greater than every number (a row with
    NaN yields its first NaN's index). Returns Accepted (see its docstring); `out`: an Accepted of buffers.
    A tree's fields are checked for build_tree's dtypes and shapes (metadata only); validation also checks its
    parents' topology. Without validation, int64 ids outside int32 become -1 (never accepted, never matched) and
    int64 parents outside int32 an out-of-range parent (the node is never reached): nothing wraps around.
    """
    _checks.check_tensor("draft_tokens", draft_tokens, dtypes=_checks.INDEX_DTYPES, ndim=2, expected="[B, N]")
    B, N = draft_tokens.shape
    dev = draft_tokens.device
    _checks.check_tensor("target", target, dtypes=_checks.FLOAT_DTYPES + _checks.INDEX_DTYPES, device=dev,
                         expected="logits [B, N+1, V] or tokens [B, N+1]")
    if target.is_floating_point():
        _checks.check_tensor("target", target, dtypes=_checks.FLOAT_DTYPES, shape=(B, N + 1, None), device=dev,
                             expected="logits [B, N+1, V]")
        V = target.shape[2]
        if V < 1:
            raise ValueError("target logits [B, N+1, V] need V >= 1")
        target = target.contiguous()
    else:
        _checks.check_tensor("target", target, dtypes=_checks.INDEX_DTYPES, shape=(B, N + 1), device=dev,
                             expected="tokens [B, N+1]")
        V = None
    if tree is not None:
        if parents is not None:
            raise ValueError("pass parents or tree, not both")
        tb, tn = _checks.check_tree("tree", tree, device=dev)
        if (tb, tn) != (B, N):
            raise ValueError(f"tree has B={tb}, N={tn} nodes but draft_tokens is [B={B}, N={N}]")
        # padding nodes get a parent that matches no node
        par32 = torch.where(tree.depth > 0, tree.parents, -2)
    elif parents is not None:
        _checks.check_tensor("parents", parents, dtypes=_checks.INDEX_DTYPES, shape=(B, N), device=dev,
                             expected="[B, N]")
        par32 = None
    else:
        par32 = None
    if _checks.validating(validate):
        _validate(draft_tokens, target if V is None else None,
                  parents if tree is None else torch.where(tree.depth > 0, tree.parents, -1), V)
    if parents is not None:
        par32 = _checks.to_int32(parents)
    draft32 = _checks.to_int32(draft_tokens, pad=-1)
    if V is None:
        target = _checks.to_int32(target, pad=-1)
    if out is None:
        out = Accepted(torch.empty((B,), dtype=torch.int32, device=dev),
                       torch.empty((B, N + 1), dtype=torch.int32, device=dev),
                       torch.empty((B, N + 1), dtype=torch.int32, device=dev))
    else:
        if not isinstance(out, Accepted):
            raise ValueError(f"out must be an Accepted of buffers, got {type(out).__name__}")
        _checks.check_out("out.accept_len", out.accept_len, (B,), torch.int32, dev)
        _checks.check_out("out.path", out.path, (B, N + 1), torch.int32, dev)
        _checks.check_out("out.tokens", out.tokens, (B, N + 1), torch.int32, dev)
    _op()(draft32, target, par32, out.accept_len, out.path, out.tokens)
    return out
