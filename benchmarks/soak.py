"""Soak test of `softprompt serve` on the embedded SmolLM2-135M (issue 8): a steady open-loop load for minutes.

    PYTHONPATH=. python benchmarks/soak.py                        # 10 minutes at 2.5 requests/s; writes results/
    PYTHONPATH=. python benchmarks/soak.py --minutes 1 --out /tmp  # a smoke run

The server runs in a subprocess on 127.0.0.1 with the 8 tasks of every method that the load test of the
serving issue uses (`benchmarks/many_tasks.py` (c): soft, prefix, deep, P-tuning and a template alone;
classification through /v1/classify, generation through /v1/completions and streamed chat, 16 new
tokens). Requests arrive open-loop, as a seeded Poisson process at `--rate` per second, below the
3.5 requests/s that the closed-loop load test reached with 64 clients: a server that keeps up holds
its latency and memory steady. Reported: failed requests (goal 0), latency p50/p99 per minute and the
drift of p99 from the first to the last minute (measured from each request's scheduled arrival, so
client-side lag counts too), the server process's resident memory (RSS) after the first minute and
at the end (goal: growth < 5%), and the 1-minute load average of the machine, which is shared.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import many_tasks as bench  # noqa: E402  (benchmarks/many_tasks.py: the store, request mix and server of the load test)

import softprompt as sp  # noqa: E402


def rss_bytes(pid: int) -> int:
    """Resident memory of process `pid` (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


async def soak(url: str, pid: int, plan, rate: float, seconds: float, seed: int, sample_every: float) -> dict:
    """Send `plan` round-robin as a Poisson process of `rate` per second for `seconds`; sample the server meanwhile."""
    import httpx

    rng = random.Random(seed)
    records: list[tuple[float, float, str | None]] = []  # (scheduled arrival s, latency s, failure or None)
    samples: list[dict] = []
    done = asyncio.Event()
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=1000)) as client:
        t0 = time.perf_counter()

        async def one(at: float, path: str, body: dict) -> None:
            failure = await bench.send(client, path, body)
            records.append((at, time.perf_counter() - t0 - at, failure))

        async def monitor() -> None:
            while True:
                health = (await client.get("/health")).json()
                samples.append(
                    {
                        "t": round(time.perf_counter() - t0, 1),
                        "rss_bytes": rss_bytes(pid),
                        "load1": os.getloadavg()[0],
                        "queued": health["queued"],
                        "running": health["running"],
                    }
                )
                try:
                    await asyncio.wait_for(done.wait(), sample_every)
                    return
                except TimeoutError:
                    pass

        watcher = asyncio.create_task(monitor())
        requests, at, i = [], 0.0, 0
        while (at := at + rng.expovariate(rate)) < seconds:
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            path, body = plan[i % len(plan)]
            requests.append(asyncio.create_task(one(at, path, body)))
            i += 1
        await asyncio.gather(*requests)  # the last requests finish
        done.set()
        await watcher
        health = (await client.get("/health")).json()
        wall = time.perf_counter() - t0
    return {"records": records, "samples": samples, "health": health, "wall_s": wall}


def quantile(xs: list[float], q: int) -> float:
    return (
        statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else (xs[0] if xs else float("nan"))
    )


def summarize(run: dict, rate: float, seconds: float) -> dict:
    records, samples = run["records"], run["samples"]
    minutes = []
    for m in range(max(1, math.ceil(seconds / 60))):
        lat = [lat for at, lat, _ in records if m * 60 <= at < (m + 1) * 60]
        inside = [s for s in samples if m * 60 <= s["t"] < (m + 1) * 60] or samples[-1:]
        minutes.append(
            {
                "minute": m + 1,
                "requests": len(lat),
                "failures": sum(1 for at, _, f in records if m * 60 <= at < (m + 1) * 60 and f),
                "p50_s": round(quantile(lat, 50), 3),
                "p99_s": round(quantile(lat, 99), 3),
                "rss_mb_end": round(inside[-1]["rss_bytes"] / 2**20, 1),
                "load1_mean": round(statistics.mean(s["load1"] for s in inside), 2),
                "queued_max": max(s["queued"] for s in inside),
            }
        )
    latencies = [lat for _, lat, _ in records]
    failures = [f for _, _, f in records if f]
    warm = next((s for s in samples if s["t"] >= 60), samples[0])  # after the first minute: allocator warmed up
    end = samples[-1]
    health = run["health"]
    return {
        "rate_per_s": rate,
        "seconds": seconds,
        "requests": len(records),
        "failures": len(failures),
        "failure_examples": sorted(set(failures))[:5],
        "achieved_rate_per_s": round(len(records) / seconds, 2),
        "latency_p50_s": round(quantile(latencies, 50), 3),
        "latency_p99_s": round(quantile(latencies, 99), 3),
        "latency_max_s": round(max(latencies), 3),
        "p99_first_minute_s": minutes[0]["p99_s"],
        "p99_last_minute_s": minutes[-1]["p99_s"],
        "p99_drift": round(minutes[-1]["p99_s"] / minutes[0]["p99_s"], 3),
        "rss_mb_start": round(samples[0]["rss_bytes"] / 2**20, 1),
        "rss_mb_after_first_minute": round(warm["rss_bytes"] / 2**20, 1),
        "rss_mb_end": round(end["rss_bytes"] / 2**20, 1),
        "rss_mb_max": round(max(s["rss_bytes"] for s in samples) / 2**20, 1),
        "rss_growth_after_first_minute_pct": round(100 * (end["rss_bytes"] / warm["rss_bytes"] - 1), 2),
        "load1_mean": round(statistics.mean(s["load1"] for s in samples), 2),
        "load1_max": round(max(s["load1"] for s in samples), 2),
        "server_batches": health["batches"],
        "mean_batch_rows": round(health["rows"] / max(health["batches"], 1), 1),
        "largest_batch": health["largest_batch"],
        "generated_tokens": health["tokens"],
        "wall_s": round(run["wall_s"], 1),
        "per_minute": minutes,
        "samples": samples,
    }


