"""build_tree: the topology of a draft tree (depth, ancestor bit mask, child lists) from parent indices,
and converters to the tree layouts FlashInfer and SGLang consume.

Native op (C++ CPU twin, CUDA kernel: csrc/include/kangaroo/tree.cuh); semantics in
kangaroo_kernels/reference/tree.py.
"""

import numbers
from typing import Optional, Sequence, Union

import torch

from kangaroo_kernels import _checks, _ext
from kangaroo_kernels.types import FlashInferMask, SGLangTree, Tree

__all__ = ["build_tree", "tree_to_flashinfer_mask", "tree_to_sglang"]



def _op():
    return _ext.inplace_op("build_tree")


def _validate_parents(parents: torch.Tensor, num_nodes: Optional[torch.Tensor]) -> None:
    B, N = parents.shape
    j = torch.arange(N, device=parents.device)
    n = num_nodes.long() if num_nodes is not None else torch.full((B,), N, device=parents.device)
    real = j[None, :] < n[:, None]
    bad_parent = real & ((parents < -1) | (parents >= j[None, :]))
    bad_n = (n < 0) | (n > N)
    flags = torch.stack([bad_parent.any(), bad_n.any()]).tolist()
    if flags[0]:
        b, k = (int(x) for x in bad_parent.nonzero()[0])
        raise ValueError(f"parents [B, N] must satisfy -1 <= parents[b, j] < j (topological order) for every real "
                         f"node j < num_nodes[b]; parents[{b}, {k}] = {int(parents[b, k])}")
    if flags[1]:
        raise ValueError(f"num_nodes [B] must be in [0, N = {N}], got {num_nodes.tolist()}")


def build_tree(parents: torch.Tensor, num_nodes: Optional[torch.Tensor] = None, *, out: Optional[Tree] = None,
               validate: Optional[bool] = None) -> Tree:
    """Topology of B draft trees of N nodes.

    parents [B, N] int32/int64: -1 = child of the root (the last committed token), else the parent's index,
    which must be < j (topological order; a chain is -1, 0, 1, ...). num_nodes [B] int (default N): nodes
    j >= num_nodes[b] are padding. Returns Tree (int32; see its docstring). `out`: a Tree of preallocated
    buffers (its parents field is ignored). With validation off, a node whose parent is out of range or not
    topological, or is padding, is treated as padding (the kernel never reads or writes out of bounds), and
    num_nodes is clamped to [0, N]; int64 values outside int32 saturate first (a parent of 2^32 is padding, a
    num_nodes of 2^32 means N), never wrapping around.
    """
    _checks.check_tensor("parents", parents, dtypes=_checks.INDEX_DTYPES, ndim=2, expected="[B, N]")
    B, N = parents.shape
    dev = parents.device
    if num_nodes is not None:
        _checks.check_tensor("num_nodes", num_nodes, dtypes=_checks.INDEX_DTYPES, shape=(B,), device=dev,
                             expected="[B]")
    if _checks.validating(validate):
        _validate_parents(parents, num_nodes)
    par32 = _checks.to_int32(parents)
    nn32 = _checks.to_int32(num_nodes) if num_nodes is not None else None
    W = (N + 31) // 32
    if out is None:
        out = Tree(torch.empty((B, N), dtype=torch.int32, device=dev),
                   torch.empty((B, N, W), dtype=torch.int32, device=dev),
                   torch.empty((B, N), dtype=torch.int32, device=dev),
                   torch.empty((B, N), dtype=torch.int32, device=dev),
                   torch.empty((B,), dtype=torch.int32, device=dev), par32)
    else:
        if not isinstance(out, Tree):
            raise ValueError(f"out must be a Tree of buffers, got {type(out).__name__}")
        for name, shape in (("depth", (B, N)), ("mask", (B, N, W)), ("first_child", (B, N)),
                            ("next_sibling", (B, N)), ("root_first_child", (B,))):
            _checks.check_out(f"out.{name}", getattr(out, name), shape, torch.int32, dev)
        out = out._replace(parents=par32)
    _op()(par32, nn32, out.depth, out.mask, out.first_child, out.next_sibling, out.root_first_child)
    return out


