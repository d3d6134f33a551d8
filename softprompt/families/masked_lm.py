"""Encoder-only masked LMs (BERT, RoBERTa, DeBERTa-v2, ModernBERT, ...): cloze-style rank classification.

The template has a mask slot (`{mask}`) where the label word goes, and a class is scored by the
masked-LM likelihood of its label word's tokens at the mask tokens put there (one mask per token;
PET, LM-BFF and OpenPrompt score this way, and P-tuning v1 was first run in this setting).

Layout of row i, right-padded (nothing is decoded after the text, and a bidirectional encoder
counts positions from the first column):

    self-attention:  [kv prefix of row i] then [virtual tokens | [CLS] text ... [MASK] ... [SEP] | pads]

Virtual tokens go before everything, as PEFT places them. KV prefixes go into every layer's
self-attention; the model numbers the text's positions after them as it does by itself (BERT
from the cache length). Rows are therefore run in groups of equal KV-prefix length. There is no
decoder, so generation tasks are refused, and a soft prompt is never compiled to keys/values: in
a bidirectional encoder the virtual tokens' keys depend on the text.
"""

from __future__ import annotations

from functools import cached_property

import torch
from transformers.cache_utils import Cache, DynamicCache

from ..errors import ConfigError
from ..example import MASK, Example
from .family import Family, ReadOnlyPrefixLayer, by_prefix_length, prefix_of, prompt_first


