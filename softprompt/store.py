"""Prompt files: one small safetensors file per task, and a store (a directory of them).

A prompt file holds the collapsed tensors (`embeds` (P, D) and/or `kv` (L, 2, H_kv, P, hd), or a LLaMA-Adapter's
`adapter` (L_a, K, D) with its `gate` (L_a,)) and,
in the safetensors header, JSON metadata: the method and its config, the task's template and
label map, the base-model fingerprint, parameter and byte counts, and dev metrics. A hard prompt
(a text template alone) is a file with no tensors.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ._version import __version__
from .data import TaskSpec
from .errors import ConfigError, PromptFileError, SoftpromptError, StorageError
from .families import Causal
from .fileio import peek_metadata, read_header, read_safetensors, write_safetensors
from .injection import Injection

FORMAT_VERSION = 1
SUFFIX = ".safetensors"
_TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
RECREATE = "re-create the file (re-run the training, search or `softprompt import` that wrote it)."


# --- the metadata schema: every field a reader relies on, checked in one place before anything uses it -------------


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # strict: no "5" for 5, no 5 for "5"; newer keys pass


class _Base(_Strict):
    model_id: str
    config_hash: str = Field(min_length=1)
    embedding_sha256: str = Field(min_length=1)
    family: str = Causal.name  # prompt files older than families are causal


class _Parameters(_Strict):
    saved: int = Field(default=0, ge=0)
    training: int = Field(ge=0)
    base_model: int = Field(default=0, ge=0)


class _Bytes(_Strict):
    tensors: int = Field(default=0, ge=0)
    base_model: int = Field(default=0, ge=0)


class PromptMeta(_Strict):
    """The JSON metadata of a prompt file (format version 1), as `Prompt.meta` writes it."""

    format: Literal["softprompt"]
    format_version: int
    method: str = Field(min_length=1)
    method_config: dict[str, Any]
    kv_positions: int = Field(default=0, ge=0)
    task: dict[str, Any]
    base: _Base
    parameters: _Parameters
    bytes: _Bytes = Field(default_factory=_Bytes)
    metrics: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)
    library_version: str = "?"
    created: str = ""


def _violations(e: ValidationError) -> str:
    """pydantic's errors as one line: `field.sub: what is wrong (got TYPE)`; ..."""
    out = []
    for err in e.errors():
        where = ".".join(str(x) for x in err["loc"]) or "metadata"
        got = "" if err["type"] == "missing" else f" (got {type(err['input']).__name__})"
        out.append(f"{where}: {err['msg'].lower()}{got}")
    return "; ".join(out)


def check_meta(meta, path) -> tuple[PromptMeta, TaskSpec]:
    """The metadata of the prompt file at `path`, validated, and its task spec; one `PromptFileError` naming every
    bad field."""
    if not isinstance(meta, dict):
        raise PromptFileError(f"{path} has malformed metadata: a JSON {type(meta).__name__}, not an object.", RECREATE)
    if meta.get("format") != "softprompt":
        raise PromptFileError(f"{path} is not a softprompt prompt file.", "pass a file written by softprompt.")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION:
        raise PromptFileError(
            f"{path} has prompt-file format version {version}, newer than this softprompt "
            f"({__version__}) reads (up to {FORMAT_VERSION}).",
            "upgrade softprompt.",
        )
    try:
        checked = PromptMeta.model_validate(meta)
    except ValidationError as e:
        raise PromptFileError(f"{path} has malformed metadata: {_violations(e)}.", RECREATE) from None
    try:
        spec = TaskSpec.from_dict(checked.task)
    except (SoftpromptError, TypeError, ValueError, AttributeError, KeyError) as e:
        problem = e.problem if isinstance(e, SoftpromptError) else f"{type(e).__name__}: {e}"
        raise PromptFileError(f"{path} has malformed metadata: task: {' '.join(problem.split())}", RECREATE) from None
    return checked, spec


# safetensors' names of the dtypes a prompt may hold (any other is refused as not floating point)
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

# (name, rank, what the dimensions are)
_TENSORS = {
    "embeds": (2, "(P, D)"),
    "kv": (5, "(L, 2, H_kv, P, head_dim)"),
    "adapter": (3, "(L_a, K, D)"),
    "gate": (1, "(L_a,)"),
}


