#!/usr/bin/env bash
# The issue's quality targets: each family trained with pk-train's defaults (the 10-minute
# runs on 2 CPU cores), one after the other, then a summary of the final evaluations.
# Usage: bash scripts/quality_targets.sh [OUT_DIR]   (default runs/targets)
set -euo pipefail
OUT=${1:-runs/targets}
PY=${PY:-python}
mkdir -p "$OUT"
rm -f "$OUT/walltimes.txt"
for task in gpt mlm diffusion flow; do
  start=$(date +%s)
  $PY -m pretrain_kernels.train.cli "$task" --out "$OUT/$task" --no-progress 2>&1 | tee "$OUT/$task.log"
  echo "$task wall_s $(( $(date +%s) - start ))" | tee -a "$OUT/walltimes.txt"
done
$PY - "$OUT" <<'PY'
import json, math, os, sys
out = sys.argv[1]
ev = {}
for task in ("gpt", "mlm", "diffusion", "flow"):
    lines = [json.loads(l) for l in open(os.path.join(out, task, "metrics.jsonl"))]
    ev[task] = [l for l in lines if "eval" in l][-1]["eval"]
    print(task, json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in ev[task].items()}))
g, m, d, f = ev["gpt"], ev["mlm"], ev["diffusion"], ev["flow"]
def check(name, ok, text):
    print(f"{'PASS' if ok else 'MISS'}  {name}: {text}")
check("GPT val loss <= 1.6 nats/byte", g["val_loss"] <= 1.6, f"{g['val_loss']:.3f}")
check("MLM masked accuracy >= 0.5", m["masked_accuracy"] >= 0.5,
      f"{m['masked_accuracy']:.3f} (most-frequent-byte baseline {m['baseline_accuracy']:.3f})")
for name, e, k in (("flow 4 steps", f, "flow4"), ("DDIM 50", d, "ddim50"), ("DPM-Solver++ 4", d, "dpm4")):
    check(f"{name}: uncond confidence >= 0.8", e[k + "_uncond_confidence"] >= 0.8, f"{e[k + '_uncond_confidence']:.3f}")
    check(f"{name}: uncond class entropy >= 0.95 log 10", e[k + "_uncond_class_entropy"] >= 0.95,
          f"{e[k + '_uncond_class_entropy']:.3f}")
    check(f"{name}: cond class accuracy >= 0.97", e[k + "_cond_class_accuracy"] >= 0.97,
          f"{e[k + '_cond_class_accuracy']:.3f}")
    for c in ("uncond", "cond"):
        check(f"{name}: {c} FD <= 2x real-vs-real", e[f"{k}_{c}_fd_ratio"] <= 2,
              f"{e[f'{k}_{c}_fd']:.1f} = {e[f'{k}_{c}_fd_ratio']:.2f}x ({e['reference_fd']:.1f})")
for key, higher in (("uncond_confidence", True), ("uncond_class_entropy", True), ("cond_class_accuracy", True),
                    ("uncond_fd", False), ("cond_fd", False)):
    a, b = f["flow4_" + key], d["ddim50_" + key]
    ok = a >= 0.9 * b if higher else a <= 1.1 * b
    check(f"flow 4 within 10% of DDIM 50: {key}", ok, f"{a:.3f} vs {b:.3f}")
PY
cat "$OUT/walltimes.txt"
