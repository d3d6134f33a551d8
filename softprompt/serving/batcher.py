"""The worker thread that owns the model: a bounded queue of jobs, run as mixed-task batches.

Request handlers only parse, tokenize and wait. The worker takes queued jobs of any tasks, waits up
to `max_wait_ms` for more (up to `max_batch_size` rows), and runs them as one mixed-task batch
(`multitask`): classification rows in one forward pass, generation rows in one `generate.decode`
loop whose per-step tokens go straight back to the waiting handlers. Between batches (and when
idle) it syncs the store directory, so new, changed and removed prompt files take effect without
a restart, and a bad file is refused while the other tasks keep serving.

One bad row must not fail its batch: when a batch raises (e.g. a prompt whose tensors hold NaN makes
sampling raise for every row), its rows that have not yet been sent anything run again in halves,
down to single rows, so only the rows that fail alone get an error. Every job ends with exactly one
"done", "result" or "error" event, even a decode of zero steps or a stop of the server.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass

import torch

from ..example import Example
from ..generate import Sampling, stop_ids
from ..multitask import Entry, MultiTask
from ..store import Store
from .config import ServerConfig
from .schemas import ApiError

log = logging.getLogger("softprompt.serve")


UNANSWERED = ApiError(500, "The request ended without an answer.", "internal_error", "server_error")


class QueueFull(Exception):
    pass


@dataclass(eq=False)
class Job:
    """One row of a batch: an encoded input of one task. Results go back to its request as events
    (index, kind, value): ("token", id), ("done", finish_reason), ("result", Classification), ("error", ApiError)."""

    entry: Entry
    example: Example
    index: int
    send: object  # callable(event), thread-safe
    classify: bool = False
    max_new_tokens: int = 0
    sampling: Sampling = Sampling()
    finished: bool = False  # set by the worker when done, or by the handler when it wants no more tokens
    generated: int = 0


class Batcher:
    """The worker thread that owns the model: a bounded queue of jobs, run as mixed-task batches."""

    def __init__(self, mt: MultiTask, store: Store | None, config: ServerConfig, seed: int = 0):
        self.mt, self.store, self.config = mt, store, config
        self.pending: collections.deque[Job] = collections.deque()
        self.cond = threading.Condition()
        self.stopping = False
        self.running = 0  # rows in the batch being run
        self.stats = {"batches": 0, "rows": 0, "largest_batch": 0, "tokens": 0}
        self.generator = torch.Generator(device=mt.base.device).manual_seed(seed)
        self.eos = stop_ids(mt.base)
        self.thread = threading.Thread(target=self._loop, name="softprompt-batcher", daemon=True)
        self.last_sync = time.monotonic()

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 30) -> None:
        """Stop after the batch being run (its decode loop ends at the next step); queued jobs get 503."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.thread.join(timeout=timeout)
        with self.cond:
            left, self.pending = list(self.pending), collections.deque()
        self._fail(left, ApiError(503, "The server is shutting down.", "shutting_down", "server_error"))

    @property
    def queued(self) -> int:
        return len(self.pending)

    def submit(self, jobs: list[Job]) -> None:
        """Queue all of a request's jobs, or none of them (QueueFull)."""
        with self.cond:
            if len(self.pending) + len(jobs) > self.config.max_queue:
                raise QueueFull
            self.pending.extend(jobs)
            self.cond.notify()

    def _take(self) -> list[Job]:
        """Wait for a first job, then up to max_wait_ms for more; returns [] when it is time to sync or stop."""
        cfg = self.config
        with self.cond:
            self.cond.wait_for(lambda: self.pending or self.stopping, timeout=cfg.reload_interval)
            if not self.pending or self.stopping:
                return []
            deadline = time.monotonic() + cfg.max_wait_ms / 1000
            while len(self.pending) < cfg.max_batch_size and not self.stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
            batch = []
            while self.pending and len(batch) < cfg.max_batch_size:
                job = self.pending.popleft()
                if not job.finished:  # its client went away while it waited
                    batch.append(job)
            self.running = len(batch)
            return batch

    def _loop(self) -> None:
        while not self.stopping:
            batch = self._take()
            try:
                if batch:
                    self._run_isolated(batch)
            except Exception:  # noqa: BLE001 - never let the worker thread die: later requests would hang
                log.exception("batch of %d rows failed", len(batch))
            finally:
                self.running = 0
                # a job must never wait forever: one the batch did not answer gets an error now
                self._fail(batch, UNANSWERED)
            if self.store is not None and time.monotonic() - self.last_sync >= self.config.reload_interval:
                self.sync()

    @staticmethod
    def _fail(jobs: list[Job], error: ApiError) -> None:
        for job in jobs:
            if not job.finished:
                job.finished = True
                job.send((job.index, "error", error))

    def _run_isolated(self, batch: list[Job]) -> None:
        """Run `batch`; when it raises, run again in halves its rows that were sent nothing yet, so that a row that
        fails fails alone. A row that got tokens before the failure cannot be restarted (its text is out): error."""
        try:
            self._run(batch)
            return
        except Exception as e:  # noqa: BLE001 - answer the failing rows and keep serving the others
            if len(batch) == 1:
                log.exception("task %s: a request failed", batch[0].entry.name)
                self._fail(batch, _internal(e, batch[0].entry.name))
                return
            log.warning("batch of %d rows failed (%s: %s); running its rows apart", len(batch), type(e).__name__, e)
            self._fail([j for j in batch if j.generated], _internal(e))
        rest = [j for j in batch if not j.finished]
        half = (len(rest) + 1) // 2
        for part in (rest[:half], rest[half:]):
            if part:
                self._run_isolated(part)

    def sync(self) -> dict:
        self.last_sync = time.monotonic()
        try:
            return self.mt.sync(self.store)
        except Exception:  # noqa: BLE001 - e.g. the store directory vanished; keep serving what is loaded
            log.exception("store sync failed")
            return {}

    def _run(self, batch: list[Job]) -> None:
        self.stats["batches"] += 1
        self.stats["rows"] += len(batch)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
        scoring = [j for j in batch if j.classify]
        if scoring:
            for job, result in zip(scoring, self.mt.classify_rows([(j.entry, j.example) for j in scoring])):
                job.finished = True
                job.send((job.index, "result", result))
        jobs = [j for j in batch if not j.classify]
        if jobs:
            self._generate(jobs)

    def _generate(self, jobs: list[Job]) -> None:
        steps = self.mt.decode_rows(
            [(j.entry, j.example) for j in jobs],
            [j.max_new_tokens for j in jobs],
            [j.sampling for j in jobs],
            generator=self.generator,
        )
        try:
            for nxt, active in steps:
                for job, token, alive in zip(jobs, nxt.tolist(), active.tolist(), strict=True):
                    if not alive or job.finished:
                        continue
                    if token in self.eos:
                        job.finished = True
                        job.send((job.index, "done", "stop"))
                        continue
                    job.generated += 1
                    self.stats["tokens"] += 1
                    job.send((job.index, "token", token))
                    if job.generated >= job.max_new_tokens:
                        job.finished = True
                        job.send((job.index, "done", "length"))
                if all(j.finished for j in jobs) or self.stopping:
                    break
        finally:
            steps.close()
        for job in jobs:  # e.g. a decode of zero steps (max_new_tokens 0), or rows ended with the loop
            if not job.finished:
                job.finished = True
                job.send((job.index, "done", "length"))


def _internal(e: Exception, task: str | None = None) -> ApiError:
    """The 500 of a failed row: the exception's kind, never its text (it may hold paths or the inputs)."""
    text = str(e).lower()
    if task is not None and ("nan" in text or "inf" in text):  # e.g. torch.multinomial on NaN probabilities
        return ApiError(
            500,
            f"Task '{task}' produced scores that are not finite (NaN or inf); its prompt file may be corrupt.",
            "non_finite_scores",
            "server_error",
        )
    where = "this request" if task is not None else "the batch"
    return ApiError(500, f"Internal error while running {where}: {type(e).__name__}.", "internal_error", "server_error")
