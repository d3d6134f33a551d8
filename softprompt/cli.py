"""The `softprompt` command line.

Options of methods and of the training loop are generated from their config dataclasses (the
field help becomes the --help text), so the CLI is the API. Any option can also come from a YAML
or JSON file given with --config; flags on the command line win. User mistakes print one line
naming the problem and the fix, and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
import time
import types
import typing
from pathlib import Path

from .errors import ConfigError, SoftpromptError

# --- options from dataclasses --------------------------------------------------------------------------------------

def _add_field(group, f: dataclasses.Field, hint, default, help_text: str) -> None:
    """One --option for a dataclass field; `X | None` fields also accept 'none'."""
    args = typing.get_args(hint)
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args
    typ = next(a for a in args if a is not type(None)) if optional else hint
    flag = "--" + f.name.replace("_", "-")
    if typ is bool:
        group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=help_text)
    else:
        group.add_argument(flag, dest=f.name, type=_optional(typ) if optional else typ, default=default,
                           help=help_text, metavar=f.name.upper())


def _optional(typ):
    def conv(text: str):
        return None if text.lower() in ("none", "null", "") else typ(text)

    conv.__name__ = typ.__name__
    return conv


def add_dataclass_options(parser, cls, group_title: str) -> list[str]:
    """Add one --option per field of `cls`, with the field's help and default."""
    group = parser.add_argument_group(group_title)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        _add_field(group, f, hints[f.name], default, f"{f.metadata.get('help', '')} (default: {default})")
    return [f.name for f in dataclasses.fields(cls)]


def _pick(ns: argparse.Namespace, names) -> dict:
    return {n: getattr(ns, n) for n in names if hasattr(ns, n)}


# --- method options: the union of every method's fields, validated against the chosen one --------------------------

def add_method_options(parser) -> list[str]:
    """--method plus every method's options; unset ones stay absent so each method keeps its own defaults."""
    from .methods import METHODS

    group = parser.add_argument_group("method", "options of the prompt method (each applies to the methods named)")
    group.add_argument("--method", default="soft", choices=sorted(METHODS), help="prompt method (default: soft)")
    # field name -> {help text -> [methods]}: a shared option may mean slightly different things per method
    helps: dict[str, dict[str, list[str]]] = {}
    first: dict[str, tuple] = {}
    for name, cls in sorted(METHODS.items()):
        hints = typing.get_type_hints(cls.config_class)
        for f in dataclasses.fields(cls.config_class):
            default = f.default if f.default is not dataclasses.MISSING else None
            text = f"{f.metadata.get('help', '')} (default {default})"
            helps.setdefault(f.name, {}).setdefault(text, []).append(name)
            first.setdefault(f.name, (f, hints[f.name]))
    for fname, by_help in helps.items():
        f, hint = first[fname]
        parts = [f"[{'all methods' if len(ms) == len(METHODS) else ', '.join(ms)}] {text}" for text, ms in by_help.items()]
        _add_field(group, f, hint, argparse.SUPPRESS, "; ".join(parts))
    return list(helps)


def method_config_from(ns: argparse.Namespace, names: list[str]):
    from .methods import get_method

    cls = get_method(ns.method).config_class
    valid = {f.name for f in dataclasses.fields(cls)}
    given = _pick(ns, names)
    wrong = sorted(set(given) - valid)
    if wrong:
        flags = ", ".join("--" + w.replace("_", "-") for w in wrong)
        raise ConfigError(f"Option(s) {flags} do not apply to method '{ns.method}'.",
                          "drop them, or choose a method they belong to (see `softprompt train --help`).")
    return cls(**given)


# --- config files ----------------------------------------------------------------------------------------------------

def apply_config_file(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Read --config FILE (YAML or JSON) and make its keys the parser's defaults."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if not known.config:
        return
    from .fileio import read_mapping

    path = Path(known.config)
    values = read_mapping(path, "Config file", "map option names to values: write `steps: 150` style lines.")
    dests = {a.dest for a in parser._actions}
    values = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - dests)
    if unknown:
        raise ConfigError(f"Config file {path} has unknown option(s) {unknown}.",
                          "use the long option names from --help (with - or _).")
    parser.set_defaults(**values)


