"""The GPU benchmark: softprompt on CUDA in bfloat16 with SDPA, the embedded SmolLM2-135M, in one process.

    benchmarks/gpu.sh                         # CUDA, bf16, sized for < 8 min on an H200: results/gpu.{md,json}
    benchmarks/gpu.sh --dry-run --out DIR     # CPU, a tiny random Llama, a few iterations of every section (CI)
    benchmarks/gpu.sh --sections prefill,contract --budget 120

1. train: seconds per training step and peak memory (`torch.cuda.max_memory_allocated`) against
   PEFT for soft prompts, prefix tuning and P-tuning, the grid's pairs (benchmarks/smollm2.yaml)
   interleaved on one loaded model (`peft_speed.compare`), at two batch sizes.
2. prefill: next-token latency of the same inputs through the plain model, through softprompt
   with no prompt, with a soft prompt compiled to a KV prefix (`Family.compile`, what `MultiTask`
   serves) and with the same soft prompt uncompiled.
3. mixed: decode throughput of one batch mixing 8 tasks of every method (soft, prefix, deep,
   P-tuning, a template alone) through `MultiTask` and the `Decoder` every generation path uses,
   against the same rows decoded one task per batch and against the rows without prompts. Every
   variant decodes a fixed number of steps (no row stops early), so all do the same work.
4. contract: in the run's dtype, greedy generation with the KV cache equals generation without it
   (every method, a mixed batch; rows of different lengths; a row may part only at a near-tie, its
   top two candidates within the tolerance, and the table says where), cached and uncached logits
   agree step by step on forced tokens, and a row alone equals the row in a padded batch that mixes methods (target
   log-probabilities and full next-token logits): max |diff| against a tolerance for the dtype
   (`tolerance`). Off float32, each row alone in float32 shows how far the dtype itself moves it.

Every section has a time budget (shares of --budget) that bounds its repeats; the numbers are
medians over interleaved rounds, timed with `torch.cuda.synchronize` on both sides. Prompts are
their methods' initializations, moved a little: speed and the contract do not depend on training. The task is SST-2
when its files are found (SOFTPROMPT_DATA, ./shared/data, ../shared/data), else synthetic sentences
under SST-2's template (the results name which). The results are written after every section.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from peft_speed import compare, grid_pairs

import softprompt as sp
from softprompt.base import default_device, freeze, parse_dtype
from softprompt.bench.grid import load_grid
from softprompt.data import Encoder
from softprompt.errors import SoftpromptError
from softprompt.example import Example
from softprompt.fileio import atomic_write_text
from softprompt.generate import GREEDY, Decoder, decode
from softprompt.injection import EMPTY, Injection
from softprompt.methods import METHODS, InitContext, build_method
from softprompt.multitask import MultiTask

HERE = Path(__file__).resolve().parent
SECTIONS = ("train", "prefill", "mixed", "contract")
SHARE = {"train": 0.35, "prefill": 0.15, "mixed": 0.3, "contract": 0.2}  # of --budget
# The contract's tolerance on max |difference| (a row alone against the row in a padded batch, cached against uncached
# logits): padded and unpadded rows, cached and uncached steps run through different kernels, whose sums round
# differently. float32: the test suite's. 16-bit: ULPS units in the last place of the largest |logit| compared (the
# errors come from the logits, also in log-probabilities); greedy tokens may then differ only where the top two
# candidates are that close (a near-tie: bfloat16 rounds many logits to exactly the same value).
FLOAT32_ATOL = 1e-4
ULPS = 8
MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10}
# The mixed batch and the contract: (name, method or None for a template alone, virtual tokens)
PLAN = [
    ("soft-20", "soft", 20),
    ("soft-8", "soft", 8),
    ("prefix-10", "prefix", 10),
    ("prefix-4", "prefix", 4),
    ("deep-8", "deep", 8),
    ("deep-16", "deep", 16),
    ("ptuning-16", "ptuning", 16),
    ("hard", None, 0),
]


@dataclass(frozen=True)
class Sizes:
    train_batch_sizes: tuple = (8, 32)  # 8: the grid's
    train_steps: int = 30  # timed steps per pair, at most
    prefill_batches: tuple = (1, 8, 32)
    prefill_tokens: int = 64
    prefill_virtual_tokens: int = 20
    prefill_rounds: int = 40
    mixed_rows_per_task: tuple = (4, 16)  # 8 tasks: batches of 32 and 128 rows
    mixed_new_tokens: int = 64
    mixed_rounds: int = 3
    contract_rows: int = 4
    contract_new_tokens: int = 32


FULL = Sizes()
DRY = Sizes(
    train_batch_sizes=(2,),
    train_steps=2,
    prefill_batches=(1, 2),
    prefill_tokens=12,
    prefill_virtual_tokens=5,
    prefill_rounds=2,
    mixed_rows_per_task=(1,),
    mixed_new_tokens=4,
    mixed_rounds=1,
    contract_rows=3,
    contract_new_tokens=6,
)


class Clock:
    """A section's time budget."""

    def __init__(self, seconds: float):
        self.seconds, self.start = seconds, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable, device: torch.device) -> tuple[float, int | None]:
    """(seconds, peak bytes allocated on CUDA or None) of one call of `fn`, from an idle device to an idle device."""
    cuda = device.type == "cuda"
    sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    fn()
    sync(device)
    seconds = time.perf_counter() - t
    return seconds, torch.cuda.max_memory_allocated(device) if cuda else None


