"""What every model family provides, and what all of them share.

A family owns everything that depends on the architecture: how text becomes token ids (special
tokens, where a class's label word goes), how a batch is laid out with its prompts (padding side,
positions, which attention layers get keys/values, the Cache classes), the loss over target
tokens, class scores, decoding with a KV cache, and compiling a soft prompt to keys/values where
that is exact. The rest of the package calls these methods and never branches on a family.

Families take batches of `Example`s (see `softprompt.example`): token ids, the place where the
target goes, the target, and the prompt to run each row with.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import cache, cached_property
from typing import ClassVar

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ..errors import ConfigError
from ..example import Example
from ..injection import Injection


@dataclass(frozen=True)
class KVLayout:
    """Shape of one attention layer's keys or values per token, for the layers that take a KV prefix."""

    num_layers: int
    num_kv_heads: int
    head_dim: int


class ReadOnlyPrefix:
    """Mixin for a cache layer that holds a fixed prefix: `update` returns prefix + new keys, storing nothing.

    Used for forwards that do not decode (training, scoring). It never mutates, so a layer
    recomputed under gradient checkpointing reads exactly the same keys, which is the contract of
    transformers' `_can_checkpoint_with_cache`.
    """

    def set_prefix(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values  # (B, H_kv, K, hd)
        self.device = keys.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)

    def get_seq_length(self) -> int:
        return self.keys.shape[-2]


class ReadOnlyPrefixLayer(ReadOnlyPrefix, DynamicLayer):
    pass


class StatelessRecurrence:
    """Mixin for a recurrent (state-space, linear-attention) cache layer in a forward that does not decode.

    Every call starts from no state and keeps none, as a first forward does, so a layer recomputed
    under gradient checkpointing runs exactly as it ran the first time.
    """

    def update_conv_state(self, conv_states, state_idx: int = 0, conv_kernel_size: int | None = None, **kwargs):
        kernel = conv_kernel_size or conv_states.shape[-1]
        if conv_states.shape[-1] < kernel:  # what a first call returns: the states, padded to the kernel
            conv_states = torch.nn.functional.pad(conv_states, (kernel - conv_states.shape[-1], 0))
        return conv_states

    def update_recurrent_state(self, recurrent_states, state_idx: int = 0, **kwargs):
        return recurrent_states


@cache
def read_only(layer_class: type) -> type:
    """The variant of a cache layer class for forwards that do not decode: a read-only prefix, no recurrent state."""
    from transformers.cache_utils import LinearAttentionCacheLayerMixin

    mixins = ((StatelessRecurrence,) if issubclass(layer_class, LinearAttentionCacheLayerMixin) else ()) + (
        (ReadOnlyPrefix,) if issubclass(layer_class, DynamicLayer) else ()
    )
    return type(f"ReadOnly{layer_class.__name__}", (*mixins, layer_class), {})


def stack_padded(tensors: list[torch.Tensor | None], dim: int, like: torch.Tensor, shape) -> torch.Tensor:
    """Stack per-row tensors that differ in size along `dim`, zero-filling the tail (masked later).

    `shape` is the shape of one row's tensor (any size along `dim`), used for rows that have none.
    """
    size = max((t.shape[dim] for t in tensors if t is not None), default=0)
    rows = []
    for t in tensors:
        if t is None:
            empty = list(shape)
            empty[dim] = size
            rows.append(like.new_zeros(empty))
        elif t.shape[dim] < size:
            pad = list(t.shape)
            pad[dim] = size - t.shape[dim]
            rows.append(torch.cat([t, t.new_zeros(pad)], dim=dim))
        else:
            rows.append(t)
    return torch.stack(rows)


@cache
def forward_parameters(model_class: type) -> frozenset[str]:
    """Names the model class's forward accepts (transformers 5.x calls the cache `cache`, 4.x `past_key_values`)."""
    return frozenset(inspect.signature(model_class.forward).parameters)


