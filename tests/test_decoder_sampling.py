"""Lossless sampling: the first two generated tokens follow the target's joint distribution (chi-squared), for
sequence and tree drafting with temperature / top-k / top-p, and the autoregressive baseline; a planted bug (the
deterministic drafts verified as if sampled from a uniform q) must fail the same test.

Vocabulary of 8 so the joint of two positions has 64 cells; 1600 samples = one batched generate call of 1600 rows
(per-row Philox streams) with the same prompt. The expected joint comes from transformers' forward, filtered by
the op library's executable spec of temperature/top-k/top-p (filtered_probs_ref).
"""

import importlib
import warnings

import pytest
import torch
from kangaroo.generate import KangarooDecoder
from scipy.stats import chi2

V = 8
ROWS = 1600
PROMPT = [3, 1, 4]


pytestmark = pytest.mark.usefixtures("one_thread")


_MODEL = {}


def model():
    if not _MODEL:
        import transformers as tf

        torch.manual_seed(0)
        cfg = tf.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                             num_attention_heads=2, num_key_value_heads=1, head_dim=32, initializer_range=0.15)
        hf = tf.LlamaForCausalLM(cfg).eval()
        torch.manual_seed(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dec = KangarooDecoder.from_pretrained(hf, exit_layer=2)
        _MODEL.update(hf=hf, dec=dec)
    return _MODEL["hf"], _MODEL["dec"]


def target_joint(hf, temperature, top_k, top_p):
    from kangaroo_kernels.reference.verify_sample import filtered_probs_ref

    with torch.no_grad():
        seqs = torch.tensor([PROMPT + [x] for x in range(V)])
        logits = hf(seqs).logits  # [V, len+1, V]
    p1 = filtered_probs_ref(logits[0, len(PROMPT) - 1], temperature, top_k, top_p)
    p2 = filtered_probs_ref(logits[:, len(PROMPT)], temperature, top_k, top_p)  # [x1, x2]
    return (p1[:, None] * p2).flatten()


def chi2_pvalue(counts, probs):
    n = counts.sum()
    exp = probs * n
    big = exp >= 5
    obs_c = torch.cat([counts[big], counts[~big].sum()[None]]).double()
    exp_c = torch.cat([exp[big], exp[~big].sum()[None]])
    if exp_c[-1] < 5:  # fold a tiny remainder into the smallest kept cell
        i = int(exp_c[:-1].argmin())
        obs_c[i] += obs_c[-1]
        exp_c[i] += exp_c[-1]
        obs_c, exp_c = obs_c[:-1], exp_c[:-1]
    if bool(((counts > 0) & (probs == 0)).any()):
        return 0.0  # a sample the target cannot produce
    stat = float(((obs_c - exp_c) ** 2 / exp_c).sum())
    return float(chi2.sf(stat, len(exp_c) - 1))


def sample_pairs(dec, mode, temperature, top_k, top_p, seed):
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    prompts = [PROMPT] * ROWS
    if mode == "autoregressive":
        out = dec.generate_autoregressive(prompts, 2, **kw)
    else:
        out = dec.generate(prompts, 2, threshold=0.0, max_draft=2, tree=mode == "tree", **kw)
    toks = torch.stack(out.tokens)
    assert toks.shape == (ROWS, 2)
    return torch.bincount(toks[:, 0] * V + toks[:, 1], minlength=V * V), out.stats


CASES = [("seq", 1.0, 0, 1.0), ("tree", 1.0, 0, 1.0), ("seq", 0.7, 5, 0.9), ("tree", 0.8, 0, 0.85),
         ("autoregressive", 1.0, 3, 1.0)]


@pytest.mark.parametrize("mode,temperature,top_k,top_p", CASES)
def test_first_two_tokens_follow_target(mode, temperature, top_k, top_p):
    hf, dec = model()
    probs = target_joint(hf, temperature, top_k, top_p)
    counts, stats = sample_pairs(dec, mode, temperature, top_k, top_p, seed=1234)
    p = chi2_pvalue(counts, probs)
    assert p > 1e-4, f"chi-squared p = {p:.2e}: samples do not follow the target"
    if mode != "autoregressive":
        # both paths are exercised: some drafts accepted, some rejected
        assert 0 < stats.mean_accepted < 2, stats


def test_broken_variant_fails(monkeypatch):
    """Control: verifying the deterministic drafts against a uniform draft distribution (a wrong q) biases the
    output towards the drafts; the same test must reject it."""
    kverify = importlib.import_module("kangaroo.verify")  # the decoder's binding of the op

    real = kverify.verify_sample

    def broken(draft_tokens, target_logits, **kw):
        B, N = draft_tokens.shape
        kw["draft_probs"] = torch.full((B, N, target_logits.shape[-1]), 1.0 / target_logits.shape[-1])
        return real(draft_tokens, target_logits, **kw)

    monkeypatch.setattr(kverify, "verify_sample", broken)
    hf, dec = model()
    probs = target_joint(hf, 1.0, 0, 1.0)
    counts, _ = sample_pairs(dec, "seq", 1.0, 0, 1.0, seed=1234)
    assert chi2_pvalue(counts, probs) < 1e-6


def test_seeded_sampling_is_reproducible():
    _, dec = model()
    prompts = [PROMPT, PROMPT[:1], PROMPT * 2]
    a = dec.generate(prompts, 12, temperature=1.0, seed=7, tree=True)
    b = dec.generate(prompts, 12, temperature=1.0, seed=7, tree=True)
    c = dec.generate(prompts, 12, temperature=1.0, seed=8, tree=True)
    assert all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens))
    assert not all(torch.equal(x, y) for x, y in zip(a.tokens, c.tokens))
