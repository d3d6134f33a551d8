"""Decoder-only causal LMs (Llama, Mistral, Qwen, Gemma, GPT-2, GPT-NeoX, Falcon, Bloom, Jamba, Mamba, ...).

Layout of row i, with K = the longest KV prefix in the batch and S the sequence length:

    cache (K slots):  [kv prefix of row i | masked slots]
    sequence (S):     [pad ... pad | virtual tokens of row i | text tokens of row i]

Left padding, so that every row's tokens end at the last column and decoding appends one column
for all rows. The virtual tokens stay adjacent to the text (never `prompt <pad> <pad> text`).
Position ids count from the first real token: a KV prefix occupies positions 0..P-1 and the
text follows (`Injection.kv_positions`), so a row sees the positions it would see alone.

Attention layers with a window (sliding-window layers of Mistral, Gemma 2/3, Qwen2, GPT-OSS;
chunked layers of Llama 4) measure it in cache slots, not positions; under left padding the pads
sit between a row's prefix and its text, so the slot distance would depend on the batch. When a
batch carries a KV prefix on such a model, every attention layer gets an explicit mask computed
from positions instead (a dict keyed by layer type where layer types differ), and the decoding
cache keeps every slot (transformers' sliding layers drop slots by count). The prefix follows the
model's own semantics: it stands where the tokens it replaces would stand, at positions
0..P-1, so a sliding layer stops seeing it once the text is longer than the window, exactly like
the real tokens it was initialized from; a compiled soft prompt stays exact.

KV prefixes go into the layers that hold keys and values, found by running two tokens through the
model once: every layer of a transformer, the attention layers of a hybrid (Jamba, Falcon-H1,
Qwen3-Next), none of a pure state-space model (Mamba), which therefore takes soft prompts only.

Adaption prompts (LLaMA-Adapter) go into the last attention layers through a wrapper around the
model's attention function (`adaption.py`), passed with every forward; they take no positions and no
cache slots, so padding, positions and decoding are those of the prompt's other parts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, LinearAttentionCacheLayerMixin

from ..errors import ConfigError, InputTooLongError
from ..example import MASK, Example
from ..injection import Injection
from .adaption import KWARG, Adaption, inner_implementation, install, uninstall
from .family import Family, ReadOnlyPrefixLayer, group_by, read_only, stack_padded

WINDOWED = ("sliding_attention", "chunked_attention")
RECURRENT = ("linear_attention", "conv")  # cache layer types that keep a recurrent state (with "hybrid": also keys)


@dataclass
class Layout:
    """A batch laid out for one forward (see the module docstring)."""

    inputs_embeds: torch.Tensor  # (B, S, D)
    mask: torch.Tensor  # (B, K + S), 1 = attend
    positions: torch.Tensor  # (B, S)
    prefix: list[tuple[torch.Tensor, torch.Tensor]] | None  # per prefix layer: keys, values, each (B, H_kv, K, hd)
    slot_positions: torch.Tensor  # (B, K) positions of the prefix slots (meaningful where mask[:, :K] is 1)
    labels: torch.Tensor | None = None  # (B, S), -100 where no loss
    adaption: Adaption | None = None  # the rows' adaption prompts, passed with every forward of this batch


class Causal(Family):
    name = "causal"
    auto_class = "AutoModelForCausalLM"

    @classmethod
    def matches(cls, config) -> bool:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        return (
            not getattr(config, "is_encoder_decoder", False) and config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        )

    # --- the model's layers -----------------------------------------------------------------------------------------
    @cached_property
    def _layer_rules(self) -> list[tuple[str, int | None]]:
        """Per model layer: its cache layer type as transformers reads it from the config, and its window if any."""
        from transformers.cache_utils import get_layer_types_and_kwargs

        types, kwargs = get_layer_types_and_kwargs(self.config)
        return [(t, kw.get("sliding_window")) for t, kw in zip(types, kwargs)]

    @cached_property
    def _probe(self) -> tuple[list[int], list[tuple[int, int, int]]]:
        """(indices of the layers that hold keys/values, their (H_kv, head_dim of keys, of values)).

        Read off one forward of two tokens with a cache: the only source of truth that covers partial
        rotary, multi-query, fused and hybrid attention alike.
        """
        cache = self._new_cache(keep_all=True)
        ids = torch.zeros(1, 2, dtype=torch.long, device=self.device)
        with torch.no_grad():
            self.call(cache, input_ids=ids, use_cache=True)
        layers = [
            i
            for i, layer in enumerate(cache.layers)
            if isinstance(layer, DynamicLayer)
            and isinstance(layer.keys, torch.Tensor)
            and layer.keys.dim() == 4
            and layer.keys.shape[-2] > 0
        ]
        return layers, [
            (cache.layers[i].keys.shape[1], cache.layers[i].keys.shape[3], cache.layers[i].values.shape[3])
            for i in layers
        ]

    @property
    def prefix_layers(self) -> list[int]:
        return self._probe[0]

    @cached_property
    def recurrent(self) -> bool:
        """Whether some layers keep a recurrent state (state-space or linear attention) instead of keys and values."""
        return len(self.prefix_layers) < len(self._layer_rules) or any(
            t in RECURRENT or t.startswith("hybrid") for t, _ in self._layer_rules
        )

    @property
    def compiles(self) -> bool:  # a recurrent layer's state after the virtual tokens is no key/value prefix
        return not self.recurrent

    def _prefix_shapes(self) -> list[tuple[int, int, int]]:
        return self._probe[1]

    def _no_prefix_layers(self) -> str:
        return (
            f"This {self.config.model_type} model has no attention layers, so KV-prefix methods (prefix, deep) "
            "have nothing to put keys and values into."
        )

    @cached_property
    def _windowed(self) -> bool:
        return any(self._layer_rules[i][0] in WINDOWED for i in self.prefix_layers)

    def _new_cache(self, keep_all: bool) -> DynamicCache:
        """The model's own decoding cache; with `keep_all`, windowed layers keep every slot (masks do the windowing)."""
        cache = DynamicCache(config=self.model.config)
        if keep_all:
            for i, layer in enumerate(cache.layers):
                if (
                    type(layer) is not DynamicLayer
                    and isinstance(layer, DynamicLayer)
                    and not isinstance(layer, LinearAttentionCacheLayerMixin)
                ):
                    cache.layers[i] = DynamicLayer()
        return cache

    def _read_only_cache(self, prefix) -> Cache | None:
        """The cache of a forward that does not decode: the prefix in its layers, read-only; other layers fresh."""
        if prefix is None:
            return None
        layers = list(DynamicCache(config=self.model.config).layers)
        for i, layer in enumerate(layers):
            if isinstance(layer, LinearAttentionCacheLayerMixin):  # a recurrent state (and maybe keys/values too)
                layers[i] = read_only(type(layer))(number_of_states=layer.number_of_states)
            elif i in self.prefix_layers:
                layers[i] = ReadOnlyPrefixLayer()
        for i, (k, v) in zip(self.prefix_layers, prefix):
            layers[i].set_prefix(k, v)
        return Cache(layers=layers)

    def _decoding_cache(self, prefix, keep_all: bool = False) -> DynamicCache:
        """A cache to decode into, holding `prefix`; windowed layers keep every slot under a prefix (or `keep_all`)."""
        cache = self._new_cache(keep_all=keep_all or (self._windowed and prefix is not None))
        for i, (k, v) in zip(self.prefix_layers, prefix or []):
            cache.layers[i].update(k.contiguous(), v.contiguous())
        return cache

    @cached_property
    def _adaption_layers(self) -> list[int]:
        """The attention layers that take adaption prompts: all of them, once the attention wrapper is installed
        (outputs without adaption prompts stay bit-identical), if every one met a probe through it with its own
        k_proj and v_proj; else none, and the model is left as it was. Read off one forward of two tokens."""
        if not self.prefix_layers or not install(self.model):
            return []
        probe = Adaption([], torch.zeros(1, 0, dtype=torch.bool), torch.zeros(1, 0), {})
        ids = torch.zeros(1, 2, dtype=torch.long, device=self.device)
        with torch.no_grad():
            self.call(None, input_ids=ids, **{KWARG: probe})
        if not set(self.prefix_layers) <= probe.seen:
            uninstall(self.model)
            return []
        return self.prefix_layers

    def adaption_layers(self, n: int | None = None) -> list[int]:
        layers = self._adaption_layers
        if not layers:
            raise ConfigError(
                f"The attention layers of this {self.config.model_type} model cannot take adaption prompts "
                "(LLaMA-Adapter needs attention with its own k_proj and v_proj, run through transformers' "
                "AttentionInterface).",
                "use --method deep or prefix (keys/values in every layer), or --method soft.",
            )
        n = len(layers) if n is None else n
        if not 1 <= n <= len(layers):
            raise ConfigError(
                f"Adaption prompts for {n} layers were asked for; this model has {len(layers)} attention layers.",
                f"pass --adapter-layers between 1 and {len(layers)}.",
            )
        return layers[-n:]

    def _adaption(self, rows: list[Injection]) -> Adaption | None:
        """The rows' adaption prompts for the last L attention layers, L the most any row has. A row's prompts go
        into its own last layers; in the others, and in rows without any, its gate is 0 and its slots zeros."""
        if all(r.adapter is None for r in rows):
            return None
        L = max(r.num_adapter_layers for r in rows)
        layers = self.adaption_layers(L)
        some = next(r.adapter for r in rows if r.adapter is not None)
        if all(r.adapter is some for r in rows):  # one prompt for all rows: views, no copies
            B, (_, K, D) = len(rows), some.shape
            prompts = [some[j].expand(B, K, D) for j in range(L)]
            return Adaption(prompts, some.new_ones(B, K, dtype=torch.bool), rows[0].gate.expand(B, L), _index(layers))
        K = max(r.adapter.shape[1] for r in rows if r.adapter is not None)
        valid = torch.ones(len(rows), K, dtype=torch.bool, device=some.device)
        for i, r in enumerate(rows):
            if r.adapter is not None:
                valid[i, r.adapter.shape[1] :] = False
        prompts = [
            stack_padded([_layer(r.adapter, j - L + r.num_adapter_layers) for r in rows], 0, some, (0, some.shape[2]))
            for j in range(L)
        ]  # per layer (B, K, D)
        zero = some.new_zeros(L)
        gates = [zero if r.gate is None else torch.cat([zero[: L - len(r.gate)], r.gate]) for r in rows]
        return Adaption(prompts, valid, torch.stack(gates), _index(layers))

    # --- text -> token ids --------------------------------------------------------------------------------------------
    def check_spec(self, spec) -> None:
        super().check_spec(spec)
        if spec.mask_inside:
            raise ConfigError(
                f"Task '{spec.name}': a causal LM reads the label word after the prompt, but the template "
                "has text after {mask}.",
                "put {mask} at the end of the template, or drop it.",
            )

    def source_ids(self, text: str, chat: bool = False) -> tuple[list[int], int]:
        text = text.removesuffix(MASK)
        tok = self.tokenizer
        if chat:
            if not getattr(tok, "chat_template", None):
                raise ConfigError(
                    "The task says `chat: true`, but this tokenizer has no chat template.",
                    "set `chat: false` in the task spec, or use an instruction-tuned model.",
                )
            ids = tok.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=True, add_generation_prompt=True, return_dict=False
            )
        else:
            ids = tok(text, add_special_tokens=True)["input_ids"]
        return list(ids), len(ids)

    def target_ids(self, text: str, eos: bool) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids + [self.tokenizer.eos_token_id] if eos else ids

    # --- layout -----------------------------------------------------------------------------------------------------
    def layout(self, examples: list[Example], labels: bool = False) -> Layout:
        """Lay out a batch: each row's source (+ target with `labels`), left-padded, with its prompt."""
        device = self.device
        rows = [e.injection.to(device, self.dtype) for e in examples]
        seqs = [e.source[: e.slot] + (e.target if labels else []) for e in examples]
        ids, tgt = self._left_padded(seqs, [e.target if labels else [] for e in examples])  # (B, T) each
        T = ids.shape[1]
        lens = torch.tensor([len(s) for s in seqs], device=device)  # (B,) real tokens per row
        n_emb = torch.tensor([r.num_embeds for r in rows], device=device)  # (B,)
        kv_pos = torch.tensor([r.kv_positions for r in rows], device=device)  # (B,)
        self._check_lengths(n_emb + lens, kv_pos)

        tok_emb = self.embed(ids.to(device))  # (B, T, D)
        D = tok_emb.shape[-1]
        src = tok_emb
        if any(r.embeds is not None for r in rows):
            prompt = stack_padded([r.embeds for r in rows], 0, tok_emb, (0, D))  # (B, P_max, D)
            src = torch.cat([tok_emb, prompt], dim=1)  # (B, T + P_max, D)
        # Gather index for every output slot: pad, virtual token, or text token.
        S = int((n_emb + lens).max())
        s = torch.arange(S, device=device)[None, :]  # (1, S)
        pad = (S - n_emb - lens)[:, None]  # (B, 1) pads before row i's prompt
        in_prompt = (s >= pad) & (s < pad + n_emb[:, None])
        in_text = s >= pad + n_emb[:, None]
        text_idx = (T - lens)[:, None] + (s - pad - n_emb[:, None])  # position in the left-padded ids
        idx = torch.where(in_prompt, T + s - pad, torch.where(in_text, text_idx, torch.zeros_like(s)))  # (B, S)
        embeds = src.gather(1, idx[..., None].expand(-1, -1, D))  # (B, S, D)
        seq_mask = s >= pad  # (B, S)
        positions = torch.where(seq_mask, kv_pos[:, None] + s - pad, torch.zeros_like(s))  # (B, S)
        out_labels = None
        if labels:
            picked = tgt.to(device).gather(1, idx.clamp(max=max(T - 1, 0))) if T else torch.full_like(idx, -100)
            out_labels = torch.where(in_text, picked, torch.full_like(picked, -100))
        prefix, kv_mask, slot_positions = self._kv_prefix(rows, tok_emb, kv_pos)
        mask = torch.cat([kv_mask, seq_mask], dim=1).long()
        return Layout(embeds, mask, positions, prefix, slot_positions, out_labels, self._adaption(rows))

    def _left_padded(self, seqs: list[list[int]], targets: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, T) left-padded with the pad token; labels (B, T): each row's target at its end, else -100."""
        B, T = len(seqs), max(len(s) for s in seqs)
        ids = torch.full((B, T), self.tokenizer.pad_token_id, dtype=torch.long)
        tgt = torch.full((B, T), -100, dtype=torch.long)
        for i, (s, t) in enumerate(zip(seqs, targets)):
            if s:
                ids[i, T - len(s) :] = torch.tensor(s)
            if t:
                tgt[i, T - len(t) :] = torch.tensor(t)
        return ids, tgt

    def _check_lengths(self, lengths: torch.Tensor, kv_pos: torch.Tensor) -> None:
        """Refuse a row with no positions or with more than the model's context; lengths, kv_pos: (B,)."""
        if bool((lengths == 0).any()):
            raise ConfigError(
                "An input has no tokens (an empty text, and a template and prompt that add none).",
                "pass a non-empty input.",
            )
        limit, longest = self.max_positions, int((kv_pos + lengths).max())
        if limit is not None and longest > limit:
            raise InputTooLongError(
                f"An input needs {longest} positions (virtual tokens + text), more than the model's context of "
                f"{limit}.",
                "shorten the input, use fewer virtual tokens, or set a truncation policy (--truncate left).",
            )

    def _kv_prefix(self, rows: list[Injection], tok_emb: torch.Tensor, kv_pos: torch.Tensor):
        """The rows' KV prompts: per-layer (keys, values) or None, key mask (B, K), the prefix's positions (B, K)."""
        B, device = len(rows), tok_emb.device
        if all(r.kv is None for r in rows):
            empty = torch.zeros(B, 0, dtype=torch.long, device=device)
            return None, empty.bool(), empty
        if len({id(r.kv) for r in rows}) == 1:
            kv = rows[0].kv.unsqueeze(0).expand(B, *rows[0].kv.shape)  # one prompt for all rows: a view, no copy
        else:
            shape = next(r.kv for r in rows if r.kv is not None).shape
            kv = stack_padded([r.kv for r in rows], 3, tok_emb, shape)  # (B, L, 2, H_kv, K, hd)
        if kv.shape[1] != len(self.prefix_layers):
            raise ConfigError(
                f"A KV prefix has {kv.shape[1]} layers; this model takes {len(self.prefix_layers)}.",
                "use the base model the prompt was trained for.",
            )
        n_kv = torch.tensor([r.num_kv for r in rows], device=device)  # (B,)
        j = torch.arange(kv.shape[4], device=device)[None, :]  # (1, K)
        slot_positions = kv_pos[:, None] - n_kv[:, None] + j  # (B, K) the prefix ends right before the text
        return [(kv[:, i, 0], kv[:, i, 1]) for i in range(kv.shape[1])], j < n_kv[:, None], slot_positions

    def _attention_masks(
        self,
        layout: Layout,
        q_positions: torch.Tensor,
        k_positions: torch.Tensor,
        k_valid: torch.Tensor,
        q_valid: torch.Tensor,
        inputs_embeds: torch.Tensor,
    ):
        """Masks computed from positions for every layer type: what windowed layers need under a KV prefix.

        q_positions, q_valid: (B, Q); k_positions, k_valid: (B, KV). Returns one 4D mask (all attention
        layers alike) or {layer type: mask} in the format of the model's attention implementation.
        """
        from transformers.masking_utils import create_recurrent_attention_mask

        q, k = q_positions[:, :, None], k_positions[:, None, :]  # (B, Q, 1), (B, 1, KV)
        causal = k_valid[:, None, :] & (k <= q)  # (B, Q, KV)
        pad_query = ~q_valid[:, :, None]  # a pad query attends everywhere: finite, and never read

        def allowed(kind: str, size: int | None) -> torch.Tensor:
            m = causal
            if kind == "sliding_attention":
                m = m & (q - k < size)
            elif kind == "chunked_attention":
                m = m & (torch.div(q, size, rounding_mode="floor") == torch.div(k, size, rounding_mode="floor"))
            return self._mask_format((m | pad_query)[:, None])  # (B, 1, Q, KV)

        rules = {self._layer_rules[i] for i in self.prefix_layers}
        types = getattr(self.config, "layer_types", None)
        if types is None or len(set(types)) == 1:
            if len(rules) > 1:
                raise ConfigError(
                    f"The attention layers of this {self.config.model_type} model use different windows "
                    f"{sorted(rules, key=str)} but take a single mask.",
                    "use soft prompts (--method soft) on this model.",
                )
            return allowed(*rules.pop())
        masks = {}
        for kind in set(types):
            sizes = {size for t, size in rules if t == kind}
            if kind in ("full_attention", *WINDOWED) and len(sizes) <= 1:
                masks[kind] = allowed(kind, sizes.pop() if sizes else None)
            elif kind in RECURRENT:
                masks[kind] = create_recurrent_attention_mask(self.model.config, inputs_embeds, layout.mask)
            else:
                raise ConfigError(
                    f"KV prefixes are not supported on '{kind}' layers ({self.config.model_type}).",
                    "use soft prompts (--method soft) on this model.",
                )
        return masks

    def _mask_format(self, allowed: torch.Tensor) -> torch.Tensor:
        impl = inner_implementation(self.model)
        if impl == "sdpa":
            return allowed
        if impl == "eager":
            zero = torch.zeros((), dtype=self.dtype, device=allowed.device)
            return torch.where(allowed, zero, torch.finfo(self.dtype).min)
        raise ConfigError(
            f"KV prefixes on a model with sliding-window or chunked attention need explicit masks, which "
            f"the '{impl}' attention implementation does not take.",
            "load the model with --attn sdpa.",
        )

    def _run(
        self,
        layout: Layout,
        cache: Cache | None,
        logits_to_keep: int,
        use_cache: bool,
        inputs_embeds: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        mask=None,
    ):
        """One forward. Returns (logits (B, logits_to_keep or S, V), cache)."""
        embeds = layout.inputs_embeds if inputs_embeds is None else inputs_embeds
        kwargs = {
            "inputs_embeds": embeds,
            "attention_mask": layout.mask if mask is None else mask,
            "use_cache": use_cache,
        }
        if self.accepts("position_ids"):
            kwargs["position_ids"] = layout.positions if positions is None else positions
        if self.accepts("logits_to_keep"):
            kwargs["logits_to_keep"] = logits_to_keep
        if layout.adaption is not None:
            kwargs[KWARG] = layout.adaption
        out = self.call(cache, **kwargs)
        logits = out.logits
        if logits_to_keep and not self.accepts("logits_to_keep"):
            logits = logits[:, -logits_to_keep:]
        return logits, getattr(out, self._cache_name, None)

    def _full_mask(self, layout: Layout):
        """The attention mask of a laid-out batch: the 2D padding mask, or position masks where windows need them."""
        if layout.prefix is None or not self._windowed:
            return layout.mask
        K = layout.slot_positions.shape[1]
        k_pos = torch.cat([layout.slot_positions, layout.positions], dim=1)
        seq_valid = layout.mask[:, K:].bool()
        return self._attention_masks(
            layout, layout.positions, k_pos, layout.mask.bool(), seq_valid, layout.inputs_embeds
        )

    def _forward(self, layout: Layout, logits_to_keep: int):
        logits, _ = self._run(
            layout, self._read_only_cache(layout.prefix), logits_to_keep, False, mask=self._full_mask(layout)
        )
        return logits

    # --- the loss and the scorer --------------------------------------------------------------------------------------
    def target_logits(self, examples: list[Example]):
        layout = self.layout(examples, labels=True)
        K = max(len(e.target) for e in examples)
        # targets sit at the end of every row (left padding): only the last K + 1 positions need the vocabulary
        # projection, the costliest layer here
        logits = self._forward(layout, K + 1)[:, :-1]  # (B, K, V): position j predicts the token at j + 1
        targets = layout.labels[:, -K:]
        return logits, targets, targets != -100

    def next_token_logits(self, examples: list[Example]) -> torch.Tensor:
        return self._forward(self.layout([Example(e.source, e.slot, [], e.injection) for e in examples]), 1)[:, -1]

    def class_scores(self, rows: list[tuple[Example, list[list[int]]]]) -> list[torch.Tensor]:
        """Each row's source runs once; every label word is read from that one state.

        The first token of every class comes from the prediction at the slot; a label word of
        several tokens continues from the row's cache (forked per class), one token per step. Models
        with recurrent layers, whose caches cannot be forked, score long words as targets instead.
        """
        if self.recurrent or all(len(v) == 1 for _, verb in rows for v in verb):
            return super().class_scores(rows)
        state, first = self.start_decoding([e for e, _ in rows])
        first = first.float().log_softmax(-1)  # (B, V)
        words = [[first[r, v[0]] for v in verb] for r, (_, verb) in enumerate(rows)]  # log p(first token) per class
        longer = [(r, c, v) for r, (_, verb) in enumerate(rows) for c, v in enumerate(verb) if len(v) > 1]
        self._select_rows(state, torch.tensor([r for r, _, _ in longer], device=self.device))
        for k in range(1, max(len(v) for _, _, v in longer)):
            # each long word feeds its token k-1; a word already complete feeds its last token, and its row's
            # prediction is not read
            fed = torch.tensor([v[min(k, len(v)) - 1] for _, _, v in longer], device=self.device)
            logp = self.continue_decoding(state, fed).float().log_softmax(-1)  # (N, V)
            for i, (r, c, v) in enumerate(longer):
                if k < len(v):
                    words[r][c] = words[r][c] + logp[i, v[k]]
        return [torch.stack(w) for w in words]

    def _select_rows(self, state: _Decoding, index: torch.Tensor) -> None:
        """Keep rows `index` (N,) of a cached decoding state, in that order; a row may be repeated (forked)."""
        state.examples = [state.examples[i] for i in index.tolist()]
        state.layout = Layout(
            state.layout.inputs_embeds[index],
            state.layout.mask[index],
            state.layout.positions[index],
            None if state.layout.prefix is None else [(k[index], v[index]) for k, v in state.layout.prefix],
            state.layout.slot_positions[index],
            adaption=None if state.layout.adaption is None else state.layout.adaption.select(index),
        )
        state.cache.batch_select_indices(index)
        state.position = state.position[index]
        state.k_positions, state.k_valid = state.k_positions[index], state.k_valid[index]

    # --- decoding ---------------------------------------------------------------------------------------------------
    def check_fits(self, examples: list[Example], max_new_tokens: list[int]) -> None:
        limit = self.max_positions
        if limit is None:
            return
        need = max(e.slot + e.injection.num_positions + n for e, n in zip(examples, max_new_tokens))
        if need > limit:
            raise InputTooLongError(
                f"Prompt, virtual tokens and max_new_tokens need {need} positions; the model has {limit}.",
                "shorten the input or lower max_tokens.",
            )

    def start_decoding(self, examples: list[Example], use_cache: bool = True):
        examples = [Example(e.source[: e.slot], e.slot, [], e.injection) for e in examples]
        lengths = [e.slot + e.injection.num_embeds for e in examples]
        if use_cache and self.recurrent and len(set(lengths)) > 1:
            # transformers' recurrent cache layers keep the pads of a left-padded prefill in their state, and the
            # steps after it drift from the row alone: rows of one length need no pads, so each length decodes apart
            groups = group_by(lengths)
            parts = [self.start_decoding([examples[i] for i in g], use_cache) for g in groups]
            logits = parts[0][1].new_empty(len(examples), parts[0][1].shape[-1])
            for g, (_, part) in zip(groups, parts):
                logits[g] = part
            return _Groups(groups, [state for state, _ in parts]), logits
        layout = self.layout(examples)
        state = _Decoding(examples, layout, use_cache)
        if use_cache:
            state.cache = self._decoding_cache(layout.prefix)
            state.k_positions = torch.cat([layout.slot_positions, layout.positions], dim=1)  # (B, K + S)
            state.k_valid = layout.mask.bool()
            logits, state.cache = self._run(layout, state.cache, 1, True, mask=self._full_mask(layout))
            state.position = layout.positions[:, -1]  # (B,)
            state.four_d = layout.prefix is not None and self._windowed
        else:
            logits = self._forward(layout, 1)
        return state, logits[:, -1]

    def continue_decoding(self, state, tokens: torch.Tensor) -> torch.Tensor:
        if isinstance(state, _Groups):
            parts = [self.continue_decoding(sub, tokens[g]) for g, sub in zip(state.groups, state.states)]
            logits = parts[0].new_empty(tokens.shape[0], parts[0].shape[-1])
            for g, part in zip(state.groups, parts):
                logits[g] = part
            return logits
        if not state.use_cache:
            state.examples = [
                Example(e.source + [int(t)], e.slot + 1, [], e.injection)
                for e, t in zip(state.examples, tokens.tolist())
            ]
            return self._forward(self.layout(state.examples), 1)[:, -1]
        layout = state.layout
        B = tokens.shape[0]
        state.position = state.position + 1
        layout.mask = torch.cat([layout.mask, layout.mask.new_ones(B, 1)], dim=1)
        embeds = self.embed(tokens[:, None].to(self.device))  # (B, 1, D)
        q_pos = state.position[:, None]  # (B, 1)
        mask = layout.mask
        if state.four_d:
            state.k_positions = torch.cat([state.k_positions, q_pos], dim=1)
            state.k_valid = torch.cat([state.k_valid, state.k_valid.new_ones(B, 1)], dim=1)
            mask = self._attention_masks(
                layout, q_pos, state.k_positions, state.k_valid, torch.ones_like(q_pos, dtype=torch.bool), embeds
            )
        logits, state.cache = self._run(layout, state.cache, 1, True, inputs_embeds=embeds, positions=q_pos, mask=mask)
        return logits[:, -1]

    def merges_decoding(self, state) -> bool:
        # plain key/value caches only: a recurrent state keeps the pads of a prefill, and a windowed layer's cache
        # holds the last tokens of each row, which padding would misalign
        return isinstance(state, _Decoding) and state.use_cache and not self.recurrent and not self._windowed

    def merge_decoding(self, state: _Decoding, other: _Decoding) -> _Decoding:
        """Rows of `state`, then of `other`: every layer's keys/values left-padded to the longer of the two and
        stacked, with the attention mask padded alike; positions stay each row's own, so no row changes."""
        T = max(state.layout.mask.shape[1], other.layout.mask.shape[1])
        cache = self._new_cache(keep_all=False)
        for i, layer in enumerate(cache.layers):
            a, b = state.cache.layers[i], other.cache.layers[i]
            layer.update(
                torch.cat([_pad_left(a.keys, T, 2), _pad_left(b.keys, T, 2)]),
                torch.cat([_pad_left(a.values, T, 2), _pad_left(b.values, T, 2)]),
            )
        mask = torch.cat([_pad_left(state.layout.mask, T, 1), _pad_left(other.layout.mask, T, 1)])  # (B, T)
        return self._decoding_state(
            state.examples + other.examples, mask, cache, torch.cat([state.position, other.position])
        )

    def select_decoding(self, state: _Decoding, index: torch.Tensor) -> _Decoding:
        """Rows `index` of `state`; the slots no kept row attends (left pads, or rows that left) are cut away once they
        are a quarter of the cache, so that a long-running batch does not keep the pads of rows long gone."""
        mask = state.layout.mask[index]  # (N, T)
        used = mask.any(0).nonzero()
        lead = int(used[0]) if len(used) else mask.shape[1]
        cache = state.cache
        cache.batch_select_indices(index)
        if lead * 4 < mask.shape[1]:
            return self._decoding_state([state.examples[i] for i in index.tolist()], mask, cache, state.position[index])
        trimmed = self._new_cache(keep_all=False)
        for layer, old in zip(trimmed.layers, cache.layers):
            layer.update(old.keys[:, :, lead:].contiguous(), old.values[:, :, lead:].contiguous())
        examples = [state.examples[i] for i in index.tolist()]
        return self._decoding_state(examples, mask[:, lead:], trimmed, state.position[index])

    def _decoding_state(self, examples: list[Example], mask: torch.Tensor, cache, position: torch.Tensor) -> _Decoding:
        """A cached decoding state of rows that left their prefill behind: all a step needs is the mask (B, T), the
        cache and each row's last position (B,)."""
        B, dev = mask.shape[0], mask.device
        none = torch.zeros(B, 0, dtype=torch.long, device=dev)
        rows = [e.injection.to(dev, self.dtype) for e in examples]
        embeds = torch.zeros(B, 0, self.hidden_size, dtype=self.dtype, device=dev)
        layout = Layout(embeds, mask, none, None, none, adaption=self._adaption(rows))
        state = _Decoding(examples, layout, True)
        state.cache, state.position = cache, position
        state.k_positions, state.k_valid = none, none.bool()
        return state

    # --- prompts ----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def kv_of_embeddings(self, embeds: torch.Tensor, prefix: Injection | None = None) -> torch.Tensor:
        """(L, 2, H_kv, K + P, hd): the keys/values of virtual tokens (P, D) run after `prefix` (K slots, if any).

        With causal attention, what a token stores depends only on what came before it, never on what
        follows, so these keys/values can stand for the tokens in front of any text.
        """
        kv = None if prefix is None else prefix.kv
        inj = Injection(embeds=embeds, kv=kv, kv_positions=0 if prefix is None else prefix.kv_positions)
        layout = self.layout([Example([], 0, [], inj)])
        cache = self._decoding_cache(layout.prefix, keep_all=True)  # every token's keys, also past a window
        self._run(layout, cache, 1, True, mask=self._full_mask(layout))
        return torch.stack(
            [torch.stack([cache.layers[i].keys[0], cache.layers[i].values[0]]) for i in self.prefix_layers]
        )

    def compile(self, injection: Injection) -> Injection:
        """The prompt as a pure KV prefix: its virtual tokens' keys/values computed once.

        Outputs equal the uncompiled prompt's (the text sees the same keys, values and positions), but
        a request no longer pays for the virtual tokens in prefill. Models with recurrent layers keep
        the prompt as it is: a state after the virtual tokens is not a key/value prefix.
        """
        if injection.embeds is None or not self.compiles:
            return injection
        kv = self.kv_of_embeddings(injection.embeds, injection if injection.kv is not None else None)
        return replace(injection, embeds=None, kv=kv, kv_positions=injection.num_positions)


def _index(layers: list[int]) -> dict[int, int]:
    return {layer: j for j, layer in enumerate(layers)}


def _layer(adapter: torch.Tensor | None, j: int) -> torch.Tensor | None:
    """Layer j's (K, D) of a row's adaption prompts, or None where the row has none there (j < 0 or no prompts)."""
    return None if adapter is None or j < 0 else adapter[j]


def _pad_left(x: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """`x` with zeros before its entries along `dim`, to `size` of them."""
    missing = size - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


class _Groups:
    """Decode states of groups of rows (`groups`: row indices) that decode apart."""

    def __init__(self, groups: list[list[int]], states: list):
        self.groups, self.states = groups, states


class _Decoding:
    """The state of one decode loop."""

    def __init__(self, examples: list[Example], layout: Layout, use_cache: bool):
        self.examples, self.layout, self.use_cache = examples, layout, use_cache
        self.cache = None
        self.position = None
        self.k_positions = self.k_valid = None
        self.four_d = False
