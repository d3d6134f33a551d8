"""`softprompt bench --verify CELL`: run a recorded cell again and compare it with its record, bit for bit.

The cell is rebuilt from its record (`spec`), so what runs is what ran, whatever the grid file says
now; it runs into a temporary results folder (the record is never replaced), in its own process
like the grid's cells. A record from before the pinning runs at the thread count it recorded, with
deterministic mode off, as it ran. Reproduced means every dev metric equal (`==` on the floats) and
every row's outcome equal. The result goes to `RESULTS/verify/ID.json`, which the report reads (a re-run on
another kind of machine than the record's goes to `RESULTS/verify/other-machines/ID.json`: it checks nothing):
a cell that did not reproduce is flagged there.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from ..errors import ConfigError
from ..fileio import atomic_write_text
from .cell import Cell, _machine, record_path
from .report import load_records, pinned, same_machine


def record_of(results: Path, name: str) -> Path:
    """The record file of a cell id (or of a path to a record)."""
    path = Path(name) if name.endswith(".json") else Path(results) / "cells" / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in (Path(results) / "cells").glob("*.json"))
        hint = f"use one of {len(known)} ids in {results}/cells (e.g. {known[0]})" if known else "run the grid first"
        raise ConfigError(f"No record of cell '{name}' ({path}).", hint + ".")
    return path


def pick(results: Path, names: list[str], rng: random.Random) -> list[str]:
    """The cell ids to verify: `names` with each `random:N` replaced by N recorded cells picked at random among those
    that ran pinned (threads and deterministic mode in their identity) on this kind of machine (another CPU's
    kernels may sum in another order), never one named twice."""
    here = _machine()
    ours = [r["cell"] for r in load_records(results) if pinned(r) and same_machine(r["machine"], here)] if names else []
    out: list[str] = []
    for name in names:
        if not name.startswith("random:"):
            out.append(name)
            continue
        n = name.removeprefix("random:")
        if not n.isdigit() or int(n) < 1:
            raise ConfigError(f"--verify {name}: N in random:N must be a whole number of cells.", "e.g. random:3.")
        pool = [c for c in ours if c not in out]
        if len(pool) < int(n):
            raise ConfigError(
                f"--verify {name}: only {len(pool)} recorded cells ran pinned on this kind of machine ({here['cpu']}, "
                f"{here['cores']} cores) in {results}/cells.",
                "verify fewer cells, name them, or run more of the grid here first.",
            )
        out += rng.sample(pool, int(n))
    return out


def rerun_cell(record: dict) -> tuple[Cell, list[str]]:
    """The cell of a record, as it ran; notes on what had to be assumed."""
    cell = Cell(**record["spec"])
    if "determinism" in record:
        return cell, []
    threads = record.get("torch_threads")
    cell = replace(cell, threads=threads, deterministic=False)
    return cell, [f"record predates pinning: re-run at its {threads} torch thread(s), deterministic mode off"]


def compare(record: dict, again: dict) -> list[str]:
    """What differs between a record and its re-run, one phrase each; empty when the outcome is identical."""
    out = []
    for k in sorted(set(record["dev"]) | set(again["dev"])):
        a, b = record["dev"].get(k), again["dev"].get(k)
        if a != b:
            delta = f", {b - a:+.6g}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) else ""
            out.append(f"{k} {b!r} vs {a!r} recorded{delta}")
    a, b = record.get("rows"), again.get("rows")
    if a and b and a != b:
        out.append(_rows_differ(a, b))
    return out


def _rows_differ(a: dict, b: dict) -> str:
    if "correct" in a and "correct" in b and len(a["correct"]) == len(b["correct"]):
        n = sum(x != y for x, y in zip(a["correct"], b["correct"]))
        return f"{n} of {len(a['correct'])} rows differ"
    key = "bleu_stats" if "bleu_stats" in a else next(iter(a))
    xs, ys = a.get(key, []), b.get(key, [])
    return f"{sum(x != y for x, y in zip(xs, ys)) + abs(len(xs) - len(ys))} of {len(xs)} rows differ"


def _setting_differences(record: dict, again: dict) -> list[str]:
    """Where the re-run's settings differ from the record's (identity inputs, threads, machine)."""
    out = []
    a, b = record.get("identity_inputs") or {}, again.get("identity_inputs") or {}
    for k in sorted(set(a) & set(b)):
        if a[k] != b[k]:
            out.append(f"{k} {b[k]} (record {a[k]})")
    for k in ("torch_threads", "machine"):
        if record.get(k) is not None and record.get(k) != again.get(k):
            out.append(f"{k} {again.get(k)} (record {record.get(k)})")
    return out


def verify(results: str | Path, name: str, run, echo=print) -> bool:
    """Re-run one recorded cell with `run(cell, tmp_results) -> error or None`; echo one line; True if reproduced."""
    results = Path(results)
    path = record_of(results, name)
    record = json.loads(path.read_text())
    cell, notes = rerun_cell(record)
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="softprompt-verify-") as tmp:
        zero_shot = results / "zero_shot" / f"{cell.task}.json"
        if zero_shot.exists():  # the task's zero-shot scores (the cache checks its own key)
            (Path(tmp) / "zero_shot").mkdir()
            shutil.copy(zero_shot, Path(tmp) / "zero_shot" / zero_shot.name)
        error = run(cell, Path(tmp))
        again = None if error else json.loads(record_path(tmp, cell).read_text())
    seconds = time.perf_counter() - t
    if error:
        line = f"{cell.id}: could not re-run ({error})"
        echo(line)
        return False
    differences = compare(record, again)
    metric = record["metric"]
    if not differences:
        what = f"{metric} {record['dev'][metric]!r} and every dev metric identical" + (
            ", every row's outcome too" if record.get("rows") and again.get("rows") else " (the record has no rows)"
        )
        line = f"{cell.id}: reproduced ({what}; {seconds:.0f} s)"
    else:
        settings = _setting_differences(record, again)
        line = f"{cell.id}: NOT reproduced: {'; '.join(differences)}" + (
            f"; re-run with {', '.join(settings)}" if settings else "; same settings and machine"
        )
    here = _machine()
    elsewhere = "machine" in record and not same_machine(record["machine"], here)
    if elsewhere:  # what a re-run on another CPU shows is kept apart: it does not check the record's reproducibility
        line += " [on another kind of machine than the record's: kept in verify/other-machines/]"
    if notes:
        line += f" [{'; '.join(notes)}]"
    atomic_write_text(
        results / "verify" / ("other-machines" if elsewhere else "") / f"{cell.id}.json",
        json.dumps(
            {
                "cell": cell.id,
                "record_identity": record["identity"],
                "reproduced": not differences,
                "line": line,
                "dev": again["dev"],
                "machine": here,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
            indent=1,
        ),
    )
    echo(line)
    return not differences
