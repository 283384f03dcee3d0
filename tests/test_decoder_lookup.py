"""Kangaroo + lookup (generate(..., lookup=True)): exact, lossless, the branch really accepted, caches consistent.

Greedy output equals transformers' greedy generate on tiny random Llama / Mistral / Qwen2 models (those of
tests/test_decoder_exact.py), sequence and tree drafting, batch 1 and 4 (ragged), CPU early exit and the predicated
(CUDA) path, on prompts built to repeat (a random block repeated, so the lookup finds matches and its branch is
accepted) and prompts that never repeat (distinct tokens). Every cache (shallow, deep, adapter) equals a fresh
prefill of the committed sequence after generation, with catch-ups of several positions exercised; a planted
layout bug of each policy (merge: a lookup node laid out under the wrong parent; first: the lookup chain's shallow
block one slot late) fails both checks. The joint-law sampling test of
tests/test_decoder_sampling.py passes with lookup on a prompt whose suffix repeats. When the lookup finds nothing
the cycle runs the same layer passes as plain Kangaroo (CPU skip).
"""

import warnings

import pytest
import torch
from draft_watch import watch_draft_steps
from kangaroo import draft as kdraft
from kangaroo import lookup as klookup
from kangaroo.generate import KangarooDecoder
from test_decoder_accept import check_caches, keep_states
from test_decoder_exact import hf_greedy, make_hf
from test_decoder_sampling import V as SV
from test_decoder_sampling import chi2_pvalue
from test_decoder_sampling import model as sampling_model
from test_decoder_sync import CountHostReads, _changed, _state

NEW = 16

pytestmark = pytest.mark.usefixtures("one_thread")


