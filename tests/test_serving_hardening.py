"""The server under hostile and excessive input: fuzzed requests from its OpenAPI schema (schemathesis) never get
a 5xx, overload is answered with 429/503, it binds to loopback by default, compares API keys in constant time,
and logs request bodies only when asked."""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import signal
import socket
import time

import httpx
import pytest
import uvicorn
from helpers import KEY, LONG, Gate, Live, auth, make_prompt, registry, serve_process, wait_for

from softprompt.commands import main
from softprompt.data import TaskSpec
from softprompt.generate import Sampling
from softprompt.multitask import MultiTask
from softprompt.serving import Batcher, Job, ServerConfig, TextStream, create_app
from softprompt.store import Store

JSON = {"Content-Type": "application/json"}


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
    r = httpx.post(server.url + "/v1/completions", content=b"[" * 4000 + b"]" * 4000, headers=auth() | JSON)
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


# --- one bad request must never take down the server ----------------------------------------------------------------


def test_browser_requests_need_json_an_allowed_host_and_get_no_cors_by_default(server):
    body = '{"model": "e2e-soft", "prompt": "name[Fun]", "max_tokens": 2}'
    url = server.url + "/v1/completions"
    # a page on evil.example posting text/plain (no CORS preflight) to a loopback server, once DNS-rebound
    r = httpx.post(url, content=body, headers=auth() | {"Content-Type": "text/plain", "Origin": "http://evil.example"})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", r.text
    assert httpx.post(url, content=body, headers=auth()).status_code == 415  # no Content-Type at all
    for host in ("evil.example:8000", "evil.example", "127.0.0.1.evil.example"):
        r = httpx.post(url, content=body, headers=auth() | JSON | {"Host": host})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host", (host, r.text)
        assert httpx.get(server.url + "/health", headers={"Host": host}).status_code == 400
    for host in ("localhost:1234", "127.0.0.1", "[::1]:80"):
        assert httpx.get(server.url + "/health", headers={"Host": host}).status_code == 200, host
    ok = httpx.post(url, content=body, headers=auth() | {"Content-Type": "application/json; charset=utf-8"})
    assert ok.status_code == 200 and not any(k.startswith("access-control") for k in ok.headers), ok.headers
    pre = httpx.options(url, headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in pre.headers


def test_allowed_hosts_and_cors_origins_are_opt_in(llama, store):
    app = create_app(registry(llama, store), store, allowed_hosts=["api.example"], cors_origins=["https://app.example"])
    with Live(app) as live:
        assert httpx.get(live.url + "/health", headers={"Host": "api.example:443"}).status_code == 200
        assert httpx.get(live.url + "/health", headers={"Host": "other.example"}).status_code == 400
        pre = httpx.options(
            live.url + "/v1/completions",
            headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
        )
        assert pre.headers["access-control-allow-origin"] == "https://app.example"
        other = httpx.get(live.url + "/v1/models", headers={"Origin": "http://evil.example"})
        assert other.status_code == 200 and "access-control-allow-origin" not in other.headers
    with Live(create_app(registry(llama, store), store, allowed_hosts=["*"])) as live:
        assert httpx.get(live.url + "/health", headers={"Host": "anything.example"}).status_code == 200


def test_serve_passes_hosts_origins_and_the_drain_time(store, model_dir, monkeypatch):
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append((app, kw)))
    argv = ["serve", "--store", str(store.root), "--model", str(model_dir), "--host", "10.1.2.3"]
    more = ["--allowed-host", "api.example", "--cors-origin", "https://app.example", "--shutdown-timeout", "5"]
    assert main(argv + more) == 0
    app, kw = calls[-1]
    assert kw["timeout_graceful_shutdown"] == 5
    check = next(m for m in app.user_middleware if m.cls.__name__ == "HostCheck")
    assert {"10.1.2.3", "api.example"} <= set(check.kwargs["allowed"])
    assert any(m.cls.__name__ == "CORSMiddleware" for m in app.user_middleware)


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--max-wait-ms", "inf", "max_wait_ms must be a finite number from 0 up to 60000, got inf"),
        ("--max-wait-ms", "nan", "max_wait_ms must be a finite number from 0 up to 60000, got nan"),
        ("--max-wait-ms", "1e308", "max_wait_ms must be a finite number from 0 up to 60000, got 1e+308"),
        ("--reload-interval", "inf", "reload_interval must be a finite number above 0 up to 3600, got inf"),
        ("--request-timeout", "0", "request_timeout must be a finite number above 0"),
    ],
)
def test_durations_that_would_kill_the_worker_are_refused(store, model_dir, capsys, flag, value, message):
    assert main(["serve", "--store", str(store.root), "--model", str(model_dir), flag, value]) == 2
    err = capsys.readouterr().err
    assert message in err and f"pass {flag} with a value" in err


