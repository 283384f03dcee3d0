"""kangaroo_kernels::draft_step (csrc/cpu/draft_step.cpp): the CPU chain's draft step in one native call.

It must be the unfused loop's step exactly: the same tokens, statistics, caches and buffers, bit for bit, with the
CPU early exit and on the predicated path, for batch 1 and ragged batches, exit layers 1 and 2, with lookup, on
Llama and Qwen2 (q/k/v bias); greedy output equal to transformers'. The decoder takes it only where it applies (a
CPU chain on the int8 draft head), and bad arguments raise ValueError.
"""

import warnings

import pytest
import torch
from draft_watch import watch_draft_steps
from kangaroo import state as kstate
from kangaroo.adapter import KangarooAdapter
from kangaroo.generate import KangarooDecoder
from test_decoder_exact import hf_greedy, make_hf, make_prompts

from kangaroo_kernels._ext import ops

pytestmark = pytest.mark.usefixtures("one_thread")
NEW = 14


def _decoder(hf, ell, seed=0):
    torch.manual_seed(seed)
    ad = KangarooAdapter.for_model(hf, ell)
    with torch.no_grad():  # a sharper random adapter: long drafts and mixed exits across rows
        for p in ad.parameters():
            p.mul_(3.0)
    return KangarooDecoder.from_pretrained(hf, adapter=ad, draft_head="int8")


def _run(dec, prompts, monkeypatch, fused, **kw):
    """(tokens, (cycles, accept_hist, chain nodes), final state tensors, fused steps run) of one generate call."""
    states, fused_calls = [], []
    with monkeypatch.context() as mp:
        if not fused:
            mp.setattr(kstate, "draft_step_args", lambda *a: None)
        watch_draft_steps(mp, on_draft=lambda tok: fused_calls.append(1))
        dec.debug_hook = states.append
        out = dec.generate(prompts, NEW, **kw)
        dec.debug_hook = None
    st = states[0]
    b = st.buf
    tensors = dict(k=b.cache.k, v=b.cache.v, ak=b.ak, av=b.av, L0=b.L0, tok=b.tok, catch_n=b.catch_n,
                   catch_h=b.catch_h, n_gen=b.n_gen)
    toks = [t.tolist() for t in out.tokens] if isinstance(out.tokens, list) else out.tokens.tolist()
    stats = (out.stats.cycles, list(out.stats.accept_hist), out.stats.accepted_from_chain)
    return toks, stats, tensors, st.draft_step is not None, len(fused_calls)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("ell", [1, 2])
@pytest.mark.parametrize("kw", [dict(threshold=0.0, max_draft=4), dict(threshold=0.3, max_draft=3),
                                dict(threshold=0.5, max_draft=6, lookup=True, lookup_ngram=(1, 3))],
                         ids=["eta0-g4", "eta0.3-g3", "lookup"])
@pytest.mark.parametrize("host_exit", [True, False], ids=["host-exit", "predicated"])
def test_fused_step_equals_unfused_bit_for_bit(kind, ell, kw, host_exit, monkeypatch):
    hf = make_hf(kind)
    dec = _decoder(hf, ell)
    dec.host_early_exit = host_exit
    prompts = make_prompts(hf.config.vocab_size, n=3, seed=7)  # ragged lengths
    for batch in (prompts[:1], prompts):
        f_tok, f_stats, f_st, f_on, f_n = _run(dec, batch, monkeypatch, True, **kw)
        u_tok, u_stats, u_st, u_on, _ = _run(dec, batch, monkeypatch, False, **kw)
        assert f_on and not u_on  # the fused path was taken, and the control really ran the ops
        assert f_n > 0
        assert f_tok == u_tok
        assert f_stats == u_stats
        for name in f_st:
            assert torch.equal(f_st[name], u_st[name]), name
    ref = hf_greedy(hf, prompts, NEW)
    assert f_tok == ref


