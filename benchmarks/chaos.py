"""Chaos test of `softprompt serve` (issue 20): a real server under the failures a deployment meets.

    PYTHONPATH=. python benchmarks/chaos.py                    # the embedded SmolLM2; writes results/chaos.{json,md}
    PYTHONPATH=. python benchmarks/chaos.py --quick --out /tmp  # a smoke run (fewer and shorter requests)
    PYTHONPATH=. python benchmarks/chaos.py --model DIR --tiny --quick   # a tiny random model (what the tests use)

The server runs in a subprocess on 127.0.0.1 (a free port, an API key, `--max-wait-ms 200` so that
concurrent requests share a batch, `--body-timeout 2`, `--reload-interval 0.5`, `--shutdown-timeout 10`)
over a store of good tasks (SST-2 soft prompt and template alone through /v1/classify, E2E soft and prefix
prompts through /v1/completions) and of chaos tasks added to it (`add_chaos_tasks`). Every request has a
client deadline; one with no answer by then counts as hung. Scenarios, in order, and what they report:

(a) poisoned row: a prompt file of finite values that make the model's scores non-finite (the first of
    `POISONS` that does, checked on the model in this process; a KV prefix of +-3e38 does where scaled
    embeddings are normalized away), sent sampled, greedy and as classification, and a file holding NaN
    (written with safetensors, bypassing softprompt's save; indexed from its header, read on first use),
    all concurrently with `good_rows` good requests so that they share batches. Reported: good requests ok /
    sent (goal: all), each poisoned request's status and error code (goal for the sampled one: 500
    `non_finite_scores`), and how the NaN file's task answers afterwards (404 naming the refusal).
(b) stop-string attack: `attackers` clients each send `attack_requests` completions with 4 stop strings of
    256 characters (the most allowed) that never match but share a prefix with every text, `max_tokens`
    `attack_tokens`, while a thread polls GET /health every 20 ms on its own connection. Reported: /health
    latency p50/p99/max ms (goal p99 < 100 ms), polls and failed polls, attack requests ok, and the status of
    over-long stops (257 characters, 5 strings; goal 400).
(c) clients that disconnect: streaming completions closed after their first tokens, completions and
    classifications closed before their answer, a body cut off half way; then the seconds until /health shows
    0 rows running and queued, the tokens generated meanwhile (of the most the rows could have cost), and a
    normal request. Requests with max_tokens 0, and for a task whose spec says max_new_tokens 0 (refused at
    load). Reported: hung requests (goal 0) and the statuses.
(d) a task file corrupted while serving: a served (warm) task's file overwritten in place with random bytes,
    another's truncated, a third one corrupted before its first use (cold); after the reload interval each is
    requested. Reported: statuses (goal: the warm ones answer 200 from their last good version), the
    authorized /health's "stale" and "refused" entries, what an unauthorized /health shows, and whether a good
    file written back is served again.
(e) slow bodies: `slow_clients` clients send their headers and then trickle the body slower than
    --body-timeout, while normal requests run. Reported: their statuses (goal 408) and seconds to the answer,
    the normal requests ok, and how long a client trickling its *headers* is held (no goal; informative).
(f) SIGTERM under load: `sigterm_requests` completions in flight (half streamed), then SIGTERM. Reported:
    seconds from the signal to the process's exit (goal: under --shutdown-timeout), in-flight requests
    completed / failed, and the exit status (0, or -15: uvicorn re-raises the signal after its shutdown).

The server's log is kept: tracebacks (by exception) and ERROR lines in it are counted. Results go to
OUT/chaos.{json,md}; OUT/chaos-quick.* with --quick, OUT/chaos-tiny.* with --tiny (never over SmolLM2's).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import many_tasks as bench  # noqa: E402  (benchmarks/many_tasks.py: prompts of each method's initialization)

import softprompt as sp  # noqa: E402
from softprompt.injection import Injection  # noqa: E402
from softprompt.multitask import MultiTask  # noqa: E402
from softprompt.store import Store  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KEY = "chaos-key"  # the server's API key (read from $SOFTPROMPT_CHAOS_KEY by the server)
GOOD_TASKS = [  # (name, built-in task, method, virtual tokens): the store of the SmolLM2 run
    ("sst2-soft", "sst2", "soft", 20),
    ("sst2-hard", "sst2", None, 0),
    ("e2e-soft", "e2e_nlg", "soft", 24),
    ("e2e-prefix", "e2e_nlg", "prefix", 12),
]
SERVER_OPTIONS = {  # flags of `softprompt serve` for the whole run
    "max-wait-ms": 200,  # concurrent requests share a batch
    "max-batch-size": 32,
    "body-timeout": 2,
    "reload-interval": 0.5,
    "shutdown-timeout": 10,
}
GEN_INPUT = "name[The Eagle], eatType[coffee shop], food[French], area[riverside]"
CLS_INPUT = "a gripping, funny and beautifully acted film"
TEXT = re.compile(rb'"(text|content)": "[^"]')  # an event of a stream carrying generated text
STOPS = [c * 256 for c in "ae o"]  # the most allowed; never matching, sharing a prefix with almost any text


@dataclass(frozen=True)
class Sizes:
    good_rows: int = 24  # (a) good requests sent with the poisoned ones
    attackers: int = 8  # (b) clients sending stop strings
    attack_requests: int = 3  # (b) requests per attacker, one after the other
    attack_tokens: int = 256  # (b) max_tokens of each
    disconnects: int = 8  # (c) requests of each kind that hang up
    long_tokens: int = 256  # (c) max_tokens of the requests that hang up
    slow_clients: int = 4  # (e)
    header_window_s: float = 15.0  # (e) how long a client trickling its headers is watched
    sigterm_requests: int = 16  # (f) requests in flight at the signal
    sigterm_tokens: int = 24  # (f) max_tokens of each: a load the drain (--shutdown-timeout 10) can finish
    deadline_s: float = 120.0  # a request not answered by then is hung


QUICK = Sizes(
    good_rows=10,
    attackers=3,
    attack_requests=2,
    attack_tokens=96,
    disconnects=4,
    long_tokens=200,
    slow_clients=2,
    header_window_s=3.0,
    sigterm_requests=8,
    sigterm_tokens=48,
    deadline_s=60.0,
)


# --- the store: good tasks, and the chaos tasks added to it -----------------------------------------------------


def make_store(base, root: Path, data_dir: str | None = None) -> Store:
    """The good tasks of `GOOD_TASKS` for `base`, each its method's initialization."""
    store = Store(root)
    for seed, (name, task, method, P) in enumerate(GOOD_TASKS):
        store.save(name, bench.make_prompt(base, sp.load_task(task, data_dir=data_dir), method, P, seed))
    return store


