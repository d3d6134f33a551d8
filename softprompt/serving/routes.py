"""The HTTP routes: the OpenAI-compatible API over a `MultiTask` registry, and `create_app`.

POST /v1/completions        OpenAI completions; `model` names the task (vLLM's convention for adapters); `echo`
                            starts the text with the prompt as the model reads it (the task's template filled)
POST /v1/chat/completions   OpenAI chat; the last user message fills the task's template
POST /v1/classify           label and class probabilities of a classification task
GET  /v1/models             the tasks being served
GET  /health                liveness, queue depth, refused prompt files (needs no API key)
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response, StreamingResponse

from ..errors import InputTooLongError, SoftpromptError
from ..example import Example
from ..generate import Sampling, scores_prompts
from ..multitask import Classification, Entry, MultiTask, UnknownTaskError
from ..store import Store
from .auth import ApiKey, HostCheck, read
from .batcher import Batcher, Job, QueueFull
from .config import ServerConfig
from .schemas import (
    ApiError,
    ChatRequest,
    ClassifyRequest,
    CompletionRequest,
    SampledRequest,
    openapi_schema,
    redact,
    request_body,
)
from .streaming import Completion, channel, events

log = logging.getLogger("softprompt.serve")

MAX_STOPS, MAX_STOP_CHARS = 4, 256  # OpenAI's count; a length that keeps matching cheap on every token


class Routes:
    """The handlers of one app: they parse, tokenize and wait; the batcher's thread runs the model."""

    def __init__(self, mt: MultiTask, batcher: Batcher, config: ServerConfig, key: ApiKey):
        self.mt, self.batcher, self.config, self.key = mt, batcher, config, key
        self._models: tuple[int, bytes] | None = None  # (registry version, GET /v1/models body)

    def task(self, name: str) -> Entry:
        try:
            return self.mt.get(name)
        except UnknownTaskError as e:
            raise ApiError(404, f"{redact(e.problem)} Fix: {e.fix}", "model_not_found", param="model") from e

    @staticmethod
    def encode(entry: Entry, value, reserve: int | None = None, param: str = "prompt") -> Example:
        """One input as an `Example`; `param`: the request field it came from, named in errors."""
        try:
            return entry.encode(value, reserve)
        except InputTooLongError as e:
            raise ApiError(400, e.problem, "context_length_exceeded", param=param) from e
        except SoftpromptError as e:
            raise ApiError(400, f"{e.problem} {e.fix or ''}".strip(), "invalid_input", param=param) from e

    def submit(self, jobs: list[Job]) -> None:
        try:
            self.batcher.submit(jobs)
        except QueueFull:
            raise ApiError(
                429,
                f"The server is busy ({self.config.max_queue} rows queued); retry shortly.",
                "queue_full",
                "rate_limit_error",
                headers={"Retry-After": "1"},
            ) from None

    def _generation_limits(self, body: SampledRequest, entry: Entry, inputs: list, max_tokens: int | None) -> int:
        """The request's max new tokens, after refusing what this server does not take."""
        config = self.config
        if not self.mt.base.family.generates:
            raise ApiError(
                400,
                f"The base model '{self.mt.base.name}' has no decoder, so it cannot generate text; its "
                "tasks are served by /v1/classify.",
                "generation_not_supported",
                param="model",
            )
        max_new = max_tokens or min(entry.spec.max_new_tokens, config.max_tokens)
        if max_new > config.max_tokens:
            raise ApiError(
                400,
                f"max_tokens is {max_new}; this server allows at most {config.max_tokens}.",
                "max_tokens_too_large",
                param="max_tokens",
            )
        stops = body.stops()
        if len(stops) > MAX_STOPS:
            raise ApiError(400, f"stop takes at most {MAX_STOPS} strings.", "too_many_stops", param="stop")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ApiError(
                400,
                f"A stop string is {max(map(len, stops))} characters long; the most is {MAX_STOP_CHARS}.",
                "stop_too_long",
                param="stop",
            )
        if len(inputs) * body.n > config.max_prompts:
            raise ApiError(
                400,
                f"{len(inputs)} inputs x n={body.n} rows; this server allows {config.max_prompts}.",
                "too_many_inputs",
                param="n",
            )
        return max_new

    async def generation(
        self,
        request: Request,
        body: SampledRequest,
        inputs: list,
        max_tokens: int | None,
        chat: bool,
        logprobs: int | None = None,
        echo: bool = False,
    ):
        """logprobs: the alternatives to report per token (None: no log-probabilities); echo: start with the prompt."""
        entry = self.task(body.model)
        max_new = self._generation_limits(body, entry, inputs, max_tokens)
        if echo and logprobs is not None and not scores_prompts(self.mt.base):
            raise ApiError(
                400,
                f"The base model '{self.mt.base.name}' reads the prompt with an encoder, which gives its tokens no "
                "log-probabilities: echo cannot be combined with logprobs here.",
                "echo_logprobs_not_supported",
                param="echo",
            )
        examples = [self.encode(entry, x, max_new) for x in inputs]
        queue, send = channel()
        sampling = Sampling(body.temperature, body.top_p, body.top_k)
        jobs = [
            Job(
                entry,
                examples[i],
                i * body.n + k,
                send,
                max_new_tokens=max_new,
                sampling=sampling,
                logprobs=logprobs,
                echo=echo,
            )
            for i in range(len(inputs))
            for k in range(body.n)
        ]
        self.submit(jobs)
        deadline = time.monotonic() + self.config.request_timeout
        completion = Completion(entry, jobs, queue, self.mt.base.tokenizer, body, chat, deadline, request.receive)
        if body.stream:
            return StreamingResponse(
                completion.sse(),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await completion.response()

    async def completions(self, request: Request):
        body = await read(request, CompletionRequest, self.config)
        inputs = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not inputs:
            raise ApiError(400, "prompt is empty.", "invalid_request", param="prompt")
        return await self.generation(request, body, inputs, body.max_tokens, False, body.logprobs, body.echo)

    async def chat_completions(self, request: Request):
        body = await read(request, ChatRequest, self.config)
        users = [m for m in body.messages if m.role == "user"]
        if not users:
            raise ApiError(
                400,
                "messages has no user message; the last one fills the task's template.",
                "invalid_request",
                param="messages",
            )
        max_tokens = body.max_completion_tokens or body.max_tokens
        return await self.generation(request, body, [users[-1].text()], max_tokens, True, body.top_k_logprobs())

    async def classify(self, request: Request):
        body = await read(request, ClassifyRequest, self.config)
        entry = self.task(body.model)
        if not entry.spec.is_classification:
            raise ApiError(
                400,
                f"Task '{entry.name}' is a generation task; it has no classes.",
                "not_classification",
                param="model",
            )
        inputs = self._classify_inputs(entry, body.input)
        examples = [self.encode(entry, x, param="input") for x in inputs]
        queue, send = channel()
        jobs = [Job(entry, x, i, send, classify=True) for i, x in enumerate(examples)]
        self.submit(jobs)
        results: list[Classification | None] = [None] * len(jobs)
        deadline = time.monotonic() + self.config.request_timeout
        async for index, kind, value in events(jobs, queue, deadline, request.receive):
            if kind == "error":
                raise value
            results[index] = value
        tokens = sum(len(e.source) for e in examples)
        return {
            "object": "list",
            "model": entry.name,
            "data": [{"index": i, "label": r.label, "probs": r.probs} for i, r in enumerate(results)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    def _classify_inputs(self, entry: Entry, given) -> list:
        """The inputs of a classify request, after refusing none, too many, or an empty one."""
        inputs = given if isinstance(given, list) else [given]
        most = self.config.max_prompts
        if not inputs:
            raise ApiError(400, f"input is an empty list; give 1 to {most} inputs.", "empty_input", param="input")
        if len(inputs) > most:
            raise ApiError(400, f"{len(inputs)} inputs; give 1 to {most} inputs.", "too_many_inputs", param="input")
        columns = [entry.spec.column(f) for f in entry.spec.template_fields]
        for i, x in enumerate(inputs):
            # an object is empty when it gives every template field and all of them are blank
            empty = (
                not x.strip()
                if isinstance(x, str)
                else bool(columns) and all(not str(x.get(c, "x")).strip() for c in columns)
            )
            if empty:
                where = f"input[{i}]" if isinstance(given, list) else "input"
                raise ApiError(400, f"{where} is empty; give a text to classify.", "empty_input", param="input")
        return inputs

    def models(self) -> Response:
        """The task list, serialized once per change of the registry: thousands of tasks make megabytes of JSON.
        A plain `def`: FastAPI runs it in its thread pool, off the event loop."""
        version = self.mt.version
        if self._models is None or self._models[0] != version:
            data = [
                {
                    "object": "model",
                    "owned_by": "softprompt",
                    "created": e.stamp[0] // 1_000_000_000 if e.stamp else 0,
                    **e.describe(),
                }
                for e in self.mt.entries()
            ]
            self._models = (version, json.dumps({"object": "list", "data": data}).encode())
        return Response(self._models[1], media_type="application/json")

    async def health(self, request: Request):
        b = self.batcher
        out = {"status": "ok", "tasks": len(self.mt), "queued": b.queued, "running": b.running, **b.stats}
        if self.key.authorized(request):  # names and reasons only for those who may use the API
            out |= {
                "model": self.mt.base.name,
                "refused": {k: redact(v) for k, v in self.mt.refused.items()},
                # tasks whose file turned bad, serving their last good version
                "stale": {k: redact(v) for k, v in self.mt.stale.items()},
                "cache": {"prompts": len(self.mt.cache), "bytes": self.mt.cache.bytes, **self.mt.cache.stats},
            }
        return out

    def router(self) -> APIRouter:
        v1 = APIRouter(prefix="/v1", dependencies=[Depends(self.key.require)])
        v1.add_api_route(
            "/completions", self.completions, methods=["POST"], openapi_extra=request_body(CompletionRequest)
        )
        v1.add_api_route(
            "/chat/completions", self.chat_completions, methods=["POST"], openapi_extra=request_body(ChatRequest)
        )
        v1.add_api_route("/classify", self.classify, methods=["POST"], openapi_extra=request_body(ClassifyRequest))
        v1.add_api_route("/models", self.models, methods=["GET"])
        return v1


def create_app(
    mt: MultiTask,
    store: Store | None = None,
    config: ServerConfig | None = None,
    api_key: str | None = None,
    allowed_hosts: list[str] | tuple[str, ...] = (),
    cors_origins: list[str] | tuple[str, ...] = (),
) -> FastAPI:
    """The FastAPI app; `store` (optional) is watched for prompt files. Run it with uvicorn.

    allowed_hosts: names the Host header may give besides localhost, 127.0.0.1 and [::1] (`*`: any).
    cors_origins: web origins whose pages may call the API (CORS); none by default."""
    config = config or ServerConfig()
    batcher = Batcher(mt, store, config)
    routes = Routes(mt, batcher, config, ApiKey(api_key))

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

    app.add_api_route("/health", routes.health, methods=["GET"])
    app.include_router(routes.router())
    if cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(HostCheck, allowed=tuple(allowed_hosts))  # added last: runs first
    return app
