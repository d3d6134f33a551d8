"""The command line: end to end on a tiny model saved to disk, help, config files, and user errors."""

from __future__ import annotations

import json

import pytest
from helpers import DATA
from helpers import run_cli as run

from softprompt.commands import main


def test_train_info_eval_generate(model_dir, tmp_path, capsys):
    out_file = tmp_path / "sst2.safetensors"
    code, out, err = run(
        capsys,
        "train",
        "--task",
        "sst2",
        "--data-dir",
        DATA,
        "--model",
        model_dir,
        "--steps",
        2,
        "--batch-size",
        2,
        "--num-virtual-tokens",
        3,
        "--init",
        "vocab",
        "--eval-limit",
        8,
        "--final-eval-limit",
        8,
        "--no-progress",
        "--out",
        out_file,
        "--run-dir",
        tmp_path / "run",
    )
    assert code == 0, err
    assert "zero-shot" in out and out_file.exists()
    assert "library_name: softprompt" in (tmp_path / "README.md").read_text()  # the command writes the model card

    code, out, _ = run(capsys, "info", out_file, "--json")
    d = json.loads(out)
    assert code == 0 and d["parameters_saved"] == 3 * 64 and d["virtual_tokens"] == 3 and d["file_bytes"] > 0
    code, out, _ = run(capsys, "info", out_file)
    assert code == 0 and "prompt / full copy" in out

    code, out, _ = run(
        capsys, "eval", "--task", "sst2", "--data-dir", DATA, "--model", model_dir, "--prompt", out_file, "--limit", 8
    )
    assert code == 0 and json.loads(out)["n"] == 8

    code, out, _ = run(
        capsys,
        "generate",
        "--prompt",
        out_file,
        "--model",
        model_dir,
        "--max-new-tokens",
        4,
        "a great film",
        "a bad film",
    )
    assert code == 0 and len(out.strip().splitlines()) == 2


def test_config_file_stands_in_for_flags(model_dir, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"task: sst2\ndata-dir: {DATA}\nmodel: {model_dir}\nsteps: 1\nbatch_size: 2\n"
        f"num_virtual_tokens: 2\neval_limit: 4\nfinal_eval: false\nprogress: false\n"
        f"out: {tmp_path / 'p.safetensors'}\nrun_dir: {tmp_path / 'run'}\n"
    )
    code, _, err = run(capsys, "train", "--config", cfg, "--steps", 2)  # the flag overrides the file
    assert code == 0, err
    meta = json.loads(run(capsys, "info", tmp_path / "p.safetensors", "--json")[1])
    assert meta["parameters_saved"] == 2 * 64
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for flag in (
        "--num-virtual-tokens",
        "--init",
        "--steps",
        "--lr",
        "--grad-accum",
        "--gradient-checkpointing",
        "--eval-every",
        "--checkpoint-every",
        "--seed",
        "--optimizer",
        "--config",
        "--device",
        "--dtype",
    ):
        assert flag in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--task", "nope"], "Unknown task 'nope'"),
        (["train", "--task", "sst2", "--steps", "0"], "steps must be >= 1"),
        (["train", "--task", "sst2", "--num-virtual-tokens", "0"], "num_virtual_tokens must be a positive integer"),
        (["train", "--task", "sst2", "--init", "zeros"], "Unknown init 'zeros'"),
        (["train", "--config", "/nonexistent.yaml", "--task", "sst2"], "Config file not found"),
        (["info", "/nonexistent.safetensors"], "not found"),
        (["eval", "--task", "sst2", "--model", "/no/such/model"], "does not exist"),
        (
            ["train", "--task", "sst2", "--method", "soft", "--prefix-hidden", "256"],
            "--prefix-hidden do not apply to method 'soft'",
        ),
        (
            ["train", "--task", "sst2", "--method", "prefix", "--encoder", "lstm"],
            "--encoder do not apply to method 'prefix'",
        ),
        (["train", "--task", "sst2", "--method", "deep", "--init", "labels", "--lr", "-1"], "lr must be positive"),
    ],
)
def test_user_errors_are_one_line_without_traceback(argv, message, capsys, monkeypatch):
    monkeypatch.setenv("SOFTPROMPT_DATA", str(DATA))
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert message in err and "fix:" in err and "Traceback" not in err


def test_unknown_method_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--task", "sst2", "--method", "lora"])
    assert e.value.code == 2 and "invalid choice: 'lora'" in capsys.readouterr().err


def test_config_file_with_unknown_key(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("stepz: 3\n")
    code, _, err = run(capsys, "train", "--config", cfg, "--task", "sst2")
    assert code == 2 and "stepz" in err


def _options(parser, path=()) -> dict[str, dict[str, list[str]]]:
    """Every command's option strings and positionals, by command path ("search templates", ...)."""
    import argparse

    out = {
        " ".join(path) or "softprompt": {
            "options": sorted(s for a in parser._actions for s in a.option_strings),
            "positionals": [
                a.dest
                for a in parser._actions
                if not a.option_strings and not isinstance(a, argparse._SubParsersAction)
            ],
        }
    }
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                out |= _options(sub, (*path, name))
    return out


def test_every_command_keeps_its_options():
    """The option sets of every command, against the snapshot taken before the commands moved into their package."""
    from pathlib import Path

    from softprompt.commands import build_parser

    before = json.loads((Path(__file__).parent / "data" / "cli_options.json").read_text())
    assert _options(build_parser()) == before