def check_tensors(tensors: dict[str, torch.Tensor], path, fix: str = RECREATE) -> None:
    """Refuse tensors of a prompt that have an unknown name, a wrong rank or shape, or non-finite values."""
    unknown = sorted(set(tensors) - set(_TENSORS))
    if unknown:
        raise PromptFileError(
            f"{path} holds unknown tensor(s) {unknown} (a prompt holds embeds and/or kv, or adapter and gate).", fix
        )
    if ("adapter" in tensors) != ("gate" in tensors) or (
        "adapter" in tensors and tensors["gate"].shape[:1] != tensors["adapter"].shape[:1]
    ):
        shapes = {k: tuple(tensors[k].shape) for k in ("adapter", "gate") if k in tensors}
        raise PromptFileError(f"{path}: an adapter (L_a, K, D) needs its gate (L_a,); got {shapes}.", fix)
    for name, t in tensors.items():
        rank, dims = _TENSORS[name]
        if t.dim() != rank or 0 in t.shape or (name == "kv" and t.shape[1] != 2):
            raise PromptFileError(
                f"{path}: tensor '{name}' has shape {tuple(t.shape)}; a prompt's {name} is {dims}, none of them 0.", fix
            )
        if not t.is_floating_point():
            raise PromptFileError(f"{path}: tensor '{name}' holds {t.dtype} numbers, not floating point.", fix)
        if t.is_meta:  # read from the header alone (`Prompt.peek`): the values are checked when they are read
            continue
        bad = (~torch.isfinite(t)).sum().item()
        if bad:
            raise PromptFileError(
                f"{path}: tensor '{name}' holds {bad:,} NaN or infinite value(s) of {t.numel():,}; such a prompt "
                "would turn every output into garbage.",
                fix,
            )


def check_replace(path: str | Path, overwrite: bool, base=None, flag: str = "--overwrite") -> Path:
    """The prompt file `path` (with its suffix), after refusing to replace an existing file unless `overwrite`.

    The error says what the existing file is, and when `base` is given, whether it was made for another base model.
    Also refuses a folder in the way, and an existing folder that cannot be written, before any work is done.
    """
    path = prompt_path(path)
    try:
        if path.is_dir():
            raise StorageError(f"{path} is a folder, not a prompt file.", "pass a file path for the prompt (--out).")
        if path.exists() and not overwrite:
            meta = peek_metadata(path)
            if isinstance(meta, dict) and isinstance(meta.get("base"), dict) and isinstance(meta.get("task"), dict):
                model = meta["base"].get("model_id")
                what = f"a '{meta.get('method')}' prompt for task '{meta['task'].get('name')}' on '{model}'"
                if (
                    base is not None
                    and meta["base"].get("config_hash") != base.fingerprint.config_hash
                    or (base is not None and meta["base"].get("embedding_sha256") != base.fingerprint.embedding_sha256)
                ):
                    what += f", made for another base model than '{base.name}'"
            else:
                what = "a file softprompt cannot read as a prompt"
            raise StorageError(
                f"{path} already exists ({what}); it was not replaced.",
                f"pass {flag} to replace it, or another output path (--out).",
            )
        folder = next((p for p in (path.parent, *path.parent.parents) if p.exists()), None)
        if folder is not None and (not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK)):
            raise StorageError(
                f"Cannot write {path}: {folder} is {'not a folder' if not folder.is_dir() else 'not writable'}.",
                f"check the permissions of {folder}, or pass another output path (--out).",
            )
    except OSError as e:  # a name too long for the file system
        raise StorageError(f"Cannot write {path}: {e.strerror or e}.", "pass another output path (--out).") from e
    return path


