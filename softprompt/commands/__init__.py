"""The `softprompt` command line: one module per group of verbs, assembled here.

    train, eval, generate, info, demo     commands/train.py (demo: commands/demo.py)
    search templates|autoprompt, explain  commands/search.py
    store list|show|similar|rm, serve     commands/serve.py
    bench                                 commands/bench.py
    export, import, push, pull            commands/interop.py

Commands import the library; the library never imports them. User mistakes print one line naming
the problem and the fix, and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import ConfigError, SoftpromptError
from . import bench, interop, search, serve, train
from .options import apply_config_file

GROUPS = (train, search, serve, bench, interop)  # each has `add_commands(subparsers)`


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    p = argparse.ArgumentParser(
        prog="softprompt",
        description="softprompt: prompt tuning of frozen models.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"softprompt {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for group in GROUPS:
        group.add_commands(sub)
    return p


def _command_parser(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.ArgumentParser, list[str]]:
    """The parser of the command `argv` names, and the arguments it parses: `search templates --config F` descends
    two levels, so that the config file is checked against the options of `search templates`, not of `search`."""
    while argv and parser._subparsers is not None:
        sub = parser._subparsers._group_actions[0].choices.get(argv[0])
        if sub is None:
            break
        parser, argv = sub, argv[1:]
    return parser, argv


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    try:
        command, rest = _command_parser(parser, argv)
        if command is not parser:
            apply_config_file(command, rest)
        ns = parser.parse_args(argv)
        if ns.command is None:
            parser.print_help()
            return 2
        if getattr(ns, "needs_task", False) and not ns.task and not getattr(ns, "tasks", None):
            raise ConfigError(
                f"`softprompt {ns.command}` needs a task.", "pass --task NAME_OR_SPEC (or `task:` in --config)."
            )
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
