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
import re
import secrets
import socket
import time
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


def _temp_name(path: Path) -> Path:
    """The temporary file a write of `path` goes through: hidden, with the writer's pid, so that a later write can
    tell the leftovers of a killed writer (pid no longer running) from a write in progress."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(6)}.tmp")


_TEMP = re.compile(r"^\.(?P<target>.+)\.(?:(?P<pid>\d+)-)?[0-9a-f]{12}\.tmp$")  # also the older names, without pid
_STALE_AFTER = 3600.0  # seconds; a temporary file this old is a leftover even if its pid runs (reused, other machine)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (a process of another user counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def clean_stale_temps(folder: str | Path) -> list[Path]:
    """Remove the temporary files that killed writes left in `folder` (their writer no longer runs, or they are over
    an hour old); writes in progress are left alone. Best effort: returns what was removed."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        m = _TEMP.match(entry.name)
        if not m or m["pid"] == str(os.getpid()):
            continue
        try:
            old = now - entry.stat(follow_symlinks=False).st_mtime > _STALE_AFTER
            if old or (m["pid"] is not None and not pid_alive(int(m["pid"]))):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue  # gone meanwhile, or not ours to remove
    return removed


_CLEANED: set[Path] = set()  # folders this process has swept for leftovers (a sweep reads the whole folder)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically (see the module docstring); a failure raises `StorageError`.

    Leftover temporary files of writes that were killed are removed from the folder at this process's first write
    there (`clean_stale_temps`): a folder of thousands of prompt files is not read again on every write.
    """
    path = Path(path)
    tmp = _temp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.parent not in _CLEANED:
            clean_stale_temps(path.parent)
            _CLEANED.add(path.parent)
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
        # gone after the rename; removed here after a failure or an interrupt. Never raises: on a read-only file
        # system unlink fails even for a file that is not there, and must not replace the StorageError above.
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
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


def read_header(path: str | Path, what: str = "prompt file") -> tuple[dict[str, tuple[str, list[int]]], dict]:
    """(tensor name -> (dtype, shape), softprompt metadata) from a safetensors file's header alone: the tensors are
    not read, so indexing a store of thousands of files costs a few kilobytes each. Errors as `read_safetensors`."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(16)
            n = int.from_bytes(head[:8], "little")
            raw = head[8:] + f.read(n - 8) if 2 <= n <= min(_MAX_HEADER, size - 8) else b""
    except FileNotFoundError:
        raise PromptFileError(f"{what} not found: {path}", "check the path.") from None
    except OSError as e:
        raise storage_error(e, path, "read") from e
    _refuse_foreign(path, head, size, what)
    try:
        header = json.loads(raw[:n]) if raw else None
    except (ValueError, UnicodeDecodeError):  # json.JSONDecodeError is a ValueError
        header = None
    if not isinstance(header, dict):
        raise PromptFileError(
            f"{path} is truncated or corrupted (its safetensors header does not parse).",
            "restore it from a backup or re-run the training that wrote it.",
        )
    meta_raw = header.pop("__metadata__", None)
    meta_raw = meta_raw.get("softprompt") if isinstance(meta_raw, dict) else None
    try:
        meta = json.loads(meta_raw) if isinstance(meta_raw, str) else None
    except ValueError:
        meta = None
    if meta is None:
        raise PromptFileError(
            f"{path} is a safetensors file without (readable) softprompt metadata.",
            "pass a file written by softprompt (PEFT adapters: `softprompt import`).",
        )
    shapes = {}
    for name, info in header.items():
        shape = info.get("shape") if isinstance(info, dict) else None
        dims_ok = isinstance(shape, list) and all(type(d) is int and 0 <= d < 2**40 for d in shape)
        if not (dims_ok and isinstance(info.get("dtype"), str)):
            raise PromptFileError(f"{path} has a corrupted header (tensor '{name}').", "re-create the file.")
        shapes[name] = (info["dtype"], info["shape"])
    return shapes, meta


