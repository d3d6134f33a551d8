"""The HTTP routes: the OpenAI-compatible API over a `MultiTask` registry, and `create_app`.

POST /v1/completions        OpenAI completions; `model` names the task (vLLM's convention for adapters)
POST /v1/chat/completions   OpenAI chat; the last user message fills the task's template
POST /v1/classify           label and class probabilities of a classification task
GET  /v1/models             the tasks being served
GET  /health                liveness, queue depth, refused prompt files (needs no API key)
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import StreamingResponse

from ..errors import InputTooLongError, SoftpromptError
from ..example import Example
from ..generate import Sampling
from ..multitask import Classification, Entry, MultiTask, UnknownTaskError
from ..store import Store
from .auth import ApiKey, read
from .batcher import Batcher, Job, QueueFull
from .config import ServerConfig
from .schemas import (
    ApiError,
    ChatRequest,
    ClassifyRequest,
    CompletionRequest,
    SampledRequest,
    openapi_schema,
    request_body,
)
from .streaming import Completion, channel, events

log = logging.getLogger("softprompt.serve")


class Routes:
    """The handlers of one app: they parse, tokenize and wait; the batcher's thread runs the model."""

    def __init__(self, mt: MultiTask, batcher: Batcher, config: ServerConfig, key: ApiKey):
        self.mt, self.batcher, self.config, self.key = mt, batcher, config, key

    def task(self, name: str) -> Entry:
        try:
            return self.mt.get(name)
        except UnknownTaskError as e:
            raise ApiError(404, f"{e.problem} Known tasks: {e.known}.", "model_not_found", param="model") from e

    @staticmethod
    def encode(entry: Entry, value, reserve: int | None = None) -> Example:
        try:
            return entry.encode(value, reserve)
        except InputTooLongError as e:
            raise ApiError(400, e.problem, "context_length_exceeded", param="prompt") from e
        except SoftpromptError as e:
            raise ApiError(400, f"{e.problem} {e.fix or ''}".strip(), "invalid_input", param="prompt") from e

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
        if len(body.stops()) > 4:
            raise ApiError(400, "stop takes at most 4 strings.", "too_many_stops", param="stop")
        if len(inputs) * body.n > config.max_prompts:
            raise ApiError(
                400,
                f"{len(inputs)} inputs x n={body.n} rows; this server allows {config.max_prompts}.",
                "too_many_inputs",
                param="n",
            )
        return max_new

    async def generation(self, body: SampledRequest, inputs: list, max_tokens: int | None, chat: bool):
        entry = self.task(body.model)
        max_new = self._generation_limits(body, entry, inputs, max_tokens)
        examples = [self.encode(entry, x, max_new) for x in inputs]
        queue, send = channel()
        sampling = Sampling(body.temperature, body.top_p, body.top_k)
        jobs = [
            Job(entry, examples[i], i * body.n + k, send, max_new_tokens=max_new, sampling=sampling)
            for i in range(len(inputs))
            for k in range(body.n)
        ]
        self.submit(jobs)
        completion = Completion(entry, jobs, queue, self.mt.base.tokenizer, body, chat)
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
        return await self.generation(body, inputs, body.max_tokens, chat=False)

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
        return await self.generation(body, [users[-1].text()], body.max_completion_tokens or body.max_tokens, chat=True)

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
        inputs = body.input if isinstance(body.input, list) else [body.input]
        if not inputs or len(inputs) > self.config.max_prompts:
            raise ApiError(400, f"Give 1 to {self.config.max_prompts} inputs.", "too_many_inputs", param="input")
        examples = [self.encode(entry, x) for x in inputs]
        queue, send = channel()
        jobs = [Job(entry, x, i, send, classify=True) for i, x in enumerate(examples)]
        self.submit(jobs)
        results: list[Classification | None] = [None] * len(jobs)
        async for index, kind, value in events(jobs, queue):
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

    async def models(self):
        return {
            "object": "list",
            "data": [
                {
                    "object": "model",
                    "owned_by": "softprompt",
                    "created": e.stamp[0] // 1_000_000_000 if e.stamp else 0,
                    **e.describe(),
                }
                for e in self.mt.entries()
            ],
        }

    async def health(self, request: Request):
        b = self.batcher
        out = {"status": "ok", "tasks": len(self.mt), "queued": b.queued, "running": b.running, **b.stats}
        if self.key.authorized(request):  # names and reasons only for those who may use the API
            out |= {"model": self.mt.base.name, "refused": dict(self.mt.refused)}
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
    mt: MultiTask, store: Store | None = None, config: ServerConfig | None = None, api_key: str | None = None
) -> FastAPI:
    """The FastAPI app; `store` (optional) is watched for prompt files. Run it with uvicorn."""
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
    return app
