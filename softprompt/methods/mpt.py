"""Multitask prompt tuning (MPT).

Wang, Panda, Karlinsky, Feris, Sun & Kim 2023, "Multitask Prompt Tuning Enables Parameter-Efficient
Transfer Learning" (ICLR 2023; arXiv:2303.02861). The prompt of task k is a shared prompt times a
rank-r task matrix, element by element:

    P_k = P* ∘ (U_k @ V_k)        P* (P, D),  U_k (P, r),  V_k (r, D)

Source stage: P* and every U_k, V_k are trained together on several source tasks (`softprompt.mpt`),
so that P* keeps what the tasks share. Target stage: a new task starts from P* and the source tasks'
factors (their average, one task's, or fresh ones), and trains all three; its prompt file holds the
collapsed P_k (P, D), a soft prompt like any other, so serving, PEFT export and transfer need
nothing new.

Shapes: shared (P, D), cols (T, P, r), rows (T, r, D) -> Injection.embeds (P, D) for task t.

U_k @ V_k starts at 1 (plus 0.02 noise to break the symmetry between ranks), so P_k starts at the
shared prompt's own initialization (class labels, vocab, ...). PEFT's MultitaskPromptTuning draws
both factors from N(0, 0.02), which starts every task prompt near zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, PromptFileError, check_at_least
from ..injection import Injection
from .method import PROMPT_HELP, InitContext, MethodConfig, PromptMethod

INITS = ("auto", "random", "vocab", "text", "labels", "prompt", "source")
SOURCE_FORMAT = "softprompt-mpt-source"
SOURCE_TASK_HELP = (
    "which source factors start a target task from --init-source: average (each factor's mean over the source "
    "tasks, PEFT's AVERAGE_SOURCE_TASKS), shared (the shared prompt alone, fresh factors), or a source task's name"
)


@dataclass
class MultitaskPromptConfig(MethodConfig):
    num_tasks: int = field(default=1, metadata={"help": "tasks T whose prompts share one prompt (1: a target task)"})
    rank: int = field(default=1, metadata={"help": "rank r of each task's multiplicative update U @ V"})
    init: str = field(
        default="auto",
        metadata={
            "help": "initialization of the shared prompt: as --method soft's (random, vocab, text, labels, prompt, "
            "auto), or source (the shared prompt and factors of an MPT source run, --init-source)"
        },
    )
    init_text: str | None = field(
        default=None, metadata={"help": "text whose token embeddings start the prompt (init text)"}
    )
    init_prompt: str | None = field(default=None, metadata={"help": PROMPT_HELP})
    init_source: str | None = field(
        default=None,
        metadata={"help": "an MPT source run's source/mpt-source.safetensors (`train --tasks ...`; init source)"},
    )
    source_task: str = field(default="average", metadata={"help": SOURCE_TASK_HELP})

    def __post_init__(self):
        super().__post_init__()
        self.choice("init", INITS)
        check_at_least(self, 1, "num_tasks", "rank")  # integers: check_types (MethodConfig) saw to that
        if (self.init == "source") != (self.init_source is not None):
            raise ConfigError(
                "--init source and --init-source go together.",
                "pass both (--init source --init-source FOLDER/source/mpt-source.safetensors), or neither.",
            )


class MultitaskPrompt(PromptMethod):
    name = "mpt"
    config_class = MultitaskPromptConfig
    default_lr = 3e-2  # soft prompt tuning's: the factors start at 1, so P_k moves like a soft prompt at first
    fills = ("embeds",)

    def __init__(self, config: MultitaskPromptConfig, ctx: InitContext):
        super().__init__(config)
        c = config
        P, T, r = c.num_virtual_tokens, c.num_tasks, c.rank
        if c.init == "source":
            shared, cols, rows = source_factors(c.init_source, ctx, P, T, r, c.source_task)
        else:
            shared = ctx.embeddings(c.init, P, c.init_text, c.init_prompt)
            cols, rows = unit_factors(T, P, r, ctx)
        device = ctx.base.device
        self.shared = nn.Parameter(shared.float().to(device))  # (P, D)
        self.cols = nn.Parameter(cols.float().to(device))  # (T, P, r)
        self.rows = nn.Parameter(rows.float().to(device))  # (T, r, D)

    def forward(self, task: int = 0) -> Injection:
        return Injection(embeds=self.shared * (self.cols[task] @ self.rows[task]))  # (P, D) ∘ (P, r) @ (r, D)

    def save_source(self, path: str | Path, base, tasks: list[str]) -> Path:
        """Write what a target task starts from (`source_factors`): the shared prompt, every task's factors, the
        tasks' names and the base model's fingerprint (safetensors, atomically)."""
        from ..fileio import write_safetensors

        tensors = {"shared": self.shared, "cols": self.cols, "rows": self.rows}
        meta = {
            "format": SOURCE_FORMAT,
            "base": base.fingerprint.to_dict(),
            "tasks": tasks,
            "config": self.config.to_dict(),
        }
        return write_safetensors(path, {k: v.detach().float() for k, v in tensors.items()}, meta)


def unit_factors(T: int, P: int, r: int, ctx: InitContext) -> tuple[torch.Tensor, torch.Tensor]:
    """cols (T, P, r) and rows (T, r, D) whose product is 1 plus noise (0.02, seeded): P_k starts at P*, and the r
    ranks get different gradients (equal ones would stay equal, a rank-1 update in r copies)."""
    cols = 1 + torch.randn(T, P, r, generator=ctx.generator) * 0.02
    rows = (1 + torch.randn(T, r, ctx.hidden_size, generator=ctx.generator) * 0.02) / r
    return cols, rows


def source_factors(path: str | Path, ctx: InitContext, P: int, T: int, r: int, task: str) -> tuple[torch.Tensor, ...]:
    """(shared (P, D), cols (T, P, r), rows (T, r, D)) for a target run from an MPT source file of this base model.

    task: average | shared | a source task's name; the factors are repeated over the T target tasks.
    """
    from ..base import Fingerprint
    from ..fileio import read_safetensors

    tensors, meta = read_safetensors(path, what="MPT source file")
    if meta.get("format") != SOURCE_FORMAT or not {"shared", "cols", "rows"} <= set(tensors):
        raise PromptFileError(
            f"{path} is not an MPT source file (it lacks the shared prompt and the task factors).",
            "pass the source/mpt-source.safetensors that `softprompt train --method mpt --tasks ...` wrote.",
        )
    Fingerprint.from_dict(meta["base"]).check(ctx.base.fingerprint, what=f"MPT source file {path}")
    shared, cols, rows = (tensors[k].float() for k in ("shared", "cols", "rows"))
    if shared.shape[0] != P or cols.shape[-1] != r:
        raise ConfigError(
            f"{path} holds {shared.shape[0]} virtual tokens of rank {cols.shape[-1]}; this run asks for {P} of rank "
            f"{r}.",
            f"pass --num-virtual-tokens {shared.shape[0]} --rank {cols.shape[-1]}.",
        )
    names = list(meta["tasks"])
    if task == "shared":  # only the shared prompt: fresh factors (the start of a new source task)
        return (shared, *unit_factors(T, P, r, ctx))
    if task == "average":
        cols, rows = cols.mean(0, keepdim=True), rows.mean(0, keepdim=True)
    elif task in names:
        k = names.index(task)
        cols, rows = cols[k][None], rows[k][None]
    else:
        raise ConfigError(
            f"--source-task {task!r} is not a task of {path}.", f"use average, shared, or one of {names}."
        )
    return shared, cols.repeat(T, 1, 1), rows.repeat(T, 1, 1)
