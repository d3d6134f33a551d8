"""Template search: candidate templates x candidate label words (verbalizers), from a YAML file.

Scored by rank classification, the same code (`evaluate.classify`) that scores every method.
All candidate words of a template are scored in one pass; since a class's score depends only on
its own word, every template x verbalizer combination is then read off the (N, W) matrix.
The task's own template with its own words is always in the ranking, so the search keeps it unless
a candidate beats it on the search rows: searching cannot make the prompt worse there.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from ..data import BUILTIN_DIR, Encoder, Split, Task, TaskSpec
from ..errors import ConfigError
from ..evaluate import class_log_likelihoods
from ..injection import EMPTY
from .common import dev_split, score_spec, scored_metrics, search_split, with_template

CANDIDATES_DIR = BUILTIN_DIR / "candidates"
MAX_COMBINATIONS = 100_000


# --- template and verbalizer scoring ------------------------------------------------------------------------------


@dataclass
class Candidates:
    """Templates, and per class the candidate label words (the task's own word is always among them).

    File format (YAML), e.g. `softprompt/tasks/candidates/sst2.yaml`:
        templates: ["Review: {sentence}\\nSentiment:", "{sentence} It was", ...]
        labels: {0: [negative, bad, terrible], 1: [positive, good, great]}   # optional
    """

    templates: list[str]
    words: list[list[str]]  # per class, in the task's class order; [0] is the task's own word

    @staticmethod
    def builtin_path(spec: TaskSpec) -> Path | None:
        """The task's built-in candidates file (`tasks/candidates/NAME.yaml`), or None if it has none."""
        path = CANDIDATES_DIR / f"{spec.name}.yaml"
        return path if path.exists() else None

    @classmethod
    def load(cls, path: str | Path | None, spec: TaskSpec) -> Candidates:
        """From a YAML file; None = the built-in candidates of the task (`tasks/candidates/NAME.yaml`)."""
        if path is None:
            path = cls.builtin_path(spec)
            if path is None:
                raise ConfigError(
                    f"Task '{spec.name}' has no built-in candidate templates.",
                    "pass --candidates FILE (a YAML list of `templates:`, optional `labels:`).",
                )
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Candidates file not found: {path}", "pass an existing YAML file to --candidates.")
        try:
            d = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"Candidates file {path} is not valid YAML: {e}", "fix its syntax.") from e
        if not isinstance(d, dict) or not isinstance(d.get("templates"), list) or not d["templates"]:
            raise ConfigError(f"Candidates file {path} lists no `templates:`.", "add a YAML list of templates.")
        labels = {str(k): v for k, v in (d.get("labels") or {}).items()}
        unknown = sorted(set(labels) - set(spec.class_names))
        if unknown:
            raise ConfigError(
                f"Candidates file {path} has words for unknown classes {unknown}.",
                f"key `labels:` by the task's classes {spec.class_names}.",
            )
        words = []
        for name, own in spec.labels.items():
            given = labels.get(name, [])
            if isinstance(given, str) or not all(isinstance(w, (str, int, float)) for w in given):
                raise ConfigError(
                    f"Candidates file {path}: words of class {name!r} must be a list.",
                    f"write `{name}: [word1, word2]`.",
                )
            words.append(list(dict.fromkeys([own, *map(str, given)])))
        for t in d["templates"]:
            if not isinstance(t, str):
                raise ConfigError(f"Candidates file {path}: template {t!r} is not a string.", "quote every template.")
            with_template(spec, t)  # raises a ConfigError naming a malformed template
        return cls([str(t) for t in d["templates"]], words)

    @property
    def num_combinations(self) -> int:
        n = len(self.templates)
        for w in self.words:
            n *= len(w)
        return n


@dataclass
class Scored:
    """One template with its best label words: search-split metrics, and dev metrics for finalists.

    own: the task's own template with its own label words, which every ranking holds (so a search can only keep it
    or find better on the search rows).
    """

    spec: TaskSpec
    search: dict
    dev: dict | None = None
    own: bool = False


