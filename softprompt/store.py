"""Prompt files: one small safetensors file per task, and a store (a directory of them).

A prompt file holds the collapsed tensors (`embeds` (P, D) and/or `kv` (L, 2, H_kv, P, hd)) and,
in the safetensors header, JSON metadata: the method and its config, the task's template and
label map, the base-model fingerprint, parameter and byte counts, and dev metrics. A hard prompt
(a text template alone) is a file with no tensors.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from ._version import __version__
from .data import TaskSpec
from .errors import ConfigError, PromptFileError
from .fileio import read_safetensors, write_safetensors
from .injection import Injection

FORMAT_VERSION = 1
SUFFIX = ".safetensors"
_TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass
class Prompt:
    """A trained (or hand-written) prompt: its injection plus everything needed to use it."""

    injection: Injection
    method: str
    method_config: dict
    task: dict  # TaskSpec.portable(): template, labels, target_prefix, chat, ...
    base: dict  # Fingerprint.to_dict() of the model it was made for
    trainable_parameters: int = 0  # during training (with any MLP/encoder)
    base_parameters: int = 0
    base_bytes: int = 0
    metrics: dict = field(default_factory=dict)  # e.g. {"zero_shot": {...}, "dev": {...}}
    train: dict = field(default_factory=dict)  # a summary of the training run
    library_version: str = __version__
    created: str = ""

    @classmethod
    def for_base(
        cls, base, injection: Injection, method: str, method_config: dict, task: TaskSpec | dict, **fields
    ) -> Prompt:
        """A prompt made for `base`: the model's fingerprint, parameter count and size come from `base`."""
        return cls(
            injection=injection,
            method=method,
            method_config=method_config,
            task=task.portable() if isinstance(task, TaskSpec) else task,
            base=base.fingerprint.to_dict(),
            base_parameters=base.num_parameters(),
            base_bytes=base.num_bytes(),
            **fields,
        )

    @property
    def spec(self) -> TaskSpec:
        return TaskSpec.from_dict(self.task)

    @property
    def num_parameters(self) -> int:
        """Numbers stored in the file (the collapsed prompt)."""
        return sum(t.numel() for t in self.injection.tensors().values())

    @property
    def tensor_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.injection.tensors().values())

    def meta(self) -> dict:
        return {
            "format": "softprompt",
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "method_config": self.method_config,
            "kv_positions": self.injection.kv_positions,
            "task": self.task,
            "base": self.base,
            "parameters": {
                "saved": self.num_parameters,
                "training": self.trainable_parameters,
                "base_model": self.base_parameters,
            },
            "bytes": {"tensors": self.tensor_bytes, "base_model": self.base_bytes},
            "metrics": self.metrics,
            "train": self.train,
            "library_version": self.library_version,
            "created": self.created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    def save(self, path: str | Path) -> Path:
        """Write the tensors and metadata atomically (temporary file, then rename). Model cards are `hub`'s."""
        path = Path(path)
        if path.suffix != SUFFIX:
            path = path.with_name(path.name + SUFFIX)
        write_safetensors(path, {k: v.float() for k, v in self.injection.tensors().items()}, self.meta())
        return path

    @classmethod
    def load(cls, path: str | Path, base=None) -> Prompt:
        """Load a prompt file; with `base`, refuse it unless it was made for that model."""
        tensors, meta = read_safetensors(path)
        if meta.get("format") != "softprompt":
            raise PromptFileError(f"{path} is not a softprompt prompt file.", "pass a file written by softprompt.")
        version = meta.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise PromptFileError(
                f"{path} has prompt-file format version {version}, newer than this softprompt "
                f"({__version__}) reads (up to {FORMAT_VERSION}).",
                "upgrade softprompt.",
            )
        try:
            injection = Injection(tensors.get("embeds"), tensors.get("kv"), int(meta.get("kv_positions", 0)))
            prompt = cls(
                injection=injection,
                method=meta["method"],
                method_config=meta["method_config"],
                task=meta["task"],
                base=meta["base"],
                trainable_parameters=meta["parameters"]["training"],
                base_parameters=meta["parameters"].get("base_model", 0),
                base_bytes=meta["bytes"].get("base_model", 0),
                metrics=meta.get("metrics", {}),
                train=meta.get("train", {}),
                library_version=meta.get("library_version", "?"),
                created=meta.get("created", ""),
            )
        except (KeyError, TypeError) as e:
            raise PromptFileError(f"{path} has incomplete metadata (missing {e}).", "re-create the file.") from e
        if base is not None:
            prompt.verify(base, what=f"Prompt file {path}")
        return prompt

    def verify(self, base, what: str = "This prompt") -> None:
        from .base import Fingerprint

        Fingerprint.from_dict(self.base).check(base.fingerprint, what)
        try:
            base.family.check_injection(self.injection, what)
        except ConfigError as e:
            raise PromptFileError(e.problem, e.fix) from e


def info(prompt: Prompt) -> dict:
    """The numbers `softprompt info` prints: parameters and bytes against a full copy of the base model."""
    spec = prompt.task
    return {
        "method": prompt.method,
        "task": spec.get("name"),
        "base_model": prompt.base.get("model_id"),
        "virtual_tokens": prompt.method_config.get("num_virtual_tokens"),
        "parameters_saved": prompt.num_parameters,
        "parameters_training": prompt.trainable_parameters,
        "tensor_bytes": prompt.tensor_bytes,
        "base_parameters": prompt.base_parameters,
        "base_bytes": prompt.base_bytes,
        "fraction_of_base": prompt.num_parameters / prompt.base_parameters if prompt.base_parameters else None,
        "metrics": prompt.metrics,
    }


class Store:
    """A directory of prompt files; the file stem is the task name used in requests."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, name: str) -> Path:
        """The file of task `name`; names cannot reach outside the store (no '/', '..', absolute paths)."""
        if not isinstance(name, str) or not _TASK_NAME.match(name) or ".." in name:
            raise ConfigError(
                f"Invalid task name {name!r}.",
                "use letters, digits, '.', '_' and '-' only (no paths), starting with a letter or digit.",
            )
        return self.root / f"{name}{SUFFIX}"

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name[: -len(SUFFIX)]
            for p in self.root.glob(f"*{SUFFIX}")
            if not p.name.startswith(".") and _TASK_NAME.match(p.name[: -len(SUFFIX)])
        )

    def load(self, name: str, base=None) -> Prompt:
        p = self.path(name)
        if not p.exists():
            raise ConfigError(f"Unknown task '{name}' in store {self.root}.", f"use one of {self.names()}.")
        return Prompt.load(p, base)

    def save(self, name: str, prompt: Prompt) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        return prompt.save(self.path(name))

    def remove(self, name: str) -> None:
        p = self.path(name)
        if not p.exists():
            raise ConfigError(f"Unknown task '{name}' in store {self.root}.", f"use one of {self.names()}.")
        p.unlink()


def load_prompt(path: str | Path, base=None) -> Prompt:
    return Prompt.load(path, base)
