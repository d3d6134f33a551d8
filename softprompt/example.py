"""One row of a batch, as tasks (`data`) hand it to model families (`families`).

An `Example` is the rendered template's token ids with the place where the target goes (`slot`:
the end of the prompt for a causal LM, the mask for a masked LM), the target's tokens, and the
prompt (`Injection`) to run it with. Rows of one batch may carry different prompts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .injection import EMPTY, Injection

# The label word's place in a rendered template (a template's `{mask}`): a private-use character that the
# model family turns into its own form (the end of the prompt for a causal LM, mask tokens for a masked LM).
MASK = "\ue001"


@dataclass
class Example:
    """One row of a batch.

    source: token ids of the rendered template, with the family's special tokens, the target slot removed.
    slot: index in `source` where the target goes (len(source) for a prompt the target follows).
    target: token ids to predict there (empty when there is nothing to score, e.g. a prompt to decode from).
    injection: the prompt this row runs with.
    """

    source: list[int]
    slot: int
    target: list[int] = field(default_factory=list)
    injection: Injection = EMPTY

    def with_target(self, target: list[int]) -> Example:
        return Example(self.source, self.slot, list(target), self.injection)
