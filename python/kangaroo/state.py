"""The request and the state of one generate call: the checked prompts and settings, and the state split by what
it is: DecodeSettings (host values, frozen), DecodeBuffers (the static device tensors every cycle updates in place;
CUDA-graph safe) and, in DecodeState, the model side's static inputs and the tree layout (TreeLayout).
Nothing is assigned onto any of them after construction.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import List, Optional, Tuple

import torch

from kangaroo.adapter import attend_block
from kangaroo.model import KVCache, LlamaModel
from kangaroo_kernels import build_tree
from kangaroo_kernels.ops.adapter_forward import AdapterForwardPlan
from kangaroo_kernels.ops.lm_head_exit_int8 import LmHeadExitInt8Plan
from kangaroo_kernels.ops.ngram_lookup import NgramLookupPlan
from kangaroo_kernels.types import Accepted, AdapterWeights, Int8Weight, LookupTree, NgramMatch

__all__ = ["DecodeSettings", "DecodeBuffers", "LookupBuffers", "TreeLayout", "DecodeState", "new_state",
           "cache_slots", "prefill", "draft_head_weight", "draft_step_args", "draft_chain_args",
           "commit_step_args"]


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
    exit_layer: int
    gamma: int               # γ: draft steps a cycle at most
    topk: int                # K candidates kept a draft step: 1 = the chain, > 1 = a tree
    threshold: float         # η: a row keeps drafting while its draft's probability >= η
    sibling_threshold: float
    temperature: float
    top_k: int
    top_p: float
    max_new: int
    host_exit: bool          # CPU early exit (kangaroo.draft.host_done)
    autoregressive: bool = False
    lookup_max: int = 0      # M: the lookup branch's most tokens a cycle (0: no lookup; kangaroo.lookup)
    lookup_ngram: Tuple[int, int] = (1, 3)  # (n_min, n_max) of the suffix the lookup matches
    lookup_first: bool = False  # a row whose lookup finds a continuation drafts no adapter chain that cycle

    @property
    def n_base(self) -> int:
        """The adapter's draft nodes a cycle: γ chain nodes, then the siblings (tree)."""
        return 0 if self.autoregressive else self.gamma * self.topk

    @property
    def n_nodes(self) -> int:
        """N, the draft nodes verified a cycle (the adapter's, then the M lookup slots)."""
        return 0 if self.autoregressive else self.n_base + self.lookup_max

    @property
    def draft_width(self) -> int:
        """buf.drafts' width: the adapter's nodes, or with lookup_first in sequence mode a row's lookup chain."""
        return max(self.n_base, self.lookup_max) if self.lookup_first and self.topk == 1 else self.n_base

    @property
    def catch_width(self) -> int:
        """The most accepted positions a cycle whose adapter K/V the next cycle's catch-up must append: 1 (the last
        chain draft or a sibling), or with lookup the deepest path (a path that leaves the chain at depth 1; with
        lookup_first, x0 and a whole lookup path: the adapter drafted nothing that cycle)."""
        return max(self.gamma, self.lookup_max + self.lookup_first) if self.lookup_max else 1

    @property
    def log_sibling_threshold(self) -> float:
        return math.log(self.sibling_threshold) if self.sibling_threshold > 0 else -math.inf


