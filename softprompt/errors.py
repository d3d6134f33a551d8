"""User-facing errors.

Every mistake a user can make (a wrong path, a missing column, a prompt trained for another
model) raises a `SoftpromptError` whose message names the problem and the fix. The CLI prints
it on one line and exits with status 2, without a traceback; library users can catch it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing


class SoftpromptError(Exception):
    """A problem with the user's input, config or files, with the fix in the message."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} Fix: {fix}" if fix else problem)


class DataError(SoftpromptError):
    """Task data that cannot be read or does not match the task spec."""


class ConfigError(SoftpromptError):
    """An invalid option or combination of options."""


class PromptFileError(SoftpromptError):
    """A prompt file that is missing, corrupted, of an unknown format or for another model."""


class InputTooLongError(SoftpromptError):
    """An input that, with its virtual tokens, exceeds the model's context."""


class TrainingError(SoftpromptError):
    """Training cannot go on (for example a NaN loss); the last good checkpoint is kept."""


class StorageError(SoftpromptError):
    """A file that cannot be written or read (disk full, no permission); a file being replaced stays intact."""


def check_keys(cls, d: dict, what: str) -> None:
    """Refuse keys that are not fields of the dataclass `cls`, listing the valid ones."""
    known = {f.name for f in dataclasses.fields(cls)}
    if not isinstance(d, dict):
        raise ConfigError(
            f"Expected a mapping of {what} keys to values, got {type(d).__name__}.",
            f"write `key: value` pairs, with keys among {sorted(known)}.",
        )
    unknown = sorted(set(d) - known, key=str)  # YAML keys may be numbers, booleans or null
    if unknown:
        raise ConfigError(f"Unknown {what} key(s) {unknown}.", f"use only {sorted(known)}.")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _of_type(value, hint) -> bool:
    """Whether `value` is of the annotated type `hint`: int excludes bool, a float field takes an int too."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_of_type(value, a) for a in args)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        return isinstance(value, list) and all(_of_type(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_of_type(k, args[0]) and _of_type(v, args[1]) for k, v in value.items())
    return isinstance(value, hint) if isinstance(hint, type) else True


def _kind(hint, plural: bool = False) -> str:
    """`hint` in words: "an integer", "a mapping of strings to strings", "a string or null"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        kinds = [a for a in args if a is not type(None) and not (a is int and float in args)]
        return " or ".join(_kind(a, plural) for a in kinds) + (" or null" if type(None) in args else "")
    words = {int: ("an integer", "integers"), float: ("a number", "numbers"), str: ("a string", "strings")}
    words |= {bool: ("true or false", "true/false values"), list: ("a list", "lists"), dict: ("a mapping", "mappings")}
    if origin is list:
        return ("lists" if plural else "a list") + f" of {_kind(args[0], True)}"
    if origin is dict:
        return ("mappings" if plural else "a mapping") + f" of {_kind(args[0], True)} to {_kind(args[1], True)}"
    return words.get(hint, (getattr(hint, "__name__", str(hint)),) * 2)[plural]


@functools.cache
def _hints(cls) -> dict:
    """The resolved annotations of dataclass `cls` (cached: a TaskSpec is built for every prompt a server loads)."""
    return typing.get_type_hints(cls)


def _type_fix(name: str, kind: str) -> str:
    """The fix for option `name` of the wrong type: the flag to pass, or what to write in a config file."""
    flag = _flag(name)
    if kind == "true or false":
        return f"pass {flag} or --no-{flag[2:]} (in a config file: `{name}: true` or false)."
    return f"pass {flag} with {kind} (in a config file: `{name}:` with {kind})."


def check_types(obj, skip=(), problem: str = "", fix=_type_fix) -> None:
    """Refuse a field of the dataclass `obj` whose value is not of its annotated type (`X | None` allows null).

    A YAML or JSON file (--config, a task spec, a bench grid) hands its values over unconverted, so a `steps: 1.5`
    or an `init_text: 5` would otherwise fail later with a traceback. `skip`: fields with a check of their own;
    `problem`: what starts the message; `fix(name, kind)`: the fix (default: the flag to pass, or the config key).
    """
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.name not in skip and not _of_type(value, hints[f.name]):
            kind = _kind(hints[f.name])
            raise ConfigError(
                f"{problem}{f.name} must be {kind}, got {value!r:.60} ({type(value).__name__}).", fix(f.name, kind)
            )


def _finite(value) -> bool:
    """A real number that is not NaN or infinite (an int of any size is finite)."""
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


def check_at_least(obj, minimum: int, *names: str) -> None:
    """Refuse an option of `obj` below `minimum`, or not a finite number (None means unset and passes)."""
    for name in names:
        value = getattr(obj, name)
        if value is not None and not (_finite(value) and value >= minimum):
            raise ConfigError(f"{name} must be >= {minimum}, got {value}.", f"pass {_flag(name)} {minimum} or more.")


def check_positive(obj, *names: str) -> None:
    """Refuse an option of `obj` that is not a finite number > 0 (None passes), naming the flag to fix."""
    for name in names:
        value = getattr(obj, name)
        if value is not None and not (_finite(value) and value > 0):
            raise ConfigError(f"{name} must be positive, got {value}.", f"pass {_flag(name)} above 0.")


def check_choice(obj, name: str, allowed, what: str | None = None) -> None:
    """Refuse an enum-like option of `obj` outside `allowed`, naming the flag and the choices."""
    value = getattr(obj, name)
    if value not in allowed:
        raise ConfigError(f"Unknown {what or name} '{value}'.", f"pass {_flag(name)} with one of {list(allowed)}.")
