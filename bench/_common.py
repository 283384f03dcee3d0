"""Shared benchmark helpers: timing, environment, bandwidth floor, CSV/table output.

Every benchmark measures its baselines in the same run and writes bench/results/<name>.csv (or
$KANGAROO_BENCH_RESULTS/<name>.csv) with the columns in COLUMNS, plus <name>.png. On CPU the numbers are not GPU
timings and the table says so. The pattern every bench follows is described below EXTRA_COLUMNS.
"""

import csv
import os
import statistics
import subprocess
import time
from typing import Callable, Dict, List, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMNS = ["op", "impl", "shape", "dtype", "median_us", "gbytes", "gb_per_s", "pct_of_floor", "floor_us",
           "speedup_vs_eager", "device", "torch", "triton", "git_sha"]


def env_info(device: torch.device) -> Dict[str, str]:
    try:
        import triton

        triton_v = triton.__version__
    except Exception:  # noqa: BLE001
        triton_v = "none"
    sha = git_sha()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (not a GPU timing)"
    return {"device": name, "torch": torch.__version__, "triton": triton_v, "git_sha": sha}


def time_fn(fn: Callable[[], object], device: torch.device, *, warmup: int = 10, iters: int = 50,
            max_seconds: float = 2.0) -> float:
    """Median wall time of fn() in microseconds (CUDA events per call on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    samples: List[float] = []
    t_end = time.perf_counter() + max_seconds
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(iters):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            samples.append(s.elapsed_time(e) * 1e3)
            if time.perf_counter() > t_end and len(samples) >= 5:
                break
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e6)
            if time.perf_counter() > t_end and len(samples) >= 3:
                break
    return statistics.median(samples)


def time_graph(fn: Callable[[], object], device: torch.device, *, iters: int = 50) -> Optional[float]:
    """Median µs of fn() replayed from a CUDA graph (launch overhead removed); None on CPU."""
    if device.type != "cuda":
        return None
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return time_fn(g.replay, device, iters=iters)


_BW_CACHE: Dict[str, float] = {}


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Achievable DRAM bandwidth measured here by a large device copy (read + write bytes / time)."""
    key = str(device)
    if key in _BW_CACHE:
        return _BW_CACHE[key]
    if device.type != "cuda":
        nbytes = 1 << 27
    n = nbytes // 4
    a = torch.empty(n, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    us = time_fn(lambda: b.copy_(a), device, warmup=3, iters=20)
    _BW_CACHE[key] = 2 * nbytes / (us * 1e-6) / 1e9
    return _BW_CACHE[key]


class Recorder:
    """Collects rows, prints an aligned table, writes <results_dir>/<name>.csv (after every row) and a PNG.

    quick: labels the rows' mode. budget_s: time_left()/out_of_time() tell a bench when to stop adding shapes.
    """

    def __init__(self, name: str, device: torch.device, *, quick: bool = False, budget_s: float = 0.0):
        self.name, self.device = name, device
        self.env = env_info(device)
        self.rows: List[Dict[str, object]] = []
        self.mode = ("quick" if quick else "full") + ("" if device.type == "cuda" else "-cpu")
        self.t0 = time.perf_counter()
        self.budget_s = float(budget_s or 0.0)
        self.skipped: List[str] = []
        self.path = os.path.join(results_dir(), f"{self.name}.csv")

    # -- time budget ------------------------------------------------------------------------------------------
    def time_left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0) if self.budget_s > 0 else float("inf")

    def out_of_time(self, shape: str = "", reserve: float = 0.0) -> bool:
        """True (and notes the shape as skipped) when less than `reserve` seconds of the budget are left."""
        if self.time_left() > reserve:
            return False
        if shape:
            self.skipped.append(shape)
        return True

    # -- rows ---------------------------------------------------------------------------------------------------
    def add(self, op: str, impl: str, shape: str, dtype: str, median_us, *, gbytes: float = 0.0,
            eager_us: Optional[float] = None, compile_us: Optional[float] = None,
            bytes_moved: Optional[float] = None, batch: Optional[int] = None, case: Optional[str] = None,
            baselines: Optional[Dict[str, float]] = None, note: str = "",
            context: bool = False) -> Optional[Dict[str, object]]:
        """One measurement. median_us: µs or a Timing (None: nothing measured, no row). bytes_moved (bytes) or
        gbytes (GB): what the op must move, for GB/s and the floor. Speedups vs torch-eager / torch-compile rows
        of the same (op, shape) are filled in automatically unless eager_us / compile_us are given.
        context=True: a row shown for context (e.g. another library's prologue), never given speedups."""
        if median_us is None:
            return None
        timing = median_us if isinstance(median_us, Timing) else None
        us = timing.us if timing is not None else float(median_us)
        if bytes_moved is not None:
            gbytes = bytes_moved / 1e9
        bw = copy_bandwidth_gbs(self.device) if gbytes else 0.0
        floor_us = gbytes * 1e9 / (bw * 1e9) * 1e6 if gbytes else 0.0
        row = {
            "op": op, "impl": impl, "shape": shape, "dtype": dtype, "median_us": round(us, 2),
            "gbytes": round(gbytes, 6), "gb_per_s": round(gbytes / (us * 1e-6), 1) if gbytes else "",
            "pct_of_floor": round(100.0 * floor_us / us, 1) if gbytes else "",
            "floor_us": round(floor_us, 2) if gbytes else "",
            "speedup_vs_eager": round(eager_us / us, 2) if eager_us else "", **self.env,
            "batch": batch if batch is not None else _batch_of(shape),
            "case": case if case is not None else _case_of(shape),
            "bytes": int(round(gbytes * 1e9)) if gbytes else "",
            "speedup_vs_compile": round(compile_us / us, 2) if compile_us else "",
            "speedup_vs_best_baseline": "", "copy_gb_per_s": round(bw, 1) if bw else "",
            "timing": timing.method if timing else ("events" if self.device.type == "cuda" else "cpu"),
            "iters": timing.iters if timing else "", "n_inputs": timing.n_inputs if timing else "",
            "mode": self.mode, "note": note,
            "_baselines": dict(baselines or {}), "_explicit": (eager_us is not None, compile_us is not None),
            "_context": context,
        }
        self.rows.append(row)
        self._fill_speedups()
        self._write()
        return row

    def _fill_speedups(self) -> None:
        base: Dict[tuple, Dict[str, float]] = {}
        for r in self.rows:
            if str(r["impl"]).startswith(BASELINE_PREFIXES):
                base.setdefault((r["op"], r["shape"]), {})[str(r["impl"])] = float(r["median_us"])
        for r in self.rows:
            us = float(r["median_us"])
            if us <= 0 or r.get("_context"):
                continue
            b = dict(base.get((r["op"], r["shape"]), {}))
            b.update(r.get("_baselines") or {})
            explicit_eager, explicit_compile = r.get("_explicit", (True, True))
            if not explicit_eager:
                e = [b[k] for k in EAGER_IMPLS if k in b]
                r["speedup_vs_eager"] = round(e[0] / us, 2) if e else ""
            if not explicit_compile:
                c = [b[k] for k in COMPILE_IMPLS if k in b]
                r["speedup_vs_compile"] = round(c[0] / us, 2) if c else ""
            others = [v for k, v in b.items() if k != r["impl"]]
            r["speedup_vs_best_baseline"] = round(min(others) / us, 2) if others and \
                not str(r["impl"]).startswith(BASELINE_PREFIXES) else ""

    def _write(self) -> str:
        tmp = self.path + ".tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(self.rows)
        os.replace(tmp, self.path)
        return self.path

    def finish(self, plot: bool = True) -> str:
        self._fill_speedups()
        path = self._write()
        cols = ["op", "impl", "shape", "dtype", "median_us", "gb_per_s", "pct_of_floor", "floor_us",
                "speedup_vs_eager", "speedup_vs_compile"]
        widths = {c: max(len(c), *(len(str(r[c])) for r in self.rows)) if self.rows else len(c) for c in cols}
        print(f"# {self.name} on {self.env['device']} | torch {self.env['torch']} | triton {self.env['triton']}"
              f" | {self.env['git_sha']} | mode {self.mode}")
        if self.device.type != "cuda":
            print("# NOTE: CPU run: these are not GPU timings (Triton runs in the interpreter or is skipped).")
        print("  ".join(c.ljust(widths[c]) for c in cols))
        for r in self.rows:
            print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))
        if self.skipped:
            print(f"# out of time budget ({self.budget_s:.0f} s): skipped {len(self.skipped)} shapes: "
                  + "; ".join(self.skipped[:8]) + (" ..." if len(self.skipped) > 8 else ""))
        for key, text in PUBLISHED.items():
            if key in self.name:
                print(f"# context (published, not measured here): {text}")
        print(f"# wrote {os.path.relpath(path, ROOT) if path.startswith(ROOT) else path}"
              f" ({time.perf_counter() - self.t0:.1f} s)")
        if plot and self.rows:
            try:
                plot_csv(path)
            except Exception as e:  # noqa: BLE001  (a plot must never fail a benchmark)
                print(f"# plot failed: {type(e).__name__}: {e}")
        return path


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------------------------------------------------
# The shared benchmark pattern (issue 6). Everything below is additive: the helpers above keep their behaviour.
#
#   args = bench_args(__doc__)                   # --quick, --no-compile, --budget-s, --iters
#   rec = Recorder("verify_greedy", dev, quick=args.quick, budget_s=args.budget_s)
#   sets = [make_inputs(i) for i in range(n_input_sets(bytes_per_set, dev))]   # rotating inputs (L2 > 50 MB)
#   t = time_rotating(lambda i: op(*sets[i]), len(sets), dev)                # events, one call per sample
#   g = time_rotating(lambda i: op(*sets[i]), len(sets), dev, graph=True)    # one graph of all sets, / n
#   rec.add(op, "torch-eager" | "torch-compile" | "kangaroo" | ..., shape, dtype, t, bytes_moved=..., batch=B)
#   rec.finish()                                                             # CSV + table + PNG
#
# Speedups are filled in per (op, shape) from the rows whose impl is "torch-eager" / "torch-compile" (any other
# baseline: rec.add(..., baselines={"name": us})). Rows are written to the CSV as they come, so a bench killed by
# the suite's timeout still leaves what it measured.
# ---------------------------------------------------------------------------------------------------------------

