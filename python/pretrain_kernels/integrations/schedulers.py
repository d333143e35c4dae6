"""diffusers-compatible scheduler classes on top of the fused steps.

    pipe.scheduler = pk.schedulers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained("out")            # model_index.json: "scheduler": ["pretrain_kernels", "DDIMScheduler"]
    pipe = DDPMPipeline.from_pretrained("out")              # our scheduler comes back
    sched = pk.schedulers.DDIMScheduler.from_pretrained("out", subfolder="scheduler")

DDPMScheduler, DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler and
DPMSolverMultistepScheduler take diffusers' constructor arguments and defaults, keep their
`config` (a dict with attribute access; `from_config` accepts a diffusers config and
ignores keys it does not know), and offer set_timesteps (leading / trailing / linspace
spacing), step(model_output, timestep, sample, ..., generator=None, return_dict=True),
add_noise, scale_model_input, timesteps, init_noise_sigma and order.

Saving and loading follow diffusers' file layout: save_pretrained(dir) writes
dir/scheduler_config.json (every constructor argument, plus "_class_name" and
"_diffusers_version"); from_pretrained(dir, subfolder=None) reads it (a file path, dir/subfolder
or dir; a Hub repository id through huggingface_hub when it is installed). A config saved by
diffusers loads into our class and ours into diffusers' class. The classes derive from
SchedulerMixin and are importable from the top level (pretrain_kernels.DDIMScheduler), which is
what diffusers' pipelines need to save one as ["pretrain_kernels", "<ClassName>"] in
model_index.json and load it back: diffusers saves a component only when its base class is in
its table of loadable libraries (diffusers.pipelines.pipeline_loading_utils.LOADABLE_CLASSES),
so pretrain_kernels adds itself there (with SchedulerMixin) whenever diffusers' pipelines are
already imported: when this module is imported, when a scheduler is created, or when
pretrain_kernels.integrations.diffusers is imported. diffusers itself is never imported here.

Differences from diffusers, on purpose:
  * each step is one fused kernel (csrc/*/diffusion*), and stepping never synchronises
    with the host: a step reads the schedule from host-side tables (one-element CPU
    tensors feed the kernel as constants) and keeps its position in a Python counter.
    When `timestep` is a Python number or a CPU tensor it is looked up in the schedule;
    when it is a GPU tensor, the counter is trusted (like diffusers' `begin_index`), so a
    whole sampling loop can be captured in one CUDA graph;
  * the tables are computed in float64 (alphas_cumprod is float64; sigmas are float32 as
    in diffusers);
  * noise comes from Philox inside the kernel, seeded from `generator` (or torch's
    default generator): reproducible, but not the numbers torch.randn would give. Pass
    `variance_noise` where diffusers accepts it to supply your own.
Bad arguments raise TypeError / ValueError naming them: schedules given to set_timesteps are
checked (finite, in range, non-empty), stepping a sigma scheduler past its last step raises,
and add_noise / scale_noise with CPU timesteps that are not in the schedule raise (timesteps
on the GPU cannot be looked up without a sync: a sample whose timestep is not in the schedule
gets NaN).
Options that need more than an elementwise pass (dynamic thresholding, learned variances,
third-order DPM-Solver, exponential / beta sigmas) are refused with a ValueError naming
the option.
"""
from __future__ import annotations

import inspect
import json
import math
import numbers
import os
import sys
from collections import OrderedDict

import numpy as np
import torch

from ..ops import diffusion as _d

__all__ = ["DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "FlowMatchEulerDiscreteScheduler",
           "DPMSolverMultistepScheduler", "SchedulerMixin", "SchedulerOutput", "FrozenConfig"]

CONFIG_NAME = "scheduler_config.json"
# The diffusers release whose constructor arguments (the config keys) these classes mirror;
# written as "_diffusers_version" into scheduler_config.json.
DIFFUSERS_VERSION = "0.42.1"
_LIBRARY = __name__.split(".")[0]  # "pretrain_kernels": what diffusers records in model_index.json
_SAVE_LOAD = ["save_pretrained", "from_pretrained"]


def _register_with_diffusers() -> bool:
    """Add pretrain_kernels to diffusers' table of libraries whose classes a pipeline can save
    and load (LOADABLE_CLASSES), with SchedulerMixin as the base class to look for, when
    diffusers' pipelines are already imported (diffusers is never imported from here).
    Idempotent; True when the table holds the entry."""
    utils = sys.modules.get("diffusers.pipelines.pipeline_loading_utils")
    table = getattr(utils, "LOADABLE_CLASSES", None)
    if not isinstance(table, dict):
        return False
    if _LIBRARY not in table:
        table[_LIBRARY] = {"SchedulerMixin": list(_SAVE_LOAD)}
    importable = getattr(utils, "ALL_IMPORTABLE_CLASSES", None)
    if isinstance(importable, dict):
        importable.setdefault("SchedulerMixin", list(_SAVE_LOAD))
    return True


class FrozenConfig(dict):
    """The scheduler's constructor arguments: a dict that also reads like an object."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        raise AttributeError("config is frozen; use register_to_config")


class SchedulerOutput(OrderedDict):
    """Output of step(): attributes prev_sample (and pred_original_sample where diffusers
    returns it); indexable like a tuple (out[0]) or a dict, as diffusers' BaseOutput."""

    def __init__(self, prev_sample, pred_original_sample=None):
        super().__init__()
        self["prev_sample"] = prev_sample
        if pred_original_sample is not None:
            self["pred_original_sample"] = pred_original_sample

    def __getattr__(self, name):
        if name in ("prev_sample", "pred_original_sample"):
            return self.get(name)
        raise AttributeError(name)

    def __getitem__(self, k):
        if isinstance(k, str):
            return super().__getitem__(k)
        return self.to_tuple()[k]

    def to_tuple(self):
        return tuple(self.values())


def _unsupported(cls, name, value):
    raise ValueError(f"{name}: {value!r} is not supported by pretrain_kernels' {cls.__name__}")


