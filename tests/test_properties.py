"""Property-based tests (hypothesis): inputs nobody listed get a correct result or a one-line `SoftpromptError`.

The property everywhere: a prompt file, a task spec, a config or a command line either gives a correct result (a
prompt that is what the file holds and survives a save, a spec that renders, a config whose fields have their
annotated types) or raises a `SoftpromptError` with a problem and a one-line fix; never another exception (a
traceback) and never a hang. No case runs a model forward.

Generated cases per test (derandomized: the same cases on every run; the file takes about 30 s on one core):
    test_mutated_prompt_files_load_or_are_refused           300  (each loaded without a base and with the tiny one)
    test_random_bytes_are_refused_as_prompt_files           200  (the same)
    test_random_task_specs_load_and_render_or_are_refused   300
    test_task_spec_files_load_or_are_refused                100
    test_train_options_build_configs_or_are_refused         200
    test_serve_and_autoprompt_options_build_configs         100  (two command lines each)
    test_method_configs_from_dicts                          150
    test_library_configs_from_config_file_values            150
    test_train_command_line_never_shows_a_traceback         120
    test_train_config_files_never_show_a_traceback          100
    test_every_train_config_key_takes_any_value             480  (40 keys x (11 explicit kinds + 1 generated))
                                                   total  2,200
SOFTPROMPT_FUZZ=N searches anew: random cases (not derandomized), N times as many generated ones.
`--hypothesis-show-statistics` shows how often each call was accepted or refused.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import io
import json
import math
import os
import types
import typing
from pathlib import Path

import pytest
import torch
import yaml
from helpers import random_soft_prompt
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save

import softprompt as sp
from softprompt.commands import build_parser, main
from softprompt.commands.options import add_method_options, method_config_from, pick
from softprompt.data import TaskSpec, load_task
from softprompt.data.encoding import TRUNCATIONS
from softprompt.errors import SoftpromptError
from softprompt.fileio import read_safetensors, write_safetensors
from softprompt.injection import Injection
from softprompt.methods import METHODS
from softprompt.methods.deep import KV_INITS
from softprompt.methods.soft import INITS
from softprompt.search.autoprompt import VOCABULARIES, AutoPromptConfig
from softprompt.serving import ServerConfig
from softprompt.store import info
from softprompt.train import OPTIMIZERS, SCHEDULERS, TrainConfig

_FUZZ = int(os.environ.get("SOFTPROMPT_FUZZ", "0"))


def cases(n: int):
    """hypothesis settings for `n` generated cases: derandomized, no example database, no deadline; function-scoped
    fixtures (tmp_path) are shared by the cases of a test on purpose."""
    return settings(
        max_examples=n * max(_FUZZ, 1),
        deadline=None,
        derandomize=not _FUZZ,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


def refused(e: SoftpromptError) -> None:
    """A refusal the CLI prints as `softprompt: error: PROBLEM` / `  fix: FIX`: both parts there."""
    assert " ".join(e.problem.split()), f"an error without a problem: {e!r}"
    assert e.fix and "\n" not in e.fix, f"an error without a one-line fix: {e!r}"


def outcome(fn, *args, **kwargs):
    """fn(*args, **kwargs), or None after checking the SoftpromptError it raised; any other exception fails.

    Each outcome is a hypothesis event: `--hypothesis-show-statistics` shows how often each call succeeded."""
    name = getattr(fn, "__qualname__", type(fn).__name__)
    try:
        result = fn(*args, **kwargs)
    except SoftpromptError as e:
        refused(e)
        event(f"{name}: {type(e).__name__}")
        return None
    event(f"{name}: ok")
    return result


# --- values a JSON or YAML file can hold -----------------------------------------------------------------------------

TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=10)
NUMBERS = st.one_of(
    st.integers(-3, 3),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([10**400, -(10**400), 0.5, 1e-300, -0.0]),
)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT)
JSON = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3), max_leaves=6
)
# YAML also gives dates, and keys that are not strings (numbers, booleans, null)
YAML_SCALARS = SCALARS | st.dates()
YAML = st.recursive(
    YAML_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(YAML_SCALARS, inner, max_size=3),
    max_leaves=6,
)


def mostly(good, bad=YAML, one_in: int = 10):
    """`good` values, and about one time in `one_in` a `bad` one: many cases then get past every check but one."""
    return st.integers(1, one_in).flatmap(lambda i: bad if i == one_in else good)


def jsonable(value):
    """`value` as JSON holds it: dates as text, keys as text (what a YAML value becomes in a JSON file)."""
    if isinstance(value, dict):
        return {str(k) if isinstance(k, datetime.date) else k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    return value.isoformat() if isinstance(value, datetime.date) else value


def json_safe(value) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def hint_ok(value, hint) -> bool:
    """Whether `value` is of the annotated type `hint` (int excludes bool; a float field takes an int)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(hint_ok(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is list:
        return isinstance(value, list) and all(hint_ok(v, args[0]) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def typed(obj) -> None:
    """Every field of the dataclass `obj` holds a value of its annotated type (what an accepted config promises)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        assert hint_ok(value, hints[f.name]), f"{type(obj).__name__}.{f.name} = {value!r} is not a {hints[f.name]}"


# --- 1. prompt files -------------------------------------------------------------------------------------------------

SPEC = {"name": "t", "template": "Text: {text}\nLabel:", "labels": {"a": "yes", "b": "no"}, "label_column": "y"}
DTYPES = [torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool]


@pytest.fixture(scope="module")
def valid_files(llama, tmp_path_factory):
    """(tensors, metadata) of two valid prompt files for the tiny Llama: a soft prompt (embeds) and a deep one (kv)."""
    spec = TaskSpec.from_dict(SPEC)
    folder = tmp_path_factory.mktemp("valid")
    soft = random_soft_prompt(llama, spec).save(folder / "soft")
    lay = llama.kv_layout
    kv = torch.randn(lay.num_layers, 2, lay.num_kv_heads, 3, lay.head_dim)  # (L, 2, H_kv, P, hd)
    config = {"num_virtual_tokens": 3, "init": "zero", "init_text": None}
    deep = sp.Prompt.for_base(llama, Injection(kv=kv, kv_positions=3), "deep", config, spec).save(folder / "deep")
    return [read_safetensors(p) for p in (soft, deep)]


def _nodes(obj, where=()):
    """Every place in a nested JSON value: (path, value)."""
    yield where, obj
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        yield from _nodes(v, (*where, k))


def _at(obj, where):
    for k in where:
        obj = obj[k]
    return obj


def mutate_meta(data, meta):
    """`meta` after 0-4 random edits: a key dropped, a value replaced by random JSON, a key added."""
    for _ in range(data.draw(st.sampled_from([0, 0, 1, 1, 1, 2, 3, 4]), label="edits")):
        where, node = data.draw(st.sampled_from(list(_nodes(meta))), label="at")
        op = data.draw(st.sampled_from(["drop", "replace", "add"] if where else ["replace", "add"]), label="op")
        if op == "add" and isinstance(node, dict):
            node[data.draw(TEXT, label="key")] = data.draw(JSON, label="value")
        elif op == "drop" or (op == "add" and not isinstance(node, dict)):
            if not where:
                continue
            parent = _at(meta, where[:-1])
            del parent[where[-1]]
        elif where:
            _at(meta, where[:-1])[where[-1]] = data.draw(JSON, label="value")
        else:
            meta = data.draw(JSON, label="metadata")
    return meta


def mutate_tensors(data, tensors: dict) -> dict:
    """`tensors` after random edits: dropped, reshaped (rank 0-6), one dimension changed, cast, NaN/Inf written,
    or a tensor of an unknown name added."""
    out = {}
    for name, t in tensors.items():
        ops = ["keep"] * 5 + ["drop", "shape", "dim", "dtype", "nonfinite"]
        op = data.draw(st.sampled_from(ops), label=f"{name} op")
        if op == "drop":
            continue
        if op == "shape":
            t = torch.randn(data.draw(st.lists(st.integers(0, 4), max_size=6), label="shape"))
        elif op == "dim":
            shape = list(t.shape)
            shape[data.draw(st.integers(0, len(shape) - 1), label="dim")] = data.draw(st.integers(0, 6), label="size")
            t = torch.randn(shape)
        elif op == "dtype":
            t = t.to(data.draw(st.sampled_from(DTYPES), label="dtype"))
        elif op == "nonfinite":
            t = t.clone()
            i = data.draw(st.integers(0, t.numel() - 1), label="index")
            t.view(-1)[i] = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]), label="value")
        out[name] = t
    if data.draw(st.sampled_from(range(4)), label="extra tensor") == 3:
        out[data.draw(st.sampled_from(["embeds", "kv", "extra", "embedding", ""]), label="name")] = torch.randn(2, 3)
    return out


def check_loaded(prompt, tensors: dict, meta: dict, tmp: Path) -> None:
    """A prompt that loaded is what the file holds, is usable, and survives a save and a load."""
    assert isinstance(prompt, sp.Prompt)
    assert set(prompt.injection.tensors()) == set(tensors)
    for name, t in prompt.injection.tensors().items():
        assert torch.equal(t, tensors[name])
    assert prompt.method == meta["method"] and prompt.task == meta["task"]
    assert isinstance(prompt.spec, TaskSpec)
    json.dumps(info(prompt))  # `softprompt info --json`
    again = sp.load_prompt(prompt.save(tmp / "again"))
    assert again.task == prompt.task and again.method_config == prompt.method_config
    for name, t in prompt.injection.tensors().items():
        assert torch.equal(again.injection.tensors()[name], t.float())


@cases(300)
@given(data=st.data())
def test_mutated_prompt_files_load_or_are_refused(data, valid_files, llama, tmp_path):
    """A valid prompt file's metadata and tensors, edited at random, then loaded without a base and with its base."""
    tensors, meta = valid_files[data.draw(st.integers(0, 1), label="file")]
    meta = json.loads(json.dumps(meta))
    if data.draw(st.integers(0, 3), label="random task") == 0:  # a task spec of random fields, as in 2. below
        meta["task"] = json.loads(json.dumps(jsonable(data.draw(spec_dicts(), label="task"))))
    meta = mutate_meta(data, meta)
    tensors = mutate_tensors(data, tensors)
    path = tmp_path / "mutated.safetensors"
    how = data.draw(st.sampled_from(["softprompt"] * 4 + ["raw text", "no metadata"]), label="metadata as")
    if how == "softprompt":
        write_safetensors(path, tensors, meta)
    else:
        extra = {"softprompt": data.draw(TEXT, label="text")} if how == "raw text" else None
        path.write_bytes(st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=extra))
    for base in (None, llama):
        prompt = outcome(sp.load_prompt, path, base)
        if prompt is not None:
            check_loaded(prompt, tensors, meta, tmp_path)


def _framed(header: bytes, rest: bytes, length: int | None) -> bytes:
    return (len(header) if length is None else length).to_bytes(8, "little") + header + rest


HEADERS = st.one_of(
    JSON.map(lambda v: json.dumps(v).encode()),
    st.builds(
        lambda meta, t: json.dumps({"__metadata__": {"softprompt": json.dumps(meta)}, **t}).encode(),
        JSON,
        st.dictionaries(TEXT, JSON, max_size=2),
    ),
    st.binary(max_size=30),
)
FILES = st.one_of(
    st.binary(max_size=200),
    st.sampled_from([b"\x80\x04", b"PK\x03\x04", b"GGUF", b"", b"\x00" * 8, b"{}"]).flatmap(
        lambda magic: st.binary(max_size=40).map(lambda tail: magic + tail)
    ),
    st.builds(_framed, HEADERS, st.binary(max_size=40), st.none() | st.integers(0, 2**64 - 1)),
)


@cases(200)
@given(content=FILES)
def test_random_bytes_are_refused_as_prompt_files(content, llama, tmp_path):
    """Random bytes, other formats' magic bytes, and safetensors-shaped headers around random JSON."""
    path = tmp_path / "random.safetensors"
    path.write_bytes(content)
    for base in (None, llama):
        assert outcome(sp.load_prompt, path, base) is None  # nothing random is a valid prompt file


# --- 2. task specs ---------------------------------------------------------------------------------------------------


NAMES = st.sampled_from(["text", "x", "y", "mask", "a_b", "é", "trigger"])  # template fields that are names
FIELDS = mostly(NAMES, st.sampled_from(["0", "", " x", "x y", "x.y", "x[0]", "{x}"]))
SEPARATORS = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="{}"), max_size=3)
FILTERED = mostly(
    st.one_of(
        st.builds(lambda f, name: "{" + f + "|" + name + "}", FIELDS, st.sampled_from(["json", "first", "first|json"])),
        st.builds(lambda f, sep: "{" + f + "|join:" + json.dumps(sep) + "}", FIELDS, SEPARATORS),
    ),
    st.builds(  # any filter names and arguments
        lambda f, name, arg: "{" + f + "|" + name + ("" if arg is None else ":" + arg) + "}",
        FIELDS,
        st.sampled_from(["json", "first", "join", "nope", "", "join|first"]),
        st.none() | TEXT | SEPARATORS.map(json.dumps),
    ),
)
JUNK = st.sampled_from(
    ["{", "}", "{}", "{0}", "{x!r}", "{x!s}", "{x!z}", "{x!0}", "{x:>5}", "{x:d}", "{x:{y}}", "{x.y}", "{x[0]}"]
    + ["{x|}", "{x|join}", '{x | join : ", " }', '{x|join:"\\q"}', "{x!r|json}", "{x|json:>3}", "{mask|json}"]
    + ["{x:%}", "{x:,}", "{x:=^9}", "{x!a:>3}", "{x }", "{ x}", "{x:}", "{mask!r}", "{x:>3|json}"]
)
LITERAL = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="{}"), min_size=1, max_size=6)
PIECES = mostly(st.one_of(LITERAL, st.just("{{"), st.just("}}"), NAMES.map(lambda f: "{" + f + "}"), FILTERED), JUNK)
TEMPLATES = st.lists(PIECES, min_size=1, max_size=5).map("".join)
LABEL_KEYS = st.one_of(
    st.booleans(),
    st.integers(-2, 2),
    TEXT,
    st.sampled_from(["", "true", "True", "FALSE", "yes", "no", "0", "1"]),
    st.none(),
    st.floats(allow_nan=False, max_value=3, min_value=-3),
)
# mostly distinct keys (as matched against the data) and distinct non-empty words: a label map that loads
LABELS = mostly(
    st.lists(
        st.tuples(LABEL_KEYS, mostly(TEXT.filter(bool), st.sampled_from(["", " "]) | YAML_SCALARS)),
        min_size=2,
        max_size=4,
        unique_by=(lambda kv: str(kv[0]).lower(), lambda kv: str(kv[1])),
    ).map(dict),
    st.dictionaries(LABEL_KEYS, TEXT | YAML_SCALARS, max_size=4) | YAML,
)
COLUMNS = mostly(
    st.dictionaries(NAMES, TEXT, max_size=3), st.dictionaries(FIELDS | YAML_SCALARS, TEXT | YAML, max_size=3)
)
SPLITS = st.dictionaries(
    st.sampled_from(["train", "dev", "test"]) | TEXT,
    mostly(TEXT | st.fixed_dictionaries({"hub": TEXT}, optional={"config": TEXT, "split": TEXT}), YAML),
    max_size=3,
)
OPTIONAL_FIELDS = {  # the optional fields of a spec: plausible values, one in ten times anything YAML holds
    "label_column": mostly(TEXT),
    "columns": COLUMNS,
    "target_prefix": mostly(st.sampled_from([" ", "", "\n"]) | TEXT),
    "chat": mostly(st.booleans()),
    "max_new_tokens": mostly(st.integers(-2, 10**20)),
    "stop": mostly(st.none() | st.lists(TEXT, max_size=3)),
    "description": mostly(TEXT),
    "data_dir": mostly(st.none() | TEXT),
    "streaming": mostly(st.booleans()),
    "shuffle_buffer": mostly(st.integers(-2, 10**6)),
    "dev_from_train": mostly(st.none() | st.floats(-1, 2) | st.integers(-2, 10**6)),
    "splits": mostly(SPLITS),
    "unknown_key": YAML,
}


