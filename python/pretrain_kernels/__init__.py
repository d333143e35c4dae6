"""pretrain-kernels: fused C++/CUDA kernels for masked modeling, next-token prediction and
denoising, registered as torch ops (torch.ops.pretrain_kernels.*)."""
from __future__ import annotations

import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C
from .collator import MLMCollator
from .ops.masking import mlm_mask, span_mask

__version__ = "0.1.0"


def build_info() -> dict:
    """What this build contains: with_cuda, cuda_archs, cpu_isa, torch_version (built
    against), compiler; plus the torch version running now."""
    info = dict(_C.build_info())
    info["torch_runtime_version"] = torch.__version__
    return info


__all__ = ["build_info", "mlm_mask", "span_mask", "MLMCollator"]

# ---- attention ----
from .ops.attention import flash_attention, flash_attention_with_kvcache, scaled_dot_product_attention  # noqa: E402

__all__ += ["flash_attention", "flash_attention_with_kvcache", "scaled_dot_product_attention"]