# --- shared option groups --------------------------------------------------------------------------------------------

def add_model_options(parser):
    g = parser.add_argument_group("model")
    g.add_argument("--model", default="smollm2",
                   help="base model: 'smollm2' (embedded default), a local Hugging Face directory, or a hub id")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    g.add_argument("--dtype", default="auto", help="float32, bfloat16, float16, auto (float32 on CPU, bf16 on CUDA)")


def add_task_options(parser):
    from .data import builtin_tasks

    g = parser.add_argument_group("task")
    # not `required=True`: argparse would demand the flag even when a --config file gives it
    g.add_argument("--task", help=f"built-in task ({', '.join(builtin_tasks())}) or a YAML/JSON task spec file")
    g.add_argument("--data-dir", default=None, help="folder with the task's data files (default: $SOFTPROMPT_DATA, "
                   "./shared/data or ../shared/data for built-in tasks; the spec's folder otherwise)")


def _load_base(ns):
    from .base import load_base

    return load_base(ns.model, device=ns.device, dtype=ns.dtype)


def _console():
    from rich.console import Console

    return Console()


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return str(n)


def _fmt_metrics(m: dict | None) -> str:
    if not m:
        return "-"
    from .evaluate import scalar_metrics

    return ", ".join(f"{k} {100 * v:.1f}%" if k in ("accuracy", "macro_f1") else f"{k} {v:.1f}"
                     for k, v in scalar_metrics(m).items())


# --- commands --------------------------------------------------------------------------------------------------------

def cmd_train(ns, method_names):
    from .data import load_task
    from .train import TrainConfig, train

    cfg = TrainConfig(**_pick(ns, [f.name for f in dataclasses.fields(TrainConfig)]))
    method_cfg = method_config_from(ns, method_names)
    task = load_task(ns.task, ns.data_dir)
    base = _load_base(ns)
    run_dir = Path(ns.run_dir or f"runs/{task.name}-{ns.method}")
    result = train(base, task, ns.method, method_cfg, cfg, run_dir=run_dir, resume=ns.resume)
    from accelerate import PartialState

    if not PartialState().is_main_process:  # under `accelerate launch`, only the first process writes and prints
        return
    out = Path(ns.out or f"prompts/{task.name}-{ns.method}.safetensors")
    path = result.prompt.save(out)
    c = _console()
    c.print(f"saved [bold]{path}[/] ({_fmt_bytes(path.stat().st_size)}); run record in {run_dir}/")
    m = result.prompt.metrics
    c.print(f"zero-shot: {_fmt_metrics(m.get('zero_shot'))}   tuned: {_fmt_metrics(m.get(cfg.eval_split))}   "
            f"{result.seconds_per_step:.2f} s/step")


def cmd_eval(ns):
    from .data import load_task
    from .evaluate import evaluate
    from .store import load_prompt

    task = load_task(ns.task, ns.data_dir)
    base = _load_base(ns)
    prompt = load_prompt(ns.prompt, base) if ns.prompt else None
    t = time.perf_counter()
    metrics = evaluate(base, task, prompt, split=ns.split, limit=ns.limit, batch_size=ns.batch_size,
                       truncate=ns.truncate, progress=True)
    metrics["seconds"] = round(time.perf_counter() - t, 2)
    print(json.dumps({"task": task.name, "split": ns.split, "prompt": ns.prompt or "(template only)", **metrics}))


