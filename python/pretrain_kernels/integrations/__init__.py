"""Adapters from pretrain_kernels' ops to other libraries (transformers, diffusers).

Each adapter lives in its own module and imports its library only when used; the ops and
kernels never import from here."""
