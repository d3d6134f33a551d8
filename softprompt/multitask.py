"""Many tasks on one frozen base model: a registry of prompts, and mixed-task batches.

The base model is loaded once; each task is one small prompt file. A request names its task; the
registry formats it with that prompt's own template (`data.Encoder`) and runs rows of different
tasks, methods (soft, prefix, deep, P-tuning, a plain template with no tensors) and numbers of
virtual tokens in one forward pass or one decode loop: the model's family lays out one prompt
per row (`Family.class_scores`, `generate.decode`).

The registry scales with the number of tasks, not with their contents. A `Store` directory is
indexed from the files' headers alone (`Prompt.peek`: metadata and tensor shapes, checked against
the base model); a prompt's tensors are read, checked and compiled on its first use, and kept in an
LRU cache with a byte budget (`PromptCache`), so that a store of thousands of tasks starts in
seconds and holds in memory only the prompts in use. Prompts made of virtual-token embeddings
(soft prompts, P-tuning's encoder output) are compiled into a KV prefix where the family can do
that exactly (`Family.compile`: causal attention, whose keys and values never depend on the text
after them), so requests pay nothing for them in prefill, and outputs stay the same as uncompiled.

`sync` makes the registry match the store: new and changed files are indexed, removed ones
dropped, and a file that does not load or does not fit the base model is refused (its reason is
kept in `refused`) while every other task keeps serving. A task whose file turns bad while its
prompt is in memory keeps serving that last good version (`stale` names it, with the reason).
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .data import Encoder, TaskSpec
from .errors import ConfigError, SoftpromptError
from .example import Example
from .generate import GREEDY, NonFiniteScoresError, Sampling, decode, generate_ids
from .injection import Injection
from .store import Prompt, Store

log = logging.getLogger("softprompt.multitask")

DEFAULT_CACHE_BYTES = 1 << 30  # compiled prompts kept in memory; a 20-token soft prompt of a 135M model is ~1 MB


class UnknownTaskError(ConfigError):
    """A request for a task that is not loaded (never added, removed, or its file was refused)."""

    def __init__(self, name: str, known: list[str], refused: str | None = None):
        self.name, self.known = name, known
        why = f"its prompt file was refused: {refused}" if refused else "no such task is loaded"
        super().__init__(f"Unknown task '{name}' ({why}).", f"use one of {_some(known)}.")


def _some(names: list[str], most: int = 20) -> str:
    """A list of names for a message, cut short in a registry of thousands."""
    return str(names) if len(names) <= most else f"{names[:most]} (and {len(names) - most:,} more: GET /v1/models)"


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: the cache's key
class Entry:
    """One task of the registry: its prompt (for a file: read from the header alone, tensors on the meta device),
    its encoder, and where it came from. The tensors it runs with come from `MultiTask.injection`."""

    name: str
    prompt: Prompt
    encoder: Encoder
    max_positions: int | None  # the base model's context
    stamp: tuple | None = None  # (mtime_ns, size, inode) of the file it came from, to notice changes
    path: Path | None = None  # the prompt file; None for a prompt added in memory

    @property
    def spec(self) -> TaskSpec:
        return self.encoder.spec

    def encode(self, value: str | dict, reserve: int | None = None) -> Example:
        """One request input as an `Example` with this task's prompt, leaving `reserve` positions in the context for
        what follows it (new tokens; by default the longest class verbalizer, or the task's max_new_tokens).

        The example carries the prompt as indexed (possibly shapes only): `MultiTask`'s batch methods run it with the
        prompt's tensors."""
        spec = self.spec
        if reserve is None:
            reserve = max(map(len, self.encoder.verbalizer_ids)) if spec.is_classification else spec.max_new_tokens
        return self.encoder.example(spec.render_input(value), self.prompt.injection, reserve)

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


class PromptCache:
    """Prompts ready to run (on the model's device, compiled), least recently used out first, within `budget` bytes.

    A pinned entry (a task serving its last good version after its file turned bad) is never evicted: it cannot
    be read again. Thread-safe; the server's worker thread is its only writer."""

    def __init__(self, budget: int | None = DEFAULT_CACHE_BYTES):
        if budget is not None and not (isinstance(budget, int) and budget >= 0):
            raise ConfigError(
                f"The prompt cache budget must be a number of bytes >= 0, got {budget!r}.",
                "pass --cache-bytes with a whole number of bytes (0: keep no prompt).",
            )
        self.budget = budget
        self._items: collections.OrderedDict[Entry, tuple[Injection, int]] = collections.OrderedDict()
        self._pinned: set[Entry] = set()
        self._lock = threading.Lock()
        self.bytes = 0
        self.stats = {"hits": 0, "misses": 0, "evictions": 0}

    def __contains__(self, entry: Entry) -> bool:
        return entry in self._items

    def __len__(self) -> int:
        return len(self._items)

    def get(self, entry: Entry) -> Injection | None:
        with self._lock:
            item = self._items.get(entry)
            self.stats["hits" if item else "misses"] += 1
            if item is None:
                return None
            self._items.move_to_end(entry)
            return item[0]

    def put(self, entry: Entry, injection: Injection) -> None:
        size = sum(t.numel() * t.element_size() for t in injection.tensors().values())
        with self._lock:
            self._drop(entry)
            self._items[entry] = (injection, size)
            self.bytes += size
            over = [e for e in self._items if e not in self._pinned and e is not entry]
            while self.budget is not None and self.bytes > self.budget and over:
                self._drop(over.pop(0))
                self.stats["evictions"] += 1

    def pin(self, entry: Entry, pinned: bool = True) -> None:
        with self._lock:
            (self._pinned.add if pinned else self._pinned.discard)(entry)

    def drop(self, entry: Entry) -> None:
        with self._lock:
            self._pinned.discard(entry)
            self._drop(entry)

    def _drop(self, entry: Entry) -> None:
        item = self._items.pop(entry, None)
        if item is not None:
            self.bytes -= item[1]


def _reason(e: Exception) -> str:
    """Why a prompt file was refused, in one line."""
    return e.problem if isinstance(e, SoftpromptError) else f"{type(e).__name__}: {e}"


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

    compile: turn embedding prompts into KV prefixes (same outputs, cheaper requests).
    truncate: over-long input policy of every task's encoder (error, left, right).
    max_length: cap on positions per request row (virtual tokens + text + new tokens); default the model's context.
    cache_bytes: budget of the prompts kept ready to run (`PromptCache`; None: no limit). Files are read again when
        an evicted prompt is used; prompts added in memory are compiled again.
    """

    def __init__(
        self,
        base,
        compile: bool = True,
        truncate: str = "error",
        max_length: int | None = None,
        cache_bytes: int | None = DEFAULT_CACHE_BYTES,
    ):
        base.check_max_length(max_length)
        self.base, self.compile, self.truncate, self.max_length = base, compile, truncate, max_length
        self.cache = PromptCache(cache_bytes)
        # The dicts are replaced, never mutated, so that other threads (the server's request handlers) read a
        # consistent view while the worker thread syncs the store.
        self._entries: dict[str, Entry] = {}
        self.version = 0  # counts the registry's changes: what readers cache views of it by
        self.refused: dict[str, str] = {}  # task name -> why its file was not loaded
        self.stale: dict[str, str] = {}  # task name -> why its file is refused while its last good version serves
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
        entry = self._entry(name, prompt, stamp, None)
        self._ready(entry, prompt)
        self._apply({name: entry})
        return entry

    def _entry(self, name: str, prompt: Prompt, stamp: tuple | None, path: Path | None) -> Entry:
        """A registry entry for `prompt`, after refusing what would fail its requests."""
        Store(".").path(name)  # the same rule for names as the store's: no paths
        what = f"Prompt file {path}" if path is not None else f"The prompt of task '{name}'"
        prompt.verify(self.base, what=what)
        encoder = Encoder(prompt.spec, self.base, self.truncate, self.max_length)
        if not encoder.spec.is_classification and not encoder.spec.max_new_tokens >= 1:
            # a request that takes the task's default would decode zero steps
            raise ConfigError(
                f"Task '{name}' generates max_new_tokens={encoder.spec.max_new_tokens} tokens.",
                "set max_new_tokens to 1 or more in its task spec.",
            )
        kept = replace(prompt, injection=self._shapes_as_run(prompt.injection)) if path is not None else prompt
        return Entry(name, kept, encoder, self.base.max_positions, stamp, path)

    def _shapes_as_run(self, injection: Injection) -> Injection:
        """`injection` as it will run (compiled or not), with tensors on the meta device: all that encoding reads of
        it (its positions, whether the text may be empty), holding no memory."""
        family = self.base.family
        if self.compile and injection.embeds is not None and family.compiles:
            lay = family.kv_layout  # `Family.compile` turns every position into a key/value prefix
            kv = torch.empty(
                (lay.num_layers, 2, lay.num_kv_heads, injection.num_positions, lay.head_dim), device="meta"
            )
            return Injection(kv=kv, kv_positions=injection.num_positions)
        return injection.map(lambda t: t.to("meta"))

    def _ready(self, entry: Entry, prompt: Prompt) -> Injection:
        """`prompt` (with its tensors) ready to run as `entry`: on the model's device and dtype, compiled; cached."""
        injection = prompt.injection.to(self.base.device, self.base.dtype)
        if self.compile:
            injection = self.base.family.compile(injection)
        self.cache.put(entry, injection)
        return injection

    def injection(self, entry: Entry | str) -> Injection:
        """The prompt of a task ready to run: from the cache, or read from its file and compiled (then cached).

        A file that no longer reads (or no longer matches what was indexed) is refused, as `sync` would."""
        entry = self.get(entry) if isinstance(entry, str) else entry
        ready = self.cache.get(entry)
        if ready is not None:
            return ready
        if entry.path is None:
            return self._ready(entry, entry.prompt)
        try:
            prompt = Prompt.load(entry.path, self.base)

            def shapes(injection: Injection) -> dict:
                return {k: tuple(t.shape) for k, t in injection.tensors().items()}

            # the file may have been replaced since it was indexed: serve its tensors only if they are the same task
            indexed = entry.prompt
            same = (prompt.task, prompt.method, prompt.method_config) == (
                indexed.task,
                indexed.method,
                indexed.method_config,
            )
            if not same or shapes(self._shapes_as_run(prompt.injection)) != shapes(indexed.injection):
                raise ConfigError(
                    f"The prompt file of task '{entry.name}' changed since it was indexed.",
                    "retry: the store's next scan picks the new version up.",
                )
        except Exception as e:
            if self._entries.get(entry.name) is entry:
                self._refuse({entry.name: (_reason(e), entry.stamp)})
            raise
        return self._ready(entry, prompt)

    def _apply(self, changes: dict[str, Entry | None]) -> None:
        """Serve each entry of `changes` under its name (None: drop the task), in one replacement of the registry (a
        sync of thousands of files must not copy it once per file). A replaced entry's prompt stays in the cache, no
        longer pinned, until it ages out: requests queued with it before the change still run with it."""
        for name, entry in changes.items():
            old = self._entries.get(name)
            if old is not None and old is not entry:
                self.cache.pin(old, False)
        merged = {**self._entries, **changes}
        self._entries = {k: v for k, v in merged.items() if v is not None}
        self.version += 1
        self.refused = {k: v for k, v in self.refused.items() if k not in changes}
        self.stale = {k: v for k, v in self.stale.items() if k not in changes}
        for name in changes:
            self._refused_stamps.pop(name, None)

    def remove(self, name: str) -> None:
        self._apply({name: None})

    def _refuse(self, refusals: dict[str, tuple[str, tuple | None]]) -> None:
        """Record refused files (task name -> (reason, file stamp)). A task whose prompt is in memory keeps serving
        it, as `stale` (a file that turned bad must not stop a task that works); the others are dropped."""
        stale, drop = {}, {}
        for name, (reason, _) in refusals.items():
            keep = self._entries.get(name)
            if keep is not None and keep in self.cache:
                self.cache.pin(keep)
                stale[name] = reason
                log.warning("task %s: prompt file refused, serving its last good version: %s", name, reason)
            else:
                drop[name] = None
                log.warning("task %s: prompt file refused: %s", name, reason)
        self._apply(drop)
        self.refused = {**self.refused, **{name: reason for name, (reason, _) in refusals.items()}}
        self.stale = {**self.stale, **stale}
        self._refused_stamps.update({name: stamp for name, (_, stamp) in refusals.items()})

    def sync(self, store: Store) -> dict:
        """Make the registry match the store: index new and changed files, drop removed ones, refuse bad ones.

        A new file is indexed from its header; a changed one is read in full (a bad new version must not replace a
        good one), and made ready at once when the old version was in use. Unchanged files are not opened.
        Returns {"added": [...], "updated": [...], "removed": [...], "refused": {name: reason}} for this call.
        """
        stamps = store.stamps()
        changes: dict[str, Entry | None] = {n: None for n in set(self._entries) | set(self.refused) if n not in stamps}
        report = {"added": [], "updated": [], "removed": sorted(changes), "refused": {}}
        refusals = {}
        for name, stamp in sorted(stamps.items()):
            current = self._entries.get(name)
            if (current is not None and current.stamp == stamp) or self._refused_stamps.get(name) == stamp:
                continue
            path = store.path(name)
            try:
                prompt = Prompt.load(path) if current is not None else Prompt.peek(path)  # `_entry` verifies it
                changes[name] = self._entry(name, prompt, stamp, path)
                if current is not None and current in self.cache:  # a task in use stays warm
                    self._ready(changes[name], prompt)
            except Exception as e:  # noqa: BLE001 - one bad file must never stop the other tasks from serving
                refusals[name] = (_reason(e), stamp)
                continue
            report["updated" if current is not None else "added"].append(name)
        self._apply(changes)
        self._refuse(refusals)
        report["refused"] = {name: reason for name, (reason, _) in refusals.items()}
        if any(report.values()):
            log.info("store %s: %s", store.root, {k: len(v) for k, v in report.items()})
        return report

    def ready(self, rows: list[tuple[Entry, Example]]) -> list[Example]:
        """The rows' examples with their prompts ready to run (rows of one task share one injection)."""
        return [Example(x.source, x.slot, x.target, self.injection(entry)) for entry, x in rows]

    # --- batches of any mix of tasks -----------------------------------------------------------------------------
    def encode(self, task: str, value: str | dict, reserve: int | None = None) -> tuple[Entry, Example]:
        """One input of `task` encoded, its example ready to run (with the prompt's tensors, compiled)."""
        entry = self.get(task)
        return entry, self.ready([(entry, entry.encode(value, reserve))])[0]

    def classify_rows(self, rows: list[tuple[Entry, Example]]) -> list[Classification]:
        """Classify already encoded rows of any mix of classification tasks, batched together (`class_scores`)."""
        for entry, _ in rows:
            if not entry.spec.is_classification:
                raise ConfigError(
                    f"Task '{entry.name}' is a generation task; it has no classes.",
                    "use a classification task, or /v1/completions for generation.",
                )
        examples = self.ready(rows)
        scores = class_scores(self.base, [(x, e.encoder.verbalizer_ids) for x, (e, _) in zip(examples, rows)])
        for (entry, _), s in zip(rows, scores):
            if not bool(s.isfinite().all()):  # a NaN probability is no answer (nor valid JSON)
                raise NonFiniteScoresError(f"The class scores of task '{entry.name}' are not finite (NaN or inf).")
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
        top_logprobs: int | None = None,
    ) -> Iterator[tuple]:
        """`generate.decode` over encoded rows of any mix of tasks: yields (next tokens (B,), active (B,)) per step,
        and the steps' `LogProbs` when `top_logprobs` is given."""
        examples = self.ready(rows)
        return decode(self.base, examples, max_new_tokens, sampling, generator=generator, top_logprobs=top_logprobs)

    def generate_ids(
        self,
        requests: list[tuple[str, str | dict]],
        max_new_tokens: int | None = None,
        sampling: Sampling | list[Sampling] = GREEDY,
    ) -> list[list[int]]:
        """(task, input) pairs -> new token ids per row (one decode loop); length: each task's max_new_tokens."""
        limits = [max_new_tokens or self.get(t).spec.max_new_tokens for t, _ in requests]
        rows = [self.encode(t, v, n) for (t, v), n in zip(requests, limits)]
        return generate_ids(self.base, self.ready(rows), limits, sampling)

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
