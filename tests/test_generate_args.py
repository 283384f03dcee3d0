"""generate's and from_pretrained's arguments (kangaroo._args): every bad value raises a ValueError naming the
argument before any decode state exists; numpy scalars, 0-d tensors and other legitimate neighbours still work."""

import math
import types
import warnings

import numpy as np
import pytest
import torch
from kangaroo import _args
from kangaroo import generate as kgen
from kangaroo.generate import KangarooDecoder
from test_decoder_exact import make_hf

V, CTX = 97, 256
CFG = types.SimpleNamespace(vocab_size=V, max_context=CTX)
GOOD = dict(input_ids=[[1, 2, 3], [4]], max_new_tokens=4, threshold=0.6, max_draft=4, tree=False, temperature=0.0,
            top_k=0, top_p=1.0, seed=None, eos=None, streamer=None, tree_topk=2, sibling_threshold=0.05,
            max_cache_len=None)


def check(**kw):
    a = dict(GOOD, **kw)
    return _args.check_generate_args(CFG, *(a[k] for k in GOOD))


class Put:
    def __init__(self, put=None, end=None):
        if put is not None:
            self.put = put
        if end is not None:
            self.end = end


BAD = {
    "max_new_tokens": [-1, 1.5, "4", True, None, np.float32(4), [4], torch.tensor(4.0)],
    "threshold": [1.5, -0.1, math.nan, "x", None, True, [0.5]],
    "max_draft": [0, -3, 1.5, "3", True, None, 10 ** 9, CTX],
    "tree": ["yes", 2, None, [True], 0.5],
    "temperature": [-1.0, math.nan, math.inf, 1e-40, 1e-45, "x", None, True, [0.5], torch.ones(2)],
    "top_k": [-1, 1.5, "2", True, None, [2]],
    "top_p": [0.0, 1.5, -0.5, math.nan, "x", None, True],
    "seed": ["abc", [1], {}, "12", 1.5, True, np.float64(3.0), torch.tensor([1, 2])],
    "eos": [V, -1, [5, V], [5, -1], 2 ** 40, "x", [1.5], [[1]], torch.zeros(2, 2, dtype=torch.long), 1.0, True,
            [True]],
    "streamer": [5, "x", object(), Put(put=5), Put(put=print, end=3)],
    "tree_topk": [1, 0, "2", 2.5, True, None],
    "sibling_threshold": [-0.1, 1.5, math.nan, "x", None],
    "input_ids": [torch.zeros(3, device="meta", dtype=torch.long), torch.ones(3), torch.ones(3, dtype=torch.bool),
                  torch.zeros(2, 2, 2, dtype=torch.long), [], [[1], []], [V], [-1], [[1, 2], "x"], "hello", None, 5,
                  [1.5, 2], [2 ** 40], torch.tensor([1, 2 ** 40]), torch.zeros(0, 3, dtype=torch.long),
                  [torch.zeros(2, 2, dtype=torch.long)], [[1], torch.zeros(2, device="meta", dtype=torch.long)]],
}
CASES = [pytest.param(k, i, id=f"{k}-{i}") for k, vals in BAD.items() for i in range(len(vals))]


@pytest.mark.parametrize("arg,i", CASES)
def test_bad_argument_names_it(arg, i):
    with pytest.raises(ValueError, match=arg):
        check(**{arg: BAD[arg][i]})


def test_tree_arguments():
    with pytest.raises(ValueError, match="tree_topk"):
        check(tree=True, tree_topk=17)  # lm_head_topk's k is at most 16
    with pytest.raises(ValueError, match="tree_topk"):
        _args.check_generate_args(types.SimpleNamespace(vocab_size=3, max_context=CTX), [[1]], 2, 0.6, 2, True,
                                  0.0, 0, 1.0, None, None, None, 4, 0.05, None)
    with pytest.raises(ValueError, match="max_draft"):
        check(tree=True, max_draft=20, tree_topk=16)  # 320 draft nodes > the context
    with pytest.raises(ValueError, match="max_new_tokens"):
        check(max_new_tokens=CTX)  # prompt + new tokens beyond the context
    with pytest.raises(ValueError, match="max_cache_len"):
        check(max_cache_len=8)
    with pytest.raises(ValueError, match="streamer"):  # an HF streamer takes one sequence
        check(streamer=Put(put=print, end=print))
    # legitimate: tree_topk is only bounded by 16 / V when tree mode uses it
    assert check(tree_topk=40).tree_topk == 40
    assert check(tree=True, tree_topk=16, max_draft=4).tree_topk == 16


