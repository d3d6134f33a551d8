"""`softprompt bench report RESULTS_DIR`: a Markdown report and PNG plots from a grid's cell records.

A cell's number is its metric's mean over seeds with a 95% bootstrap interval over seeds and dev
rows (`stats.py`: two levels, 2,000 seeded resamples); records without per-row outcomes (older than
them) get an interval over seeds only, marked †. softprompt against PEFT is a paired difference per
seed (same seed, same dev rows) with its own interval. A winner is named only where intervals
separate. Everything is computed from `cells/*.json`, each run's `metrics.jsonl` and `verify/*.json`,
so a partial grid gives a partial report that names the missing cells; records of cells that are
not in the grid (grid.json: an earlier budget, say) are listed, not summarized.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from functools import cached_property
from pathlib import Path

from ..fileio import atomic_write_text
from .stats import Interval, cell_interval, chance, paired_difference, rows_of

PLOTS = ("metric_vs_params.png", "metric_vs_steps.png", "cost.png", "softprompt_vs_peft.png")
PROMPTS, PREFIXES = ("soft", "ptuning"), ("prefix", "deep")  # the methods of "prompt or prefix?"
SEEDS_ONLY = "†"


def load_records(results: str | Path, folder: str = "cells") -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(results).glob(f"{folder}/*.json"))]


def _scale(metric: str) -> float:
    return 100.0 if metric == "accuracy" else 1.0  # accuracy in %, BLEU already 0-100


def same_machine(a: dict | None, b: dict | None) -> bool:
    """Whether two `_machine()` records are of one kind. A field added to the record later (`isa`) counts only
    where both have it; a record without a machine matches none."""
    return a is not None and b is not None and all(a[k] == b[k] for k in a.keys() & b.keys())


def pinned(record: dict) -> bool:
    """The record ran with its thread count and deterministic mode pinned and in its identity."""
    return "determinism" in record and record.get("threads") is not None


class Group:
    """The records of one (task, method) across seeds."""

    def __init__(self, records: list[dict]):
        self.records = sorted(records, key=lambda r: r["seed"])
        r = self.records[0]
        self.task, self.method, self.kind, self.tool, self.pair = (
            r["task"],
            r["method"],
            r["kind"],
            r["tool"],
            r["pair"],
        )
        self.metric = r["metric"]
        self.values = [x["dev"][self.metric] * _scale(self.metric) for x in self.records]

    def mean(self, key=None) -> float | None:
        vals = self.values if key is None else [x[key] for x in self.records if x.get(key) is not None]
        return statistics.fmean(vals) if vals else None

    @cached_property
    def interval(self) -> Interval:
        """Mean and 95% interval, in display units (accuracy in %)."""
        i = cell_interval([x["dev"][self.metric] for x in self.records], [rows_of(x) for x in self.records])
        return _scaled(i, _scale(self.metric))

    @property
    def by_seed(self) -> dict:
        """{seed: (metric, per-row outcomes or None)} for paired differences."""
        return {x["seed"]: (x["dev"][self.metric], rows_of(x)) for x in self.records}

    @property
    def chance(self) -> float | None:
        """Majority-class share of the dev rows (display units), from any record that has rows."""
        c = next((c for x in self.records if (c := chance(x)) is not None), None)
        return None if c is None else c * _scale(self.metric)

    def fmt(self) -> str:
        return fmt(self.interval)

    def extra(self, name: str) -> float:
        """Mean of another dev metric (e.g. rouge_l), in display units."""
        return statistics.fmean(x["dev"][name] * _scale(name) for x in self.records)

    @property
    def seeds(self) -> int:
        return len(self.records)

    def first(self, *keys):
        v = self.records[0]
        for k in keys:
            v = v[k]
        return v


def _scaled(i: Interval, k: float) -> Interval:
    lo, hi = (None, None) if i.lo is None else (i.lo * k, i.hi * k)
    return Interval(i.mean * k, lo, hi, i.over, i.seeds)


def fmt(i: Interval, sign: str = "") -> str:
    """'82.0 [79.5, 84.3]' (seeds and rows), '82.0 [80.0, 84.0]†' (seeds only), or '82.0' (nothing to resample)."""
    if i.lo is None:
        return f"{i.mean:{sign}.1f}"
    return f"{i.mean:{sign}.1f} [{i.lo:{sign}.1f}, {i.hi:{sign}.1f}]" + (SEEDS_ONLY if i.over == "seeds" else "")


def _groups(records: list[dict], order: list[tuple[str, str]]) -> dict[tuple[str, str], Group]:
    by = defaultdict(list)
    for r in records:
        by[(r["task"], r["method"])].append(r)
    rank = {k: i for i, k in enumerate(order)}
    return {k: Group(v) for k, v in sorted(by.items(), key=lambda kv: rank.get(kv[0], len(rank)))}


def _si(n: float | None, unit: str = "") -> str:
    """1234567 -> '1.23M' (a count) or '1.23 MB' (unit 'B')."""
    if n is None:
        return "–"
    sep = " " if unit else ""
    for prefix, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{sep}{prefix}{unit}"
    return f"{n:.0f}{sep}{unit}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def pairs(groups: dict) -> list[tuple[Group, Group]]:
    """(softprompt group, PEFT group) for every PEFT entry with a `pair`, per task."""
    out = []
    for (task, _), g in groups.items():
        if g.pair and (task, g.pair) in groups:
            out.append((groups[(task, g.pair)], g))
    return out


def check(ours: Group, peft: Group) -> dict:
    """The acceptance checks of one pair: the paired difference ours - PEFT (same seeds, same dev rows) and whether
    it shows ours worse (metric_ok False: the interval lies below 0; None: no interval over rows to judge by),
    time per step and memory ratios."""
    diff = paired_difference(ours.by_seed, peft.by_seed)
    diff = diff and _scaled(diff, _scale(ours.metric))
    return {
        "difference": diff,
        "metric_ok": None if diff is None or diff.lo is None or diff.over == "seeds" else diff.hi >= 0,
        "time_ratio": _ratio(ours.mean("seconds_per_step"), peft.mean("seconds_per_step")),
        "cpu_ratio": _ratio(ours.mean("cpu_seconds_per_step"), peft.mean("cpu_seconds_per_step")),
        "memory_ratio": ours.mean("peak_memory_bytes") / peft.mean("peak_memory_bytes"),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def _flag(ratio: float | None, worse: str) -> str:
    if ratio is None:
        return "–"
    return f"{ratio:.2f}" + ("" if ratio <= 1 else f" **({worse})**")


def _metric_of(groups: dict, task: str) -> str:
    return next((g.metric for (t, _), g in groups.items() if t == task), "")


def headline(groups: dict, tasks: list[str]) -> str:
    """Markdown table: softprompt's methods (and full finetuning) by task: mean [95% interval] (seeds)."""
    methods = list(dict.fromkeys(m for (_, m), g in groups.items() if g.tool == "softprompt"))
    head = ["method"] + [f"{t} ({_metric_of(groups, t)})" if _metric_of(groups, t) else t for t in tasks]
    rows = []
    for m in methods:
        cells = [f"{groups[(t, m)].fmt()} ({groups[(t, m)].seeds})" if (t, m) in groups else "–" for t in tasks]
        if any(c != "–" for c in cells):
            rows.append([m] + cells)
    return _table(head, rows)


