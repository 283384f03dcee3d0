"""Executable spec of verify_greedy: greedy acceptance of a chain or a tree of drafts.

Row 0 of the target scores the root (the last committed token), row j + 1 scores draft node j; for logits the
target token of a row is torch.argmax of the row in fp32 (NaN above every number, ties to the lowest index),
for token targets it is the given id. Starting at the root, take the first child c of the current node in
increasing index order (chain, parents None: the next node) whose draft_tokens[c] is >= 0 and equals the
current node's target token; stop when none does. A child of node q is a node j with parents[j] == q
(q = -1: the root). accept_len = number of accepted nodes; path[:accept_len] = the accepted nodes; tokens[:
accept_len + 1] = their drafts, then the target token of the last accepted node (the correction or bonus
token). Everything else is -1.
"""

from typing import Optional

import torch

from kangaroo_kernels.types import Accepted

__all__ = ["verify_greedy_ref"]


def verify_greedy_ref(draft_tokens: torch.Tensor, target: torch.Tensor, *, parents: Optional[torch.Tensor] = None):
    """Reference of kangaroo_kernels.verify_greedy. target: logits [B, N+1, V] or tokens [B, N+1].

    Returns Accepted(accept_len [B] i32, path [B, N+1] i32, tokens [B, N+1] i32), -1 padded.
    """

    B, N = draft_tokens.shape
    dev = draft_tokens.device
    if target.is_floating_point():
        target_tok = torch.argmax(target.float(), dim=-1)  # [B, N+1]; argmax of every row (the spec, not fast)
    else:
        target_tok = target
    t_all = target_tok.cpu().long().tolist()
    d_all = draft_tokens.cpu().long().tolist()
    p_all = parents.cpu().long().tolist() if parents is not None else None
    accept_len = torch.zeros(B, dtype=torch.int32)
    path = torch.full((B, N + 1), -1, dtype=torch.int32)
    tokens = torch.full((B, N + 1), -1, dtype=torch.int32)
    for b in range(B):
        d = d_all[b]
        cur, acc = -1, []
        while True:
            tok = t_all[b][cur + 1]
            if p_all is None:
                kids = [cur + 1] if cur + 1 < N else []
            else:
                kids = [j for j in range(cur + 1, N) if p_all[b][j] == cur]
            child = next((j for j in kids if d[j] >= 0 and d[j] == tok), None)
            if child is None:
                break
            acc.append(child)
            cur = child
        accept_len[b] = len(acc)
        path[b, :len(acc)] = torch.tensor(acc, dtype=torch.int32)
        tokens[b, :len(acc)] = torch.tensor([d[j] for j in acc], dtype=torch.int32)
        tokens[b, len(acc)] = tok
    return Accepted(accept_len.to(dev), path.to(dev), tokens.to(dev))
