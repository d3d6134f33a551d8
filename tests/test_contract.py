"""The contract every prompt method keeps, on tiny Llama (GQA, rotary) and GPT-2 (absolute positions).

1. Only the method's parameters receive gradients.
2. The base model's weights are bit-for-bit unchanged by training.
3. Save -> load gives identical logits.
4. Greedy generation with the KV cache equals generation without it, under left padding.
"""

from __future__ import annotations

import pytest
import torch

import softprompt as sp
from softprompt.data import Encoder, collate
from softprompt.evaluate import target_log_probs
from softprompt.generate import generate_ids
from softprompt.inject import assemble, forward
from softprompt.methods import METHODS, InitContext, build_method


@pytest.fixture(params=sorted(METHODS))
def method_name(request):
    return request.param


def make_method(name, base, task, seed=0, **overrides):
    cls = METHODS[name]
    config = cls.config_class(num_virtual_tokens=4, **overrides)
    texts = task.split("train").prompts[:200]
    return build_method(name, config, InitContext(base, task.spec.verbalizers, texts, seed=seed))


def training_batch(base, task, n=4):
    split = task.split("train")
    enc = Encoder(task.spec, base.tokenizer)
    pairs = [enc.training_example(split.prompts[i], split.targets[i], None) for i in range(n)]
    return collate([p[0] for p in pairs], base.tokenizer.pad_token_id, [p[1] for p in pairs])


def perturb(method):
    """Move the prompt away from its initialization, as training would (zero inits would hide bugs)."""
    with torch.no_grad():
        for p in method.parameters():
            p.add_(torch.randn_like(p) * 0.5)


def test_only_prompt_parameters_get_gradients(base, sst2, method_name):
    method = make_method(method_name, base, sst2)
    b = training_batch(base, sst2)
    inputs = assemble(base, b["input_ids"], b["attention_mask"], method(), labels=b["labels"])
    logp, mask = target_log_probs(base, inputs)
    (-logp.sum() / mask.sum()).backward()
    assert all(not p.requires_grad and p.grad is None for p in base.model.parameters())
    grads = [p.grad for p in method.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_base_weights_unchanged_by_training(base, sst2, method_name, tmp_path):
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    result = sp.train(base, sst2, method_name, METHODS[method_name].config_class(num_virtual_tokens=4),
                      sp.TrainConfig(steps=3, batch_size=2, lr=1e-1, eval_every=0, final_eval=False, progress=False,
                                     checkpoint_every=0), run_dir=tmp_path)
    after = base.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # ...while the prompt did move
    init = make_method(method_name, base, sst2).collapse()
    moved = result.prompt.injection.tensors()
    assert any(not torch.equal(moved[k], v) for k, v in init.tensors().items())


def test_save_load_round_trip_gives_identical_logits(base, sst2, method_name, tmp_path):
    method = make_method(method_name, base, sst2)
    perturb(method)
    prompt = sp.Prompt(injection=method.collapse(), method=method_name, method_config=method.config.to_dict(),
                       task=sst2.spec.portable(), base=base.fingerprint.to_dict(),
                       trainable_parameters=method.num_trainable())
    path = prompt.save(tmp_path / "p.safetensors")
    loaded = sp.load_prompt(path, base)
    b = training_batch(base, sst2, n=3)
    with torch.no_grad():
        live, _ = forward(base, assemble(base, b["input_ids"], b["attention_mask"], method()))
        again, _ = forward(base, assemble(base, b["input_ids"], b["attention_mask"], loaded.injection))
    assert torch.equal(live, again)
    assert loaded.method == method_name and loaded.trainable_parameters == method.num_trainable()


def test_cached_generation_equals_uncached_with_left_padding(base, sst2, method_name):
    method = make_method(method_name, base, sst2)
    perturb(method)
    injection = method.collapse()
    enc = Encoder(sst2.spec, base.tokenizer)
    prompts = [enc.prompt_ids(p) for p in sst2.split("dev").prompts[:4]]
    assert len({len(p) for p in prompts}) > 1  # rows of different lengths: left padding is exercised
    cached = generate_ids(base, prompts, injection, max_new_tokens=12, use_cache=True)
    uncached = generate_ids(base, prompts, injection, max_new_tokens=12, use_cache=False)
    assert cached == uncached
    assert all(len(c) > 0 for c in cached)
    # each row of the batch equals the row generated alone
    for p, c in zip(prompts, cached):
        assert generate_ids(base, [p], injection, max_new_tokens=12) == [c]