def learned(groups: dict, task: str) -> tuple[bool | None, str]:
    """Whether some trained method scores above chance on a classification task (the lower end of its interval over
    the majority-class share of the dev rows): (True/False, why), or (None, why) where that cannot be told."""
    trained = [g for (t, _), g in groups.items() if t == task and g.first("steps")]
    level = next((g.chance for g in trained if g.chance is not None), None)
    if not trained or trained[0].metric != "accuracy":
        return True, ""
    if level is None:
        return None, "chance level unknown: no record has per-row outcomes"
    above = [g for g in trained if g.interval.lo is not None and g.interval.lo > level]
    steps = "/".join(map(str, sorted({g.first("steps") for g in trained})))
    if above:
        return True, f"above chance ({level:.1f}%): {', '.join(g.method for g in above)}"
    return False, f"no method above chance (majority class {level:.1f}% of the dev rows) at {steps} steps"


def verdict(groups: dict, tasks: list[str], prompts=PROMPTS, prefixes=PREFIXES) -> list[str]:
    """One line per task and (prompt, prefix) pair: a winner only where the 95% intervals separate."""
    lines = []
    for task in tasks:
        ok, why = learned(groups, task)
        if ok is False:
            lines.append(f"- {task}: dropped: {why}, so it cannot tell prompts from prefixes.")
            continue
        if why:  # a classification task: which methods clear a constant answer, or why that is unknown
            lines.append(f"- {task}: {'learned: ' if ok else ''}{why}.")
        for prompt in prompts:
            for pre in prefixes:
                a, b = groups.get((task, prompt)), groups.get((task, pre))
                if not a or not b:
                    continue
                ia, ib = a.interval, b.interval
                higher = prompt if ia.mean > ib.mean else pre
                if ia.lo is None or ib.lo is None:
                    who = "no difference shown (one seed without rows: no interval yet)"
                elif "seeds" in (ia.over, ib.over):  # without the rows' error such intervals are too narrow to judge
                    sep = f"they separate, {higher} higher" if ia.separates(ib) else "they overlap"
                    who = f"no verdict from intervals over seeds only ({sep}): re-run these cells to keep their rows"
                elif ia.separates(ib):
                    who = f"**{higher}** ahead (the intervals separate)"
                else:
                    who = "no difference shown (the intervals overlap)"
                lines.append(
                    f"- {task}: {prompt} {a.fmt()} vs {pre} {b.fmt()} ({a.metric}; {min(a.seeds, b.seeds)} seeds, "
                    f"interval over {_over(ia, ib)}): {who}; difference {ia.mean - ib.mean:+.1f}."
                )
    return lines


