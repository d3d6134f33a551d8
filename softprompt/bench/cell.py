"""One benchmark cell: one method on one task with one seed and step budget, measured, as one JSON record.

A cell loads its own base model (full finetuning and LoRA change it in place) and trains through
the one training loop, instrumented by `BenchTrainer`. `softprompt bench` runs every cell in a
fresh process (`python -m softprompt.bench RESULTS_DIR CELL_JSON`), so the peak resident
memory the operating system reports is that cell's alone.

Evaluation is on a fixed dev subset (the same rows for every method and seed; `DEV_SEED`); the
cell's metric is that of the final step, with no selection on dev. Zero-shot metrics are shared by
the cells of a task through a small cache file.

Reproducible cells: a cell's identity hashes everything that changes its numbers: the task, method
config, seed, steps and options, and the torch thread count (floating-point reductions are summed in
another order on another number of threads: one TREC cell moved 17.5 points from 1 to 2 threads),
the deterministic-algorithms mode, the package versions, device, dtype and quantization. The cell
runs pinned to them (`pinned`), so re-running it on the same kind of machine gives the same metric
and the same per-row outcomes, bit for bit (`softprompt bench --verify CELL` checks it). The record
keeps the machine it ran on (not part of the identity: a session's CPU may differ) and the 1-minute
load average at its start and end.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import random
import resource
import sys
import tempfile
import time
import weakref
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..base import default_device, load_base, parse_dtype
from ..data import load_task
from ..errors import ConfigError
from ..evaluate import evaluate, primary_metric
from ..fileio import atomic_write_text
from ..injection import EMPTY
from ..methods import METHODS, build_method
from ..train import TrainConfig, Trainer, init_context, peak_memory_bytes
from .baselines import BASELINES, HardConfig, PeftMethod, hard_prompt_spec
from .outcomes import dev_outcomes

DEV_SEED = 0  # seed of the fixed dev subset, whatever the training seed
KINDS = ("hard", *METHODS, *BASELINES)
# torch.use_deterministic_algorithms: True raises on an op that has no deterministic kernel, "warn" only warns
DETERMINISM = {True: "strict", "warn": "warn_only", False: "off"}


@dataclass(frozen=True)
class Cell:
    """Everything that defines a cell (JSON round trip: `asdict` / `Cell(**d)`)."""

    task: str  # a built-in task, or the name of the spec file below
    method: str  # the grid's name for the entry, e.g. "soft-text"
    kind: str  # "hard", a METHODS name or a BASELINES name
    config: dict
    seed: int
    steps: int  # 0 for the hard prompt (not trained)
    lr: float | None
    train: dict  # TrainConfig options shared by the grid
    dev_limit: int | None
    model: str
    dtype: str = "auto"
    device: str | None = None
    data_dir: str | None = None
    latency_examples: int = 16
    pair: str | None = None  # PEFT entries: the softprompt entry they are compared with
    spec: str | None = None  # task spec file, when the task is not built in
    # None: left as torch found it, as in records from before the pinning (their `torch_threads` says what it was)
    threads: int | None = None
    deterministic: bool | str = False  # a DETERMINISM key; records from before the pinning ran without
    quantize: str | None = None  # load_base(quantize=...): 'nf4', 'int8' or None (full precision)

    def __post_init__(self):
        if self.deterministic not in DETERMINISM:
            raise ConfigError(
                f"deterministic: {self.deterministic!r} is not a mode.", "use true, 'warn' (warn_only) or false."
            )
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ConfigError(f"threads: {self.threads!r} is not a thread count.", "use a whole number >= 1.")

    def load_task(self):
        return load_task(self.spec or self.task, self.data_dir)

    @property
    def id(self) -> str:
        return f"{self.task}--{self.method}--s{self.seed}--{self.steps}steps"

    @property
    def determinism(self) -> str:
        return DETERMINISM[self.deterministic]

    def identity_inputs(self) -> dict:
        """What changes the result, device and dtype resolved ('auto' on a CPU is float32) and versions included."""
        keys = ("task", "kind", "config", "seed", "steps", "lr", "train", "dev_limit", "model", "threads", "quantize")
        device = self.device or default_device()
        return {
            **{k: getattr(self, k) for k in keys},
            "device": device,
            "dtype": str(parse_dtype(self.dtype, device)).removeprefix("torch."),
            "determinism": self.determinism,
            "versions": _versions(),
        }

    @property
    def identity(self) -> str:
        """Hash of `identity_inputs`; a record with another identity is stale and the cell runs again."""
        text = json.dumps(self.identity_inputs(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def record_path(results: Path, cell: Cell) -> Path:
    return Path(results) / "cells" / f"{cell.id}.json"


class BenchTrainer(Trainer):
    """The one training loop, instrumented for the benchmark.

    - evaluates on the fixed dev subset (`eval_seed=DEV_SEED`, not the training seed);
    - keeps the time spent evaluating out of the training time (wall and CPU seconds per step; CPU
      seconds, summed over threads, say more than wall time on a machine shared with other jobs);
    - counts the text tokens trained on (tokens per second);
    - lets PEFT models compute their own loss.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_seconds, self.eval_cpu_seconds, self.tokens = 0.0, 0.0, 0
        self.rows: dict[int, dict] = {}  # step -> the per-row outcomes of its evaluation

    def evaluate(self, injection, limit: int | None) -> dict:
        """The loop's evaluation (the same metrics), keeping each row's outcome for the report's bootstrap."""
        metrics, self.rows[self.step] = dev_outcomes(self.base, self.task, injection, **self.eval_options(limit))
        return metrics

    def micro_batch(self, step: int, micro: int) -> list:
        batch = super().micro_batch(step, micro)
        self.tokens += sum(e.slot + len(e.target) for e in batch)
        return batch

    def loss(self, batch: list) -> torch.Tensor:
        return self.method.loss(batch) if isinstance(self.method, PeftMethod) else super().loss(batch)

    def _eval_and_keep_best(self) -> None:
        t, cpu = time.perf_counter(), time.process_time()
        super()._eval_and_keep_best()
        self.eval_seconds += time.perf_counter() - t
        self.eval_cpu_seconds += time.process_time() - cpu

    def run(self):
        cpu = time.process_time()
        result = super().run()
        self.train_seconds = result.train_seconds - self.eval_seconds  # the loop's time without evaluations
        self.train_cpu_seconds = time.process_time() - cpu - self.eval_cpu_seconds
        return result