@st.composite
def spec_dicts(draw):
    """A task-spec mapping as a YAML file could hold it: mostly the right kinds of values, some random."""
    d = {
        "name": draw(mostly(st.sampled_from(["t", "my-task", ""]) | TEXT), label="name"),
        "template": draw(mostly(TEMPLATES), label="template"),
    }
    kind = draw(mostly(st.sampled_from(["labels", "target", "references"]), st.just("any")), label="kind")
    if kind in ("labels", "any") and draw(st.booleans()) | (kind == "labels"):
        d["labels"] = draw(LABELS, label="labels")
    if kind in ("target", "any") and draw(st.booleans()) | (kind == "target"):
        d["target_column"] = draw(mostly(TEXT), label="target_column")
    if kind in ("references", "any") and draw(st.booleans()) | (kind == "references"):
        d["references_column"] = draw(mostly(TEXT), label="references_column")
    keys = [k for k in OPTIONAL_FIELDS if k != "unknown_key"] + draw(mostly(st.just([]), st.just(["unknown_key"])))
    for key in draw(st.lists(st.sampled_from(keys), unique=True, max_size=4), label="keys"):
        d[key] = draw(OPTIONAL_FIELDS[key], label=key)
    for key in draw(st.lists(st.sampled_from(["name", "template"]), unique=True, max_size=2), label="dropped"):
        if draw(st.sampled_from(range(10)), label="drop it") == 5:
            del d[key]
    return d


