"""What the benchmark compares our prompt methods against: a hard prompt, full finetuning, and PEFT.

Each trained baseline is a `PromptMethod`, so it goes through the one training loop (`train.Trainer`)
with the same data stream, optimizer, schedule and seed as our methods:

- `full`: every base weight trainable (the ceiling). Its `forward()` injects nothing; the loss is
  our usual target-token loss through the (now trainable) model.
- `peft-prompt`, `peft-prefix`, `peft-ptuning`, `peft-adapter`, `peft-lora`: Hugging Face PEFT's
  PromptTuning, PrefixTuning (with `prefix_projection`), P-tuning (PromptEncoder), AdaptionPrompt
  (LLaMA-Adapter) and LoRA. They are trained with
  PEFT's own forward and loss (`loss(batch)`, as a PEFT user runs them: right-padded batches, the
  model's cross-entropy over full logits). They are scored by our evaluator on their collapsed
  prompt, which reproduces PEFT's forward on every unpadded row (tested against PEFT's logits):
  PEFT's cached `generate` drops prefix-tuning prompts on transformers 5.x, and PEFT prompt tuning
  ignores position ids under left padding. A PEFT prefix occupies positions (the text starts at
  position P), so its injection carries `kv_positions=P`. AdaptionPrompt wraps the attention modules
  in place: they are swapped in for PEFT's loss and out for our evaluator, which runs PEFT's prompts
  and gates as an `Injection`. LoRA changes the base model in place, so its injection is empty and
  the evaluator runs the LoRA model.

PEFT is an optional dependency (`pip install -e .[bench]`); it is imported only when a PEFT cell
is built.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data import Task, TaskSpec
from ..errors import ConfigError, check_at_least
from ..example import Example
from ..injection import EMPTY, Injection
from ..methods import (
    InitContext,
    LlamaAdapter,
    LlamaAdapterConfig,
    MethodConfig,
    PrefixTuning,
    PromptMethod,
    PTuning,
    PTuningConfig,
    SoftPrompt,
)
from ..methods.soft import SoftPromptConfig


@dataclass
class Options:
    """Options of a baseline that has no virtual tokens (MethodConfig's dict round trip without P)."""

    to_dict = MethodConfig.to_dict
    from_dict = MethodConfig.__dict__["from_dict"]


# --- hard prompt -----------------------------------------------------------------------------------------------------


@dataclass
class HardConfig(Options):
    template: str = field(
        default="search",
        metadata={
            "help": "'search': the best of the task's built-in candidate templates and label words, ranked on a search "
            "split carved from train (`softprompt search templates`); 'default': the task's own template; or a "
            "template string with the task's {fields}"
        },
    )
    search_size: int = field(default=256, metadata={"help": "train rows the template search ranks on"})


def hard_prompt_spec(base, task: Task, config: HardConfig, seed: int = 0) -> TaskSpec:
    """The spec (template + verbalizers) a 'hard' cell scores zero-shot."""
    if config.template == "default":
        return task.spec
    if config.template == "search":
        from ..search import Candidates, rank_templates

        if not task.spec.is_classification or Candidates.builtin_path(task.spec) is None:
            return task.spec  # nothing to search (generation, or no built-in candidates); the record names the template
        ranking, _ = rank_templates(
            base, task, Candidates.load(None, task.spec), config.search_size, seed, progress=False
        )
        return ranking[0].spec
    return dataclasses.replace(task.spec, template=config.template)


# --- full finetuning -------------------------------------------------------------------------------------------------


@dataclass
class FullConfig(Options):
    pass


class FullFinetune(PromptMethod):
    """Full finetuning: all weights of the base model train (the ceiling of the comparison).

    Holds the base model itself, so `parameters()` are its weights; injects nothing. The model is
    changed in place: a cell that uses this must own its `Base`.
    """

    name = "full"
    config_class = FullConfig
    fills = ()
    default_lr = 3e-5  # AdamW, ~100 steps at batch 8 on a 135M model; not tuned

    def __init__(self, config: FullConfig, ctx: InitContext):
        super().__init__(config)
        self.model = ctx.base.model.requires_grad_(True)

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()  # the model runs as in every other cell (no dropout); only its weights learn
        return self

    def forward(self) -> Injection:
        return EMPTY

    def artifact(self, directory: Path) -> tuple[int, int]:
        """(parameters, bytes) of what a user keeps: a full copy of the weights (not written, counted)."""
        weights = list(self.model.parameters())
        return sum(p.numel() for p in weights), sum(p.numel() * p.element_size() for p in weights)


# --- PEFT ------------------------------------------------------------------------------------------------------------


class PeftMethod(PromptMethod):
    """A PEFT model trained with PEFT's own forward and loss; the base model is wrapped (LoRA: changed in place)."""

    def __init__(self, config, ctx: InitContext):
        super().__init__(config)
        from peft import get_peft_model

        from ..peft_format import TASK_TYPES

        if TASK_TYPES[ctx.base.family.name] != "CAUSAL_LM":
            raise ConfigError(
                f"The PEFT baseline '{self.name}' is trained like a PEFT causal-LM user trains it; the base "
                f"model '{ctx.base.name}' is a {ctx.base.family.name} model.",
                "leave PEFT cells out of the grid for this model (keep softprompt's methods).",
            )
        self.peft = get_peft_model(ctx.base.model, self.peft_config(ctx))
        self.pad_id = ctx.base.tokenizer.pad_token_id

    def peft_config(self, ctx: InitContext):  # pragma: no cover - abstract
        raise NotImplementedError

    def train(self, mode: bool = True):
        super().train(mode)
        self.peft.get_base_model().eval()
        return self

    def loss(self, batch: list[Example]) -> torch.Tensor:
        """PEFT's loss on our micro-batch, padded on the right (PEFT's layout: prompt, text, pads)."""
        ids, mask, labels = _right_padded(batch, self.pad_id)
        dev = self.peft.get_base_model().device
        return self.peft(input_ids=ids.to(dev), attention_mask=mask.to(dev), labels=labels.to(dev)).loss

    def artifact(self, directory: Path) -> tuple[int, int]:
        """(parameters, bytes) of PEFT's saved adapter (`save_pretrained`: safetensors + config)."""
        from peft import get_peft_model_state_dict

        self.peft.save_pretrained(directory)
        params = sum(t.numel() for t in get_peft_model_state_dict(self.peft).values())
        return params, sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())


