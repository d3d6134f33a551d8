"""How `softprompt serve` scales with its number of tasks and with offered load (issue 17), on SmolLM2-135M.

    PYTHONPATH=. python benchmarks/serving_scale.py                  # ~40 min on 2 shared CPU cores; writes results/
    PYTHONPATH=. python benchmarks/serving_scale.py --quick          # a smoke run (counts 0,1,100; rates 2,4 for 15 s)
    PYTHONPATH=. python benchmarks/serving_scale.py --counts 10000 --skip-load --out /tmp/scale   # one axis, one N

Every number comes from one run of this script, the variants side by side on the same machine (which is shared:
the 1-minute load average before and after each part is in the JSON). The server is `softprompt serve` in a
subprocess on 127.0.0.1 with 1 torch thread (`many_tasks.running_server`), batcher max 32 rows / 20 ms.

1. Task count. For N in --counts (default 0, 1, 100, 1000, 10000), a store of N prompt files, each a copy of one
   random 20-token soft prompt (N = 0: an empty store, the base model's own footprint). Per N:
   - startup_s: seconds from the server process's start to its first 200 from GET /health (goal <= 15 s at 10,000),
     beside an approximate breakdown measured in this process: Python imports (a subprocess importing what the
     server imports), `load_base`, and `MultiTask.sync` indexing the store (file headers only); rescan_s is one
     more `sync` with nothing changed, which the server's worker runs every --reload-interval (1 s) between batches;
   - rss_mb_start / rss_mb_after: the server's resident memory (VmRSS) right after /health answers, and after the
     requests below, and its anonymous part (RssAnon; the rest is file-backed: the memory-mapped weights, which a
     server with no tasks mostly never reads); cache: the compiled-prompt cache as /health shows it (no API key:
     fully shown);
   - models_s / models_bytes: GET /v1/models, median time of 3, and the size of its answer;
   - first_s: the server's first POST /v1/classify (a cold task, also paying the first forward pass); cold_s: the
     median first request to other tasks never used (each pays reading and compiling its prompt), warm_s: the median
     of the same tasks again. Goal: cold_s <= warm_s + compile_s, where compile_s (`base.family.compile`) and read_s
     (`Prompt.load`) are the median in-process times of those steps alone;
   - the footprint check: RSS(N max) <= RSS(N = 0) + cache bytes in use + 100 MB, right after start and after the
     requests, on all resident memory and on its anonymous part.
2. Load (open loop). The 8 tasks of the 1,000-request load test (`many_tasks.SERVER_TASKS`: soft, prefix, deep,
   P-tuning, a template alone; its request mix `many_tasks.requests_plan`, 16 new tokens) with the server run once
   per mode: `--batching static` and `--batching continuous` (when `softprompt serve` has the option; else one
   mode, the server's default), and `no prompts`: the same 8 task names, templates and requests as method-less hard
   prompts (the plain model: the limit that prompts should not move). Per mode and offered rate (--rates, requests/s,
   Poisson arrivals for --seconds, the same seed for every mode; `soak.soak`): p50/p99 latency from each request's
   scheduled arrival (client-side lag counts), achieved throughput (completed requests and generated tokens per
   second of wall time, the drain of the last requests included), failures (goal 0; a 429 from a full queue
   counts). Then one closed-loop saturation point per mode: --saturation-requests from 64 clients
   (`many_tasks.load`), p50/p99 (overall and per endpoint) and throughput, sent in --saturation-rounds rounds that
   take the modes in turn (every server runs for the whole part), so a drift of the shared machine's speed moves
   every mode alike.

Writes serving_scale.json (everything, with metadata), serving_scale.md (tables) and the plots
serving_scale_tasks.png (startup and RSS vs N) and serving_scale_load.png (p50/p99 vs offered load per mode);
with --quick the names end in -quick, with --suffix S in S.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import many_tasks as bench  # noqa: E402  (the store, request mix, client and server of the load test)
import soak  # noqa: E402  (the open-loop Poisson load and the server's RSS)

import softprompt as sp  # noqa: E402
from softprompt.injection import Injection  # noqa: E402
from softprompt.multitask import MultiTask  # noqa: E402
from softprompt.store import Store  # noqa: E402

MB = 2**20
SERVER_BATCH, SERVER_WAIT_MS = 32, 20.0  # the load test's batcher


def memory_mb(pid: int) -> dict:
    """Resident memory of process `pid` in MiB (Linux /proc): all (VmRSS), anonymous (RssAnon: what the process
    allocated) and file-backed (RssFile: mapped files, here mostly the model's weights, paged in as they are read)."""
    fields = {"VmRSS:": "rss", "RssAnon:": "anon", "RssFile:": "file"}
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key = line.split(maxsplit=1)[0] if line else ""
        if key in fields:
            out[fields[key]] = round(int(line.split()[1]) / 1024, 1)
    return out


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def median_time(fn, rounds: int) -> float:
    fn()  # warm-up
    return statistics.median(bench.timed(fn) for _ in range(rounds))


def spread(names: list[str], k: int) -> list[str]:
    """Up to k names spread evenly over `names` (sorted), first and last included."""
    if len(names) <= k or k < 2:
        return names[:k]
    return [names[round(i * (len(names) - 1) / (k - 1))] for i in range(k)]


# --- 1. task count -------------------------------------------------------------------------------------------------


def scale_prompt(base) -> sp.Prompt:
    """One random 20-token soft prompt of the base model's width (untrained: serving cost does not depend on it)."""
    torch.manual_seed(0)
    injection = Injection(embeds=torch.randn(20, base.hidden_size) * 0.02)  # (P, D)
    return sp.Prompt.for_base(base, injection, "soft", {"num_virtual_tokens": 20}, sp.load_task("sst2").spec)


def copies_store(source: Path, root: Path, n: int) -> Store:
    """A store of n prompt files, each a byte copy of `source`: task-00000 ... task-{n-1}."""
    store = Store(root)
    root.mkdir(parents=True)
    data = source.read_bytes()
    for i in range(n):
        store.path(f"task-{i:05d}").write_bytes(data)
    return store


def server_imports_s() -> float:
    """Seconds a fresh interpreter takes to import what `softprompt serve` imports before it loads the model."""
    code = "import softprompt.commands, softprompt.multitask, softprompt.serving, uvicorn, transformers"
    env = os.environ | {"PYTHONPATH": f"{bench.ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    return time.perf_counter() - t


def index_times(base, store: Store) -> tuple[float, float]:
    """(seconds of a first `MultiTask.sync` of `store`: indexing from headers, seconds of a second one: a rescan)."""
    mt = MultiTask(base)
    first = bench.timed(lambda: mt.sync(store))
    assert len(mt) == len(store.names()), mt.refused
    return first, bench.timed(lambda: mt.sync(store))


def classify(client, body: dict) -> tuple[float, str | None]:
    """(seconds, failure or None) of one POST /v1/classify."""
    t = time.perf_counter()
    try:
        r = client.post("/v1/classify", json=body)
        failure = None if r.status_code == 200 and "data" in r.json() else f"{r.status_code} {r.text[:200]}"
    except Exception as e:  # noqa: BLE001 - a failed request is counted, not fatal
        failure = f"{type(e).__name__}: {e}"
    return time.perf_counter() - t, failure


def bench_count(store: Store, body: dict, cold_tasks: int, threads: int, server_args: list[str]) -> dict:
    """Start a server on `store`, then time /v1/models and cold / warm classify requests on it."""
    import httpx

    names = store.names()
    t0 = time.perf_counter()
    with bench.running_server(store, SERVER_BATCH, SERVER_WAIT_MS, threads, server_args, poll=0.05) as (url, server):
        startup = time.perf_counter() - t0
        mem_start = memory_mb(server.pid)
        with httpx.Client(base_url=url, timeout=600) as client:
            cache_start = client.get("/health").json().get("cache")
            models = [bench.timed(lambda: client.get("/v1/models").raise_for_status()) for _ in range(3)]
            listed = client.get("/v1/models")
            assert len(listed.json()["data"]) == len(names), "the server lists another number of tasks"
            failures, cold, warm, first = [], [], [], None
            for i, name in enumerate(spread(names, cold_tasks + 1)):
                s_cold, f1 = classify(client, body | {"model": name})  # first use: read + compile
                s_warm, f2 = classify(client, body | {"model": name})  # from the cache
                failures += [f for f in (f1, f2) if f]
                if i == 0:
                    first = s_cold
                else:
                    cold.append(s_cold)
                warm.append(s_warm)
            health = client.get("/health").json()
        mem_after = memory_mb(server.pid)
    return {
        "tasks": len(names),
        "startup_s": round(startup, 2),
        "rss_mb_start": mem_start["rss"],
        "rss_mb_after": mem_after["rss"],
        "memory_mb_start": mem_start,
        "memory_mb_after": mem_after,
        "cache_start": cache_start,
        "cache": health.get("cache"),
        "models_s": round(statistics.median(models), 4),
        "models_bytes": len(listed.content),
        "first_s": None if first is None else round(first, 4),
        "cold_s": round(statistics.median(cold), 4) if cold else None,
        "warm_s": round(statistics.median(warm), 4) if warm else None,
        "cold_samples_s": [round(x, 4) for x in cold],
        "warm_samples_s": [round(x, 4) for x in warm],
        "requests": 2 * len(warm),
        "failures": len(failures),
        "failure_examples": failures[:3],
    }


def bench_counts(base, counts: list[int], cold_tasks: int, threads: int, server_args: list[str], tmp: Path) -> dict:
    prompt = scale_prompt(base)
    one = Store(tmp / "one")
    source = one.save("task-00000", prompt)
    path, body = bench.requests_plan(one, 1)[0]  # an SST-2 dev input of the load test's mix, as /v1/classify
    assert path == "/v1/classify"
    with torch.inference_mode():
        read_s = median_time(lambda: sp.Prompt.load(source, base), 5)
        injection = prompt.injection.to(base.device, base.dtype)
        compile_s = median_time(lambda: base.family.compile(injection), 5)
    compiled = base.family.compile(injection)
    out = {
        "load_before": load_avg(),
        "virtual_tokens": 20,
        "file_bytes": source.stat().st_size,
        "compiled_bytes": sum(t.numel() * t.element_size() for t in compiled.tensors().values()),
        "read_s": round(read_s, 4),
        "compile_s": round(compile_s, 4),
        "imports_s": round(server_imports_s(), 2),
        "cold_tasks": cold_tasks,
        "request": body,
        "runs": [],
    }
    print(f"(1) one prompt: { ({k: v for k, v in out.items() if k != 'runs'}) }", flush=True)
    for n in counts:
        root = tmp / f"n{n}"
        t = time.perf_counter()
        store = copies_store(source, root, n)
        write_s = time.perf_counter() - t
        index_s, rescan_s = index_times(base, store)
        run = {"write_s": round(write_s, 2), "index_s": round(index_s, 3), "rescan_s": round(rescan_s, 4)}
        run |= bench_count(store, {"input": body["input"]}, cold_tasks, threads, server_args)
        run["load1_after"] = load_avg()[0]
        shutil.rmtree(root)
        print(f"(1) N={n}: {run}", flush=True)
        out["runs"].append(run)
    runs = {r["tasks"]: r for r in out["runs"]}
    if 0 in runs and max(runs) > 0:
        big, zero = runs[max(runs)], runs[0]
        used = (big["cache"] or {}).get("bytes", 0)
        # RSS(N) <= RSS(0) + cache in use + 100 MB, on all resident memory and on the anonymous part alone: the
        # server with no tasks never reads most of its (memory-mapped) weights, one with tasks does at its first
        # prompt (the base model's fingerprint, a forward), so file-backed pages differ by up to the weights' size
        out["footprint_check"] = {"tasks": big["tasks"], "cache_mb_used": round(used / MB, 2)}
        for kind in ("rss", "anon"):
            zero_mb = zero["memory_mb_start"][kind]
            out["footprint_check"][kind] = {
                "zero_tasks_mb": zero_mb,
                "start_mb": big["memory_mb_start"][kind],
                "after_mb": big["memory_mb_after"][kind],
                "limit_after_mb": round(zero_mb + used / MB + 100, 1),
                "ok_start": big["memory_mb_start"][kind] <= zero_mb + 100,
                "ok_after": big["memory_mb_after"][kind] <= zero_mb + used / MB + 100,
            }
        if 1 in runs and max(runs) > 1:  # one task: weights paged in as with N, its cache a prompt
            one, used_one = runs[1], (runs[1]["cache"] or {}).get("bytes", 0)
            limit = one["rss_mb_after"] + (used - used_one) / MB + 100
            out["footprint_check"]["rss_vs_one_task"] = {
                "one_task_after_mb": one["rss_mb_after"],
                "limit_after_mb": round(limit, 1),
                "ok_after": big["rss_mb_after"] <= limit,
            }
    out["load_after"] = load_avg()
    return out


# --- 2. load -------------------------------------------------------------------------------------------------------


def has_batching_option() -> bool:
    env = os.environ | {"PYTHONPATH": f"{bench.ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    text = subprocess.run(
        [sys.executable, "-m", "softprompt", "serve", "--help"], env=env, capture_output=True, text=True, check=True
    ).stdout
    return "--batching" in text


def open_loop_point(url: str, pid: int, plan, rate: float, seconds: float, seed: int) -> dict:
    import httpx

    before = httpx.get(url + "/health").json()
    run = asyncio.run(soak.soak(url, pid, plan, rate, seconds, seed, sample_every=5.0))
    latencies = [lat for _, lat, _ in run["records"]]
    failures = [f for _, _, f in run["records"] if f]
    wall, tokens = run["wall_s"], run["health"]["tokens"] - before["tokens"]
    return {
        "rate_per_s": rate,
        "requests": len(latencies),
        "failures": len(failures),
        "failure_examples": sorted(set(failures))[:3],
        "latency_p50_s": round(soak.quantile(latencies, 50), 3),
        "latency_p99_s": round(soak.quantile(latencies, 99), 3),
        "latency_max_s": round(max(latencies), 3),
        "wall_s": round(wall, 1),
        "achieved_req_per_s": round((len(latencies) - len(failures)) / wall, 2),
        "generated_tokens": tokens,
        "generated_tokens_per_s": round(tokens / wall, 1),
        "mean_batch_rows": round(
            (run["health"]["rows"] - before["rows"]) / max(run["health"]["batches"] - before["batches"], 1), 1
        ),
        "queued_max": max(s["queued"] for s in run["samples"]),
        "rss_mb_max": round(max(s["rss_bytes"] for s in run["samples"]) / MB, 1),
        "load1_mean": round(statistics.mean(s["load1"] for s in run["samples"]), 2),
    }


def saturation_round(url: str, plan) -> dict:
    """One closed-loop round of the 1,000-request test: `plan` from 64 concurrent clients."""
    import httpx

    before = httpx.get(url + "/health").json()
    paths: list[str] = []
    latencies, failures, wall = asyncio.run(bench.load(url, plan, 64, paths))
    tokens = httpx.get(url + "/health").json()["tokens"] - before["tokens"]
    return {"latencies": latencies, "paths": paths, "failures": failures, "wall_s": wall, "tokens": tokens}


def saturation_point(rounds: list[dict]) -> dict:
    """The closed-loop point of one mode from its rounds: latency quantiles over all their requests (overall and
    per endpoint), throughput over their summed wall time, and each round's throughput."""
    latencies = [x for r in rounds for x in r["latencies"]]
    paths = [x for r in rounds for x in r["paths"]]
    failures = [x for r in rounds for x in r["failures"]]
    wall = sum(r["wall_s"] for r in rounds)
    by_path = {p: [lat for q, lat in zip(paths, latencies) if q == p] for p in sorted(set(paths))}
    return {
        "requests": len(latencies),
        "concurrency": 64,
        "rounds": len(rounds),
        "failures": len(failures),
        "failure_examples": sorted(set(failures))[:3],
        "latency_p50_s": round(soak.quantile(latencies, 50), 3),
        "latency_p99_s": round(soak.quantile(latencies, 99), 3),
        "by_endpoint": {
            p: {"requests": len(v), "p50_s": round(soak.quantile(v, 50), 3), "p99_s": round(soak.quantile(v, 99), 3)}
            for p, v in by_path.items()
        },
        "wall_s": round(wall, 1),
        "requests_per_s": round(len(latencies) / wall, 2),
        "requests_per_s_by_round": [round(len(r["latencies"]) / r["wall_s"], 2) for r in rounds],
        "generated_tokens_per_s": round(sum(r["tokens"] for r in rounds) / wall, 1),
    }


def load_modes(tasks: Store, plain: Store, batching: bool, plain_batching: str) -> list[tuple[str, Store, list[str]]]:
    """(mode, store, extra `serve` options): static and continuous batching with the prompts, and the plain model."""
    if not batching:  # the server has one way to batch: its default
        return [("default", tasks, []), ("no prompts", plain, [])]
    return [
        ("static", tasks, ["--batching", "static"]),
        ("continuous", tasks, ["--batching", "continuous"]),
        ("no prompts", plain, ["--batching", plain_batching]),
    ]


def bench_load(base, args, tmp: Path, server_args: list[str]) -> dict:
    """Every mode's server runs for the whole part: the open-loop points mode after mode, then the closed-loop
    requests in rounds that take the modes in turn (the order reversed every round), so that a machine whose speed
    drifts (it is shared) moves every mode alike."""
    batching = has_batching_option()
    tasks = bench.make_store(base, bench.SERVER_TASKS, tmp / "tasks")
    plain = bench.make_store(base, [(name, task, None, 0) for name, task, _, _ in bench.SERVER_TASKS], tmp / "plain")
    modes = load_modes(tasks, plain, batching, args.plain_batching)
    plan_n = int(max(args.rates) * args.seconds * 1.5) + 100
    out = {
        "load_before": load_avg(),
        "batching_option": batching,
        "plain_batching": args.plain_batching if batching else "default",
        "tasks": [name for name, *_ in bench.SERVER_TASKS],
        "methods": sorted({sp.load_prompt(tasks.path(t)).method for t in tasks.names()}),
        "seconds": args.seconds,
        "seed": args.seed,
        "modes": {},
    }
    with contextlib.ExitStack() as stack:
        servers = {}
        for mode, store, extra in modes:
            servers[mode] = stack.enter_context(
                bench.running_server(store, SERVER_BATCH, SERVER_WAIT_MS, args.threads, server_args + extra)
            )
        for mode, store, _ in modes:
            url, server = servers[mode]
            plan = bench.requests_plan(store, plan_n)
            out.setdefault("mix", {p: sum(1 for x, _ in plan if x == p) for p in sorted({x for x, _ in plan})})
            asyncio.run(bench.load(url, plan[: 2 * len(store.names())], 4))  # warm-up: every prompt compiled once
            r = out["modes"][mode] = {"load_before": load_avg(), "open_loop": []}
            for rate in args.rates:
                point = open_loop_point(url, server.pid, plan, rate, args.seconds, args.seed)
                print(f"(2) {mode} at {rate}/s: {point}", flush=True)
                r["open_loop"].append(point)
            r["load_after"] = load_avg()
        n = args.saturation_requests // args.saturation_rounds
        plans = {mode: bench.requests_plan(store, n) for mode, store, _ in modes}  # every round sends the same
        rounds: dict[str, list[dict]] = {mode: [] for mode, *_ in modes}
        for i in range(args.saturation_rounds):
            for mode, *_ in modes if i % 2 == 0 else modes[::-1]:
                rounds[mode].append(saturation_round(servers[mode][0], plans[mode]))
                print(f"(2) {mode} saturation round {i + 1}: {n / rounds[mode][-1]['wall_s']:.2f} req/s", flush=True)
        for mode in rounds:
            out["modes"][mode]["saturation"] = saturation_point(rounds[mode])
    out["load_after"] = load_avg()
    return out


# --- report --------------------------------------------------------------------------------------------------------


def plots(r: dict, out: Path, suffix: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    written = []
    if "tasks" in r:
        runs = r["tasks"]["runs"]
        n = [x["tasks"] for x in runs]
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        a.plot(n, [x["startup_s"] for x in runs], "o-", label="start to first /health 200")
        a.plot(n, [x["index_s"] for x in runs], "s--", label="indexing the store (in process)")
        a.axhline(15, color="grey", lw=0.8, ls=":", label="goal at 10,000")
        a.set(xscale="symlog", xlabel="tasks in the store", ylabel="seconds", title="startup")
        b.plot(n, [x["rss_mb_start"] for x in runs], "o-", color="C0", label="all, after start")
        b.plot(n, [x["rss_mb_after"] for x in runs], "s-", color="C1", label="all, after requests")
        b.plot(n, [x["memory_mb_start"]["anon"] for x in runs], "o--", color="C0", label="anonymous, after start")
        b.plot(n, [x["memory_mb_after"]["anon"] for x in runs], "s--", color="C1", label="anonymous, after requests")
        b.set(xscale="symlog", xlabel="tasks in the store", ylabel="RSS (MiB)", title="server resident memory")
        for ax in (a, b):
            ax.set_xlim(left=0)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"serving_scale_tasks{suffix}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path.name)
    if "load" in r:
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, (mode, m) in enumerate(r["load"]["modes"].items()):
            rates = [p["rate_per_s"] for p in m["open_loop"]]
            ax.plot(rates, [p["latency_p50_s"] for p in m["open_loop"]], "o-", color=f"C{i}", label=f"{mode} p50")
            ax.plot(rates, [p["latency_p99_s"] for p in m["open_loop"]], "s--", color=f"C{i}", label=f"{mode} p99")
        ax.set(xlabel="offered load (requests/s, Poisson)", ylabel="latency from arrival (s)", yscale="log")
        plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")  # 0.5, not 5 x 10^-1
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.set_title(f"open-loop latency, 8 tasks, {r['load']['seconds']:g} s per point", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"serving_scale_load{suffix}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path.name)
    return written


def _rounds(s: dict) -> str:
    by = s.get("requests_per_s_by_round", [])
    return f" ({', '.join(map(str, by))})" if len(by) > 1 else ""


def markdown(r: dict, name: str) -> str:
    lines = [
        "# Serving at scale: task count and offered load (issue 17)",
        "",
        f"{r['model']}, {r['device']}, torch {r['torch']}, transformers {r['transformers']}; {r['machine']}; "
        f"server with {r['threads']} torch thread, batcher max {SERVER_BATCH} rows / {SERVER_WAIT_MS:g} ms. "
        f"Measured {r['date']} (commit {r['commit']}), all numbers side by side in one run of "
        f"`PYTHONPATH=. python benchmarks/serving_scale.py{' ' + r['argv'] if r['argv'] else ''}`; raw numbers in "
        f"`{name}.json`. The machine is shared: load averages are in the JSON.",
    ]
    if "tasks" in r:
        t = r["tasks"]
        lines += [
            "",
            f"## 1. Task count: N copies of one {t['virtual_tokens']}-token soft prompt",
            "",
            f"One file: {t['file_bytes']:,} bytes; compiled: {t['compiled_bytes']:,} bytes. In-process medians: "
            f"read {1000 * t['read_s']:.1f} ms, compile {1000 * t['compile_s']:.1f} ms; a fresh interpreter "
            f"imports the server's modules in {t['imports_s']} s, and `load_base` took {r['load_base_s']} s here. "
            f"Load average before / after: "
            f"{t['load_before'][0]} / {t['load_after'][0]}.",
            "",
            "| tasks | startup (goal <= 15 s at 10,000) | index (in process) | rescan | RSS (anonymous) at start "
            "| RSS (anonymous) after "
            "| cache in use | /v1/models | first request | cold task | warm task | cold - warm "
            f"(goal <= compile, {1000 * t['compile_s']:.1f} ms) | failed |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for x in t["runs"]:
            cache = x["cache"] or {}

            def ms(v):
                return "-" if v is None else f"{1000 * v:.1f} ms"

            gap = None if x["cold_s"] is None else x["cold_s"] - x["warm_s"]
            lines.append(
                f"| {x['tasks']:,} | {x['startup_s']} s | {x['index_s']} s | {ms(x['rescan_s'])} | "
                f"{x['rss_mb_start']} ({x['memory_mb_start']['anon']}) MiB | "
                f"{x['rss_mb_after']} ({x['memory_mb_after']['anon']}) MiB | {cache.get('prompts', '-')} prompts, "
                f"{cache.get('bytes', 0) / MB:.1f} MiB | {ms(x['models_s'])}, {x['models_bytes'] / 1024:.0f} KiB | "
                f"{ms(x['first_s'])} | {ms(x['cold_s'])} | {ms(x['warm_s'])} | {ms(gap)} | {x['failures']} |"
            )
        if "footprint_check" in t:
            f = t["footprint_check"]
            lines += ["", f"Footprint check at N = {f['tasks']:,} ({f['cache_mb_used']} MiB of cache in use):", ""]
            for kind, what in (("rss", "all resident memory (VmRSS)"), ("anon", "anonymous memory (RssAnon)")):
                c = f[kind]
                lines.append(
                    f"- {what}: at start {c['start_mb']} MiB vs {c['zero_tasks_mb']} MiB with no tasks + 100 MB: "
                    f"**{'ok' if c['ok_start'] else 'over'}**; after the requests {c['after_mb']} MiB vs "
                    f"{c['limit_after_mb']} MiB (no tasks + cache + 100 MB): **{'ok' if c['ok_after'] else 'over'}**."
                )
            if "rss_vs_one_task" in f:
                c = f["rss_vs_one_task"]
                lines.append(
                    f"- all resident memory against one task (weights paged in alike): after the requests "
                    f"{f['rss']['after_mb']} MiB vs {c['limit_after_mb']} MiB (one task + its extra cache + 100 MB): "
                    f"**{'ok' if c['ok_after'] else 'over'}**."
                )
            lines += [
                "",
                "The weights are memory-mapped: a server with no tasks never reads most of them, one with tasks "
                "does at its first prompt (the model's fingerprint) and first forward pass, so all resident memory "
                "differs by up to the weights' size while the anonymous part shows what the tasks cost.",
            ]
        lines += [
            "",
            "Startup is from the process's start to its first 200 on /health; index is `MultiTask.sync` of the store "
            "in this process (file headers only), rescan one more `sync` with nothing changed (the server's worker "
            "runs it every reload interval). First request: the server's first /v1/classify (also its first forward "
            f"pass); cold: the median first request to {t['cold_tasks']} other tasks (read + compile); warm: the "
            "median second request to the same tasks.",
        ]
    if "load" in r:
        ld = r["load"]
        lines += [
            "",
            f"## 2. Offered load: {len(ld['tasks'])} tasks ({', '.join(ld['methods'])}), open loop",
            "",
            f"Poisson arrivals for {ld['seconds']:g} s per point (seed {ld['seed']}), the load test's mix {ld['mix']} "
            "(generation: 16 new tokens, greedy); latency from scheduled arrival. `no prompts`: the same task names, "
            f"templates and requests as method-less hard prompts (batching {ld['plain_batching']}). Mean batch: "
            "the server's rows per batch (continuous: rows admitted together, joining those running)."
            + ("" if ld["batching_option"] else " `softprompt serve` had no --batching option: one mode, its default."),
            "",
            "| mode | offered (req/s; as drawn) | requests | failed (goal 0) | p50 | p99 | max | achieved (req/s) "
            "| generated tokens/s | mean batch | most queued |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for mode, m in ld["modes"].items():
            for p in m["open_loop"]:
                lines.append(
                    f"| {mode} | {p['rate_per_s']:g} ({p['requests'] / ld['seconds']:.2f}) | {p['requests']} | "
                    f"{p['failures']} | {p['latency_p50_s']} s | {p['latency_p99_s']} s | {p['latency_max_s']} s | "
                    f"{p['achieved_req_per_s']} | {p['generated_tokens_per_s']} | {p['mean_batch_rows']} | "
                    f"{p['queued_max']} |"
                )
        lines += [
            "",
            "Closed-loop saturation (64 clients), with the p50 per endpoint (classification is one forward pass; "
            "completions decode 16 tokens):",
            "",
            "| mode | requests | failed | p50 | p99 | p50 per endpoint | throughput (req/s; per round) "
            "| generated tokens/s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for mode, m in ld["modes"].items():
            s = m["saturation"]
            per = ", ".join(f"{p.removeprefix('/v1/')} {v['p50_s']} s" for p, v in s.get("by_endpoint", {}).items())
            lines.append(
                f"| {mode} | {s['requests']} | {s['failures']} | {s['latency_p50_s']} s | {s['latency_p99_s']} s | "
                f"{per or '-'} | {s['requests_per_s']}{_rounds(s)} | {s['generated_tokens_per_s']} |"
            )
        modes = ld["modes"]
        if "static" in modes and "continuous" in modes:
            st, co = modes["static"]["saturation"], modes["continuous"]["saturation"]
            plain = modes.get("no prompts", {}).get("saturation")
            lines += [
                "",
                f"Continuous against static in this run: p50 {co['latency_p50_s'] / st['latency_p50_s']:.2f}x "
                f"(goal <= 0.5x), throughput {co['requests_per_s'] / st['requests_per_s']:.2f}x (goal >= 1x)"
                + (
                    f"; against no prompts: throughput {co['requests_per_s'] / plain['requests_per_s']:.2f}x "
                    "(goal >= 0.95x)."
                    if plain
                    else "."
                ),
            ]
    if r.get("plots"):
        lines += ["", *[f"![{p}]({p})" for p in r["plots"]]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="base model (the server's --model)")
    ap.add_argument(
        "--quick", action="store_true", help="a smoke run: counts 0,1,100; rates 2,4 for 15 s; 100 requests"
    )
    ap.add_argument(
        "--counts", type=lambda s: [int(x) for x in s.split(",")], help="task counts (default 0,1,100,1000,10000)"
    )
    ap.add_argument(
        "--rates", type=lambda s: [float(x) for x in s.split(",")], help="offered loads, requests/s (default 1,2,4,8)"
    )
    ap.add_argument("--seconds", type=float, help="seconds of arrivals per offered load (default 60)")
    ap.add_argument("--saturation-requests", type=int, help="requests of the closed-loop point (default 1000)")
    ap.add_argument(
        "--saturation-rounds", type=int, default=2, help="rounds the closed-loop requests are split in, modes in turn"
    )
    ap.add_argument("--cold-tasks", type=int, default=3, help="cold tasks per N after the first request")
    ap.add_argument("--plain-batching", default="continuous", help="--batching of the no-prompts server")
    ap.add_argument("--seed", type=int, default=0, help="seed of the arrival times")
    ap.add_argument("--threads", type=int, default=1, help="torch threads here and in the server")
    ap.add_argument("--skip-tasks", action="store_true", help="skip part 1 (task count)")
    ap.add_argument("--skip-load", action="store_true", help="skip part 2 (offered load)")
    ap.add_argument("--out", default=str(bench.ROOT / "benchmarks" / "results"), help="folder of the results")
    ap.add_argument("--suffix", help="end of the result files' names (default: none; -quick with --quick)")
    args = ap.parse_args()
    args.counts = args.counts or ([0, 1, 100] if args.quick else [0, 1, 100, 1000, 10000])
    args.rates = args.rates or ([2.0, 4.0] if args.quick else [1.0, 2.0, 4.0, 8.0])
    args.seconds = args.seconds or (15.0 if args.quick else 60.0)
    args.saturation_requests = args.saturation_requests or (100 if args.quick else 1000)
    torch.set_num_threads(args.threads)
    import transformers

    def git(*a) -> str:
        return subprocess.run(["git", *a], cwd=bench.ROOT, capture_output=True, text=True).stdout.strip()

    t = time.perf_counter()
    base = sp.load_base(args.model)
    load_base_s = time.perf_counter() - t
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "argv": " ".join(sys.argv[1:]),
        "commit": git("rev-parse", "--short", "HEAD")
        + (" + uncommitted changes" if git("status", "--porcelain") else ""),
        "model": base.name,
        "device": str(base.device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "threads": args.threads,
        "load_base_s": round(load_base_s, 2),
        "quick": args.quick,
    }
    server_args = ["--model", args.model]
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_tasks:
            results["tasks"] = bench_counts(base, args.counts, args.cold_tasks, args.threads, server_args, Path(tmp))
        if not args.skip_load:
            results["load"] = bench_load(base, args, Path(tmp), server_args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = args.suffix if args.suffix is not None else "-quick" if args.quick else ""
    name = "serving_scale" + suffix
    results["plots"] = plots(results, out, suffix)
    (out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown(results, name))
    print(f"wrote {out / name}.json, {name}.md and {', '.join(results['plots'])}")


if __name__ == "__main__":
    main()