def markdown(r: dict) -> str:
    s = r["soak"]
    lines = [
        "# Server soak test (issue 8)",
        "",
        f"{r['model']}, {r['device']} float32, torch {r['torch']}, transformers {r['transformers']}; {r['machine']}. "
        f"Run with `PYTHONPATH=. python benchmarks/soak.py`; raw numbers (and RSS samples every "
        f"{r['sample_every_s']} s) in `soak.json`. Measured {r['date']}.",
        "",
        f"`softprompt serve` with {r['tasks']} tasks ({', '.join(r['methods'])}), batcher max {r['max_batch_size']} "
        f"rows / {r['max_wait_ms']} ms wait, {r['threads']} torch thread. Requests arrive open-loop as a Poisson "
        f"process at {s['rate_per_s']} per second for {s['seconds'] / 60:.0f} minutes (seed {r['seed']}), the load "
        f"test's mix: {r['mix']} (generation: 16 new tokens, greedy). Latency counts from each request's scheduled "
        "arrival. The machine is shared with other jobs: the load average (2 cores) is in the table.",
        "",
        "| requests | failed (goal 0) | p50 | p99 | max | p99 first minute | p99 last minute | p99 drift | "
        "RSS after minute 1 | RSS at end | RSS growth (goal < 5%) | load average (mean / max) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {s['requests']} | {s['failures']} | {s['latency_p50_s']} s | {s['latency_p99_s']} s "
        f"| {s['latency_max_s']} s | {s['p99_first_minute_s']} s | {s['p99_last_minute_s']} s | {s['p99_drift']}x | "
        f"{s['rss_mb_after_first_minute']} MiB | {s['rss_mb_end']} MiB | {s['rss_growth_after_first_minute_pct']}% | "
        f"{s['load1_mean']} / {s['load1_max']} |",
        "",
        f"RSS right after start-up: {s['rss_mb_start']} MiB; largest sample: {s['rss_mb_max']} MiB. The server ran "
        f"{s['server_batches']} batches (mean {s['mean_batch_rows']} rows, largest {s['largest_batch']}) and generated "
        f"{s['generated_tokens']} tokens." + (f" Failures: {s['failure_examples']}." if s["failures"] else ""),
        "",
        "| minute | requests | failed | p50 | p99 | RSS at end | most rows queued | load average |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {m['minute']} | {m['requests']} | {m['failures']} | {m['p50_s']} s | {m['p99_s']} s | "
        f"{m['rss_mb_end']} MiB | {m['queued_max']} | {m['load1_mean']} |"
        for m in s["per_minute"]
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="how long to send requests")
    ap.add_argument("--rate", type=float, default=2.5, help="mean requests per second (open loop, Poisson)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the arrival times")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the server (the load test's: 1)")
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=20.0)
    ap.add_argument("--sample-every", type=float, default=5.0, help="seconds between RSS / queue samples")
    ap.add_argument("--out", default=str(bench.ROOT / "benchmarks" / "results"), help="folder for soak.json/.md")
    args = ap.parse_args()
    seconds = 60 * args.minutes
    torch.set_num_threads(args.threads)
    import transformers

    base = sp.load_base("smollm2")
    results = {
        "model": base.name,
        "device": str(base.device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "threads": args.threads,
        "max_batch_size": args.max_batch_size,
        "max_wait_ms": args.max_wait_ms,
        "seed": args.seed,
        "sample_every_s": args.sample_every,
    }
    with tempfile.TemporaryDirectory() as tmp:
        store = bench.make_store(base, bench.SERVER_TASKS, Path(tmp) / "store")
        del base
        results["tasks"] = len(store.names())
        results["methods"] = sorted({sp.load_prompt(store.path(t)).method for t in store.names()})
        plan = bench.requests_plan(store, int(args.rate * seconds * 1.5) + 100)
        with bench.running_server(store, args.max_batch_size, args.max_wait_ms, args.threads) as (url, server):
            run = asyncio.run(soak(url, server.pid, plan, args.rate, seconds, args.seed, args.sample_every))
    results["date"] = time.strftime("%Y-%m-%d %H:%M")
    sent = len(run["records"])
    results["mix"] = {p: sum(1 for x, _ in plan[:sent] if x == p) for p in sorted({x for x, _ in plan[:sent]})}
    results["soak"] = summarize(run, args.rate, seconds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "soak.md").write_text(markdown(results))
    print({k: v for k, v in results["soak"].items() if k not in ("per_minute", "samples")})
    print(f"wrote {out / 'soak.json'} and soak.md")


if __name__ == "__main__":
    main()
