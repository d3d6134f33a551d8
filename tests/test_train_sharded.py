"""Training with the frozen base sharded over 2 CPU processes (FSDP2 under `accelerate launch --use_fsdp`, gloo).

Two sharded processes with gradient accumulation g see, step by step, the same examples as one unsharded
process with accumulation 2g, so their prompts agree to float rounding; each process holds half of the
base's weights; and a sharded run killed after a checkpoint resumes sharded to the uninterrupted prompt.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time

import psutil
import pytest
from helpers import DATA, launch, launch_env

import softprompt as sp
from softprompt.fileio import read_safetensors
from softprompt.sharding import shard_base

# --use_fsdp starts the processes with torchrun and sets ACCELERATE_USE_FSDP (accelerate itself only turns GPU
# launches into FSDP ones; softprompt reads the variable and shards on CPU too)
# --use_fsdp sets ACCELERATE_USE_FSDP (accelerate itself only turns GPU launches into FSDP ones; softprompt reads
# the variable and shards on CPU too)
LAUNCH = launch("--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP")
METHODS = {"soft": {"num_virtual_tokens": 3, "init": "vocab"}, "prefix": {"num_virtual_tokens": 3}}
# eval_every 1: evaluations (inference-mode forwards of the sharded base) between training steps
TRAIN = {"steps": 3, "batch_size": 2, "lr": 5e-2, "eval_every": 1, "eval_limit": 8, "final_eval_limit": 8}
TRAIN |= {"checkpoint_every": 2, "log_every": 1, "seed": 0, "progress": False}

SCRIPT = """
import sys
import softprompt as sp
base = sp.load_base(sys.argv[1], device="cpu")
task = sp.load_task("sst2", data_dir=sys.argv[2])
for method, options in {methods!r}.items():  # one launch, two runs: the second finds the base sharded already
    config = sp.TrainConfig(**{train!r}, grad_accum=1)
    sp.train(base, task, method, options, config, run_dir=f"{{sys.argv[3]}}/{{method}}",
             out=f"{{sys.argv[3]}}/{{method}}.safetensors")
"""


def _tensors(path):
    return {k: v for k, v in read_safetensors(path)[0].items()}


def test_sharded_processes_match_one_unsharded_with_twice_the_accumulation(model_dir, tmp_path):
    script = tmp_path / "sharded.py"
    script.write_text(SCRIPT.format(methods=METHODS, train=TRAIN))
    t0 = time.perf_counter()
    run = subprocess.run(
        [*LAUNCH, str(script), model_dir, str(DATA), str(tmp_path / "two")],
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    print(f"sharded launch (2 processes, soft + prefix): {time.perf_counter() - t0:.1f} s")
    assert run.returncode == 0, run.stderr[-3000:]

    base = sp.load_base(model_dir, device="cpu")
    task = sp.load_task("sst2", data_dir=str(DATA))
    for method, options in METHODS.items():
        config = sp.TrainConfig(**TRAIN, grad_accum=2)
        one = tmp_path / "one" / method
        sp.train(base, task, method, options, config, run_dir=one, out=one.with_suffix(".safetensors"))
        a, b = (_tensors(d / f"{method}.safetensors") for d in (tmp_path / "two", tmp_path / "one"))
        assert a.keys() == b.keys()
        diff = max((a[k] - b[k]).abs().max().item() for k in a)
        print(f"{method}: 2 sharded processes x accumulation 1 vs 1 process x accumulation 2: max |diff| {diff:.2e}")
        assert diff < 1e-6
        # the trained (uncollapsed) parameters at the last step, not only the best prompt: the checkpoints agree
        ca, cb = (_tensors(d / method / "checkpoint.safetensors") for d in (tmp_path / "two", tmp_path / "one"))
        for k in (k for k in ca if k.startswith("s.method.")):
            assert (ca[k] - cb[k]).abs().max().item() < 1e-6, k

        records = [json.loads(x) for x in (tmp_path / "two" / method / "metrics.jsonl").read_text().splitlines()]
        single = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
        (sharding,) = [r["sharding"] for r in records if "sharding" in r]
        assert sharding["processes"] == 2 and sharding["total_bytes"] == base.num_bytes()
        shares = [local / sharding["total_bytes"] for local in sharding["local_bytes"]]
        print(f"{method}: bytes of the base held per process {sharding['local_bytes']} of {sharding['total_bytes']}")
        assert all(0.4 < s < 0.6 for s in shares), shares
        # every process evaluated alike (collectives in step), and the main process logged what one process does
        evals = [r["eval"] for r in records if "eval" in r]
        assert len(evals) == 3 and evals == [r["eval"] for r in single if "eval" in r]
    assert "softprompt: warning" not in run.stderr


def test_sharded_run_killed_after_a_checkpoint_resumes_sharded(model_dir, tmp_path):
    steps = 40  # ~0.1 s a step: long enough to be killed midway after the launch's ~10 s start

    def command(run_dir, grad_accum):
        return [
            "-m",
            "softprompt",
            "train",
            "--task",
            "sst2",
            "--data-dir",
            str(DATA),
            "--model",
            model_dir,
            "--method",
            "soft",
            "--num-virtual-tokens",
            "3",
            "--init",
            "vocab",
            "--steps",
            str(steps),
            "--batch-size",
            "2",
            "--grad-accum",
            str(grad_accum),
            "--lr",
            "5e-2",
            "--checkpoint-every",
            "4",
            "--eval-every",
            "0",
            "--no-final-eval",
            "--no-progress",
            "--log-every",
            "1",
            "--run-dir",
            str(run_dir),
            "--out",
            str(run_dir.with_suffix(".safetensors")),
        ]

    def last_step(run_dir) -> int:
        try:
            return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"]
        except (FileNotFoundError, IndexError, json.JSONDecodeError, KeyError):
            return 0

    env = launch_env()
    t0 = time.perf_counter()
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [*LAUNCH, *command(killed, 1)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "killed.log", "w"),  # noqa: SIM115 - the child holds it
        cwd=tmp_path,
    )
    try:
        deadline = time.time() + 300
        while last_step(killed) < 6 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
    finally:
        _kill_tree(proc)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    killed_at = last_step(killed)
    state = read_safetensors(killed / "checkpoint.safetensors", what="checkpoint")[1]
    saved = next(v for k, v in state["__d"] if k == "step")
    assert 4 <= saved <= killed_at < steps
    print(f"killed at step {killed_at}, resuming from the checkpoint of step {saved}")

    done = subprocess.run(
        [*LAUNCH, *command(killed, 1)], env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    whole = tmp_path / "whole"
    uninterrupted = subprocess.run([sys.executable, *command(whole, 2)], env=env, capture_output=True, cwd=tmp_path)
    assert uninterrupted.returncode == 0
    print(f"kill, resume and the uninterrupted run: {time.perf_counter() - t0:.1f} s")

    a, b = _tensors(killed.with_suffix(".safetensors")), _tensors(whole.with_suffix(".safetensors"))
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"resumed sharded run vs uninterrupted run: max |diff| {diff:.2e}")
    assert diff < 1e-6
    records = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, steps + 1))  # rewound, no duplicates
    assert [r["step"] for r in records if "sharding" in r] == [0, saved]  # sharded at the start and on resume


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launch: its workers first (torchrun starts them in sessions of their own, so they would outlive the
    launcher and go on writing the run folder), then the launcher."""
    try:
        workers = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        workers = []
    for p in workers:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    psutil.wait_procs(workers, timeout=10)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_sharding_needs_a_distributed_launch(base):
    with pytest.raises(sp.SoftpromptError, match="--use_fsdp"):
        shard_base(base)
