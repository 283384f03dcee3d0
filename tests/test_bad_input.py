"""Hostile calls to every public op: each bad argument raises a ValueError that names it and leaves the in-place
outputs, caches, lengths and counters unchanged; the legitimate neighbours of each bad class still work.

The harness builds one good call per op (small shapes), then enumerates classes of bad tensor arguments
(not a tensor, wrong dtype, rank, size, device) for every tensor the call takes, bad scalars, and bad device
data (ids out of range, int64 values that would wrap when narrowed to int32, NaN/inf, tiny temperatures).
The same cases run on CUDA where a GPU is (marker cuda). Data checks run with validate=True; with
validate=False the ops must handle the same data on the device the documented way (no wrap-around).
"""

import math
from typing import Callable, Dict, List, NamedTuple

import numpy as np
import pytest
import torch

import kangaroo_kernels as kk
from kangaroo_kernels.compat import flashinfer as fi_compat
from kangaroo_kernels.compat import sglang as sgl_compat
from kangaroo_kernels.compat import vllm as vllm_compat
from kangaroo_kernels.types import Accepted, AdapterWeights, LmHeadExit, LmHeadTopk, LookupTree, Tree

DEVS = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
I32, I64, F32 = torch.int32, torch.int64, torch.float32
BIG = 2 ** 32  # an int64 value that narrows to 0 by wrap-around

pytestmark = pytest.mark.usefixtures("one_thread")


class Call(NamedTuple):
    fn: Callable
    kw: Dict
    keep: List[str]      # paths of tensors that must not change on a rejected call
    defining: List[str]  # paths whose shape defines B, N, ... (a size change is reported on another argument)


def _get(kw, path):
    head, *rest = path.split(".")
    v = kw[head]
    return getattr(v, rest[0]) if rest else v


def _set(kw, path, value):
    kw = dict(kw)
    head, *rest = path.split(".")
    kw[head] = kw[head]._replace(**{rest[0]: value}) if rest else value
    return kw


def _ints(shape, hi, dev, dtype=I32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, hi, shape, generator=g).to(dtype=dtype, device=dev)


def _randn(shape, dev, dtype=F32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype=dtype, device=dev)


def _accepted(B, N, dev):
    return Accepted(torch.full((B,), 7, dtype=I32, device=dev), torch.full((B, N + 1), 7, dtype=I32, device=dev),
                    torch.full((B, N + 1), 7, dtype=I32, device=dev))


def _tree(dev, B=2, N=4):
    return kk.build_tree(torch.tensor([[-1, 0, 0, 1]] * B, dtype=I32, device=dev)[:, :N])


OPS: Dict[str, Callable[[torch.device], Call]] = {}


def op(name):
    def reg(f):
        OPS[name] = f
        return f
    return reg


@op("verify_greedy")
def _vg(dev):
    B, N, V = 2, 3, 5
    kw = dict(draft_tokens=_ints((B, N), V, dev), target=_randn((B, N + 1, V), dev),
              parents=torch.tensor([[-1, 0, 1]] * B, dtype=I32, device=dev), out=_accepted(B, N, dev),
              validate=True)
    return Call(lambda **k: kk.verify_greedy(k.pop("draft_tokens"), k.pop("target"), **k), kw,
                ["out.accept_len", "out.path", "out.tokens"], ["draft_tokens"])


@op("verify_greedy_tree")
def _vgt(dev):
    B, N, V = 2, 4, 5
    kw = dict(draft_tokens=_ints((B, N), V, dev), target=_ints((B, N + 1), V, dev), tree=_tree(dev),
              out=_accepted(B, N, dev), validate=True)
    return Call(lambda **k: kk.verify_greedy(k.pop("draft_tokens"), k.pop("target"), **k), kw,
                ["out.accept_len", "out.path", "out.tokens"], ["draft_tokens", "tree.depth"])


@op("verify_sample")
def _vs(dev):
    B, N, V = 2, 3, 6
    q = torch.softmax(_randn((B, N, V), dev, seed=1), -1)
    kw = dict(draft_tokens=_ints((B, N), V, dev), target_logits=_randn((B, N + 1, V), dev), draft_probs=q,
              parents=torch.tensor([[-1, 0, 0]] * B, dtype=I32, device=dev),
              temperature=torch.tensor([0.7, 0.0], device=dev), top_k=torch.tensor([0, 3], device=dev),
              top_p=torch.tensor([1.0, 0.9], device=dev), seed=torch.tensor([1, 2], device=dev),
              offset=torch.tensor([5, 6], device=dev), out=_accepted(B, N, dev), validate=True)
    return Call(lambda **k: kk.verify_sample(k.pop("draft_tokens"), k.pop("target_logits"), **k), kw,
                ["out.accept_len", "out.path", "out.tokens", "offset"], ["draft_tokens"])


@op("verify_sample_uniforms")
def _vsu(dev):
    B, N, V = 2, 3, 6
    kw = dict(draft_tokens=_ints((B, N), V, dev), target_logits=_randn((B, N + 1, V), dev),
              uniforms=torch.full((B, N + 1), 0.5, device=dev), temperature=0.8, out=_accepted(B, N, dev),
              validate=True)
    return Call(lambda **k: kk.verify_sample(k.pop("draft_tokens"), k.pop("target_logits"), **k), kw,
                ["out.accept_len", "out.path", "out.tokens"], ["draft_tokens"])


@op("build_tree")
def _bt(dev):
    B, N = 2, 4
    W = 1
    out = Tree(*(torch.full(s, 7, dtype=I32, device=dev) for s in ((B, N), (B, N, W), (B, N), (B, N), (B,))),
               torch.zeros((B, N), dtype=I32, device=dev))
    kw = dict(parents=torch.tensor([[-1, 0, 0, 1]] * B, dtype=I32, device=dev),
              num_nodes=torch.tensor([4, 3], dtype=I32, device=dev), out=out, validate=True)
    return Call(lambda **k: kk.build_tree(k.pop("parents"), **k), kw,
                ["out.depth", "out.mask", "out.first_child", "out.next_sibling", "out.root_first_child"],
                ["parents"])


@op("compact_kv")
def _ckv(dev):
    L, B, Hk, S, Dh = 2, 2, 1, 12, 4
    kw = dict(k_cache=_randn((L, B, Hk, S, Dh), dev), v_cache=_randn((L, B, Hk, S, Dh), dev, seed=1),
              cache_lens=torch.tensor([2, 5], dtype=I32, device=dev),
              path=torch.tensor([[0, 2, -1, -1], [1, -1, -1, -1]], dtype=I32, device=dev),
              accept_len=torch.tensor([2, 1], dtype=I32, device=dev), validate=True)
    return Call(lambda **k: kk.compact_kv(k.pop("k_cache"), k.pop("v_cache"), k.pop("cache_lens"), k.pop("path"),
                                          k.pop("accept_len"), **k), kw,
                ["k_cache", "v_cache", "cache_lens"], ["k_cache"])


