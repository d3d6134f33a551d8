"""Task specs and their data: files (CSV, TSV, JSON lines, hub datasets) -> rendered splits.

A task is a spec (YAML or JSON) naming data files per split, a template with named fields and
either a label map (raw label value -> verbalizer word; classification) or a target column
(generation). The same code serves SST-2 (TSV, integer labels), TREC (TSV, string labels), RTE
(JSONL, two input fields) and E2E NLG (CSV, several references per input) by configuration alone.
Structured columns meet explicit template filters ({triples|join:"; "}), a references column holds
a list of references per row, and `dev_from_train` carves a dev split out of train.

Files are read with Hugging Face `datasets` (CSV, TSV, JSON lines, or a hub dataset), so one
path covers local files and the hub.
"""

from __future__ import annotations

import csv
import json
import os
import re
import string
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import yaml

from ..errors import ConfigError, DataError, check_keys, check_types
from ..example import MASK
from .streams import ShuffledExamples, StreamedExamples

BUILTIN_DIR = Path(__file__).parents[1] / "tasks"
# How each kind of data file is read (`datasets` builder, its options); a trailing .gz is read through
_READERS = {
    ".tsv": ("csv", {"delimiter": "\t", "quoting": csv.QUOTE_NONE, "keep_default_na": False}),
    ".csv": ("csv", {"keep_default_na": False}),
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
}
# The label word's place in a template: `{mask}`, rendered as `example.MASK`.
MASK_FIELD = "mask"
# What a template field can do to a structured (list or dict) column before it is shown: {triples|join:"; "}
FILTERS = {
    "join": 'join:"SEP": the items of a list joined by SEP (a JSON string); nested lists and dicts as JSON',
    "json": "json: the value as JSON text",
    "first": "first: the first item of a list",
}
_FILTER = re.compile(r'\|\s*(\w+)\s*(?::\s*("(?:[^"\\]|\\.)*"))?\s*')  # |name or |name:"argument"
# The seed of the dev rows `dev_from_train` carves out of train: every run and machine gets the same ones
DEV_SEED = 0


def builtin_tasks() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def default_data_root() -> Path | None:
    """Where the built-in task specs look for their files: $SOFTPROMPT_DATA, else ./shared/data or ../shared/data."""
    if env := os.environ.get("SOFTPROMPT_DATA"):
        return Path(env)
    here = Path(__file__).resolve().parent
    for cand in (
        Path.cwd() / "shared" / "data",
        Path.cwd().parent / "shared" / "data",
        here.parents[1] / "shared" / "data",
    ):
        if cand.is_dir():
            return cand
    return None


def _exists(path: Path) -> bool:
    """Whether `path` exists; a path the system cannot look up (a name too long, a NUL byte) does not."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def label_key(value) -> str:
    """How a raw label value (a string, int or bool in the data; a key of `labels:`) is matched: by its text, except
    that booleans and the strings true/false match in any case (True, 'True' and 'true' are one label)."""
    text = str(value)
    return text.lower() if isinstance(value, bool) or text.lower() in ("true", "false") else text


def cell(row: dict, column: str, where: str):
    """The value of `column` in `row`; a missing column or a null is refused, naming `where` (the row) and column."""
    value = row.get(column)
    if value is None:
        raise no_value(column, where)
    return value


def no_value(column: str, where: str) -> DataError:
    return DataError(
        f"{where} has no value in column '{column}' (missing or null).", "fill it in, or drop the row from the data."
    )


def _kind(value) -> str | None:
    return "list" if isinstance(value, (list, tuple)) else "dict" if isinstance(value, dict) else None


@dataclass(frozen=True)
class Slot:
    """One placeholder of a template: its text as written, the field it reads, and its filters in order."""

    text: str  # e.g. 'triples|join:"; "'
    field: str  # e.g. 'triples'
    filters: tuple = ()  # e.g. (("join", "; "),)


def parse_slot(task: str, text: str) -> Slot:
    """A placeholder's text -> its `Slot`: a field name, then `|name` or `|name:"argument"` filters."""
    name, bar, rest = text.partition("|")
    rest, filters, pos = bar + rest, [], 0
    form = 'write filters as {field|join:", "}, {field|json} or {field|first}.'
    while pos < len(rest):
        m = _FILTER.match(rest, pos)
        if m is None:
            raise ConfigError(f"Task '{task}': cannot read the filters in {{{text}}}.", form)
        if m[1] not in FILTERS:
            raise ConfigError(
                f"Task '{task}': unknown template filter '{m[1]}' in {{{text}}}.", f"use one of {list(FILTERS)}: {form}"
            )
        if (m[1] == "join") != (m[2] is not None):
            need = "needs a separator" if m[1] == "join" else "takes no argument"
            raise ConfigError(f"Task '{task}': the filter '{m[1]}' in {{{text}}} {need}.", form)
        try:
            filters.append((m[1], None if m[2] is None else json.loads(m[2])))
        except json.JSONDecodeError as e:
            raise ConfigError(f"Task '{task}': the separator in {{{text}}} is not a JSON string ({e}).", form) from e
        pos = m.end()
    return Slot(text, name.strip(), tuple(filters))


