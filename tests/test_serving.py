"""The server, live on 127.0.0.1 (random free port) with a tiny model: the official OpenAI client, errors and
limits, the bounded queue, hot reload of the store, and the dynamic batcher."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import signal
import time

import httpx
import pytest
import torch
from helpers import KEY, Gate, Live, auth, build_tiny, make_prompt, registry, serve_process, spec_like, wait_for

from softprompt.commands import main
from softprompt.example import Example
from softprompt.generate import stop_ids
from softprompt.serving import Batcher, Job, ServerConfig, TextStream, create_app
from softprompt.store import Store


@pytest.fixture(scope="module")
def live(llama, store):
    mt = registry(llama, store)
    with Live(
        create_app(mt, store, ServerConfig(max_tokens=64, max_request_bytes=4096, max_prompts=4), api_key=KEY)
    ) as server:
        server.mt = mt
        yield server


def test_the_openai_client_works_unchanged(live):
    import openai

    client = openai.OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0)
    assert sorted(m.id for m in client.models.list()) == ["e2e-prefix", "e2e-soft", "sst2-hard", "sst2-soft"]

    mr = "name[The Eagle], eatType[pub]"
    expected = live.mt.generate([("e2e-prefix", mr)], max_new_tokens=10)[0]
    out = client.completions.create(model="e2e-prefix", prompt=mr, max_tokens=10, temperature=0)
    assert out.choices[0].text == expected and out.model == "e2e-prefix"
    assert out.usage.completion_tokens == 10 or out.choices[0].finish_reason == "stop"
    stream = client.completions.create(model="e2e-prefix", prompt=mr, max_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == expected
    stop = expected[len(expected) // 2 :][:3]  # a stop string ends the text before it, as OpenAI's does
    cut = client.completions.create(model="e2e-prefix", prompt=mr, max_tokens=10, temperature=0, stop=[stop])
    assert cut.choices[0].text == expected[: expected.index(stop)] and cut.choices[0].finish_reason == "stop"

    expected_chat = live.mt.generate([("e2e-soft", mr)], max_new_tokens=8)[0].lstrip()
    chat = client.chat.completions.create(
        model="e2e-soft", messages=[{"role": "user", "content": mr}], max_tokens=8, temperature=0
    )
    assert chat.choices[0].message.content == expected_chat and chat.choices[0].message.role == "assistant"
    chunks = client.chat.completions.create(
        model="e2e-soft", messages=[{"role": "user", "content": mr}], max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected_chat

    sampled = client.completions.create(
        model="e2e-soft", prompt=[mr, "name[Fun]"], max_tokens=5, temperature=1.0, top_p=0.9, n=2
    )
    assert sorted(c.index for c in sampled.choices) == [0, 1, 2, 3]

    with pytest.raises(openai.NotFoundError, match=r"Unknown task 'nope'.*e2e-prefix"):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=live.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_classify_returns_label_and_probabilities(live):
    inputs = ["the film was great fun", {"sentence": "a boring plot"}]
    r = httpx.post(live.url + "/v1/classify", json={"model": "sst2-soft", "input": inputs}, headers=auth())
    assert r.status_code == 200, r.text
    expected = live.mt.classify([("sst2-soft", x) for x in inputs])
    for got, ref in zip(r.json()["data"], expected):
        assert got["label"] == ref.label and set(got["probs"]) == {"0", "1"}
        assert got["probs"] == pytest.approx(ref.probs, abs=1e-6)
    r = httpx.post(live.url + "/v1/classify", json={"model": "e2e-soft", "input": "x"}, headers=auth())
    assert r.status_code == 400 and "generation task" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    "path, body, status, message",
    [
        ("/v1/completions", b"{not json", 400, "not valid JSON"),
        ("/v1/completions", b"[1, 2]", 400, "Invalid request"),
        ("/v1/completions", json.dumps({"model": "e2e-soft"}), 400, "prompt"),
        ("/v1/completions", json.dumps({"model": "e2e-soft", "prompt": "x", "max_tokens": 65}), 400, "at most 64"),
        ("/v1/completions", json.dumps({"model": "e2e-soft", "prompt": "x", "n": 5}), 400, "allows 4"),
        ("/v1/completions", json.dumps({"model": "e2e-soft", "prompt": "x" * 5000}), 413, "larger than 4096"),
        ("/v1/completions", json.dumps({"model": "../e2e-soft", "prompt": "x"}), 404, "use one of"),
        ("/v1/completions", json.dumps({"model": "/etc/passwd", "prompt": "x"}), 404, "Unknown task"),
        ("/v1/completions", json.dumps({"model": "e2e-soft", "prompt": "x", "temperature": -1}), 400, "temperature"),
        ("/v1/completions", json.dumps({"model": "e2e-soft", "prompt": "x", "stop": list("abcde")}), 400, "at most 4"),
        (
            "/v1/chat/completions",
            json.dumps({"model": "e2e-soft", "messages": [{"role": "system", "content": "x"}]}),
            400,
            "no user message",
        ),
        ("/v1/classify", json.dumps({"model": "sst2-soft", "input": {"text": "x"}}), 400, "template field"),
        ("/v1/classify", json.dumps({"model": "sst2-soft", "input": ["x"] * 5}), 400, "1 to 4 inputs"),
    ],
)
def test_bad_requests_get_clear_errors(live, path, body, status, message):
    r = httpx.post(live.url + path, content=body, headers=auth() | {"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"]


@pytest.mark.parametrize(
    "body, code, message",
    [
        pytest.param({"input": ""}, "empty_input", "input is empty", id="empty-string"),
        pytest.param({"input": "  \n"}, "empty_input", "input is empty", id="blank-string"),
        pytest.param({"input": {"sentence": ""}}, "empty_input", "input is empty", id="empty-field"),
        pytest.param({"input": []}, "empty_input", "input is an empty list", id="empty-list"),
        pytest.param({"input": ["fine", ""]}, "empty_input", "input[1] is empty", id="empty-list-item"),
        pytest.param({"input": ["x"] * 5}, "too_many_inputs", "5 inputs; give 1 to 4 inputs", id="too-many"),
        pytest.param({"input": {"text": "x"}}, "invalid_input", "lacks the template field", id="missing-field"),
        pytest.param({}, "invalid_request", "Invalid request: input", id="no-input"),
        pytest.param({"input": {"sentence": [1]}}, "invalid_request", "Invalid request: input", id="nested"),
    ],
)
def test_classify_refuses_empty_and_malformed_inputs_naming_the_input_field(live, body, code, message):
    r = httpx.post(live.url + "/v1/classify", json={"model": "sst2-soft", **body}, headers=auth())
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["param"] == "input" and message in error["message"], error


def test_a_plain_string_for_a_two_field_task_is_told_the_task_fields(llama, store, sst2):
    mt = registry(llama, store)
    pairs = spec_like(sst2.spec, name="pairs", template="Question: {question}\nPassage: {passage}\nAnswer:")
    mt.add("pairs", make_prompt(llama, pairs, None))
    with Live(create_app(mt, api_key=KEY)) as server:
        r = httpx.post(server.url + "/v1/classify", json={"model": "pairs", "input": "one text"}, headers=auth())
        error = r.json()["error"]
        assert r.status_code == 400 and error["code"] == "invalid_input" and error["param"] == "input"
        assert "Task 'pairs' takes the fields ['question', 'passage']" in error["message"]
        assert '{"question": "...", "passage": "..."}' in error["message"] and "premise" not in error["message"]
        both = {"model": "pairs", "input": {"question": "is it good?", "passage": "a great film"}}
        assert httpx.post(server.url + "/v1/classify", json=both, headers=auth()).status_code == 200


def test_api_key_is_required_on_the_api_but_not_health(live):
    assert httpx.get(live.url + "/v1/models").status_code == 401
    assert httpx.get(live.url + "/v1/models", headers={"Authorization": "Bearer test-key-12"}).status_code == 401
    health = httpx.get(live.url + "/health")
    assert health.status_code == 200 and health.json()["tasks"] == 4 and "refused" not in health.json()
    assert httpx.get(live.url + "/health", headers=auth()).json()["refused"] == {}


def test_request_bodies_are_not_logged_unless_asked(live, caplog):
    secret = "name[Secret Restaurant 4711]"
    with caplog.at_level(logging.DEBUG):
        r = httpx.post(
            live.url + "/v1/completions", json={"model": "e2e-soft", "prompt": secret, "max_tokens": 2}, headers=auth()
        )
    assert r.status_code == 200
    assert any("e2e-soft" in rec.getMessage() for rec in caplog.records)  # the request is logged...
    assert not any("Secret Restaurant" in rec.getMessage() for rec in caplog.records)  # ...its body is not


def test_a_full_queue_answers_429_and_the_server_recovers(llama, store):
    mt = registry(llama, store)
    gate = Gate(mt)
    app = create_app(mt, store, ServerConfig(max_batch_size=1, max_queue=2, max_wait_ms=0))
    body = {"model": "e2e-soft", "prompt": "name[Fun]", "max_tokens": 3, "temperature": 0}
    with Live(app) as server, concurrent.futures.ThreadPoolExecutor(4) as pool:
        batcher = app.state.batcher
        first = pool.submit(httpx.post, server.url + "/v1/completions", json=body, timeout=60)
        wait_for(lambda: batcher.running == 1)
        queued = [pool.submit(httpx.post, server.url + "/v1/completions", json=body, timeout=60) for _ in range(2)]
        wait_for(lambda: batcher.queued == 2)
        r = httpx.post(server.url + "/v1/completions", json=body)
        assert r.status_code == 429 and r.headers["retry-after"] == "1" and "busy" in r.json()["error"]["message"]
        gate.event.set()
        results = [f.result() for f in [first, *queued]]
        assert [x.status_code for x in results] == [200, 200, 200]
        assert len({x.json()["choices"][0]["text"] for x in results}) == 1
        assert httpx.post(server.url + "/v1/completions", json=body).status_code == 200


def test_new_changed_and_removed_prompt_files_are_picked_up(llama, sst2, e2e, tmp_path):
    store = Store(tmp_path)
    store.save("a", make_prompt(llama, sst2.spec, "soft", 2))
    mt = registry(llama, store)
    app = create_app(mt, store, ServerConfig(reload_interval=0.05))
    with Live(app) as server:

        def tasks():
            return sorted(m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"])

        def classify(name):
            return httpx.post(server.url + "/v1/classify", json={"model": name, "input": "great"})

        store.save("b", make_prompt(llama, sst2.spec, "deep", 3))
        wait_for(lambda: tasks() == ["a", "b"])
        assert classify("b").status_code == 200

        store.save("a", make_prompt(llama, e2e.spec, "prefix", 2))  # a becomes a generation task
        wait_for(lambda: classify("a").status_code == 400)

        store.path("c").write_bytes(b"\x80\x04garbage")  # a bad file is refused; the others keep serving
        wait_for(lambda: "c" in httpx.get(server.url + "/health").json()["refused"])
        assert "pickle" in httpx.get(server.url + "/health").json()["refused"]["c"]
        r = classify("c")
        assert r.status_code == 404 and "refused" in r.json()["error"]["message"]
        assert classify("b").status_code == 200

        assert main(["store", "rm", "b", "--store", str(store.root)]) == 0
        wait_for(lambda: tasks() == ["a"])
        assert classify("b").status_code == 404


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_the_batcher_runs_concurrent_requests_of_different_tasks_as_one_batch(llama, store, batching):
    mt = registry(llama, store)
    reqs = [
        ("e2e-prefix", "name[The Eagle]"),
        ("e2e-soft", "name[Fun], food[italian]"),
        ("sst2-soft", "great"),
        ("sst2-hard", "boring"),
        ("e2e-soft", "name[X]"),
    ]
    events: list = []
    jobs = [
        Job(mt.get(t), mt.get(t).encode(v, 6), i, events.append, classify=t.startswith("sst2"), max_new_tokens=6)
        for i, (t, v) in enumerate(reqs)
    ]
    batcher = Batcher(mt, None, ServerConfig(max_batch_size=8, max_wait_ms=0, batching=batching))
    batcher.submit(jobs)  # queued before the worker starts: it must take them all at once
    batcher.start()
    wait_for(lambda: all(j.finished for j in jobs))
    batcher.stop()
    assert batcher.stats["batches"] == 1 and batcher.stats["rows"] == 5
    gen = [(t, v) for t, v in reqs if not t.startswith("sst2")]
    expected = mt.generate_ids(gen, max_new_tokens=6)
    got = {j.index: [v for i, kind, v in events if i == j.index and kind == "token"] for j in jobs if not j.classify}
    assert list(got.values()) == expected
    labels = {i: v.label for i, kind, v in events if kind == "result"}
    assert labels == {2: mt.classify([reqs[2]])[0].label, 3: mt.classify([reqs[3]])[0].label}


def test_continuous_batching_lets_a_request_join_and_finish_while_a_long_one_decodes(llama, store):
    mt = registry(llama, store)
    events: list = []
    entry = mt.get("e2e-prefix")
    long_job = Job(entry, entry.encode("name[The Eagle]", 60), 0, events.append, max_new_tokens=60)
    short_job = Job(mt.get("e2e-soft"), mt.get("e2e-soft").encode("name[X]", 3), 1, events.append, max_new_tokens=3)
    batcher = Batcher(mt, None, ServerConfig(max_wait_ms=0, batching="continuous"))
    batcher.eos = set()  # a tiny random model often picks EOS at once: keep both rows decoding
    batcher.submit([long_job])
    batcher.start()
    wait_for(lambda: long_job.generated >= 2)
    batcher.submit([short_job])
    wait_for(lambda: short_job.finished)
    assert not long_job.finished and long_job.generated < 60  # it joined the running batch and left it first
    wait_for(lambda: long_job.finished)
    batcher.stop()
    assert batcher.stats["batches"] == 2 and batcher.stats["largest_batch"] == 2
    tokens = {j: [v for i, kind, v in events if i == j and kind == "token"] for j in (0, 1)}
    assert [len(tokens[0]), len(tokens[1])] == [60, 3]
    eos = stop_ids(llama)
    for j, (task, text, n) in enumerate([("e2e-prefix", "name[The Eagle]", 60), ("e2e-soft", "name[X]", 3)]):
        alone = mt.generate_ids([(task, text)], max_new_tokens=n)[0]  # up to its first EOS
        assert tokens[j][: len(alone)] == alone and (len(alone) == n or tokens[j][len(alone)] in eos)


def test_newcomers_join_a_running_batch_within_the_prefill_budget(llama, store):
    mt = registry(llama, store)
    entry = mt.get("e2e-soft")
    events: list = []
    first = Job(entry, entry.encode("name[The Eagle]", 40), 0, events.append, max_new_tokens=40)
    rest = [Job(entry, entry.encode(f"name[X{i}]", 4), 1 + i, events.append, max_new_tokens=4) for i in range(3)]
    batcher = Batcher(mt, None, ServerConfig(max_wait_ms=0, max_prefill_tokens=1))
    batcher.eos = set()
    batcher.submit([first])
    batcher.start()
    wait_for(lambda: first.generated >= 1)
    batcher.submit(rest)  # one prefill each: over the budget, only one request joins per step
    wait_for(lambda: first.finished and all(j.finished for j in rest))
    batcher.stop()
    assert batcher.stats["batches"] == 4 and batcher.stats["rows"] == 4
    assert all(sum(1 for i, kind, _ in events if i == j.index and kind == "token") == 4 for j in rest)


def test_a_classification_never_waits_for_a_decode_slot_it_does_not_use(llama, store):
    """A full decode batch and generation requests queued ahead of it: the classification is scored at the next
    step (its label as alone), and the queued generations keep their order and join when a slot frees."""
    mt = registry(llama, store)
    events: list = []
    gen = mt.get("e2e-soft")
    running = Job(gen, gen.encode("name[The Eagle]", 30), 0, events.append, max_new_tokens=30)
    queued = [Job(gen, gen.encode(f"name[X{i}]", 2), 1 + i, events.append, max_new_tokens=2) for i in range(2)]
    sst2 = mt.get("sst2-soft")
    scoring = Job(sst2, sst2.encode("a great film", None), 3, events.append, classify=True)
    batcher = Batcher(mt, None, ServerConfig(max_batch_size=1, max_wait_ms=0, batching="continuous"))
    batcher.eos = set()
    batcher.submit([running])
    batcher.start()
    wait_for(lambda: running.generated >= 1)
    batcher.submit([*queued, scoring])  # behind two generations that wait for the only slot
    wait_for(lambda: scoring.finished)
    assert not running.finished and not any(j.generated for j in queued)
    wait_for(lambda: all(j.finished for j in queued))
    batcher.stop()
    assert [i for i, kind, _ in events if kind == "done"] == [0, 1, 2]
    (label,) = [v.label for i, kind, v in events if kind == "result"]
    assert label == mt.classify([("sst2-soft", "a great film")])[0].label


def test_text_stream_holds_back_partial_characters_and_stop_strings(tokenizer):
    ids = tokenizer("the film was great fun and the plot", add_special_tokens=False)["input_ids"]
    s = TextStream(tokenizer, stops=["great f"])
    text = "".join(s.push(t) for t in ids) + s.flush()
    assert text == "the film was " and s.stopped
    s = TextStream(tokenizer, stops=[])
    assert "".join(s.push(t) for t in ids) + s.flush() == tokenizer.decode(ids)
    emoji = tokenizer("é☃", add_special_tokens=False)["input_ids"]  # byte-level: characters split across tokens
    s = TextStream(tokenizer, stops=[])
    parts = [s.push(t) for t in emoji]
    assert "\ufffd" not in "".join(parts) and "".join(parts) + s.flush() == "é☃"


def test_store_commands(store, model_dir, tokenizer, sst2, capsys, tmp_path):
    assert main(["store", "list", "--store", str(store.root), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"]: (r["method"], r["virtual_tokens"], r["kind"]) for r in rows} == {
        "e2e-prefix": ("prefix", 5, "generation"),
        "e2e-soft": ("soft", 4, "generation"),
        "sst2-hard": ("hard", 0, "classification"),
        "sst2-soft": ("soft", 3, "classification"),
    }
    assert main(["store", "show", "sst2-soft", "--store", str(store.root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters_saved"] == 3 * 64
    copy = Store(tmp_path)
    copy.path("x").parent.mkdir(exist_ok=True)
    copy.path("x").write_bytes(store.path("sst2-soft").read_bytes())
    copy.path("broken").write_bytes(b"junk")
    assert main(["store", "list", "--store", str(copy.root)]) == 0
    out = capsys.readouterr().out
    assert "refused" in out and "truncated" in out
    copy.save("gpt2", make_prompt(build_tiny("gpt2", tokenizer), sst2.spec, "soft", 2))
    assert main(["store", "list", "--store", str(copy.root), "--verify", "--model", str(model_dir), "--json"]) == 0
    status = {r["name"]: r.get("reason", r["status"]) for r in json.loads(capsys.readouterr().out)}
    assert status["x"] == "ok" and "architecture" in status["gpt2"] and "truncated" in status["broken"]
    copy.remove("gpt2")
    assert main(["store", "rm", "x", "--store", str(copy.root)]) == 0 and copy.names() == ["broken"]
    capsys.readouterr()
    assert main(["store", "rm", "x", "--store", str(copy.root)]) == 2
    assert "Unknown task 'x'" in capsys.readouterr().err
    assert main(["store", "show", "../etc", "--store", str(copy.root)]) == 2
    assert main(["serve", "--store", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_request_that_stops_listening_stops_its_rows(llama, store):
    mt = registry(llama, store)
    entry = mt.get("e2e-soft")
    jobs: list[Job] = []

    def hang_up(event):  # a client that goes away after its first token
        jobs[event[0]].finished = True

    jobs += [Job(entry, entry.encode("name[Fun]", 40), i, hang_up, max_new_tokens=40) for i in range(2)]
    batcher = Batcher(mt, None, ServerConfig(max_wait_ms=0))
    batcher.submit(jobs)
    batcher.start()
    wait_for(lambda: batcher.stats["batches"] == 1 and batcher.running == 0)
    batcher.stop()
    assert batcher.stats["tokens"] == 2  # one step, then the decode loop ended


def test_softprompt_serve_command_end_to_end(store, model_dir):
    import openai

    proc, url = serve_process(store.root, model_dir, "--api-key-env", "SERVE_KEY", env={"SERVE_KEY": KEY})
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        assert len(client.models.list().data) == 4
        assert client.completions.create(model="e2e-soft", prompt="name[Fun]", max_tokens=3).choices[0].text
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    assert "serving 4 task(s)" in proc.stderr.read()


# --- logprobs and echo -----------------------------------------------------------------------------------------------

MR = "name[The Eagle], eatType[pub]"


def completion(url: str, path: str = "/v1/completions", **body) -> dict:
    r = httpx.post(url + path, json=body, headers=auth(), timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def streamed(url: str, path: str = "/v1/completions", **body) -> list[dict]:
    """The chunks of a streamed request, without the [DONE] line."""
    r = httpx.post(url + path, json=body | {"stream": True}, headers=auth(), timeout=60)
    assert r.status_code == 200, r.text
    lines = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def joined(chunks: list[dict]) -> dict:
    """The completions logprobs of a stream's chunks, each column concatenated."""
    parts = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
    return {key: [v for p in parts for v in p[key]] for key in parts[0]}


