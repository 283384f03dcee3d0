"""Compile every Triton kernel for a GPU target without a GPU, and report what ptxas made of it.

The interpreter (TRITON_INTERPRET=1) runs the kernels' semantics on CPU but never lowers them, so it cannot see
what only a real compile shows: register spills (local-memory stack), shared-memory overruns, layouts that blow
up code size, or lowering errors. This script calls the ops' forced-Triton entry points on CPU tensors of real
model shapes with launch configs chosen exactly as on a GPU (kangaroo_kernels.triton._compile_only_sms), swaps
the launch for Triton's compile-only warmup against a GPUTarget (no driver needed), and reads each cubin's
resource usage with ptxas -v (Triton's bundled ptxas, the flags Triton compiles with).

  python bench/compile_report.py [--arch 90 [80 ...]] [--set full|ci] [--csv PATH] [--cache-dir DIR]

Columns: kernel, case (the op call that launched it), arch, num_warps, num_stages, regs (per thread),
spill_bytes (ptxas spill stores + loads: > 0 fails), stack (bytes of local stack frame per thread, e.g. sin/cos
range reduction), shared (bytes of dynamic shared memory), ld128 (128-bit / all global load instructions in the
PTX, a static count), ptx_kb, compile_s (fresh compile, ~0 when cached). Exit status 1 when any kernel spills
or overruns shared memory. tests/test_compile_report.py runs --set ci in CI (no GPU there).
"""

import argparse
import csv
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)  # must be unset before the kernels are defined: real JITFunctions

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import kangaroo_kernels.triton as ktriton  # noqa: E402

SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}  # max dynamic shared memory per block (bytes)
SM_COUNT = {80: 108, 86: 84, 89: 128, 90: 132}
DT = torch.bfloat16


class _CompileOnlyDriver:
    """Just enough of Triton's driver interface for JITFunction.run(warmup=True) to compile for `target`."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.target.arch  # JITFunction caches binders per device: one "device" per target

    def get_current_stream(self, device=None):
        return 0

    def is_active(self):
        return True


class _Recorder:
    def __init__(self):
        self.launches = []  # (kernel name, CompiledKernel, compile seconds)
        self._orig = JITFunction.run

    def __enter__(self):
        rec = self

        def run(fn, *args, grid, warmup, **kwargs):
            t0 = time.perf_counter()
            kernel = rec._orig(fn, *args, grid=grid, warmup=True, **kwargs)
            rec.launches.append((fn.fn.__name__, kernel, time.perf_counter() - t0))
            return kernel

        JITFunction.run = run
        return self

    def __exit__(self, *exc):
        JITFunction.run = self._orig


def compile_only(kernel, args, kwargs, arch: int):
    """Compiles the @triton.jit `kernel` for args/kwargs (constexprs, num_warps, ...) for sm_<arch>, no GPU
    needed; returns Triton's CompiledKernel (asm["ptx"], asm["cubin"], metadata)."""
    driver.set_active(_CompileOnlyDriver(arch))
    try:
        return kernel.warmup(*args, grid=(1,), **kwargs)
    finally:
        driver._active = None


def _ptxas(arch: int) -> str:
    from triton import knobs

    return (knobs.nvidia.ptxas_blackwell if arch >= 100 else knobs.nvidia.ptxas).path