def make_lookup_prompts(V, seed=1):
    """(repeating prompts, never-repeating prompts), 4 each, ragged."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda n: torch.randint(0, V, (n,), generator=g).tolist()  # noqa: E731
    b12, b5, b8 = rnd(12), rnd(5), rnd(8)
    rep = [b12 * 3, b5 * 3 + b5[:2], b8 * 2, rnd(3) + b12 * 2]
    perm = torch.randperm(V, generator=g).tolist()
    norep = [perm[:1], perm[1:8], perm[8:20], perm[20:40]]  # distinct tokens: no n-gram occurs twice
    return rep, norep


_REF = {}


def reference(kind):
    if kind not in _REF:
        hf = make_hf(kind)
        rep, norep = make_lookup_prompts(hf.config.vocab_size)
        _REF[kind] = (hf, rep, norep, hf_greedy(hf, rep), hf_greedy(hf, norep))
    return _REF[kind]


def decoder(hf, exit_layer=2, seed=0):
    torch.manual_seed(100 + seed + exit_layer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return KangarooDecoder.from_pretrained(hf, exit_layer=exit_layer)


def run(dec, prompts, batch, **kw):
    outs, stats = [], []
    for s in range(0, len(prompts), batch):
        out = dec.generate(prompts[s:s + batch] if batch > 1 else prompts[s], NEW, **kw)
        outs += [t.tolist() for t in out.tokens] if batch > 1 else [out.tokens.tolist()]
        stats.append(out.stats)
    return outs, stats


def assert_same(got, ref):
    bad = [i for i, (g, r) in enumerate(zip(got, ref)) if g != r]
    assert not bad, f"prompt {bad[0]}: kangaroo+lookup {got[bad[0]]} != transformers {ref[bad[0]]}"


POLICIES = pytest.mark.parametrize("policy", ["merge", "first"])


@POLICIES
@pytest.mark.parametrize("batch", [1, 4], ids=["b1", "b4"])
@pytest.mark.parametrize("tree", [False, True], ids=["seq", "tree"])
@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_greedy_equals_transformers(kind, tree, batch, policy):
    hf, rep, norep, ref_rep, ref_norep = reference(kind)
    dec = decoder(hf)
    kw = dict(threshold=0.5, max_draft=4, tree=tree, lookup=True, lookup_ngram=(1, 3), lookup_max=6,
              lookup_policy=policy)
    got, stats = run(dec, rep, batch, **kw)
    assert_same(got, ref_rep)
    assert sum(s.accepted_from_lookup for s in stats) > 0, "the lookup branch was never accepted"
    assert all(s.mode.endswith("+lookup") and s.lookup_hit_rate > 0 for s in stats)
    got, stats = run(dec, norep, batch, **kw)
    assert_same(got, ref_norep)


@POLICIES
@pytest.mark.parametrize("tree", [False, True], ids=["seq", "tree"])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_predicated_path_equals_transformers(kind, tree, policy):
    """The CUDA path (no host early exit: the full N + M merged block every cycle, adaptive draft caps)."""
    hf, rep, norep, ref_rep, ref_norep = reference(kind)
    dec = decoder(hf)
    dec.host_early_exit = False
    got, stats = run(dec, rep + norep, 4, threshold=0.6, max_draft=5, tree=tree, lookup=True,
                     lookup_ngram=(2, 4), lookup_policy=policy)
    assert_same(got, ref_rep + ref_norep)
    assert stats[0].accepted_from_lookup > 0


def test_lookup_raises_acceptance():
    """On repeating prompts the branch adds accepted tokens: more tokens per cycle than Kangaroo alone."""
    hf, rep, _, ref_rep, _ = reference("llama")
    dec = decoder(hf)
    plain = dec.generate(rep, NEW, threshold=0.5, max_draft=4)
    look = dec.generate(rep, NEW, threshold=0.5, max_draft=4, lookup=True, lookup_ngram=(1, 3), lookup_max=8)
    assert [t.tolist() for t in look.tokens] == ref_rep
    assert look.stats.mean_tokens_per_cycle > plain.stats.mean_tokens_per_cycle
    assert look.stats.cycles < plain.stats.cycles
    s = look.stats
    rows = sum(s.accept_hist)
    assert s.accepted_from_chain + s.accepted_from_lookup == sum(i * n for i, n in enumerate(s.accept_hist))
    assert s.mean_accepted == pytest.approx((s.accepted_from_chain + s.accepted_from_lookup) / rows)
    assert plain.stats.accepted_from_lookup == 0 and plain.stats.lookup_hit_rate == 0.0


@POLICIES
@pytest.mark.parametrize("tree", [False, True], ids=["seq", "tree"])
@pytest.mark.parametrize("host_exit", [True, False], ids=["cpu-exit", "predicated"])
def test_caches_consistent_with_multi_position_catch_up(tree, host_exit, policy, monkeypatch):
    """After generation every committed position's shallow/deep/adapter K/V equals a fresh prefill (the adapter's
    catch-up of a path that left the chain early covers several positions; the block writes past the committed
    length are overwritten before anything reads them)."""
    hf = make_hf("mistral", seed=3)
    rep, _ = make_lookup_prompts(hf.config.vocab_size, seed=4)
    torch.manual_seed(11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dec = keep_states(KangarooDecoder.from_pretrained(hf, exit_layer=2))
    dec.host_early_exit = host_exit
    widths = []
    real = kdraft.catch_up

    def watched(st):
        widths.append(int(torch.where(st.buf.need_catch & st.buf.alive, st.buf.catch_n, 0).max()))
        return real(st)

    monkeypatch.setattr(kdraft, "catch_up", watched)
    ref = hf_greedy(hf, rep)
    out = dec.generate(rep, NEW, threshold=0.3, max_draft=3, tree=tree, lookup=True, lookup_ngram=(1, 3), lookup_max=6,
                       lookup_policy=policy)
    assert [t.tolist() for t in out.tokens] == ref
    assert out.stats.accepted_from_lookup > 0
    assert max(widths) > 1, widths  # a catch-up of several positions ran
    check_caches(dec, rep, out.tokens)


def _misparent(monkeypatch):
    """Planted bug: the merged tree's layout (mask and positions) puts every lookup node that hangs under another
    node under that node's parent instead, while verification still gets the merge's parents."""
    real = klookup.build_tree

    def wrong(full, **kw):
        n_look = klookup.merge_lookup_tree.last_M
        bad = full.clone()
        tail = bad[:, -n_look:]
        grand = full.gather(1, tail.clamp_min(0).long())
        bad[:, -n_look:] = torch.where(tail > 0, grand.clamp_min(0), tail)
        return real(bad, **kw)

    real_merge = klookup.merge_lookup_tree

    def merge(draft, look, **kw):
        merge.last_M = look.shape[1]
        return real_merge(draft, look, **kw)

    merge.last_M = 1
    monkeypatch.setattr(klookup, "merge_lookup_tree", merge)
    monkeypatch.setattr(klookup, "build_tree", wrong)


def _late_chain_block(monkeypatch):
    """Planted bug of lookup_policy "first" (sequence): the lookup chain's shallow block one slot late (cache slots
    and positions L0 + 1 ..), so x0's shallow K/V is never written and every state sees a shifted context."""
    real = klookup.chain_block

    def late(st, hit):
        st.buf.L0.add_(1)
        real(st, hit)
        st.buf.L0.sub_(1)

    monkeypatch.setattr(klookup, "chain_block", late)


