"""The contract every prompt method keeps on every architecture of the zoo (`zoo.py`: causal LMs, seq2seq, masked LMs).

1. Gradients reach the prompt only.
2. The base model's weights are bit-for-bit unchanged by training.
3. Save -> load gives identical logits.
4. Greedy generation with the KV cache equals generation without it, under padding (families that generate).
5. A row alone equals the same row in a padded batch.
6. A row of a batch that mixes methods (and no prompt at all) equals the row alone.

KV-prefix methods (prefix, deep) on models whose layers take no keys/values (Mamba, Mamba-2) or
whose attention takes no cache in transformers (DeBERTa-v2, ModernBERT), and LLaMA-Adapter on models
without attention of their own k_proj / v_proj (or not causal LMs), are refused with an error that
names the methods to use instead; that refusal is their contract.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import zoo
from helpers import build_tiny

import softprompt as sp
from softprompt.data import Encoder
from softprompt.errors import ConfigError
from softprompt.generate import GREEDY, Decoder, generate_ids
from softprompt.injection import EMPTY
from softprompt.methods import METHODS, InitContext, build_method
from softprompt.train import init_context

NO_KV = {"mamba", "mamba2", "deberta-v2", "modernbert"}  # no layer takes a key/value prefix
KV_METHODS = {name for name, m in METHODS.items() if "kv" in m.fills}
# no attention with its own k_proj and v_proj through AttentionInterface (fused projections, older attention code,
# none at all), or no causal LM: adaption prompts (LLaMA-Adapter) have nowhere to go
NO_ADAPTER = {"phi3", "gpt_neox", "falcon", "bloom", "gpt2", "gpt_bigcode", "mamba", "stablelm", "mamba2"}
NO_ADAPTER |= set(zoo.SEQ2SEQ + zoo.ENCODER)
ADAPTER_METHODS = {name for name, m in METHODS.items() if "adapter" in m.fills}
TEMPLATE = "Review: {sentence}\nSentiment:{mask}"  # one template for every family: the label word goes at {mask}
ATOL = 1e-4  # log-probabilities; padded and unpadded rows run through different kernels


def refused(arch: str, method: str) -> bool:
    return (arch in NO_KV and method in KV_METHODS) or (arch in NO_ADAPTER and method in ADAPTER_METHODS)


@pytest.fixture(scope="module")
def task(sst2, tmp_path_factory):
    """Short SST-2 rows (64 train, 16 dev) under a template with a {mask} slot, which every family reads.

    Short, so that a prompt in front of the text stays within reach of the label word on models whose every layer
    has a sliding window (through 2 layers of window 12: 22 tokens).
    """
    folder = tmp_path_factory.mktemp("sst2-small")
    for split, n in (("train", 64), ("dev", 16)):
        rows = [r for r in sst2.split(split).rows if len(r["sentence"].split()) <= 6][:n]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = dataclasses.replace(sst2.spec, template=TEMPLATE, splits={"train": "train.jsonl", "dev": "dev.jsonl"})
    return sp.data.Task(spec, folder)


@pytest.fixture(params=zoo.ALL)
def zoo_arch(request):
    return request.param


@pytest.fixture(params=sorted(METHODS))
def method_name(request):
    return request.param


def make_method(name, base, task, seed=0):
    config = METHODS[name].config_class(num_virtual_tokens=3)
    texts = task.split("train").prompts[:200]
    method = build_method(name, config, InitContext(base, task.spec.verbalizers, texts, seed=seed))
    with torch.no_grad():  # move the prompt away from its initialization, as training would (zeros hide bugs)
        for p in method.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return method


def examples(base, task, n=4, split="train"):
    """Training examples of different lengths (so that padding is exercised)."""
    data = task.split(split)
    enc = Encoder(task.spec, base)
    rows = sorted(range(len(data)), key=lambda i: len(data.prompts[i]))
    picked = [rows[k * (len(rows) - 1) // 3] for k in range(4)][:n]
    out = [enc.training_example(data.prompts[i], data.targets[i]) for i in picked]
    assert len({len(e.source) for e in out}) > 1
    return out


def with_prompt(rows, injection):
    return [dataclasses.replace(e, injection=injection) for e in rows]


def check_or_refused(arch, method_name, base, task):
    """The method built on `base`, or None after checking that a refused pair fails with the fix."""
    if refused(arch, method_name):
        with pytest.raises(ConfigError, match="method soft"):
            make_method(method_name, base, task)
        return None
    return make_method(method_name, base, task)


def test_only_the_prompt_gets_gradients(zoo_arch, method_name, task, tokenizer):
    base = build_tiny(zoo_arch, tokenizer)
    method = check_or_refused(zoo_arch, method_name, base, task)
    if method is None:
        return
    base.family.loss(with_prompt(examples(base, task), method())).backward()
    assert all(not p.requires_grad and p.grad is None for p in base.model.parameters())
    grads = [p.grad for p in method.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_training_leaves_the_base_weights_bit_identical(zoo_arch, method_name, task, tokenizer, tmp_path):
    base = build_tiny(zoo_arch, tokenizer)
    if refused(zoo_arch, method_name):
        with pytest.raises(ConfigError, match="method soft"):
            sp.train(base, task, method_name, METHODS[method_name].config_class(num_virtual_tokens=3))
        return
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    config = METHODS[method_name].config_class(num_virtual_tokens=3)
    result = sp.train(
        base,
        task,
        method_name,
        config,
        sp.TrainConfig(
            steps=2,
            batch_size=2,
            lr=1e-1,
            warmup_steps=0,
            eval_every=0,
            final_eval=False,
            progress=False,
            checkpoint_every=0,
        ),
        run_dir=tmp_path,
    )
    after = base.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    start = build_method(method_name, config, init_context(base, task, seed=0)).collapse()
    moved = result.prompt.injection.tensors()
    assert any(not torch.equal(moved[k].cpu(), v.cpu()) for k, v in start.tensors().items())


@torch.no_grad()
def test_save_load_padding_and_mixed_batches(zoo_arch, method_name, task, tokenizer, tmp_path):
    """Contract points 3, 5 and 6 on one model: they share the batch."""
    base = build_tiny(zoo_arch, tokenizer)
    method = check_or_refused(zoo_arch, method_name, base, task)
    if method is None:
        return
    family, rows = base.family, examples(base, task)
    injection = method.collapse()
    # 3. save -> load
    prompt = sp.Prompt(
        injection=injection,
        method=method_name,
        method_config=method.config.to_dict(),
        task=task.spec.portable(),
        base=base.fingerprint.to_dict(),
    )
    loaded = sp.load_prompt(prompt.save(tmp_path / "p.safetensors"), base)
    live, _ = family.target_log_probs(with_prompt(rows, method()))
    again, _ = family.target_log_probs(with_prompt(rows, loaded.injection))
    assert torch.equal(live, again)
    # 5. a row alone equals the row in the padded batch
    batch, mask = family.target_log_probs(with_prompt(rows, injection))
    for i, row in enumerate(with_prompt(rows, injection)):
        alone, alone_mask = family.target_log_probs([row])
        torch.testing.assert_close(batch[i][mask[i]], alone[0][alone_mask[0]], rtol=0, atol=ATOL)
    # 6. ... and in a batch that mixes this prompt with other methods' prompts and no prompt at all
    others = [make_method(m, base, task, seed=1).collapse() for m in sorted(METHODS) if not refused(zoo_arch, m)]
    mixed = [dataclasses.replace(r, injection=inj) for r, inj in zip(rows * 3, [injection, EMPTY, *others])]
    batch, mask = family.target_log_probs(mixed)
    for i, row in enumerate(mixed):
        alone, alone_mask = family.target_log_probs([row])
        torch.testing.assert_close(batch[i][mask[i]], alone[0][alone_mask[0]], rtol=0, atol=ATOL)


@pytest.mark.parametrize("zoo_arch", zoo.CAUSAL + zoo.SEQ2SEQ)
def test_cached_generation_equals_uncached_under_padding(zoo_arch, method_name, task, tokenizer):
    base = build_tiny(zoo_arch, tokenizer)
    method = check_or_refused(zoo_arch, method_name, base, task)
    if method is None:
        return
    injection = method.collapse()
    enc = Encoder(task.spec, base)
    prompts = [enc.example(p, injection) for p in task.split("dev").prompts[:3]]
    assert len({len(e.source) for e in prompts}) > 1  # rows of different lengths: padding is exercised
    cached = generate_ids(base, prompts, max_new_tokens=8, use_cache=True)
    assert cached == generate_ids(base, prompts, max_new_tokens=8, use_cache=False)
    for row, tokens in zip(prompts, cached):  # each row of the batch equals the row generated alone
        assert generate_ids(base, [row], max_new_tokens=8) == [tokens]
    # Step by step on forced tokens, which a tiny random model's greedy choice (often EOS at once) would not reach:
    # the cached step's logits equal a full recomputation's at every step.
    family = base.family
    forced = torch.randint(3, len(tokenizer), (6, len(prompts)), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        (c, logits_c), (u, logits_u) = family.start_decoding(prompts, True), family.start_decoding(prompts, False)
        for tokens in forced:
            torch.testing.assert_close(logits_c, logits_u, rtol=1e-4, atol=1e-4)
            logits_c, logits_u = family.continue_decoding(c, tokens), family.continue_decoding(u, tokens)
        torch.testing.assert_close(logits_c, logits_u, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("zoo_arch", zoo.CAUSAL + zoo.SEQ2SEQ)
def test_rows_joining_and_leaving_a_running_batch_equal_the_row_alone(zoo_arch, method_name, task, tokenizer):
    """Continuous batching: rows prefilled apart join a running decode (one with no prompt at all) and a row leaves
    it; every row's logits at every step equal the row decoding alone. Families whose decoding states cannot be
    merged refuse the join, and their rows decode in batches that start together."""
    base = build_tiny(zoo_arch, tokenizer)
    method = check_or_refused(zoo_arch, method_name, base, task)
    if method is None:
        return
    enc = Encoder(task.spec, base)
    rows = [enc.example(p, method.collapse()) for p in task.split("dev").prompts[:3]]
    rows[1] = dataclasses.replace(rows[1], injection=EMPTY)
    forced = torch.randint(3, len(tokenizer), (3, 8), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        decoder = Decoder(base)
        decoder.join([0], rows[:1], [8], [GREEDY])
        if not decoder.can_join:
            with pytest.raises(ValueError, match="only once it is empty"):
                decoder.join([1], rows[1:2], [8], [GREEDY])
            return
        seen: dict[int, list[torch.Tensor]] = {0: [], 1: [], 2: []}
        for step in range(7):
            if step == 2:
                decoder.join([1, 2], rows[1:], [8, 8], [GREEDY, GREEDY])
            for j, key in enumerate(decoder.keys):
                seen[key].append(decoder.logits[j].clone())
            tokens = torch.stack([forced[k, len(seen[k]) - 1] for k in decoder.keys])
            decoder.advance(tokens, [k == 0 and step == 4 for k in decoder.keys])
        assert len(seen[0]) == 5 and len(seen[1]) == 5 and 0 not in decoder.keys
        for key, logits in seen.items():
            alone = Decoder(base)
            alone.join([key], [rows[key]], [8], [GREEDY])
            for step, got in enumerate(logits):
                torch.testing.assert_close(got, alone.logits[0], rtol=1e-4, atol=1e-4)
                alone.advance(forced[key, step : step + 1])