def forward_logprobs(mt, task: str, prompt: str, new: list[int]) -> torch.Tensor:
    """(N, V) log-softmax predicting each new token, from one uncached forward of the prompt and all of them."""
    _, x = mt.encode(task, prompt)
    logits, _, _ = mt.base.family.target_logits([x.with_target(new)])
    return logits[0].float().log_softmax(-1)


def test_completions_logprobs_are_those_of_an_uncached_forward_and_stream_alike(live):
    body = {"model": "e2e-prefix", "prompt": MR, "max_tokens": 8, "temperature": 0, "logprobs": 3}
    choice = completion(live.url, **body)["choices"][0]
    lp = choice["logprobs"]
    new = live.mt.generate_ids([("e2e-prefix", MR)], max_new_tokens=8)[0]
    ref = forward_logprobs(live.mt, "e2e-prefix", MR, new)
    assert len(lp["tokens"]) == len(new) and "".join(lp["tokens"]) == choice["text"]
    assert lp["token_logprobs"] == pytest.approx(ref[torch.arange(len(new)), new].tolist(), abs=1e-4)
    for token, logprob, top, row in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], ref):
        values = list(top.values())
        assert values == sorted(values, reverse=True) and next(iter(top)) == token  # greedy: the likeliest
        assert top[token] == logprob and values == pytest.approx(row.topk(len(values)).values.tolist(), abs=1e-4)
    assert lp["text_offset"] == [len("".join(lp["tokens"][:j])) for j in range(len(new))]
    chunks = streamed(live.url, **body)
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    assert joined(chunks) == lp


