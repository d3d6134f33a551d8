"""Several replicas on one store (issue 17): two `softprompt serve` processes on one directory, behind a round-robin
client (an ordinary load balancer). While both serve a steady load, a prompt file is added, one is changed (another
method, another number of virtual tokens, another template), one removed, and one damaged in place; each change must
reach both replicas within the reload interval plus slack, and no request of the other tasks may fail meanwhile.

One run of the changes (like `test_serving_chaos.py`); each test checks a property of its results. The last test
(in-process) checks what a rolling update does to a request queued across the swap of its task's file.
"""

from __future__ import annotations

import itertools
import random
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from helpers import KEY, auth, make_prompt, serve_process, spec_like

from softprompt.store import Store

RELOAD = 0.3  # --reload-interval of both replicas
BOUND = RELOAD + 5.0  # seconds a change may take to show in every replica (slack for 2 shared cores)
STEADY = ("sst2-soft", "e2e-prefix")  # tasks only read during the run (e2e-prefix is damaged in place, warm)
CHANGED, ADDED, REMOVED = "e2e-soft", "sst2-new", "sst2-hard"
NEW_TEMPLATE = "Data: {mr}\nText:"


def plan(task: str) -> tuple[str, dict]:
    """The request the load sends for `task`: a classification, or a 2-token completion."""
    if task.startswith("sst2"):
        return "/v1/classify", {"model": task, "input": "the film was great fun"}
    return "/v1/completions", {"model": task, "prompt": "name[Fun]", "max_tokens": 2}


class RoundRobin:
    """An ordinary load balancer: each request goes to the next replica in turn."""

    def __init__(self, urls: list[str]):
        self.urls, self.count, self.lock = urls, itertools.count(), threading.Lock()
        self.client = httpx.Client(timeout=30, headers=auth())

    def pick(self) -> tuple[int, str]:
        with self.lock:
            i = next(self.count)
        return i, self.urls[i % len(self.urls)]