class SchedulerMixin:
    """What the five classes share: the config (diffusers' `config`, `register_to_config`,
    `from_config`), saving and loading it in diffusers' layout (`save_pretrained`,
    `from_pretrained`, `save_config`, `load_config`), and the step-index bookkeeping."""

    order = 1
    config_name = CONFIG_NAME
    _compatibles: list = []

    def _register(self, frame_locals):
        params = inspect.signature(type(self).__init__).parameters
        cfg = {k: frame_locals[k] for k in params if k != "self"}
        for k, v in cfg.items():
            if isinstance(v, np.ndarray):
                cfg[k] = v.tolist()
        cfg["_class_name"] = type(self).__name__
        object.__setattr__(self, "_internal_dict", FrozenConfig(cfg))
        _register_with_diffusers()

    @property
    def config(self) -> FrozenConfig:
        return self._internal_dict

    def register_to_config(self, **kwargs):
        d = dict(self._internal_dict)
        d.update(kwargs)
        self._internal_dict = FrozenConfig(d)

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """Build from a config dict (ours or diffusers', or a loaded scheduler_config.json), or
        from another scheduler. Keys this class's constructor does not take are ignored, as are
        those a diffusers config lists in "_use_default_values" (they were defaults of the class
        that wrote it, not choices); keyword arguments override the config."""
        if config is None:
            config = {}
        if not isinstance(config, dict) and hasattr(config, "config"):
            config = config.config
        if not isinstance(config, dict):
            raise TypeError(f"config: expected a dict or a scheduler, got {type(config).__name__}")
        defaults = config.get("_use_default_values") or ()
        params = inspect.signature(cls.__init__).parameters
        init = {k: v for k, v in dict(config).items() if k in params and k != "self" and k not in defaults}
        unused = {}
        for k, v in kwargs.items():
            (init if k in params and k != "self" else unused)[k] = v
        obj = cls(**init)
        return (obj, unused) if return_unused_kwargs else obj

    # -- saving and loading, in diffusers' layout --
    def to_json_string(self) -> str:
        """scheduler_config.json's text: the config with "_class_name" and "_diffusers_version",
        keys sorted, as diffusers writes it."""
        d = {k: v for k, v in self.config.items() if not k.startswith("_")}
        d["_class_name"] = type(self).__name__
        d["_diffusers_version"] = DIFFUSERS_VERSION
        d = {k: (v.tolist() if isinstance(v, (np.ndarray, torch.Tensor)) else list(v) if isinstance(v, tuple) else v)
             for k, v in d.items()}
        return json.dumps(d, indent=2, sort_keys=True) + "\n"

    def save_config(self, save_directory, push_to_hub: bool = False, **kwargs):
        """Write save_directory/scheduler_config.json (the folder is created if missing)."""
        if push_to_hub:
            raise ValueError("push_to_hub: not supported; save locally and upload the folder with huggingface_hub")
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory: expected a directory, got the file {save_directory!r}")
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, self.config_name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())
        return path

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """diffusers' SchedulerMixin.save_pretrained: the config, in save_directory."""
        self.save_config(save_directory, push_to_hub=push_to_hub, **kwargs)

    @classmethod
    def load_config(cls, pretrained_model_name_or_path, subfolder: str | None = None, **kwargs) -> dict:
        """The dict in scheduler_config.json, found as diffusers finds it: a path to the file, or
        a folder holding it in `subfolder` or at its top; otherwise a Hub repository id, fetched
        with huggingface_hub (cache_dir, revision, token, local_files_only pass through)."""
        if isinstance(pretrained_model_name_or_path, bool) or not isinstance(pretrained_model_name_or_path,
                                                                             (str, os.PathLike)):
            raise TypeError(f"pretrained_model_name_or_path: expected a path or a repository id, got "
                            f"{type(pretrained_model_name_or_path).__name__}")
        where = os.fspath(pretrained_model_name_or_path)
        if os.path.isfile(where):
            path = where
        elif os.path.isdir(where):
            candidates = ([os.path.join(where, subfolder, cls.config_name)] if subfolder else []) + [
                os.path.join(where, cls.config_name)]
            path = next((c for c in candidates if os.path.isfile(c)), None)
            if path is None:
                raise OSError(f"pretrained_model_name_or_path: no {cls.config_name} in {where!r}"
                              + (f" (nor in its subfolder {subfolder!r})" if subfolder else ""))
        else:
            try:
                from huggingface_hub import hf_hub_download
            except ImportError:
                raise OSError(f"pretrained_model_name_or_path: {where!r} is not a file or a folder, and "
                              f"huggingface_hub (to fetch it from the Hub) is not installed") from None
            hub = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only") if k in kwargs}
            try:
                path = hf_hub_download(where, cls.config_name, subfolder=subfolder or None, **hub)
            except Exception as e:
                raise OSError(f"pretrained_model_name_or_path: could not fetch {cls.config_name} of {where!r} "
                              f"from the Hub: {e}") from e
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"pretrained_model_name_or_path: {path!r} is not a valid JSON file: {e}") from None
        if not isinstance(config, dict):
            raise ValueError(f"pretrained_model_name_or_path: {path!r} does not hold a JSON object")
        return config

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: str | None = None,
                        return_unused_kwargs: bool = False, **kwargs):
        """diffusers' SchedulerMixin.from_pretrained: load_config, then from_config. Keyword
        arguments that are constructor arguments override the saved config; the loader's own
        (cache_dir, revision, token, local_files_only) go to load_config."""
        loader = {k: kwargs.pop(k) for k in ("cache_dir", "revision", "token", "local_files_only") if k in kwargs}
        config = cls.load_config(pretrained_model_name_or_path, subfolder=subfolder, **loader)
        return cls.from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def __len__(self):
        return self.config.num_train_timesteps

    def __repr__(self):
        return f"{type(self).__name__} {self.to_json_string()}"

    # -- step index (Euler, DPM-Solver, flow matching) --
    @property
    def step_index(self):
        return self._step_index

    @property
    def begin_index(self):
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        self._begin_index = int(begin_index)

    def _lookup(self, timestep):
        """Index of `timestep` in the schedule, from the host copy; None for GPU tensors."""
        timestep = _check_timestep(timestep)
        if isinstance(timestep, torch.Tensor):
            if timestep.device.type != "cpu":
                return None
            timestep = timestep.reshape(-1)[0].item()
        hits = np.nonzero(self._timesteps_host == float(timestep))[0]
        if len(hits) == 0:
            raise ValueError(f"timestep: {timestep} is not in the schedule set by set_timesteps")
        return int(hits[1] if len(hits) > 1 else hits[0])

    def _current_step(self, timestep):
        """The step index for this call of step() (sigma schedulers), checked against the end."""
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        n = len(self._sig_views) - 1
        if not 0 <= i < n:
            raise ValueError(f"step: step index {i} is past the {n} steps of the schedule; call set_timesteps "
                             f"(or set_begin_index) again")
        return i

    def _init_step_index(self, timestep):
        if self._begin_index is not None:
            self._step_index = self._begin_index
        else:
            idx = self._lookup(timestep)
            self._step_index = 0 if idx is None else idx

    def _indices_on_device(self, timesteps, device):
        """Schedule indices of per-sample timesteps without a host sync (add_noise), and whether
        each was found: CPU timesteps outside the schedule raise; device ones cannot be checked
        without a sync, and the callers give NaN for them."""
        if not isinstance(timesteps, torch.Tensor):
            timesteps = torch.tensor([float(_check_timestep(timesteps))])
        if self._begin_index is not None:
            idx = self._step_index if self._step_index is not None else self._begin_index
            n = timesteps.reshape(-1).shape[0]
            return (torch.full((n,), idx, device=device, dtype=torch.long),
                    torch.ones((n,), device=device, dtype=torch.bool))
        if timesteps.device.type == "cpu":  # against the host copy of the schedule (no device copy)
            _check_in_schedule(timesteps, torch.from_numpy(np.asarray(self._timesteps_host)))
        sched = self.timesteps.to(device)
        t = timesteps.to(device).reshape(-1)
        hit = sched[None, :] == t[:, None]
        return hit.to(torch.int8).argmax(dim=1), hit.any(dim=1)


