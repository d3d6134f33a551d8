"""Multitask prompt tuning (`methods/mpt.py`, source stage `mpt_source.py`): PEFT parity, gradients, files, init."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from helpers import DATA, build_tiny, make_prompt, text_rows
from helpers import run_cli as run

from softprompt.errors import ConfigError, PromptFileError
from softprompt.methods import InitContext, MultitaskPromptConfig, build_method
from softprompt.mpt_source import SOURCE_FILE, Distillation, SourceTrainer, train_source
from softprompt.multitask import MultiTask
from softprompt.store import Store, load_prompt
from softprompt.train import TrainConfig


def mpt(base, task, seed=0, **config):
    ctx = InitContext(base, task.spec.verbalizers, task.split("train").prompts[:100], seed=seed)
    return build_method("mpt", MultitaskPromptConfig(**({"num_virtual_tokens": 3} | config)), ctx)


def quick(**kw) -> TrainConfig:
    options = {"steps": 2, "batch_size": 4, "eval_limit": 2, "final_eval_limit": 2, "progress": False}
    return TrainConfig(**(options | kw))


@torch.no_grad()
def test_a_task_prompt_is_the_shared_prompt_times_its_factors(llama, sst2):
    """P_k = P* ∘ (U_k @ V_k), and the factors start near 1: every task starts at the shared prompt's init."""
    method = mpt(llama, sst2, num_tasks=2, rank=2)
    assert method.cols.shape == (2, 3, 2) and method.rows.shape == (2, 2, llama.hidden_size)
    for k in range(2):
        expected = method.shared * (method.cols[k] @ method.rows[k])
        assert torch.equal(method(k).embeds, expected)
        torch.testing.assert_close(method.collapse(k).embeds, method.shared, rtol=0.1, atol=1e-3)
    assert not torch.equal(method.collapse(0).embeds, method.collapse(1).embeds)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@torch.no_grad()
def test_logits_equal_peft_multitask_prompt_tuning(tokenizer, sst2, arch, record_parity):
    """PEFT's MultitaskPromptTuning with the same shared prompt and factors gives the same logits, task by task."""
    peft = pytest.importorskip("peft")
    base = build_tiny(arch, tokenizer)
    method = mpt(base, sst2, num_tasks=2, rank=2)
    method.cols.normal_(1, 0.5)  # away from 1, so a task's factors matter
    config = peft.MultitaskPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, num_tasks=2, num_ranks=2)
    theirs = peft.get_peft_model(copy.deepcopy(base.model), config).eval()
    encoder = theirs.prompt_encoder["default"]
    encoder.embedding.weight.copy_(method.shared)
    encoder.prefix_task_cols.copy_(method.cols)
    encoder.prefix_task_rows.copy_(method.rows)
    for k in range(2):
        for row in text_rows(base):
            ref = theirs(input_ids=torch.tensor([row.source]), task_ids=torch.tensor([k])).logits[0, -1]
            ours = base.family.next_token_logits([dataclasses.replace(row, injection=method(k))])[0]
            record_parity(f"mpt {arch}", float((ours - ref).abs().max()))
            torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_the_shared_prompt_learns_from_every_task_and_the_factors_from_their_own(llama, sst2, e2e, tmp_path):
    trainer = SourceTrainer(llama, [sst2, e2e], {"num_virtual_tokens": 3}, quick())
    trainer._start()
    method = trainer.method
    only_first = [trainer.example(g) for g in (0, 2, 4)]  # rows g of task g mod 2: all SST-2
    assert {k for k, _ in only_first} == {0}
    trainer.loss(only_first).backward()
    assert method.shared.grad.abs().sum() > 0 and method.cols.grad[0].abs().sum() > 0
    assert not method.cols.grad[1].any() and not method.rows.grad[1].any()
    method.zero_grad()
    trainer.loss(trainer.micro_batch(0, 0)).backward()
    assert all(method.cols.grad[k].abs().sum() > 0 and method.rows.grad[k].abs().sum() > 0 for k in range(2))


