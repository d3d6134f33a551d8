"""Gated attention over adaption prompts (LLaMA-Adapter), through transformers' `AttentionInterface`.

The model's attention implementation (sdpa, eager, ...) is swapped for a wrapper registered under a
name of its own, `softprompt_adaption_<inner>`, with the inner implementation's mask function. The
wrapper runs the inner function unchanged. In the layers that an `Adaption` passed with the call
names, it adds each row's gated attention over that row's adaption prompt:

    out = attention(q, k, v) + gate * softmax(q k_a^T * scaling) v_a

q (B, H, T, hd) is the query as the layer's attention gets it (normalized and rotated where the
model does that). k_a and v_a (B, H_kv, K, hd) are the layer's own `k_proj` and `v_proj` of the
prompt (K, D). They carry no positions and no key norm, as in Zhang et al. 2023 and PEFT. The sum is
taken before `o_proj`; PEFT adds `o_proj` of the adapter's output after it, which is the same for a
bias-free `o_proj` (Llama's). A call without an `Adaption` is the inner function's call, bit for bit.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch

KWARG = "softprompt_adaption"  # the forward keyword that carries an `Adaption` to every attention call
PREFIX = "softprompt_adaption_"


@dataclass
class Adaption:
    """The adaption prompts of a batch, for one forward.

    prompts: per adapted layer, (B, K, D) each row's prompt, zero-padded to the longest K.
    valid: (B, K) which slots hold a row's prompt (a row without one has every slot valid and gate 0: its
        term is exactly zero, where an all-masked softmax would give NaN).
    gate: (B, L_a) each row's gate per adapted layer.
    layers: model layer index -> index into `prompts`.
    seen: the layer indices whose attention met this object with k_proj and v_proj (what `probe` reads).
    """

    prompts: list[torch.Tensor]
    valid: torch.Tensor
    gate: torch.Tensor
    layers: dict[int, int]
    seen: set[int] = field(default_factory=set)

    def select(self, index: torch.Tensor) -> Adaption:
        """The rows `index` (N,), in that order."""
        return Adaption([p[index] for p in self.prompts], self.valid[index], self.gate[index], self.layers)


def attend(module, query: torch.Tensor, adaption: Adaption, j: int, scaling: float) -> torch.Tensor:
    """(B, T, H, hd): the gated attention of `query` (B, H, T, hd) over layer j's adaption prompts."""
    p = adaption.prompts[j]  # (B, K, D)
    B, K, _ = p.shape
    hd = query.shape[-1]
    k = module.k_proj(p).view(B, K, -1, hd).transpose(1, 2)  # (B, H_kv, K, hd)
    v = module.v_proj(p).view(B, K, -1, hd).transpose(1, 2)
    rep = query.shape[1] // k.shape[1]  # grouped-query attention: each key/value head serves `rep` query heads
    k, v = k.repeat_interleave(rep, 1).to(query.dtype), v.repeat_interleave(rep, 1).to(query.dtype)  # (B, H, K, hd)
    scores = (query @ k.transpose(2, 3)) * scaling  # (B, H, T, K)
    scores = scores.masked_fill(~adaption.valid[:, None, None, :], float("-inf"))
    gate = adaption.gate[:, j].to(query.dtype).view(B, 1, 1, 1)
    probs = gate * scores.softmax(-1, dtype=torch.float32).to(query.dtype)  # a softmax of its own, then the gate
    return (probs @ v).transpose(1, 2)  # (B, T, H, hd)


def _inner_function(module, inner: str):
    if inner == "eager":  # each model defines its own eager attention (softcapping, sinks, ...) next to its module
        return sys.modules[type(module).__module__].eager_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[inner]


def _wrapper(inner: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        adaption = kwargs.pop(KWARG, None)
        out, weights = _inner_function(module, inner)(module, query, key, value, attention_mask, **kwargs)
        layer = getattr(module, "layer_idx", None)
        if adaption is None or not (hasattr(module, "k_proj") and hasattr(module, "v_proj")):
            return out, weights
        adaption.seen.add(layer)
        j = adaption.layers.get(layer)
        if j is not None:
            scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
            out = out + attend(module, query, adaption, j, scaling).to(out.dtype)
        return out, weights

    return attention


def inner_implementation(model) -> str:
    """The attention implementation the model runs under the wrapper (or without it)."""
    return model.config._attn_implementation.removeprefix(PREFIX)


def install(model) -> bool:
    """Run the model's attention through the wrapper (idempotent). False where the model cannot switch (its
    attention does not go through `AttentionInterface`); the model is then left as it was."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    inner = inner_implementation(model)
    name = PREFIX + inner
    if model.config._attn_implementation == name:
        return True
    AttentionInterface.register(name, _wrapper(inner))
    if inner in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner])
    try:
        model.set_attn_implementation(name)
    except (ValueError, KeyError, ImportError):
        return False
    return model.config._attn_implementation == name  # some models only warn that they cannot switch


def uninstall(model) -> None:
    """Back to the inner implementation."""
    inner = inner_implementation(model)
    if model.config._attn_implementation != inner:
        model.set_attn_implementation(inner)
