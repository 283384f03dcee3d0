"""Adapter training (kangaroo.train) and corpora (kangaroo.data) on a tiny model and corpus. CPU, ~20 s."""

import json

import pytest
import torch
from kangaroo import data, train

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread; on a shared 2-core machine two threads can be 30x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    train.tune_malloc()
    yield
    torch.set_num_threads(n)


def _texts(max_bytes=120_000):
    files, _ = data.split_stdlib(data.stdlib_source_files())
    return data.sample_texts(files, max_bytes, seed=1)


@pytest.fixture(scope="module")
def tok():
    return data.train_bpe_tokenizer(_texts(60_000), vocab_size=320)


@pytest.fixture(scope="module")
def corpus(tok):
    exs = [data.text_example(tok, t) for t in _texts()]
    ds = data.PackedDataset(exs, seq_len=64)
    held = data.PackedDataset.__new__(data.PackedDataset)
    held.ids, held.loss_mask, held.seq_len = ds.ids[-8:], ds.loss_mask[-8:], 64
    ds.ids, ds.loss_mask = ds.ids[:-8], ds.loss_mask[:-8]
    return ds, held


def _tiny_model(vocab, layers=4, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def base(tok, corpus):
    """A tiny LM pretrained for a few seconds so that its next-token distributions carry structure."""
    m = _tiny_model(len(tok))
    train.train_lm(m, corpus[0], train.LMTrainConfig(seq_len=64, batch_size=8, steps=100, lr=1e-2, warmup=10,
                                                     dtype="fp32"), progress=False)
    return m


def _cfg(**kw):
    d = dict(exit_layer=1, seq_len=64, batch_size=4, steps=30, lr=3e-3, warmup=3, dtype="fp32", seed=0,
             save_every=0)
    d.update(kw)
    return train.AdapterTrainConfig(**d)


def test_training_lowers_loss_and_raises_agreement(base, corpus):
    ds, held = corpus
    t = train.AdapterTrainer(base, ds, _cfg(steps=40), progress=False)
    before = train.evaluate_adapter(base, t.adapter, 1, heldout=held)
    t.train()
    after = train.evaluate_adapter(base, t.adapter, 1, heldout=held)
    assert after["heldout_loss"] < before["heldout_loss"], (before, after)
    assert after["heldout_kl"] < 0.5 * before["heldout_kl"], (before, after)
    assert after["heldout_top1_agreement"] > before["heldout_top1_agreement"] + 0.05, (before, after)
    assert all(p.grad is None for p in base.parameters())  # the base stays frozen


def test_grad_accumulation_matches_one_big_batch(base, corpus):
    ds, _ = corpus
    rows = ds.ids[:4], ds.loss_mask[:4]
    a = train.AdapterTrainer(base, ds, _cfg(batch_size=4, grad_accum=1), progress=False)
    b = train.AdapterTrainer(base, ds, _cfg(batch_size=2, grad_accum=2), progress=False)
    b.adapter.load_state_dict(a.adapter.state_dict())
    ra = a.train_step([rows])
    rb = b.train_step([(rows[0][:2], rows[1][:2]), (rows[0][2:], rows[1][2:])])
    assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
    for (n, p), q in zip(a.adapter.named_parameters(), b.adapter.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-4, msg=n)


def test_checkpoint_round_trip(base, corpus, tmp_path):
    from kangaroo.adapter import KangarooAdapter

    ds, held = corpus
    t = train.AdapterTrainer(base, ds, _cfg(steps=3), out_dir=tmp_path, progress=False)
    t.train()
    loaded = KangarooAdapter.from_pretrained(tmp_path, base_model=base)
    assert loaded.exit_layer == 1
    assert loaded.base_fingerprint == train.base_fingerprint(base)
    h = torch.randn(2, 9, 64)
    pos = torch.arange(9)[None].expand(2, -1)
    torch.testing.assert_close(loaded(h, pos), t.adapter(h, pos))
    st = torch.load(tmp_path / "trainer_state.pt", weights_only=False)
    assert st["step"] == 3 and st["config"]["exit_layer"] == 1


def test_resume_continues_from_saved_step(base, corpus, tmp_path):
    ds, _ = corpus
    full = train.AdapterTrainer(base, ds, _cfg(steps=8), progress=False)
    full.train()

    first = train.AdapterTrainer(base, ds, _cfg(steps=8, save_every=4), out_dir=tmp_path, progress=False)
    first.train(steps=5)  # "interrupted" after step 5; the periodic checkpoint is at step 4
    ck = train.AdapterTrainer.latest_checkpoint(tmp_path)
    assert ck is not None and ck.name == "step-0000004"
    second = train.AdapterTrainer(base, ds, _cfg(steps=8, save_every=4), out_dir=tmp_path, progress=False)
    assert second.load_checkpoint(ck) == 4
    second.train()
    assert second.step == 8 and [h["step"] for h in second.history] == list(range(1, 9))
    for (n, p), q in zip(full.adapter.named_parameters(), second.adapter.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=n)


def test_chat_template_masks_user_turns(tok, tmp_path):
    conv = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "print hello"},
            {"role": "assistant", "content": "print('hello')"}, {"role": "user", "content": "and twice?"},
            {"role": "assistant", "content": "for _ in range(2):\n    print('hello')"}]
    ex = data.chat_example(tok, conv)
    assert len(ex.ids) == len(ex.mask)
    trained = tok.decode([i for i, m in zip(ex.ids, ex.mask) if m])
    assert trained == "print('hello')<|end|>\nfor _ in range(2):\n    print('hello')<|end|>\n"
    # masked-out tokens hold every user/system turn and the assistant headers
    ctx = tok.decode([i for i, m in zip(ex.ids, ex.mask) if not m])
    assert "print hello" in ctx and "and twice?" in ctx and "be brief" in ctx and ctx.count("<|assistant|>") == 2

    # ShareGPT JSONL through load_examples, and the shift to per-position loss masks
    p = tmp_path / "chat.jsonl"
    sg = {"conversations": [{"from": "human", "value": "print hello"}, {"from": "gpt", "value": "print('hello')"}]}
    p.write_text(json.dumps(sg) + "\n" + json.dumps({"text": "x = 1\n"}) + "\n")
    exs = data.load_examples([p], tok)
    assert len(exs) == 2 and all(exs[1].mask)
    ids = sum((e.ids for e in exs), [])
    ds = data.PackedDataset(exs, seq_len=len(ids))
    tok_mask = torch.tensor(sum((e.mask for e in exs), []), dtype=torch.bool)
    assert torch.equal(ds.loss_mask[0, :-1], tok_mask[1:]) and not ds.loss_mask[0, -1]


