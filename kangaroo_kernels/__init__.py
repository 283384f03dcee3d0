"""kangaroo_kernels: fused kernels for Kangaroo self-speculative decoding.

Importing this package is cheap: it neither initialises CUDA nor loads/compiles any kernel. The public names are
resolved on first attribute access from the modules that define them:

  kangaroo_kernels.ops.<op>     the ops: input checks, dispatch (torch.library), register_fake
  kangaroo_kernels.types        result and parameter types (Accepted, Tree, LmHeadExit, AdapterWeights, ...)
  kangaroo_kernels.rope         the RoPE frequencies and rope_cos_sin table
  kangaroo_kernels.reference    the executable spec (<op>_ref); kangaroo_kernels.triton: the Triton kernels

No op module shares a name with a public function, so `kangaroo_kernels.verify_greedy` is always the function.
"""

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "Accepted": "types",
    "AdapterWeights": "types",
    "FlashInferMask": "types",
    "LmHeadExit": "types",
    "LmHeadTopk": "types",
    "LookupTree": "types",
    "NgramMatch": "types",
    "SGLangTree": "types",
    "Tree": "types",
    "Int8Weight": "types",
    "make_rope_cos_sin": "rope",
    "rope_inv_freq": "rope",
    "build_tree": "ops.tree",
    "tree_to_flashinfer_mask": "ops.tree",
    "tree_to_sglang": "ops.tree",
    "verify_greedy": "ops.verify_greedy",
    "verify_sample": "ops.verify_sample",
    "compact_kv": "ops.compact_kv",
    "ngram_lookup": "ops.ngram_lookup",
    "merge_lookup_tree": "ops.lookup_tree",
    "lm_head_exit": "ops.lm_head_exit",
    "lm_head_topk": "ops.lm_head_exit",
    "lm_head_exit_int8": "ops.lm_head_exit_int8",
    "quantize_lm_head": "ops.lm_head_exit_int8",
    "append_attention": "ops.append_attention",
    "adapter_forward": "ops.adapter_forward",
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
