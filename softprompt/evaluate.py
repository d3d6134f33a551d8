"""Metrics: rank classification by verbalizer likelihood, and generation scored by BLEU and ROUGE-L.

The same functions score the plain template (no injection: zero-shot), a trained prompt, and a
hard-prompt candidate, so every number in a report is comparable.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from .data import Encoder, Split, Task, TaskSpec
from .errors import ConfigError
from .generate import GREEDY, Sampling, cut_at_stop, generate_ids
from .injection import EMPTY, Injection, per_row


def length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), so padding is small."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.inference_mode()
def class_log_likelihoods(
    base,
    enc: Encoder,
    prompts: list[str],
    injections: Injection | list[Injection] = EMPTY,
    batch_size: int = 32,
    progress: bool = False,
) -> torch.Tensor:
    """(N, C) log-likelihood of each class's label word after (or, for a masked LM, in) each rendered prompt."""
    rows = per_row(injections, len(prompts))
    verb = enc.verbalizer_ids
    reserve = max(len(v) for v in verb)
    examples = [enc.example(p, r, reserve) for p, r in zip(prompts, rows)]
    # multi-token label words turn every prompt into C sequences; keep the sequences per batch the same
    per_batch = batch_size if all(len(v) == 1 for v in verb) else max(1, batch_size // len(verb))
    scores = torch.empty(len(examples), len(verb))
    for batch in tqdm(
        length_batches([len(e.source) for e in examples], per_batch), disable=not progress, desc="scoring", leave=False
    ):
        scores[batch] = torch.stack(base.family.class_scores([(examples[i], verb) for i in batch])).float().cpu()
    return scores


def classification_metrics(scores: torch.Tensor, gold: list[int]) -> dict:
    pred = scores.argmax(-1)
    gold_t = torch.tensor(gold)
    C = scores.shape[1]
    f1s = []
    for c in range(C):
        tp = int(((pred == c) & (gold_t == c)).sum())
        fp = int(((pred == c) & (gold_t != c)).sum())
        fn = int(((pred != c) & (gold_t == c)).sum())
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return {"accuracy": float((pred == gold_t).float().mean()), "macro_f1": sum(f1s) / C, "n": len(gold)}


def generation_metrics(hypotheses: list[str], references: list[list[str]]) -> dict:
    """Corpus BLEU (sacrebleu, all references of an input together) and mean best-reference ROUGE-L F1."""
    import sacrebleu
    from rouge_score import rouge_scorer

    most = max(len(r) for r in references)
    streams = [[r[k] if k < len(r) else None for r in references] for k in range(most)]
    bleu = sacrebleu.corpus_bleu(hypotheses, streams).score
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = sum(scorer.score_multi(refs, hyp)["rougeL"].fmeasure for hyp, refs in zip(hypotheses, references))
    return {"bleu": bleu, "rouge_l": 100 * rouge / len(hypotheses), "n": len(hypotheses)}


def scalar_metrics(m: dict) -> dict:
    """The numbers of a metrics dict, without its row count `n` (intervals such as `accuracy_ci95` are left out)."""
    return {k: v for k, v in m.items() if k != "n" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def primary_metric(spec: TaskSpec) -> str:
    return "accuracy" if spec.is_classification else "bleu"


def subset(split: Split, spec: TaskSpec, limit: int | None, seed: int = 0) -> Split:
    """A fixed, seeded subset: `limit` rows (classification) or `limit` distinct inputs (generation)."""
    if limit is None:
        return split
    if spec.is_classification:
        if limit >= len(split):
            return split
        g = torch.Generator().manual_seed(seed)
        return split.subset(sorted(torch.randperm(len(split), generator=g)[:limit].tolist()))
    groups = list(OrderedDict.fromkeys(split.prompts))
    if limit >= len(groups):
        return split
    g = torch.Generator().manual_seed(seed)
    keep = {groups[i] for i in torch.randperm(len(groups), generator=g)[:limit].tolist()}
    return split.subset(i for i, p in enumerate(split.prompts) if p in keep)


def check_compatible(spec: TaskSpec, task: Task) -> None:
    """Refuse to score a prompt made for task `spec` on `task` unless it can name every class of `task`."""
    kind = {True: "classification", False: "generation"}
    if spec.is_classification != task.spec.is_classification:
        raise ConfigError(
            f"The prompt is for {kind[spec.is_classification]} task '{spec.name}', but task "
            f"'{task.name}' is {kind[task.spec.is_classification]}.",
            "evaluate the prompt on the task it was trained for (see `softprompt info`).",
        )
    missing = [c for c in task.spec.class_names if c not in spec.class_names]
    if missing:
        raise ConfigError(
            f"The prompt's classes {spec.class_names} (task '{spec.name}') lack {missing} of task '{task.name}'.",
            "evaluate the prompt on the task it was trained for (see `softprompt info`).",
        )


def evaluate(
    base,
    task: Task,
    prompt=None,
    split: str = "dev",
    limit: int | None = None,
    batch_size: int = 32,
    truncate: str = "error",
    spec: TaskSpec | None = None,
    seed: int = 0,
    progress: bool = False,
    max_length: int | None = None,
    compile: bool = True,
) -> dict:
    """Score a prompt (a `Prompt`, an `Injection`, or None for the plain template) on a task split.

    spec: the template and verbalizers to use; default the prompt's own (it was trained with
    them), else the task's. max_length: cap on positions per example (default: the model's context).
    compile: turn the prompt's virtual tokens into a KV prefix once (`Family.compile`: the same
    outputs, and no row pays for them again), where the family can.
    """
    return evaluate_rows(
        base, task, prompt, split, limit, batch_size, truncate, spec, seed, progress, max_length, compile
    )[0]


def evaluate_rows(
    base,
    task: Task,
    prompt=None,
    split: str = "dev",
    limit: int | None = None,
    batch_size: int = 32,
    truncate: str = "error",
    spec: TaskSpec | None = None,
    seed: int = 0,
    progress: bool = False,
    max_length: int | None = None,
    compile: bool = True,
) -> tuple[dict, dict]:
    """`evaluate`'s metrics, and what each row gave (for resampling rows, e.g. a bootstrap interval).

    Classification: {"predicted", "gold"}, class indices in the spec's order, one per row of the subset in its order.
    Generation: {"hypotheses", "references"}, one per distinct input (first-seen order) with all its references.
    """
    from .store import Prompt

    if isinstance(prompt, Prompt):
        spec = spec or prompt.spec
        injection = prompt.injection
    else:
        injection = prompt or EMPTY
    if compile:
        injection = base.family.compile(injection)
    spec = spec or task.spec
    check_compatible(spec, task)
    data = subset(task.split(split), task.spec, limit, seed)
    if spec.is_classification:
        scores, gold = classify(base, task, spec, data, injection, batch_size, truncate, progress, max_length)
        return classification_metrics(scores, gold), {"predicted": scores.argmax(-1).tolist(), "gold": gold}
    enc = Encoder(spec, base, truncate, max_length)
    prompts = [spec.render(r) for r in data.rows]
    refs = grouped_references(prompts, data)
    stop = stop_strings(spec, list(refs.values()))
    hyps = generate_texts(base, enc, list(refs), injection, spec.max_new_tokens, batch_size, progress, stop=stop)
    return generation_metrics(hyps, list(refs.values())), {"hypotheses": hyps, "references": list(refs.values())}


def grouped_references(prompts: list[str], data: Split) -> OrderedDict[str, list[str]]:
    """Every distinct input (rendered prompt, first-seen order) -> all its references: rows that share an input (E2E)
    pool their targets, and a row of a `references_column` task brings its whole list."""
    refs: OrderedDict[str, list[str]] = OrderedDict()
    for i, p in enumerate(prompts):
        refs.setdefault(p, []).extend([data.targets[i]] if data.references is None else data.references[i])
    return refs


def classify(
    base,
    task: Task,
    spec: TaskSpec,
    data: Split,
    injection: Injection = EMPTY,
    batch_size: int = 32,
    truncate: str = "error",
    progress: bool = False,
    max_length: int | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """Class scores (N, C) of `data` (rows of `task`) rendered with `spec`, and the gold classes in `spec`'s order."""
    gold = gold_classes(task, spec, data)
    enc = Encoder(spec, base, truncate, max_length)
    scores = class_log_likelihoods(base, enc, [spec.render(r) for r in data.rows], injection, batch_size, progress)
    return scores, gold


def gold_classes(task: Task, spec: TaskSpec, data: Split) -> list[int]:
    """The gold class of every row of `data` (indices into `task`'s label map) as an index into `spec`'s classes."""
    order = {name: i for i, name in enumerate(spec.class_names)}
    return [order[task.spec.class_names[y]] for y in data.labels]


def stop_strings(spec: TaskSpec, references: list[list[str]]) -> list[str]:
    """What ends a continuation of `spec` (besides end-of-sequence): its own `stop`, else a newline when no reference
    spans lines (a one-line target is complete at its line's end)."""
    if spec.stop is not None:
        return list(spec.stop)
    return [] if any("\n" in r for refs in references for r in refs) else ["\n"]


def generate_texts(
    base,
    enc: Encoder,
    prompts: list[str],
    injection: Injection | list[Injection],
    max_new_tokens: int,
    batch_size: int = 32,
    progress: bool = False,
    use_cache: bool = True,
    sampling: Sampling = GREEDY,
    generator: torch.Generator | None = None,
    stop: Sequence[str] = (),
) -> list[str]:
    """Continuations of rendered prompts (greedy unless `sampling` says otherwise), decoded to text, each ending
    before the first of the `stop` strings it produces."""
    rows = per_row(injection, len(prompts))
    examples = [enc.example(p, r, max_new_tokens) for p, r in zip(prompts, rows)]
    out = [""] * len(examples)
    for batch in tqdm(
        length_batches([len(e.source) for e in examples], batch_size),
        disable=not progress,
        desc="generating",
        leave=False,
    ):
        new = generate_ids(base, [examples[i] for i in batch], max_new_tokens, sampling, use_cache, generator, stop)
        for i, toks in zip(batch, new):
            out[i] = cut_at_stop(base.tokenizer.decode(toks, skip_special_tokens=True), stop).strip()
    return out
