"""Adapter training (`kangaroo train`) and the small causal-LM pretraining loop the embedded demo model uses.

Kangaroo's adapter is trained by self-distillation with the base model frozen:

    target_t = softmax(lm_head(final_norm(h_L[t])))          the base model's next-token distribution at position t
    draft_t  = log_softmax(lm_head(adapter(h_ell)[t]))        layer ell -> adapter (ends in its own RMSNorm) -> the
                                                              base model's (shared, frozen) LM head
    loss     = sum_t mask_t * ( - target_t . draft_t ) / sum_t mask_t

at the *same* position t (both predict token t+1), computed on the fly from one forward of the base model
(`output_hidden_states`: `hidden_states[ell]` is the output of layer ell), no dumps to disk.

The loop: AdamW on the adapter only, linear warmup + cosine decay, gradient accumulation normalised by the number of
loss tokens of the whole accumulation window (so accum=k over batches of b rows gives the gradient of one batch of
k*b rows), bf16 autocast or fp32, a tqdm bar with loss and the draft's top-1 agreement, periodic and final
checkpoints (adapter safetensors + config, and `trainer_state.pt` with optimizer, schedule, step and data position)
and resuming from the latest one.

Beyond one device (`torchrun --nproc_per_node N -m kangaroo.cli train ...`, also over several nodes): DDP over the
adapter (the frozen base is never synchronised), each rank on its slice of every global batch, the loss normalised
by the loss tokens of the whole global window (N ranks x batch b train the adapter of 1 process x batch N*b), and
with `--shard-base` the frozen base's layers sharded over the ranks with FSDP2. Rank 0 alone prints and writes;
checkpoints are written to a temporary folder and renamed into place (a kill never leaves a partial "latest") and
hold the data position in global batches (a run resumes on any world size). See kangaroo.distributed.

`evaluate_adapter` reports, on held-out text, the teacher-forced top-1 agreement and, on greedy continuations of the
base model, the acceptance per draft position (CTAR-style: the chance that draft i matches given drafts 1..i-1 did)
and the expected tokens per cycle for thresholds eta and max draft length gamma. On a greedy trajectory of the base
model the draft's context equals the committed text as long as all earlier drafts matched, so this simulation gives
exactly the accepted lengths the greedy decoder will see (up to float differences).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

MALLOC_ENV = {
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": "68719476736",
    "MALLOC_TOP_PAD_": "268435456",
}


def tune_malloc() -> bool:
    """Keep freed memory in the heap instead of returning it to the OS (glibc mallopt; the same effect as the
    MALLOC_*_ variables at process start). In these VMs page faults on fresh memory made training steps swing between
    0.5 s and 13 s; with this they are steady. Returns True when applied (glibc only)."""
    if all(os.environ.get(k) == v for k, v in MALLOC_ENV.items()):
        return True
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4
        ok = libc.mallopt(m_mmap_max, 0) == 1
        ok &= libc.mallopt(m_trim_threshold, ctypes.c_int(2**31 - 1)) == 1
        ok &= libc.mallopt(m_top_pad, ctypes.c_int(268435456)) == 1
        return bool(ok)
    except (OSError, AttributeError):
        return False


# --------------------------------------------------------------------------------------------------------------------
# Shared pieces


def lr_at(step: int, *, lr: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Linear warmup to `lr` over `warmup` steps, then cosine decay to `lr * min_ratio` at `total`."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if total <= warmup:
        return lr
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def _autocast(dtype: str, device):
    import torch

    if dtype == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return nullcontext()


def _time_linear_step(dtype: str, dim: int, rows: int, reps: int) -> float:
    """Median seconds of a Linear(dim, 4*dim) forward + backward over [rows, dim] under `dtype` autocast (CPU)."""
    import torch

    lin = torch.nn.Linear(dim, 4 * dim)
    x = torch.randn(rows, dim, requires_grad=True)
    times = []
    for _ in range(reps + 1):  # the first run pays for allocation and kernel selection
        t = time.perf_counter()
        with _autocast(dtype, "cpu"):
            y = lin(x)
        y.float().sum().backward()
        times.append(time.perf_counter() - t)
    return sorted(times[1:])[reps // 2]


def resolve_dtype(dtype: str, device, dim: int = 256) -> tuple[str, str]:
    """The autocast dtype to train in: "bf16" or "fp32" as asked, or for "auto": bf16 on CUDA, and on CPU whichever
    a sub-second measurement (a Linear forward + backward at width `dim`, both ways) finds faster, since CPUs differ:
    with AMX or avx512_bf16 bf16 autocast is several times faster than fp32, on AVX2-only CPUs several times slower.
    Returns (dtype, a sentence saying why)."""
    import torch

    if dtype not in ("auto", "bf16", "fp32"):
        raise ValueError(f"dtype must be 'auto', 'bf16' or 'fp32', got {dtype!r}")
    if dtype != "auto":
        return dtype, f"{dtype} (as requested)"
    if torch.device(device).type != "cpu":
        return "bf16", "bf16 autocast (accelerator)"
    cap = torch.backends.cpu.get_cpu_capability()
    rows = 1024
    t32 = _time_linear_step("fp32", dim, rows, 3)
    t16 = _time_linear_step("bf16", dim, rows, 3)
    pick = "bf16" if t16 < 0.9 * t32 else "fp32"  # bf16 must clearly pay: it also costs precision
    return pick, (f"{pick} (measured on this CPU, capability {cap}: a linear step takes {t32 * 1e3:.1f} ms in fp32, "
                  f"{t16 * 1e3:.1f} ms in bf16 autocast)")


def _fmt_s(s: float) -> str:
    s = max(0.0, s)
    if s < 90:
        return f"{s:.0f}s"
    if s < 5400:
        return f"{s / 60:.1f}min"
    return f"{s / 3600:.1f}h"


class ProgressLog:
    """Progress a person can see in a terminal (a tqdm bar) and in a log (plain lines): when stdout is not a terminal,
    or a log file is given, a line every `every_s` seconds with step, loss, tokens/s, elapsed time and ETA, plus the
    first step and the last. `budget_s`: the run's time budget; when the ETA says the run will overshoot it by more
    than 20 % (a min-step floor on a slow machine), that is said once, with the new estimate."""

    def __init__(self, total: int, desc: str, *, initial: int = 0, disable=None, every_s: float = 30.0,
                 log_file=None, budget_s: float | None = None, stream=None):
        self.total, self.desc, self.step0 = total, desc, initial
        self.step = initial
        self.bar = _bar(total, desc, initial=initial, disable=disable)
        self.stream = stream if stream is not None else sys.stdout
        tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.echo = disable is not True and not tty  # plain lines on stdout where no bar shows
        self.log_file = Path(log_file) if log_file is not None else None
        self.lines = self.echo or self.log_file is not None
        self.every_s, self.budget_s = every_s, budget_s
        self.t0 = self.t_last = time.perf_counter()
        self.tokens = 0
        self.warned = False
        self.fields: dict = {}

    def set_total(self, total: int) -> None:
        """A refitted step count (time budgets); says so once when it overshoots the budget by more than 20 %."""
        self.total = total
        self.bar.total = total
        self.bar.refresh()
        done = self.step - self.step0
        elapsed = time.perf_counter() - self.t0
        need = elapsed / max(1, done) * (total - self.step0)
        if self.budget_s and not self.warned and done >= 8 and need > 1.2 * self.budget_s:
            self.warned = True
            self._emit_or_write(f"[{self.desc}] note: at {elapsed / done:.2f} s/step its {total} steps need about "
                                f"{_fmt_s(need)}, over the budget of {_fmt_s(self.budget_s)} (the minimum-step "
                                f"floor on a slow machine); re-estimated as the run goes")

    def _emit(self, msg: str) -> None:
        if self.echo:
            print(msg, file=self.stream, flush=True)
        if self.log_file is not None:
            with open(self.log_file, "a") as f:
                f.write(msg + "\n")

    def update(self, n: int = 1, tokens: int = 0, **fields) -> None:
        self.step += n
        self.tokens += tokens
        self.fields.update({k: v for k, v in fields.items() if v is not None})
        self.bar.update(n)
        if self.fields:
            self.bar.set_postfix({k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in self.fields.items()},
                                 refresh=False)
        now = time.perf_counter()
        elapsed = now - self.t0
        done = self.step - self.step0
        eta = elapsed / max(1, done) * max(0, self.total - self.step)
        if self.lines and (done == 1 or now - self.t_last >= self.every_s or self.step >= self.total):
            self.t_last = now
            parts = [f"step {self.step}/{self.total}"]
            parts += [f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in self.fields.items()]
            if self.tokens:
                parts.append(f"{self.tokens / max(elapsed, 1e-9):,.0f} tok/s")
            parts.append(f"elapsed {_fmt_s(elapsed)}, ETA {_fmt_s(eta)}")
            self._emit(f"[{self.desc}] " + " | ".join(parts))

    def _emit_or_write(self, msg: str) -> None:
        if self.echo or self.log_file is not None:
            self._emit(msg)
        else:
            self.bar.write(msg)

    def close(self) -> None:
        self.bar.close()


def soft_cross_entropy(draft_logits, target_logits, mask):
    """Sum over masked positions of -softmax(target) . log_softmax(draft), in fp32, plus the number of positions
    where the two argmaxes agree. Returns (loss_sum, agree_count, count)."""
    import torch

    m = mask.reshape(-1)
    d = draft_logits.reshape(-1, draft_logits.shape[-1])[m].float()
    t = target_logits.reshape(-1, target_logits.shape[-1])[m].float()
    loss = -(torch.softmax(t, -1) * torch.log_softmax(d, -1)).sum()
    agree = (d.argmax(-1) == t.argmax(-1)).sum()
    return loss, agree, m.sum()


def _exit_hidden(base, ids, exit_layer):
    out = base(input_ids=ids, output_hidden_states=True, use_cache=False)
    hs = out.hidden_states
    n_layers = base.config.num_hidden_layers
    if len(hs) != n_layers + 1:
        raise RuntimeError(f"expected {n_layers + 1} hidden states from the base model, got {len(hs)}")
    return hs[exit_layer], out.logits


def _positions(ids):
    import torch

    return torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand(ids.shape[0], -1)


def draft_logits(base, adapter, h, position_ids):
    """layer-ell hidden -> adapter -> the base model's LM head (shared weights)."""
    return base.get_output_embeddings()(adapter(h, position_ids))


