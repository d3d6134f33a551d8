#!/usr/bin/env bash
# Prompt transfer on the embedded SmolLM2 (results: benchmarks/results/transfer/report.md): train the source, an
# SST-2 soft prompt (the smollm2.yaml SST-2 soft cell's settings: 20 tokens, class-label init, 80 steps at batch 8,
# lr 3e-2, seed 0, 1 torch thread), then MPT sources on SST-2 + RTE (plain, and distilled from
# an RTE teacher and the SST-2 prompt), then the TREC grid of benchmarks/transfer.yaml. ~90 min on 2 idle CPU cores.
set -euo pipefail
OUT=runs/transfer
mkdir -p "$OUT"
if [ ! -f "$OUT/sst2-soft.safetensors" ]; then
  OMP_NUM_THREADS=1 softprompt train --task sst2 --method soft --num-virtual-tokens 20 --init labels --steps 80 \
    --batch-size 8 --lr 3e-2 --warmup-steps 10 --seed 0 --eval-every 0 --final-eval-limit 200 --no-zero-shot \
    --no-progress --run-dir "$OUT/sst2" --out "$OUT/sst2-soft.safetensors"
fi
# MPT's source stage: one shared prompt and per-task rank-1 factors on SST-2 and RTE together (160 steps at batch 8:
# 640 rows of each task), the same init, lr and thread as the SST-2 source above
if [ ! -f "$OUT/mpt/source/mpt-source.safetensors" ]; then
  OMP_NUM_THREADS=1 softprompt train --method mpt --tasks sst2 rte --num-virtual-tokens 20 --init labels --steps 160 \
    --batch-size 8 --lr 3e-2 --warmup-steps 10 --seed 0 --eval-every 0 --final-eval-limit 200 --no-zero-shot \
    --no-progress --run-dir "$OUT/mpt-run" --out "$OUT/mpt"
fi
# the same source stage distilled from single-task teachers: the SST-2 soft prompt above and an RTE soft prompt (the
# smollm2.yaml RTE soft cell's settings: 200 steps)
if [ ! -f "$OUT/rte-soft.safetensors" ]; then
  OMP_NUM_THREADS=1 softprompt train --task rte --method soft --num-virtual-tokens 20 --init labels --steps 200 \
    --batch-size 8 --lr 3e-2 --warmup-steps 10 --seed 0 --eval-every 0 --final-eval-limit 200 --no-zero-shot \
    --no-progress --run-dir "$OUT/rte" --out "$OUT/rte-soft.safetensors"
fi
if [ ! -f "$OUT/mpt-distilled/source/mpt-source.safetensors" ]; then
  OMP_NUM_THREADS=1 softprompt train --method mpt --tasks sst2 rte --num-virtual-tokens 20 --init labels --steps 160 \
    --batch-size 8 --lr 3e-2 --warmup-steps 10 --seed 0 --eval-every 0 --final-eval-limit 200 --no-zero-shot \
    --no-progress --teacher "sst2=$OUT/sst2-soft.safetensors" --teacher "rte=$OUT/rte-soft.safetensors" \
    --run-dir "$OUT/mpt-distilled-run" --out "$OUT/mpt-distilled"
fi
softprompt bench benchmarks/transfer.yaml --jobs "${JOBS:-2}"
