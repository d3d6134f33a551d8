"""Limits and batching of the server (every field is a `softprompt serve` option)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import ConfigError, check_at_least, check_types
from ..multitask import DEFAULT_CACHE_BYTES

BATCHING = ("continuous", "static")


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
    request_timeout: float = field(
        default=600.0, metadata={"help": "seconds a request may wait and run before it is cancelled (504)"}
    )
    body_timeout: float = field(default=30.0, metadata={"help": "seconds a client may take to send its body (408)"})
    shutdown_timeout: float = field(
        default=30.0, metadata={"help": "seconds open requests get to finish on SIGTERM or Ctrl-C before the exit"}
    )
    batching: str = field(
        default="continuous",
        metadata={
            "help": "continuous: requests join the running batch at its next decode step and leave when done; static: "
            "a batch runs to its end while newcomers wait (also what continuous falls back to on models whose "
            "caches cannot be joined: windowed or recurrent layers, encoder-decoders)"
        },
    )
    max_prefill_tokens: int = field(
        default=2048,
        metadata={
            "help": "continuous batching: most input tokens of newcomers run between two decode steps of running "
            "rows, once for classifications and once for generations joining (one of each always runs): bounds how "
            "long newcomers stall the others"
        },
    )
    cache_bytes: int = field(
        default=DEFAULT_CACHE_BYTES,
        metadata={
            "help": "memory for prompts ready to run (read, compiled); the least recently used beyond it are dropped "
            "and read again on their next request"
        },
    )
    log_bodies: bool = field(default=False, metadata={"help": "log request bodies (off: only task, sizes, status)"})

    # the most a duration may be: beyond it a wait is a stall (and time.monotonic() + inf kills the worker thread)
    MOST_SECONDS = {
        "max_wait_ms": 60_000,
        "reload_interval": 3600,
        "request_timeout": 24 * 3600,
        "body_timeout": 3600,
        "shutdown_timeout": 3600,
    }

    def __post_init__(self):
        check_at_least(
            self, 1, "max_batch_size", "max_queue", "max_tokens", "max_request_bytes", "max_prompts", "max_connections"
        )
        check_at_least(self, 1, "max_prefill_tokens")
        check_at_least(self, 0, "cache_bytes")
        if self.batching not in BATCHING:
            raise ConfigError(
                f"Unknown batching '{self.batching}'.", f"pass --batching with one of {', '.join(BATCHING)}."
            )
        for name, most in self.MOST_SECONDS.items():
            value, zero_ok = getattr(self, name), name == "max_wait_ms"
            if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value <= most):
                value = -1.0  # refused below
            if value < 0 or (value == 0 and not zero_ok):
                above = "from 0" if zero_ok else "above 0"
                raise ConfigError(
                    f"{name} must be a finite number {above} up to {most}, got {getattr(self, name)}.",
                    f"pass --{name.replace('_', '-')} with a value {above} up to {most}.",
                )
        check_types(self)  # the library's callers may hand over any value (`log_bodies="no"`, `max_queue=2.5`)
