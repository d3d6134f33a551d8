"""`softprompt bench GRID.yaml` and `softprompt bench report RESULTS_DIR` (the benchmark: `softprompt.bench`)."""

from __future__ import annotations

import random
from pathlib import Path

from ..base import QUANTIZATIONS
from ..bench import load_grid, run_grid, write_report
from ..bench.grid import estimate_seconds, finished, run_in_own_process, run_in_process
from ..bench.report import load_records
from ..bench.verify import pick, verify
from ..errors import ConfigError


def add_commands(sub) -> None:
    b = sub.add_parser(
        "bench",
        help="run a benchmark grid (methods x tasks x seeds x steps) or report on one",
        description="`softprompt bench GRID.yaml` runs every cell of the grid that has no record yet "
        "(each in a fresh process) and writes the report; `softprompt bench report "
        "RESULTS_DIR` only writes the report; `softprompt bench [GRID.yaml] --verify CELL` runs a "
        "recorded cell again (into a temporary folder) and exits 0 only if it reproduces its record exactly.",
    )
    b.add_argument("grid", nargs="?", metavar="GRID.yaml|report", help="grid file, or the word 'report'")
    b.add_argument("results_dir", nargs="?", metavar="RESULTS_DIR", help="with 'report': the results directory")
    b.add_argument(
        "--quick",
        action="store_true",
        help="first seed only, tiny budgets (the grid's `quick:` section), "
        "all cells in this process (see --in-process); results go to "
        "RESULTS-quick",
    )
    b.add_argument("--results", help="results directory (default: the grid's `results:`)")
    b.add_argument("--model", help="base model (default: the grid's `model:`)")
    b.add_argument("--device", help="cpu, cuda, ... (default: the grid's, else cuda if available)")
    b.add_argument("--dtype", help="float32, bfloat16, ... (default: the grid's, else auto)")
    b.add_argument(
        "--quantize",
        choices=QUANTIZATIONS,
        help="store the frozen weights quantized with bitsandbytes (default: the grid's, else full precision)",
    )
    b.add_argument("--data-dir", help="folder with the tasks' data (default: $SOFTPROMPT_DATA or ../shared/data)")
    b.add_argument(
        "--only",
        action="append",
        metavar="TEXT",
        help="run only cells whose id contains TEXT (repeatable: any of them)",
    )
    b.add_argument(
        "--in-process",
        action="store_true",
        help="run cells in this process (faster start; peak memory is then not per cell)",
    )
    b.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="cells run at once, each in its own process with the grid's threads (on 2 cores: --jobs 2 at 1 thread)",
    )
    b.add_argument(
        "--verify",
        action="append",
        metavar="CELL",
        help="re-run the recorded cell CELL (an id from RESULTS/cells, repeatable; random:N for N pinned cells "
        "picked at random) without replacing its record and compare: one line each, exit 0 only if every one "
        "reproduces exactly (results: the grid's, --results or RESULTS_DIR)",
    )
    b.add_argument(
        "--list", action="store_true", help="list the cells, whether each is done, and estimated times; run nothing"
    )
    b.set_defaults(handler=cmd_bench)


def cmd_bench(ns) -> None:
    if ns.verify:
        return _verify(ns)
    if not ns.grid:
        raise ConfigError("`softprompt bench` needs a grid file.", "pass one: softprompt bench benchmarks/smollm2.yaml")
    if ns.jobs < 1:
        raise ConfigError(f"--jobs {ns.jobs} runs no cell.", "pass --jobs 1 or more.")
    if ns.grid == "report":
        if not ns.results_dir:
            raise ConfigError(
                "`softprompt bench report` needs the results directory.",
                "pass it: softprompt bench report benchmarks/results/smollm2",
            )
        print(write_report(ns.results_dir))
        return
    grid = load_grid(
        ns.grid,
        model=ns.model,
        device=ns.device,
        dtype=ns.dtype,
        quantize=ns.quantize,
        data_dir=ns.data_dir,
        results=ns.results,
    )
    results = Path(grid.results + ("-quick" if ns.quick else ""))
    everything = grid.cells(quick=ns.quick)
    cells = [c for c in everything if not ns.only or any(o in c.id for o in ns.only)]
    if ns.list:
        return _list(cells, results, ns.jobs)
    counts = run_grid(cells, results, isolate=not (ns.in_process or ns.quick), grid=everything, jobs=ns.jobs)
    print(
        f"{counts['done']} cells run, {counts['skipped']} already done, {counts['failed']} failed; "
        f"report: {write_report(results)}"
    )


def _list(cells, results: Path, jobs: int) -> None:
    """Every cell, done or todo, with the time it should take at the pace of the records already there."""
    records = load_records(results) if (results / "cells").is_dir() else []
    total, unknown, todo = 0.0, 0, 0
    for c in cells:
        done = finished(results, c)
        guess = None if done else estimate_seconds(c, records)
        todo += not done
        total += guess or 0.0
        unknown += not done and guess is None
        print(f"{'done' if done else 'todo'}  {c.id}" + (f"  ~{guess / 60:.0f} min" if guess else ""))
    hours = total / 3600
    if todo and unknown == todo:
        print(f"{todo} of {len(cells)} cells to run (no earlier records in {results} to estimate their time from)")
        return
    print(
        f"{todo} of {len(cells)} cells to run: about {hours:.1f} h of cell time"
        + (f" ({unknown} without an earlier record to estimate from)" if unknown else "")
        + f", about {hours / jobs:.1f} h with --jobs {jobs}"
    )


def _verify(ns) -> None:
    """--verify: re-run recorded cells; a one-line verdict each; exit status 1 if any did not reproduce."""
    if ns.grid == "report":
        results = ns.results_dir
    elif ns.grid:
        results = load_grid(ns.grid, results=ns.results).results
    else:
        results = ns.results
    if not results:
        raise ConfigError(
            "`softprompt bench --verify` needs the results directory.",
            "pass the grid file, --results DIR, or `report DIR`.",
        )
    tasks: dict = {}

    def run(cell, tmp):
        return run_in_process(cell, tmp, tasks) if ns.in_process else run_in_own_process(cell, tmp)

    names = pick(Path(results), ns.verify, random.SystemRandom())
    if names != ns.verify:
        print(f"verifying: {' '.join(names)}", flush=True)
    ok = [verify(Path(results), name, run) for name in names]
    if not all(ok):
        raise SystemExit(1)
