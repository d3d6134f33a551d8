"""Hub conventions: model cards, from_pretrained on files, folders and repos, push and pull.

There is no network here: the tests replace the two calls that cross it (`HfApi.upload_folder`
with `create_repo`, and `snapshot_download`) and check everything on this side of them, files and
card included.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from helpers import random_soft_prompt

import softprompt as sp
from softprompt.errors import PromptFileError
from softprompt.hub import model_card, prompt_files, write_model_card


def card_meta(directory) -> dict:
    """The YAML front matter of a directory's model card."""
    from huggingface_hub import ModelCard

    return ModelCard.load(Path(directory) / "README.md").data.to_dict()


def test_every_prompt_folder_gets_a_model_card(base, sst2, tmp_path):
    p = random_soft_prompt(
        base, sst2.spec, metrics={"dev": {"accuracy": 0.75, "macro_f1": 0.7, "n": 8}, "zero_shot": {"accuracy": 0.5}}
    )
    write_model_card(p.save(tmp_path / "sst2").parent)  # what every command that saves a prompt does
    meta = card_meta(tmp_path)
    assert meta["library_name"] == "softprompt" and meta["base_model"] == base.name
    [entry] = meta["prompts"]
    assert entry["file"] == "sst2.safetensors" and entry["method"] == "soft" and entry["task"] == "sst2"
    assert entry["parameters"] == 5 * base.hidden_size and entry["metrics"]["dev"]["accuracy"] == 0.75
    [result] = meta["model-index"][0]["results"][:1]
    assert result["dataset"]["split"] == "dev" and result["metrics"][0]["value"] in (0.75, 0.7)

    write_model_card(
        random_soft_prompt(base, sst2.spec).save(tmp_path / "other").parent
    )  # a second prompt: the card lists both
    assert [e["file"] for e in card_meta(tmp_path)["prompts"]] == ["other.safetensors", "sst2.safetensors"]


def test_a_readme_written_by_someone_else_is_kept(base, sst2, tmp_path):
    (tmp_path / "README.md").write_text("# my notes\n")
    random_soft_prompt(base, sst2.spec).save(tmp_path / "p")
    assert (tmp_path / "README.md").read_text() == "# my notes\n"
    assert model_card(tmp_path).startswith("---\n")


def test_from_pretrained_file_and_folder(base, sst2, tmp_path):
    p = random_soft_prompt(base, sst2.spec)
    path = p.save(tmp_path / "one" / "sst2")
    for source in (path, tmp_path / "one"):
        assert torch.equal(sp.from_pretrained(source, base).injection.embeds, p.injection.embeds)
    p.save(tmp_path / "one" / "again")
    with pytest.raises(PromptFileError, match="holds 2 prompt files"):
        sp.from_pretrained(tmp_path / "one")
    assert sp.from_pretrained(tmp_path / "one", base, filename="again.safetensors").method == "soft"


