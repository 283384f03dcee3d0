"""The CUDA kernels in kangaroo_kernels._C use no local memory (no register spills) on any built architecture.

Read from the built extension's SASS with cuobjdump (Triton's bundled one, else the CUDA toolkit's): every
LDL/STL instruction is a local-memory access, which in these kernels would only come from spills. A kernel with a
dynamically indexed local array, compiled here with nvcc, checks that the scan finds such accesses.
"""

import collections
import os
import shutil
import subprocess

import pytest

import kangaroo_kernels

KERNELS = ("compact_kv_kernel", "compact_kv_lens_kernel", "build_tree_kernel", "argmax_chunks_kernel",
           "lazy_kernel", "walk_kernel", "verify_sample_kernel", "ngram_lookup_kernel", "merge_lookup_tree_kernel")


def _tool(name):
    try:
        import triton

        bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.access(bundled, os.X_OK):
            return bundled
    except ImportError:
        pass
    for d in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if d and os.access(os.path.join(d, "bin", name), os.X_OK):
            return os.path.join(d, "bin", name)
    return shutil.which(name)


def local_memory_accesses(binary: str):
    """{(arch, mangled kernel name): number of LDL/STL instructions} over every kernel in binary."""
    sass = subprocess.run([_tool("cuobjdump"), "-sass", binary], capture_output=True, text=True, check=True).stdout
    counts = collections.Counter()
    arch = func = None
    for line in sass.splitlines():
        s = line.strip()
        if s.startswith("arch = "):
            arch = s.split("=", 1)[1].strip()
        elif s.startswith("Function : "):
            func = s.split(":", 1)[1].strip()
            counts[(arch, func)] += 0
        elif func and any(op in s for op in (" LDL", " STL")):
            counts[(arch, func)] += 1
    return counts


def _cuda_build():
    info = kangaroo_kernels.build_info()
    if not info["WITH_CUDA"]:
        pytest.skip("extension built without CUDA kernels: " + info["CUDA_SKIP_REASON"])
    if _tool("cuobjdump") is None:
        pytest.fail("the extension has CUDA kernels but no cuobjdump was found (Triton's or the toolkit's)")
    return info


def test_cuda_kernels_do_not_spill():
    info = _cuda_build()
    import kangaroo_kernels._C as ext

    counts = local_memory_accesses(ext.__file__)
    archs = {a for a, _ in counts}
    assert archs == {f"sm_{a}" for a in info["CUDA_ARCHS"]}
    for arch in archs:
        names = [f for a, f in counts if a == arch]
        for k in KERNELS:
            assert any(k in f for f in names), f"{k} missing from the {arch} code"
    spilling = {k: n for k, n in counts.items() if n}
    assert not spilling, f"kernels with local-memory (spill) accesses: {spilling}"


_LOCAL_ARRAY_KERNEL = r"""
__global__ void local_array(const int* idx, float* out) {
  float a[64];
  float s = out[threadIdx.x];
  for (int i = 0; i < 64; ++i) a[i] = s = s * out[i] + 1.0f;  // a running product: not recomputable per index
  out[threadIdx.x] = a[idx[threadIdx.x] & 63];                // dynamic index: the array lives in local memory
}
"""


def test_scan_finds_local_memory(tmp_path):
    _cuda_build()
    nvcc = _tool("nvcc")
    if nvcc is None:
        pytest.skip("no nvcc to compile the control kernel")
    src = tmp_path / "local.cu"
    src.write_text(_LOCAL_ARRAY_KERNEL)
    obj = tmp_path / "local.cubin"
    subprocess.run([nvcc, "-cubin", "-arch=sm_90", "-O3", str(src), "-o", str(obj)], check=True, timeout=300)
    counts = local_memory_accesses(str(obj))
    assert [n for (_, f), n in counts.items() if "local_array" in f][0] > 0
