"""Adapter training beyond one process (kangaroo.train + kangaroo.distributed) and its fault tolerance, on CPU.

- 2 gloo ranks (forked workers, and once the real `torchrun -m kangaroo.cli train`) give the adapter of one process
  with the doubled batch: gradients, optimizer state and weights to fp32 reduction-order tolerance, with a planted
  bug (per-rank loss normalisation) that the same comparison must catch.
- the frozen base sharded with FSDP2 over 2 ranks trains the same adapter as the unsharded single process.
- SIGKILL mid-run, then resume: bitwise the uninterrupted run (one process); a kill inside a checkpoint write
  leaves the previous checkpoint as the latest, and resuming from it is bitwise too.

Tiny random Llama models; each run takes seconds. The workers fork from a fork server that imported torch once
(they start in milliseconds); the torchrun and CLI-subprocess tests pay interpreter start-ups."""

import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from kangaroo import data, train
from kangaroo import distributed as kd

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_thread")]

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 96

# fp32 tolerance for "2 ranks x batch b == 1 process x batch 2b": the two differ only in how the fp32 sums over rows
# are split (two partial sums added by the all-reduce instead of one sum): relative error ~ a few eps(fp32) = 1e-7
# per sum, a few such sums deep. Gradients are compared at 2e-5 relative (with an absolute floor of 1e-6 of the
# largest entry); Adam normalises each update to ~lr, so after a few steps the weights agree to ~lr * 1e-5.
GRAD_RTOL = 2e-5
PARAM_ATOL, PARAM_RTOL = 1e-6, 1e-5


def _tiny_base(layers=3, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, initializer_range=0.1)
    return LlamaForCausalLM(cfg)


def _dataset(rows=26, seq=24, seed=0):
    """Random ids with uneven random loss masks (ranks then see different token counts: what makes per-rank and
    global normalisation differ). Row i starts with token i % VOCAB, so rows can be identified."""
    g = torch.Generator().manual_seed(seed)
    ds = data.PackedDataset.__new__(data.PackedDataset)
    ds.ids = torch.randint(0, VOCAB, (rows, seq), generator=g)
    ds.loss_mask = torch.rand(rows, seq, generator=g) < torch.rand(rows, 1, generator=g)
    ds.loss_mask[:, -1] = False
    ds.seq_len = seq
    return ds


def _cfg(**kw):
    d = dict(exit_layer=1, seq_len=24, batch_size=4, grad_accum=2, steps=3, lr=3e-3, warmup=1, dtype="fp32",
             seed=0, save_every=0, tune_threads=False)
    d.update(kw)
    return train.AdapterTrainConfig(**d)


def _capture_grads(tr):
    """Records the synchronised (and clipped) gradients the optimizer sees at every step."""
    grads, orig = [], tr.opt.step

    def step(*a, **k):
        grads.append([p.grad.detach().clone() for p in tr.adapter.parameters()])
        return orig(*a, **k)

    tr.opt.step = step
    return grads


def _result(tr, grads):
    return {"adapter": {k: v.detach().clone() for k, v in tr.adapter.state_dict().items()},
            "opt": tr.opt.state_dict(), "grads": grads, "loss": [h["loss"] for h in tr.history]}


def _single(**kw):
    tr = train.AdapterTrainer(_tiny_base(), _dataset(), _cfg(**kw), progress=False)
    grads = _capture_grads(tr)
    tr.train()
    return _result(tr, grads)


# -- forked gloo workers ---------------------------------------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bootstrap(fn, rank, world, port, args):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    info, dev = kd.init_from_env("cpu")
    assert info.world_size == world and info.backend == "gloo" and dev.type == "cpu"
    try:
        fn(rank, *args)
    finally:
        kd.shutdown()


