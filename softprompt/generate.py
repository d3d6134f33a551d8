"""Batched, left-padded decoding with a KV cache, for any mix of prompts in one batch.

We run our own decode loop over the model's forward instead of `model.generate`: the prompt's
key/value prefix must sit in the cache, the attention mask must cover it, and position ids must
continue from each row's own count. The loop passes those explicitly, so cached and uncached
decoding give the same tokens (PEFT on transformers 5.x silently loses the prefix in `generate`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .data import collate
from .errors import ConfigError, InputTooLongError
from .inject import Injection, _per_row, assemble, forward, run


@dataclass(frozen=True)
class Sampling:
    """Decoding settings of one request. temperature 0 means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ConfigError(f"Invalid sampling settings {self}.", "use temperature >= 0, 0 < top_p <= 1, top_k >= 0.")


GREEDY = Sampling()


def sample_next(logits: torch.Tensor, settings: list[Sampling], generator: torch.Generator | None) -> torch.Tensor:
    """Pick the next token of each row (B, V) -> (B,), each row with its own settings.

    transformers' logits warpers take one setting per batch; a mixed batch carries one per request.
    """
    greedy = logits.argmax(-1)
    if all(s.temperature == 0 for s in settings):
        return greedy
    dev = logits.device
    temp = torch.tensor([max(s.temperature, 1e-6) if s.temperature else 1.0 for s in settings], device=dev)[:, None]
    top_p = torch.tensor([s.top_p for s in settings], device=dev)[:, None]
    V = logits.shape[-1]
    top_k = torch.tensor([min(s.top_k, V) or V for s in settings], device=dev)[:, None]  # any int a request sends
    logits = logits.float()
    # shifted so that the best token scores 0 and the others less: dividing by a tiny temperature gives -inf at
    # worst, never inf (whose softmax is nan)
    scaled = (logits - logits.amax(-1, keepdim=True)) / temp
    sorted_logits, order = scaled.sort(-1, descending=True)  # (B, V)
    probs = sorted_logits.softmax(-1)
    rank = torch.arange(V, device=dev)[None, :]
    # keep the top-k, and the smallest prefix whose probability mass reaches top_p; always the first token, even for
    # a top_p that rounds to 0 in float32 (a request may send 5e-324)
    keep = (rank < top_k) & (((probs.cumsum(-1) - probs) < top_p) | (rank == 0))
    probs = torch.where(keep, probs, torch.zeros_like(probs))
    choice = torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=generator)  # (B, 1)
    sampled = order.gather(-1, choice)[:, 0]
    is_greedy = torch.tensor([s.temperature == 0 for s in settings], device=dev)
    return torch.where(is_greedy, greedy, sampled)


def stop_ids(base) -> set[int]:
    ids = {base.tokenizer.eos_token_id}
    gen_eos = getattr(getattr(base.model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return {i for i in ids if i is not None}


@torch.inference_mode()
def decode(base, prompt_ids: list[list[int]], injections: Injection | list[Injection],
           max_new_tokens: int | list[int], sampling: Sampling | list[Sampling] = GREEDY, use_cache: bool = True,
           generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (next tokens (B,), active (B,)) once per step; a row is inactive after its EOS or length limit.

    prompt_ids: token ids per row (not padded). injections: one for all rows or one per row.
    With use_cache=False every step re-runs the whole sequence (slow; a reference for tests).
    """
    B = len(prompt_ids)
    if not all(prompt_ids):
        raise ConfigError("An input to generate from has no tokens.", "pass at least one token per row.")
    rows = _per_row(injections, B)
    settings = [sampling] * B if isinstance(sampling, Sampling) else list(sampling)
    limits = torch.tensor([max_new_tokens] * B if isinstance(max_new_tokens, int) else list(max_new_tokens))
    context = base.max_positions
    if context is not None:
        need = max(len(p) + r.num_positions + int(n) for p, r, n in zip(prompt_ids, rows, limits))
        if need > context:
            raise InputTooLongError(f"Prompt, virtual tokens and max_new_tokens need {need} positions; the model has "
                                    f"{context}.", "shorten the input or lower max_tokens.")
    dev = base.device
    batch = collate(prompt_ids, base.tokenizer.pad_token_id)
    ids, attn = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
    inputs = assemble(base, ids, attn, rows)
    logits, cache = forward(base, inputs, logits_to_keep=1, for_decoding=use_cache)
    mask, pos = inputs.attention_mask, inputs.position_ids[:, -1]  # (B, K + S), (B,)
    eos = torch.tensor(sorted(stop_ids(base)), device=dev)
    active = torch.ones(B, dtype=torch.bool, device=dev)
    limits = limits.to(dev)
    pad = base.tokenizer.pad_token_id
    for step in range(int(limits.max())):
        nxt = sample_next(logits[:, -1], settings, generator)
        nxt = torch.where(active, nxt, torch.full_like(nxt, pad))
        yield nxt, active.clone()
        active &= ~torch.isin(nxt, eos) & (limits > step + 1)
        if not active.any():
            return
        ones = mask.new_ones(B, 1)
        mask, pos = torch.cat([mask, ones], 1), pos + 1
        if use_cache:
            logits, cache = run(base, base.embed(nxt[:, None]), mask, pos[:, None], cache, logits_to_keep=1,
                                use_cache=True)
        else:
            ids, attn = torch.cat([ids, nxt[:, None]], 1), torch.cat([attn, ones], 1)
            logits, _ = forward(base, assemble(base, ids, attn, rows), logits_to_keep=1)


def generate_ids(base, prompt_ids: list[list[int]], injections: Injection | list[Injection],
                 max_new_tokens: int | list[int] = 64, sampling: Sampling | list[Sampling] = GREEDY,
                 use_cache: bool = True, generator: torch.Generator | None = None) -> list[list[int]]:
    """New token ids per row, without the EOS token."""
    out: list[list[int]] = [[] for _ in prompt_ids]
    eos = stop_ids(base)
    for nxt, active in decode(base, prompt_ids, injections, max_new_tokens, sampling, use_cache, generator):
        for i in active.nonzero()[:, 0].tolist():
            if int(nxt[i]) not in eos:
                out[i].append(int(nxt[i]))
    return out