def interleaved(variants: dict[str, Callable], device, rounds: int, seconds: float) -> dict:
    """Each variant once to warm up, then rounds of every variant in turn (the order rotating) while another round
    fits in `seconds` (warm-up included; at least one round), at most `rounds`. Returns {variant: (seconds of each
    round, peak bytes allocated or None)}."""
    start = time.perf_counter()
    for fn in variants.values():
        fn()
    names = list(variants)
    times: dict[str, list[float]] = {k: [] for k in names}
    peaks: dict[str, int | None] = dict.fromkeys(names)
    for r in range(rounds):
        began = time.perf_counter()
        for k in names[r % len(names) :] + names[: r % len(names)]:
            took, peak = measure(variants[k], device)
            times[k].append(took)
            peaks[k] = peak if peaks[k] is None else max(peaks[k], peak)
        now = time.perf_counter()
        if now + (now - began) - start > seconds:  # the next round would not fit
            break
    return {k: (times[k], peaks[k]) for k in names}


def median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


# --- setup: the model, the task ---------------------------------------------------------------------------------------


@dataclass
class Setup:
    load: Callable[..., sp.Base]  # a fresh Base (dtype=... for another dtype)
    task: sp.Task
    data: str  # where the task's rows come from
    sizes: Sizes
    dry_run: bool


WORDS = [
    "the",
    "a",
    "film",
    "movie",
    "story",
    "plot",
    "acting",
    "actor",
    "director",
    "scene",
    "music",
    "was",
    "is",
    "felt",
    "seemed",
    "great",
    "good",
    "fun",
    "moving",
    "bad",
    "awful",
    "boring",
    "dull",
    "slow",
    "long",
    "short",
    "funny",
    "sad",
    "smart",
    "clever",
    "and",
    "but",
    "not",
    "very",
    "too",
    "quite",
    "really",
    "of",
    "in",
    "on",
    "with",
]


def synthetic_task(folder: Path, seed: int = 0) -> sp.Task:
    """SST-2's spec over random sentences of 4-40 words with random labels (for machines without the data)."""
    g = torch.Generator().manual_seed(seed)
    for split, n in (("train", 512), ("dev", 128)):
        lines = []
        for _ in range(n):
            k = int(torch.randint(4, 41, (1,), generator=g))
            words = [WORDS[i] for i in torch.randint(len(WORDS), (k,), generator=g).tolist()]
            lines.append(json.dumps({"sentence": " ".join(words), "label": int(torch.randint(2, (1,), generator=g))}))
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    spec = yaml.safe_load((Path(sp.__file__).parent / "tasks" / "sst2.yaml").read_text())
    spec |= {"name": "sst2-synthetic", "splits": {"train": "train.jsonl", "dev": "dev.jsonl"}}
    (folder / "task.yaml").write_text(yaml.safe_dump(spec))
    return sp.load_task(str(folder / "task.yaml"))


def load_data(choice: str, folder: Path) -> tuple[sp.Task, str]:
    if choice == "auto":
        try:
            task = sp.load_task("sst2")
            task.check_split("train")
            task.check_split("dev")
            return task, f"SST-2 ({task.base_dir})"
        except SoftpromptError:
            pass
    return synthetic_task(folder), "synthetic sentences under SST-2's template (no SST-2 files found)"


def tiny_tokenizer(texts: list[str]):
    """A byte-level BPE tokenizer of 512 tokens trained on `texts`, with EOS and pad tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>")


def tiny_loader(tokenizer, device: str, dtype: torch.dtype) -> Callable[..., sp.Base]:
    """A loader of a tiny random Llama (2 layers, width 64, grouped-query attention, SDPA): the same weights each
    call."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )

    def load(dtype: torch.dtype = dtype) -> sp.Base:
        torch.manual_seed(0)
        model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
        return freeze(model.to(dtype), tokenizer, "tiny-llama (random, dry run)", device)

    return load


def make_setup(a, folder: Path) -> Setup:
    task, data = load_data(a.data, folder)
    device = a.device or ("cpu" if a.dry_run else default_device())
    dtype = parse_dtype(a.dtype, device)
    if a.dry_run:
        load = tiny_loader(tiny_tokenizer(task.split("train").prompts[:500]), device, dtype)
    else:

        def load(dtype: torch.dtype = dtype) -> sp.Base:
            return sp.load_base(a.model, device=device, dtype=dtype)

    return Setup(load, task, data, DRY if a.dry_run else FULL, a.dry_run)