CELLS = mostly(TEXT | NUMBERS | st.booleans() | st.lists(TEXT | NUMBERS, max_size=3))  # what a data row holds
ROWS = st.dictionaries(FIELDS | TEXT, CELLS, max_size=4)


def check_spec(spec, tmp: Path) -> None:
    """An accepted spec is typed, survives what a prompt file does to it (JSON), and its cheap API works."""
    typed(spec)
    portable = spec.portable()
    assert TaskSpec.from_dict(json.loads(json.dumps(portable))).portable() == portable
    assert all(isinstance(w, str) for w in spec.verbalizers)
    assert isinstance(spec.has_mask, bool) and isinstance(spec.template_fields, list)
    task = sp.Task(spec, tmp)
    for split in task.split_names:
        outcome(task.check_split, split)


@cases(300)
@given(d=spec_dicts(), rows=st.lists(ROWS, max_size=3), inputs=st.lists(TEXT | JSON | ROWS, max_size=3), data=st.data())
def test_random_task_specs_load_and_render_or_are_refused(d, rows, inputs, data, tmp_path):
    """A spec mapping of random fields; one that loads renders random rows and inputs (as the server takes them)."""
    spec = outcome(TaskSpec.from_dict, d)
    if spec is None:
        return
    check_spec(spec, tmp_path)
    # rows holding the template's columns, with random values, besides the random rows
    columns = [spec.column(f) for f in spec.template_fields]
    rows = [*rows, {c: data.draw(CELLS, label=f"value of {c}") for c in columns}]
    inputs = [*inputs, rows[-1], *rows[-1].values()]  # an object of the fields, and each value alone
    for row in rows:
        text = outcome(spec.render, row)
        assert text is None or isinstance(text, str)
        if spec.is_classification:
            index = spec.class_index(row.get(spec.label_column))
            assert index is None or 0 <= index < len(spec.labels)
    for value in [*inputs, *(json.dumps(v) for v in inputs if json_safe(v))]:
        text = outcome(spec.render_input, value)
        assert text is None or isinstance(text, str)


