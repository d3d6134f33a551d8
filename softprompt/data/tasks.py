"""Task specs and their data: files (CSV, TSV, JSON lines, hub datasets) -> rendered splits.

A task is a spec (YAML or JSON) naming data files per split, a template with named fields and
either a label map (raw label value -> verbalizer word; classification) or a target column
(generation). The same code serves SST-2 (TSV, integer labels), TREC (TSV, string labels), RTE
(JSONL, two input fields) and E2E NLG (CSV, several references per input) by configuration alone.

Files are read with Hugging Face `datasets` (CSV, TSV, JSON lines, or a hub dataset), so one
path covers local files and the hub.
"""

from __future__ import annotations

import csv
import json
import os
import string
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from ..errors import ConfigError, DataError, check_keys
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


@dataclass
class TaskSpec:
    """A task's data, template and targets. Load with `load_task`; every field can be set in YAML."""

    name: str
    template: str  # e.g. "Review: {sentence}\nSentiment:"; {field} names a column (see `columns`)
    splits: dict = field(default_factory=dict)  # split -> file path, or {hub: name, config: c, split: s}
    labels: dict | None = None  # classification: raw label value -> verbalizer word
    label_column: str = "label"
    target_column: str | None = None  # generation: the column holding the reference text
    columns: dict = field(default_factory=dict)  # template field -> column name, where they differ
    target_prefix: str = " "  # text between the rendered template and the target
    chat: bool = False  # wrap the rendered template as a user turn with the tokenizer's chat template
    max_new_tokens: int = 64  # generation length limit when decoding this task
    description: str = ""
    data_dir: str | None = None  # base directory for relative split paths
    streaming: bool = False  # read the train split lazily (datasets streaming): files larger than memory, hub datasets
    shuffle_buffer: int = 10_000  # with streaming: examples are shuffled within a buffer of this many rows

    def __post_init__(self):
        if not self.template:
            raise ConfigError(f"Task '{self.name}' has no template.", "add `template:` with {field} placeholders.")
        if (self.labels is None) == (self.target_column is None):
            raise ConfigError(
                f"Task '{self.name}' must have exactly one of `labels` (classification) "
                "or `target_column` (generation).",
                "set one of them in the task spec.",
            )
        if self.labels is not None:
            if len(self.labels) < 2:
                raise ConfigError(f"Task '{self.name}' has fewer than 2 labels.", "list every class in `labels`.")
            self.labels = {str(k): str(v) for k, v in self.labels.items()}
            words = list(self.labels.values())
            if len(set(words)) != len(words):
                raise ConfigError(
                    f"Task '{self.name}' maps two labels to the same verbalizer word.",
                    "give every class its own word in `labels`.",
                )
        try:
            parsed = [(text, f) for text, f, _, _ in string.Formatter().parse(self.template)]
        except ValueError as e:
            raise ConfigError(
                f"Task '{self.name}': template is not a valid format string ({e}).",
                "write fields as {name} and literal braces as {{ and }}.",
            ) from e
        fields = [f for _, f in parsed if f is not None]
        if any(f == "" or not f.isidentifier() for f in fields):
            raise ConfigError(
                f"Task '{self.name}': template fields must be names like {{sentence}}.",
                "name every placeholder in the template.",
            )
        if fields.count(MASK_FIELD) > 1:
            raise ConfigError(
                f"Task '{self.name}': the template has {fields.count(MASK_FIELD)} {{mask}} slots.",
                "put one {mask} where the label word goes.",
            )
        self.template_fields = [f for f in fields if f != MASK_FIELD]
        # text after the {mask} slot: only a masked LM reads any (a causal LM's label word follows the prompt)
        after = (
            [text for text, _ in parsed[[f for _, f in parsed].index(MASK_FIELD) + 1 :]] if MASK_FIELD in fields else []
        )
        self.mask_inside = any(after)

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

    def column(self, field_name: str) -> str:
        return self.columns.get(field_name, field_name)

    def render(self, row: dict) -> str:
        """The template filled with one row's fields."""
        return self.template.format(**{f: row[self.column(f)] for f in self.template_fields}, **{MASK_FIELD: MASK})

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
                raise ConfigError(
                    f"The template has fields {fields}; a plain string can only fill one.",
                    'pass a JSON object, e.g. \'{"premise": "...", "hypothesis": "..."}\'.',
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
        return self.render(value)

    def portable(self) -> dict:
        """The spec without data locations: what a prompt file stores to format requests later."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        for k in ("splits", "data_dir", "streaming", "shuffle_buffer"):
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
    targets: list[str]  # the target text of each row (verbalizer word for classification)
    labels: list[int] | None  # class index per row (classification)

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, indices) -> Split:
        idx = list(indices)
        return Split(
            [self.rows[i] for i in idx],
            [self.prompts[i] for i in idx],
            [self.targets[i] for i in idx],
            None if self.labels is None else [self.labels[i] for i in idx],
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
        return f"Task({self.name!r}, {kind}, splits={list(self.spec.splits)})"

    def has_split(self, name: str) -> bool:
        return name in self.spec.splits

    def split(self, name: str) -> Split:
        if name not in self._splits:
            if name not in self.spec.splits:
                raise DataError(
                    f"Task '{self.name}' has no split '{name}'.",
                    f"use one of {list(self.spec.splits)} or add it under `splits:`.",
                )
            self._splits[name] = self._render(name, self._read(name))
        return self._splits[name]

    def examples(self, name: str, seed: int) -> ShuffledExamples | StreamedExamples:
        """The split as a seeded, endless stream of (prompt, target) pairs: what training draws from."""
        if self.spec.streaming:
            if name not in self.spec.splits:
                self.split(name)  # raises the missing-split error
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
        if not path.exists():
            raise DataError(
                f"Data file for split '{split}' of task '{self.name}' not found: {path}",
                "fix the path in the task spec, or set SOFTPROMPT_DATA / --data-dir to the data folder.",
            )
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
        needed.append(spec.label_column if spec.is_classification else spec.target_column)
        missing = [c for c in needed if c not in row]
        if missing:
            raise DataError(
                f"Split '{split}' of task '{self.name}' has no column(s) {missing}; it has {sorted(row)}.",
                "fix the template fields, `columns`, `label_column` or `target_column` in the task spec.",
            )

    def label_index(self, split: str, n: int, row: dict) -> int:
        """Class index of row number `n` (from 0) of a classification split."""
        raw = str(row[self.spec.label_column])
        index = self.spec.class_names
        if raw not in self.spec.labels:
            raise DataError(
                f"Row {n + 1} of split '{split}' has label {raw!r}, which is not in the label map {index}.",
                "add it under `labels:` in the task spec, or fix the data.",
            )
        return index.index(raw)

    def _render(self, split: str, rows: list[dict]) -> Split:
        spec = self.spec
        self.check_columns(split, rows[0] if rows else None)
        prompts = [spec.render(r) for r in rows]
        if spec.is_classification:
            labels = [self.label_index(split, n, r) for n, r in enumerate(rows)]
            words = list(spec.labels.values())
            return Split(rows, prompts, [words[i] for i in labels], labels)
        return Split(rows, prompts, [str(r[spec.target_column]) for r in rows], None)


def load_task(name_or_path: str, data_dir: str | None = None) -> Task:
    """A built-in task by name (sst2, trec, rte, cb, e2e_nlg) or a YAML/JSON spec file."""
    p = Path(name_or_path)
    builtin = BUILTIN_DIR / f"{name_or_path}.yaml"
    if not p.exists() and builtin.exists():
        d = yaml.safe_load(builtin.read_text())
        base_dir = Path(data_dir) if data_dir else default_data_root()
        if base_dir is None:
            raise DataError(
                f"Cannot find the data for built-in task '{name_or_path}'.",
                "set SOFTPROMPT_DATA (or --data-dir) to the folder holding sst2/, trec/, rte/, e2e_nlg/.",
            )
        return Task(TaskSpec.from_dict(d), base_dir)
    if not p.exists():
        raise ConfigError(
            f"Unknown task '{name_or_path}': not a built-in task and no such spec file.",
            f"use one of {builtin_tasks()} or the path of a YAML/JSON task spec.",
        )
    try:
        d = json.loads(p.read_text()) if p.suffix == ".json" else yaml.safe_load(p.read_text())
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"Task spec {p} is not valid YAML/JSON: {e}", "fix the syntax of the spec file.") from e
    if not isinstance(d, dict):
        raise ConfigError(f"Task spec {p} must be a mapping of keys to values.", "see tasks/*.yaml for examples.")
    task = Task(TaskSpec.from_dict(d), Path(data_dir) if data_dir else p.resolve().parent)
    return task