def _right_padded(batch: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels), each (B, T): every row's prompt and target tokens from column 0 on."""
    seqs = [e.source[: e.slot] + e.target for e in batch]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (s, e) in enumerate(zip(seqs, batch)):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
        labels[i, len(s) - len(e.target) : len(s)] = torch.tensor(e.target)
    return ids, mask, labels


class PeftEmbeddingsMethod(PeftMethod):
    """A PEFT method whose prompt is (P, D) input embeddings (PromptTuning, P-tuning).

    When `copies_init()`, PEFT's prompt embedding starts as softprompt's initial prompt for the
    same init and seed, so both tools start from the same tensor.
    """

    fills = ("embeds",)

    def __init__(self, config: SoftPromptConfig, ctx: InitContext):
        super().__init__(config, ctx)
        if self.copies_init():
            with torch.no_grad():
                self.peft.prompt_encoder["default"].embedding.weight.copy_(
                    ctx.embeddings(config.init, config.num_virtual_tokens, config.init_text)
                )  # (P, D)

    def copies_init(self) -> bool:
        return True

    def forward(self) -> Injection:
        return Injection(embeds=self.peft.get_prompt(batch_size=1)[0])  # (P, D)


PEFT_PROMPT_INITS = {"random": "RANDOM", "text": "TEXT", "vocab": "SAMPLE_VOCAB"}


@dataclass
class PeftPromptConfig(SoftPromptConfig):
    copy_init: bool = field(
        default=False,
        metadata={
            "help": "start from softprompt's initial prompt for this init and seed instead of PEFT's own "
            "PromptTuningInit (always so for init labels, which PEFT lacks)"
        },
    )


class PeftPrompt(PeftEmbeddingsMethod):
    """PEFT PromptTuning (Lester et al. 2021): (P, D) prompt embeddings, prepended by PEFT."""

    name = "peft-prompt"
    config_class = PeftPromptConfig
    default_lr = SoftPrompt.default_lr

    def copies_init(self) -> bool:
        return self.config.copy_init or self.config.init not in PEFT_PROMPT_INITS

    def peft_config(self, ctx: InitContext):
        from peft import PromptTuningConfig, TaskType

        c = self.config
        init = "RANDOM" if self.copies_init() else PEFT_PROMPT_INITS[c.init]
        # PEFT's TEXT init reloads the tokenizer from its path
        text = (
            {"prompt_tuning_init_text": c.init_text, "tokenizer_name_or_path": ctx.base.tokenizer.name_or_path}
            if init == "TEXT"
            else {}
        )
        return PromptTuningConfig(
            task_type=TaskType.CAUSAL_LM, num_virtual_tokens=c.num_virtual_tokens, prompt_tuning_init=init, **text
        )


@dataclass
class PeftPrefixConfig(MethodConfig):
    num_virtual_tokens: int = field(default=10, metadata={"help": "number of virtual tokens P"})
    prefix_hidden: int = field(
        default=512, metadata={"help": "width of the reparametrization MLP (PEFT encoder_hidden_size)"}
    )
    projection: bool = field(
        default=True, metadata={"help": "PEFT prefix_projection (the MLP); false: direct per-layer prefixes"}
    )


