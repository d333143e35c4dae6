"""Python wrappers of the torch.ops.pretrain_kernels ops, one module per op family; autocast
registers how each family behaves under torch.autocast (imported here, before the wrappers are
imported by anything else, so every importer sees the autocast-aware functions)."""
from . import autocast  # noqa: F401