@op("lm_head_exit")
def _lhe(dev):
    B, D, V = 2, 8, 11
    out = LmHeadExit(torch.full((B,), 7, dtype=I32, device=dev), torch.full((B,), 7.0, device=dev),
                     torch.zeros(B, dtype=torch.bool, device=dev), torch.full((B,), 7.0, device=dev),
                     torch.full((B, V), 7.0, device=dev))
    kw = dict(hidden=_randn((B, D), dev), lm_head_weight=_randn((V, D), dev, seed=1), threshold=0.5,
              norm_weight=torch.ones(D, device=dev), active=torch.ones(B, dtype=torch.bool, device=dev),
              temperature=torch.tensor([0.5, 0.0], device=dev), top_k=torch.tensor([3, 2], dtype=I32, device=dev),
              top_p=torch.tensor([0.9, 0.5], device=dev), seed=torch.tensor([1, 2], device=dev),
              offset=torch.tensor([0, 3], device=dev), return_probs=True, out=out, validate=True)
    return Call(lambda **k: kk.lm_head_exit(k.pop("hidden"), k.pop("lm_head_weight"), k.pop("threshold"), **k), kw,
                ["out.token", "out.conf", "out.active", "out.token_prob", "out.probs", "offset"], ["hidden"])


@op("lm_head_topk")
def _lht(dev):
    B, D, V, K = 2, 8, 11, 3
    out = LmHeadTopk(torch.full((B, K), 7, dtype=I32, device=dev), torch.full((B, K), 7.0, device=dev))
    kw = dict(hidden=_randn((B, D), dev), lm_head_weight=_randn((V, D), dev, seed=1), k=K,
              norm_weight=torch.ones(D, device=dev), out=out)
    return Call(lambda **k: kk.lm_head_topk(k.pop("hidden"), k.pop("lm_head_weight"), k.pop("k"), **k), kw,
                ["out.tokens", "out.logprobs"], ["hidden"])


@op("append_attention")
def _aa(dev):
    B, T, Hq, Hk, Dh, S = 2, 3, 2, 1, 32, 10
    kw = dict(q=_randn((B, T, Hq, Dh), dev), k_new=_randn((B, T, Hk, Dh), dev, seed=1),
              v_new=_randn((B, T, Hk, Dh), dev, seed=2), k_cache=_randn((B, Hk, S, Dh), dev, seed=3),
              v_cache=_randn((B, Hk, S, Dh), dev, seed=4), cache_lens=torch.tensor([2, 4], dtype=I32, device=dev),
              tree_mask=_tree(dev, B, T).mask, active=torch.ones(B, dtype=torch.bool, device=dev),
              positions=torch.tensor([[2, 3, 3], [4, 5, 5]], dtype=I32, device=dev),
              rope_cos_sin=kk.make_rope_cos_sin(16, Dh, device=dev), out=torch.full((B, T, Hq, Dh), 7.0, device=dev),
              validate=True)
    names = ["q", "k_new", "v_new", "k_cache", "v_cache", "cache_lens"]
    return Call(lambda **k: kk.append_attention(*[k.pop(n) for n in names], **k), kw,
                ["k_cache", "v_cache", "cache_lens", "out"], ["q"])


def _adapter_weights(dev, D, Hq, Hk, Dh, bias=True):
    r = lambda *s, seed=0: _randn(s, dev, seed=seed) * 0.1  # noqa: E731
    return AdapterWeights(torch.ones(D, device=dev), r(Hq * Dh, D), r(Hk * Dh, D, seed=1), r(Hk * Dh, D, seed=2),
                          r(D, Hq * Dh, seed=3), torch.ones(D, device=dev), Hq, Hk,
                          *((r(Hq * Dh, seed=4), r(Hk * Dh, seed=5), r(Hk * Dh, seed=6)) if bias else ()))


@op("adapter_forward")
def _af(dev):
    B, D, Hq, Hk, Dh, S = 2, 16, 2, 1, 32, 8
    kw = dict(h=_randn((B, D), dev), weights=_adapter_weights(dev, D, Hq, Hk, Dh),
              k_cache=_randn((B, Hk, S, Dh), dev, seed=3), v_cache=_randn((B, Hk, S, Dh), dev, seed=4),
              cache_lens=torch.tensor([2, 4], dtype=I32, device=dev), positions=torch.tensor([2, 4], device=dev),
              active=torch.ones(B, dtype=torch.bool, device=dev), rope_cos_sin=kk.make_rope_cos_sin(16, Dh, device=dev),
              out=torch.full((B, D), 7.0, device=dev), validate=True)
    names = ["h", "weights", "k_cache", "v_cache", "cache_lens", "positions"]
    return Call(lambda **k: kk.adapter_forward(*[k.pop(n) for n in names], **k), kw,
                ["k_cache", "v_cache", "cache_lens", "out"], ["h"])


@op("ngram_lookup")
def _ng(dev):
    B, M = 2, 3
    out = (torch.full((B, M), 7, dtype=I32, device=dev), torch.full((B,), 7, dtype=I32, device=dev))
    kw = dict(history=torch.tensor([[1, 2, 3, 1, 2, 0, 0, 0, 0], [4, 4, 5, 4, 4, 5, 4, 0, 0]], device=dev),
              lens=torch.tensor([5, 7], device=dev), n_min=1, n_max=3, M=M, out=out, validate=True)
    return Call(lambda **k: kk.ngram_lookup(*[k.pop(n) for n in ("history", "lens", "n_min", "n_max", "M")], **k),
                kw, [], ["history"])


@op("merge_lookup_tree")
def _ml(dev):
    B, N, M = 2, 4, 3
    out = LookupTree(*(torch.full(s, 7, dtype=I32, device=dev) for s in ((B, N + M),) * 3 + ((B,), (B, M))))
    kw = dict(draft=_ints((B, N), 5, dev), look=_ints((B, M), 5, dev, seed=1), n_look=torch.tensor([3, 1], device=dev),
              parents=torch.tensor([[-1, 0, 0, 1]] * B, dtype=I32, device=dev), out=out, validate=True)
    return Call(lambda **k: kk.merge_lookup_tree(k.pop("draft"), k.pop("look"), **k), kw,
                ["out.tokens", "out.parents", "out.source", "out.n_shared", "out.lookup_nodes"], ["draft"])


@op("tree_to_flashinfer_mask")
def _tfm(dev):
    return Call(lambda **k: kk.tree_to_flashinfer_mask(k["tree"], k["prefix_lens"]),
                dict(tree=_tree(dev), prefix_lens=[3, 0]), [], ["tree.depth"])