def _spec_file(value, suffix: str) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value) if suffix == ".json" and json_safe(value) else yaml.safe_dump(value)


@cases(100)
@given(
    value=st.one_of(TEXT, spec_dicts(), YAML),
    suffix=st.sampled_from([".yaml", ".json"]),
    dev=st.none() | st.integers(-1, 5) | st.floats(-1, 2),
)
def test_task_spec_files_load_or_are_refused(value, suffix, dev, tmp_path):
    """A spec file (YAML or JSON, or text that is neither), with --dev-from-train as the CLI converts it."""
    path = tmp_path / f"task{suffix}"
    path.write_text(_spec_file(value, suffix))
    task = outcome(load_task, str(path), None, dev)
    if task is not None:
        check_spec(task.spec, tmp_path)


# --- 3. configs and options ------------------------------------------------------------------------------------------

PARSER = build_parser()
METHOD_OPTIONS = add_method_options(argparse.ArgumentParser())


def _subparser(*names: str) -> argparse.ArgumentParser:
    p = PARSER
    for name in names:
        p = p._subparsers._group_actions[0].choices[name]
    return p


# What a shell can put in argv: any text without NUL bytes; bytes that are not UTF-8 arrive as lone surrogates
UNDECODABLE = st.sampled_from([chr(c) for c in range(0xDC80, 0xDD00)])
ARGV_TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00") | UNDECODABLE, max_size=8)
ARGS = st.one_of(
    NUMBERS.map(str),
    st.sampled_from(
        ["none", "null", "", "nan", "-inf", "inf", "1e999", "0x10", "1_000", "true", "no", "-1", "0", "1", "2"]
        + ["cuda", "cpu", "auto", "float16", "soft", "prefix", "deep", "ptuning", "lstm", "mlp", "text", "labels"]
        + ["zero", "random", "vocab", "error", "left", "right", "dev", "train", "frequent", "words", "all", " the"]
        + [".", "/", "..", "a/", "~", "$HOME"]
    ),
    ARGV_TEXT,
)
SKIP = {"help", "config", "model"}
# the choices of enum-like options, so that plausible values often pass
CHOICES = {"optimizer": OPTIMIZERS, "scheduler": SCHEDULERS, "truncate": TRUNCATIONS, "eval_split": ("dev", "train")}
CHOICES |= {"init": INITS + KV_INITS, "encoder": ("lstm", "mlp"), "vocab": VOCABULARIES}