def release() -> None:
    """Free what the previous measurement left (trainers, PEFT wrappers: reference cycles) before the next one."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def make_prompt(base, task, method: str | None, P: int, seed: int) -> sp.Prompt:
    """A method's initialization as a prompt (None: the task's template alone), moved off its init a little (a zero
    init would hide a misplaced prompt)."""
    if method is None:
        return sp.Prompt.for_base(base, EMPTY, "hard", {}, task.spec)
    config = METHODS[method].config_class(num_virtual_tokens=P)
    # no task text: a vocab init draws from the tokenizer's first merges instead of counting the task's tokens
    m = build_method(method, config, InitContext(base, task.spec.verbalizers, None, seed=seed))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            scale = float(p.float().std()) if p.numel() > 1 else 0.0
            p.add_(torch.randn(p.shape, generator=g).to(p.device) * 0.1 * max(scale, 1e-3))
    return sp.Prompt.for_base(base, m.collapse(), method, config.to_dict(), task.spec)


# --- 1. training steps against PEFT -----------------------------------------------------------------------------------


def bench_train(s: Setup, clock: Clock) -> dict:
    grid = load_grid(HERE / "smollm2.yaml")
    pairs = grid_pairs(grid, "sst2")  # soft / peft-prompt, prefix / peft-prefix, ptuning / peft-ptuning, adapters
    runs = [(b, o, p) for b in s.sizes.train_batch_sizes for o, p in pairs]
    rows = []
    for i, (batch, ours, peft) in enumerate(runs):
        ours, peft = (dataclasses.replace(c, train={**c.train, "batch_size": batch}) for c in (ours, peft))
        budget = max(clock.left(), 0) / (len(runs) - i)  # what is left, shared by the runs still to go
        base = s.load()  # fresh: PEFT wraps the model
        rows.append(compare(base, s.task, ours, peft, s.sizes.train_steps, budget_s=0.8 * budget))
        print(f"  train {json.dumps(rows[-1])}", flush=True)
        del base
        release()
    return {"pairs": rows}


# --- 2. prefill latency -----------------------------------------------------------------------------------------------


def input_ids(base, n: int, T: int, seed: int = 0) -> list[list[int]]:
    """n random inputs of T tokens (no special tokens), the same for every variant."""
    special = set(base.tokenizer.all_special_ids)
    pool = torch.tensor([i for i in range(len(base.tokenizer)) if i not in special])
    pick = torch.randint(len(pool), (n, T), generator=torch.Generator().manual_seed(seed))
    return pool[pick].tolist()


@torch.inference_mode()
def bench_prefill(s: Setup, clock: Clock, base) -> dict:
    z = s.sizes
    prompt = make_prompt(base, s.task, "soft", z.prefill_virtual_tokens, seed=0)
    mt = MultiTask(base)
    compiled = mt.injection(mt.add("soft", prompt))  # the soft prompt as a KV prefix, as served
    soft = prompt.injection.to(base.device, base.dtype)
    out = {"input_tokens": z.prefill_tokens, "virtual_tokens": z.prefill_virtual_tokens, "batches": []}
    for j, B in enumerate(z.prefill_batches):
        inputs = input_ids(base, B, z.prefill_tokens)
        ids = torch.tensor(inputs, device=base.device)  # (B, T): one length, no padding
        mask = torch.ones_like(ids)

        def rows(injection: Injection, inputs=inputs) -> list[Example]:
            return [Example(x, len(x), [], injection) for x in inputs]

        empty, kv, embeds = rows(EMPTY), rows(compiled), rows(soft)
        variants = {
            "plain model": lambda ids=ids, mask=mask: base.model(input_ids=ids, attention_mask=mask, logits_to_keep=1),
            "softprompt, no prompt": lambda r=empty: base.family.next_token_logits(r),
            "soft prompt, KV-compiled": lambda r=kv: base.family.next_token_logits(r),
            "soft prompt, uncompiled": lambda r=embeds: base.family.next_token_logits(r),
        }
        diff = (variants["soft prompt, KV-compiled"]() - variants["soft prompt, uncompiled"]()).float().abs().max()
        seconds = 0.9 * max(clock.left(), 0) / (len(z.prefill_batches) - j)  # what is left, shared by what is to go
        timed = interleaved(variants, base.device, z.prefill_rounds, seconds)
        t = {k: v[0] for k, v in timed.items()}
        row = {
            "batch": B,
            "rounds": len(t["plain model"]),
            "median_ms": {k: 1000 * statistics.median(v) for k, v in t.items()},
            "ratio_compiled_vs_plain": median_ratio(t["soft prompt, KV-compiled"], t["plain model"]),
            "ratio_uncompiled_vs_plain": median_ratio(t["soft prompt, uncompiled"], t["plain model"]),
            "ratio_compiled_vs_uncompiled": median_ratio(t["soft prompt, KV-compiled"], t["soft prompt, uncompiled"]),
            "max_abs_logit_diff_compiled_vs_uncompiled": float(diff),
        }
        if base.device.type == "cuda":
            row["peak_memory_bytes"] = {k: v[1] for k, v in timed.items()}
        out["batches"].append(row)
        print(f"  prefill {json.dumps(row)}", flush=True)
    return out


# --- 3. mixed-task generation -----------------------------------------------------------------------------------------


def registry(base, task) -> MultiTask:
    """A MultiTask holding PLAN's prompts, all on the task's template."""
    mt = MultiTask(base)
    for seed, (name, method, P) in enumerate(PLAN):
        mt.add(name, make_prompt(base, task, method, P, seed))
    return mt


def inputs_of(task, n: int, offset: int = 0) -> list[dict]:
    """n dev inputs (template fields), of different lengths."""
    rows = task.split("dev").rows
    fields = task.spec.template_fields
    return [{f: rows[(offset + i) % len(rows)][task.spec.column(f)] for f in fields} for i in range(n)]


def fixed_decode(base, examples: list[Example], steps: int) -> list[list[int]]:
    """Greedy tokens of `steps` decode steps for every row, no row stopping (the loop `generate.decode` runs)."""
    decoder = Decoder(base)
    decoder.join(list(range(len(examples))), examples, [steps] * len(examples), [GREEDY] * len(examples))
    out = []
    for step in range(steps):
        nxt, _ = decoder.sample()
        out.append(nxt)
        if step < steps - 1:
            decoder.advance(nxt)
    return torch.stack(out, 1).tolist()  # (B, steps)


def mixed_batch(s: Setup, base, mt: MultiTask, per_task: int, seconds: float) -> dict:
    """`per_task` rows of every task of `mt`: one mixed batch, one batch per task, the rows without prompts."""
    n = s.sizes.mixed_new_tokens
    rows = [
        mt.encode(name, value, n)
        for k, (name, _, _) in enumerate(PLAN)
        for value in inputs_of(s.task, per_task, offset=k * per_task)
    ]
    examples = [x for _, x in rows]
    by_task = [[x for e, x in rows if e.name == name] for name, _, _ in PLAN]
    bare = [dataclasses.replace(x, injection=EMPTY) for x in examples]
    got: dict[str, list] = {}

    def per_task_batches() -> None:
        got["per_task"] = [t for group in by_task for t in fixed_decode(base, group, n)]

    variants = {
        "mixed batch": lambda: got.__setitem__("mixed", fixed_decode(base, examples, n)),
        "one batch per task": per_task_batches,
        "same rows, no prompts": lambda: fixed_decode(base, bare, n),
    }
    timed = interleaved(variants, base.device, s.sizes.mixed_rounds, seconds)
    t = {k: v[0] for k, v in timed.items()}
    tokens = len(examples) * n
    lengths = [len(x.source) for x in examples]
    row = {
        "rows": len(examples),
        "input_tokens": {"min": min(lengths), "max": max(lengths)},
        "rounds": len(t["mixed batch"]),
        "tokens_per_s": {k: tokens / statistics.median(v) for k, v in t.items()},
        "speedup_mixed_vs_per_task": median_ratio(t["one batch per task"], t["mixed batch"]),
        "ratio_mixed_vs_no_prompts": median_ratio(t["mixed batch"], t["same rows, no prompts"]),
        # informative: batches of other shapes round differently, and greedy decoding follows any flip
        "rows_identical_mixed_vs_per_task": sum(a == b for a, b in zip(got["mixed"], got["per_task"])),
    }
    if base.device.type == "cuda":
        row["peak_memory_bytes"] = {k: v[1] for k, v in timed.items()}
    return row


@torch.inference_mode()
def bench_mixed(s: Setup, clock: Clock, base) -> dict:
    z = s.sizes
    mt = registry(base, s.task)
    out = {
        "tasks": [{"name": n, "method": m or "template only", "virtual_tokens": P} for n, m, P in PLAN],
        "new_tokens": z.mixed_new_tokens,
        "batches": [],
    }
    for j, per_task in enumerate(z.mixed_rows_per_task):
        seconds = 0.9 * max(clock.left(), 0) / (len(z.mixed_rows_per_task) - j)  # what is left, shared
        row = mixed_batch(s, base, mt, per_task, seconds)
        out["batches"].append(row)
        print(f"  mixed {json.dumps(row)}", flush=True)
    return out


# --- 4. the contract --------------------------------------------------------------------------------------------------


def spread(items: list, n: int, key) -> list:
    """n of `items` spread over their range of `key` (shortest to longest)."""
    order = sorted(items, key=key)
    return [order[k * (len(order) - 1) // max(n - 1, 1)] for k in range(n)]


def tolerance(dtype: torch.dtype, largest: float) -> float:
    """The contract's max |difference| for values up to `largest` in magnitude computed in `dtype` (see ULPS)."""
    if dtype not in MANTISSA_BITS:
        return FLOAT32_ATOL
    return ULPS * 2.0 ** (math.floor(math.log2(max(largest, 1e-3))) - MANTISSA_BITS[dtype])


