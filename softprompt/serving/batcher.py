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

A job that asks for log-probabilities gets ("scored", `Scored`) events instead of ("token", id),
computed once per step for the whole batch (`decode(..., top_logprobs=k)`, k the most any row asks);
an echo job gets ("prompt", [Scored] or None) right before its first new token or its end: with
log-probabilities, its source tokens scored under its prompt (one forward here, on this thread).
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import threading
import time
from dataclasses import dataclass

import torch

from ..errors import PromptFileError
from ..example import Example
from ..generate import Decoder, LogProbs, NonFiniteScoresError, Sampling, prompt_logprobs, stop_ids
from ..multitask import Entry, MultiTask
from ..store import Store
from .config import ServerConfig
from .schemas import ApiError, redact

log = logging.getLogger("softprompt.serve")


JOIN_EVERY = 4  # decode steps between joins of newcomers that do not fill half the free room

UNANSWERED = ApiError(500, "The request ended without an answer.", "internal_error", "server_error")


class QueueFull(Exception):
    pass


@dataclass(frozen=True)
class Scored:
    """A token with its log-probability and the most likely tokens in its place, [(id, log p)] best first."""

    token: int
    logprob: float | None  # None for a prompt's first token, which nothing before it predicts
    top: list[tuple[int, float]]


def scored(tokens: list[int], lp: LogProbs, ks: list[int]) -> list[Scored]:
    """`Scored` of each token (N,) from `lp`, keeping the first ks[i] most likely tokens of row i."""
    chosen, ids, top = lp.chosen.tolist(), lp.top_ids.tolist(), lp.top.tolist()
    return [Scored(t, c, list(zip(i[:k], p[:k]))) for t, c, i, p, k in zip(tokens, chosen, ids, top, ks)]


@dataclass(eq=False)
class Job:
    """One row of a batch: an encoded input of one task. Results go back to its request as events
    (index, kind, value): ("token", id) or ("scored", Scored) per new token, ("prompt", [Scored] or None) first for
    an echo job, then ("done", finish_reason); ("result", Classification); or ("error", ApiError)."""

    entry: Entry
    example: Example
    index: int
    send: object  # callable(event), thread-safe
    classify: bool = False
    max_new_tokens: int = 0
    sampling: Sampling = Sampling()
    logprobs: int | None = None  # each new token's log-probability and its k most likely alternatives (None: not)
    echo: bool = False  # send the prompt ahead of the new tokens (scored when `logprobs` is asked)
    finished: bool = False  # set by the worker when done, or by the handler when it wants no more tokens
    generated: int = 0
    prompt: list | None = None  # an echo job's ("prompt", ...) value, sent with its first event
    echoed: bool = False


