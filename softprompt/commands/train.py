"""`softprompt train`, `eval`, `generate`, `info` and `demo`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from ..errors import ConfigError
from .options import (
    add_dataclass_options,
    add_input_options,
    add_method_options,
    add_model_options,
    add_overwrite_option,
    add_task_options,
    check_out,
    console,
    fmt_bytes,
    fmt_metrics,
    fmt_scored,
    load_base,
    load_task_from,
    method_config_from,
    pick,
    storage,
    write_card,
)


def cmd_train(ns, method_names: list[str]) -> None:
    from ..train import TrainConfig, is_main_process, train

    cfg = TrainConfig(**pick(ns, [f.name for f in dataclasses.fields(TrainConfig)]))
    method_cfg = method_config_from(ns, method_names)
    if ns.tasks:
        return cmd_train_source(ns, cfg, method_cfg)
    if ns.teacher:
        raise ConfigError("--teacher distills MPT's source stage.", "pass it with --method mpt --tasks A B ...")
    task = load_task_from(ns)
    task.check_split("train")  # before the model loads; a named eval split too (without dev, no evaluation)
    if cfg.eval_split != "dev":
        task.check_split(cfg.eval_split)
    out = check_out(ns.out or f"prompts/{task.name}-{ns.method}.safetensors", ns.overwrite)  # before the model loads
    base = load_base(ns)
    run_dir = Path(ns.run_dir or f"runs/{task.name}-{ns.method}")
    # the prompt file is written as training ends (checked again then), before the curves and the card
    result = train(
        base, task, ns.method, method_cfg, cfg, run_dir=run_dir, resume=ns.resume, out=out, overwrite=ns.overwrite
    )
    if not is_main_process():  # under `accelerate launch`, only the first process writes and prints
        return
    path = result.path
    write_card(path.parent)
    c = console()
    c.print(f"saved [bold]{path}[/] ({fmt_bytes(path.stat().st_size)}); run record in {run_dir}/")
    c.print(f"{_measured(result.prompt.metrics, cfg.eval_split)}   {result.seconds_per_step:.2f} s/step")


def cmd_train_source(ns, cfg, method_cfg) -> None:
    """`train --tasks A B ... --method mpt`: MPT's source stage, one prompt file per task and the source file."""
    from ..data import load_task
    from ..mpt_source import SOURCE_FILE, Distillation, SourceTrainer, output_files
    from ..train import is_main_process

    if ns.task or ns.method != "mpt":
        raise ConfigError(
            "--tasks trains one shared prompt on several tasks (MPT's source stage): it takes --method mpt, no --task.",
            "pass --method mpt --tasks A B ..., or --task NAME to train one task.",
        )
    distill = Distillation(_teachers(ns.teacher), ns.distill_weight, ns.distill_temperature)
    tasks = [load_task(name, ns.data_dir, ns.dev_from_train) for name in ns.tasks]
    label = "+".join(t.name for t in tasks)
    out = Path(ns.out or f"prompts/{label}-mpt")
    for path in output_files(out, [t.name for t in tasks]):  # before the model loads
        check_out(path, ns.overwrite)
    base = load_base(ns)
    run_dir = Path(ns.run_dir or f"runs/{label}-mpt")
    trainer = SourceTrainer(
        base, tasks, method_cfg, cfg, run_dir, ns.resume, out=out, overwrite=ns.overwrite, distill=distill
    )
    result = trainer.run()
    if not is_main_process():
        return
    write_card(out)
    c = console()
    c.print(f"saved {len(tasks)} task prompts and [bold]{out / SOURCE_FILE}[/] in {out}/; run record in {run_dir}/")
    for t, prompt in zip(tasks, trainer.prompts):
        c.print(f"  {t.name}: {_measured(prompt.metrics, cfg.eval_split)}")
    c.print(f"{result.seconds_per_step:.2f} s/step")


def _teachers(pairs: list[str]) -> dict[str, str]:
    """--teacher TASK=FILE values -> {task: file}."""
    out = {}
    for pair in pairs:
        task, sep, path = pair.partition("=")
        if not sep or not task or not path or task in out:
            raise ConfigError(
                f"--teacher {pair!r} is not TASK=FILE, or names a task twice.",
                "pass --teacher sst2=prompts/sst2-soft.safetensors, once per source task.",
            )
        out[task] = path
    return out


def _measured(metrics: dict, split: str) -> str:
    """What a run measured: its final evaluation (zero-shot and tuned, on the same rows of `split`), else the
    in-training evaluation that picked the prompt, else that nothing was evaluated."""
    final, best = metrics.get(split), metrics.get("best_during_training")
    if final:
        return f"zero-shot: {fmt_metrics(metrics.get('zero_shot'))}   tuned: {fmt_scored(final, split)}"
    if best:
        return f"best during training: {fmt_scored(best, best.get('split', split))}; no final evaluation"
    return f"not evaluated: the task has no '{split}' split"


