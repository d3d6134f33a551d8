"""Tiny randomly initialized models (2 layers, width 64) and a byte-level BPE tokenizer, built in code.

Every contract test runs over both architectures: Llama (rotary positions, grouped-query attention
with 4 query heads and 2 key/value heads) and GPT-2 (learned absolute positions, multi-head).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

_WORDS = ("the a film movie was is great good bad awful boring fun plot acting story actor loved hated "
          "review sentiment positive negative question answer who what where when how many why "
          "location number human entity description abbreviation restaurant food price area near "
          "family friendly name eat type coffee shop pub italian french chinese cheap expensive high low "
          "customer rating yes no maybe premise hypothesis entailment true false and or not of in on to").split()


@pytest.fixture(scope="session")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    g = torch.Generator().manual_seed(0)
    corpus = [" ".join(_WORDS[i] for i in torch.randint(len(_WORDS), (12,), generator=g)) for _ in range(400)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")


def build_tiny(arch: str, tokenizer, seed: int = 0):
    """A frozen `Base` around a tiny random model of the given architecture."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    import softprompt.base

    torch.manual_seed(seed)
    vocab = len(tokenizer)
    if arch == "llama":
        config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    else:
        config = GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=512,
                            eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    import copy

    return softprompt.base.freeze(model, copy.deepcopy(tokenizer), f"tiny-{arch}-seed{seed}")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer):
    """A tiny Llama saved as a Hugging Face model directory (what `--model PATH` loads)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    base = build_tiny("llama", tokenizer)
    base.model.save_pretrained(path)
    base.tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(params=["llama", "gpt2"])
def arch(request):
    return request.param


@pytest.fixture
def base(arch, tokenizer):
    return build_tiny(arch, tokenizer)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Converted models and dataset caches go to a temp dir, never the user's home.
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf-datasets"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if "SOFTPROMPT_CACHE" not in os.environ:
        monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path_factory.getbasetemp() / "softprompt-cache"))


def _task(name):
    import softprompt as sp

    if not (DATA / name).is_dir():
        pytest.skip(f"shared data {DATA / name} not present")
    return sp.load_task(name, data_dir=str(DATA))


@pytest.fixture(scope="session")
def sst2():
    return _task("sst2")


@pytest.fixture(scope="session")
def e2e():
    return _task("e2e_nlg")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("SOFTPROMPT_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="needs the real SmolLM2; run with SOFTPROMPT_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2():
    import softprompt as sp

    return sp.load_base("smollm2")
