"""softprompt: prompt-based parameter-efficient finetuning of frozen language models.

import softprompt as sp
base = sp.load_base("smollm2")                      # frozen model + tokenizer
task = sp.load_task("sst2")                         # data, template, verbalizers
result = sp.train(base, task, "soft", sp.SoftPromptConfig(num_virtual_tokens=20))
result.prompt.save("sst2.safetensors")              # one small file per task
prompt = sp.load_prompt("sst2.safetensors", base)   # refuses prompts made for another model
sp.evaluate(base, task, prompt)
"""

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from ._version import __version__  # noqa: E402
from .base import Base, Fingerprint, load_base  # noqa: E402
from .data import Task, TaskSpec, load_task  # noqa: E402
from .errors import SoftpromptError  # noqa: E402
from .evaluate import evaluate  # noqa: E402
from .generate import Sampling, generate_ids  # noqa: E402
from .hub import from_pretrained, push_to_hub  # noqa: E402
from .injection import Injection  # noqa: E402
from .methods import METHODS, MethodConfig, PromptMethod, SoftPromptConfig  # noqa: E402
from .mpt_source import train_source  # noqa: E402
from .store import Prompt, Store, load_prompt  # noqa: E402
from .train import TrainConfig, TrainResult, train  # noqa: E402
from .transfer import rank_sources, similarity  # noqa: E402

__all__ = [
    "Base",
    "Fingerprint",
    "Injection",
    "METHODS",
    "MethodConfig",
    "Prompt",
    "PromptMethod",
    "Sampling",
    "SoftPromptConfig",
    "SoftpromptError",
    "Store",
    "Task",
    "TaskSpec",
    "TrainConfig",
    "TrainResult",
    "__version__",
    "evaluate",
    "from_pretrained",
    "generate_ids",
    "load_base",
    "load_prompt",
    "load_task",
    "push_to_hub",
    "rank_sources",
    "similarity",
    "train",
    "train_source",
]
