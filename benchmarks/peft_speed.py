"""Seconds per training step, softprompt against PEFT, interleaved A/B in one process.

The grid (`softprompt bench`) times every cell on its own, minutes or hours apart; on a shared
machine that compares loads, not code. Here each pair of the grid (a PEFT entry and the
softprompt entry it mirrors) trains side by side on one loaded model: the same micro-batches of
the seeded stream, alternating A B B A so that drift in the machine's load falls on both. We
report the median ratio of wall and CPU seconds (ours / PEFT) over the timed steps, and on CUDA
each tool's peak memory in a step (`benchmarks/gpu.py` runs this on a GPU).

    python benchmarks/peft_speed.py                       # SmolLM2, the grid's pairs, SST-2 and E2E
    python benchmarks/peft_speed.py --tasks sst2 --steps 6 --out benchmarks/results/smollm2/peft_speed.json
    python benchmarks/peft_speed.py --only peft-adapter   # re-time one pair; the file keeps the other pairs' rows
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import softprompt as sp
from softprompt.bench.cell import BenchTrainer, Cell, build_trainable
from softprompt.bench.grid import Grid, load_grid
from softprompt.fileio import atomic_write_text

ROOT = Path(__file__).resolve().parent
TOOLS = ("softprompt", "peft")


def one_step(trainer: BenchTrainer, step: int) -> dict:
    """One optimizer step of the trainer's loss on micro-batch `step` of its stream: its wall and CPU seconds, and on
    CUDA its peak memory (`max_memory_allocated`, absolute and above what was allocated when the step started)."""
    device = trainer.base.device
    cuda = device.type == "cuda"
    if cuda:  # the GPU runs behind the Python thread: time from an idle device to an idle device
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
    wall, cpu = time.perf_counter(), time.process_time()
    loss = trainer.loss(trainer.micro_batch(step, 0))
    loss.backward()
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize(device)
    sample = {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
        sample |= {"peak": peak, "peak_above_start": peak - start}
    return sample


def grid_pairs(grid: Grid, task: str) -> list[tuple[Cell, Cell]]:
    """(softprompt cell, PEFT cell) pairs of the grid's first seed on `task`, one per PEFT method: inits do not change
    the cost of a step."""
    cells = {(c.task, c.method): c for c in grid.cells() if c.seed == grid.seeds[0]}
    pairs, seen = [], set()
    for (t, _), cell in cells.items():
        if t != task or not cell.pair or cell.kind in seen:
            continue
        seen.add(cell.kind)
        pairs.append((cells[(t, cell.pair)], cell))
    return pairs


def compare(base, task, ours_cell: Cell, peft_cell: Cell, steps: int, budget_s: float | None = None) -> dict:
    """Train both cells' methods side by side on `base` (a fresh one: PEFT wraps it) for up to `steps` timed steps
    after one warm-up step each; with `budget_s`, stop after the step pair that passes that many seconds (at least 2
    timed steps run)."""
    trainers = []
    for cell in (ours_cell, peft_cell):  # ours first: PEFT's prompt methods wrap the model without changing it
        trainable = build_trainable(cell, base, task)
        t = BenchTrainer(
            base,
            task,
            config=sp.TrainConfig(steps=steps + 1, batch_size=cell.train["batch_size"], progress=False),
            trainable=trainable,
        )
        t._start()  # what run() does before its first batch: train mode, the prompt's shape the examples fit around
        trainers.append(t)
    times: list[list[dict]] = [[], []]
    start = time.perf_counter()
    for step in range(steps + 1):  # step 0 warms up both
        order = (0, 1) if step % 2 == 0 else (1, 0)
        for i in order:
            sample = one_step(trainers[i], step)
            if step:
                times[i].append(sample)
        if budget_s is not None and step >= 2 and time.perf_counter() - start > budget_s:
            break
    ratio = [[a[k] / b[k] for a, b in zip(*times)] for k in ("wall", "cpu")]

    def per_tool(key: str, reduce=statistics.median) -> dict:
        return {tool: reduce(t[key] for t in samples) for tool, samples in zip(TOOLS, times)}

    row = {
        "task": task.name,
        "softprompt": ours_cell.method,
        "peft": peft_cell.method,
        "peft_kind": peft_cell.kind,
        "steps": len(times[0]),
        "batch_size": ours_cell.train["batch_size"],
        "seconds_per_step": per_tool("wall"),
        "cpu_seconds_per_step": per_tool("cpu"),
        "ratio_wall": statistics.median(ratio[0]),
        "ratio_cpu": statistics.median(ratio[1]),
        "trainable_parameters": {tool: t.method.num_trainable() for tool, t in zip(TOOLS, trainers)},
    }
    if "peak" in times[0][0]:
        row["peak_memory_bytes"] = per_tool("peak", max)
        row["peak_above_step_start_bytes"] = per_tool("peak_above_start", max)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", default=str(ROOT / "smollm2.yaml"))
    p.add_argument("--model", help="default: the grid's")
    p.add_argument("--tasks", default="sst2,e2e_nlg")
    p.add_argument("--steps", type=int, default=6, help="timed steps per method (after one warm-up step)")
    p.add_argument("--out", default=str(ROOT / "results" / "smollm2" / "peft_speed.json"))
    p.add_argument("--only", action="append", help="PEFT entries to time (repeatable); --out keeps the others' rows")
    a = p.parse_args()
    grid = load_grid(a.grid, model=a.model)
    kept = []
    if a.only and Path(a.out).is_file():
        kept = [r for r in json.loads(Path(a.out).read_text())["pairs"] if r["peft"] not in a.only]
    rows = []
    for name in a.tasks.split(","):
        pairs = [(o, t) for o, t in grid_pairs(grid, name) if not a.only or t.method in a.only]
        task = pairs[0][0].load_task() if pairs else None
        for ours, peft in pairs:
            base = sp.load_base(grid.model, device=grid.device, dtype=grid.dtype)  # fresh: PEFT wraps it
            row = compare(base, task, ours, peft, a.steps)
            rows.append(row)
            print(json.dumps(row), flush=True)
    atomic_write_text(
        a.out, json.dumps({"model": grid.model, "threads": torch.get_num_threads(), "pairs": kept + rows}, indent=1)
    )
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
