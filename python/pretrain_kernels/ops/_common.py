"""Helpers shared by the op wrappers: seeds, argument checks."""
from __future__ import annotations

import numbers

import torch

_SEED_HIGH = 2**62


def resolve_seed(seed, generator, device: torch.device) -> torch.Tensor:
    """The op's seed as a one-element int64 tensor.

    - an int: used as is (any value in [-2**63, 2**64));
    - a tensor (one integer element, on the CPU or on the input's device): used as is (as
      int64, so an unsigned 64-bit value keeps its bits), so a seed that lives on the GPU can
      change between CUDA-graph replays;
    - None: drawn from `generator`, or from torch's default CPU generator, so that
      torch.manual_seed makes runs reproducible. A CUDA generator gives a seed on the GPU
      (no host sync).
    """
    if seed is not None and generator is not None:
        raise ValueError("seed and generator: pass at most one of them")
    if seed is None:
        if generator is None:
            return torch.randint(0, _SEED_HIGH, (1,), dtype=torch.int64)
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
        if generator.device.type != "cpu" and generator.device != device:
            raise ValueError(f"generator: expected a CPU generator or one on {device}, got one on {generator.device}")
        return torch.randint(0, _SEED_HIGH, (1,), dtype=torch.int64, generator=generator, device=generator.device)
    if isinstance(seed, torch.Tensor):
        if seed.dtype.is_floating_point or seed.dtype == torch.bool or seed.is_complex():
            raise TypeError(f"seed: expected an integer tensor, got {seed.dtype}")
        if seed.numel() != 1:
            raise ValueError(f"seed: expected one element, got a tensor of shape {tuple(seed.shape)}")
        if seed.device.type != "cpu" and seed.device != device:
            raise ValueError(f"seed: expected a CPU tensor or one on {device}, got {seed.device}")
        return seed.reshape(1).to(torch.int64)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed: expected an int, a one-element integer tensor or None, got {type(seed).__name__}")
    seed = int(seed)
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed: expected a value in [-2**63, 2**64), got {seed}")
    if seed >= 2**63:
        seed -= 2**64  # same 64 bits, as a signed int64
    return torch.tensor([seed], dtype=torch.int64)


def check_prob(name: str, value, *, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    v = float(value)
    ok = (0.0 < v <= 1.0) if low_open else (0.0 <= v <= 1.0)
    if not ok:
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise ValueError(f"{name}: expected a probability in {interval}, got {value}")
    return v


def check_int(name: str, value, *, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    v = int(value)
    if low is not None and v < low:
        raise ValueError(f"{name}: expected >= {low}, got {v}")
    if high is not None and v >= high:
        raise ValueError(f"{name}: expected < {high}, got {v}")
    return v


def check_same_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the device of input_ids), got {t.device}")


def is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - torch < 2.3
        return False