def _over(*intervals: Interval) -> str:
    kinds = {i.over for i in intervals}
    return "seeds and dev rows" if kinds <= {"seeds and rows", "rows"} else "seeds only" + SEEDS_ONLY


def write_report(results: str | Path, out: str | Path | None = None) -> Path:
    """Write report.md and the PNG plots into `out` (default: the results directory); returns report.md."""
    from .cell import Cell

    results = Path(results)
    out = Path(out) if out else results
    out.mkdir(parents=True, exist_ok=True)
    every = load_records(results)
    grid = json.loads((results / "grid.json").read_text()) if (results / "grid.json").exists() else []
    in_grid = {Cell(**c).id for c in grid}
    records = [r for r in every if not grid or r["cell"] in in_grid]
    outside = [r for r in every if grid and r["cell"] not in in_grid]
    order = list(dict.fromkeys((c["task"], c["method"]) for c in grid))
    groups = _groups(records, order)
    tasks = list(dict.fromkeys([c["task"] for c in grid] + [r["task"] for r in records]))
    _plots(results, out, groups, [t for t in tasks if _metric_of(groups, t)])
    checks = _verifications(results, every)

    md = [f"# Benchmark: {records[0]['model'] if records else '(no records)'}", ""]
    if records:
        md += _setup(results, records, grid, checks)
    md += [
        "## Prompt or prefix? (dev metric: mean over seeds [95% bootstrap interval] (seeds))",
        "",
        headline(groups, tasks),
        "",
        _legend(groups),
        "",
        *verdict(groups, tasks),
        "",
    ]
    md += [
        "## softprompt vs PEFT (same model, data order, steps, batch, lr schedule, seeds)",
        "",
        _peft_table(groups, _speed(results)),
        "",
    ]
    for task in tasks:
        if _metric_of(groups, task):
            md += [f"## {task}", "", _task_table(groups, task), ""]
    md += ["## Plots", ""] + [f"![{p}]({p})" for p in PLOTS if (out / p).exists()] + [""]
    md += _cells_table(records, checks) + _superseded(results, every) + _outside(outside)
    md += _missing(results, grid, records)
    path = out / "report.md"
    atomic_write_text(path, "\n".join(md) + "\n")
    return path


