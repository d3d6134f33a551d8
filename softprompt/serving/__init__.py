"""An OpenAI-compatible server for many tasks on one base model (FastAPI under uvicorn).

Streaming (`stream: true`) sends server-sent events as OpenAI does. Request handlers only parse,
tokenize and wait; one worker thread owns the model (`batcher.py`) and runs queued rows of any
tasks as mixed-task batches.

Safety: the queue is bounded (429 when full, never a stall), request bodies and `max_tokens` are
limited, task names cannot reach outside the store, an optional API key is compared in constant
time, and request bodies are not logged unless asked. Web pages cannot drive it: bodies must be
JSON, the Host header must name this server (DNS rebinding), and CORS is off unless origins are
given. One bad request never takes the server down: every request has a deadline and is dropped
when its client goes, stop strings are bounded, parameters we would ignore are refused, and a row
that fails its batch is run apart so that it fails alone.

Layout: `config.py` (limits), `schemas.py` (requests, errors, OpenAPI), `auth.py` (API key, Host
allowlist, body reading), `batcher.py` (the worker), `streaming.py` (text deltas, stop strings,
deadlines, SSE), `routes.py` (the handlers and `create_app`).
"""

from .batcher import Batcher, Job, QueueFull
from .config import ServerConfig
from .routes import create_app
from .schemas import ApiError, openapi_schema
from .streaming import TextStream

__all__ = ["ApiError", "Batcher", "Job", "QueueFull", "ServerConfig", "TextStream", "create_app", "openapi_schema"]