@dataclasses.dataclass(frozen=True)
class DecodeBuffers:
    """[B] int32 unless noted. The fields from `cur` on are per-cycle scratch (written before they are read)."""

    cache: KVCache              # shallow and deep K/V; slot p of row b holds position p
    L0: torch.Tensor            # committed length (= position of x0): the one length of every cache
    tok: torch.Tensor           # x0, the pending token
    n_gen: torch.Tensor
    max_new: torch.Tensor
    alive: torch.Tensor         # bool
    need_catch: torch.Tensor    # bool: the adapter has not seen the last accepted nodes (kangaroo.draft.catch_up)
    catch_n: torch.Tensor       # how many (the last catch_n committed positions before x0)
    catch_h: torch.Tensor       # [B, W, D] their layer-ℓ hidden states (W = cfg.catch_width)
    ak: Optional[torch.Tensor]  # adapter K/V [B, Hk, S, Dh]
    av: Optional[torch.Tensor]
    eos: Optional[torch.Tensor]     # sorted EOS ids
    seed: Optional[torch.Tensor]    # sampling: int64 Philox key and counter [B]
    offset: Optional[torch.Tensor]
    arange_block: torch.Tensor  # [N+1] 0..N
    cur: torch.Tensor           # the draft loop's current token
    n_chain: torch.Tensor       # chain drafts
    drafts: torch.Tensor        # [B, cfg.draft_width], -1 padded
    hbuf: torch.Tensor          # [B, N+1, D] layer-ℓ states of x0, the chain drafts, then the siblings
    acc: Accepted
    out: torch.Tensor           # [B, 6 + N]: the cycle's host transfer (kangaroo.verify.commit)
    side_k: Optional[torch.Tensor]  # tree: the siblings' parked shallow K/V [ℓ, B, Hk, N-γ, Dh]
    side_v: Optional[torch.Tensor]
    lookup: Optional["LookupBuffers"] = None


@dataclasses.dataclass(frozen=True)
class LookupBuffers:
    """The lookup branch's buffers (kangaroo.lookup): the committed sequence and per-cycle scratch."""

    history: torch.Tensor       # [B, S] the committed tokens (prompt + output; position p at p, x0 at L0)
    look: NgramMatch            # ngram_lookup's tokens [B, M], n [B]         (scratch from here on)
    merged: LookupTree          # merge_lookup_tree's [B, N+M] tree


@dataclasses.dataclass(frozen=True)
class TreeLayout:
    """The node layout of tree drafting, the same every cycle. N = γK nodes: chain nodes 0..γ-1 (node c is
    d_{c+1}), then the K-1 siblings of step i at γ + i (K-1) + j - 1 (j = 2..K by rank), leaf children of the step's
    parent chain node. parents [B, N] (-1: the root x0); mask [B, N+1, W]: ancestor bits of [x0, nodes] (the verify
    block's tree_mask); depth [N+1] (0 for x0): block positions are L0 + depth; siblings [B, K, 1]: the draft
    step's K-token block, each token seeing the prefix and itself."""

    parents: torch.Tensor
    mask: torch.Tensor
    depth: torch.Tensor
    siblings: torch.Tensor

    @classmethod
    def build(cls, B: int, gamma: int, K: int, device) -> "TreeLayout":
        i32 = dict(dtype=torch.int32, device=device)
        parents = list(range(-1, gamma - 1)) + [i - 1 for i in range(gamma) for _ in range(K - 1)]
        depth = list(range(1, gamma + 1)) + [i + 1 for i in range(gamma) for _ in range(K - 1)]
        rows = lambda t: t[None].expand(B, *t.shape).contiguous()  # noqa: E731
        full = rows(torch.tensor([-1] + [p + 1 for p in parents], **i32))  # [x0, nodes]: x0 is node 0 there
        return cls(rows(torch.tensor(parents, **i32)), build_tree(full, validate=False).mask,
                   torch.tensor([0] + depth, **i32), rows((1 << torch.arange(K, **i32))[:, None]))