def _legend(groups: dict) -> str:
    kinds = {g.interval.over for g in groups.values()}
    text = "Intervals: 95%, two-level bootstrap (2,000 seeded resamples of seeds, then of dev rows within each seed)."
    if "seeds" in kinds:
        text += (
            f" {SEEDS_ONLY}: over seeds only; these records predate per-row outcomes, so the dev rows' own "
            "sampling error is left out (with 2 seeds the interval is about their range)."
        )
    if "none" in kinds:
        text += " A number without an interval is one seed whose record has no per-row outcomes."
    return text


def _verifications(results: Path, records: list[dict]) -> dict[str, dict]:
    """{cell id: the latest `--verify` of the record now there} (a verification of an older record is ignored)."""
    identity = {r["cell"]: r["identity"] for r in records}
    return {v["cell"]: v for v in load_records(results, "verify") if identity.get(v["cell"]) == v["record_identity"]}


def _setup(results: Path, records: list[dict], grid: list[dict], checks: dict) -> list[str]:
    r = records[0]
    steps: dict[str, set] = {}  # task -> step budgets (tasks may have their own; hard cells train none)
    for x in records:
        if x["steps"]:
            steps.setdefault(x["task"], set()).add(x["steps"])
    batch = sorted({x["batch_size"] for x in records if x.get("batch_size")})
    limits = {c["task"]: c["dev_limit"] for c in grid} or {x["task"]: x["spec"]["dev_limit"] for x in records}
    versions = ", ".join(f"{k} {v}" for k, v in r["versions"].items())
    quantize = sorted({str(x.get("quantize")) for x in records if x.get("quantize")})
    lines = [
        f"Model {r['model']} on {r['device']} ({r['dtype']}{', quantized ' + '/'.join(quantize) if quantize else ''}); "
        f"{versions}.",
        f"Training steps: {', '.join(f'{t} ' + '/'.join(map(str, sorted(s))) for t, s in steps.items())}, "
        f"at batch {', '.join(map(str, batch))}, each method's own learning rate (PEFT entries: that of the "
        "softprompt method they mirror), linear schedule with warmup, "
        f"seeds {sorted({x['seed'] for x in records})}. Dev subsets (fixed rows, the same for every method and "
        f"seed): {', '.join(f'{t} {n}' for t, n in limits.items())}. The metric is that of the final step.",
        f"Cells finished between {min(x['finished'] for x in records)} and {max(x['finished'] for x in records)}. "
        f"Memory: {r['memory_kind']}. Latency: seconds per example at batch size 1 on our inference path.",
        "",
        "How the cells ran (torch threads, deterministic algorithms, 1-minute load average at cell start and end; "
        "times are comparable within this report, not absolute; every cell is listed under "
        "[Cells](#cells-threads-load-reproducibility)):",
        "",
        _how_table(records),
        "",
    ]
    old = [x for x in records if not pinned(x)]
    if old:
        lines += [
            f"**{len(old)} of {len(records)} records predate the pinning of threads and deterministic mode** (their "
            "identity has neither, and the thread count changes results: one TREC cell gave 77.5% at 1 thread and "
            "60.0% at 2): they need a re-run, which the grid does by itself (their identity is stale).",
            "",
        ]
    failed = [c for c, v in checks.items() if not v["reproduced"]]
    if checks:
        lines += [
            f"Re-run with `--verify`: {len(checks) - len(failed)} of {len(checks)} reproduced exactly"
            + (f"; **not reproduced: {', '.join(failed)}**" if failed else "")
            + ".",
            "",
        ]
    other = load_records(results, "verify/other-machines")
    if other:
        lines += [
            "Re-runs on another kind of machine than their record's (they check nothing: another CPU's kernels sum in "
            "another order): "
            + "; ".join(f"{v['cell']} on {v['machine']['cpu']}: {('differs', 'equal')[v['reproduced']]}" for v in other)
            + ".",
            "",
        ]
    return lines


