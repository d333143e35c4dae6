"""pretrain-kernels: fused C++/CUDA kernels for masked modeling, next-token prediction and
denoising, registered as torch ops (torch.ops.pretrain_kernels.*)."""
from __future__ import annotations

import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C
from . import schedulers
# The schedulers also at the top level: diffusers' pipelines record a component as
# [<top-level package>, <class name>] in model_index.json and load it from there.
from .integrations.schedulers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                                      FlowMatchEulerDiscreteScheduler, SchedulerMixin)
from .ops.attention import flash_attention, flash_attention_with_kvcache, scaled_dot_product_attention
from .ops.diffusion import (add_noise, ddim_step, ddpm_step, diffusion_loss, dpmpp_2m_step, euler_step,
                            flow_match_step, heun_step, noise_schedule, sample_timesteps, shift_sigmas)
from .ops.layers import gelu, rms_norm, swiglu
from .ops.loss import linear_cross_entropy
from .ops.masking import mlm_mask, span_mask
from .ops.rotary import rotary_embedding
from .ops.sampling import sample, speculative_accept, top_k_top_p_filter, unmask_step
from .integrations.collator import MLMCollator
from .integrations.logits import TopKTopPLogitsWarper

__version__ = "0.1.0"


def build_info() -> dict:
    """What this build contains: with_cuda, cuda_archs, cpu_isa, cpu_parallel (how the CPU
    kernels spread over threads), torch_version (built against), compiler; plus the torch
    version running now and cpu_threads, the threads a CPU kernel runs on right now."""
    info = dict(_C.build_info())
    info["torch_runtime_version"] = torch.__version__
    info["cpu_threads"] = _C.parallel_threads()
    return info


__all__ = [
    "build_info",
    # masked modeling
    "mlm_mask", "span_mask", "MLMCollator",
    # attention
    "flash_attention", "flash_attention_with_kvcache", "scaled_dot_product_attention", "rotary_embedding",
    # sampling
    "sample", "top_k_top_p_filter", "TopKTopPLogitsWarper", "speculative_accept", "unmask_step",
    # denoising
    "noise_schedule", "add_noise", "diffusion_loss", "sample_timesteps", "shift_sigmas", "ddpm_step", "ddim_step",
    "euler_step", "heun_step", "dpmpp_2m_step", "flow_match_step", "schedulers",
    "DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "FlowMatchEulerDiscreteScheduler",
    "DPMSolverMultistepScheduler", "SchedulerMixin",
    # decoder layers
    "rms_norm", "swiglu", "gelu",
    # losses
    "linear_cross_entropy",
]