def cmd_eval(ns) -> None:
    from ..evaluate import evaluate, primary_metric
    from ..store import load_prompt

    task = load_task_from(ns)
    task.check_split(ns.split)  # before the model loads
    base = load_base(ns)
    base.check_max_length(ns.max_length)
    prompt = load_prompt(ns.prompt, base) if ns.prompt else None
    t = time.perf_counter()
    metrics = evaluate(
        base,
        task,
        prompt,
        split=ns.split,
        limit=ns.limit,
        batch_size=ns.batch_size,
        truncate=ns.truncate,
        progress=ns.progress,
        max_length=ns.max_length,
    )
    metrics["seconds"] = round(time.perf_counter() - t, 2)
    where = {"task": task.name, "split": ns.split, "metric": primary_metric(task.spec)}
    print(json.dumps({**where, "prompt": ns.prompt or "(template only)", **metrics}))


def cmd_generate(ns) -> None:
    import torch

    from ..data import Encoder, load_task
    from ..evaluate import generate_texts
    from ..generate import Sampling
    from ..injection import EMPTY
    from ..store import load_prompt

    if not ns.prompt and not ns.task:
        raise ConfigError("generate needs a prompt file or a task.", "pass --prompt FILE, or --task for its template.")
    if ns.max_new_tokens is not None and ns.max_new_tokens < 1:
        raise ConfigError(
            f"--max-new-tokens must be >= 1, got {ns.max_new_tokens}.", "pass 1 or more (or leave it out)."
        )
    base = load_base(ns)
    base.check_max_length(ns.max_length)
    if ns.prompt:
        prompt = load_prompt(ns.prompt, base)
        spec, injection = prompt.spec, prompt.injection
    else:
        spec, injection = load_task(ns.task, ns.data_dir).spec, EMPTY
    texts = ns.inputs or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    rendered = [t if ns.raw else spec.render_input(t) for t in texts]
    enc = Encoder(spec, base, ns.truncate, ns.max_length)
    g = torch.Generator(device=base.device).manual_seed(ns.seed)
    outs = generate_texts(
        base,
        enc,
        rendered,
        injection,
        ns.max_new_tokens or spec.max_new_tokens,
        progress=ns.progress,
        use_cache=not ns.no_cache,
        sampling=Sampling(ns.temperature, ns.top_p, ns.top_k),
        generator=g,
        stop=spec.stop or (),  # the spec's own stops; without them, what the model writes up to end-of-sequence
    )
    for o in outs:
        print(json.dumps({"output": o}) if ns.json else o)


