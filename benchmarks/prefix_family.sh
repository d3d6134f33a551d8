#!/usr/bin/env bash
# Issue 3 acceptance runs on the embedded SmolLM2 (results: benchmarks/results/prefix_family.md).
# SST-2: prefix tuning scored on all 872 dev rows. E2E NLG: the zero-shot template, then prefix, deep prompts,
# P-tuning and soft prompt, each 200 steps at batch 8 with its default learning rate, scored on the same
# 200 distinct meaning representations of dev (all references grouped). ~75 min on 2 idle CPU cores.
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
OUT=${OUT:-runs/prefix_family}
mkdir -p "$OUT"
softprompt train --task sst2 --method prefix --steps 300 --eval-every 100 --eval-limit 200 --no-progress \
  --run-dir "$OUT/sst2-prefix" --out "$OUT/sst2-prefix.safetensors"
softprompt eval --task e2e_nlg --limit 200 > "$OUT/e2e-zero-shot.json"
for m in prefix deep ptuning soft; do
  softprompt train --task e2e_nlg --method $m --steps 200 --batch-size 8 --eval-every 100 --eval-limit 40 \
    --final-eval-limit 200 --no-zero-shot --no-progress --run-dir "$OUT/e2e-$m" --out "$OUT/e2e-$m.safetensors"
done
for f in "$OUT"/*.safetensors; do softprompt info "$f"; done
