"""The main job: zero-shot template vs a trained soft prompt on SST-2, with the embedded SmolLM2.

Loads the model, scores the plain template on the full SST-2 dev set (872 rows), trains a
20-token soft prompt initialized from the class labels (Lester et al. 2021), scores it the same
way, saves the prompt file and prints one table. About 5 minutes on 2 CPU cores.

Run twice, the demo replaces its own earlier file at --out (marked `train.made_by: "softprompt demo"` in the
metadata); any other file there (a prompt someone trained to that path) is refused before the model loads, unless
`overwrite` (--overwrite) is given.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

from ..base import load_base
from ..data import load_task
from ..evaluate import evaluate
from ..fileio import peek_metadata
from ..methods import SoftPromptConfig
from ..store import info
from ..train import TrainConfig, train
from .options import check_out, save_prompt

MADE_BY = "softprompt demo"  # in the prompt's `train` metadata: what the demo may replace without --overwrite


def demo_file(path) -> bool:
    """Whether `path` is a prompt file an earlier demo wrote."""
    meta = peek_metadata(path)
    return isinstance(meta, dict) and isinstance(meta.get("train"), dict) and meta["train"].get("made_by") == MADE_BY


@contextmanager
def _timed(times: dict, name: str):
    """Add the wall time of the block to times[name] (seconds)."""
    t = time.perf_counter()
    yield
    times[name] = time.perf_counter() - t


def run_demo(
    model: str = "smollm2",
    device: str | None = None,
    dtype: str | None = "auto",
    steps: int = 150,
    out: str = "prompts/sst2-soft.safetensors",
    data_dir: str | None = None,
    overwrite: bool = False,
    **placement,
) -> dict:
    from rich.console import Console

    console, times = Console(), {}
    overwrite = overwrite or demo_file(check_out(out, True))  # an earlier demo's file is the demo's to replace
    out = check_out(out, overwrite)  # before the model loads
    with _timed(times, "load model"):
        task = load_task("sst2", data_dir)
        base = load_base(model, device=device, dtype=dtype, **placement)  # quantize, device_map, ...
    console.print(
        f"[bold]softprompt demo[/]: {base.name} on {base.device}, task {task.name} "
        f"({len(task.split('train')):,} train / {len(task.split('dev')):,} dev rows)"
    )
    with _timed(times, "zero-shot eval"):
        zero_shot = evaluate(base, task, None, split="dev", progress=True)
    console.print(f"zero-shot template {task.spec.template!r}: accuracy {100 * zero_shot['accuracy']:.1f}%")
    with _timed(times, "train"):
        result = train(
            base,
            task,
            "soft",
            SoftPromptConfig(num_virtual_tokens=20, init="labels"),
            TrainConfig(
                steps=steps, batch_size=8, lr=3e-2, warmup_steps=10, eval_every=50, eval_limit=200, final_eval=False
            ),
            run_dir=Path("runs") / f"demo-sst2-soft-{time.strftime('%Y%m%d-%H%M%S')}",
        )
    with _timed(times, "tuned eval"):
        tuned = evaluate(base, task, result.prompt, split="dev", progress=True)
    result.prompt.metrics.update({"zero_shot": zero_shot, "dev": tuned})
    result.prompt.train["made_by"] = MADE_BY
    path = save_prompt(result.prompt, out, overwrite=overwrite or demo_file(out))
    _report(console, result, path, times)
    return {
        "zero_shot": zero_shot,
        "tuned": tuned,
        "file_bytes": path.stat().st_size,
        "seconds": times,
        "path": str(path),
    }


def _report(console, result, path: Path, times: dict) -> None:
    """The demo's table: zero-shot against the trained prompt, in accuracy, size and time."""
    from rich.table import Table

    zero_shot, tuned = result.prompt.metrics["zero_shot"], result.prompt.metrics["dev"]
    d, file_bytes = info(result.prompt), path.stat().st_size
    table = Table(title="SST-2 dev, all 872 rows")
    table.add_column("")
    table.add_column("zero-shot template", justify="right")
    table.add_column("soft prompt (20 tokens)", justify="right")
    table.add_row("accuracy", f"{100 * zero_shot['accuracy']:.1f}%", f"{100 * tuned['accuracy']:.1f}%")
    table.add_row("macro-F1", f"{100 * zero_shot['macro_f1']:.1f}%", f"{100 * tuned['macro_f1']:.1f}%")
    table.add_row("trainable parameters", "0", f"{d['parameters_saved']:,}")
    table.add_row("prompt file", "-", f"{file_bytes:,} B")
    table.add_row("share of a full copy", "-", f"{100 * d['fraction_of_base']:.4f}% params")
    table.add_row("", "", f"1/{d['base_bytes'] / file_bytes:,.0f} bytes")
    table.add_row("wall time", f"{times['zero-shot eval']:.0f} s", f"{times['train'] + times['tuned eval']:.0f} s")
    console.print(table)
    console.print(f"full model copy: {d['base_parameters']:,} parameters, {d['base_bytes'] / 1e6:,.0f} MB")
    console.print(
        f"train {times['train']:.0f} s ({result.seconds_per_step:.2f} s/step), tuned eval "
        f"{times['tuned eval']:.0f} s, model load {times['load model']:.0f} s; total {sum(times.values()):.0f} s"
    )
    console.print(f"saved {path}; run record and curves in {result.run_dir}/")
