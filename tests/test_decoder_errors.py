"""Bad input fails with a clear ValueError before any work (no decode state is even allocated), and the decoder
stays usable and exact afterwards. Also: EOS per row, the streamer, and the CLI."""

import subprocess
import sys
import warnings

import pytest
import torch
from kangaroo import cli
from kangaroo.adapter import KangarooAdapter
from kangaroo.generate import KangarooDecoder
from test_decoder_exact import hf_greedy, make_hf, make_prompts


@pytest.fixture(scope="module")
def setup():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    hf = make_hf("llama", seed=5)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dec = KangarooDecoder.from_pretrained(hf, exit_layer=2)
    prompts = make_prompts(hf.config.vocab_size, n=3, seed=9)
    yield hf, dec, prompts, hf_greedy(hf, prompts)
    torch.set_num_threads(n)


@pytest.fixture
def allocations(monkeypatch):
    """Counts decode states allocated (kangaroo.generate.new_state): a rejected request allocates none."""
    from kangaroo import generate as kgen

    calls = []
    real = kgen.new_state

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(kgen, "new_state", counted)
    return calls


def test_adapter_from_another_model(setup, tmp_path):
    hf, dec, prompts, ref = setup
    other = make_hf("llama", seed=6)  # same shapes, other weights
    ad = KangarooAdapter.for_model(other, 2)
    ad.save_pretrained(tmp_path / "ad")
    with pytest.raises(ValueError, match="another base model"):
        KangarooDecoder.from_pretrained(hf, adapter=str(tmp_path / "ad"))
    with pytest.raises(ValueError, match="another base model"):
        KangarooAdapter.from_pretrained(tmp_path / "ad", base_model=hf)
    with pytest.raises(ValueError, match="another base model"):
        KangarooDecoder(dec.model, KangarooAdapter.for_model(other, 2))
    qwen = make_hf("qwen2")  # other shapes
    with pytest.raises(ValueError, match="another model"):
        KangarooDecoder.from_pretrained(qwen, adapter=KangarooAdapter.for_model(hf, 2))


def test_adapter_missing_or_bad_keys(setup, tmp_path):
    hf, dec, _, _ = setup
    from safetensors.torch import load_file, save_file

    dec.adapter.save_pretrained(tmp_path / "ad", base_fingerprint=dec.fingerprint())
    sd = load_file(str(tmp_path / "ad" / "adapter.safetensors"))
    sd.pop("self_attn.k_proj.weight")
    save_file(sd, str(tmp_path / "ad" / "adapter.safetensors"))
    with pytest.raises(ValueError, match="missing keys.*k_proj"):
        KangarooAdapter.from_pretrained(tmp_path / "ad", base_model=hf)
    sd["self_attn.k_proj.weight"] = torch.zeros(3, 3)
    save_file(sd, str(tmp_path / "ad" / "adapter.safetensors"))
    with pytest.raises(ValueError, match="shape"):
        KangarooAdapter.from_pretrained(tmp_path / "ad")
    with pytest.raises(ValueError, match="not a Kangaroo adapter folder"):
        KangarooAdapter.from_pretrained(tmp_path)


@pytest.mark.parametrize("exit_layer", [0, 4, 7, -1])
def test_bad_exit_layer(setup, exit_layer):
    hf = setup[0]
    with pytest.raises(ValueError, match="exit_layer"):
        KangarooDecoder.from_pretrained(hf, exit_layer=exit_layer)
    with pytest.raises(ValueError, match="exit_layer"):
        KangarooAdapter.for_model(hf, exit_layer)


def test_explicit_exit_layer_contradicting_the_adapter_raises(setup, tmp_path):
    """exit_layer=2 is a real choice, not a sentinel: with a layer-3 adapter it contradicts and raises."""
    hf = setup[0]
    ad = KangarooAdapter.for_model(hf, 3)
    for given in (ad, None):
        if given is None:
            ad.save_pretrained(tmp_path / "ad3", base_fingerprint=KangarooDecoder(setup[1].model, ad).fingerprint())
            given = str(tmp_path / "ad3")
        for el in (2, 1):
            with pytest.raises(ValueError, match=f"exit_layer={el} contradicts the adapter's exit layer 3"):
                KangarooDecoder.from_pretrained(hf, adapter=given, exit_layer=el)
        assert KangarooDecoder.from_pretrained(hf, adapter=given).exit_layer == 3  # None: the adapter's
        assert KangarooDecoder.from_pretrained(hf, adapter=given, exit_layer=3).exit_layer == 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert KangarooDecoder.from_pretrained(hf).exit_layer == 2  # no adapter: the default 2


