"""Model families: one file each, registered here.

A family owns everything that depends on the architecture (see `family.py`). `family_for`
picks one from a model's config; adding a family means writing its module and adding one line to
`FAMILIES`, in the order they are tried: nothing else in the package names a family.
"""

from __future__ import annotations

from ..errors import ConfigError
from .causal import Causal
from .family import Family, KVLayout, mean_nll
from .masked_lm import MaskedLM
from .seq2seq import Seq2Seq

# Tried in order: BERT-style models also have a causal-LM class (as decoders), so encoders come first.
FAMILIES: tuple[type[Family], ...] = (Seq2Seq, MaskedLM, Causal)


def family_class(config) -> type[Family]:
    """The family of a model with this config."""
    for family in FAMILIES:
        if family.matches(config):
            return family
    raise ConfigError(
        f"Model type '{config.model_type}' is not a causal LM, a seq2seq model or a masked LM that transformers knows.",
        "pass a causal LM, a seq2seq model (T5, BART) or a masked LM (BERT, RoBERTa).",
    )


__all__ = ["FAMILIES", "Causal", "Family", "KVLayout", "MaskedLM", "Seq2Seq", "family_class", "mean_nll"]