@op("tree_to_sglang")
def _tsg(dev):
    kw = dict(tree=_tree(dev), draft_tokens=_ints((2, 4), 9, dev), root_tokens=torch.tensor([1, 2], device=dev))
    return Call(lambda **k: kk.tree_to_sglang(k.pop("tree"), **k), kw, [], ["tree.depth"])


@op("compat.flashinfer.chain_speculative_sampling")
def _fi(dev):
    B, N, V = 2, 3, 6
    kw = dict(draft_probs=torch.softmax(_randn((B, N, V), dev), -1), draft_token_ids=_ints((B, N), V, dev),
              target_probs=torch.softmax(_randn((B, N + 1, V), dev, seed=1), -1),
              maybe_output_accepted_token_num=torch.zeros(B, dtype=I32, device=dev),
              maybe_output_emitted_draft_token_num=torch.zeros(B, dtype=I32, device=dev), seed=3, offset=0)
    return Call(lambda **k: fi_compat.chain_speculative_sampling(**k), kw,
                ["maybe_output_accepted_token_num", "maybe_output_emitted_draft_token_num"], ["draft_token_ids"])


@op("compat.sglang.verify_tree_greedy")
def _sg(dev):
    t = _tree(dev)
    sg = kk.tree_to_sglang(t, _ints((2, 4), 6, dev), torch.tensor([1, 2], device=dev))
    bs, D = sg.candidates.shape
    kw = dict(predicts=torch.full((bs * D,), 7, dtype=I32, device=dev),
              accept_index=torch.full((bs, 3), 7, dtype=I32, device=dev),
              accept_token_num=torch.full((bs,), 7, dtype=I32, device=dev), candidates=sg.candidates,
              retrive_index=sg.retrive_index, retrive_next_token=sg.retrive_next_token,
              retrive_next_sibling=sg.retrive_next_sibling, target_predict=_ints((bs, D), 6, dev, I64, seed=2))
    return Call(lambda **k: sgl_compat.verify_tree_greedy(**k), kw, ["predicts", "accept_index", "accept_token_num"],
                ["candidates"])


@op("compat.vllm.rejection_sample_from_logits")
def _vl(dev):
    n, V = [2, 1], 6
    T = sum(n)
    kw = dict(draft_token_ids=_ints((T,), V, dev), cu_num_draft_tokens=torch.tensor([2, 3], dtype=I32, device=dev),
              max_spec_len=2, target_logits=_randn((T + len(n), V), dev),
              temperature=torch.tensor([0.5, 0.0], device=dev), seed=torch.tensor([1, 2], device=dev),
              offset=torch.tensor([0, 0], device=dev))
    return Call(lambda **k: vllm_compat.rejection_sample_from_logits(**k), kw, ["offset"], ["draft_token_ids"])


# ----------------------------------------------------------------------------------- bad tensor arguments
def _mutations(t: torch.Tensor, defining: bool):
    """(id, bad value) pairs for a good tensor argument t."""
    out = [("list", lambda t: t.tolist()), ("number", lambda t: 1.0), ("numpy", lambda t: t.cpu().numpy()),
           ("string", lambda t: "x")]
    if t.dtype == torch.bool:
        out += [("dtype_int32", lambda t: t.to(I32))]
    elif t.is_floating_point():
        out += [("dtype_int32", lambda t: t.to(I32)), ("dtype_bool", lambda t: t.bool())]
        if t.dtype == F32:
            out += [("dtype_float64", lambda t: t.double())]
    else:
        out += [("dtype_float32", lambda t: t.float()), ("dtype_bool", lambda t: t.bool()),
                ("dtype_int16", lambda t: t.to(torch.int16))]
    out += [("rank_plus", lambda t: t.unsqueeze(0)),
            ("rank_minus", lambda t: t.flatten() if t.dim() > 1 else t.reshape(-1)[0])]
    if not defining:
        out += [("size_dim0", lambda t: torch.cat([t, t[:1]], 0)),
                ("meta", lambda t: t.to("meta"))]
        if t.dim() > 1:
            out += [("size_last", lambda t: torch.cat([t, t[..., :1]], -1))]
    return out


def _tensor_paths(kw):
    for k, v in kw.items():
        if isinstance(v, torch.Tensor):
            yield k
        elif isinstance(v, tuple) and hasattr(v, "_fields"):
            for f in v._fields:
                if isinstance(getattr(v, f), torch.Tensor):
                    yield f"{k}.{f}"


# mutations that are legitimate calls, not bad ones (each is exercised as accepted in test_legit_mutations)
LEGIT = {
    # a free size: V, max_pos, N + 1 or M is whatever the tensor says
    "verify_greedy-target-size_last", "verify_sample_uniforms-target_logits-size_last",
    "lm_head_topk-lm_head_weight-size_dim0", "append_attention-rope_cos_sin-size_dim0",
    "adapter_forward-rope_cos_sin-size_dim0", "compact_kv-path-size_last",
    # a scalar where a [B] tensor is optional, and float64 where float64 is accepted
    "verify_sample-temperature-number", "verify_sample-top_p-number", "lm_head_exit-temperature-number",
    "verify_sample-temperature-dtype_float64", "verify_sample-top_p-dtype_float64",
    "lm_head_exit-temperature-dtype_float64", "verify_sample_uniforms-uniforms-dtype_float64",
    "lm_head_exit-top_p-number", "lm_head_exit-top_p-dtype_float64",
    "compat.vllm.rejection_sample_from_logits-target_logits-size_last",
    "compat.vllm.rejection_sample_from_logits-temperature-number",
    "compat.vllm.rejection_sample_from_logits-temperature-dtype_float64",
    # SGLang's flat predicts buffer may be longer than bs * D; num_spec_step is free
    "compat.sglang.verify_tree_greedy-predicts-size_dim0", "compat.sglang.verify_tree_greedy-accept_index-size_last",
}
# a free size that then contradicts another argument, which the message names
ELSEWHERE = {"verify_sample-target_logits-size_last": "draft_probs", "lm_head_exit-lm_head_weight-size_dim0":
             "out.probs", "merge_lookup_tree-look-size_last": "out.tokens",
             "compat.flashinfer.chain_speculative_sampling-target_probs-size_last": "draft_probs",
             "compat.vllm.rejection_sample_from_logits-cu_num_draft_tokens-size_dim0": "target_logits"}
IGNORED = {"build_tree-out.parents"}  # documented: out's parents field is ignored (the result holds the input)


def _tensor_cases():
    cases, legit = [], []
    cpu = torch.device("cpu")
    for name, build in OPS.items():
        c = build(cpu)
        for path in _tensor_paths(c.kw):
            if f"{name}-{path}" in IGNORED:
                continue
            t = _get(c.kw, path)
            for mid, _ in _mutations(t, path in c.defining):
                cid = f"{name}-{path}-{mid}"
                (legit if cid in LEGIT else cases).append(pytest.param(name, path, mid, id=cid))
    assert len(legit) == len(LEGIT), "a LEGIT entry matches no case"
    return cases, legit