def cmd_info(ns) -> None:
    from ..evaluate import scalar_metrics
    from ..store import info, load_prompt

    d = info(load_prompt(ns.file))
    d["file_bytes"] = Path(ns.file).stat().st_size
    if ns.json:
        print(json.dumps(d, indent=2))
        return
    from rich.table import Table
    from rich.text import Text

    # Text cells: a file's metadata is shown as it is, never read as rich markup (a metric named "[/]" would raise)
    t = Table(title=Text(str(ns.file)), show_header=False)

    def row(name: str, value: str) -> None:
        t.add_row(Text(name), Text(value))

    tokens = f"{d['virtual_tokens']} virtual tokens" if d["virtual_tokens"] else "a text template, no tensors"
    row("method", f"{d['method']} ({tokens})")
    config = d["method_config"]
    if "init" in config:  # for prompt transfer, the prompt file it started from
        row("init", " from ".join(str(config[k]) for k in ("init", "init_prompt") if config.get(k) is not None))
    row("task", str(d["task"]))
    row("base model", str(d["base_model"]))
    row("parameters saved", f"{d['parameters_saved']:,}")
    row("parameters while training", f"{d['parameters_training']:,}")
    row("file size", fmt_bytes(d["file_bytes"]))
    if d["base_parameters"]:
        row("full copy of the base model", f"{d['base_parameters']:,} parameters, {fmt_bytes(d['base_bytes'])}")
        # integer arithmetic: a file's base size may be any integer, beyond what a float holds
        ratio = (d["base_bytes"] + d["file_bytes"] // 2) // d["file_bytes"]
        row(
            "prompt / full copy",
            f"{100 * d['fraction_of_base']:.4f}% of the parameters, 1/{ratio:,} of the bytes",
        )
    for k, v in d["metrics"].items():
        # metrics are any JSON value: those that hold no number are shown as they are in the file
        readable = isinstance(v, dict) and scalar_metrics(v)
        row(f"metrics: {k}", fmt_scored(v) if readable else json.dumps(v, ensure_ascii=False))
    console().print(t)


def cmd_demo(ns) -> None:
    from .demo import run_demo

    run_demo(
        model=ns.model,
        device=ns.device,
        dtype=ns.dtype,
        steps=ns.steps,
        out=ns.out,
        data_dir=ns.data_dir,
        overwrite=ns.overwrite,
        **storage(ns),
    )


def _train_parser(sub) -> None:
    from ..train import TrainConfig

    t = sub.add_parser(
        "train",
        help="train a prompt on a task and save it as one small file",
        description="Train a prompt (soft prompt, prefix, ...) on a task with a frozen base model. "
        "Evaluates the zero-shot template and the tuned prompt, writes metrics.jsonl, "
        "curves.png and a resumable checkpoint to --run-dir, and the prompt to --out.",
    )
    t.add_argument("--config", help="YAML/JSON file of options (keys = long option names); flags override it")
    add_task_options(t, dev_split=True)
    t.add_argument(
        "--tasks",
        nargs="+",
        metavar="TASK",
        help="MPT's source stage (--method mpt): train one shared prompt on these tasks together; --out is then a "
        "folder of one prompt file per task and source/mpt-source.safetensors, which a target task starts from",
    )
    d = t.add_argument_group("distillation", "MPT's source stage (--tasks): distill each task's teacher prompt")
    d.add_argument(
        "--teacher",
        action="append",
        default=[],
        metavar="TASK=FILE",
        help="a prompt file of this base model trained on that source task alone; repeat per task",
    )
    d.add_argument("--distill-weight", type=float, default=1.0, help="weight of the KL term (default 1.0)")
    d.add_argument("--distill-temperature", type=float, default=1.0, help="softmax temperature T (default 1.0)")
    add_model_options(t)
    method_names = add_method_options(t)
    add_dataclass_options(t, TrainConfig, "training")
    g = t.add_argument_group("output")
    g.add_argument(
        "--out",
        help="prompt file to write (default: prompts/TASK-METHOD.safetensors); with --tasks, a folder "
        "(default: prompts/A+B-mpt)",
    )
    add_overwrite_option(g)
    g.add_argument("--run-dir", help="folder for metrics, curves and checkpoints (default: runs/TASK-METHOD)")
    g.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="resume from the run folder's checkpoint when it holds the same run",
    )
    t.set_defaults(handler=lambda ns: cmd_train(ns, method_names), needs_task=True)


def _generate_parser(sub) -> None:
    gen = sub.add_parser("generate", help="continue inputs with a prompt file (batched, KV cache)")
    gen.add_argument("--config", help="YAML/JSON file of options")
    gen.add_argument("--prompt", help="prompt file (its template formats the inputs)")
    add_task_options(gen)
    add_model_options(gen)
    gen.add_argument(
        "inputs",
        nargs="*",
        help="inputs: the value of a one-field template, or a JSON object of "
        "fields; read from stdin (one per line) when none are given",
    )
    gen.add_argument("--raw", action="store_true", help="inputs are complete prompt texts; do not apply the template")
    gen.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's max_new_tokens")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    gen.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed")
    gen.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step (reference)")
    add_input_options(gen)
    gen.add_argument("--json", action="store_true", help="print one JSON object per output")
    gen.set_defaults(handler=cmd_generate)


def add_commands(sub) -> None:
    _train_parser(sub)
    e = sub.add_parser("eval", help="score a prompt file (or the plain template) on a task split")
    e.add_argument("--config", help="YAML/JSON file of options")
    add_task_options(e, dev_split=True)
    add_model_options(e)
    e.add_argument("--prompt", help="prompt file; omit to score the task's template zero-shot")
    e.add_argument("--split", default="dev", help="split to score")
    e.add_argument("--limit", type=int, default=None, help="score a fixed random subset of this many rows/inputs")
    e.add_argument("--batch-size", type=int, default=32, help="evaluation batch size")
    add_input_options(e)
    e.set_defaults(handler=cmd_eval, needs_task=True)
    _generate_parser(sub)
    i = sub.add_parser("info", help="parameters, bytes and metrics of a prompt file, against a full model copy")
    i.add_argument("file", help="prompt file (.safetensors)")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(handler=cmd_info)
    d = sub.add_parser("demo", help="the main job: zero-shot vs soft prompt on SST-2 with the embedded SmolLM2")
    add_model_options(d)
    d.add_argument("--steps", type=int, default=150, help="training steps")
    d.add_argument(
        "--out",
        default="prompts/sst2-soft.safetensors",
        help="where to save the prompt (an earlier demo's file there is replaced; any other file is kept)",
    )
    add_overwrite_option(d, "also replace a prompt file at --out that an earlier demo did not write")
    d.add_argument(
        "--data-dir", default=None, help="folder holding sst2/ (default: $SOFTPROMPT_DATA or ../shared/data)"
    )
    d.set_defaults(handler=cmd_demo)