def test_simulate_cycles():
    # matches: T T F | T T T T ... ; confidences all high
    m = [1, 1, 0, 1, 1, 1, 1, 1, 1, 1]
    s = train.simulate_cycles(m, [0.9] * 10, eta=0.5, gamma=3)
    # cycle 1 at t=0: accepts 2 (mismatch at 2) -> 3 tokens; t=3: accepts 3 -> 4 tokens; t=7: accepts 3 -> 4 tokens
    assert s["cycles"] == 3 and s["tokens"] == 11
    assert s["reached"] == [3, 3, 3] and s["accepted"] == [3, 3, 2]
    # a low-confidence draft ends the cycle after it (it is still verified)
    s = train.simulate_cycles([1] * 4, [0.9, 0.1, 0.9, 0.9], eta=0.5, gamma=6)
    assert s["cycles"] == 2 and s["tokens"] == 3 + 2  # the trajectory ends after one more draft


def test_evaluate_reports_cycles(base, corpus):
    ds, held = corpus
    ad = train.AdapterTrainer(base, ds, _cfg(steps=1), progress=False).adapter
    rep = train.evaluate_adapter(base, ad, 1, heldout=held, prompts=held.ids[:2, :16], new_tokens=12,
                                 etas=(0.5,), gamma=4)
    assert set(rep["tokens_per_cycle"]) == {"0.5", "0.0"}
    assert 1.0 <= rep["tokens_per_cycle"]["0.5"] <= 5.0
    assert len(rep["acceptance_per_position"]) == 4
    assert "teacher-forced" in train.format_report(rep)


