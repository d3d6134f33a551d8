"""What a prompt method hands over: virtual-token embeddings, per-layer key/value prefixes, gated adaption prompts.

Methods never touch the base model. Families (`softprompt.families`) never know which method made
an injection: they place its tensors, whatever their source. The KV prefix covers the attention
layers that the base model's family feeds keys and values to (a causal LM's attention layers, a
seq2seq model's decoder self-attention, an encoder's self-attention); its layout is the family's
`KVLayout`. Adaption prompts (LLaMA-Adapter) go into the last attention layers of a causal LM, as
hidden states that each layer projects with its own key/value projections.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KINDS = ("embeds", "kv", "adapter")  # what an injection can fill
TENSORS = ("embeds", "kv", "adapter", "gate")  # its tensors (`gate` belongs to `adapter`)


@dataclass(frozen=True, eq=False)  # a value handed around, compared by identity (rows sharing one prompt)
class Injection:
    """What a prompt method hands the model family.

    embeds: (P_e, D) virtual-token embeddings placed before the text.
    kv: (L, 2, H_kv, P_kv, head_dim) keys ([:, 0]) and values ([:, 1]) prepended in each of the L
        attention layers that take a prefix.
    kv_positions: how many positions the KV prefix occupies before the text: P_kv for prefix
        tuning (the text starts at position P_kv, as in PEFT) and for a soft prompt compiled to
        keys/values (whose keys carry the rotary phases of positions 0..P-1).
    """

    embeds: torch.Tensor | None = None
    kv: torch.Tensor | None = None
    kv_positions: int = 0
    adapter: torch.Tensor | None = None
    gate: torch.Tensor | None = None

    @property
    def num_embeds(self) -> int:
        return 0 if self.embeds is None else self.embeds.shape[0]

    @property
    def num_kv(self) -> int:
        return 0 if self.kv is None else self.kv.shape[3]

    @property
    def num_positions(self) -> int:
        """Positions the prompt takes before the text's first token."""
        return self.kv_positions + self.num_embeds

    @property
    def num_adapter_layers(self) -> int:
        return 0 if self.adapter is None else self.adapter.shape[0]

    @property
    def kinds(self) -> frozenset[str]:
        """What this injection fills: a subset of {"embeds", "kv", "adapter"}."""
        return frozenset(k for k in KINDS if getattr(self, k) is not None)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The collapsed tensors, as stored in a prompt file."""
        return {k: getattr(self, k) for k in TENSORS if getattr(self, k) is not None}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], kv_positions: int) -> Injection:
        """The injection of `tensors()` as a prompt file or checkpoint stores them."""
        return cls(**{k: tensors.get(k) for k in TENSORS}, kv_positions=kv_positions)

    def map(self, fn) -> Injection:
        """The same injection with `fn` applied to each of its tensors."""
        return Injection.from_tensors({k: fn(t) for k, t in self.tensors().items()}, self.kv_positions)

    def detach(self) -> Injection:
        return self.map(lambda t: t.detach().clone())

    def to(self, device=None, dtype=None) -> Injection:
        return self.map(lambda t: t.to(device=device, dtype=dtype))


EMPTY = Injection()


def per_row(injections: Injection | list[Injection], batch: int) -> list[Injection]:
    """One injection per row: the same for every row, or a list that must have one per row."""
    if isinstance(injections, Injection):
        return [injections] * batch
    if len(injections) != batch:
        raise ValueError(f"got {len(injections)} injections for a batch of {batch} rows")
    return list(injections)
