"""Where a KV prefix sits: positions 0..P-1 before the text, or the same positions as the text's start.

    PYTHONPATH=. python benchmarks/prefix_positions.py  # minutes on 2 CPU cores; writes results/prefix_positions.md

A prefix initialized from real tokens' keys and values (`init: vocab`) starts out as if those tokens
preceded the text, if the text's positions start after it (`Injection.kv_positions = P`, softprompt's
and PEFT's convention). With the text at 0 instead, a rotary model sees the prefix's keys at the
text's own positions. This scores both placements of the same untrained 10-token prefix on SST-2 dev
(200 rows, the benchmark's fixed subset), against the zero-shot template, on the embedded SmolLM2.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

import softprompt as sp
from softprompt.fileio import atomic_write_text
from softprompt.methods import build_method
from softprompt.train import init_context

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=10)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "prefix_positions.md"))
    args = ap.parse_args()
    torch.manual_seed(0)
    base, task = sp.load_base("smollm2"), sp.load_task("sst2")
    method = build_method("prefix", {"num_virtual_tokens": args.tokens, "init": "vocab"}, init_context(base, task, 0))
    before = method.collapse()  # kv_positions = P: the text follows the prefix
    overlapping = dataclasses.replace(before, kv_positions=0)  # the text starts at 0, where the prefix's keys are
    scores = {
        name: sp.evaluate(base, task, inj, limit=args.rows)["accuracy"]
        for name, inj in (
            ("zero-shot template (no prefix)", None),
            ("prefix at 0..P-1, text from P", before),
            ("prefix and text both from 0", overlapping),
        )
    }
    lines = [
        "# Where a KV prefix sits (prefix tuning, untrained, vocab init)",
        "",
        f"{base.name}, {base.device} {str(base.dtype).removeprefix('torch.')}; SST-2 dev, {args.rows} rows; "
        f"{args.tokens}-token prefix from `init: vocab`, seed 0. Measured {time.strftime('%Y-%m-%d')} with "
        "`PYTHONPATH=. python benchmarks/prefix_positions.py`.",
        "",
        "| placement | accuracy |",
        "|---|---|",
    ]
    lines += [f"| {name} | {100 * acc:.1f}% |" for name, acc in scores.items()]
    n = args.rows
    lines += [
        "",
        f"At {n} rows one standard error of an accuracy near 70% is {100 * (0.7 * 0.3 / n) ** 0.5:.1f} points. "
        "The placement is chosen for its semantics (a prefix of real tokens' keys equals those tokens before the "
        "text, tested in tests/test_families.py) and for PEFT's convention, not for a score at init.",
    ]
    atomic_write_text(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
