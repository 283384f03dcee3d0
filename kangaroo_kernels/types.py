"""The result and parameter types of the op library, shared by the ops, the reference (the spec) and callers.

Imports torch only: the reference modules build these without importing an op module (which would register ops).
"""

import numbers
from typing import Mapping, NamedTuple, Optional

import torch

__all__ = ["Accepted", "Tree", "FlashInferMask", "SGLangTree", "LmHeadExit", "LmHeadTopk", "AdapterWeights",
           "NgramMatch", "LookupTree"]


class Accepted(NamedTuple):
    """Result of a verification step (all int32, -1 padded).

    accept_len [B]: accepted draft nodes. path [B, N+1]: path[b, :accept_len[b]] are the accepted node indices,
    root to leaf (the last column is always -1). tokens [B, N+1]: tokens[b, :accept_len[b] + 1] are the accepted
    drafts followed by the target's correction or bonus token.
    """

    accept_len: torch.Tensor
    path: torch.Tensor
    tokens: torch.Tensor


class Tree(NamedTuple):
    """A batch of draft trees of N nodes (all int32).

    depth [B, N]: 1 for children of the root, -1 for padding. mask [B, N, ceil(N/32)]: bit i % 32 of word i // 32
    of row j is set iff node i is an ancestor of j or i == j (the tree_mask of append_attention).
    first_child / next_sibling [B, N] and root_first_child [B]: children in increasing index order, -1 when none.
    parents [B, N]: the parent indices the tree was built from.
    Build it with build_tree. A Tree is a plain tuple, so a hand-built one is possible: every op that takes a Tree
    checks its fields' types, dtypes, shapes and device where it enters (a ValueError naming tree.<field>), and
    verify_greedy's validation also checks the parents' topology; the kernels bound every index either way.
    """

    depth: torch.Tensor
    mask: torch.Tensor
    first_child: torch.Tensor
    next_sibling: torch.Tensor
    root_first_child: torch.Tensor
    parents: torch.Tensor


class FlashInferMask(NamedTuple):
    """A tree's attention mask in FlashInfer's custom-mask layout (see tree_to_flashinfer_mask)."""

    custom_mask: torch.Tensor         # bool [sum_b N * (prefix_lens[b] + N)]
    packed_custom_mask: torch.Tensor  # uint8 [mask_indptr[-1]]
    mask_indptr: torch.Tensor         # int32 [B + 1], byte offsets of each request's segment


class SGLangTree(NamedTuple):
    """A tree in the layout of SGLang's EAGLE verification (all int64 [B, N+1]; see tree_to_sglang)."""

    candidates: torch.Tensor
    retrive_index: torch.Tensor
    retrive_next_token: torch.Tensor
    retrive_next_sibling: torch.Tensor


class LmHeadExit(NamedTuple):
    """Result of lm_head_exit. token [B] int32, conf [B] fp32 (max softmax of the untempered logits), active [B]
    bool (active_out = active & (conf >= threshold)), token_prob [B] fp32 (the draft probability of token under
    softmax(logits / T); conf when greedy), probs [B, V] fp32 or None. `token, conf, active = res[:3]`."""

    token: torch.Tensor
    conf: torch.Tensor
    active: torch.Tensor
    token_prob: torch.Tensor
    probs: Optional[torch.Tensor] = None


class Int8Weight(NamedTuple):
    """An int8 copy of a [V, D] matrix with one fp32 scale per row (symmetric: row v ~= qweight[v] * scale[v]), for
    lm_head_exit_int8. qweight [V, D] int8 column-major (strides (1, V)), scale [V] fp32 (quantize_lm_head)."""

    qweight: torch.Tensor
    scale: torch.Tensor


class LmHeadTopk(NamedTuple):
    """Result of lm_head_topk: tokens [B, k] int32 and logprobs [B, k] fp32, sorted descending."""

    tokens: torch.Tensor
    logprobs: torch.Tensor