import argparse  # noqa: E402
import hashlib  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
from typing import NamedTuple, Sequence  # noqa: E402

# COLUMNS above stay first and in order (older CSVs and other scripts rely on them); the pattern adds these.
EXTRA_COLUMNS = ["batch", "case", "bytes", "speedup_vs_compile", "speedup_vs_best_baseline", "copy_gb_per_s",
                 "timing", "iters", "n_inputs", "mode", "note"]
COLUMNS += EXTRA_COLUMNS

EAGER_IMPLS = ("torch-eager",)
COMPILE_IMPLS = ("torch-compile",)
BASELINE_PREFIXES = ("torch-",)  # every impl named torch-* is a baseline

# Rotating inputs: cycle through enough distinct input sets that their total exceeds L2 (50 MB on H100).
ROTATE_BYTES = 64 << 20
MAX_INPUT_SETS = 256
MIN_GPU_SAMPLES = 30

# Published figures of the libraries we cannot install here (context only, never compared as if measured here).
PUBLISHED = {
    "verify_sample": "FlashInfer chain_speculative_sampling: 27 us at B=16, n=5, V=32k on B200 (published figure, "
                     "as quoted in issue 6). Its layout takes target *probabilities* [B, n+1, V] (a softmax over "
                     "every row before the kernel) and draft probs [B, n, V].",
    "verify_greedy": "SGLang tree verify: 17-38 us at B=1 (published figure, as quoted in issue 6). Its layout "
                     "(verify_tree_greedy) takes target_predict, an argmax over every row done beforehand, plus "
                     "retrive_index / retrive_next_token / retrive_next_sibling.",
    "build_tree": "SGLang builds its retrive_* tree tensors and FlashInfer packs its custom mask in a prologue of "
                  "the same kind as build_tree + converters (no published per-op figure).",
}


