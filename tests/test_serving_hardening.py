"""The server under hostile and excessive input: fuzzed requests from its OpenAPI schema (schemathesis) never get
a 5xx, overload is answered with 429/503, it binds to loopback by default, compares API keys in constant time,
and logs request bodies only when asked."""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging

import httpx
import pytest
import uvicorn
from helpers import KEY, LONG, Gate, Live, auth, make_prompt, registry, wait_for

from softprompt.commands import main
from softprompt.data import TaskSpec
from softprompt.multitask import MultiTask
from softprompt.serving import ServerConfig, create_app
from softprompt.store import Store


@pytest.fixture(scope="module")
def fuzz_store(llama, store, tmp_path_factory):
    """The shared store plus a task with a bare "{text}" template, whose empty input renders to no tokens."""
    root = Store(tmp_path_factory.mktemp("fuzz-store"))
    for name in store.names():
        root.path(name).write_bytes(store.path(name).read_bytes())
    root.save("bare", make_prompt(llama, TaskSpec(name="bare", template="{text}", target_column="y"), "soft", 2))
    return root


@pytest.fixture(scope="module")
def server(llama, fuzz_store):
    config = ServerConfig(max_tokens=8, max_request_bytes=8192, max_prompts=4, max_wait_ms=1)
    with Live(create_app(registry(llama, fuzz_store), fuzz_store, config, api_key=KEY)) as live:
        yield live


def test_fuzzed_requests_from_the_openapi_schema_never_get_a_5xx(server):
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error

    spec = httpx.get(server.url + "/openapi.json").json()
    requests = spec["components"]["schemas"]
    assert {"CompletionRequest", "ChatRequest", "ClassifyRequest"} <= set(requests)
    # `model` and `role` are any strings to the schema: name the tasks served and OpenAI's roles, or nearly every
    # request would stop at a 404 or a 400 before reaching the model
    tasks = [m["id"] for m in httpx.get(server.url + "/v1/models", headers=auth()).json()["data"]]
    for name in ("CompletionRequest", "ChatRequest", "ClassifyRequest"):
        requests[name]["properties"]["model"] = {"type": "string", "enum": tasks}
    requests["ChatMessage"]["properties"]["role"] = {"type": "string", "enum": ["system", "user", "assistant"]}
    schema = schemathesis.openapi.from_dict(spec)
    seen: dict[tuple[str, int], int] = {}
    for operation in (result.ok() for result in schema.get_all_operations()):
        # a GET without parameters has no invalid form
        for mode in (GenerationMode.POSITIVE,) + ((GenerationMode.NEGATIVE,) if operation.body else ()):
            # derandomized and bounded: the same examples on every run, seconds on the tiny model
            @settings(
                max_examples=25, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck)
            )
            @given(case=operation.as_strategy(generation_mode=mode, headers=auth()))
            def fuzz(case):
                response = case.call(base_url=server.url, timeout=60)
                key = (case.path, response.status_code)
                seen[key] = seen.get(key, 0) + 1
                case.validate_response(response, checks=[not_a_server_error])

            fuzz()
    assert not [k for k in seen if k[1] >= 500], seen
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/classify"):  # requests that ran, and refusals
        assert (path, 200) in seen and (path, 400) in seen, seen