# A task's most frequent token ids (vocab init), kept while the task is loaded: cells sharing a process
# (--quick, --in-process) would otherwise recount the same 40,000 texts each time.
_FREQUENT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def build_trainable(cell: Cell, base, task):
    ctx = init_context(base, task, cell.seed)
    known = _FREQUENT.get(task)
    if known and known[0] == base.tokenizer.name_or_path:
        ctx.__dict__["frequent_ids"] = known[1]  # InitContext.frequent_ids is a cached_property
    if cell.kind in BASELINES:
        cls = BASELINES[cell.kind]
        trainable = cls(cls.config_class.from_dict(cell.config), ctx)
    else:
        trainable = build_method(cell.kind, cell.config, ctx)
    if "frequent_ids" in ctx.__dict__:
        _FREQUENT[task] = (base.tokenizer.name_or_path, ctx.frequent_ids)
    return trainable


def _zero_shot(base, task, cell: Cell, results: Path) -> dict:
    """The task's template scored without a prompt on the dev subset; computed once per task and model."""
    path = Path(results) / "zero_shot" / f"{cell.task}.json"
    key = {
        "model": cell.model,
        "dtype": cell.dtype,
        "device": cell.device,
        "quantize": cell.quantize,
        "threads": cell.threads,
        "determinism": cell.determinism,
        "task": cell.task,
        "dev_limit": cell.dev_limit,
        "dev_seed": DEV_SEED,
    }
    if path.exists():
        cached = json.loads(path.read_text())
        if cached["key"] == key:
            return cached["metrics"]
    metrics = evaluate(base, task, None, limit=cell.dev_limit, seed=DEV_SEED)
    atomic_write_text(path, json.dumps({"key": key, "metrics": metrics}, indent=1))
    return metrics


def _latency(base, task, injection, spec, n: int) -> float:
    """Seconds per example at batch size 1 (one scoring forward, or one whole greedy generation)."""
    t = time.perf_counter()
    out = evaluate(base, task, injection, limit=n, batch_size=1, spec=spec, seed=DEV_SEED)
    return (time.perf_counter() - t) / out["n"]


