"""Per-kernel resource use of the CUDA build, from ptxas' report: registers, spill bytes, static
shared memory. Needs no GPU; it reads the log of a build made with PK_PTXAS_VERBOSE=1:

    PK_PTXAS_VERBOSE=1 PK_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 python setup.py build_ext --inplace > build.log 2>&1
    python scripts/cuda_resources.py build.log [--filter attention]

Registers near 255 or any spill in a hot kernel are worth a look before a GPU run; dynamic
shared memory is set at launch and does not appear here."""
import argparse
import re
import shutil
import subprocess
import sys


def demangle(names):
    tool = shutil.which("c++filt")
    if tool is None:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return out if len(out) == len(names) else names


def short(name):
    name = re.sub(r"pk::attention::cuda::|pk::\w+::|\(anonymous namespace\)::", "", name)
    name = name.replace("__nv_bfloat16", "bf16").replace("__half", "f16").replace("void ", "")
    return name.split("(")[0]


def parse(text):
    rows, cur = {}, None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'", line)
        if m:
            cur = (m.group(1), m.group(2))
            rows[cur] = {}
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            rows[cur].update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            rows[cur]["regs"] = int(m.group(1))
            m2 = re.search(r"(\d+) bytes smem", line)
            rows[cur]["smem"] = int(m2.group(1)) if m2 else 0
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log")
    ap.add_argument("--filter", default="", help="keep kernels whose name contains this")
    args = ap.parse_args()
    rows = parse(open(args.log, errors="replace").read())
    if not rows:
        sys.exit("no ptxas report in the log (build with PK_PTXAS_VERBOSE=1)")
    keys = sorted(rows)
    names = demangle([k[0] for k in keys])
    print("| kernel | arch | registers | spill stores / loads (bytes) | stack | static smem |")
    print("|---|---|---|---|---|---|")
    seen = set()
    for (mangled, arch), name in zip(keys, names):
        r = rows[(mangled, arch)]
        label = short(name)
        if args.filter not in label or (label, arch) in seen:
            continue
        seen.add((label, arch))
        print(f"| {label} | {arch} | {r.get('regs', '?')} | {r.get('spill_st', 0)} / {r.get('spill_ld', 0)} "
              f"| {r.get('stack', 0)} | {r.get('smem', 0)} |")


if __name__ == "__main__":
    main()