def test_stop_strings_are_bounded_and_the_longest_allowed_keep_the_server_responsive(server):
    url = server.url + "/v1/completions"
    base = {"model": "e2e-soft", "prompt": "name[Fun]", "max_tokens": 8, "temperature": 0}
    r = httpx.post(url, json=base | {"stop": ["x" * 257]}, headers=auth())
    assert r.status_code == 400 and "the most is 256" in r.json()["error"]["message"], r.text
    assert r.json()["error"]["param"] == "stop"
    # the most allowed, never matching but sharing a prefix with everything generated: the worst case for matching
    stops = [c * 256 for c in "ae o"]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [
            pool.submit(httpx.post, url, json=base | {"stop": stops}, headers=auth(), timeout=60) for _ in range(3)
        ]
        slowest = 0.0
        while not all(f.done() for f in futures):
            t0 = time.perf_counter()
            assert httpx.get(server.url + "/health", timeout=10).status_code == 200
            slowest = max(slowest, time.perf_counter() - t0)
        assert all(f.result().status_code == 200 for f in futures)
    assert slowest < 1.0, slowest


def test_text_stream_work_per_token_is_bounded_by_the_stops(tokenizer):
    ids = tokenizer("aaaa " * 400, add_special_tokens=False)["input_ids"]
    # four stops of the most allowed length, each a near miss of the text all along
    stream = TextStream(tokenizer, stops=["a" * 255 + "b", "aaaa " * 51 + "z", " " * 256, "a" * 256])
    t0 = time.perf_counter()
    text = "".join(stream.push(t) for t in ids) + stream.flush()
    assert time.perf_counter() - t0 < 2.0
    assert not stream.stopped and text == tokenizer.decode(ids)
    stream = TextStream(tokenizer, stops=["maa", "aa aaaa a"])
    assert "".join(stream.push(t) for t in ids) == "aa" and stream.stopped  # the text before the first stop


def test_a_row_that_fails_fails_alone(llama, store, e2e):
    mt = registry(llama, store)
    poisoned = mt.add("poisoned", make_prompt(llama, e2e.spec, "soft", 4, seed=3))
    for t in mt.injection(poisoned).tensors().values():  # the cached, compiled prompt every row runs with
        t.fill_(float("nan"))  # as a file with NaN would be, were the store not to refuse it
    events: list = []
    sampled, greedy = Sampling(temperature=1.0), Sampling()
    # (task, sampling, logprobs, echo): the poisoned prompt sampled and greedy, beside rows that ask for log-probs
    rows = [
        ("e2e-soft", sampled, None, False),
        ("poisoned", sampled, None, False),
        ("e2e-prefix", greedy, None, False),
        ("poisoned", greedy, None, False),
        ("e2e-prefix", greedy, 2, True),
        ("poisoned", greedy, 2, True),
    ]
    jobs = [
        Job(mt.get(t), x, i, events.append, max_new_tokens=4, sampling=s, logprobs=k, echo=e)
        for i, (t, s, k, e) in enumerate(rows)
        for x in [mt.get(t).encode("name[Fun]", 4)]
    ]
    sst2 = mt.get("sst2-soft")
    jobs.append(Job(sst2, sst2.encode("great", None), len(jobs), events.append, classify=True))
    batcher = Batcher(mt, None, ServerConfig(max_batch_size=8, max_wait_ms=0))
    batcher.submit(jobs)  # queued before the worker starts: one mixed batch
    batcher.start()
    wait_for(lambda: all(j.finished for j in jobs))
    batcher.stop()
    ends = {i: (kind, v) for i, kind, v in events if kind in ("done", "result", "error")}
    assert len(ends) == len(jobs) == len([e for e in events if e[1] in ("done", "result", "error")])  # one end each
    assert ends[0][0] == ends[2][0] == ends[4][0] == "done" and ends[6][0] == "result"
    for poisoned in (1, 3, 5):  # sampled or greedy (whose argmax would take NaN), each fails alone
        kind, error = ends[poisoned]
        assert kind == "error" and error.code == "non_finite_scores" and error.status == 500, ends[poisoned]
        assert [e[1] for e in events if e[0] == poisoned] == ["error"]
    expected = mt.generate_ids([("e2e-prefix", "name[Fun]")], max_new_tokens=4)[0]
    assert [v for i, kind, v in events if i == 2 and kind == "token"] == expected
    scored = [(kind, v) for i, kind, v in events if i == 4]
    assert scored[0][0] == "prompt" and len(scored[0][1]) == len(jobs[4].example.source)
    assert [v.token for kind, v in scored if kind == "scored"] == expected


def test_a_decode_of_zero_steps_still_ends_its_request(llama, store):
    mt = registry(llama, store)
    entry = mt.get("e2e-soft")
    events: list = []
    job = Job(entry, entry.encode("name[Fun]", 1), 0, events.append, max_new_tokens=0)
    batcher = Batcher(mt, None, ServerConfig(max_wait_ms=0))
    batcher.submit([job])
    batcher.start()
    wait_for(lambda: job.finished)
    batcher.stop()
    assert events == [(0, "done", "length")]


