"""Streaming task data (`streaming: true`): a seeded shuffle buffer over local files or the hub, one training path."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from helpers import DATA, build_tiny

import softprompt as sp
from softprompt.data import StreamedExamples
from softprompt.errors import DataError
from softprompt.train import Trainer


def jsonl_task(tmp_path, n=30, streaming=True, buffer=8, extra=""):
    rows = [{"text": f"row {i}", "label": "pos" if i % 2 else "neg"} for i in range(n)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "task.yaml").write_text(
        f"name: toy\nsplits: {{train: train.jsonl}}\ntemplate: '{{text}} is'\nlabels: {{neg: ' bad', pos: ' good'}}\n"
        f"streaming: {str(streaming).lower()}\nshuffle_buffer: {buffer}\n{extra}"
    )
    return sp.load_task(str(tmp_path / "task.yaml"))


def test_stream_is_a_seeded_shuffle_of_every_row_each_epoch(tmp_path):
    task = jsonl_task(tmp_path)
    ex = task.examples("train", seed=0)
    assert isinstance(ex, StreamedExamples)
    epochs = [[ex.get(30 * e + i)[0] for i in range(30)] for e in range(3)]
    assert all(sorted(e) == sorted(f"row {i} is" for i in range(30)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != [f"row {i} is" for i in range(30)]
    assert task._splits == {}  # never read into memory
    again = task.examples("train", seed=0)
    assert [again.get(j) for j in (5, 31, 70)] == [ex.get(j) for j in (5, 31, 70)]  # also going back: restarts
    assert [task.examples("train", seed=1).get(j)[0] for j in range(30)] != epochs[0]
    assert ex.get(0)[1] in (" bad", " good") and ex.texts(3)[:3] == ["row 0 is", "row 1 is", "row 2 is"]


def test_training_on_a_stream_resumes_to_the_same_prompt(tokenizer, tmp_path, monkeypatch):
    base = build_tiny("llama", tokenizer)
    spec = tmp_path / "sst2.yaml"
    spec.write_text(
        f"name: sst2s\nsplits: {{train: {DATA}/sst2/train.tsv}}\ntemplate: 'Review: {{sentence}}\\n"
        "Sentiment:'\nlabels: {0: negative, 1: positive}\nstreaming: true\nshuffle_buffer: 64\n"
    )
    task = sp.load_task(str(spec))
    cfg = sp.TrainConfig(
        steps=4, batch_size=2, lr=5e-2, eval_every=0, final_eval=False, progress=False, checkpoint_every=2
    )
    method = sp.SoftPromptConfig(num_virtual_tokens=3)
    full = sp.train(base, task, "soft", method, cfg, run_dir=tmp_path / "a")

    real = Trainer._save_checkpoint

    def stop_after_step_2(self):
        real(self)
        if self.step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_save_checkpoint", stop_after_step_2)
    with pytest.raises(KeyboardInterrupt):
        sp.train(base, task, "soft", method, cfg, run_dir=tmp_path / "b")
    monkeypatch.setattr(Trainer, "_save_checkpoint", real)
    resumed = Trainer(base, task, "soft", method, cfg, run_dir=tmp_path / "b")
    assert resumed.step == 2  # its stream skips the 2 steps' examples without rendering them
    torch.testing.assert_close(resumed.run().method.embedding, full.method.embedding, rtol=0, atol=1e-6)


def test_hub_datasets_are_streamed_through_the_same_path(tmp_path, monkeypatch):
    calls = []

    def load_dataset(name, config=None, split=None, streaming=False, **kw):
        calls.append((name, config, split, streaming))
        ds = datasets.Dataset.from_list([{"sentence": f"s{i}", "label": i % 2} for i in range(10)])
        return ds.to_iterable_dataset() if streaming else ds

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    (tmp_path / "t.yaml").write_text(
        "name: glue_sst2\nsplits: {train: {hub: nyu-mll/glue, config: sst2, split: train}}\n"
        "template: '{sentence}'\nlabels: {0: ' no', 1: ' yes'}\nstreaming: true\n"
    )
    ex = sp.load_task(str(tmp_path / "t.yaml")).examples("train", seed=0)
    assert sorted(ex.get(j)[0] for j in range(10)) == sorted(f"s{i}" for i in range(10))
    assert calls[0] == ("nyu-mll/glue", "sst2", "train", True)


def test_stream_errors_are_data_errors(tmp_path):
    task = jsonl_task(tmp_path, extra="columns: {text: missing}\n")
    with pytest.raises(DataError, match="no column"):
        task.examples("train", seed=0).get(0)
    (tmp_path / "train.jsonl").write_text('{"text": "a", "label": "pos"}\n{not json\n')
    stream = task.examples("train", seed=0)
    with pytest.raises(DataError, match="while streaming"):
        [stream.get(j) for j in range(4)]


def test_a_stream_draws_one_reference_per_example_and_checks_every_row(tmp_path):
    rows = [{"x": f"in {i}", "lex": [f"out {i}.{k}" for k in range(3)]} for i in range(6)] + [{"x": None, "lex": ["a"]}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:6]))
    (tmp_path / "task.yaml").write_text(
        "name: refs\nsplits: {train: train.jsonl}\ntemplate: '{x} ->'\nreferences_column: lex\nstreaming: true\n"
    )
    ex = sp.load_task(str(tmp_path / "task.yaml")).examples("train", seed=0)
    pairs = [ex.get(j) for j in range(30)]
    assert all(t.startswith(f"out {p.split()[1]}.") for p, t in pairs)  # a reference of the row's own input
    assert len({t for _, t in pairs}) > 6  # not always the first one
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    stream = sp.load_task(str(tmp_path / "task.yaml")).examples("train", seed=0)
    with pytest.raises(DataError, match="has no value in column 'x'"):
        [stream.get(j) for j in range(7)]