@dataclasses.dataclass(frozen=True)
class DecodeState:
    model: LlamaModel
    cfg: DecodeSettings
    buf: DecodeBuffers
    rope: torch.Tensor                 # the model's RoPE table (adapter_forward, append_attention)
    adapter: Optional[AdapterWeights]  # None when autoregressive
    adapter_eps: float
    tree: Optional[TreeLayout]         # None for the chain
    adapter_plan: Optional[AdapterForwardPlan] = None  # adapter_forward on this state's weights, caches and RoPE
    head_plan: Optional[LmHeadExitInt8Plan] = None     # the chain's int8 draft head (CPU; None: the exact head)
    draft_step: Optional[tuple] = None  # CPU chain: draft_step's static arguments (draft_step_args; None: unfused)
    draft_chain: Optional[tuple] = None  # CPU chain: draft_chain's buffers (draft_chain_args)
    lookup_plan: Optional[NgramLookupPlan] = None  # ngram_lookup on buf.lookup's history into buf.lookup.look
    commit_step: Optional[tuple] = None  # CPU early exit: commit_step's static arguments (commit_step_args)

    @property
    def B(self) -> int:
        return self.buf.tok.shape[0]

    @property
    def S(self) -> int:
        return self.buf.cache.max_len


def cache_slots(cfg: DecodeSettings, max_context: int, max_cache_len: Optional[int], longest: int) -> int:
    """The cache slots S a request needs (the longest prompt, max_new tokens, one draft block); ValueError when the
    model's context or max_cache_len is too short."""
    if longest + cfg.max_new > max_context:
        raise ValueError(f"request too long: prompt ({longest} tokens) + max_new_tokens ({cfg.max_new}) = "
                         f"{longest + cfg.max_new} exceeds the model's context of {max_context} tokens")
    S = longest + cfg.max_new + cfg.n_nodes + 1
    if max_cache_len is not None and S > max_cache_len:
        raise ValueError(f"request too long for the cache: it needs {S} slots (prompt {longest} + max_new_tokens "
                         f"{cfg.max_new} + {cfg.n_nodes + 1} for the draft block), max_cache_len is {max_cache_len}")
    return S


def new_state(model: LlamaModel, adapter, cfg: DecodeSettings, B: int, S: int, seed: Optional[int],
              eos: Optional[List[int]], head_q: Optional[Int8Weight] = None) -> DecodeState:
    """Allocates the buffers of a call with B rows and S cache slots. adapter: a KangarooAdapter or None. seed:
    the sampling seed (None: drawn from torch's generator); row b's Philox key derives from it. head_q: an int8
    draft LM head (kangaroo_kernels.quantize_lm_head) for the chain's draft decision, or None."""
    c, dev, dt = model.config, model.device, model.dtype
    N, Nb, D, g, M = cfg.n_nodes, cfg.n_base, c.hidden_size, cfg.gamma, cfg.lookup_max
    i32 = dict(dtype=torch.int32, device=dev)
    drafting = adapter is not None and not cfg.autoregressive
    tree = TreeLayout.build(B, g, cfg.topk, dev) if drafting and cfg.topk > 1 else None
    ak = av = side_k = side_v = None
    if drafting:
        ak, av = (torch.zeros(B, adapter.num_kv_heads, S, adapter.head_dim, dtype=dt, device=dev) for _ in "kv")
    if tree is not None:
        side_k, side_v = (torch.zeros(cfg.exit_layer, B, c.num_key_value_heads, Nb - g, c.head_dim, dtype=dt,
                                      device=dev) for _ in "kv")
    lookup = None
    if drafting and M > 0:
        look = NgramMatch(torch.full((B, M), -1, **i32), torch.zeros(B, **i32))
        merged = LookupTree(*(torch.full((B, N), -1, **i32) for _ in range(3)), torch.zeros(B, **i32),
                            torch.full((B, M), -1, **i32))
        lookup = LookupBuffers(torch.zeros(B, S, **i32), look, merged)
    sampling = cfg.temperature > 0
    seeds = None
    if sampling:
        base = int(torch.randint(0, 2 ** 62, (1,)).item()) if seed is None else int(seed)
        seeds = torch.tensor([(base * 1000003 + 7919 * b + 1) % (2 ** 63) for b in range(B)], dtype=torch.int64)
    buf = DecodeBuffers(
        model.new_cache(B, S), torch.zeros(B, **i32), torch.zeros(B, **i32), torch.zeros(B, **i32),
        torch.full((B,), cfg.max_new, **i32), torch.ones(B, dtype=torch.bool, device=dev),
        torch.zeros(B, dtype=torch.bool, device=dev), torch.zeros(B, **i32),
        torch.zeros(B, cfg.catch_width, D, dtype=dt, device=dev), ak, av,
        torch.tensor(sorted(set(eos)), **i32) if eos else None, seeds.to(dev) if sampling else None,
        torch.zeros(B, dtype=torch.int64, device=dev) if sampling else None, torch.arange(N + 1, **i32),
        torch.zeros(B, **i32), torch.zeros(B, **i32), torch.full((B, cfg.draft_width), -1, **i32),
        torch.zeros(B, N + 1, D, dtype=dt, device=dev),
        Accepted(torch.zeros(B, **i32), torch.zeros(B, N + 1, **i32), torch.zeros(B, N + 1, **i32)),
        torch.zeros(B, 6 + N, **i32), side_k, side_v, lookup)
    rope = model.rope_cos_sin(S)
    weights, eps = (adapter.weights(), adapter.rms_norm_eps) if drafting else (None, 0.0)
    plan = AdapterForwardPlan(weights, ak, av, rope_cos_sin=rope, eps=eps, apply_out_norm=False) if drafting else None
    head_q = head_q if drafting else None
    head_plan = None if head_q is None else LmHeadExitInt8Plan(head_q, cfg.threshold, batch=B, dtype=dt,
                                                               norm_weight=weights.norm_out, eps=eps)
    look_plan = None if lookup is None else NgramLookupPlan(lookup.history, *cfg.lookup_ngram, M, out=tuple(look))
    step = draft_step_args(model, cfg, buf, rope, plan, head_plan)
    return DecodeState(model, cfg, buf, rope, weights, eps, tree, plan, head_plan, step,
                       draft_chain_args(buf, step), look_plan, commit_step_args(cfg, buf))


