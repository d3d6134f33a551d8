"""Atomic file writes and safe reads of safetensors files (never pickle).

A reader never sees a half-written file: data goes to a temporary file in the same directory,
is flushed to disk, then renamed over the target (rename is atomic on POSIX and Windows). If the
write fails (disk full, permission denied) the previous file is left as it was, and the error is a
`StorageError` naming the file and the fix.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .errors import ConfigError, PromptFileError, StorageError

# Magic bytes of formats people pass by mistake. Pickles run code when loaded; we only name them.
_FOREIGN = {
    b"\x80": "a Python pickle (torch.save / .bin / .pt)",
    b"PK\x03\x04": "a zip archive (torch.save)",
    b"GGUF": "a GGUF model file",
}
_MAX_HEADER = 100_000_000  # bytes; a longer "header" is a file of another kind


def storage_error(e: OSError, path: Path, doing: str) -> StorageError:
    """A `StorageError` for an OSError while `doing` ("write" or "read") `path`, with the fix for its cause."""
    denied = (
        f"check the permissions of {path.parent}, or pass another output path."
        if doing == "write"
        else f"check the permissions of {path}."
    )
    fixes = {
        errno.ENOSPC: "free disk space (or write elsewhere) and run the command again.",
        errno.EDQUOT: "free space in your disk quota and run the command again.",
        errno.EACCES: denied,
        errno.EPERM: denied,
        errno.EROFS: "the file system is read-only: pass an output path on a writable one.",
    }
    kept = " The previous version is unchanged." if doing == "write" and path.exists() else ""
    return StorageError(
        f"Could not {doing} {path}: {e.strerror or e}.{kept}",
        fixes.get(e.errno, "check the path, the disk and the permissions, and run the command again."),
    )


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically (see the module docstring); a failure raises `StorageError`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Not mkstemp, whose files only their owner may read: the temporary file gets the mode of the file it
        # replaces, or of any new file (0o666 less the umask), so a server running as another user can read it.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            with contextlib.suppress(FileNotFoundError):  # a new file keeps its mode
                os.chmod(tmp, path.stat().st_mode & 0o7777)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise storage_error(e, path, "write") from e
    finally:
        tmp.unlink(missing_ok=True)  # gone after the rename; removed here after a failure or an interrupt
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` survive a power cut (POSIX; best effort: not every file system allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Tensors plus a JSON metadata dict in the safetensors header, written atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write_bytes(path, st_save(tensors, metadata={"softprompt": json.dumps(meta, sort_keys=True)}))


def header_metadata(data: bytes) -> str | None:
    """The softprompt metadata (a JSON string) in the header of safetensors bytes, or None; ValueError if no header.

    A safetensors file is its header's length (8 bytes, little-endian), the JSON header, then the tensors.
    """
    n = int.from_bytes(data[:8], "little")
    if not 2 <= n <= min(_MAX_HEADER, len(data) - 8):
        raise ValueError("no safetensors header")
    header = json.loads(data[8 : 8 + n])
    return header.get("__metadata__", {}).get("softprompt") if isinstance(header, dict) else None


def peek_metadata(path: str | Path) -> dict | None:
    """softprompt metadata from a safetensors file's header alone (the tensors are not read), or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            meta = header_metadata(head + f.read(min(int.from_bytes(head, "little"), _MAX_HEADER)))
        return json.loads(meta) if meta else None
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def read_safetensors(path: str | Path, what: str = "prompt file") -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a file written by `write_safetensors`, with a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(
            f"{what} not found: {path}", "check the path (`softprompt store list` shows stored prompts)."
        )
    try:
        data = path.read_bytes()
    except OSError as e:
        raise storage_error(e, path, "read") from e
    # A safetensors file starts with its header's length (8 bytes, little-endian) and then '{'; the length's first
    # byte can be anything (0x80, pickle's magic, in 1 file of 256), so only a file that is not shaped like
    # safetensors is checked for the magic bytes of other formats.
    shaped = len(data) > 8 and data[8:9] == b"{" and 8 + int.from_bytes(data[:8], "little") <= len(data)
    for magic, kind in _FOREIGN.items():
        if not shaped and data.startswith(magic):
            raise PromptFileError(
                f"{path} is {kind}, not a softprompt {what}; it was not loaded (loading pickles can "
                "run arbitrary code).",
                "pass a .safetensors file written by softprompt, or import a PEFT adapter with `softprompt import`.",
            )
    try:
        tensors = st_load(data)
        meta_raw = header_metadata(data)
    except (SafetensorError, ValueError, UnicodeDecodeError) as e:
        raise PromptFileError(
            f"{path} is truncated or corrupted ({e}).", "restore it from a backup or re-run the training that wrote it."
        ) from e
    if meta_raw is None:
        raise PromptFileError(
            f"{path} is a safetensors file without softprompt metadata.",
            "pass a file written by softprompt (PEFT adapters: `softprompt import`).",
        )
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