@functools.cache
def _versions() -> dict:
    import transformers

    from .. import __version__

    v = {"softprompt": __version__, "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import peft

        v["peft"] = peft.__version__
    except ImportError:
        pass
    return v


def _machine() -> dict:
    """The kind of machine a cell ran on (not part of the identity): CPU model, cores, the vector instruction set
    that torch's CPU kernels dispatch to (`isa`: AVX512, AVX2, ...; a virtual machine's CPU name, such as "Intel(R)
    Xeon(R) Processor", can cover several generations that differ in it) and, on CUDA, the GPU."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out = {"cpu": cpu, "cores": os.cpu_count(), "system": f"{platform.system()} {platform.machine()}"}
    out["isa"] = torch.backends.cpu.get_cpu_capability()
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    return out


@contextmanager
def pinned(cell: Cell):
    """Run with the cell's thread count and deterministic mode, and every global generator seeded; then restore."""
    before = (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    mode = cell.determinism
    if cell.threads is not None:
        torch.set_num_threads(cell.threads)
    if mode != "off":
        # deterministic cuBLAS needs a fixed workspace; read when CUDA starts (a cell's own process sets it first)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(mode != "off", warn_only=mode == "warn_only")
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = mode != "off", False
    random.seed(cell.seed)
    np.random.seed(cell.seed)
    torch.manual_seed(cell.seed)  # PEFT's modules draw their initial weights from the global generator
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        torch.use_deterministic_algorithms(before[1], warn_only=before[2])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[3], before[4]


def run_cell(cell: Cell, results: str | Path, isolated: bool = False, task=None) -> dict:
    """Run one cell and write its record (atomically) to RESULTS/cells/ID.json; returns the record.

    task: the loaded task, when the caller runs several cells in one process (reading data is slow).
    """
    results = Path(results)
    t0, load_before = time.perf_counter(), os.getloadavg()
    with pinned(cell):
        record = _measure(cell, results, isolated, task)
    record["load_average"] = {"start": load_before[0], "end": os.getloadavg()[0]}  # 1-minute, at start and end
    record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    record["wall_seconds"] = time.perf_counter() - t0
    if isolated:  # the whole process: model loading, zero-shot, training, evaluation, latency
        usage = resource.getrusage(resource.RUSAGE_SELF)
        record["cpu_seconds"] = usage.ru_utime + usage.ru_stime
    supersede(record_path(results, cell), record["identity"])
    atomic_write_text(record_path(results, cell), json.dumps(record, indent=1))
    return record


def supersede(path: Path, identity: str) -> None:
    """Move the record at `path` to RESULTS/superseded/ when a run of another identity replaces it (e.g. one from
    before the pinning of threads): the report compares the two, which shows what the changes between them moved."""
    if not path.exists() or json.loads(path.read_text()).get("identity") == identity:
        return
    kept = path.parent.parent / "superseded" / path.name
    kept.parent.mkdir(exist_ok=True)
    os.replace(path, kept)


def _measure(cell: Cell, results: Path, isolated: bool, task) -> dict:
    """The record of one cell, run under `pinned`: its outcome, sizes, memory, latency and environment."""
    quantize = {"quantize": cell.quantize} if cell.quantize else {}
    base = load_base(cell.model, device=cell.device, dtype=cell.dtype, **quantize)
    if base.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(base.device)
    task = task or cell.load_task()
    zero_shot = _zero_shot(base, task, cell, results)
    run = _hard if cell.kind == "hard" else _trained
    spec, injection, outcome = run(cell, base, task, zero_shot, results)
    memory = peak_memory_bytes(base.device)
    inputs = cell.identity_inputs()
    return {
        "cell": cell.id,
        "identity": hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16],
        "identity_inputs": inputs,
        "spec": asdict(cell),
        "task": cell.task,
        "method": cell.method,
        "kind": cell.kind,
        "tool": "peft" if cell.kind.startswith("peft") else "softprompt",
        "pair": cell.pair,
        "seed": cell.seed,
        "steps": cell.steps,
        "metric": primary_metric(task.spec),
        "zero_shot": zero_shot,
        **outcome,
        "peak_memory_bytes": memory,
        "memory_kind": "cuda max_memory_allocated"
        if base.device.type == "cuda"
        else ("ru_maxrss of the cell's own process" if isolated else "ru_maxrss of a shared process (not per cell)"),
        "latency_seconds_per_example": _latency(base, task, injection, spec, cell.latency_examples),
        "latency_examples": cell.latency_examples,
        **_environment(base, cell),
    }


def _environment(base, cell: Cell) -> dict:
    """Where and how the cell ran: model, device, dtype, quantization, threads, determinism, versions, machine."""
    return {
        "model": base.name,
        "device": str(base.device),
        "dtype": str(base.dtype).removeprefix("torch."),
        "quantize": cell.quantize,
        "threads": cell.threads,  # as pinned (None: not pinned)
        "torch_threads": torch.get_num_threads(),  # as it was
        "determinism": ("warn_only" if torch.is_deterministic_algorithms_warn_only_enabled() else "strict")
        if torch.are_deterministic_algorithms_enabled()
        else "off",
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
        "versions": _versions(),
        "machine": _machine(),
    }


def _outcome(config: dict, lr, dev: dict, rows: dict, params: int, saved: int, file_bytes: int, trainer=None) -> dict:
    """A cell's result fields: what ran, its dev metrics and per-row outcomes, its size, and its training times."""
    return {
        "config": config,
        "init": config.get("init"),
        "lr": lr,
        "batch_size": trainer.config.batch_size if trainer else None,
        "dev": dev,
        "rows": rows,  # outcomes.dev_outcomes: what each dev row scored, for the report's bootstrap
        "dev_best": trainer.best_metric if trainer and trainer.has_eval else None,
        "trainable_parameters": {"training": params, "saved": saved},
        "file_bytes": file_bytes,
    }


def _hard(cell: Cell, base, task, zero_shot: dict, results: Path) -> tuple:
    """A hard-prompt cell (a template search): (its spec, no injection, its outcome)."""
    hard = HardConfig.from_dict(cell.config)
    spec = hard_prompt_spec(base, task, hard, cell.seed)
    config = {**hard.to_dict(), "chosen_template": spec.template, "chosen_labels": spec.labels}
    dev, rows = dev_outcomes(base, task, None, limit=cell.dev_limit, spec=spec, seed=DEV_SEED)
    return spec, EMPTY, _outcome(config, None, dev, rows, 0, 0, len(spec.template.encode()))  # the "file": the template


def _trained(cell: Cell, base, task, zero_shot: dict, results: Path) -> tuple:
    """A trained cell: (the task's spec, the trained injection, its outcome with training times)."""
    options = {
        **cell.train,
        "steps": cell.steps,
        "lr": cell.lr,
        "seed": cell.seed,
        "eval_limit": cell.dev_limit,
        "final_eval": False,
        "checkpoint_every": 0,
        "progress": False,
    }
    trainable = build_trainable(cell, base, task)
    trainer = BenchTrainer(base, task, config=TrainConfig(**options), trainable=trainable, eval_seed=DEV_SEED)
    trainer.run()
    # the run's history, as `softprompt train` writes it (without its curves: the report draws them)
    atomic_write_text(
        results / "runs" / cell.id / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in trainer.history)
    )
    final = [r["eval"] for r in trainer.history if "eval" in r and r["step"] == cell.steps]
    dev = final[0] if final else trainer.evaluate(trainable.collapse(), cell.dev_limit)
    rows = trainer.rows[cell.steps]
    saved, file_bytes = _artifact(trainer)
    config = trainable.config.to_dict()
    outcome = _outcome(config, trainer.config.lr, dev, rows, trainable.num_trainable(), saved, file_bytes, trainer)
    return task.spec, trainable.collapse(), outcome | _training_time(cell, trainer)


