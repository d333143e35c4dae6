"""Adapters from pretrain_kernels' ops to other libraries (the kernels never import from here);
each module imports its library only when used:

  transformers register(): the flash kernels as attn_implementation="pretrain_kernels"
  collator     MLMCollator, a drop-in for transformers' DataCollatorForLanguageModeling
  logits       TopKTopPLogitsWarper for transformers' generate
  diffusers    AttnProcessor (model.set_attn_processor), set_attn_processor(model) for models
               without that method
  schedulers   the diffusers-compatible schedulers (pk.schedulers), saved and loaded in
               diffusers' layout
"""