def _ctx():
    """Worker processes forked from a fork server that has imported torch, transformers and kangaroo but never run
    anything: they start in milliseconds, and unlike forks of the pytest process they inherit no autograd or
    OpenMP threads (which fork cannot carry over) from earlier tests."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "transformers.models.llama.modeling_llama",
                                "kangaroo.train", "kangaroo.distributed", __name__])
    return ctx


def _start_ranks(fn, world, *args):
    ctx = _ctx()
    port = _free_port()
    procs = [ctx.Process(target=_bootstrap, args=(fn, r, world, port, args)) for r in range(world)]
    for p in procs:
        p.start()
    return procs


def _run_ranks(fn, world, *args, timeout=120):
    """Runs fn(rank, *args) on `world` forked processes in one gloo group; fails on any non-zero exit."""
    procs = _start_ranks(fn, world, *args)
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(1.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    codes = [p.exitcode for p in procs]
    assert codes == [0] * world, f"worker exit codes {codes}"


def _ddp_worker(rank, out, control, kw):
    if control == "local_norm":
        # planted bug: each rank normalises by its own token count (the all-reduce of the count is skipped)
        real = kd.all_reduce_sum
        kd.all_reduce_sum = lambda t: t if t.dtype == torch.int64 else real(t)
    tr = train.AdapterTrainer(_tiny_base(), _dataset(), _cfg(**kw), progress=False)
    assert tr.dist.world_size == 2 and tr._ddp is not None
    grads = _capture_grads(tr)
    tr.train()
    torch.save(_result(tr, grads), Path(out) / f"rank{rank}.pt")


def _fsdp_worker(rank, out):
    import copy

    from torch.distributed.tensor import DTensor

    base = _tiny_base()
    plain = copy.deepcopy(base)
    ds = _dataset()
    tr = train.AdapterTrainer(base, ds, _cfg(batch_size=2, shard_base=True), progress=False)
    assert kd.is_sharded(tr.base)
    for layer, ref in zip(kd.decoder_layers(tr.base), kd.decoder_layers(plain)):
        w = layer.self_attn.q_proj.weight
        assert isinstance(w, DTensor)
        full = ref.self_attn.q_proj.weight
        rows = full.shape[0] // 2
        assert w.to_local().shape[0] == rows  # this rank holds half of every layer
        assert torch.equal(w.to_local(), full[rank * rows:(rank + 1) * rows])
    grads = _capture_grads(tr)
    tr.train()
    # the sharded base's forward (and the held-out report, greedy generation included) on every rank
    ids = ds.ids[:3]
    with torch.no_grad():
        a = tr.base(input_ids=ids, output_hidden_states=True)
        b = plain(input_ids=ids, output_hidden_states=True)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.hidden_states[1], b.hidden_states[1])
    rep_sharded = train.evaluate_adapter(tr.base, tr.adapter, 1, heldout=ds, prompts=ds.ids[:2, :6], new_tokens=5,
                                         etas=(0.5,), gamma=3)
    rep_plain = train.evaluate_adapter(plain, tr.adapter, 1, heldout=ds, prompts=ds.ids[:2, :6], new_tokens=5,
                                       etas=(0.5,), gamma=3)
    assert rep_sharded == rep_plain
    torch.save(_result(tr, grads), Path(out) / f"rank{rank}.pt")


def _assert_grads_close(ga, gb, rtol=GRAD_RTOL):
    assert len(ga) == len(gb)
    for s, (xa, xb) in enumerate(zip(ga, gb)):
        for i, (a, b) in enumerate(zip(xa, xb)):
            scale = float(b.abs().max())
            torch.testing.assert_close(a, b, rtol=rtol, atol=1e-6 * scale, msg=f"step {s + 1}, parameter {i}")


def _assert_same_training(a, b, exact=False):
    if exact:
        assert a["loss"] == b["loss"]
        for k in a["adapter"]:
            assert torch.equal(a["adapter"][k], b["adapter"][k]), k
        return
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    _assert_grads_close(a["grads"], b["grads"])
    for k in a["adapter"]:
        torch.testing.assert_close(a["adapter"][k], b["adapter"][k], atol=PARAM_ATOL, rtol=PARAM_RTOL, msg=k)
    for i, st in a["opt"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            ref = b["opt"]["state"][i][name]
            torch.testing.assert_close(st[name], ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()),
                                       msg=f"{name} {i}")


def test_ddp_two_ranks_equal_one_process_with_double_batch(tmp_path):
    ref = _single(batch_size=4)
    _run_ranks(_ddp_worker, 2, str(tmp_path), None, {"batch_size": 2})
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    _assert_same_training(r0, r1, exact=True)  # DDP replicas stay identical
    _assert_same_training(r0, ref)

    # control: per-rank normalisation (a bug the masks make visible: ranks see different token counts) must fail
    # the same comparison
    ctl = tmp_path / "control"
    ctl.mkdir()
    _run_ranks(_ddp_worker, 2, str(ctl), "local_norm", {"batch_size": 2})
    bad = torch.load(ctl / "rank0.pt", weights_only=False)
    with pytest.raises(AssertionError):
        _assert_grads_close(bad["grads"], ref["grads"])


def _resume_worker(rank, ck, out):
    tr = train.AdapterTrainer(_tiny_base(), _dataset(), _cfg(batch_size=2), progress=False)
    assert tr.resume(ck if rank == 0 else None) is not None and tr.step == 1  # rank 0 reads, the rest receive
    grads = _capture_grads(tr)
    tr.train()
    torch.save(_result(tr, grads), Path(out) / f"rank{rank}.pt")


def test_single_process_checkpoint_resumes_on_two_ranks(tmp_path):
    ref = _single(batch_size=4)
    one = train.AdapterTrainer(_tiny_base(), _dataset(), _cfg(batch_size=4, save_every=1, keep_checkpoints=3),
                               out_dir=tmp_path / "one", progress=False)
    one.train()
    ck = tmp_path / "ck"
    (ck / "checkpoints").mkdir(parents=True)
    os.rename(tmp_path / "one" / "checkpoints" / "step-0000001", ck / "checkpoints" / "step-0000001")
    _run_ranks(_resume_worker, 2, str(ck), str(tmp_path))
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r0["grads"] = ref["grads"][:1] + r0["grads"]  # step 1 came from the checkpoint
    _assert_same_training(r0, ref)


def test_fsdp_sharded_base_equals_unsharded_single_process(tmp_path):
    ref = _single(batch_size=4)
    _run_ranks(_fsdp_worker, 2, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    _assert_same_training(r0, r1, exact=True)
    _assert_same_training(r0, ref)


def test_global_batches_are_sharded_without_overlap():
    ds = _dataset(rows=23)
    ds.ids[:, 0] = torch.arange(23)  # row ids
    for world, b in ((2, 3), (3, 2), (4, 1)):
        one = ds.batches(b * world, seed=5, start_batch=2)
        ranks = [ds.batches(b, seed=5, start_batch=2, rank=r, world_size=world) for r in range(world)]
        for _ in range(12):  # across epoch boundaries
            want, wmask = next(one)
            parts = [next(it) for it in ranks]
            got = torch.cat([p[0] for p in parts])
            assert torch.equal(got, want) and torch.equal(torch.cat([p[1] for p in parts]), wmask)
            assert len(set(got[:, 0].tolist())) == b * world  # no row on two ranks
    with pytest.raises(ValueError, match="rank"):
        next(ds.batches(2, rank=2, world_size=2))
    # a position re-expressed for another global batch: the same epoch, no row skipped
    assert data.convert_batch_position(7, 23, 4, 4) == 7
    assert data.convert_batch_position(3, 23, 4, 8) == 1  # 12 rows seen -> batch 1 of 8 (rows 8..15)
    assert data.convert_batch_position(5, 23, 4, 2) == 11 + 0  # epoch 0 has 5 batches of 4: epoch 1 starts at 11
    assert data.convert_batch_position(6, 23, 4, 2) == 11 + 2


# -- checkpoints and faults ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama + a small BPE tokenizer in an HF folder, and a JSONL corpus."""
    d = tmp_path_factory.mktemp("kdist")
    files, _ = data.split_stdlib(data.stdlib_source_files())
    texts = data.sample_texts(files, 40_000, seed=3)
    tok = data.train_bpe_tokenizer(texts[:8], vocab_size=VOCAB + 200)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, initializer_range=0.1)
    LlamaForCausalLM(cfg).save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    (d / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return d


def _cli_args(d, out, steps, batch, save_every=2):
    return ["--model", str(d / "model"), "--data", str(d / "corpus.jsonl"), "--out", str(out), "--exit-layer", "1",
            "--seq-len", "32", "--batch-size", str(batch), "--grad-accum", "2", "--steps", str(steps),
            "--warmup", "2", "--save-every", str(save_every), "--dtype", "fp32", "--eval-prompts", "1",
            "--eval-new-tokens", "4", "--no-progress"]


def _sub_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "python"), str(ROOT)] + [env.get("PYTHONPATH", "")])
    return env