def _placeholder(field_name: str, conversion: str | None, spec: str) -> str:
    """A placeholder's text as written, from the parts `string.Formatter().parse` splits it into."""
    return field_name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")


def _apply(name: str, arg, value, slot: Slot, column: str, where: str):
    """`value` through one filter of `slot`."""
    if name == "json":
        return json.dumps(value, ensure_ascii=False, default=str)
    if _kind(value) != "list":
        raise DataError(
            f"{where}: {{{slot.text}}} needs a list, but column '{column}' holds {type(value).__name__} {value!r:.40}.",
            "fix the data, or drop the filter from the template.",
        )
    if name == "first":
        if not value:
            raise DataError(
                f"{where}: column '{column}' is an empty list, so {{{slot.text}}} has no item.",
                "fill it in, or drop the row.",
            )
        return value[0]
    if any(v is None for v in value):
        raise DataError(
            f"{where}: column '{column}' holds a list with a null item.", "fill it in, or drop it from the list."
        )
    return arg.join(json.dumps(v, ensure_ascii=False) if _kind(v) else str(v) for v in value)


@dataclass
class TaskSpec:
    """A task's data, template and targets. Load with `load_task`; every field can be set in YAML."""

    name: str
    template: str  # e.g. "Review: {sentence}\nSentiment:"; {field} names a column (see `columns`), {field|join:"; "}
    splits: dict[str, str | dict] = field(default_factory=dict)  # split -> file path, or {hub: name, config: c, ...}
    labels: dict | None = None  # classification: raw label value -> verbalizer word
    label_column: str = "label"
    target_column: str | None = None  # generation: the column holding the reference text
    references_column: str | None = None  # generation, instead of target_column: a column holding a list of references
    columns: dict[str, str] = field(default_factory=dict)  # template field -> column name, where they differ
    target_prefix: str = " "  # text between the rendered template and the target
    chat: bool = False  # wrap the rendered template as a user turn with the tokenizer's chat template
    max_new_tokens: int = 64  # generation length limit when decoding this task
    # generation: strings that end a continuation (it is cut before them); None: a newline when every reference is
    # one line (see `stop_strings`), [] for end-of-sequence only
    stop: list[str] | None = None
    description: str = ""
    data_dir: str | None = None  # base directory for relative split paths
    streaming: bool = False  # read the train split lazily (datasets streaming): files larger than memory, hub datasets
    shuffle_buffer: int = 10_000  # with streaming: examples are shuffled within a buffer of this many rows
    dev_from_train: float | int | None = None  # carve a dev split out of train: a fraction (0.1) or a count (200)

    def __post_init__(self):
        self._check_types()
        if not self.template:
            raise ConfigError(f"Task '{self.name}' has no template.", "add `template:` with {field} placeholders.")
        if [self.labels, self.target_column, self.references_column].count(None) != 2:
            raise ConfigError(
                f"Task '{self.name}' must have exactly one of `labels` (classification) "
                "or `target_column` / `references_column` (generation).",
                "set one of them in the task spec.",
            )
        if self.labels is not None:
            self._check_labels()
        self._check_dev_from_train()
        self._check_generation()
        try:
            pieces = list(string.Formatter().parse(self.template))  # (text, field, format spec, conversion)
        except ValueError as e:
            raise ConfigError(
                f"Task '{self.name}': template is not a valid format string ({e}).",
                "write fields as {name} and literal braces as {{ and }}.",
            ) from e
        # a filtered placeholder as written, `field|filter:"arg"`: str.format's parser calls the argument a spec
        slots = [
            None if f is None else parse_slot(self.name, _placeholder(f, c, s) if "|" in f else f)
            for _, f, s, c in pieces
        ]
        parsed = [(text, None if slot is None else slot.field) for (text, *_), slot in zip(pieces, slots)]
        fields = [f for _, f in parsed if f is not None]
        if any(f == "" or not f.isidentifier() for f in fields):
            raise ConfigError(
                f"Task '{self.name}': template fields must be names like {{sentence}}.",
                "name every placeholder in the template.",
            )
        self._check_plain(pieces)
        if fields.count(MASK_FIELD) > 1:
            raise ConfigError(
                f"Task '{self.name}': the template has {fields.count(MASK_FIELD)} {{mask}} slots.",
                "put one {mask} where the label word goes.",
            )
        if any(s.filters for s in slots if s is not None and s.field == MASK_FIELD):
            raise ConfigError(f"Task '{self.name}': {{mask}} takes no filter.", "write it as {mask}.")
        self.template_fields = [f for f in fields if f != MASK_FIELD]
        self._compile(pieces, slots)
        # text after the {mask} slot: only a masked LM reads any (a causal LM's label word follows the prompt)
        after = (
            [text for text, _ in parsed[[f for _, f in parsed].index(MASK_FIELD) + 1 :]] if MASK_FIELD in fields else []
        )
        self.mask_inside = any(after)

    def _check_types(self) -> None:
        """Refuse a field of the wrong type: a YAML spec holds any values, and `template: 5` or `columns: {x: [a]}`
        would fail later with a traceback."""
        check_types(
            self,
            skip=("max_new_tokens", "stop", "dev_from_train"),  # checked below, with their own messages
            problem=f"Task '{self.name}': ",
            fix=lambda name, kind: f"set `{name}:` in the task spec to {kind}.",
        )

    def _check_plain(self, pieces: list) -> None:
        """Refuse an unfiltered placeholder that `render` could never fill: one with spaces (`{ x}` is looked up as
        ' x', which no row has), an unknown conversion (`{x!z}`), a field inside a format spec (`{x:{y}}`), or a
        conversion or format spec on the label slot. Format specs of fields (`{n:03d}`) work as in `str.format`."""
        plain = [(f, s, c) for _, f, s, c in pieces if f is not None and "|" not in f]
        if any(not f.isidentifier() for f, _, _ in plain):
            raise ConfigError(
                f"Task '{self.name}': template fields must be names like {{sentence}}.",
                "name every placeholder in the template.",
            )
        bad = next(
            (
                _placeholder(f, c, s)
                for f, s, c in plain
                if (c and c not in "rsa") or "{" in (s or "") or (f == MASK_FIELD and (c or s))
            ),
            None,
        )
        if bad:
            raise ConfigError(
                f"Task '{self.name}': the template field {{{bad}}} cannot be filled (an unknown conversion, a field "
                "inside a format spec, or a spec on {mask}).",
                'write it as {name} or {name:spec}; format lists and objects with a filter: {name|join:", "}, '
                "{name|json} or {name|first}.",
            )

    def _check_labels(self) -> None:
        """Refuse a label map of fewer than 2 classes, keys that match the same data value, or a word used twice."""
        if len(self.labels) < 2:
            raise ConfigError(f"Task '{self.name}' has fewer than 2 labels.", "list every class in `labels`.")
        seen = {}
        for k in self.labels:
            if label_key(k) in seen:
                raise ConfigError(
                    f"Task '{self.name}': label keys {seen[label_key(k)]!r} and {k!r} are the same label once "
                    "matched against the data.",
                    "quote the keys in `labels:` as the data spells them, one key per label (YAML reads unquoted "
                    "yes/no/on/off/true/false as booleans and 0 as a number).",
                )
            seen[label_key(k)] = k
        self.labels = {str(k): str(v) for k, v in self.labels.items()}
        self._class_of = {label_key(k): i for i, k in enumerate(self.labels)}  # matched raw value -> class index
        words = list(self.labels.values())
        if "" in words:
            empty = [k for k, w in self.labels.items() if not w]
            raise ConfigError(
                f"Task '{self.name}': the label(s) {empty} have an empty verbalizer word (no tokens to score).",
                "give every class a word in `labels`.",
            )
        if len(set(words)) != len(words):
            raise ConfigError(
                f"Task '{self.name}' maps two labels to the same verbalizer word.",
                "give every class its own word in `labels`.",
            )

    def _check_generation(self) -> None:
        """Refuse a length limit that decodes nothing, and stop strings that are not a list of texts."""
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(
                f"Task '{self.name}': max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}.",
                "set `max_new_tokens:` to 1 or more in the task spec (64 by default).",
            )
        if self.stop is not None and (
            not isinstance(self.stop, list) or not all(isinstance(x, str) and x for x in self.stop)
        ):
            raise ConfigError(
                f"Task '{self.name}': stop must be a list of non-empty strings, got {self.stop!r}.",
                'write e.g. `stop: ["\\n"]`, or `stop: []` for end-of-sequence only.',
            )

    def _check_dev_from_train(self) -> None:
        n = self.dev_from_train
        if n is None:
            return
        if isinstance(n, bool) or not ((isinstance(n, int) and n >= 1) or (isinstance(n, float) and 0 < n < 1)):
            raise ConfigError(
                f"Task '{self.name}': dev_from_train must be a fraction between 0 and 1 or a count of 1 or more, "
                f"got {n!r}.",
                "write e.g. `dev_from_train: 0.1` (a tenth of train) or `dev_from_train: 200` (--dev-from-train).",
            )
        if self.streaming:
            raise ConfigError(
                f"Task '{self.name}' streams its train split, so dev_from_train cannot carve a dev split out of it.",
                "give a `dev:` file under `splits:`, or set `streaming: false`.",
            )
        if "dev" in self.splits:
            raise ConfigError(
                f"Task '{self.name}' has both a `dev:` split and dev_from_train.",
                "drop one of them (--dev-from-train on the command line replaces the spec's dev split).",
            )

    def _compile(self, pieces: list, slots: list) -> None:
        """What `render` formats: the template itself, or (with filters) the template with every filtered placeholder
        replaced by a positional one, {0}, {1}, ..., that `render` fills with the filtered text."""
        plain = dict.fromkeys(s.field for s in slots if s and not s.filters and s.field != MASK_FIELD)
        self._plain = [Slot(f, f) for f in plain]
        self._filtered = [s for s in slots if s and s.filters]
        if not self._filtered:
            self._format = self.template
            return
        out = []
        for (text, f, spec, conv), slot in zip(pieces, slots):
            out.append(text.replace("{", "{{").replace("}", "}}"))
            if slot is not None:
                inner = str(self._filtered.index(slot)) if slot.filters else _placeholder(f, conv, spec)
                out.append("{" + inner + "}")
        self._format = "".join(out)

    @property
    def is_classification(self) -> bool:
        return self.labels is not None

    @property
    def has_mask(self) -> bool:
        """Whether the template marks the label word's place with {mask}."""
        return self.mask_inside or "{" + MASK_FIELD + "}" in self.template.replace("{{", "")

    @property
    def class_names(self) -> list[str]:
        return list(self.labels) if self.labels else []

    @property
    def verbalizers(self) -> list[str]:
        """Target strings of the classes, as appended after the prompt (with `target_prefix`)."""
        return [self.target_prefix + w for w in self.labels.values()] if self.labels else []

    def class_index(self, raw) -> int | None:
        """The class a raw label value of the data names (matched by `label_key`), or None."""
        return self._class_of.get(label_key(raw))

    def column(self, field_name: str) -> str:
        return self.columns.get(field_name, field_name)

    def render(self, row: dict, where: str = "A row") -> str:
        """The template filled with one row's fields; `where` names the row in errors ("Row 3 of split 'dev'")."""
        plain = {s.field: self._shown(row, s, where) for s in self._plain}
        filtered = [self._shown(row, s, where) for s in self._filtered]
        try:
            return self._format.format(*filtered, **plain, **{MASK_FIELD: MASK})
        except (ValueError, TypeError) as e:  # a format spec that does not fit this row's value, e.g. {n:03d} on text
            raise DataError(
                f"{where}: the template cannot format its values ({e}).", "fix the data, or the field's format spec."
            ) from e

    def _shown(self, row: dict, slot: Slot, where: str):
        """What `slot` shows of `row`: its column's value through its filters; a list or dict must meet a filter."""
        column = self.column(slot.field)
        value = cell(row, column, where)
        for name, arg in slot.filters:
            value = _apply(name, arg, value, slot, column, where)
        if value is None:  # what `first` gives for a null item
            raise no_value(column, where)
        if _kind(value):
            raise DataError(
                f"{where}: column '{column}' holds a {_kind(value)}, which the template field {{{slot.text}}} "
                "cannot show as text.",
                f'format it with a filter: {{{slot.text}|join:", "}}, {{{slot.text}|json}} or {{{slot.text}|first}}.',
            )
        return value

    def render_input(self, value: str | dict) -> str:
        """The template filled from one user input: an object of fields, a JSON object, or a plain string for a
        one-field template (what `softprompt generate` and the server take)."""
        fields = self.template_fields
        if isinstance(value, str) and value.lstrip().startswith("{"):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ConfigError(
                    f"Input is not valid JSON: {e}", "pass a JSON object of the template's fields."
                ) from e
        if isinstance(value, str):
            if len(fields) != 1:
                columns = [self.column(f) for f in fields]
                raise ConfigError(
                    f"Task '{self.name}' takes the fields {columns}; a plain string can only fill one.",
                    f"give an object of them, e.g. {json.dumps({c: '...' for c in columns})}.",
                )
            value = {self.column(fields[0]): value}
        if not isinstance(value, dict):
            raise ConfigError(
                f"An input must be a string or an object of template fields, got {type(value).__name__}.",
                f"pass a string, or an object with the fields {fields}.",
            )
        missing = [f for f in fields if self.column(f) not in value]
        if missing:
            raise ConfigError(f"Input lacks the template field(s) {missing}.", f"give all of {fields}.")
        return self.render(value, "The input")

    def portable(self) -> dict:
        """The spec without data locations: what a prompt file stores to format requests later."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        for k in ("splits", "data_dir", "streaming", "shuffle_buffer"):
            d.pop(k)
        for k in ("references_column", "dev_from_train"):  # stored only when set: other files stay as they were
            if d[k] is None:
                d.pop(k)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TaskSpec:
        check_keys(cls, d, "task spec")
        if "name" not in d or "template" not in d:
            raise ConfigError("A task spec needs `name` and `template`.", "add them to the spec file.")
        return cls(**d)


@dataclass
class Split:
    """One split, rendered: prompt texts, targets (generation) or class indices (classification)."""

    rows: list[dict]
    prompts: list[str]
    targets: list[str]  # the target text of each row (verbalizer word; with references_column the first reference)
    labels: list[int] | None  # class index per row (classification)
    references: list[list[str]] | None = None  # every reference text of each row (references_column)

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, indices) -> Split:
        idx = list(indices)
        return Split(
            [self.rows[i] for i in idx],
            [self.prompts[i] for i in idx],
            [self.targets[i] for i in idx],
            None if self.labels is None else [self.labels[i] for i in idx],
            None if self.references is None else [self.references[i] for i in idx],
        )


class Task:
    """A loaded task spec with lazily read splits."""

    def __init__(self, spec: TaskSpec, base_dir: Path | None = None):
        self.spec = spec
        self.base_dir = base_dir
        self._splits: dict[str, Split] = {}

    @property
    def name(self) -> str:
        return self.spec.name

    def __repr__(self) -> str:
        kind = f"{len(self.spec.labels)} classes" if self.spec.is_classification else "generation"
        return f"Task({self.name!r}, {kind}, splits={self.split_names})"

    @property
    def split_names(self) -> list[str]:
        """The spec's splits, and dev when `dev_from_train` carves it out of train."""
        return list(self.spec.splits) + (["dev"] if self._carves else [])

    @property
    def _carves(self) -> bool:
        return self.spec.dev_from_train is not None

    def has_split(self, name: str) -> bool:
        return name in self.split_names

    def check_split(self, name: str) -> None:
        """Raise unless split `name` can be read: the spec names it and its local file exists. Cheap, so commands
        call it before they load a model."""
        if name not in self.split_names:
            raise DataError(
                f"Task '{self.name}' has no split '{name}'.",
                f"use one of {self.split_names} or add it under `splits:`.",
            )
        if self._carves and name == "dev" and "train" not in self.spec.splits:
            raise DataError(
                f"Task '{self.name}' has no split 'train' to carve its dev split out of (dev_from_train).",
                "add a `train:` file under `splits:`.",
            )
        source = self.spec.splits["train" if self._carves and name == "dev" else name]
        if isinstance(source, str) and not _exists(self._path(source)):
            raise self._file_not_found(name, self._path(source))

    def _file_not_found(self, split: str, path: Path) -> DataError:
        return DataError(
            f"Data file for split '{split}' of task '{self.name}' not found: {path}",
            "fix the path in the task spec, or set SOFTPROMPT_DATA / --data-dir to the data folder.",
        )

    def split(self, name: str) -> Split:
        if name not in self._splits:
            self.check_split(name)
            if self._carves and name in ("train", "dev"):
                self._splits["train"], self._splits["dev"] = self._carve(self._render("train", self._read("train")))
            else:
                self._splits[name] = self._render(name, self._read(name))
        return self._splits[name]

    def _carve(self, full: Split) -> tuple[Split, Split]:
        """(train, dev): `dev_from_train` of the train rows as dev, the rest as train, both in file order.

        Seeded (`DEV_SEED`) and stratified: a classification task gives every class its share of the dev rows
        (largest remainder); a generation task carves whole inputs, so rows that share an input (E2E) stay together
        and a count counts inputs."""
        spec = self.spec
        if spec.is_classification:
            strata = [[[i] for i, y in enumerate(full.labels) if y == c] for c in range(len(spec.labels))]
        else:
            groups: dict[str, list[int]] = {}
            for i, p in enumerate(full.prompts):
                groups.setdefault(p, []).append(i)
            strata = [list(groups.values())]
        total = sum(len(s) for s in strata)
        amount = spec.dev_from_train
        n = amount if isinstance(amount, int) else max(1, round(amount * total))
        if n >= total:
            unit = "rows" if spec.is_classification else "inputs"
            raise DataError(
                f"dev_from_train takes {n} of the {total} train {unit} of task '{self.name}', leaving none to train.",
                "lower `dev_from_train` (or --dev-from-train).",
            )
        quota = [n * len(s) / total for s in strata]
        take = [int(q) for q in quota]
        for c in sorted(range(len(strata)), key=lambda c: take[c] - quota[c])[: n - sum(take)]:
            take[c] += 1
        g = torch.Generator().manual_seed(DEV_SEED)
        dev: set[int] = set()
        for units, k in zip(strata, take):  # a unit: one row (classification) or the rows of one input (generation)
            for j in torch.randperm(len(units), generator=g)[:k].tolist():
                dev.update(units[j])
        return full.subset(i for i in range(len(full)) if i not in dev), full.subset(sorted(dev))

    def examples(self, name: str, seed: int) -> ShuffledExamples | StreamedExamples:
        """The split as a seeded, endless stream of (prompt, target) pairs: what training draws from."""
        if self.spec.streaming:
            self.check_split(name)
            return StreamedExamples(self, name, seed)
        return ShuffledExamples(self.split(name), seed)

    def _path(self, rel: str) -> Path:
        p = Path(os.path.expandvars(os.path.expanduser(rel)))
        if not p.is_absolute():
            root = Path(os.path.expandvars(self.spec.data_dir)) if self.spec.data_dir else self.base_dir
            if root is not None and not root.is_absolute() and self.base_dir is not None:
                root = self.base_dir / root
            p = (root / p) if root is not None else p
        return p

    def _read(self, split: str) -> list[dict]:
        return list(self._dataset(split))

    def _dataset(self, split: str, streaming: bool = False):
        """The split as a `datasets.Dataset`, or with `streaming` an `IterableDataset` read as it is iterated."""
        import datasets

        source = self.spec.splits[split]
        datasets.disable_progress_bars()
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its read errors come back to us as DataError
        if isinstance(source, dict):  # a hub dataset, e.g. {hub: glue, config: sst2, split: validation}
            try:
                return datasets.load_dataset(
                    source["hub"], source.get("config"), split=source.get("split", split), streaming=streaming
                )
            except Exception as e:  # datasets raises many types for network and name errors
                raise DataError(
                    f"Could not load hub dataset {source} for split '{split}': {e}",
                    "check the name and your network, or point the split at a local file.",
                ) from e
        path = self._path(source)
        if not _exists(path):
            raise self._file_not_found(split, path)
        return self._read_file(path, split, streaming)

    def _read_file(self, path: Path, split: str, streaming: bool):
        """A local data file through `datasets`' csv or json builder, with read errors as one-line `DataError`s."""
        import datasets

        kind = path.suffixes[-2] if path.suffix == ".gz" and len(path.suffixes) > 1 else path.suffix
        if kind not in _READERS:
            raise DataError(
                f"Unsupported data file type '{path.suffix}': {path}",
                "use .csv, .tsv, .jsonl or .json (optionally .gz).",
            )
        builder, options = _READERS[kind]
        try:
            return datasets.load_dataset(builder, data_files=str(path), split="train", streaming=streaming, **options)
        except UnicodeDecodeError as e:
            raise DataError(
                f"Data file is not UTF-8 text: {path} ({e.reason} at byte {e.start}).",
                "re-encode it as UTF-8 (e.g. `iconv -t utf-8`).",
            ) from e
        except DataError:
            raise
        except Exception as e:
            if "corresponds to no data" in str(e):  # datasets' word for a file without rows
                self.check_columns(split, None)
            cause = e.__cause__ or e
            if isinstance(cause, UnicodeDecodeError) or "utf-8" in str(e).lower():
                raise DataError(f"Data file is not UTF-8 text: {path}.", "re-encode it as UTF-8.") from e
            raise DataError(
                f"Could not parse {path}: {type(e).__name__}: {e}",
                "check that it is valid CSV/TSV (with a header row) or JSON lines.",
            ) from e

    def check_columns(self, split: str, row: dict | None) -> None:
        """Raise unless `row` (the split's first) has every column the spec reads."""
        spec = self.spec
        if row is None:
            raise DataError(f"Split '{split}' of task '{self.name}' is empty.", "point it at a file with data rows.")
        needed = [spec.column(f) for f in spec.template_fields]
        needed.append(spec.label_column if spec.is_classification else spec.references_column or spec.target_column)
        missing = [c for c in needed if c not in row]
        if missing:
            raise DataError(
                f"Split '{split}' of task '{self.name}' has no column(s) {missing}; it has {sorted(row)}.",
                "fix the template fields, `columns`, `label_column` or `target_column` in the task spec.",
            )

    def render_row(self, split: str, n: int, row: dict) -> str:
        """The prompt of row number `n` (from 0) of a split."""
        return self.spec.render(row, f"Row {n + 1} of split '{split}'")

    def label_index(self, split: str, n: int, row: dict) -> int:
        """Class index of row number `n` (from 0) of a classification split: its raw label matched by `label_key`."""
        raw = cell(row, self.spec.label_column, f"Row {n + 1} of split '{split}'")
        index = self.spec.class_index(raw)
        if index is None:
            names = self.spec.class_names
            fix = "add it under `labels:` in the task spec, or fix the data."
            if str(raw).lower() in ("yes", "no", "on", "off") and {"True", "False"} & set(names):
                fix = "quote the keys in `labels:` (YAML reads unquoted yes/no/on/off as booleans)."
            raise DataError(
                f"Row {n + 1} of split '{split}' has label {str(raw)!r}, which is not in the label map {names}.", fix
            )
        return index

    def references(self, split: str, n: int, row: dict) -> list[str]:
        """The reference texts of row number `n` (from 0) of a generation split: its `target_column` text, or the
        list its `references_column` holds."""
        spec, where = self.spec, f"Row {n + 1} of split '{split}'"
        if spec.references_column is None:
            value = cell(row, spec.target_column, where)
            if _kind(value):
                raise DataError(
                    f"{where}: target column '{spec.target_column}' holds a {_kind(value)}, not a text.",
                    f"name it `references_column: {spec.target_column}` for a list of references, or fix the data.",
                )
            return [str(value)]
        value = cell(row, spec.references_column, where)
        if _kind(value) != "list" or not value or not all(isinstance(t, str) for t in value):
            raise DataError(
                f"{where}: references column '{spec.references_column}' must hold a non-empty list of texts, "
                f"got {value!r:.60}.",
                "fix the data, or use `target_column:` for a column of single texts.",
            )
        return list(value)

    def _render(self, split: str, rows: list[dict]) -> Split:
        spec = self.spec
        self.check_columns(split, rows[0] if rows else None)
        prompts = [self.render_row(split, n, r) for n, r in enumerate(rows)]
        if spec.is_classification:
            labels = [self.label_index(split, n, r) for n, r in enumerate(rows)]
            words = list(spec.labels.values())
            return Split(rows, prompts, [words[i] for i in labels], labels)
        refs = [self.references(split, n, r) for n, r in enumerate(rows)]
        return Split(rows, prompts, [r[0] for r in refs], None, refs if spec.references_column else None)