def arg_text(action: argparse.Action):
    """Text for `action` (an option that takes a value): mostly what it accepts, one in ten anything."""
    name = getattr(action.type, "__name__", "")
    if action.choices:
        good = st.sampled_from(sorted(action.choices))
    elif action.dest in CHOICES:
        good = st.sampled_from(CHOICES[action.dest])
    elif name == "int":
        good = st.integers(-1, 600).map(str)
    elif name == "float":
        good = st.floats(-1, 100).map(str)
    elif name == "fraction_or_count":
        good = (st.integers(-1, 10) | st.floats(-0.5, 1.5)).map(str)
    else:
        good = ARGV_TEXT
    return mostly(good, ARGS)


def options(parser: argparse.ArgumentParser, skip=SKIP):
    """argv fragments setting random options of `parser` to random values (a flag alone where it takes none)."""
    actions = [a for a in parser._actions if a.option_strings and a.dest not in skip]
    one = st.sampled_from(actions).flatmap(
        lambda a: st.tuples(
            st.sampled_from(a.option_strings), st.just([]) if a.nargs == 0 else arg_text(a).map(lambda v: [v])
        )
    )
    return st.lists(one, max_size=6).map(lambda pairs: [x for flag, value in pairs for x in (flag, *value)])


@contextlib.contextmanager
def real_stderr():
    """stderr as Python sets up the real one (UTF-8 with `backslashreplace`: text that came in as undecodable bytes,
    lone surrogates, prints escaped as in a terminal), and stdout, captured; yields stderr."""
    err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="backslashreplace", write_through=True)
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        yield err