TENSOR_CASES, LEGIT_CASES = _tensor_cases()


def _snap(c):
    return {p: _get(c.kw, p).clone() for p in c.keep}


def _assert_unchanged(c, snaps):
    for p, s in snaps.items():
        assert torch.equal(_get(c.kw, p), s), f"{p} was modified by a rejected call"


def _expect_bad(c, kw, name):
    snaps = _snap(c)
    with pytest.raises(ValueError) as e:
        c.fn(**kw)
    assert name in str(e.value), f"the message does not name {name!r}: {e.value}"
    _assert_unchanged(c, snaps)
    return str(e.value)


@pytest.mark.parametrize("dev", DEVS)
@pytest.mark.parametrize("op_name,path,mid", TENSOR_CASES)
def test_bad_tensor_argument(dev, op_name, path, mid):
    c = OPS[op_name](torch.device(dev))
    t = _get(c.kw, path)
    bad = dict(_mutations(t, path in c.defining))[mid](t)
    _expect_bad(c, _set(c.kw, path, bad), ELSEWHERE.get(f"{op_name}-{path}-{mid}", path))


@pytest.mark.parametrize("dev", DEVS)
@pytest.mark.parametrize("op_name,path,mid", LEGIT_CASES)
def test_legit_mutations(dev, op_name, path, mid):
    c = OPS[op_name](torch.device(dev))
    t = _get(c.kw, path)
    c.fn(**_set(c.kw, path, dict(_mutations(t, path in c.defining))[mid](t)))


@pytest.mark.parametrize("dev", DEVS)
@pytest.mark.parametrize("op_name", sorted(OPS))
def test_good_call_runs(dev, op_name):
    """The baseline of every hostile case: the unmodified call is accepted."""
    c = OPS[op_name](torch.device(dev))
    c.fn(**c.kw)


# ----------------------------------------------------------------------------------- bad scalars
NOT_NUMBERS = ["x", None, [1.0], torch.ones(2), True]
SCALAR_CASES = {
    ("verify_sample_uniforms", "temperature"): [1e-40, 1e-50, -1.0, 0.0, math.nan, math.inf, "x", [1.0], True],
    ("verify_sample_uniforms", "top_k"): [-1, 1.5, "3", True, None],
    ("verify_sample_uniforms", "top_p"): [0.0, 1.5, math.nan, "x", None],
    ("lm_head_exit", "threshold"): [math.nan, "x", None, True],
    ("lm_head_exit", "eps"): [math.inf, -1.0, math.nan, "x", None],
    ("lm_head_exit", "top_k"): [-1, 1.5, "3", True, None],
    ("lm_head_exit", "top_p"): [0.0, 1.5, math.nan, "x", None],
    ("lm_head_topk", "k"): [0, 17, 12, 2.0, "3", True, None],
    ("lm_head_topk", "eps"): [math.inf, -1e-3, "x"],
    ("append_attention", "sm_scale"): [math.nan, math.inf, -math.inf, 0.0, -0.5, "x", True, [0.1]],
    ("append_attention", "num_splits"): [0, -1, 1.5, "2", True],
    ("adapter_forward", "eps"): [math.inf, -1.0, math.nan, "x", True],
    ("adapter_forward", "weights.num_heads"): ["2", 2.0, None, 0, True],
    ("adapter_forward", "weights.num_kv_heads"): ["1", 1.0, None, 0],
    ("ngram_lookup", "n_min"): [0, -1, 1.0, "1", True, None, 2 ** 31],
    ("ngram_lookup", "n_max"): [0, 2.5, "3", None],
    ("ngram_lookup", "M"): [0, 3.0, "3", None, 2 ** 40],
    ("compat.flashinfer.chain_speculative_sampling", "seed"): ["x", 1.5, None if False else [1], True],
    ("compat.flashinfer.chain_speculative_sampling", "offset"): ["x", 1.5, True],
    ("compat.vllm.rejection_sample_from_logits", "max_spec_len"): [-1, 1.5, "2", True, None, 2 ** 40],
    ("compat.vllm.rejection_sample_from_logits", "top_k"): [-1, 1.5, "2", True],
    ("compat.vllm.rejection_sample_from_logits", "top_p"): [0.0, 1.5, math.nan, "x"],
    ("tree_to_flashinfer_mask", "prefix_lens"): [1.5, -1, "3", None, [1], [1, 2, 3], [1.5, 2], [np.float32(1), 2],
                                                 torch.tensor([1.0, 2.0]), torch.tensor([[1, 2]]), {0: 1}, True,
                                                 2 ** 40],
}


def _scalar_cases():
    out = []
    for (name, arg), vals in SCALAR_CASES.items():
        for i, v in enumerate(vals):
            out.append(pytest.param(name, arg, i, id=f"{name}-{arg}-{i}-{str(v)[:12]}"))
    return out


@pytest.mark.parametrize("dev", DEVS)
@pytest.mark.parametrize("op_name,arg,i", _scalar_cases())
def test_bad_scalar(dev, op_name, arg, i):
    c = OPS[op_name](torch.device(dev))
    v = SCALAR_CASES[(op_name, arg)][i]
    if isinstance(v, torch.Tensor) and arg != "prefix_lens":
        v = v.to(dev)
    _expect_bad(c, _set(c.kw, arg, v), arg)


def test_adapter_forward_rope_theta(device):
    c = OPS["adapter_forward"](device)
    for v in (0.0, -1.0, math.inf, math.nan, "x", None, True):
        _expect_bad(c, _set(_set(c.kw, "rope_cos_sin", None), "rope_theta", v), "rope_theta")


def test_adapter_weights_from_wqkv_head_counts():
    w = torch.zeros(64, 8)
    for name, kw in (("num_heads", dict(num_heads="1", num_kv_heads=1)), ("num_heads", dict(num_heads=0,
                                                                                              num_kv_heads=1)),
                     ("num_kv_heads", dict(num_heads=1, num_kv_heads=1.0))):
        with pytest.raises(ValueError, match=name):
            AdapterWeights.from_wqkv(w[0], w, w, w[0], **kw)
    with pytest.raises(ValueError, match="wqkv"):
        AdapterWeights.from_wqkv(w[0], "w", w, w[0], 1, 1)
    assert AdapterWeights.from_wqkv(w[0], torch.zeros(96, 8), w, w[0], np.int64(1), np.int32(1)).head_dim == 32


def test_verify_greedy_target_not_a_tensor(device):
    """Issue 15, class 3: the target was used before it was checked."""
    c = OPS["verify_greedy"](device)
    for v in (1.0, None, "x", [[1, 2]], np.zeros((2, 4, 5), dtype=np.float32)):
        _expect_bad(c, _set(c.kw, "target", v), "target")


