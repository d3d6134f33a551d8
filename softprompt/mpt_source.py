"""MPT's source stage: one shared prompt trained with each task's rank-r factors on several tasks at once.

Wang et al. 2023, "Multitask Prompt Tuning Enables Parameter-Efficient Transfer Learning" (the method:
`softprompt.methods.mpt`). Row g of the training stream comes from source task g mod T, is formatted by that
task's template and runs with that task's prompt P_k = P* ∘ (U_k @ V_k): one backward pass updates P* from every
task's rows and U_k, V_k from task k's rows only. It is `Trainer`'s loop (steps, accumulation, schedule, clipping,
checkpoints and resume, several processes); only the rows, the loss's prompts, the evaluations and the output differ.

The run writes one folder, a prompt store (`softprompt serve --store FOLDER` serves it as is):
- TASK.safetensors per source task: its collapsed prompt P_k (P, D), with its final evaluation;
- source/mpt-source.safetensors: P*, every U_k and V_k, the task names and the base's fingerprint, which a target
  task starts from (`softprompt train --task TARGET --method mpt --init source --init-source
  FOLDER/source/mpt-source.safetensors`).

Distillation (section 3.1, optional): with a teacher prompt per source task (a prompt file of this base model trained
on that task alone, any method), the loss adds weight * T^2 * KL(teacher || student) of the softened (temperature T)
next-token distributions at every target token, the paper's L_Logits. Its L_Hidden (a mean squared error between
the teacher's and the student's hidden states) is not implemented: the families hand over target logits, and
hidden states differ in kind between them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import Encoder, Task
from .errors import ConfigError, check_positive
from .evaluate import evaluate, primary_metric
from .families import mean_nll
from .injection import Injection
from .methods import InitContext
from .methods.mpt import MultitaskPrompt, MultitaskPromptConfig
from .store import Prompt, check_replace, load_prompt
from .train import TrainConfig, Trainer, TrainResult

SOURCE_FILE = "source/mpt-source.safetensors"  # in a subfolder: not one of the store's tasks


@dataclass
class Distillation:
    """Teacher prompts (source task name -> prompt file of this base model) and the KL term's weight and temperature."""

    teachers: dict[str, str] = field(default_factory=dict)
    distill_weight: float = 1.0
    distill_temperature: float = 1.0

    def __post_init__(self):
        check_positive(self, "distill_weight", "distill_temperature")


