"""Shared benchmark helpers: timing, environment, bandwidth floor, CSV/table output.

Every benchmark measures its baselines in the same run and writes bench/results/<name>.csv with the
columns in COLUMNS. On CPU the numbers are not GPU timings and the table says so.
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
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True).stdout.strip() or "unknown"
    except OSError:
        sha = "unknown"
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
    """Collects rows, prints an aligned table, writes bench/results/<name>.csv."""

    def __init__(self, name: str, device: torch.device):
        self.name, self.device = name, device
        self.env = env_info(device)
        self.rows: List[Dict[str, object]] = []

    def add(self, op: str, impl: str, shape: str, dtype: str, median_us: float, *, gbytes: float = 0.0,
            eager_us: Optional[float] = None) -> Dict[str, object]:
        bw = copy_bandwidth_gbs(self.device) if gbytes else 0.0
        floor_us = gbytes * 1e9 / (bw * 1e9) * 1e6 if gbytes else 0.0
        row = {
            "op": op, "impl": impl, "shape": shape, "dtype": dtype, "median_us": round(median_us, 2),
            "gbytes": round(gbytes, 6), "gb_per_s": round(gbytes / (median_us * 1e-6), 1) if gbytes else "",
            "pct_of_floor": round(100.0 * floor_us / median_us, 1) if gbytes else "",
            "floor_us": round(floor_us, 2) if gbytes else "",
            "speedup_vs_eager": round(eager_us / median_us, 2) if eager_us else "", **self.env,
        }
        self.rows.append(row)
        return row

    def finish(self) -> str:
        os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
        path = os.path.join(ROOT, "bench", "results", f"{self.name}.csv")
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows(self.rows)
        cols = ["op", "impl", "shape", "dtype", "median_us", "gb_per_s", "pct_of_floor", "floor_us",
                "speedup_vs_eager"]
        widths = {c: max(len(c), *(len(str(r[c])) for r in self.rows)) if self.rows else len(c) for c in cols}
        print(f"# {self.name} on {self.env['device']} | torch {self.env['torch']} | triton {self.env['triton']}"
              f" | {self.env['git_sha']}")
        if self.device.type != "cuda":
            print("# NOTE: CPU run: these are not GPU timings (Triton runs in the interpreter or is skipped).")
        print("  ".join(c.ljust(widths[c]) for c in cols))
        for r in self.rows:
            print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))
        print(f"# wrote {os.path.relpath(path, ROOT)}")
        return path


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
