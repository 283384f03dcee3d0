"""Packaging and build checks: cheap imports, the native library, CUDA kernels compiled when nvcc was there."""

import os
import shutil
import subprocess
import sys

import torch

import kangaroo_kernels as kk
from kangaroo_kernels import _ext


def test_import_is_cheap_and_does_not_touch_cuda():
    code = (
        "import sys, torch\n"
        "import kangaroo_kernels, kangaroo\n"
        "assert not torch.cuda.is_initialized()\n"
        "assert 'kangaroo_kernels._C' not in sys.modules, 'native lib loaded at import'\n"
        "assert 'triton' not in sys.modules, 'triton imported at import'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_native_ops_registered():
    _ext.ops()
    for name in ("build_tree", "verify_greedy", "verify_sample", "compact_kv", "ngram_lookup"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"kangaroo_kernels::{name}", "CPU"), name


def test_cuda_kernels_compiled_when_nvcc_was_present():
    info = _ext.build_info()
    nvcc_here = shutil.which("nvcc") is not None or os.path.exists("/usr/local/cuda/bin/nvcc")
    cuda_torch = torch.version.cuda is not None
    if nvcc_here and cuda_torch and os.environ.get("KANGAROO_FORCE_CPU", "0") != "1":
        assert info["WITH_CUDA"], f"nvcc and a CUDA torch are here but the build skipped CUDA: {info}"
    assert kk.has_cuda_kernels() == info["WITH_CUDA"]
    if info["WITH_CUDA"]:
        for name in ("build_tree", "verify_greedy", "verify_sample", "compact_kv", "ngram_lookup"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"kangaroo_kernels::{name}", "CUDA"), name


def test_public_api_resolves():
    for name in kk.__all__:
        assert getattr(kk, name) is not None, name


def test_op_names_stay_functions_after_submodule_import():
    """Importing an op module (kangaroo_kernels.ops.<op>) leaves `kangaroo_kernels.<op>` the op function."""
    import importlib

    import kangaroo_kernels

    for name in ("adapter_forward", "append_attention", "compact_kv", "verify_greedy", "verify_sample",
                 "ngram_lookup"):
        mod = importlib.import_module(f"kangaroo_kernels.ops.{name}")
        assert callable(getattr(kangaroo_kernels, name)), name
        assert getattr(kangaroo_kernels, name) is getattr(mod, name)
    from kangaroo_kernels import verify_greedy

    assert callable(verify_greedy)
