"""Deep prompts (P-tuning v2).

Liu, Ji, Fu, Tam, Du, Yang & Tang 2022, "P-Tuning v2: Prompt Tuning Can Be Comparable to
Fine-tuning Universally Across Scales and Tasks" (ACL 2022; arXiv:2110.07602). Trainable keys and
values are prepended in every layer, trained directly (no reparametrization).

Shapes: kv (L, 2, H_kv, P, hd) -> Injection.kv, the same, taking positions 0..P-1 (see prefix.py). L layers,
H_kv key/value heads (fewer than query heads under grouped-query attention), hd the head size; all read from the
model config.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..injection import Injection
from .method import PROMPT_HELP, InitContext, MethodConfig, PromptMethod

KV_INITS = ("vocab", "labels", "text", "random", "zero", "prompt")


@dataclass
class DeepPromptConfig(MethodConfig):
    num_virtual_tokens: int = field(default=10, metadata={"help": "number of virtual tokens P"})
    init: str = field(
        default="vocab",
        metadata={
            "help": "initialization of the prefixes: the frozen model's keys/values of vocab (sampled frequent "
            "tokens), labels (class words first), text (--init-text) or random embeddings, zero, or prompt (a "
            "trained prompt file of this base model, --init-prompt: its keys/values, or those of its embeddings)"
        },
    )
    init_text: str | None = field(default=None, metadata={"help": "text whose tokens' keys/values start the prompt"})
    init_prompt: str | None = field(default=None, metadata={"help": PROMPT_HELP})

    def __post_init__(self):
        super().__post_init__()
        self.choice("init", KV_INITS)


class DeepPrompt(PromptMethod):
    name = "deep"
    config_class = DeepPromptConfig
    default_lr = 1e-2
    fills = ("kv",)

    def __init__(self, config: DeepPromptConfig, ctx: InitContext):
        super().__init__(config)
        kv = ctx.key_values(config.init, config.num_virtual_tokens, config.init_text, config.init_prompt)
        self.kv = nn.Parameter(kv.to(ctx.base.device))  # (L, 2, H_kv, P, hd)

    def forward(self) -> Injection:
        # The prefix takes positions 0..P-1 and the text follows, as for the real tokens it starts from.
        return Injection(kv=self.kv, kv_positions=self.kv.shape[3])
