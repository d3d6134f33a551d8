#!/usr/bin/env bash
# The GPU benchmark (benchmarks/gpu.py): training steps and peak memory against PEFT, prefill with a compiled soft
# prompt, mixed-task generation, and the cached/padding contract in bfloat16 with SDPA, on the embedded SmolLM2.
# Sized for under 8 minutes on an H200-class GPU (--budget seconds of measurement, model loading apart); writes
# benchmarks/results/gpu.md and gpu.json (another folder: --out DIR).
#
# On a fresh CUDA machine, from the repository root (the Makefile's TORCH picks the torch build; any CUDA wheel index
# that matches the driver will do):
#
#     make install TORCH="torch --index-url https://download.pytorch.org/whl/cu124"
#     benchmarks/gpu.sh
#
# The data of ../shared/data is optional: without SST-2's files the script uses synthetic sentences under SST-2's
# template (the results say which). CI runs `benchmarks/gpu.sh --dry-run --out DIR`: a tiny random model on CPU, every
# section end to end in seconds. Other options: `benchmarks/gpu.sh --help`.
#
# Python: $PYTHON if set, else .venv/bin/python if it exists, else python.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
exec "$PYTHON" benchmarks/gpu.py "$@"