def greedy_run(base, examples: list[Example], n: int, use_cache: bool) -> tuple[list[list[int]], list[list[float]]]:
    """(tokens per row until it stops, the top-2 log-prob margin at each of its steps)."""
    tokens: list[list[int]] = [[] for _ in examples]
    margins: list[list[float]] = [[] for _ in examples]
    for nxt, active, lp in decode(base, examples, n, use_cache=use_cache, top_logprobs=2):
        gap = (lp.top[:, 0] - lp.top[:, 1]).tolist()
        for i in active.nonzero()[:, 0].tolist():
            tokens[i].append(int(nxt[i]))
            margins[i].append(gap[i])
    return tokens, margins


def cached_vs_uncached(base, examples: list[Example], n: int, atol: float) -> dict:
    """Greedy tokens with and without the KV cache; where a row's tokens differ, the top-2 log-prob margin at the first
    difference (the larger of the two runs'): `pass` when every difference is at a near-tie (margin <= atol)."""
    cached, margins_c = greedy_run(base, examples, n, True)
    uncached, margins_u = greedy_run(base, examples, n, False)
    differing = []
    for i, (a, b) in enumerate(zip(cached, uncached)):
        if a != b:
            step = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            seen = [m[i][step] for m in (margins_c, margins_u) if step < len(m[i])]
            margin = max(seen) if seen else None
            near_tie = margin is not None and margin <= atol
            differing.append(
                {"row": i, "first_differing_step": step, "top2_logprob_margin": margin, "near_tie": near_tie}
            )
    return {
        "rows": len(examples),
        "new_tokens": n,
        "input_tokens": [len(x.source) for x in examples],
        "rows_identical": len(examples) - len(differing),
        "identical": not differing,
        "differing": differing,
        "pass": all(d["near_tie"] for d in differing),
    }