def cmd_generate(ns):
    from .data import Encoder, load_task
    from .evaluate import generate_texts
    from .generate import Sampling
    from .injection import EMPTY
    from .store import load_prompt

    if not ns.prompt and not ns.task:
        raise ConfigError("generate needs a prompt file or a task.", "pass --prompt FILE, or --task for its template.")
    if ns.max_new_tokens is not None and ns.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {ns.max_new_tokens}.", "pass 1 or more (or leave it out).")
    base = _load_base(ns)
    if ns.prompt:
        prompt = load_prompt(ns.prompt, base)
        spec, injection = prompt.spec, prompt.injection
    else:
        spec, injection = load_task(ns.task, ns.data_dir).spec, EMPTY
    texts = ns.inputs or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    rendered = [t if ns.raw else render_input(spec, t) for t in texts]
    enc = Encoder(spec, base, ns.truncate)
    max_new = ns.max_new_tokens or spec.max_new_tokens
    import torch

    g = torch.Generator(device=base.device).manual_seed(ns.seed)
    outs = generate_texts(base, enc, rendered, injection, max_new, use_cache=not ns.no_cache,
                          sampling=Sampling(ns.temperature, ns.top_p, ns.top_k), generator=g)
    for o in outs:
        print(json.dumps({"output": o}) if ns.json else o)


def render_input(spec, text: str) -> str:
    """Fill the template from one input: a plain string for a one-field template, else a JSON object."""
    fields = spec.template_fields
    if text.lstrip().startswith("{"):
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"Input is not valid JSON: {e}", "pass a JSON object of the template's fields.") from e
    elif len(fields) == 1:
        row = {spec.column(fields[0]): text}
    else:
        raise ConfigError(f"The template has fields {fields}; a plain string can only fill one.",
                          'pass a JSON object, e.g. \'{"premise": "...", "hypothesis": "..."}\'.')
    missing = [f for f in fields if spec.column(f) not in row]
    if missing:
        raise ConfigError(f"Input lacks the template field(s) {missing}.", f"give all of {fields}.")
    return spec.render(row)


def cmd_info(ns):
    from .store import info, load_prompt

    prompt = load_prompt(ns.file)
    d = info(prompt)
    d["file_bytes"] = Path(ns.file).stat().st_size
    if ns.json:
        print(json.dumps(d, indent=2))
        return
    from rich.table import Table

    t = Table(title=str(ns.file), show_header=False)
    tokens = f"{d['virtual_tokens']} virtual tokens" if d["virtual_tokens"] else "a text template, no tensors"
    t.add_row("method", f"{d['method']} ({tokens})")
    t.add_row("task", str(d["task"]))
    t.add_row("base model", str(d["base_model"]))
    t.add_row("parameters saved", f"{d['parameters_saved']:,}")
    t.add_row("parameters while training", f"{d['parameters_training']:,}")
    t.add_row("file size", _fmt_bytes(d["file_bytes"]))
    if d["base_parameters"]:
        t.add_row("full copy of the base model", f"{d['base_parameters']:,} parameters, {_fmt_bytes(d['base_bytes'])}")
        t.add_row("prompt / full copy", f"{100 * d['fraction_of_base']:.4f}% of the parameters, "
                                        f"1/{d['base_bytes'] / d['file_bytes']:,.0f} of the bytes")
    for k, v in d["metrics"].items():
        t.add_row(f"metrics: {k}", _fmt_metrics(v))
    _console().print(t)


def cmd_demo(ns):
    from .demo import run_demo

    run_demo(model=ns.model, device=ns.device, dtype=ns.dtype, steps=ns.steps, out=ns.out, data_dir=ns.data_dir)


# --- parser ----------------------------------------------------------------------------------------------------------

# Modules that add subcommands: each has `add_commands(subparsers)` and sets `handler` on its parsers.
EXTENSIONS: tuple[str, ...] = (
    "softprompt.peft_format",
    "softprompt.hub",
    "softprompt.serve",
    "softprompt.search",
    "softprompt.explain",
    "softprompt.bench",
)


