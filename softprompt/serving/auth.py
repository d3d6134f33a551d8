"""Who may call the API, and reading a request body within its size limit."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging

from fastapi import Request
from pydantic import BaseModel, ValidationError

from .config import ServerConfig
from .schemas import ApiError

log = logging.getLogger("softprompt.serve")


class ApiKey:
    """An optional API key, compared in constant time: neither how much of a guess matches nor the key's length may
    show in the response time."""

    def __init__(self, key: str | None):
        self.key = key
        self._digest = hashlib.sha256(key.encode()).digest() if key else b""

    def authorized(self, request: Request) -> bool:
        if not self.key:
            return True
        given = request.headers.get("authorization", "")
        token = given[7:] if given[:7].lower() == "bearer " else ""
        return hmac.compare_digest(hashlib.sha256(token.encode()).digest(), self._digest)

    async def require(self, request: Request) -> None:
        """A route dependency: 401 unless authorized."""
        if not self.authorized(request):
            raise ApiError(401, "Missing or wrong API key.", "invalid_api_key", "authentication_error")


async def read(request: Request, schema: type[BaseModel], config: ServerConfig):
    """The request body as `schema`: at most `max_request_bytes` read, errors in OpenAI's shape."""
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