def forced_logits(base, examples: list[Example], n: int) -> float:
    """Max |cached - uncached| next-token logits over `n` steps on forced random tokens (greedy choices of a random
    model often stop at once)."""
    family, V = base.family, len(base.tokenizer)
    forced = torch.randint(3, V, (n, len(examples)), generator=torch.Generator().manual_seed(0)).to(base.device)
    (c, logits_c), (u, logits_u) = family.start_decoding(examples, True), family.start_decoding(examples, False)
    worst = float((logits_c - logits_u).float().abs().max())
    for tokens in forced:
        logits_c, logits_u = family.continue_decoding(c, tokens), family.continue_decoding(u, tokens)
        worst = max(worst, float((logits_c - logits_u).float().abs().max()))
    return worst


def alone_vs_batch(base, rows: list[Example]) -> dict:
    """Max |diff| between each row alone and the row in the padded batch: target log-probs, next-token logits; and
    the largest |logit| (what a 16-bit tolerance scales with)."""
    family = base.family
    batch, mask = family.target_log_probs(rows)
    sources = [Example(x.source, x.slot, [], x.injection) for x in rows]
    logits = family.next_token_logits(sources).float()  # (B, V)
    lp, lg = 0.0, 0.0
    alone_lp, alone_lg = [], []
    for i, row in enumerate(rows):
        a, m = family.target_log_probs([row])
        alone_lp.append(a[0][m[0]].float())
        alone_lg.append(family.next_token_logits([sources[i]])[0].float())
        lp = max(lp, float((batch[i][mask[i]].float() - alone_lp[-1]).abs().max()))
        lg = max(lg, float((logits[i] - alone_lg[-1]).abs().max()))
    return {
        "max_abs_diff": {"target_log_probs": lp, "next_token_logits": lg},
        "largest_abs_logit": float(logits.abs().max()),
        "alone": (alone_lp, alone_lg),
    }


def contract_rows(base, task, prompts: dict[str, sp.Prompt], n: int):
    """Training rows (with targets) of n different lengths, each under every prompt (the soft one also compiled)."""
    enc = Encoder(task.spec, base)
    data = task.split("train")
    picked = spread(range(min(len(data), 400)), n, key=lambda i: len(data.prompts[i]))
    examples = [enc.training_example(data.prompts[i], data.targets[i]) for i in picked]
    injections = {name: p.injection.to(base.device, base.dtype) for name, p in prompts.items()}
    injections["soft-20, KV-compiled"] = base.family.compile(injections["soft-20"])
    return examples, injections