def _unpack_mask(mask: torch.Tensor, N: int) -> torch.Tensor:
    """[B, N, W] int32 bit words -> [B, N, N] bool (row j, column i: i is an ancestor of j or i == j)."""
    shifts = torch.arange(32, dtype=torch.int32, device=mask.device)
    bits = (mask.unsqueeze(-1) >> shifts) & 1
    return bits.flatten(-2)[..., :N].bool()


def _flat_mask(anc: torch.Tensor, prefix: Sequence[int], N: int, pad_to_bytes: bool) -> torch.Tensor:
    """Request b's [N, prefix[b] + N] bool mask, row-major, all requests concatenated (each segment padded to a
    whole byte when pad_to_bytes). Index arithmetic only: no data-dependent shapes, no device sync."""
    dev = anc.device
    B = len(prefix)
    seg = [N * (p + N) for p in prefix]
    size = [(s + 7) // 8 * 8 for s in seg] if pad_to_bytes else seg
    starts = [0]
    for s in size:
        starts.append(starts[-1] + s)
    total = starts[-1]
    if total == 0:
        return torch.zeros(0, dtype=torch.bool, device=dev)
    starts_t = torch.tensor(starts, dtype=torch.int64, device=dev)
    kv_t = torch.tensor([p + N for p in prefix], dtype=torch.int64, device=dev)
    pre_t = torch.tensor(list(prefix), dtype=torch.int64, device=dev)
    seg_t = torch.tensor(seg, dtype=torch.int64, device=dev)
    k = torch.arange(total, dtype=torch.int64, device=dev)
    b = torch.searchsorted(starts_t, k, right=True) - 1
    local = k - starts_t[b]
    kv = kv_t[b]
    row, col = local // kv, local % kv
    inside = local < seg_t[b]
    tcol = col - pre_t[b]
    in_tree = tcol >= 0
    node_bit = anc[b.clamp(max=B - 1), row.clamp(max=max(N - 1, 0)), tcol.clamp(min=0, max=max(N - 1, 0))]
    return inside & ((~in_tree) | node_bit)


def _host_lens(name: str, v, B: int):
    """B host integers >= 0 from an int (numpy integers too), a sequence of them or a 1-D integer CPU tensor."""
    want = f"an int, a sequence of B={B} ints or a CPU integer tensor [B={B}]"
    if isinstance(v, torch.Tensor):
        if v.device.type != "cpu":
            raise ValueError(f"{name} must be host integers ({want}); a device tensor would need a sync because "
                             f"the mask size depends on it")
        _checks.check_tensor(name, v, dtypes=(torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8),
                             shape=(B,), expected=want)
        v = v.tolist()
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):
        vals = [v] * B
    elif isinstance(v, (list, tuple)):
        vals = list(v)
    else:
        raise ValueError(f"{name} must be {want}, got {type(v).__name__} {v!r}")
    if len(vals) != B:
        raise ValueError(f"{name} must be {want}, got {len(vals)} values")
    return [_checks.check_int(f"{name}[{b}]", x, 0, _checks.I32_MAX) for b, x in enumerate(vals)]