def _spaced(spacing, num_train, n, steps_offset, dtype=np.int64):
    ts = _spaced_values(spacing, num_train, n, steps_offset, dtype)
    if ts.size and (ts.max() >= num_train or ts.min() < 0):
        raise ValueError(f"steps_offset: {steps_offset} puts timesteps outside [0, {num_train}) "
                         f"(num_train_timesteps), e.g. {ts.max() if ts.max() >= num_train else ts.min()}")
    return ts


def _spaced_values(spacing, num_train, n, steps_offset, dtype):
    if spacing == "linspace":
        return np.linspace(0, num_train - 1, n).round()[::-1].copy().astype(dtype)
    if spacing == "leading":
        ratio = num_train // n
        return ((np.arange(0, n) * ratio).round()[::-1].copy().astype(dtype) + steps_offset).astype(dtype)
    if spacing == "trailing":
        ratio = num_train / n
        return (np.round(np.arange(num_train, 0, -ratio)).astype(dtype) - 1).astype(dtype)
    raise ValueError(f"timestep_spacing: expected 'linspace', 'leading' or 'trailing', got {spacing!r}")


def _check_steps(n, num_train):
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"num_inference_steps: expected a positive int, got {n!r}")
    if n > num_train:
        raise ValueError(f"num_inference_steps: {n} is larger than num_train_timesteps ({num_train})")


_MAX_MU = 700.0  # dynamic shifting: exp(mu) must stay a finite float64


def _check_timestep(timestep):
    """The `timestep` of step(): a number (not NaN) or a tensor with at least one element."""
    if isinstance(timestep, torch.Tensor):
        if timestep.numel() == 0:
            raise ValueError("timestep: expected a number or a non-empty tensor, got an empty tensor")
        if timestep.dtype == torch.bool or timestep.is_complex():
            raise TypeError(f"timestep: expected a number or a numeric tensor, got {timestep.dtype}")
        return timestep
    if isinstance(timestep, bool) or not isinstance(timestep, (numbers.Real, np.number)):
        raise TypeError(f"timestep: expected a number or a tensor, got {type(timestep).__name__}")
    if math.isnan(float(timestep)):
        raise ValueError("timestep: expected a number, got nan")
    return timestep


def _int_timestep(timestep):
    """A single timestep (a number or a one-element CPU tensor) as an int, with a clear error."""
    v = timestep.item() if isinstance(timestep, torch.Tensor) else timestep
    if isinstance(v, float) and not v.is_integer():
        raise ValueError(f"timestep: expected an integer timestep of the schedule, got {v}")
    return int(v)


def _schedule_values(name, values, *, low=None, high=None, integral=False, min_len=1):
    """A user-given schedule (timesteps / sigmas) as a 1-D float64 array: finite values in
    [low, high], at least min_len of them."""
    try:
        a = np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a sequence of numbers, got {type(values).__name__}") from None
    if a.ndim != 1 or a.size < min_len:
        raise ValueError(f"{name}: expected a 1-D sequence of at least {min_len} value(s), got shape {a.shape}")
    bad = ~np.isfinite(a)
    if low is not None:
        bad |= a < low
    if high is not None:
        bad |= a > high
    if integral:
        bad |= a != np.round(a)
    if bad.any():
        i = int(np.nonzero(bad)[0][0])
        rng = f" in [{low:g}, {high:g}]" if low is not None and high is not None else (
            f" >= {low:g}" if low is not None else "")
        kind = "integers" if integral else "finite values"
        raise ValueError(f"{name}: expected {kind}{rng}, got {a[i]} at index {i}")
    return a


def _check_in_schedule(timesteps, schedule):
    """CPU timesteps must be values of the schedule (add_noise of the sigma schedulers)."""
    t = timesteps.reshape(-1).double()
    found = (schedule.double()[None, :] == t[:, None]).any(dim=1)
    if not bool(found.all()):
        i = int((~found).nonzero()[0, 0])
        raise ValueError(f"timesteps: {t[i].item()} is not in the schedule set by set_timesteps")