def float32_reference(s: Setup, prompts: dict, rows: list[Example], names: list[str], alone) -> dict:
    """Max |diff| between each row alone in float32 and alone in the run's dtype: how far the dtype itself moves it."""
    ref = s.load(dtype=torch.float32)
    injections = {k: p.injection.to(ref.device, torch.float32) for k, p in prompts.items()}
    injections["soft-20, KV-compiled"] = ref.family.compile(injections["soft-20"])
    alone_lp, alone_lg = alone
    lp = lg = 0.0
    for i, (x, name) in enumerate(zip(rows, names)):
        row = dataclasses.replace(x, injection=injections[name])
        a, m = ref.family.target_log_probs([row])
        lp = max(lp, float((a[0][m[0]].float() - alone_lp[i]).abs().max()))
        logits = ref.family.next_token_logits([Example(row.source, row.slot, [], row.injection)])[0].float()
        lg = max(lg, float((logits - alone_lg[i]).abs().max()))
    del ref
    release()
    return {"target_log_probs": lp, "next_token_logits": lg}


@torch.inference_mode()
def bench_contract(s: Setup, clock: Clock, base) -> dict:
    z = s.sizes
    plan = [(name, m, P) for name, m, P in PLAN if name in ("soft-20", "prefix-10", "deep-8", "ptuning-16", "hard")]
    prompts = {name: make_prompt(base, s.task, m, P, seed) for seed, (name, m, P) in enumerate(plan)}
    examples, injections = contract_rows(base, s.task, prompts, z.contract_rows)
    names = list(injections)
    # 4b. a row alone equals the row in a padded batch mixing every prompt (and no prompt)
    mixed = [dataclasses.replace(examples[i % len(examples)], injection=injections[k]) for i, k in enumerate(names)]
    found = alone_vs_batch(base, mixed)
    atol = tolerance(base.dtype, found["largest_abs_logit"])
    out = {
        "dtype": str(base.dtype).removeprefix("torch."),
        "atol": atol,
        "tolerance": "test suite's (float32)"
        if base.dtype not in MANTISSA_BITS
        else f"{ULPS} units in the last place of the largest |logit| ({found['largest_abs_logit']:.1f})",
    }
    out["alone_vs_padded_mixed_batch"] = {
        "rows": len(mixed),
        "prompts": names,
        "lengths": [len(x.source) + len(x.target) for x in mixed],
        "max_abs_diff": found["max_abs_diff"],
        "pass": max(found["max_abs_diff"].values()) <= atol,
    }
    if base.dtype != torch.float32:
        out["alone_vs_padded_mixed_batch"]["float32_reference_max_abs_diff"] = float32_reference(
            s, prompts, mixed, names, found["alone"]
        )
    # 4a. cached = uncached: each prompt on rows of different lengths, then one batch mixing every prompt
    n = z.contract_new_tokens
    sources = [Example(x.source, x.slot, [], EMPTY) for x in examples]
    groups = {name: [dataclasses.replace(x, injection=inj) for x in sources] for name, inj in injections.items()}
    groups["mixed batch"] = [
        dataclasses.replace(sources[i % len(sources)], injection=injections[name]) for i, name in enumerate(names)
    ]
    out["generation"] = {name: cached_vs_uncached(base, rows, n, atol) for name, rows in groups.items()}
    worst = forced_logits(base, groups["mixed batch"], min(n, 8))
    out["cached_vs_uncached_logits"] = {"max_abs_diff": worst, "pass": worst <= atol}
    out["pass"] = (
        all(g["pass"] for g in out["generation"].values())
        and out["cached_vs_uncached_logits"]["pass"]
        and out["alone_vs_padded_mixed_batch"]["pass"]
    )
    print(f"  contract pass={out['pass']} {json.dumps(out['alone_vs_padded_mixed_batch'])}", flush=True)
    return out


# --- the report -------------------------------------------------------------------------------------------------------


