"""Benchmark data-parallel adapter training (kangaroo.train under torch.distributed): tokens/s per rank and the
1 -> 2 process scaling, in one run.

Weak scaling: every rank trains on its own batch of b rows x T tokens (the global batch grows with the ranks), the
base model is a random Llama (frozen), the adapter is wrapped in DDP. Configurations, each in fresh forked
processes (the parent computes nothing, so no thread pool is inherited):
  1 proc x 1 thread      the baseline
  1 proc x 2 threads     the same process given both cores (full mode, when the machine has 2+)
  2 procs x 1 thread     DDP over gloo (on CPU), one core each; NCCL with one GPU per process on a GPU node
Reported per configuration: median step time (wall, per rank; the DDP all-reduce makes the ranks wait for each
other), tokens/s per rank (b*T / step time), total tokens/s over all ranks, the scaling against 1 proc x 1 thread
(total tokens/s ratio; 2.0 is linear), and tokens per CPU-second per rank (the work per token whatever share of
the cores the scheduler gave the rank: on a shared machine the wall-clock ratio mostly measures the neighbours).
The same code is what `torchrun --nproc_per_node N -m kangaroo.cli train` runs (the tests run that command);
forking here only skips the interpreter start-ups.

  python bench/bench_train_distributed.py [--quick] [--steps K] [--hidden D] [--layers L] [--seq T] [--batch b]
"""

import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))

import torch  # noqa: E402
from _common import Recorder, bench_args  # noqa: E402


def _extra(ap):
    ap.add_argument("--steps", type=int, default=0, help="timed steps per configuration (default 12; quick 3)")
    ap.add_argument("--hidden", type=int, default=0, help="model width (default 256; quick 64)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=0, help="tokens per row (default 256; quick 64)")
    ap.add_argument("--batch", type=int, default=4, help="rows per rank and step")
    ap.add_argument("--vocab", type=int, default=0, help="vocabulary (default 4096; quick 512)")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, threads, port, spec, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    from kangaroo import data, train
    from kangaroo import distributed as kd
    from transformers import LlamaConfig, LlamaForCausalLM

    info, dev = kd.init_from_env(spec["device"])
    try:
        torch.manual_seed(0)
        D = spec["hidden"]
        cfg = LlamaConfig(vocab_size=spec["vocab"], hidden_size=D, intermediate_size=4 * D,
                          num_hidden_layers=spec["layers"], num_attention_heads=max(1, D // 32),
                          num_key_value_heads=max(1, D // 64), max_position_embeddings=spec["seq"])
        base = LlamaForCausalLM(cfg)
        g = torch.Generator().manual_seed(1)
        ds = data.PackedDataset.__new__(data.PackedDataset)
        rows = spec["batch"] * world * (spec["steps"] + spec["warmup"])
        ds.ids = torch.randint(0, spec["vocab"], (rows, spec["seq"]), generator=g)
        ds.loss_mask = torch.ones_like(ds.ids, dtype=torch.bool)
        ds.loss_mask[:, -1] = False
        ds.seq_len = spec["seq"]
        tcfg = train.AdapterTrainConfig(exit_layer=1, seq_len=spec["seq"], batch_size=spec["batch"],
                                        steps=spec["steps"] + spec["warmup"], warmup=1, dtype="fp32",
                                        tune_threads=False, save_every=0)
        tr = train.AdapterTrainer(base, ds, tcfg, device=dev, progress=False)
        batches = tr._micro_batches()
        times, cpu = [], []
        for i in range(spec["steps"] + spec["warmup"]):
            micro = next(batches)
            kd.barrier()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t, c = time.perf_counter(), time.process_time()
            tr.train_step(micro)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            if i >= spec["warmup"]:
                times.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
        res = {"rank": rank, "median_s": statistics.median(times), "cpu_s": statistics.median(cpu),
               "tokens_per_step": spec["batch"] * spec["seq"], "backend": info.backend or "none"}
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(res, f)
    finally:
        kd.shutdown()


def _run(world, threads, spec):
    out = tempfile.mkdtemp(prefix="kbench-")
    ctx = mp.get_context("fork")
    port = _free_port()
    ps = [ctx.Process(target=_worker, args=(r, world, threads, port, spec, out)) for r in range(world)]
    for p in ps:
        p.start()
    for p in ps:
        p.join(600)
    for p in ps:
        if p.is_alive():
            p.kill()
    if any(p.exitcode != 0 for p in ps):
        raise RuntimeError(f"{world} x {threads}: worker exit codes {[p.exitcode for p in ps]}")
    res = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(world)]
    return res


def main():
    args = bench_args(__doc__, extra=_extra)
    # imported (not run) before forking: the workers then start at once
    import transformers.models.llama.modeling_llama  # noqa: F401
    from kangaroo import distributed, train  # noqa: F401
    q = args.quick
    cuda = torch.cuda.is_available()
    spec = {"hidden": args.hidden or (64 if q else 256), "layers": args.layers, "seq": args.seq or (64 if q else 256),
            "batch": args.batch, "vocab": args.vocab or (512 if q else 4096), "steps": args.steps or (3 if q else 12),
            "warmup": 1 if q else 2, "device": "cuda" if cuda else "cpu"}
    dev = torch.device("cuda" if cuda else "cpu")
    rec = Recorder("train_distributed", dev, quick=q)
    cores = os.cpu_count() or 1
    if cuda:
        n_gpu = torch.cuda.device_count()
        configs = [(1, 1)] + ([(2, 1)] if n_gpu >= 2 else []) + ([(n_gpu, 1)] if n_gpu > 2 else [])
    else:
        configs = [(1, 1)] + ([] if q or cores < 2 else [(1, 2)]) + [(2, 1)]
    shape = (f"b={spec['batch']}/rank T={spec['seq']} D={spec['hidden']} L={spec['layers']} "
             f"V={spec['vocab']} exit=1")
    base_total = None
    summary = []
    for world, threads in configs:
        res = _run(world, threads, spec)
        step = max(r["median_s"] for r in res)  # the ranks wait for each other: the slowest is the step
        per_rank = res[0]["tokens_per_step"] / step
        per_cpu_s = res[0]["tokens_per_step"] / max(r["cpu_s"] for r in res)
        total = per_rank * world
        if base_total is None:
            base_total = total
        label = f"{world} proc x {threads} thread{'s' if threads > 1 else ''}" + (
            f" ({res[0]['backend']})" if world > 1 else "")
        note = (f"{per_rank:,.0f} tok/s per rank; {total:,.0f} tok/s total; scaling x{total / base_total:.2f} vs "
                f"1 proc x 1 thread; {per_cpu_s:,.0f} tok per CPU-second per rank; {cores} cores"
                + ("" if cuda else " (shared CPU machine: load varies)"))
        # weak scaling: the step time is not a speedup measure (the global batch grows), the note has the scaling
        rec.add("adapter_train_step", label, shape, "fp32", step * 1e6, batch=spec["batch"] * world, note=note)
        summary.append((label, step, per_rank, total, per_cpu_s))
    rec.finish()
    # tok per CPU-second: the work a rank does per token, whatever share of the cores the scheduler gave it (on a
    # shared machine wall-clock scaling mostly measures the other processes)
    print("# config                       step ms   tok/s per rank   tok/s total   scaling   tok/CPU-s per rank")
    for label, step, per_rank, total, pcs in summary:
        print(f"  {label:28s} {step * 1e3:8.1f} {per_rank:14,.0f} {total:13,.0f}   x{total / base_total:.2f}"
              f"   {pcs:16,.0f}")


if __name__ == "__main__":
    main()