def resource_usage(ptx: str, arch: int) -> dict:
    """{'regs', 'stack', 'spill_stores', 'spill_loads', 'cmem'} of the kernel in ptx: ptxas -v with the flags
    Triton's make_cubin passes (so regs match the cubin Triton loads on a GPU)."""
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([_ptxas(arch), "-lineinfo", "-v", "--regAllocOptLevel=2",
                              f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", os.path.join(d, "k.o")],
                             capture_output=True, text=True)
    log = res.stdout + res.stderr
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed on a PTX Triton compiled:\n{log[-2000:]}")

    def num(pattern):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0

    return {"regs": num(r"Used (\d+) registers"), "stack": num(r"(\d+) bytes stack frame"),
            "spill_stores": num(r"(\d+) bytes spill stores"), "spill_loads": num(r"(\d+) bytes spill loads")}


def _wide_loads(ptx: str) -> str:
    """'wide/all' global load instructions in the PTX text (static count, not traffic): 128-bit loads (v4.b32,
    v2.b64) are what a bandwidth-bound weight stream wants."""
    loads = re.findall(r"\bld\.global(?:\.[a-z0-9]+)*", ptx)
    wide = [x for x in loads if ".v4.b32" in x or ".v2.b64" in x or ".v4.u32" in x or ".v4.f32" in x]
    return f"{len(wide)}/{len(loads)}"


# -- the cases: (name, thunk) calling a forced-Triton entry point on CPU tensors ---------------------------------
# Tensors are torch.empty/zeros: values never matter (nothing runs), only shapes, dtypes, strides and alignment.

def _lm_head_cases(full: bool):
    from kangaroo_kernels.ops.lm_head_exit import _lm_head_exit_triton, _lm_head_topk_triton

    out = []
    D, V = 4096, 32000
    w = torch.empty(V, D, dtype=DT)
    g = torch.empty(D, dtype=DT)
    batches = (1, 2, 4, 16, 64) if full else (1, 4, 16)
    for B in batches:
        h = torch.empty(B, D, dtype=DT)
        out.append((f"lm_head_exit greedy+norm B={B} V={V} D={D}",
                    lambda h=h: _lm_head_exit_triton(h, w, 0.6, norm_weight=g)))
    for B in ((1, 4, 16) if full else (1, 16)):
        h = torch.empty(B, D, dtype=DT)
        seed = torch.zeros(B, dtype=torch.int64)
        off = torch.zeros(B, dtype=torch.int64)
        out.append((f"lm_head_exit sample B={B}",
                    lambda h=h, seed=seed, off=off: _lm_head_exit_triton(h, w, 0.6, norm_weight=g, temperature=0.8,
                                                                         seed=seed, offset=off)))
    for B in ((1, 16) if full else (1, 4)):
        h = torch.empty(B, D, dtype=DT)
        seed = torch.zeros(B, dtype=torch.int64)
        off = torch.zeros(B, dtype=torch.int64)
        rows = dict(temperature=torch.ones(B), top_k=torch.zeros(B, dtype=torch.int32), top_p=torch.ones(B))
        out.append((f"lm_head_exit top-k/top-p rows B={B}",
                    lambda h=h, seed=seed, off=off, rows=rows: _lm_head_exit_triton(
                        h, w, 0.6, norm_weight=g, seed=seed, offset=off, validate=False, **rows)))
    h = torch.empty(1, D, dtype=DT)
    out.append(("lm_head_exit top_k=50 top_p=0.9 probs B=1",
                lambda: _lm_head_exit_triton(h, w, 0.6, temperature=0.8, top_k=50, top_p=0.9,
                                             seed=torch.zeros(1, dtype=torch.int64), return_probs=True)))
    out.append(("lm_head_exit probs B=1", lambda: _lm_head_exit_triton(h, w, 0.6, return_probs=True)))
    out.append(("lm_head_topk k=8 B=1", lambda: _lm_head_topk_triton(h, w, 8, norm_weight=g)))
    if full:
        Vq, Dq = 152064, 3584
        wq = torch.empty(Vq, Dq, dtype=DT)
        hq = torch.empty(4, Dq, dtype=DT)
        out.append((f"lm_head_exit greedy B=4 V={Vq} D={Dq}", lambda: _lm_head_exit_triton(hq, wq, 0.6)))
        out.append(("lm_head_topk k=16 B=4 V=152064", lambda: _lm_head_topk_triton(hq, wq, 16)))
        h32 = torch.empty(4, D, dtype=torch.float32)
        w32 = torch.empty(V, D, dtype=torch.float32)
        out.append(("lm_head_exit greedy fp32 B=4", lambda: _lm_head_exit_triton(h32, w32, 0.6)))
    return out


def _attention_cases(full: bool):
    from kangaroo_kernels.ops.append_attention import _append_attention_triton
    from kangaroo_kernels.rope import make_rope_cos_sin

    out = []
    S, Dh = 2048, 128
    # (label, B, T, Hq, Hk, tree)
    shapes = [("decode MHA", 1, 1, 32, 32, False), ("decode GQA", 16, 1, 32, 8, False),
              ("verify T=7 tree GQA", 1, 7, 32, 8, True)]
    if full:
        shapes += [("decode GQA", 1, 1, 28, 4, False), ("verify T=7 MHA", 4, 7, 32, 32, False),
                   ("prefill T=64 GQA", 1, 64, 32, 8, False)]
    cs = make_rope_cos_sin(S, Dh)
    for label, B, T, Hq, Hk, tree in shapes:
        q = torch.empty(B, T, Hq, Dh, dtype=DT)
        k = torch.empty(B, T, Hk, Dh, dtype=DT)
        kc = torch.empty(B, Hk, S, Dh, dtype=DT)
        lens = torch.zeros(B, dtype=torch.int32)
        pos = torch.zeros(B, T, dtype=torch.int32)
        tm = torch.zeros(B, T, 1, dtype=torch.int32) if tree else None
        out.append((f"append_attention {label} B={B} T={T} Hq={Hq} Hk={Hk} S={S}",
                    lambda q=q, k=k, kc=kc, lens=lens, pos=pos, tm=tm: _append_attention_triton(
                        q, k, k, kc, kc, lens, tree_mask=tm, positions=pos, rope_cos_sin=cs, validate=False)))
    # Phi-3-style head dim 96: the kernel pads each half of a head to a power of two
    cs96 = make_rope_cos_sin(S, 96)
    for label, T in (("decode", 1), ("verify T=7", 7)):
        q = torch.empty(1, T, 32, 96, dtype=DT)
        kc = torch.empty(1, 32, S, 96, dtype=DT)
        lens = torch.zeros(1, dtype=torch.int32)
        pos = torch.zeros(1, T, dtype=torch.int32)
        out.append((f"append_attention {label} Dh=96 B=1 T={T} Hq=32 Hk=32 S={S}",
                    lambda q=q, kc=kc, lens=lens, pos=pos: _append_attention_triton(
                        q, q, q, kc, kc, lens, positions=pos, rope_cos_sin=cs96, validate=False)))
    if full:
        q = torch.empty(1, 1, 32, Dh, dtype=torch.float32)
        kc = torch.empty(1, 32, S, Dh, dtype=torch.float32)
        lens = torch.zeros(1, dtype=torch.int32)
        out.append(("append_attention decode fp32 B=1", lambda: _append_attention_triton(
            q, q, q, kc, kc, lens, validate=False)))
    return out


def _adapter_cases(full: bool):
    from kangaroo_kernels.ops.adapter_forward import _adapter_forward_triton
    from kangaroo_kernels.types import AdapterWeights

    out = []
    S, Dh = 2048, 128
    models = [("vicuna-7b", 4096, 32, 32, False)]
    if full:
        models += [("qwen2.5-7b", 3584, 28, 4, True)]
    for name, D, Hq, Hk, bias in models:
        wq = torch.empty(Hq * Dh, D, dtype=DT)
        wk = torch.empty(Hk * Dh, D, dtype=DT)
        bq = torch.empty(Hq * Dh, dtype=DT) if bias else None
        bk = torch.empty(Hk * Dh, dtype=DT) if bias else None
        weights = AdapterWeights(norm_in=torch.empty(D, dtype=DT), wq=wq, wk=wk, wv=wk, wo=torch.empty(D, Hq * Dh,
                                 dtype=DT), norm_out=torch.empty(D, dtype=DT), num_heads=Hq, num_kv_heads=Hk,
                                 bq=bq, bk=bk, bv=bk)
        for B in ((1, 2, 4, 16, 64) if full else (1, 4, 16)):
            h = torch.empty(B, D, dtype=DT)
            kc = torch.empty(B, Hk, S, Dh, dtype=DT)
            lens = torch.zeros(B, dtype=torch.int32)
            pos = torch.zeros(B, dtype=torch.int32)
            act = torch.ones(B, dtype=torch.bool)
            out.append((f"adapter_forward {name} B={B} S={S}",
                        lambda h=h, kc=kc, lens=lens, pos=pos, act=act, w=weights: _adapter_forward_triton(
                            h, w, kc, kc, lens, pos, active=act, validate=False)))
    return out


def cases(which: str):
    full = which == "full"
    return _lm_head_cases(full) + _attention_cases(full) + _adapter_cases(full)


def report(archs, which: str):
    rows = []
    seen = set()
    for arch in archs:
        driver.set_active(_CompileOnlyDriver(arch))
        ktriton._compile_only_sms = SM_COUNT.get(arch, 108)
        try:
            for label, thunk in cases(which):
                with _Recorder() as rec:
                    thunk()
                for name, kernel, secs in rec.launches:
                    key = (arch, kernel.hash)
                    if key in seen:
                        continue
                    seen.add(key)
                    use = resource_usage(kernel.asm["ptx"], arch)
                    md = kernel.metadata
                    shared = int(md.shared)  # Triton's dynamic shared memory (these kernels have no static)
                    spills = use["spill_stores"] + use["spill_loads"]
                    rows.append({"kernel": name, "case": label, "arch": f"sm_{arch}", "num_warps": md.num_warps,
                                 "num_stages": md.num_stages, "regs": use["regs"], "spill_bytes": spills,
                                 "stack": use["stack"], "shared": shared,
                                 "ld128": _wide_loads(kernel.asm["ptx"]),
                                 "ptx_kb": round(len(kernel.asm["ptx"]) / 1024, 1),
                                 "compile_s": round(secs, 2),
                                 "ok": spills == 0 and shared <= SHARED_LIMIT.get(arch, 101376)})
        finally:
            ktriton._compile_only_sms = None
            driver._active = None  # no real driver on a GPU-less machine: reset lazily
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90], help="compute capabilities (90 = H100)")
    ap.add_argument("--set", choices=("full", "ci"), default="full", help="which cases (ci: the CI subset)")
    ap.add_argument("--csv", default=os.path.join(ROOT, "bench", "results", "compile_report.csv"))
    ap.add_argument("--cache-dir", default=None,
                    help="Triton cache (default: a fresh temporary one, so compile_s is a real compile time)")
    args = ap.parse_args(argv)
    cache = args.cache_dir or tempfile.mkdtemp(prefix="kangaroo-triton-cache-")
    triton.knobs.cache.dir = cache
    t0 = time.perf_counter()
    try:
        rows = report(args.arch, args.set)
    finally:
        if args.cache_dir is None:
            shutil.rmtree(cache, ignore_errors=True)
    cols = list(rows[0].keys()) if rows else ["kernel"]
    os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    archs = ", ".join(f"sm_{a}" for a in args.arch)
    print(f"Triton {triton.__version__}, torch {torch.__version__}: {len(rows)} kernels compiled for {archs} in "
          f"{time.perf_counter() - t0:.1f} s (no GPU; ptxas resource usage)")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    print(f"csv: {args.csv}")
    bad = [r for r in rows if not r["ok"]]
    for r in bad:
        print(f"NOT OK: {r['kernel']} ({r['case']}, {r['arch']}): {r['spill_bytes']} B of spills, "
              f"shared {r['shared']} B",
              file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