def environment(s: Setup, base) -> dict:
    import transformers

    versions = {"softprompt": sp.__version__, "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import peft

        versions["peft"] = peft.__version__
    except ImportError:
        pass
    env = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "dry_run": s.dry_run,
        "model": base.name,
        "device": str(base.device),
        "dtype": str(base.dtype).removeprefix("torch."),
        "attn_implementation": base.model.config._attn_implementation,
        "data": s.data,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }
    if base.device.type == "cuda":
        props = torch.cuda.get_device_properties(base.device)
        env |= {
            "gpu": torch.cuda.get_device_name(base.device),
            "gpu_memory_bytes": props.total_memory,
            "compute_capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
        }
    else:
        env |= {"cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads()}
    return env


def _mib(n) -> str:
    return "–" if n is None else f"{n / 2**20:,.0f}"


def _table(head: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + [
        "| " + " | ".join(map(str, r)) + " |" for r in rows
    ]


def _train_lines(t: dict) -> list[str]:
    lines = ["## 1. Training step against PEFT (interleaved on one model)", ""]
    rows = []
    for p in t["pairs"]:
        mem, above = p.get("peak_memory_bytes", {}), p.get("peak_above_step_start_bytes", {})
        rows.append(
            [
                f"{p['softprompt']} / {p['peft']}",
                p["batch_size"],
                p["steps"],
                f"{1000 * p['seconds_per_step']['softprompt']:.1f} / {1000 * p['seconds_per_step']['peft']:.1f}",
                f"{p['ratio_wall']:.2f}",
                f"{_mib(mem.get('softprompt'))} / {_mib(mem.get('peft'))}",
                f"{_mib(above.get('softprompt'))} / {_mib(above.get('peft'))}",
            ]
        )
    lines += _table(
        ["pair (ours / PEFT)", "batch", "steps", "ms/step", "ratio", "peak MiB", "peak above step start MiB"], rows
    )
    lines += [
        "",
        "Median over timed steps after one warm-up step each, alternating A B B A; ratio: median of ours / PEFT "
        "per step. Peak: `max_memory_allocated` within a step (both tools' prompts and optimizer states live on "
        "the one model); above step start: what the step itself adds (activations, gradients).",
        "",
    ]
    return lines


def _prefill_lines(p: dict) -> list[str]:
    lines = [f"## 2. Prefill, {p['input_tokens']} input tokens, {p['virtual_tokens']}-token soft prompt", ""]
    names = list(p["batches"][0]["median_ms"])
    rows = [
        [b["batch"], b["rounds"], *(f"{b['median_ms'][k]:.2f}" for k in names)]
        + [f"{b['ratio_compiled_vs_plain']:.2f}", f"{b['ratio_uncompiled_vs_plain']:.2f}"]
        + [f"{b['max_abs_logit_diff_compiled_vs_uncompiled']:.1e}"]
        for b in p["batches"]
    ]
    lines += _table(
        ["batch", "rounds", *(f"{k} ms" for k in names), "compiled / plain", "uncompiled / plain", "max abs diff"],
        rows,
    )
    lines += [
        "",
        "Median ms of interleaved rounds; ratios: medians of per-round ratios. Max abs diff: next-token logits of "
        "the compiled soft prompt against the uncompiled one.",
        "",
    ]
    return lines


def _mixed_lines(m: dict) -> list[str]:
    tasks = ", ".join(t["name"] for t in m["tasks"])
    lines = [f"## 3. Mixed-task generation, {m['new_tokens']} greedy tokens per row", "", f"Tasks: {tasks}.", ""]
    names = list(m["batches"][0]["tokens_per_s"])
    rows = [
        [b["rows"], f"{b['input_tokens']['min']}-{b['input_tokens']['max']}", b["rounds"]]
        + [f"{b['tokens_per_s'][k]:,.0f}" for k in names]
        + [f"{b['speedup_mixed_vs_per_task']:.2f}", f"{b['ratio_mixed_vs_no_prompts']:.2f}"]
        + [f"{b['rows_identical_mixed_vs_per_task']}/{b['rows']}"]
        for b in m["batches"]
    ]
    lines += _table(
        ["rows", "input tokens", "rounds", *(f"{k} tok/s" for k in names), "speedup vs per task"]
        + ["time vs no prompts", "same tokens as per task"],
        rows,
    )
    lines += [
        "",
        "Every row decodes the same number of steps (no early stop), through `MultiTask` and `Decoder`. The "
        "last column is informative: batches of other shapes round differently and greedy decoding follows a "
        "flip (the contract below bounds the difference).",
        "",
    ]
    return lines


def markdown(r: dict) -> str:
    env = r["environment"]
    where = env.get("gpu") or f"CPU ({env.get('cpu')}, {env.get('torch_threads')} threads)"
    v = env["versions"]
    lines = ["# GPU benchmark (`benchmarks/gpu.sh`)", ""]
    if env["dry_run"]:
        lines += ["**Dry run**: a tiny random model, a few iterations; the numbers measure nothing.", ""]
    lines += [
        f"{where}; {env['model']}, {env['dtype']}, attention {env['attn_implementation']}; {env['date']}; "
        + ", ".join(f"{k} {x}" for k, x in v.items())
        + (f", CUDA {env['cuda']}" if env.get("cuda") else "")
        + f". Data: {env['data']}. Total {r['seconds']:.0f} s.",
        "",
    ]
    sec = r["sections"]
    for name in SECTIONS:
        if name in sec and "error" in sec[name]:
            lines += [f"**{name}: failed** after {sec[name]['seconds']:.0f} s: `{sec[name]['error']}`", ""]
    for name, key, lines_of in (
        ("train", "pairs", _train_lines),
        ("prefill", "batches", _prefill_lines),
        ("mixed", "batches", _mixed_lines),
        ("contract", "generation", _contract_lines),
    ):
        if key in sec.get(name, {}):
            lines += lines_of(sec[name])
    return "\n".join(lines)


def _ok(passed: bool) -> str:
    return "pass" if passed else "**FAIL**"


def _contract_lines(c: dict) -> list[str]:
    def first(d: dict) -> str:
        margin = "–" if d["top2_logprob_margin"] is None else f"{d['top2_logprob_margin']:.3f}"
        return (
            f"row {d['row']} at step {d['first_differing_step']} (top-2 margin {margin}{', near-tie' * d['near_tie']})"
        )

    n = next(iter(c["generation"].values()))["new_tokens"]
    rows = [
        [k, " ".join(map(str, g["input_tokens"])), f"{g['rows_identical']}/{g['rows']}"]
        + ["; ".join(map(first, g["differing"])) or "–", _ok(g["pass"])]
        for k, g in c["generation"].items()
    ]
    a, f = c["alone_vs_padded_mixed_batch"], c["cached_vs_uncached_logits"]
    lines = [
        f"## 4. Contract in {c['dtype']}: {'PASS' if c['pass'] else 'FAIL'}",
        "",
        f"Tolerance on max |diff|: {c['atol']:.3g} ({c['tolerance']}).",
        "",
        f"Greedy generation, {n} new tokens, cached vs uncached (a row may differ only at a near-tie: top-2 "
        "log-prob margin within the tolerance):",
        "",
        *_table(["prompt", "input tokens", "identical rows", "first difference", ""], rows),
        "",
        f"- cached vs uncached next-token logits, step by step on forced tokens: max |diff| {f['max_abs_diff']:.2e} "
        f"({_ok(f['pass'])})",
        f"- a row alone vs in a padded batch mixing {', '.join(a['prompts'])} (lengths "
        f"{' '.join(map(str, a['lengths']))}): max |diff| of target log-probs "
        f"{a['max_abs_diff']['target_log_probs']:.2e}, of next-token logits "
        f"{a['max_abs_diff']['next_token_logits']:.2e} ({_ok(a['pass'])})",
    ]
    if ref := a.get("float32_reference_max_abs_diff"):
        lines.append(
            f"- the same rows alone in float32 vs {c['dtype']} (what the dtype itself moves): target log-probs "
            f"{ref['target_log_probs']:.2e}, next-token logits {ref['next_token_logits']:.2e}"
        )
    return [*lines, ""]


def write(out: Path, r: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "gpu.json", json.dumps(r, indent=1) + "\n")
    atomic_write_text(out / "gpu.md", markdown(r) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="a tiny random model on CPU, a few iterations (CI)")
    p.add_argument(
        "--out", help="folder for gpu.json and gpu.md (default benchmarks/results; dry run: runs/gpu-dry-run)"
    )
    p.add_argument("--model", default="smollm2")
    p.add_argument("--device", help="default: cuda when available (dry run: cpu)")
    p.add_argument("--dtype", default="auto", help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {','.join(SECTIONS)}")
    p.add_argument("--budget", type=float, default=None, help="seconds for all sections (default 360; dry run 60)")
    p.add_argument("--data", choices=("auto", "synthetic"), default="auto", help="auto: SST-2 if its files are found")
    a = p.parse_args(argv)
    sections = [x for x in a.sections.split(",") if x]
    if unknown := sorted(set(sections) - set(SECTIONS)):
        p.error(f"unknown sections {unknown}; use {','.join(SECTIONS)}")
    out = Path(a.out or (HERE.parent / "runs" / "gpu-dry-run" if a.dry_run else HERE / "results"))
    budget = a.budget or (60.0 if a.dry_run else 360.0)
    if a.dry_run:
        torch.set_num_threads(1)  # a tiny model gains nothing from threads, and they contend with other jobs' threads
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        s = make_setup(a, Path(tmp))
        base = s.load()
        r = {"environment": environment(s, base), "budget_s": budget, "sections": {}, "seconds": 0.0}
        print(f"{r['environment']}", flush=True)
        runs = {
            "train": lambda c: bench_train(s, c),
            "prefill": lambda c: bench_prefill(s, c, base),
            "mixed": lambda c: bench_mixed(s, c, base),
            "contract": lambda c: bench_contract(s, c, base),
        }
        shares = sum(SHARE[k] for k in sections)
        failed = False
        for name in sections:
            clock = Clock(budget * SHARE[name] / shares)
            print(f"{name}: budget {clock.seconds:.0f} s", flush=True)
            try:
                result = runs[name](clock)
            except Exception as e:  # noqa: BLE001 - one broken section must not lose the others' numbers
                traceback.print_exc()
                result, failed = {"error": f"{type(e).__name__}: {e}"}, True
            result["seconds"] = clock.elapsed()
            r["sections"][name] = result
            r["seconds"] = time.perf_counter() - t0
            write(out, r)
            release()
    contract = r["sections"].get("contract", {})
    if contract.get("pass") is False:
        print("contract: FAIL (see gpu.md)", file=sys.stderr)
    print(f"wrote {out / 'gpu.md'} and gpu.json in {r['seconds']:.0f} s")
    return 1 if failed or contract.get("pass") is False else 0


if __name__ == "__main__":
    sys.exit(main())
