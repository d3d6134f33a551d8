"""Method-specific behaviour: shapes from the model config (GQA), initializations, collapse."""

from __future__ import annotations

import pytest
import torch
from helpers import build_tiny, make_prompt

from softprompt.errors import ConfigError, SoftpromptError
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


EMBEDS = ("soft", "ptuning")  # methods whose prompt is input embeddings; deep and prefix train keys/values


def transfer_config(target: str, source_path, P: int = 4) -> dict:
    extra = {"prefix_hidden": 32} if target == "prefix" else {}
    return dict(num_virtual_tokens=P, init="prompt", init_prompt=str(source_path), **extra)


@pytest.mark.parametrize("target", ["soft", "ptuning", "deep", "prefix"])
@pytest.mark.parametrize("source", ["soft", "deep"])
def test_prompt_transfer_starts_from_the_source_prompt(base, sst2, tmp_path, source, target):
    """Vu et al.'s SPoT: a new task's prompt starts as a trained one; reparametrized methods fit their last layer."""
    src = make_prompt(base, sst2.spec, source, 6, seed=1)
    path = src.save(tmp_path / "source")
    if source == "deep" and target in EMBEDS:
        with pytest.raises(ConfigError, match="keys/values, which input embeddings cannot start from"):
            build_method(target, transfer_config(target, path), ctx(base, sst2))
        return
    got = build_method(target, transfer_config(target, path), ctx(base, sst2)).collapse()
    if target in EMBEDS:
        want = src.injection.embeds[:4]
        torch.testing.assert_close(got.embeds, want, rtol=0, atol=0 if target == "soft" else 1e-5)
        return
    want = src.injection.kv[:, :, :, :4] if source == "deep" else base.family.kv_of_embeddings(src.injection.embeds[:4])
    torch.testing.assert_close(got.kv, want, rtol=0, atol=0 if target == "deep" else 1e-5)
    assert got.kv_positions == 4


def test_prompt_transfer_refuses_what_it_cannot_start_from(base, sst2, tmp_path, tokenizer):
    soft = make_prompt(base, sst2.spec, "soft", 3).save(tmp_path / "soft")
    hard = make_prompt(base, sst2.spec, None).save(tmp_path / "hard")
    other_arch = "gpt2" if base.config.model_type == "llama" else "llama"
    other = make_prompt(build_tiny(other_arch, tokenizer), sst2.spec, "soft", 3).save(tmp_path / "other")
    for path, problem in [
        (soft, "has 3 virtual tokens, fewer than the 4 asked for"),
        (hard, "is a hard prompt"),
        (other, "was trained for base model"),
        (tmp_path / "missing.safetensors", "missing.safetensors"),
    ]:
        with pytest.raises(SoftpromptError, match=problem):
            build_method("soft", transfer_config("soft", path), ctx(base, sst2))
    with pytest.raises(ConfigError, match="needs a prompt file"):
        build_method("deep", DeepPromptConfig(init="prompt"), ctx(base, sst2))
    with pytest.raises(ConfigError, match="--init-prompt was given with --init vocab"):
        SoftPromptConfig(init="vocab", init_prompt=str(soft))
