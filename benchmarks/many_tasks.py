"""Multi-task inference benchmarks on the embedded SmolLM2-135M (issue 4), A/B side by side in one process.

    PYTHONPATH=. python benchmarks/many_tasks.py            # ~40 min on 2 shared CPU cores; writes benchmarks/results/
    PYTHONPATH=. python benchmarks/many_tasks.py --quick    # a smoke run (fewer rounds and requests)

(a) Prefill latency: 32-token inputs with a 20-token soft prompt, batch 1 and 8. softprompt (prompt
    compiled to a KV prefix) against the plain model without any prompt, and against PEFT's prompt
    tuning holding the same prompt weights. Rounds interleave the variants; we report the median of
    the per-round ratios (the machine is shared and noisy) and median times.
(b) Mixed-task generation: 8 tasks x 4 requests, 32 new tokens each, greedy. softprompt runs them as
    one mixed batch (`MultiTask`, KV cache); PEFT as 8 batches with `set_adapter` between them and
    `use_cache=False` (PEFT 0.21's prompt tuning is wrong with transformers 5.x's cache; we also run
    it with the cache and report whether its outputs still match). Outputs must be identical.
    Within a task the 4 inputs have the same token length: PEFT places virtual tokens before the
    padding and ignores position ids, so padded rows would differ from the same input alone.
(c) Server load: `softprompt serve` in a subprocess on 127.0.0.1; 1,000 requests from 64 concurrent
    clients, spread over 8 tasks of every method (soft, prefix, deep, P-tuning, a template alone):
    /v1/classify for classification tasks, /v1/completions (some streamed, some chat) for generation.

The prompts are not trained: each is its method's initialization (`build_method(...).collapse()`),
which is all that speed and output equality depend on.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

import softprompt as sp
from softprompt.data import Encoder
from softprompt.example import Example
from softprompt.generate import generate_ids, stop_ids
from softprompt.injection import EMPTY
from softprompt.methods import METHODS, InitContext, build_method
from softprompt.multitask import MultiTask
from softprompt.store import Store

ROOT = Path(__file__).resolve().parents[1]

# (task name, built-in task, method, virtual tokens); (b) needs prompts PEFT can hold: input embeddings
PEFT_TASKS = [
    ("sst2-soft", "sst2", "soft", 20),
    ("trec-soft", "trec", "soft", 12),
    ("rte-ptuning", "rte", "ptuning", 16),
    ("cb-soft", "cb", "soft", 8),
    ("e2e-soft", "e2e_nlg", "soft", 24),
    ("sst2-ptuning", "sst2", "ptuning", 10),
    ("trec-ptuning", "trec", "ptuning", 14),
    ("e2e-ptuning", "e2e_nlg", "ptuning", 6),
]
SERVER_TASKS = [
    ("sst2-soft", "sst2", "soft", 20),
    ("trec-prefix", "trec", "prefix", 10),
    ("rte-ptuning", "rte", "ptuning", 16),
    ("cb-deep", "cb", "deep", 8),
    ("sst2-hard", "sst2", None, 0),
    ("e2e-soft", "e2e_nlg", "soft", 24),
    ("e2e-prefix", "e2e_nlg", "prefix", 12),
    ("e2e-deep", "e2e_nlg", "deep", 6),
]


def make_prompt(base, task, method: str | None, P: int, seed: int) -> sp.Prompt:
    """The method's initialization as a prompt file (method None: the task's template alone, no tensors)."""
    spec = task.spec
    if method is None:
        return sp.Prompt.for_base(base, EMPTY, "hard", {}, spec)
    config = METHODS[method].config_class(num_virtual_tokens=P, init="vocab")
    texts = task.split("train").prompts[:500]
    m = build_method(method, config, InitContext(base, spec.verbalizers, texts, seed=seed))
    return sp.Prompt.for_base(
        base, m.collapse(), method, config.to_dict(), spec, trainable_parameters=m.num_trainable()
    )


def rows_of(inputs: list[list[int]], injection) -> list[Example]:
    """Prompts to continue: token ids, the next token read after the last one, each with its prompt."""
    return [Example(ids, len(ids), [], injection) for ids in inputs]


def make_store(base, plan, root: Path) -> Store:
    store = Store(root)
    for seed, (name, task, method, P) in enumerate(plan):
        store.save(name, make_prompt(base, sp.load_task(task), method, P, seed))
    return store


def median(xs):
    return statistics.median(xs)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# --- (a) prefill ------------------------------------------------------------------------------------------------------


def peft_model(base, prompts: dict[str, torch.Tensor]):
    """A PEFT PeftModel over a copy of the base model, one prompt-tuning adapter per (name -> embeddings (P, D))."""
    from peft import PromptTuningConfig, TaskType, get_peft_model

    model = None
    for name, emb in prompts.items():
        config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=emb.shape[0])
        if model is None:
            model = get_peft_model(copy.deepcopy(base.model), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        model.prompt_encoder[name].embedding.weight.data.copy_(emb)
    return model.eval()


def prefill_variants(base, peft, inputs: list[list[int]], compiled, injection) -> dict:
    """The four prefills timed against each other on the same inputs (one length: no padding)."""
    ids = torch.tensor(inputs)  # (B, T)
    mask = torch.ones_like(ids)
    kv_rows, embed_rows = rows_of(inputs, compiled), rows_of(inputs, injection)
    return {
        "plain model, no prompt": lambda: base.model(input_ids=ids, attention_mask=mask, logits_to_keep=1),
        "softprompt, KV-compiled": lambda: base.family.next_token_logits(kv_rows),
        "softprompt, uncompiled": lambda: base.family.next_token_logits(embed_rows),
        "PEFT prompt tuning": lambda: peft(input_ids=ids, attention_mask=mask, logits_to_keep=1),
    }


@torch.inference_mode()
def bench_prefill(base, prompt: sp.Prompt, rounds: int) -> dict:
    enc = Encoder(prompt.spec, base)
    texts = sp.load_task("sst2").split("dev").prompts
    inputs = [ids for ids in (enc.example(t).source for t in texts) if len(ids) == 32][:8]
    assert len(inputs) == 8, "need 8 SST-2 dev inputs of 32 tokens"
    mt = MultiTask(base)
    compiled = mt.injection(mt.add("sst2", prompt))
    peft = peft_model(base, {"sst2": prompt.injection.embeds})
    out = {"input_tokens": 32, "virtual_tokens": prompt.injection.num_embeds, "rounds": rounds}
    for B in (1, 8):
        variants = prefill_variants(base, peft, inputs[:B], compiled, prompt.injection)
        # same prompt weights, same next-token logits
        ours = variants["softprompt, KV-compiled"]()
        theirs = variants["PEFT prompt tuning"]().logits[:, -1]
        diff = float((ours - theirs).abs().max())
        for fn in variants.values():  # warm-up
            fn()
        times = {k: [] for k in variants}
        for _ in range(rounds):
            for k, fn in variants.items():
                times[k].append(timed(fn))

        def ratio(a, b, times=times):
            return median([x / y for x, y in zip(times[a], times[b])])

        out[f"batch_{B}"] = {
            "median_ms": {k: round(1000 * median(v), 2) for k, v in times.items()},
            "ratio_compiled_vs_plain": round(ratio("softprompt, KV-compiled", "plain model, no prompt"), 3),
            "ratio_compiled_vs_peft": round(ratio("softprompt, KV-compiled", "PEFT prompt tuning"), 3),
            "ratio_uncompiled_vs_plain": round(ratio("softprompt, uncompiled", "plain model, no prompt"), 3),
            "max_abs_logit_diff_vs_peft": diff,
        }
        print(f"(a) prefill batch {B}: {out[f'batch_{B}']}", flush=True)
    return out


# --- (b) mixed-task generation ---------------------------------------------------------------------------------------


def same_length_inputs(enc: Encoder, prompts: list[str], n: int) -> list[list[int]]:
    """n inputs of one token length: the n shortest of at least 16 tokens, each cut to the shortest one's last tokens
    (which keeps the end of the template, where the answer starts)."""
    ids = sorted((x for x in (enc.example(p).source for p in prompts[:400]) if len(x) >= 16), key=len)[:n]
    return [x[len(x) - len(ids[0]) :] for x in ids]


def until_eos(ids: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in eos:
            return ids[:i]
    return ids


@torch.inference_mode()
def bench_mixed(base, store: Store, per_task: int, new_tokens: int, rounds: int) -> dict:
    mt = MultiTask(base)
    mt.sync(store)
    eos = stop_ids(base)
    rows = []  # (task, ids)
    for name in mt.names():
        entry = mt.get(name)
        task = sp.load_task(entry.prompt.task["name"])
        rows += [(name, ids) for ids in same_length_inputs(entry.encoder, task.split("dev").prompts, per_task)]
    entries = [(mt.get(t), ids) for t, ids in rows]
    peft = peft_model(base, {e.name: e.prompt.injection.embeds for e in mt.entries()})

    def ours():
        return generate_ids(base, [Example(ids, len(ids), [], e.injection) for e, ids in entries], new_tokens)

    def theirs(use_cache: bool):
        out = []
        for name in mt.names():
            peft.set_adapter(name)
            batch = torch.tensor([ids for t, ids in rows if t == name])  # same lengths: no padding
            gen = peft.generate(
                input_ids=batch,
                attention_mask=torch.ones_like(batch),
                max_new_tokens=new_tokens,
                do_sample=False,
                use_cache=use_cache,
                pad_token_id=base.tokenizer.pad_token_id,
            )
            out += [until_eos(g[batch.shape[1] :].tolist(), eos) for g in gen]
        return out

    ours()  # warm-up
    peft.set_adapter(mt.names()[0])
    peft.generate(input_ids=torch.tensor([rows[0][1]]), max_new_tokens=2, do_sample=False, use_cache=False)
    # PEFT's uncached run is the slow one: time it `rounds` times, ours before and after each
    t_ours, t_peft = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        mine = ours()
        t_ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        ref = theirs(False)
        t_peft.append(time.perf_counter() - t)
    t_ours.append(timed(ours))
    cached = theirs(True)
    tokens = sum(map(len, mine))
    out = {
        "tasks": len(mt),
        "requests_per_task": per_task,
        "max_new_tokens": new_tokens,
        "rounds": rounds,
        "virtual_tokens": {e.name: e.prompt.injection.num_embeds for e in mt.entries()},
        "input_tokens": sorted({len(ids) for _, ids in rows}),
        "generated_tokens": tokens,
        "softprompt_seconds": [round(x, 3) for x in t_ours],
        "peft_seconds": [round(x, 3) for x in t_peft],
        "softprompt_tokens_per_s": round(tokens / median(t_ours), 1),
        "peft_tokens_per_s": round(tokens / median(t_peft), 1),
        "speedup": round(median(t_peft) / median(t_ours), 2),
        "outputs_identical_to_peft_no_cache": mine == ref,
        "rows_differing_from_peft_no_cache": sum(a != b for a, b in zip(mine, ref)),
        "rows_differing_peft_with_cache_vs_without": sum(a != b for a, b in zip(cached, ref)),
    }
    print(f"(b) mixed generation: {out}", flush=True)
    return out


# --- (c) server load -------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def requests_plan(store: Store, n: int) -> list[tuple[str, dict]]:
    """n (path, body) pairs round-robin over the store's tasks, inputs from each task's dev split."""
    plan = []
    names = store.names()
    inputs = {}
    for name in names:
        prompt = sp.load_prompt(store.path(name))
        task = sp.load_task(prompt.task["name"])
        rows = sorted(task.split("dev").rows[:300], key=lambda r: len(prompt.spec.render(r)))[:50]  # the shortest
        fields = prompt.spec.template_fields
        inputs[name] = (prompt.spec.is_classification, [{f: r[prompt.spec.column(f)] for f in fields} for r in rows])
    for i in range(n):
        name = names[i % len(names)]
        is_cls, pool = inputs[name]
        value = pool[(i // len(names)) % len(pool)]
        if is_cls:
            plan.append(("/v1/classify", {"model": name, "input": value}))
        elif i % 3 == 0:
            plan.append(
                (
                    "/v1/chat/completions",
                    {
                        "model": name,
                        "messages": [{"role": "user", "content": value["mr"]}],
                        "max_tokens": 16,
                        "temperature": 0,
                        "stream": True,
                    },
                )
            )
        else:
            plan.append(("/v1/completions", {"model": name, "prompt": value["mr"], "max_tokens": 16, "temperature": 0}))
    return plan


async def send(client, path: str, body: dict) -> str | None:
    """One request, streamed when the body asks; None when it succeeded, else what went wrong."""
    try:
        if body.get("stream"):
            async with client.stream("POST", path, json=body) as r:
                text = "".join([line async for line in r.aiter_lines()])
                ok = r.status_code == 200 and text.rstrip().endswith("data: [DONE]")
        else:
            r = await client.post(path, json=body)
            ok = r.status_code == 200 and ("choices" in r.json() or "data" in r.json())
        return None if ok else f"{path} {r.status_code}"
    except Exception as e:  # noqa: BLE001 - a failed request is counted, not fatal
        return f"{path} {type(e).__name__}: {e}"


async def load(url: str, plan, concurrency: int, paths: list | None = None) -> tuple[list[float], list[str], float]:
    """Send `plan` [(path, body)] from `concurrency` clients (closed loop): (latencies, failures, wall seconds).
    paths: a list that gets each request's path, in the order of the latencies."""
    import httpx

    latencies, failures = [], []
    todo = iter(plan)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=concurrency)) as client:

        async def worker():
            for path, body in todo:
                t = time.perf_counter()
                if failure := await send(client, path, body):
                    failures.append(failure)
                latencies.append(time.perf_counter() - t)
                if paths is not None:
                    paths.append(path)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return latencies, failures, time.perf_counter() - t0


