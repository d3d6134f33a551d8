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
    add_method_options,
    add_model_options,
    add_task_options,
    add_truncate_option,
    console,
    fmt_bytes,
    fmt_metrics,
    load_base,
    method_config_from,
    pick,
    save_prompt,
)


def cmd_train(ns, method_names: list[str]) -> None:
    from ..data import load_task
    from ..train import TrainConfig, is_main_process, train

    cfg = TrainConfig(**pick(ns, [f.name for f in dataclasses.fields(TrainConfig)]))
    method_cfg = method_config_from(ns, method_names)
    task = load_task(ns.task, ns.data_dir)
    base = load_base(ns)
    run_dir = Path(ns.run_dir or f"runs/{task.name}-{ns.method}")
    result = train(base, task, ns.method, method_cfg, cfg, run_dir=run_dir, resume=ns.resume)
    if not is_main_process():  # under `accelerate launch`, only the first process writes and prints
        return
    path = save_prompt(result.prompt, ns.out or f"prompts/{task.name}-{ns.method}.safetensors")
    c = console()
    c.print(f"saved [bold]{path}[/] ({fmt_bytes(path.stat().st_size)}); run record in {run_dir}/")
    m = result.prompt.metrics
    c.print(
        f"zero-shot: {fmt_metrics(m.get('zero_shot'))}   tuned: {fmt_metrics(m.get(cfg.eval_split))}   "
        f"{result.seconds_per_step:.2f} s/step"
    )


def cmd_eval(ns) -> None:
    from ..data import load_task
    from ..evaluate import evaluate
    from ..store import load_prompt

    task = load_task(ns.task, ns.data_dir)
    base = load_base(ns)
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
        progress=True,
    )
    metrics["seconds"] = round(time.perf_counter() - t, 2)
    print(json.dumps({"task": task.name, "split": ns.split, "prompt": ns.prompt or "(template only)", **metrics}))


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
    if ns.prompt:
        prompt = load_prompt(ns.prompt, base)
        spec, injection = prompt.spec, prompt.injection
    else:
        spec, injection = load_task(ns.task, ns.data_dir).spec, EMPTY
    texts = ns.inputs or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    rendered = [t if ns.raw else spec.render_input(t) for t in texts]
    enc = Encoder(spec, base, ns.truncate)
    g = torch.Generator(device=base.device).manual_seed(ns.seed)
    outs = generate_texts(
        base,
        enc,
        rendered,
        injection,
        ns.max_new_tokens or spec.max_new_tokens,
        use_cache=not ns.no_cache,
        sampling=Sampling(ns.temperature, ns.top_p, ns.top_k),
        generator=g,
    )
    for o in outs:
        print(json.dumps({"output": o}) if ns.json else o)


def cmd_info(ns) -> None:
    from ..store import info, load_prompt

    d = info(load_prompt(ns.file))
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
    t.add_row("file size", fmt_bytes(d["file_bytes"]))
    if d["base_parameters"]:
        t.add_row("full copy of the base model", f"{d['base_parameters']:,} parameters, {fmt_bytes(d['base_bytes'])}")
        t.add_row(
            "prompt / full copy",
            f"{100 * d['fraction_of_base']:.4f}% of the parameters, "
            f"1/{d['base_bytes'] / d['file_bytes']:,.0f} of the bytes",
        )
    for k, v in d["metrics"].items():
        t.add_row(f"metrics: {k}", fmt_metrics(v))
    console().print(t)


def cmd_demo(ns) -> None:
    from .demo import run_demo

    run_demo(model=ns.model, device=ns.device, dtype=ns.dtype, steps=ns.steps, out=ns.out, data_dir=ns.data_dir)


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
    add_task_options(t)
    add_model_options(t)
    method_names = add_method_options(t)
    add_dataclass_options(t, TrainConfig, "training")
    g = t.add_argument_group("output")
    g.add_argument("--out", help="prompt file to write (default: prompts/TASK-METHOD.safetensors)")
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
    add_truncate_option(gen)
    gen.add_argument("--json", action="store_true", help="print one JSON object per output")
    gen.set_defaults(handler=cmd_generate)


def add_commands(sub) -> None:
    _train_parser(sub)
    e = sub.add_parser("eval", help="score a prompt file (or the plain template) on a task split")
    e.add_argument("--config", help="YAML/JSON file of options")
    add_task_options(e)
    add_model_options(e)
    e.add_argument("--prompt", help="prompt file; omit to score the task's template zero-shot")
    e.add_argument("--split", default="dev", help="split to score")
    e.add_argument("--limit", type=int, default=None, help="score a fixed random subset of this many rows/inputs")
    e.add_argument("--batch-size", type=int, default=32, help="evaluation batch size")
    add_truncate_option(e)
    e.set_defaults(handler=cmd_eval, needs_task=True)
    _generate_parser(sub)
    i = sub.add_parser("info", help="parameters, bytes and metrics of a prompt file, against a full model copy")
    i.add_argument("file", help="prompt file (.safetensors)")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(handler=cmd_info)
    d = sub.add_parser("demo", help="the main job: zero-shot vs soft prompt on SST-2 with the embedded SmolLM2")
    add_model_options(d)
    d.add_argument("--steps", type=int, default=150, help="training steps")
    d.add_argument("--out", default="prompts/sst2-soft.safetensors", help="where to save the prompt")
    d.add_argument(
        "--data-dir", default=None, help="folder holding sst2/ (default: $SOFTPROMPT_DATA or ../shared/data)"
    )
    d.set_defaults(handler=cmd_demo)
