"""What every prompt method shares: a config base class, the module contract, and init helpers.

A method is an `nn.Module` holding only its trainable tensors. Calling it returns an `Injection`
(see `softprompt.injection`); it never sees the base model's forward. After training, `collapse()`
gives the plain tensors that a prompt file stores (an encoder or reparametrization MLP is run once
and dropped), while `state_dict()` keeps everything for resumable checkpoints.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from ..errors import ConfigError, check_choice, check_keys, check_types
from ..injection import Injection

PROMPT_HELP = (
    "prompt file (of this base model, e.g. trained on a related task) whose first virtual tokens start this "
    "prompt (init prompt; Vu et al. 2022's prompt transfer)"
)


@dataclass
class MethodConfig:
    """Options shared by all continuous prompt methods."""

    num_virtual_tokens: int = field(default=20, metadata={"help": "number of virtual tokens P"})

    def __post_init__(self):
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens <= 0:
            raise ConfigError(
                f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}.",
                "pass --num-virtual-tokens N with N >= 1 (20 is a good start).",
            )
        # methods that start from a text or a trained prompt have `init` and `init_text` / `init_prompt`; one given
        # with another init would be ignored
        init = getattr(self, "init", None)
        for source in ("text", "prompt"):
            if getattr(self, f"init_{source}", None) is not None and init != source:
                raise ConfigError(
                    f"--init-{source} was given with --init {init}, which does not use it.",
                    f"pass --init {source} to start from the {source}, or drop --init-{source}.",
                )
        check_types(self)  # a bench grid's `config:` or a --config file passes any YAML value (`init_text: 5`)

    def choice(self, name: str, allowed: tuple[str, ...]) -> None:
        """Validate an enum-like option, naming the flag to fix."""
        check_choice(self, name, allowed)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MethodConfig:
        check_keys(cls, d, f"{cls.__name__} option")
        return cls(**d)


class InitContext:
    """What a method may use to initialize itself: the frozen base model and the task's words.

    label_words: the verbalizer strings as they follow the prompt (e.g. " positive").
    texts: the task's training text; its most frequent tokens are the pool for vocab sampling.
    generator: seeded, so initialization is reproducible.
    """

    def __init__(self, base, label_words: list[str] | None = None, texts: list[str] | None = None, seed: int = 0):
        self.base = base
        self.label_words = list(label_words or [])
        self.texts = texts
        self.generator = torch.Generator().manual_seed(seed)

    @cached_property
    def frequent_ids(self) -> torch.Tensor | None:
        """Token ids ranked by frequency in `texts` (computed on first use: only some inits need it)."""
        from ..data import frequent_token_ids

        return frequent_token_ids(self.base.tokenizer, self.texts) if self.texts else None

    @contextmanager
    def seeded(self):
        """Run a block (e.g. creating nn.Linear layers, which draw from torch's global RNG) under a seed taken
        from this context's generator, without disturbing the caller's global random state."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**31, (1,), generator=self.generator)))
            yield

    @property
    def hidden_size(self) -> int:
        return self.base.hidden_size

    def _embeddings(self) -> torch.Tensor:
        return self.base.full_embedding_matrix().float().cpu()  # (V, D), gathered if sharded (ZeRO-3)

    def token_ids(self, text: str) -> torch.Tensor:
        return torch.tensor(self.base.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)

    def random(self, n: int) -> torch.Tensor:
        """(n, D) Gaussian noise at the scale of the embedding matrix (whose std differs a lot between models)."""
        std = self._embeddings().std()
        return torch.randn(n, self.hidden_size, generator=self.generator) * std

    def vocab(self, n: int, top: int = 5000) -> torch.Tensor:
        """(n, D) embeddings of tokens drawn from the `top` most frequent ids (Lester et al.'s sampled vocab)."""
        pool = self.frequent_ids
        if pool is None or len(pool) == 0:
            # Without task text, byte-level BPE merge order is a fair proxy for frequency.
            special = set(self.base.tokenizer.all_special_ids)
            pool = torch.tensor(
                [i for i in range(min(len(self.base.tokenizer), top + len(special))) if i not in special]
            )
        pool = pool[:top]
        pick = (
            pool[torch.randint(len(pool), (n,), generator=self.generator)]
            if n > len(pool)
            else pool[torch.randperm(len(pool), generator=self.generator)[:n]]
        )
        return self._embeddings()[pick]

    def text(self, n: int, text: str | None) -> torch.Tensor:
        """(n, D) embeddings of the tokens of `text`, cut or cycled to n."""
        if not text:
            raise ConfigError("init 'text' needs a text.", 'pass --init-text "..." (e.g. a task instruction).')
        ids = self.token_ids(text)
        if len(ids) == 0:
            raise ConfigError(f"init text {text!r} has no tokens.", "pass a non-empty --init-text.")
        return self._embeddings()[ids.repeat((n + len(ids) - 1) // len(ids))[:n]]

    def labels(self, n: int) -> torch.Tensor:
        """(n, D): one label word per leading position (multi-token words averaged), the rest sampled vocab.

        Lester et al. 2021, section 3: "class label" initialization.
        """
        if not self.label_words:
            raise ConfigError(
                "init 'labels' needs class labels, but this task has none (generation task).",
                "use --init vocab, random or text for generation tasks.",
            )
        emb = self._embeddings()
        words = [emb[self.token_ids(w)].mean(0) for w in self.label_words[:n]]
        rest = self.vocab(n - len(words)) if n > len(words) else emb[:0]
        return torch.cat([torch.stack(words), rest])

    def source(self, path: str | Path | None, n: int) -> Injection:
        """Prompt transfer (Vu et al. 2022, "SPoT: Better Frozen Model Adaptation through Soft Prompt Transfer"):
        the collapsed injection of the prompt file at `path`, which must have been made for this base model and
        have at least n virtual tokens (the first n start the new prompt)."""
        if not path:
            raise ConfigError(
                "init 'prompt' needs a prompt file to start from.",
                "pass --init-prompt PATH (a prompt trained on this base model, e.g. for a related task).",
            )
        from ..store import load_prompt

        source = load_prompt(path, self.base).injection  # refused unless made for this base model
        have = max(source.num_embeds, source.num_kv)
        if not source.kinds:
            raise ConfigError(
                f"Prompt file {path} is a hard prompt (a template, no tensors): there is nothing to start from.",
                "pass a soft, P-tuning, deep or prefix prompt file as --init-prompt.",
            )
        if have < n:
            raise ConfigError(
                f"Prompt file {path} has {have} virtual tokens, fewer than the {n} asked for.",
                f"pass --num-virtual-tokens {have} (or fewer), or a longer source prompt.",
            )
        return source

    def prompt_embeddings(self, n: int, path: str | Path | None) -> torch.Tensor:
        """(n, D) the first n virtual-token embeddings of a soft or P-tuning prompt file (`source`)."""
        source = self.source(path, n)
        if source.kv is not None:
            raise ConfigError(
                f"Prompt file {path} holds per-layer keys/values, which input embeddings cannot start from.",
                "pass a soft or P-tuning prompt as --init-prompt, or train --method deep or prefix from this one.",
            )
        return source.embeds[:n].float().cpu()

    def prompt_key_values(self, n: int, path: str | Path | None) -> torch.Tensor:
        """(L, 2, H_kv, n, hd) the first n positions of a deep or prefix prompt file's keys/values, or the frozen
        model's keys/values of a soft or P-tuning prompt file's first n embeddings (`source`)."""
        source = self.source(path, n)
        if source.kv is None:
            return self.base.family.kv_of_embeddings(source.embeds[:n].float()).float().cpu()
        if source.embeds is not None or source.kv_positions != source.num_kv:
            raise ConfigError(
                f"Prompt file {path} holds keys/values that do not take positions 0..P-1 before the text (a "
                "compiled mixed prompt), so their first positions are not a prefix of their own.",
                "pass a deep, prefix, soft or P-tuning prompt file as --init-prompt.",
            )
        return source.kv[:, :, :, :n].float().cpu()

    def embeddings(self, mode: str, n: int, text: str | None = None, prompt: str | Path | None = None) -> torch.Tensor:
        """(n, D) initial virtual-token embeddings; mode: random | vocab | text | labels | prompt (a trained prompt
        file, `prompt_embeddings`), or auto (labels for a classification task, vocab otherwise)."""
        if mode == "auto":
            mode = "labels" if self.label_words else "vocab"
        return {
            "random": lambda: self.random(n),
            "vocab": lambda: self.vocab(n),
            "text": lambda: self.text(n, text),
            "labels": lambda: self.labels(n),
            "prompt": lambda: self.prompt_embeddings(n, prompt),
        }[mode]()

    def key_values(self, mode: str, n: int, text: str | None = None, prompt: str | Path | None = None) -> torch.Tensor:
        """(L, 2, H_kv, n, hd) initial per-layer prefixes: the frozen model's keys/values of the tokens that
        `embeddings(mode, ...)` gives (Li & Liang 2021 initialize with "activations of real words"), a trained
        prompt file's (`prompt_key_values`), or zeros."""
        lay = self.base.kv_layout
        if mode == "zero":
            return torch.zeros(lay.num_layers, 2, lay.num_kv_heads, n, lay.head_dim)
        if mode == "prompt":
            return self.prompt_key_values(n, prompt)
        return self.base.family.kv_of_embeddings(self.embeddings(mode, n, text)).float().cpu()


@torch.no_grad()
def fit_output(linear: nn.Linear, h: torch.Tensor, target: torch.Tensor) -> None:
    """Set the last layer of a reparametrization so that `linear(h)` is `target` (P, out) exactly: h (P, in) are
    the activations that feed it. With P <= in + 1 and h of full row rank, the least-squares solution of
    [h, 1] @ [W; b] = target is exact (and of minimal norm). A zero target gives a zero layer."""
    if not target.any():
        linear.weight.zero_()
        linear.bias.zero_()
        return
    A = torch.cat([h, torch.ones(h.shape[0], 1, dtype=h.dtype, device=h.device)], dim=1)  # (P, in + 1)
    X = torch.linalg.lstsq(A.double(), target.double(), driver="gelsd").solution  # (in + 1, out)
    linear.weight.copy_(X[:-1].T)
    linear.bias.copy_(X[-1])


class PromptMethod(nn.Module):
    """Base class of prompt methods. Subclasses set `name`, `config_class` and implement `forward`."""

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]
    default_lr: ClassVar[float]  # AdamW learning rate that works for this method at our step budgets
    fills: ClassVar[tuple[str, ...]]  # what its `Injection` holds: "embeds" (virtual tokens), "kv" (KV prefixes)

    def __init__(self, config: MethodConfig):
        super().__init__()
        self.config = config

    def forward(self) -> Injection:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def collapse(self, *args) -> Injection:
        """The injection as plain tensors (float32, detached): what a prompt file stores. `args` go to `forward`
        (MPT's task index)."""
        return self(*args).to(dtype=torch.float32).detach()

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