def test_from_pretrained_reads_a_peft_adapter_folder(base, sst2, tmp_path):
    from softprompt.peft_format import export_peft

    p = random_soft_prompt(base, sst2.spec)
    export_peft(p, tmp_path)
    with pytest.raises(sp.SoftpromptError, match="PEFT adapter"):
        sp.from_pretrained(tmp_path)
    assert torch.equal(sp.from_pretrained(tmp_path, base).injection.embeds, p.injection.embeds)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A dict standing in for the hub: repo id -> folder; uploads copy into it, downloads copy out of it."""
    repos, calls = {}, []

    def create_repo(self, repo_id, private=False, exist_ok=False, **kw):
        calls.append(("create_repo", repo_id, private))
        repos.setdefault(repo_id, tmp_path / "hub" / repo_id.replace("/", "--"))

    def upload_folder(self, repo_id, folder_path, allow_patterns=None, commit_message=None, **kw):
        calls.append(("upload_folder", repo_id, sorted(allow_patterns)))
        shutil.copytree(folder_path, repos[repo_id], dirs_exist_ok=True)
        return f"https://huggingface.co/{repo_id}/commit/0"

    def snapshot_download(repo_id, revision=None, allow_patterns=None, local_dir=None, **kw):
        calls.append(("snapshot_download", repo_id, sorted(allow_patterns)))
        if repo_id not in repos:
            raise huggingface_hub.errors.RepositoryNotFoundError(f"404 {repo_id}")
        out = local_dir or tmp_path / "cache" / repo_id.replace("/", "--")
        shutil.copytree(repos[repo_id], out, dirs_exist_ok=True)
        return str(out)

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return repos, calls


def test_push_then_from_pretrained_through_the_hub(base, sst2, tmp_path, fake_hub):
    repos, calls = fake_hub
    p = random_soft_prompt(base, sst2.spec, metrics={"dev": {"accuracy": 0.9}})
    url = sp.push_to_hub(p, "me/sst2-prompt", private=True)
    assert url.endswith("/commit/0") and calls[0] == ("create_repo", "me/sst2-prompt", True)
    assert "*.safetensors" in calls[1][2] and not any(".bin" in x or ".pt" in x for x in calls[1][2])
    assert sorted(f.name for f in repos["me/sst2-prompt"].iterdir()) == ["README.md", "sst2-soft.safetensors"]
    assert card_meta(repos["me/sst2-prompt"])["prompts"][0]["metrics"] == {"dev": {"accuracy": 0.9}}

    q = sp.from_pretrained("me/sst2-prompt", base)
    assert torch.equal(q.injection.embeds, p.injection.embeds) and q.metrics == p.metrics
    with pytest.raises(PromptFileError, match="Could not download hub repo 'me/missing'"):
        sp.from_pretrained("me/missing")


def test_cli_push_and_pull(base, sst2, tmp_path, fake_hub, capsys):
    from softprompt.commands import main

    path = random_soft_prompt(base, sst2.spec).save(tmp_path / "local" / "sst2")
    assert main(["push", str(path), "me/p"]) == 0
    assert main(["pull", "me/p", "--out", str(tmp_path / "pulled")]) == 0
    assert "sst2.safetensors" in capsys.readouterr().out
    assert list(prompt_files(tmp_path / "pulled")) == ["sst2.safetensors"]
    assert main(["push", str(tmp_path / "nothing"), "me/p"]) == 2


def _card_row(directory, name: str) -> str:
    return next(line for line in (Path(directory) / "README.md").read_text().splitlines() if f"`{name}`" in line)


def test_the_card_metrics_column_shows_the_final_evaluation_else_the_in_training_best(base, sst2, tmp_path):
    """A run with --no-final-eval keeps only the in-training evaluation that picked the prompt: the card's metrics
    column shows it with its split and rows (it used to say '-'). A final evaluation takes its place; zero-shot and a
    search's own rows and reference template are not the prompt's results, in the column or in the model index."""
    best = {"accuracy": 0.8125, "macro_f1": 0.8, "n": 16, "split": "dev"}
    p = random_soft_prompt(base, sst2.spec, metrics={"best_during_training": best})
    write_model_card(p.save(tmp_path / "quick").parent)
    assert _card_row(tmp_path, "quick.safetensors").endswith(
        "| dev accuracy 0.8125, macro_f1 0.8 (16 rows), best during training |"
    )
    assert "model-index" not in card_meta(tmp_path)  # an in-training subset is no reported result

    metrics = {
        "best_during_training": best,
        "zero_shot": {"accuracy": 0.5, "n": 8, "split": "dev"},
        "dev": {"accuracy": 0.75, "n": 8, "split": "dev"},
        "search": {"accuracy": 0.9, "n": 12, "split": "train"},
        "dev_default_template": {"accuracy": 0.625, "n": 8, "split": "dev"},
    }
    (tmp_path / "quick.safetensors").unlink()
    write_model_card(random_soft_prompt(base, sst2.spec, metrics=metrics).save(tmp_path / "full").parent)
    assert _card_row(tmp_path, "full.safetensors").endswith("| dev accuracy 0.75 (8 rows) |")
    results = card_meta(tmp_path)["model-index"][0]["results"]
    assert [(r["dataset"]["split"], [m["value"] for m in r["metrics"]]) for r in results] == [("dev", [0.75])]