def build_parser() -> argparse.ArgumentParser:
    from .train import TrainConfig

    p = argparse.ArgumentParser(prog="softprompt", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--version", action="version", version=f"softprompt {__import__('softprompt').__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="train a prompt on a task and save it as one small file",
                       description="Train a prompt (soft prompt, prefix, ...) on a task with a frozen base model. "
                                   "Evaluates the zero-shot template and the tuned prompt, writes metrics.jsonl, "
                                   "curves.png and a resumable checkpoint to --run-dir, and the prompt to --out.")
    t.add_argument("--config", help="YAML/JSON file of options (keys = long option names); flags override it")
    add_task_options(t)
    add_model_options(t)
    method_names = add_method_options(t)
    add_dataclass_options(t, TrainConfig, "training")
    g = t.add_argument_group("output")
    g.add_argument("--out", help="prompt file to write (default: prompts/TASK-METHOD.safetensors)")
    g.add_argument("--run-dir", help="folder for metrics, curves and checkpoints (default: runs/TASK-METHOD)")
    g.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="resume from the run folder's checkpoint when it holds the same run")
    t.set_defaults(handler=lambda ns: cmd_train(ns, method_names), needs_task=True)

    e = sub.add_parser("eval", help="score a prompt file (or the plain template) on a task split")
    e.add_argument("--config", help="YAML/JSON file of options")
    add_task_options(e)
    add_model_options(e)
    e.add_argument("--prompt", help="prompt file; omit to score the task's template zero-shot")
    e.add_argument("--split", default="dev", help="split to score")
    e.add_argument("--limit", type=int, default=None, help="score a fixed random subset of this many rows/inputs")
    e.add_argument("--batch-size", type=int, default=32, help="evaluation batch size")
    e.add_argument("--truncate", default="error", choices=["error", "left", "right"], help="over-long input policy")
    e.set_defaults(handler=cmd_eval, needs_task=True)

    gen = sub.add_parser("generate", help="continue inputs with a prompt file (batched, KV cache)")
    gen.add_argument("--config", help="YAML/JSON file of options")
    gen.add_argument("--prompt", help="prompt file (its template formats the inputs)")
    add_task_options(gen)
    add_model_options(gen)
    gen.add_argument("inputs", nargs="*", help="inputs: the value of a one-field template, or a JSON object of "
                                               "fields; read from stdin (one per line) when none are given")
    gen.add_argument("--raw", action="store_true", help="inputs are complete prompt texts; do not apply the template")
    gen.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's max_new_tokens")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    gen.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed")
    gen.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step (reference)")
    gen.add_argument("--truncate", default="error", choices=["error", "left", "right"], help="over-long input policy")
    gen.add_argument("--json", action="store_true", help="print one JSON object per output")
    gen.set_defaults(handler=cmd_generate)

    i = sub.add_parser("info", help="parameters, bytes and metrics of a prompt file, against a full model copy")
    i.add_argument("file", help="prompt file (.safetensors)")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(handler=cmd_info)

    d = sub.add_parser("demo", help="the main job: zero-shot vs soft prompt on SST-2 with the embedded SmolLM2")
    add_model_options(d)
    d.add_argument("--steps", type=int, default=150, help="training steps")
    d.add_argument("--out", default="prompts/sst2-soft.safetensors", help="where to save the prompt")
    d.add_argument("--data-dir", default=None, help="folder holding sst2/ (default: $SOFTPROMPT_DATA or ../shared/data)")
    d.set_defaults(handler=cmd_demo)

    for module in EXTENSIONS:
        importlib.import_module(module).add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    try:
        sub = parser._subparsers._group_actions[0].choices.get(argv[0]) if argv else None
        if sub is not None:
            apply_config_file(sub, argv[1:])
        ns = parser.parse_args(argv)
        if ns.command is None:
            parser.print_help()
            return 2
        if getattr(ns, "needs_task", False) and not ns.task:
            raise ConfigError(f"`softprompt {ns.command}` needs a task.", "pass --task NAME_OR_SPEC (or `task:` in --config).")
        ns.handler(ns)
        return 0
    except SoftpromptError as e:
        one_line = " ".join(e.problem.split())  # e.g. a YAML parser's message spans several lines
        print(f"softprompt: error: {one_line}", file=sys.stderr)
        if e.fix:
            print(f"  fix: {e.fix}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("softprompt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
