"""Prefix tuning.

Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation" (ACL 2021;
arXiv:2101.00190). Trainable keys and values are prepended in every layer. While training they are
reparametrized, which the paper found necessary for stable optimization: an embedding E (P, D)
goes through a 2-layer MLP (Linear, Tanh, Linear) whose output is every layer's keys and values.
`collapse()` runs the MLP once; prompt files store only its output (a deep-prompt-shaped tensor),
while checkpoints keep E and the MLP so that training can resume.

Shapes: E (P, D) -> MLP -> (P, L * 2 * H_kv * hd) -> Injection.kv (L, 2, H_kv, P, hd).

Positions: the prefix occupies positions 0..P-1 and the text starts at P, as in Li & Liang's GPT-2
code and PEFT (both let the model count positions from the cache length). Initialized from real
tokens' keys/values, the prefix then starts out exactly as if those tokens preceded the text; with
the text at 0 instead, rotary models would see the prefix's keys at the text's own positions
(benchmarks/results/prefix_positions.md scores both placements at init). Under left padding every
row's text still starts at P.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import check_at_least
from ..injection import Injection
from .deep import DeepPromptConfig
from .method import InitContext, PromptMethod, fit_output


@dataclass
class PrefixConfig(DeepPromptConfig):
    prefix_hidden: int = field(
        default=512, metadata={"help": "middle width of the reparametrization MLP (the paper uses 512 or 800)"}
    )

    def __post_init__(self):
        super().__post_init__()
        check_at_least(self, 1, "prefix_hidden")


class PrefixTuning(PromptMethod):
    name = "prefix"
    config_class = PrefixConfig
    default_lr = 3e-4
    fills = ("kv",)

    def __init__(self, config: PrefixConfig, ctx: InitContext):
        super().__init__(config)
        lay = ctx.base.kv_layout
        P, D, H = config.num_virtual_tokens, ctx.hidden_size, config.prefix_hidden
        self.shape = (P, lay.num_layers, 2, lay.num_kv_heads, lay.head_dim)
        width = lay.num_layers * 2 * lay.num_kv_heads * lay.head_dim
        target = ctx.key_values(config.init, P, config.init_text, config.init_prompt)  # drawn first: as `deep`'s
        self.embedding = nn.Parameter(ctx.random(P))  # (P, D)
        with ctx.seeded():
            self.mlp = nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, width))
        with torch.no_grad():  # the MLP starts out producing `target` exactly
            h = self.mlp[1](self.mlp[0](self.embedding))  # (P, hidden)
            fit_output(self.mlp[2], h, target.permute(3, 0, 1, 2, 4).reshape(P, width))  # (P, L*2*H_kv*hd)
        self.to(ctx.base.device)

    def forward(self) -> Injection:
        flat = self.mlp(self.embedding)  # (P, L*2*H_kv*hd)
        kv = flat.view(*self.shape).permute(1, 2, 3, 0, 4)  # (L, 2, H_kv, P, hd)
        return Injection(kv=kv, kv_positions=self.shape[0])