def _how_table(records: list[dict]) -> str:
    by = defaultdict(list)
    for x in records:
        machine = x.get("machine", {})
        cpu = machine.get("cpu") and machine["cpu"] + (f" ({machine['isa']})" if "isa" in machine else "")
        key = (x["torch_threads"], x.get("determinism", "(not recorded)"), pinned(x), cpu)
        by[key].append(x)
    rows = []
    for (threads, det, pin, cpu), xs in sorted(by.items(), key=lambda kv: str(kv[0])):
        start = [x["load_average"]["start"] for x in xs]
        end = [x["load_average"]["end"] for x in xs]
        rows.append(
            [
                str(threads) + ("" if pin else " (not pinned)"),
                det,
                cpu or "(not recorded)",
                str(len(xs)),
                f"{min(start):.1f}–{max(start):.1f}",
                f"{min(end):.1f}–{max(end):.1f}",
            ]
        )
    return _table(["torch threads", "deterministic", "CPU", "cells", "load at start", "load at end"], rows)


def _cells_table(records: list[dict], checks: dict) -> list[str]:
    """Every record: how it ran and whether it is reproducible (verified, flagged or needing a re-run)."""
    rows = []
    for x in sorted(records, key=lambda r: r["cell"]):
        v = checks.get(x["cell"])
        if not pinned(x):
            status = "**needs a re-run** (predates pinning)"
        elif v is None:
            status = "not verified"
        else:
            status = "reproduced" if v["reproduced"] else f"**NOT reproduced** ({v['finished']})"
        load = x["load_average"]
        rows.append(
            [
                x["cell"],
                str(x["torch_threads"]),
                x.get("determinism", "–"),
                f"{load['start']:.1f} → {load['end']:.1f}",
                x["finished"],
                status,
            ]
        )
    head = ["cell", "threads", "deterministic", "load start → end", "finished", "reproducibility"]
    return ["## Cells: threads, load, reproducibility", "", _table(head, rows), ""]


def _superseded(results: Path, records: list[dict]) -> list[str]:
    """Each record that a run of another identity replaced (`cell.supersede`) beside the record now there. Where both
    ran at one thread count on one kind of machine, an equal metric shows that the code changed between them moved
    nothing; another thread count or CPU sums in another order, and a record without its machine cannot tell."""
    now = {r["cell"]: r for r in records}
    pairs = [(old, now[old["cell"]]) for old in load_records(results, "superseded") if old["cell"] in now]
    if not pairs:
        return []
    rows, same, alike = [], 0, 0
    for old, new in sorted(pairs, key=lambda p: p[0]["cell"]):
        k = _scale(old["metric"])
        equal = old["dev"] == new["dev"]
        if old["torch_threads"] != new["torch_threads"]:
            unlike = "another thread count"
        elif "machine" not in old:
            unlike = "machine not recorded"
        elif not same_machine(old["machine"], new["machine"]):
            unlike = "another machine"
        else:
            unlike = None
        same, alike = same + (equal and not unlike), alike + (not unlike)
        rows.append(
            [
                old["cell"],
                f"{old['torch_threads']}{'' if pinned(old) else ' (not pinned)'}, "
                f"{old.get('machine', {}).get('cpu', '?')}, {old['finished'][:10]}",
                f"{new['torch_threads']}, {new['machine']['cpu']}, {new['finished'][:10]}",
                f"{old['dev'][old['metric']] * k:.1f} → {new['dev'][new['metric']] * k:.1f}",
                ("equal" if equal else "**differs**" if not unlike else "differs") + (f" ({unlike})" if unlike else ""),
            ]
        )
    head = [
        "cell",
        "before: threads, CPU, finished",
        "now: threads, CPU, finished",
        "metric before → now",
        "every dev metric",
    ]
    return [
        "## Re-runs of replaced records",
        "",
        f"{len(pairs)} records were replaced by a run of another identity (the old ones are in `superseded/`). "
        f"{same} of the {alike} that ran at the same thread count on the same kind of machine have every dev metric "
        "equal. The others cannot tell: another thread count or CPU sums in another order, and the records from "
        "before the pinning did not record their machine.",
        "",
        _table(head, rows),
        "",
    ]


