"""benchmarks/gpu.sh --dry-run: every section of the GPU benchmark end to end on a tiny random model on CPU.

The benchmark itself needs CUDA and has never run in CI; its dry run catches breakage of the code it shares with the
library (families, MultiTask, Decoder, the PEFT comparison) before a GPU session finds it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.sh"
SECTIONS = ("train", "prefill", "mixed", "contract")


def numbers(value, where: str = ""):
    """(path, number) of every int or float in a JSON value (bools are not numbers here)."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from numbers(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from numbers(v, f"{where}[{i}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield where, value


@pytest.mark.parametrize("dtype,data", [("float32", "auto"), ("bfloat16", "synthetic")])
def test_dry_run_writes_every_section_with_finite_numbers_and_the_contract_holding(tmp_path, dtype, data):
    out = tmp_path / "results"
    run = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", "--dtype", dtype, "--data", data, "--out", str(out)],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    r = json.loads((out / "gpu.json").read_text())
    assert r["environment"]["dry_run"] and r["environment"]["dtype"] == dtype
    assert r["environment"]["attn_implementation"] == "sdpa"
    if data == "synthetic":
        assert r["environment"]["data"].startswith("synthetic")
    sections = r["sections"]
    assert set(sections) == set(SECTIONS)
    assert not [name for name, s in sections.items() if "error" in s]
    bad = [(path, x) for path, x in numbers(r) if not math.isfinite(x)]
    assert not bad
    # 1. every PEFT pair timed, both tools
    pairs = sections["train"]["pairs"]
    assert {p["peft_kind"] for p in pairs} == {"peft-prompt", "peft-prefix", "peft-ptuning", "peft-adapter"}
    assert all(p["steps"] >= 1 and min(p["seconds_per_step"].values()) > 0 for p in pairs)
    # 2. prefill: the compiled soft prompt gives the uncompiled one's logits
    for b in sections["prefill"]["batches"]:
        assert set(b["median_ms"]) == {
            "plain model",
            "softprompt, no prompt",
            "soft prompt, KV-compiled",
            "soft prompt, uncompiled",
        }
        assert b["max_abs_logit_diff_compiled_vs_uncompiled"] < 1e-2
    # 3. mixed generation over every task
    mixed = sections["mixed"]
    assert len(mixed["tasks"]) == 8 and all(b["tokens_per_s"]["mixed batch"] > 0 for b in mixed["batches"])
    # 4. the contract
    c = sections["contract"]
    assert c["pass"] and c["dtype"] == dtype
    assert all(g["pass"] for g in c["generation"].values()) and "mixed batch" in c["generation"]
    assert c["alone_vs_padded_mixed_batch"]["pass"] and c["cached_vs_uncached_logits"]["pass"]
    assert ("float32_reference_max_abs_diff" in c["alone_vs_padded_mixed_batch"]) == (dtype != "float32")
    md = (out / "gpu.md").read_text()
    assert "Dry run" in md and all(f"## {i}." in md for i in range(1, 5)) and "FAIL" not in md