def test_a_source_run_writes_a_store_that_a_target_task_starts_from(tokenizer, sst2, e2e, tmp_path):
    base = build_tiny("llama", tokenizer)
    frozen = {n: p.clone() for n, p in base.model.named_parameters()}
    result = train_source(base, [sst2, e2e], {"num_virtual_tokens": 3}, quick(), out=tmp_path / "mpt")
    assert all(torch.equal(p, frozen[n]) for n, p in base.model.named_parameters())
    method = result.method
    for k, name in enumerate(["sst2", "e2e_nlg"]):
        prompt = load_prompt(tmp_path / "mpt" / f"{name}.safetensors", base)
        assert prompt.method == "mpt" and prompt.task["name"] == name and "dev" in prompt.metrics
        assert torch.equal(prompt.injection.embeds, method.collapse(k).embeds)
    assert sorted(Store(tmp_path / "mpt").names()) == ["e2e_nlg", "sst2"]  # the source file is not a task's prompt
    served = MultiTask(base)
    assert served.sync(Store(tmp_path / "mpt"))["refused"] == {}
    assert len(served.classify([("sst2", "a fun film")])[0].probs) == len(sst2.spec.labels)
    source = str(tmp_path / "mpt" / SOURCE_FILE)
    with torch.no_grad():
        average = mpt(base, sst2, init="source", init_source=source)
        assert torch.equal(average.shared, method.shared)
        assert torch.equal(average.cols[0], method.cols.mean(0)) and torch.equal(average.rows[0], method.rows.mean(0))
        exact = mpt(base, sst2, init="source", init_source=source, source_task="e2e_nlg")
        assert torch.equal(exact.collapse().embeds, method.collapse(1).embeds)
        fresh = mpt(base, sst2, init="source", init_source=source, source_task="shared")
        torch.testing.assert_close(fresh.collapse().embeds, method.shared, rtol=0.1, atol=1e-3)


def test_bad_source_files_and_tasks_are_refused(tokenizer, llama, sst2, e2e, tmp_path):
    train_source(llama, [sst2, e2e], {"num_virtual_tokens": 3}, quick(steps=1, final_eval=False), out=tmp_path)
    source = str(tmp_path / SOURCE_FILE)
    with pytest.raises(ConfigError, match="'trec' is not a task") as e:
        mpt(llama, sst2, init="source", init_source=source, source_task="trec")
    assert "['sst2', 'e2e_nlg']" in e.value.fix
    with pytest.raises(ConfigError, match="holds 3 virtual tokens"):
        mpt(llama, sst2, init="source", init_source=source, num_virtual_tokens=4)
    make_prompt(llama, sst2.spec, "soft", 3).save(tmp_path / "soft.safetensors")
    with pytest.raises(PromptFileError, match="not an MPT source file"):
        mpt(llama, sst2, init="source", init_source=str(tmp_path / "soft.safetensors"))
    with pytest.raises(PromptFileError, match="trained for base model"):
        mpt(build_tiny("gpt2", tokenizer), sst2, init="source", init_source=source)
    with pytest.raises(ConfigError, match="go together"):
        MultitaskPromptConfig(init="source")
    with pytest.raises(ConfigError, match="several tasks"):
        SourceTrainer(llama, [sst2], None, quick())
    with pytest.raises(ConfigError, match="twice"):
        SourceTrainer(llama, [sst2, sst2], None, quick())


def test_source_and_target_stages_from_the_command_line(model_dir, tmp_path, capsys):
    common = ("--data-dir", DATA, "--model", model_dir, "--steps", 2, "--batch-size", 2, "--no-progress")
    common += ("--method", "mpt", "--num-virtual-tokens", 3, "--eval-limit", 2, "--final-eval-limit", 2)
    code, out, err = run(capsys, "train", "--tasks", "sst2", "trec", *common, "--out", tmp_path / "src")
    assert code == 0, err
    assert "sst2: " in out and "trec: " in out
    target = tmp_path / "cb.safetensors"
    code, _, err = run(
        capsys,
        *("train", "--task", "cb", *common, "--init", "source", "--init-source", tmp_path / "src" / SOURCE_FILE),
        *("--out", target, "--run-dir", tmp_path / "run", "--truncate", "left"),
    )
    assert code == 0, err
    info = json.loads(run(capsys, "info", target, "--json")[1])
    assert info["method"] == "mpt" and info["method_config"]["source_task"] == "average"
    code, _, err = run(capsys, "train", "--task", "cb", "--tasks", "sst2", "trec", *common)
    assert code == 2 and "no --task" in err
    code, _, err = run(capsys, "train", "--tasks", "sst2", "trec", *common, "--teacher", "sst2")
    assert code == 2 and "is not TASK=FILE" in err
    code, _, err = run(capsys, "train", "--task", "cb", *common, "--teacher", f"cb={target}")
    assert code == 2 and "distills MPT's source stage" in err
    code, out, err = run(
        capsys,
        *("train", "--tasks", "sst2", "trec", *common, "--teacher", f"trec={target}", "--distill-temperature", 2),
        *("--out", tmp_path / "distilled", "--run-dir", tmp_path / "run-distilled"),
    )
    assert code == 0, err