@pytest.mark.parametrize(
    "path, body, status, message",
    [
        ("/v1/completions", {"model": "bare", "prompt": ""}, 400, "An input has no tokens"),
        ("/v1/classify", {"model": "sst2-soft", "input": LONG}, 400, "does not fit the"),
        ("/v1/completions", {"model": "e2e-soft", "prompt": LONG, "max_tokens": 2}, 400, "does not fit the"),
        (
            "/v1/chat/completions",
            {"model": "e2e-soft", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
            400,
            "Invalid request: messages.0.content",
        ),
        ("/v1/classify", {"model": "sst2-soft", "input": {"sentence": {"nested": [1]}}}, 400, "Invalid request: input"),
        ("/v1/completions", {"model": "e2e-soft", "prompt": "x", "max_tokens": 2, "top_k": 10**30}, 200, None),
        ("/v1/completions", {"model": "e2e-soft", "prompt": "x", "max_tokens": 2, "temperature": 1e-45}, 200, None),
    ],
)
def test_inputs_that_once_crashed_a_batch(server, path, body, status, message):
    r = httpx.post(server.url + path, json=body, headers=auth(), timeout=60)
    assert r.status_code == status, r.text
    if message:
        assert message in r.json()["error"]["message"]
        assert r.json()["error"]["code"] in ("invalid_input", "context_length_exceeded", "invalid_request")


def test_a_deeply_nested_body_is_a_400(server):
    r = httpx.post(server.url + "/v1/completions", content=b"[" * 4000 + b"]" * 4000, headers=auth())
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"]["message"]


def test_the_truncation_policy_applies_to_requests(llama, fuzz_store):
    mt = MultiTask(llama, truncate="left")
    mt.sync(fuzz_store)
    with Live(create_app(mt, fuzz_store, ServerConfig(max_tokens=8, max_request_bytes=8192))) as live:
        r = httpx.post(live.url + "/v1/classify", json={"model": "sst2-soft", "input": LONG}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] <= 512 - 3 - 1  # the context less the 3 virtual tokens and a class


def test_a_burst_beyond_the_queue_gets_429s_never_a_5xx(llama, store):
    mt = registry(llama, store)
    gate = Gate(mt)
    app = create_app(mt, store, ServerConfig(max_batch_size=4, max_queue=4, max_wait_ms=0, max_tokens=4))
    body = {"model": "e2e-soft", "prompt": "name[Fun]", "max_tokens": 2, "temperature": 0}
    with Live(app) as live, concurrent.futures.ThreadPoolExecutor(24) as pool:
        futures = [pool.submit(httpx.post, live.url + "/v1/completions", json=body, timeout=120) for _ in range(24)]
        wait_for(lambda: sum(f.done() for f in futures) >= 24 - 4 - 4)  # all but the batch and the queue answered
        gate.event.set()
        codes = sorted(f.result().status_code for f in futures)
        assert set(codes) == {200, 429} and codes.count(200) <= 8 and codes.count(200) >= 5, codes
        assert httpx.post(live.url + "/v1/completions", json=body, timeout=60).status_code == 200


def test_connections_beyond_the_limit_get_503(llama, store):
    mt = registry(llama, store)
    gate = Gate(mt)
    body = {"model": "e2e-soft", "prompt": "name[Fun]", "max_tokens": 2, "temperature": 0}
    app = create_app(mt, store, ServerConfig(max_wait_ms=0, max_batch_size=1))
    # uvicorn counts the connection asking too: two held requests and a third one reach the limit of 3
    with Live(app, limit_concurrency=3) as live, concurrent.futures.ThreadPoolExecutor(2) as pool:
        held = [pool.submit(httpx.post, live.url + "/v1/completions", json=body, timeout=120) for _ in range(2)]
        wait_for(lambda: app.state.batcher.running == 1 and app.state.batcher.queued == 1)
        r = httpx.get(live.url + "/health")
        assert r.status_code == 503
        gate.event.set()
        assert [f.result().status_code for f in held] == [200, 200]


def test_serve_binds_to_loopback_by_default_with_its_limits(store, model_dir, monkeypatch, capsys):

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    assert main(["serve", "--store", str(store.root), "--model", str(model_dir)]) == 0
    assert calls[-1]["host"] == "127.0.0.1" and calls[-1]["limit_concurrency"] == ServerConfig().max_connections
    assert "warning" not in capsys.readouterr().err
    assert (
        main(
            [
                "serve",
                "--store",
                str(store.root),
                "--model",
                str(model_dir),
                "--host",
                "0.0.0.0",
                "--max-connections",
                "7",
            ]
        )
        == 0
    )
    assert calls[-1]["host"] == "0.0.0.0" and calls[-1]["limit_concurrency"] == 7
    assert "without an API key" in capsys.readouterr().err


def test_api_keys_are_compared_in_constant_time(server, monkeypatch):
    import hmac

    compared = []
    real = hmac.compare_digest

    def recording(a, b):
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)
    for header, status in [
        (f"Bearer {KEY}", 200),
        ("Bearer t", 401),
        (f"Bearer {KEY[:-1]}", 401),
        ("Bearer " + "x" * 500, 401),
        (KEY, 401),
    ]:
        assert httpx.get(server.url + "/v1/models", headers={"Authorization": header}).status_code == status
    # digests of the same length, whatever the guess: neither the matching prefix nor the key's length shows
    assert len(compared) == 5 and all(len(a) == len(b) == 32 for a, b in compared)
    assert compared[0] == (hashlib.sha256(KEY.encode()).digest(),) * 2


def test_request_bodies_are_logged_only_when_asked(llama, store, caplog):
    secret = "name[Secret Restaurant 4711]"
    app = create_app(registry(llama, store), store, ServerConfig(log_bodies=True))
    with Live(app) as live, caplog.at_level(logging.INFO):
        r = httpx.post(live.url + "/v1/completions", json={"model": "e2e-soft", "prompt": secret, "max_tokens": 2})
        assert r.status_code == 200
        bad = httpx.post(live.url + "/v1/completions", json={"model": "e2e-soft", "prompt": secret, "n": 99})
        assert bad.status_code == 400
    assert sum("Secret Restaurant" in rec.getMessage() for rec in caplog.records) == 2