def parsed(argv: list[str], parser=PARSER):
    """The namespace of `argv`, or None when argparse refuses it (a usage error, exit status 2)."""
    try:
        with real_stderr():
            return parser.parse_args(argv)
    except SystemExit as e:
        assert e.code == 2
        return None


TRAIN = _subparser("train")


@cases(200)
@given(argv=options(TRAIN))
def test_train_options_build_configs_or_are_refused(argv):
    """What `softprompt train` builds from its options before it loads anything."""
    ns = parsed(["train", "--task", "t", *argv])
    if ns is None:
        return
    config = outcome(TrainConfig, **pick(ns, [f.name for f in dataclasses.fields(TrainConfig)]))
    if config is not None:
        typed(config)
    method = outcome(method_config_from, ns, METHOD_OPTIONS)
    if method is not None:
        typed(method)
        assert METHODS[ns.method].config_class.from_dict(method.to_dict()) == method


@cases(100)
@given(argv=options(_subparser("serve")), argv2=options(_subparser("search", "autoprompt")))
def test_serve_and_autoprompt_options_build_configs(argv, argv2):
    """ServerConfig from `softprompt serve`'s options and AutoPromptConfig from `search autoprompt`'s (neither command
    reads a --config file, so every value comes through argparse's int/float/str conversion)."""
    for cls, command in ((ServerConfig, ["serve", *argv]), (AutoPromptConfig, ["search", "autoprompt", *argv2])):
        ns = parsed(command)
        if ns is not None:
            config = outcome(cls, **pick(ns, [f.name for f in dataclasses.fields(cls)]))
            if config is not None:
                typed(config)


