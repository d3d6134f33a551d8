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
    summary = " ".join(out.split())
    assert "zero-shot: accuracy" in summary and "tuned: accuracy" in summary and "on dev (8 rows)" in summary
    assert out_file.exists()
    assert "library_name: softprompt" in (tmp_path / "README.md").read_text()  # the command writes the model card

    code, out, _ = run(capsys, "info", out_file, "--json")
    d = json.loads(out)
    assert code == 0 and d["parameters_saved"] == 3 * 64 and d["virtual_tokens"] == 3 and d["file_bytes"] > 0
    code, out, _ = run(capsys, "info", out_file)
    assert code == 0 and "prompt / full copy" in out

    code, out, _ = run(
        capsys, "eval", "--task", "sst2", "--data-dir", DATA, "--model", model_dir, "--prompt", out_file, "--limit", 8
    )
    d = json.loads(out)
    assert code == 0 and d["n"] == 8 and d["split"] == "dev" and d["metric"] == "accuracy" and "accuracy" in d

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


def test_a_run_without_final_evaluation_reports_its_best_in_training_evaluation(model_dir, tmp_path, capsys):
    out_file = tmp_path / "quick.safetensors"
    code, out, err = run(
        capsys,
        *("train", "--task", "sst2", "--data-dir", DATA, "--model", model_dir, "--steps", 2, "--batch-size", 2),
        *("--num-virtual-tokens", 2, "--eval-limit", 8, "--no-final-eval", "--no-progress"),
        *("--out", out_file, "--run-dir", tmp_path / "run"),
    )
    assert code == 0, err
    summary = " ".join(out.split())
    assert "zero-shot: -" not in summary and "tuned: -" not in summary
    assert "best during training: accuracy" in summary and "on dev (8 rows); no final evaluation" in summary
    best = json.loads(run(capsys, "info", out_file, "--json")[1])["metrics"]["best_during_training"]
    assert best["split"] == "dev" and best["n"] == 8 and 0 <= best["accuracy"] <= 1
    code, out, _ = run(capsys, "info", out_file)
    assert code == 0 and "metrics: best_during_training" in out and "on dev" in out
    assert "best during training |" in (tmp_path / "README.md").read_text()  # the card's metrics column is filled


def test_prompt_transfer_from_the_command_line(model_dir, tmp_path, capsys):
    """Train a soft prompt on SST-2, then a deep prompt on TREC that starts from it (--init prompt)."""
    common = ["--data-dir", DATA, "--model", model_dir, "--steps", 1, "--batch-size", 2, "--no-progress"]
    common += ["--eval-limit", 4, "--no-final-eval"]

    def train(task: str, out: str, *options):
        return run(
            capsys,
            "train",
            "--task",
            task,
            *common,
            *options,
            "--out",
            tmp_path / out,
            "--run-dir",
            tmp_path / f"run-{out}",
        )

    source = tmp_path / "sst2.safetensors"
    code, _, err = train("sst2", source.name, "--num-virtual-tokens", 3)
    assert code == 0, err
    transfer = ["--method", "deep", "--init", "prompt", "--init-prompt", source]
    code, _, err = train("trec", "trec.safetensors", *transfer, "--num-virtual-tokens", 2)
    assert code == 0, err
    config = json.loads(run(capsys, "info", tmp_path / "trec.safetensors", "--json")[1])["method_config"]
    assert config["init"] == "prompt" and config["init_prompt"] == str(source)  # the file names its source
    assert (
        "prompt from" in run(capsys, "info", tmp_path / "trec.safetensors")[1]
    )  # then the path (the table may cut it)
    code, _, err = train("trec", "long.safetensors", *transfer, "--num-virtual-tokens", 5)
    assert code == 2 and "has 3 virtual tokens, fewer than the 5 asked for" in err and "Traceback" not in err


