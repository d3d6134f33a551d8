"""Who may call the API (API key, Host allowlist), and reading a request body within its size and time limits."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from .config import ServerConfig
from .schemas import ApiError, Disconnected

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


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json"


async def _body(request: Request, config: ServerConfig) -> bytes:
    too_large = ApiError(413, f"Request body larger than {config.max_request_bytes} bytes.", "request_too_large")
    size = request.headers.get("content-length")
    if size is not None and (not size.isdigit() or int(size) > config.max_request_bytes):
        raise too_large
    body = bytearray()
    try:
        async with asyncio.timeout(config.body_timeout):  # a client that trickles its body holds a connection
            async for chunk in request.stream():
                body += chunk
                if len(body) > config.max_request_bytes:
                    raise too_large
    except ClientDisconnect:  # the client left mid-body: nobody to answer, nothing to log
        raise Disconnected from None
    except TimeoutError:
        raise ApiError(408, f"Request body not received within {config.body_timeout:g} s.", "request_timeout") from None
    return bytes(body)


async def read(request: Request, schema: type[BaseModel], config: ServerConfig):
    """The request body as `schema`: JSON only, at most `max_request_bytes` read within `body_timeout`, errors in
    OpenAI's shape."""
    # A browser may send text/plain or a form to any address without asking first (no CORS preflight); only JSON
    # keeps pages on other sites from driving the API.
    if not _is_json(request.headers.get("content-type", "")):
        raise ApiError(415, "Request bodies must be JSON (Content-Type: application/json).", "unsupported_media_type")
    body = await _body(request, config)
    try:
        data = json.loads(body)
        # a lone surrogate ("\ud800") is valid JSON but no text: no tokenizer takes it
        json.dumps(data, ensure_ascii=False).encode()
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"Request body is not valid JSON: {e}.", "invalid_json") from e
    except UnicodeEncodeError as e:
        message = "Request body holds a lone surrogate (e.g. \\ud800), which is not text."
        raise ApiError(400, message, "invalid_json") from e
    except RecursionError as e:  # e.g. [[[[...]]]] 100,000 deep
        raise ApiError(400, "Request body is nested too deeply.", "invalid_json") from e
    except ValueError as e:  # an integer of more than 4,300 digits
        raise ApiError(400, "Request body has a number too long to read (over 4,300 digits).", "invalid_json") from e
    if config.log_bodies:
        log.info("%s %s body %s", request.method, request.url.path, json.dumps(data)[:10_000])
    if isinstance(data, dict) and (name := getattr(schema, "unsupported", lambda d: None)(data)):
        raise ApiError(
            400,
            f"{name} is not supported by this server; leave it out (or send its default).",
            "unsupported_parameter",
            param=name,
        )
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        # `param` names the request's field, as OpenAI's errors do (the full path, with pydantic's union tags, is in
        # the message)
        param = str(first["loc"][0]) if first["loc"] else None
        raise ApiError(400, f"Invalid request: {where}: {first['msg']}.", "invalid_request", param=param) from e


LOOPBACK = ("localhost", "127.0.0.1", "[::1]")


def host_name(host: str) -> str:
    """A Host header or a bind address without its port, lower case, IPv6 in brackets: `[::1]:8000` -> `[::1]`."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    if host.count(":") > 1:  # a bare IPv6 address (a bind address)
        return f"[{host}]"
    return host.rsplit(":", 1)[0]


class HostCheck:
    """ASGI middleware: 400 unless the Host header names this server (loopback names and `allowed`; `*`: any).

    A page on another site can point its own DNS name at 127.0.0.1 (DNS rebinding) and then call the API as a
    same-origin page; its requests carry that name in Host, which no allowlist of ours holds."""

    def __init__(self, app, allowed: list[str] | tuple[str, ...] = ()):
        self.app = app
        self.any = "*" in allowed
        self.allowed = {host_name(h) for h in (*LOOPBACK, *allowed)}

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket") and not self.any:
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if host_name(host) not in self.allowed:
                log.warning("refused a request for host %r (not in the allowed hosts)", host[:100])
                error = ApiError(
                    400,
                    "The Host header names no host this server answers to (DNS rebinding is refused).",
                    "invalid_host",
                    param="Host",
                )
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)
