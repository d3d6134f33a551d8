"""P-tuning (v1).

Liu, Zheng, Du, Ding, Qian, Yang & Tang 2021, "GPT Understands, Too" (arXiv:2103.10385). The
virtual-token embeddings are produced by a prompt encoder instead of being free parameters: a
bidirectional LSTM followed by a ReLU MLP (the paper's choice), or an MLP alone. `collapse()` runs
the encoder once, so prompt files store only its output (a soft-prompt-shaped tensor); checkpoints
keep the encoder so training can resume.

Shapes: E (P, D) -> [LSTM (P, 2H)] -> MLP -> Injection.embeds (P, D). H = encoder_hidden.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import check_at_least
from ..injection import Injection
from .method import InitContext, PromptMethod, fit_output
from .soft import SoftPromptConfig


@dataclass
class PTuningConfig(SoftPromptConfig):
    encoder: str = field(
        default="lstm", metadata={"help": "prompt encoder: lstm (bidirectional LSTM + MLP, the paper's) or mlp"}
    )
    encoder_hidden: int | None = field(
        default=None, metadata={"help": "encoder width (default: the model's hidden size)"}
    )

    def __post_init__(self):
        super().__post_init__()
        self.choice("encoder", ("lstm", "mlp"))
        check_at_least(self, 1, "encoder_hidden")


class PTuning(PromptMethod):
    name = "ptuning"
    config_class = PTuningConfig
    default_lr = 1e-3
    fills = ("embeds",)

    def __init__(self, config: PTuningConfig, ctx: InitContext):
        super().__init__(config)
        D = ctx.hidden_size
        H = config.encoder_hidden or D
        P, transfer = config.num_virtual_tokens, config.init == "prompt"
        # prompt transfer: the encoder's input starts as sampled vocab, its last layer is fit to the source below
        self.embedding = nn.Parameter(ctx.embeddings("vocab" if transfer else config.init, P, config.init_text))
        with ctx.seeded():
            if config.encoder == "lstm":
                self.lstm = nn.LSTM(D, H, num_layers=2, bidirectional=True, batch_first=True)
                self.mlp = nn.Sequential(nn.Linear(2 * H, H), nn.ReLU(), nn.Linear(H, D))
            else:
                self.lstm = None
                self.mlp = nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, D))
        if transfer:
            with torch.no_grad():  # the encoder starts out producing the source prompt's embeddings exactly
                fit_output(self.mlp[-1], self._hidden()[0], ctx.prompt_embeddings(P, config.init_prompt))
        self.to(ctx.base.device)

    def _hidden(self) -> torch.Tensor:
        """(1, P, H) the encoder's activations that feed its last layer."""
        x = self.embedding[None]  # (1, P, D)
        if self.lstm is not None:
            x = self.lstm(x)[0]  # (1, P, 2H)
        return self.mlp[:-1](x)

    def forward(self) -> Injection:
        return Injection(embeds=self.mlp[-1](self._hidden())[0])  # (P, D)