def draft_chain_args(buf: DecodeBuffers, step: Optional[tuple]) -> Optional[tuple]:
    """The buffers kangaroo_kernels::draft_chain takes after draft_step's static arguments (csrc/cpu/draft_step.cpp:
    kangaroo.draft.draft in one native call, the same bits) where it applies: the fused CPU chain (step). None
    elsewhere."""
    if step is None:
        return None
    return (buf.tok, buf.L0, buf.alive, buf.need_catch, buf.catch_n, buf.catch_h, buf.cur, buf.hbuf, buf.drafts,
            buf.n_chain)


def commit_step_args(cfg: DecodeSettings, buf: DecodeBuffers) -> Optional[tuple]:
    """The static arguments of kangaroo_kernels::commit_step (csrc/cpu/commit_step.cpp: kangaroo.verify.commit in
    one native call, the same bits) on CPU buffers with the CPU early exit; None elsewhere (commit runs its ops:
    the predicated path, CUDA-graph capturable)."""
    if not cfg.host_exit or buf.tok.device.type != "cpu":
        return None
    lk = buf.lookup
    return (buf.hbuf, buf.n_chain, None if lk is None else lk.look.n, None if lk is None else lk.history, buf.eos,
            buf.max_new, buf.L0, buf.tok, buf.catch_n, buf.need_catch, buf.catch_h, buf.n_gen, buf.out, buf.alive)


