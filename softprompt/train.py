"""The one training loop, shared by every prompt method.

The method module is the only thing with trainable parameters; the base model stays frozen (in
eval mode, no gradients to its weights). Each step draws a fixed slice of a seeded data stream,
so a run killed at any point resumes from its last checkpoint with the same data, optimizer state
and random state, and reaches the same prompt as an uninterrupted run.

Runs unchanged under `accelerate launch`: micro-batches of the global stream are dealt to ranks, the
(tiny) prompt is replicated and its gradients are averaged over the processes, and only the main process
writes files. Under an FSDP launch the frozen base is sharded over the processes (`softprompt.sharding`);
the prompt stays replicated, so one step is the same computation either way.
"""

from __future__ import annotations

import dataclasses
import json
import math
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .data import TRUNCATIONS, Encoder, Task
from .errors import (
    ConfigError,
    PromptFileError,
    StorageError,
    TrainingError,
    check_at_least,
    check_choice,
    check_positive,
    check_types,
)
from .evaluate import evaluate, primary_metric
from .example import Example
from .fileio import (
    acquire_lock,
    atomic_write_text,
    read_safetensors,
    release_lock,
    storage_error,
    write_safetensors,
)
from .injection import Injection
from .methods import InitContext, MethodConfig, PromptMethod, build_method
from .sharding import average_gradients, launch_options, replicate, reshard, shard_base, sharding_requested
from .store import Prompt, check_replace

CHECKPOINT = "checkpoint.safetensors"
OPTIMIZERS = ("adamw", "adafactor")
SCHEDULERS = ("linear", "cosine", "constant")


def _opt(help: str, **kw):
    return field(metadata={"help": help}, **kw)


