"""Hugging Face Hub conventions: model cards, push and pull, and `from_pretrained`.

A prompt-file directory (a store, `prompts/`, a hub repo) carries a model card, README.md, whose
YAML front matter lists the base model, and for every prompt file its method, task, metrics and
parameter count; it is rewritten whenever softprompt saves a prompt file there (a README.md that
softprompt did not write is left alone). `push_to_hub` uploads prompt files with their card through
`huggingface_hub.HfApi`, `from_pretrained` loads a prompt from a file, a directory or a hub repo
(downloaded with `snapshot_download`, so the hub cache and offline mode work as for models).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from .errors import ConfigError, PromptFileError
from .fileio import atomic_write_text, peek_metadata
from .store import SUFFIX, Prompt

CARD = "README.md"
_MARK = "<!-- softprompt model card: rewritten when prompt files are saved here -->"
_PATTERNS = ["*.safetensors", "*.json", CARD]  # what a prompt repo holds; never pickles


def prompt_files(directory: str | Path) -> dict[str, dict]:
    """{file name: softprompt metadata} of the prompt files (and exported PEFT adapters) in a directory."""
    d = Path(directory)
    found = {p.name: peek_metadata(p) for p in sorted(d.glob(f"*{SUFFIX}")) if not p.name.startswith(".")}
    return {k: v for k, v in found.items() if v is not None}


def _eval_metrics(metrics: dict) -> dict:
    """{split: {metric: value}} of the final evaluations of the prompt: entries named by their split, so not zero-shot,
    not the in-training best, not a search's own rows or its reference template (they name another split).

    Only scalar metrics: intervals such as a hard prompt's `accuracy_ci95` stay in the file's metadata.
    """
    from .evaluate import scalar_metrics

    return {
        split: scalar_metrics(m)
        for split, m in metrics.items()
        if split not in ("zero_shot", "best_during_training") and isinstance(m, dict) and m.get("split", split) == split
    }


def _metrics_cell(metrics: dict) -> str:
    """A card's metrics column: the final evaluations with their rows, else the in-training evaluation that picked the
    prompt (a run with --no-final-eval), else '-'."""
    from .evaluate import scalar_metrics

    def scored(m: dict) -> str:
        rows = f" ({m['n']:,} rows)" if "n" in m else ""
        return ", ".join(f"{k} {v:.4g}" for k, v in scalar_metrics(m).items()) + rows

    final = {s: m for s, m in metrics.items() if s in _eval_metrics(metrics)}
    if final:
        return "; ".join(f"{s} {scored(m)}" for s, m in final.items())
    best = metrics.get("best_during_training")
    if isinstance(best, dict) and scalar_metrics(best):
        return f"{best.get('split', 'dev')} {scored(best)}, best during training"
    return "-"


def _load_name(model_id: str) -> str:
    """What to pass to `load_base` for a fingerprint's model: the embedded alias, or the id itself."""
    from .base import EMBEDDED_MODELS

    return next((alias for alias, (_, desc) in EMBEDDED_MODELS.items() if desc == model_id), model_id)


def _card_entry(name: str, m: dict, hub_model_id) -> dict:
    """One prompt file's row of a model card, from its metadata `m`."""
    return {
        "file": name,
        "method": m["method"],
        "task": m["task"].get("name"),
        "base_model": hub_model_id(m["base"]["model_id"]),
        "virtual_tokens": m["method_config"].get("num_virtual_tokens"),
        "parameters": m["parameters"]["saved"],
        "parameters_training": m["parameters"]["training"],
        "metrics": m.get("metrics", {}),
        "template": m["task"].get("template"),
    }


def _card_worthy(name: str, m: dict) -> bool:
    """Whether a file's metadata is whole enough for a card row: a malformed file is left out, never a failed card."""
    from .store import check_meta

    try:
        check_meta({**m, "format": "softprompt"} if isinstance(m, dict) else m, name)
    except PromptFileError:
        return False
    return True


def _eval_results(entry: dict, meta: dict) -> list:
    """The hub's `EvalResult`s of a card's only prompt: one per split and metric."""
    from huggingface_hub import EvalResult

    kind = "text-classification" if meta["task"].get("labels") else "text-generation"
    return [
        EvalResult(
            task_type=kind,
            dataset_type=entry["task"],
            dataset_name=entry["task"],
            dataset_split=split,
            metric_type=k,
            metric_value=v,
        )
        for split, m in _eval_metrics(entry["metrics"]).items()
        for k, v in m.items()
    ]


