"""LLaMA-Adapter (`methods/llama_adapter.py`, run by `families/adaption.py`): zero-init, PEFT parity, refusals."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from helpers import DATA, build_tiny, make_prompt, text_rows
from helpers import run_cli as run

from softprompt.errors import ConfigError, PromptFileError
from softprompt.injection import EMPTY, Injection
from softprompt.methods import InitContext, LlamaAdapterConfig, build_method
from softprompt.peft_format import export_peft, import_peft


def adapter(base, sst2, seed=0, **config):
    ctx = InitContext(base, sst2.spec.verbalizers, sst2.split("train").prompts[:100], seed=seed)
    return build_method("llama-adapter", LlamaAdapterConfig(**({"num_virtual_tokens": 4} | config)), ctx)


def logits(base, examples, injection):
    return base.family.next_token_logits([dataclasses.replace(e, injection=injection) for e in examples])


@torch.no_grad()
def test_zero_gates_give_the_frozen_model_and_the_wrapper_changes_nothing(tokenizer, sst2):
    """At init the gates are zero: the output is the frozen model's, bit for bit. Installing the attention wrapper
    (on first use) leaves every other prompt's logits bit-identical."""
    base = build_tiny("llama", tokenizer)
    soft = torch.randn(3, base.hidden_size, generator=torch.Generator().manual_seed(0))
    before = [logits(base, text_rows(base), inj) for inj in (EMPTY, Injection(embeds=soft))]
    method = adapter(base, sst2)
    assert base.model.config._attn_implementation.startswith("softprompt_adaption_")
    assert torch.equal(logits(base, text_rows(base), method()), before[0])
    after = [logits(base, text_rows(base), inj) for inj in (EMPTY, Injection(embeds=soft))]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    method.gate.fill_(0.5)
    assert not torch.allclose(logits(base, text_rows(base), method()), before[0])


def test_training_starts_by_opening_the_gates(tokenizer, sst2):
    """With zero gates only the gates get a gradient (the prompts' is exactly zero), as the paper intends."""
    base = build_tiny("llama", tokenizer)
    method = adapter(base, sst2)
    examples = [dataclasses.replace(e, target=[5], injection=method()) for e in text_rows(base)]
    base.family.loss(examples).backward()
    assert method.gate.grad.abs().sum() > 0 and not method.adapter.grad.any()


@pytest.mark.parametrize("layers", [1, 2])
@torch.no_grad()
def test_fewer_layers_adapt_the_last_ones(tokenizer, sst2, layers):
    base = build_tiny("llama", tokenizer)
    method = adapter(base, sst2, adapter_layers=layers)
    assert method.adapter.shape == (layers, 4, base.hidden_size) and method.gate.shape == (layers,)
    assert base.family.adaption_layers(layers) == base.family.prefix_layers[-layers:]


@pytest.mark.parametrize("arch", ["llama", "mistral"])
@torch.no_grad()
def test_logits_equal_peft_adaption_prompt(tokenizer, sst2, arch, record_parity):
    """PEFT's AdaptionPrompt on the same weights, prompts and (non-zero) gates gives the same logits."""
    peft = pytest.importorskip("peft")
    base = build_tiny(arch, tokenizer)
    theirs = peft.get_peft_model(
        copy.deepcopy(base.model), peft.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=4, adapter_layers=2)
    ).eval()
    method = adapter(base, sst2, adapter_layers=2)
    method.gate.copy_(torch.tensor([0.7, -1.3]))
    modules = [m for m in theirs.modules() if hasattr(m, "adaption_gate")]
    assert len(modules) == 2
    for m, p, g in zip(modules, method.adapter, method.gate):
        m.adaption_prompt.copy_(p[None])
        m.adaption_gate.fill_(float(g))
    for row in text_rows(base):  # unpadded rows: PEFT's adapter attends from pads too
        ids = torch.tensor([row.source])
        ref = theirs(input_ids=ids).logits[0, -1]
        ours = logits(base, [row], method())[0]
        record_parity(f"llama-adapter {arch}", float((ours - ref).abs().max()))
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    assert not torch.allclose(ours, logits(base, [text_rows(base)[-1]], EMPTY)[0])


@pytest.mark.parametrize("arch", ["gpt2", "phi3", "falcon", "t5", "bert"])
def test_models_without_separate_key_value_projections_are_refused(tokenizer, sst2, arch):
    base = build_tiny(arch, tokenizer)
    impl = base.model.config._attn_implementation
    with pytest.raises(ConfigError, match="adaption prompts") as e:
        adapter(base, sst2)
    assert "--method deep or prefix" in e.value.fix
    assert base.model.config._attn_implementation == impl  # left as it was


def test_too_many_layers_are_refused(tokenizer, sst2):
    base = build_tiny("llama", tokenizer)
    with pytest.raises(ConfigError, match="3 layers") as e:
        adapter(base, sst2, adapter_layers=3)
    assert "--adapter-layers between 1 and 2" in e.value.fix


def test_train_eval_and_info_from_the_command_line(model_dir, tmp_path, capsys):
    out_file = tmp_path / "adapter.safetensors"
    code, _, err = run(
        capsys,
        *("train", "--task", "sst2", "--data-dir", DATA, "--model", model_dir, "--steps", 2, "--batch-size", 2),
        *("--method", "llama-adapter", "--num-virtual-tokens", 3, "--adapter-layers", 1, "--eval-limit", 4),
        *("--no-progress", "--out", out_file, "--run-dir", tmp_path / "run"),
    )
    assert code == 0, err
    info = json.loads(run(capsys, "info", out_file, "--json")[1])
    assert info["method"] == "llama-adapter" and info["method_config"]["adapter_layers"] == 1
    code, out, err = run(
        capsys, "eval", "--task", "sst2", "--data-dir", DATA, "--model", model_dir, "--prompt", out_file, "--limit", 4
    )
    assert code == 0, err
    assert "accuracy" in out


def test_peft_interop_refuses_adaption_prompts_with_the_fix(llama, sst2, tmp_path):
    """PEFT's prompt-learning formats hold no adaption prompts, and its AdaptionPrompt files are not imported."""
    peft = pytest.importorskip("peft")
    with pytest.raises(PromptFileError, match="AdaptionPrompt") as e:
        export_peft(make_prompt(llama, sst2.spec, "llama-adapter", 3), tmp_path / "peft")
    assert "serve the prompt file with softprompt" in e.value.fix and not (tmp_path / "peft").exists()
    config = peft.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=3, adapter_layers=1)
    peft.get_peft_model(copy.deepcopy(llama.model), config).save_pretrained(tmp_path / "theirs")
    with pytest.raises(PromptFileError, match="AdaptionPrompt") as e:
        import_peft(tmp_path / "theirs", llama)
    assert "--method llama-adapter" in e.value.fix
