"""pk-bench: run the benchmark suite of the installed package on this machine.

    pk-bench [family ...] [--device cpu|cuda] [--quick] [--out DIR] [-k EXPR] [--threads N]
             [--list] [-- <pytest options>]

Runs pytest with pytest-benchmark on the package's bench_<family>.py files (all families when
none is named) and writes to DIR (default ./pk-bench-results):
  bench.json    pytest-benchmark's JSON (every timing, its extra_info)
  report.md     the machine description, the alternatives skipped, and the table: within each
                group (one op, shape and device) every implementation's median and its time
                relative to the package's
  report.png    the same ratios as a plot (when matplotlib is installed)
  machine.json  CPU model, cores, threads, GPUs, torch / CUDA versions, the package's
                build_info, the versions of the alternatives installed
The exit status is pytest's (0: every selected benchmark ran or skipped).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import tempfile

from pretrain_kernels.bench import HERE, families, select

INSTALL_HINT = ('pk-bench needs pytest-benchmark (and pytest): pip install "pretrain-kernels[bench]"  '
                '(or: pip install pytest-benchmark matplotlib)')

PYTEST_INI = """[pytest]
python_files = bench_*.py
python_functions = test_*
addopts =
"""


def _parser():
    ap = argparse.ArgumentParser(prog="pk-bench", description="Benchmark pretrain-kernels against the "
                                 "alternatives installed on this machine (pytest-benchmark).",
                                 epilog="Options after `--` go to pytest unchanged.")
    ap.add_argument("families", nargs="*", metavar="family",
                    help="which suites to run (bench_<family>*.py); all when none is named; see --list")
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None,
                    help="the device whose cases run (default: cuda when a GPU and a CUDA build are there, "
                         "else cpu)")
    ap.add_argument("--quick", action="store_true",
                    help="fewer sizes and rounds, timed cases only (under two minutes on 2 idle CPU cores)")
    ap.add_argument("--out", default="pk-bench-results", help="output folder (default: %(default)s)")
    ap.add_argument("-k", dest="filter", default=None, help="only the cases matching this pytest -k expression")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads for the run")
    ap.add_argument("--list", action="store_true", help="list the families and the alternatives, then exit")
    return ap


def _list():
    from pretrain_kernels.bench.common import ALTERNATIVES, version
    print("families:")
    for fam, path in families().items():
        print(f"  {fam:16s} {path.name}")
    print("alternatives:")
    for name, alt in ALTERNATIVES.items():
        v = version(name)
        print(f"  {name:14s} {('installed ' + v) if v else 'not installed (pip install ' + alt.dist + ')':46s} "
              f"{'/'.join(alt.devices)}: {alt.compared_on}")


def skipped_alternatives(skip_lines):
    """The alternatives some benchmark of the run skipped without, as report lines."""
    from pretrain_kernels.bench.common import ALTERNATIVES, skip_message
    out = []
    for name, alt in ALTERNATIVES.items():
        if skip_message(name) in skip_lines:
            out.append(f"skipped: {name} not installed (pip install {alt.dist})")
        broken = next((s for s in skip_lines if s.startswith(f"{name} does not import")), None)
        if broken:
            out.append(f"skipped: {broken}")
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = _parser()
    args = ap.parse_args(argv)
    if args.list:
        _list()
        return 0
    try:
        files = select(args.families)
    except ValueError as e:
        ap.error(str(e))
    if importlib.util.find_spec("pytest") is None or importlib.util.find_spec("pytest_benchmark") is None:
        print(INSTALL_HINT, file=sys.stderr)
        return 2

    import torch

    from pretrain_kernels.bench import machine, report
    from pretrain_kernels.bench.common import gpu_usable

    device = args.device or ("cuda" if gpu_usable() else "cpu")
    if device == "cuda" and not gpu_usable():
        print("pk-bench --device cuda: no usable GPU here (torch.cuda.is_available() is "
              f"{torch.cuda.is_available()}, the extension is built with_cuda="
              f"{__import__('pretrain_kernels').build_info()['with_cuda']})", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bench_json, skips = out / "bench.json", out / "skips.txt"
    for p in (bench_json, skips):
        p.unlink(missing_ok=True)
    env = dict(os.environ, PK_BENCH_DEVICE=device, PK_BENCH_SKIPS=str(skips.resolve()),
               PK_BENCH_QUICK="1" if args.quick else "0", PYTHONUNBUFFERED="1")
    # the suites import the same package as this process, installed or not
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent.parent)] + [p for p in [env.get("PYTHONPATH")] if p])
    if args.threads:
        env["PK_BENCH_THREADS"] = str(args.threads)

    with tempfile.TemporaryDirectory(prefix="pk-bench-") as tmp:
        ini = pathlib.Path(tmp) / "pytest.ini"  # the suites' own settings, not those of the folder run from
        ini.write_text(PYTEST_INI)
        cmd = [sys.executable, "-m", "pytest", *map(str, files), "-c", str(ini), "--rootdir", str(HERE),
               "--confcutdir", str(HERE), "-p", "no:cacheprovider", "-q", "-rs",
               f"--benchmark-json={bench_json}", "--benchmark-columns=median,rounds"]
        if args.quick:  # and without the suites' checks that the contenders compute the same
            cmd += ["--benchmark-max-time=0.1", "--benchmark-min-rounds=3", "--benchmark-only"]
        if args.filter:
            cmd += ["-k", args.filter]
        cmd += extra
        print(f"pk-bench: {', '.join(p.stem for p in files)} on {device}{' (quick)' if args.quick else ''}",
              flush=True)
        rc = subprocess.call(cmd, env=env)

    desc = machine.describe()
    (out / "machine.json").write_text(json.dumps(desc, indent=2) + "\n")
    skip_lines = set(skips.read_text().splitlines()) if skips.exists() else set()
    skips.unlink(missing_ok=True)
    notes = skipped_alternatives(skip_lines)
    print()
    for line in notes:
        print(line)
    if not bench_json.exists():
        print(f"pk-bench: pytest wrote no results (exit status {rc})", file=sys.stderr)
        return rc or 1
    _, rows = report.load(bench_json)
    title = f"pk-bench: {', '.join(p.stem[len('bench_'):] for p in files)} on {device}" + \
            (" (quick)" if args.quick else "")
    md = report.render(rows, title, machine.markdown(desc), notes)
    report.write(rows, str(out / "report"), md)
    print(report.table(rows))
    print(f"\npk-bench: wrote {out}/report.md, report.png, machine.json, bench.json")
    return rc


if __name__ == "__main__":
    sys.exit(main())