def test_echo_starts_with_the_prompt_and_scores_its_tokens(live):
    body = {"model": "e2e-soft", "prompt": MR, "max_tokens": 4, "temperature": 0}
    plain = completion(live.url, **body | {"logprobs": 2})["choices"][0]
    _, x = live.mt.encode("e2e-soft", MR)
    prompt = live.mt.base.tokenizer.decode(x.source, skip_special_tokens=True)  # the template filled: as read
    assert MR in prompt
    assert completion(live.url, **body | {"echo": True})["choices"][0]["text"] == prompt + plain["text"]
    echoed = completion(live.url, **body | {"echo": True, "logprobs": 2})["choices"][0]
    assert echoed["text"] == prompt + plain["text"]
    lp, n = echoed["logprobs"], len(x.source)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None and len(lp["tokens"]) == n + 4
    family = live.mt.base.family
    for j in range(1, n):  # the next-token prediction of each prefix of the prompt, under the task's prompt
        _, logits = family.start_decoding([Example(x.source[:j], j, [], x.injection)], use_cache=False)
        assert lp["token_logprobs"][j] == pytest.approx(float(logits[0].float().log_softmax(-1)[x.source[j]]), abs=1e-4)
    assert {k: v[n:] for k, v in lp.items() if k != "text_offset"} == {
        k: v for k, v in plain["logprobs"].items() if k != "text_offset"
    }
    assert lp["text_offset"][n:] == [len(prompt) + o for o in plain["logprobs"]["text_offset"]]
    chunks = streamed(live.url, **body | {"echo": True, "logprobs": 2})
    assert chunks[0]["choices"][0]["text"] == prompt
    assert "".join(c["choices"][0]["text"] for c in chunks) == echoed["text"] and joined(chunks) == lp