def _training_time(cell: Cell, trainer: BenchTrainer) -> dict:
    """The training loop's times (without evaluations) and throughput."""
    pure = trainer.train_seconds
    return {
        "train_seconds": pure,
        "eval_seconds": trainer.eval_seconds,
        "seconds_per_step": pure / cell.steps,
        "cpu_seconds_per_step": trainer.train_cpu_seconds / cell.steps,
        "train_tokens": trainer.tokens,
        "tokens_per_second": trainer.tokens / pure,
        "history": f"runs/{cell.id}/metrics.jsonl",
    }


def _artifact(trainer: BenchTrainer) -> tuple[int, int]:
    """(parameters, bytes) of what the trained cell leaves behind: a prompt file, a PEFT adapter, or weights."""
    method = trainer.method
    with tempfile.TemporaryDirectory() as tmp:
        if hasattr(method, "artifact"):
            return method.artifact(Path(tmp))
        trainer.best = method.collapse()  # the final prompt, as the cell reports it
        prompt = trainer._prompt()
        return prompt.num_parameters, prompt.save(Path(tmp) / "prompt.safetensors").stat().st_size


def main(argv: list[str] | None = None) -> int:
    """Entry point of a cell's own process: `python -m softprompt.bench RESULTS_DIR CELL_JSON`."""
    results, spec = (argv or sys.argv[1:])[:2]
    run_cell(Cell(**json.loads(spec)), results, isolated=True)
    return 0
