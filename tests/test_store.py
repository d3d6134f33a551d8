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
