"""Python wrappers of the torch.ops.pretrain_kernels ops, one module per op family."""
