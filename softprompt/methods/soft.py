"""Soft prompt tuning.

Lester, Al-Rfou & Constant 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning"
(arXiv:2104.08691). P trainable virtual-token embeddings are prepended to the input embeddings of
a frozen model; only they receive gradients.

Shapes: embedding (P, D) -> Injection.embeds (P, D). D = the model's hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..injection import Injection
from .method import PROMPT_HELP, InitContext, MethodConfig, PromptMethod

INITS = ("auto", "random", "vocab", "text", "labels", "prompt")


@dataclass
class SoftPromptConfig(MethodConfig):
    init: str = field(
        default="auto",
        metadata={
            "help": "initialization: random (Gaussian at the embedding scale), vocab (embeddings of tokens sampled "
            "from the task's 5,000 most frequent), text (embeddings of --init-text), labels (class label words "
            "first, then sampled vocab; Lester et al.'s best), prompt (a trained prompt file of this base model, "
            "--init-prompt: prompt transfer), auto (labels for classification, else vocab)"
        },
    )
    init_text: str | None = field(
        default=None, metadata={"help": "text whose token embeddings start the prompt (init text)"}
    )
    init_prompt: str | None = field(default=None, metadata={"help": PROMPT_HELP})

    def __post_init__(self):
        super().__post_init__()
        self.choice("init", INITS)


class SoftPrompt(PromptMethod):
    name = "soft"
    config_class = SoftPromptConfig
    default_lr = 3e-2
    fills = ("embeds",)

    def __init__(self, config: SoftPromptConfig, ctx: InitContext):
        super().__init__(config)
        init = ctx.embeddings(config.init, config.num_virtual_tokens, config.init_text, config.init_prompt)
        self.embedding = nn.Parameter(init.to(ctx.base.device))  # (P, D)

    def forward(self) -> Injection:
        return Injection(embeds=self.embedding)
