"""The catalogue of bad inputs (docs/errors.md): each gets one clear error naming the problem and the fix.

Errors a user meets on the command line are checked there: exit status 2, the last two lines of
stderr are `softprompt: error: PROBLEM` and `  fix: FIX`, and no traceback. The rest are checked
through the Python API; `test_catalogue_rows_name_existing_tests` keeps docs/errors.md and the
tests in step.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import pytest
import torch
from helpers import BASIC, DATA, LONG, random_soft_prompt, write_spec

import softprompt as sp
from softprompt.commands import main
from softprompt.data import Encoder
from softprompt.errors import ConfigError, DataError, InputTooLongError, StorageError
from softprompt.example import Example
from softprompt.generate import generate_ids
from softprompt.train import CHECKPOINT, Trainer

ROOT = Path(__file__).resolve().parents[1]


def spec(tmp_path, body: str = BASIC, **files) -> str:
    """A task spec in tmp_path with `files` (name -> text or bytes); dots in names are written as '_' in kwargs."""
    return str(write_spec(tmp_path, body, {k.replace("_", "."): v for k, v in files.items()}))


GOOD = "text\ty\nhi\ta\nho\tb\n"
NO_MODEL = "no-such-model"  # a --model path that does not exist


def prompt_file(tmp_path, llama, sst2) -> str:
    return str(random_soft_prompt(llama, sst2.spec).save(tmp_path / "sst2-prompt"))


# (argv builder (tmp_path, model dir, llama, sst2) -> argv, problem excerpt, fix excerpt)
CLI_CASES = {
    # data
    "missing-data-file": (
        lambda t, m, *_: ["eval", "--task", spec(t, train_tsv=GOOD), "--model", m],
        "Data file for split 'dev' of task 't' not found",
        "SOFTPROMPT_DATA / --data-dir",
    ),
    "missing-column": (
        lambda t, m, *_: ["eval", "--task", spec(t, dev_tsv="sentence\ty\nhi\ta\n"), "--model", m],
        "has no column(s) ['text']",
        "fix the template fields, `columns`",
    ),
    "template-field-not-in-data": (
        lambda t, m, *_: ["eval", "--task", spec(t, BASIC.replace("{text}", "{review}"), dev_tsv=GOOD), "--model", m],
        "has no column(s) ['review']",
        "fix the template fields",
    ),
    "label-not-in-label-map": (
        lambda t, m, *_: ["eval", "--task", spec(t, dev_tsv=GOOD + "hu\tc\n"), "--model", m],
        "Row 3 of split 'dev' has label 'c', which is not in the label map",
        "add it under `labels:`",
    ),
    "empty-split": (
        lambda t, m, *_: ["eval", "--task", spec(t, dev_tsv="text\ty\n"), "--model", m],
        "Split 'dev' of task 't' is empty",
        "a file with data rows",
    ),
    "not-utf8": (
        lambda t, m, *_: ["eval", "--task", spec(t, dev_tsv="text\ty\ncaf\xe9\ta\n".encode("latin-1")), "--model", m],
        "is not UTF-8 text",
        "re-encode it as UTF-8",
    ),
    "unparseable-jsonl": (
        lambda t, m, *_: [
            "eval",
            "--task",
            spec(t, BASIC.replace("dev.tsv", "dev.jsonl"), dev_jsonl='{"text": "hi", "y": "a"}\n{"text": \n'),
            "--model",
            m,
        ],
        "Could not parse",
        "valid CSV/TSV (with a header row) or JSON lines",
    ),
    "unsupported-file-type": (
        lambda t, m, *_: ["eval", "--task", spec(t, BASIC.replace("dev.tsv", "dev.txt"), dev_txt=GOOD), "--model", m],
        "Unsupported data file type '.txt'",
        "use .csv, .tsv, .jsonl or .json",
    ),
    "spec-not-yaml": (
        lambda t, m, *_: ["eval", "--task", spec(t, "name: [t\n"), "--model", m],
        "is not valid YAML/JSON",
        "fix the syntax of the spec file",
    ),
    "template-not-a-format-string": (
        lambda t, m, *_: ["eval", "--task", spec(t, BASIC.replace("Label:", "{Label:")), "--model", m],
        "template is not a valid format string",
        "literal braces as {{ and }}",
    ),
    "labels-and-target-column": (
        lambda t, m, *_: ["eval", "--task", spec(t, BASIC + "target_column: y\n"), "--model", m],
        "must have exactly one of `labels` (classification) or `target_column`",
        "set one of them in the task spec",
    ),
    "two-labels-one-word": (
        lambda t, m, *_: ["eval", "--task", spec(t, BASIC.replace('"no"', "yes")), "--model", m],
        "maps two labels to the same verbalizer word",
        "give every class its own word",
    ),
    "list-column-without-filter": (
        lambda t, m, *_: [
            "eval",
            "--task",
            spec(t, BASIC.replace("dev.tsv", "dev.jsonl"), dev_jsonl='{"text": ["a", "b"], "y": "a"}\n'),
            "--model",
            m,
        ],
        "holds a list, which the template field {text} cannot show as text",
        "format it with a filter",
    ),
    # the split a command reads is checked before the model loads: no model at NO_MODEL is ever needed
    "eval-unknown-split": (
        lambda t, *_: ["eval", "--task", spec(t, dev_tsv=GOOD), "--model", t / NO_MODEL, "--split", "validation"],
        "Task 't' has no split 'validation'",
        "use one of ['train', 'dev']",
    ),
    "train-unknown-eval-split": (
        lambda t, *_: ["train", "--task", spec(t, train_tsv=GOOD), "--model", t / NO_MODEL, "--eval-split", "test"],
        "Task 't' has no split 'test'",
        "add it under `splits:`",
    ),
    "dev-from-train-out-of-range": (
        lambda t, *_: ["eval", "--task", spec(t, train_tsv=GOOD), "--model", t / NO_MODEL, "--dev-from-train", "1.5"],
        "dev_from_train must be a fraction between 0 and 1 or a count of 1 or more, got 1.5",
        "--dev-from-train",
    ),
    # input length
    "eval-input-too-long": (
        lambda t, m, *_: ["eval", "--task", spec(t, dev_tsv=f"text\ty\n{LONG}\ta\n"), "--model", m],
        "does not fit the",
        "pass --truncate left (or right)",
    ),
    "generate-input-too-long": (
        lambda t, m, *_: ["generate", "--task", spec(t), "--model", m, LONG],
        "does not fit the",
        "pass --truncate left (or right)",
    ),
    # configuration
    "virtual-tokens-fill-the-context": (
        lambda t, m, *_: [
            "train",
            "--task",
            spec(t, train_tsv=GOOD),
            "--model",
            m,
            "--num-virtual-tokens",
            "600",
            "--init",
            "random",
            "--steps",
            "1",
            "--no-progress",
            "--run-dir",
            t / "run",
        ],
        "The prompt takes 600 positions, which leaves no room for text",
        "use fewer --num-virtual-tokens",
    ),
    "max-length-over-the-context": (
        lambda t, m, *_: [
            "train",
            "--task",
            spec(t, train_tsv=GOOD),
            "--model",
            m,
            "--max-length",
            "4096",
            "--steps",
            "1",
            "--no-progress",
            "--run-dir",
            t / "run",
        ],
        "max_length 4096 exceeds the model's context of 512",
        "pass --max-length 512 or less",
    ),
    "eval-max-length-over-the-context": (
        lambda t, m, *_: ["eval", "--task", spec(t, dev_tsv=GOOD), "--model", m, "--max-length", "4096"],
        "max_length 4096 exceeds the model's context of 512",
        "pass --max-length 512 or less",
    ),
    "eval-max-length-0": (
        lambda t, m, *_: ["eval", "--task", spec(t, dev_tsv=GOOD), "--model", m, "--max-length", "0"],
        "max_length must be >= 1, got 0",
        "pass --max-length 1 or more",
    ),
    "eval-input-over-max-length": (
        lambda t, m, *_: [
            *("eval", "--task", spec(t, dev_tsv="text\ty\nthe film was great fun and the plot\ta\n")),
            *("--model", m, "--max-length", "6"),
        ],
        "does not fit the",
        "--max-length",
    ),
    "unknown-optimizer": (
        lambda t, m, *_: ["train", "--task", "sst2", "--optimizer", "sgd"],
        "Unknown optimizer 'sgd'",
        "pass --optimizer with one of",
    ),
    "unknown-truncation-policy": (
        lambda t, m, *_: ["train", "--task", "sst2", "--truncate", "middle"],
        "Unknown truncation policy 'middle'",
        "pass --truncate with one of",
    ),
    "unknown-dtype": (
        lambda t, m, *_: ["eval", "--task", spec(t, dev_tsv=GOOD), "--model", m, "--dtype", "float7"],
        "Unknown dtype 'float7'",
        "'auto'",
    ),
    # prompt files
    "gguf-as-prompt-file": (
        lambda t, *_: ["info", _write(t / "model.gguf", b"GGUF" + bytes(64))],
        "is a GGUF model file, not a softprompt prompt file",
        "pass a .safetensors file",
    ),
    "safetensors-without-metadata": (
        lambda t, *_: ["info", _plain_safetensors(t / "weights.safetensors")],
        "is a safetensors file without softprompt metadata",
        "pass a file written by softprompt",
    ),
    "prompt-for-another-task": (
        lambda t, m, llama, sst2: [
            "eval",
            "--task",
            spec(t, dev_tsv=GOOD),
            "--model",
            m,
            "--prompt",
            prompt_file(t, llama, sst2),
        ],
        "The prompt's classes ['0', '1'] (task 'sst2') lack ['a', 'b'] of task 't'",
        "evaluate the prompt on the task it was trained for",
    ),
    "corrupted-checkpoint": (
        lambda t, m, *_: [
            "train",
            "--task",
            spec(t, train_tsv=GOOD),
            "--model",
            m,
            "--steps",
            "1",
            "--no-progress",
            "--run-dir",
            _write(t / "run" / CHECKPOINT, b"junk").parent,
        ],
        "checkpoint.safetensors is truncated or corrupted",
        "pass --no-resume to start over",
    ),
    # command line
    "unknown-method-in-config-file": (
        lambda t, *_: ["train", "--config", _write(t / "run.yaml", b"task: sst2\nmethod: lora\n")],
        "Unknown method 'lora'",
        "use one of ['deep', 'llama-adapter', 'mpt', 'prefix', 'ptuning', 'soft'] (--method)",
    ),
    "init-text-with-another-init": (
        lambda *_: ["train", "--task", "sst2", "--init", "vocab", "--init-text", "Review:"],
        "--init-text was given with --init vocab, which does not use it",
        "pass --init text to start from the text, or drop --init-text",
    ),
    "train-without-task": (
        lambda *_: ["train", "--steps", "3"],
        "`softprompt train` needs a task",
        "pass --task NAME_OR_SPEC",
    ),
    "generate-without-prompt-or-task": (
        lambda t, m, *_: ["generate", "--model", m, "x"],
        "generate needs a prompt file or a task",
        "pass --prompt FILE, or --task",
    ),
    "generate-max-new-tokens-0": (
        lambda t, m, *_: ["generate", "--task", spec(t), "--model", m, "--max-new-tokens", "0", "x"],
        "--max-new-tokens must be >= 1",
        "pass 1 or more",
    ),
    "plain-string-for-two-fields": (
        lambda t, m, *_: ["generate", "--task", spec(t, BASIC.replace("{text}", "{a} {b}")), "--model", m, "x"],
        "Task 't' takes the fields ['a', 'b']; a plain string can only fill one",
        '{"a": "...", "b": "..."}',
    ),
    "api-key-env-not-set": (
        lambda t, *_: ["serve", "--store", t, "--api-key-env", "SOFTPROMPT_NO_SUCH_VAR"],
        "--api-key-env names $SOFTPROMPT_NO_SUCH_VAR, which is not set",
        "export SOFTPROMPT_NO_SUCH_VAR=...",
    ),
    # saving: nothing replaced silently, refused before the model loads
    "train-out-exists": (
        lambda t, m, llama, sst2: ["train", "--task", "sst2", "--model", m, "--out", prompt_file(t, llama, sst2)],
        "sst2-prompt.safetensors already exists (a 'soft' prompt for task 'sst2'",
        "pass --overwrite to replace it, or another output path (--out)",
    ),
    "search-templates-out-exists": (
        lambda t, m, llama, sst2: ["search", "templates", "--task", "sst2", "--out", prompt_file(t, llama, sst2)],
        "already exists (a 'soft' prompt for task 'sst2'",
        "pass --overwrite to replace it",
    ),
    "train-run-dir-is-a-file": (
        lambda t, m, *_: ["train", "--task", "sst2", "--model", m, "--out", t / "p", "--run-dir", _write(t / "f", b"")],
        "is a file, not a folder",
        "pass another --run-dir (a folder)",
    ),
    "train-max-grad-norm-negative": (
        lambda *_: ["train", "--task", "sst2", "--max-grad-norm", "-1"],
        "max_grad_norm must be a finite number >= 0 (0 turns clipping off), got -1.0",
        "pass --max-grad-norm 0 or more",
    ),
    "train-weight-decay-negative": (
        lambda *_: ["train", "--task", "sst2", "--weight-decay", "-1"],
        "weight_decay must be a finite number >= 0 (0 is none), got -1.0",
        "pass --weight-decay 0 or more",
    ),
    "train-eval-limit-0": (
        lambda *_: ["train", "--task", "sst2", "--eval-limit", "0"],
        "eval_limit must be >= 1, got 0",
        "pass --eval-limit 1 or more",
    ),
    "import-adapter-config-a-list": (
        lambda t, m, *_: ["import", _peft_dir(t, config=b"[]"), "--model", m, "--out", t / "q"],
        "adapter_config.json holds a JSON list, not an object of adapter settings",
        "re-save the adapter with PEFT",
    ),
    "import-nan-adapter": (
        lambda t, m, *_: ["import", _peft_dir(t, fill=float("nan")), "--model", m, "--out", t / "q"],
        "holds 128 NaN or infinite value(s) of 128",
        "re-train the adapter",
    ),
    # config and spec files: JSON read as JSON (one line naming the line and column), any value checked
    "config-not-json": (
        lambda t, *_: ["train", "--config", _write(t / "run.json", b'{"task": "sst2",\n "steps": 1,}\n')],
        "run.json is not valid JSON: Expecting property name enclosed in double quotes at line 2, column 13",
        "fix its syntax",
    ),
    "config-json-not-a-mapping": (
        lambda t, *_: ["train", "--config", _write(t / "run.json", b'["task", "sst2"]'), "--task", "sst2"],
        "run.json must be a mapping, not list",
        "(JSON: an object)",
    ),
    "config-number-of-the-wrong-type": (
        lambda t, *_: ["search", "templates", "--config", _write(t / "s.yaml", b"task: sst2\nlimit: 1.5\n")],
        "s.yaml: limit must be an integer, got 1.5 (float)",
        "write `limit:` with an integer (or pass --limit)",
    ),
    "spec-not-json": (
        lambda t, m, *_: ["eval", "--task", _write(t / "t.json", b'{"name": "t",\n "template": }'), "--model", m],
        "t.json is not valid JSON: Expecting value at line 2, column 14",
        "fix the syntax of the spec file",
    ),
    # a hub id the cache lacks, with the hub offline (the tests set HF_HUB_OFFLINE): refused at once, not retried
    "offline-hub-id": (
        lambda t, m, *_: ["eval", "--task", spec(t, dev_tsv=GOOD), "--model", "some-org/some-model"],
        "Model 'some-org/some-model' is neither a local directory nor in the Hugging Face cache",
        "download it where the hub is reachable (`hf download some-org/some-model`)",
    ),
}


def _peft_dir(t: Path, config: bytes | None = None, fill: float = 0.5) -> Path:
    """A PEFT prompt-tuning adapter of 2 virtual tokens for the tiny Llama (width 64), its tensor full of `fill`."""
    from safetensors.torch import save_file

    folder = t / "adapter"
    folder.mkdir(parents=True, exist_ok=True)
    default = b'{"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 2}'
    (folder / "adapter_config.json").write_bytes(config or default)
    save_file({"prompt_embeddings": torch.full((2, 64), fill)}, folder / "adapter_model.safetensors")
    return folder


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _plain_safetensors(path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2, 2)}, path)
    return path


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_errors(case, tmp_path, model_dir, llama, sst2, capsys, monkeypatch):
    build, problem, fix = CLI_CASES[case]
    monkeypatch.setenv("SOFTPROMPT_DATA", str(DATA))
    code = main([str(a) for a in build(tmp_path, model_dir, llama, sst2)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    error, fix_line = err.rstrip("\n").splitlines()[-2:]
    assert error.startswith("softprompt: error: ") and problem in error
    assert fix_line.startswith("  fix: ") and fix in fix_line


# --- input length: the truncation policy, or an error before any forward pass -------------------------------------


def long_task(tmp_path):
    return sp.load_task(spec(tmp_path, train_tsv=f"text\ty\n{LONG}\ta\nshort\tb\n", dev_tsv=f"text\ty\n{LONG}\ta\n"))


def test_training_on_too_long_inputs_errors_or_truncates(llama, tmp_path):
    task = long_task(tmp_path)
    cfg = dict(steps=1, batch_size=2, eval_every=0, final_eval=False, progress=False)
    with pytest.raises(InputTooLongError, match="does not fit") as e:
        sp.train(llama, task, "soft", sp.SoftPromptConfig(num_virtual_tokens=4), sp.TrainConfig(**cfg))
    assert "--truncate left" in e.value.fix
    result = sp.train(
        llama, task, "soft", sp.SoftPromptConfig(num_virtual_tokens=4), sp.TrainConfig(**cfg, truncate="left")
    )
    assert result.prompt.train["steps_done"] == 1


def test_evaluation_and_generation_of_too_long_inputs_error_or_truncate(llama, tmp_path):
    task = long_task(tmp_path)
    with pytest.raises(InputTooLongError, match="does not fit"):
        sp.evaluate(llama, task, None, split="dev")
    assert sp.evaluate(llama, task, None, split="dev", truncate="right")["n"] == 1
    from softprompt.evaluate import generate_texts

    with pytest.raises(InputTooLongError, match="does not fit"):
        generate_texts(llama, Encoder(task.spec, llama), [LONG], sp.Injection(), 4)
    assert len(generate_texts(llama, Encoder(task.spec, llama, "left"), [LONG], sp.Injection(), 4)) == 1


def test_generation_that_would_run_past_the_context_is_refused(llama):
    ids = llama.tokenizer("the film", add_special_tokens=False)["input_ids"]
    with pytest.raises(InputTooLongError, match=r"max_new_tokens need \d+ positions; the model has 512") as e:
        generate_ids(
            llama,
            [Example(ids, len(ids), [], sp.Injection(embeds=torch.zeros(8, llama.hidden_size)))],
            max_new_tokens=510,
        )
    assert "lower max_tokens" in e.value.fix


def test_an_input_without_tokens_is_refused(llama, sst2):
    bare = sp.TaskSpec(name="bare", template="{text}", target_column="y")
    with pytest.raises(DataError, match="An input has no tokens") as e:
        Encoder(bare, llama).example("")
    assert e.value.fix == "pass a non-empty input."
    with pytest.raises(ConfigError, match="has no tokens"):
        generate_ids(llama, [Example([], 0, [], sp.Injection())], 2)


# --- configuration ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, -3, 2.5])
def test_num_virtual_tokens_must_be_a_positive_integer(n):
    with pytest.raises(ConfigError, match="num_virtual_tokens must be a positive integer") as e:
        sp.SoftPromptConfig(num_virtual_tokens=n)
    assert "--num-virtual-tokens" in e.value.fix


# --- prompt files -------------------------------------------------------------------------------------------------


def test_a_hub_id_loads_from_the_cache_offline_and_fails_at_once_when_it_cannot(model_dir, tmp_path, monkeypatch):
    """A hub id is looked up in the local cache first: offline, a cached one loads from it, and one it lacks is one
    error at once (the hub client used to retry for ~45 s), whether HF_HUB_OFFLINE is set or the hub is unreachable."""
    import shutil
    import time

    from huggingface_hub import constants

    hub = tmp_path / "hub"
    repo = hub / "models--some-org--tiny"  # the cache's layout: refs/main names the snapshot
    shutil.copytree(model_dir, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert sp.load_base("some-org/tiny", device="cpu").name == "some-org/tiny"

    start = time.monotonic()
    with pytest.raises(ConfigError, match="neither a local directory nor in the Hugging Face cache") as e:
        sp.load_base("some-org/some-model")
    assert "HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set" in e.value.problem
    assert "hf download some-org/some-model" in e.value.fix and "local model directory" in e.value.fix
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(ConfigError, match="http://127.0.0.1:9 cannot be reached"):
        sp.load_base("some-org/some-model")
    assert time.monotonic() - start < 30  # one failed connection, no retries
    with pytest.raises(sp.SoftpromptError, match="Model path '/no/such/model' does not exist"):
        sp.load_base("/no/such/model")  # not a hub id: a path, refused as one


def test_an_unreadable_prompt_file_is_a_storage_error(llama, sst2, tmp_path, monkeypatch):
    path = random_soft_prompt(llama, sst2.spec).save(tmp_path / "p")

    def denied(self):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(StorageError, match=r"Could not read .*p.safetensors: Permission denied") as e:
        sp.load_prompt(path)
    assert "check the permissions" in e.value.fix


# --- training: failed saves keep the previous file ------------------------------------------------------------------


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(llama, sst2, tmp_path, monkeypatch):
    cfg = sp.TrainConfig(steps=4, batch_size=2, eval_every=0, final_eval=False, progress=False, checkpoint_every=2)
    real = Trainer._save_checkpoint

    def second_save_fails(self):
        if self.step == 4:
            monkeypatch.setattr(os, "fsync", disk_full)
        real(self)

    monkeypatch.setattr(Trainer, "_save_checkpoint", second_save_fails)
    with pytest.raises(StorageError, match="No space left on device. The previous version is unchanged") as e:
        sp.train(llama, sst2, "soft", sp.SoftPromptConfig(num_virtual_tokens=2), cfg, run_dir=tmp_path)
    assert "free disk space" in e.value.fix
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left behind
    assert Trainer(llama, sst2, "soft", sp.SoftPromptConfig(num_virtual_tokens=2), cfg, run_dir=tmp_path).step == 2


def test_permission_denied_while_saving_a_prompt_keeps_the_previous_file(llama, sst2, tmp_path, monkeypatch):
    path = random_soft_prompt(llama, sst2.spec).save(tmp_path / "p")
    before = path.read_bytes()
    real_open = os.open

    def denied(file, flags, *args, **kwargs):
        if str(file).endswith(".tmp"):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(file, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(StorageError, match="Permission denied. The previous version is unchanged") as e:
        random_soft_prompt(llama, sst2.spec).save(path)
    assert f"check the permissions of {tmp_path}" in e.value.fix
    assert path.read_bytes() == before


def test_saved_files_get_the_usual_permissions(llama, sst2, tmp_path):
    old = os.umask(0o022)
    try:
        path = random_soft_prompt(llama, sst2.spec).save(tmp_path / "p")
        assert path.stat().st_mode & 0o777 == 0o644  # readable by a server running as another user
        path.chmod(0o640)
        random_soft_prompt(llama, sst2.spec).save(path)
        assert path.stat().st_mode & 0o777 == 0o640  # a replaced file keeps its mode
    finally:
        os.umask(old)


# --- the catalogue itself ----------------------------------------------------------------------------------------


def test_catalogue_rows_name_existing_tests():
    """Every row of docs/errors.md names a test that exists, and the excerpt it quotes is in that test's file."""
    rows = [line for line in (ROOT / "docs" / "errors.md").read_text().splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(rows) >= 25
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        number, message, test = cells[0], cells[3], cells[-1]  # | # | area | bad input | message | test |
        ref = re.fullmatch(r"`(tests/test_\w+\.py)::(test_\w+)(\[[\w-]+\])?`", test)
        assert ref, f"row {number}: no test reference in {test!r}"
        source = (ROOT / ref[1]).read_text()
        assert f"def {ref[2]}(" in source, f"row {number}: {ref[1]} has no {ref[2]}"
        if ref[3]:
            assert f'"{ref[3][1:-1]}"' in source, f"row {number}: no case {ref[3]} in {ref[1]}"
        for excerpt in re.findall(r"`([^`]+)`", message):
            assert excerpt in source, f"row {number}: {ref[1]} does not check {excerpt!r}"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), -1])
def test_numeric_options_exclude_nan_and_infinity(value):
    """Every range check refuses NaN and infinity (a NaN compares false with every bound)."""
    from types import SimpleNamespace

    from softprompt.errors import check_at_least, check_positive

    with pytest.raises(ConfigError, match="must be >= 0"):
        check_at_least(SimpleNamespace(x=value), 0, "x")
    with pytest.raises(ConfigError, match="must be positive"):
        check_positive(SimpleNamespace(x=value), "x")
    check_at_least(SimpleNamespace(x=10**400), 0, "x")  # a huge int is a finite number