def plausible(hint, name: str):
    """Values of the annotated type `hint` (with the choices of option `name`), as argparse would convert them."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return st.one_of([st.none()] + [plausible(a, name) for a in typing.get_args(hint) if a is not type(None)])
    if hint is bool:
        return st.booleans()
    if hint is int:
        return st.integers(-1, 600) | st.integers(min_value=-(10**30), max_value=10**30)
    if hint is float:
        return st.floats(-1, 100) | st.floats(allow_nan=True, allow_infinity=True) | st.integers(0, 3)
    return st.sampled_from(CHOICES[name]) if name in CHOICES else TEXT


def field_values(cls, unknown=("unknown",)):
    """Mappings of some fields of `cls` to plausible values, one in ten any YAML value; sometimes a key from
    `unknown` too."""
    hints = typing.get_type_hints(cls)
    known = {f.name: mostly(plausible(hints[f.name], f.name)) for f in dataclasses.fields(cls)}
    extra = st.dictionaries(st.sampled_from(unknown), YAML, max_size=1) if unknown else st.just({})
    return st.tuples(st.fixed_dictionaries({}, optional=known), mostly(st.just({}), extra)).map(lambda t: t[0] | t[1])


METHOD_FIELDS = sorted({f.name for m in METHODS.values() for f in dataclasses.fields(m.config_class)} | {"unknown"})


@cases(150)
@given(name=st.sampled_from(sorted(METHODS)), data=st.data())
def test_method_configs_from_dicts(name, data):
    """Method configs from a mapping: what a bench grid file's `config:` (any YAML) gives `from_dict`."""
    cls = METHODS[name].config_class
    d = data.draw(mostly(field_values(cls, METHOD_FIELDS), YAML), label="config")
    config = outcome(cls.from_dict, d)
    if config is not None:
        typed(config)
        assert cls.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@cases(150)
@given(cls=st.sampled_from([TrainConfig, ServerConfig]), data=st.data())
def test_library_configs_from_config_file_values(cls, data):
    """TrainConfig from any YAML value (a --config file passes them unconverted); ServerConfig the same, as the
    library's API takes it from a program's own config."""
    config = outcome(cls, **data.draw(field_values(cls, unknown=()), label="fields"))
    if config is not None:
        typed(config)


