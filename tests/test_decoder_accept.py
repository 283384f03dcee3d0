"""Full acceptance, tree-sibling acceptance and the adapter-cache catch-up, checked on the caches themselves.

An "oracle" drafter: the base model's layers l+1..L are made the identity (o_proj and down_proj zeroed) and the
adapter returns RMSNorm_final(h) (its o_proj zeroed, its out norm = the model's final norm), so the draft logits
are the target logits and every chain draft is accepted: this exercises the all-accepted path and the catch-up
every cycle. Swapping the oracle's top-1 and top-2 at one draft depth makes the tree accept a sibling there.

Cache consistency: after generation, every committed position's shallow/deep K/V and adapter K/V must equal a
fresh prefill of the committed sequence; a control without the catch-up must fail that check.
"""

import types
import warnings

import pytest
import torch
from kangaroo import draft as kdraft
from kangaroo import state as kstate
from kangaroo.generate import KangarooDecoder
from test_decoder_exact import hf_greedy, make_hf, make_prompts

NEW = 16


pytestmark = pytest.mark.usefixtures("one_thread")


def oracle(kind, exit_layer):
    hf = make_hf(kind, seed=3)
    with torch.no_grad():
        for lay in hf.model.layers[exit_layer:]:
            lay.self_attn.o_proj.weight.zero_()
            lay.mlp.down_proj.weight.zero_()
    torch.manual_seed(7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dec = KangarooDecoder.from_pretrained(hf, exit_layer=exit_layer)
    with torch.no_grad():
        dec.adapter.self_attn.o_proj.weight.zero_()
        dec.adapter.norm.weight.copy_(dec.model.norm)
    return hf, keep_states(dec)


def keep_states(dec):
    """dec.states collects each generate call's final DecodeState (the decoder itself keeps none)."""
    dec.states = []
    dec.debug_hook = dec.states.append
    return dec


def random_decoder(kind, exit_layer):
    hf = make_hf(kind, seed=3)
    torch.manual_seed(11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hf, keep_states(KangarooDecoder.from_pretrained(hf, exit_layer=exit_layer))


def check_caches(dec, prompts, outs, tol=1e-4):
    """Committed positions 0 .. len(prompt) + len(out) - 2 of every cache equal a fresh prefill (the adapter
    cache up to a catch-up still pending after the last cycle)."""
    st = dec.states[-1]
    buf = st.buf
    m, ad = dec.model, dec.adapter
    ell = dec.exit_layer
    for b, (p, o) in enumerate(zip(prompts, outs)):
        seq = p + o.tolist()
        n = len(seq) - 1
        assert int(buf.L0[b]) >= n
        cache = m.new_cache(1, n + 1)
        ak = torch.zeros(1, ad.num_kv_heads, n + 1, ad.head_dim)
        av = torch.zeros_like(ak)
        zeros = torch.zeros(1, dtype=torch.int32)
        pos = torch.arange(n)[None]
        with torch.no_grad():
            x = m.forward_layers(m.embed(torch.tensor([seq[:-1]])), 0, ell, cache, zeros, pos)
            ad.prefill(x, ak, av, zeros, pos, m.rope_cos_sin(n + 1))
            m.forward_layers(x, ell, m.config.num_hidden_layers, cache, zeros, pos)
        torch.testing.assert_close(buf.cache.k[:, b, :, :n], cache.k[:, 0, :, :n], atol=tol, rtol=tol)
        torch.testing.assert_close(buf.cache.v[:, b, :, :n], cache.v[:, 0, :, :n], atol=tol, rtol=tol)
        # the last cycle's catch-up (adapter K/V of slots L0 - catch_n .. L0 - 1; catch_n = 1 without lookup) is
        # still pending when generation stops
        na = min(n, int(buf.L0[b]) - int(buf.catch_n[b])) if bool(buf.need_catch[b]) else n
        torch.testing.assert_close(buf.ak[b, :, :na], ak[0, :, :na], atol=tol, rtol=tol, msg="adapter cache")
        torch.testing.assert_close(buf.av[b, :, :na], av[0, :, :na], atol=tol, rtol=tol, msg="adapter cache")


@pytest.mark.parametrize("tree", [False, True])
@pytest.mark.parametrize("kind,exit_layer", [("llama", 2), ("qwen2", 1)])
def test_forced_full_acceptance(kind, exit_layer, tree):
    hf, dec = oracle(kind, exit_layer)
    prompts = make_prompts(hf.config.vocab_size, n=4, seed=5)
    ref = hf_greedy(hf, prompts)
    out = dec.generate(prompts, NEW, threshold=0.0, max_draft=4, tree=tree)
    assert [t.tolist() for t in out.tokens] == ref
    s = out.stats
    # every cycle drafts 4 and accepts all 4 (the last cycle of a row may be cut by max_new_tokens)
    assert s.accept_hist[4] >= sum(s.accept_hist) - 1 and s.accept_hist[4] >= 3 * len(prompts)
    assert s.mean_drafted == 4.0 and s.accept_per_position[:4] == [1.0] * 4
    check_caches(dec, prompts, out.tokens)
    single = dec.generate(prompts[1], NEW, threshold=0.0, max_draft=4, tree=tree)
    assert single.tokens.tolist() == ref[1] and single.stats.cycles == 4  # 5 tokens per cycle


@pytest.mark.parametrize("path", ["python", "native"])
def test_catch_up_control_fails(monkeypatch, path):
    """Without the catch-up the adapter cache has holes after all-accepted cycles: the consistency check sees it,
    on the Python draft side (kangaroo.draft.catch_up) and in the CPU chain's native draft_chain (the requests
    dropped before the call)."""
    hf, dec = oracle("llama", 2)
    prompts = make_prompts(hf.config.vocab_size, n=2, seed=5)
    if path == "python":
        monkeypatch.setattr(kstate, "draft_chain_args", lambda *a: None)
        monkeypatch.setattr(kdraft, "catch_up", lambda st: st.buf.need_catch.zero_())
    else:
        dec = keep_states(KangarooDecoder(dec.model, dec.adapter, draft_head="int8"))
        native, calls = kdraft.native_ops(), []

        def chain(*a):
            a[20].zero_()  # need_catch (after draft_step's 17 static arguments: tok, L0, alive, need_catch, ...)
            calls.append(1)
            return native.draft_chain(*a)
        monkeypatch.setattr(kdraft, "native_ops", lambda: types.SimpleNamespace(draft_chain=chain))
    out = dec.generate(prompts, NEW, threshold=0.0, max_draft=4)
    assert path == "python" or (calls and dec.states[-1].draft_chain is not None)
    with pytest.raises(AssertionError, match="adapter cache"):
        check_caches(dec, prompts, out.tokens)


@pytest.mark.parametrize("depth", [0, 1])
def test_tree_accepts_sibling(monkeypatch, depth):
    """The oracle's best token is made the rank-2 candidate at draft depth `depth` + 1: the chain draft there is
    rejected and its sibling accepted, so every cycle accepts depth + 1 nodes ending in a sibling (compact_kv
    moves it, and the catch-up runs the adapter on it)."""
    hf, dec = oracle("llama", 2)
    gamma = 3
    real = kdraft.lm_head_topk
    calls = [0]

    def swapped(r, lm, k, **kw):
        toks, logp = real(r, lm, k, **kw)
        step = calls[0] % gamma
        calls[0] += 1
        if step == depth:
            toks = toks[:, [1, 0] + list(range(2, k))]
            logp = logp[:, [1, 0] + list(range(2, k))]
        return toks, logp

    monkeypatch.setattr(kdraft, "lm_head_topk", swapped)
    prompts = make_prompts(hf.config.vocab_size, n=4, seed=6)
    ref = hf_greedy(hf, prompts)
    out = dec.generate(prompts, NEW, threshold=0.0, max_draft=gamma, tree=True, sibling_threshold=0.0)
    assert [t.tolist() for t in out.tokens] == ref
    h = out.stats.accept_hist
    assert h[depth + 1] >= sum(h) - len(prompts), h  # all but the rows' last (truncated) cycles
    check_caches(dec, prompts, out.tokens)


@pytest.mark.parametrize("tree", [False, True])
def test_random_adapter_caches_consistent(tree):
    hf, dec = random_decoder("mistral", 2)
    prompts = make_prompts(hf.config.vocab_size, n=4, seed=8)
    ref = hf_greedy(hf, prompts)
    out = dec.generate(prompts, NEW, threshold=0.3, max_draft=4, tree=tree)
    assert [t.tolist() for t in out.tokens] == ref
    assert out.stats.cycles > NEW // 5  # low acceptance: many cycles
    check_caches(dec, prompts, out.tokens)