# ----------------------------------------------------------------------------------- bad device data
def _bad_data(c, changes, name, validate=True):
    kw = dict(c.kw, validate=validate)
    for path, v in changes.items():
        kw = _set(kw, path, v)
    return _expect_bad(c, kw, name)


def _run(c, changes, validate=False):
    kw = dict(c.kw, validate=validate)
    for path, v in changes.items():
        kw = _set(kw, path, v)
    return c.fn(**kw)


def _eq(a, b):
    if isinstance(a, tuple):
        return all(_eq(x, y) for x, y in zip(a, b)) and len(a) == len(b)
    if a is None or b is None:
        return a is b
    return torch.equal(a, b)


def _clone_out(kw):
    """A fresh copy of every tensor (buffers, caches) so two runs do not share state."""
    def cl(v):
        if isinstance(v, torch.Tensor):
            return v.clone()
        if isinstance(v, tuple) and hasattr(v, "_fields"):
            return type(v)(*(cl(x) for x in v))
        if isinstance(v, tuple):
            return tuple(cl(x) for x in v)
        return v
    return {k: cl(v) for k, v in kw.items()}


def _same_as(dev, op_name, bad, good, validate=False, compare=None):
    """The op on `bad` (int64 values that must not wrap) equals the op on `good` (their documented meaning)."""
    c = OPS[op_name](dev)
    kb, kg = _clone_out(c.kw), _clone_out(c.kw)
    for p, v in bad.items():
        kb = _set(kb, p, v)
    for p, v in good.items():
        kg = _set(kg, p, v)
    rb = c.fn(**dict(kb, validate=validate))
    rg = c.fn(**dict(kg, validate=validate))
    # a Tree's parents field is the (narrowed) input itself
    assert _eq(rb[:5], rg[:5]) if isinstance(rb, Tree) else _eq(rb, rg)
    for p in compare or ():
        assert torch.equal(_get(kb, p).long(), _get(kg, p).long()), p
    return rb


@pytest.mark.parametrize("dev", DEVS)
def test_verify_greedy_int64_ids_do_not_wrap(dev):
    dev = torch.device(dev)
    c = OPS["verify_greedy_tree"](dev)
    draft = torch.tensor([[4, 1, 2, 3]] * 2, dtype=I64, device=dev)
    target = torch.tensor([[BIG + 4, 1, 2, 3, 0], [4, 1, 2, 3, 0]], dtype=I64, device=dev)
    _bad_data(c, {"draft_tokens": draft, "target": target}, "target")
    _bad_data(c, {"draft_tokens": draft + torch.tensor([[BIG], [0]], device=dev), "target": target.abs() % BIG},
              "draft_tokens")
    _bad_data(c, {"draft_tokens": draft, "target": target - 2 * BIG}, "target")
    # without validation a wrapped id matches nothing: row 0 accepts no draft (its 2^32 + 4 is not token 4)
    acc = _run(c, {"draft_tokens": draft, "target": target})
    assert acc.accept_len.tolist()[0] == 0 and acc.tokens[0, 0].item() != 4
    acc = _run(c, {"draft_tokens": draft + torch.tensor([[BIG], [0]], device=dev), "target": target % BIG})
    assert acc.accept_len[0].item() == 0
    # chain with logits: an int64 draft id >= V is rejected; unvalidated it is padding (never accepted)
    c = OPS["verify_greedy"](dev)
    tgt = c.kw["target"]
    good = tgt.argmax(-1)[:, :3].to(I64)
    assert _run(c, {"draft_tokens": good, "parents": None}).accept_len.tolist() == [3, 3]
    _bad_data(c, {"draft_tokens": good + BIG, "parents": None}, "draft_tokens")
    _same_as(dev, "verify_greedy", {"draft_tokens": good + BIG, "parents": None},
             {"draft_tokens": torch.full_like(good, -1), "parents": None})


@pytest.mark.parametrize("dev", DEVS)
def test_verify_sample_int64_ids_do_not_wrap(dev):
    dev = torch.device(dev)
    c = OPS["verify_sample_uniforms"](dev)
    d = c.kw["draft_tokens"].to(I64)
    bad = d.clone()
    bad[0, 0] = BIG + int(d[0, 0])
    _bad_data(c, {"draft_tokens": bad}, "draft_tokens")
    pad = d.clone()
    pad[0, 0] = -1
    _same_as(dev, "verify_sample_uniforms", {"draft_tokens": bad}, {"draft_tokens": pad})
    # int64 parents outside int32 are out of range (the node is never reached), not parent 0
    c = OPS["verify_sample"](dev)
    par = c.kw["parents"].to(I64)
    pb = par.clone()
    pb[:, 2] = BIG
    _bad_data(c, {"parents": pb}, "parents")
    pg = par.clone()
    pg[:, 2] = 2  # parents[j] = j: not topological, never reached
    _same_as(dev, "verify_sample", {"parents": pb, "offset": c.kw["offset"].clone()},
             {"parents": pg, "offset": c.kw["offset"].clone()}, compare=["offset"])
    # int64 top_k rows beyond int32 mean "off", as top_k >= V does
    _same_as(dev, "verify_sample", {"top_k": torch.tensor([BIG + 1, 3], device=dev), "offset": c.kw["offset"].clone()},
             {"top_k": torch.tensor([0, 3], device=dev), "offset": c.kw["offset"].clone()}, validate=True)
    # the scalar top_k likewise (it does not wrap in the kernel)
    cu = OPS["verify_sample_uniforms"](dev)
    ra = _run(cu, {"top_k": 2 ** 40}, validate=True)
    rb = _run(cu, {"top_k": 0}, validate=True)
    assert _eq(ra, rb)


@pytest.mark.parametrize("dev", DEVS)
def test_lm_head_exit_filter_rows(dev):
    """Per-row top_k / top_p data: bad rows raise when validating; int64 top_k rows beyond int32 mean "off" (as
    top_k >= V does), also unvalidated, and a scalar top_k >= V is off."""
    dev = torch.device(dev)
    c = OPS["lm_head_exit"](dev)
    _bad_data(c, {"top_k": torch.tensor([-1, 2], device=dev)}, "top_k")
    for bad in (0.0, -0.5, 1.5, math.nan):
        _bad_data(c, {"top_p": torch.tensor([0.9, bad], device=dev)}, "top_p")
    off = c.kw["offset"]
    # top_p off: a top_k wrapped to 1 would make row 0's probs one-hot instead of its full softmax
    assert int((_run(c, {"top_p": 1.0, "top_k": 0}).probs[0] > 0).sum()) > 1
    for validate in (True, False):
        _same_as(dev, "lm_head_exit", {"top_k": torch.tensor([BIG + 1, 3], device=dev), "top_p": 1.0,
                                       "offset": off.clone()},
                 {"top_k": torch.tensor([0, 3], device=dev), "top_p": 1.0, "offset": off.clone()}, validate=validate,
                 compare=["offset"])
    _same_as(dev, "lm_head_exit", {"top_k": BIG + 1, "top_p": 1.0, "offset": off.clone()},
             {"top_k": 0, "top_p": 1.0, "offset": off.clone()}, validate=True)


