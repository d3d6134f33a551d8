"""Seconds per training step, softprompt against PEFT, interleaved A/B in one process.

The grid (`softprompt bench`) times every cell on its own, minutes or hours apart; on a shared
machine that compares loads, not code. Here each pair of the grid (a PEFT entry and the
softprompt entry it mirrors) trains side by side on one loaded model: the same micro-batches of
the seeded stream, alternating A B B A so that drift in the machine's load falls on both. We
report the median ratio of wall and CPU seconds (ours / PEFT) over the timed steps.

    python benchmarks/peft_speed.py                       # SmolLM2, the grid's pairs, SST-2 and E2E
    python benchmarks/peft_speed.py --tasks sst2 --steps 6 --out benchmarks/results/smollm2/peft_speed.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import softprompt as sp
from softprompt.bench.cell import BenchTrainer, build_trainable
from softprompt.bench.grid import load_grid
from softprompt.fileio import atomic_write_text

ROOT = Path(__file__).resolve().parent


def one_step(trainer: BenchTrainer, step: int) -> tuple[float, float]:
    """(wall, CPU) seconds of one optimizer step of the trainer's loss on micro-batch `step` of its stream."""
    wall, cpu = time.perf_counter(), time.process_time()
    loss = trainer.loss(trainer.micro_batch(step, 0))
    loss.backward()
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - wall, time.process_time() - cpu


def compare(grid, task, ours_cell, peft_cell, steps: int) -> dict:
    base = sp.load_base(grid.model, device=grid.device, dtype=grid.dtype)  # fresh: PEFT wraps it
    trainers = []
    for cell in (ours_cell, peft_cell):  # ours first: PEFT's prompt methods wrap the model without changing it
        trainable = build_trainable(cell, base, task)
        t = BenchTrainer(
            base,
            task,
            config=sp.TrainConfig(steps=steps + 1, batch_size=cell.train["batch_size"], progress=False),
            trainable=trainable,
        )
        t._num_positions = trainable.collapse().num_positions  # what run() sets before its first batch
        trainers.append(t)
    times: list[list[tuple[float, float]]] = [[], []]
    for step in range(steps + 1):  # step 0 warms up both
        order = (0, 1) if step % 2 == 0 else (1, 0)
        for i in order:
            sample = one_step(trainers[i], step)
            if step:
                times[i].append(sample)
    ratio = [[a[k] / b[k] for a, b in zip(*times)] for k in (0, 1)]
    return {
        "task": task.name,
        "softprompt": ours_cell.method,
        "peft": peft_cell.method,
        "peft_kind": peft_cell.kind,
        "steps": steps,
        "seconds_per_step": {
            "softprompt": statistics.median(t[0] for t in times[0]),
            "peft": statistics.median(t[0] for t in times[1]),
        },
        "cpu_seconds_per_step": {
            "softprompt": statistics.median(t[1] for t in times[0]),
            "peft": statistics.median(t[1] for t in times[1]),
        },
        "ratio_wall": statistics.median(ratio[0]),
        "ratio_cpu": statistics.median(ratio[1]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", default=str(ROOT / "smollm2.yaml"))
    p.add_argument("--model", help="default: the grid's")
    p.add_argument("--tasks", default="sst2,e2e_nlg")
    p.add_argument("--steps", type=int, default=6, help="timed steps per method (after one warm-up step)")
    p.add_argument("--out", default=str(ROOT / "results" / "smollm2" / "peft_speed.json"))
    a = p.parse_args()
    grid = load_grid(a.grid, model=a.model)
    cells = {(c.task, c.method): c for c in grid.cells() if c.seed == grid.seeds[0]}
    rows = []
    for name in a.tasks.split(","):
        task = next(c for c in cells.values() if c.task == name).load_task()
        seen = set()
        for (t, _), cell in cells.items():
            if t != name or not cell.pair or cell.kind in seen:
                continue
            seen.add(cell.kind)  # one pair per PEFT method: inits do not change the cost of a step
            row = compare(grid, task, cells[(t, cell.pair)], cell, a.steps)
            rows.append(row)
            print(json.dumps(row), flush=True)
    atomic_write_text(
        a.out, json.dumps({"model": grid.model, "threads": torch.get_num_threads(), "pairs": rows}, indent=1)
    )
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
