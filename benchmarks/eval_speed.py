"""Evaluation speed before and after scoring each row once (issue 16), side by side in one process.

    PYTHONPATH=. python benchmarks/eval_speed.py     # ~20 min on 2 CPU cores; writes results/eval_speed.{json,md}

Classification: SST-2 dev (872 rows) and TREC (500 rows, 6 classes) with the embedded SmolLM2,
zero-shot and behind a 20-token soft prompt (its `init: vocab` initialization: speed does not
depend on training). "Before" is evaluation as it was: the prompt's virtual tokens run again in
every row, and a label word of several tokens runs as its own full forward (`Family.class_scores`).
"After": the prompt is compiled to a KV prefix once per evaluation (`Family.compile`), and the
causal family scores every label word from one run of the row (long words continue from its
forked cache). Rounds alternate the two; we report median rows/s, their ratio, and whether scores
and metrics agree.

Generation: zero-shot E2E on 60 dev inputs, without stop strings (always `max_new_tokens`) and with
the task's default stops (end of sequence, and a newline since E2E references are one line), BLEU
of both.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import torch

import softprompt as sp
from softprompt.data import Encoder
from softprompt.evaluate import class_log_likelihoods, classification_metrics, evaluate, gold_classes
from softprompt.families.family import Family
from softprompt.fileio import atomic_write_text
from softprompt.methods import build_method
from softprompt.train import init_context

ROOT = Path(__file__).resolve().parents[1]


def score(base, task, injection, before: bool) -> tuple[torch.Tensor, float]:
    """(N, C) class scores of the task's dev split behind `injection`, and the seconds they took."""
    spec, data = task.spec, task.split("dev")
    generic = mock.patch.object(type(base.family), "class_scores", Family.class_scores) if before else nullcontext()
    t = time.perf_counter()
    with generic:
        # what `evaluate` does, without the subset and metrics: encode, (compile), score
        injection = injection if before else base.family.compile(injection)
        scores = class_log_likelihoods(base, Encoder(spec, base), [spec.render(r) for r in data.rows], injection)
    return scores, time.perf_counter() - t


def bench_classification(base, name: str, prompt: str, rounds: int) -> dict:
    task = sp.load_task(name)
    n = len(task.split("dev"))
    gold = gold_classes(task, task.spec, task.split("dev"))
    injection = sp.Injection()
    if prompt == "soft-20":
        method = build_method("soft", {"num_virtual_tokens": 20, "init": "vocab"}, init_context(base, task, 0))
        injection = method.collapse()
    times, out = {"before": [], "after": []}, {}
    for _ in range(rounds):
        for variant in ("before", "after"):
            out[variant], seconds = score(base, task, injection, before=variant == "before")
            times[variant].append(seconds)
    result = {
        "task": name,
        "prompt": prompt,
        "rows": n,
        "classes": len(task.spec.class_names),
        "label_word_tokens": [len(v) for v in Encoder(task.spec, base).verbalizer_ids],
        "rows_per_s_before": round(n / statistics.median(times["before"]), 2),
        "rows_per_s_after": round(n / statistics.median(times["after"]), 2),
        "speedup": round(statistics.median(b / a for b, a in zip(times["before"], times["after"])), 2),
        "max_abs_score_diff": float((out["before"] - out["after"]).abs().max()),
        "same_predictions": bool(torch.equal(out["before"].argmax(-1), out["after"].argmax(-1))),
        "metrics_before": classification_metrics(out["before"], gold),
        "metrics_after": classification_metrics(out["after"], gold),
    }
    print(result, flush=True)
    return result


def bench_generation(base, n: int) -> dict:
    task = sp.load_task("e2e_nlg")
    out = {}
    for label, stop in (("no stops", []), ("default stops", None)):
        spec = sp.TaskSpec.from_dict(task.spec.portable() | {"stop": stop})
        t = time.perf_counter()
        metrics = evaluate(base, task, None, limit=n, spec=spec)
        out[label] = {
            "seconds": round(time.perf_counter() - t, 1),
            "bleu": metrics["bleu"],
            "rouge_l": metrics["rouge_l"],
        }
    out["inputs"] = n
    out["speedup"] = round(out["no stops"]["seconds"] / out["default stops"]["seconds"], 2)
    print(f"e2e: {out}", flush=True)
    return out


def markdown(r: dict) -> str:
    lines = [
        "# Evaluation speed: each row scored once, generation stopped at stop strings",
        "",
        f"{r['model']}, {r['device']} {r['dtype']}, {r['threads']} torch threads, zero-shot. Measured {r['date']} with "
        "`PYTHONPATH=. python benchmarks/eval_speed.py`; raw numbers in `eval_speed.json`. Rounds alternate the "
        "variants on one process; rows/s are medians.",
        "",
        "| task | prompt | rows | label-word tokens | rows/s before | rows/s after | speed-up | same predictions | "
        "max abs score diff | accuracy before / after |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in r["classification"]:
        cells = [
            c["task"],
            c["prompt"],
            c["rows"],
            c["label_word_tokens"],
            c["rows_per_s_before"],
            c["rows_per_s_after"],
            f"{c['speedup']}x",
            c["same_predictions"],
            f"{c['max_abs_score_diff']:.1e}",
            f"{100 * c['metrics_before']['accuracy']:.1f} / {100 * c['metrics_after']['accuracy']:.1f}",
        ]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    g = r["e2e"]
    lines += [
        "",
        f"E2E zero-shot generation, {g['inputs']} dev inputs: {g['no stops']['seconds']} s without stops (BLEU "
        f"{g['no stops']['bleu']:.2f}), {g['default stops']['seconds']} s with the default stops (BLEU "
        f"{g['default stops']['bleu']:.2f}): {g['speedup']}x.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--e2e-inputs", type=int, default=60)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = sp.load_base("smollm2")
    r = {
        "model": base.name,
        "device": str(base.device),
        "dtype": str(base.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
    }
    with torch.inference_mode():
        r["classification"] = [
            bench_classification(base, name, prompt, args.rounds)
            for name in ("sst2", "trec")
            for prompt in ("zero-shot", "soft-20")
        ]
    r["e2e"] = bench_generation(base, args.e2e_inputs)
    out = Path(args.out)
    atomic_write_text(out / "eval_speed.json", json.dumps(r, indent=2) + "\n")
    atomic_write_text(out / "eval_speed.md", markdown(r))
    print(markdown(r))


if __name__ == "__main__":
    main()
