"""Turn a pytest-benchmark JSON file into a markdown table of ratios and a PNG plot.

    python -m pretrain_kernels.bench.report build/bench.json --out benchmarks/results/<name>

(pk-bench calls write() with the machine description and the skipped alternatives.)

Within each benchmark group (same op, shape and device) every implementation is compared
with the package's own (extra_info.baseline = True): "speedup" = their median time / ours.
Where extra_info has `bytes` or `flops`, achieved GB/s or TFLOP/s are shown too.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
from collections import defaultdict


def load(path):
    with open(path) as f:
        data = json.load(f)
    rows = []
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        rows.append(dict(group=b.get("group") or b["name"], name=b["name"], impl=info.get("impl", _impl(b["name"])),
                         baseline=bool(info.get("baseline")), median=b["stats"]["median"],
                         bytes=info.get("bytes"), flops=info.get("flops"), info=info))
    # Suites that name the implementation only in the test name (test_<what>_<impl>[params]):
    # the package's own row of a group is the baseline of its ratios.
    by_group = defaultdict(list)
    for r in rows:
        by_group[r["group"]].append(r)
    for rs in by_group.values():
        if not any(r["baseline"] for r in rs):
            for r in rs:
                r["baseline"] = r["impl"] == "pk"
    return data.get("machine_info", {}), rows


def _impl(name: str) -> str:
    """test_filtered_pk[cpu-B1-V32000] -> pk; test_plain_softmax_multinomial[...] -> softmax_multinomial
    (the words after the second underscore-separated part, without the parameters)."""
    base = name.split("[", 1)[0]
    parts = base.split("_")
    return "_".join(parts[2:]) if len(parts) > 2 and parts[0] == "test" else base


def table(rows) -> str:
    groups = defaultdict(list)
    for r in rows:
        groups[r["group"]].append(r)
    lines = ["| group | implementation | median | throughput | pretrain-kernels speedup |",
             "|---|---|---:|---:|---:|"]
    for g in sorted(groups):
        rs = sorted(groups[g], key=lambda r: (not r["baseline"], r["median"]))
        base = next((r for r in rs if r["baseline"]), None)
        for r in rs:
            t = r["median"]
            tt = f"{t * 1e3:.3f} ms" if t >= 1e-3 else f"{t * 1e6:.1f} us"
            thr = ""
            if r["flops"]:
                thr = f"{r['flops'] / t / 1e12:.2f} TFLOP/s" if r["flops"] / t > 1e12 else f"{r['flops'] / t / 1e9:.1f} GFLOP/s"
            elif r["bytes"]:
                thr = f"{r['bytes'] / t / 1e9:.1f} GB/s"
            ratio = "1.00 (ours)" if r is base else (f"{t / base['median']:.2f}x" if base else "")
            lines.append(f"| {g} | {r['impl']} | {tt} | {thr} | {ratio} |")
    return "\n".join(lines)


def plot(rows, png):
    if not rows:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    groups = defaultdict(list)
    for r in rows:
        groups[r["group"]].append(r)
    names = sorted(groups)
    fig, ax = plt.subplots(figsize=(10, 0.5 + 0.45 * sum(len(groups[g]) for g in names)))
    y, labels, colors, vals = 0, [], [], []
    for g in names:
        base = next((r for r in groups[g] if r["baseline"]), None)
        for r in sorted(groups[g], key=lambda r: r["median"]):
            vals.append(r["median"] / base["median"] if base else 1.0)
            labels.append(f"{g} | {r['impl']}")
            colors.append("tab:green" if r["baseline"] else "tab:gray")
            y += 1
    ax.barh(range(len(vals)), vals, color=colors)
    ax.set_yticks(range(len(vals)), labels, fontsize=7)
    ax.set_xscale("log")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xlabel("time relative to pretrain-kernels (log scale; > 1 means the alternative is slower)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    return True


def render(rows, title, machine_md, notes=()) -> str:
    """The report: a title, the machine description (Markdown lines), notes, the table."""
    md = f"# {title}\n\n{machine_md}\n"
    if notes:
        md += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    return md + "\n" + table(rows) + "\n"


def write(rows, prefix, md) -> str:
    """<prefix>.md (with the plot linked when matplotlib drew <prefix>.png); returns the text."""
    os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
    if plot(rows, prefix + ".png"):
        md += f"\n![plot]({os.path.basename(prefix)}.png)\n"
    with open(prefix + ".md", "w") as f:
        f.write(md)
    return md


def _pytest_machine_md(machine, rows) -> str:
    cpu = machine.get("cpu", {}).get("brand_raw", platform.processor())
    md = f"machine: {machine.get('node', '')} {cpu}, {machine.get('cpu', {}).get('count', '?')} logical CPUs, " \
         f"python {machine.get('python_version', '')}"
    gpu = next((r["info"].get("gpu") for r in rows if r["info"].get("gpu")), None)
    return md + (f"\nGPU: {gpu}" if gpu else "")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("json")
    ap.add_argument("--out", default=None, help="path prefix for <out>.md and <out>.png")
    ap.add_argument("--title", default=None)
    args = ap.parse_args(argv)
    machine, rows = load(args.json)
    md = render(rows, args.title or "Benchmark report", _pytest_machine_md(machine, rows))
    print(md)
    if args.out:
        write(rows, args.out, md)


if __name__ == "__main__":
    main()
