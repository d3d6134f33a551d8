"""`softprompt search templates`, `search autoprompt` and `explain`: hard prompts, and soft prompts read as words."""

from __future__ import annotations

import dataclasses
import json

from ..data import TaskSpec, load_task
from ..explain import METRICS, explain
from ..search import (
    CANDIDATES_DIR,
    SLOT,
    AutoPromptConfig,
    Candidates,
    Scored,
    autoprompt,
    dev_split,
    fill,
    hard_prompt,
    score_spec,
    score_templates,
    slotted,
)
from ..store import Prompt, load_prompt
from .options import (
    add_dataclass_options,
    add_input_options,
    add_model_options,
    add_overwrite_option,
    add_task_options,
    check_out,
    console,
    fmt_metrics,
    load_base,
    pick,
    save_prompt,
)


def _ci(m: dict | None) -> str:
    if not m:
        return "-"
    lo, hi = m["accuracy_ci95"]
    return f"{100 * m['accuracy']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def _words(spec: TaskSpec) -> str:
    return "/".join(spec.labels.values())


def _points(a: dict, b: dict) -> str:
    return f"{100 * (a['accuracy'] - b['accuracy']):+.1f} points"


def _verdict(results: list[Scored], own: Scored, split: str) -> str:
    """Which template won on the search rows (the task's own or a found one), by how much, and its `split` numbers."""
    best, n = results[0], results[0].search["n"]
    if not best.own:
        return (
            f"found {best.spec.template!r} with {_words(best.spec)}: {_points(best.search, own.search)} over the "
            f"task's own on the {n} search rows ({_ci(best.search)} vs {_ci(own.search)}); {split} {_ci(best.dev)} "
            f"vs the task's own {_ci(own.dev)}"
        )
    found = next((s for s in results if not s.own), None)
    than = "" if found is None else f", {_points(own.search, found.search)} over the best found ({_ci(found.search)})"
    dev = "" if found is None or found.dev is None else f" vs the best found's {_ci(found.dev)}"
    return (
        f"kept the task's own {own.spec.template!r} with {_words(own.spec)}: it ranks first on the {n} search rows "
        f"({_ci(own.search)}{than}); {split} {_ci(own.dev)}{dev}"
    )


def cmd_templates(ns) -> None:
    from rich.table import Table

    task = load_task(ns.task, ns.data_dir)
    candidates = Candidates.load(ns.candidates, task.spec)
    out = check_out(ns.out or f"prompts/{task.name}-hard.safetensors", ns.overwrite)  # before the model loads
    base = load_base(ns)
    base.check_max_length(ns.max_length)
    results, own = score_templates(
        base,
        task,
        candidates,
        ns.search_size,
        ns.finalists,
        ns.split,
        ns.limit,
        ns.seed,
        ns.batch_size,
        ns.progress,
        ns.search_min_words,
        ns.truncate,
        ns.max_length,
    )
    best = results[0]
    n_search, n_dev = best.search["n"], best.dev["n"]
    t = Table(
        title=f"{task.name}: {len(candidates.templates)} templates x "
        f"{candidates.num_combinations // len(candidates.templates)} verbalizers, and the task's own; "
        "accuracy % [95% bootstrap CI]",
        show_lines=False,
    )
    for col in ("#", "template", "label words", f"search ({n_search} train rows)", f"{ns.split} ({n_dev} rows)"):
        t.add_column(col)
    for i, s in enumerate(results, 1):
        mark = " (the task's own)" if s.own else ""
        t.add_row(str(i), repr(s.spec.template) + mark, _words(s.spec), _ci(s.search), _ci(s.dev))
    c = console()
    c.print(t)
    search = {
        "search": "templates",
        "candidates": str(ns.candidates or CANDIDATES_DIR / f"{task.name}.yaml"),
        "search_size": n_search,
        "search_min_words": ns.search_min_words,
        "seed": ns.seed,
        "kept": "own" if best.own else "found",
    }
    metrics = {
        "search": {**best.search, "split": "train"},
        ns.split: {**best.dev, "split": ns.split},
        f"{ns.split}_default_template": {**own.dev, "split": ns.split},
    }
    path = save_prompt(hard_prompt(base, best.spec, search, metrics), out, ns.overwrite)
    c.print(f"{_verdict(results, own, ns.split)}; saved [bold]{path}[/]")


def cmd_autoprompt(ns) -> None:
    task = load_task(ns.task, ns.data_dir)
    config = AutoPromptConfig(**pick(ns, [f.name for f in dataclasses.fields(AutoPromptConfig)]))
    out = check_out(ns.out or f"prompts/{task.name}-autoprompt.safetensors", ns.overwrite)  # before the model loads
    base = load_base(ns)
    base.check_max_length(ns.max_length)
    spec = Prompt.load(ns.start, base).spec if ns.start else task.spec
    fitting = {"truncate": ns.truncate, "max_length": ns.max_length}
    result = autoprompt(base, task, config, spec, ns.template, ns.progress, **fitting)
    dev = dev_split(task, ns.split, ns.limit, config.seed)
    start = fill(spec, slotted(ns.template or spec.template), "")
    kw = {"batch_size": ns.batch_size, "progress": ns.progress, **fitting}
    before = {**score_spec(base, task, start, dev, **kw), "split": ns.split}
    after = {**score_spec(base, task, result.spec, dev, **kw), "split": ns.split}
    search = {
        "search": "autoprompt",
        **dataclasses.asdict(config),
        "triggers": result.triggers,
        "start_template": start.template,
        "selection": result.selection,
    }
    metrics = {ns.split: after, f"{ns.split}_start_template": before}
    path = save_prompt(hard_prompt(base, result.spec, search, metrics), out, ns.overwrite)
    c = console()
    if result.selection:
        kept = result.selection[result.kept]
        of = f" (restart {kept['restart']} of {config.restarts})" if config.restarts > 1 else ""
        c.print(
            f"kept the trigger {kept['trigger']!r}{of} of {len(result.selection)} visited: accuracy "
            f"{100 * kept['accuracy']:.1f} on {config.select_rows} held-out search rows "
            f"(the last one: {100 * result.selection[-1]['accuracy']:.1f})"
        )
    c.print(f"start  {start.template!r}: {ns.split} accuracy {_ci(before)}")
    c.print(
        f"found  {result.spec.template!r}: {ns.split} accuracy {_ci(after)} "
        f"({100 * (after['accuracy'] - before['accuracy']):+.1f} points); saved [bold]{path}[/]"
    )


