"""The command line end to end on a tiny T5 and a tiny BART, on the real shared tasks: train, eval, info, generate,
export/import, and serving a store of both kinds of task (classification on SST-2, generation on E2E)."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from helpers import DATA, build_tiny

import softprompt as sp
from softprompt.commands import main
from softprompt.multitask import MultiTask
from softprompt.serving import ServerConfig, create_app
from softprompt.store import Store

FAST = ["--steps", "2", "--batch-size", "2", "--eval-limit", "4", "--final-eval-limit", "8", "--no-progress"]


@pytest.fixture(scope="module", params=["t5", "bart"])
def model_dir(request, tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"tiny-{request.param}")
    base = build_tiny(request.param, tokenizer)
    base.model.save_pretrained(path)
    base.tokenizer.save_pretrained(path)
    return str(path)


def run(capsys, *argv) -> str:
    assert main([*argv]) in (0, None)
    return capsys.readouterr().out


def test_train_eval_generate_and_serve_on_a_seq2seq_model(model_dir, tmp_path, capsys, sst2, e2e):
    store = tmp_path / "store"
    common = ["--model", model_dir, "--data-dir", str(DATA), "--device", "cpu"]
    run(
        capsys,
        "train",
        *common,
        "--task",
        "sst2",
        "--method",
        "soft",
        "--num-virtual-tokens",
        "4",
        *FAST,
        "--run-dir",
        str(tmp_path / "runs-sst2"),
        "--out",
        str(store / "sst2.safetensors"),
    )
    run(
        capsys,
        "train",
        *common,
        "--task",
        "e2e_nlg",
        "--method",
        "prefix",
        "--num-virtual-tokens",
        "4",
        *FAST,
        "--run-dir",
        str(tmp_path / "runs-e2e"),
        "--out",
        str(store / "e2e.safetensors"),
    )
    metrics = json.loads(
        run(capsys, "eval", *common, "--task", "sst2", "--prompt", str(store / "sst2.safetensors"), "--limit", "8")
        .strip()
        .splitlines()[-1]
    )
    assert metrics["n"] == 8 and 0 <= metrics["accuracy"] <= 1
    out = run(
        capsys,
        "generate",
        "--model",
        model_dir,
        "--device",
        "cpu",
        "--prompt",
        str(store / "e2e.safetensors"),
        "--max-new-tokens",
        "4",
        "--json",
        "name[The Eagle], eatType[pub]",
    )
    assert "output" in json.loads(out.strip().splitlines()[-1])
    prompt = sp.load_prompt(store / "e2e.safetensors")
    assert prompt.base["family"] == "seq2seq" and prompt.injection.kv is not None
    run(capsys, "export", str(store / "e2e.safetensors"), str(tmp_path / "peft"))
    run(capsys, "import", str(tmp_path / "peft"), *common, "--out", str(tmp_path / "back.safetensors"))
    assert sp.load_prompt(tmp_path / "back.safetensors").injection.kv.shape == prompt.injection.kv.shape

    base = sp.load_base(model_dir, device="cpu")
    mt = MultiTask(base)
    assert mt.sync(Store(store))["added"] == ["e2e", "sst2"]
    # TestClient sends `Host: testserver`, which the server allows only when told (DNS-rebinding protection)
    app = create_app(mt, Store(store), ServerConfig(max_tokens=8), allowed_hosts=["testserver"])
    with TestClient(app) as client:
        label = client.post("/v1/classify", json={"model": "sst2", "input": ["a great film", "awful"]}).json()
        assert [d["label"] for d in label["data"]] == [
            r.label for r in mt.classify([("sst2", "a great film"), ("sst2", "awful")])
        ]
        done = client.post(
            "/v1/completions", json={"model": "e2e", "prompt": "name[The Eagle]", "max_tokens": 4, "temperature": 0}
        ).json()
        assert done["choices"][0]["text"] == mt.generate([("e2e", "name[The Eagle]")], 4)[0].strip()
        assert done["usage"]["completion_tokens"] <= 4
