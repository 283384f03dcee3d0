"""kangaroo_kernels: fused kernels for Kangaroo self-speculative decoding.

Importing this package is cheap: it neither initialises CUDA nor loads/compiles any kernel.
Ops are resolved on first attribute access.
"""

import importlib
import sys
import types

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "Tree": "tree",
    "build_tree": "tree",
    "tree_to_flashinfer_mask": "tree",
    "tree_to_sglang": "tree",
    "Accepted": "verify_greedy",
    "verify_greedy": "verify_greedy",
    "verify_sample": "verify_sample",
    "compact_kv": "compact_kv",
    "NgramMatch": "ngram_lookup",
    "ngram_lookup": "ngram_lookup",
    "LookupTree": "lookup_tree",
    "merge_lookup_tree": "lookup_tree",
    "lm_head_exit": "lm_head_exit",
    "lm_head_topk": "lm_head_exit",
    "append_attention": "append_attention",
    "AdapterWeights": "adapter_forward",
    "adapter_forward": "adapter_forward",
    "has_cuda_kernels": "_ext",
    "build_info": "_ext",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'kangaroo_kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"kangaroo_kernels.{mod}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)


class _Package(types.ModuleType):
    """Keeps `kangaroo_kernels.<op>` the op function when the submodule of the same name is imported directly
    (`import kangaroo_kernels.verify_greedy` would otherwise rebind the attribute to the module). The submodule
    stays reachable through `importlib.import_module` / `from kangaroo_kernels.<op> import ...`."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == name and hasattr(value, name):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