def _load_out(path):
    from safetensors.torch import load_file

    path = Path(path)
    return load_file(path / "adapter.safetensors"), torch.load(path / "trainer_state.pt", weights_only=False)


def _assert_bitwise(a, b):
    (wa, sa), (wb, sb) = a, b
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert sa["step"] == sb["step"] and [h["loss"] for h in sa["history"]] == [h["loss"] for h in sb["history"]]
    oa, ob = sa["optimizer"], sb["optimizer"]
    assert oa["param_groups"] == ob["param_groups"]
    for i in oa["state"]:
        for name, t in oa["state"][i].items():
            assert torch.equal(t, ob["state"][i][name]), (i, name)


def _cli_worker(rank, argv):
    train.cli_main(argv)


def _descendants(pid):
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def _sigkill_when(proc, path, timeout=180):
    """SIGKILLs `proc` and every process it started (by pid) as soon as `path` exists."""
    deadline = time.monotonic() + timeout
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    if not path.exists():
        proc.kill()
        proc.wait()
        raise AssertionError(f"the run ended (exit {proc.returncode}) or timed out before {path.name} appeared")
    for pid in [proc.pid] + _descendants(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_torchrun_two_ranks_killed_resumed_equal_one_process(model_dir, tmp_path, capfd):
    """2 ranks x batch 2 SIGKILLed after the step-4 checkpoint, resumed by `torchrun -m kangaroo.cli train` and,
    from a copy of the same folder, by one process with batch 4: both end where one uninterrupted process with
    batch 4 ends (fp32 reduction-order tolerance)."""
    import shutil

    steps = 12
    out2 = tmp_path / "two"

    def torchrun(*extra):
        args = [a for a in _cli_args(model_dir, out2, steps, 2) if a != "--no-progress"]  # progress on stdout
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(_free_port()), "-m", "kangaroo.cli", "train"] + args + list(extra)

    # the first run: `kangaroo train` on 2 forked gloo ranks (torchrun's environment, no interpreter start-ups)
    procs = _start_ranks(_cli_worker, 2, _cli_args(model_dir, out2, steps, 2))
    target = out2 / "checkpoints" / "step-0000004"
    deadline = time.monotonic() + 180
    while not target.exists() and all(p.is_alive() for p in procs) and time.monotonic() < deadline:
        time.sleep(0.005)
    for p in procs:
        p.kill()  # SIGKILL, by pid
        p.join()
    assert target.exists() and [p.exitcode for p in procs] == [-signal.SIGKILL] * 2
    assert not (out2 / "adapter.safetensors").exists(), "killed too late"  # it died mid-run
    out3 = tmp_path / "resumed-on-one"
    shutil.copytree(out2, out3)
    r = subprocess.run(torchrun("--resume"), env=_sub_env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # progress and the report print once; rank 0 alone writes
    assert r.stdout.count("held-out report") == 1 and r.stdout.count("adapter saved to") == 1, r.stdout
    assert r.stdout.count(f"step {steps}/{steps}") == 1 and r.stdout.count("resuming from") == 1, r.stdout
    assert "2 processes, backend gloo" in r.stdout
    assert (out2 / "train_report.json").exists()
    assert not [p for p in (out2 / "checkpoints").iterdir() if p.name.startswith(".")]

    # one uninterrupted process with the doubled batch
    out1 = tmp_path / "one"
    assert train.cli_main(_cli_args(model_dir, out1, steps, 4)) == 0
    capfd.readouterr()
    # the killed 2-rank run's folder resumed by one process with batch 4
    assert train.cli_main(_cli_args(model_dir, out3, steps, 4) + ["--resume"]) == 0
    assert "resuming from" in capfd.readouterr().out
    w1, s1 = _load_out(out1)
    assert s1["data"]["global_batch_size"] == 4
    for out in (out2, out3):
        w, st = _load_out(out)
        assert st["data"]["global_batch_size"] == 4 and [h["step"] for h in st["history"]] == list(range(1, 13))
        assert st["world_size"] == (2 if out is out2 else 1)
        for k in w1:
            torch.testing.assert_close(w[k], w1[k], atol=PARAM_ATOL, rtol=PARAM_RTOL, msg=k)
        assert [h["loss"] for h in st["history"]] == pytest.approx([h["loss"] for h in s1["history"]], rel=1e-5)


def test_sigkill_mid_run_then_resume_is_bitwise(model_dir, tmp_path):
    steps = 40
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "kangaroo.cli", "train"] + _cli_args(model_dir, killed, steps, 2)
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(cmd, env=_sub_env(), stdout=log, stderr=subprocess.STDOUT)
        _sigkill_when(proc, killed / "checkpoints" / "step-0000004")
    assert not (killed / "adapter.safetensors").exists()  # it died before the end
    ck = train.AdapterTrainer.latest_checkpoint(killed)
    assert ck is not None and train.AdapterTrainer.checkpoint_step(ck) >= 4

    full = tmp_path / "full"
    assert train.cli_main(_cli_args(model_dir, full, steps, 2)) == 0
    assert train.cli_main(_cli_args(model_dir, killed, steps, 2) + ["--resume"]) == 0
    _assert_bitwise(_load_out(killed), _load_out(full))
    assert not [p for p in (killed / "checkpoints").iterdir() if p.name.startswith(".")]  # leftovers cleaned


