"""The server under chaos (issue 20): `benchmarks/chaos.py`'s scenarios, quick, on the tiny random Llama served by
`softprompt serve` in a subprocess. One run of them all (one server, SIGTERM last); each test checks a property of
its results. Timings are the benchmark's to report: here only that nothing hangs and every answer is the right one.
"""

from __future__ import annotations

import importlib.util
import shutil
import signal
import sys
from pathlib import Path

import pytest

from softprompt.store import Store

CHAOS = Path(__file__).resolve().parents[1] / "benchmarks" / "chaos.py"


def _load_chaos():
    """benchmarks/chaos.py as a module (benchmarks/ is no package)."""
    spec = importlib.util.spec_from_file_location("benchmarks_chaos", CHAOS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


chaos = _load_chaos()


@pytest.fixture(scope="module")
def results(llama, store, model_dir, tmp_path_factory):
    """The chaos run over a copy of the shared store (its tasks are the benchmark's good tasks) plus the chaos tasks."""
    root = Store(tmp_path_factory.mktemp("chaos-store"))
    for name in store.names():
        shutil.copyfile(store.path(name), root.path(name))
    assert set(root.names()) == {name for name, *_ in chaos.GOOD_TASKS}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        made = chaos.add_chaos_tasks(llama, root)
        return chaos.run(root, model_dir, made, chaos.QUICK, reload_interval=0.25)  # shorter waits for the rescans


def test_the_other_rows_of_a_batch_with_a_poisoned_row_all_succeed(results):
    a = results["poisoned_batch"]
    # scaled embeddings are normalized away by the first RMSNorm; keys/values near float32's largest overflow
    assert a["poison"] == "kv = +-3e38", a["poisons_tried"]
    assert a["good_ok"] == a["good_total"] == chaos.QUICK.good_rows, a["good_failures"]
    assert a["largest_batch"] > 1 and a["batches"] < a["rows"]  # the burst shared batches
    sampled = a["poisoned"]["overflow_sampled"]
    assert sampled["status"] == 500 and sampled["code"] == "non_finite_scores", sampled
    assert "not finite" in sampled["message"] and "poison-gen" in sampled["message"]
    for name in ("overflow_greedy", "overflow_classify"):
        assert a["poisoned"][name]["status"] == 500, a["poisoned"]  # an error, never garbage or a hang
    assert a["poisoned"]["nan_file_first_use"]["status"] in (404, 500), a["poisoned"]  # refused when first read
    # the NaN file was indexed from its header and refused on its first use: later requests are told why
    later = a["nan_file_afterwards"]
    assert later["status"] == 404 and "refused" in later["message"] and "NaN" in later["message"], later
    assert "NaN" in a["nan_file_refused_in_health"]


def test_health_answers_every_poll_during_the_stop_string_attack(results):
    b = results["stop_attack"]
    assert b["health_polls"] >= 10 and b["health_failed"] == 0, b["health_failures"]
    assert b["attack_ok"] == b["attack_requests"] == chaos.QUICK.attackers * chaos.QUICK.attack_requests
    assert b["overlong_stop_statuses"] == [400, 400, 400]
    assert b["overlong_stop_codes"] == ["stop_too_long", "stop_too_long", "too_many_stops"]


def test_no_request_hangs_after_clients_disconnect_or_ask_for_zero_tokens(results):
    c = results["disconnects"]
    assert c["hang_up_errors"] == [] and c["streams_started"] == 2 * chaos.QUICK.disconnects
    assert c["hung"] == 0 and c["seconds_until_idle"] is not None
    assert c["rows_left_running"] == c["rows_left_queued"] == 0
    assert c["tokens_generated_for_them"] < c["tokens_they_could_have_cost"]  # their rows were released
    assert c["normal_request_after"]["status"] == 200
    zero = c["zero_token_requests"]
    for name in ("completion max_tokens 0", "chat max_tokens 0", "chat max_completion_tokens 0"):
        assert zero[name]["status"] == 400 and zero[name]["code"] == "invalid_request", zero[name]
    for name in (n for n in zero if n.startswith("task with")):
        assert zero[name]["status"] == 404 and "refused" in zero[name]["message"], zero[name]
        assert "max_new_tokens" in zero[name]["message"]
    assert "max_new_tokens" in c["zero_task_refused_in_health"]


def test_a_task_whose_file_is_corrupted_while_serving_keeps_answering(results):
    d = results["corrupted_file"]
    assert set(d["before"].values()) == {200}
    after = d["after"]
    for name in ("garbage (warm)", "truncated (warm)", "garbage (warm), streamed"):
        assert after[name]["status"] == 200, after
    # a task never used had no good version in memory: it is refused, and says why
    cold = after["garbage (cold: never used before)"]
    assert cold["status"] == 404 and "truncated or corrupted" in cold["message"], cold
    assert all(reason and "corrupted" in reason for reason in d["refused"].values()), d["refused"]
    assert not {"refused", "stale", "model"} & set(d["unauthorized_health_keys"])  # names only with the key
    # a good file written back serves again, no longer refused nor stale
    assert d["restored"]["status"] == 200 and not d["refused_after_restore"]
    assert "corrupt-garbage" not in d["stale_after_restore"]


def test_health_names_the_tasks_serving_a_last_good_version(results):
    d = results["corrupted_file"]
    assert d["health_has_stale"], "GET /health has no 'stale' key"
    assert all(reason and "corrupted" in reason for reason in d["stale"].values()), d["stale"]
    assert d["stale_after_restore"] == ["corrupt-truncated"]  # the one whose file was not written back


def test_slow_bodies_get_408_while_others_are_served(results):
    e = results["slow_bodies"]
    assert e["slow_statuses"] == [408] * chaos.QUICK.slow_clients
    assert all(s < e["body_timeout_s"] + 5 for s in e["slow_seconds"]), e["slow_seconds"]
    assert e["others_ok"] == e["others_total"] == 4


def test_sigterm_under_load_drains_and_exits(results):
    f = results["sigterm"]
    assert f["in_flight_at_signal"] > 0 and f["rows_running_at_signal"] > 0
    assert f["seconds_to_exit"] < f["shutdown_timeout_s"] + 5
    # uvicorn shuts down, then re-raises the signal: the exit status says SIGTERM ended it
    assert f["exit_code"] in (0, -signal.SIGTERM)
    assert f["completed_ok"] == f["requests"], f["error_examples"]  # short requests finish within the drain time
    assert f["request_after_signal"]["status"] != "hung"


def test_nothing_hangs_and_the_report_renders(results):
    assert results["hung_total"] == 0
    text = chaos.markdown(chaos.environment("tiny", True, True) | results)
    assert text.count("\n| (") == len(chaos.goals(results)) - 1 and "hung requests" in text
