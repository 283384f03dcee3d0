"""KangarooAdapter.from_pretrained on the official Kangaroo release format (config.json with
num_hidden_layers 1 + pytorch_model.bin of its AdapterModel), synthesised with torch.save: the loaded adapter
computes the official a(h) = norm(h + attn(input_layernorm(h))) (checked against transformers' own one-layer
LlamaModel with its MLP zeroed), every needed key is checked, ignored keys are named, other shapes are refused,
and the decoder stays exact with it."""

import json
import warnings

import pytest
import torch
import transformers as tf
from kangaroo.adapter import KangarooAdapter
from kangaroo.generate import KangarooDecoder
from test_decoder_exact import hf_greedy, make_prompts

D, H, HK, V = 128, 4, 2, 97  # head_dim 32: the smallest the kernels take


def _base(seed=0, hidden=D):
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=V, hidden_size=hidden, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=H, num_key_value_heads=HK, initializer_range=0.15,
                         max_position_embeddings=256, rope_theta=10000.0)
    return tf.LlamaForCausalLM(cfg).eval()


def _official(tmp_path, hidden=D, seed=1, drop=(), extra=None, layers=1):
    """An official-format folder: the state dict of a one-layer transformers LlamaModel without embeddings (the
    official AdapterModel's keys plus the MLP / post-attention norm its training run left in)."""
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=V, hidden_size=hidden, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=H, num_key_value_heads=HK, rms_norm_eps=1e-6, initializer_range=0.1)
    one = tf.LlamaModel(cfg).eval()
    with torch.no_grad():
        for n in ("input_layernorm", "post_attention_layernorm"):
            getattr(one.layers[0], n).weight.uniform_(0.5, 1.5)
        one.norm.weight.uniform_(0.5, 1.5)
    sd = {k: v.clone() for k, v in one.state_dict().items() if not k.startswith("embed_tokens")}
    for k in drop:
        sd.pop(k)
    sd.update(extra or {})
    tmp_path.mkdir(parents=True, exist_ok=True)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    d = cfg.to_dict()
    d["num_hidden_layers"] = layers
    (tmp_path / "config.json").write_text(json.dumps(d))
    return one


def test_loads_and_computes_the_official_adapter(tmp_path):
    one = _official(tmp_path)
    with pytest.warns(UserWarning, match="ignoring.*mlp.down_proj.*post_attention_layernorm"):
        ad = KangarooAdapter.from_pretrained(tmp_path)
    assert ad.exit_layer == 2 and ad.num_kv_heads == HK and ad.head_dim == D // H
    # the official forward: the one-layer model with its MLP switched off is h + attn(ln(h)), then the norm
    with torch.no_grad():
        one.layers[0].mlp.down_proj.weight.zero_()
        h = torch.randn(2, 9, D)
        want = one(inputs_embeds=h).last_hidden_state
        got = ad(h)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning, match="ignoring"):
        assert KangarooAdapter.from_pretrained(tmp_path, exit_layer=3).exit_layer == 3


def test_refuses_incomplete_foreign_or_misshapen_checkpoints(tmp_path):
    _official(tmp_path / "a", drop=["layers.0.self_attn.k_proj.weight"])
    with pytest.raises(ValueError, match="missing keys.*k_proj"):
        KangarooAdapter.from_pretrained(tmp_path / "a")
    _official(tmp_path / "b", extra={"layers.1.self_attn.q_proj.weight": torch.zeros(D, D)})
    with pytest.raises(ValueError, match="unknown keys.*layers.1"):
        KangarooAdapter.from_pretrained(tmp_path / "b")
    _official(tmp_path / "c", layers=2)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        KangarooAdapter.from_pretrained(tmp_path / "c")
    _official(tmp_path / "d", extra={"norm.weight": torch.ones(D + 1)})
    with pytest.raises(ValueError, match="shape"), pytest.warns(UserWarning, match="ignoring"):
        KangarooAdapter.from_pretrained(tmp_path / "d")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "config.json").write_text(json.dumps({"hidden_size": D, "num_attention_heads": H,
                                                            "num_hidden_layers": 1}))
    with pytest.raises(ValueError, match="pytorch_model.bin"):
        KangarooAdapter.from_pretrained(tmp_path / "e")
    # another base shape: a checkpoint for hidden 64 next to a base of hidden 128
    _official(tmp_path / "f", hidden=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="another model"):
            KangarooAdapter.from_pretrained(tmp_path / "f", base_model=_base())


def test_decoder_with_an_official_adapter_is_exact(tmp_path):
    base = _base()
    _official(tmp_path / "ad")
    prompts = make_prompts(V, n=2, seed=4)
    ref = hf_greedy(base, prompts, new=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dec = KangarooDecoder.from_pretrained(base, adapter=str(tmp_path / "ad"), exit_layer=2)
    for p, want in zip(prompts, ref):
        out = dec.generate(torch.tensor([p]), max_new_tokens=10)
        assert out.tokens[0].tolist() == want
    assert len({t for w in ref for t in w}) > 3  # the outputs vary: not a vacuous comparison
