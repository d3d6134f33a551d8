"""A cell's dev metrics with what every dev row contributed, so that the report can resample rows.

`softprompt.evaluate.evaluate_rows` (the computation of `evaluate`, so the metric is bit-identical; a
test holds them equal), with its rows kept as:

- classification: `correct`, one character 0/1 per dev row in dev-row order, and `gold`, the rows'
  gold class indices (space-separated; their most frequent class is the chance level);
- generation: `bleu_stats`, per distinct input (first-seen order) sacrebleu's sufficient statistics
  "hyp_len ref_len correct_1..4 total_1..4": summed over any subset of inputs they give that subset's
  corpus BLEU (`bleu_of`), which is how a bootstrap resamples BLEU.
"""

from __future__ import annotations

from ..data import Task
from ..evaluate import evaluate_rows
from ..injection import Injection

ORDER = 4  # BLEU's n-gram orders: statistics are 2 + 2 * ORDER numbers per input


def dev_outcomes(base, task: Task, injection: Injection | None = None, **options) -> tuple[dict, dict]:
    """(metrics as `evaluate` returns them, per-row outcomes) of an injection (None: the plain template); `options`
    are `evaluate`'s."""
    metrics, rows = evaluate_rows(base, task, injection, **options)
    if "gold" in rows:
        correct = "".join("1" if p == g else "0" for p, g in zip(rows["predicted"], rows["gold"]))
        return metrics, {"correct": correct, "gold": " ".join(map(str, rows["gold"]))}
    return metrics, {"bleu_stats": bleu_statistics(rows["hypotheses"], rows["references"])}


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