@pytest.mark.parametrize("dev", DEVS)
def test_build_tree_int64_does_not_wrap(dev):
    dev = torch.device(dev)
    c = OPS["build_tree"](dev)
    par = c.kw["parents"].to(I64)
    pb = par.clone()
    pb[:, 3] = BIG  # wraps to 0: node 3 would become a child of node 0
    _bad_data(c, {"parents": pb}, "parents")
    pg = par.clone()
    pg[:, 3] = 3
    t = _same_as(dev, "build_tree", {"parents": pb}, {"parents": pg}, compare=[])
    assert t.depth[:, 3].tolist() == [-1, -1]
    nb = torch.tensor([BIG + 2, 3], dtype=I64, device=dev)
    _bad_data(c, {"num_nodes": nb}, "num_nodes")
    _same_as(dev, "build_tree", {"num_nodes": nb}, {"num_nodes": torch.tensor([4, 3], device=dev)})
    _same_as(dev, "build_tree", {"num_nodes": -nb}, {"num_nodes": torch.tensor([0, -3], device=dev)})


@pytest.mark.parametrize("dev", DEVS)
def test_compact_kv_int64_does_not_wrap(dev):
    dev = torch.device(dev)
    c = OPS["compact_kv"](dev)
    lens, path, acc = (c.kw[k].to(I64) for k in ("cache_lens", "path", "accept_len"))
    # validation names the argument and changes nothing
    _bad_data(c, {"accept_len": acc + BIG, "cache_lens": lens.clone()}, "accept_len")
    pb = path.clone()
    pb[0, 1] = BIG + 2
    _bad_data(c, {"path": pb, "cache_lens": lens.clone()}, "path")
    _bad_data(c, {"cache_lens": lens + BIG}, "cache_lens")
    # unvalidated: accept_len 2^32 + 1 is clamped to N (not 1), a path entry 2^32 + 2 moves nothing (not node 2),
    # a row with cache_lens 2^32 + 2 is left alone (and keeps its value, not 2)
    _same_as(dev, "compact_kv", {"accept_len": acc + BIG, "cache_lens": lens.clone()},
             {"accept_len": torch.tensor([99, 99], device=dev), "cache_lens": lens.clone()},
             compare=["k_cache", "v_cache", "cache_lens"])
    pg = path.clone()
    pg[0, 1] = 99
    _same_as(dev, "compact_kv", {"path": pb, "cache_lens": lens.clone()}, {"path": pg, "cache_lens": lens.clone()},
             compare=["k_cache", "v_cache", "cache_lens"])
    kb = _clone_out(c.kw)
    big = torch.tensor([BIG + 2, 5], dtype=I64, device=dev)
    kc = kb["k_cache"].clone()
    kk.compact_kv(kb["k_cache"], kb["v_cache"], big, kb["path"], kb["accept_len"], validate=False)
    assert big.tolist() == [BIG + 2, 6]
    assert torch.equal(kb["k_cache"][:, 0], kc[:, 0])


@pytest.mark.parametrize("dev", DEVS)
def test_attention_int64_lengths_do_not_wrap(dev):
    dev = torch.device(dev)
    c = OPS["append_attention"](dev)
    S = c.kw["k_cache"].shape[2]
    lens = torch.tensor([BIG + 1, 4], dtype=I64, device=dev)  # wraps to 1: would write positions 1..3 of row 0
    _bad_data(c, {"cache_lens": lens}, "cache_lens")
    _same_as(dev, "append_attention", {"cache_lens": lens, "positions": None, "rope_cos_sin": None},
             {"cache_lens": torch.tensor([S, 4], device=dev), "positions": None, "rope_cos_sin": None},
             compare=["k_cache", "v_cache", "out"])
    pos = torch.tensor([[BIG + 2, 3, 3], [4, 5, 5]], dtype=I64, device=dev)
    _bad_data(c, {"positions": pos}, "positions")
    _same_as(dev, "append_attention", {"positions": pos},
             {"positions": torch.tensor([[15, 3, 3], [4, 5, 5]], device=dev)}, compare=["k_cache", "out"])
    c = OPS["adapter_forward"](dev)
    _bad_data(c, {"cache_lens": lens}, "cache_lens")
    _bad_data(c, {"positions": torch.tensor([BIG + 2, 4], device=dev)}, "positions")
    _bad_data(c, {"positions": torch.tensor([BIG + 2, 4], device=dev), "rope_cos_sin": None}, "positions")
    _same_as(dev, "adapter_forward", {"cache_lens": lens}, {"cache_lens": torch.tensor([S, 4], device=dev)},
             compare=["k_cache", "v_cache", "out"])
    _same_as(dev, "adapter_forward", {"positions": torch.tensor([BIG + 2, 4], device=dev)},
             {"positions": torch.tensor([15, 4], device=dev)}, compare=["k_cache", "out"])


@pytest.mark.parametrize("dev", DEVS)
def test_lookup_ops_int64_do_not_wrap(dev):
    dev = torch.device(dev)
    c = OPS["merge_lookup_tree"](dev)
    d = c.kw["draft"].to(I64)
    db = d.clone()
    db[0, 1] = BIG + int(d[0, 1])
    _bad_data(c, {"draft": db}, "draft")
    dg = d.clone()
    dg[0, 1] = -1
    _same_as(dev, "merge_lookup_tree", {"draft": db}, {"draft": dg})
    lk = c.kw["look"].to(I64)
    lb = lk.clone()
    lb[1, 0] = BIG + 1
    _bad_data(c, {"look": lb}, "look")
    lg = lk.clone()
    lg[1, 0] = -1
    _same_as(dev, "merge_lookup_tree", {"look": lb}, {"look": lg})
    pb = c.kw["parents"].to(I64)
    pb[:, 2] = BIG
    _bad_data(c, {"parents": pb}, "parents")
    c = OPS["ngram_lookup"](dev)
    _bad_data(c, {"lens": torch.tensor([BIG + 5, 7], device=dev)}, "lens")
    _same_as(dev, "ngram_lookup", {"lens": torch.tensor([BIG + 5, 7], device=dev)},
             {"lens": torch.tensor([9, 7], device=dev)})
    h = c.kw["history"].clone()
    h[0, 2] = BIG + 3
    _bad_data(c, {"history": h}, "history")