@contextmanager
def running_server(
    store: Store, max_batch: int, max_wait_ms: float, threads: int, args=(), env: dict | None = None, poll: float = 0.5
):
    """`softprompt serve` on `store` in a subprocess on a free loopback port; yields (url, process) once it answers.

    args: more `softprompt serve` options; env: more environment variables; poll: seconds between /health tries."""
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = (
        os.environ
        | {
            "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": str(threads),
        }
        | (env or {})
    )
    cmd = [
        sys.executable,
        "-m",
        "softprompt",
        "serve",
        "--store",
        str(store.root),
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--no-access-log",
        "--max-batch-size",
        str(max_batch),
        "--max-wait-ms",
        str(max_wait_ms),
        *args,
    ]
    # the server's log goes to a file: a pipe nobody drains fills up and blocks the server's next log line
    with tempfile.TemporaryFile(mode="w+") as errors:
        server = subprocess.Popen(cmd, env=env, stderr=errors, text=True)
        try:
            deadline = time.monotonic() + 300
            while True:
                if server.poll() is not None:
                    errors.seek(0)
                    raise RuntimeError(f"server exited: {errors.read()[-2000:]}")
                try:
                    if httpx.get(url + "/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(poll)
            yield url, server
        finally:
            server.terminate()
            server.wait(timeout=60)


def bench_server(store: Store, n: int, concurrency: int, max_batch: int, max_wait_ms: float, threads: int) -> dict:
    import httpx

    with running_server(store, max_batch, max_wait_ms, threads) as (url, _):
        plan = requests_plan(store, n)
        latencies, failures, wall = asyncio.run(load(url, plan, concurrency))
        health = httpx.get(url + "/health").json()
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    out = {
        "requests": n,
        "concurrency": concurrency,
        "tasks": len(store.names()),
        "methods": sorted({sp.load_prompt(store.path(t)).method for t in store.names()}),
        "max_batch_size": max_batch,
        "max_wait_ms": max_wait_ms,
        "mix": {p: sum(1 for x, _ in plan if x == p) for p in sorted({x for x, _ in plan})},
        "failures": len(failures),
        "failure_examples": failures[:5],
        "latency_p50_s": round(q[49], 3),
        "latency_p99_s": round(q[98], 3),
        "latency_max_s": round(max(latencies), 3),
        "wall_s": round(wall, 1),
        "requests_per_s": round(n / wall, 2),
        "server_batches": health["batches"],
        "server_rows": health["rows"],
        "mean_batch_rows": round(health["rows"] / max(health["batches"], 1), 1),
        "largest_batch": health["largest_batch"],
        "generated_tokens": health["tokens"],
        "generated_tokens_per_s": round(health["tokens"] / wall, 1),
    }
    print(f"(c) server load: {out}", flush=True)
    return out


# --- report --------------------------------------------------------------------------------------------------------


def markdown(r: dict) -> str:
    a, b, c = r["prefill"], r["mixed_generation"], r["server"]
    lines = [
        "# Multi-task inference benchmarks (issue 4)",
        "",
        f"{r['model']}, {r['device']} {r['dtype']}, torch {r['torch']}, transformers {r['transformers']}, "
        f"PEFT {r['peft']}; {r['machine']}. Run with `PYTHONPATH=. python benchmarks/many_tasks.py`"
        f"{' --quick' if r['quick'] else ''}; raw numbers in `many_tasks.json`.",
        "",
        "The prompts are untrained method initializations (`build_method(...).collapse()`): speed and output "
        "equality do not depend on training. The machine is shared with other jobs, so ratios are medians of "
        "per-round ratios with the variants interleaved.",
        "",
        f"## (a) Prefill: {a['input_tokens']}-token inputs, {a['virtual_tokens']}-token soft prompt",
        "",
        f"Measured {a['date']}, {a['rounds']} rounds.",
        "",
        "| batch | plain model (ms) | softprompt KV-compiled (ms) | softprompt uncompiled (ms) "
        "| PEFT prompt tuning (ms) | compiled / plain (goal <= 1.1) | compiled / PEFT (goal <= 0.75) |",
        "|---|---|---|---|---|---|---|",
    ]
    for B in (1, 8):
        x = a[f"batch_{B}"]
        m = x["median_ms"]
        lines.append(
            f"| {B} | {m['plain model, no prompt']} | {m['softprompt, KV-compiled']} | "
            f"{m['softprompt, uncompiled']} | {m['PEFT prompt tuning']} | {x['ratio_compiled_vs_plain']} | "
            f"{x['ratio_compiled_vs_peft']} |"
        )
    bound = {
        B: a[f"batch_{B}"]["median_ms"]["plain model, no prompt"] / a[f"batch_{B}"]["median_ms"]["PEFT prompt tuning"]
        for B in (1, 8)
    }
    lines += [
        "",
        f"A prompt that cost nothing at all would run at plain / PEFT = {bound[1]:.3f} of PEFT at batch 1 and "
        f"{bound[8]:.3f} at batch 8: at batch 1 a forward on this CPU costs far less than in proportion to "
        "its tokens (52 vs 32), so PEFT's 20 extra tokens add little there.",
    ]
    lines += [
        "",
        f"Largest next-token logit difference, softprompt vs PEFT on the same weights: batch 1 "
        f"{a['batch_1']['max_abs_logit_diff_vs_peft']:.1e}, batch 8 {a['batch_8']['max_abs_logit_diff_vs_peft']:.1e}.",
        "",
        f"## (b) Mixed-task generation: {b['tasks']} tasks x {b['requests_per_task']} requests, "
        f"{b['max_new_tokens']} new tokens, greedy",
        "",
        f"Measured {b['date']}.",
        "",
        "| | tokens/s | seconds per run |",
        "|---|---|---|",
        f"| softprompt, one mixed batch (KV cache) | {b['softprompt_tokens_per_s']} | "
        f"{', '.join(map(str, b['softprompt_seconds']))} |",
        f"| PEFT, 8 batches + set_adapter, use_cache=False | {b['peft_tokens_per_s']} | "
        f"{', '.join(map(str, b['peft_seconds']))} |",
        "",
        f"Speed-up (median times): **{b['speedup']}x** (goal >= 3x). "
        f"Outputs identical to PEFT: **{b['outputs_identical_to_peft_no_cache']}** "
        f"({b['generated_tokens']} tokens; {b['rows_differing_from_peft_no_cache']} of 32 rows differ). "
        f"Virtual tokens per task: {b['virtual_tokens']}; input lengths {b['input_tokens']}. "
        f"PEFT with its KV cache instead: {b['rows_differing_peft_with_cache_vs_without']} of 32 rows differ "
        "from its own uncached output.",
        "",
        f"## (c) Server load: {c['requests']} requests, {c['concurrency']} concurrent clients, {c['tasks']} tasks",
        "",
        f"Measured {c['date']}. Methods served: {', '.join(c['methods'])}. Requests: {c['mix']} "
        f"(generation: 16 new tokens, greedy). Batcher: max {c['max_batch_size']} rows, {c['max_wait_ms']} ms wait.",
        "",
        "| failed | p50 latency | p99 latency | max latency | throughput | generated tokens/s | mean batch |",
        "|---|---|---|---|---|---|---|",
        f"| {c['failures']} | {c['latency_p50_s']} s | {c['latency_p99_s']} s | {c['latency_max_s']} s | "
        f"{c['requests_per_s']} req/s | {c['generated_tokens_per_s']} | {c['mean_batch_rows']} rows "
        f"({c['server_batches']} batches, largest {c['largest_batch']}) |",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: fewer rounds and requests")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for many_tasks.json/.md")
    ap.add_argument("--only", choices=["prefill", "mixed", "server"], action="append", help="run only these parts")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads here and in the server (default 1: on a "
        "shared machine, 2 threads per process make timings erratic)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import peft
    import transformers

    parts = args.only or ["prefill", "mixed", "server"]
    base = sp.load_base("smollm2")
    results = {
        "model": base.name,
        "device": str(base.device),
        "dtype": str(base.dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads",
        "quick": args.quick,
    }
    with tempfile.TemporaryDirectory() as tmp:
        if "prefill" in parts:
            prompt = make_prompt(base, sp.load_task("sst2"), "soft", 20, seed=0)
            results["prefill"] = bench_prefill(base, prompt, rounds=3 if args.quick else 15)
        if "mixed" in parts:
            store = make_store(base, PEFT_TASKS, Path(tmp) / "peft")
            results["mixed_generation"] = bench_mixed(
                base, store, per_task=4, new_tokens=8 if args.quick else 32, rounds=1
            )
        if "server" in parts:
            store = make_store(base, SERVER_TASKS, Path(tmp) / "server")
            del base
            results["server"] = bench_server(
                store, n=200 if args.quick else 1000, concurrency=64, max_batch=32, max_wait_ms=20, threads=args.threads
            )
    for part in ("prefill", "mixed_generation", "server"):
        if part in results:
            results[part]["date"] = time.strftime("%Y-%m-%d %H:%M")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "many_tasks" + ("-quick" if args.quick else "")
    if args.only and (out / f"{name}.json").exists():  # a partial run updates its parts of the last full run
        results = json.loads((out / f"{name}.json").read_text()) | results
    (out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    if all(k in results for k in ("prefill", "mixed_generation", "server")):
        (out / f"{name}.md").write_text(markdown(results))
    print(f"wrote {out / name}.json")


if __name__ == "__main__":
    main()