def test_no_decode_state_kept_between_calls(setup, monkeypatch):
    """After generate returns, nothing holds its KV caches: the next call does not keep two sets alive."""
    import gc
    import weakref

    from kangaroo.model import LlamaModel

    hf, dec, prompts, ref = setup
    refs = []
    real = LlamaModel.new_cache

    def tracked(self, *a, **k):
        cache = real(self, *a, **k)
        refs.append(weakref.ref(cache.k))
        return cache

    monkeypatch.setattr(LlamaModel, "new_cache", tracked)
    for kw in (dict(), dict(tree=True), dict(temperature=0.7, seed=1)):
        out = dec.generate(prompts, 8, **kw)
        gc.collect()
        assert len(refs) == 1 and refs[0]() is None, kw  # the call's cache is gone once it returned
        refs.clear()
    assert [t.tolist() for t in out.tokens] != []
    kept = []
    dec.debug_hook = kept.append  # the explicit hook keeps one on request
    try:
        dec.generate(prompts, 4)
    finally:
        dec.debug_hook = None
    gc.collect()
    assert refs[0]() is kept[0].buf.cache.k


BAD_INPUTS = [([], "empty"), ([[1, 2], []], "prompt 1 is empty"), ([5, 97], "outside the vocabulary"),
              ([[3], [4, -1]], "outside the vocabulary"), (torch.zeros(2, 2, 2, dtype=torch.long), "1-D"),
              ([1.5, 2], "non-integer"), ("hello", "tensor or a list")]


@pytest.mark.parametrize("ids,match", BAD_INPUTS)
def test_bad_prompts(setup, ids, match, allocations):
    dec = setup[1]
    with pytest.raises(ValueError, match=match):
        dec.generate(ids, 4)
    assert allocations == []  # nothing was allocated or run
    dec.generate([1, 2], 1)
    assert allocations == [1]  # the counter sees an allocation


@pytest.mark.parametrize("kw,match", [(dict(max_new_tokens=250), "too long"), (dict(threshold=1.5), "threshold"),
                                      (dict(max_draft=0), "max_draft"), (dict(temperature=-1.0), "temperature"),
                                      (dict(top_p=0.0), "top_p"), (dict(top_k=-2), "top_k"),
                                      (dict(max_new_tokens=-1), "max_new_tokens")])
def test_bad_settings(setup, kw, match, allocations):
    dec = setup[1]
    args = dict(max_new_tokens=4)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        dec.generate([[1, 2, 3] * 3, [4]], **args)
    assert allocations == []


def test_request_longer_than_cache(setup, allocations):
    hf, dec, prompts, ref = setup
    small = KangarooDecoder(dec.model, dec.adapter, max_cache_len=24)
    with pytest.raises(ValueError, match="too long for the cache"):
        small.generate(prompts, 16)
    assert allocations == []
    # the decoder is untouched and exact afterwards
    assert [t.tolist() for t in dec.generate(prompts, 16, tree=True).tokens] == ref


def test_zero_new_tokens(setup):
    dec = setup[1]
    out = dec.generate([[1, 2], [3]], 0)
    assert [t.tolist() for t in out.tokens] == [[], []]


def test_eos_per_row_and_streamer(setup):
    hf, dec, prompts, ref = setup
    eos = ref[0][5]  # row 0 stops at its 6th token (inclusive); the others run on unless they emit it too
    streamed = {}

    def streamer(row, toks):
        streamed.setdefault(row, []).extend(toks)

    out = dec.generate(prompts, 16, eos=eos, streamer=streamer, max_draft=4)

    def cut(r):
        return r[:r.index(eos) + 1] if eos in r else r

    got = [t.tolist() for t in out.tokens]
    assert got == [cut(r) for r in ref]
    assert len(got[0]) <= 6
    assert [streamed.get(b, []) for b in range(3)] == got


@pytest.mark.filterwarnings("ignore:KangarooDecoder")
def test_cli_generate(setup, tmp_path, capsys):
    hf, dec, prompts, ref = setup
    hf.save_pretrained(tmp_path / "m")
    dec.adapter.save_pretrained(tmp_path / "ad", base_fingerprint=dec.fingerprint())
    ids = " ".join(map(str, prompts[1]))
    rc = cli.main(["generate", str(tmp_path / "m"), "--adapter", str(tmp_path / "ad"), "--ids", ids,
                   "--max-new-tokens", "16", "--device", "cpu", "--baseline", "--tree"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert cap.out.split() == [str(t) for t in ref[1]]
    assert "identical output" in cap.err and "tokens/cycle" in cap.err
    KangarooAdapter.for_model(hf, 1).save_pretrained(tmp_path / "ad1", base_fingerprint=dec.fingerprint())
    rc = cli.main(["generate", str(tmp_path / "m"), "--adapter", str(tmp_path / "ad1"), "--ids", ids,
                   "--max-new-tokens", "8", "--device", "cpu"])  # the adapter's exit layer 1, no default 2
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert cap.out.split() == [str(t) for t in ref[1][:8]]
    assert cli.main(["generate", str(tmp_path / "m"), "--ids", "1 2 100000", "--device", "cpu"]) == 2
    assert "outside the vocabulary" in capsys.readouterr().err
    assert cli.main(["nope"]) == 2
    assert cli.main([]) == 0 and "generate" in capsys.readouterr().out


def test_python_m_cli_help():
    r = subprocess.run([sys.executable, "-m", "kangaroo.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "generate" in r.stdout and "train" in r.stdout and "demo" in r.stdout
