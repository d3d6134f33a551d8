"""Concurrent writers and readers of one prompt store, in separate processes: no reader, and no server reloading
the store, ever sees a half-written file; every load is one of the versions written, whole."""

from __future__ import annotations

import dataclasses
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

import softprompt as sp
from softprompt.errors import ConfigError
from softprompt.multitask import MultiTask
from softprompt.store import Store

TASK = "churn"
SIZES = (1, 7, 40, 150)  # virtual tokens of each version: files of ~1 KB to ~40 KB, so writes take a while
WRITES = 40  # per writer process


def version(base, sst2, i: int) -> sp.Prompt:
    """Version i: every number of its tensor is i, so a torn file would show as a wrong value or shape."""
    P = SIZES[i]
    return sp.Prompt(
        injection=sp.Injection(embeds=torch.full((P, base.hidden_size), float(i))),
        method="soft",
        method_config={"num_virtual_tokens": P, "init": "vocab", "init_text": None},
        task=sst2.spec.portable(),
        base=base.fingerprint.to_dict(),
        metrics={"version": i},
    )


def check(prompt: sp.Prompt) -> int:
    """The version a loaded prompt is, after checking that it is that version whole."""
    i = prompt.metrics["version"]
    embeds = prompt.injection.embeds
    assert embeds.shape[0] == SIZES[i] and bool((embeds == i).all()), f"torn file: version {i}, {embeds.shape}"
    return i


def writer(root: str, sources: list[str], offset: int) -> int:
    store = Store(root)
    prompts = [sp.load_prompt(s) for s in sources]
    for n in range(WRITES):
        store.save(TASK, prompts[(n + offset) % len(prompts)])
    return WRITES


def reader(root: str, stop: str) -> dict[int, int]:
    """Load the task in a loop until the `stop` file appears (and at least 10 times); {version: loads}."""
    store, seen, n = Store(root), {}, 0
    while n < 10 or not Path(stop).exists():
        i = check(store.load(TASK))
        seen[i] = seen.get(i, 0) + 1
        n += 1
    return seen


def test_concurrent_writers_and_readers_never_see_a_torn_file(llama, sst2, tmp_path):
    sources = [str(version(llama, sst2, i).save(tmp_path / "versions" / f"v{i}")) for i in range(len(SIZES))]
    store = Store(tmp_path / "store")
    store.save(TASK, sp.load_prompt(sources[0]))
    stop = tmp_path / "stop"
    # a fork server imports softprompt once, then forks clean single-threaded workers from it (cheap, and unlike a
    # plain fork of this process, free of the threads pytest and torch started here)
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["softprompt"])
    mt = MultiTask(llama, compile=False)  # the server's registry, reloading the store in this process meanwhile
    loaded: dict[int, int] = {}
    with ProcessPoolExecutor(6, mp_context=ctx) as pool:
        readers = [pool.submit(reader, str(store.root), str(stop)) for _ in range(3)]
        writers = [pool.submit(writer, str(store.root), sources, k) for k in range(3)]
        try:
            while not all(w.done() for w in writers):
                report = mt.sync(store)
                assert not report["refused"], report["refused"]
                entry = mt.get(TASK)
                try:  # the tensors are read on first use: a file replaced since the scan is named, never mixed in
                    ready = mt.injection(entry)
                except ConfigError as e:
                    assert "changed since it was indexed" in e.problem
                    continue
                i = check(dataclasses.replace(entry.prompt, injection=ready))
                loaded[i] = loaded.get(i, 0) + 1
                time.sleep(0.005)
        finally:
            stop.touch()  # the readers loop until it appears: never leave them running
        assert [w.result() for w in writers] == [WRITES] * 3  # re-raises a writer's error
        seen = [r.result(timeout=120) for r in readers]  # re-raises a reader's error (a torn file, a failed load)
    assert all(sum(s.values()) >= 10 for s in seen)
    versions_read = set().union(*seen)
    assert len(versions_read) >= 2, seen  # the readers really ran while the file changed
    assert sum(loaded.values()) >= 1 and not mt.refused
    assert [p.name for p in store.root.iterdir() if p.name.startswith(".")] == []  # no temporary file left behind
    check(store.load(TASK, llama))
