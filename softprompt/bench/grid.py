"""A benchmark grid: methods x tasks x seeds x step budgets, from a YAML file, run resumably.

    model: smollm2                      # any `load_base` name, directory or hub id
    results: benchmarks/results/smollm2 # where records go (relative to the current directory)
    seeds: [0, 1]
    steps: [100]                        # step budgets: every trained method of a task gets the same
    dev_limit: 200                      # fixed dev subset: rows, or distinct inputs for generation
    latency_examples: 16
    train: {batch_size: 8, eval_every: 50}       # TrainConfig options for every cell
    quick: {steps: [3], dev_limit: 16}           # what --quick changes (and it keeps the first seed only)
    tasks:
      sst2: {}
      e2e_nlg: {dev_limit: 100}                  # per task: dev_limit, steps, latency_examples, train
      mine: {spec: tasks/mine.yaml}              # a task spec file (relative to the grid file), named `mine`
    methods:
      hard: {kind: hard}                         # kind: hard, a method (soft, prefix, ...) or a baseline
      soft: {kind: soft, config: {init: labels}, per_task: {e2e_nlg: {init: vocab}}}
      soft-text: {kind: soft, config: {init: text, init_text: "..."}, tasks: [sst2]}
      peft-prompt: {kind: peft-prompt, config: {init: labels}, pair: soft}

Each cell writes one JSON record (`cells/ID.json`, atomically); a later run skips the cells
whose record exists with the same identity (task, method config, seed, steps, options, model), so
a killed grid resumes where it stopped. Cells run seed by seed, so a partial grid covers every
method once before any method twice.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..data import Task
from ..errors import ConfigError, SoftpromptError
from ..fileio import atomic_write_text, read_mapping
from ..methods import METHODS
from .baselines import BASELINES, HardConfig
from .cell import KINDS, Cell, record_path, run_cell

TASK_KEYS = {"spec", "dev_limit", "steps", "latency_examples", "train"}
METHOD_KEYS = {"kind", "config", "lr", "tasks", "per_task", "pair"}
QUICK = {"steps": [3], "dev_limit": 16, "latency_examples": 2}


@dataclass
class Grid:
    tasks: dict
    methods: dict
    model: str = "smollm2"
    dtype: str = "auto"
    device: str | None = None
    results: str = "runs/bench"
    seeds: list = field(default_factory=lambda: [0])
    steps: list = field(default_factory=lambda: [100])
    dev_limit: int | None = 200
    latency_examples: int = 16
    train: dict = field(default_factory=dict)
    quick: dict = field(default_factory=dict)
    data_dir: str | None = None

    def __post_init__(self):
        if not self.tasks or not self.methods:
            raise ConfigError("A grid needs `tasks:` and `methods:`.", "list at least one of each in the grid file.")
        for name, entry in self.methods.items():
            entry = entry or {}
            unknown = sorted(set(entry) - METHOD_KEYS)
            if unknown:
                raise ConfigError(f"Method '{name}' has unknown key(s) {unknown}.", f"use only {sorted(METHOD_KEYS)}.")
            kind = entry.get("kind", name)
            if kind not in KINDS:
                raise ConfigError(f"Method '{name}' has unknown kind '{kind}'.", f"use one of {list(KINDS)}.")
            _config_class(kind).from_dict(entry.get("config") or {})  # fail now, not hours into the grid
            for t in list(entry.get("tasks") or []) + list(entry.get("per_task") or {}):
                if t not in self.tasks:
                    raise ConfigError(
                        f"Method '{name}' names task '{t}', which is not in `tasks:`.",
                        f"use one of {list(self.tasks)}.",
                    )
            if entry.get("pair") is not None and entry["pair"] not in self.methods:
                raise ConfigError(
                    f"Method '{name}' pairs with unknown method '{entry['pair']}'.", f"use one of {list(self.methods)}."
                )
        for name, entry in self.tasks.items():
            unknown = sorted(set(entry or {}) - TASK_KEYS)
            if unknown:
                raise ConfigError(f"Task '{name}' has unknown key(s) {unknown}.", f"use only {sorted(TASK_KEYS)}.")

    def cells(self, quick: bool = False) -> list[Cell]:
        """Every cell, seed-major; --quick keeps the first seed and applies the `quick:` budgets."""
        q = {**QUICK, **self.quick} if quick else {}
        out = []
        for seed in self.seeds[:1] if quick else self.seeds:
            for task, t in self.tasks.items():
                t = t or {}

                def get(key, t=t):  # --quick's value, else the task's, else the grid's
                    return q.get(key, t.get(key, getattr(self, key)))

                train = {**self.train, **(t.get("train") or {}), **q.get("train", {})}
                for name, m in self.methods.items():
                    m = m or {}
                    if m.get("tasks") is not None and task not in m["tasks"]:
                        continue
                    kind = m.get("kind", name)
                    config = {**(m.get("config") or {}), **((m.get("per_task") or {}).get(task) or {})}
                    trained = kind != "hard"
                    if not trained and seed != self.seeds[0]:
                        continue  # a hard prompt is scored, not trained: one cell per task
                    for steps in get("steps") if trained else [0]:
                        out.append(
                            Cell(
                                task=task,
                                spec=t.get("spec"),
                                method=name,
                                kind=kind,
                                config=config,
                                seed=seed if trained else 0,
                                steps=steps,
                                lr=m.get("lr"),
                                train=train if trained else {},
                                dev_limit=get("dev_limit"),
                                model=self.model,
                                dtype=self.dtype,
                                device=self.device,
                                data_dir=self.data_dir,
                                latency_examples=get("latency_examples"),
                                pair=m.get("pair"),
                            )
                        )
        return out


def _config_class(kind: str):
    if kind == "hard":
        return HardConfig
    return (BASELINES.get(kind) or METHODS[kind]).config_class


def load_grid(path: str | Path, **overrides) -> Grid:
    """Read a grid file; keyword arguments that are not None (model, results, ...) replace its values."""
    path = Path(path)
    d = read_mapping(path, "Grid file", "see benchmarks/smollm2.yaml for the keys.")
    d.update({k: v for k, v in overrides.items() if v is not None})
    for t in (d.get("tasks") or {}).values():
        if isinstance(t, dict) and t.get("spec"):
            t["spec"] = str(path.parent / t["spec"])  # absolute paths stay as they are
    try:
        return Grid(**d)
    except TypeError as e:
        raise ConfigError(f"Grid file {path}: {e}.", "see the keys in softprompt/bench/grid.py's docstring.") from e


def finished(results: Path, cell: Cell) -> dict | None:
    path = record_path(results, cell)
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    return record if record.get("identity") == cell.identity else None


def run_grid(
    cells: list[Cell], results: str | Path, isolate: bool = True, echo=print, grid: list[Cell] | None = None
) -> dict:
    """Run the cells that have no current record; returns counts of done, skipped and failed cells.

    isolate: run each cell in a fresh Python process (its peak memory is then its own), else in
    this process (fast; what the tests use). grid: the whole grid when `cells` is a part of it
    (`--only`), recorded in grid.json so that the report still lists every missing cell.
    """
    results = Path(results)
    results.mkdir(parents=True, exist_ok=True)
    atomic_write_text(results / "grid.json", json.dumps([asdict(c) for c in grid or cells], indent=1))
    counts = {"done": 0, "skipped": 0, "failed": 0}
    tasks: dict[str, Task] = {}  # loaded once per task when cells share this process
    for i, cell in enumerate(cells, 1):
        where = f"[{i}/{len(cells)}] {cell.id}"
        if finished(results, cell):
            counts["skipped"] += 1
            continue
        t = time.perf_counter()
        error = _run_isolated(cell, results) if isolate else _run_here(cell, results, tasks)
        if error:
            counts["failed"] += 1
            echo(f"{where}: FAILED after {time.perf_counter() - t:.0f} s: {error}")
            continue
        counts["done"] += 1
        echo(f"{where}: {summary(json.loads(record_path(results, cell).read_text()))}")
    return counts


def _run_here(cell: Cell, results: Path, tasks: dict) -> str | None:
    try:
        if cell.task not in tasks:
            tasks[cell.task] = cell.load_task()
        run_cell(cell, results, task=tasks[cell.task])
    except SoftpromptError as e:
        return str(e)
    return None


def _run_isolated(cell: Cell, results: Path) -> str | None:
    log = results / "logs" / f"{cell.id}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    # Idle OpenMP threads sleep instead of spinning: on a machine shared with other jobs, spinning threads
    # slow every process's steps down; alone, the difference is small.
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ}
    with open(log, "w") as f:
        code = subprocess.call(
            [sys.executable, "-m", "softprompt.bench", str(results), json.dumps(asdict(cell))],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
        )
    if code == 0 and finished(results, cell):
        log.unlink()
        return None
    tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
    return f"exit {code}: {tail[0]} (log: {log})"


def summary(r: dict) -> str:
    """One line per record, as the grid prints it."""
    m = r["dev"][r["metric"]]
    text = f"{r['metric']} {100 * m:.1f}%" if r["metric"] == "accuracy" else f"{r['metric']} {m:.1f}"
    parts = [text, f"zero-shot {r['zero_shot'][r['metric']] * (100 if r['metric'] == 'accuracy' else 1):.1f}"]
    if "seconds_per_step" in r:
        parts.append(f"{r['seconds_per_step']:.2f} s/step")
    parts += [f"peak {r['peak_memory_bytes'] / 2**30:.2f} GiB", f"{r['wall_seconds']:.0f} s"]
    return ", ".join(parts)
