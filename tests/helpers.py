"""Helpers shared by the test modules (fixtures are in conftest.py; no test module imports another).

Tiny models, prompt builders, task-spec files, the CLI runner, and a live server in a thread.
"""

from __future__ import annotations

import copy
import os
import socket
import sys
import threading
import time
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
KEY = "test-key-123"  # the API key of the test servers
LONG = "the film was great fun and the plot " * 80  # ~600 tokens: over the tiny models' 512 positions
# A small classification spec over train.tsv / dev.tsv with columns text and y
BASIC = (
    'name: t\nsplits: {train: train.tsv, dev: dev.tsv}\ntemplate: "Text: {text}\\nLabel:"\nlabel_column: y\n'
    'labels: {a: yes, b: "no"}\n'
)


def build_tiny(arch: str, tokenizer, seed: int = 0):
    """A frozen `Base` around a tiny random model of `arch` (any name in `zoo.ALL`)."""
    import zoo

    import softprompt.base

    model = zoo.build_model(arch, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id, seed)
    return softprompt.base.freeze(model, copy.deepcopy(tokenizer), f"tiny-{arch}-seed{seed}")


# --- prompts and specs -----------------------------------------------------------------------------------------------


def spec_like(task_spec, **changes):
    """`task_spec` with some fields changed (through its portable form, as a user's edited copy would be)."""
    from softprompt.data import TaskSpec

    return TaskSpec.from_dict(task_spec.portable() | changes)


def random_soft_prompt(base, spec, **fields):
    """A soft prompt of 5 random virtual tokens for `base` (`fields`: more Prompt fields, e.g. metrics)."""
    import softprompt as sp

    config = {"num_virtual_tokens": 5, "init": "random", "init_text": None}
    return sp.Prompt.for_base(
        base,
        sp.Injection(embeds=torch.randn(5, base.hidden_size)),
        "soft",
        config,
        spec,
        trainable_parameters=5 * base.hidden_size,
        **fields,
    )


def make_prompt(base, spec, method: str | None, P: int = 0, seed: int = 0, init: str = "vocab", moved: float = 0.5):
    """A prompt of `method` with P virtual tokens, moved away from its init by noise of scale `moved`;
    method None: a template alone (a hard prompt)."""
    import softprompt as sp
    from softprompt.injection import EMPTY
    from softprompt.methods import METHODS, InitContext, build_method

    if method is None:
        return sp.Prompt(EMPTY, "hard", {}, spec.portable(), base.fingerprint.to_dict())
    config = METHODS[method].config_class(num_virtual_tokens=P, init=init)
    m = build_method(method, config, InitContext(base, spec.verbalizers, None, seed=seed))
    if moved:
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * moved)
    return sp.Prompt(
        m.collapse(),
        method,
        config.to_dict(),
        spec.portable(),
        base.fingerprint.to_dict(),
        trainable_parameters=m.num_trainable(),
    )


def text_rows(base) -> list:
    """Three unpadded rows of text to score, with no target and no prompt (set one with `dataclasses.replace`)."""
    from softprompt.example import Example
    from softprompt.injection import EMPTY

    ids = [base.tokenizer(t)["input_ids"] for t in ("the film was fun", "a dull plot", "it was great fun and the plot")]
    return [Example(s, len(s), [], EMPTY) for s in ids]


def write_spec(directory: Path, body: str = BASIC, files: dict[str, str | bytes] | None = None) -> Path:
    """A task spec `body` as DIRECTORY/task.yaml, next to data `files` {name: content}."""
    for name, content in (files or {}).items():
        (directory / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    spec = directory / "task.yaml"
    spec.write_text(body)
    return spec


# --- the command line ------------------------------------------------------------------------------------------------


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `softprompt ARGV` run in this process."""
    from softprompt.commands import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# --- distributed launches ---------------------------------------------------------------------------------------------


def launch(*flags: str) -> list[str]:
    """`accelerate launch` of 2 processes on this machine with `flags` (--multi_gpu, or --use_fsdp ...): torchrun
    starts them, and without GPUs they run on CPU with gloo (`--cpu` alone starts one process unless MPI is set up)."""
    machine = ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return [sys.executable, "-m", "accelerate.commands.launch", *flags, *machine]


def launch_env() -> dict:
    """The environment of a launch's processes: this checkout importable, one thread each, no hub requests."""
    path = os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


# --- a live server ---------------------------------------------------------------------------------------------------


def registry(base, store):
    """A MultiTask over `base` holding every prompt of `store`."""
    from softprompt.multitask import MultiTask

    mt = MultiTask(base)
    mt.sync(store)
    return mt


def auth() -> dict:
    return {"Authorization": f"Bearer {KEY}"}


class Live:
    """uvicorn serving `app` in a thread on a free loopback port (`config`: more uvicorn.Config options)."""

    def __init__(self, app, **config):
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", **config))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        wait_for(lambda: self.server.started, timeout=30)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


class Gate:
    """Holds the batcher's model work (before its rows' prompts are made ready) until released, to fill the queue
    deterministically."""

    def __init__(self, mt):
        self.event = threading.Event()
        inner = mt.ready

        def held(*args, **kwargs):
            self.event.wait(timeout=30)
            return inner(*args, **kwargs)

        mt.ready = held


def wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def serve_process(store_root, model_dir, *options: str, env: dict | None = None):
    """`softprompt serve` on `store_root` in a subprocess on a free loopback port, answering /health.

    Returns (process, url); the caller stops it (and reads its stderr)."""
    import os
    import subprocess
    import sys

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "softprompt", "serve", "--store", str(store_root), "--model", str(model_dir)]
        + ["--port", str(port), "--no-access-log", *options],
        env=os.environ | {"PYTHONPATH": str(root)} | (env or {}),
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"

    def up():
        assert proc.poll() is None, proc.stderr.read()
        try:
            return httpx.get(url + "/health").status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, timeout=120)
    except BaseException:
        proc.kill()
        raise
    return proc, url