def _common(p) -> None:

    p.add_argument("--config", help="YAML/JSON file of options (keys = long option names); flags override it")
    add_task_options(p)
    add_model_options(p)
    add_input_options(p)
    g = p.add_argument_group("reporting")
    g.add_argument("--split", default="dev", help="split every reported number comes from (never searched on)")
    g.add_argument("--limit", type=int, default=None, help="score a fixed random subset of the report split")
    g.add_argument("--batch-size", type=int, default=32, help="evaluation batch size")


def add_commands(sub) -> None:

    s = sub.add_parser(
        "search",
        help="hard prompt tuning: score templates and label words, or search trigger tokens",
        description="Search a plain-text prompt on a split carved from train; report it on dev and "
        "save it as a prompt file of method `hard` (no tensors).",
    )
    kinds = s.add_subparsers(dest="search_kind", metavar="KIND", required=True)
    t = kinds.add_parser("templates", help="score candidate templates x label words; keep the best")
    _common(t)
    t.add_argument(
        "--candidates",
        help="YAML file with `templates:` and optional `labels:` "
        "(default: the task's built-in tasks/candidates/TASK.yaml)",
    )
    t.add_argument("--search-size", type=int, default=256, help="rows of train every candidate is scored on")
    t.add_argument(
        "--search-min-words",
        type=int,
        default=0,
        help="only search on train rows with at least this many words of input",
    )
    t.add_argument("--finalists", type=int, default=3, help="best candidates also scored on the report split")
    t.add_argument("--seed", type=int, default=0, help="seed of the search split and the bootstrap")
    t.add_argument("--out", help="prompt file to write (default: prompts/TASK-hard.safetensors)")
    add_overwrite_option(t)
    t.set_defaults(handler=cmd_templates, needs_task=True)
    a = kinds.add_parser("autoprompt", help="gradient-guided trigger token search (AutoPrompt)")
    _common(a)
    add_dataclass_options(a, AutoPromptConfig, "autoprompt")
    a.add_argument(
        "--template", help=f"template with a {SLOT} slot for the triggers (default: the task's, slot at its end)"
    )
    a.add_argument(
        "--start", help="a hard prompt file (e.g. from `search templates`) whose template and words to start from"
    )
    a.add_argument("--out", help="prompt file to write (default: prompts/TASK-autoprompt.safetensors)")
    add_overwrite_option(a)
    a.set_defaults(handler=cmd_autoprompt, needs_task=True)
    _explain_parser(sub)


def cmd_explain(ns) -> None:
    from rich.table import Table

    base = load_base(ns)
    prompt = load_prompt(ns.file, base)
    task = None if ns.no_score else load_task(ns.task or prompt.task["name"], ns.data_dir)
    base.check_max_length(ns.max_length)
    out = explain(
        base, prompt, task, ns.split, ns.limit, ns.top_k, ns.batch_size, ns.progress, ns.truncate, ns.max_length
    )
    if ns.json:
        print(json.dumps(out))
        return
    t = Table(title=f"{ns.file}: nearest vocabulary tokens of each virtual token")
    for col in ("#", "by cosine (similarity)", "by L2 (distance)"):
        t.add_column(col)
    for p, row in enumerate(out["tokens"]):
        t.add_row(str(p), *(", ".join(f"{w!r} {v:.2f}" for w, v in row[m]) for m in METRICS))
    c = console()
    c.print(t)
    for metric in METRICS:
        c.print(f"projected ({metric}): {out['projected'][metric]!r}")
    for name, m in out.get("scores", {}).items():
        c.print(f"{ns.split} {name}: {fmt_metrics(m)} (n={m['n']})")


def _explain_parser(sub) -> None:
    e = sub.add_parser(
        "explain",
        help="read a soft prompt as its nearest vocabulary tokens and score that hard prompt",
        description="Map each virtual token of a soft prompt to its nearest vocabulary tokens (cosine "
        "and L2), and score the projected hard prompt next to the soft prompt.",
    )
    e.add_argument("file", help="prompt file (.safetensors) with virtual-token embeddings")
    e.add_argument("--task", help="task to score on (default: the prompt's own task, as a built-in task)")
    e.add_argument("--data-dir", default=None, help="folder with the task's data files")
    add_model_options(e)
    e.add_argument("--top-k", type=int, default=5, help="nearest tokens listed per virtual token")
    e.add_argument("--split", default="dev", help="split to score on")
    e.add_argument("--limit", type=int, default=None, help="score a fixed random subset of the split")
    e.add_argument("--batch-size", type=int, default=32, help="evaluation batch size")
    add_input_options(e)
    e.add_argument("--no-score", action="store_true", help="only list the nearest tokens")
    e.add_argument("--json", action="store_true", help="print JSON")
    e.set_defaults(handler=cmd_explain)