class Load:
    """`threads` clients sending the tasks' requests through the balancer until stopped, tallied per task."""

    def __init__(self, balancer: RoundRobin, tasks: tuple[str, ...], threads: int = 2, pause: float = 0.01):
        self.balancer, self.tasks, self.pause = balancer, tasks, pause
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.ok: dict[tuple[str, str], int] = {}  # (replica url, task) -> successful requests
        self.failures: list[dict] = []  # {task, url, status, body, at} of each failed request
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(threads)]

    def start(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)

    def run(self) -> None:
        while not self.stop.is_set():
            i, url = self.balancer.pick()
            # the task from the request's number over the replicas: every task reaches every replica
            task = self.tasks[(i // len(self.balancer.urls)) % len(self.tasks)]
            path, body = plan(task)
            try:
                r = self.balancer.client.post(url + path, json=body)
                good = r.status_code == 200 and bool(r.json().get("data" if path == "/v1/classify" else "choices"))
                status, text = r.status_code, r.text[:300]
            except (httpx.HTTPError, ValueError) as e:
                good, status, text = False, type(e).__name__, str(e)[:300]
            with self.lock:
                if good:
                    self.ok[url, task] = self.ok.get((url, task), 0) + 1
                else:
                    self.failures.append({"task": task, "url": url, "status": status, "body": text, "at": time.time()})
            time.sleep(self.pause)

    def total(self, task: str) -> int:
        with self.lock:
            return sum(n for (_, t), n in self.ok.items() if t == task) + self.failed(task)

    def failed(self, task: str) -> int:
        return sum(f["task"] == task for f in self.failures)


def models(url: str) -> dict[str, tuple[str, int]]:
    """Task -> (method, virtual tokens) as GET /v1/models of the replica at `url` shows them."""
    r = httpx.get(url + "/v1/models", headers=auth(), timeout=30)
    r.raise_for_status()
    return {m["id"]: (m["method"], m["virtual_tokens"]) for m in r.json()["data"]}


def until(predicate, bound: float = BOUND) -> float | None:
    """Seconds until `predicate()` holds, polled every 50 ms; None when it does not within `bound`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < bound:
        if predicate():
            return time.monotonic() - t0
        time.sleep(0.05)
    return None


def damage_in_place(path) -> None:
    """What a non-atomic writer leaves when it dies mid-write: the same inode, half its size, garbage bytes."""
    half = path.stat().st_size // 2
    with open(path, "r+b") as f:
        f.write(random.Random(0).randbytes(half))
        f.truncate(half)


def changes(urls: list[str], store: Store, load: Load, llama, sst2, e2e) -> dict:
    """Each change made while the load runs: how long each took to show in every replica, and what they answered."""
    c = load.balancer.client
    out: dict = {}
    warm = until(lambda: all(load.ok.get((u, t), 0) for u in urls for t in (*STEADY, CHANGED)), 60)
    assert warm is not None, f"the load never reached every task on every replica: {load.failures[:3]}"

    # (a) a new file, written atomically
    store.save(ADDED, make_prompt(llama, sst2.spec, "soft", 2, seed=3))
    out["added_after_s"] = until(lambda: all(ADDED in models(u) for u in urls))
    out["added_statuses"] = [c.post(u + "/v1/classify", json=plan(ADDED)[1]).status_code for u in urls]

    # (b) a changed file: another method, number of virtual tokens and template under the same name
    before = {u: models(u)[CHANGED] for u in urls}
    new = make_prompt(llama, spec_like(e2e.spec, template=NEW_TEMPLATE), "prefix", 2, seed=4)
    saved = time.time()
    store.save(CHANGED, new)
    out["changed_before"] = before
    out["changed_after_s"] = until(lambda: all(models(u)[CHANGED] == ("prefix", 2) for u in urls))
    out["changed_window"] = (saved, time.time() + 2 * RELOAD)  # a request queued across the swap may fail (below)
    body = plan(CHANGED)[1] | {"echo": True}  # echo: the text starts with the prompt as the model read it
    answers = [c.post(u + "/v1/completions", json=body) for u in urls]
    out["changed_answers"] = [
        (r.status_code, r.json()["choices"][0]["text"] if r.is_success else r.text) for r in answers
    ]

    # (c) a removed file
    store.remove(REMOVED)
    out["removed_after_s"] = until(lambda: all(REMOVED not in models(u) for u in urls))
    gone = [c.post(u + "/v1/classify", json=plan(REMOVED)[1]) for u in urls]
    out["removed_answers"] = [(r.status_code, r.json().get("error", {}).get("code")) for r in gone]

    # (d) a served file damaged in place (not atomically): every replica keeps its last good version
    seen = models(urls[0])["e2e-prefix"]
    damage_in_place(store.path("e2e-prefix"))
    damaged_at = load.total("e2e-prefix")

    def stale(u: str) -> dict:
        return httpx.get(u + "/health", headers=auth(), timeout=30).json().get("stale", {})

    out["stale_after_s"] = until(lambda: all("e2e-prefix" in stale(u) for u in urls))
    out["stale_reasons"] = [stale(u).get("e2e-prefix") for u in urls]
    time.sleep(3 * RELOAD)  # a few more scans of the damaged file, under load
    out["damaged_requests_served"] = load.total("e2e-prefix") - damaged_at
    out["damaged_answers"] = [c.post(u + "/v1/completions", json=plan("e2e-prefix")[1]).status_code for u in urls]
    out["damaged_models"] = [(seen, models(u).get("e2e-prefix")) for u in urls]
    return out


@pytest.fixture(scope="module")
def run(llama, sst2, e2e, store, model_dir, tmp_path_factory):
    """Both replicas on a copy of the shared store, the load through the balancer, and the changes made under it."""
    root = Store(tmp_path_factory.mktemp("replicas-store"))
    for name in store.names():
        shutil.copyfile(store.path(name), root.path(name))
    options = ("--reload-interval", str(RELOAD), "--api-key-env", "SERVE_KEY", "--log-level", "warning")
    env = {"SERVE_KEY": KEY, "OMP_NUM_THREADS": "1"}
    t0 = time.monotonic()
    with ThreadPoolExecutor(2) as pool:  # the replicas load the model side by side
        futures = [pool.submit(serve_process, root.root, model_dir, *options, env=env) for _ in range(2)]
    if any(f.exception() for f in futures):  # one did not start: stop the other
        for f in futures:
            if not f.exception():
                f.result()[0].kill()
        futures[0].result() if futures[0].exception() else futures[1].result()
    procs, urls = [f.result()[0] for f in futures], [f.result()[1] for f in futures]
    logs: list[list[str]] = [[] for _ in procs]
    for proc, log in zip(procs, logs):  # drain stderr: a full pipe would block the server's next log line
        threading.Thread(target=lambda p=proc, lg=log: lg.extend(p.stderr), daemon=True).start()
    load = Load(RoundRobin(urls), (*STEADY, CHANGED))
    try:
        startup = time.monotonic() - t0
        load.start()
        try:
            out = changes(urls, root, load, llama, sst2, e2e)
        except AssertionError as e:  # with what the replicas logged
            tails = "\n".join(f"replica {u}:\n{''.join(log[-20:])}" for u, log in zip(urls, logs))
            raise AssertionError(f"{e}\n{tails}") from None
        load.join()
        yield out | {"urls": urls, "load": load, "startup_s": startup, "logs": logs}
    finally:
        load.join()
        for proc in procs:
            proc.send_signal(signal.SIGINT)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except Exception:
                proc.kill()


def test_a_new_prompt_file_is_served_by_every_replica_within_the_bound(run):
    assert run["added_after_s"] is not None, f"{ADDED} not in both replicas' /v1/models after {BOUND} s"
    assert run["added_statuses"] == [200, 200]


def test_a_changed_prompt_file_answers_with_its_new_version_on_every_replica(run):
    assert set(run["changed_before"].values()) == {("soft", 4)}
    assert run["changed_after_s"] is not None, f"{CHANGED} not ('prefix', 2) in both replicas after {BOUND} s"
    for status, text in run["changed_answers"]:
        assert status == 200 and text.startswith("Data: name[Fun]\nText:"), (status, text)


def test_a_removed_prompt_file_gets_404_from_every_replica(run):
    assert run["removed_after_s"] is not None, f"{REMOVED} still in a replica's /v1/models after {BOUND} s"
    assert run["removed_answers"] == [(404, "model_not_found")] * 2


def test_a_file_damaged_in_place_keeps_its_last_good_version_on_every_replica(run):
    assert run["stale_after_s"] is not None, f"e2e-prefix not under 'stale' in both replicas' /health after {BOUND} s"
    assert all(r and "truncated or corrupted" in r for r in run["stale_reasons"]), run["stale_reasons"]
    assert run["damaged_requests_served"] > 0 and run["damaged_answers"] == [200, 200]
    assert all(seen == now == ("prefix", 5) for seen, now in run["damaged_models"]), run["damaged_models"]


def test_the_balanced_load_never_failed_while_the_store_changed(run):
    load = run["load"]
    for task in STEADY:
        assert load.failed(task) == 0, [f for f in load.failures if f["task"] == task][:5]
        assert all(load.ok.get((u, task), 0) > 0 for u in run["urls"]), load.ok  # both replicas took requests
    # the changed task's own requests never fail before its file is replaced nor once every replica serves the new
    # version; one queued across the swap itself may (test_a_request_queued_across_a_change_is_answered, below)
    start, end = run["changed_window"]
    outside = [f for f in load.failures if f["task"] == CHANGED and not start <= f["at"] <= end]
    assert outside == [], outside[:5]
    assert load.total(CHANGED) > load.failed(CHANGED)


def test_a_request_queued_across_a_change_is_answered(llama, store, e2e, tmp_path):
    """What a rolling update does to a request in flight: looked up and queued, then the worker's rescan swaps the
    task's file (another method and size) before the request runs. It should be answered, by either version."""
    import queue

    from softprompt.multitask import MultiTask
    from softprompt.serving.batcher import Batcher, Job
    from softprompt.serving.config import ServerConfig

    root = Store(tmp_path)
    for name in store.names():
        shutil.copyfile(store.path(name), root.path(name))
    mt = MultiTask(llama)
    mt.sync(root)
    mt.injection(CHANGED)  # warm, as under load
    entry = mt.get(CHANGED)  # the request handler's look-up and encoding
    example = entry.encode("name[Fun]", 2)
    root.save(CHANGED, make_prompt(llama, e2e.spec, "prefix", 2, seed=4))
    assert mt.sync(root)["updated"] == [CHANGED]  # the rescan, before the worker takes the job
    events: queue.SimpleQueue = queue.SimpleQueue()
    batcher = Batcher(mt, None, ServerConfig(max_wait_ms=0))
    batcher.submit([Job(entry, example, 0, events.put, max_new_tokens=2)])
    batcher.start()
    try:
        _, kind, value = events.get(timeout=30)
    finally:
        batcher.stop()
    assert kind != "error", getattr(value, "message", value)
