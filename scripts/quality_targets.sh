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
import json, os, sys
out = sys.argv[1]
for task in ("gpt", "mlm", "diffusion", "flow"):
    lines = [json.loads(l) for l in open(os.path.join(out, task, "metrics.jsonl"))]
    ev = [l for l in lines if "eval" in l][-1]["eval"]
    print(task, json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in ev.items()}))
PY
cat "$OUT/walltimes.txt"
