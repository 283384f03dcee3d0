"""kangaroo: the reference Kangaroo self-speculative decoder built on kangaroo_kernels.

    from kangaroo import KangarooDecoder
    dec = KangarooDecoder.from_pretrained("path/to/llama", adapter="path/to/adapter")
    out = dec.generate(prompt_ids, max_new_tokens=128)  # out.tokens, out.stats

Importing the package is cheap: the submodules (and torch) load on first attribute access.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "KangarooDecoder": "generate",
    "GenerateOutput": "generate",
    "GenerateStats": "generate",
    "KangarooAdapter": "adapter",
    "LlamaModel": "model",
    "ModelConfig": "model",
    "KVCache": "model",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'kangaroo' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"kangaroo.{mod}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