@pytest.mark.parametrize("policy,plant", [("merge", _misparent), ("first", _late_chain_block)],
                         ids=["merge-wrong-parent", "first-late-block"])
def test_planted_layout_bug_is_caught(monkeypatch, policy, plant):
    """A planted layout bug of each policy breaks exactness (llama) and the cache check (mistral)."""
    kw = dict(threshold=0.5, max_draft=4, lookup=True, lookup_ngram=(1, 3), lookup_max=6, lookup_policy=policy)
    hf, rep, _, ref_rep, _ = reference("llama")
    dec = decoder(hf)
    assert run(dec, rep, 4, **kw)[0] == ref_rep
    hf2 = make_hf("mistral", seed=3)
    rep2, _ = make_lookup_prompts(hf2.config.vocab_size, seed=4)
    torch.manual_seed(11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dec2 = keep_states(KangarooDecoder.from_pretrained(hf2, exit_layer=2))
    kw2 = dict(kw, threshold=0.3, max_draft=3)
    check_caches(dec2, rep2, dec2.generate(rep2, NEW, **kw2).tokens)  # control: consistent without the bug
    plant(monkeypatch)
    got, _ = run(dec, rep, 4, **kw)
    out = dec2.generate(rep2, NEW, **kw2)
    assert out.stats.accepted_from_lookup > 0
    assert got != ref_rep, f"the planted {policy} layout bug went unnoticed by the exactness check"
    with pytest.raises(AssertionError):
        check_caches(dec2, rep2, out.tokens)


def test_no_match_costs_what_kangaroo_costs(monkeypatch):
    """Never-repeating prompts and an n-gram length nothing repeats at: no lookup hit, and every cycle runs exactly
    Kangaroo's layer passes (the shallow block is skipped); with hits the block adds one shallow pass a cycle."""
    hf, rep, norep, _, ref_norep = reference("qwen2")
    dec = decoder(hf)
    m = dec.model
    calls = [0]
    real = m.forward_layers

    def counted(*a, **k):
        calls[0] += 1
        return real(*a, **k)

    monkeypatch.setattr(m, "forward_layers", counted)
    per_cycle = []
    for lookup in (False, True):
        calls[0] = 0
        out = dec.generate(norep, NEW, threshold=0.5, max_draft=4, lookup=lookup, lookup_ngram=(6, 6))
        assert [t.tolist() for t in out.tokens] == ref_norep
        per_cycle.append((calls[0], out.stats.cycles))
        if lookup:
            assert out.stats.lookup_hit_rate == 0.0
    assert per_cycle[0] == per_cycle[1]
    calls[0] = 0
    out = dec.generate(rep, NEW, threshold=0.5, max_draft=4, lookup=True, lookup_ngram=(1, 3), lookup_max=8)
    assert calls[0] > 0 and out.stats.accepted_from_lookup > 0


def test_one_transfer_per_cycle_and_warm_up_leaves_state(monkeypatch):
    """The predicated (CUDA) path with lookup: at most one host read a cycle, and the graph warm-up changes no
    state (the committed history included)."""
    from kangaroo import graphs as kgraphs

    hf, rep, *_ = reference("llama")
    dec = decoder(hf)
    dec.host_early_exit = False
    real = kgraphs.warm_up_inactive
    diffs = []

    def checked(st, steps, **k):
        before = _state(st)
        before["history"] = st.buf.lookup.history.clone()
        real(st, steps, **k)
        after = _state(st)
        after["history"] = st.buf.lookup.history.clone()
        diffs.append(_changed(before, after))

    for kw in (dict(), dict(tree=True, temperature=0.8, seed=2)):
        with CountHostReads() as c:
            out = dec.generate(rep, 12, lookup=True, lookup_ngram=(1, 3), lookup_max=8, **kw)
        assert out.stats.cycles >= 3 and out.stats.accepted_from_lookup > 0
        assert c.count <= out.stats.cycles, (c.count, out.stats.cycles, c.what[:10])
        monkeypatch.setattr(kgraphs, "warm_up_inactive", checked)  # its own reads are not the decoder's
        dec.generate(rep, 12, lookup=True, lookup_ngram=(1, 3), lookup_max=8, **kw)
        monkeypatch.setattr(kgraphs, "warm_up_inactive", real)
    assert diffs == [[], []], diffs


SAMPLE_PROMPT = [5, 4, 7, 0, 5, 4]  # its suffix "5 4" occurred before: the lookup proposes 7 0 5 4


def target_joint(hf, prompt, temperature, top_k, top_p):
    from kangaroo_kernels.reference.verify_sample import filtered_probs_ref

    with torch.no_grad():
        logits = hf(torch.tensor([prompt + [x] for x in range(SV)])).logits
    p1 = filtered_probs_ref(logits[0, len(prompt) - 1], temperature, top_k, top_p)
    p2 = filtered_probs_ref(logits[:, len(prompt)], temperature, top_k, top_p)
    return (p1[:, None] * p2).flatten()


@pytest.mark.parametrize("tree,temperature,top_k,top_p", [(False, 1.0, 0, 1.0), (True, 0.8, 0, 0.9)],
                         ids=["seq", "tree"])
def test_sampling_first_two_tokens_follow_target(tree, temperature, top_k, top_p):
    hf, dec = sampling_model()
    rows = 1600
    out = dec.generate([SAMPLE_PROMPT] * rows, 2, threshold=0.0, max_draft=2, tree=tree, temperature=temperature,
                       top_k=top_k, top_p=top_p, seed=99, lookup=True, lookup_ngram=(1, 3), lookup_max=4)
    toks = torch.stack(out.tokens)
    counts = torch.bincount(toks[:, 0] * SV + toks[:, 1], minlength=SV * SV)
    p = chi2_pvalue(counts, target_joint(hf, SAMPLE_PROMPT, temperature, top_k, top_p))
    assert p > 1e-4, f"chi-squared p = {p:.2e}: samples do not follow the target"
    assert out.stats.accepted_from_lookup > 0 and out.stats.lookup_hit_rate > 0.5


def test_sampling_control_fails(monkeypatch):
    """Control: the merged tree's drafts (chain and lookup branch) verified as if drawn from a uniform q (a wrong q
    for deterministic drafts) bias the samples; the same test rejects it."""
    import importlib

    kverify = importlib.import_module("kangaroo.verify")
    real = kverify.verify_sample

    def broken(draft_tokens, target_logits, **kw):
        B, N = draft_tokens.shape
        kw["draft_probs"] = torch.full((B, N, target_logits.shape[-1]), 1.0 / target_logits.shape[-1])
        return real(draft_tokens, target_logits, **kw)

    monkeypatch.setattr(kverify, "verify_sample", broken)
    hf, dec = sampling_model()
    out = dec.generate([SAMPLE_PROMPT] * 1600, 2, threshold=0.0, max_draft=2, temperature=1.0, seed=99,
                       lookup=True, lookup_ngram=(1, 3), lookup_max=4)
    toks = torch.stack(out.tokens)
    counts = torch.bincount(toks[:, 0] * SV + toks[:, 1], minlength=SV * SV)
    assert chi2_pvalue(counts, target_joint(hf, SAMPLE_PROMPT, 1.0, 0, 1.0)) < 1e-6


@pytest.mark.parametrize("kw,match", [(dict(lookup=1), "lookup must be"),
                                      (dict(lookup=True, lookup_ngram=(1, 3), lookup_max=0), "lookup_max"),
                                      (dict(lookup=True, lookup_ngram=(1, 3), lookup_max=2.0), "lookup_max"),
                                      (dict(lookup=True, lookup_ngram=(3, 2)), "lookup_ngram"),
                                      (dict(lookup=True, lookup_ngram=(0, 2)), "lookup_ngram"),
                                      (dict(lookup=True, lookup_ngram=3), "lookup_ngram")])
def test_bad_lookup_arguments(kw, match):
    hf, rep, *_ = reference("qwen2")
    dec = decoder(hf)
    with pytest.raises(ValueError, match=match):
        dec.generate(rep[0], 4, **kw)


@pytest.mark.filterwarnings("ignore:KangarooDecoder")
def test_cli_lookup(tmp_path, capsys):
    from kangaroo import cli

    hf, rep, _, ref_rep, _ = reference("llama")
    hf.save_pretrained(tmp_path / "m")
    ids = " ".join(map(str, rep[0]))
    rc = cli.main(["generate", str(tmp_path / "m"), "--ids", ids, "--max-new-tokens", str(NEW), "--device", "cpu",
                   "--lookup", "--lookup-max", "5", "--lookup-ngram", "1", "2", "--baseline"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert cap.out.split() == [str(t) for t in ref_rep[0]]
    assert "identical output" in cap.err and "from the lookup branch" in cap.err
    for flags in (["--lookup-policy", "merge", "--draft-head", "exact"], ["--lookup-policy", "first",
                                                                            "--draft-head", "int8"]):
        rc = cli.main(["generate", str(tmp_path / "m"), "--ids", ids, "--max-new-tokens", str(NEW), "--device",
                       "cpu", "--lookup", *flags])
        cap = capsys.readouterr()
        assert rc == 0 and cap.out.split() == [str(t) for t in ref_rep[0]], cap.err
    assert cli.main(["generate", str(tmp_path / "m"), "--ids", ids, "--device", "cpu", "--lookup",
                     "--lookup-max", "0"]) == 2
    assert "lookup_max" in capsys.readouterr().err


@pytest.mark.parametrize("poison_real", [False, True], ids=["past-catch_n", "control"])
def test_catch_up_block_garbage_is_never_read(poison_real, monkeypatch):
    """The predicated catch-up block also appends adapter K/V for its tokens past catch_n, at slots L0 .. L0+W-1.
    Overwriting those slots with 1e4 after the block changes no draft (they are rewritten before any adapter step
    reads them): the cycles and acceptance statistics equal the clean run's. Control: poisoning the last real
    catch-up slot L0 - 1 instead does change them."""
    hf = make_hf("mistral", seed=3)
    rep, _ = make_lookup_prompts(hf.config.vocab_size, seed=4)
    torch.manual_seed(11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dec = KangarooDecoder.from_pretrained(hf, exit_layer=2)
    dec.host_early_exit = False
    kw = dict(threshold=0.3, max_draft=3, lookup=True, lookup_ngram=(1, 3), lookup_max=6)
    clean = dec.generate(rep, NEW, **kw)
    real = kdraft._adapter_block

    def poisoned(st, h, start, active):
        real(st, h, start, active)
        b, W = st.buf, h.shape[1]
        first = b.L0 - 1 if poison_real else b.L0
        idx = (first[:, None] + b.arange_block[None, :1 if poison_real else W]).long()
        for c in (b.ak, b.av):
            i = idx[:, None, :, None].expand(-1, c.shape[1], -1, c.shape[3])
            c.scatter_(2, i, torch.where(active[:, None, None, None], 1e4, c.gather(2, i)))

    monkeypatch.setattr(kdraft, "_adapter_block", poisoned)
    dirty = dec.generate(rep, NEW, **kw)
    assert [t.tolist() for t in dirty.tokens] == [t.tolist() for t in clean.tokens]  # exact either way
    same = (dirty.stats.cycles, dirty.stats.accept_hist, dirty.stats.accepted_from_chain) == (
        clean.stats.cycles, clean.stats.accept_hist, clean.stats.accepted_from_chain)
    assert same != poison_real, (clean.stats, dirty.stats)


def test_lookup_first_skips_the_chain_where_the_lookup_matches(monkeypatch):
    """lookup_policy="first": a cycle whose rows all found a continuation runs no adapter draft step (only the
    catch-up of x0 and the accepted path); "merge" drafts the chain every cycle; both give transformers' output."""
    hf, rep, _, ref_rep, _ = reference("llama")
    dec = decoder(hf)
    steps = []
    watch_draft_steps(monkeypatch, on_draft=lambda tok: steps.append(1))
    runs = {}
    for policy in ("merge", "first"):
        steps.clear()
        out = dec.generate(rep[0], NEW, threshold=0.5, max_draft=4, lookup=True, lookup_ngram=(1, 3),
                           lookup_policy=policy)
        assert out.tokens.tolist() == ref_rep[0]
        runs[policy] = (len(steps), out.stats)
    assert runs["first"][0] < runs["merge"][0]
    assert runs["first"][1].accepted_from_lookup > 0
    assert runs["merge"][0] >= runs["merge"][1].cycles  # at least one draft step every cycle
    with pytest.raises(ValueError, match="lookup_policy"):
        dec.generate(rep[0], 4, lookup=True, lookup_ngram=(1, 3), lookup_policy="both")
