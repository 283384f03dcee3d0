"""Triton kernels of the draft side. Import these modules only when a kernel is needed: with
TRITON_INTERPRET=1 set before import they run on CPU tensors (tests)."""
