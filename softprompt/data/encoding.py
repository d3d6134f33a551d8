"""Texts -> `Example`s for one base model, through its family's conventions (special tokens, the label word's place)."""

from __future__ import annotations

from functools import cached_property

import torch

from ..errors import ConfigError, DataError, InputTooLongError
from ..example import Example
from ..injection import EMPTY, Injection
from .tasks import TaskSpec

TRUNCATIONS = ("error", "left", "right")  # what to do with an input over the limit


class Encoder:
    """Turns a task's texts into `Example`s for one base model, through its family's conventions.

    The family decides the special tokens and where the label word goes; the loss and the scores
    cover target tokens only. Prompt and target are tokenized separately, the same way in
    training, scoring and serving, so the boundary never shifts.
    """

    def __init__(self, spec: TaskSpec, base, truncate: str = "error", max_length: int | None = None):
        if truncate not in TRUNCATIONS:
            raise ConfigError(f"Unknown truncation policy '{truncate}'.", f"use one of {', '.join(TRUNCATIONS)}.")
        base.family.check_spec(spec)
        self.spec, self.family, self.truncate, self.max_length = spec, base.family, truncate, max_length

    @property
    def _prefix(self) -> str:
        # In chat mode the assistant turn starts on its own; no separator before the target.
        return "" if self.spec.chat else self.spec.target_prefix

    def target_ids(self, text: str, eos: bool) -> list[int]:
        return self.family.target_ids(self._prefix + text, eos)

    @cached_property
    def verbalizer_ids(self) -> list[list[int]]:
        ids = [self.target_ids(w, eos=False) for w in self.spec.labels.values()]
        empty = [w for w, v in zip(self.spec.labels.values(), ids) if not v]
        if empty:
            raise ConfigError(
                f"Task '{self.spec.name}': the label word(s) {empty} have no tokens.",
                "give every class a non-empty word in `labels`.",
            )
        return ids

    def fit(self, ids: list[int], slot: int, budget: int | None) -> tuple[list[int], int]:
        """Apply the truncation policy so that the source has at most `budget` tokens; cuts stay before the slot."""
        if budget is None or len(ids) <= budget:
            return ids, slot
        cut = len(ids) - budget
        if self.truncate == "error" or budget <= 0 or cut > slot:
            raise InputTooLongError(
                f"An input of {len(ids)} tokens does not fit the {budget} tokens left by the context, the "
                "virtual tokens and the target.",
                "pass --truncate left (or right), --max-length, or shorten the input.",
            )
        if self.truncate == "left":
            return ids[cut:], slot - cut
        return ids[: slot - cut] + ids[slot:], slot - cut

    def example(
        self, text: str, injection: Injection = EMPTY, reserve: int = 0, target: list[int] | None = None
    ) -> Example:
        """A rendered prompt as an `Example` to score or continue: fitted to what the context leaves after the prompt's
        positions and `reserve` tokens (the target or new tokens); never empty, since the next token is read at the
        slot."""
        ids, slot = self.family.source_ids(text, self.spec.chat)
        budget = self.family.source_budget(injection, reserve, self.max_length)
        ids, slot = self.fit(ids, slot, budget)
        if not ids and injection.num_embeds == 0:
            raise DataError(
                "An input has no tokens (an empty text, and a template that adds none).", "pass a non-empty input."
            )
        return Example(ids, slot, list(target or []), injection)

    def training_example(self, prompt: str, target: str, injection: Injection = EMPTY) -> Example:
        """The example to train on: the target's tokens (generation targets end with EOS, to learn to stop)."""
        tgt = self.target_ids(target, eos=not self.spec.is_classification)
        return self.example(prompt, injection, len(tgt), tgt)


def collate(seqs: list[list[int]], pad_id: int, labels: list[list[int]] | None = None) -> dict:
    """Left-pad a list of token sequences: input_ids, attention_mask (and labels) of shape (B, T)."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, T - len(s) :] = torch.tensor(s)
            mask[i, T - len(s) :] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    if labels is not None:
        lab = torch.full((len(seqs), T), -100, dtype=torch.long)
        for i, target in enumerate(labels):
            if target:
                lab[i, T - len(target) :] = torch.tensor(target)
        out["labels"] = lab
    return out


def frequent_token_ids(tokenizer, texts: list[str], top: int = 5000) -> torch.Tensor:
    """Token ids ranked by frequency in `texts` (special tokens excluded), at most `top` of them."""
    ids = [i for row in tokenizer(texts, add_special_tokens=False)["input_ids"] for i in row]
    counts = torch.bincount(torch.tensor(ids, dtype=torch.long), minlength=len(tokenizer))
    counts[tokenizer.all_special_ids] = 0
    ranked = counts.argsort(descending=True, stable=True)
    return ranked[: min(top, int((counts > 0).sum()))]
