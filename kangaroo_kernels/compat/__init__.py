"""Drop-in entry points with the peers' exact signatures and in-place semantics, over the core ops.

- kangaroo_kernels.compat.flashinfer: chain_speculative_sampling (FlashInfer 0.6.x)
- kangaroo_kernels.compat.sglang: verify_tree_greedy, tree_speculative_sampling_target_only (sgl-kernel)
- kangaroo_kernels.compat.vllm: rejection_sample, the functional core of vLLM v1's RejectionSampler

Each module says which peer version's semantics it follows. Importing this package loads nothing.
"""