class Batcher:
    """The worker thread that owns the model: a bounded queue of jobs, run as mixed-task batches."""

    def __init__(self, mt: MultiTask, store: Store | None, config: ServerConfig, seed: int = 0):
        self.mt, self.store, self.config = mt, store, config
        # queued jobs by kind (classification: True), each queue in arrival order: a step takes classifications
        # without looking at the generations waiting for room, and the idle worker merges both by arrival
        self.queues: dict[bool, collections.deque[tuple[int, Job]]] = {k: collections.deque() for k in (True, False)}
        self._arrivals = itertools.count()
        self.cond = threading.Condition()
        self.stopping = False
        self.running = 0  # rows in the batch being run
        self.stats = {"batches": 0, "rows": 0, "largest_batch": 0, "tokens": 0}
        self.generator = torch.Generator(device=mt.base.device).manual_seed(seed)
        self.decoder = Decoder(mt.base, self.generator)  # the running batch of continuous batching
        self._steps_since_join = 0
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
            left = self.pending
            for queue in self.queues.values():
                queue.clear()
        self._fail(left, ApiError(503, "The server is shutting down.", "shutting_down", "server_error"))

    @property
    def pending(self) -> list[Job]:
        """The queued jobs, in arrival order."""
        return [job for _, job in heapq.merge(*self.queues.values(), key=lambda q: q[0])]

    @property
    def queued(self) -> int:
        return sum(map(len, self.queues.values()))

    def submit(self, jobs: list[Job]) -> None:
        """Queue all of a request's jobs, or none of them (QueueFull)."""
        with self.cond:
            if self.queued + len(jobs) > self.config.max_queue:
                raise QueueFull
            for job in jobs:
                self.queues[job.classify].append((next(self._arrivals), job))
            self.cond.notify()

    def _take(self, most: int, wait: bool = True, tokens: int | None = None, classify: bool | None = None) -> list[Job]:
        """Up to `most` queued jobs. With `wait`: wait for a first job, then up to max_wait_ms for more; returns []
        when it is time to sync or stop. Without: what is queued now (rows joining a running batch). `tokens`: the
        most input tokens to take, beyond the first job (what one prefill may cost the rows waiting on it).
        `classify`: take only classification jobs (True) or only generation jobs (False); None: any, first come
        first served."""
        cfg = self.config
        with self.cond:
            if wait:
                self.cond.wait_for(lambda: self.queued or self.stopping, timeout=cfg.reload_interval)
                deadline = time.monotonic() + cfg.max_wait_ms / 1000
                while self.queued and self.queued < most and not self.stopping:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self.cond.wait(left)
            queues = list(self.queues.values()) if classify is None else [self.queues[classify]]
            batch, taken = [], 0
            while len(batch) < most and not self.stopping:
                heads = [q for q in queues if q]
                if not heads:
                    break
                queue = min(heads, key=lambda q: q[0][0])  # the one whose first job came first
                job = queue[0][1]
                size = len(job.example.source)
                if not job.finished and batch and tokens is not None and taken + size > tokens:
                    break
                queue.popleft()
                if not job.finished:  # its client went away while it waited
                    batch.append(job)
                    taken += size
            return batch

    def _loop(self) -> None:
        continuous = self.config.batching == "continuous"
        while not self.stopping:
            try:
                self._continuous_round() if continuous else self._static_round()
            except Exception:  # noqa: BLE001 - never let the worker thread die: later requests would hang
                log.exception("the batch loop failed")
            if self.store is not None and time.monotonic() - self.last_sync >= self.config.reload_interval:
                self.sync()
        self._end(self.decoder.keys, "length")  # the server stops: rows still decoding end where they are

    def _static_round(self) -> None:
        """Take a batch and run it to its end: rows that arrive meanwhile wait for the next batch."""
        batch = self._take(self.config.max_batch_size)
        self.running = len(batch)
        try:
            if batch:
                self._count(batch)
                self._run_isolated(batch)
        finally:
            self.running = 0
            # a job must never wait forever: one the batch did not answer gets an error now
            self._fail(batch, UNANSWERED)

    def _continuous_round(self) -> None:
        """Admit queued jobs (`_admit`): classification rows are scored at once, generation rows prefilled and merged
        into the running decode; then run one decode step."""
        decoder = self.decoder
        newcomers = self._admit()
        if newcomers:
            self._count(newcomers)
        try:
            scoring = [j for j in newcomers if j.classify]
            if scoring:
                self.running = len(decoder) + len(scoring)
                self._run_isolated(scoring)
            joining = [j for j in newcomers if not j.classify]
            self._end([j for j in joining if j.max_new_tokens <= 0], "length")  # nothing to decode
            joining = [j for j in joining if not j.finished]
            if joining:
                self.running = len(decoder) + len(joining)
                self._run_isolated(joining, self._join)
            self.running = len(decoder)
            if len(decoder):
                self._step()
        finally:
            self._fail([j for j in newcomers if j not in decoder.keys], UNANSWERED)
            self.running = len(decoder)

    def _admit(self) -> list[Job]:
        """The queued jobs to run before the next decode step. Idle: any, as a static batch would take them. While
        rows decode, each step costs them at most one scoring forward and one prefill of `max_prefill_tokens` input:
        - classification rows hold no decode slot, so they never wait for one: every step scores those queued (a
          row queued behind generation requests would otherwise wait for a slot it does not use);
        - generation rows join in groups (half the free room queued, or every JOIN_EVERY steps), not one per step:
          a prefill of one short row costs about as much as a decode step of a full batch."""
        decoder, cfg = self.decoder, self.config
        room = cfg.max_batch_size - len(decoder)
        if not len(decoder):
            self._steps_since_join = 0
            return self._take(room, wait=True)
        scoring = self._take(cfg.max_batch_size, wait=False, tokens=cfg.max_prefill_tokens, classify=True)
        due = len(self.queues[False]) >= max(1, room // 2) or self._steps_since_join >= JOIN_EVERY
        joining = []
        if room > 0 and decoder.can_join and due:
            joining = self._take(room, wait=False, tokens=cfg.max_prefill_tokens, classify=False)
        self._steps_since_join = 0 if joining else self._steps_since_join + 1
        return scoring + joining

    def _join(self, jobs: list[Job]) -> None:
        """Prefill `jobs` into the running batch (continuous batching)."""
        for job in jobs:
            if job.echo:
                job.prompt = self._prompt(job)
        examples = self.mt.ready([(j.entry, j.example) for j in jobs])
        self.decoder.join(jobs, examples, [j.max_new_tokens for j in jobs], [j.sampling for j in jobs])

    def _step(self) -> None:
        """One decode step of every running row: its token (or its end) goes to its request; ended rows leave."""
        decoder = self.decoder
        jobs: list[Job | None] = list(decoder.keys)  # None: a row that left but stays as padding
        decoder.k = max((j.logprobs for j in jobs if j is not None and j.logprobs is not None), default=None)
        try:
            try:
                nxt, lp = decoder.sample()
            except NonFiniteScoresError as e:  # poisoned rows fail alone; the others take their step
                bad = [i for i in getattr(e, "rows", range(len(jobs))) if jobs[i] is not None]
                for i in bad:
                    self._fail([jobs[i]], _internal(e, jobs[i].entry.name))
                decoder.release(bad)
                jobs = list(decoder.keys)
                nxt, lp = decoder.sample()
            self._emit_step(jobs, nxt.tolist(), [j is not None for j in jobs], lp)
            decoder.advance(nxt, [j is None or j.finished for j in jobs])
        except Exception as e:  # noqa: BLE001 - the rows got tokens already and cannot restart: they end with errors
            log.exception("decode step of %d rows failed", len(jobs))
            self._fail([j for j in jobs if j is not None], _internal(e))
            decoder.advance(torch.zeros(len(jobs), dtype=torch.long), [True] * len(jobs))

    def _count(self, jobs: list[Job]) -> None:
        """Count a batch: in continuous batching, the rows admitted together (joining those running)."""
        self.stats["batches"] += 1
        self.stats["rows"] += len(jobs)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(jobs) + len(self.decoder))

    @staticmethod
    def _fail(jobs: list[Job], error: ApiError) -> None:
        for job in jobs:
            if not job.finished:
                job.finished = True
                job.send((job.index, "error", error))

    def _run_isolated(self, batch: list[Job], run=None) -> None:
        """`run(batch)` (default: run it to its end); when it raises, run again in halves its rows that were sent
        nothing yet, so that a row that fails fails alone. A row that got tokens before the failure cannot be
        restarted (its text is out): error."""
        run = run or self._run
        try:
            run(batch)
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
                self._run_isolated(part, run)

    def sync(self) -> dict:
        self.last_sync = time.monotonic()
        try:
            return self.mt.sync(self.store)
        except Exception:  # noqa: BLE001 - e.g. the store directory vanished; keep serving what is loaded
            log.exception("store sync failed")
            return {}

    def _run(self, batch: list[Job]) -> None:
        scoring = [j for j in batch if j.classify]
        if scoring:
            for job, result in zip(scoring, self.mt.classify_rows([(j.entry, j.example) for j in scoring])):
                job.finished = True
                job.send((job.index, "result", result))
        jobs = [j for j in batch if not j.classify]
        if jobs:
            self._generate(jobs)

    def _generate(self, jobs: list[Job]) -> None:
        """Decode `jobs` from start to end together (static batching)."""
        for job in jobs:  # sent with the job's first event, not now: a batch that fails before then runs it again
            if job.echo:
                job.prompt = self._prompt(job)
        rows = [(j.entry, j.example) for j in jobs]
        limits, sampling = [j.max_new_tokens for j in jobs], [j.sampling for j in jobs]
        k = max((j.logprobs for j in jobs if j.logprobs is not None), default=None)
        steps = self.mt.decode_rows(rows, limits, sampling, generator=self.generator, top_logprobs=k)
        try:
            for nxt, active, *lp in steps:
                self._emit_step(jobs, nxt.tolist(), active.tolist(), lp[0] if lp else None)
                if all(j.finished for j in jobs) or self.stopping:
                    break
        finally:
            steps.close()
        self._end(jobs, "length")  # e.g. a decode of zero steps (max_new_tokens 0), or rows ended with the loop

    def _emit_step(self, jobs: list[Job], tokens: list[int], alive: list[bool], lp: LogProbs | None) -> None:
        """Send each job its token of this step, or its end (EOS: "stop"; its max_new_tokens reached: "length")."""
        scores = scored(tokens, lp, [(j.logprobs or 0) if j else 0 for j in jobs]) if lp is not None else None
        for i, (job, token) in enumerate(zip(jobs, tokens, strict=True)):
            if not alive[i] or job.finished:
                continue
            if token in self.eos:
                self._end([job], "stop")
                continue
            job.generated += 1
            self.stats["tokens"] += 1
            self._send(job, "token", token) if job.logprobs is None else self._send(job, "scored", scores[i])
            if job.generated >= job.max_new_tokens:
                self._end([job], "length")

    def _end(self, jobs: list[Job], reason: str) -> None:
        for job in jobs:
            if job is not None and not job.finished:
                job.finished = True
                self._send(job, "done", reason)

    @staticmethod
    def _send(job: Job, kind: str, value) -> None:
        if job.echo and not job.echoed:
            job.echoed = True
            job.send((job.index, "prompt", job.prompt))
        job.send((job.index, kind, value))

    def _prompt(self, job: Job) -> list[Scored] | None:
        """What an echo job sends ahead of its new tokens: with logprobs, its source tokens scored under its prompt."""
        if job.logprobs is None:
            return None
        source = job.example.source
        ready = Example(source, job.example.slot, [], self.mt.injection(job.entry))  # read, compiled and cached
        lp = prompt_logprobs(self.mt.base, ready, job.logprobs)
        return [Scored(source[0], None, []), *scored(source[1:], lp, [job.logprobs] * len(source))]


def _internal(e: Exception, task: str | None = None) -> ApiError:
    """The 500 of a failed row: the exception's kind, never its text (it may hold paths or the inputs)."""
    if task is not None and isinstance(e, PromptFileError):  # its file is read on first use, and turned out bad
        return ApiError(
            500,
            f"Task '{task}': its prompt file was refused: {redact(e.problem)}",
            "prompt_file_refused",
            "server_error",
        )
    if task is not None and isinstance(e, NonFiniteScoresError):
        return ApiError(
            500,
            f"Task '{task}' produced scores that are not finite (NaN or inf); its prompt file may be corrupt.",
            "non_finite_scores",
            "server_error",
        )
    where = "this request" if task is not None else "the batch"
    return ApiError(500, f"Internal error while running {where}: {type(e).__name__}.", "internal_error", "server_error")