def results_dir() -> str:
    """Where CSVs/PNGs go: $KANGAROO_BENCH_RESULTS (tests, the GPU suite) or bench/results."""
    d = os.environ.get("KANGAROO_BENCH_RESULTS") or os.path.join(ROOT, "bench", "results")
    os.makedirs(d, exist_ok=True)
    return d


def source_hash() -> str:
    """A short hash of the sources (for machines whose copy of the tree has no .git)."""
    h = hashlib.sha1()
    for sub in ("csrc", "kangaroo_kernels", "bench"):
        base = os.path.join(ROOT, sub)
        for dirpath, dirnames, files in sorted(os.walk(base)):
            dirnames[:] = sorted(d for d in dirnames if d not in ("__pycache__", "results"))
            for f in sorted(files):
                if f.endswith((".py", ".cu", ".cuh", ".cpp", ".h", ".sh")) and f != "_build_info.py":
                    with open(os.path.join(dirpath, f), "rb") as fh:
                        h.update(f.encode() + fh.read())
    return h.hexdigest()[:10]


def git_sha() -> str:
    """git short SHA (+ "-dirty"), else $KANGAROO_GIT_SHA, else "src-<hash of the sources>"."""
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                           timeout=10)
        sha = r.stdout.strip() if r.returncode == 0 else ""
        if sha:
            d = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "csrc",
                                "kangaroo_kernels", "bench"], cwd=ROOT, capture_output=True, text=True, timeout=10)
            return sha + ("-dirty" if d.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("KANGAROO_GIT_SHA") or f"src-{source_hash()}"


def bench_args(description: Optional[str] = None, argv: Optional[Sequence[str]] = None,
               extra: Optional[Callable[[argparse.ArgumentParser], None]] = None) -> argparse.Namespace:
    """The flags every bench takes. --quick: headline shapes on GPU; tiny shapes (seconds) on CPU."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="GPU: headline shapes only; CPU: tiny shapes, a few iterations (a smoke test)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--budget-s", type=float, default=float(os.environ.get("KANGAROO_BENCH_BUDGET_S", "0") or 0),
                    help="stop adding shapes after this many seconds (0: no limit; env KANGAROO_BENCH_BUDGET_S)")
    ap.add_argument("--iters", type=int, default=0, help="timed samples per measurement (default: 50 GPU, 3 CPU)")
    if extra is not None:
        extra(ap)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # CPU smoke runs share small machines: one thread gives steadier numbers
    return args


def n_input_sets(bytes_per_set: float, device: torch.device, *, target: int = ROTATE_BYTES,
                 max_sets: int = MAX_INPUT_SETS) -> int:
    """How many distinct input sets to cycle through so that together they exceed L2 (GPU); 2 on CPU."""
    if device.type != "cuda":
        return 2
    if bytes_per_set <= 0:
        return max_sets
    return int(max(1, min(max_sets, math.ceil(target / bytes_per_set))))


class Timing(NamedTuple):
    """A measurement: median µs per call, timed samples, method ("events", "graph", "cpu"), input sets cycled."""

    us: float
    iters: int
    method: str
    n_inputs: int


def time_rotating(fn: Callable[[int], object], n_sets: int, device: torch.device, *,
                  pre: Optional[Callable[[int], object]] = None, graph: bool = False, iters: int = 0,
                  warmup: int = 0, max_seconds: float = 3.0) -> Optional[Timing]:
    """Median µs of fn(i), i cycling over n_sets input sets; warm-up excluded.

    GPU, graph=False: CUDA events around each call (from an idle GPU: launch overhead included), >= 30 samples.
    GPU, graph=True: one CUDA graph holding fn(0), ..., fn(n_sets - 1), replayed >= 30 times; µs = replay / n_sets
    (launch overhead removed). Returns None if capture fails (e.g. the function syncs with the host).
    CPU: perf_counter per call. pre(i), if given, runs before each timed call (graph: in a separate graph),
    outside the timed region (e.g. to reset a cache length that the op advances).
    """
    n_sets = max(1, int(n_sets))
    if device.type != "cuda":
        iters = iters or 3
        for i in range(warmup or 1):
            if pre is not None:
                pre(i % n_sets)
            fn(i % n_sets)
        samples: List[float] = []
        t_end = time.perf_counter() + max_seconds
        for k in range(iters):
            if pre is not None:
                pre(k % n_sets)
            t0 = time.perf_counter()
            fn(k % n_sets)
            samples.append((time.perf_counter() - t0) * 1e6)
            if time.perf_counter() > t_end and len(samples) >= 1:
                break
        return Timing(statistics.median(samples), len(samples), "cpu", n_sets)
    iters = max(iters or 50, MIN_GPU_SAMPLES)
    if not graph:
        for i in range(warmup or max(3, min(n_sets, 20))):
            if pre is not None:
                pre(i % n_sets)
            fn(i % n_sets)
        torch.cuda.synchronize(device)
        samples = []
        t_end = time.perf_counter() + max_seconds
        for k in range(max(iters, n_sets)):
            i = k % n_sets
            if pre is not None:
                pre(i)
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn(i)
            e.record()
            e.synchronize()
            samples.append(s.elapsed_time(e) * 1e3)
            if len(samples) >= iters and time.perf_counter() > t_end:
                break
        return Timing(statistics.median(samples), len(samples), "events", n_sets)
    try:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                for i in range(n_sets):
                    if pre is not None:
                        pre(i)
                    fn(i)
        torch.cuda.current_stream(device).wait_stream(stream)
        torch.cuda.synchronize(device)
        g_pre = None
        if pre is not None:
            g_pre = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g_pre):
                for i in range(n_sets):
                    pre(i)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for i in range(n_sets):
                fn(i)
    except Exception as e:  # noqa: BLE001
        print(f"#   (graph capture failed: {type(e).__name__}: {str(e).splitlines()[0][:120]})")
        torch.cuda.synchronize(device)
        return None
    for _ in range(3):
        if g_pre is not None:
            g_pre.replay()
        g.replay()
    torch.cuda.synchronize(device)
    samples = []
    t_end = time.perf_counter() + max_seconds
    while True:
        if g_pre is not None:
            g_pre.replay()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        samples.append(s.elapsed_time(e) * 1e3 / n_sets)
        if len(samples) >= iters and (time.perf_counter() > t_end or len(samples) >= 2 * iters):
            break
    del g, g_pre
    return Timing(statistics.median(samples), len(samples), "graph", n_sets)


def try_compile(fn: Callable, *, enabled: bool = True, **kwargs) -> Optional[Callable]:
    """torch.compile(fn, **kwargs), or None when disabled or unavailable (the bench then skips that baseline)."""
    if not enabled:
        return None
    try:
        return torch.compile(fn, **kwargs)
    except Exception as e:  # noqa: BLE001
        print(f"#   (torch.compile unavailable: {type(e).__name__}: {e})")
        return None


def compile_call(compiled: Callable, *args, **kwargs):
    """First call of a compiled function (the compile itself): returns (result, seconds) or (None, None) on failure."""
    t0 = time.perf_counter()
    try:
        out = compiled(*args, **kwargs)
    except Exception as e:  # noqa: BLE001
        print(f"#   (torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:160]})")
        return None, None
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))


def _num(x) -> Optional[float]:
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _batch_of(shape: str) -> str:
    m = re.search(r"\bB=(\d+)", shape)
    return m.group(1) if m else ""


def _case_of(shape: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"\bB=\d+", "", shape)).strip()


def plot_csv(csv_path: str, png_path: Optional[str] = None, max_panels: int = 12) -> Optional[str]:
    """µs vs batch per implementation (log-log), one panel per (op, case); PNG next to the CSV.

    Imports matplotlib lazily: without it the plot is skipped with a message."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("# matplotlib is not installed: no plot")
        return None
    png_path = png_path or csv_path[:-4] + ".png"
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    panels: Dict[tuple, Dict[str, List[tuple]]] = {}
    for r in rows:
        us, b = _num(r.get("median_us")), _num(r.get("batch") or _batch_of(r.get("shape", "")))
        if us is None or b is None or us <= 0:
            continue
        key = (r["op"], r.get("case") or _case_of(r.get("shape", "")))
        panels.setdefault(key, {}).setdefault((r["impl"], r.get("dtype", "")), []).append((b, us))
    if not panels:
        print("# nothing to plot")
        return None
    keys = sorted(panels, key=lambda k: -max(len(v) for v in panels[k].values()))[:max_panels]
    keys.sort()
    cols = min(3, len(keys))
    nrows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.6 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        dtypes = {k[1] for k in panels[key]}
        for (impl, dt), pts in sorted(panels[key].items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                    label=impl if len(dtypes) == 1 else f"{impl} ({dt})",
                    linestyle="--" if impl.startswith(BASELINE_PREFIXES) else "-")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch")
        ax.set_ylabel("median µs")
        ax.set_title(f"{key[0]} {key[1]}"[:70], fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    r0 = rows[0]
    fig.suptitle(f"{os.path.basename(csv_path)[:-4]}: {r0.get('device', '')} | torch {r0.get('torch', '')} | "
                 f"triton {r0.get('triton', '')} | {r0.get('git_sha', '')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(png_path, dpi=80)
    plt.close(fig)
    print(f"# wrote {os.path.relpath(png_path, ROOT) if png_path.startswith(ROOT) else png_path}")
    return png_path


def agree(ok: bool, what: str, device: torch.device) -> str:
    """A baseline must compute what the op computes. CPU (CI): fail loudly. GPU: warn and return a note, so a
    single disagreement does not throw away the rest of the one GPU run."""
    if ok:
        return ""
    if device.type != "cuda":
        raise AssertionError(f"baseline disagrees with the op: {what}")
    print(f"# WARNING: baseline disagrees with the op: {what}")
    return f"MISMATCH: {what}"


def want_compile(args: argparse.Namespace, rec: "Recorder", device: torch.device, headline: bool,
                 reserve_s: float = 20.0) -> bool:
    """torch.compile baselines: GPU only (on CPU it needs a C++ toolchain and tens of seconds), headline shapes
    only (each shape is a fresh compile), and only while the time budget leaves reserve_s seconds."""
    return (device.type == "cuda" and headline and not args.no_compile and rec.time_left() > reserve_s)