def _sigma_to_t(sigma, log_sigmas):
    """Fractional training timestep of a sigma: linear interpolation in log sigma."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(np.shape(sigma))


def _karras(sigma_min, sigma_max, n, rho=7.0):
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


class _AlphaBarScheduler(SchedulerMixin):
    def _init_tables(self, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                     rescale_betas_zero_snr):
        if trained_betas is None and beta_schedule not in _d.SCHEDULE_KINDS:
            _unsupported(type(self), "beta_schedule", beta_schedule)
        self.betas = _d.schedule_betas(beta_schedule, num_train_timesteps, beta_start, beta_end,
                                       rescale_betas_zero_snr, trained_betas=trained_betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self._acp_cache = {}

    def _acp_on(self, device):
        device = torch.device(device)
        t = self._acp_cache.get(device)
        if t is None:
            t = self._acp_cache[device] = self.alphas_cumprod.to(device)
        return t

    def _per_sample_timesteps(self, timesteps, device):
        if isinstance(timesteps, torch.Tensor) and timesteps.numel() > 1 and timesteps.device != device:
            timesteps = timesteps.to(device)
        return timesteps

    def add_noise(self, original_samples, noise, timesteps):
        t = self._per_sample_timesteps(timesteps, original_samples.device)
        return _d.add_noise(original_samples, noise, t, self._acp_on(original_samples.device), target="epsilon")[0]

    def get_velocity(self, sample, noise, timesteps):
        t = self._per_sample_timesteps(timesteps, sample.device)
        return _d.add_noise(sample, noise, t, self._acp_on(sample.device), target="v_prediction")[1]

    def scale_model_input(self, sample, timestep=None):
        return sample


class DDPMScheduler(_AlphaBarScheduler):
    """Drop-in for diffusers.DDPMScheduler (variance types fixed_small, fixed_small_log,
    fixed_large; no dynamic thresholding)."""

    order = 1

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, variance_type: str = "fixed_small",
                 clip_sample: bool = True, prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, clip_sample_range: float = 1.0,
                 sample_max_value: float = 1.0, timestep_spacing: str = "leading", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False):
        self._register(locals())
        if variance_type not in ("fixed_small", "fixed_small_log", "fixed_large"):
            _unsupported(type(self), "variance_type", variance_type)
        if thresholding:
            _unsupported(type(self), "thresholding", thresholding)
        _d._check_choice("prediction_type", prediction_type, _d.PREDICTION_TYPES)
        self._init_tables(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                          rescale_betas_zero_snr)
        self.one = torch.tensor(1.0, dtype=torch.float64)
        self.init_noise_sigma = 1.0
        self.custom_timesteps = False
        self.num_inference_steps = None
        self.variance_type = variance_type
        self._set(np.arange(0, num_train_timesteps)[::-1].copy(), None)

    def _set(self, timesteps, device):
        self._timesteps_host = timesteps.astype(np.int64)
        self.timesteps = torch.from_numpy(self._timesteps_host.copy()).to(device)
        prev = np.empty_like(self._timesteps_host)
        if self.custom_timesteps or self.num_inference_steps:
            prev[:-1] = self._timesteps_host[1:]
            prev[-1] = -1
        else:
            prev = self._timesteps_host - 1
        self._prev_of = dict(zip(self._timesteps_host.tolist(), prev.tolist()))
        self._counter = 0

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None):
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("num_inference_steps/timesteps: pass only one of them")
        T = self.config.num_train_timesteps
        if timesteps is not None:
            ts = _schedule_values("timesteps", timesteps, low=0, high=T - 1, integral=True).astype(np.int64)
            if np.any(ts[1:] >= ts[:-1]):
                raise ValueError("timesteps: custom timesteps must be in descending order")
            if ts[0] >= T or ts[-1] < 0:
                raise ValueError(f"timesteps: custom timesteps must lie in [0, {T})")
            self.custom_timesteps = True
            self.num_inference_steps = len(ts)
        else:
            _check_steps(num_inference_steps, T)
            self.custom_timesteps = False
            self.num_inference_steps = num_inference_steps
            ts = _spaced(self.config.timestep_spacing, T, num_inference_steps, self.config.steps_offset)
        self._set(ts, device)

    def previous_timestep(self, timestep):
        t = _int_timestep(_check_timestep(timestep))
        if t not in self._prev_of:
            raise ValueError(f"timestep: {t} is not in the schedule set by set_timesteps")
        return self._prev_of[t]

    def _t_prev(self, timestep):
        if isinstance(timestep, torch.Tensor) and timestep.device.type != "cpu":
            if not (self.custom_timesteps or self.num_inference_steps):
                return timestep, timestep - 1
            i = min(self._counter, len(self._timesteps_host) - 1)
            t = int(self._timesteps_host[i])
            return t, self._prev_of[t]
        if isinstance(timestep, torch.Tensor) and timestep.numel() > 1:
            t = timestep.to(torch.int64)
            prev = torch.tensor([self.previous_timestep(v) for v in t.tolist()], dtype=torch.int64)
            return t, prev
        t = _int_timestep(timestep)
        return t, self.previous_timestep(t)

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True):
        _d._tensor("sample", sample)
        t, prev = self._t_prev(_check_timestep(timestep))
        if isinstance(t, int):
            self._counter = int(np.nonzero(self._timesteps_host == t)[0][0]) + 1
        else:
            self._counter += 1
        t = self._per_sample_timesteps(t, sample.device) if isinstance(t, torch.Tensor) else t
        prev = self._per_sample_timesteps(prev, sample.device) if isinstance(prev, torch.Tensor) else prev
        c = self.config
        prev_sample, x0 = _d.ddpm_step(model_output, sample, t, prev, self._acp_on(sample.device),
                                       prediction_type=c.prediction_type, variance_type=c.variance_type,
                                       clip_sample=c.clip_sample, clip_sample_range=c.clip_sample_range,
                                       generator=generator)
        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample, x0)


class DDIMScheduler(_AlphaBarScheduler):
    """Drop-in for diffusers.DDIMScheduler (no dynamic thresholding)."""

    order = 1

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, clip_sample: bool = True,
                 set_alpha_to_one: bool = True, steps_offset: int = 0, prediction_type: str = "epsilon",
                 thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                 clip_sample_range: float = 1.0, sample_max_value: float = 1.0, timestep_spacing: str = "leading",
                 rescale_betas_zero_snr: bool = False):
        self._register(locals())
        if thresholding:
            _unsupported(type(self), "thresholding", thresholding)
        _d._check_choice("prediction_type", prediction_type, _d.PREDICTION_TYPES)
        self._init_tables(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                          rescale_betas_zero_snr)
        self.final_alpha_cumprod = 1.0 if set_alpha_to_one else float(self.alphas_cumprod[0])
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = torch.from_numpy(np.arange(0, num_train_timesteps)[::-1].copy().astype(np.int64))

    def set_timesteps(self, num_inference_steps: int, device=None):
        T = self.config.num_train_timesteps
        _check_steps(num_inference_steps, T)
        self.num_inference_steps = num_inference_steps
        ts = _spaced(self.config.timestep_spacing, T, num_inference_steps, self.config.steps_offset)
        self.timesteps = torch.from_numpy(ts).to(device)

    def step(self, model_output, timestep, sample, eta: float = 0.0, use_clipped_model_output: bool = False,
             generator=None, variance_noise=None, return_dict: bool = True):
        if self.num_inference_steps is None:
            raise ValueError("num_inference_steps: call set_timesteps before step")
        _d._tensor("sample", sample)
        timestep = _check_timestep(timestep)
        if variance_noise is not None and generator is not None:
            raise ValueError("variance_noise/generator: pass at most one of them")
        ratio = self.config.num_train_timesteps // self.num_inference_steps
        if isinstance(timestep, torch.Tensor) and (timestep.device.type != "cpu" or timestep.numel() > 1):
            t = self._per_sample_timesteps(timestep, sample.device)
            prev = t - ratio  # on the timestep's device, no sync
        else:
            t = _int_timestep(timestep)
            prev = t - ratio
        c = self.config
        prev_sample, x0 = _d.ddim_step(model_output, sample, t, prev, self._acp_on(sample.device), eta=eta,
                                       final_alpha_cumprod=self.final_alpha_cumprod,
                                       prediction_type=c.prediction_type, clip_sample=c.clip_sample,
                                       clip_sample_range=c.clip_sample_range,
                                       use_clipped_model_output=use_clipped_model_output,
                                       noise=variance_noise if eta > 0 else None,
                                       generator=generator if eta > 0 else None)
        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample, x0)


class _SigmaScheduler(SchedulerMixin):
    def _finish(self, sigmas_host, timesteps_host, device):
        """sigmas_host: float32 numpy with the final sigma appended."""
        self.sigmas = torch.from_numpy(sigmas_host.astype(np.float32))  # CPU, as diffusers
        self._sig_views = self.sigmas.unbind()
        self._timesteps_host = np.asarray(timesteps_host, dtype=np.float32)
        self._step_index = None
        self._begin_index = None

    def _sig(self, i):
        return self._sig_views[i]  # 0-d CPU view: a constant for the kernel, no copy


class EulerDiscreteScheduler(_SigmaScheduler, _AlphaBarScheduler):
    """Drop-in for diffusers.EulerDiscreteScheduler (linear / log_linear interpolation,
    Karras sigmas; not exponential or beta sigmas)."""

    order = 1

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, prediction_type: str = "epsilon",
                 interpolation_type: str = "linear", use_karras_sigmas: bool | None = False,
                 use_exponential_sigmas: bool | None = False, use_beta_sigmas: bool | None = False,
                 sigma_min: float | None = None, sigma_max: float | None = None, timestep_spacing: str = "linspace",
                 timestep_type: str = "discrete", steps_offset: int = 0, rescale_betas_zero_snr: bool = False,
                 final_sigmas_type: str = "zero"):
        self._register(locals())
        if use_exponential_sigmas:
            _unsupported(type(self), "use_exponential_sigmas", use_exponential_sigmas)
        if use_beta_sigmas:
            _unsupported(type(self), "use_beta_sigmas", use_beta_sigmas)
        _d._check_choice("prediction_type", prediction_type, _d.PREDICTION_TYPES + ("original_sample",))
        _d._check_choice("interpolation_type", interpolation_type, ("linear", "log_linear"))
        _d._check_choice("final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
        for name, v in (("sigma_min", sigma_min), ("sigma_max", sigma_max)):
            if v is not None:
                _d._check_real(name, v, low=0.0, low_open=True)
        self._init_tables(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                          rescale_betas_zero_snr)
        if rescale_betas_zero_snr:
            self.alphas_cumprod[-1] = 2**-24
        sig = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).numpy()
        self.num_inference_steps = None
        self.use_karras_sigmas = use_karras_sigmas
        ts = np.linspace(0, num_train_timesteps - 1, num_train_timesteps, dtype=float)[::-1].copy()
        self._finish(np.concatenate([sig[::-1], [0.0]]), ts, None)
        self.timesteps = self._timesteps_tensor(self.sigmas, ts, None)
        self.is_scale_input_called = False

    def _continuous(self):
        return self.config.timestep_type == "continuous" and self.config.prediction_type == "v_prediction"

    def _timesteps_tensor(self, sigmas, ts, device):
        if self._continuous():
            vals = (0.25 * np.log(sigmas[:-1].numpy().astype(np.float64))).astype(np.float32)
            self._timesteps_host = vals
            return torch.from_numpy(vals).to(device)
        return torch.from_numpy(np.asarray(ts, dtype=np.float32)).to(device)

    @property
    def init_noise_sigma(self):
        m = float(self.sigmas.max())
        return m if self.config.timestep_spacing in ("linspace", "trailing") else (m * m + 1) ** 0.5

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None, sigmas=None):
        c = self.config
        T = c.num_train_timesteps
        if timesteps is not None or sigmas is not None:
            if num_inference_steps is not None:
                raise ValueError("num_inference_steps/timesteps/sigmas: pass only one of them")
            if timesteps is not None and sigmas is not None:
                raise ValueError("timesteps/sigmas: pass only one of them")
            if self.use_karras_sigmas:
                raise ValueError("timesteps/sigmas: not allowed with use_karras_sigmas")
        acp = self.alphas_cumprod.numpy()
        base = ((1 - acp) / acp) ** 0.5
        log_sigmas = np.log(base)
        if sigmas is not None:
            sig = _schedule_values("sigmas", sigmas, low=0.0, min_len=2).astype(np.float32)
            ts = np.array([_sigma_to_t(s, log_sigmas) for s in sig[:-1]])
            self.num_inference_steps = len(sig) - 1
        else:
            if timesteps is not None:
                ts = _schedule_values("timesteps", timesteps, low=0, high=T - 1).astype(np.float32)
                n = len(ts)
            else:
                _check_steps(num_inference_steps, T)
                n = num_inference_steps
                if c.timestep_spacing == "linspace":
                    ts = np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
                else:
                    ts = _spaced(c.timestep_spacing, T, n, c.steps_offset, dtype=np.float32)
            self.num_inference_steps = n
            if c.interpolation_type == "linear":
                sig = np.interp(ts, np.arange(0, len(base)), base)
            else:
                sig = torch.linspace(np.log(base[-1]), np.log(base[0]), n + 1).exp().numpy()
            if self.use_karras_sigmas:
                smin = c.sigma_min if c.sigma_min is not None else float(sig[-1])
                smax = c.sigma_max if c.sigma_max is not None else float(sig[0])
                sig = _karras(smin, smax, n)
                ts = np.array([_sigma_to_t(s, log_sigmas) for s in sig])
            last = float(base[0]) if c.final_sigmas_type == "sigma_min" else 0.0
            sig = np.concatenate([sig, [last]]).astype(np.float32)
        self._finish(sig, ts, device)
        self.timesteps = self._timesteps_tensor(self.sigmas, ts, device)

    def scale_model_input(self, sample, timestep):
        s = float(self.sigmas[self._current_step(timestep)])
        self.is_scale_input_called = True
        return sample / ((s * s + 1) ** 0.5)

    def step(self, model_output, timestep, sample, s_churn: float = 0.0, s_tmin: float = 0.0,
             s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None, return_dict: bool = True):
        if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()):
            raise ValueError("timestep: pass one of scheduler.timesteps, not an integer index")
        i = self._current_step(timestep)
        pred = "sample" if self.config.prediction_type == "original_sample" else self.config.prediction_type
        prev, x0 = _d.euler_step(model_output, sample, self._sig(i), self._sig(i + 1), prediction_type=pred,
                                 s_churn=s_churn, num_inference_steps=len(self.sigmas) - 1, s_tmin=s_tmin,
                                 s_tmax=s_tmax, s_noise=s_noise, generator=generator if s_churn > 0 else None)
        self._step_index += 1
        if not return_dict:
            return prev, x0
        return SchedulerOutput(prev, x0)

    def add_noise(self, original_samples, noise, timesteps):
        _d._tensor("original_samples", original_samples)
        idx, found = self._indices_on_device(timesteps, original_samples.device)
        sigma = self.sigmas.to(original_samples.device, original_samples.dtype)[idx]
        sigma = torch.where(found, sigma, torch.nan)  # a device timestep outside the schedule
        sigma = sigma.reshape(-1, *([1] * (original_samples.dim() - 1)))
        return original_samples + noise * sigma


class FlowMatchEulerDiscreteScheduler(_SigmaScheduler):
    """Drop-in for diffusers.FlowMatchEulerDiscreteScheduler (static or dynamic shift,
    shift_terminal, invert_sigmas, stochastic sampling; not Karras / exponential / beta
    sigmas, not per-token timesteps)."""

    order = 1

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, use_dynamic_shifting: bool = False,
                 base_shift: float | None = 0.5, max_shift: float | None = 1.15, base_image_seq_len: int = 256,
                 max_image_seq_len: int = 4096, invert_sigmas: bool = False, shift_terminal: float | None = None,
                 use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False,
                 use_beta_sigmas: bool = False, time_shift_type: str = "exponential",
                 stochastic_sampling: bool = False):
        self._register(locals())
        for name in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
            if self.config[name]:
                _unsupported(type(self), name, True)
        _d._check_choice("time_shift_type", time_shift_type, ("exponential", "linear"))
        num_train_timesteps = _d._check_pos_int("num_train_timesteps", num_train_timesteps)
        shift = _d._check_real("shift", shift, low=0.0, low_open=True)
        if shift_terminal:  # None or 0: off
            _d._check_real("shift_terminal", shift_terminal, low=0.0, high=1.0)
            if shift_terminal >= 1.0:
                raise ValueError(f"shift_terminal: expected a value in (0, 1), got {shift_terminal}")
        ts = np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1].copy()
        sig = ts / num_train_timesteps
        if not use_dynamic_shifting:
            sig = shift * sig / (1 + (shift - 1) * sig)
        self._shift = shift
        self.sigmas = torch.from_numpy(sig.astype(np.float32))
        self.timesteps = self.sigmas * num_train_timesteps
        self._timesteps_host = self.timesteps.numpy().copy()
        self._sigmas_host = self.sigmas
        self._sig_views = self.sigmas.unbind()
        self.sigma_min = float(sig[-1])
        self.sigma_max = float(sig[0])
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self._step_index = None
        self._begin_index = None

    @property
    def shift(self):
        return self._shift

    def set_shift(self, shift: float):
        self._shift = _d._check_real("shift", shift, low=0.0, low_open=True)

    def time_shift(self, mu: float, sigma: float, t):
        if self.config.time_shift_type == "exponential":
            return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)
        return mu / (mu + (1 / t - 1) ** sigma)

    def stretch_shift_to_terminal(self, t):
        one_minus_z = 1 - t
        scale = one_minus_z[-1] / (1 - self.config.shift_terminal)
        return 1 - (one_minus_z / scale)

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas=None, mu=None,
                      timesteps=None):
        c = self.config
        if c.use_dynamic_shifting and mu is None:
            raise ValueError("mu: required when use_dynamic_shifting is True")
        if mu is not None:
            mu = _d._check_real("mu", mu, low=-_MAX_MU, high=_MAX_MU)  # exp(mu) stays finite
        if sigmas is not None:
            sigmas = _schedule_values("sigmas", sigmas, low=0.0, high=1.0)
        if timesteps is not None:
            timesteps = _schedule_values("timesteps", timesteps, low=0.0, high=float(c.num_train_timesteps))
        if sigmas is not None and timesteps is not None and len(sigmas) != len(timesteps):
            raise ValueError("sigmas/timesteps: expected the same length")
        if num_inference_steps is None:
            if sigmas is None and timesteps is None:
                raise ValueError("num_inference_steps: pass it, or sigmas / timesteps")
            num_inference_steps = len(sigmas) if sigmas is not None else len(timesteps)
        else:
            _check_steps(num_inference_steps, c.num_train_timesteps)
            for name, v in (("sigmas", sigmas), ("timesteps", timesteps)):
                if v is not None and len(v) != num_inference_steps:
                    raise ValueError(f"{name}: expected {num_inference_steps} values (num_inference_steps)")
        self.num_inference_steps = num_inference_steps
        given_ts = timesteps is not None
        if given_ts:
            timesteps = np.array(timesteps).astype(np.float32)
        if sigmas is None:
            if timesteps is None:
                T = c.num_train_timesteps
                timesteps = np.linspace(self.sigma_max * T, self.sigma_min * T, num_inference_steps)
            sig = timesteps / c.num_train_timesteps
        else:
            sig = np.array(sigmas).astype(np.float32)
        if c.use_dynamic_shifting:
            sig = self.time_shift(mu, 1.0, sig)
        else:
            sig = self.shift * sig / (1 + (self.shift - 1) * sig)
        if c.shift_terminal:
            sig = self.stretch_shift_to_terminal(sig)
        sig = np.asarray(sig, dtype=np.float32)
        ts = timesteps.astype(np.float32) if given_ts else (sig * c.num_train_timesteps).astype(np.float32)
        if c.invert_sigmas:
            sig = (1.0 - sig).astype(np.float32)
            ts = (sig * c.num_train_timesteps).astype(np.float32)
            sig = np.concatenate([sig, [1.0]]).astype(np.float32)
        else:
            sig = np.concatenate([sig, [0.0]]).astype(np.float32)
        self._sigmas_host = torch.from_numpy(sig)
        self._sig_views = self._sigmas_host.unbind()
        self.sigmas = self._sigmas_host.to(device)
        self._timesteps_host = ts
        self.timesteps = torch.from_numpy(ts.copy()).to(device)
        self._step_index = None
        self._begin_index = None

    def _sig(self, i):
        return self._sig_views[i]

    def scale_model_input(self, sample, timestep=None):
        return sample

    def scale_noise(self, sample, timestep, noise=None):
        """x_t = sigma noise + (1 - sigma) sample, sigma looked up per timestep."""
        if isinstance(timestep, torch.Tensor) and timestep.device.type != "cpu":
            idx, found = self._indices_on_device(timestep, sample.device)
            sigma = torch.where(found, self.sigmas.to(sample.device)[idx], torch.nan)
        else:
            ts = timestep.reshape(-1).tolist() if isinstance(timestep, torch.Tensor) else [timestep]
            if self._begin_index is not None:
                i = self._step_index if self._step_index is not None else self._begin_index
                ids = [i] * len(ts)
            else:
                ids = [self._lookup(t) for t in ts]
            sigma = self._sigmas_host[ids]
            if sigma.numel() > 1:
                sigma = sigma.to(sample.device)
        if sigma.numel() == 1 and sample.shape[0] != 1:
            sigma = sigma.reshape(())
        return _d.add_noise(sample, noise, sigma, target="flow")[0]

    def step(self, model_output, timestep, sample, s_churn: float = 0.0, s_tmin: float = 0.0,
             s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None, per_token_timesteps=None,
             return_dict: bool = True):
        if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()):
            raise ValueError("timestep: pass one of scheduler.timesteps, not an integer index")
        if per_token_timesteps is not None:
            _unsupported(type(self), "per_token_timesteps", "a tensor")
        i = self._current_step(timestep)
        stochastic = bool(self.config.stochastic_sampling)
        prev, _ = _d.flow_match_step(model_output, sample, self._sig(i), self._sig(i + 1), stochastic=stochastic,
                                     generator=generator if stochastic else None, return_x0=False)
        self._step_index += 1
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev)


class DPMSolverMultistepScheduler(_SigmaScheduler, _AlphaBarScheduler):
    """Drop-in for diffusers.DPMSolverMultistepScheduler with algorithm_type "dpmsolver++" or
    "sde-dpmsolver++", solver_order 1 or 2 (DPM-Solver++ 2M), midpoint or heun, Karras or
    flow sigmas."""

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, solver_order: int = 2,
                 prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
                 algorithm_type: str = "dpmsolver++", solver_type: str = "midpoint", lower_order_final: bool = True,
                 euler_at_final: bool = False, use_karras_sigmas: bool | None = False,
                 use_exponential_sigmas: bool | None = False, use_beta_sigmas: bool | None = False,
                 use_lu_lambdas: bool | None = False, use_flow_sigmas: bool | None = False, flow_shift: float = 1.0,
                 final_sigmas_type: str = "zero", lambda_min_clipped: float = -float("inf"),
                 variance_type: str | None = None, timestep_spacing: str = "linspace", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False, use_dynamic_shifting: bool = False,
                 time_shift_type: str = "exponential"):
        self._register(locals())
        if solver_order not in (1, 2):
            _unsupported(type(self), "solver_order", solver_order)
        if algorithm_type not in ("dpmsolver++", "sde-dpmsolver++"):
            _unsupported(type(self), "algorithm_type", algorithm_type)
        if solver_type not in ("midpoint", "heun"):
            _unsupported(type(self), "solver_type", solver_type)
        for name in ("thresholding", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas"):
            if self.config[name]:
                _unsupported(type(self), name, True)
        if variance_type is not None:
            _unsupported(type(self), "variance_type", variance_type)
        _d._check_choice("prediction_type", prediction_type, _d.PREDICTION_TYPES + ("flow_prediction",))
        _d._check_choice("final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
        _d._check_real("flow_shift", flow_shift, low=0.0, low_open=True)
        self._init_tables(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                          rescale_betas_zero_snr)
        if rescale_betas_zero_snr:
            self.alphas_cumprod[-1] = 2**-24
        self.alpha_t = torch.sqrt(self.alphas_cumprod)
        self.sigma_t = torch.sqrt(1 - self.alphas_cumprod)
        self.lambda_t = torch.log(self.alpha_t) - torch.log(self.sigma_t)
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        ts = np.linspace(0, num_train_timesteps - 1, num_train_timesteps, dtype=np.float32)[::-1].copy()
        self.timesteps = torch.from_numpy(ts)
        self._finish((((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).numpy(), ts, None)
        self.model_outputs = [None] * solver_order
        self.lower_order_nums = 0

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, mu=None, timesteps=None):
        c = self.config
        if mu is not None:
            if not (c.use_dynamic_shifting and c.time_shift_type == "exponential"):
                raise ValueError("mu: only with use_dynamic_shifting and time_shift_type 'exponential'")
            mu = _d._check_real("mu", mu, low=-_MAX_MU, high=_MAX_MU)
            self.register_to_config(flow_shift=float(np.exp(mu)))
            c = self.config
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("num_inference_steps/timesteps: pass exactly one of them")
        if timesteps is not None and c.use_karras_sigmas:
            raise ValueError("timesteps: not allowed with use_karras_sigmas")
        T = c.num_train_timesteps
        if timesteps is not None:
            ts = _schedule_values("timesteps", timesteps, low=0, high=T - 1, integral=True).astype(np.int64)
            n = len(ts)
        else:
            _check_steps(num_inference_steps, T)
            n = num_inference_steps
            clipped = int(torch.searchsorted(torch.flip(self.lambda_t, [0]), c.lambda_min_clipped))
            last = T - clipped
            if c.timestep_spacing == "linspace":
                ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
            elif c.timestep_spacing == "leading":
                ratio = last // (n + 1)
                ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + c.steps_offset
            elif c.timestep_spacing == "trailing":
                ts = np.arange(last, 0, -T / n).round().copy().astype(np.int64) - 1
            else:
                raise ValueError(f"timestep_spacing: expected 'linspace', 'leading' or 'trailing', got "
                                 f"{c.timestep_spacing!r}")
        acp = self.alphas_cumprod.numpy()
        base = ((1 - acp) / acp) ** 0.5
        log_sigmas = np.log(base)
        if c.use_karras_sigmas:
            sig = _karras(float(base[0]), float(base[-1]), n)
            ts = np.array([_sigma_to_t(s, log_sigmas) for s in sig])
            if c.beta_schedule != "squaredcos_cap_v2":
                ts = ts.round()
        elif c.use_flow_sigmas:
            alphas = np.linspace(1, 1 / T, n + 1)
            sig = 1.0 - alphas
            sig = np.flip(c.flow_shift * sig / (1 + (c.flow_shift - 1) * sig))[:-1].copy()
            ts = (sig * T).copy()
        else:
            sig = np.interp(ts, np.arange(0, len(base)), base)
        last_sigma = float(base[0]) if c.final_sigmas_type == "sigma_min" else 0.0
        sig = np.concatenate([sig, [last_sigma]]).astype(np.float32)
        ts = np.asarray(ts).astype(np.int64)
        self._finish(sig, ts, device)
        self.timesteps = torch.from_numpy(ts).to(device)
        self.num_inference_steps = len(ts)
        self.model_outputs = [None] * c.solver_order
        self.lower_order_nums = 0

    def scale_model_input(self, sample, *args, **kwargs):
        return sample

    def step(self, model_output, timestep, sample, generator=None, variance_noise=None, return_dict: bool = True):
        if self.num_inference_steps is None:
            raise ValueError("num_inference_steps: call set_timesteps before step")
        i = self._current_step(timestep)
        c = self.config
        n = len(self.timesteps)
        lower_final = i == n - 1 and (c.euler_at_final or (c.lower_order_final and n < 15)
                                      or c.final_sigmas_type == "zero")
        first = c.solver_order == 1 or self.lower_order_nums < 1 or lower_final
        sde = c.algorithm_type == "sde-dpmsolver++"
        kw = dict(prediction_type=c.prediction_type, algorithm_type=c.algorithm_type, solver_type=c.solver_type,
                  flow_sigmas=bool(c.use_flow_sigmas), noise=variance_noise if sde else None,
                  generator=generator if (sde and variance_noise is None) else None)
        if first:
            prev, x0 = _d.dpmpp_2m_step(model_output, sample, self._sig(i), self._sig(i + 1), **kw)
        else:
            prev, x0 = _d.dpmpp_2m_step(model_output, sample, self._sig(i), self._sig(i + 1),
                                        prev_x0=self.model_outputs[-1], sigma_prev=self._sig(i - 1), **kw)
        self.model_outputs = self.model_outputs[1:] + [x0]
        if self.lower_order_nums < c.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev)

    def add_noise(self, original_samples, noise, timesteps):
        _d._tensor("original_samples", original_samples)
        idx, found = self._indices_on_device(timesteps, original_samples.device)
        sigma = self.sigmas.to(original_samples.device, original_samples.dtype)[idx]
        sigma = torch.where(found, sigma, torch.nan)  # a device timestep outside the schedule
        sigma = sigma.reshape(-1, *([1] * (original_samples.dim() - 1)))
        if self.config.use_flow_sigmas:
            alpha_t, sigma_t = 1 - sigma, sigma
        else:
            alpha_t = 1 / (sigma**2 + 1) ** 0.5
            sigma_t = sigma * alpha_t
        return alpha_t * original_samples + sigma_t * noise


_register_with_diffusers()
