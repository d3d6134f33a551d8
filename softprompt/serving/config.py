"""Limits and batching of the server (every field is a `softprompt serve` option)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import check_at_least, check_positive


@dataclass
class ServerConfig:
    """Limits and batching of `softprompt serve` (every field is a command-line option)."""

    max_batch_size: int = field(default=32, metadata={"help": "most rows (requests x n) in one mixed-task batch"})
    max_wait_ms: float = field(
        default=10.0, metadata={"help": "how long the first queued request waits for others to join its batch"}
    )
    max_queue: int = field(default=256, metadata={"help": "most rows waiting; beyond it requests get 429"})
    max_tokens: int = field(default=512, metadata={"help": "largest max_tokens a request may ask for"})
    max_request_bytes: int = field(default=256_000, metadata={"help": "largest request body (413 beyond)"})
    max_prompts: int = field(default=32, metadata={"help": "most inputs (x n) in one request"})
    max_connections: int = field(
        default=1024, metadata={"help": "most open connections and requests in flight; beyond it uvicorn answers 503"}
    )
    reload_interval: float = field(
        default=1.0, metadata={"help": "seconds between scans of the store for new, changed or removed prompt files"}
    )
    log_bodies: bool = field(default=False, metadata={"help": "log request bodies (off: only task, sizes, status)"})

    def __post_init__(self):
        check_at_least(
            self, 1, "max_batch_size", "max_queue", "max_tokens", "max_request_bytes", "max_prompts", "max_connections"
        )
        check_at_least(self, 0, "max_wait_ms")
        check_positive(self, "reload_interval")