def best_verbalizers(scores: torch.Tensor, gold: list[int], options: list[list[int]]) -> tuple[list[int], float]:
    """The column of each class (one of `options[c]`) that maximizes accuracy; ties keep the earlier option.

    scores: (N, W) log-likelihood of every candidate word. Returns (columns per class, accuracy).
    """
    combos = torch.tensor(list(itertools.product(*options)))  # (M, C)
    distinct = torch.tensor([len(set(c)) == len(c) for c in combos.tolist()])  # a word may serve one class only
    pred = scores[:, combos].argmax(-1)  # (N, M) predicted class
    acc = (pred == torch.tensor(gold)[:, None]).float().mean(0).masked_fill(~distinct, -1)  # (M,)
    best = int(acc.argmax())  # first maximum
    return combos[best].tolist(), float(acc[best])


def rank_templates(
    base,
    task: Task,
    candidates: Candidates,
    search_size: int = 256,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = True,
    min_words: int = 0,
    truncate: str = "error",
    max_length: int | None = None,
) -> tuple[list[Scored], Split]:
    """Every template with its best label words, and the task's own template with its own words (`own`), scored on
    the search split (carved from train), best first; the task's own ranks first among equals.

    Returns the ranking and the search split. Nothing here looks at dev.
    """
    if candidates.num_combinations > MAX_COMBINATIONS:
        raise ConfigError(
            f"{candidates.num_combinations:,} template x verbalizer combinations are too many to score.",
            f"list fewer templates or words (at most {MAX_COMBINATIONS:,} combinations).",
        )
    data = search_split(task, search_size, seed, min_words)
    pool = list(dict.fromkeys(w for ws in candidates.words for w in ws))  # every distinct word, once
    options = [[pool.index(w) for w in ws] for ws in candidates.words]
    gold = data.labels  # indices in the task's class order, which `words` follows
    own = task.spec.template
    results = []
    for template in tqdm(list(dict.fromkeys([own, *candidates.templates])), desc="templates", disable=not progress):
        # one "class" per candidate word: (N, W) scores from a single pass (one forward per row when words are 1 token)
        pooled = dataclasses.replace(task.spec, template=template, labels={str(i): w for i, w in enumerate(pool)})
        enc = Encoder(pooled, base, truncate, max_length)
        scores = class_log_likelihoods(base, enc, [pooled.render(r) for r in data.rows], EMPTY, batch_size)
        if template == own:  # the task's own words are each class's first option
            results.append(Scored(task.spec, scored_metrics(scores[:, [o[0] for o in options]], gold, seed), own=True))
            if own not in candidates.templates:
                continue
        cols, _ = best_verbalizers(scores, gold, options)
        spec = with_template(task.spec, template, [pool[c] for c in cols])
        if spec != task.spec:  # the own template with the own words is ranked once, as the task's own
            results.append(Scored(spec, scored_metrics(scores[:, cols], gold, seed)))
    results.sort(key=lambda s: -s.search["accuracy"])  # stable: ties keep the task's own first, then the file's order
    return results, data


def score_templates(
    base,
    task: Task,
    candidates: Candidates,
    search_size: int = 256,
    finalists: int = 3,
    split: str = "dev",
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = True,
    min_words: int = 0,
    truncate: str = "error",
    max_length: int | None = None,
) -> tuple[list[Scored], Scored]:
    """Rank templates (each with its best label words) and the task's own on the search split; score the top
    `finalists` and the task's own on dev.

    Returns (the ranking, best first: its first entry is the result, the task's own or a better one), and the task's
    own entry of it (search and dev metrics).
    """
    if finalists < 1:
        raise ConfigError(f"finalists must be >= 1, got {finalists}.", "pass --finalists 1 or more.")
    results, _ = rank_templates(
        base, task, candidates, search_size, seed, batch_size, progress, min_words, truncate, max_length
    )
    dev = dev_split(task, split, limit, seed)
    own = next(s for s in results if s.own)
    scored = results[:finalists] + ([] if any(s is own for s in results[:finalists]) else [own])
    for s in scored:
        s.dev = score_spec(
            base, task, s.spec, dev, batch_size=batch_size, progress=progress, truncate=truncate, max_length=max_length
        )
    return results, own
