"""`softprompt export` / `import` (PEFT adapters) and `push` / `pull` (the Hugging Face Hub)."""

from __future__ import annotations

from pathlib import Path

from ..data import load_task
from ..errors import ConfigError, StorageError
from ..hub import local_dir, prompt_files, pull, push_to_hub
from ..peft_format import CONFIG, WEIGHTS, export_peft, import_peft, peft_config
from ..store import load_prompt
from .options import add_model_options, add_overwrite_option, check_out, load_base, save_prompt, write_card


def cmd_export(ns) -> None:
    if ns.format != "peft":
        raise ConfigError(f"Unknown export format '{ns.format}'.", "use --format peft.")
    prompt = load_prompt(ns.file)
    if (Path(ns.out_dir) / WEIGHTS).exists() and not ns.overwrite:
        raise StorageError(
            f"{Path(ns.out_dir) / WEIGHTS} already exists; the adapter there was not replaced.",
            "pass --overwrite to replace it, or another output folder.",
        )
    for note in export_peft(prompt, ns.out_dir, ns.base_model_name):
        print(f"note: {note}")
    write_card(ns.out_dir)
    print(f"wrote {Path(ns.out_dir) / CONFIG} and {WEIGHTS} (PEFT {peft_config(prompt)['peft_type']})")


def cmd_import(ns) -> None:
    out = check_out(ns.out, ns.overwrite)  # before the model loads
    base = load_base(ns)
    spec = load_task(ns.task, ns.data_dir).spec if ns.task else None
    prompt = import_peft(local_dir(ns.peft_dir, [CONFIG, WEIGHTS]), base, spec)
    path = save_prompt(prompt, out, ns.overwrite)
    print(f"saved {path} ({prompt.method}, {prompt.num_parameters:,} parameters) for {base.name}")


def _peft_parsers(sub) -> None:
    e = sub.add_parser(
        "export",
        help="write a prompt file in another library's format (PEFT)",
        description="Write a prompt file as a PEFT prompt-learning adapter (adapter_config.json + "
        "adapter_model.safetensors) that peft.PeftModel.from_pretrained loads.",
    )
    e.add_argument("--format", default="peft", choices=["peft"], help="target format")
    e.add_argument("file", help="prompt file (.safetensors)")
    e.add_argument("out_dir", help="folder to write the adapter to")
    e.add_argument(
        "--base-model-name",
        default=None,
        help="base_model_name_or_path to record (default: the model id in the prompt's fingerprint)",
    )
    add_overwrite_option(e, "replace an adapter already in out_dir")
    e.set_defaults(handler=cmd_export)

    i = sub.add_parser(
        "import",
        help="turn a PEFT prompt-learning adapter into a prompt file",
        description="Read a PEFT prompt tuning, P-tuning or prefix tuning adapter (a local folder or a "
        "hub repo) and save it as a softprompt prompt file for --model.",
    )
    i.add_argument(
        "peft_dir", help="PEFT adapter folder (adapter_config.json + adapter_model.safetensors) or hub repo id"
    )
    add_model_options(i)
    i.add_argument("--out", required=True, help="prompt file to write")
    add_overwrite_option(i)
    i.add_argument(
        "--task",
        default=None,
        help="task (built-in name or spec file) whose template the prompt uses "
        "(default: the adapter's softprompt metadata, else '{text}')",
    )
    i.add_argument("--data-dir", default=None, help="data folder of --task (only its template is used)")
    i.set_defaults(handler=cmd_import)


def cmd_push(ns) -> None:
    print(push_to_hub(ns.source, ns.repo_id, private=ns.private, commit_message=ns.message))


def cmd_pull(ns) -> None:
    out = pull(ns.repo_id, ns.out or ns.repo_id.split("/")[-1], ns.revision)
    print(f"downloaded {sorted(prompt_files(out))} to {out}")


def add_commands(sub) -> None:
    _peft_parsers(sub)
    p = sub.add_parser("push", help="upload prompt files and their model card to a Hugging Face Hub repo")
    p.add_argument("source", help="prompt file or folder of prompt files")
    p.add_argument(
        "repo_id", help="hub repo, e.g. user/sst2-prompts (created if missing; token from HF_TOKEN or `hf auth login`)"
    )
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--message", default=None, help="commit message")
    p.set_defaults(handler=cmd_push)

    q = sub.add_parser("pull", help="download a hub repo's prompt files")
    q.add_argument("repo_id", help="hub repo id")
    q.add_argument("--out", default=None, help="folder to download to (default: the repo name)")
    q.add_argument("--revision", default=None, help="branch, tag or commit")
    q.set_defaults(handler=cmd_pull)