class PeftPrefix(PeftMethod):
    """PEFT PrefixTuning (Li & Liang 2021): per-layer keys/values, from an MLP when `projection`."""

    name = "peft-prefix"
    config_class = PeftPrefixConfig
    fills = ("kv",)
    default_lr = PrefixTuning.default_lr

    def peft_config(self, ctx: InitContext):
        from peft import PrefixTuningConfig, TaskType

        c = self.config
        return PrefixTuningConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=c.num_virtual_tokens,
            encoder_hidden_size=c.prefix_hidden,
            prefix_projection=c.projection,
        )

    def forward(self) -> Injection:
        cache = self.peft.get_prompt(batch_size=1)
        kv = torch.stack(
            [torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers]
        )  # (L, 2, H_kv, P, hd)
        # PEFT puts the prefix in the cache, so the text's positions start after it
        return Injection(kv=kv, kv_positions=kv.shape[3])


class PeftPTuning(PeftEmbeddingsMethod):
    """PEFT P-tuning (Liu et al. 2021, PromptEncoder): an LSTM or MLP encoder produces the (P, D) prompt.

    PEFT has no init options for it; its input embedding starts as softprompt's initial prompt.
    """

    name = "peft-ptuning"
    config_class = PTuningConfig
    default_lr = PTuning.default_lr

    def peft_config(self, ctx: InitContext):
        from peft import PromptEncoderConfig, TaskType

        c = self.config
        return PromptEncoderConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=c.num_virtual_tokens,
            encoder_reparameterization_type=c.encoder.upper(),
            encoder_hidden_size=c.encoder_hidden or ctx.hidden_size,
        )


class PeftAdapter(PeftMethod):
    """PEFT AdaptionPrompt (LLaMA-Adapter, Zhang et al. 2023): gated adaption prompts in the last layers.

    PEFT starts its prompts from a standard Gaussian of its own and its gates at zero; the prompts here start as
    softprompt's for the same init and seed, so both tools start from the same tensors.
    """

    name = "peft-adapter"
    config_class = LlamaAdapterConfig
    fills = ("adapter",)
    default_lr = LlamaAdapter.default_lr

    def __init__(self, config: LlamaAdapterConfig, ctx: InitContext):
        self.layers = len(ctx.base.family.adaption_layers(config.adapter_layers))  # refuses what PEFT would not run
        super().__init__(config, ctx)
        start = LlamaAdapter(config, ctx).adapter.detach()  # (L, K, D)
        # PEFT's AdaptedAttention modules, bottom to top: each holds one layer's prompt (1, K, D) and gate (1,)
        self.adapted = [m for m in self.peft.modules() if hasattr(m, "adaption_gate")]
        with torch.no_grad():
            for m, p in zip(self.adapted, start):
                m.adaption_prompt.copy_(p[None])
        self.swapped_in = True

    def peft_config(self, ctx: InitContext):
        from peft import AdaptionPromptConfig, TaskType

        c = self.config
        return AdaptionPromptConfig(
            task_type=TaskType.CAUSAL_LM, adapter_len=c.num_virtual_tokens, adapter_layers=self.layers
        )

    def _swap(self, adapted: bool) -> None:
        if adapted != self.swapped_in:
            base = self.peft.base_model  # PEFT's AdaptionPromptModel
            base.enable_adapter_layers() if adapted else base.disable_adapter_layers()
            self.swapped_in = adapted

    def loss(self, batch: list[Example]) -> torch.Tensor:
        self._swap(True)
        return super().loss(batch)

    def artifact(self, directory: Path) -> tuple[int, int]:
        self._swap(True)  # PEFT saves the prompts of the modules in place
        return super().artifact(directory)

    def forward(self) -> Injection:
        self._swap(False)  # our evaluator runs PEFT's tensors through the frozen model
        adapter = torch.cat([m.adaption_prompt for m in self.adapted])  # (L, K, D)
        return Injection(adapter=adapter, gate=torch.cat([m.adaption_gate for m in self.adapted]))  # gate (L,)


@dataclass
class LoraOptions(Options):
    r: int = field(default=8, metadata={"help": "LoRA rank"})
    alpha: int = field(default=16, metadata={"help": "LoRA alpha (scale alpha / r)"})
    target_modules: list[str] | None = field(
        default=None, metadata={"help": "modules to adapt (default: PEFT's per-architecture choice, q/v proj)"}
    )

    def __post_init__(self):
        check_at_least(self, 1, "r")


class PeftLora(PeftMethod):
    """PEFT LoRA (Hu et al. 2021), a reference point: low-rank updates inside the base model's layers."""

    name = "peft-lora"
    config_class = LoraOptions
    fills = ()
    default_lr = 5e-4  # a common LoRA rate for short runs; not tuned

    def peft_config(self, ctx: InitContext):
        from peft import LoraConfig, TaskType

        c = self.config
        return LoraConfig(
            task_type=TaskType.CAUSAL_LM, r=c.r, lora_alpha=c.alpha, lora_dropout=0.0, target_modules=c.target_modules
        )

    def forward(self) -> Injection:
        return EMPTY  # the LoRA layers live inside the base model


BASELINES: dict[str, type[PromptMethod]] = {
    m.name: m for m in (FullFinetune, PeftPrompt, PeftPrefix, PeftPTuning, PeftAdapter, PeftLora)
}
