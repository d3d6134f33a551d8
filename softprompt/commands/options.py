"""What every command shares: options generated from config dataclasses, config files, the base model, output.

Options of methods, of the training loop and of the server come from their config dataclasses (a
field's help becomes its --help text), so the command line is the API. Any option can also come
from a YAML or JSON file given with --config; flags on the command line win.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path

from ..base import QUANTIZATIONS
from ..errors import ConfigError
from ..fileio import read_mapping

TRUNCATE_HELP = "over-long input policy: error, left (drop the start) or right (drop the end before the label)"

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
        group.add_argument(
            flag,
            dest=f.name,
            type=_optional(typ) if optional else typ,
            default=default,
            help=help_text,
            metavar=f.name.upper(),
        )


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


def pick(ns: argparse.Namespace, names) -> dict:
    return {n: getattr(ns, n) for n in names if hasattr(ns, n)}


# --- method options: the union of every method's fields, validated against the chosen one --------------------------


def add_method_options(parser) -> list[str]:
    """--method plus every method's options; unset ones stay absent so each method keeps its own defaults."""
    from ..methods import METHODS

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
        parts = [
            f"[{'all methods' if len(ms) == len(METHODS) else ', '.join(ms)}] {text}" for text, ms in by_help.items()
        ]
        _add_field(group, f, hint, argparse.SUPPRESS, "; ".join(parts))
    return list(helps)


def method_config_from(ns: argparse.Namespace, names: list[str]):
    from ..methods import get_method

    cls = get_method(ns.method).config_class
    valid = {f.name for f in dataclasses.fields(cls)}
    given = pick(ns, names)
    wrong = sorted(set(given) - valid)
    if wrong:
        flags = ", ".join("--" + w.replace("_", "-") for w in wrong)
        raise ConfigError(
            f"Option(s) {flags} do not apply to method '{ns.method}'.",
            "drop them, or choose a method they belong to (see `softprompt train --help`).",
        )
    return cls(**given)


# --- config files ----------------------------------------------------------------------------------------------------


