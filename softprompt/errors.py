"""User-facing errors.

Every mistake a user can make (a wrong path, a missing column, a prompt trained for another
model) raises a `SoftpromptError` whose message names the problem and the fix. The CLI prints
it on one line and exits with status 2, without a traceback; library users can catch it.
"""

from __future__ import annotations


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
    import dataclasses

    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"Unknown {what} key(s) {unknown}.", f"use only {sorted(known)}.")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_at_least(obj, minimum: int, *names: str) -> None:
    """Refuse an option of `obj` below `minimum` (None means unset and passes), naming the flag to fix."""
    for name in names:
        value = getattr(obj, name)
        if value is not None and value < minimum:
            raise ConfigError(f"{name} must be >= {minimum}, got {value}.", f"pass {_flag(name)} {minimum} or more.")


def check_positive(obj, *names: str) -> None:
    """Refuse an option of `obj` that is not > 0 (None passes), naming the flag to fix."""
    for name in names:
        value = getattr(obj, name)
        if value is not None and not value > 0:
            raise ConfigError(f"{name} must be positive, got {value}.", f"pass {_flag(name)} above 0.")


def check_choice(obj, name: str, allowed, what: str | None = None) -> None:
    """Refuse an enum-like option of `obj` outside `allowed`, naming the flag and the choices."""
    value = getattr(obj, name)
    if value not in allowed:
        raise ConfigError(f"Unknown {what or name} '{value}'.", f"pass {_flag(name)} with one of {list(allowed)}.")
