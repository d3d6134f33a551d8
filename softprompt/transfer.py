"""Which trained prompt to transfer from: SPoT's retrieval step.

Vu, Lester, Constant, Al-Rfou & Cer 2022, "SPoT: Better Frozen Model Adaptation through Soft Prompt
Transfer" (ACL 2022; arXiv:2110.07904), section 5: a task is represented by a prompt trained on it
(briefly is enough), and the source tasks whose prompts are most similar to it are the ones to
transfer from (`--init prompt --init-prompt SOURCE`). Two of the paper's similarity measures:

- average: the cosine similarity of the two prompts' average tokens (SPoT's best predictor);
- per-token: the average cosine similarity over every pair of tokens, one from each prompt.

A prompt's tokens are its embeddings (P, D), for a KV prefix each position's keys and values in
every layer, flattened (P, L * 2 * H_kv * hd), and for LLaMA-Adapter each slot's prompt in every
adapted layer (K, L * D). Only prompts of one base model and one kind
compare: another model's vectors live in another space.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import ConfigError
from .injection import Injection
from .store import Prompt

METRICS = ("average", "per-token")


def token_vectors(injection: Injection) -> torch.Tensor:
    """(P, F) one vector per virtual token: embeddings (P, D), a KV prefix's (L, 2, H_kv, P, hd) per position, or
    adaption prompts' (L, K, D) per slot."""
    kinds = injection.kinds
    if kinds == {"embeds"}:
        return injection.embeds.float()
    if kinds == {"kv"}:
        kv = injection.kv.float()
        return kv.permute(3, 0, 1, 2, 4).reshape(kv.shape[3], -1)  # (P, L*2*H_kv*hd)
    if kinds == {"adapter"}:
        a = injection.adapter.float()
        return a.permute(1, 0, 2).reshape(a.shape[1], -1)  # (K, L*D)
    raise ConfigError(
        "Only a prompt of one kind (embeddings, keys/values or adaption prompts) has tokens to compare.",
        "compare soft, P-tuning, deep, prefix or llama-adapter prompts (not hard prompts).",
    )


def similarity(a: Injection, b: Injection, metric: str = "average") -> float:
    """SPoT's cosine similarity of two prompts of one kind and width (`metric`: average | per-token)."""
    if metric not in METRICS:
        raise ConfigError(f"Unknown similarity metric '{metric}'.", f"use one of {list(METRICS)} (--metric).")
    x, y = token_vectors(a), token_vectors(b)  # (P_a, F), (P_b, F)
    if x.shape[1] != y.shape[1]:
        raise ConfigError(
            f"The prompts' tokens have different widths ({x.shape[1]} and {y.shape[1]}).",
            "compare prompts of one base model and one kind: embeddings with embeddings, keys/values with keys/values.",
        )
    if metric == "average":
        return float(F.cosine_similarity(x.mean(0), y.mean(0), dim=0))
    return float((F.normalize(x, dim=1) @ F.normalize(y, dim=1).T).mean())  # mean over the (P_a, P_b) pairs


@dataclass
class Ranking:
    """Sources ranked for a target: `ranked` [(name, similarity)], best first; `skipped` {name: why}."""

    ranked: list[tuple[str, float]]
    skipped: dict[str, str]


def rank_sources(target: Prompt, sources: dict[str, Prompt], metric: str = "average") -> Ranking:
    """Rank `sources` by `similarity` to `target`; those of another base model or kind are skipped, with why."""
    want = (target.base["config_hash"], target.base["embedding_sha256"])
    kinds = target.injection.kinds
    token_vectors(target.injection)  # a hard target is refused before anything is ranked
    ranked, skipped = [], {}
    for name, source in sources.items():
        if (source.base["config_hash"], source.base["embedding_sha256"]) != want:
            skipped[name] = f"made for another base model ({source.base['model_id']})"
        elif source.injection.kinds != kinds:
            have = "+".join(sorted(source.injection.kinds)) or "no tensors (a hard prompt)"
            skipped[name] = f"holds {have}, the target {'+'.join(sorted(kinds))}"
        else:
            ranked.append((name, similarity(target.injection, source.injection, metric)))
    return Ranking(sorted(ranked, key=lambda r: -r[1]), skipped)
