"""Seeded, endless streams of (prompt, target) pairs over a split: what training draws from.

In memory (`ShuffledExamples`: a fresh permutation every epoch) or streamed with `datasets`
(`StreamedExamples`: a shuffle buffer), both addressable by example index, so that a resumed run
draws what an uninterrupted one would have.
"""

from __future__ import annotations

import itertools
import random

import torch

from ..errors import DataError


def pick_reference(references: list[str], seed: int, j: int) -> str:
    """The reference example j trains on, of a row with several (`references_column`): drawn by (seed, j), so a run
    and its resumption pick the same ones, and a row seen in several epochs trains on different references."""
    if len(references) == 1:
        return references[0]
    return references[random.Random(f"{seed}/{j}").randrange(len(references))]  # a str seed hashes the same anywhere


class ShuffledExamples:
    """Example j of a seeded stream over an in-memory split: a fresh permutation every epoch.

    split: a `tasks.Split` (its `prompts` and `targets`); tasks.py makes the streams, so this module names no task type.
    """

    def __init__(self, split, seed: int):
        self.split, self.seed = split, seed
        self._perms: dict[int, torch.Tensor] = {}

    def get(self, j: int) -> tuple[str, str]:
        """(prompt, target) of the j-th example."""
        n = len(self.split)
        epoch, pos = divmod(j, n)
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(n, generator=g)}
        i = int(self._perms[epoch][pos])
        refs = self.split.references
        return self.split.prompts[i], self.split.targets[i] if refs is None else pick_reference(refs[i], self.seed, j)

    def texts(self, n: int) -> list[str]:
        """Up to n prompts and n targets (for initializations that look at the task's words)."""
        return self.split.prompts[:n] + self.split.targets[:n]


class StreamedExamples:
    """Example j of a seeded stream over a split read lazily with `datasets` streaming.

    Rows pass through a shuffle buffer (`shuffle_buffer` rows, reseeded every epoch), so nothing
    but the buffer is held in memory. Access is forward-only: asking for an earlier example than
    the last restarts the stream and skips ahead (which a resumed run does once). Every process
    of a distributed run reads the whole stream and keeps its own micro-batches, so the order of
    examples is the same for any number of processes.

    task: the `tasks.Task` whose split `split` this streams (its rows, column checks and label indices).
    """

    def __init__(self, task, split: str, seed: int):
        self.task, self.name, self.seed = task, split, seed
        self._ds = task._dataset(split, streaming=True).shuffle(seed=seed, buffer_size=task.spec.shuffle_buffer)
        self._it, self._next, self._epoch = None, 0, -1  # iterator over the current epoch; index of its next row
        self._epoch_start = 0  # stream index of the current epoch's first row

    def _rows(self, epoch: int):
        self._ds.set_epoch(epoch)
        for n, row in enumerate(self._ds):
            if n == 0:
                self.task.check_columns(self.name, row)
            yield row

    def _advance(self) -> dict:
        while True:
            if self._it is None:
                self._epoch += 1
                self._epoch_start = self._next
                self._it = self._rows(self._epoch)
            try:
                row = next(self._it)
            except StopIteration:
                if self._next == self._epoch_start:
                    self.task.check_columns(self.name, None)  # an empty split: raises
                self._it = None
                continue
            except DataError:
                raise
            except Exception as e:  # parse errors surface while streaming, in the types of the format's reader
                raise DataError(
                    f"Could not read split '{self.name}' of task '{self.task.name}' while streaming: "
                    f"{type(e).__name__}: {e}",
                    "check the data file (or hub dataset) it names.",
                ) from e
            self._next += 1
            return row

    def _pair(self, n: int, row: dict) -> tuple[str, str]:
        spec, task = self.task.spec, self.task
        prompt = task.render_row(self.name, n, row)
        if spec.is_classification:
            return prompt, list(spec.labels.values())[task.label_index(self.name, n, row)]
        return prompt, pick_reference(task.references(self.name, n, row), self.seed, n)

    def get(self, j: int) -> tuple[str, str]:
        """(prompt, target) of the j-th example; rows before it are skipped without rendering."""
        if j < self._next:
            self._it, self._next, self._epoch = None, 0, -1
        while self._next < j:
            self._advance()
        return self._pair(j, self._advance())

    def texts(self, n: int) -> list[str]:
        """Prompts and targets of the split's first n rows (in file order, as `ShuffledExamples.texts`)."""
        rows = list(itertools.islice(self.task._dataset(self.name, streaming=True), n))
        self.task.check_columns(self.name, rows[0] if rows else None)
        pairs = [self._pair(i, r) for i, r in enumerate(rows)]
        return [p for p, _ in pairs] + [t for _, t in pairs]
