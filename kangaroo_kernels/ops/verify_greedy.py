"""verify_greedy: greedy (T = 0) acceptance of a chain or a tree of drafts against the target model.

Native op (C++ CPU twin, CUDA kernels: csrc/include/kangaroo/verify_greedy.cuh); semantics in
kangaroo_kernels/reference/verify_greedy.py.
"""

from typing import Optional

import torch

from kangaroo_kernels import _checks, _ext
from kangaroo_kernels.types import Accepted, Tree

__all__ = ["verify_greedy"]


_OP = None


def _op():
    global _OP
    if _OP is None:
        ops = _ext.ops()

        @torch.library.register_fake("kangaroo_kernels::verify_greedy")
        def _verify_greedy_fake(draft_tokens, target, parents, accept_len, path, tokens):
            return None

        _OP = ops.verify_greedy.default
    return _OP


def _validate(draft: torch.Tensor, target: torch.Tensor, parents: Optional[torch.Tensor], V: Optional[int]):
    N = draft.shape[1]
    checks = [(draft < -1) | (draft >= V) if V is not None else draft < -1]
    checks.append(target < 0 if V is None else torch.zeros((), dtype=torch.bool, device=draft.device))
    if parents is not None:
        j = torch.arange(N, device=draft.device)
        checks.append((parents < -1) | (parents >= j))
    flags = torch.stack([c.any() for c in checks]).tolist()
    if flags[0]:
        rng = f"[-1, V = {V})" if V is not None else ">= -1"
        raise ValueError(f"draft_tokens [B, N] must hold token ids {rng} (-1 = padding); got "
                         f"min {int(draft.min())}, max {int(draft.max())}")
    if flags[1]:
        raise ValueError(f"target tokens [B, N+1] must be >= 0, got min {int(target.min())}")
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
    """
    _checks.check_tensor("draft_tokens", draft_tokens, dtypes=_checks.INDEX_DTYPES, ndim=2, expected="[B, N]")
    B, N = draft_tokens.shape
    dev = draft_tokens.device
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
        if not isinstance(tree, Tree):
            raise ValueError(f"tree must be a Tree from build_tree, got {type(tree).__name__}")
        _checks.check_tensor("tree.parents", tree.parents, dtypes=(torch.int32,), shape=(B, N), device=dev,
                             expected="[B, N]")
        # build_tree validated the topology; padding nodes get a parent that matches no node
        par32 = torch.where(tree.depth > 0, tree.parents, -2)
    elif parents is not None:
        _checks.check_tensor("parents", parents, dtypes=_checks.INDEX_DTYPES, shape=(B, N), device=dev,
                             expected="[B, N]")
        par32 = None
    else:
        par32 = None
    if _checks.validating(validate):
        _validate(draft_tokens, target if V is None else None, parents, V)
    if parents is not None:
        par32 = parents.to(torch.int32).contiguous()
    draft32 = draft_tokens.to(torch.int32).contiguous()
    if V is None:
        target = target.to(torch.int32).contiguous()
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
