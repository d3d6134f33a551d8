"""`softprompt serve` and `softprompt store list|show|similar|rm`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from ..errors import ConfigError, SoftpromptError
from ..serving.config import ServerConfig
from .options import add_dataclass_options, add_input_options, add_model_options, console, fmt_bytes, load_base, pick

DEFAULT_STORE = "prompts"  # where `softprompt train` writes by default


def _store_row(store, name: str, base=None) -> dict:
    """One line of `store list`: the file's metadata, and whether it loads (onto `base`, when given)."""
    from ..store import Prompt, info

    path = store.path(name)
    row = {"name": name, "bytes": path.stat().st_size}
    try:
        prompt = Prompt.load(path, base)
    except SoftpromptError as e:
        return row | {"status": "refused", "reason": e.problem}
    d = info(prompt)
    spec = prompt.spec
    return row | {
        "status": "ok" if base is not None else "readable",
        "method": d["method"],
        "virtual_tokens": d["virtual_tokens"] or 0,
        "kind": "classification" if spec.is_classification else "generation",
        "base_model": d["base_model"],
        "created": prompt.created,
    }


def cmd_store_list(ns) -> None:
    from ..store import Store

    store = Store(ns.store)
    base = load_base(ns) if ns.verify else None
    rows = [_store_row(store, name, base) for name in store.names()]
    if ns.json:
        print(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    t = Table(title=f"{store.root} ({len(rows)} prompt files" + (f", checked against {base.name})" if base else ")"))
    for col in ("task", "method", "tokens", "kind", "size", "base model", "status"):
        t.add_column(col)
    for r in rows:
        if r["status"] == "refused":
            t.add_row(r["name"], "", "", "", fmt_bytes(r["bytes"]), "", f"[red]refused[/]: {r['reason']}")
        else:
            t.add_row(
                r["name"],
                r["method"],
                str(r["virtual_tokens"]),
                r["kind"],
                fmt_bytes(r["bytes"]),
                str(r["base_model"]),
                r["status"],
            )
    console().print(t)


def cmd_store_show(ns) -> None:
    from types import SimpleNamespace

    from ..store import Store
    from .train import cmd_info

    store = Store(ns.store)
    path = store.path(ns.name)
    if not path.exists():
        raise ConfigError(f"No task '{ns.name}' in store {store.root}.", f"use one of {store.names()}.")
    cmd_info(SimpleNamespace(file=path, json=ns.json))


def cmd_store_similar(ns) -> None:
    """SPoT's retrieval: the store's prompts ranked by similarity to a target prompt (a file or a task name)."""
    from ..store import Prompt, Store
    from ..transfer import rank_sources

    store = Store(ns.store)
    path = Path(ns.target) if Path(ns.target).is_file() else store.path(ns.target)
    if not path.is_file():
        raise ConfigError(
            f"No prompt file or task '{ns.target}' (in store {store.root}).",
            "pass a prompt file, or a task of --store (trained briefly on the new task is enough).",
        )
    target = Prompt.load(path)
    sources, skipped = {}, {}
    for name in store.names():
        if store.path(name).resolve() == path.resolve():
            continue
        try:
            sources[name] = Prompt.load(store.path(name))
        except SoftpromptError as e:  # one damaged file is skipped, not the ranking
            skipped[name] = e.problem
    ranking = rank_sources(target, sources, ns.metric)
    skipped |= ranking.skipped
    if ns.json:
        print(json.dumps({"ranked": [{"name": n, "similarity": s} for n, s in ranking.ranked], "skipped": skipped}))
        return
    from rich.table import Table
    from rich.text import Text

    t = Table(title=Text(f"{store.root}: prompts like {path.name} ({ns.metric} cosine similarity)"))
    for col in ("task", "similarity", "method", "trained on"):
        t.add_column(col)
    for name, score in ranking.ranked:
        t.add_row(Text(name), f"{score:+.4f}", Text(sources[name].method), Text(str(sources[name].task.get("name"))))
    for name, why in skipped.items():
        t.add_row(Text(name), "skipped", Text(why), "")
    console().print(t)


def cmd_store_rm(ns) -> None:
    from ..store import Store

    store = Store(ns.store)
    for name in ns.names:
        store.remove(name)
        print(f"removed {store.path(name)}")


def cmd_serve(ns) -> None:
    import uvicorn

    from ..multitask import MultiTask
    from ..serving import create_app
    from ..store import Store

    logging.basicConfig(level=ns.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ServerConfig(**pick(ns, [f.name for f in dataclasses.fields(ServerConfig)]))
    store = Store(ns.store)
    if not store.root.is_dir():
        raise ConfigError(
            f"Store directory {store.root} does not exist.",
            "create it (softprompt train --out DIR/TASK.safetensors) or pass --store DIR.",
        )
    api_key = os.environ.get(ns.api_key_env) if ns.api_key_env else None
    if ns.api_key_env and not api_key:
        raise ConfigError(f"--api-key-env names ${ns.api_key_env}, which is not set.", f"export {ns.api_key_env}=...")
    if ns.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"softprompt: warning: serving on {ns.host} without an API key (set --api-key-env)", file=sys.stderr)
    base = load_base(ns)
    mt = MultiTask(
        base, compile=not ns.no_compile, truncate=ns.truncate, max_length=ns.max_length, cache_bytes=config.cache_bytes
    )
    report = mt.sync(store)
    print(
        f"softprompt: serving {len(mt)} task(s) from {store.root} on {base.name}: {', '.join(mt.names()) or '-'}"
        + (f"; refused: {', '.join(report['refused'])}" if report["refused"] else ""),
        file=sys.stderr,
    )
    app = create_app(
        mt, store, config, api_key=api_key, allowed_hosts=[ns.host, *ns.allowed_host], cors_origins=ns.cors_origin
    )
    uvicorn.run(
        app,
        host=ns.host,
        port=ns.port,
        log_level=ns.log_level,
        access_log=ns.access_log,
        limit_concurrency=config.max_connections,
        timeout_graceful_shutdown=config.shutdown_timeout,
    )


def add_commands(sub) -> None:
    s = sub.add_parser("store", help="list, show or remove the prompt files of a store directory")
    ssub = s.add_subparsers(dest="store_command", metavar="ACTION", required=True)

    def action(name: str, help_text: str, handler):
        a = ssub.add_parser(name, help=help_text)
        a.add_argument("--store", default=DEFAULT_STORE, help="the store directory (default: prompts/)")
        a.set_defaults(handler=handler)
        return a

    ls = action("list", "every prompt file with its method, size and whether it loads", cmd_store_list)
    ls.add_argument("--verify", action="store_true", help="also check every file against the base model (--model)")
    ls.add_argument("--json", action="store_true", help="print JSON")
    add_model_options(ls)
    show = action("show", "parameters, bytes and metrics of one task's prompt file", cmd_store_show)
    show.add_argument("name", help="task name (the file stem)")
    show.add_argument("--json", action="store_true", help="print JSON")
    similar = action(
        "similar",
        "the store's prompts ranked by similarity to a target prompt: which to transfer from (SPoT)",
        cmd_store_similar,
    )
    similar.add_argument("target", help="a prompt file, or a task name of the store (trained briefly is enough)")
    similar.add_argument(
        "--metric",
        default="average",
        help="average: cosine similarity of the average tokens (SPoT's best predictor); per-token: averaged over "
        "every pair of tokens",
    )
    similar.add_argument("--json", action="store_true", help="print JSON")
    rm = action("rm", "remove tasks' prompt files (a running server drops them at its next scan)", cmd_store_rm)
    rm.add_argument("names", nargs="+", help="task names")
    _add_serve(sub)


def _add_serve(sub) -> None:
    v = sub.add_parser(
        "serve",
        help="serve every task of a store over an OpenAI-compatible HTTP API",
        description="Serve the prompt files of --store on one base model: POST /v1/completions, "
        "/v1/chat/completions (model = task name), /v1/classify, GET /v1/models, /health. "
        "Prompt files added, changed or removed in the store are picked up while running.",
    )
    v.add_argument("--store", default=DEFAULT_STORE, help="the store directory (default: prompts/)")
    v.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    v.add_argument("--port", type=int, default=8000, help="port")
    v.add_argument(
        "--api-key-env",
        default=None,
        metavar="VAR",
        help="require `Authorization: Bearer KEY`, KEY read from this environment variable "
        "(not a flag: flags show in the process list)",
    )
    v.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a name the Host header may give (repeatable; '*': any); localhost, 127.0.0.1, [::1] and --host always "
        "may. Others are refused, which blocks DNS rebinding from web pages",
    )
    v.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="a web origin (https://app.example) whose pages may call the API (repeatable; default: none, no CORS)",
    )
    v.add_argument(
        "--no-compile",
        action="store_true",
        help="keep soft prompts as input embeddings instead of compiling them to KV prefixes",
    )
    add_input_options(v, progress=False)
    v.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    v.add_argument(
        "--access-log",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="uvicorn's one line per request (method, path, status; never bodies)",
    )
    add_model_options(v)
    add_dataclass_options(v, ServerConfig, "limits and batching")
    v.set_defaults(handler=cmd_serve)