def test_requests_time_out_and_are_dropped_when_their_client_goes(llama, store):
    mt = registry(llama, store)
    gate = Gate(mt)  # the worker holds the first batch: every later request waits in the queue
    app = create_app(mt, store, ServerConfig(max_batch_size=1, max_wait_ms=0, request_timeout=3, body_timeout=0.5))
    body = {"model": "e2e-soft", "prompt": "name[Fun]", "max_tokens": 2}
    with Live(app) as live:
        batcher = app.state.batcher
        t0 = time.perf_counter()
        r = httpx.post(live.url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout", r.text
        assert 2.5 < time.perf_counter() - t0 < 10
        stream = httpx.post(live.url + "/v1/completions", json=body | {"stream": True}, timeout=30)
        assert stream.status_code == 200 and "request_timeout" in stream.text
        # a client that hangs up while its request waits: its row is released at once, long before the deadline
        t0 = time.perf_counter()
        with pytest.raises(httpx.TimeoutException):
            httpx.post(live.url + "/v1/completions", json=body, timeout=0.3)
        wait_for(lambda: batcher.queued == 2 and all(j.finished for j in batcher.pending))
        assert time.perf_counter() - t0 < 2.5
        # a body sent too slowly: 408, the connection is not held
        with socket.create_connection(("127.0.0.1", int(live.url.rsplit(":", 1)[1]))) as raw:
            raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n")
            raw.sendall(b"Content-Length: 100\r\n\r\n{")
            raw.settimeout(10)
            assert b" 408 " in raw.recv(1000).split(b"\r\n")[0]
        gate.event.set()
        assert httpx.post(live.url + "/v1/completions", json=body, timeout=30).status_code == 200


@pytest.mark.parametrize(
    "field, value",
    [
        ("top_logprobs", 2),  # chat's; completions take `logprobs: k`
        ("presence_penalty", 0.5),
        ("frequency_penalty", -1),
        ("logit_bias", {"50": 100}),
        ("best_of", 3),
        ("suffix", " the end"),
        ("seed", 7),
        ("tools", [{"type": "function", "function": {"name": "f"}}]),
    ],
)
def test_openai_parameters_that_would_be_ignored_are_refused(server, field, value):
    body = {"model": "e2e-soft", "prompt": "name[Fun]", "max_tokens": 2, field: value}
    r = httpx.post(server.url + "/v1/completions", json=body, headers=auth())
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field and error["code"] == "unsupported_parameter"
    assert f"{field} is not supported by this server" in error["message"]


def test_openai_parameters_at_their_neutral_values_are_accepted(server):
    neutral = {
        "logprobs": None,
        "echo": False,
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "logit_bias": {},
        "best_of": 1,
        "suffix": None,
        "seed": None,
        "user": "someone",
        "stream_options": None,
    }
    body = {"model": "e2e-soft", "prompt": "name[Fun]", "max_tokens": 2} | neutral
    assert httpx.post(server.url + "/v1/completions", json=body, headers=auth()).status_code == 200
    chat = {"model": "e2e-soft", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "logprobs": False}
    assert httpx.post(server.url + "/v1/chat/completions", json=chat, headers=auth()).status_code == 200


@pytest.mark.parametrize(
    "raw, message",
    [
        (b'{"model": "e2e-soft", "prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", "over 4,300 digits"),
        (b'{"model": "e2e-soft", "prompt": "\\ud800"}', "lone surrogate"),
        (b'{"model": "e2e-soft", "prompt": ["ok", "a\\udfffb"]}', "lone surrogate"),
    ],
)
def test_bodies_python_can_parse_but_not_use_are_a_400(server, raw, message):
    r = httpx.post(server.url + "/v1/completions", content=raw, headers=auth() | JSON)
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


def test_errors_do_not_show_server_paths(llama, tmp_path):
    root = Store(tmp_path / "secret-dir")
    root.root.mkdir()
    root.path("broken").write_bytes(b"junk")
    mt = MultiTask(llama)
    mt.sync(root)
    assert "broken" in mt.refused
    with Live(create_app(mt, root)) as live:
        r = httpx.post(live.url + "/v1/completions", json={"model": "broken", "prompt": "x"})
        assert r.status_code == 404 and "refused" in r.json()["error"]["message"]
        health = httpx.get(live.url + "/health").text
    assert "secret-dir" not in r.text and "secret-dir" not in health, (r.text, health)


def test_sigterm_drains_and_exits(store, model_dir):
    proc, url = serve_process(store.root, model_dir, "--shutdown-timeout", "2")
    try:
        # a stream left open by its client: uvicorn would wait for it forever without a drain limit
        client = httpx.Client(timeout=60)
        body = {"model": "e2e-soft", "prompt": "name[Fun]", "max_tokens": 2, "stream": True}
        with client.stream("POST", url + "/v1/completions", json=body) as held:
            assert held.status_code == 200
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            # uvicorn shuts down, then re-raises the signal: the exit status says SIGTERM ended it
            assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        assert time.monotonic() - t0 < 20
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
