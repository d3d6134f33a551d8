"""Atomic file writes and safe reads of safetensors files (never pickle).

A reader never sees a half-written file: data goes to a temporary file in the same directory,
is flushed to disk, then renamed over the target (rename is atomic on POSIX and Windows). If the
write fails (disk full, permission denied) the previous file is left as it was.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .errors import ConfigError, PromptFileError

# Magic bytes of formats people pass by mistake. Pickles run code when loaded; we only name them.
_FOREIGN = {b"\x80": "a Python pickle (torch.save / .bin / .pt)", b"PK\x03\x04": "a zip archive (torch.save)",
            b"GGUF": "a GGUF model file"}


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Tensors plus a JSON metadata dict in the safetensors header, written atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write_bytes(path, st_save(tensors, metadata={"softprompt": json.dumps(meta, sort_keys=True)}))


def read_safetensors(path: str | Path, what: str = "prompt file") -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a file written by `write_safetensors`, with a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"{what} not found: {path}", "check the path (`softprompt store list` shows stored prompts).")
    data = path.read_bytes()
    for magic, kind in _FOREIGN.items():
        if data.startswith(magic):
            raise PromptFileError(f"{path} is {kind}, not a softprompt {what}; it was not loaded (loading pickles can "
                                  "run arbitrary code).", "pass a .safetensors file written by softprompt, or import "
                                  "a PEFT adapter with `softprompt import`.")
    try:
        tensors = st_load(data)
        header_len = int.from_bytes(data[:8], "little")
        meta_raw = json.loads(data[8:8 + header_len]).get("__metadata__", {}).get("softprompt")
    except (SafetensorError, ValueError, UnicodeDecodeError) as e:
        raise PromptFileError(f"{path} is truncated or corrupted ({e}).",
                              "restore it from a backup or re-run the training that wrote it.") from e
    if meta_raw is None:
        raise PromptFileError(f"{path} is a safetensors file without softprompt metadata.",
                              "pass a file written by softprompt (PEFT adapters: `softprompt import`).")
    try:
        meta = json.loads(meta_raw)
    except json.JSONDecodeError as e:
        raise PromptFileError(f"{path} has corrupted metadata ({e}).", "re-create the file.") from e
    return tensors, meta


def read_mapping(path: str | Path, what: str, shape_fix: str) -> dict:
    """A YAML (or JSON) file that must hold a mapping, with one-line errors naming `what` it is."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}", "pass an existing YAML or JSON file.")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {path} is not valid YAML/JSON: {e}", "fix its syntax.") from e
    if not isinstance(values, dict):
        raise ConfigError(f"{what} {path} must be a mapping.", shape_fix)
    return values
