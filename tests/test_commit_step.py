"""kangaroo_kernels::commit_step (csrc/cpu/commit_step.cpp): kangaroo.verify.commit in one native call.

Its spec is the Python commit (the predicated path's, CUDA-graph capturable): on the same buffers it must leave
every buffer with the same bits, on random states that cover what a cycle can hand it: ragged live rows, EOS ids
inside and past the accepted tokens, length limits, the leaf catch-up of a chain or a tree path, a given catch-up
of 1 or W columns, the lookup history near the cache's end, the autoregressive step's catch_h kept in place. The
decoder takes it with the CPU early exit (output, statistics and final buffers as with the Python commit), and a
bad call raises ValueError and changes nothing.
"""

import dataclasses

import pytest
import torch
from kangaroo import state as kstate
from kangaroo import verify as kverify
from kangaroo.adapter import KangarooAdapter
from kangaroo.generate import KangarooDecoder
from test_decoder_exact import make_hf, make_prompts

pytestmark = pytest.mark.usefixtures("one_thread")
I32 = torch.int32


def _states(hf, B, *, lookup, topk=1, eos=(5, 17), S=40):
    """Two states with the same shapes, one committing natively and one in Python, and a function that fills both
    with the same random contents."""
    torch.manual_seed(0)
    dec = KangarooDecoder.from_pretrained(hf, adapter=KangarooAdapter.for_model(hf, 1))
    cfg = kstate.DecodeSettings(1, 4, topk, 0.3, 0.05, 0.0, 0, 1.0, 20, True, lookup_max=3 if lookup else 0,
                                lookup_ngram=(1, 3))
    mk = lambda: kstate.new_state(dec.model, dec.adapter, cfg, B, S, None, list(eos) if eos else None)  # noqa: E731
    native, python = mk(), mk()
    assert native.commit_step is not None
    python = dataclasses.replace(python, commit_step=None)

    def fill(g):
        for name, t in _mutable(native).items():
            if t.dtype == torch.bool:
                v = torch.rand(t.shape, generator=g) < 0.7
            elif t.is_floating_point():
                v = torch.randn(t.shape, generator=g)
            else:
                v = torch.randint(0, 30, t.shape, generator=g, dtype=t.dtype)
            if name == "L0":  # some rows near the cache's end: the history write is cut there
                v = torch.randint(0, S - 2, t.shape, generator=g, dtype=t.dtype)
            if name == "max_new":
                v = torch.randint(1, 40, t.shape, generator=g, dtype=t.dtype)
            t.copy_(v)
            _mutable(python)[name].copy_(v)

    return native, python, fill


def _mutable(st):
    b = st.buf
    d = dict(L0=b.L0, tok=b.tok, n_gen=b.n_gen, max_new=b.max_new, alive=b.alive, need_catch=b.need_catch,
             catch_n=b.catch_n, catch_h=b.catch_h, out=b.out, n_chain=b.n_chain, hbuf=b.hbuf)
    if b.lookup is not None:
        d.update(history=b.lookup.history, look_n=b.lookup.look.n)
    return d


def _args(st, g, T, *, tree, catch_w, n_look):
    B, N = st.B, st.cfg.n_nodes
    toks = torch.randint(0, 30, (B, T), generator=g, dtype=I32)
    a = torch.randint(0, T, (B,), generator=g, dtype=I32)
    a = torch.where(st.buf.alive, a, 0)  # the caller's a: 0 on finished rows
    path = torch.randint(-1, N, (B, N + 1), generator=g, dtype=I32) if tree else None
    catch = None
    if catch_w:
        catch = (torch.randint(0, 4, (B,), generator=g, dtype=I32),
                 torch.randn(B, catch_w, st.buf.hbuf.shape[2], generator=g))
    nl = torch.randint(0, 3, (B,), generator=g, dtype=I32) if n_look else None
    return toks, a, path, catch, nl


