"""The only code that puts prompt embeddings and key/value prefixes into a forward pass.

Prompt methods never touch the model. They return an `Injection`: virtual-token embeddings to
place before the text, per-layer key/value prefixes to place in the attention cache, or both.
This module turns a batch of left-padded token ids plus one injection per row (rows may use
different prompts, methods and lengths) into `inputs_embeds`, `attention_mask`, `position_ids`
and a transformers `Cache`, using only those public arguments of the model's forward.

Layout of row i, with K = the longest KV prefix in the batch and S the sequence length:

    cache (K slots):  [kv prefix of row i | masked slots]
    sequence (S):     [pad ... pad | virtual tokens of row i | text tokens of row i]

The virtual tokens stay adjacent to the text (never `prompt <pad> <pad> text`). Position ids
count from the first non-pad token; a KV prefix takes no positions unless it was compiled from a
soft prompt (`kv_positions`), so the real tokens see the positions they would see without it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import lru_cache

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from .errors import InputTooLongError


@dataclass
class Injection:
    """What a prompt method hands the wrapper.

    embeds: (P_e, D) virtual-token embeddings prepended to the text embeddings.
    kv: (L, 2, H_kv, P_kv, head_dim) keys ([:, 0]) and values ([:, 1]) prepended in every layer.
    kv_positions: how many positions the KV prefix occupies (0 for prefix tuning; P for a soft
        prompt compiled to keys/values, whose keys carry the rotary phases of positions 0..P-1).
    """

    embeds: torch.Tensor | None = None
    kv: torch.Tensor | None = None
    kv_positions: int = 0

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

    def tensors(self) -> dict[str, torch.Tensor]:
        """The collapsed tensors, as stored in a prompt file."""
        out = {}
        if self.embeds is not None:
            out["embeds"] = self.embeds
        if self.kv is not None:
            out["kv"] = self.kv
        return out

    def detach(self) -> "Injection":
        return Injection(*(None if t is None else t.detach().clone() for t in (self.embeds, self.kv)),
                         kv_positions=self.kv_positions)

    def to(self, device=None, dtype=None) -> "Injection":
        return Injection(*(None if t is None else t.to(device=device, dtype=dtype) for t in (self.embeds, self.kv)),
                         kv_positions=self.kv_positions)


EMPTY = Injection()


@dataclass
class ModelInputs:
    """Everything one forward pass needs, already laid out (see the module docstring)."""

    inputs_embeds: torch.Tensor  # (B, S, D)
    attention_mask: torch.Tensor  # (B, K + S), 1 = attend
    position_ids: torch.Tensor  # (B, S)
    prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None  # per layer: keys, values, each (B, H_kv, K, hd)
    labels: torch.Tensor | None = None  # (B, S), -100 where no loss


def _per_row(injections: Injection | list[Injection], batch: int) -> list[Injection]:
    if isinstance(injections, Injection):
        return [injections] * batch
    if len(injections) != batch:
        raise ValueError(f"got {len(injections)} injections for a batch of {batch} rows")
    return list(injections)


def _stack_padded(tensors: list[torch.Tensor | None], dim: int, ref: torch.Tensor, template_shape) -> torch.Tensor:
    """Stack per-row tensors that differ in size along `dim`, zero-filling the tail (masked later)."""
    size = max((t.shape[dim] for t in tensors if t is not None), default=0)
    rows = []
    for t in tensors:
        if t is None:
            shape = list(template_shape)
            shape[dim] = size
            rows.append(ref.new_zeros(shape))
        elif t.shape[dim] < size:
            pad = list(t.shape)
            pad[dim] = size - t.shape[dim]
            rows.append(torch.cat([t, t.new_zeros(pad)], dim=dim))
        else:
            rows.append(t)
    return torch.stack(rows)


def assemble(base, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             injections: Injection | list[Injection], labels: torch.Tensor | None = None,
             max_length: int | None = None) -> ModelInputs:
    """Lay out a left-padded batch with its prompts.

    input_ids, attention_mask, labels: (B, T), left-padded (every row's tokens end at column T-1).
    injections: one `Injection` for every row, or a list with one per row.
    max_length: context limit to check positions against (default: the model's).
    """
    B, T = input_ids.shape
    device, dtype = base.device, base.dtype
    if not bool(attention_mask[:, -1].all()) or bool((attention_mask.diff(dim=1) < 0).any()):
        raise ValueError("assemble() expects left-padded inputs: each row's tokens must end at the last column")
    rows = [inj.to(device, dtype) for inj in _per_row(injections, B)]
    lens = attention_mask.sum(1).to(device)  # (B,) real tokens per row
    n_emb = torch.tensor([r.num_embeds for r in rows], device=device)  # (B,)
    n_kv = torch.tensor([r.num_kv for r in rows], device=device)  # (B,)
    kv_pos = torch.tensor([r.kv_positions for r in rows], device=device)  # (B,)

    limit = max_length or base.max_positions
    longest = int((kv_pos + n_emb + lens).max())
    if limit is not None and longest > limit:
        raise InputTooLongError(
            f"An input needs {longest} positions (virtual tokens + text), more than the model's context of {limit}.",
            "shorten the input, use fewer virtual tokens, or set a truncation policy (--truncate left).")

    tok_emb = base.embed(input_ids.to(device))  # (B, T, D)
    D = tok_emb.shape[-1]
    if any(r.embeds is not None for r in rows):
        prompt = _stack_padded([r.embeds for r in rows], 0, tok_emb, (0, D))  # (B, P_max, D)
        src = torch.cat([tok_emb, prompt], dim=1)  # (B, T + P_max, D)
    else:
        src = tok_emb

    # Gather index for every output slot: pad, virtual token, or text token.
    S = int((n_emb + lens).max())
    s = torch.arange(S, device=device)[None, :]  # (1, S)
    pad = (S - n_emb - lens)[:, None]  # (B, 1) pads before row i's prompt
    in_prompt = (s >= pad) & (s < pad + n_emb[:, None])
    in_text = s >= pad + n_emb[:, None]
    text_idx = (T - lens)[:, None] + (s - pad - n_emb[:, None])  # position in the left-padded input
    idx = torch.where(in_prompt, T + s - pad, torch.where(in_text, text_idx, torch.zeros_like(s)))  # (B, S)
    embeds = src.gather(1, idx[..., None].expand(-1, -1, D))  # (B, S, D)
    seq_mask = s >= pad  # (B, S)
    positions = torch.where(seq_mask, kv_pos[:, None] + s - pad, torch.zeros_like(s))  # (B, S)

    out_labels = None
    if labels is not None:
        picked = labels.to(device).gather(1, idx.clamp(max=T - 1))
        out_labels = torch.where(in_text, picked, torch.full_like(picked, -100))

    prefix_kv, kv_mask = None, seq_mask[:, :0]
    if any(r.kv is not None for r in rows):
        L = base.kv_layout.num_layers
        if len({id(r.kv) for r in rows}) == 1:
            kv = rows[0].kv.unsqueeze(0).expand(B, *rows[0].kv.shape)  # shared prompt: a view, no copy
        else:
            shape = next(r.kv for r in rows if r.kv is not None).shape
            kv = _stack_padded([r.kv for r in rows], 3, tok_emb, shape)  # (B, L, 2, H_kv, K, hd)
        if kv.shape[1] != L:
            raise ValueError(f"KV prefix has {kv.shape[1]} layers, the model has {L}")
        prefix_kv = [(kv[:, layer, 0], kv[:, layer, 1]) for layer in range(L)]
        kv_mask = torch.arange(kv.shape[4], device=device)[None, :] < n_kv[:, None]  # (B, K)
    mask = torch.cat([kv_mask, seq_mask], dim=1).long()
    return ModelInputs(embeds, mask, positions, prefix_kv, out_labels)


class _ReadOnlyPrefixLayer(DynamicLayer):
    """A cache layer holding a fixed prefix: `update` returns prefix + new keys but stores nothing.

    Used for every forward pass that does not decode (training, scoring). Because it never
    mutates, a layer recomputed under gradient checkpointing sees exactly the same keys, which is
    what transformers' `_can_checkpoint_with_cache` contract asks for.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.keys, self.values = keys, values  # (B, H_kv, K, hd)
        self.device = keys.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


def make_cache(base, prefix_kv, for_decoding: bool) -> Cache | None:
    """A read-only prefix cache for one-shot forwards, or a growing DynamicCache for decoding."""
    if not for_decoding:
        if prefix_kv is None:
            return None
        return Cache(layers=[_ReadOnlyPrefixLayer(k, v) for k, v in prefix_kv])
    cache = DynamicCache(config=base.model.config)
    for layer, (k, v) in enumerate(prefix_kv or []):
        cache.update(k.contiguous(), v.contiguous(), layer)
    return cache


@lru_cache(maxsize=None)
def _forward_kwargs(model_cls) -> tuple[str, bool]:
    """(name of the cache argument, whether `logits_to_keep` is accepted) for this model class.

    transformers 5.x renamed `past_key_values` to `cache`; support both spellings.
    """
    params = inspect.signature(model_cls.forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), "logits_to_keep" in params


def run(base, inputs_embeds, attention_mask, position_ids, cache: Cache | None, logits_to_keep: int = 0,
        use_cache: bool = False):
    """One call of the model's forward. Returns (logits (B, S or logits_to_keep, V), cache).

    A passed cache is read whatever `use_cache` says; `use_cache` only asks the model to return it.
    """
    cache_kw, has_keep = _forward_kwargs(type(base.model))
    kwargs = {cache_kw: cache} if cache is not None else {}
    if has_keep:
        kwargs["logits_to_keep"] = logits_to_keep
    out = base.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                     use_cache=use_cache, **kwargs)
    logits = out.logits
    if logits_to_keep and not has_keep:
        logits = logits[:, -logits_to_keep:]
    return logits, getattr(out, cache_kw, None)


def forward(base, inputs: ModelInputs, logits_to_keep: int = 0, for_decoding: bool = False):
    """Forward an assembled batch. Returns (logits, cache); the cache is only kept when decoding."""
    cache = make_cache(base, inputs.prefix_kv, for_decoding)
    return run(base, inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids, cache, logits_to_keep,
               use_cache=for_decoding)


def enable_gradient_checkpointing(base) -> None:
    """Turn on transformers' per-layer gradient checkpointing in a way that keeps KV prefixes.

    transformers drops the cache inside checkpointed layers unless the layer declares that it only
    reads it (`_can_checkpoint_with_cache`), which is true here: training forwards use
    `_ReadOnlyPrefixLayer`. Checkpointing also only runs for layers in training mode; we set that
    flag on the layers alone, not their submodules, so dropout stays off and results are the same
    with and without checkpointing.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    if not hasattr(GradientCheckpointingLayer, "_can_checkpoint_with_cache"):
        raise RuntimeError("this transformers version cannot keep KV prefixes under gradient checkpointing; "
                           "upgrade transformers or train without --gradient-checkpointing")
    model = base.model
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for module in base.model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module._can_checkpoint_with_cache = True
            module.training = True


def disable_gradient_checkpointing(base) -> None:
    from transformers.modeling_layers import GradientCheckpointingLayer

    model = base.model
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()
    model.disable_input_require_grads()  # enabling added an embedding hook; leave the model as we found it
    for module in base.model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.__dict__.pop("_can_checkpoint_with_cache", None)
            module.training = False


@torch.no_grad()
def kv_of_embeddings(base, embeds: torch.Tensor, prefix: Injection = EMPTY) -> torch.Tensor:
    """Run virtual tokens (P, D) through the frozen model and return their keys/values (L, 2, H_kv, K + P, hd).

    With causal attention, what a token stores in the cache depends only on what came before it,
    never on what follows; so a soft prompt's keys/values can be computed once and reused as a
    prefix for any text. `prefix` (a KV prefix already in front of them) is included in the result.
    """
    device, dtype = base.device, base.dtype
    prefix = prefix.to(device, dtype)
    P, K = embeds.shape[0], prefix.num_kv
    kv_layers = None if prefix.kv is None else [(prefix.kv[None, l, 0], prefix.kv[None, l, 1])
                                                for l in range(prefix.kv.shape[0])]
    cache = make_cache(base, kv_layers, for_decoding=True)
    mask = torch.ones(1, K + P, dtype=torch.long, device=device)
    positions = torch.arange(prefix.kv_positions, prefix.kv_positions + P, device=device)[None]
    _, cache = run(base, embeds.to(device, dtype)[None], mask, positions, cache, logits_to_keep=1, use_cache=True)
    return torch.stack([torch.stack([k[0], v[0]]) for k, v, *_ in cache])  # (L, 2, H_kv, K + P, hd)


def compile_injection(base, injection: Injection) -> Injection:
    """The same prompt as a pure KV prefix: its virtual tokens' keys/values computed once.

    Outputs equal the uncompiled prompt's (the text sees the same keys, values and positions), but
    a request no longer pays for the virtual tokens in prefill.
    """
    if injection.embeds is None:
        return injection
    kv = kv_of_embeddings(base, injection.embeds, Injection(kv=injection.kv, kv_positions=injection.kv_positions))
    return Injection(kv=kv, kv_positions=injection.num_positions)