def tree_to_flashinfer_mask(tree: Tree, prefix_lens: Union[int, Sequence[int], torch.Tensor]) -> FlashInferMask:
    """The tree's attention mask in the layout of FlashInfer's prefill/append attention custom mask.

    Request b has qo_len = N queries (the tree nodes, in index order) and kv_len = prefix_lens[b] + N keys:
    its cached prefix first (visible to every node), then the N nodes' own K/V in index order (node j sees
    itself and its ancestors). Padding nodes see the prefix only; their outputs are meaningless. A root that is
    part of the block must be a node of the tree (e.g. node 0, the parent of all others).

    Layout (FlashInfer include/flashinfer/attention/variants.cuh, CustomMaskAttention / the custom-mask
    logits mask): request b's bool mask [qo_len, kv_len] flattened row-major, bit q * kv_len + k at
    packed_custom_mask[mask_indptr[b] + bit // 8] >> (bit % 8) (little bit order, each request's segment
    starting on a byte: flashinfer.quantization.segment_packbits(..., bitorder="little")).
    Pass custom_mask to BatchPrefillWith{Paged,Ragged}KVCacheWrapper.plan(custom_mask=...): plan packs it with
    segment_packbits and gets the byte offsets right. plan(packed_custom_mask=...) recomputes the offsets as
    bit counts (flashinfer/prefill.py, _compute_page_mask_indptr), which only matches for B = 1; code that
    hands the buffers to the kernel itself uses packed_custom_mask + mask_indptr (byte offsets).

    prefix_lens: host integers (an int for all rows, a sequence, or a CPU tensor): the output sizes depend on
    them, which is why they cannot be device data. Pure torch ops on the tree's device, no device sync.
    """
    B, N = _checks.check_tree("tree", tree)
    prefix = _host_lens("prefix_lens", prefix_lens, B)
    anc = _unpack_mask(tree.mask, N)
    custom = _flat_mask(anc, prefix, N, pad_to_bytes=False)
    padded = _flat_mask(anc, prefix, N, pad_to_bytes=True)
    weights = (1 << torch.arange(8, dtype=torch.int32, device=anc.device))
    packed = (padded.view(-1, 8).to(torch.int32) * weights).sum(-1).to(torch.uint8)
    nbytes = [0]
    for p in prefix:
        nbytes.append(nbytes[-1] + (N * (p + N) + 7) // 8)
    indptr = torch.tensor(nbytes, dtype=torch.int32, device=anc.device)
    return FlashInferMask(custom, packed, indptr)


def tree_to_sglang(tree: Tree, draft_tokens: torch.Tensor,
                   root_tokens: Optional[torch.Tensor] = None) -> SGLangTree:
    """The tree in the layout SGLang's sgl_kernel.verify_tree_greedy and tree_speculative_sampling_target_only
    consume (built upstream by build_tree_kernel_efficient, sgl-kernel/csrc/speculative/eagle_utils.cu).

    SGLang's tree has N+1 nodes per row with the root (the verified token) at index 0; our node j is their
    node j + 1. candidates [B, N+1]: root_tokens (default -1: pass the last committed tokens, SGLang feeds
    candidates to the verify forward as input ids), then draft_tokens. retrive_index[b, i] = b * (N+1) + i,
    the flat row of node i in the [B * (N+1)] target predictions. retrive_next_token[b, i]: first child of
    node i, retrive_next_sibling[b, i]: its next sibling, both as row-local indices in increasing order, -1 when
    none. Padding nodes are unlinked. Pure torch ops, no device sync.
    """
    B, N = _checks.check_tree("tree", tree)
    _checks.check_tensor("draft_tokens", draft_tokens, dtypes=_checks.INDEX_DTYPES, shape=(B, N),
                         device=tree.depth.device, expected="[B, N]")
    dev = tree.depth.device
    if root_tokens is None:
        root = torch.full((B, 1), -1, dtype=torch.int64, device=dev)
    else:
        _checks.check_tensor("root_tokens", root_tokens, dtypes=_checks.INDEX_DTYPES, shape=(B,), device=dev,
                             expected="[B]")
        root = root_tokens.to(torch.int64).unsqueeze(1)
    candidates = torch.cat([root, draft_tokens.to(torch.int64)], dim=1)
    retrive_index = (torch.arange(B, dtype=torch.int64, device=dev).unsqueeze(1) * (N + 1)
                     + torch.arange(N + 1, dtype=torch.int64, device=dev))
    nxt = torch.cat([tree.root_first_child.unsqueeze(1), tree.first_child], dim=1).to(torch.int64)
    sib = torch.cat([torch.full((B, 1), -1, dtype=torch.int32, device=dev), tree.next_sibling],
                    dim=1).to(torch.int64)
    shift = lambda t: torch.where(t >= 0, t + 1, torch.full_like(t, -1))  # noqa: E731
    return SGLangTree(candidates, retrive_index, shift(nxt), shift(sib))
