import os

# Triton reads TRITON_INTERPRET when a kernel is defined: set it before anything imports the kernels.
# Without a GPU every Triton kernel runs in the interpreter on CPU tensors.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: long-running; deselect with -m 'not slow'")


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="no CUDA GPU on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def _devices():
    devs = ["cpu"]
    if _HAS_CUDA:
        devs.append("cuda")
    return devs


@pytest.fixture(params=_devices())
def device(request):
    """Runs a test body on CPU (C++/reference path) and, where a GPU is, on CUDA."""
    return torch.device(request.param)


@pytest.fixture(scope="module")
def one_thread():
    """torch on one intra-op thread for a module: tiny ops, where thread hand-offs cost more than they save on
    shared cores (use with pytestmark = pytest.mark.usefixtures("one_thread"))."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def interpret():
    """True when Triton kernels run in the interpreter on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET") == "1"