def test_logprobs_end_where_a_stop_string_ends_the_text(live, tokenizer):
    from softprompt.serving.batcher import Scored
    from softprompt.serving.schemas import CompletionRequest
    from softprompt.serving.streaming import Completion

    ids = tokenizer("the film was great fun and the plot", add_special_tokens=False)["input_ids"]
    entry = live.mt.get("e2e-soft")
    _, example = live.mt.encode("e2e-soft", "x")

    async def run(stop: str, stream: bool) -> tuple[str, dict]:
        queue: asyncio.Queue = asyncio.Queue()
        job = Job(entry, example, 0, queue.put_nowait, logprobs=1)
        for j, t in enumerate(ids):
            queue.put_nowait((0, "scored", Scored(t, -1.0 - j, [(t, -1.0 - j)])))
        queue.put_nowait((0, "done", "length"))
        body = CompletionRequest(model="e2e-soft", prompt="x", stop=stop, stream=stream)
        done = Completion(entry, [job], queue, tokenizer, body, False, time.monotonic() + 30)
        if not stream:
            choice = (await done.response())["choices"][0]
            return choice["text"], choice["logprobs"]
        chunks = [json.loads(e[6:]) async for e in done.sse() if e.startswith("data: {")]
        return "".join(c["choices"][0]["text"] for c in chunks), joined(chunks)

    full = tokenizer.decode(ids)
    for stop, text in [("great f", "the film was "), (" g", "the film was"), ("zzz", full)]:
        # the tokens that show some text: those that start before the text ends
        kept = sum(len(tokenizer.decode(ids[:j])) < len(text) for j in range(len(ids)))
        for stream in (False, True):
            got, lp = asyncio.run(run(stop, stream))
            assert got == text and lp["token_logprobs"] == [-1.0 - j for j in range(kept)], (stop, stream, lp)
            assert "".join(lp["tokens"]).startswith(text) and lp["text_offset"][-1] < len(text)
    assert kept == len(ids) and asyncio.run(run(" g", False))[1]["tokens"][-1] == " was"