def _outside(records: list[dict]) -> list[str]:
    if not records:
        return []
    return (
        [
            f"## Records outside the current grid ({len(records)}, not summarized above)",
            "",
            "Cells of an earlier grid (another step budget, say); their records are kept.",
            "",
        ]
        + [f"- {r['cell']}: {r['metric']} {r['dev'][r['metric']] * _scale(r['metric']):.1f}" for r in records]
        + [""]
    )


def _task_table(groups: dict, task: str) -> str:
    head = [
        "method",
        "tool",
        "init",
        "lr",
        "dev",
        "best eval",
        "zero-shot",
        "trainable (training / saved)",
        "file",
        "s/step",
        "CPU s/step",
        "tokens/s",
        "peak memory",
        "latency / example",
        "seeds",
    ]
    rows = []
    for (t, m), g in groups.items():
        if t != task:
            continue
        scale = _scale(g.metric)
        dev = g.fmt() + (f" (ROUGE-L {g.extra('rouge_l'):.1f})" if g.metric == "bleu" else "")
        best = g.mean("dev_best")
        sps, cps, tps = g.mean("seconds_per_step"), g.mean("cpu_seconds_per_step"), g.mean("tokens_per_second")
        lr = g.first("lr")
        rows.append(
            [
                m,
                g.tool,
                str(g.first("init") or "–"),
                "–" if lr is None else f"{lr:g}",
                dev,
                "–" if best is None else f"{best * scale:.1f}",
                f"{g.first('zero_shot', g.metric) * scale:.1f}",
                f"{_si(g.first('trainable_parameters', 'training'))} / {_si(g.first('trainable_parameters', 'saved'))}",
                _si(g.first("file_bytes"), "B"),
                "–" if sps is None else f"{sps:.2f}",
                "–" if cps is None else f"{cps:.2f}",
                "–" if tps is None else f"{tps:.0f}",
                f"{g.mean('peak_memory_bytes') / 2**30:.2f} GiB",
                f"{1000 * g.mean('latency_seconds_per_example'):.0f} ms",
                str(g.seeds),
            ]
        )
    return _table(head, rows)


def _peft_table(groups: dict, speed: dict) -> str:
    """One row per pair: both metrics, the paired difference per seed (ours - PEFT, same seeds and dev rows) with
    its interval, and time ratios: the grid's cells (wall, and CPU summed over threads; cells ran at different
    times, so on a shared machine these compare loads as much as code) and, where measured, the interleaved A/B
    run of benchmarks/peft_speed.py (same process, alternating steps)."""
    head = [
        "task",
        "softprompt",
        "PEFT",
        "metric ours / PEFT",
        "ours − PEFT, paired [95%] (seeds)",
        "verdict",
        "s/step ours / PEFT (grid wall)",
        "(grid CPU)",
        "(interleaved)",
        "peak memory ours / PEFT",
    ]
    rows = []
    for ours, peft in pairs(groups):
        c = check(ours, peft)
        d = c["difference"]
        ab = speed.get((ours.task, peft.kind))
        rows.append(
            [
                ours.task,
                ours.method,
                peft.method,
                f"{ours.fmt()} / {peft.fmt()}",
                "– (no common seed)" if d is None else f"{fmt(d, '+')} ({d.seeds})",
                _pair_verdict(d),
                _flag(c["time_ratio"], "slower"),
                _flag(c["cpu_ratio"], "slower"),
                _flag(ab and ab["ratio_wall"], "slower"),
                _flag(c["memory_ratio"], "more"),
            ]
        )
    return _table(head, rows) if rows else "(no paired cells yet)"