@dataclass
class TrainConfig:
    """Options of the training loop (the same for every method)."""

    steps: int = _opt("optimizer steps", default=150)
    batch_size: int = _opt("examples per micro-batch (per process)", default=8)
    grad_accum: int = _opt("micro-batches per optimizer step (gradient accumulation)", default=1)
    lr: float | None = _opt("peak learning rate (default: the method's own, e.g. 3e-2 for soft prompts)", default=None)
    weight_decay: float = _opt("AdamW weight decay", default=0.0)
    optimizer: str = _opt(f"one of {OPTIMIZERS}", default="adamw")
    scheduler: str = _opt(f"learning-rate decay after warmup: one of {SCHEDULERS}", default="linear")
    warmup_steps: int = _opt("linear warmup steps", default=10)
    max_grad_norm: float = _opt("gradient clipping norm (0 = off)", default=1.0)
    eval_every: int = _opt(
        "evaluate on the eval split every N steps, keeping the best prompt (0 = only at the end)", default=50
    )
    eval_limit: int | None = _opt(
        "rows (or distinct inputs, for generation) of the eval split used during training", default=200
    )
    eval_split: str = _opt("split used to pick the best prompt and report metrics", default="dev")
    eval_batch_size: int = _opt("batch size for evaluation", default=32)
    final_eval: bool = _opt(
        "after training, score the zero-shot template and the best prompt on the full eval split", default=True
    )
    final_eval_limit: int | None = _opt("cap for the final evaluation (default: the whole split)", default=None)
    zero_shot: bool = _opt("include the zero-shot template in the final evaluation", default=True)
    checkpoint_every: int = _opt("write a resumable checkpoint every N steps", default=25)
    seed: int = _opt("seed for initialization and data order", default=0)
    gradient_checkpointing: bool = _opt("recompute activations in backward to save memory", default=False)
    max_length: int | None = _opt(
        "cap on positions per example (virtual tokens + text); default the model's context", default=None
    )
    truncate: str = _opt(
        "what to do with inputs over the limit: error, left (drop the start) or right", default="error"
    )
    log_every: int = _opt("append a loss record to metrics.jsonl every N steps", default=5)
    progress: bool = _opt("show a progress bar", default=True)

    def __post_init__(self):
        check_at_least(self, 1, "steps", "batch_size", "grad_accum", "max_length", "eval_batch_size")
        check_at_least(self, 0, "eval_every", "checkpoint_every", "warmup_steps", "log_every")
        check_positive(self, "lr")
        check_at_least(self, 1, "eval_limit", "final_eval_limit")  # None: the whole split
        for name, means in (("max_grad_norm", "0 turns clipping off"), ("weight_decay", "0 is none")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ConfigError(
                    f"{name} must be a finite number >= 0 ({means}), got {value}.",
                    f"pass {'--' + name.replace('_', '-')} 0 or more.",
                )
        check_choice(self, "optimizer", OPTIMIZERS)
        check_choice(self, "scheduler", SCHEDULERS)
        check_choice(self, "truncate", TRUNCATIONS, "truncation policy")
        check_types(self)  # a --config file passes its values unconverted: `steps: 1.5`, `final_eval: "no"`

    # Options that change what is trained; a checkpoint only resumes a run that agrees on all of them.
    IDENTITY = (
        "steps",
        "batch_size",
        "grad_accum",
        "lr",
        "weight_decay",
        "optimizer",
        "scheduler",
        "warmup_steps",
        "max_grad_norm",
        "seed",
        "max_length",
        "truncate",
    )


@dataclass
class TrainResult:
    prompt: Prompt  # the best prompt (collapsed), with metrics
    method: PromptMethod  # the trained module (uncollapsed; e.g. with its MLP)
    history: list[dict]
    run_dir: Path | None
    seconds_per_step: float
    peak_memory_bytes: int
    train_seconds: float
    path: Path | None = None  # the prompt file written (with `out`), before any plot
    warnings: list[str] = field(default_factory=list)  # what failed without failing the run (the curves' plot)


# --- checkpoint (de)serialization without pickle -------------------------------------------------------------------


def _pack(obj, tensors: dict, path: str):
    """Replace tensors in a nested structure by references, so the rest can go to JSON."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous().clone()
        return {"__t": path}
    if isinstance(obj, dict):
        return {"__d": [[k, _pack(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_pack(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    return obj


def _unpack(obj, tensors: dict):
    if isinstance(obj, dict) and "__t" in obj:
        return tensors[obj["__t"]]
    if isinstance(obj, dict) and "__d" in obj:
        return {k: _unpack(v, tensors) for k, v in obj["__d"]}
    if isinstance(obj, list):
        return [_unpack(v, tensors) for v in obj]
    return obj


def peak_memory_bytes(device) -> int:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    # ru_maxrss is KiB on Linux, bytes on macOS
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _launch(acc, base) -> bool:
    """Whether the base is sharded (FSDP launches: `softprompt.sharding`, done here before anything runs on it, so
    that every process makes the same forwards from then on), after refusing DeepSpeed launches."""
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.DEEPSPEED:
        raise ConfigError(
            "softprompt does not train under DeepSpeed: its engine would partition the prompt (the only trainable "
            "tensor), while the frozen base model stays whole on every process.",
            "to shard the base model, launch with FSDP instead: `accelerate launch --use_fsdp --fsdp_version 2 "
            "--num_processes N -m softprompt train ...`; for data parallelism alone, `--multi_gpu` (README: "
            "'Training on several GPUs or machines').",
        )
    if not (sharding_requested(acc) and acc.num_processes > 1):
        return False
    shard_base(base, **launch_options(acc))
    return True


def _optimizer(c: TrainConfig, params: list):
    """AdamW or Adafactor over `params`, and the learning-rate schedule of `c`."""
    from transformers import get_scheduler

    if c.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
    else:
        from transformers.optimization import Adafactor

        optimizer = Adafactor(
            params, lr=c.lr, scale_parameter=False, relative_step=False, warmup_init=False, weight_decay=c.weight_decay
        )
    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[c.scheduler]
    return optimizer, get_scheduler(name, optimizer, num_warmup_steps=c.warmup_steps, num_training_steps=c.steps)


def init_context(base, task: Task, seed: int, examples=None) -> InitContext:
    """What a method initializes from: the model, the task's verbalizers and its training text (capped), seeded.

    examples: the train split's examples when the caller has them already (a streamed split is read again otherwise).
    """
    examples = examples if examples is not None else task.examples("train", seed)
    return InitContext(base, task.spec.verbalizers, examples.texts(5000), seed=seed)


def is_main_process() -> bool:
    """Whether this process writes files and prints: the only one, or the first of an `accelerate launch`/`torchrun`."""
    from accelerate import PartialState

    return PartialState().is_main_process


class Trainer:
    """Trains one method on one task. Use `train()` unless you need the pieces.

    eval_seed: the seed of the fixed evaluation subset (default: the training seed; the benchmark fixes it).
    examples: the task's train split as `task.examples("train", seed)` gives it, when the caller has read it already.
    """

    def __init__(
        self,
        base,
        task: Task,
        method: str = "soft",
        method_config: MethodConfig | dict | None = None,
        config: TrainConfig | None = None,
        run_dir: str | Path | None = None,
        resume: bool = True,
        accelerator=None,
        trainable: PromptMethod | None = None,
        eval_seed: int | None = None,
        out: str | Path | None = None,
        overwrite: bool = True,
        examples=None,
    ):
        self.base, self.task, self.config = base, task, config or TrainConfig()
        # where the prompt goes, checked before any training time is spent (and again when it is written)
        self.out = check_replace(out, overwrite, base) if out is not None else None
        self.overwrite, self.warnings = overwrite, []
        if run_dir and Path(run_dir).exists() and not Path(run_dir).is_dir():
            raise StorageError(
                f"The run directory {run_dir} is a file, not a folder.", "pass another --run-dir (a folder)."
            )
        if accelerator is None:
            from accelerate import Accelerator

            accelerator = Accelerator(cpu=base.device.type == "cpu")
        self.acc = accelerator
        self.sharded = _launch(accelerator, base)
        self.run_dir = Path(run_dir) if run_dir else None
        c = self.config
        self.enc = Encoder(task.spec, base, c.truncate, c.max_length)
        # in memory, or streamed when the spec says `streaming: true`; `examples`: the caller read them already
        self.examples = examples if examples is not None else task.examples("train", c.seed)
        if trainable is None:
            trainable = build_method(method, method_config, init_context(base, task, c.seed, self.examples))
        self.method, self.method_name = trainable, trainable.name
        replicate(trainable)  # every process starts from the first one's prompt (and keeps it: gradients averaged)
        if c.lr is None:
            self.config = c = dataclasses.replace(c, lr=type(trainable).default_lr)
        self.optimizer, self.scheduler = _optimizer(c, [p for p in trainable.parameters() if p.requires_grad])
        self.limit = c.max_length or base.max_positions
        base.check_max_length(c.max_length)
        self.step, self.history = 0, []
        self.best: Injection | None = None
        self.best_metric = -math.inf
        self.metric_name = primary_metric(task.spec)
        self.has_eval = task.has_split(c.eval_split)
        self.eval_seed = c.seed if eval_seed is None else eval_seed
        self.identity = {
            "task": self.label,
            "method": self.method_name,
            "method_config": trainable.config.to_dict(),
            "base": base.fingerprint.config_hash + ":" + base.fingerprint.embedding_sha256[:16],
            "train": {k: getattr(c, k) for k in TrainConfig.IDENTITY},
        } | self.identity_extra()
        if resume and self.run_dir and (self.run_dir / CHECKPOINT).exists():
            self._load_checkpoint()
        self._check_same_step()

    def identity_extra(self) -> dict:
        """Options of a subclass's run that a checkpoint must share to resume it (none here)."""
        return {}

    @property
    def label(self) -> str:
        """What this run trains on, in its identity, progress bar and plot title."""
        return self.task.name

    @property
    def is_main(self) -> bool:
        return self.acc.is_main_process

    def _check_same_step(self) -> None:
        if self.acc.num_processes > 1:
            steps = self.acc.gather(torch.tensor([self.step], device=self.acc.device))
            if len(set(steps.tolist())) > 1:
                raise ConfigError(
                    f"The processes resume from different steps {steps.tolist()}: only some of them see "
                    f"the checkpoint in {self.run_dir}.",
                    "put --run-dir on storage that every machine shares, or start over with --no-resume.",
                )

    # --- data ---------------------------------------------------------------------------------------------------
    def micro_batch(self, step: int, micro: int) -> list[Example]:
        """The micro-batch `micro` of optimizer step `step` for this process (fitted to the prompt's shape)."""
        c, world, rank = self.config, self.acc.num_processes, self.acc.process_index
        k = (step * c.grad_accum + micro) * world + rank  # index in the global stream of micro-batches
        return [self.example(k * c.batch_size + i) for i in range(c.batch_size)]

    def example(self, g: int) -> Example:
        """Row g of the training stream, formatted and fitted around the prompt."""
        return self.enc.training_example(*self.examples.get(g), self._shape)

    # --- steps --------------------------------------------------------------------------------------------------
    def loss(self, batch: list[Example]) -> torch.Tensor:
        injection = self.method()  # the live prompt, with its graph back to the method's parameters
        return self.base.family.loss([dataclasses.replace(e, injection=injection) for e in batch])

    def evaluate(self, injection: Injection | None, limit: int | None) -> dict:
        return evaluate(self.base, self.task, injection, **self.eval_options(limit))

    def eval_options(self, limit: int | None) -> dict:
        """`evaluate`'s options for this run's evaluations of `limit` rows (None: the whole split)."""
        c = self.config
        return {
            "split": c.eval_split,
            "limit": limit,
            "batch_size": c.eval_batch_size,
            "truncate": c.truncate,
            "seed": self.eval_seed,
            "max_length": c.max_length,
        }

    def progress(self) -> dict[str, str]:
        """What the progress bar shows after an evaluation."""
        return {self.metric_name: f"{self.best_metric:.3f}"}

    def _log(self, record: dict) -> None:
        self.history.append(record)
        if self.run_dir and self.is_main:
            path = self.run_dir / "metrics.jsonl"
            try:
                with open(path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:
                raise storage_error(e, path, "write") from e

    def _eval_and_keep_best(self) -> None:
        current = self.method.collapse()
        metrics = self.evaluate(current, self.config.eval_limit)
        self._log({"step": self.step, "eval": metrics})
        if metrics[self.metric_name] > self.best_metric:
            self.best_metric, self.best = metrics[self.metric_name], current

    def _start(self) -> None:
        """Before the first step: the prompt's shape, the run folder, checkpointing."""
        c = self.config
        self.method.train()
        self._shape = self.method.collapse()  # what the examples are fitted around
        if self.limit is not None and self._shape.num_positions >= self.limit:
            raise ConfigError(
                f"The prompt takes {self._shape.num_positions} positions, which leaves no room for text "
                f"in the context of {self.limit} positions (the model's, or --max-length).",
                "use fewer --num-virtual-tokens, or a larger --max-length (up to the model's context).",
            )
        if self.run_dir and self.is_main:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise storage_error(e, self.run_dir / "metrics.jsonl", "write") from e
            atomic_write_text(self.run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.history))
        if self.sharded:
            self._log_sharding()
        if c.gradient_checkpointing:
            self.base.family.enable_gradient_checkpointing()

    def _log_sharding(self) -> None:
        """Record what each process holds of the sharded base: {"step", "sharding": {"processes", "local_bytes" (one
        per process), "total_bytes"}}."""
        reshard(self.base)  # gathered weights (kept after a forward by some groups) are freed: the shards remain
        local = self.acc.gather(torch.tensor([self.base.local_bytes()], device=self.acc.device)).tolist()
        sharding = {"processes": self.acc.num_processes, "local_bytes": local, "total_bytes": self.base.num_bytes()}
        self._log({"step": self.step, "sharding": sharding})

    def _step(self) -> float:
        """One optimizer step over `grad_accum` micro-batches; returns the step's mean loss (over all processes)."""
        c, acc = self.config, self.acc
        total = 0.0
        params = [p for p in self.method.parameters() if p.requires_grad]
        for micro in range(c.grad_accum):
            loss = self.loss(self.micro_batch(self.step, micro)) / c.grad_accum
            acc.backward(loss)
            total += loss.item()
        if acc.num_processes > 1:
            average_gradients(params)  # one all-reduce per step: every process then takes the same step
            # every process logs (and stops on NaN) alike: the mean loss of the step's global batch
            total = acc.reduce(torch.tensor(total, device=acc.device), reduction="mean").item()
        if not math.isfinite(total):
            raise TrainingError(
                f"The loss became {total} at step {self.step + 1}; the last good checkpoint is kept"
                f"{' in ' + str(self.run_dir) if self.run_dir else ''}.",
                "lower --lr, raise --warmup-steps, or use float32 (--dtype float32).",
            )
        if c.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm)  # the prompt's own: whole on every process
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self._check_finite()
        return total

    def _check_finite(self) -> None:
        """Stop when the prompt's parameters stopped being numbers (the loss can stay finite for a step after)."""
        bad = [n for n, p in self.method.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:
            raise TrainingError(
                f"The prompt's parameters {bad} became NaN or infinite at step {self.step}; the last good "
                f"checkpoint is kept{' in ' + str(self.run_dir) if self.run_dir else ''}.",
                "lower --lr, raise --warmup-steps, keep --max-grad-norm on, or use float32 (--dtype float32).",
            )

    def _after_step(self, window: list[float], elapsed: float, bar, ema: float) -> list[float]:
        """Log, evaluate and checkpoint as the options say; returns the losses still to log."""
        c = self.config
        if c.log_every and (self.step % c.log_every == 0 or self.step == c.steps):
            # the mean since the last record: single-batch losses are too noisy to read a curve from
            self._log(
                {
                    "step": self.step,
                    "loss": sum(window) / len(window),
                    "lr": self.scheduler.get_last_lr()[0],
                    "elapsed": elapsed,
                }
            )
            window = []
        if self.has_eval and ((c.eval_every and self.step % c.eval_every == 0) or self.step == c.steps):
            self._eval_and_keep_best()
            bar.set_postfix(loss=f"{ema:.3f}", **self.progress())
        else:
            bar.set_postfix(loss=f"{ema:.3f}")
        bar.update(1)
        if self.run_dir and c.checkpoint_every and (self.step % c.checkpoint_every == 0 or self.step == c.steps):
            self._save_checkpoint()
        return window

    def run(self) -> TrainResult:
        from tqdm.auto import tqdm

        lock = acquire_lock(self.run_dir) if self.run_dir and self.is_main else None
        try:
            return self._run(tqdm)
        finally:
            if lock is not None:
                release_lock(lock)

    def _run(self, tqdm) -> TrainResult:
        c = self.config
        self._start()
        bar = tqdm(
            total=c.steps,
            initial=self.step,
            desc=f"train {self.label}/{self.method_name}",
            disable=not (c.progress and self.is_main),
            dynamic_ncols=True,
        )
        t0, start_step, ema, window = time.perf_counter(), self.step, None, []
        try:
            while self.step < c.steps:
                total = self._step()
                ema = total if ema is None else 0.9 * ema + 0.1 * total
                window = self._after_step(window + [total], time.perf_counter() - t0, bar, ema)
        finally:
            bar.close()
            if c.gradient_checkpointing:
                self.base.family.disable_gradient_checkpointing()
            self.method.eval()
        train_seconds = time.perf_counter() - t0
        steps_done = self.step - start_step
        return TrainResult(
            self._finish(),
            self.method,
            self.history,
            self.run_dir,
            train_seconds / steps_done if steps_done else float("nan"),
            peak_memory_bytes(self.base.device),
            train_seconds,
            self._saved,
            self.warnings,
        )

    def _finish(self) -> Prompt:
        """The best prompt with its final evaluations; the curves written."""
        c = self.config
        if self.best is None:
            self.best = self.method.collapse()
        prompt = self._prompt()
        if c.final_eval and self.has_eval:
            if c.zero_shot:
                prompt.metrics["zero_shot"] = {**self.evaluate(None, c.final_eval_limit), "split": c.eval_split}
            prompt.metrics[c.eval_split] = {**self.evaluate(self.best, c.final_eval_limit), "split": c.eval_split}
        self._saved = self._save(prompt) if self.out and self.is_main else None
        self._plot()
        return prompt

    def _plot(self) -> None:
        """The curves, after the prompt files: a plot that fails is a warning, never a lost run."""
        if self.run_dir and self.is_main:
            from .plots import plot_history

            try:
                plot_history(self.history, self.run_dir / "curves.png", title=f"{self.label} / {self.method_name}")
            except Exception as e:  # noqa: BLE001 - matplotlib fails in many ways; none may cost the prompt
                self._warn(f"the training curves {self.run_dir / 'curves.png'} were not written: {_reason(e)}")

    def _save(self, prompt: Prompt) -> Path:
        """Write the prompt to `out`. A file that appeared there during training (without overwrite) is kept, and the
        prompt goes next to it instead, with an error naming both: a finished run is never thrown away."""
        if self.overwrite or not self.out.exists():
            return prompt.save(self.out, overwrite=self.overwrite)
        aside = prompt.save(self.out.with_name(f"{self.out.stem}.{time.strftime('%Y%m%d-%H%M%S')}{self.out.suffix}"))
        raise StorageError(
            f"{self.out} appeared while training and was not replaced; this run's prompt is saved as {aside}.",
            f"compare the two and move {aside} over it if you want it (or train with --overwrite).",
        )

    def _warn(self, message: str) -> None:
        self.warnings.append(message)
        print(f"softprompt: warning: {message}", file=sys.stderr)

    def _prompt(self) -> Prompt:
        metrics = {"best_during_training": self._best_eval()} if self.has_eval else {}
        return self._prompt_for(self.best, self.task.spec, metrics)

    def _prompt_for(self, injection: Injection, spec, metrics: dict) -> Prompt:
        """A prompt file's contents: `injection` for the task `spec`, with this run's method, options and steps."""
        return Prompt.for_base(
            self.base,
            injection,
            self.method_name,
            self.method.config.to_dict(),
            spec,
            trainable_parameters=self.method.num_trainable(),
            metrics=metrics,
            train={k: v for k, v in asdict(self.config).items() if k != "progress"} | {"steps_done": self.step},
        )

    def _best_eval(self) -> dict:
        """The in-training evaluation that picked the prompt (the first best in the history): its metrics, row count
        `n` and split."""
        evals = [r["eval"] for r in self.history if "eval" in r]
        if not evals:
            return {self.metric_name: self.best_metric, "split": self.config.eval_split}
        return {**max(evals, key=lambda m: m[self.metric_name]), "split": self.config.eval_split}

    # --- checkpoints --------------------------------------------------------------------------------------------
    def _save_checkpoint(self) -> None:
        if not self.is_main:
            self.acc.wait_for_everyone()
            return
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        state = {
            "identity": self.identity,
            "step": self.step,
            "history": self.history,
            "best_metric": self.best_metric,
            "best": None if self.best is None else {**self.best.tensors(), "kv_positions": self.best.kv_positions},
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng,
        }
        tensors: dict[str, torch.Tensor] = {}
        meta = _pack(state, tensors, "s")
        # Written to a temporary file and renamed: a kill mid-write leaves the previous checkpoint intact.
        write_safetensors(self.run_dir / CHECKPOINT, tensors, meta)
        self.acc.wait_for_everyone()

    def _same_run(self, saved: dict) -> bool:
        """Whether a checkpoint's identity is this run's. A method option added since the checkpoint was written
        (absent from its config) counts at its default, so that upgrading softprompt keeps a killed run resumable."""
        try:
            config = type(self.method.config).from_dict(saved.get("method_config", {})).to_dict()
        except (ConfigError, TypeError):  # an option since removed, or a value no longer allowed
            return False
        return json.loads(json.dumps({**saved, "method_config": config})) == json.loads(json.dumps(self.identity))

    def _load_checkpoint(self) -> None:
        try:
            tensors, meta = read_safetensors(self.run_dir / CHECKPOINT, what="checkpoint")
            state = _unpack(meta, tensors)
        except (PromptFileError, KeyError, TypeError, ValueError) as e:
            problem = (
                e.problem
                if isinstance(e, PromptFileError)
                else f"{self.run_dir / CHECKPOINT} is not a softprompt checkpoint ({type(e).__name__}: {e})."
            )
            raise PromptFileError(problem, "pass --no-resume to start over (or another --run-dir).") from e
        if not self._same_run(state["identity"]):
            raise ConfigError(
                f"{self.run_dir} holds a checkpoint of a different run (task, method, model or training "
                "options differ).",
                "use another --run-dir, or --no-resume to start over there.",
            )
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.step, self.history, self.best_metric = state["step"], state["history"], state["best_metric"]
        b = state["best"]
        self.best = None if b is None else Injection.from_tensors(b, b["kv_positions"]).to(self.base.device)


def _reason(e: BaseException) -> str:
    return " ".join((e.problem if isinstance(e, StorageError) else f"{type(e).__name__}: {e}").split())


def train(
    base,
    task: Task,
    method: str = "soft",
    method_config: MethodConfig | dict | None = None,
    config: TrainConfig | None = None,
    run_dir: str | Path | None = None,
    resume: bool = True,
    accelerator=None,
    out: str | Path | None = None,
    overwrite: bool = True,
) -> TrainResult:
    """Train a prompt of `method` on `task` with the frozen `base`; returns the best prompt and the run's record.

    out: write the prompt file there as soon as training ends, before the curves are plotted (`TrainResult.path`);
    with overwrite=False an existing file is refused before training starts.
    """
    return Trainer(
        base, task, method, method_config, config, run_dir, resume, accelerator, out=out, overwrite=overwrite
    ).run()
