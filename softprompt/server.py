"""An OpenAI-compatible server for many tasks on one base model (FastAPI under uvicorn).

    POST /v1/completions        OpenAI completions; `model` names the task (vLLM's convention for adapters)
    POST /v1/chat/completions   OpenAI chat; the last user message fills the task's template
    POST /v1/classify           label and class probabilities of a classification task
    GET  /v1/models             the tasks being served
    GET  /health                liveness, queue depth, refused prompt files (needs no API key)

Streaming (`stream: true`) sends server-sent events as OpenAI does. Request handlers only parse,
tokenize and wait: one worker thread owns the model. It takes queued jobs of any tasks, waits up
to `max_wait_ms` for more (up to `max_batch_size` rows), and runs them as one mixed-task batch
(`multitask`): classification rows in one forward pass, generation rows in one `generate.decode`
loop whose per-step tokens go straight back to the waiting handlers. Between batches (and when
idle) the worker syncs the store directory, so new, changed and removed prompt files take effect
without a restart, and a bad file is refused while the other tasks keep serving.

Safety: the queue is bounded (429 when full, never a stall), request bodies and `max_tokens` are
limited, task names cannot reach outside the store, an optional API key is compared in constant
time, and request bodies are not logged unless asked.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import json
import logging
import threading
import time
import uuid
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass

import torch
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import InputTooLongError, SoftpromptError
from .example import Example
from .generate import Sampling, stop_ids
from .multitask import Classification, Entry, MultiTask, UnknownTaskError
from .serve import ServerConfig
from .store import Store

log = logging.getLogger("softprompt.serve")


# --- errors in OpenAI's shape ---------------------------------------------------------------------------------------

class ApiError(Exception):
    """An error response: {"error": {"message", "type", "code", "param"}} with an HTTP status."""

    def __init__(self, status: int, message: str, code: str, kind: str = "invalid_request_error",
                 param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.kind, self.param = status, message, code, kind, param
        self.headers = headers

    def payload(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "code": self.code, "param": self.param}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.payload(), status_code=self.status, headers=self.headers)


class QueueFull(Exception):
    pass


# --- requests ---------------------------------------------------------------------------------------------------------

class _Request(BaseModel):
    # OpenAI clients send fields we do not use (user, seed, logit_bias, stream_options, ...): accept and ignore them.
    model_config = ConfigDict(extra="ignore")

    model: str


class _Sampled(_Request):
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)  # OpenAI's default
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)  # an extension (vLLM has it too)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stop: str | list[str] | None = None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class CompletionRequest(_Sampled):
    prompt: str | list[str]


class ContentPart(BaseModel):
    """One part of a message's content: {"type": "text", "text": ...}; other types (images, ...) are ignored."""

    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content if p.type == "text")
        return self.content or ""


class ChatRequest(_Sampled):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # the newer name of max_tokens


Fields = dict[str, str | int | float | bool]  # an input given as the template's fields: flat, never nested


class ClassifyRequest(_Request):
    input: str | Fields | list[str | Fields]


REQUESTS = (CompletionRequest, ChatRequest, ClassifyRequest)


def _body(schema: type[BaseModel]) -> dict:
    """The OpenAPI request body of a route that reads its body itself (`read`: a size limit, errors in OpenAI's
    shape) instead of through FastAPI's parameters, which would leave it out of the schema."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{schema.__name__}"}}}}}


def openapi_schema(app: FastAPI) -> dict:
    """FastAPI's schema of the routes plus the request models: what /openapi.json serves and fuzzers start from."""
    from fastapi.openapi.utils import get_openapi
    from pydantic.json_schema import models_json_schema

    from ._version import __version__

    schema = get_openapi(title=app.title, version=__version__, routes=app.routes)
    _, defs = models_json_schema([(m, "validation") for m in REQUESTS], ref_template="#/components/schemas/{model}")
    schema.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
    return schema