def _die_in_second_checkpoint(out):
    """Trains with a torch.save that, writing the state of the second checkpoint, writes half the bytes and then
    SIGKILLs this process (a kill landing mid-write)."""
    import io

    real, calls = torch.save, []

    def dying_save(obj, f, *a, **k):
        if isinstance(obj, dict) and "optimizer" in obj:
            calls.append(1)
            if len(calls) == 2:
                buf = io.BytesIO()
                real(obj, buf)
                with open(f, "wb") as fh:
                    fh.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                    fh.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        return real(obj, f, *a, **k)

    torch.save = dying_save
    torch.set_num_threads(1)
    tr = train.AdapterTrainer(_tiny_base(), _dataset(), _cfg(steps=8, save_every=2), out_dir=out, progress=False)
    tr.train()


def test_kill_inside_a_checkpoint_write_leaves_the_previous_latest(tmp_path):
    out = tmp_path / "run"
    p = _ctx().Process(target=_die_in_second_checkpoint, args=(out,))
    p.start()
    p.join(120)
    assert p.exitcode == -signal.SIGKILL
    ck = out / "checkpoints"
    partial = [q for q in ck.iterdir() if q.name.startswith(".tmp-step-0000004")]
    assert partial and not (ck / "step-0000004").exists()
    assert train.AdapterTrainer.checkpoint_step(partial[0]) is None  # no marker: never a checkpoint
    assert train.AdapterTrainer.latest_checkpoint(out) == ck / "step-0000002"

    tr = train.AdapterTrainer(_tiny_base(), _dataset(), _cfg(steps=8, save_every=2), out_dir=out, progress=False)
    assert tr.resume(out) == ck / "step-0000002" and tr.step == 2
    tr.train()
    ref = train.AdapterTrainer(_tiny_base(), _dataset(), _cfg(steps=8), out_dir=tmp_path / "ref", progress=False)
    ref.train()
    _assert_bitwise(_load_out(out), _load_out(tmp_path / "ref"))
    assert not [q for q in ck.iterdir() if q.name.startswith(".")]

    # a folder whose marker lists a file that is gone is not a checkpoint; a legacy folder without a marker still is
    latest = train.AdapterTrainer.latest_checkpoint(out)
    (latest / "adapter.safetensors").unlink()
    assert train.AdapterTrainer.checkpoint_step(latest) is None
    assert train.AdapterTrainer.latest_checkpoint(out) != latest
    legacy = ck / "step-0000006"
    (legacy / "checkpoint.json").unlink()
    assert train.AdapterTrainer.checkpoint_step(legacy) == 6
