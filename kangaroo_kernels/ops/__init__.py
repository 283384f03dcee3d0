"""The ops, one module per op family: Python wrapper, input checks, dispatch (torch.library define/impl) and
register_fake. Importing an op module registers its ops; `import kangaroo_kernels` alone imports none."""
