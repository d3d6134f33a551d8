"""A cell's dev metrics with what every dev row contributed, so that the report can resample rows.

The same computation as `softprompt.evaluate.evaluate` on an injection (the same subset, batches and
metric functions, so the metric is bit-identical; a test holds them equal), keeping per row:

- classification: `correct`, one character 0/1 per dev row in dev-row order, and `gold`, the rows'
  gold class indices (space-separated; their most frequent class is the chance level);
- generation: `bleu_stats`, per distinct input (first-seen order) sacrebleu's sufficient statistics
  "hyp_len ref_len correct_1..4 total_1..4": summed over any subset of inputs they give that subset's
  corpus BLEU (`bleu_of`), which is how a bootstrap resamples BLEU.
"""

from __future__ import annotations

from ..data import Encoder, Task, TaskSpec
from ..evaluate import (
    check_compatible,
    classification_metrics,
    classify,
    generate_texts,
    generation_metrics,
    grouped_references,
    stop_strings,
    subset,
)
from ..injection import EMPTY, Injection

ORDER = 4  # BLEU's n-gram orders: statistics are 2 + 2 * ORDER numbers per input


def dev_outcomes(
    base,
    task: Task,
    injection: Injection | None = None,
    *,
    split: str = "dev",
    limit: int | None = None,
    batch_size: int = 32,
    truncate: str = "error",
    spec: TaskSpec | None = None,
    seed: int = 0,
    max_length: int | None = None,
) -> tuple[dict, dict]:
    """(metrics as `evaluate` returns them, per-row outcomes) of an injection (None: the plain template)."""
    injection = base.family.compile(injection or EMPTY)
    spec = spec or task.spec
    check_compatible(spec, task)
    data = subset(task.split(split), task.spec, limit, seed)
    if spec.is_classification:
        scores, gold = classify(base, task, spec, data, injection, batch_size, truncate, False, max_length)
        pred = scores.argmax(-1).tolist()
        correct = "".join("1" if p == g else "0" for p, g in zip(pred, gold))
        rows = {"correct": correct, "gold": " ".join(map(str, gold))}
        return classification_metrics(scores, gold), rows
    enc = Encoder(spec, base, truncate, max_length)
    refs = grouped_references([spec.render(r) for r in data.rows], data)
    stop = stop_strings(spec, list(refs.values()))
    hyps = generate_texts(base, enc, list(refs), injection, spec.max_new_tokens, batch_size, False, stop=stop)
    return generation_metrics(hyps, list(refs.values())), {"bleu_stats": bleu_statistics(hyps, list(refs.values()))}


def bleu_statistics(hypotheses: list[str], references: list[list[str]]) -> list[str]:
    """Per hypothesis, sacrebleu's statistics against all its references, as "hyp_len ref_len c1..c4 t1..t4"."""
    from sacrebleu.metrics import BLEU

    bleu = BLEU(effective_order=True)  # counts are the same either way; this keeps sacrebleu's sentence warning off
    out = []
    for hyp, refs in zip(hypotheses, references):
        s = bleu.sentence_score(hyp, refs)
        out.append(" ".join(map(str, [s.sys_len, s.ref_len, *s.counts, *s.totals])))
    return out


def bleu_of(stats) -> float:
    """Corpus BLEU from summed statistics (10 numbers), as `sacrebleu.corpus_bleu` computes it (exp smoothing)."""
    from sacrebleu.metrics import BLEU

    stats = [int(x) for x in stats]
    return BLEU.compute_bleu(
        correct=stats[2 : 2 + ORDER],
        total=stats[2 + ORDER :],
        sys_len=stats[0],
        ref_len=stats[1],
        smooth_method="exp",
    ).score
