"""The sampling filters shared by the samplers' specs (verify_sample, lm_head_exit): top-k then top-p as
thresholds on the row's scores, ties kept. Plain PyTorch, vectorised over rows."""

import torch

__all__ = ["top_k_top_p_keep"]


def top_k_top_p_keep(z: torch.Tensor, e: torch.Tensor, top_k, top_p) -> torch.Tensor:
    """keep [R, V] bool: the tokens the filters leave in each row.

    z [R, V]: the scores the thresholds compare (scaled logits, or probabilities); e [R, V] fp64: their
    unnormalised masses (e.g. exp(z - max z)); top_k, top_p: numbers or [R] tensors.
    - top-k keeps z >= the k-th largest z of the row (ties kept; k <= 0 or k >= V: off);
    - top-p then keeps z >= t, t the largest z whose mass sum_{z_j >= t} e_j over the top-k survivors reaches
      top_p times their total mass (ties kept; top_p >= 1: off; no such t, e.g. a NaN top_p: unchanged).
    """
    R, V = z.shape
    dev = z.device
    k = torch.as_tensor(top_k, device=dev).to(torch.int64).expand(R)
    p = torch.as_tensor(top_p, device=dev).to(torch.float64).expand(R)
    zs, order = torch.sort(z, dim=-1, descending=True, stable=True)
    kth = zs.gather(1, (k.clamp(1, V) - 1)[:, None])
    keep = ~((k > 0) & (k < V))[:, None] | (z >= kth)
    # the survivors come first in descending order, so the cumulative mass over the sorted row is theirs
    cs = torch.cumsum(torch.where(keep.gather(1, order), e.gather(1, order), torch.zeros_like(e)), dim=-1)
    hit = cs >= p[:, None] * cs[:, -1:]
    t = zs.gather(1, hit.to(torch.int8).argmax(dim=-1, keepdim=True))  # the first hit
    cut = ((p < 1.0) & hit.any(dim=-1))[:, None]
    return keep & (~cut | (z >= t))
