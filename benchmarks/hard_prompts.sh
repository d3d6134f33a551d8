#!/usr/bin/env bash
# Hard prompt acceptance runs on the embedded SmolLM2 (results: benchmarks/results/hard_prompts.md).
# CPU: one thread per process is much faster than two on a shared 2-core machine.
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} COLUMNS=${COLUMNS:-200}
OUT=${OUT:-prompts}
AUTOPROMPT=(--num-candidates 10 --eval-rows 48 --iterations 30)
# SST-2's train split is mostly short phrases and its dev split whole sentences: search on sentence-length
# train rows, run 3 searches (restarts), and keep the visited trigger that is best on 256 held-out search rows
# (early stopping, and a choice between restarts: one search's result depends on its seed).
SST2=(--search-min-words 10 --search-size 1024 --select-rows 256 --restarts 3)
for task in sst2 trec; do
  softprompt search templates --task "$task" --out "$OUT/$task-hard.safetensors"
  extra=(); [ "$task" = sst2 ] && extra=("${SST2[@]}")
  softprompt search autoprompt --task "$task" "${AUTOPROMPT[@]}" "${extra[@]}" --out "$OUT/$task-autoprompt.safetensors"
done
[ -f "$OUT/sst2-soft.safetensors" ] || softprompt train --task sst2 --method soft --steps 150 --out "$OUT/sst2-soft.safetensors"
softprompt explain "$OUT/sst2-soft.safetensors"