def test_chat_logprobs_come_in_openais_shape(live):
    import openai

    client = openai.OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0)
    ask = {"model": "e2e-soft", "messages": [{"role": "user", "content": MR}], "max_tokens": 5, "temperature": 0}
    out = client.chat.completions.create(**ask, logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for t in content:
        assert t.bytes == list(t.token.encode()) and len(t.top_logprobs) == 2
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == t.logprob  # greedy
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
    # the same rows as a completion of the same prompt: the same log-probabilities
    same = completion(live.url, model="e2e-soft", prompt=MR, max_tokens=5, temperature=0, logprobs=2)
    assert [t.logprob for t in content] == same["choices"][0]["logprobs"]["token_logprobs"]
    chunks = client.chat.completions.create(**ask, logprobs=True, top_logprobs=2, stream=True)
    streamed_content = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert streamed_content == content
    bare = client.chat.completions.create(**ask, logprobs=True)
    assert all(t.top_logprobs == [] for t in bare.choices[0].logprobs.content)
    assert client.chat.completions.create(**ask).choices[0].logprobs is None


@pytest.mark.parametrize(
    "path, given, param",
    [
        ("/v1/completions", {"logprobs": 6}, "logprobs"),
        ("/v1/completions", {"logprobs": -1}, "logprobs"),
        ("/v1/completions", {"logprobs": True}, "logprobs"),  # chat's form: refused, not read as 1
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": "yes please"}, "logprobs"),
        ("/v1/chat/completions", {"echo": True}, "echo"),  # no such thing in chat
    ],
)
def test_logprobs_out_of_range_are_refused_naming_the_parameter(live, path, given, param):
    ask = {"prompt": "x"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "x"}]}
    r = httpx.post(live.url + path, json={"model": "e2e-soft", "max_tokens": 2} | ask | given, headers=auth())
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and param in r.json()["error"]["message"]


def test_echo_with_logprobs_is_refused_where_the_prompt_has_none(tokenizer, e2e):
    from softprompt.multitask import MultiTask

    t5 = build_tiny("t5", tokenizer)
    mt = MultiTask(t5)
    mt.add("gen", make_prompt(t5, e2e.spec, None))
    with Live(create_app(mt, config=ServerConfig(max_tokens=4))) as server:
        body = {"model": "gen", "prompt": "name[Fun]", "max_tokens": 2, "temperature": 0}
        r = httpx.post(server.url + "/v1/completions", json=body | {"echo": True, "logprobs": 1}, timeout=60)
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == "echo" and "encoder" in error["message"], r.text
        both = [completion(server.url, **body | extra)["choices"][0] for extra in ({"echo": True}, {"logprobs": 1})]
        assert both[0]["text"].startswith("Table: name[Fun]") and len(both[1]["logprobs"]["tokens"]) >= 1
