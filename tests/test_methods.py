"""Method-specific behaviour: shapes from the model config (GQA), initializations, collapse."""

from __future__ import annotations

import pytest
import torch

from softprompt.errors import ConfigError
from softprompt.example import Example
from softprompt.injection import Injection
from softprompt.methods import (
    DeepPromptConfig,
    InitContext,
    PrefixConfig,
    PTuningConfig,
    SoftPromptConfig,
    build_method,
)


def ctx(base, task, seed=0):
    return InitContext(base, task.spec.verbalizers, task.split("train").prompts[:200], seed=seed)


def test_kv_prefix_shapes_come_from_the_config(base, sst2):
    lay = base.kv_layout
    if base.config.model_type == "llama":
        assert (lay.num_kv_heads, lay.head_dim) == (2, 16)  # grouped-query: 4 query heads share 2 KV heads
    for name, cfg in [
        ("prefix", PrefixConfig(num_virtual_tokens=5, prefix_hidden=32)),
        ("deep", DeepPromptConfig(num_virtual_tokens=5)),
    ]:
        kv = build_method(name, cfg, ctx(base, sst2))().kv
        assert kv.shape == (lay.num_layers, 2, lay.num_kv_heads, 5, lay.head_dim)


@pytest.mark.parametrize("init", ["vocab", "labels", "text", "random"])
def test_prefix_mlp_starts_at_the_keys_values_of_its_init(base, sst2, init):
    cfg = dict(num_virtual_tokens=4, init=init, init_text="great movie review" if init == "text" else None)
    prefix = build_method("prefix", PrefixConfig(prefix_hidden=32, **cfg), ctx(base, sst2))
    deep = build_method("deep", DeepPromptConfig(**cfg), ctx(base, sst2))
    torch.testing.assert_close(prefix().kv, deep().kv, rtol=1e-4, atol=1e-4)


def test_zero_init_and_training_parameter_counts(base, sst2):
    lay = base.kv_layout
    prefix = build_method("prefix", PrefixConfig(num_virtual_tokens=4, init="zero", prefix_hidden=32), ctx(base, sst2))
    assert not prefix().kv.any()
    saved = prefix.collapse().kv.numel()
    assert saved == lay.num_layers * 2 * lay.num_kv_heads * 4 * lay.head_dim
    # training holds E (P, D) and the MLP; the file holds only its output
    D, width = base.hidden_size, lay.num_layers * 2 * lay.num_kv_heads * lay.head_dim
    assert prefix.num_trainable() == 4 * D + (D * 32 + 32) + (32 * width + width)


def test_labels_init_puts_label_words_first(base, sst2):
    soft = build_method("soft", SoftPromptConfig(num_virtual_tokens=5, init="labels"), ctx(base, sst2))
    emb = base.embedding_matrix
    for i, word in enumerate(sst2.spec.verbalizers):
        ids = base.tokenizer(word, add_special_tokens=False)["input_ids"]
        torch.testing.assert_close(soft.embedding[i], emb[ids].mean(0))


def test_vocab_init_samples_frequent_task_tokens(base, sst2):
    c = ctx(base, sst2)
    soft = build_method("soft", SoftPromptConfig(num_virtual_tokens=6, init="vocab"), c)
    emb = base.embedding_matrix
    pool = set(c.frequent_ids[:5000].tolist())
    for row in soft.embedding:
        token = int((emb - row).norm(dim=1).argmin())
        assert token in pool


def test_init_is_reproducible_and_leaves_global_rng_alone(base, sst2):
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a = build_method("ptuning", PTuningConfig(num_virtual_tokens=3, encoder_hidden=16), ctx(base, sst2, seed=7))
    assert torch.equal(torch.rand(1), expected)
    b = build_method("ptuning", PTuningConfig(num_virtual_tokens=3, encoder_hidden=16), ctx(base, sst2, seed=7))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("encoder", ["lstm", "mlp"])
def test_ptuning_collapses_to_embeddings(base, sst2, encoder):
    m = build_method(
        "ptuning", PTuningConfig(num_virtual_tokens=3, encoder=encoder, encoder_hidden=16), ctx(base, sst2)
    )
    inj = m.collapse()
    assert inj.embeds.shape == (3, base.hidden_size) and inj.kv is None and not inj.embeds.requires_grad
    assert m.num_trainable() > inj.embeds.numel()


@torch.no_grad()
def test_compiled_soft_prompt_gives_the_same_logits(base, sst2):
    inj = Injection(embeds=torch.randn(4, base.hidden_size) * 0.5)
    compiled = base.family.compile(inj)
    assert compiled.embeds is None and compiled.num_kv == 4 and compiled.kv_positions == 4
    # logits at every text token: each row's first token as the source, the rest (and one more) as its target
    seqs = [base.tokenizer(t)["input_ids"] + [base.tokenizer.eos_token_id] for t in ["a great film", "bad"]]
    ref, _, real = base.family.target_logits([Example(s[:1], 1, s[1:], inj) for s in seqs])
    out, _, _ = base.family.target_logits([Example(s[:1], 1, s[1:], compiled) for s in seqs])
    assert int(real.sum()) == sum(len(s) - 1 for s in seqs)  # compare the text tokens; pads carry no meaning
    torch.testing.assert_close(out[real], ref[real], rtol=0, atol=1e-4)
    # and the KV of a sequence does not depend on what follows it (causality)
    longer = base.family.kv_of_embeddings(torch.cat([inj.embeds, torch.randn(2, base.hidden_size)]))
    torch.testing.assert_close(longer[:, :, :, :4], compiled.kv, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bad", [dict(init="zeros"), dict(num_virtual_tokens=-1), dict(prefix_hidden=0)])
def test_invalid_options_name_the_flag(bad):
    with pytest.raises(ConfigError, match="--"):
        PrefixConfig(**bad)
