"""pk.schedulers: the diffusers-compatible schedulers, which live in
pretrain_kernels.integrations.schedulers (this module re-exports them)."""
from .integrations.schedulers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,  # noqa: F401
                                      EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, FrozenConfig,
                                      SchedulerMixin, SchedulerOutput)
from .integrations.schedulers import __all__  # noqa: F401
