"""Adapters to other libraries (the kernels never import from here); each imports its library
only when used:

  diffusers    AttnProcessor (model.set_attn_processor), set_attn_processor(model) for models
               without that method
  schedulers   the diffusers-compatible schedulers (pk.schedulers), saved and loaded in
               diffusers' layout
"""