# --- jobs and the batcher ---------------------------------------------------------------------------------------------

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

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.thread.join(timeout=30)

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
                    self._run(batch)
            except Exception as e:  # noqa: BLE001 - answer the batch's requests and keep serving the next ones
                log.exception("batch of %d rows failed", len(batch))
                err = ApiError(500, f"Internal error while running the batch: {type(e).__name__}.", "internal_error",
                               "server_error")
                for job in batch:
                    if not job.finished:
                        job.finished = True
                        job.send((job.index, "error", err))
            finally:
                self.running = 0
            if self.store is not None and time.monotonic() - self.last_sync >= self.config.reload_interval:
                self.sync()

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
        steps = self.mt.decode_rows([(j.entry, j.example) for j in jobs], [j.max_new_tokens for j in jobs],
                                    [j.sampling for j in jobs], generator=self.generator)
        try:
            for nxt, active in steps:
                for job, token, alive in zip(jobs, nxt.tolist(), active.tolist()):
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


# --- text out ---------------------------------------------------------------------------------------------------------

class TextStream:
    """Token ids in, text deltas out: holds back incomplete characters and anything that may start a stop string."""

    def __init__(self, tokenizer, stops: list[str], lstrip: bool = False):
        self.tokenizer, self.stops, self.lstrip = tokenizer, stops, lstrip
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False

    def _text(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return text.lstrip() if self.lstrip else text

    def push(self, token: int) -> str:
        """The new text that is safe to send after `token`; sets `stopped` when a stop string appeared."""
        self.ids.append(token)
        text = self._text()
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens
            return ""
        for s in self.stops:
            at = text.find(s, max(0, len(self.sent) - len(s)))
            if at >= 0:
                self.stopped = True
                return self._emit(text[:at])
        hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return self._emit(text[:len(text) - hold])

    def flush(self) -> str:
        return "" if self.stopped else self._emit(self._text())

    def _emit(self, text: str) -> str:
        if not text.startswith(self.sent):  # the tokenizer re-spaced earlier text; never resend it
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta


# --- one completion request: events in, OpenAI's JSON or server-sent events out ---------------------------------------

def channel() -> tuple[asyncio.Queue, object]:
    """A queue for a request's events and a thread-safe function with which the worker fills it."""
    queue: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def send(event) -> None:
        if not loop.is_closed():  # the server is shutting down: nobody is listening any more
            loop.call_soon_threadsafe(queue.put_nowait, event)

    return queue, send


async def events(jobs: list[Job], queue: asyncio.Queue):
    """Yield the jobs' events until each has ended; when the consumer stops early, release the jobs."""
    open_jobs = len(jobs)
    try:
        while open_jobs:
            event = await queue.get()
            if event[1] in ("done", "result", "error"):
                open_jobs -= 1
            yield event
    finally:
        for job in jobs:
            job.finished = True


class Completion:
    """The choices of one /v1/completions or /v1/chat/completions request, in OpenAI's format."""

    def __init__(self, entry: Entry, jobs: list[Job], queue: asyncio.Queue, tokenizer, body: _Sampled, chat: bool):
        self.entry, self.jobs, self.queue, self.chat, self.stream = entry, jobs, queue, chat, body.stream
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.texts = [TextStream(tokenizer, body.stops(), lstrip=chat) for _ in jobs]
        self.finish: list[str | None] = [None] * len(jobs)
        self.t0 = time.perf_counter()

    def choice(self, index: int, text: str | None, finish: str | None = None) -> dict:
        if not self.chat:
            return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        if not self.stream:
            return {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        return {"index": index, "delta": {} if text is None else {"content": text}, "logprobs": None,
                "finish_reason": finish}

    def envelope(self, choices: list[dict], usage: bool = False) -> dict:
        kind = "chat.completion.chunk" if self.chat and self.stream else "chat.completion" if self.chat else \
            "text_completion"
        out = {"id": self.id, "object": kind, "created": self.created, "model": self.entry.name, "choices": choices}
        if usage:
            prompt, done = sum(len(j.example.source) for j in self.jobs), sum(len(t.ids) for t in self.texts)
            out["usage"] = {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}
        return out

    async def deltas(self):
        """(choice index, new text, finish reason or None) until every choice has finished."""
        async with aclosing(events(self.jobs, self.queue)) as stream:
            async for index, kind, value in stream:
                if self.finish[index] is not None:  # ended early by a stop string; the worker's "done" comes later
                    continue
                if kind == "error":
                    raise value
                text = self.texts[index]
                if kind == "token":
                    delta = text.push(value)
                    if text.stopped:
                        self.jobs[index].finished = True  # the worker may drop this row
                        self.finish[index] = "stop"
                else:
                    delta, self.finish[index] = text.flush(), value
                yield index, delta, self.finish[index]
                if all(f is not None for f in self.finish):
                    return

    async def response(self) -> dict:
        out = [""] * len(self.jobs)
        async for index, delta, _ in self.deltas():
            out[index] += delta
        self.log("ok")
        return self.envelope([self.choice(i, out[i], self.finish[i]) for i in range(len(self.jobs))], usage=True)

    async def sse(self):
        """Server-sent events as OpenAI streams them, ending with `data: [DONE]`."""
        status = "cancelled"  # unless we get to the end: the client went away
        try:
            if self.chat:  # OpenAI opens each chat choice with the assistant's role
                opening = [{"index": j.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                            "finish_reason": None} for j in self.jobs]
                yield _sse(self.envelope(opening))
            async for index, delta, finish in self.deltas():
                if delta:
                    yield _sse(self.envelope([self.choice(index, delta)]))
                if finish is not None:
                    yield _sse(self.envelope([self.choice(index, None if self.chat else "", finish)]))
            status = "ok"
            yield "data: [DONE]\n\n"
        except ApiError as e:  # headers are sent already: report it in the stream
            status = "error"
            yield _sse(e.payload())
        finally:
            for job in self.jobs:
                job.finished = True
            self.log(status)

    def log(self, status: str) -> None:
        log.info("%s %s task=%s rows=%d prompt_tokens=%d completion_tokens=%d %s %.0f ms", self.id,
                 "chat" if self.chat else "completions", self.entry.name, len(self.jobs),
                 sum(len(j.example.source) for j in self.jobs), sum(len(t.ids) for t in self.texts), status,
                 1000 * (time.perf_counter() - self.t0))


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


# --- the app ----------------------------------------------------------------------------------------------------------

def create_app(mt: MultiTask, store: Store | None = None, config: ServerConfig | None = None,
               api_key: str | None = None) -> FastAPI:
    """The FastAPI app; `store` (optional) is watched for prompt files. Run it with uvicorn."""
    config = config or ServerConfig()
    batcher = Batcher(mt, store, config)

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await asyncio.to_thread(batcher.stop)

    app = FastAPI(title="softprompt", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.batcher = batcher

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = openapi_schema(app)
        return app.openapi_schema

    app.openapi = openapi

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return exc.response()

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return ApiError(500, "Internal server error.", "internal_error", "server_error").response()

    key_digest = hashlib.sha256(api_key.encode()).digest() if api_key else b""

    def authorized(request: Request) -> bool:
        if not api_key:
            return True
        given = request.headers.get("authorization", "")
        token = given[7:] if given[:7].lower() == "bearer " else ""
        # constant time: neither how much of a guess matches nor the key's length may show in the response time
        return hmac.compare_digest(hashlib.sha256(token.encode()).digest(), key_digest)

    async def authorize(request: Request) -> None:
        if not authorized(request):
            raise ApiError(401, "Missing or wrong API key.", "invalid_api_key", "authentication_error")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    async def read(request: Request, schema: type[BaseModel]):
        too_large = ApiError(413, f"Request body larger than {config.max_request_bytes} bytes.", "request_too_large")
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > config.max_request_bytes):
            raise too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > config.max_request_bytes:
                raise too_large
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"Request body is not valid JSON: {e}.", "invalid_json") from e
        except RecursionError as e:  # e.g. [[[[...]]]] 100,000 deep
            raise ApiError(400, "Request body is nested too deeply.", "invalid_json") from e
        if config.log_bodies:
            log.info("%s %s body %s", request.method, request.url.path, json.dumps(data)[:10_000])
        try:
            return schema.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ApiError(400, f"Invalid request: {where}: {first['msg']}.", "invalid_request", param=where) from e

    def task(name: str) -> Entry:
        try:
            return mt.get(name)
        except UnknownTaskError as e:
            raise ApiError(404, f"{e.problem} Known tasks: {e.known}.", "model_not_found", param="model") from e

    def encode(entry: Entry, value, reserve: int | None = None) -> Example:
        try:
            return entry.encode(value, reserve)
        except InputTooLongError as e:
            raise ApiError(400, e.problem, "context_length_exceeded", param="prompt") from e
        except SoftpromptError as e:
            raise ApiError(400, f"{e.problem} {e.fix or ''}".strip(), "invalid_input", param="prompt") from e

    def submit(jobs: list[Job]) -> None:
        try:
            batcher.submit(jobs)
        except QueueFull:
            raise ApiError(429, f"The server is busy ({config.max_queue} rows queued); retry shortly.", "queue_full",
                           "rate_limit_error", headers={"Retry-After": "1"}) from None

    async def generation(body: _Sampled, inputs: list, max_tokens: int | None, chat: bool):
        entry = task(body.model)
        if not mt.base.family.generates:
            raise ApiError(400, f"The base model '{mt.base.name}' has no decoder, so it cannot generate text; its tasks "
                                "are served by /v1/classify.", "generation_not_supported", param="model")
        max_new = max_tokens or min(entry.spec.max_new_tokens, config.max_tokens)
        if max_new > config.max_tokens:
            raise ApiError(400, f"max_tokens is {max_new}; this server allows at most {config.max_tokens}.",
                           "max_tokens_too_large", param="max_tokens")
        if len(body.stops()) > 4:
            raise ApiError(400, "stop takes at most 4 strings.", "too_many_stops", param="stop")
        if len(inputs) * body.n > config.max_prompts:
            raise ApiError(400, f"{len(inputs)} inputs x n={body.n} rows; this server allows {config.max_prompts}.",
                           "too_many_inputs", param="n")
        examples = [encode(entry, x, max_new) for x in inputs]
        queue, send = channel()
        sampling = Sampling(body.temperature, body.top_p, body.top_k)
        jobs = [Job(entry, examples[i], i * body.n + k, send, max_new_tokens=max_new, sampling=sampling)
                for i in range(len(inputs)) for k in range(body.n)]
        submit(jobs)
        completion = Completion(entry, jobs, queue, mt.base.tokenizer, body, chat)
        if body.stream:
            return StreamingResponse(completion.sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await completion.response()

    @v1.post("/completions", openapi_extra=_body(CompletionRequest))
    async def completions(request: Request):
        body = await read(request, CompletionRequest)
        inputs = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not inputs:
            raise ApiError(400, "prompt is empty.", "invalid_request", param="prompt")
        return await generation(body, inputs, body.max_tokens, chat=False)

    @v1.post("/chat/completions", openapi_extra=_body(ChatRequest))
    async def chat_completions(request: Request):
        body = await read(request, ChatRequest)
        users = [m for m in body.messages if m.role == "user"]
        if not users:
            raise ApiError(400, "messages has no user message; the last one fills the task's template.",
                           "invalid_request", param="messages")
        return await generation(body, [users[-1].text()], body.max_completion_tokens or body.max_tokens, chat=True)

    @v1.post("/classify", openapi_extra=_body(ClassifyRequest))
    async def classify(request: Request):
        body = await read(request, ClassifyRequest)
        entry = task(body.model)
        if not entry.spec.is_classification:
            raise ApiError(400, f"Task '{entry.name}' is a generation task; it has no classes.", "not_classification",
                           param="model")
        inputs = body.input if isinstance(body.input, list) else [body.input]
        if not inputs or len(inputs) > config.max_prompts:
            raise ApiError(400, f"Give 1 to {config.max_prompts} inputs.", "too_many_inputs", param="input")
        examples = [encode(entry, x) for x in inputs]
        queue, send = channel()
        jobs = [Job(entry, x, i, send, classify=True) for i, x in enumerate(examples)]
        submit(jobs)
        results: list[Classification | None] = [None] * len(jobs)
        async for index, kind, value in events(jobs, queue):
            if kind == "error":
                raise value
            results[index] = value
        tokens = sum(len(e.source) for e in examples)
        return {"object": "list", "model": entry.name,
                "data": [{"index": i, "label": r.label, "probs": r.probs} for i, r in enumerate(results)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [{"object": "model", "owned_by": "softprompt",
                                            "created": e.stamp[0] // 1_000_000_000 if e.stamp else 0,
                                            **e.describe()}
                                           for e in mt.entries()]}

    @app.get("/health")
    async def health(request: Request):
        out = {"status": "ok", "tasks": len(mt), "queued": batcher.queued, "running": batcher.running, **batcher.stats}
        if authorized(request):  # names and reasons only for those who may use the API
            out |= {"model": mt.base.name, "refused": dict(mt.refused)}
        return out

    app.include_router(v1)
    return app
