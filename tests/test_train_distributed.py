"""Distributed training: `softprompt train` under `accelerate launch` (2 CPU processes, gloo), and sharded embeddings.

Two processes with gradient accumulation g see, step by step, the same examples as one process with
accumulation 2g (micro-batch k of the seeded stream goes to process k % 2), so their prompts agree
to float rounding: DDP averages the two processes' gradients where one process sums halves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest
import torch
from helpers import DATA, build_tiny, launch, launch_env

import softprompt as sp
from softprompt.commands import main
from softprompt.methods import InitContext
from softprompt.train import Trainer

TRAIN = [
    "train",
    "--task",
    "sst2",
    "--data-dir",
    str(DATA),
    "--method",
    "soft",
    "--num-virtual-tokens",
    "3",
    "--init",
    "vocab",
    "--steps",
    "3",
    "--batch-size",
    "2",
    "--lr",
    "5e-2",
    "--eval-every",
    "0",
    "--eval-limit",
    "8",
    "--final-eval-limit",
    "8",
    "--checkpoint-every",
    "2",
    "--log-every",
    "1",
    "--seed",
    "0",
]


def test_two_processes_match_one_with_twice_the_accumulation(model_dir, tmp_path, capsys):
    two = subprocess.run(
        [
            *launch("--multi_gpu"),
            "-m",
            "softprompt",
            *TRAIN,
            "--model",
            model_dir,
            "--grad-accum",
            "1",
            "--out",
            str(tmp_path / "two.safetensors"),
            "--run-dir",
            str(tmp_path / "two"),
        ],
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert (
        main(
            [
                *TRAIN,
                "--model",
                model_dir,
                "--grad-accum",
                "2",
                "--no-progress",
                "--out",
                str(tmp_path / "one.safetensors"),
                "--run-dir",
                str(tmp_path / "one"),
            ]
        )
        == 0
    )
    capsys.readouterr()

    a, b = (sp.load_prompt(tmp_path / f"{n}.safetensors").injection.embeds for n in ("two", "one"))
    diff = (a - b).abs().max().item()
    print(f"2 processes x accumulation 1 vs 1 process x accumulation 2: max |diff| {diff:.2e}")  # shown with -s
    assert diff < 1e-6
    # control: half the data per step (one process, accumulation 1) gives a visibly different prompt
    assert (
        main(
            [
                *TRAIN,
                "--model",
                model_dir,
                "--no-progress",
                "--out",
                str(tmp_path / "half.safetensors"),
                "--run-dir",
                str(tmp_path / "half"),
            ]
        )
        == 0
    )
    assert (sp.load_prompt(tmp_path / "half.safetensors").injection.embeds - b).abs().max().item() > 100 * max(
        diff, 1e-8
    )

    # only the first process writes and prints: one record per step, one "saved" line, one progress bar
    records = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    single = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [r["step"] for r in single] == [1, 2, 3, 3]
    for r, s in zip(records, single):  # the logged loss is the mean over both processes' micro-batches
        assert r.get("loss", 0) == pytest.approx(s.get("loss", 0), abs=1e-5)
    assert two.stdout.count("saved ") == 1 and two.stderr.count("0/3 [00:00<?, ?it/s]") == 1  # a bar starts once
    assert sorted(p.name for p in tmp_path.glob("two*")) == ["two", "two.safetensors"]


def test_sharded_embeddings_are_gathered_for_init_and_fingerprint(tokenizer, monkeypatch):
    """DeepSpeed ZeRO-3 replaces a sharded weight by an empty placeholder with a `ds_id`; stand in for it."""
    plain = build_tiny("llama", tokenizer)
    sharded = build_tiny("llama", tokenizer)
    # the KV layout is read off one forward, which ZeRO-3 runs with its own gathering hooks; a stand-in has none
    sharded.kv_layout  # noqa: B018
    weight = sharded.embedding_matrix
    full = weight.data.clone()
    weight.data = torch.empty(0)
    weight.ds_id = 7
    gathers = []

    class GatheredParameters:
        def __init__(self, params, modifier_rank=None):
            self.params = list(params)

        def __enter__(self):
            gathers.append(len(self.params))
            for p in self.params:
                p.data = full

        def __exit__(self, *exc):
            for p in self.params:
                p.data = torch.empty(0)

    monkeypatch.setitem(
        sys.modules,
        "deepspeed",
        types.SimpleNamespace(zero=types.SimpleNamespace(GatheredParameters=GatheredParameters)),
    )
    assert sharded.embedding_matrix.numel() == 0
    assert sharded.fingerprint.embedding_sha256 == plain.fingerprint.embedding_sha256
    assert sharded.fingerprint.config_hash == plain.fingerprint.config_hash
    for mode in ("labels", "vocab", "random", "text"):
        a, b = (
            InitContext(x, [" good", " bad"], ["a good film", "a bad plot"], seed=2).embeddings(mode, 4, "great")
            for x in (sharded, plain)
        )
        assert torch.equal(a, b), mode
    assert gathers and sharded.embedding_matrix.numel() == 0  # gathered only inside the block


def test_real_zero3_partitioned_embeddings(model_dir, tmp_path):
    """With DeepSpeed installed: load the tiny model partitioned by ZeRO-3 (2 CPU processes) and fingerprint it."""
    pytest.importorskip("deepspeed")
    script = tmp_path / "zero3.py"
    script.write_text(f"""
import json, os, sys, torch
import deepspeed
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.integrations import HfDeepSpeedConfig
import softprompt.base
from softprompt.methods import InitContext
from softprompt.train import Trainer
deepspeed.init_distributed(dist_backend="gloo")
keep = HfDeepSpeedConfig({{"train_micro_batch_size_per_gpu": 1, "zero_optimization": {{"stage": 3}}}})
model = AutoModelForCausalLM.from_pretrained({model_dir!r})
base = softprompt.base.freeze(model, AutoTokenizer.from_pretrained({model_dir!r}), "tiny")
init = InitContext(base, [" good"], ["a good film"], seed=2).embeddings("labels", 3)
if int(os.environ["RANK"]) == 0:
    json.dump({{"sharded": base.embedding_matrix.numel() == 0, "sha": base.fingerprint.embedding_sha256,
               "init": init.tolist()}}, open(sys.argv[1], "w"))
else:
    base.fingerprint
""")
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]),
    }
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            str(script),
            str(tmp_path / "out.json"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    plain = sp.load_base(model_dir, device="cpu")
    assert out["sharded"] and out["sha"] == plain.fingerprint.embedding_sha256
    assert torch.equal(
        torch.tensor(out["init"]), InitContext(plain, [" good"], ["a good film"], seed=2).embeddings("labels", 3)
    )


def test_deepspeed_launches_are_refused_with_the_fsdp_and_ddp_commands(base, sst2):
    from accelerate.utils import DistributedType

    with pytest.raises(sp.SoftpromptError, match="--use_fsdp .*--multi_gpu"):
        Trainer(base, sst2, "soft", accelerator=types.SimpleNamespace(distributed_type=DistributedType.DEEPSPEED))
