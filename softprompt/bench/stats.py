"""Bootstrap intervals for the benchmark report (numpy; seeded, so a report is the same twice).

A cell's number is the mean of its metric over training seeds, and both the seeds and the dev rows
are samples. The interval is a two-level (hierarchical) bootstrap: a resample draws K seeds with
replacement from the K seeds, and for each drawn seed its N dev rows with replacement, scores that
seed's metric on the drawn rows (accuracy: the mean; BLEU: corpus BLEU of the summed statistics)
and averages over the drawn seeds; the 95% interval is the 2.5 and 97.5 percentiles of 2,000 such
resamples (Davison & Hinkley 1997, sec. 3.8: resampling both stages).

Records written before per-row outcomes were kept have only their metric: their interval resamples
seeds alone (`over == "seeds"`), which says nothing about the dev rows and, with two seeds, spans
about their range.

A paired difference (softprompt against PEFT) takes the seeds both sides ran; a resample draws seeds,
and for each drawn seed one set of row indices that scores both sides, so that the dev rows and the
seed (the same data order and initial prompt) are shared, as they were in training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .outcomes import bleu_of

RESAMPLES = 2000
SEED = 0  # of the bootstrap's generator
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A mean (in the metric's units) and its bootstrap interval; lo/hi None where there is nothing to resample."""

    mean: float
    lo: float | None
    hi: float | None
    over: str  # "seeds and rows", "rows" (one seed), "seeds" (records without rows) or "none" (one seed, no rows)
    seeds: int

    def separates(self, other: Interval) -> bool:
        """The two intervals do not overlap."""
        if None in (self.lo, self.hi, other.lo, other.hi):
            return False
        return self.hi < other.lo or other.hi < self.lo

    @property
    def excludes_zero(self) -> bool:
        return self.lo is not None and (self.lo > 0 or self.hi < 0)


def rows_of(record: dict) -> np.ndarray | None:
    """A record's per-row outcomes: (N,) 0/1 correct (classification) or (N, 10) BLEU statistics; None if absent."""
    rows = record.get("rows")
    if not rows:
        return None
    if "correct" in rows:
        return np.frombuffer(rows["correct"].encode(), dtype=np.uint8) - ord("0")
    return np.array([[int(x) for x in s.split()] for s in rows["bleu_stats"]], dtype=np.int64)


def chance(record: dict) -> float | None:
    """The majority-class share of a classification record's dev rows (what a constant answer scores)."""
    gold = (record.get("rows") or {}).get("gold")
    if not gold:
        return None
    counts = np.bincount(np.array(gold.split(), dtype=np.int64))
    return float(counts.max() / counts.sum())


def score(rows: np.ndarray) -> np.ndarray:
    """The metric of every resample: rows (R, N) 0/1 -> (R,) accuracy; (R, N, 10) statistics -> (R,) corpus BLEU."""
    if rows.ndim == 2:
        return rows.mean(axis=1)
    return np.array([bleu_of(s) for s in rows.sum(axis=1)])


def _draws(k: int, rng: np.random.Generator, resamples: int) -> np.ndarray:
    return rng.integers(k, size=(resamples, k))  # (B, K): the seeds of every resample


def _per_seed(arms: list[list[np.ndarray]], picks: np.ndarray, rng, combine) -> np.ndarray:
    """(B, K) values: for every drawn seed, one row resample scored on every arm (shared indices), combined."""
    out = np.empty(picks.shape)
    for k in range(len(arms[0])):
        where = picks == k
        count = int(where.sum())
        if not count:
            continue
        n = len(arms[0][k])
        idx = rng.integers(n, size=(count, n))  # one row resample per draw of seed k
        out[where] = combine(*(score(arm[k][idx]) for arm in arms))
    return out


def _interval(values: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(values, [50 * (1 - LEVEL), 100 - 50 * (1 - LEVEL)])
    return float(lo), float(hi)


def cell_interval(
    values: list[float], rows: list[np.ndarray | None], resamples: int = RESAMPLES, seed: int = SEED
) -> Interval:
    """Mean of `values` (one per seed) and its interval: over seeds and rows when every seed has rows, else seeds."""
    mean, k = float(np.mean(values)), len(values)
    rng = np.random.default_rng(seed)
    picks = _draws(k, rng, resamples)
    if all(r is not None for r in rows):
        boot = _per_seed([rows], picks, rng, lambda a: a).mean(axis=1)
        return Interval(mean, *_interval(boot), "seeds and rows" if k > 1 else "rows", k)
    if k == 1:
        return Interval(mean, None, None, "none", 1)
    return Interval(mean, *_interval(np.asarray(values)[picks].mean(axis=1)), "seeds", k)


def paired_difference(
    ours: dict[int, tuple[float, np.ndarray | None]],
    theirs: dict[int, tuple[float, np.ndarray | None]],
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> Interval | None:
    """ours - theirs over the seeds both have ({seed: (metric, rows)}); None without a common seed."""
    common = sorted(set(ours) & set(theirs))
    if not common:
        return None
    diffs = [ours[s][0] - theirs[s][0] for s in common]
    a, b = [ours[s][1] for s in common], [theirs[s][1] for s in common]
    mean, k = float(np.mean(diffs)), len(common)
    rng = np.random.default_rng(seed)
    picks = _draws(k, rng, resamples)
    if all(r is not None for r in a + b) and all(len(x) == len(y) for x, y in zip(a, b)):
        boot = _per_seed([a, b], picks, rng, lambda x, y: x - y).mean(axis=1)
        return Interval(mean, *_interval(boot), "seeds and rows" if k > 1 else "rows", k)
    if k == 1:
        return Interval(mean, None, None, "none", 1)
    return Interval(mean, *_interval(np.asarray(diffs)[picks].mean(axis=1)), "seeds", k)
