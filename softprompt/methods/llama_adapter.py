"""LLaMA-Adapter: adaption prompts in the last layers, read through zero-initialized gated attention.

Zhang, Han, Liu, Zhou, Lu, Hu, Yan, Gao & Qiao 2023, "LLaMA-Adapter: Efficient Fine-tuning of
Language Models with Zero-init Attention" (ICLR 2024; arXiv:2303.16199). In each of the last L
attention layers, K trainable prompt vectors are projected by the layer's frozen key and value
projections. Every token attends to them in a softmax of their own, whose output is scaled by a
trainable gate per layer that starts at zero, so training starts from the frozen model's outputs
exactly and the prompts come in as the gates open. The prompts take no positions; the family runs
the gated attention (`families/adaption.py`).

Shapes: adapter (L, K, D) -> Injection.adapter; gate (L,) -> Injection.gate. D the hidden size; L
the last attention layers (all of them by default), K = num_virtual_tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import check_at_least
from ..injection import Injection
from .method import InitContext, MethodConfig, PromptMethod

INITS = ("normal", "random", "vocab", "text", "labels")


@dataclass
class LlamaAdapterConfig(MethodConfig):
    num_virtual_tokens: int = field(default=10, metadata={"help": "number of virtual tokens P"})
    adapter_layers: int | None = field(
        default=None, metadata={"help": "adapt the last N attention layers (default: all; the paper: 30 of 32)"}
    )
    init: str = field(
        default="normal",
        metadata={
            "help": "initialization of the adaption prompts (the gates start at zero whatever it is): normal "
            "(standard Gaussian, as the paper's code and PEFT), random (Gaussian at the embedding scale), vocab, "
            "text (--init-text) or labels (token embeddings, as for soft prompts)"
        },
    )
    init_text: str | None = field(default=None, metadata={"help": "text whose token embeddings start the prompts"})

    def __post_init__(self):
        super().__post_init__()
        self.choice("init", INITS)
        check_at_least(self, 1, "adapter_layers")


class LlamaAdapter(PromptMethod):
    name = "llama-adapter"
    config_class = LlamaAdapterConfig
    default_lr = 1e-2
    fills = ("adapter",)

    def __init__(self, config: LlamaAdapterConfig, ctx: InitContext):
        super().__init__(config)
        L = len(ctx.base.family.adaption_layers(config.adapter_layers))  # refuses a model that takes none
        K, D = config.num_virtual_tokens, ctx.hidden_size
        if config.init == "normal":
            init = torch.randn(L, K, D, generator=ctx.generator)
        else:
            init = ctx.embeddings(config.init, L * K, config.init_text).view(L, K, D)
        self.adapter = nn.Parameter(init.to(ctx.base.device))  # (L, K, D)
        self.gate = nn.Parameter(torch.zeros(L, device=ctx.base.device))  # (L,) zero-init attention

    def forward(self) -> Injection:
        return Injection(adapter=self.adapter, gate=self.gate)