def test_only_where_it_applies(monkeypatch):
    hf = make_hf("llama")
    dec = _decoder(hf, 1)
    prompt = make_prompts(hf.config.vocab_size, n=1, seed=3)[0]
    assert _run(dec, prompt, monkeypatch, True, threshold=0.0, max_draft=3)[3]
    assert not _run(dec, prompt, monkeypatch, True, tree=True)[3]  # tree drafting ranks with the exact head
    exact = KangarooDecoder(dec.model, dec.adapter, draft_head="exact")
    assert not _run(exact, prompt, monkeypatch, True, threshold=0.0, max_draft=3)[3]


def test_bad_arguments_raise(monkeypatch):
    hf = make_hf("llama")
    dec = _decoder(hf, 1)
    states = []
    dec.debug_hook = states.append
    dec.generate(make_prompts(hf.config.vocab_size, n=1, seed=3)[0], 4, threshold=0.0, max_draft=2)
    st = states[0]
    b, args = st.buf, list(st.draft_step)
    dyn = (b.cur, b.L0.clone(), b.alive.clone(), b.alive.clone(), True, b.hbuf[:, 0], b.drafts[:, 0], b.n_chain)
    with pytest.raises(ValueError, match="7 tensors per shallow layer"):
        ops().draft_step(args[0][:6], *args[1:], *dyn)
    with pytest.raises(ValueError, match="adapter must hold"):
        ops().draft_step(*args[:8], args[8][:8], *args[9:], *dyn)
    with pytest.raises(ValueError, match="pos must be"):
        ops().draft_step(*args, b.cur, b.L0.long(), *dyn[2:])
    with pytest.raises(ValueError, match="hidden must be"):
        ops().draft_step(*args, *dyn[:5], b.hbuf[:, 0, :3], *dyn[6:])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops().draft_step(*args, *dyn)  # the well-formed call runs


def test_draft_chain_is_taken_and_checks_its_arguments(monkeypatch):
    """draft_chain (the draft side in one call) runs every CPU chain on the int8 head, with lookup too (its wider
    catch-ups run in Python first); trees and the exact head keep the op-by-op path. Bad arguments raise ValueError
    (test_fused_step_equals_unfused_bit_for_bit checks its bits)."""
    hf = make_hf("llama")
    dec = _decoder(hf, 1)
    prompt = make_prompts(hf.config.vocab_size, n=1, seed=3)[0]
    states = []
    dec.debug_hook = states.append
    for kw, want in [(dict(threshold=0.0, max_draft=3), True), (dict(lookup=True), True),
                     (dict(tree=True), False)]:
        dec.generate(prompt, 4, **kw)
        assert (states[-1].draft_chain is not None) == want, kw
    st = states[0]
    b = st.buf
    args, chain = list(st.draft_step), list(st.draft_chain)
    with pytest.raises(ValueError, match="n_steps"):
        ops().draft_chain(*args, *chain, None, True, b.hbuf.shape[1], True)
    with pytest.raises(ValueError, match="n_steps"):
        ops().draft_chain(*args, *chain, None, True, 0, True)
    bad = chain[:5] + [b.catch_h.expand(-1, 2, -1)] + chain[6:]
    with pytest.raises(ValueError, match="catch_h"):
        ops().draft_chain(*args, *bad, None, True, 2, False)  # predicated: only one-node catch-ups
    b.need_catch.fill_(True)
    b.alive.fill_(True)
    b.catch_n.fill_(2)
    assert ops().draft_chain(*args, *bad, None, True, 2, True) == -1  # a wider catch-up: Python's, nothing done
    assert bool(b.need_catch.all())
    ops().draft_chain(*args, *bad, None, False, 2, True)  # wider catch-up rows are fine without catch_up
    with pytest.raises(ValueError, match="L0"):
        ops().draft_chain(*args, *chain[:1], b.L0.long(), *chain[2:], None, True, 2, True)
    with pytest.raises(ValueError, match="hit"):
        ops().draft_chain(*args, *chain, b.L0, True, 2, True)
    exact = KangarooDecoder(dec.model, dec.adapter, draft_head="exact")
    exact.debug_hook = states.append
    exact.generate(prompt, 4, threshold=0.0, max_draft=3)
    assert states[-1].draft_chain is None
