"""Encoder-decoder models: T5 (mT5, Flan-T5), BART (mBART), and the other `AutoModelForSeq2SeqLM` models.

Layout of row i:

    encoder:                  [virtual tokens of row i | source tokens | pads]        (right-padded)
    decoder self-attention:   [kv prefix of row i] then [start | target tokens | pads]

Virtual tokens go in front of the encoder input, as in Lester et al. 2021 (whose prompt tuning
results are on T5). KV prefixes go into the decoder's self-attention, which is where PEFT puts
them (`PeftModelForSeq2SeqLM`) and the only attention stack that transformers' T5 and BART feed
a cache to: their encoders take none (T5's drops it on purpose), so an encoder prefix would need
patched attention modules. Cross-attention reads the encoder's output as usual, so it follows
from the virtual tokens (none from the KV prefix).

The decoder counts positions from its cache length (BART's learned positions, T5's relative
bias), so rows are run in groups of equal KV-prefix length: a row never sees another row's
prefix slots, and each row gets the positions it gets alone. A soft prompt cannot be compiled to
keys/values here: the bidirectional encoder mixes it with the text.
"""

from __future__ import annotations

from functools import cached_property

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, EncoderDecoderCache

from ..errors import ConfigError, InputTooLongError
from ..example import MASK, Example
from ..injection import Injection
from .family import Family, ReadOnlyPrefixLayer, by_prefix_length, group_by, prefix_of, prompt_first


