"""Prompt files: metadata, verification against the base model, and bad files."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from helpers import build_tiny, random_soft_prompt

import softprompt as sp
from softprompt.errors import ConfigError, PromptFileError, StorageError
from softprompt.store import Store, info


def test_metadata_round_trip(base, sst2, tmp_path):
    p = random_soft_prompt(base, sst2.spec, metrics={"dev": {"accuracy": 0.9}})
    path = p.save(tmp_path / "sst2")
    assert path.name == "sst2.safetensors"
    q = sp.load_prompt(path, base)
    assert torch.equal(q.injection.embeds, p.injection.embeds)
    assert q.spec.template == sst2.spec.template and q.spec.labels == sst2.spec.labels
    assert q.metrics == {"dev": {"accuracy": 0.9}}
    d = info(q)
    assert d["parameters_saved"] == 5 * base.hidden_size
    assert d["fraction_of_base"] == pytest.approx(5 * base.hidden_size / base.num_parameters())
    # small: tensors plus a JSON header, nothing of the model
    assert path.stat().st_size < 5 * base.hidden_size * 4 + 8192


def test_prompt_for_another_base_model_is_refused_naming_both(tokenizer, sst2, tmp_path):
    a = build_tiny("llama", tokenizer, seed=0)
    b = build_tiny("llama", tokenizer, seed=1)  # same architecture, other weights
    path = random_soft_prompt(a, sst2.spec).save(tmp_path / "p")
    with pytest.raises(PromptFileError) as e:
        sp.load_prompt(path, b)
    assert a.name in str(e.value) and b.name in str(e.value) and "weights" in str(e.value)
    c = build_tiny("gpt2", tokenizer)
    with pytest.raises(PromptFileError, match="architecture"):
        sp.load_prompt(path, c)


def test_fingerprint_ignores_dtype_but_not_weights(tokenizer):
    a = build_tiny("llama", tokenizer)
    fa = a.fingerprint
    a.model.to(torch.bfloat16)
    del a.__dict__["fingerprint"]
    assert a.fingerprint.embedding_sha256 == fa.embedding_sha256


@pytest.mark.parametrize(
    "mangle, message",
    [
        (lambda b: b[: len(b) // 2], "truncated or corrupted"),
        (lambda b: b"\x00" * 8 + b[8:], "truncated or corrupted"),
        (lambda b: pickle.dumps({"embeds": [1.0]}), "pickle"),
        (lambda b: b"PK\x03\x04" + b[4:], "zip"),
    ],
)
def test_corrupted_and_foreign_files_are_refused(base, sst2, tmp_path, mangle, message):
    path = random_soft_prompt(base, sst2.spec).save(tmp_path / "p")
    path.write_bytes(mangle(path.read_bytes()))
    with pytest.raises(PromptFileError, match=message):
        sp.load_prompt(path, base)


def test_pickle_is_never_unpickled(tmp_path, monkeypatch):
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(object()))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("unpickled"))
    with pytest.raises(PromptFileError):
        sp.load_prompt(path)


def test_newer_format_version_is_refused(base, sst2, tmp_path):
    from softprompt.fileio import read_safetensors, write_safetensors

    path = random_soft_prompt(base, sst2.spec).save(tmp_path / "p")
    tensors, meta = read_safetensors(path)
    meta["format_version"] = 99
    write_safetensors(path, tensors, meta)
    with pytest.raises(PromptFileError, match="upgrade softprompt"):
        sp.load_prompt(path)


def test_failed_write_keeps_previous_file(base, sst2, tmp_path, monkeypatch):
    p = random_soft_prompt(base, sst2.spec)
    path = p.save(tmp_path / "p")
    before = path.read_bytes()

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(StorageError, match="No space left on device. The previous version is unchanged") as e:
        random_soft_prompt(base, sst2.spec).save(path)
    assert "free disk space" in e.value.fix
    assert path.read_bytes() == before
    assert sorted(f.name for f in tmp_path.iterdir()) == [path.name]  # no temp file left behind


def test_store_names_cannot_escape(tmp_path):
    store = Store(tmp_path / "store")
    for bad in ["../x", "/etc/passwd", "a/b", "..", ".hidden", ""]:
        with pytest.raises(ConfigError, match="Invalid task name"):
            store.path(bad)


def test_store_list_load_remove(base, sst2, tmp_path):
    store = Store(tmp_path)
    store.save("sst2", random_soft_prompt(base, sst2.spec))
    store.save("other", random_soft_prompt(base, sst2.spec))
    assert store.names() == ["other", "sst2"]
    assert store.load("sst2", base).method == "soft"
    store.remove("other")
    assert store.names() == ["sst2"]
    with pytest.raises(ConfigError, match=r"Unknown task 'other'.*\['sst2'\]"):
        store.load("other")


def test_metadata_is_plain_json_in_the_safetensors_header(base, sst2, tmp_path):
    path = random_soft_prompt(base, sst2.spec).save(tmp_path / "p")
    raw = path.read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    meta = json.loads(header["__metadata__"]["softprompt"])
    assert meta["format_version"] == 1 and meta["base"]["config_hash"] == base.fingerprint.config_hash


def test_a_header_length_starting_with_pickles_magic_byte_still_loads(base, sst2, tmp_path):
    # the first byte of a safetensors file is the low byte of its header length; 0x80 is also pickle's magic
    for n in range(300):
        path = random_soft_prompt(base, sst2.spec, metrics={"pad": "x" * n}).save(tmp_path / "p")
        if path.read_bytes()[:1] == b"\x80":
            break
    else:
        pytest.fail("no header length with a low byte of 0x80")
    assert sp.load_prompt(path, base).metrics["pad"] == "x" * n


# --- malformed metadata and tensors: one PromptFileError naming the field, never a traceback ------------------------


DROP = object()  # a metadata field to delete


def _rewrite(path, tensors=None, **meta_changes):
    """Rewrite a prompt file with some metadata fields changed (DROP deletes one) and/or other tensors."""
    from softprompt.fileio import read_safetensors, write_safetensors

    old_tensors, meta = read_safetensors(path)
    for key, value in meta_changes.items():
        if value is DROP:
            meta.pop(key)
        else:
            meta[key] = value
    write_safetensors(path, old_tensors if tensors is None else tensors, meta)
    return path


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"task": ["sst2"]}, "task: input should be a valid dictionary (got list)"),
        ({"method": 3}, "method: input should be a valid string (got int)"),
        ({"base": {}}, "base.model_id: field required; base.config_hash: field required"),
        ({"method_config": None}, "method_config: input should be a valid dictionary (got NoneType)"),
        ({"parameters": {"training": "12"}}, "parameters.training: input should be a valid integer (got str)"),
        ({"kv_positions": -1}, "kv_positions: input should be greater than or equal to 0"),
        ({"metrics": [1]}, "metrics: input should be a valid dictionary (got list)"),
        ({"task": {"name": "t"}}, "task: A task spec needs `name` and `template`"),
        ({"parameters": DROP}, "parameters: field required"),
    ],
)
def test_malformed_metadata_is_one_error_naming_the_field(base, sst2, tmp_path, changes, message):
    path = random_soft_prompt(base, sst2.spec).save(tmp_path / "p")
    _rewrite(path, **changes)
    with pytest.raises(PromptFileError) as e:
        sp.load_prompt(path, base)
    assert message in str(e.value) and "malformed metadata" in str(e.value)
    assert "\n" not in str(e.value) and "re-create the file" in e.value.fix


@pytest.mark.parametrize(
    "tensors, message",
    [
        ({"embeds": torch.zeros(8)}, "tensor 'embeds' has shape (8,); a prompt's embeds is (P, D)"),
        ({"embeds": torch.zeros(1, 5, 8)}, "tensor 'embeds' has shape (1, 5, 8)"),
        (
            {"kv": torch.zeros(2, 2, 4, 8)},
            "tensor 'kv' has shape (2, 2, 4, 8); a prompt's kv is (L, 2, H_kv, P, head_dim)",
        ),
        ({"embeds": torch.full((5, 64), float("nan"))}, "holds 320 NaN or infinite value(s) of 320"),
        ({"embeds": torch.zeros(5, 64), "extra": torch.zeros(1)}, "unknown tensor(s) ['extra']"),
    ],
)
def test_tensors_of_the_wrong_rank_or_not_finite_are_refused(base, sst2, tmp_path, tensors, message):
    path = random_soft_prompt(base, sst2.spec).save(tmp_path / "p")
    _rewrite(path, tensors)
    with pytest.raises(PromptFileError) as e:
        sp.load_prompt(path)
    assert message in str(e.value)


def test_a_prompt_with_nan_is_refused_before_it_is_saved(base, sst2, tmp_path):
    p = random_soft_prompt(base, sst2.spec)
    p.injection.embeds[0, 0] = float("inf")
    with pytest.raises(PromptFileError, match="holds 1 NaN or infinite value"):
        p.save(tmp_path / "p")
    assert list(tmp_path.iterdir()) == []


def test_store_list_shows_a_bad_file_and_lists_the_rest(base, sst2, tmp_path, capsys):
    from helpers import run_cli

    store = Store(tmp_path)
    store.save("good", random_soft_prompt(base, sst2.spec))
    _rewrite(store.save("bad", random_soft_prompt(base, sst2.spec)), base={})
    code, out, err = run_cli(capsys, "store", "list", "--store", tmp_path, "--json")
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["good"]["status"] == "readable"
    assert rows["bad"]["status"] == "refused" and "base.model_id: field required" in rows["bad"]["reason"]


# --- replacing files -------------------------------------------------------------------------------------------------


def test_save_without_overwrite_refuses_an_existing_file_naming_it(base, sst2, tokenizer, tmp_path):
    from softprompt.store import check_replace

    path = random_soft_prompt(base, sst2.spec).save(tmp_path / "p")
    before = path.read_bytes()
    with pytest.raises(StorageError, match=r"p.safetensors already exists \(a 'soft' prompt for task 'sst2'") as e:
        random_soft_prompt(base, sst2.spec).save(path, overwrite=False)
    assert "pass --overwrite to replace it" in e.value.fix and path.read_bytes() == before
    other = build_tiny("llama", tokenizer, seed=1)
    with pytest.raises(StorageError, match="made for another base model than"):
        check_replace(path, False, other)
    assert check_replace(tmp_path / "new", False) == tmp_path / "new.safetensors"
    random_soft_prompt(base, sst2.spec).save(path, overwrite=True)
    assert path.read_bytes() != before


def test_an_output_folder_that_cannot_be_written_is_refused_before_any_work(base, sst2, tmp_path):
    from softprompt.store import check_replace

    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="is not a folder"):
        check_replace(tmp_path / "file" / "p", False)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: permissions are not enforced")
        with pytest.raises(StorageError, match="is not writable"):
            check_replace(ro / "p", True)
        # the write itself: a StorageError, not the cleanup's own OSError from the finally block
        with pytest.raises(StorageError, match="Permission denied") as e:
            random_soft_prompt(base, sst2.spec).save(ro / "p")
        assert f"check the permissions of {ro}" in e.value.fix
    finally:
        ro.chmod(0o700)


def test_cleanup_errors_never_replace_the_storage_error(base, sst2, tmp_path, monkeypatch):
    from pathlib import Path

    def read_only(*a, **k):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(os, "open", read_only)
    monkeypatch.setattr(Path, "unlink", read_only)  # unlink fails on a read-only file system even for no file
    with pytest.raises(StorageError, match="Read-only file system") as e:
        random_soft_prompt(base, sst2.spec).save(tmp_path / "p")
    assert "writable" in e.value.fix


def test_stale_temporary_files_of_killed_writes_are_cleaned_up(base, sst2, tmp_path):
    import subprocess
    import sys
    import time

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".p.safetensors.{dead_pid}-0123456789ab.tmp"  # its writer was killed
    old = tmp_path / ".p.safetensors.0123456789ab.tmp"  # the older naming, without pid, an hour old
    live = tmp_path / f".q.safetensors.{os.getppid()}-0123456789ab.tmp"  # a write in progress
    for f in (stale, old, live):
        f.write_bytes(b"half")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    random_soft_prompt(base, sst2.spec).save(tmp_path / "p")
    assert sorted(f.name for f in tmp_path.iterdir()) == sorted(["p.safetensors", live.name])


def test_a_lock_refuses_a_second_writer_and_a_dead_one_is_taken_over(tmp_path):
    import subprocess
    import sys

    from softprompt.fileio import LOCK, acquire_lock, release_lock

    lock = acquire_lock(tmp_path)
    with pytest.raises(StorageError, match=rf"is in use by process {os.getpid()} on") as e:
        acquire_lock(tmp_path)
    assert "pass another --run-dir" in e.value.fix and LOCK in e.value.fix
    release_lock(lock)
    assert not lock.exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "started": "earlier"}))
    assert acquire_lock(tmp_path) == lock  # stale: taken over
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    release_lock(lock)