@pytest.fixture
def cli_dir(tmp_path, monkeypatch):
    """A task spec with its data in tmp_path, made the working directory (the default --out and --run-dir)."""
    (tmp_path / "train.tsv").write_text("text\ty\nhi\ta\nho\tb\nhu\ta\nha\tb\n")
    (tmp_path / "dev.tsv").write_text("text\ty\nhi\ta\nho\tb\n")
    (tmp_path / "task.yaml").write_text(json.dumps({**SPEC, "splits": {"train": "train.tsv", "dev": "dev.tsv"}}))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def no_traceback(run) -> None:
    """`run()` (the CLI) exits 2 with a one-line error and its fix, or argparse refuses the command line."""
    try:
        with real_stderr() as err:
            code = run()
    except SystemExit as e:  # an argparse usage error
        code, usage = e.code, True
    else:
        usage = False
    text = err.buffer.getvalue().decode()
    event("argparse usage error" if usage else "reached the model" if "/nonexistent" in text else "refused before")
    assert "Traceback" not in text
    assert code == 2, text
    if not usage:  # warnings may come first; the error is one line, its fix the next
        lines = text.strip().splitlines()
        assert len(lines) >= 2 and lines[-2].startswith("softprompt: error: ") and lines[-1].startswith("  fix: "), text


@cases(120)
@given(argv=options(TRAIN))
def test_train_command_line_never_shows_a_traceback(argv, cli_dir):
    """`softprompt train` with random options: everything up to loading the (missing) model runs."""
    no_traceback(lambda: main(["train", "--task", "task.yaml", "--model", "/nonexistent", *argv]))


CONFIG_KEYS = sorted({a.dest for a in TRAIN._actions} - {"help"})
ACTIONS = {a.dest: a for a in TRAIN._actions}


def config_value(key: str):
    """A value for `key` in a --config file: mostly one the option accepts (argparse converts text), else anything."""
    action = ACTIONS.get(key)
    if action is None:
        return YAML
    return mostly(st.booleans(), YAML) if action.nargs == 0 else arg_text(action) | mostly(arg_text(action), YAML)


CONFIG_FILES = st.tuples(  # some options, one in ten times a key that is no option (`handler` is a parser default)
    st.lists(st.sampled_from(CONFIG_KEYS), unique=True, max_size=5).flatmap(
        lambda keys: st.fixed_dictionaries({k: config_value(k) for k in keys})
    ),
    mostly(st.just({}), st.dictionaries(st.sampled_from(["handler", "unknown", "command", "needs_task"]), YAML)),
).map(lambda t: t[0] | t[1])


def _train_with_config(folder: Path, values: dict, as_yaml: bool, task_flag: bool = True) -> None:
    """`softprompt train --config FILE` with `values` in FILE (YAML, or JSON), --task unless the file gives it, and
    --model /nonexistent unless the file gives the model."""
    config = folder / ("config.yaml" if as_yaml else "config.json")
    config.write_text(yaml.safe_dump(values) if as_yaml else json.dumps(jsonable(values)))
    task = ["--task", "task.yaml"] if task_flag else []
    model = [] if "model" in values else ["--model", "/nonexistent"]
    no_traceback(lambda: main(["train", "--config", str(config), *task, *model]))


@cases(100)
@given(values=CONFIG_FILES, as_yaml=st.booleans(), task_flag=st.booleans())
def test_train_config_files_never_show_a_traceback(values, as_yaml, task_flag, cli_dir):
    """`softprompt train --config FILE`: the file's values reach the configs unconverted unless they are text."""
    if not task_flag:  # the task from the file, where the file does not name one itself
        values.setdefault("task", "task.yaml")
    _train_with_config(cli_dir, values, as_yaml, task_flag)


# One value of every kind a YAML file can give, tried on every option (then random ones): a value only reaches the
# code that chokes on it when every other option is valid
KINDS = [None, True, 1.5, 10**30, math.nan, "", "x", "none", [1], {"a": 1}, datetime.date(2020, 1, 1)]


def _examples(values):
    def add(test):
        for v in values:
            test = example(value=v)(test)
        return test

    return add


@pytest.mark.parametrize(
    "key",
    [k for k in sorted(a.dest for a in TRAIN._actions)],
)
@cases(1)
@_examples(KINDS)
@given(value=YAML | ARGS)
def test_every_train_config_key_takes_any_value(key, value, cli_dir):
    """Each option alone in a --config file, with a value of every kind YAML gives."""
    if key == "model" and isinstance(value, str):
        value = "/nonexistent/" + value  # a path, never a hub id: a hub id asks the network (or its cache) first
    _train_with_config(cli_dir, {key: value}, as_yaml=True, task_flag=key != "task")