def peek_metadata(path: str | Path) -> dict | None:
    """softprompt metadata from a safetensors file's header alone (the tensors are not read), or None."""
    try:
        return read_header(path)[1]
    except (PromptFileError, StorageError):
        return None


def _refuse_foreign(path: Path, head: bytes, size: int, what: str) -> None:
    """Name the format of a file that is not safetensors but another known kind (`head`: its first bytes)."""
    # A safetensors file starts with its header's length (8 bytes, little-endian) and then '{'; the length's first
    # byte can be anything (0x80, pickle's magic, in 1 file of 256), so only a file that is not shaped like
    # safetensors is checked for the magic bytes of other formats.
    shaped = len(head) > 8 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size
    for magic, kind in _FOREIGN.items():
        if not shaped and head.startswith(magic):
            raise PromptFileError(
                f"{path} is {kind}, not a softprompt {what}; it was not loaded (loading pickles can "
                "run arbitrary code).",
                "pass a .safetensors file written by softprompt, or import a PEFT adapter with `softprompt import`.",
            )


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
    _refuse_foreign(path, data, len(data), what)
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
    """The mapping in the YAML or JSON file `path` (`what` it is, e.g. "Config file", names it in errors): JSON for a
    *.json file (YAML reads some JSON differently: `1e3` is text there, and its errors speak of YAML), YAML
    otherwise; every way it can fail is one line naming the file."""
    import yaml

    path = Path(path)
    json_file = path.suffix.lower() == ".json"
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}", "pass an existing YAML or JSON file.")
    try:
        text = path.read_text(encoding="utf-8")
        values = json.loads(text) if json_file else yaml.safe_load(text)
    except OSError as e:
        raise ConfigError(f"Cannot read {what.lower()} {path}: {e.strerror or e}.", "check its permissions.") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path} is not UTF-8 text.", "re-encode it as UTF-8.") from e
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"{what} {path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}.", "fix its syntax."
        ) from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {path} is not valid YAML: {e}", "fix its syntax.") from e
    except (ValueError, RecursionError) as e:  # an integer of over 4,300 digits; nesting deeper than Python recurses
        raise ConfigError(f"{what} {path} cannot be read: {e}.", "write plain values.") from e
    if values is None and not json_file:  # an empty YAML file
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{what} {path} must be a mapping, not {type(values).__name__}.", shape_fix)
    return values


# --- a lock file: one writer per folder ------------------------------------------------------------------------------

LOCK = ".softprompt.lock"


def acquire_lock(folder: str | Path, what: str = "run directory") -> Path:
    """Take `folder/.softprompt.lock` (pid, host, time as JSON), or refuse naming the process that holds it.

    A lock whose process no longer runs on this machine is stale and taken over. Release it with `release_lock`.
    """
    folder = Path(folder)
    path = folder / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    for _ in range(3):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            held = _lock_holder(path)
            if held is None:  # stale: its process is gone; taken over
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            raise StorageError(
                f"The {what} {folder} is in use by process {held.get('pid')} on {held.get('host')} (since "
                f"{held.get('started')}): two runs writing one {what} would overwrite each other's files.",
                f"wait for it to finish, or pass another --run-dir; if no such process runs, delete {path}.",
            ) from None
        except OSError as e:
            raise storage_error(e, path, "write") from e
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me))
        return path
    raise StorageError(f"Could not take the lock {path}: other runs keep taking it.", "run one training at a time.")


def _lock_holder(path: Path) -> dict | None:
    """Who holds the lock at `path`, or None when the lock is stale (its process is gone, on this machine)."""
    try:
        held = json.loads(path.read_text())
        if not isinstance(held, dict):
            raise ValueError
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        # unreadable or half-written: a writer that just created it, unless it is old
        try:
            young = time.time() - path.stat().st_mtime < 60
        except OSError:
            return None
        return {"pid": "?", "host": "?", "started": "?"} if young else None
    pid = held.get("pid")
    if held.get("host") == socket.gethostname() and isinstance(pid, int) and not pid_alive(pid):
        return None
    return held


def release_lock(path: Path) -> None:
    """Remove a lock taken by this process (best effort: a lock left behind is stale once the process is gone)."""
    with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
