"""Many tasks on one frozen base model: a registry of loaded prompts, and mixed-task batches.

The base model is loaded once; each task is one small prompt file. A request names its task; the
registry formats it with that prompt's own template (`data.Encoder`) and runs rows of different
tasks, methods (soft, prefix, deep, P-tuning, a plain template with no tensors) and numbers of
virtual tokens in one forward pass or one decode loop: the model's family lays out one prompt
per row (`Family.class_scores`, `generate.decode`).

Prompts made of virtual-token embeddings (soft prompts, P-tuning's encoder output) are compiled
once at load into a KV prefix where the family can do that exactly (`Family.compile`: causal
attention, whose keys and values never depend on the text after them), so requests pay nothing
for them in prefill, and outputs stay the same as uncompiled.

A `Store` directory is the source of truth: `sync` loads new and changed files, drops removed
ones, and refuses a file that does not load or does not fit the base model (its reason is kept in
`refused`) while every other task keeps serving.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .data import Encoder, TaskSpec
from .errors import ConfigError, SoftpromptError
from .example import Example
from .generate import GREEDY, Sampling, decode, generate_ids
from .injection import Injection
from .store import Prompt, Store

log = logging.getLogger("softprompt.multitask")


class UnknownTaskError(ConfigError):
    """A request for a task that is not loaded (never added, removed, or its file was refused)."""

    def __init__(self, name: str, known: list[str], refused: str | None = None):
        self.name, self.known = name, known
        why = f"its prompt file was refused: {refused}" if refused else "no such task is loaded"
        super().__init__(f"Unknown task '{name}' ({why}).", f"use one of {known}.")


@dataclass(frozen=True)
class Entry:
    """One loaded task: its prompt file, the injection as it runs (compiled, on the model's device) and encoder."""

    name: str
    prompt: Prompt
    injection: Injection
    encoder: Encoder
    max_positions: int | None  # the base model's context
    stamp: tuple | None = None  # (mtime_ns, size, inode) of the file it came from, to notice changes

    @property
    def spec(self) -> TaskSpec:
        return self.encoder.spec

    def encode(self, value: str | dict, reserve: int | None = None) -> Example:
        """One request input as an `Example` with this task's prompt, leaving `reserve` positions in the context for
        what follows it (new tokens; by default the longest class verbalizer, or the task's max_new_tokens)."""
        spec = self.spec
        if reserve is None:
            reserve = max(map(len, self.encoder.verbalizer_ids)) if spec.is_classification else spec.max_new_tokens
        return self.encoder.example(spec.render_input(value), self.injection, reserve)

    def describe(self) -> dict:
        """What `/v1/models` shows of the task."""
        p = self.prompt
        return {
            "id": self.name,
            "method": p.method,
            "kind": "classification" if self.spec.is_classification else "generation",
            "virtual_tokens": p.method_config.get("num_virtual_tokens", 0),
            "labels": self.spec.class_names or None,
            "template": self.spec.template,
        }


@dataclass
class Classification:
    """The class of one input: `label` is the label map's key; `probs` are normalized over the classes."""

    label: str
    probs: dict[str, float]
    log_likelihoods: list[float]  # of each class's verbalizer tokens, in label-map order


def padded_groups(lengths: list[int], max_padding: float | None) -> list[list[int]]:
    """Indices grouped for batched forwards, longest first: a sequence joins the current group while padding it to
    the group's longest costs at most `max_padding` of that length (None: one group). Compute on padding is wasted,
    which matters when short and long inputs of different tasks meet in one batch."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and (max_padding is None or lengths[i] >= (1 - max_padding) * lengths[groups[-1][0]]):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


@torch.inference_mode()
def class_scores(
    base, rows: list[tuple[Example, list[list[int]]]], max_padding: float | None = 0.25
) -> list[torch.Tensor]:
    """Log-likelihood of every class label word of every row; rows of any tasks, batched together.

    rows: (example with its prompt, label-word token ids per class). max_padding: see `padded_groups`;
    None runs all rows in one batch. Returns one (C_i,) tensor per row.
    """
    scores: list[torch.Tensor | None] = [None] * len(rows)
    for group in padded_groups([len(e.source) for e, _ in rows], max_padding):
        for i, s in zip(group, base.family.class_scores([rows[i] for i in group])):
            scores[i] = s.float().cpu()
    return scores


class MultiTask:
    """A registry of prompts keyed by task name on one base model, and batched classify / generate over them.

    compile: turn embedding prompts into KV prefixes at load (same outputs, cheaper requests).
    truncate: over-long input policy of every task's encoder (error, left, right).
    max_length: cap on positions per request row (virtual tokens + text + new tokens); default the model's context.
    """

    def __init__(self, base, compile: bool = True, truncate: str = "error", max_length: int | None = None):
        base.check_max_length(max_length)
        self.base, self.compile, self.truncate, self.max_length = base, compile, truncate, max_length
        # Both dicts are replaced, never mutated, so that other threads (the server's request handlers) read a
        # consistent view while the worker thread syncs the store.
        self._entries: dict[str, Entry] = {}
        self.refused: dict[str, str] = {}  # task name -> why its file was not loaded
        self._refused_stamps: dict[str, tuple] = {}

    # --- the registry ----------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        return [self._entries[n] for n in self.names()]

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, name: str) -> Entry:
        entries = self._entries
        if name not in entries:
            raise UnknownTaskError(name, sorted(entries), self.refused.get(name))
        return entries[name]

    def add(self, name: str, prompt: Prompt, stamp: tuple | None = None) -> Entry:
        """Verify `prompt` against the base model, compile it, and serve it as task `name` (replacing any)."""
        Store(".").path(name)  # the same rule for names as the store's: no paths
        prompt.verify(self.base, what=f"The prompt of task '{name}'")
        injection = prompt.injection.to(self.base.device, self.base.dtype)
        if self.compile:
            injection = self.base.family.compile(injection)
        encoder = Encoder(prompt.spec, self.base, self.truncate, self.max_length)
        if not encoder.spec.is_classification and not encoder.spec.max_new_tokens >= 1:
            # a request that takes the task's default would decode zero steps
            raise ConfigError(
                f"Task '{name}' generates max_new_tokens={encoder.spec.max_new_tokens} tokens.",
                "set max_new_tokens to 1 or more in its task spec.",
            )
        if encoder.spec.is_classification:
            encoder.verbalizer_ids  # tokenized once, here, not on the request path  # noqa: B018
        entry = Entry(name, prompt, injection, encoder, self.base.max_positions, stamp)
        self._entries = {**self._entries, name: entry}
        self._forget_refusal(name)
        return entry

    def remove(self, name: str) -> None:
        self._entries = {k: v for k, v in self._entries.items() if k != name}
        self._forget_refusal(name)

    def _forget_refusal(self, name: str) -> None:
        self.refused = {k: v for k, v in self.refused.items() if k != name}  # replaced, as `_entries`
        self._refused_stamps.pop(name, None)

    def sync(self, store: Store) -> dict:
        """Make the registry match the store: load new and changed files, drop removed ones, refuse bad ones.

        Returns {"added": [...], "updated": [...], "removed": [...], "refused": {name: reason}} for this call.
        """
        report = {"added": [], "updated": [], "removed": [], "refused": {}}
        stamps = {}
        for name in store.names():
            try:
                st = store.path(name).stat()
            except OSError:  # removed between listing and stat
                continue
            stamps[name] = (st.st_mtime_ns, st.st_size, st.st_ino)
        for name in set(self._entries) | set(self.refused):
            if name not in stamps:
                self.remove(name)
                report["removed"].append(name)
                log.info("task %s: removed", name)
        for name, stamp in sorted(stamps.items()):
            current = self._entries.get(name)
            if (current is not None and current.stamp == stamp) or self._refused_stamps.get(name) == stamp:
                continue
            try:
                self.add(name, Prompt.load(store.path(name), self.base), stamp)
            except Exception as e:  # noqa: BLE001 - one bad file must never stop the other tasks from serving
                reason = e.problem if isinstance(e, SoftpromptError) else f"{type(e).__name__}: {e}"
                self.remove(name)
                self.refused = {**self.refused, name: reason}
                self._refused_stamps[name] = stamp
                report["refused"][name] = reason
                log.warning("task %s: prompt file refused: %s", name, reason)
                continue
            report["updated" if current is not None else "added"].append(name)
            log.info("task %s: %s (%s)", name, "reloaded" if current else "loaded", self.get(name).prompt.method)
        return report

    # --- batches of any mix of tasks -----------------------------------------------------------------------------
    def encode(self, task: str, value: str | dict, reserve: int | None = None) -> tuple[Entry, Example]:
        entry = self.get(task)
        return entry, entry.encode(value, reserve)

    def classify_rows(self, rows: list[tuple[Entry, Example]]) -> list[Classification]:
        """Classify already encoded rows of any mix of classification tasks, batched together (`class_scores`)."""
        for entry, _ in rows:
            if not entry.spec.is_classification:
                raise ConfigError(
                    f"Task '{entry.name}' is a generation task; it has no classes.",
                    "use a classification task, or /v1/completions for generation.",
                )
        scores = class_scores(self.base, [(example, e.encoder.verbalizer_ids) for e, example in rows])
        out = []
        for (entry, _), s in zip(rows, scores):
            names = entry.spec.class_names
            probs = s.softmax(-1).tolist()
            out.append(Classification(names[int(s.argmax())], dict(zip(names, probs)), s.tolist()))
        return out

    def classify(self, requests: list[tuple[str, str | dict]]) -> list[Classification]:
        """(task, input) pairs -> their classes, the whole mixed batch at once."""
        return self.classify_rows([self.encode(t, v) for t, v in requests])

    def decode_rows(
        self,
        rows: list[tuple[Entry, Example]],
        max_new_tokens: int | list[int],
        sampling: Sampling | list[Sampling] = GREEDY,
        generator: torch.Generator | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """`generate.decode` over encoded rows of any mix of tasks: yields (next tokens (B,), active (B,)) per step."""
        return decode(self.base, [example for _, example in rows], max_new_tokens, sampling, generator=generator)

    def generate_ids(
        self,
        requests: list[tuple[str, str | dict]],
        max_new_tokens: int | None = None,
        sampling: Sampling | list[Sampling] = GREEDY,
    ) -> list[list[int]]:
        """(task, input) pairs -> new token ids per row (one decode loop); length: each task's max_new_tokens."""
        limits = [max_new_tokens or self.get(t).spec.max_new_tokens for t, _ in requests]
        rows = [self.encode(t, v, n) for (t, v), n in zip(requests, limits)]
        return generate_ids(self.base, [example for _, example in rows], limits, sampling)

    def generate(
        self,
        requests: list[tuple[str, str | dict]],
        max_new_tokens: int | None = None,
        sampling: Sampling | list[Sampling] = GREEDY,
    ) -> list[str]:
        return [
            self.base.tokenizer.decode(ids, skip_special_tokens=True)
            for ids in self.generate_ids(requests, max_new_tokens, sampling)
        ]