def apply_config_file(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Read --config FILE (JSON for *.json, YAML otherwise) and make its keys the parser's defaults."""
    if "--config" not in parser._option_string_actions:  # argparse refuses the flag on commands that lack it
        return
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if not known.config:
        return
    path = Path(known.config)
    values = read_config(path)
    actions = {a.dest: a for a in parser._actions}
    values = {k.replace("-", "_") if isinstance(k, str) else k: v for k, v in values.items()}
    unknown = sorted(set(values) - set(actions), key=str)  # YAML keys may be numbers, booleans or null
    if unknown:
        raise ConfigError(
            f"Config file {path} has unknown option(s) {unknown}.",
            "use the long option names from --help (with - or _).",
        )
    for key, value in values.items():
        _check_config_value(path, actions[key], value)
    parser.set_defaults(**values)


_NUMBER_KINDS = {int: "an integer", float: "a number"}


def _check_config_value(path: Path, action: argparse.Action, value) -> None:
    """Refuse a config value that an `int` or `float` option cannot take: argparse converts a default only when it
    is text, so a file's `limit: 1.5` or `batch_size: [8]` would reach the command as it is (options built from
    config dataclasses are also checked by their dataclass; this covers the plain ones, e.g. `search --limit`)."""
    kind = _NUMBER_KINDS.get(action.type)
    if kind is None or isinstance(value, str) or (value is None and action.default is None):
        return
    numeric = isinstance(value, int) or (action.type is float and isinstance(value, float))
    if isinstance(value, bool) or not numeric:
        raise ConfigError(
            f"Config file {path}: {action.dest} must be {kind}, got {value!r:.60} ({type(value).__name__}).",
            f"write `{action.dest}:` with {kind} (or pass {max(action.option_strings, key=len)}).",
        )


def read_config(path: Path) -> dict:
    """The mapping in config file `path` (YAML, or JSON for *.json)."""
    return read_mapping(
        path, "Config file", "map option names to values: write `steps: 150` style lines (JSON: an object)."
    )


# --- shared option groups --------------------------------------------------------------------------------------------


def add_model_options(parser):
    g = parser.add_argument_group("model")
    g.add_argument(
        "--model",
        default="smollm2",
        help="base model: 'smollm2' (embedded default), a local Hugging Face directory, or a hub id",
    )
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    g.add_argument("--dtype", default="auto", help="float32, bfloat16, float16, auto (float32 on CPU, bf16 on CUDA)")
    g.add_argument(
        "--quantize",
        choices=QUANTIZATIONS,
        default=None,
        help="store the frozen weights quantized with bitsandbytes: nf4 (4-bit, double-quantized) or int8; "
        "the prompt stays in full precision (CPU and CUDA)",
    )
    g.add_argument(
        "--device-map",
        default=None,
        help="place the model over devices, CPU RAM and disk instead of --device: auto, balanced, sequential",
    )
    g.add_argument(
        "--max-memory",
        default=None,
        metavar="DEV=SIZE,...",
        help="with --device-map: memory per device, e.g. 0=20GiB,1=20GiB,cpu=60GiB",
    )
    g.add_argument(
        "--offload-folder",
        default=None,
        help="with --device-map: folder for weights offloaded to disk (default: temporary)",
    )


def add_task_options(parser, dev_split: bool = False):
    """--task and --data-dir; with `dev_split` (commands that read the dev split) also --dev-from-train."""
    from ..data import builtin_tasks

    g = parser.add_argument_group("task")
    # not `required=True`: argparse would demand the flag even when a --config file gives it
    g.add_argument("--task", help=f"built-in task ({', '.join(builtin_tasks())}) or a YAML/JSON task spec file")
    g.add_argument(
        "--data-dir",
        default=None,
        help="folder with the task's data files (default: $SOFTPROMPT_DATA, "
        "./shared/data or ../shared/data for built-in tasks; the spec's folder otherwise)",
    )
    if dev_split:
        g.add_argument(
            "--dev-from-train",
            type=fraction_or_count,
            default=None,
            metavar="N",
            help="carve the dev split out of train: a fraction (0.1) or a row count (200), seeded and per class; "
            "replaces the spec's dev split (the spec's `dev_from_train`)",
        )


def fraction_or_count(text: str) -> float | int:
    """A --dev-from-train value: an integer count, else a fraction (`TaskSpec` checks the range)."""
    try:
        return int(text)
    except ValueError:
        return float(text)  # argparse turns a ValueError into its own "invalid value" message


def load_task_from(ns):
    """The task of --task / --data-dir, with --dev-from-train where the command has it."""
    from ..data import load_task

    return load_task(ns.task, ns.data_dir, getattr(ns, "dev_from_train", None))


def load_base(ns):
    from ..base import load_base as load

    return load(ns.model, device=ns.device, dtype=ns.dtype, **storage(ns))


def storage(ns) -> dict:
    """`load_base`'s quantization and placement options from the model options (`add_model_options`)."""
    names = ("quantize", "device_map", "max_memory", "offload_folder")
    return {name: getattr(ns, name) for name in names}


def console():
    from rich.console import Console

    return Console()


def fmt_number(value, spec: str = ",") -> str:
    """`value` formatted by `spec`, or as it is where it cannot be: a prompt file's metadata may hold any JSON value
    where a number belongs (a string, a list, null, an integer too large for a float)."""
    try:
        return format(value, spec)
    except (TypeError, ValueError, OverflowError):
        return str(value)


def fmt_bytes(n: float) -> str:
    try:
        for unit in ("B", "KB", "MB", "GB"):
            if n < 1000:
                return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
            n /= 1000
        return f"{n:,.1f} TB"
    except OverflowError:  # over about 1e308 bytes: no float holds it, the integer is shown as it is
        return f"{fmt_number(n)} B"


def fmt_metrics(m: dict | None) -> str:
    if not m:
        return "-"
    from ..evaluate import scalar_metrics

    return ", ".join(
        f"{k} {fmt_number(v, '.1%' if k in ('accuracy', 'macro_f1') else '.1f')}" for k, v in scalar_metrics(m).items()
    )


def fmt_scored(m: dict | None, split: str | None = None) -> str:
    """Metrics with the split and the number of rows they come from: `accuracy 85.0%, macro_f1 84.9% on dev (872
    rows)`; `split` defaults to the one the metrics name."""
    if not m:
        return "-"
    split = split or m.get("split")
    where = " ".join(
        x for x in (f"on {split}" if split else "", f"({fmt_number(m['n'])} rows)" if "n" in m else "") if x
    )
    return f"{fmt_metrics(m)} {where}".strip()


def add_input_options(parser, progress: bool = True) -> None:
    """How inputs meet the context (--max-length, --truncate) and, where the command has bars, --progress: the same
    options, with the same meaning, on every command that runs the model (train has them through TrainConfig)."""
    from ..data import TRUNCATIONS

    g = parser.add_argument_group("inputs")
    g.add_argument(
        "--max-length",
        type=int,
        default=None,
        metavar="MAX_LENGTH",
        help="cap on positions per example (virtual tokens + text); default the model's context",
    )
    g.add_argument("--truncate", default="error", choices=list(TRUNCATIONS), help=TRUNCATE_HELP)
    if progress:
        g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show progress bars")


OVERWRITE_HELP = "replace an existing prompt file at the output path (refused without it, before any work)"


def add_overwrite_option(parser, help_text: str = OVERWRITE_HELP) -> None:
    """--overwrite, on every command that writes a prompt file."""
    parser.add_argument("--overwrite", action="store_true", help=help_text)


def check_out(path, overwrite: bool, base=None) -> Path:
    """The prompt file a command will write, refused now (before the model loads or anything is trained) when it
    exists and --overwrite is not given, or when its folder cannot be written."""
    from ..store import check_replace

    return check_replace(path, overwrite, base)


def save_prompt(prompt, path, overwrite: bool = False) -> Path:
    """Write a prompt file (refusing to replace one unless `overwrite`), then refresh the model card of its folder
    (the library writes no cards itself); a card that cannot be written is a warning: the prompt file is saved."""
    path = prompt.save(path, overwrite=overwrite)
    write_card(path.parent)
    return path


def write_card(folder) -> None:
    """Refresh the model card of `folder`, printing a warning instead of failing (the prompt files are written)."""
    import sys

    from ..errors import SoftpromptError
    from ..hub import write_model_card

    try:
        write_model_card(folder)
    except Exception as e:  # noqa: BLE001 - a card is a convenience; it never costs a saved prompt
        reason = " ".join((e.problem if isinstance(e, SoftpromptError) else f"{type(e).__name__}: {e}").split())
        print(
            f"softprompt: warning: the model card {Path(folder) / 'README.md'} was not updated ({reason}); "
            "the prompt file is saved.",
            file=sys.stderr,
        )