def prompt_path(path: str | Path) -> Path:
    """`path` with the prompt-file suffix (.safetensors) added when it lacks it."""
    if not isinstance(path, (str, os.PathLike)) or "\0" in str(path) or Path(path).name in ("", ".."):
        # `--out .`, `--out /` or `out: 5` in a --config file
        raise StorageError(
            f"{path!r} is not a file path for a prompt.",
            "pass a file path for the prompt (--out), e.g. prompts/task.safetensors.",
        )
    path = Path(path)
    return path if path.suffix == SUFFIX else path.with_name(path.name + SUFFIX)


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

    _spec: tuple | None = field(default=None, repr=False, compare=False)  # (the `task` it was built from, TaskSpec)

    @property
    def spec(self) -> TaskSpec:
        # built once per `task` (a store of thousands of files is indexed from their specs); a new dict rebuilds it
        if self._spec is None or self._spec[0] is not self.task:
            self._spec = (self.task, TaskSpec.from_dict(self.task))
        return self._spec[1]

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

    def save(self, path: str | Path, overwrite: bool = True) -> Path:
        """Write the tensors and metadata atomically (temporary file, then rename). Model cards are `hub`'s.

        overwrite=False refuses to replace an existing file (`check_replace`). A prompt with malformed metadata or
        tensors (wrong shapes, NaN) is refused before anything is written, as loading it would be.
        """
        path = check_replace(path, overwrite) if not overwrite else prompt_path(path)
        tensors = {k: v.detach().float().cpu() for k, v in self.injection.tensors().items()}
        meta = self.meta()
        check_tensors(tensors, f"The prompt to save as {path}", "retrain it (lower --lr, or --dtype float32).")
        check_meta(json.loads(json.dumps(meta)), f"The prompt to save as {path}")
        write_safetensors(path, tensors, meta)
        return path

    @classmethod
    def load(cls, path: str | Path, base=None) -> Prompt:
        """Load a prompt file; with `base`, refuse it unless it was made for that model.

        The metadata is validated against `PromptMeta` and the tensors for rank, shape and finite values first:
        a malformed file is one `PromptFileError` naming what is wrong, never a traceback from deeper down.
        """
        tensors, raw = read_safetensors(path)
        return cls._from_checked(tensors, raw, path, base)

    @classmethod
    def _from_checked(cls, tensors: dict[str, torch.Tensor], raw, path, base) -> Prompt:
        meta, spec = check_meta(raw, path)
        check_tensors(tensors, path)
        prompt = cls(
            injection=Injection.from_tensors(tensors, meta.kv_positions),
            method=meta.method,
            method_config=meta.method_config,
            task=meta.task,
            base=meta.base.model_dump(),
            trainable_parameters=meta.parameters.training,
            base_parameters=meta.parameters.base_model,
            base_bytes=meta.bytes.base_model,
            metrics=meta.metrics,
            train=meta.train,
            library_version=meta.library_version,
            created=meta.created,
            _spec=(meta.task, spec),
        )
        if base is not None:
            prompt.verify(base, what=f"Prompt file {path}")
        return prompt

    @classmethod
    def peek(cls, path: str | Path, base=None) -> Prompt:
        """The prompt file at `path` from its header alone: metadata checked as `load` does, tensors of the right
        shapes on the meta device (no values; `load` reads them). A store of thousands of files is indexed this way."""
        shapes, raw = read_header(path)
        tensors = {
            name: torch.empty(shape, dtype=_DTYPES.get(dtype, torch.int64), device="meta")
            for name, (dtype, shape) in shapes.items()
        }
        return cls._from_checked(tensors, raw, path, base)

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
        "method_config": prompt.method_config,  # the init, and for a transferred prompt its source file
        "virtual_tokens": prompt.method_config.get("num_virtual_tokens"),
        "parameters_saved": prompt.num_parameters,
        "parameters_training": prompt.trainable_parameters,
        "tensor_bytes": prompt.tensor_bytes,
        "base_parameters": prompt.base_parameters,
        "base_bytes": prompt.base_bytes,
        "fraction_of_base": prompt.num_parameters / prompt.base_parameters if prompt.base_parameters else None,
        "metrics": {name: _with_split(prompt, name, m) for name, m in prompt.metrics.items()},
    }


def _with_split(prompt: Prompt, name: str, m):
    """A metrics entry with the split it was measured on: its own `split`, else (files that name none) the run's eval
    split for the zero-shot and in-training evaluations, and the entry's name for the others (`dev`, ...)."""
    if not isinstance(m, dict) or "split" in m:
        return m
    own = name in ("zero_shot", "best_during_training")
    return {**m, "split": prompt.train.get("eval_split", "dev") if own else name}


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
        return sorted(self.stamps())

    def stamps(self) -> dict[str, tuple[int, int, int]]:
        """Task name -> (mtime_ns, size, inode) of its file: one directory read, no file opened. A file replaced by
        an atomic write (a new inode) or changed in place (mtime, size) gets a new stamp."""
        out = {}
        try:
            entries = list(os.scandir(self.root))
        except OSError:  # no such directory (yet), or it vanished
            return out
        for e in entries:
            name = e.name[: -len(SUFFIX)]
            if e.name.startswith(".") or not e.name.endswith(SUFFIX) or not _TASK_NAME.match(name) or ".." in name:
                continue
            try:
                st = e.stat()
            except OSError:  # removed between listing and stat
                continue
            out[name] = (st.st_mtime_ns, st.st_size, st.st_ino)
        return out

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