def _scaled(factor: float):
    def poison(t: torch.Tensor) -> torch.Tensor:
        return t * factor

    return poison


def _signed(value: float):
    def poison(t: torch.Tensor) -> torch.Tensor:
        return torch.where(t < 0, -value, value).to(t.dtype)

    return poison


# Ways to make a prompt's values huge but finite (they pass the finiteness check at load), tried in order on the
# model: (name, which tensor, how). A pre-norm transformer normalizes huge embeddings away before any attention
# sees them (in RMSNorm, x**2 overflows to inf and x / sqrt(inf) is 0), so scaled embeddings rarely overflow; keys
# and values enter attention as they are, and near float32's largest (3.4e38) q.k overflows to +-inf, whose sum
# and softmax are NaN.
POISONS = [
    ("embeds x 1e30", "embeds", _scaled(1e30)),
    ("kv x 1e30", "kv", _scaled(1e30)),
    ("kv = +-3e38", "kv", _signed(3e38)),
]


def _with(prompt: sp.Prompt, **tensors) -> sp.Prompt:
    inj = prompt.injection
    parts = {"embeds": inj.embeds, "kv": inj.kv} | tensors
    return dataclasses.replace(prompt, injection=Injection(parts["embeds"], parts["kv"], inj.kv_positions))


def scores_finite(base, prompt: sp.Prompt, text: str) -> bool:
    """Whether `prompt` gives finite next-token scores for `text` on `base` (compiled as the server compiles it)."""
    mt = MultiTask(base)
    mt.add("probe", prompt)
    _, example = mt.encode("probe", text)
    with torch.inference_mode():
        return bool(torch.isfinite(base.family.next_token_logits([example])).all())


def find_poison(base, prompts: dict[str, sp.Prompt]) -> tuple[str | None, sp.Prompt | None, dict]:
    """The first of `POISONS` that makes scores non-finite: (its name, the poisoned prompt, {poison: finite?})."""
    tried = {}
    for name, kind, how in POISONS:
        source = prompts.get(kind)
        if source is None:
            continue
        tensor = getattr(source.injection, kind)
        poisoned = _with(source, **{kind: how(tensor)})
        assert all(torch.isfinite(t).all() for t in poisoned.injection.tensors().values()), name
        tried[name] = scores_finite(base, poisoned, GEN_INPUT)
        if not tried[name]:
            return name, poisoned, tried
    return None, None, tried


def _meta(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["softprompt"])