def test_a_source_run_resumes_from_its_checkpoint_and_refuses_another_task_list(llama, sst2, e2e, tmp_path):
    options = quick(checkpoint_every=1, final_eval=False)
    first = train_source(llama, [sst2, e2e], {"num_virtual_tokens": 3}, options, run_dir=tmp_path / "run")
    again = SourceTrainer(llama, [sst2, e2e], {"num_virtual_tokens": 3}, options, run_dir=tmp_path / "run")
    assert again.step == 2 and again.label == "sst2+e2e_nlg"
    assert all(torch.equal(a, b) for a, b in zip(again.method.parameters(), first.method.parameters()))
    with pytest.raises(ConfigError, match="different run"):
        SourceTrainer(llama, [e2e, sst2], {"num_virtual_tokens": 3}, options, run_dir=tmp_path / "run")


def test_distillation_adds_the_teachers_kl_on_their_tasks_rows(llama, sst2, e2e, tmp_path):
    """loss = NLL + weight * T^2 * KL(teacher || student) over the target tokens of the taught task's rows; a teacher
    that is the student's own prompt adds nothing."""
    teacher = make_prompt(llama, sst2.spec, "soft", 3, seed=5).save(tmp_path / "teacher.safetensors")
    distill = Distillation({"sst2": str(teacher)}, distill_weight=0.5, distill_temperature=2.0)
    plain = SourceTrainer(llama, [sst2, e2e], {"num_virtual_tokens": 3}, quick())
    taught = SourceTrainer(llama, [sst2, e2e], {"num_virtual_tokens": 3}, quick(), distill=distill)
    for t in (plain, taught):
        t._start()
    batch = taught.micro_batch(0, 0)
    assert {k for k, _ in batch} == {0, 1}
    rows = [dataclasses.replace(e, injection=taught.method(k)) for k, e in batch]
    _, _, mask = llama.family.target_logits(rows)
    first = [i for i, (k, _) in enumerate(batch) if k == 0]
    with torch.no_grad():
        s = llama.family.target_logits([rows[i] for i in first])
        t = llama.family.target_logits([dataclasses.replace(batch[i][1], injection=taught.teachers[0]) for i in first])
        kl = F.kl_div((s[0] / 2).log_softmax(-1), (t[0] / 2).log_softmax(-1), log_target=True, reduction="none")
        expected = 0.5 * 4 * (kl.sum(-1) * s[2]).sum() / mask.sum()
        added = taught.loss(batch) - plain.loss(batch)
        torch.testing.assert_close(added, expected, rtol=1e-4, atol=1e-6)
        assert added > 0
        taught.teachers[0] = taught.method.collapse(0)
        torch.testing.assert_close(taught.loss(batch), plain.loss(batch), rtol=0, atol=1e-5)


def test_bad_teachers_are_refused(llama, sst2, e2e, tmp_path):
    long = make_prompt(llama, sst2.spec, "soft", 5).save(tmp_path / "long.safetensors")
    with pytest.raises(ConfigError, match="not source tasks"):
        SourceTrainer(llama, [sst2, e2e], None, quick(), distill=Distillation({"trec": str(long)}))
    distill = Distillation({"sst2": str(long)})
    trainer = SourceTrainer(llama, [sst2, e2e], {"num_virtual_tokens": 3}, quick(), distill=distill)
    with pytest.raises(ConfigError, match="takes 5 positions") as e:
        trainer._start()
    assert "--num-virtual-tokens 5" in e.value.fix
    with pytest.raises(ConfigError, match="distill_weight must be positive"):
        Distillation(distill_weight=0)
