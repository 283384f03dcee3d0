"""kangaroo: the reference Kangaroo self-speculative decoder built on kangaroo_kernels.

The decoder lands with a later issue; the package is importable (and cheap to import) already.
"""

__version__ = "0.1.0"