class ThreadTuner:
    """Chooses torch's CPU thread count by measured step time: every `every` steps it times `probe` steps with all
    threads and `probe` with one, then uses the faster. On a shared machine (other processes on the same cores) two
    threads can be several times slower than one (threads wait for each other at every op); on an idle one they are
    faster. A no-op with one thread available or on a GPU."""

    def __init__(self, enabled: bool = True, every: int = 64, probe: int = 3):
        import torch

        self.n = torch.get_num_threads()
        self.enabled = enabled and self.n > 1
        self.every, self.probe = every, probe
        self.best = self.n
        self._times = {self.n: [], 1: []}
        self._i = 0

    def _threads_for(self, i: int) -> int:
        k = i % self.every
        if k < self.probe:
            return self.n
        if k < 2 * self.probe:
            return 1
        return self.best

    def step(self, fn):
        """Runs fn() under the scheduled thread count and records its time."""
        import torch

        if not self.enabled:
            return fn()
        nt = self._threads_for(self._i)
        torch.set_num_threads(nt)
        t = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t
        k = self._i % self.every
        if k < 2 * self.probe:
            self._times[nt].append(dt)
            if k == 2 * self.probe - 1:
                a, b = sorted(self._times[self.n])[len(self._times[self.n]) // 2], sorted(self._times[1])[
                    len(self._times[1]) // 2]
                self.best = self.n if a <= b else 1
                self._times = {self.n: [], 1: []}
        self._i += 1
        return out

    def restore(self):
        import torch

        if self.enabled:
            torch.set_num_threads(self.n)


def _refit_steps(step: int, elapsed: float, budget_s: float, max_steps: int) -> int:
    """The step count that ends a run at `budget_s` at the speed so far (refitted as the run goes, so a machine
    that slows down mid-run still ends on time; the cosine schedule follows the count)."""
    rate = elapsed / max(1, step)
    fitted = step + max(1, int((budget_s - elapsed) / max(rate, 1e-9)))
    return max(step + 1, min(max_steps, fitted)) if max_steps else max(step + 1, fitted)


def _bar(total, desc, initial=0, disable=None):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, initial=initial, dynamic_ncols=True, disable=disable, mininterval=1.0)