def _pair_verdict(d: Interval | None) -> str:
    if d is None or d.lo is None:
        return "– (no interval)"
    if d.over == "seeds":
        return f"no verdict (seeds only{SEEDS_ONLY})"
    if not d.excludes_zero:
        return "no difference shown"
    return "ours ahead" if d.lo > 0 else "**PEFT ahead**"


def _speed(results: Path) -> dict:
    """Interleaved ratios from benchmarks/peft_speed.py, by (task, PEFT kind), if that file is there."""
    path = results / "peft_speed.json"
    if not path.exists():
        return {}
    return {(r["task"], r["peft_kind"]): r for r in json.loads(path.read_text())["pairs"]}


def _missing(results: Path, grid: list[dict], records: list[dict]) -> list[str]:
    from .cell import Cell

    have = {r["cell"] for r in records}

    missing = [Cell(**c).id for c in grid if Cell(**c).id not in have]
    if not missing:
        return ["All cells of the grid have records."]
    failed = {p.stem for p in (results / "logs").glob("*.log")} if (results / "logs").is_dir() else set()
    return [f"## Missing cells ({len(missing)} of {len(grid)})", ""] + [
        f"- {m}" + (" (failed; see logs/)" if m in failed else "") for m in missing
    ]


# --- plots -----------------------------------------------------------------------------------------------------------


def _history(results: Path, group: Group) -> list[list[dict]]:
    runs = []
    for r in group.records:
        path = results / r["history"] if r.get("history") else None
        if path and path.exists():
            runs.append([json.loads(x) for x in path.read_text().splitlines() if x.strip()])
    return runs


def _colors(groups: dict, cmap) -> dict[str, tuple]:
    """A color per method: a PEFT entry gets the light shade of its softprompt pair's hue."""
    methods = list(dict.fromkeys(m for _, m in groups))
    pair = {g.method: g.pair for g in groups.values() if g.pair}
    hues = [m for m in methods if m not in pair]
    return {m: cmap((2 * hues.index(pair[m]) + 1 if m in pair else 2 * hues.index(m)) % 20) for m in methods}


def _plots(results: Path, out: Path, groups: dict, tasks: list[str]) -> None:
    """The report's figures, one PNG each (PLOTS): metric vs parameters, curves, cost, and softprompt vs PEFT."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..plots import save_png

    if not groups:
        return
    colors = _colors(groups, plt.get_cmap("tab20"))
    figures = [
        _plot_metric_vs_params(plt, groups, tasks, colors),
        _plot_curves(plt, results, groups, tasks, colors),
        _plot_cost(plt, groups, tasks, colors),
        _plot_vs_peft(plt, groups, tasks),
    ]
    for fig, name in zip(figures, PLOTS):
        if fig is None:
            continue
        for ax in fig.axes:
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6)
        fig.tight_layout()
        save_png(fig, out / name, dpi=90)
        plt.close(fig)


def _yerr(groups: list[Group]) -> list[list[float]]:
    """Error bars from each group's 95% interval (none where it has none)."""
    i = [g.interval for g in groups]
    below = [x.mean - x.lo if x.lo is not None else 0.0 for x in i]
    return [below, [x.hi - x.mean if x.lo is not None else 0.0 for x in i]]


def _plot_metric_vs_params(plt, groups: dict, tasks: list[str], colors: dict):
    """Metric against trainable parameters (log x); the hard prompt (0 parameters) is a dashed line."""
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for (t, m), g in groups.items():
            if t != task:
                continue
            params = g.first("trainable_parameters", "training")
            if not params:
                ax.axhline(g.mean(), ls="--", color="gray", label=f"{m} (0 params)")
                continue
            ax.errorbar(
                [params],
                [g.mean()],
                yerr=_yerr([g]),
                fmt="x" if g.tool == "peft" else "o",
                color=colors[m],
                label=m,
                capsize=3,
            )
        ax.set(xscale="log", xlabel="trainable parameters (training)", title=task, ylabel=_metric_of(groups, task))
    return fig