class Family:
    """Base class of model families. Subclasses set the class attributes and implement the abstract methods."""

    name: ClassVar[str]
    auto_class: ClassVar[str]  # the transformers Auto class that loads this family's models
    generates: ClassVar[bool] = True  # whether generation tasks can run (an encoder has no decoder)
    # Whether a soft prompt can become keys/values with identical outputs: true only for causal attention, where
    # what a token stores never depends on the tokens after it.
    compiles: ClassVar[bool] = False

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    @classmethod
    def matches(cls, config) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    # --- the model ---------------------------------------------------------------------------------------------------
    @property
    def config(self):
        return self.model.config.get_text_config(decoder=True)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the input embedding's device, or its execution device when a device map offloads it."""
        embeddings = self.model.get_input_embeddings()
        hook = getattr(embeddings, "_hf_hook", None)  # accelerate's big-model hook (`load_base(device_map=...)`)
        if getattr(hook, "execution_device", None) is not None:
            d = hook.execution_device
            return torch.device(f"cuda:{d}" if isinstance(d, int) else d)
        return embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().embedding_dim

    @property
    def max_positions(self) -> int | None:
        """The longest source (virtual tokens + text) the model takes."""
        return getattr(self.config, "max_position_embeddings", None)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids)

    @torch.no_grad()
    def forward_whole(self) -> None:
        """One forward of two pad tokens through the whole model, from its root module. The other methods run the
        input embedding (a seq2seq model also its encoder) on its own first; FSDP2 makes the first sharded module
        that runs the root of the others, so a sharded model runs this once first (`softprompt.sharding`)."""
        ids = torch.full((1, 2), self.tokenizer.pad_token_id, dtype=torch.long, device=self.device)
        self.model(**self._whole_inputs(ids))

    def _whole_inputs(self, ids: torch.Tensor) -> dict:
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    @cached_property
    def _parameters(self) -> frozenset[str]:
        # a task head's forward may take the cache only through **kwargs, which reach the base model's forward
        return forward_parameters(type(self.model)) | forward_parameters(type(self.model.base_model))

    @cached_property
    def _cache_name(self) -> str:
        return "cache" if "cache" in self._parameters else "past_key_values"

    def accepts(self, name: str) -> bool:
        """Whether the model's forward takes argument `name` itself."""
        return name in forward_parameters(type(self.model))

    def call(self, cache: Cache | None = None, **kwargs):
        """One call of the model's forward with a cache (or none), under whichever name its forward takes it."""
        if cache is not None:
            kwargs[self._cache_name] = cache
        return self.model(**kwargs)

    @cached_property
    def kv_layout(self) -> KVLayout:
        """Shape of the KV prefix a method makes for this model. Raises where the model takes none."""
        return self._kv_layout()

    def _kv_layout(self) -> KVLayout:
        shapes = self._prefix_shapes()
        fix = "use a method that prepends virtual tokens: --method soft or --method ptuning."
        if not shapes:
            raise ConfigError(self._no_prefix_layers(), fix)
        if len(set(shapes)) > 1 or shapes[0][1] != shapes[0][2]:
            raise ConfigError(
                f"The attention layers of this {self.config.model_type} model store keys and values of "
                f"different shapes {sorted(set(shapes))} (heads, key dim, value dim).",
                fix,
            )
        return KVLayout(len(shapes), shapes[0][0], shapes[0][1])

    def _prefix_shapes(self) -> list[tuple[int, int, int]]:  # pragma: no cover - abstract
        """(H_kv, key dim, value dim) of every layer that takes a KV prefix, read off the model."""
        raise NotImplementedError

    def _no_prefix_layers(self) -> str:
        return f"This {self.config.model_type} model has no layer that takes a key/value prefix."

    def check_injection(self, injection: Injection, what: str = "This prompt") -> None:
        """Refuse an injection that does not fit this model, with the fix."""
        if injection.embeds is not None and (
            injection.embeds.dim() != 2 or injection.embeds.shape[1] != self.hidden_size
        ):
            raise ConfigError(
                f"{what} has virtual-token embeddings of shape {tuple(injection.embeds.shape)}; the model "
                f"takes (P, {self.hidden_size}).",
                "use the base model the prompt was trained for.",
            )
        if injection.kv is not None:
            lay = self.kv_layout
            shape = tuple(injection.kv.shape)
            if len(shape) != 5 or shape[:3] + shape[4:] != (lay.num_layers, 2, lay.num_kv_heads, lay.head_dim):
                raise ConfigError(
                    f"{what} has KV prefixes of shape {shape}, which does not fit the model "
                    f"({lay.num_layers} layers x 2 x {lay.num_kv_heads} KV heads x P x {lay.head_dim}).",
                    "use the base model the prompt was trained for.",
                )
        if injection.adapter is not None:
            self.adaption_layers(injection.num_adapter_layers)  # refuses a model that takes none, or too few
            shape, gate = tuple(injection.adapter.shape), tuple(injection.gate.shape)
            if len(shape) != 3 or shape[2] != self.hidden_size or gate != shape[:1]:
                raise ConfigError(
                    f"{what} has adaption prompts of shape {shape} with gates {gate}; the model takes "
                    f"(L_a, K, {self.hidden_size}) with (L_a,).",
                    "use the base model the prompt was trained for.",
                )

    def adaption_layers(self, n: int | None = None) -> list[int]:
        """The n model layers that take adaption prompts (LLaMA-Adapter): the last n attention layers (None: all of
        them). Raises where the model takes none, or fewer."""
        raise ConfigError(
            f"LLaMA-Adapter's adaption prompts go into the attention layers of a causal LM; a {self.name} model "
            "takes none.",
            "use --method deep or prefix (keys/values in every layer), or --method soft.",
        )

    # --- text -> token ids --------------------------------------------------------------------------------------------
    def check_spec(self, spec) -> None:
        """Refuse a task spec this family cannot run (generation on an encoder, a template without a mask slot)."""
        if not self.generates and not spec.is_classification:
            raise ConfigError(
                f"Task '{spec.name}' is a generation task, but a {self.name} model has no decoder to generate with.",
                "use a causal LM or a seq2seq model (T5, BART) for generation tasks.",
            )

    def source_ids(self, text: str, chat: bool = False) -> tuple[list[int], int]:  # pragma: no cover - abstract
        """(token ids of a rendered template, the slot where the target goes). `text` may hold `data.MASK` once."""
        raise NotImplementedError

    def target_ids(self, text: str, eos: bool) -> list[int]:  # pragma: no cover - abstract
        """Token ids of a target (a label word with its prefix, or a reference text); `eos` to learn to stop."""
        raise NotImplementedError

    def source_budget(self, injection: Injection, reserve: int, limit: int | None = None) -> int | None:
        """How many source tokens fit with `injection` and `reserve` target tokens (None: no limit).

        limit: the positions available (default: the model's context; a run's --max-length may lower it).
        """
        limit = limit or self.max_positions
        return None if limit is None else limit - injection.num_positions - reserve

    # --- the one loss and the one scorer ------------------------------------------------------------------------------
    def target_logits(self, examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits predicting every target token: (logits (B, K, V), targets (B, K), mask (B, K)), K the longest target.

        Differentiable: gradients reach the tensors of the examples' injections that need them.
        """
        raise NotImplementedError  # pragma: no cover - abstract

    def next_token_logits(self, examples: list[Example]) -> torch.Tensor:
        """(B, V) logits of the first target token (at the slot) of each example, whose `target` is ignored."""
        raise NotImplementedError  # pragma: no cover - abstract

    def target_log_probs(self, examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(target token) at every target position: (logp (B, K), mask (B, K)), zero where masked."""
        return token_log_probs(*self.target_logits(examples))

    def loss(self, examples: list[Example]) -> torch.Tensor:
        """Mean negative log-likelihood over all target tokens of the batch: the training loss of every method."""
        return mean_nll(*self.target_logits(examples))

    def class_scores(self, rows: list[tuple[Example, list[list[int]]]]) -> list[torch.Tensor]:
        """Log-likelihood of each class's label-word tokens at each row's slot; one (C_i,) tensor per row.

        rows: (example, token ids of every class's label word); rows of any tasks and prompts. The
        single-token classes of a row are read from one prediction at its slot; a multi-token label
        word is scored as that row's target. Differentiable, like `target_logits`.
        """
        singles = [(r, [c for c, v in enumerate(verb) if len(v) == 1]) for r, (_, verb) in enumerate(rows)]
        singles = [(r, cs) for r, cs in singles if cs]
        multi = [(r, c) for r, (_, verb) in enumerate(rows) for c, v in enumerate(verb) if len(v) > 1]
        parts: list[list[torch.Tensor | None]] = [[None] * len(verb) for _, verb in rows]
        if singles:
            logp = self.next_token_logits([rows[r][0] for r, _ in singles]).float().log_softmax(-1)  # (N, V)
            for i, (r, cs) in enumerate(singles):
                verb = rows[r][1]
                for c, s in zip(cs, logp[i, [verb[c][0] for c in cs]].unbind()):
                    parts[r][c] = s
        if multi:
            examples = [rows[r][0].with_target(rows[r][1][c]) for r, c in multi]
            logp, _ = self.target_log_probs(examples)
            for (r, c), s in zip(multi, logp.sum(1).unbind()):
                parts[r][c] = s
        return [torch.stack(p) for p in parts]

    # --- decoding ---------------------------------------------------------------------------------------------------
    def start_decoding(self, examples: list[Example], use_cache: bool = True):
        """Begin decoding after each example's source. Returns (state, logits of the first new token (B, V))."""
        raise ConfigError(f"A {self.name} model cannot generate text.", "use a causal LM or a seq2seq model.")

    def continue_decoding(self, state, tokens: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Feed one new token per row (B,); returns the logits of the next (B, V). Rows stay in their order."""
        raise NotImplementedError

    def check_fits(self, examples: list[Example], max_new_tokens: list[int]) -> None:
        """Raise `InputTooLongError` when a row plus its new tokens exceeds what the model takes."""

    def merges_decoding(self, state) -> bool:
        """Whether rows prefilled apart can join this decoding state (`merge_decoding`) and rows can leave it
        (`select_decoding`): what continuous batching needs. Families whose caches cannot be padded and joined say
        no, and their rows decode in batches that start together."""
        return False

    def merge_decoding(self, state, other):  # pragma: no cover - abstract
        """One decoding state of the rows of `state` followed by those of `other`, each row unchanged."""
        raise NotImplementedError

    def select_decoding(self, state, index: torch.Tensor):  # pragma: no cover - abstract
        """The decoding state of rows `index` (N,) of `state`, in that order; the others leave."""
        raise NotImplementedError

    # --- prompts ----------------------------------------------------------------------------------------------------
    def kv_of_embeddings(self, embeds: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """(L, 2, H_kv, P, hd): the keys/values the frozen model computes for the tokens (P, D) in its prefix layers.

        Initializes KV prefixes from real tokens (Li & Liang 2021, "activations of real words").
        """
        raise NotImplementedError

    def compile(self, injection: Injection) -> Injection:
        """The same prompt with its virtual tokens turned into a KV prefix, where outputs stay identical; else as is."""
        return injection

    # --- training ---------------------------------------------------------------------------------------------------
    def enable_gradient_checkpointing(self) -> None:
        """Turn on transformers' per-layer gradient checkpointing so that KV prefixes survive it.

        transformers drops the cache inside checkpointed layers unless the layer declares that it
        only reads it (`_can_checkpoint_with_cache`), which holds here: training forwards use
        read-only cache layers. Checkpointing only runs for layers in training mode, so that flag
        is set on the layers alone; and since some layers read it for their dropout (BART's), each
        layer's checkpointing function runs the layer itself in eval mode, first pass and recompute
        alike: results are the same with and without checkpointing.
        """
        from transformers.modeling_layers import GradientCheckpointingLayer

        model = self.model
        if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for module in model.modules():
            if isinstance(module, GradientCheckpointingLayer):
                module._can_checkpoint_with_cache = True
                module._gradient_checkpointing_func = _checkpoint_in_eval_mode(module)
                module.training = True

    def disable_gradient_checkpointing(self) -> None:
        from transformers.modeling_layers import GradientCheckpointingLayer

        model = self.model
        if hasattr(model, "activation_checkpointing_disable"):
            model.activation_checkpointing_disable()
        else:
            model.gradient_checkpointing_disable()
        model.disable_input_require_grads()  # enabling added an embedding hook; leave the model as we found it
        for module in model.modules():
            if isinstance(module, GradientCheckpointingLayer):
                module.__dict__.pop("_can_checkpoint_with_cache", None)
                module.training = False


def _checkpoint_in_eval_mode(layer):
    """A layer's `_gradient_checkpointing_func` that runs the layer with `training` off inside the checkpoint."""
    from torch.utils.checkpoint import checkpoint

    def run(function, *args):
        def in_eval_mode(*inputs):
            layer.training = False
            try:
                return function(*inputs)
            finally:
                layer.training = True

        return checkpoint(in_eval_mode, *args, use_reentrant=False)

    return run


def token_log_probs(logits, targets, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """`target_logits`' (logits (B, K, V), targets (B, K), mask (B, K)) -> (log p(target) (B, K), zero where masked;
    mask)."""
    logp = logits.float().log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return logp * mask, mask


def mean_nll(logits, targets, mask) -> torch.Tensor:
    """The mean negative log-likelihood over the unmasked target tokens of `target_logits`' output."""
    logp, mask = token_log_probs(logits, targets, mask)
    return -logp.sum() / mask.sum()


def group_by(keys: list) -> list[list[int]]:
    """Row indices grouped by key, groups in order of first appearance."""
    groups: dict = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    return list(groups.values())


def by_prefix_length(examples: list[Example], run) -> tuple[torch.Tensor, ...]:
    """`run(examples)` -> tensors (B, K, ...) on groups of examples with the same KV-prefix length, back in order.

    For families whose models count positions from the cache length, which is the batch's, not the
    row's: within a group every prefix has the same length, so no row sees another's slots. Tensors
    are zero-padded along dim 1 (K) to the longest group's.
    """
    groups = group_by([e.injection.num_kv for e in examples])
    if len(groups) == 1:
        return run(examples)
    outs = [run([examples[i] for i in g]) for g in groups]
    order = torch.tensor([i for g in groups for i in g]).argsort()
    merged = []
    for parts in zip(*outs):
        if parts[0].dim() > 1:
            K = max(p.shape[1] for p in parts)
            parts = [torch.nn.functional.pad(p, (0, 0) * (p.dim() - 2) + (0, K - p.shape[1])) for p in parts]
        merged.append(torch.cat(parts)[order.to(parts[0].device)])
    return tuple(merged)


def prompt_first(family: Family, seqs: list[list[int]], rows: list[Injection]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded `[virtual tokens | tokens | pads]` rows: (inputs_embeds (B, S, D), attention_mask (B, S)).

    For bidirectional stacks (an encoder), where nothing is decoded after the text and positions
    counted from the first column are every row's own.
    """
    device = family.device
    B = len(seqs)
    S = max(r.num_embeds + len(s) for r, s in zip(rows, seqs))
    ids = torch.full((B, S), family.tokenizer.pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros((B, S), dtype=torch.long, device=device)
    for i, (r, s) in enumerate(zip(rows, seqs)):
        ids[i, r.num_embeds : r.num_embeds + len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : r.num_embeds + len(s)] = 1
    embeds = family.embed(ids)  # (B, S, D)
    if any(r.embeds is not None for r in rows):
        parts = [
            torch.cat([r.embeds.to(device, embeds.dtype), embeds[i, r.num_embeds :]])
            if r.embeds is not None
            else embeds[i]
            for i, r in enumerate(rows)
        ]
        embeds = torch.stack(parts)
    return embeds, mask


def prefix_of(rows: list[Injection], device, dtype) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Per prefix layer (keys, values), each (B, H_kv, K, hd), of rows whose prefixes all have the same length K."""
    if rows[0].kv is None:
        return None
    if len({id(r.kv) for r in rows}) == 1:
        kv = rows[0].kv.to(device, dtype).unsqueeze(0).expand(len(rows), *rows[0].kv.shape)  # a view, no copy
    else:
        kv = torch.stack([r.kv.to(device, dtype) for r in rows])  # (B, L, 2, H_kv, K, hd)
    return [(kv[:, i, 0], kv[:, i, 1]) for i in range(kv.shape[1])]