def write_raw(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """A prompt file written with safetensors directly, bypassing softprompt's checks (NaN, a bad spec)."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"softprompt": json.dumps(meta)})


def add_chaos_tasks(base, store: Store) -> dict:
    """Add the chaos tasks to `store` (which holds generation tasks, with embeddings or a KV prefix, and a
    classification task): poisoned prompts (`find_poison`), a NaN file, a spec with max_new_tokens 0, and copies of
    a good file to corrupt later. Returns {"poison": name or None, "tried": {poison: finite?}, "tasks": {role: task}}
    """
    prompts = {n: sp.load_prompt(store.path(n)) for n in store.names()}
    gen = [n for n, p in prompts.items() if not p.spec.is_classification]
    classes = [n for n, p in prompts.items() if p.spec.is_classification]
    soft = next((n for n in gen if prompts[n].injection.embeds is not None), None)
    prefix = next((n for n in gen if prompts[n].injection.kv is not None), None)
    sources = {"embeds": prompts[soft] if soft else None, "kv": prompts[prefix] if prefix else None}
    poison, poisoned, tried = find_poison(base, {k: v for k, v in sources.items() if v is not None})
    tasks = {}
    if poisoned is not None:
        store.save("poison-gen", poisoned)
        store.save("poison-cls", dataclasses.replace(poisoned, task=prompts[classes[0]].task))
        tasks |= {"poison_gen": "poison-gen", "poison_cls": "poison-cls"}
    victim = soft or prefix
    good = store.path(victim)
    meta = _meta(good)
    nan = {k: torch.full_like(v, float("nan")) for k, v in prompts[victim].injection.tensors().items()}
    write_raw(store.path("nan-file"), nan, meta)
    zero = {**meta, "task": {**meta["task"], "max_new_tokens": 0}}
    write_raw(store.path("zero-tokens"), prompts[victim].injection.tensors(), zero)
    for name in ("corrupt-garbage", "corrupt-truncated", "corrupt-cold"):
        shutil.copyfile(good, store.path(name))
    tasks |= {
        "nan": "nan-file",
        "zero": "zero-tokens",
        "garbage": "corrupt-garbage",
        "truncated": "corrupt-truncated",
        "cold": "corrupt-cold",
        "gen": gen,
        "cls": classes,
        "victim_source": victim,
    }
    return {"poison": poison, "tried": tried, "tasks": tasks}


# --- the server and its clients ---------------------------------------------------------------------------------


@dataclass
class Server:
    url: str
    port: int
    proc: subprocess.Popen
    log: object  # the file its stderr goes to
    options: dict

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {KEY}"}

    def log_text(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(store: Store, model: str, threads: int = 1, **options):
    """`softprompt serve --model MODEL` on `store`, with `SERVER_OPTIONS` (and `options`), on a free loopback port;
    yields a `Server` once /health answers, and kills it at the end if it still runs."""
    opts = SERVER_OPTIONS | {k.replace("_", "-"): v for k, v in options.items()}
    port = free_port()
    env = os.environ | {
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": str(threads),
        "SOFTPROMPT_CHAOS_KEY": KEY,
    }
    cmd = [sys.executable, "-m", "softprompt", "serve", "--store", str(store.root), "--model", model]
    cmd += ["--port", str(port), "--log-level", "warning", "--no-access-log", "--api-key-env", "SOFTPROMPT_CHAOS_KEY"]
    for k, v in opts.items():
        cmd += [f"--{k}", str(v)]
    # the log goes to a file: a pipe nobody drains fills up and blocks the server's next log line
    with tempfile.TemporaryFile(mode="a+") as log:  # appended to: reading it never moves where the server writes
        proc = subprocess.Popen(cmd, env=env, stderr=log, text=True)
        server = Server(f"http://127.0.0.1:{port}", port, proc, log, opts)
        try:
            deadline = time.monotonic() + 600
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited: {server.log_text()[-2000:]}")
                try:
                    if httpx.get(server.url + "/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("server did not start")
                time.sleep(0.2)
            yield server
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _error(r: httpx.Response) -> tuple[str | None, str | None]:
    try:
        e = r.json().get("error") or {}
        return e.get("code"), e.get("message")
    except (ValueError, AttributeError):
        return None, r.text[:200]


async def call(client: httpx.AsyncClient, path: str, body: dict, deadline: float) -> dict:
    """One request (streamed when the body asks), within `deadline` seconds: {ok, status, code, message, seconds};
    status "hung" when no answer came in time, "failed" when the connection broke."""
    t0 = time.perf_counter()

    async def go() -> dict:
        if body.get("stream"):
            async with client.stream("POST", path, json=body) as r:
                text = "".join([line + "\n" async for line in r.aiter_lines()])
            code = message = None
            if r.status_code != 200:  # refused before the stream began: a JSON error body
                code, message = _error(httpx.Response(r.status_code, content=text.encode()))
            elif '"error"' in text:  # an error event inside the stream
                event = next(x for x in text.splitlines() if x.startswith("data: ") and '"error"' in x)
                err = json.loads(event[6:])["error"]
                code, message = err.get("code"), err.get("message")
            ok = r.status_code == 200 and text.rstrip().endswith("data: [DONE]") and code is None
            return {"ok": ok, "status": r.status_code, "code": code, "message": message}
        r = await client.post(path, json=body)
        code, message = _error(r) if r.status_code != 200 else (None, None)
        ok = r.status_code == 200 and ("choices" in r.json() or "data" in r.json())
        return {"ok": ok, "status": r.status_code, "code": code, "message": message}

    try:
        out = await asyncio.wait_for(go(), deadline)
    except TimeoutError:
        out = {"ok": False, "status": "hung", "code": None, "message": None}
    except httpx.HTTPError as e:
        out = {"ok": False, "status": "failed", "code": type(e).__name__, "message": str(e)[:200]}
    return out | {"path": path, "model": body.get("model"), "seconds": round(time.perf_counter() - t0, 3)}


def client(server: Server, **kw) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=server.url, headers=server.headers(), timeout=600, limits=httpx.Limits(max_connections=1000), **kw
    )


def completion(model: str, max_tokens: int = 16, **more) -> tuple[str, dict]:
    return "/v1/completions", {"model": model, "prompt": GEN_INPUT, "max_tokens": max_tokens, "temperature": 0} | more


def classify(model: str) -> tuple[str, dict]:
    return "/v1/classify", {"model": model, "input": CLS_INPUT}


def good_mix(tasks: dict, n: int) -> list[tuple[str, dict]]:
    """n good requests round-robin over the generation and classification tasks (some streamed, some sampled)."""
    plan = []
    kinds = [("gen", t) for t in tasks["gen"]] + [("cls", t) for t in tasks["cls"]]
    for i in range(n):
        kind, task = kinds[i % len(kinds)]
        if kind == "cls":
            plan.append(classify(task))
        else:
            plan.append(completion(task, 8, stream=i % 3 == 0, temperature=1.0 if i % 2 else 0))
    return plan


async def health(server: Server, auth: bool = True) -> dict:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
        return (await c.get("/health", headers=server.headers() if auth else {})).json()


def brief(r: dict) -> dict:
    """A request's record as the report shows it."""
    return {k: r[k] for k in ("status", "code", "message", "seconds") if r.get(k) is not None}


# --- (a) a poisoned row in a mixed batch -----------------------------------------------------------------------


async def poisoned_batch(server: Server, made: dict, sizes: Sizes) -> dict:
    tasks = made["tasks"]
    poisoned = {"nan_file_first_use": completion(tasks["nan"], 8, temperature=1.0)}
    if "poison_gen" in tasks:
        poisoned |= {
            "overflow_sampled": completion(tasks["poison_gen"], 8, temperature=1.0),
            "overflow_greedy": completion(tasks["poison_gen"], 8),
            "overflow_classify": classify(tasks["poison_cls"]),
        }
    good = good_mix(tasks, sizes.good_rows)
    before = await health(server)
    async with client(server) as c:
        # the poisoned requests go in among the good ones, all at once: one mixed batch (--max-wait-ms 200)
        plan = good[: len(good) // 2] + list(poisoned.values()) + good[len(good) // 2 :]
        results = await asyncio.gather(*(call(c, p, b, sizes.deadline_s) for p, b in plan))
        after_nan = await call(c, *completion(tasks["nan"], 8), sizes.deadline_s)
    after = await health(server)
    names = list(poisoned)
    bad = dict(zip(names, results[len(good) // 2 : len(good) // 2 + len(poisoned)]))
    goods = results[: len(good) // 2] + results[len(good) // 2 + len(poisoned) :]
    return {
        "poison": made["poison"],
        "poisons_tried": {k: ("scores finite" if v else "scores NaN/inf") for k, v in made["tried"].items()},
        "good_ok": sum(r["ok"] for r in goods),
        "good_total": len(goods),
        "good_failures": [brief(r) | {"model": r["model"]} for r in goods if not r["ok"]][:5],
        "poisoned": {k: brief(v) for k, v in bad.items()},
        "nan_file_afterwards": brief(after_nan),
        "nan_file_refused_in_health": redacted(after.get("refused", {}).get(tasks["nan"])),
        "batches": after["batches"] - before["batches"],
        "rows": after["rows"] - before["rows"],
        "largest_batch": after["largest_batch"],
        "hung": sum(r["status"] == "hung" for r in results + [after_nan]),
    }


def redacted(text: str | None, most: int = 200) -> str | None:
    return None if text is None else text[:most]


# --- (b) the stop-string attack, /health timed meanwhile -------------------------------------------------------


class HealthPoller(threading.Thread):
    """GET /health every `every` seconds on its own connection, in its own thread (the client's event loop, busy
    with the attack, cannot delay it); latencies in ms."""

    def __init__(self, url: str, every: float = 0.02):
        super().__init__(daemon=True)
        self.url, self.every = url, every
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as c:
            while not self.stop.is_set():
                t0 = time.perf_counter()
                try:
                    r = c.get("/health")
                    if r.status_code != 200:
                        self.failures.append(str(r.status_code))
                except httpx.HTTPError as e:
                    self.failures.append(type(e).__name__)
                took = time.perf_counter() - t0
                self.latencies.append(1000 * took)
                self.stop.wait(max(0.0, self.every - took))


def quantile(xs: list[float], q: int) -> float:
    if len(xs) < 2:
        return xs[0] if xs else float("nan")
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1]


async def stop_attack(server: Server, made: dict, sizes: Sizes) -> dict:
    gen = made["tasks"]["gen"]
    async with client(server) as c:
        over = [
            completion(gen[0], 8, stop=["x" * 257]),
            completion(gen[0], 8, stop=["x" * 300, "y"]),
            completion(gen[0], 8, stop=["a", "b", "c", "d", "e"]),
        ]
        refused = await asyncio.gather(*(call(c, p, b, sizes.deadline_s) for p, b in over))
        poller = HealthPoller(server.url)
        poller.start()
        t0 = time.perf_counter()

        async def attacker(i: int) -> list[dict]:
            out = []
            for k in range(sizes.attack_requests):
                path, body = completion(gen[(i + k) % len(gen)], sizes.attack_tokens, stop=STOPS, stream=i % 2 == 1)
                out.append(await call(c, path, body, sizes.deadline_s))
            return out

        attacks = [r for rs in await asyncio.gather(*(attacker(i) for i in range(sizes.attackers))) for r in rs]
        seconds = time.perf_counter() - t0
        poller.stop.set()
        poller.join()
    lat = poller.latencies
    return {
        "attack_requests": len(attacks),
        "attack_ok": sum(r["ok"] for r in attacks),
        "attack_seconds": round(seconds, 2),
        "health_polls": len(lat),
        "health_failed": len(poller.failures),
        "health_failures": poller.failures[:5],
        "health_p50_ms": round(quantile(lat, 50), 1),
        "health_p99_ms": round(quantile(lat, 99), 1),
        "health_max_ms": round(max(lat), 1) if lat else None,
        "overlong_stop_statuses": [r["status"] for r in refused],
        "overlong_stop_codes": [r["code"] for r in refused],
        "hung": sum(r["status"] == "hung" for r in attacks + refused),
    }


# --- (c) clients that disconnect, and zero-token requests ------------------------------------------------------


def raw_request(server: Server, path: str, body: bytes, length: int | None = None) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body) if length is None else length}\r\n\r\n"
    )
    return head.encode()


async def hang_up(server: Server, path: str, body: dict, after: str, wait: float = 0.1) -> str:
    """Send a request on a raw connection and close it: after the first generated text ("first_tokens"), after
    `wait` seconds without reading ("before_answer"), or half way through the body ("mid_body")."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    data = json.dumps(body).encode()
    try:
        if after == "mid_body":
            writer.write(raw_request(server, path, data) + data[: len(data) // 2])
            await writer.drain()
            await asyncio.sleep(wait)
            return "closed mid-body"
        writer.write(raw_request(server, path, data) + data)
        await writer.drain()
        if after == "first_tokens":  # read up to the first event that carries generated text
            status = await asyncio.wait_for(reader.readline(), 60)
            while status.startswith(b"HTTP/1.1 200"):
                line = await asyncio.wait_for(reader.readline(), 60)
                if not line or line.startswith(b"data: ") and TEXT.search(line):
                    break
            return status.decode().strip()
        await asyncio.sleep(wait)
        return "closed before the answer"
    finally:
        writer.close()


async def until_idle(server: Server, deadline: float) -> float | None:
    """Seconds until /health shows no row running or queued (None: not within `deadline`)."""
    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
        while time.perf_counter() - t0 < deadline:
            h = (await c.get("/health")).json()
            if h["running"] == 0 and h["queued"] == 0:
                return round(time.perf_counter() - t0, 2)
            await asyncio.sleep(0.05)
    return None


async def disconnects(server: Server, made: dict, sizes: Sizes, idle_deadline: float = 10.0) -> dict:
    tasks = made["tasks"]
    gen, cls = tasks["gen"], tasks["cls"]
    n = sizes.disconnects
    before = await health(server)
    cases = []
    for i in range(n):
        task = gen[i % len(gen)]
        long = completion(task, sizes.long_tokens, temperature=1.0)[1]
        cases += [  # the rows that hang up before their answer are in the queue: the batch waits --max-wait-ms
            ("/v1/completions", long | {"stream": True}, "first_tokens"),
            ("/v1/chat/completions", _chat(long) | {"stream": True}, "first_tokens"),
            ("/v1/completions", long, "before_answer"),
            ("/v1/classify", classify(cls[i % len(cls)])[1], "before_answer"),
            ("/v1/completions", long, "mid_body"),
        ]
    t0 = time.perf_counter()
    hung_up = await asyncio.gather(*(hang_up(server, p, b, a) for p, b, a in cases), return_exceptions=True)
    idle = await until_idle(server, idle_deadline)
    after = await health(server)
    async with client(server) as c:
        zero = [
            completion(gen[0], 0),
            ("/v1/chat/completions", _chat(completion(gen[0], 16)[1]) | {"max_tokens": 0}),
            ("/v1/chat/completions", _chat(completion(gen[0], 16)[1]) | {"max_completion_tokens": 0}),
            completion(tasks["zero"], 8),
            ("/v1/completions", {"model": tasks["zero"], "prompt": GEN_INPUT}),
            completion(tasks["zero"], 8, stream=True),
        ]
        zeros = await asyncio.gather(*(call(c, p, b, sizes.deadline_s) for p, b in zero))
        normal = await call(c, *completion(gen[0], 8), sizes.deadline_s)
    streamed = [s for s, (_, _, a) in zip(hung_up, cases) if a == "first_tokens"]
    possible = sum(b.get("max_tokens", 0) for _, b, a in cases if a != "mid_body")  # the body cut off never ran
    return {
        "hung_up": len(cases),
        "hang_up_errors": [repr(e)[:120] for e in hung_up if isinstance(e, BaseException)][:5],
        "streams_started": sum(isinstance(s, str) and " 200 " in s + " " for s in streamed),
        "seconds_until_idle": idle,
        "seconds_total": round(time.perf_counter() - t0, 2),
        "tokens_generated_for_them": after["tokens"] - before["tokens"],
        "tokens_they_could_have_cost": possible,
        "rows_left_running": after["running"],
        "rows_left_queued": after["queued"],
        "normal_request_after": brief(normal),
        "zero_token_requests": {
            name: brief(r)
            for name, r in zip(
                [
                    "completion max_tokens 0",
                    "chat max_tokens 0",
                    "chat max_completion_tokens 0",
                    "task with max_new_tokens 0",
                    "task with max_new_tokens 0, no max_tokens",
                    "task with max_new_tokens 0, streamed",
                ],
                zeros,
            )
        },
        "zero_task_refused_in_health": redacted(after.get("refused", {}).get(tasks["zero"])),
        "hung": sum(r["status"] == "hung" for r in zeros + [normal]) + (idle is None),
    }


def _chat(body: dict) -> dict:
    out = {k: v for k, v in body.items() if k != "prompt"}
    return out | {"messages": [{"role": "user", "content": body["prompt"]}]}


# --- (d) a task file corrupted while serving -------------------------------------------------------------------


def corrupt(path: Path, how: str, seed: int = 0) -> None:
    """Damage `path` in place (same inode): random bytes over all of it, or cut to half its size."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        if how == "garbage":
            f.write(random.Random(seed).randbytes(size))
        else:
            f.truncate(size // 2)


async def corrupted_file(server: Server, store: Store, made: dict, sizes: Sizes) -> dict:
    tasks = made["tasks"]
    warm, cold = [tasks["garbage"], tasks["truncated"]], tasks["cold"]
    wait = 2 * float(server.options["reload-interval"]) + 0.5
    async with client(server) as c:
        first = await asyncio.gather(*(call(c, *completion(t, 8), sizes.deadline_s) for t in warm))
        corrupt(store.path(tasks["garbage"]), "garbage")
        corrupt(store.path(tasks["truncated"]), "truncate")
        corrupt(store.path(cold), "garbage", seed=1)
        await asyncio.sleep(wait)
        plans = [completion(t, 8) for t in warm] + [completion(warm[0], 8, stream=True), completion(cold, 8)]
        later = await asyncio.gather(*(call(c, p, b, sizes.deadline_s) for p, b in plans))
        seen = await health(server)
        anonymous = await health(server, auth=False)
        # a good file written back (atomically, as `softprompt train` writes) is served again, and no longer stale
        shutil.copyfile(store.path(tasks["victim_source"]), store.path(tasks["garbage"]).with_suffix(".tmp"))
        os.replace(store.path(tasks["garbage"]).with_suffix(".tmp"), store.path(tasks["garbage"]))
        await asyncio.sleep(wait)
        restored = await call(c, *completion(tasks["garbage"], 8), sizes.deadline_s)
        healed = await health(server)
    stale, refused = seen.get("stale"), seen.get("refused", {})
    return {
        "before": {t: r["status"] for t, r in zip(warm, first)},
        "after": {
            "garbage (warm)": brief(later[0]),
            "truncated (warm)": brief(later[1]),
            "garbage (warm), streamed": brief(later[2]),
            "garbage (cold: never used before)": brief(later[3]),
        },
        "health_has_stale": stale is not None,
        "stale": {t: redacted(stale.get(t)) for t in warm} if stale is not None else None,
        "refused": {t: redacted(refused.get(t)) for t in warm + [cold]},
        "unauthorized_health_keys": sorted(anonymous),
        "restored": brief(restored),
        "stale_after_restore": sorted((healed.get("stale") or {}).keys()),
        "refused_after_restore": tasks["garbage"] in healed.get("refused", {}),
        "hung": sum(r["status"] == "hung" for r in first + later + [restored]),
    }


# --- (e) slow bodies -------------------------------------------------------------------------------------------


async def slow_body(server: Server, body: dict, every: float) -> dict:
    """Headers at once, then the body a byte every `every` seconds until the server answers."""
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    data = json.dumps(body).encode()

    async def trickle():
        try:
            writer.write(raw_request(server, "/v1/completions", data))
            for i in range(len(data)):
                writer.write(data[i : i + 1])
                await writer.drain()
                await asyncio.sleep(every)
        except (ConnectionError, OSError):
            pass  # the server closed the connection

    sender = asyncio.create_task(trickle())
    try:
        line = await asyncio.wait_for(reader.readline(), 60)
        status = int(line.split()[1]) if line else "closed"
    except TimeoutError:
        status = "hung"
    finally:
        sender.cancel()
        writer.close()
    return {"status": status, "seconds": round(time.perf_counter() - t0, 2)}


async def slow_headers(server: Server, every: float, window: float) -> dict:
    """Trickle a request's headers a byte every `every` seconds for up to `window` seconds: how long is it held?"""
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    head = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"x" * 10_000

    async def trickle():
        try:
            for i in range(len(head)):
                writer.write(head[i : i + 1])
                await writer.drain()
                await asyncio.sleep(every)
        except (ConnectionError, OSError):
            pass

    sender = asyncio.create_task(trickle())
    try:
        line = await asyncio.wait_for(reader.readline(), window)
        outcome = f"answered {line.decode().strip()}" if line else "closed by the server"
    except TimeoutError:
        outcome = "still open"
    except (ConnectionError, OSError) as e:
        outcome = f"reset ({type(e).__name__})"
    finally:
        sender.cancel()
        writer.close()
    return {"outcome": outcome, "held_s": round(time.perf_counter() - t0, 2), "window_s": window}


async def slow_bodies(server: Server, made: dict, sizes: Sizes) -> dict:
    timeout = float(server.options["body-timeout"])
    gen = made["tasks"]["gen"]
    body = completion(gen[0], 8)[1]

    async def others():
        out = []
        async with client(server) as c:
            for i in range(4):
                await asyncio.sleep(timeout / 4)
                out.append(await call(c, *completion(gen[i % len(gen)], 8), sizes.deadline_s))
        return out

    slow = [slow_body(server, body, timeout / 4) for _ in range(sizes.slow_clients)]
    results = await asyncio.gather(others(), slow_headers(server, 0.5, sizes.header_window_s), *slow)
    normal, headers, bodies = results[0], results[1], results[2:]
    return {
        "body_timeout_s": timeout,
        "slow_statuses": [b["status"] for b in bodies],
        "slow_seconds": [b["seconds"] for b in bodies],
        "others_ok": sum(r["ok"] for r in normal),
        "others_total": len(normal),
        "others_max_s": max(r["seconds"] for r in normal),
        "slow_headers": headers,
        "hung": sum(b["status"] == "hung" for b in bodies) + sum(r["status"] == "hung" for r in normal),
    }


# --- (f) SIGTERM under load ------------------------------------------------------------------------------------


async def sigterm(server: Server, made: dict, sizes: Sizes) -> dict:
    gen = made["tasks"]["gen"]
    timeout = float(server.options["shutdown-timeout"])
    proc = server.proc
    async with client(server) as c:
        plans = [
            completion(gen[i % len(gen)], sizes.sigterm_tokens, stream=i % 2 == 0, temperature=1.0)
            for i in range(sizes.sigterm_requests)
        ]
        flight = [asyncio.create_task(call(c, p, b, timeout + 30)) for p, b in plans]
        t_wait = time.perf_counter()
        running = 0
        while time.perf_counter() - t_wait < 30:
            running = (await health(server))["running"]
            if running or all(f.done() for f in flight):
                break
            await asyncio.sleep(0.02)
        in_flight = sum(not f.done() for f in flight)
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        exited = asyncio.create_task(asyncio.to_thread(_wait, proc, timeout + 60))
        late = await call(c, *completion(gen[0], 8), 10)  # sent after the signal: refused or answered, never hung
        code, t_exit = await exited
        exit_s = t_exit - t0
        results = await asyncio.gather(*flight)
    return {
        "shutdown_timeout_s": timeout,
        "requests": len(results),
        "in_flight_at_signal": in_flight,
        "rows_running_at_signal": running,
        "seconds_to_exit": round(exit_s, 2),
        "exit_code": code,
        "completed_ok": sum(r["ok"] for r in results),
        "errors": sum(not r["ok"] for r in results),
        "error_examples": [brief(r) for r in results if not r["ok"]][:5],
        "request_after_signal": brief(late),
        "hung": sum(r["status"] == "hung" for r in results),
    }


def _wait(proc: subprocess.Popen, timeout: float) -> tuple[int | str, float]:
    """(exit status, time.perf_counter() at the exit)."""
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        code = "did not exit"
    return code, time.perf_counter()


# --- the whole run ---------------------------------------------------------------------------------------------


def server_log(text: str) -> dict:
    """Tracebacks (counted by their exception line), ERROR and WARNING lines of the server's log."""
    lines = text.splitlines()
    errors = [x for x in lines if " ERROR " in x or x.startswith("ERROR")]
    exceptions: dict[str, int] = {}
    in_traceback = False
    for line in lines:
        if line.startswith("Traceback (most recent call last)"):
            in_traceback = True
        elif in_traceback and not line.startswith(" "):
            in_traceback = False
            exceptions[line[:200]] = exceptions.get(line[:200], 0) + 1
    return {
        "tracebacks": text.count("Traceback (most recent call last)"),
        "exceptions": exceptions,
        "error_lines": len(errors),
        "error_examples": sorted({x[:200] for x in errors})[:8],
        "warning_lines": sum(" WARNING " in x for x in lines),
    }


# the scenarios in the order they run (SIGTERM last: it ends the server)
SCENARIOS = {
    "poisoned_batch": poisoned_batch,
    "stop_attack": stop_attack,
    "disconnects": disconnects,
    "corrupted_file": corrupted_file,
    "slow_bodies": slow_bodies,
    "sigterm": sigterm,
}


def run(store: Store, model: str, made: dict, sizes: Sizes = Sizes(), threads: int = 1, **options) -> dict:
    """Serve `store` (its chaos tasks `made` by `add_chaos_tasks`) on `model`, run (a)-(f); the results."""
    out = {"chaos_tasks": made["tasks"], "seconds": {}}
    t0 = time.perf_counter()
    with running_server(store, model, threads, **options) as server:
        out["server_options"] = server.options
        out["seconds"]["server_start"] = round(time.perf_counter() - t0, 2)

        async def scenarios():
            for name, scenario in SCENARIOS.items():
                t = time.perf_counter()
                args = (server, store, made, sizes) if name == "corrupted_file" else (server, made, sizes)
                out[name] = await scenario(*args)
                out["seconds"][name] = round(time.perf_counter() - t, 2)

        asyncio.run(scenarios())
        out["server_log"] = server_log(server.log_text())
    out["hung_total"] = sum(out[k]["hung"] for k in SCENARIOS)
    return out


def goals(r: dict) -> list[tuple[str, str, str, bool]]:
    """(scenario, measure, result, goal met) rows of the report."""
    a, b, c, d, e, f = (r[k] for k in SCENARIOS)
    warm = [d["after"]["garbage (warm)"]["status"], d["after"]["truncated (warm)"]["status"]]
    sampled = a["poisoned"].get("overflow_sampled", {})
    return [
        (
            "(a) poisoned row",
            "good requests of its batches ok (goal all)",
            f"{a['good_ok']} / {a['good_total']}",
            a["good_ok"] == a["good_total"],
        ),
        (
            "(a) poisoned row",
            "poisoned sampled request (goal 500 non_finite_scores)",
            f"{sampled.get('status')} {sampled.get('code')}",
            sampled.get("code") == "non_finite_scores",
        ),
        ("(b) stop-string attack", "/health p99 (goal < 100 ms)", f"{b['health_p99_ms']} ms", b["health_p99_ms"] < 100),
        (
            "(b) stop-string attack",
            "/health polls answered (goal all)",
            f"{b['health_polls'] - b['health_failed']} / {b['health_polls']}",
            b["health_failed"] == 0,
        ),
        (
            "(b) stop-string attack",
            "over-long stops (goal 400)",
            str(b["overlong_stop_statuses"]),
            set(b["overlong_stop_statuses"]) == {400},
        ),
        ("(c) disconnects, max_tokens 0", "hung requests (goal 0)", str(c["hung"]), c["hung"] == 0),
        (
            "(c) disconnects",
            "seconds until no row runs or waits",
            str(c["seconds_until_idle"]),
            c["seconds_until_idle"] is not None,
        ),
        ("(d) corrupted file", "warm tasks answer (goal 200)", str(warm), warm == [200, 200]),
        (
            "(d) corrupted file",
            'authorized /health lists them under "stale"',
            str(sorted(d["stale"] or {})) if d["health_has_stale"] else "no stale key",
            bool(d["stale"]) and all(d["stale"].values()),
        ),
        ("(e) slow bodies", "statuses (goal 408)", str(e["slow_statuses"]), set(e["slow_statuses"]) == {408}),
        (
            "(e) slow bodies",
            "other requests meanwhile ok",
            f"{e['others_ok']} / {e['others_total']}",
            e["others_ok"] == e["others_total"],
        ),
        (
            "(f) SIGTERM under load",
            f"seconds to exit (goal < {f['shutdown_timeout_s']:g})",
            str(f["seconds_to_exit"]),
            f["seconds_to_exit"] < f["shutdown_timeout_s"],
        ),
        (
            "(f) SIGTERM under load",
            "in-flight requests completed / failed",
            f"{f['completed_ok']} / {f['errors']} (exit status {f['exit_code']})",
            f["errors"] == 0 and f["exit_code"] in (0, -signal.SIGTERM),
        ),
        ("all", "hung requests (goal 0)", str(r["hung_total"]), r["hung_total"] == 0),
    ]


def st(record: dict) -> str:
    """A request's record in a word or two: "200", "404 model_not_found", "hung"."""
    return " ".join(str(x) for x in (record.get("status"), record.get("code")) if x is not None)


def markdown(r: dict) -> str:
    a, b, c, d, e, f = (r[k] for k in SCENARIOS)
    command = "PYTHONPATH=. python benchmarks/chaos.py" + (" --model DIR --tiny" if r["tiny"] else "")
    zero = c["zero_token_requests"]
    lines = [
        "# Server chaos test (issue 20)",
        "",
        f"{r['model']}{' (a tiny random model: not a measurement of SmolLM2)' if r['tiny'] else ''}; torch "
        f"{r['versions']['torch']}, transformers {r['versions']['transformers']}, uvicorn {r['versions']['uvicorn']}, "
        f"softprompt {r['versions']['softprompt']}; {r['machine']}. Run with `{command}"
        f"{' --quick' if r['quick'] else ''}`; raw numbers (and error messages) in `chaos.json`. Measured {r['date']}.",
        "",
        f"`softprompt serve` in a subprocess with {', '.join(f'--{k} {v}' for k, v in r['server_options'].items())} "
        "and an API key, over good tasks and the chaos tasks of `benchmarks/chaos.py` (its docstring says what each "
        "scenario does). A request not answered within its client deadline counts as hung.",
        "",
        "| scenario | measure | result | goal met |",
        "|---|---|---|---|",
    ]
    lines += [f"| {s} | {m} | {v} | {'yes' if ok else '**no**'} |" for s, m, v, ok in goals(r)]
    poisoned = ", ".join(f"{k.replace('_', ' ')}: {st(v)}" for k, v in a["poisoned"].items())
    tried = ", ".join(f"{k}: {v}" for k, v in a["poisons_tried"].items())
    exceptions = "; ".join(f"{n} x {x.split(':')[0]}" for x, n in r["server_log"]["exceptions"].items()) or "none"
    lines += [
        "",
        f"- (a) Poison: {a['poison']} ({tried}). The burst ran as {a['batches']} batches of {a['rows']} rows "
        f"(largest {a['largest_batch']}). Poisoned requests: {poisoned}; the NaN file's task afterwards: "
        f"{st(a['nan_file_afterwards'])}.",
        f"- (b) {b['attack_requests']} attack requests ({b['attack_ok']} ok) in {b['attack_seconds']} s; "
        f"{b['health_polls']} /health polls: p50 {b['health_p50_ms']} ms, p99 {b['health_p99_ms']} ms, max "
        f"{b['health_max_ms']} ms.",
        f"- (c) {c['hung_up']} requests hung up; {c['tokens_generated_for_them']} tokens generated for them of "
        f"{c['tokens_they_could_have_cost']} possible; no row running or queued after {c['seconds_until_idle']} s; "
        f"a request afterwards {st(c['normal_request_after'])}. Zero tokens: "
        + "; ".join(f"{k}: {st(v)}" for k, v in zero.items())
        + ".",
        "- (d) After the damage: " + "; ".join(f"{k}: {st(v)}" for k, v in d["after"].items()) + f"; a good file "
        f"written back {st(d['restored'])}, stale afterwards {d['stale_after_restore']}; /health without the key "
        f"shows {d['unauthorized_health_keys']}.",
        f"- (e) Slow bodies answered after {e['slow_seconds']} s; other requests meanwhile took at most "
        f"{e['others_max_s']} s; a client trickling its headers (a byte per 0.5 s): {e['slow_headers']['outcome']} "
        f"after {e['slow_headers']['held_s']} s.",
        f"- (f) {f['in_flight_at_signal']} of {f['requests']} requests in flight at SIGTERM "
        f"({f['rows_running_at_signal']} rows running); a request sent after the signal: "
        f"{st(f['request_after_signal'])}.",
        f"- Server log: {r['server_log']['tracebacks']} tracebacks ({exceptions}), "
        f"{r['server_log']['error_lines']} ERROR lines.",
    ]
    return "\n".join(lines) + "\n"


def environment(model_name: str, tiny: bool, quick: bool) -> dict:
    import fastapi
    import transformers
    import uvicorn

    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "model": model_name,
        "tiny": tiny,
        "quick": quick,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.2f}",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "fastapi": fastapi.__version__,
            "uvicorn": uvicorn.__version__,
            "httpx": httpx.__version__,
            "softprompt": sp.__version__,
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="base model: 'smollm2' (default) or a model directory")
    ap.add_argument("--tiny", action="store_true", help="--model is a tiny random model: results go to chaos-tiny.*")
    ap.add_argument("--quick", action="store_true", help="a smoke run: fewer and shorter requests")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the server")
    ap.add_argument("--data-dir", default=None, help="folder of the built-in tasks' data (default: ../shared/data)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for chaos.json/.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = sp.load_base(args.model)
    results = environment(base.name, args.tiny, args.quick)
    with tempfile.TemporaryDirectory() as tmp:
        store = make_store(base, Path(tmp) / "store", args.data_dir)
        made = add_chaos_tasks(base, store)
        del base  # the server loads its own copy
        gc.collect()
        results |= run(store, args.model, made, QUICK if args.quick else Sizes(), args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "chaos" + ("-tiny" if args.tiny else "") + ("-quick" if args.quick and not args.tiny else "")
    (out / f"{name}.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / f"{name}.md").write_text(markdown(results))
    for row in goals(results):
        print(" | ".join(map(str, row)))
    print(f"wrote {out / name}.json and {name}.md")


if __name__ == "__main__":
    main()