def test_commands_that_run_the_model_take_max_length_truncate_and_no_progress(model_dir, tmp_path, capsys):
    task = ["--task", "sst2", "--data-dir", DATA, "--model", model_dir]
    code, out, err = run(capsys, "eval", *task, "--limit", 8)
    assert code == 0 and "scoring" in err  # a progress bar by default
    full = json.loads(out)
    code, out, err = run(capsys, "eval", *task, "--limit", 8, "--max-length", 400, "--no-progress")
    assert code == 0 and "scoring" not in err and json.loads(out)["accuracy"] == full["accuracy"]  # all fit in 400
    code, _, err = run(capsys, "eval", *task, "--limit", 8, "--max-length", 8)
    assert code == 2 and "does not fit the" in err  # --max-length caps the positions; error is the default policy
    code, out, err = run(capsys, "eval", *task, "--limit", 8, "--max-length", 8, "--truncate", "left", "--no-progress")
    assert code == 0 and json.loads(out)["n"] == 8, err
    gen = ["generate", "--model", model_dir, "--task", "sst2", "--data-dir", DATA, "--max-new-tokens", 2]
    code, _, err = run(capsys, *gen, "--max-length", 6, "a great film with a fine cast and a good plot")
    assert code == 2 and "does not fit the" in err
    code, out, err = run(capsys, *gen, "--max-length", 6, "--truncate", "left", "--no-progress", "a great film")
    assert code == 0 and len(out.splitlines()) == 1, err
    hard = tmp_path / "hard.safetensors"
    search = ["search", "templates", *task, "--search-size", 8, "--finalists", 1, "--limit", 4, "--out", hard]
    code, _, err = run(capsys, *search, "--max-length", 10, "--truncate", "left", "--no-progress")
    assert code == 0 and "templates" not in err, err  # neither the templates bar nor the scoring bars
    code, _, err = run(capsys, *search, "--max-length", 4096, "--overwrite")  # hard.safetensors exists now
    assert code == 2 and "exceeds the model's context of 512" in err
    code, _, err = run(capsys, "serve", "--store", tmp_path, "--model", model_dir, "--max-length", 4096)
    assert code == 2 and "exceeds the model's context of 512" in err


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


def test_eval_on_a_dev_split_carved_out_of_train(model_dir, tmp_path, capsys):
    rows = "".join(f"row {i}\t{'ab'[i % 2]}\n" for i in range(10))
    (tmp_path / "train.tsv").write_text("text\ty\n" + rows)
    (tmp_path / "t.yaml").write_text(
        'name: t\nsplits: {train: train.tsv}\ntemplate: "Text: {text}\\nLabel:"\nlabel_column: y\n'
        "labels: {a: 'yes', b: 'no'}\n"
    )
    args = ("eval", "--task", tmp_path / "t.yaml", "--model", model_dir, "--no-progress")
    code, out, err = run(capsys, *args, "--dev-from-train", 4)
    assert code == 0, err
    assert json.loads(out)["n"] == 4
    code, out, err = run(capsys, *args, "--dev-from-train", "0.2")
    assert code == 0 and json.loads(out)["n"] == 2, err


