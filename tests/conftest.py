"""Tiny randomly initialized models (2 layers, width 64; `zoo.py`) and a byte-level BPE tokenizer, built in code.

Module tests run over two causal architectures: Llama (rotary positions, grouped-query attention
with 4 query heads and 2 key/value heads) and GPT-2 (learned absolute positions, multi-head).
The contract suite (`test_contract.py`) runs over the whole zoo: every causal architecture, the
seq2seq models and the masked LMs.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import DATA, build_tiny, make_prompt, spec_like

_WORDS = [
    "the",
    "a",
    "film",
    "movie",
    "was",
    "is",
    "great",
    "good",
    "bad",
    "awful",
    "boring",
    "fun",
    "plot",
    "acting",
    "story",
    "actor",
    "loved",
    "hated",
    "review",
    "sentiment",
    "positive",
    "negative",
    "question",
    "answer",
    "who",
    "what",
    "where",
    "when",
    "how",
    "many",
    "why",
    "location",
    "number",
    "human",
    "entity",
    "description",
    "abbreviation",
    "restaurant",
    "food",
    "price",
    "area",
    "near",
    "family",
    "friendly",
    "name",
    "eat",
    "type",
    "coffee",
    "shop",
    "pub",
    "italian",
    "french",
    "chinese",
    "cheap",
    "expensive",
    "high",
    "low",
    "customer",
    "rating",
    "yes",
    "no",
    "maybe",
    "premise",
    "hypothesis",
    "entailment",
    "true",
    "false",
    "and",
    "or",
    "not",
    "of",
    "in",
    "on",
    "to",
]


@pytest.fixture(scope="session")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    g = torch.Generator().manual_seed(0)
    corpus = [" ".join(_WORDS[i] for i in torch.randint(len(_WORDS), (12,), generator=g)) for _ in range(400)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["</s>", "<pad>", "<mask>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    # a mask token for masked LMs; "<mask>" absorbs the space before it, as RoBERTa's does
    from tokenizers import AddedToken

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="</s>",
        pad_token="<pad>",
        mask_token=AddedToken("<mask>", lstrip=True, special=True),
    )


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer):
    """A tiny Llama saved as a Hugging Face model directory (what `--model PATH` loads)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    base = build_tiny("llama", tokenizer)
    base.model.save_pretrained(path)
    base.tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def llama(tokenizer):
    return build_tiny("llama", tokenizer)


@pytest.fixture(scope="module")
def store(llama, sst2, e2e, tmp_path_factory):
    """A store of four prompts for the tiny Llama: soft and hard (template only) on SST-2, prefix and soft on E2E."""
    from softprompt.store import Store

    store = Store(tmp_path_factory.mktemp("store"))
    store.save("sst2-soft", make_prompt(llama, sst2.spec, "soft", 3))
    store.save("sst2-hard", make_prompt(llama, spec_like(sst2.spec, template="Is it good? {sentence}\nAnswer:"), None))
    store.save("e2e-prefix", make_prompt(llama, e2e.spec, "prefix", 5, seed=1))
    store.save("e2e-soft", make_prompt(llama, e2e.spec, "soft", 4, seed=2))
    return store


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


_PARITY = pytest.StashKey[list]()


@pytest.fixture
def record_parity(request):
    """Record a parity measurement (a name and a max |difference|); the run's summary lists them all."""

    def record(name: str, diff: float) -> None:
        request.config.stash.setdefault(_PARITY, []).append((name, diff))

    return record


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    found = config.stash.get(_PARITY, [])
    if found:
        terminalreporter.section("parity: max |logit difference|")
        for name, diff in found:
            terminalreporter.write_line(f"{name:40s} {diff:.1e}")
