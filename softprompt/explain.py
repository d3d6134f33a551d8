"""Soft to hard: read a trained soft prompt back as vocabulary tokens, and score that reading.

Each virtual token (a row of the prompt's embeddings (P, D)) is mapped to its nearest rows of the
model's input embedding matrix (V, D), by cosine similarity and by L2 distance. The sequence of
nearest tokens is a hard prompt in the same position (before the text); scoring it next to the
soft prompt shows how much the continuous prompt gains over its nearest discrete neighbour.
Khashabi et al. 2022, "Prompt Waywardness: The Curious Case of Discretized Interpretation of
Continuous Prompts" (arXiv:2112.08348), find that the projection says little about what the soft
prompt does: it can read as anything while solving the task.
"""

from __future__ import annotations

import torch

from .errors import ConfigError
from .injection import Injection
from .store import Prompt

METRICS = ("cosine", "l2")


@torch.no_grad()
def nearest_tokens(embeds: torch.Tensor, matrix: torch.Tensor, k: int = 5) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """For each of P vectors, the k nearest rows of `matrix` (V, D): {metric: (ids (P, k), values (P, k))}.

    cosine: highest similarity first; l2: smallest distance first.
    """
    x, m = embeds.float(), matrix.float()  # (P, D), (V, D)
    cos = torch.nn.functional.normalize(x, dim=-1) @ torch.nn.functional.normalize(m, dim=-1).T  # (P, V)
    dist = torch.cdist(x, m)  # (P, V)
    c = cos.topk(k, dim=-1)
    d = dist.topk(k, dim=-1, largest=False)
    return {"cosine": (c.indices, c.values), "l2": (d.indices, d.values)}


def projection(base, ids: torch.Tensor) -> Injection:
    """The hard prompt `ids` (P,) in the soft prompt's place: its tokens' embeddings before the text."""
    return Injection(embeds=base.embed(ids.to(base.device)).detach())


def explain(base, prompt: Prompt, task=None, split: str = "dev", limit: int | None = None, k: int = 5,
            batch_size: int = 32, progress: bool = False) -> dict:
    """Nearest tokens of every virtual token; with a task, dev scores of the soft prompt and its projections."""
    from .evaluate import evaluate

    inj = prompt.injection
    if inj.embeds is None or inj.kv is not None:
        raise ConfigError(f"A '{prompt.method}' prompt has no input-embedding virtual tokens to read as words "
                          "(or also carries per-layer key/values).", "pass a soft prompt (or P-tuning) file.")
    near = nearest_tokens(inj.embeds.to(base.device), base.embedding_matrix, k)
    tok = base.tokenizer
    out = {"tokens": [{metric: [(tok.decode([int(i)]), round(float(v), 4)) for i, v in zip(ids[p], vals[p])]
                       for metric, (ids, vals) in near.items()} for p in range(inj.num_embeds)],
           "projected": {metric: tok.decode(ids[:, 0].tolist()) for metric, (ids, _) in near.items()},
           "projected_ids": {metric: ids[:, 0].tolist() for metric, (ids, _) in near.items()}}
    if task is not None:
        kw = dict(split=split, limit=limit, batch_size=batch_size, spec=prompt.spec, progress=progress)
        out["scores"] = {"soft": evaluate(base, task, inj, **kw)}
        for metric, (ids, _) in near.items():
            out["scores"][f"projected ({metric})"] = evaluate(base, task, projection(base, ids[:, 0]), **kw)
    return out


# --- command line -------------------------------------------------------------------------------------------------

def cmd_explain(ns) -> None:
    import json

    from rich.table import Table

    from .cli import _console, _fmt_metrics, _load_base
    from .data import load_task
    from .store import load_prompt

    base = _load_base(ns)
    prompt = load_prompt(ns.file, base)
    task = None if ns.no_score else load_task(ns.task or prompt.task["name"], ns.data_dir)
    out = explain(base, prompt, task, ns.split, ns.limit, ns.top_k, ns.batch_size, progress=True)
    if ns.json:
        print(json.dumps(out))
        return
    t = Table(title=f"{ns.file}: nearest vocabulary tokens of each virtual token")
    for col in ("#", "by cosine (similarity)", "by L2 (distance)"):
        t.add_column(col)
    for p, row in enumerate(out["tokens"]):
        t.add_row(str(p), *(", ".join(f"{w!r} {v:.2f}" for w, v in row[m]) for m in METRICS))
    c = _console()
    c.print(t)
    for metric in METRICS:
        c.print(f"projected ({metric}): {out['projected'][metric]!r}")
    for name, m in out.get("scores", {}).items():
        c.print(f"{ns.split} {name}: {_fmt_metrics(m)} (n={m['n']})")


def add_commands(sub) -> None:
    from .cli import add_model_options

    e = sub.add_parser("explain", help="read a soft prompt as its nearest vocabulary tokens and score that hard prompt",
                       description="Map each virtual token of a soft prompt to its nearest vocabulary tokens (cosine "
                                   "and L2), and score the projected hard prompt next to the soft prompt.")
    e.add_argument("file", help="prompt file (.safetensors) with virtual-token embeddings")
    e.add_argument("--task", help="task to score on (default: the prompt's own task, as a built-in task)")
    e.add_argument("--data-dir", default=None, help="folder with the task's data files")
    add_model_options(e)
    e.add_argument("--top-k", type=int, default=5, help="nearest tokens listed per virtual token")
    e.add_argument("--split", default="dev", help="split to score on")
    e.add_argument("--limit", type=int, default=None, help="score a fixed random subset of the split")
    e.add_argument("--batch-size", type=int, default=32, help="evaluation batch size")
    e.add_argument("--no-score", action="store_true", help="only list the nearest tokens")
    e.add_argument("--json", action="store_true", help="print JSON")
    e.set_defaults(handler=cmd_explain)
