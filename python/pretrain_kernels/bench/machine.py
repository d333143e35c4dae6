"""The description of the machine a benchmark ran on: CPU model, cores, threads, GPUs, torch
and CUDA versions, the package's build_info and the alternatives installed beside it."""
from __future__ import annotations

import os
import platform

import torch

from pretrain_kernels.bench.common import ALTERNATIVES, version


def _cpuinfo_fields():
    """(model name, physical cores) from /proc/cpuinfo, or (None, None) where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return None, None
    model, cores, phys, core = None, set(), None, None
    for line in text.splitlines() + [""]:
        key, _, val = line.partition(":")
        key, val = key.strip(), val.strip()
        if key == "model name" and model is None:
            model = val
        elif key == "physical id":
            phys = val
        elif key == "core id":
            core = val
        elif not key:  # end of one logical CPU's block
            if core is not None:
                cores.add((phys, core))
            phys, core = None, None
    return model, (len(cores) or None)


def describe() -> dict:
    import pretrain_kernels as pk

    model, physical = _cpuinfo_fields()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append(dict(name=p.name, memory_gib=round(p.total_memory / 2**30, 1),
                             capability=f"{p.major}.{p.minor}", multiprocessors=p.multi_processor_count))
    return dict(
        cpu=model or platform.processor() or platform.machine(),
        physical_cores=physical,
        logical_cpus=os.cpu_count(),
        usable_cpus=usable,
        torch_threads=torch.get_num_threads(),
        gpus=gpus,
        os=platform.platform(),
        python=platform.python_version(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        pretrain_kernels=pk.__version__,
        build_info=pk.build_info(),
        alternatives={name: version(name) for name in ALTERNATIVES},
    )


def markdown(m: dict) -> str:
    """The description as a few Markdown lines."""
    lines = [f"- CPU: {m['cpu']}, {m['physical_cores'] or '?'} cores, {m['logical_cpus']} logical CPUs "
             f"({m['usable_cpus']} usable), torch threads {m['torch_threads']}"]
    for g in m["gpus"] or [None]:
        lines.append(f"- GPU: {g['name']}, {g['memory_gib']} GiB, sm_{g['capability'].replace('.', '')}"
                     if g else "- GPU: none")
    lines.append(f"- torch {m['torch']}, CUDA {m['cuda'] or 'none'}, python {m['python']}, {m['os']}")
    info = ", ".join(f"{k}={v}" for k, v in m["build_info"].items())
    lines.append(f"- pretrain-kernels {m['pretrain_kernels']}: {info}")
    have = [f"{k} {v}" for k, v in m["alternatives"].items() if v]
    missing = [k for k, v in m["alternatives"].items() if not v]
    lines.append(f"- alternatives installed: {', '.join(have) or 'none'}; not installed: {', '.join(missing) or 'none'}")
    return "\n".join(lines)
