"""What the server reads and answers: OpenAI-shaped request bodies and errors, and the OpenAPI schema."""

from __future__ import annotations

import re
from typing import ClassVar

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator


class ApiError(Exception):
    """An error response: {"error": {"message", "type", "code", "param"}} with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.kind, self.param = status, message, code, kind, param
        self.headers = headers

    def payload(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "code": self.code, "param": self.param}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.payload(), status_code=self.status, headers=self.headers)


class Disconnected(ApiError):
    """The client closed its connection before its answer was complete (nginx's 499: nobody reads it)."""

    def __init__(self):
        super().__init__(499, "The client closed the connection.", "client_closed_request")


_PATH = re.compile(r"(?<![\w.])(?:/[^\s/'\"]+)+/([^\s/'\"]+)")


def redact(text: str) -> str:
    """`text` with absolute file paths cut to their last part: answers never show the server's directories."""
    return _PATH.sub(r"\1", text)


class _Request(BaseModel):
    # OpenAI clients send fields that change nothing here (user, stream_options, metadata, ...): accept and ignore
    # them. Those that would change the answer are in `UNSUPPORTED`: refused unless neutral.
    model_config = ConfigDict(extra="ignore")

    model: str

    UNSUPPORTED: ClassVar[dict[str, tuple]] = {}

    @classmethod
    def unsupported(cls, data: dict) -> str | None:
        """The first parameter of the raw body this server would ignore although it changes the answer."""
        for name, neutral in cls.UNSUPPORTED.items():
            value = data.get(name)
            if name in data and not any(value == v and type(value) is type(v) for v in neutral):
                return name
        return None


class SampledRequest(_Request):
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)  # OpenAI's default
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)  # an extension (vLLM has it too)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stop: str | list[str] | None = None

    # OpenAI's parameters that we do not implement, with the values that mean "off" (accepted)
    UNSUPPORTED: ClassVar[dict[str, tuple]] = {
        "presence_penalty": (None, 0, 0.0),
        "frequency_penalty": (None, 0, 0.0),
        "repetition_penalty": (None, 1, 1.0),
        "logit_bias": (None, {}),
        "best_of": (None, 1),
        "suffix": (None, ""),
        "seed": (None,),
        "tools": (None, []),
        "tool_choice": (None, "none"),
        "functions": (None, []),
        "function_call": (None, "none"),
        "response_format": (None, {"type": "text"}),
        "min_tokens": (None, 0),
    }

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class CompletionRequest(SampledRequest):
    prompt: str | list[str]
    # the log-probabilities of each token and of the `logprobs` most likely tokens in its place (None: none); strict,
    # so that a chat client's `logprobs: true` is refused rather than read as 1
    logprobs: int | None = Field(default=None, ge=0, le=5, strict=True)
    echo: bool = False  # the text starts with the prompt as the model reads it (the task's template filled)

    UNSUPPORTED: ClassVar[dict[str, tuple]] = SampledRequest.UNSUPPORTED | {"top_logprobs": (None, 0)}


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


class ChatRequest(SampledRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # the newer name of max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20, strict=True)

    UNSUPPORTED: ClassVar[dict[str, tuple]] = SampledRequest.UNSUPPORTED | {"echo": (None, False)}

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return v

    def top_k_logprobs(self) -> int | None:
        """How many most likely tokens to report per token (None: no log-probabilities)."""
        return (self.top_logprobs or 0) if self.logprobs else None


Fields = dict[str, str | int | float | bool]  # an input given as the template's fields: flat, never nested


class ClassifyRequest(_Request):
    input: str | Fields | list[str | Fields]


REQUESTS = (CompletionRequest, ChatRequest, ClassifyRequest)


def request_body(schema: type[BaseModel]) -> dict:
    """The OpenAPI request body of a route that reads its body itself (`read`: a size limit, errors in OpenAI's
    shape) instead of through FastAPI's parameters, which would leave it out of the schema."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema.__name__}"}}},
        }
    }


def openapi_schema(app: FastAPI) -> dict:
    """FastAPI's schema of the routes plus the request models: what /openapi.json serves and fuzzers start from."""
    from fastapi.openapi.utils import get_openapi
    from pydantic.json_schema import models_json_schema

    from .._version import __version__

    schema = get_openapi(title=app.title, version=__version__, routes=app.routes)
    _, defs = models_json_schema([(m, "validation") for m in REQUESTS], ref_template="#/components/schemas/{model}")
    schema.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
    return schema
