"""KangarooDecoder(draft_head=...): the chain's draft LM head as the exact weights or an int8 copy
(kangaroo_kernels.lm_head_exit_int8). The draft head only proposes, so the greedy output equals transformers'
greedy generate with either, batch 1 and ragged batch 4, with and without lookup; the int8 kernel is really the
one called (a counting control); "auto" measures and reports its choice; bad values raise."""

import types
import warnings

import pytest
import torch
from kangaroo import draft as kdraft
from kangaroo.adapter import KangarooAdapter
from kangaroo.generate import KangarooDecoder
from kangaroo.model import LlamaModel
from test_decoder_exact import hf_greedy, make_hf, make_prompts

from kangaroo_kernels.ops.lm_head_exit_int8 import LmHeadExitInt8Plan

pytestmark = pytest.mark.usefixtures("one_thread")
NEW = 16


@pytest.fixture(scope="module")
def model_and_ref():
    hf = make_hf("llama", seed=3)
    prompts = make_prompts(hf.config.vocab_size, n=6, seed=5)
    return hf, prompts, hf_greedy(hf, prompts, NEW)


@pytest.mark.parametrize("mode", ["exact", "int8", "auto"])
@pytest.mark.parametrize("lookup", [False, True])
def test_output_equals_hf_with_either_head(model_and_ref, mode, lookup, monkeypatch):
    hf, prompts, ref = model_and_ref
    torch.manual_seed(0)
    ad = KangarooAdapter.for_model(hf, 1)
    dec = KangarooDecoder.from_pretrained(hf, adapter=ad, draft_head=mode)
    calls = []
    real = LmHeadExitInt8Plan.run  # the decoder's int8 head: through its plan, or in the fused CPU chain
    monkeypatch.setattr(LmHeadExitInt8Plan, "run", lambda *a, **k: calls.append(1) or real(*a, **k))
    native = kdraft.native_ops()
    fused = types.SimpleNamespace(draft_chain=lambda *a: calls.append(2) or native.draft_chain(*a))
    monkeypatch.setattr(kdraft, "native_ops", lambda: fused)
    for p, want in zip(prompts[:2], ref[:2]):
        out = dec.generate(p, NEW, threshold=0.0, max_draft=4, lookup=lookup)
        assert out.tokens.tolist() == want
    outs = dec.generate(prompts, NEW, threshold=0.3, max_draft=3, lookup=lookup)
    assert [t.tolist() for t in outs.tokens] == ref
    head = outs.stats.draft_head
    assert head.split()[0] == ("int8" if mode == "int8" else "exact" if mode == "exact" else head.split()[0])
    assert bool(calls) == (head.split()[0] == "int8")
    if mode == "auto":
        assert "measured" in head
    tree = dec.generate(prompts[0], NEW, tree=True)
    assert tree.tokens.tolist() == ref[0] and tree.stats.draft_head == ""  # tree drafting ranks with the exact head


def test_bad_draft_head():
    hf = make_hf("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="draft_head"):
            KangarooDecoder.from_pretrained(hf, exit_layer=1, draft_head="fp8")
    model = LlamaModel.from_pretrained(hf).to(device="meta")
    with pytest.raises(ValueError, match="draft_head='int8' runs on CPU"):
        KangarooDecoder(model, KangarooAdapter.for_model(hf, 1), draft_head="int8")
