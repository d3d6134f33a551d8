"""`softprompt bench GRID.yaml` and `softprompt bench report RESULTS_DIR` (the benchmark: `softprompt.bench`)."""

from __future__ import annotations

from pathlib import Path

from ..bench import load_grid, run_grid, write_report
from ..bench.grid import finished
from ..errors import ConfigError


def add_commands(sub) -> None:
    b = sub.add_parser(
        "bench",
        help="run a benchmark grid (methods x tasks x seeds x steps) or report on one",
        description="`softprompt bench GRID.yaml` runs every cell of the grid that has no record yet "
        "(each in a fresh process) and writes the report; `softprompt bench report "
        "RESULTS_DIR` only writes the report.",
    )
    b.add_argument("grid", metavar="GRID.yaml|report", help="grid file, or the word 'report'")
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
    b.add_argument("--list", action="store_true", help="list the cells and whether they are done; run nothing")
    b.set_defaults(handler=cmd_bench)


def cmd_bench(ns) -> None:
    if ns.grid == "report":
        if not ns.results_dir:
            raise ConfigError(
                "`softprompt bench report` needs the results directory.",
                "pass it: softprompt bench report benchmarks/results/smollm2",
            )
        print(write_report(ns.results_dir))
        return
    grid = load_grid(
        ns.grid, model=ns.model, device=ns.device, dtype=ns.dtype, data_dir=ns.data_dir, results=ns.results
    )
    results = Path(grid.results + ("-quick" if ns.quick else ""))
    everything = grid.cells(quick=ns.quick)
    cells = [c for c in everything if not ns.only or any(o in c.id for o in ns.only)]
    if ns.list:
        for c in cells:
            print(f"{'done' if finished(results, c) else 'todo'}  {c.id}")
        return
    counts = run_grid(cells, results, isolate=not (ns.in_process or ns.quick), grid=everything)
    print(
        f"{counts['done']} cells run, {counts['skipped']} already done, {counts['failed']} failed; "
        f"report: {write_report(results)}"
    )
