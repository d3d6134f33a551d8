#!/usr/bin/env bash
# Prompt transfer on the embedded SmolLM2 (results: benchmarks/results/transfer/report.md): train the source, an
# SST-2 soft prompt (the smollm2.yaml SST-2 soft cell's settings: 20 tokens, class-label init, 80 steps at batch 8,
# lr 3e-2, seed 0, 1 torch thread), then the TREC grid of benchmarks/transfer.yaml. ~25 min on 2 idle CPU cores.
set -euo pipefail
OUT=runs/transfer
mkdir -p "$OUT"
if [ ! -f "$OUT/sst2-soft.safetensors" ]; then
  OMP_NUM_THREADS=1 softprompt train --task sst2 --method soft --num-virtual-tokens 20 --init labels --steps 80 \
    --batch-size 8 --lr 3e-2 --warmup-steps 10 --seed 0 --eval-every 0 --final-eval-limit 200 --no-zero-shot \
    --no-progress --run-dir "$OUT/sst2" --out "$OUT/sst2-soft.safetensors"
fi
softprompt bench benchmarks/transfer.yaml --jobs "${JOBS:-2}"
