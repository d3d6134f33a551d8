"""A benchmark grid: methods x tasks x seeds x step budgets, from a YAML file, run resumably.

    model: smollm2                      # any `load_base` name, directory or hub id
    results: benchmarks/results/smollm2 # where records go (relative to the current directory)
    threads: 1                          # torch threads per cell (part of every cell's identity)
    deterministic: true                 # torch.use_deterministic_algorithms: true, warn (warn_only) or false
    quantize: null                      # nf4 or int8: the frozen weights stored by bitsandbytes
    seeds: [0, 1]
    steps: [100]                        # step budgets: every trained method of a task gets the same
    dev_limit: 200                      # fixed dev subset: rows, or distinct inputs for generation
    latency_examples: 16
    train: {batch_size: 8, eval_every: 50}       # TrainConfig options for every cell
    quick: {steps: [3], dev_limit: 16}           # what --quick changes (and it keeps the first seed only)
    tasks:
      sst2: {}
      e2e_nlg: {dev_limit: 100}                  # per task: dev_limit, steps, latency_examples, train, seeds
      rte: {steps: [200], seeds: [0, 1]}         # a task's seeds cap every method's on that task
      mine: {spec: tasks/mine.yaml}              # a task spec file (relative to the grid file), named `mine`
    methods:
      hard: {kind: hard}                         # kind: hard, a method (soft, prefix, ...) or a baseline
      soft: {kind: soft, config: {init: labels}, per_task: {e2e_nlg: {init: vocab}}, seeds: [0, 1, 2, 3, 4]}
      soft-text: {kind: soft, config: {init: text, init_text: "..."}, tasks: [sst2]}
      peft-prompt: {kind: peft-prompt, config: {init: labels}, pair: soft}

Seeds: a task's `seeds:` if it has them, else the method's, else the grid's. A hard prompt is
scored once per task (at the first of those seeds).

Each cell writes one JSON record (`cells/ID.json`, atomically); a later run skips the cells
whose record exists with the same identity (task, method config, seed, steps, options, model,
threads, deterministic mode, versions, device, dtype, quantization: `Cell.identity`), so a killed
grid resumes where it stopped, and a record from other threads or versions runs again. Cells run
seed by seed, so a partial grid covers every method once before any method twice. `jobs` cells run
at once, each in its own process (on 2 cores: 2 cells of 1 thread).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..base import QUANTIZATIONS, default_device, parse_dtype
from ..data import Task
from ..errors import ConfigError, SoftpromptError
from ..fileio import atomic_write_text, read_mapping
from ..methods import METHODS
from .baselines import BASELINES, HardConfig
from .cell import KINDS, Cell, record_path, run_cell

TASK_KEYS = {"spec", "dev_limit", "steps", "latency_examples", "train", "seeds"}
METHOD_KEYS = {"kind", "config", "lr", "tasks", "per_task", "pair", "seeds"}
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
    threads: int | None = 1  # torch threads of every cell; None leaves torch's default (not reproducible)
    deterministic: bool | str = True  # torch.use_deterministic_algorithms: True, "warn" (warn_only) or False
    quantize: str | None = None  # load_base(quantize=...): 'nf4' or 'int8'

    def __post_init__(self):
        if not self.tasks or not self.methods:
            raise ConfigError("A grid needs `tasks:` and `methods:`.", "list at least one of each in the grid file.")
        if self.quantize is not None and self.quantize not in QUANTIZATIONS:
            raise ConfigError(f"quantize: {self.quantize!r} is not known.", f"use {list(QUANTIZATIONS)} or null.")
        parse_dtype(self.dtype, self.device or default_device())  # an unknown dtype fails now
        _check_seeds("The grid", self.seeds)
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
            if "seeds" in entry:
                _check_seeds(f"Method '{name}'", entry["seeds"])
        for name, entry in self.tasks.items():
            unknown = sorted(set(entry or {}) - TASK_KEYS)
            if unknown:
                raise ConfigError(f"Task '{name}' has unknown key(s) {unknown}.", f"use only {sorted(TASK_KEYS)}.")
            if "seeds" in (entry or {}):
                _check_seeds(f"Task '{name}'", entry["seeds"])
        Cell(**{**_CELL_PROBE, "threads": self.threads, "deterministic": self.deterministic})  # checks both

    def seeds_of(self, task: str, method: str) -> list:
        """The seeds of one method on one task: the task's, else the method's, else the grid's."""
        t, m = self.tasks[task] or {}, self.methods[method] or {}
        return list(t.get("seeds") or m.get("seeds") or self.seeds)

    def cells(self, quick: bool = False) -> list[Cell]:
        """Every cell, seed-major; --quick keeps each entry's first seed and applies the `quick:` budgets."""
        q = {**QUICK, **self.quick} if quick else {}
        seeds = {(t, m): self.seeds_of(t, m)[: 1 if quick else None] for t in self.tasks for m in self.methods}
        out = []
        for seed in dict.fromkeys(s for ss in seeds.values() for s in ss):
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
                    if seed not in seeds[(task, name)] or (not trained and seed != seeds[(task, name)][0]):
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
                                threads=self.threads,
                                deterministic=self.deterministic,
                                quantize=self.quantize,
                            )
                        )
        return out


_CELL_PROBE = dict(task="t", method="m", kind="hard", config={}, seed=0, steps=0, lr=None, train={}, dev_limit=None)
_CELL_PROBE["model"] = "m"