def test_legitimate_neighbours_are_normalised():
    a = check(input_ids=[np.int64(5), torch.tensor(6), 7], max_new_tokens=np.int32(3), threshold=np.float32(0.5),
              max_draft=np.int64(2), tree=np.bool_(True), temperature=np.float64(0.7), top_k=np.int16(5),
              top_p=np.float32(0.9), seed=np.int64(-12), eos=np.int64(3), tree_topk=np.int8(3),
              sibling_threshold=np.float16(0.1), max_cache_len=64)
    assert a.prompts == [[5, 6, 7]] and a.single
    assert (a.max_new_tokens, a.max_draft, a.top_k, a.seed, a.eos, a.tree_topk, a.tree) == (3, 2, 5, -12, [3], 3, True)
    assert all(type(x) is int for x in (a.max_new_tokens, a.max_draft, a.top_k, a.seed, a.tree_topk, *a.prompts[0]))
    assert all(type(x) is float for x in (a.threshold, a.temperature, a.top_p, a.sibling_threshold))
    assert a.cache_len == 3 + 3 + 2 * 3 + 1
    assert check(eos=torch.tensor([1, 2])).eos == [1, 2]
    assert check(eos=(0, V - 1)).eos == [0, V - 1]
    assert check(eos=[]).eos is None
    assert check(eos=torch.tensor(4)).eos == [4]
    assert check(seed=2 ** 70).seed == 2 ** 70
    assert check(temperature=1e-30).temperature == 1e-30  # fl32(1 / T) is finite
    assert check(input_ids=torch.tensor([[1, 2], [3, 4]], dtype=torch.int32).flip(1).T).prompts == [[2, 4], [1, 3]]
    assert check(input_ids=[torch.tensor([1, 2]), [3]]).prompts == [[1, 2], [3]]
    assert check(streamer=lambda row, toks: None).streamer is not None
    assert check(input_ids=[1, 2], streamer=Put(put=print, end=print)).streamer is not None
    assert check(input_ids=[1, 2], streamer=Put(put=print)).streamer is not None
    assert check(tree=1).tree is True
    one = types.SimpleNamespace(vocab_size=1, max_context=CTX)  # V = 1
    assert _args.check_generate_args(one, [0, 0], 3, 0.6, 2, False, 0.0, 0, 1.0, None, 0, None, 2, 0.05,
                                     None).eos == [0]


def test_from_pretrained_args():
    for kw, name in ((dict(adapter=5), "adapter"), (dict(adapter=[1]), "adapter"), (dict(exit_layer="2"), "exit_layer"),
                     (dict(exit_layer=2.0), "exit_layer"), (dict(exit_layer=0), "exit_layer"),
                     (dict(dtype="float16"), "dtype"), (dict(dtype=torch.int32), "dtype"), (dict(device=1.5), "device"),
                     (dict(device="nope"), "device"), (dict(device="meta"), "device")):
        a = {**dict(adapter=None, exit_layer=2, dtype=None, device=None), **kw}
        with pytest.raises(ValueError, match=name):
            _args.check_from_pretrained_args("x", a["adapter"], a["exit_layer"], a["dtype"], a["device"])
    assert _args.check_from_pretrained_args("x", None, np.int64(2), torch.float16, "cpu")[2:] == (
        2, torch.float16, torch.device("cpu"))
    assert _args.check_from_pretrained_args("x", "folder", None, None, None)[1:] == ("folder", None, None, None)


@pytest.fixture(scope="module")
def dec():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = KangarooDecoder.from_pretrained(make_hf("llama", seed=5), exit_layer=2)
    yield d
    torch.set_num_threads(n)


@pytest.mark.parametrize("kw,name", [
    (dict(max_draft=10 ** 9), "max_draft"), (dict(eos=97), "eos"), (dict(eos=[5, 97]), "eos"),
    (dict(eos=2 ** 40), "eos"),
    (dict(seed="abc"), "seed"), (dict(seed="12"), "seed"), (dict(seed=1.5), "seed"), (dict(streamer=5), "streamer"),
    (dict(tree=True, tree_topk=17), "tree_topk"), (dict(temperature=1e-40), "temperature"),
    (dict(input_ids=torch.zeros(3, device="meta", dtype=torch.long)), "input_ids")])
def test_generate_rejects_before_any_work(dec, kw, name, monkeypatch):
    def prefill(*a, **k):
        raise AssertionError("a bad call reached the prefill")

    monkeypatch.setattr(kgen, "prefill", prefill)
    a = dict(input_ids=[[1, 2, 3], [4]], max_new_tokens=4)
    a.update(kw)
    with pytest.raises(ValueError, match=name):
        dec.generate(a.pop("input_ids"), a.pop("max_new_tokens"), **a)
    if name not in ("max_draft", "tree_topk"):
        with pytest.raises(ValueError, match=name):
            kw = {k: v for k, v in kw.items() if k not in ("max_draft", "tree", "tree_topk")}
            dec.generate_autoregressive([[1, 2, 3], [4]] if "input_ids" not in kw else kw.pop("input_ids"), 4, **kw)


def test_generate_numpy_neighbours_match_ints(dec):
    prompts = [[1, 2, 3, 4], [5, 6]]
    ref = dec.generate(prompts, 6, max_draft=3, temperature=0.8, seed=11, eos=[3]).tokens
    got = dec.generate([[np.int64(x) for x in p] for p in prompts],
                       np.int64(6), max_draft=np.int32(3), temperature=np.float32(0.8), seed=np.int64(11),
                       eos=torch.tensor([3])).tokens
    assert [t.tolist() for t in got] == [t.tolist() for t in ref]
    streamed = []

    class HF:
        def put(self, x):
            streamed.extend(x.flatten().tolist())

        def end(self):
            streamed.append("end")

    out = dec.generate(torch.tensor([1, 2, 3]), 5, streamer=HF())
    assert streamed == out.tokens.tolist() + ["end"]


def test_from_pretrained_rejects_bad_adapter():
    hf = make_hf("llama", seed=5)
    with pytest.raises(ValueError, match="adapter"):
        KangarooDecoder.from_pretrained(hf, adapter=5)
    with pytest.raises(ValueError, match="adapter"):
        KangarooDecoder.from_pretrained(hf, adapter=torch.nn.Linear(2, 2))