def _curve(runs: list[list[dict]], key: str, g: Group) -> dict[int, list[float]]:
    """{step: values over seeds} of the eval metric (scaled, with the zero-shot score at step 0) or the loss."""
    pts = defaultdict(list)
    for run in runs:
        for rec in run:
            if key in rec:
                pts[rec["step"]].append(rec[key][g.metric] * _scale(g.metric) if key == "eval" else rec[key])
    if key == "eval":
        pts[0] = [g.first("zero_shot", g.metric) * _scale(g.metric)]
    return pts


def _plot_curves(plt, results: Path, groups: dict, tasks: list[str], colors: dict):
    """Dev metric (top) and training loss (bottom) against steps, mean over seeds."""
    fig, axes = plt.subplots(2, len(tasks), figsize=(4.6 * len(tasks), 7), squeeze=False)
    for col, task in enumerate(tasks):
        for (t, m), g in groups.items():
            if t != task or not g.records[0]["steps"]:
                continue
            runs = _history(results, g)
            for row, key in ((0, "eval"), (1, "loss")):
                pts = _curve(runs, key, g)
                if pts:
                    steps = sorted(pts)
                    axes[row][col].plot(
                        steps,
                        [statistics.fmean(pts[s]) for s in steps],
                        ls="--" if g.tool == "peft" else "-",
                        marker="o" if row == 0 else None,
                        color=colors[m],
                        label=m,
                    )
        axes[0][col].set(title=task, xlabel="step", ylabel="dev " + _metric_of(groups, task))
        axes[1][col].set(xlabel="step", ylabel="train loss (mean since the last record)")
    return fig


def _plot_cost(plt, groups: dict, tasks: list[str], colors: dict):
    """Seconds per step and peak memory per method."""
    fig, axes = plt.subplots(2, len(tasks), figsize=(4.6 * len(tasks), 8), squeeze=False)
    for col, task in enumerate(tasks):
        gs = [g for (t, _), g in groups.items() if t == task and g.mean("seconds_per_step") is not None]
        names = [g.method for g in gs]
        axes[0][col].barh(names, [g.mean("seconds_per_step") for g in gs], color=[colors[m] for m in names])
        axes[1][col].barh(names, [g.mean("peak_memory_bytes") / 2**30 for g in gs], color=[colors[m] for m in names])
        axes[0][col].set(title=task, xlabel="seconds per training step")
        axes[1][col].set(xlabel="peak memory (GiB)")
        for ax in axes[:, col]:
            ax.invert_yaxis()
            ax.tick_params(axis="y", labelsize=7)
    return fig


def _plot_vs_peft(plt, groups: dict, tasks: list[str]):
    """softprompt against PEFT, side by side for each paired method; None without pairs."""
    ps = pairs(groups)
    if not ps:
        return None
    fig, axes = plt.subplots(3, len(tasks), figsize=(4.6 * len(tasks), 9), squeeze=False)
    for col, task in enumerate(tasks):
        tp = [(o, p) for o, p in ps if o.task == task]
        x = range(len(tp))
        for row, (label, get) in enumerate(
            (
                ("dev " + (tp[0][0].metric if tp else ""), lambda g: g.mean()),
                ("seconds per step", lambda g: g.mean("seconds_per_step")),
                ("peak memory (GiB)", lambda g: g.mean("peak_memory_bytes") / 2**30),
            )
        ):
            ax = axes[row][col]
            ax.bar([i - 0.2 for i in x], [get(o) for o, _ in tp], 0.4, label="softprompt", color="C0")
            ax.bar([i + 0.2 for i in x], [get(p) for _, p in tp], 0.4, label="PEFT", color="C1")
            if row == 0:
                for shift, side in ((-0.2, 0), (0.2, 1)):
                    ax.errorbar(
                        [i + shift for i in x],
                        [pair[side].mean() for pair in tp],
                        yerr=_yerr([pair[side] for pair in tp]),
                        fmt="none",
                        color="k",
                        capsize=3,
                    )
            ax.set_xticks(list(x), [o.method for o, _ in tp], rotation=30, fontsize=7)
            ax.set(ylabel=label, title=task if row == 0 else None)
    return fig