def _check_seeds(where: str, seeds) -> None:
    whole = isinstance(seeds, list) and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    if not whole or not seeds:
        raise ConfigError(f"{where} has seeds {seeds!r}.", "give a list of whole numbers, e.g. seeds: [0, 1].")


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
    cells: list[Cell],
    results: str | Path,
    isolate: bool = True,
    echo=print,
    grid: list[Cell] | None = None,
    jobs: int = 1,
) -> dict:
    """Run the cells that have no current record; returns counts of done, skipped and failed cells.

    isolate: run each cell in a fresh Python process (its peak memory is then its own), else in
    this process (fast; what the tests use). grid: the whole grid when `cells` is a part of it
    (`--only`), recorded in grid.json so that the report still lists every missing cell. jobs:
    cells running at once, each in its own process (isolate only).
    """
    if jobs > 1 and not isolate:
        raise ConfigError("Cells share one process here, so they cannot run at once.", "drop --in-process or --jobs.")
    results = Path(results)
    results.mkdir(parents=True, exist_ok=True)
    atomic_write_text(results / "grid.json", json.dumps([asdict(c) for c in grid or cells], indent=1))
    todo = [(i, c) for i, c in enumerate(cells, 1) if not finished(results, c)]
    counts = {"done": 0, "skipped": len(cells) - len(todo), "failed": 0}
    tasks: dict[str, Task] = {}  # loaded once per task when cells share this process
    lock = threading.Lock()

    def one(i: int, cell: Cell) -> None:
        t = time.perf_counter()
        error = run_in_own_process(cell, results) if isolate else run_in_process(cell, results, tasks)
        with lock:
            where = f"[{i}/{len(cells)}] {cell.id}"
            if error:
                counts["failed"] += 1
                echo(f"{where}: FAILED after {time.perf_counter() - t:.0f} s: {error}")
            else:
                counts["done"] += 1
                echo(f"{where}: {summary(json.loads(record_path(results, cell).read_text()))}")

    if jobs > 1:
        with ThreadPoolExecutor(jobs) as pool:  # threads that wait on the cells' processes, in grid order
            for f in [pool.submit(one, i, c) for i, c in todo]:
                f.result()
    else:
        for i, c in todo:
            one(i, c)
    return counts


def run_in_process(cell: Cell, results: Path, tasks: dict) -> str | None:
    """Run one cell here (tasks: loaded tasks by name, shared between calls); None, or the error's one line."""
    try:
        if cell.task not in tasks:
            tasks[cell.task] = cell.load_task()
        run_cell(cell, results, task=tasks[cell.task])
    except SoftpromptError as e:
        return str(e)
    return None


def run_in_own_process(cell: Cell, results: Path) -> str | None:
    """Run one cell in a fresh Python process (`cell_environment`); None, or the failure with its log's last line."""
    log = results / "logs" / f"{cell.id}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = cell_environment(cell)
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


def cell_environment(cell: Cell) -> dict:
    """The environment of a cell's own process: its thread count from the start, and fixed hashing."""
    # Idle OpenMP threads sleep instead of spinning: on a machine shared with other jobs, spinning threads
    # slow every process's steps down; alone, the difference is small.
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "PYTHONHASHSEED": "0"}
    if cell.threads is not None:
        env |= {"OMP_NUM_THREADS": str(cell.threads), "MKL_NUM_THREADS": str(cell.threads)}
    if cell.determinism != "off":
        env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    return env


def estimate_seconds(cell: Cell, records: list[dict]) -> float | None:
    """A cell's wall time at the pace of earlier records of its task and method (any seed or budget): their fixed
    cost (loading, latency) plus their time per step and per evaluation at this cell's steps; None without any.

    A one-thread cell takes about the CPU seconds a record's process used (on a core of its own), which holds
    whatever thread count and load that record ran with; other cells take the records' wall times.
    """
    same = [r for r in records if r["task"] == cell.task and r["method"] == cell.method]
    same = same or [r for r in records if r["task"] == cell.task and r["kind"] == cell.kind]
    guesses = [g for r in same if (g := _guess(cell, r)) is not None]
    return statistics.median(guesses) if guesses else None


def _guess(cell: Cell, r: dict) -> float | None:
    by_cpu = cell.threads == 1 and "cpu_seconds" in r
    if not cell.steps or not r.get("steps"):
        return (r["cpu_seconds"] if by_cpu else r["wall_seconds"]) if not cell.steps and not r.get("steps") else None
    rest = r["wall_seconds"] - r["train_seconds"]  # loading, evaluations, latency
    per_step, eval_share = r["seconds_per_step"], r["eval_seconds"] / rest if rest > 0 else 0.0
    if by_cpu:
        per_step, rest = r["cpu_seconds_per_step"], r["cpu_seconds"] - r["cpu_seconds_per_step"] * r["steps"]
    evals = rest * eval_share / _evaluations(r["steps"], r["spec"]["train"].get("eval_every", 0))
    evals *= _evaluations(cell.steps, cell.train.get("eval_every", 0))
    return rest * (1 - eval_share) + evals + per_step * cell.steps


def _evaluations(steps: int, every: int) -> int:
    return (steps // every + (steps % every > 0)) if every else 1  # and the final step's


def summary(r: dict) -> str:
    """One line per record, as the grid prints it."""
    m = r["dev"][r["metric"]]
    text = f"{r['metric']} {100 * m:.1f}%" if r["metric"] == "accuracy" else f"{r['metric']} {m:.1f}"
    parts = [text, f"zero-shot {r['zero_shot'][r['metric']] * (100 if r['metric'] == 'accuracy' else 1):.1f}"]
    if "seconds_per_step" in r:
        parts.append(f"{r['seconds_per_step']:.2f} s/step")
    parts += [f"peak {r['peak_memory_bytes'] / 2**30:.2f} GiB", f"{r['wall_seconds']:.0f} s"]
    return ", ".join(parts)