class Seq2Seq(Family):
    name = "seq2seq"
    auto_class = "AutoModelForSeq2SeqLM"

    @classmethod
    def matches(cls, config) -> bool:
        from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES

        return (
            bool(getattr(config, "is_encoder_decoder", False))
            and config.model_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES
        )

    def _whole_inputs(self, ids: torch.Tensor) -> dict:
        return {**super()._whole_inputs(ids), "decoder_input_ids": ids}

    @property
    def max_positions(self) -> int | None:
        # T5's relative position bias has no limit; BART's learned positions do
        return getattr(self.model.config, "max_position_embeddings", None)

    @cached_property
    def start_id(self) -> int:
        start = self.model.config.decoder_start_token_id
        if start is None:
            raise ConfigError(
                "This seq2seq model's config has no decoder_start_token_id.",
                "set decoder_start_token_id in its config.json.",
            )
        return start

    @cached_property
    def _probe(self) -> list[tuple[int, int, int]]:
        """Shapes of every decoder self-attention layer's keys/values, read off one decoder step."""
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        ids = torch.tensor([[self.start_id]], device=self.device)
        with torch.no_grad():
            self.call(cache, input_ids=ids, decoder_input_ids=ids, use_cache=True)
        layers = cache.self_attention_cache.layers
        return [(layer.keys.shape[1], layer.keys.shape[3], layer.values.shape[3]) for layer in layers]

    def _prefix_shapes(self) -> list[tuple[int, int, int]]:
        return self._probe

    # --- text -> token ids --------------------------------------------------------------------------------------------
    def check_spec(self, spec) -> None:
        super().check_spec(spec)
        if spec.mask_inside:
            raise ConfigError(
                f"Task '{spec.name}': a seq2seq model writes the label word as its output, but the "
                "template has text after {mask}.",
                "put {mask} at the end of the template, or drop it.",
            )
        if spec.chat:
            raise ConfigError(
                f"Task '{spec.name}' says `chat: true`; chat templates are for causal LMs.",
                "set `chat: false` for a seq2seq model.",
            )

    def source_ids(self, text: str, chat: bool = False) -> tuple[list[int], int]:
        ids = self.tokenizer(text.removesuffix(MASK), add_special_tokens=True)["input_ids"]
        return list(ids), len(ids)

    def target_ids(self, text: str, eos: bool) -> list[int]:
        # the tokenizer's own target form, which ends with EOS (T5: "... </s>", BART: "<s> ... </s>"): the decoder's
        # output always ends, label words included
        return list(self.tokenizer(text_target=text)["input_ids"])

    def source_budget(self, injection: Injection, reserve: int, limit: int | None = None) -> int | None:
        limit = limit or self.max_positions
        return None if limit is None else limit - injection.num_embeds  # the target goes to the decoder

    # --- forwards ---------------------------------------------------------------------------------------------------
    def _encode(self, examples: list[Example]):
        """The encoder over `[virtual tokens | source]`: (encoder outputs, attention mask (B, S))."""
        rows = [e.injection for e in examples]
        embeds, mask = prompt_first(self, [e.source[: e.slot] for e in examples], rows)
        encoder = self.model.get_encoder()
        return encoder(inputs_embeds=embeds, attention_mask=mask), mask

    @staticmethod
    def _decoding_cache(prefix) -> EncoderDecoderCache:
        """A cache to decode into: the prefix in the decoder's self-attention; cross-attention fills when first run."""
        cache = DynamicCache()
        for i, (k, v) in enumerate(prefix or []):
            cache.update(k.contiguous(), v.contiguous(), i)
        return EncoderDecoderCache(cache, DynamicCache())

    @staticmethod
    def _read_only_cache(prefix) -> EncoderDecoderCache | None:
        """The cache of a forward that does not decode: the prefix read-only, cross-attention recomputed every call.

        transformers marks a cross-attention cache as filled after its first call and then reads it
        back instead of recomputing it; a layer recomputed under gradient checkpointing would then
        compute less than it did the first time. Here nothing is ever stored or marked.
        """
        if prefix is None:
            return None
        layers = []
        for k, v in prefix:
            layers.append(ReadOnlyPrefixLayer())
            layers[-1].set_prefix(k, v)
        cache = EncoderDecoderCache(Cache(layers=layers), Cache(layers=[_PassThrough() for _ in prefix]))
        cache.is_updated = _NeverFilled()
        return cache

    def _decoder_logits(self, examples: list[Example], dec_ids: torch.Tensor, dec_mask: torch.Tensor, encoded=None):
        """Decoder logits (B, T, V) for decoder inputs (B, T) of examples that share one KV-prefix length."""
        rows = [e.injection for e in examples]
        prefix = prefix_of(rows, self.device, self.dtype)
        if encoded is None:
            encoded = self._encode(examples)
        outputs, enc_mask = encoded
        K = rows[0].num_kv
        cache = self._read_only_cache(prefix)
        mask = torch.cat([dec_mask.new_ones(len(rows), K), dec_mask], dim=1)  # (B, K + T)
        out = self.call(
            cache,
            encoder_outputs=outputs,
            attention_mask=enc_mask,
            decoder_input_ids=dec_ids,
            decoder_attention_mask=mask,
            use_cache=False,
        )
        return out.logits

    def _teacher_forced(self, examples: list[Example], encoded=None):
        """(logits (B, T, V), targets (B, T), mask (B, T)) of examples sharing one KV-prefix length."""
        T = max(len(e.target) for e in examples)
        dec = torch.full((len(examples), T), self.tokenizer.pad_token_id, dtype=torch.long)
        targets = torch.full((len(examples), T), -100, dtype=torch.long)
        for i, e in enumerate(examples):
            dec[i, : len(e.target)] = torch.tensor([self.start_id] + e.target[:-1])  # teacher forcing
            targets[i, : len(e.target)] = torch.tensor(e.target)
        mask = (targets != -100).to(self.device)
        logits = self._decoder_logits(examples, dec.to(self.device), mask.long(), encoded)
        return logits, targets.to(self.device), mask

    def target_logits(self, examples: list[Example]):
        return by_prefix_length(examples, self._teacher_forced)

    def class_scores(self, rows: list[tuple[Example, list[list[int]]]]) -> list[torch.Tensor]:
        """Every class's label word scored by the decoder after one encoder pass per row (the encoder is shared)."""
        scores: list[torch.Tensor | None] = [None] * len(rows)
        for g in group_by([e.injection.num_kv for e, _ in rows]):
            examples = [rows[i][0] for i in g]
            outputs, enc_mask = self._encode(examples)
            pairs = [(r, c) for r, i in enumerate(g) for c in range(len(rows[i][1]))]
            take = torch.tensor([r for r, _ in pairs], device=self.device)
            encoded = (type(outputs)(last_hidden_state=outputs.last_hidden_state[take]), enc_mask[take])
            logits, targets, mask = self._teacher_forced(
                [examples[r].with_target(rows[g[r]][1][c]) for r, c in pairs], encoded
            )
            logp = logits.float().log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
            per_pair = (logp * mask).sum(1)  # (N,)
            for r, i in enumerate(g):
                scores[i] = per_pair[[k for k, (pr, _) in enumerate(pairs) if pr == r]]
        return scores

    def next_token_logits(self, examples: list[Example]) -> torch.Tensor:
        def run(group):
            start = torch.full((len(group), 1), self.start_id, dtype=torch.long, device=self.device)
            return (self._decoder_logits(group, start, torch.ones_like(start))[:, 0],)

        return by_prefix_length(examples, run)[0]

    # --- decoding ---------------------------------------------------------------------------------------------------
    def check_fits(self, examples: list[Example], max_new_tokens: list[int]) -> None:
        limit = self.max_positions
        if limit is None:
            return
        for e, n in zip(examples, max_new_tokens):
            need = max(e.slot + e.injection.num_embeds, e.injection.num_kv + n)
            if need > limit:
                raise InputTooLongError(
                    f"The input or its {n} new tokens need {need} positions; the model has {limit}.",
                    "shorten the input or lower max_tokens.",
                )

    def start_decoding(self, examples: list[Example], use_cache: bool = True):
        """One decode state per group of equal KV-prefix length; every step runs each group."""
        groups = []
        for g in group_by([e.injection.num_kv for e in examples]):
            group = [examples[i] for i in g]
            groups.append(
                _Group(g, group, self._encode(group), prefix_of([e.injection for e in group], self.device, self.dtype))
            )
        state = _Decoding(groups, len(examples), use_cache)
        start = torch.full((len(examples),), self.start_id, dtype=torch.long, device=self.device)
        return state, self._step(state, start)

    def continue_decoding(self, state: _Decoding, tokens: torch.Tensor) -> torch.Tensor:
        return self._step(state, tokens.to(self.device))

    def _step(self, state: _Decoding, tokens: torch.Tensor) -> torch.Tensor:
        logits = None
        for g in state.groups:
            new = tokens[g.rows][:, None]  # (B_g, 1)
            g.tokens = new if g.tokens is None else torch.cat([g.tokens, new], dim=1)
            K = g.examples[0].injection.num_kv
            B = len(g.rows)
            if state.use_cache:
                if g.cache is None:
                    g.cache = self._decoding_cache(g.prefix)
                mask = torch.ones(B, K + g.tokens.shape[1], dtype=torch.long, device=self.device)
                out = self.call(
                    g.cache,
                    encoder_outputs=g.encoded[0],
                    attention_mask=g.encoded[1],
                    decoder_input_ids=new,
                    decoder_attention_mask=mask,
                    use_cache=True,
                )
                g.cache = getattr(out, self._cache_name, g.cache)
                step = out.logits[:, -1]
            else:
                step = self._decoder_logits(g.examples, g.tokens, torch.ones_like(g.tokens), g.encoded)[:, -1]
            if logits is None:
                logits = step.new_empty(state.batch, step.shape[-1])
            logits[g.rows] = step
        return logits

    # --- prompts ----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def kv_of_embeddings(self, embeds: torch.Tensor) -> torch.Tensor:
        """(L, 2, H_kv, P, hd): the decoder self-attention keys/values of the tokens (P, D), run as decoder input
        (with the same tokens as encoder input)."""
        x = embeds.to(self.device, self.dtype)[None]  # (1, P, D)
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        self.call(cache, inputs_embeds=x, decoder_inputs_embeds=x, use_cache=True)
        layers = cache.self_attention_cache.layers
        assert all(isinstance(layer, DynamicLayer) for layer in layers)
        return torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in layers])


class _PassThrough(DynamicLayer):
    """A cross-attention cache layer that stores nothing: every call uses the encoder keys/values it computed."""

    def update(self, key_states, value_states, *args, **kwargs):
        return key_states, value_states


class _NeverFilled(dict):
    """`EncoderDecoderCache.is_updated` that drops writes, so that no layer ever reads a stored cross-attention."""

    def __setitem__(self, key, value) -> None:
        pass

    def get(self, key, default=None) -> bool:
        return False


class _Group:
    def __init__(self, rows: list[int], examples: list[Example], encoded, prefix):
        self.rows, self.examples, self.encoded, self.prefix = rows, examples, encoded, prefix
        self.cache = None
        self.tokens = None  # (B_g, t) decoder input so far


class _Decoding:
    def __init__(self, groups: list[_Group], batch: int, use_cache: bool):
        self.groups, self.batch, self.use_cache = groups, batch, use_cache