def test_config_file_with_unknown_key(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("stepz: 3\n")
    code, _, err = run(capsys, "train", "--config", cfg, "--task", "sst2")
    assert code == 2 and "stepz" in err


def test_search_config_files_are_checked_against_the_subcommand(tmp_path, capsys):
    """`search templates|autoprompt --config FILE`: the keys are the subcommand's options (they were once checked
    against the `search` group's, which has none, so every key was unknown)."""
    own = {"templates": {"search_size": 8, "finalists": 1}, "autoprompt": {"num_triggers": 2, "select_rows": 0}}
    for kind, options in own.items():
        cfg = tmp_path / f"{kind}.yaml"
        values = {"task": "sst2", "data-dir": str(DATA), "model": "/nonexistent", "out": str(tmp_path / "p"), **options}
        cfg.write_text(json.dumps(values))  # JSON is YAML: a .yaml file is read as YAML
        code, _, err = run(capsys, "search", kind, "--config", cfg)
        assert code == 2 and "Model path '/nonexistent' does not exist" in err  # every key taken; the model is next
        cfg.write_text("stepz: 1\n")
        code, _, err = run(capsys, "search", kind, "--config", cfg, "--task", "sst2")
        assert code == 2 and "unknown option(s) ['stepz']" in err


def test_json_config_files_are_read_as_json(tmp_path, capsys):
    """A *.json config file is parsed as JSON: YAML refuses the tabs many JSON writers indent with."""
    cfg = tmp_path / "run.json"
    values = {"task": "sst2", "data_dir": str(DATA), "model": "/nonexistent", "out": str(tmp_path / "p"), "lr": 1e-3}
    cfg.write_text(json.dumps(values, indent="\t"))
    code, _, err = run(capsys, "train", "--config", cfg)
    assert code == 2 and "Model path '/nonexistent' does not exist" in err and "JSON" not in err


def test_info_shows_metrics_of_any_json_value_as_they_are(llama, sst2, tmp_path, capsys, monkeypatch):
    """`info` on a file whose metrics (or sizes) are not the numbers it writes: shown as they are, never a traceback."""
    from helpers import make_prompt

    monkeypatch.setenv("COLUMNS", "2000")  # rich wraps at the terminal width; one line per row is easier to read
    prompt = make_prompt(llama, sst2.spec, "soft", 2)
    prompt.base_parameters = prompt.base_bytes = 10**400  # beyond any float
    prompt.metrics = {
        "dev": {"accuracy": 0.5, "n": "many"},
        "huge": {"accuracy": 10**400, "n": 10**400, "split": ["a", "b"]},
        "nan": {"macro_f1": float("nan"), "n": None},
        "words": {"accuracy": "high"},
        "a list": [1, "x"],
        "[/]": "[/bold] not markup",
    }
    path = prompt.save(tmp_path / "p")
    code, out, err = run(capsys, "info", path)
    assert code == 0 and not err, err
    assert "accuracy 50.0% on dev (many rows)" in out
    assert f"accuracy {10**400} on ['a', 'b'] ({10**400:,} rows)" in out
    assert "macro_f1 nan% on nan (None rows)" in out
    assert '{"accuracy": "high", "split": "words"}' in out and '[1, "x"]' in out
    assert '"[/bold] not markup"' in out and "metrics: [/]" in out
    assert f"{10**400:,} parameters, {10**400:,} B" in out and "0.0000% of the parameters, 1/" in out
    code, out, err = run(capsys, "info", path, "--json")
    assert code == 0 and json.loads(out)["metrics"]["dev"]["n"] == "many"


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


def test_train_never_replaces_a_prompt_file_without_overwrite(model_dir, tmp_path, capsys):
    out = tmp_path / "p.safetensors"
    args = ("train", "--task", "sst2", "--data-dir", DATA, "--model", model_dir, "--steps", 1, "--batch-size", 2)
    args += ("--num-virtual-tokens", 2, "--eval-every", 0, "--no-final-eval", "--no-progress", "--out", out)
    code, _, err = run(capsys, *args, "--run-dir", tmp_path / "a")
    assert code == 0, err
    first = out.read_bytes()
    code, _, err = run(capsys, *args, "--run-dir", tmp_path / "b", "--seed", 1)
    assert code == 2 and "already exists" in err and "--overwrite" in err and not (tmp_path / "b").exists()
    assert out.read_bytes() == first  # refused before any training
    code, _, err = run(capsys, *args, "--run-dir", tmp_path / "b", "--seed", 1, "--overwrite")
    assert code == 0, err
    assert out.read_bytes() != first


def test_demo_replaces_its_own_file_and_nothing_else(llama, sst2, tmp_path, monkeypatch):
    from helpers import random_soft_prompt

    import softprompt.commands.demo as demo
    from softprompt.errors import StorageError

    class Started(Exception):
        pass

    def load_task(*a, **k):
        raise Started  # the demo got past its output check; the rest is the slow part

    monkeypatch.setattr(demo, "load_task", load_task)
    out = tmp_path / "sst2-soft.safetensors"
    with pytest.raises(Started):
        demo.run_demo(out=str(out))  # nothing there yet
    out.write_bytes(b"someone's prompt")
    with pytest.raises(StorageError, match="already exists"):
        demo.run_demo(out=str(out))
    with pytest.raises(Started):
        demo.run_demo(out=str(out), overwrite=True)
    random_soft_prompt(llama, sst2.spec, train={"made_by": demo.MADE_BY}).save(out)  # an earlier demo's file
    assert demo.demo_file(out)
    with pytest.raises(Started):
        demo.run_demo(out=str(out))
