"""Prompt methods: one file each, registered here by name.

Adding a method means writing its module and adding one line to `METHODS`; nothing else in the
package names methods.
"""

from __future__ import annotations

from ..errors import ConfigError
from .deep import DeepPrompt, DeepPromptConfig
from .llama_adapter import LlamaAdapter, LlamaAdapterConfig
from .method import InitContext, MethodConfig, PromptMethod
from .mpt import MultitaskPrompt, MultitaskPromptConfig
from .prefix import PrefixConfig, PrefixTuning
from .ptuning import PTuning, PTuningConfig
from .soft import SoftPrompt, SoftPromptConfig

METHODS: dict[str, type[PromptMethod]] = {
    m.name: m for m in (SoftPrompt, PrefixTuning, DeepPrompt, PTuning, LlamaAdapter, MultitaskPrompt)
}


def get_method(name: str) -> type[PromptMethod]:
    if not isinstance(name, str) or name not in METHODS:  # `method: [soft]` in a --config file
        raise ConfigError(f"Unknown method '{name}'.", f"use one of {sorted(METHODS)} (--method).")
    return METHODS[name]


def build_method(name: str, config: MethodConfig | dict | None, ctx: InitContext) -> PromptMethod:
    cls = get_method(name)
    if config is None:
        config = cls.config_class()
    elif isinstance(config, dict):
        config = cls.config_class.from_dict(config)
    elif not isinstance(config, cls.config_class):
        raise ConfigError(
            f"Method '{name}' takes a {cls.config_class.__name__}, got {type(config).__name__}.",
            f"pass a {cls.config_class.__name__}.",
        )
    return cls(config, ctx)


__all__ = [
    "METHODS",
    "DeepPrompt",
    "DeepPromptConfig",
    "InitContext",
    "LlamaAdapter",
    "LlamaAdapterConfig",
    "MethodConfig",
    "MultitaskPrompt",
    "MultitaskPromptConfig",
    "PTuning",
    "PTuningConfig",
    "PrefixConfig",
    "PrefixTuning",
    "PromptMethod",
    "SoftPrompt",
    "SoftPromptConfig",
    "build_method",
    "get_method",
]