class SourceTrainer(Trainer):
    """Trains a `MultitaskPrompt` on `tasks` (two or more) together; `out` is the folder it writes."""

    def __init__(
        self,
        base,
        tasks: list[Task],
        method_config: MultitaskPromptConfig | dict | None = None,
        config=None,
        run_dir: str | Path | None = None,
        resume: bool = True,
        accelerator=None,
        out: str | Path | None = None,
        overwrite: bool = True,
        distill: Distillation | None = None,
    ):
        self.tasks = _check_tasks(tasks)
        self.distill = distill or Distillation()
        names = [t.name for t in self.tasks]
        c = config or TrainConfig()
        cfg = MultitaskPromptConfig.from_dict(method_config) if isinstance(method_config, dict) else method_config
        cfg = dataclasses.replace(cfg or MultitaskPromptConfig(), num_tasks=len(self.tasks))
        # every file the run will write, refused now (not after the training time is spent) when it may not be replaced
        self.out_dir = None if out is None else Path(out)
        for path in output_files(self.out_dir, names) if out is not None else []:
            check_replace(path, overwrite, base)
        self.streams = [t.examples("train", c.seed) for t in self.tasks]
        words = list(dict.fromkeys(w for t in self.tasks for w in t.spec.verbalizers or []))
        texts = [s for stream in self.streams for s in stream.texts(5000 // len(self.tasks))]
        trainable = MultitaskPrompt(cfg, InitContext(base, words, texts, seed=c.seed))
        super().__init__(
            base,
            self.tasks[0],
            config=c,
            run_dir=run_dir,
            resume=resume,
            accelerator=accelerator,
            trainable=trainable,
            examples=self.streams[0],
        )
        self.teachers = self._teachers(base, names)
        self.encs = [self.enc, *(Encoder(t.spec, base, c.truncate, c.max_length) for t in self.tasks[1:])]
        self.has_eval = any(t.has_split(c.eval_split) for t in self.tasks)
        self.metrics = {t.name: primary_metric(t.spec) for t in self.tasks}  # what the progress bar shows per task
        self.last_eval: dict[str, dict] = {}
        self.prompts: list[Prompt] = []  # every source task's, once the run has finished

    @property
    def label(self) -> str:
        return "+".join(t.name for t in self.tasks)

    def identity_extra(self) -> dict:
        return {"distill": dataclasses.asdict(self.distill)} if self.distill.teachers else {}

    def _teachers(self, base, names: list[str]) -> dict[int, Injection]:
        """Task index -> its teacher's prompt, each file checked against the base model."""
        unknown = sorted(set(self.distill.teachers) - set(names))
        if unknown:
            raise ConfigError(
                f"Teacher prompts were given for {unknown}, which are not source tasks of this run ({names}).",
                "pass --teacher TASK=FILE for source tasks only.",
            )
        return {
            names.index(name): load_prompt(path, base).injection.to(base.device)
            for name, path in self.distill.teachers.items()
        }

    def _start(self) -> None:
        super()._start()
        for k, teacher in self.teachers.items():  # the rows are fitted around the student's prompt
            if teacher.num_positions > self._shape.num_positions:
                raise ConfigError(
                    f"The teacher prompt of {self.tasks[k].name} takes {teacher.num_positions} positions, more than "
                    f"this run's {self._shape.num_positions}: long rows would not fit it.",
                    f"pass --num-virtual-tokens {teacher.num_positions} (or more), or a shorter teacher.",
                )

    def example(self, g: int):
        """Row g of the training stream: (its task's index, the example formatted by that task's template)."""
        i, k = divmod(g, len(self.tasks))
        return k, self.encs[k].training_example(*self.streams[k].get(i), self._shape)

    def loss(self, batch) -> torch.Tensor:
        prompts = {k: self.method(k) for k in sorted({k for k, _ in batch})}  # each task's live prompt, built once
        rows = [dataclasses.replace(e, injection=prompts[k]) for k, e in batch]
        if not self.teachers:
            return self.base.family.loss(rows)
        logits, targets, mask = self.base.family.target_logits(rows)  # (B, K, V), (B, K), (B, K)
        return mean_nll(logits, targets, mask) + self._distillation(batch, logits, mask)

    def _distillation(self, batch, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """weight * T^2 * KL(teacher || student) of the distributions softened by T, summed over the target tokens of
        the rows whose task has a teacher and divided by all the batch's target tokens (as the NLL is)."""
        d, taught = self.distill, [i for i, (k, _) in enumerate(batch) if k in self.teachers]
        if not taught:
            return logits.new_zeros(())
        with torch.no_grad():
            rows = [dataclasses.replace(batch[i][1], injection=self.teachers[batch[i][0]]) for i in taught]
            teacher, _, teacher_mask = self.base.family.target_logits(rows)  # (b, K', V), _, (b, K')
        # the target tokens in row order (N, V): a family may place a row's targets anywhere in its batch's K slots
        student = logits[taught][mask[taught].bool()].float()
        teacher = teacher[teacher_mask.bool()].float()
        T = d.distill_temperature
        kl = F.kl_div((student / T).log_softmax(-1), (teacher / T).log_softmax(-1), log_target=True, reduction="sum")
        return d.distill_weight * T * T * kl / mask.sum()

    def _evaluations(self, limit: int | None) -> dict[str, dict]:
        """Each source task's metrics with its own prompt P_k, on the task's eval split (where it has one)."""
        split = self.config.eval_split
        return {
            t.name: evaluate(self.base, t, self.method.collapse(k), **self.eval_options(limit))
            for k, t in enumerate(self.tasks)
            if t.has_split(split)
        }

    def _eval_and_keep_best(self) -> None:
        # no best step: the source tasks' metrics (accuracy, BLEU) share no scale to pick one by; the last step's
        # prompt is kept, as in the paper's source stage
        self.last_eval = self._evaluations(self.config.eval_limit)
        self._log({"step": self.step, "eval_tasks": self.last_eval})

    def progress(self) -> dict[str, str]:
        return {name: f"{m[self.metrics[name]]:.3f}" for name, m in self.last_eval.items()}

    def _finish(self) -> Prompt:
        """Every source task's prompt with its final evaluation, and the source file, written to `out`."""
        c = self.config
        final = self._evaluations(c.final_eval_limit) if c.final_eval else {}
        self.prompts = [
            self._prompt_for(
                self.method.collapse(k),
                t.spec,
                {c.eval_split: {**final[t.name], "split": c.eval_split}} if t.name in final else {},
            )
            for k, t in enumerate(self.tasks)
        ]
        self._saved = None
        if self.out_dir is not None and self.is_main:
            names = [t.name for t in self.tasks]
            *files, source = output_files(self.out_dir, names)
            for prompt, path in zip(self.prompts, files):
                prompt.save(path)
            self.method.save_source(source, self.base, names)
            self._saved = self.out_dir
        self._plot()
        return self.prompts[0]


def output_files(out: str | Path, names: list[str]) -> list[Path]:
    """What a source run writes into the folder `out`: each task's prompt file, in task order, then `SOURCE_FILE`."""
    return [*(Path(out) / f"{name}.safetensors" for name in names), Path(out) / SOURCE_FILE]


def _check_tasks(tasks: list[Task]) -> list[Task]:
    names = [t.name for t in tasks]
    if len(tasks) < 2:
        raise ConfigError(
            f"MPT's source stage trains one shared prompt on several tasks; got {len(tasks)} ({names}).",
            "pass two or more tasks (--tasks A B ...), or train one task with --method mpt --task NAME.",
        )
    if len(set(names)) != len(names):
        raise ConfigError(f"The source tasks {names} name a task twice.", "pass each task once.")
    for t in tasks:
        t.check_split("train")
    return list(tasks)


def train_source(base, tasks: list[Task], *args, **kwargs) -> TrainResult:
    """MPT's source stage over `tasks` (`SourceTrainer`'s arguments); writes each task's prompt and `SOURCE_FILE`
    into the folder `out`."""
    return SourceTrainer(base, tasks, *args, **kwargs).run()