# ----------------------------------------------------------------------------------- tiny temperatures
TINY = [1e-40, 1e-45, 1e-300, 2.9e-39]  # fl32(1 / T) overflows (3e-39 does not)


@pytest.mark.parametrize("dev", DEVS)
@pytest.mark.parametrize("t", TINY)
def test_tiny_temperature_one_rule(dev, t):
    dev = torch.device(dev)
    for validate in (True, False):  # a scalar is host data: always checked
        _bad_data(OPS["verify_sample_uniforms"](dev), {"temperature": t}, "temperature", validate=validate)
        _bad_data(OPS["lm_head_exit"](dev), {"temperature": t, "seed": None, "offset": None}, "temperature",
                  validate=validate)
    for dt in (torch.float32, torch.float64):
        rows = torch.tensor([t, 0.5], dtype=dt, device=dev)
        if dt == torch.float32 and rows[0].item() == 0:
            continue  # underflows to an exact 0 in float32: a greedy row, legitimately
        _bad_data(OPS["verify_sample"](dev), {"temperature": rows}, "temperature")
        _bad_data(OPS["lm_head_exit"](dev), {"temperature": rows}, "temperature")


@pytest.mark.parametrize("dev", DEVS)
def test_small_but_representable_temperatures_work(dev):
    dev = torch.device(dev)
    for t in (1e-30, 1e-38, 3e-39):  # fl32(1 / T) finite
        _run(OPS["verify_sample_uniforms"](dev), {"temperature": t}, validate=True)
        _run(OPS["verify_sample"](dev), {"temperature": torch.tensor([t, 0.0], device=dev)}, validate=True)
        _run(OPS["lm_head_exit"](dev), {"temperature": torch.tensor([t, 0.0], device=dev)}, validate=True)
        _run(OPS["lm_head_exit"](dev), {"temperature": t, "seed": None, "offset": None}, validate=True)
    # numpy scalars are numbers
    _run(OPS["verify_sample_uniforms"](dev), {"temperature": np.float32(0.5), "top_k": np.int64(2),
                                               "top_p": np.float64(0.9)}, validate=True)


# ----------------------------------------------------------------------------------- hand-built trees
@pytest.mark.parametrize("dev", DEVS)
def test_hand_built_trees(dev):
    dev = torch.device(dev)
    c = OPS["verify_greedy_tree"](dev)
    t = c.kw["tree"]
    bad_trees = {
        "tree": [tuple(t), list(t), "tree", t.parents, t._replace(depth=t.depth[:1]),
                 t._replace(depth=t.depth.to("meta"))],
        "tree.depth": [t._replace(depth=t.depth.float())],
        "tree.parents": [t._replace(parents=t.parents[:, :3]), t._replace(parents=t.parents.long())],
        "tree.mask": [t._replace(mask=t.mask.bool()), t._replace(mask=t.mask[..., 0])],
        "tree.root_first_child": [t._replace(root_first_child=None)],
    }
    for op_name in ("verify_greedy_tree", "tree_to_flashinfer_mask", "tree_to_sglang"):
        c = OPS[op_name](dev)
        for name, trees in bad_trees.items():
            for bt in trees:
                _expect_bad(c, dict(c.kw, tree=bt), name)
    # a tree of another batch or width than the drafts
    c = OPS["verify_greedy_tree"](dev)
    _expect_bad(c, dict(c.kw, tree=_tree(dev, B=1)), "tree")
    _expect_bad(c, dict(c.kw, tree=_tree(dev, N=3)), "tree")
    # tree and parents together
    _expect_bad(c, dict(c.kw, parents=t.parents), "tree")
    # a hand-built tree with right metadata but a non-topological parent: validation names it
    hb = t._replace(parents=torch.tensor([[-1, 0, 3, 1]] * 2, dtype=I32, device=dev))
    _expect_bad(c, dict(c.kw, tree=hb), "parents")


@pytest.mark.parametrize("dev", DEVS)
def test_prefix_lens_forms(dev):
    dev = torch.device(dev)
    t = _tree(dev)
    ref = kk.tree_to_flashinfer_mask(t, [3, 3])
    for p in (3, np.int64(3), [3, np.int32(3)], (3, 3), torch.tensor([3, 3]), torch.tensor([3, 3], dtype=torch.int32),
              np.array([3, 3])[0]):
        assert _eq(kk.tree_to_flashinfer_mask(t, p), ref)
    with pytest.raises(ValueError, match="prefix_lens"):
        kk.tree_to_flashinfer_mask(t, np.array([3, 3]))
    if dev.type != "cpu":
        with pytest.raises(ValueError, match="prefix_lens"):
            kk.tree_to_flashinfer_mask(t, torch.tensor([3, 3], device=dev))


# ----------------------------------------------------------------------------------- legitimate neighbours
def _strided(t):
    """The same values in a non-contiguous view (every dim strided)."""
    return torch.stack([t, t], -1)[..., 0] if t.dim() else t


def _results(c, kw):
    kw = _clone_out(kw)
    r = c.fn(**kw)
    return r, [_get(kw, p).clone() for p in c.keep]


def _assert_same(c, kw_a, kw_b):
    (ra, ka), (rb, kb) = _results(c, kw_a), _results(c, kw_b)
    if isinstance(ra, Tree):
        ra, rb = ra[:5], rb[:5]
    assert _eq(ra, rb)
    for p, a, b in zip(c.keep, ka, kb):
        wide = (lambda t: t if t.is_floating_point() else t.long())  # noqa: E731
        assert torch.equal(wide(a), wide(b)), p


@pytest.mark.parametrize("dev", DEVS)
@pytest.mark.parametrize("op_name", sorted(OPS))
def test_int64_in_range_equals_int32(dev, op_name):
    c = OPS[op_name](torch.device(dev))
    kw = dict(c.kw)
    changed = 0
    for p in _tensor_paths(c.kw):
        t = _get(c.kw, p)
        if p.startswith("out") or p in c.keep or t.dtype != I32 or p.startswith("tree.") or p == "tree_mask":
            continue
        kw, changed = _set(kw, p, t.to(I64)), changed + 1
    if op_name == "compact_kv":  # int64 lengths are accepted and updated in place
        kw, changed = _set(kw, "cache_lens", c.kw["cache_lens"].to(I64)), changed + 1
    if not changed:
        pytest.skip("no int32 input")
    _assert_same(c, c.kw, kw)


@pytest.mark.parametrize("dev", DEVS)
@pytest.mark.parametrize("op_name", sorted(OPS))
def test_non_contiguous_inputs(dev, op_name):
    c = OPS[op_name](torch.device(dev))
    kw = dict(c.kw)
    for p in _tensor_paths(c.kw):
        if p.startswith("out") or p in c.keep or p.startswith("tree."):
            continue
        kw = _set(kw, p, _strided(_get(c.kw, p)))
    _assert_same(c, c.kw, kw)