@pytest.mark.parametrize("B", [1, 5])
@pytest.mark.parametrize("lookup", [False, True], ids=["no-lookup", "lookup"])
@pytest.mark.parametrize("case", ["chain-leaf", "tree-leaf", "catch-1", "catch-W", "n-look"])
def test_native_commit_equals_python_commit_bit_for_bit(B, lookup, case):
    if case == "n-look" and not lookup:
        pytest.skip("n_look needs the lookup's buffers")
    hf = make_hf("llama")
    native, python, fill = _states(hf, B, lookup=lookup)
    W = native.buf.catch_h.shape[1]
    g = torch.Generator().manual_seed(B * 7 + len(case))
    seen_eos = seen_cut = 0
    for trial in range(40):
        fill(g)
        T = int(torch.randint(1, native.cfg.n_nodes + 2, (1,), generator=g))
        args = _args(native, g, T, tree=case == "tree-leaf", catch_w={"catch-1": 1, "catch-W": W}.get(case, 0),
                     n_look=case == "n-look")
        before_alive = native.buf.alive.clone()
        kverify.commit(native, *args)
        kverify.commit(python, *args)
        for name, t in _mutable(python).items():
            assert torch.equal(_mutable(native)[name], t), (case, trial, name)
        toks, a = args[0], args[1]
        emitted = torch.arange(T)[None] <= a[:, None]
        seen_eos += int((before_alive & (emitted & ((toks == 5) | (toks == 17))).any(1)).sum())
        seen_cut += int((before_alive & ~native.buf.alive).sum())
    assert seen_eos > 0 and seen_cut > seen_eos  # the EOS and the length ends were both exercised


def test_autoregressive_commit_keeps_catch_h_in_place():
    """The plain step hands catch_h itself as its catch-up source: the native copy reads and writes one buffer."""
    hf = make_hf("llama")
    native, python, fill = _states(hf, 3, lookup=False)
    g = torch.Generator().manual_seed(3)
    for _ in range(10):
        fill(g)
        toks = torch.randint(0, 30, (3, 1), generator=g, dtype=I32)
        for st in (native, python):
            zero = torch.zeros(3, dtype=I32)
            kverify.commit(st, toks, zero, catch=(zero, st.buf.catch_h))
        for name, t in _mutable(python).items():
            assert torch.equal(_mutable(native)[name], t), name


@pytest.mark.parametrize("kw", [dict(), dict(tree=True), dict(lookup=True, lookup_ngram=(1, 3)), dict(eos=[3, 7])],
                         ids=["chain", "tree", "lookup", "eos"])
def test_decoder_output_and_buffers_match_the_python_commit(kw, monkeypatch):
    hf = make_hf("llama")
    torch.manual_seed(0)
    dec = KangarooDecoder.from_pretrained(hf, adapter=KangarooAdapter.for_model(hf, 1))
    prompts = make_prompts(hf.config.vocab_size, n=4)
    runs = []
    for native in (True, False):
        states = []
        with monkeypatch.context() as mp:
            if not native:
                mp.setattr(kstate, "commit_step_args", lambda *a: None)
            dec.debug_hook = states.append
            outs = [dec.generate(prompts, 16, threshold=0.2, max_draft=4, **kw),
                    dec.generate_autoregressive(prompts, 16, eos=kw.get("eos"))]
            dec.debug_hook = None
        assert all((s.commit_step is not None) == native for s in states)
        runs.append(([o.tokens for o in outs], [dataclasses.asdict(o.stats) for o in outs],
                     [{k: v.clone() for k, v in _mutable(s).items()} for s in states]))
    (tok_n, stats_n, buf_n), (tok_p, stats_p, buf_p) = runs
    assert [[t.tolist() for t in ts] for ts in tok_n] == [[t.tolist() for t in ts] for ts in tok_p]
    drop = ("time_s", "tokens_per_s", "prefill_time_s", "draft_time_s", "verify_time_s")
    assert [{k: v for k, v in s.items() if k not in drop} for s in stats_n] == \
        [{k: v for k, v in s.items() if k not in drop} for s in stats_p]
    for bn, bp in zip(buf_n, buf_p):
        for name in bp:
            assert torch.equal(bn[name], bp[name]), name


def test_bad_accept_len_raises_and_changes_nothing():
    hf = make_hf("llama")
    native, _, fill = _states(hf, 3, lookup=True)
    fill(torch.Generator().manual_seed(0))
    native.buf.alive.fill_(True)
    before = {k: v.clone() for k, v in _mutable(native).items()}
    toks = torch.zeros(3, 4, dtype=I32)
    with pytest.raises(ValueError, match="accept_len"):
        kverify.commit(native, toks, torch.tensor([1, 4, 0], dtype=I32))
    with pytest.raises(ValueError, match="tokens"):
        kverify.commit(native, toks.long(), torch.zeros(3, dtype=I32))
    for k, v in _mutable(native).items():
        assert torch.equal(v, before[k]), k