def test_cli_train_and_resume(tok, base, tmp_path):
    model_dir = tmp_path / "model"
    base.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in _texts(30_000)))
    out = tmp_path / "adapter"
    args = ["--model", str(model_dir), "--data", str(corpus), "--out", str(out), "--exit-layer", "2",
            "--seq-len", "64", "--batch-size", "2", "--steps", "4", "--save-every", "2", "--dtype", "fp32",
            "--eval-prompts", "2", "--eval-new-tokens", "8", "--no-progress"]
    assert train.cli_main(args) == 0
    assert (out / "adapter_config.json").exists() and (out / "train_report.json").exists()
    args[args.index("--steps") + 1] = "6"
    assert train.cli_main(args + ["--resume"]) == 0
    st = torch.load(out / "trainer_state.pt", weights_only=False)
    assert st["step"] == 6 and [h["step"] for h in st["history"]] == list(range(1, 7))


def test_resolve_dtype_measures_on_cpu_and_obeys_requests():
    from kangaroo.train import resolve_dtype

    assert resolve_dtype("fp32", "cpu")[0] == "fp32" and resolve_dtype("bf16", "cpu")[0] == "bf16"
    pick, why = resolve_dtype("auto", "cpu", dim=64)
    assert pick in ("bf16", "fp32") and "measured on this CPU" in why and "ms in fp32" in why
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("fp16", "cpu")


def test_resolve_dtype_picks_the_faster(monkeypatch):
    from kangaroo import train

    monkeypatch.setattr(train, "_time_linear_step", lambda dt, *a: {"fp32": 0.010, "bf16": 0.070}[dt])
    assert train.resolve_dtype("auto", "cpu")[0] == "fp32"  # an AVX2-only CPU: bf16 autocast is slower
    monkeypatch.setattr(train, "_time_linear_step", lambda dt, *a: {"fp32": 0.040, "bf16": 0.015}[dt])
    assert train.resolve_dtype("auto", "cpu")[0] == "bf16"  # AMX / avx512_bf16


def test_progress_log_writes_plain_lines_to_a_log(tmp_path, monkeypatch):
    import io

    from kangaroo import train

    clock = [0.0]
    monkeypatch.setattr(train.time, "perf_counter", lambda: clock[0])
    out = io.StringIO()  # not a terminal: plain lines on the stream too
    log = tmp_path / "train.log"
    p = train.ProgressLog(100, "base LM", log_file=log, every_s=30, budget_s=60, stream=out)
    for i in range(10):
        clock[0] += 10.0
        p.update(1, tokens=1000, loss=3.0 - 0.1 * i)
    p.set_total(100)  # 100 steps at 10 s/step = 1000 s, far over the 60 s budget: said once
    p.set_total(100)
    p.close()
    lines = log.read_text().splitlines()
    assert lines[0].startswith("[base LM] step 1/100 | loss 3.000 | 100 tok/s | elapsed 10s, ETA")
    steps = [ln for ln in lines if "step " in ln and "note" not in ln]
    assert len(steps) == 4  # step 1, then every >= 30 s: 4, 7, 10
    assert "step 10/100" in steps[-1] and "ETA 15.0min" in steps[-1]
    notes = [ln for ln in lines if "note:" in ln]
    assert len(notes) == 1 and "over the budget of 60s" in notes[0]
    assert out.getvalue().splitlines() == lines