@pytest.mark.parametrize("dev", DEVS)
def test_empty_batch_and_single_token_vocab(dev):
    dev = torch.device(dev)
    e = torch.zeros((0, 3), dtype=I32, device=dev)
    acc = kk.verify_greedy(e, torch.zeros((0, 4, 5), device=dev))
    assert acc.accept_len.shape == (0,) and acc.path.shape == (0, 4)
    assert kk.verify_greedy(e, torch.zeros((0, 4), dtype=I64, device=dev)).tokens.shape == (0, 4)
    assert kk.verify_sample(e, torch.zeros((0, 4, 5), device=dev), temperature=0.5).tokens.shape == (0, 4)
    assert kk.build_tree(e).mask.shape == (0, 3, 1)
    kc = torch.zeros((0, 1, 4, 32), device=dev)
    kk.compact_kv(kc, kc.clone(), torch.zeros(0, dtype=I32, device=dev), torch.zeros((0, 2), dtype=I32, device=dev),
                  torch.zeros(0, dtype=I32, device=dev))
    r = kk.lm_head_exit(torch.zeros((0, 8), device=dev), torch.zeros((3, 8), device=dev), 0.5)
    assert r.token.shape == (0,)
    assert kk.lm_head_topk(torch.zeros((0, 8), device=dev), torch.zeros((3, 8), device=dev), 2).tokens.shape == (0, 2)
    q = torch.zeros((0, 1, 2, 32), device=dev)
    o = kk.append_attention(q, q[:, :, :1], q[:, :, :1], torch.zeros((0, 1, 4, 32), device=dev),
                            torch.zeros((0, 1, 4, 32), device=dev), torch.zeros(0, dtype=I32, device=dev))
    assert o.shape == (0, 1, 2, 32)
    w = _adapter_weights(dev, 16, 2, 1, 32)
    o = kk.adapter_forward(torch.zeros((0, 16), device=dev), w, torch.zeros((0, 1, 4, 32), device=dev),
                           torch.zeros((0, 1, 4, 32), device=dev), torch.zeros(0, dtype=I32, device=dev),
                           torch.zeros(0, dtype=I32, device=dev))
    assert o.shape == (0, 16)
    assert kk.ngram_lookup(e, torch.zeros(0, dtype=I32, device=dev), 1, 2, 3).tokens.shape == (0, 3)
    assert kk.merge_lookup_tree(e, torch.zeros((0, 2), dtype=I32, device=dev)).tokens.shape == (0, 5)
    t = kk.build_tree(e)
    assert kk.tree_to_flashinfer_mask(t, 2).mask_indptr.tolist() == [0]
    assert kk.tree_to_sglang(t, e).candidates.shape == (0, 4)
    # V = 1: one token, always the argmax
    one = torch.zeros((2, 4, 1), device=dev)
    d = torch.zeros((2, 3), dtype=I32, device=dev)
    assert kk.verify_greedy(d, one).accept_len.tolist() == [3, 3]
    seed = torch.tensor([1, 2], device=dev)
    assert kk.verify_sample(d, one, temperature=0.7, seed=seed).accept_len.tolist() == [3, 3]
    r = kk.lm_head_exit(torch.ones((2, 8), device=dev), torch.ones((1, 8), device=dev), 0.5, temperature=0.5)
    assert r.token.tolist() == [0, 0] and r.conf.tolist() == [1.0, 1.0]
    r = kk.lm_head_topk(torch.ones((2, 8), device=dev), torch.ones((1, 8), device=dev), 1)
    assert r.tokens.tolist() == [[0], [0]]


@pytest.mark.parametrize("dev", DEVS)
def test_numpy_integers_where_ints_are_accepted(dev):
    dev = torch.device(dev)
    c = OPS["lm_head_topk"](dev)
    _assert_same(c, c.kw, dict(c.kw, k=np.int64(3)))
    c = OPS["ngram_lookup"](dev)
    _assert_same(c, c.kw, dict(c.kw, n_min=np.int32(1), n_max=np.int64(3), M=np.int16(3)))
    c = OPS["append_attention"](dev)
    _assert_same(c, dict(c.kw, num_splits=2, sm_scale=0.25), dict(c.kw, num_splits=np.int64(2),
                                                                   sm_scale=np.float32(0.25)))
    c = OPS["adapter_forward"](dev)
    w = c.kw["weights"]
    _assert_same(c, c.kw, dict(c.kw, weights=w._replace(num_heads=np.int64(2), num_kv_heads=np.int32(1)),
                               eps=np.float32(1e-6)))
    c = OPS["lm_head_exit"](dev)
    _assert_same(c, c.kw, dict(c.kw, threshold=np.float32(0.5), eps=np.float64(1e-6)))


def test_compat_wrappers_do_not_wrap_int64_ids():
    """The compat wrappers keep their peers' semantics (no data validation, in-place outputs) but an int64 draft
    id beyond int32 is an invalid id there too (never accepted), not the id it wraps to."""
    dev = torch.device("cpu")
    for name, path, bad_at in (("compat.flashinfer.chain_speculative_sampling", "draft_token_ids", (0, 2)),
                               ("compat.vllm.rejection_sample_from_logits", "draft_token_ids", (1,))):
        c = OPS[name](dev)
        d = _get(c.kw, path).to(I64)
        bad, inv = d.clone(), d.clone()
        bad[bad_at] = BIG + int(d[bad_at])
        inv[bad_at] = -1
        (rb, _), (rg, _) = _results(c, _set(c.kw, path, bad)), _results(c, _set(c.kw, path, inv))
        assert _eq(rb, rg)


@pytest.mark.cuda
def test_validate_false_reads_no_device_data_on_the_host():
    """validate=False (the decode hot path) with int64 inputs: the on-device narrowing adds no host sync."""
    dev = torch.device("cuda")
    calls = [(name, OPS[name](dev)) for name in ("verify_greedy", "verify_greedy_tree", "verify_sample",
                                                   "build_tree", "compact_kv", "append_attention", "adapter_forward",
                                                   "merge_lookup_tree", "ngram_lookup", "lm_head_exit")]
    prepared = []
    for name, c in calls:
        kw = dict(c.kw, validate=False)
        for p in _tensor_paths(c.kw):
            t = _get(c.kw, p)
            if t.dtype == I32 and not p.startswith("out") and not p.startswith("tree.") and p != "tree_mask":
                kw = _set(kw, p, t.to(I64))
        prepared.append((c, kw))
        c.fn(**_clone_out(kw))  # warm up (first calls load libraries and compile kernels)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for c, kw in prepared:
            c.fn(**kw)
    finally:
        torch.cuda.set_sync_debug_mode(0)
