"""A training process killed with SIGKILL resumes from its checkpoint and ends where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import DATA

from softprompt.fileio import read_safetensors

STEPS, EVERY = 240, 20


def command(model_dir, run_dir, out, method):
    return [
        sys.executable,
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
        method,
        "--num-virtual-tokens",
        "3",
        "--steps",
        str(STEPS),
        "--batch-size",
        "2",
        "--checkpoint-every",
        str(EVERY),
        "--eval-every",
        "0",
        "--no-final-eval",
        "--no-progress",
        "--log-every",
        "1",
        "--run-dir",
        str(run_dir),
        "--out",
        str(out),
    ]


def last_step(run_dir) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


@pytest.mark.parametrize("method", ["soft", "prefix"])
def test_sigkill_then_resume_matches_uninterrupted_run(model_dir, tmp_path, method):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run(
        command(model_dir, tmp_path / "full", tmp_path / "full.safetensors", method),
        check=True,
        env=env,
        capture_output=True,
    )

    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        command(model_dir, run_dir, tmp_path / "killed.safetensors", method),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while last_step(run_dir) < 2 * EVERY + 5 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "training finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = last_step(run_dir)
    assert killed_at < STEPS
    _, state = read_safetensors(run_dir / "checkpoint.safetensors", what="checkpoint")
    saved_step = next(v for k, v in state["__d"] if k == "step")
    assert killed_at - saved_step <= EVERY  # at most one checkpoint interval of work lost

    done = subprocess.run(
        command(model_dir, run_dir, tmp_path / "killed.safetensors", method), env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    a, _ = read_safetensors(tmp_path / "full.safetensors")
    b, _ = read_safetensors(tmp_path / "killed.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, STEPS + 1))  # the log was rewound to the checkpoint, no duplicates
