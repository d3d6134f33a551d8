"""A soft prompt on a quantized frozen base against one on the float32 base (SST-2, the embedded SmolLM2, CPU).

    python benchmarks/quantized.py                      # nf4 and int8 against float32, ~40 min on 2 CPU cores
    python benchmarks/quantized.py --quantize nf4 --steps 20 --limit 64 --out /tmp/q   # a quick look

For each quantization: the resident memory of the loaded base (a fresh process per base: RSS after loading and
one forward, minus RSS before loading), and the SST-2 dev accuracy (all 872 rows) of
  - a soft prompt trained on the float32 base,
  - one trained on the quantized base (the same steps, seed, batch and data order),
  - the float32-trained prompt evaluated on the quantized base (moving a prompt between the two).
The training recipe is the demo's (20 tokens, class-label init, 150 AdamW steps, batch 8, lr 3e-2).
Writes OUT/quantized.json and OUT/quantized.md (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

import softprompt as sp
from softprompt.fileio import atomic_write_text
from softprompt.methods import SoftPromptConfig

RESULTS = Path(__file__).parent / "results"

# Run in a fresh process per base, so that one base's memory does not count in another's. RSS counts the pages a
# process maps from the checkpoint file as well as its own: what a user sees in `top`.
MEMORY = """
import ctypes, gc, json, sys, psutil, torch
import softprompt as sp
torch.set_num_threads(1)
before = psutil.Process().memory_info().rss
base = sp.load_base(sys.argv[1], device="cpu", dtype="float32", quantize=sys.argv[2] if sys.argv[2] != "none" else None)
with torch.no_grad():
    base.model(torch.tensor([[1, 2, 3, 4]]))
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed load-time buffers back, as a long-running process would
print(json.dumps({"rss": psutil.Process().memory_info().rss - before, "weights": base.num_bytes()}))
"""


def resident_bytes(model: str, quantize: str | None) -> dict:
    run = subprocess.run(
        [sys.executable, "-c", MEMORY, model, quantize or "none"], capture_output=True, text=True, check=True
    )
    return json.loads(run.stdout.strip().splitlines()[-1])


def train_and_eval(base, task, args) -> tuple[sp.Prompt, float, dict]:
    config = sp.TrainConfig(
        steps=args.steps,
        batch_size=8,
        lr=3e-2,
        warmup_steps=10,
        eval_every=50,
        eval_limit=200,
        final_eval=False,
        seed=args.seed,
        progress=False,
    )
    t = time.perf_counter()
    result = sp.train(base, task, "soft", SoftPromptConfig(num_virtual_tokens=20, init="labels"), config)
    seconds = time.perf_counter() - t
    return result.prompt, seconds, evaluate(base, task, result.prompt, args)


def evaluate(base, task, prompt, args) -> dict:
    m = sp.evaluate(base, task, prompt, split="dev", limit=args.limit, batch_size=32)
    return {"accuracy": m["accuracy"], "n": m["n"]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--quantize", action="append", choices=sp.base.QUANTIZATIONS, help="repeatable (default: both)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="dev rows scored (default: all)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (pinned: the numbers depend on it)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    task = sp.load_task("sst2", args.data_dir)
    record = {
        "model": args.model,
        "steps": args.steps,
        "seed": args.seed,
        "threads": args.threads,
        "versions": {
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "bitsandbytes": __import__("bitsandbytes").__version__,
        },
        "machine": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "memory": {"float32": resident_bytes(args.model, None)},
        "runs": {},
    }
    full = sp.load_base(args.model, device="cpu", dtype="float32")
    prompt32, seconds32, acc32 = train_and_eval(full, task, args)
    record["runs"]["float32"] = {"trained_on": "float32", "train_seconds": seconds32, **acc32}
    del full
    for q in args.quantize or list(sp.base.QUANTIZATIONS):
        record["memory"][q] = resident_bytes(args.model, q)
        base = sp.load_base(args.model, device="cpu", dtype="float32", quantize=q)
        prompt, seconds, acc = train_and_eval(base, task, args)
        record["runs"][q] = {"trained_on": q, "train_seconds": seconds, **acc}
        record["runs"][f"float32 prompt on {q}"] = {"trained_on": "float32", **evaluate(base, task, prompt32, args)}
        del base, prompt
        write(record, args.out)  # after each quantization: a long run keeps what it measured
    write(record, args.out)


def write(record: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "quantized.json", json.dumps(record, indent=1) + "\n")
    mem, runs = record["memory"], record["runs"]
    lines = [
        "# Soft prompts on a quantized frozen base (bitsandbytes, CPU)",
        "",
        f"`python benchmarks/quantized.py`, {record['date']}, {record['model']} on {record['machine']}, "
        f"{record['threads']} torch thread(s); " + ", ".join(f"{k} {v}" for k, v in record["versions"].items()) + ".",
        f"SST-2 dev, {runs['float32']['n']} rows; soft prompt of 20 tokens, class-label init, {record['steps']} AdamW "
        f"steps, batch 8, lr 3e-2, seed {record['seed']}: the same data order on every base.",
        "",
        "| base | resident memory (RSS) | vs float32 | weights as stored | vs float32 |",
        "|---|---|---|---|---|",
    ]
    for name, m in mem.items():
        lines.append(
            f"| {name} | {m['rss'] / 2**20:,.0f} MiB | {m['rss'] / mem['float32']['rss']:.2f}x | "
            f"{m['weights'] / 2**20:,.0f} MiB | {m['weights'] / mem['float32']['weights']:.2f}x |"
        )
    lines += ["", "| prompt | trained on | evaluated on | accuracy | vs float32 | train time |", "|---" * 6 + "|"]
    for name, r in runs.items():
        on = name.split(" on ")[-1] if " on " in name else name
        delta = 100 * (r["accuracy"] - runs["float32"]["accuracy"])
        secs = f"{r['train_seconds']:,.0f} s" if "train_seconds" in r else "-"
        lines.append(f"| {name} | {r['trained_on']} | {on} | {100 * r['accuracy']:.1f}% | {delta:+.1f} pts | {secs} |")
    lines += [
        "",
        "Resident memory: a fresh process per base, RSS after loading and one forward (freed load buffers returned "
        "with malloc_trim) minus RSS before loading. The embeddings (tied to the LM head) are never quantized, so "
        "on a 135M model, where they are a fifth of the weights, the saving is smaller than on a large base.",
    ]
    atomic_write_text(out / "quantized.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
