"""Head-to-head benchmark: hard prompt, soft prompt, prefix, deep prompt, P-tuning, full finetuning and PEFT.

    softprompt bench benchmarks/smollm2.yaml            # run (or resume) the grid, then write the report
    softprompt bench benchmarks/smollm2.yaml --quick    # one seed, tiny budgets: a smoke test of everything
    softprompt bench report benchmarks/results/smollm2  # report.md + PNG plots from the records
    softprompt bench benchmarks/smollm2.yaml --verify trec--deep--s0--60steps   # re-run a cell, compare exactly

Layout: `grid.py` (the YAML grid, resume, --jobs), `cell.py` (one measured, pinned cell),
`baselines.py` (hard prompt, full finetuning, PEFT), `outcomes.py` (dev metrics with per-row
outcomes), `stats.py` (bootstrap intervals), `verify.py` (--verify), `report.py` (Markdown and plots).
"""

from __future__ import annotations

from .grid import Grid, load_grid, run_grid
from .report import write_report

__all__ = ["Grid", "load_grid", "run_grid", "write_report"]
