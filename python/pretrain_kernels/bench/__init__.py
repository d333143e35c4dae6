"""The microbenchmark suite, shipped with the package: each op against what a user would run
instead, on the same inputs, on the user's machine.

    pk-bench [family ...] [--device cpu|cuda] [--quick] [--out DIR] [-k EXPR]
    python -m pretrain_kernels.bench ...         (the same)

Needs pytest-benchmark (`pip install "pretrain-kernels[bench]"`). See cli.py for what it
writes; report.py turns a pytest-benchmark JSON file into the table and the plot.

Families are found by file name: every `bench_<family>.py` in this folder is one, and a family
name on the command line selects `bench_<family>.py` and `bench_<family>_*.py` (so "attention"
takes bench_attention.py and bench_attention_cuda.py). Adding a family is adding one file:

- name it `bench_<family>.py`; its tests are pytest-benchmark tests (`benchmark` fixture);
- put the device in a `device` or `bench_device` parameter (the `bench_device` fixture gives
  cpu and cuda) or mark GPU-only tests `pytest.mark.cuda`, so that --device selects them;
- set `benchmark.group` (one group = one comparison) and `benchmark.extra_info` with `impl`
  and `baseline=True` on the package's own row (optionally `bytes` or `flops` for a
  throughput column); report.py computes every other row's ratio to the baseline;
- take sizes and rounds through common.quick() / common.rounds(), so --quick stays short;
- import an alternative library through common.require("<name>") (names in
  common.ALTERNATIVES; add a new library there), which skips with "<name> not installed"
  when it is missing.
"""
from __future__ import annotations

import pathlib

HERE = pathlib.Path(__file__).resolve().parent


def families() -> dict[str, pathlib.Path]:
    """family name -> file, for every bench_<family>.py in this folder."""
    return {p.stem[len("bench_"):]: p for p in sorted(HERE.glob("bench_*.py"))}


def select(names) -> list[pathlib.Path]:
    """The files of the named families (all of them when none is named); a name matches
    bench_<name>.py and bench_<name>_*.py. Raises ValueError for a name that matches nothing."""
    fams = families()
    if not names:
        return list(fams.values())
    out = []
    for name in names:
        hits = [p for fam, p in fams.items() if fam == name or fam.startswith(name + "_")]
        if not hits:
            raise ValueError(f"unknown benchmark family {name!r}; the families are: {', '.join(fams)}")
        out += [p for p in hits if p not in out]
    return out