def model_card(directory: str | Path, name: str | None = None) -> str | None:
    """The README.md text for the prompt files in `directory` (None when it holds none); `name`: the repo's."""
    from huggingface_hub import ModelCardData

    from .peft_format import CONFIG, hub_model_id

    files = {name: m for name, m in prompt_files(directory).items() if _card_worthy(name, m)}
    if not files:
        return None
    peft = (Path(directory) / CONFIG).is_file()
    entries = [_card_entry(name, m, hub_model_id) for name, m in files.items()]
    bases = sorted({e["base_model"] for e in entries})
    results = _eval_results(entries[0], files[entries[0]["file"]]) if len(entries) == 1 else []
    data = ModelCardData(
        base_model=bases[0] if len(bases) == 1 else bases,
        library_name="peft" if peft else "softprompt",
        pipeline_tag="text-generation",
        tags=["softprompt", "prompt-tuning"] + sorted({e["method"] for e in entries}),
        metrics=sorted({r.metric_type for r in results}) or None,
        model_name=(name or Path(directory).resolve().name) if results else None,
        eval_results=results or None,
        prompts=entries,
    )
    rows = "\n".join(
        f"| `{e['file']}` | {e['task']} | {e['method']} | {e['virtual_tokens']} | {e['parameters']:,} | "
        f"{_metrics_cell(e['metrics'])} |"
        for e in entries
    )
    load_name = _load_name(next(iter(files.values()))["base"]["model_id"])
    use = (
        'from peft import PeftModel\nmodel = PeftModel.from_pretrained(base_model, "REPO_OR_DIR")'
        if peft
        else f"import softprompt as sp\nbase = sp.load_base({load_name!r})\n"
        f'prompt = sp.from_pretrained("REPO_OR_DIR", base{"" if len(entries) == 1 else ", filename=..."})'
    )
    return (
        f"---\n{data.to_yaml()}\n---\n{_MARK}\n\n# Prompts for {', '.join(bases)}\n\n"
        f"Prompts trained with softprompt for a frozen base model: each file is small and is verified against the "
        f"model's fingerprint when it loads.\n\n"
        f"| file | task | method | virtual tokens | parameters | metrics |\n|---|---|---|---|---|---|\n{rows}\n\n"
        f"```python\n{use}\n```\n"
    )


def write_model_card(directory: str | Path, name: str | None = None) -> Path | None:
    """(Re)write `directory/README.md` for its prompt files; a README.md softprompt did not write is kept."""
    path = Path(directory) / CARD
    if path.exists() and _MARK not in path.read_text(errors="replace"):
        return None
    text = model_card(directory, name)
    return atomic_write_text(path, text) if text else None


# --- hub -------------------------------------------------------------------------------------------------------------


def local_dir(path_or_repo: str | Path, patterns: list[str] | None = None, revision: str | None = None) -> Path:
    """A local file or directory as is; anything else is taken as a hub repo id and downloaded (to the hub cache)."""
    p = Path(path_or_repo)
    if p.exists():
        return p
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(str(path_or_repo), revision=revision, allow_patterns=patterns or _PATTERNS))
    except HFValidationError as e:
        raise PromptFileError(
            f"'{path_or_repo}' is neither a local path nor a hub repo id ({e}).",
            "pass an existing file or folder, or a repo id like 'user/sst2-prompt'.",
        ) from e
    except Exception as e:  # network, auth and not-found errors come in many types
        raise PromptFileError(
            f"Could not download hub repo '{path_or_repo}': {type(e).__name__}: {e}",
            "check the repo id, your network and HF_TOKEN (or HF_HUB_OFFLINE=1 with a cached copy).",
        ) from e


def from_pretrained(
    path_or_repo: str | Path, base=None, filename: str | None = None, revision: str | None = None
) -> Prompt:
    """Load a prompt from a prompt file, a directory of them, a PEFT adapter folder, or a hub repo.

    base: verify the prompt against this model (required for PEFT adapters, which carry no fingerprint).
    filename: which prompt file, when the directory or repo holds several.
    """
    from .peft_format import CONFIG, import_peft

    p = local_dir(path_or_repo, revision=revision)
    if p.is_file():
        return Prompt.load(p, base)
    files = prompt_files(p)
    if filename is not None:
        if not (p / filename).is_file():
            raise PromptFileError(f"{path_or_repo} has no file '{filename}'.", f"use one of {sorted(files)}.")
        return Prompt.load(p / filename, base)
    if (p / CONFIG).is_file():
        if base is None:
            raise ConfigError(
                f"{path_or_repo} is a PEFT adapter; its prompt is only defined for a base model.",
                "pass base=load_base(...) (the model the adapter was trained for).",
            )
        return import_peft(p, base)
    if len(files) != 1:
        raise PromptFileError(
            f"{path_or_repo} holds {len(files)} prompt files{f' {sorted(files)}' if files else ''}.",
            "pass filename=... to choose one." if files else "pass a folder with a prompt file.",
        )
    return Prompt.load(p / next(iter(files)), base)


def push_to_hub(
    source: Prompt | str | Path,
    repo_id: str,
    filename: str | None = None,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload a prompt (a `Prompt`, a prompt file, or a folder of them) and its model card; returns the commit URL."""
    from huggingface_hub import HfApi

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        name = repo_id.split("/")[-1]
        if isinstance(source, Prompt):
            source.save(folder / (filename or f"{source.task.get('name', 'prompt')}-{source.method}{SUFFIX}"))
        elif Path(source).is_file():
            Prompt.load(source)  # refuse anything that is not a readable prompt file before uploading
            shutil.copy2(source, folder / (filename or Path(source).name))
        elif Path(source).is_dir():
            folder = Path(source)
        else:
            raise PromptFileError(f"Nothing to upload at {source}.", "pass a prompt file or a folder of them.")
        if not prompt_files(folder):
            raise PromptFileError(f"{source} holds no prompt files.", "pass a prompt file or a folder of them.")
        write_model_card(folder, name)
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            allow_patterns=_PATTERNS,
            commit_message=commit_message or "Upload prompts with softprompt",
        )
    return str(getattr(info, "commit_url", info))


def pull(repo_id: str, out: str | Path, revision: str | None = None) -> Path:
    """Download a hub repo's prompt files and card into `out`."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_dir=str(out), allow_patterns=_PATTERNS))
    except Exception as e:
        raise PromptFileError(
            f"Could not download hub repo '{repo_id}': {type(e).__name__}: {e}",
            "check the repo id, your network and HF_TOKEN.",
        ) from e
