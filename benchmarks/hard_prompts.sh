#!/usr/bin/env bash
# Hard prompt acceptance runs on the embedded SmolLM2 (results: benchmarks/results/hard_prompts.md).
# CPU: one thread per process is much faster than two on a shared 2-core machine.
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} COLUMNS=${COLUMNS:-200}
OUT=${OUT:-prompts}
for task in sst2 trec; do
  softprompt search templates --task "$task" --out "$OUT/$task-hard.safetensors"
  softprompt search autoprompt --task "$task" --num-candidates 10 --eval-rows 48 --iterations 30 \
    --out "$OUT/$task-autoprompt.safetensors"
done
[ -f "$OUT/sst2-soft.safetensors" ] || softprompt train --task sst2 --method soft --steps 150 --out "$OUT/sst2-soft.safetensors"
softprompt explain "$OUT/sst2-soft.safetensors"
