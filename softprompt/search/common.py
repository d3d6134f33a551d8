"""What both searches share: the search split carved from train, bootstrap intervals, and hard prompt files.

Overfitting guard: searches only look at a seeded "search split" carved from train; the numbers
reported next to the result (and stored in its prompt file) come from a separate dev split.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..data import Split, Task, TaskSpec
from ..errors import ConfigError
from ..evaluate import classification_metrics, classify, subset
from ..injection import EMPTY, Injection
from ..store import Prompt

# --- splits and confidence intervals ------------------------------------------------------------------------------


def search_split(task: Task, size: int, seed: int = 0, min_words: int = 0, split: str = "train") -> Split:
    """A seeded random sample of `size` rows of the train split: what searches may look at.

    min_words: only rows whose input fields hold at least this many words together (SST-2's train
    split is mostly short phrases, its dev split whole sentences).
    """
    if not task.spec.is_classification:
        raise ConfigError(
            f"Task '{task.name}' is a generation task; hard prompt search scores classification tasks.",
            "pass a task with `labels:`.",
        )
    if not task.has_split(split):
        raise ConfigError(
            f"Task '{task.name}' has no '{split}' split to search on.",
            f"add a `{split}:` file to the task spec; search never looks at the dev split.",
        )
    rows = task.split(split)
    if min_words:
        cols = [task.spec.column(f) for f in task.spec.template_fields]
        rows = rows.subset(i for i, r in enumerate(rows.rows) if sum(len(str(r[c]).split()) for c in cols) >= min_words)
        if not len(rows):
            raise ConfigError(
                f"No '{split}' row of task '{task.name}' has {min_words} or more words.", "lower --search-min-words."
            )
    return subset(rows, task.spec, size, seed)


def bootstrap_ci(correct, samples: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the accuracy: rows resampled with replacement `samples` times."""
    correct = np.asarray(correct, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = correct[rng.integers(0, len(correct), size=(samples, len(correct)))].mean(1)  # (samples,)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def scored_metrics(scores: torch.Tensor, gold: list[int], seed: int = 0) -> dict:
    """Accuracy and macro-F1 (as `evaluate` reports them) plus a 95% bootstrap interval of the accuracy."""
    m = classification_metrics(scores, gold)
    m["accuracy_ci95"] = list(bootstrap_ci((scores.argmax(-1) == torch.tensor(gold)).numpy(), seed=seed))
    return m


def score_spec(
    base,
    task: Task,
    spec: TaskSpec,
    data: Split,
    injection: Injection = EMPTY,
    batch_size: int = 32,
    progress: bool = False,
    truncate: str = "error",
    max_length: int | None = None,
) -> dict:
    return scored_metrics(*classify(base, task, spec, data, injection, batch_size, truncate, progress, max_length))


def dev_split(task: Task, split: str = "dev", limit: int | None = None, seed: int = 0) -> Split:
    return subset(task.split(split), task.spec, limit, seed)


# --- hard prompt files --------------------------------------------------------------------------------------------


def hard_prompt(base, spec: TaskSpec, search: dict, metrics: dict) -> Prompt:
    """A prompt file of method `hard`: no tensors, the found template and label words in its task spec."""
    return Prompt.for_base(base, EMPTY, "hard", {"num_virtual_tokens": 0, **search}, spec, metrics=metrics)


def with_template(spec: TaskSpec, template: str, words: list[str] | None = None) -> TaskSpec:
    """`spec` with another template and (optionally) other label words, one per class in class order."""
    labels = spec.labels if words is None else dict(zip(spec.class_names, words))
    return dataclasses.replace(spec, template=template, labels=labels)