def draft_step_args(model: LlamaModel, cfg: DecodeSettings, buf: DecodeBuffers, rope: torch.Tensor, plan,
                    head_plan) -> Optional[tuple]:
    """The static arguments of kangaroo_kernels::draft_step (csrc/cpu/draft_step.cpp: a chain draft step in one native
    call, the same kernels and bits as the loop's separate calls) where it applies: a CPU model drafting a chain on
    the int8 head (head_plan; tree drafting ranks with the exact head). None elsewhere: the loop runs its ops."""
    if head_plan is None or model.device.type != "cpu":
        return None
    c, (w, tail) = model.config, plan.native_args
    q, scale, norm, threshold, _ = head_plan.native_args  # its eps is the adapter's (both plans get new_state's)
    names = ("ln1", "wqkv", "bqkv", "wo", "ln2", "wgu", "wd")
    layers = [model.layers[i].get(k) for i in range(cfg.exit_layer) for k in names]
    return (layers, model.embed_tokens, buf.cache.k, buf.cache.v, rope, c.rms_norm_eps, c.num_attention_heads,
            c.num_key_value_heads, list(w[:9]), w[9], w[10], tail[1], tail[2], q, scale, norm, threshold)


def prefill(st: DecodeState, prompts: List[List[int]]) -> None:
    """All layers and the adapter's K/V over each prompt but its last token (right-padded), which becomes x0."""
    m, b, dev = st.model, st.buf, st.model.device
    B, Tp = len(prompts), max(len(p) for p in prompts) - 1
    b.tok.copy_(torch.tensor([p[-1] for p in prompts], dtype=torch.int32))
    b.L0.copy_(torch.tensor([len(p) - 1 for p in prompts], dtype=torch.int32))
    if b.lookup is not None:
        b.lookup.history[:, :Tp + 1].copy_(torch.tensor([p + [0] * (Tp + 1 - len(p)) for p in prompts]))
    if Tp == 0:
        return
    ids = torch.tensor([p[:-1] + [0] * (Tp - len(p) + 1) for p in prompts], dtype=torch.int32, device=dev)
    zeros = torch.zeros(B, dtype=torch.int32, device=dev)
    pos = torch.arange(Tp, device=dev)[None].expand(B, Tp)
    ell, L = st.cfg.exit_layer, m.config.num_hidden_layers
    for s in range(0, Tp, 512):  # chunked so a long prompt's attention block stays modest
        e = min(Tp, s + 512)
        x = m.forward_layers(m.embed(ids[:, s:e]), 0, ell, b.cache, zeros + s, pos[:, s:e])
        if st.adapter is not None:
            attend_block(st.adapter, st.adapter_eps, x, b.ak, b.av, zeros + s, pos[:, s:e], st.rope)
        m.forward_layers(x, ell, L, b.cache, zeros + s, pos[:, s:e])


def draft_head_weight(model: LlamaModel, adapter, mode: str) -> Tuple[Optional[Int8Weight], str]:
    """The chain's draft LM head for KangarooDecoder(draft_head=mode): (an int8 copy, or None for the exact head,
    and a description). "int8" on a CPU model; "auto": int8 where its kernel measures faster than the exact head on
    this machine (a few ms, once per decoder: which is faster depends on the CPU and the head's size); "exact".
    The draft head only proposes tokens (verification uses the exact weights): the choice never changes output."""
    from kangaroo_kernels import lm_head_exit, lm_head_exit_int8, quantize_lm_head

    if mode == "exact" or model.device.type != "cpu":
        return None, "exact"
    q = quantize_lm_head(model.lm_head)
    if mode == "int8":
        return q, "int8"
    nw = adapter.weights().norm_out.to(model.dtype)
    h = torch.randn(1, model.config.hidden_size, generator=torch.Generator().manual_seed(0)).to(model.dtype)

    def best(f, w):
        for _ in range(2):
            f(h, w, 0.5, norm_weight=nw, validate=False)
        ts = []
        for _ in range(5):
            t = time.perf_counter()
            f(h, w, 0.5, norm_weight=nw, validate=False)
            ts.append(time.perf_counter() - t)
        return min(ts)

    t_exact, t_q = best(lm_head_exit, model.lm_head), best(lm_head_exit_int8, q)
    why = f"(measured {t_q * 1e6:.0f} us int8 vs {t_exact * 1e6:.0f} us exact)"
    return (q, f"int8 {why}") if t_q < t_exact else (None, f"exact {why}")