# --------------------------------------------------------------------------------------------------------------------
# Adapter training


@dataclass
class AdapterTrainConfig:
    exit_layer: int = 2
    seq_len: int = 256
    batch_size: int = 8
    grad_accum: int = 1
    steps: int = 500
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 30
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    dtype: str = "auto"  # "bf16" (autocast), "fp32", or "auto": bf16 on CUDA, on CPU what measures faster
    seed: int = 0
    log_every: int = 10
    log_file: str | None = None  # progress lines also go here (they go to stdout when it is not a terminal)
    save_every: int = 0  # 0: only the final checkpoint
    keep_checkpoints: int = 2
    etas: list = field(default_factory=lambda: [0.3, 0.4, 0.5, 0.6, 0.7])
    gamma: int = 6
    time_budget_s: float | None = None  # when set, `steps` is refitted to end the run in this many seconds
    min_steps: int = 0  # with a time budget: at least this many steps, however slow the machine
    tune_threads: bool = True
    shard_base: bool = False  # under torch.distributed: shard the frozen base's layers over the ranks (FSDP2)


def _new_adapter(base, exit_layer):
    """A freshly initialised adapter shaped for `base` (records the base model's LM-head fingerprint)."""
    from kangaroo.adapter import KangarooAdapter

    return KangarooAdapter.for_model(base, exit_layer)


def base_fingerprint(base) -> str:
    """The decoder's fingerprint of a base model (a hash of its LM head), stored with the adapter."""
    from kangaroo.model import fingerprint_of

    return fingerprint_of(base.get_output_embeddings().weight)