class AdapterWeights(NamedTuple):
    """The adapter's parameters, all in the hidden states' dtype: norm_in[D], wq[Hq*Dh, D], wk/wv[Hk*Dh, D],
    wo[D, Hq*Dh], norm_out[D], optional q/k/v biases (Qwen2: all three or none). wq/wk/wv may be views of one
    fused [(Hq + 2 Hk) * Dh, D] matrix (see from_wqkv): the kernel reads them in one launch either way."""

    norm_in: torch.Tensor
    wq: torch.Tensor
    wk: torch.Tensor
    wv: torch.Tensor
    wo: torch.Tensor
    norm_out: torch.Tensor
    num_heads: int
    num_kv_heads: int
    bq: Optional[torch.Tensor] = None
    bk: Optional[torch.Tensor] = None
    bv: Optional[torch.Tensor] = None

    @property
    def head_dim(self) -> int:
        return self.wq.shape[0] // self.num_heads

    @classmethod
    def from_wqkv(cls, norm_in, wqkv, wo, norm_out, num_heads: int, num_kv_heads: int,
                  bqkv: Optional[torch.Tensor] = None) -> "AdapterWeights":
        """Splits a fused wqkv[(Hq + 2 Hk) * Dh, D] (and bqkv) into row views; no copy."""
        for name, n in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
            if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
                raise ValueError(f"{name} must be an int >= 1, got {n!r}")
        num_heads, num_kv_heads = int(num_heads), int(num_kv_heads)
        if not isinstance(wqkv, torch.Tensor):
            raise ValueError(f"wqkv must be a torch.Tensor [(Hq + 2 Hk) * Dh, D], got {type(wqkv).__name__}")
        if wqkv.dim() != 2 or wqkv.shape[0] % (num_heads + 2 * num_kv_heads):
            raise ValueError(f"wqkv must be [(Hq + 2 Hk) * Dh, D] with Hq={num_heads}, Hk={num_kv_heads}, "
                             f"got shape {tuple(wqkv.shape)}")
        dh = wqkv.shape[0] // (num_heads + 2 * num_kv_heads)
        nq, nk = num_heads * dh, num_kv_heads * dh

        def split(t):
            return t[:nq], t[nq:nq + nk], t[nq + nk:]

        wq, wk, wv = split(wqkv)
        bq, bk, bv = split(bqkv) if bqkv is not None else (None, None, None)
        return cls(norm_in, wq, wk, wv, wo, norm_out, num_heads, num_kv_heads, bq, bk, bv)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], num_heads: int,
                        num_kv_heads: Optional[int] = None, *, prefix: str = "") -> "AdapterWeights":
        """From HF-style names under `prefix`: input_layernorm.weight, [self_attn.]{q,k,v,o}_proj.weight (or a
        fused [self_attn.]qkv_proj.weight), optional q/k/v biases, and the out norm as norm.weight /
        post_layernorm.weight / norm_out.weight (norm_in.weight is accepted for the input norm)."""
        sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads

        def get(*names, required=True):
            for n in names:
                for key in (n, "self_attn." + n):
                    if key in sd:
                        return sd[key]
            if required:
                raise ValueError(f"state_dict has none of {list(names)} (prefix {prefix!r}); keys: {sorted(sd)}")
            return None

        norm_in = get("input_layernorm.weight", "norm_in.weight")
        norm_out = get("norm.weight", "post_layernorm.weight", "norm_out.weight")
        wo = get("o_proj.weight")
        wqkv = get("qkv_proj.weight", required=False)
        if wqkv is not None:
            return cls.from_wqkv(norm_in, wqkv, wo, norm_out, num_heads, num_kv_heads,
                                 get("qkv_proj.bias", required=False))
        return cls(norm_in, get("q_proj.weight"), get("k_proj.weight"), get("v_proj.weight"), wo, norm_out,
                   num_heads, num_kv_heads, get("q_proj.bias", required=False), get("k_proj.bias", required=False),
                   get("v_proj.bias", required=False))

    @classmethod
    def from_module(cls, module, num_heads: Optional[int] = None, num_kv_heads: Optional[int] = None,
                    *, prefix: str = "") -> "AdapterWeights":
        """From an nn.Module-like object with state_dict() (names as in from_state_dict); head counts default to
        module.config.num_attention_heads / num_key_value_heads when the module has a config."""
        cfg = getattr(module, "config", None)
        if num_heads is None:
            num_heads = getattr(cfg, "num_attention_heads", None)
            if num_heads is None:
                raise ValueError("num_heads is required: the module has no config.num_attention_heads")
        if num_kv_heads is None:
            num_kv_heads = getattr(cfg, "num_key_value_heads", None) or num_heads
        return cls.from_state_dict(module.state_dict(), num_heads, num_kv_heads, prefix=prefix)


class NgramMatch(NamedTuple):
    """Result of ngram_lookup (int32). tokens [B, M]: tokens[b, :n[b]] is the continuation, the rest -1.
    n [B]: its length (0: no match)."""

    tokens: torch.Tensor
    n: torch.Tensor


class LookupTree(NamedTuple):
    """The merged draft tree (int32), N base nodes then M lookup slots.

    tokens [B, N+M] (-1: absent, never accepted), parents [B, N+M] (-1: child of the root; topological),
    source [B, N+M] bit flags (1: present base node, 2: on the lookup branch), n_shared [B] (lookup tokens that
    are base nodes), lookup_nodes [B, M] (the node of lookup token j, -1 past the live lookup).
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    source: torch.Tensor
    n_shared: torch.Tensor
    lookup_nodes: torch.Tensor
