"""The executable specification: one plain-PyTorch `<op>_ref` per op, used by tests and benchmarks.

Each op family keeps its reference in a module of this package; this namespace re-exports them all,
so `from kangaroo_kernels.reference import verify_greedy_ref` works for every op.
"""

import importlib

_MODULES = ("tree", "verify_greedy", "verify_sample", "compact_kv", "ngram_lookup", "lookup_tree", "lm_head_exit",
            "lm_head_exit_int8", "append_attention", "adapter_forward")

__all__ = []
for _m in _MODULES:
    _mod = importlib.import_module(f"kangaroo_kernels.reference.{_m}")
    for _name in getattr(_mod, "__all__", [n for n in dir(_mod) if n.endswith("_ref")]):
        globals()[_name] = getattr(_mod, _name)
        __all__.append(_name)