class AdapterTrainer:
    """Trains a `KangarooAdapter` on a frozen HF causal LM (Llama / Mistral / Qwen2 family).

    out_dir/                       final adapter (save_pretrained) + trainer_state.pt + train_report.json
    out_dir/checkpoints/step-N/    periodic checkpoints and the final one (adapter, trainer_state.pt,
                                   checkpoint.json); each written to a temporary folder and renamed into place

    Under torch.distributed (a process group initialised, e.g. by `kangaroo.distributed.init_from_env` under
    torchrun) the trainer is data parallel: the adapter is wrapped in DistributedDataParallel (the frozen base is
    never synchronised; with `cfg.shard_base` its layers are sharded with FSDP2), rank r trains on its slice of each
    global batch of batch_size * world_size rows (`PackedDataset.batches`), and the loss is normalised by the loss
    tokens of the whole global window, so N ranks with batch b give the adapter of one process with batch N * b.
    Rank 0 alone writes checkpoints and prints progress; checkpoints hold the global data position, so a run resumes
    on any world size."""

    def __init__(self, base, dataset, cfg: AdapterTrainConfig, out_dir=None, adapter=None, device="cpu",
                 progress: bool | None = None):
        import torch

        from kangaroo import distributed as kd

        self.dist = kd.current()
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        for p in base.parameters():
            p.requires_grad_(False)
        if cfg.shard_base and self.dist.enabled:
            self.base = kd.shard_base(base, self.device).eval()
        else:
            self.base = base.to(self.device).eval()
        self.cfg = cfg
        self.dataset = dataset
        self.out_dir = Path(out_dir) if out_dir is not None else None
        torch.manual_seed(cfg.seed)
        self.adapter = (adapter if adapter is not None else _new_adapter(base, cfg.exit_layer)).to(self.device)
        self.adapter.float().train()
        # rank 0 decides (an "auto" measurement could differ between ranks)
        res = resolve_dtype(cfg.dtype, self.device, base.config.hidden_size) if self.dist.is_main else None
        cfg.dtype, why = kd.broadcast_object(res)
        self.dtype_reason = why
        self._ddp = None
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            # broadcasts rank 0's initial adapter; averages gradients over ranks in backward
            self._ddp = DistributedDataParallel(
                self.adapter, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self._data_shift = 0  # global batches to add to step * grad_accum (a resume with another global batch)
        decay, no_decay = [], []
        for n, p in self.adapter.named_parameters():
            (no_decay if p.ndim < 2 else decay).append(p)
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8,
        )
        self.step = 0
        self.history: list[dict] = []
        self.progress = progress

    # -- one optimiser step ------------------------------------------------------------------------------------------
    @property
    def global_batch_size(self) -> int:
        """Rows per micro-batch over all ranks (batch_size * world_size)."""
        return self.cfg.batch_size * self.dist.world_size

    @property
    def data_position(self) -> int:
        """Global micro-batches consumed so far (of `global_batch_size` rows each)."""
        return self.step * self.cfg.grad_accum + self._data_shift

    def _micro_batches(self):
        cfg = self.cfg
        it = self.dataset.batches(cfg.batch_size, seed=cfg.seed, start_batch=self.data_position,
                                  rank=self.dist.rank, world_size=self.dist.world_size)
        while True:
            yield [next(it) for _ in range(cfg.grad_accum)]

    def train_step(self, micro) -> dict:
        """One optimiser step over `micro` (a list of (ids, loss_mask) batches, this rank's share of the window);
        the loss of each micro-batch is divided by the number of loss positions of the whole window over all ranks,
        so the accumulated gradient is exactly that of the concatenated batch.

        Under DDP: the window's token count is summed over ranks before any backward, each rank's loss is scaled by
        world_size / total (DDP's all-reduce averages, i.e. divides by world_size), so the synchronised gradient is
        sum over all ranks' tokens / total: the single-process gradient of the global batch up to the order of the
        fp32 sums. Gradients are synchronised once per window (no_sync on the earlier micro-batches)."""
        import torch

        cfg = self.cfg
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.step, lr=cfg.lr, warmup=cfg.warmup, total=cfg.steps, min_ratio=cfg.min_lr_ratio)
        local = sum(int(m.sum()) for _, m in micro)
        world = self.dist.world_size
        if world > 1:
            from kangaroo.distributed import all_reduce_sum

            total = int(all_reduce_sum(torch.tensor([local], dtype=torch.int64, device=self.device)).item())
        else:
            total = local
        if total == 0:
            self.step += 1
            return {"loss": float("nan"), "agree": float("nan"), "tokens": 0, "rank_tokens": 0}
        model = self._ddp if self._ddp is not None else self.adapter
        loss_sum = agree_sum = 0.0
        for i, (ids, mask) in enumerate(micro):
            ids, mask = ids.to(self.device), mask.to(self.device)
            with torch.no_grad(), _autocast(cfg.dtype, self.device):
                h, target = _exit_hidden(self.base, ids, cfg.exit_layer)
            sync = self._ddp.no_sync() if self._ddp is not None and i < len(micro) - 1 else nullcontext()
            with sync:
                with _autocast(cfg.dtype, self.device):
                    logits = draft_logits(self.base, model, h.float(), _positions(ids))
                loss, agree, _ = soft_cross_entropy(logits, target, mask)
                if world > 1:
                    (loss * world / total).backward()
                else:
                    (loss / total).backward()
            loss_sum += float(loss.detach())
            agree_sum += float(agree)
        if world > 1:
            from kangaroo.distributed import all_reduce_sum

            st = all_reduce_sum(torch.tensor([loss_sum, agree_sum], dtype=torch.float64, device=self.device))
            loss_sum, agree_sum = float(st[0]), float(st[1])
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.adapter.parameters(), cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        return {"loss": loss_sum / total, "agree": agree_sum / total, "tokens": total, "rank_tokens": local}

    def train(self, steps: int | None = None) -> list[dict]:
        """Runs up to `cfg.steps` (or `steps` more steps), saving periodic and final checkpoints."""
        cfg = self.cfg
        end = cfg.steps if steps is None else min(cfg.steps, self.step + steps)
        if self.step >= end:
            return self.history
        main = self.dist.is_main
        disable = (None if self.progress is None else not self.progress) if main else True
        bar = ProgressLog(end, f"adapter (exit layer {cfg.exit_layer})", initial=self.step, disable=disable,
                          log_file=cfg.log_file if main else None,
                          budget_s=cfg.time_budget_s if steps is None else None)
        ema_loss = ema_agree = None
        batches = self._micro_batches()
        t0, s0 = time.perf_counter(), self.step
        tuner = ThreadTuner(cfg.tune_threads and self.device.type == "cpu")
        while self.step < end:
            rec = tuner.step(lambda: self.train_step(next(batches)))
            rec["step"] = self.step
            self.history.append(rec)
            if not math.isnan(rec["loss"]):
                ema_loss = rec["loss"] if ema_loss is None else 0.9 * ema_loss + 0.1 * rec["loss"]
                ema_agree = rec["agree"] if ema_agree is None else 0.9 * ema_agree + 0.1 * rec["agree"]
            bar.update(1, tokens=rec["tokens"], loss=ema_loss, top1=ema_agree)
            if (main and self.out_dir is not None and cfg.save_every and self.step % cfg.save_every == 0
                    and self.step < end):
                self.save_checkpoint()
            done = self.step - s0
            if cfg.time_budget_s and steps is None and done >= 8 and done % 8 == 0:
                from kangaroo.distributed import broadcast_object

                fitted = _refit_steps(done, time.perf_counter() - t0, cfg.time_budget_s, cfg.steps - s0)
                # every rank must stop at the same step: rank 0's clock decides
                cfg.steps = end = broadcast_object(max(s0 + fitted, min(cfg.min_steps, cfg.steps)))
                bar.set_total(end)
        tuner.restore()
        bar.close()
        if main and self.out_dir is not None and self.step >= cfg.steps:
            self.save_checkpoint()  # the final state, atomically: what a resume (a longer run) starts from
            self.save(self.out_dir)
        return self.history

    # -- checkpoints -------------------------------------------------------------------------------------------------
    def _state(self) -> dict:
        import torch

        return {
            "step": self.step,
            "optimizer": self.opt.state_dict(),
            "config": asdict(self.cfg),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
            "history": self.history[-1000:],
            "world_size": self.dist.world_size,
            "data": {"global_batches": self.data_position, "global_batch_size": self.global_batch_size,
                     "rows": len(self.dataset)},
        }

    def _write(self, path: Path, fingerprint: str | None = None) -> None:
        """adapter files, trainer_state.pt, then checkpoint.json (the marker a complete folder ends with)."""
        import torch

        kw = {"base_fingerprint": fingerprint} if fingerprint is not None else {}
        self.adapter.save_pretrained(str(path), **kw)
        torch.save(self._state(), path / STATE_NAME)
        (path / MARKER_NAME).write_text(json.dumps({"step": self.step, "files": sorted(
            q.name for q in path.iterdir())}))
        _fsync_tree(path)

    def save(self, path, fingerprint: str | None = None):
        """Writes the adapter (save_pretrained), trainer_state.pt and checkpoint.json into `path`. Each file is
        written under a temporary name and renamed over the old one, the state after the weights (a kill between
        two renames leaves this folder's weights newer than its state; `train` therefore writes the atomic
        checkpoint folder of the same step first, which `latest_checkpoint` prefers)."""
        import shutil

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tmp = path / f".tmp-save-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            self._write(tmp, fingerprint)
            names = sorted(q.name for q in tmp.iterdir() if q.name not in (STATE_NAME, MARKER_NAME))
            for name in names + [STATE_NAME, MARKER_NAME]:
                os.replace(tmp / name, path / name)
            _fsync_dir(path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return path

    def save_checkpoint(self):
        """checkpoints/step-N, written whole to a temporary folder (a name `latest_checkpoint` never reads) and
        renamed into place, so a kill at any moment leaves either no step-N or a complete one; then the oldest beyond
        `keep_checkpoints` are removed (renamed away first, so a kill mid-removal leaves no half folder either)."""
        import shutil

        ck = self.out_dir / "checkpoints"
        ck.mkdir(parents=True, exist_ok=True)
        for stale in ck.glob(".*"):  # leftovers of a run killed mid-write or mid-removal
            shutil.rmtree(stale, ignore_errors=True)
        final = ck / f"step-{self.step:07d}"
        tmp = ck / f".tmp-{final.name}-{os.getpid()}"
        tmp.mkdir()
        self._write(tmp)
        if final.exists():
            old = ck / f".old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(ck)
        olds = sorted(c for c in ck.glob("step-*") if c.is_dir())
        for old in olds[: max(0, len(olds) - max(1, self.cfg.keep_checkpoints))]:
            trash = ck / f".trash-{old.name}-{os.getpid()}"
            os.replace(old, trash)
            shutil.rmtree(trash, ignore_errors=True)
        return final

    @staticmethod
    def checkpoint_step(path) -> int | None:
        """The step a checkpoint folder holds, or None when it is not a complete checkpoint (no marker, a file the
        marker lists is missing, or, for folders written before markers existed, an unreadable trainer state)."""
        path = Path(path)
        marker = path / MARKER_NAME
        if marker.is_file():
            try:
                m = json.loads(marker.read_text())
                if all((path / f).is_file() for f in m.get("files", [])):
                    return int(m["step"])
            except (OSError, ValueError, KeyError, TypeError):
                pass
            return None
        if not (path / STATE_NAME).is_file():
            return None
        try:
            import torch

            return int(torch.load(path / STATE_NAME, map_location="cpu", weights_only=False)["step"])
        except Exception:  # noqa: BLE001 - any unreadable file means: not a checkpoint
            return None

    @staticmethod
    def latest_checkpoint(out_dir) -> Path | None:
        """The complete checkpoint with the highest step under out_dir/checkpoints (or out_dir itself, on a tie the
        checkpoint folder wins); temporary and partial folders are skipped."""
        out_dir = Path(out_dir)
        ck = out_dir / "checkpoints"
        cands = sorted(c for c in ck.glob("step-*") if c.is_dir()) if ck.is_dir() else []
        best, best_step = None, -1
        for c in cands + [out_dir]:
            s = AdapterTrainer.checkpoint_step(c)
            if s is not None and s > best_step:
                best, best_step = c, s
        return best

    def load_checkpoint(self, path):
        """Restores adapter weights, optimizer state, step, history, RNG and data position from a checkpoint folder.
        Under torch.distributed rank 0 reads the folder (`path` is ignored elsewhere) and broadcasts it, so only
        rank 0 needs to see the files. A checkpoint written with another global batch size (world size x batch)
        resumes in the same epoch of the same sample order, at the first unseen row rounded down to a batch."""
        import torch

        from kangaroo.adapter import KangarooAdapter
        from kangaroo.data import convert_batch_position
        from kangaroo.distributed import broadcast_object

        payload = None
        if self.dist.is_main:
            path = Path(path)
            loaded = KangarooAdapter.from_pretrained(str(path), map_location="cpu")
            payload = (loaded.state_dict(), torch.load(path / STATE_NAME, map_location="cpu", weights_only=False))
        sd, st = broadcast_object(payload)
        self.adapter.load_state_dict(sd)
        self.opt.load_state_dict(st["optimizer"])
        self.step = int(st["step"])
        self.history = list(st.get("history", []))
        torch.set_rng_state(st["torch_rng"].cpu())
        random.setstate(st["python_rng"])
        data = st.get("data")
        pos = self.step * self.cfg.grad_accum
        if data is not None:
            pos = convert_batch_position(int(data["global_batches"]), len(self.dataset),
                                         int(data["global_batch_size"]), self.global_batch_size)
            if int(data["global_batch_size"]) != self.global_batch_size and self.dist.is_main:
                print(f"note: the checkpoint's global batch is {data['global_batch_size']} rows, this run's "
                      f"{self.global_batch_size}: resuming at global batch {pos} of the same sample order",
                      flush=True)
        self._data_shift = pos - self.step * self.cfg.grad_accum
        return self.step

    def resume(self, out_dir) -> Path | None:
        """Loads the latest checkpoint under out_dir (found by rank 0, loaded on every rank); None when there is
        none. Collective under torch.distributed: every rank calls it."""
        from kangaroo.distributed import broadcast_object

        ck = self.latest_checkpoint(out_dir) if self.dist.is_main else None
        ck = broadcast_object(None if ck is None else str(ck))
        if ck is None:
            return None
        self.load_checkpoint(ck)
        return Path(ck)


STATE_NAME = "trainer_state.pt"
MARKER_NAME = "checkpoint.json"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """fsync every file in `path` and the folder itself (a rename after this publishes complete files, also
    across a power cut; a SIGKILL alone cannot lose written data)."""
    for q in path.iterdir():
        if q.is_file():
            with open(q, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


# --------------------------------------------------------------------------------------------------------------------
# Evaluation


def _greedy_continuations(base, prompts, new_tokens):
    """Greedy continuations of `prompts` [N, P] by the base model (HF generate, same length prompts)."""
    import torch

    with torch.no_grad():
        out = base.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, do_sample=False, num_beams=1, pad_token_id=0)
    return out


def simulate_cycles(match, conf, eta: float, gamma: int) -> dict:
    """Greedy Kangaroo cycles over one trajectory.

    match[t], conf[t]: whether the draft's top-1 at position t equals the target's and the draft's confidence there,
    computed on the target's greedy trajectory (positions from the last prompt token on). A cycle starting at t drafts
    up to gamma tokens, stopping after the first whose confidence is < eta; it accepts the longest matching prefix and
    commits accepted + 1 tokens. Returns tokens per cycle and per-position acceptance counts."""
    n = len(match)
    t, cycles, committed = 0, 0, 0
    reached = [0] * gamma
    accepted = [0] * gamma
    while t < n:
        a = 0
        for i in range(gamma):
            if t + i >= n:
                break
            reached[i] += 1
            if not match[t + i]:
                break
            accepted[i] += 1
            a += 1
            if conf[t + i] < eta:
                break
        cycles += 1
        committed += a + 1
        t += a + 1
    return {"cycles": cycles, "tokens": committed, "reached": reached, "accepted": accepted}


def evaluate_adapter(base, adapter, exit_layer: int, heldout=None, prompts=None, new_tokens: int = 96,
                     etas=(0.3, 0.4, 0.5, 0.6, 0.7), gamma: int = 6, dtype: str = "fp32", max_rows: int = 16,
                     device="cpu") -> dict:
    """Held-out report.

    heldout: a PackedDataset (teacher-forced top-1 agreement on real text; and, binned by the draft's confidence,
    how often a confident draft is right). prompts: [N, P] token ids; the base model continues them greedily and the
    cycles of the greedy decoder are simulated on those trajectories (tokens per cycle for each eta, acceptance per
    draft position with no early exit)."""
    import torch

    base.eval()
    adapter.eval()
    rep: dict = {"exit_layer": exit_layer, "gamma": gamma}
    with torch.no_grad(), _autocast(dtype, device):
        if heldout is not None:
            ids = heldout.ids[:max_rows].to(device)
            mask = heldout.loss_mask[:max_rows].to(device)
            h, target = _exit_hidden(base, ids, exit_layer)
            logits = draft_logits(base, adapter, h.float(), _positions(ids))
            loss, agree, cnt = soft_cross_entropy(logits, target, mask)
            rep["heldout_loss"] = float(loss) / max(1, int(cnt))
            rep["heldout_top1_agreement"] = float(agree) / max(1, int(cnt))
            tl = target.float().log_softmax(-1)
            ent = float(-(tl.exp() * tl).sum(-1)[mask].sum()) / max(1, int(cnt))
            rep["heldout_kl"] = rep["heldout_loss"] - ent  # KL(base || draft) = soft CE - the base's entropy
            rep["base_heldout_nll"] = float(-(tl[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1))[mask[:, :-1]].mean())
            conf = logits.float().softmax(-1).amax(-1)[mask]
            ok = (logits.argmax(-1) == target.argmax(-1))[mask]
            rep["confident_precision"] = {
                str(c): (float(ok[conf >= c].float().mean()) if bool((conf >= c).any()) else None,
                         float((conf >= c).float().mean()))
                for c in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
            }
        if prompts is not None:
            prompts = prompts.to(device)
            seqs = _greedy_continuations(base, prompts, new_tokens)
            h, target = _exit_hidden(base, seqs, exit_layer)
            logits = draft_logits(base, adapter, h.float(), _positions(seqs))
            p0 = prompts.shape[1] - 1  # the last prompt position predicts the first new token
            sl = slice(p0, p0 + new_tokens)
            match = (logits.argmax(-1) == target.argmax(-1))[:, sl].cpu()
            conf = logits.float().softmax(-1).amax(-1)[:, sl].cpu()
            rep["trajectory_top1_agreement"] = float(match.float().mean())
            per_eta = {}
            for eta in list(etas) + [0.0]:
                tot = {"cycles": 0, "tokens": 0, "reached": [0] * gamma, "accepted": [0] * gamma}
                for r in range(match.shape[0]):
                    s = simulate_cycles(match[r].tolist(), conf[r].tolist(), eta, gamma)
                    tot["cycles"] += s["cycles"]
                    tot["tokens"] += s["tokens"]
                    tot["reached"] = [a + b for a, b in zip(tot["reached"], s["reached"])]
                    tot["accepted"] = [a + b for a, b in zip(tot["accepted"], s["accepted"])]
                per_eta[eta] = tot
            rep["tokens_per_cycle"] = {str(e): v["tokens"] / max(1, v["cycles"]) for e, v in per_eta.items()}
            z = per_eta[0.0]
            rep["acceptance_per_position"] = [a / r if r else None for a, r in zip(z["accepted"], z["reached"])]
    adapter.train()
    return rep


def format_report(rep: dict) -> str:
    lines = [f"held-out report (exit layer {rep['exit_layer']}, gamma {rep['gamma']}):"]
    if "heldout_top1_agreement" in rep:
        lines.append(f"  teacher-forced top-1 agreement with the base model: {rep['heldout_top1_agreement']:.3f}"
                     f"  (KL {rep['heldout_kl']:.3f}; base NLL {rep['base_heldout_nll']:.3f} nats/token)")
        cp = ", ".join(f">={c}: {v[0]:.2f} of {v[1]:.0%}" for c, v in rep["confident_precision"].items()
                       if v[0] is not None)
        lines.append(f"  precision of confident drafts (confidence: right, share of positions): {cp}")
    if "acceptance_per_position" in rep:
        acc = " ".join(f"{a:.2f}" if a is not None else "-" for a in rep["acceptance_per_position"])
        lines.append(f"  on greedy continuations: top-1 agreement {rep['trajectory_top1_agreement']:.3f}; "
                     f"acceptance per draft position (CTAR-style, no early exit): {acc}")
        tpc = ", ".join(f"eta={e}: {v:.2f}" for e, v in rep["tokens_per_cycle"].items())
        lines.append(f"  expected tokens per cycle: {tpc}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# Causal-LM pretraining (the demo's base model)


@dataclass
class LMTrainConfig:
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 600
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 40
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    dtype: str = "auto"  # as AdapterTrainConfig.dtype
    seed: int = 0
    log_file: str | None = None
    time_budget_s: float | None = None  # when set, `steps` is refitted to the budget as the run goes
    min_steps: int = 0  # with a time budget: at least this many steps, however slow the machine
    tune_threads: bool = True


def train_lm(model, dataset, cfg: LMTrainConfig, device="cpu", progress: bool | None = None) -> list[dict]:
    """Next-token pretraining of an HF causal LM on a PackedDataset (loss on the masked positions)."""
    import torch

    torch.manual_seed(cfg.seed)
    model.to(device).train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    total = cfg.steps
    dtype, why = resolve_dtype(cfg.dtype, device, model.config.hidden_size)
    print(f"base LM training dtype: {why}", flush=True)
    bar = ProgressLog(total, "base LM", disable=None if progress is None else not progress, log_file=cfg.log_file,
                      budget_s=cfg.time_budget_s)
    hist, ema = [], None
    t0 = time.perf_counter()
    batches = dataset.batches(cfg.batch_size, seed=cfg.seed)
    step = 0
    tuner = ThreadTuner(cfg.tune_threads and torch.device(device).type == "cpu")
    while step < total:
        ids, mask = next(batches)
        ids, mask = ids.to(device), mask.to(device)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, lr=cfg.lr, warmup=cfg.warmup, total=total, min_ratio=cfg.min_lr_ratio)

        def one_step():
            with _autocast(dtype, device):
                logits = model(input_ids=ids, use_cache=False).logits
            lp = logits.float()[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            m = mask[:, :-1]
            loss = -(lp * m).sum() / m.sum().clamp(min=1)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        loss = tuner.step(one_step)
        step += 1
        lv = float(loss.detach())
        ema = lv if ema is None else 0.95 * ema + 0.05 * lv
        hist.append({"step": step, "loss": lv})
        bar.update(1, tokens=int(mask.sum()), loss=ema)
        if cfg.time_budget_s and step >= 8 and step % 8 == 0:
            total = max(_refit_steps(step, time.perf_counter() - t0, cfg.time_budget_s, cfg.steps),
                        min(cfg.min_steps, cfg.steps))
            bar.set_total(total)
    tuner.restore()
    bar.close()
    model.eval()
    return hist


# --------------------------------------------------------------------------------------------------------------------
# CLI


def _parser():
    p = argparse.ArgumentParser(prog="kangaroo train", description="Train a Kangaroo adapter on a frozen base model.")
    p.add_argument("--model", required=True, help="local HF checkpoint folder (config.json + safetensors, tokenizer)")
    p.add_argument("--data", nargs="+", required=True,
                   help="corpus: text files, folders, JSONL/JSON of {'text'} or ShareGPT conversations")
    p.add_argument("--format", default="auto", choices=["auto", "text", "jsonl", "sharegpt"])
    p.add_argument("--heldout", nargs="*", default=None, help="held-out corpus for the report (default: 5%% of rows)")
    p.add_argument("--out", required=True, help="output folder (adapter + checkpoints)")
    p.add_argument("--exit-layer", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="autocast dtype (auto: bf16 on CUDA; on CPU whichever measures faster on this machine)")
    p.add_argument("--log-file", default=None, help="also append progress lines to this file")
    p.add_argument("--device", default=None)
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--etas", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.7])
    p.add_argument("--gamma", type=int, default=6)
    p.add_argument("--eval-prompts", type=int, default=8)
    p.add_argument("--eval-new-tokens", type=int, default=64)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--shard-base", action="store_true",
                   help="under torchrun: shard the frozen base model's layers over the ranks (FSDP2), for a base "
                        "that does not fit one device")
    return p


def cli_main(argv: list[str]) -> int:
    """`kangaroo train`. Under torchrun (RANK/WORLD_SIZE set) every rank runs this: data parallel over the adapter,
    gloo on CPU, NCCL with cuda:LOCAL_RANK on GPUs; rank 0 prints, writes checkpoints and the report."""
    args = _parser().parse_args(argv)
    tune_malloc()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kangaroo import distributed as kd
    from kangaroo.data import PackedDataset, load_examples

    info, device = kd.init_from_env(args.device)
    say = (lambda *a: print(*a, flush=True)) if info.is_main else (lambda *a: None)
    try:
        if info.enabled:
            say(f"torch.distributed: {info.world_size} processes, backend {info.backend}, device {device.type}"
                + ("; base model sharded over the ranks (FSDP2)" if args.shard_base else ""))
        tok = AutoTokenizer.from_pretrained(args.model)
        base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        examples = load_examples(args.data, tok, fmt=args.format)
        ds = PackedDataset(examples, args.seq_len)
        if args.heldout:
            held = PackedDataset(load_examples(args.heldout, tok, fmt=args.format), args.seq_len)
        else:
            n_h = max(1, len(ds) // 20) if len(ds) > 1 else 0
            held = None
            if n_h:
                held = PackedDataset.__new__(PackedDataset)
                held.ids, held.loss_mask, held.seq_len = ds.ids[-n_h:], ds.loss_mask[-n_h:], ds.seq_len
                ds.ids, ds.loss_mask = ds.ids[:-n_h], ds.loss_mask[:-n_h]
        say(f"corpus: {len(ds)} rows x {args.seq_len} tokens ({int(ds.loss_mask.sum())} loss positions)"
            + (f"; held out {len(held)} rows" if held is not None else "")
            + (f"; global batch {args.batch_size} x {info.world_size} ranks" if info.enabled else ""))
        cfg = AdapterTrainConfig(
            exit_layer=args.exit_layer, seq_len=args.seq_len, batch_size=args.batch_size, grad_accum=args.grad_accum,
            steps=args.steps, lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay, dtype=args.dtype,
            seed=args.seed, save_every=args.save_every, etas=list(args.etas), gamma=args.gamma,
            log_file=args.log_file, shard_base=args.shard_base,
        )
        trainer = AdapterTrainer(base, ds, cfg, out_dir=args.out, device=device,
                                 progress=False if args.no_progress else None)
        say(f"training dtype: {trainer.dtype_reason}")
        if args.resume:
            ck = trainer.resume(args.out)
            say(f"resuming from {ck} at step {trainer.step}" if ck is not None
                else "no checkpoint to resume from; starting fresh")
        trainer.train()
        # a sharded base needs every rank in its forwards; a replicated one is evaluated on rank 0 alone
        if held is not None and (info.is_main or kd.is_sharded(trainer.base)):
            prompts = None
            if args.eval_prompts:
                plen = min(64, held.seq_len // 2)
                prompts = held.ids[: args.eval_prompts, :plen]
            rep = evaluate_adapter(trainer.base, trainer.adapter, args.exit_layer, heldout=held, prompts=prompts,
                                   new_tokens=args.eval_new_tokens, etas=args.etas, gamma=args.gamma, device=device)
            say(format_report(rep))
            if info.is_main:
                (Path(args.out) / "train_report.json").write_text(json.dumps(rep, indent=1))
        say(f"adapter saved to {args.out}")
    finally:
        kd.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
