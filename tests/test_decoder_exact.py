"""Greedy Kangaroo decoding equals transformers' own greedy generate, token for token.

Tiny random fp32 models from transformers configs (Llama with GQA and head_dim != D/H, Mistral, Qwen2 with q/k/v
bias and tied embeddings; initializer_range 0.15 so the outputs vary, which is asserted), 20 prompts of lengths
1..12, random (untrained) adapters. Decoder settings are a covering design over exit layer {1, 2, 3}, threshold
{0, 0.3, 0.6, 1.0}, γ {1, 4, 6}, sequence/tree and batch 1/batch 4 (ragged prompts): every value of every
factor, and every (γ, mode, batch) combination, runs on every model. HF's generate runs once per prompt and model.
"""

import warnings

import pytest
import torch
from kangaroo.adapter import KangarooAdapter
from kangaroo.generate import KangarooDecoder

NEW = 16
N_PROMPTS = 20


pytestmark = pytest.mark.usefixtures("one_thread")


def make_hf(kind: str, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, initializer_range=0.15,
                  max_position_embeddings=256)
    if kind == "llama":
        cfg = tf.LlamaConfig(vocab_size=97, num_attention_heads=4, num_key_value_heads=2, head_dim=32, **common)
        model = tf.LlamaForCausalLM(cfg)
    elif kind == "mistral":
        cfg = tf.MistralConfig(vocab_size=131, num_attention_heads=2, num_key_value_heads=2, head_dim=32,
                               **common)
        model = tf.MistralForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = tf.Qwen2Config(vocab_size=257, num_attention_heads=2, num_key_value_heads=1,
                             tie_word_embeddings=True, **common)
        model = tf.Qwen2ForCausalLM(cfg)
    else:
        raise ValueError(kind)
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def hf_greedy(model, prompts, new=NEW):
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])  # an explicit mask: token 0 (the pad id) must not be masked out
            g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                               do_sample=False)
            out.append(g[0, len(p):].tolist())
    return out


def make_prompts(V, n=N_PROMPTS, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (1 + i % 12,), generator=g).tolist() for i in range(n)]


_CACHE = {}


def reference(kind):
    """(hf model, prompts, HF greedy outputs), computed once per model kind."""
    if kind not in _CACHE:
        hf = make_hf(kind)
        prompts = make_prompts(hf.config.vocab_size)
        _CACHE[kind] = (hf, prompts, hf_greedy(hf, prompts))
    return _CACHE[kind]


def decoder(hf, exit_layer, seed=0):
    torch.manual_seed(100 + seed + exit_layer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return KangarooDecoder.from_pretrained(hf, exit_layer=exit_layer)


def run_kangaroo(dec, prompts, batch, **kw):
    if batch == 1:
        return [dec.generate(p, NEW, **kw).tokens.tolist() for p in prompts]
    out = []
    for s in range(0, len(prompts), batch):
        out += [t.tolist() for t in dec.generate(prompts[s:s + batch], NEW, **kw).tokens]
    return out


# covering design: i -> (exit layer, threshold, gamma, tree, batch)
SETTINGS = [(1 + i % 3, [0.0, 0.3, 0.6, 1.0][i % 4], [1, 4, 6][i // 4], bool((i // 2) % 2), [1, 4][i % 2])
            for i in range(12)]


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_reference_outputs_vary(kind):
    _, prompts, ref = reference(kind)
    assert all(len(r) == NEW for r in ref)
    distinct = [len(set(r)) for r in ref]
    assert sum(d >= 4 for d in distinct) >= len(ref) * 3 // 4, distinct  # not one repeated token
    assert len({tuple(r) for r in ref}) >= len(ref) - 2  # different prompts, different continuations


@pytest.mark.parametrize("setting", SETTINGS, ids=[f"l{s[0]}-eta{s[1]}-g{s[2]}-{'tree' if s[3] else 'seq'}-b{s[4]}"
                                                   for s in SETTINGS])
@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_greedy_equals_transformers(kind, setting):
    exit_layer, threshold, gamma, tree, batch = setting
    hf, prompts, ref = reference(kind)
    dec = decoder(hf, exit_layer)
    got = run_kangaroo(dec, prompts, batch, threshold=threshold, max_draft=gamma, tree=tree)
    bad = [i for i, (g, r) in enumerate(zip(got, ref)) if g != r]
    assert not bad, f"prompt {bad[0]}: kangaroo {got[bad[0]]} != transformers {ref[bad[0]]}"


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_autoregressive_baseline_equals_transformers(kind):
    hf, prompts, ref = reference(kind)
    dec = decoder(hf, 2)
    out = dec.generate_autoregressive(prompts[:8], NEW)
    assert [t.tolist() for t in out.tokens] == ref[:8]
    assert out.stats.cycles == NEW and out.stats.mean_tokens_per_cycle == 1.0


def test_from_checkpoint_folder_sharded(tmp_path):
    """A local folder (config.json + sharded safetensors) loads to the same decoder; a saved adapter round-trips."""
    hf, prompts, ref = reference("qwen2")
    hf.save_pretrained(tmp_path / "model", max_shard_size="40KB")
    assert (tmp_path / "model" / "model.safetensors.index.json").exists()
    dec0 = decoder(hf, 2)
    dec0.adapter.save_pretrained(tmp_path / "adapter", base_fingerprint=dec0.fingerprint())
    dec = KangarooDecoder.from_pretrained(str(tmp_path / "model"), adapter=str(tmp_path / "adapter"))
    assert dec.fingerprint() == dec0.fingerprint()
    ad = KangarooAdapter.from_pretrained(tmp_path / "adapter")
    for k, v in dec0.adapter.state_dict().items():
        assert torch.equal(ad.state_dict()[k], v)
    got = run_kangaroo(dec, prompts[:6], 4, threshold=0.3, max_draft=4)
    assert got == ref[:6]


@pytest.mark.parametrize("adaptive", [True, False], ids=["adaptive-cap", "fixed-gamma"])
@pytest.mark.parametrize("tree", [False, True], ids=["seq", "tree"])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_predicated_path_equals_transformers(kind, tree, adaptive, monkeypatch):
    """The CUDA decoder's path (no host early exit: every draft step predicated), with and without the adaptive
    draft cap, on CPU: token for token equal to transformers; the cap runs fewer draft steps."""
    hf, prompts, ref = reference(kind)
    dec = decoder(hf, 2)
    dec.host_early_exit = False
    dec.adaptive_draft = adaptive
    outs = []
    steps = []
    for s in range(0, 12, 4):
        out = dec.generate(prompts[s:s + 4], NEW, threshold=0.6, max_draft=6, tree=tree)
        outs += [t.tolist() for t in out.tokens]
        steps.append(out.stats.mean_draft_steps)
    assert outs == ref[:12]
    if adaptive:
        assert min(steps) < 6, steps  # untrained adapters exit early: the cap drops below γ
    else:
        assert steps == [6.0] * 3
