"""Build kangaroo_kernels._C (C++ CPU ops always, CUDA ops when nvcc and a CUDA torch are present).

setup.py drives the native build through torch.utils.cpp_extension; CMakeLists.txt only builds the
torch-free headers (CUDA compile check, no torch needed). Environment:
  KANGAROO_FORCE_CPU=1       skip the CUDA kernels even where they could be built
  KANGAROO_CUDA_ARCHS="80;90" compute capabilities to build (default: sm_80 and sm_90)
  MAX_JOBS=N                 parallel compile jobs (honoured by ninja through torch)
"""

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    """torch guesses CUDA_HOME from `which nvcc`; a wrapper script in /usr/local/bin fools it."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    cands = ["/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for c in cands:
        if os.path.exists(os.path.join(c, "bin", "nvcc")) and os.path.exists(
                os.path.join(c, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = c
            return


_find_cuda_home()  # before torch.utils.cpp_extension reads it


def _cuda_build_possible():
    if os.environ.get("KANGAROO_FORCE_CPU", "0") == "1":
        return False, "KANGAROO_FORCE_CPU=1"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        return False, "torch is not importable in the build environment"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build"
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc"))
    if not nvcc or not os.path.exists(nvcc):
        return False, "nvcc was not found (set CUDA_HOME or put nvcc on PATH)"
    return True, nvcc


def _nvidia_wheel_dirs():
    """Headers/libs of the nvidia-* wheels (cusparse.h etc. are missing from /usr/local/cuda here)."""
    inc, lib = [], []
    for sp in sys.path:
        for sub in ("nvidia/cu13", "nvidia/cu12"):
            base = os.path.join(sp, sub)
            if os.path.isdir(os.path.join(base, "include")):
                inc.append(os.path.join(base, "include"))
            if os.path.isdir(os.path.join(base, "lib")):
                lib.append(os.path.join(base, "lib"))
    return inc, lib


def _write_build_info(with_cuda, why, archs):
    path = os.path.join(ROOT, "kangaroo_kernels", "_build_info.py")
    with open(path, "w") as f:
        f.write("# Written by setup.py. Do not edit.\n")
        f.write(f"WITH_CUDA = {with_cuda!r}\n")
        f.write(f"CUDA_SKIP_REASON = {('' if with_cuda else why)!r}\n")
        f.write(f"CUDA_ARCHS = {archs!r}\n")


def _extensions():
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("kangaroo_kernels: torch not found; building the pure-Python packages only", flush=True)
        _write_build_info(False, "torch was not importable at build time", [])
        return [], {}

    with_cuda, why = _cuda_build_possible()
    archs = os.environ.get("KANGAROO_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
    archs = [a.strip() for a in archs if a.strip()]
    cpu_sources = ["csrc/registration.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")]
    cxx_flags = ["-O3"]  # the C++ standard comes from torch (C++20 for 2.14, C++17 for 2.11)
    if sys.platform != "win32":  # `omp simd` loops vectorize their reductions (no OpenMP runtime, no -ffast-math)
        cxx_flags.append("-fopenmp-simd")
        if os.environ.get("KANGAROO_DEBUG_INFO", "0") != "1":  # Python's CFLAGS carry -g: 13 % of a compile
            cxx_flags.append("-g0")
    if not with_cuda:
        print(f"kangaroo_kernels: building without CUDA kernels ({why}); CPU + Triton only", flush=True)
        _write_build_info(False, why, [])
        ext = CppExtension(
            "kangaroo_kernels._C", cpu_sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
        )
        return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}

    print(f"kangaroo_kernels: building CUDA kernels with {why} for sm_{', sm_'.join(archs)}", flush=True)
    _write_build_info(True, "", archs)
    cuda_sources = sorted(glob.glob("csrc/*.cu")) + sorted(glob.glob("csrc/*_cuda.cpp"))
    inc, lib = _nvidia_wheel_dirs()
    # torch's BuildExtension turns TORCH_CUDA_ARCH_LIST into -gencode flags; without a GPU it would
    # otherwise target every architecture it knows, which multiplies the compile time.
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(f"{a[:-1]}.{a[-1]}" for a in archs)
    ext = CUDAExtension(
        "kangaroo_kernels._C",
        cpu_sources + cuda_sources,
        include_dirs=include_dirs + inc,
        library_dirs=lib,
        define_macros=[("KANGAROO_WITH_CUDA", "1")],
        extra_compile_args={
            "cxx": cxx_flags + ["-DKANGAROO_WITH_CUDA=1"],
            "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo",
                     "-DKANGAROO_WITH_CUDA=1"],
        },
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


# What the packages import (tests/test_packaging.py checks every third-party import is declared here). The decoder's
# CLI (`kangaroo demo`, `train`, `generate`) needs transformers, tokenizers, safetensors and tqdm; Triton comes with
# torch's Linux builds and runs the draft-side kernels.
INSTALL_REQUIRES = ["torch", "numpy", "triton; platform_system == 'Linux'", "safetensors", "transformers",
                    "tokenizers", "tqdm"]
EXTRAS_REQUIRE = {"plot": ["matplotlib"], "test": ["pytest", "ruff"]}

ext_modules, cmdclass = _extensions()

setup(
    name="kangaroo-kernels",
    version="0.1.0",
    description="Fused GPU kernels and a reference decoder for Kangaroo self-speculative decoding",
    packages=["kangaroo_kernels", "kangaroo_kernels.ops", "kangaroo_kernels.triton", "kangaroo_kernels.reference",
              "kangaroo_kernels.compat", "kangaroo"],
    package_dir={"kangaroo": "python/kangaroo"},
    # the shipped demo model (kangaroo.demo.shipped_dir): a non-editable install carries it
    package_data={"kangaroo": ["default_model/manifest.json", "default_model/*/*.json",
                               "default_model/*/*.safetensors"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.9",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["kangaroo=kangaroo.cli:main"]},
)