class MaskedLM(Family):
    name = "masked_lm"
    auto_class = "AutoModelForMaskedLM"
    generates = False

    @classmethod
    def matches(cls, config) -> bool:
        from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

        return (
            config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES
            and not getattr(config, "is_decoder", False)
            and not getattr(config, "is_encoder_decoder", False)
        )

    @property
    def max_positions(self) -> int | None:
        limit = getattr(self.config, "max_position_embeddings", None)
        positions = getattr(getattr(self.model.base_model, "embeddings", None), "position_embeddings", None)
        offset = getattr(positions, "padding_idx", None)  # RoBERTa-style positions start after the padding index
        return limit if limit is None or offset is None else limit - offset - 1

    @cached_property
    def mask_id(self) -> int:
        if self.tokenizer.mask_token_id is None:
            raise ConfigError(
                "This tokenizer has no mask token, so the masked LM has nowhere to predict a label word.",
                "use the tokenizer the model was trained with.",
            )
        return self.tokenizer.mask_token_id

    def _prefix_shapes(self) -> list[tuple[int, int, int]]:
        """(H_kv, key dim, value dim) of every self-attention layer that takes a cache, read off one forward."""
        cache = DynamicCache()
        ids = torch.tensor([[self.mask_id, self.mask_id]], device=self.device)
        with torch.no_grad():
            self.call(cache, input_ids=ids)
        return [
            (layer.keys.shape[1], layer.keys.shape[3], layer.values.shape[3])
            for layer in cache.layers
            if isinstance(getattr(layer, "keys", None), torch.Tensor)
        ]

    def _no_prefix_layers(self) -> str:
        return (
            f"This {self.config.model_type} encoder's attention takes no key/value cache, so KV-prefix methods "
            "(prefix, deep) cannot reach it."
        )

    # --- text -> token ids --------------------------------------------------------------------------------------------
    def check_spec(self, spec) -> None:
        super().check_spec(spec)
        if not spec.has_mask:
            raise ConfigError(
                f"Task '{spec.name}': a masked LM predicts the label word at a mask, but the template has "
                "no {mask} slot.",
                'add {mask} where the label word goes, e.g. "{sentence} It was {mask}."',
            )
        if spec.chat:
            raise ConfigError(
                f"Task '{spec.name}' says `chat: true`; chat templates are for causal LMs.",
                "set `chat: false` for a masked LM.",
            )

    def source_ids(self, text: str, chat: bool = False) -> tuple[list[int], int]:
        # Tokenized with one mask token in the slot, so that the tokenizer treats the text around it as it would
        # (special tokens, a mask that absorbs the space before it); the mask is then taken out again.
        ids = list(self.tokenizer(text.replace(MASK, self.tokenizer.mask_token), add_special_tokens=True)["input_ids"])
        if ids.count(self.mask_id) != 1:
            raise ConfigError(
                "An input must hold exactly one {mask} slot (and no literal mask token).",
                "remove mask tokens from the input text.",
            )
        slot = ids.index(self.mask_id)
        return ids[:slot] + ids[slot + 1 :], slot

    def target_ids(self, text: str, eos: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # --- forwards ---------------------------------------------------------------------------------------------------
    def _logits(self, examples: list[Example], n_masks: list[int]) -> tuple[torch.Tensor, list[int]]:
        """MLM logits (B, S, V) of examples sharing one KV-prefix length, `n_masks[i]` masks at row i's slot, and the
        column of each row's first mask."""
        rows = [e.injection for e in examples]
        seqs = [e.source[: e.slot] + [self.mask_id] * n + e.source[e.slot :] for e, n in zip(examples, n_masks)]
        embeds, mask = prompt_first(self, seqs, rows)
        prefix = prefix_of(rows, self.device, self.dtype)
        cache = None
        if prefix is not None:
            layers = []
            for k, v in prefix:
                layers.append(ReadOnlyPrefixLayer())
                layers[-1].set_prefix(k, v)
            cache = Cache(layers=layers)
            mask = torch.cat([mask.new_ones(len(rows), rows[0].num_kv), mask], dim=1)  # (B, K + S)
        if all(r.embeds is None for r in rows):
            # token ids, not embeddings: some models (RoBERTa) number positions differently for the two
            ids = torch.full(embeds.shape[:2], self.tokenizer.pad_token_id, dtype=torch.long, device=self.device)
            for i, s in enumerate(seqs):
                ids[i, : len(s)] = torch.tensor(s)
            out = self.call(cache, input_ids=ids, attention_mask=mask)
        else:
            out = self.call(cache, inputs_embeds=embeds, attention_mask=mask)
        return out.logits, [r.num_embeds + e.slot for r, e in zip(rows, examples)]

    def target_logits(self, examples: list[Example]):
        def run(group):
            logits, first = self._logits(group, [len(e.target) for e in group])
            K = max(len(e.target) for e in group)
            k = torch.arange(K, device=self.device)[None, :]  # (1, K)
            lens = torch.tensor([len(e.target) for e in group], device=self.device)[:, None]
            mask = k < lens  # (B, K)
            cols = (torch.tensor(first, device=self.device)[:, None] + k).clamp(max=logits.shape[1] - 1)
            picked = logits.gather(1, cols[..., None].expand(-1, -1, logits.shape[-1]))  # (B, K, V)
            targets = torch.full((len(group), K), -100, dtype=torch.long, device=self.device)
            for i, e in enumerate(group):
                targets[i, : len(e.target)] = torch.tensor(e.target)
            return picked, targets, mask

        return by_prefix_length(examples, run)

    def next_token_logits(self, examples: list[Example]) -> torch.Tensor:
        def run(group):
            logits, first = self._logits(group, [1] * len(group))
            return (logits[torch.arange(len(group)), torch.tensor(first)],)

        return by_prefix_length(examples, run)[0]

    # --- prompts ----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def kv_of_embeddings(self, embeds: torch.Tensor) -> torch.Tensor:
        """(L, 2, H_kv, P, hd): each layer's keys/values of the tokens (P, D), run through the encoder on their own."""
        cache = DynamicCache()
        self.call(cache, inputs_embeds=embeds.to(self.device, self.dtype)[None])
        layers = [layer for layer in cache.layers if isinstance(getattr(layer, "keys", None), torch.Tensor)]
        return torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in layers])