def load_task(name_or_path: str, data_dir: str | None = None, dev_from_train: float | int | None = None) -> Task:
    """A built-in task by name (sst2, trec, rte, cb, e2e_nlg) or a YAML/JSON spec file.

    dev_from_train: carve the dev split out of train (a fraction or a count; see `TaskSpec`), replacing the spec's own
    dev split if it has one: what --dev-from-train sets.
    """
    for name, value in (("--task", name_or_path), ("--data-dir", data_dir)):  # a --config file passes any YAML value
        if not isinstance(value, (str, os.PathLike)) and (value is not None or name == "--task"):
            raise ConfigError(f"{name} must be a string, got {value!r:.60}.", f"pass {name} with a name or a path.")
    p = Path(name_or_path)
    builtin = BUILTIN_DIR / f"{name_or_path}.yaml"
    if not _exists(p) and _exists(builtin):
        d = yaml.safe_load(builtin.read_text())
        base_dir = Path(data_dir) if data_dir else default_data_root()
        if base_dir is None:
            raise DataError(
                f"Cannot find the data for built-in task '{name_or_path}'.",
                "set SOFTPROMPT_DATA (or --data-dir) to the folder holding sst2/, trec/, rte/, e2e_nlg/.",
            )
        return Task(TaskSpec.from_dict(_with_dev_from_train(d, dev_from_train)), base_dir)
    if not _exists(p):
        raise ConfigError(
            f"Unknown task '{name_or_path}': not a built-in task and no such spec file.",
            f"use one of {builtin_tasks()} or the path of a YAML/JSON task spec.",
        )
    try:
        text = p.read_text(encoding="utf-8")
        d = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    except OSError as e:  # a folder, or no permission
        raise ConfigError(f"Cannot read task spec {p}: {e.strerror or e}.", "pass a readable YAML/JSON file.") from e
    except json.JSONDecodeError as e:  # worded as a --config file's: the line and column, no character offset
        raise ConfigError(
            f"Task spec {p} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}.",
            "fix the syntax of the spec file.",
        ) from e
    except (yaml.YAMLError, UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: a 4,300-digit int
        raise ConfigError(f"Task spec {p} is not valid YAML/JSON: {e}", "fix the syntax of the spec file.") from e
    if not isinstance(d, dict):
        raise ConfigError(f"Task spec {p} must be a mapping of keys to values.", "see tasks/*.yaml for examples.")
    return Task(
        TaskSpec.from_dict(_with_dev_from_train(d, dev_from_train)), Path(data_dir) if data_dir else p.resolve().parent
    )


def _with_dev_from_train(d: dict, dev_from_train: float | int | None) -> dict:
    """Spec dict `d` with `dev_from_train` set (when given) in place of its dev split."""
    if dev_from_train is None:
        return d
    splits = d.get("splits") if isinstance(d.get("splits"), dict) else {}
    return {**d, "dev_from_train": dev_from_train, "splits": {k: v for k, v in splits.items() if k != "dev"}}
