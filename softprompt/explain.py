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
def nearest_tokens(
    embeds: torch.Tensor, matrix: torch.Tensor, k: int = 5
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
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


def explain(
    base,
    prompt: Prompt,
    task=None,
    split: str = "dev",
    limit: int | None = None,
    k: int = 5,
    batch_size: int = 32,
    progress: bool = False,
    truncate: str = "error",
    max_length: int | None = None,
) -> dict:
    """Nearest tokens of every virtual token; with a task, dev scores of the soft prompt and its projections."""
    from .evaluate import evaluate

    inj = prompt.injection
    if inj.embeds is None or inj.kv is not None:
        raise ConfigError(
            f"A '{prompt.method}' prompt has no input-embedding virtual tokens to read as words "
            "(or also carries per-layer key/values).",
            "pass a soft prompt (or P-tuning) file.",
        )
    near = nearest_tokens(inj.embeds.to(base.device), base.full_embedding_matrix().to(base.device), k)
    tok = base.tokenizer
    out = {
        "tokens": [
            {
                metric: [(tok.decode([int(i)]), round(float(v), 4)) for i, v in zip(ids[p], vals[p])]
                for metric, (ids, vals) in near.items()
            }
            for p in range(inj.num_embeds)
        ],
        "projected": {metric: tok.decode(ids[:, 0].tolist()) for metric, (ids, _) in near.items()},
        "projected_ids": {metric: ids[:, 0].tolist() for metric, (ids, _) in near.items()},
    }
    if task is not None:
        kw = dict(split=split, limit=limit, batch_size=batch_size, spec=prompt.spec, progress=progress)
        kw |= dict(truncate=truncate, max_length=max_length)
        out["scores"] = {"soft": evaluate(base, task, inj, **kw)}
        for metric, (ids, _) in near.items():
            out["scores"][f"projected ({metric})"] = evaluate(base, task, projection(base, ids[:, 0]), **kw)
    return out
