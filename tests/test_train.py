"""The training loop: resume after an interruption, NaN handling, gradient checkpointing, records."""

from __future__ import annotations

import json

import pytest
import torch

import softprompt as sp
from softprompt.errors import ConfigError, TrainingError
from softprompt.methods import METHODS, build_method
from softprompt.train import CHECKPOINT, Trainer, init_context


def cfg(**kw):
    base = dict(
        steps=6,
        batch_size=2,
        lr=5e-2,
        eval_every=3,
        eval_limit=8,
        final_eval=False,
        progress=False,
        checkpoint_every=2,
        log_every=1,
    )
    base.update(kw)
    return sp.TrainConfig(**base)


def method_cfg(name):
    return METHODS[name].config_class(num_virtual_tokens=3)


def refused(base, sst2, name, tmp_path) -> bool:
    """Whether `name` cannot train on `base` (LLaMA-Adapter on GPT-2's fused attention), after checking that it is
    refused with the fix (test_contract.py: every pair of the zoo)."""
    if "adapter" not in METHODS[name].fills or base.config.model_type != "gpt2":
        return False
    with pytest.raises(ConfigError, match="cannot take adaption prompts"):
        sp.train(base, sst2, name, method_cfg(name), cfg(), run_dir=tmp_path / "refused")
    return True


@pytest.mark.parametrize("name", sorted(METHODS))
def test_interrupted_run_resumes_to_the_same_prompt(base, sst2, tmp_path, name, monkeypatch):
    if refused(base, sst2, name, tmp_path):
        return
    full = sp.train(base, sst2, name, method_cfg(name), cfg(), run_dir=tmp_path / "full")

    # Interrupt the second run right after step 3 (checkpoint at step 2: one interval of work lost at most).
    real_step = Trainer._eval_and_keep_best

    def crash_after_step_3(self):
        real_step(self)
        if self.step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_eval_and_keep_best", crash_after_step_3)
    with pytest.raises(KeyboardInterrupt):
        sp.train(base, sst2, name, method_cfg(name), cfg(), run_dir=tmp_path / "cut")
    monkeypatch.setattr(Trainer, "_eval_and_keep_best", real_step)
    resumed = Trainer(base, sst2, name, method_cfg(name), cfg(), run_dir=tmp_path / "cut")
    assert resumed.step == 2
    result = resumed.run()

    for k, v in full.method.state_dict().items():
        torch.testing.assert_close(result.method.state_dict()[k], v, rtol=0, atol=1e-6)
    assert [h["step"] for h in result.history] == [h["step"] for h in full.history]
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [h["step"] for h in full.history]


def test_checkpoint_of_another_run_is_refused(base, sst2, tmp_path):
    sp.train(base, sst2, "soft", method_cfg("soft"), cfg(steps=2), run_dir=tmp_path)
    with pytest.raises(sp.SoftpromptError, match="different run"):
        sp.train(base, sst2, "soft", method_cfg("soft"), cfg(steps=2, lr=1.0), run_dir=tmp_path)


def test_a_checkpoint_from_before_a_new_method_option_resumes(base, sst2, tmp_path, monkeypatch):
    """A checkpoint whose method config lacks an option added since (init_prompt) resumes, the option at its
    default; one whose config differs is still refused."""
    config = method_cfg("soft")
    older = {k: v for k, v in config.to_dict().items() if k != "init_prompt"}
    monkeypatch.setattr(type(config), "to_dict", lambda self: dict(older))
    trainer = Trainer(base, sst2, "soft", config, cfg(steps=4), run_dir=tmp_path)
    trainer.step = 2
    trainer._save_checkpoint()
    monkeypatch.undo()
    assert Trainer(base, sst2, "soft", method_cfg("soft"), cfg(steps=4), run_dir=tmp_path).step == 2
    with pytest.raises(sp.SoftpromptError, match="different run"):
        Trainer(base, sst2, "soft", METHODS["soft"].config_class(num_virtual_tokens=4), cfg(steps=4), run_dir=tmp_path)


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_nan_loss_stops_with_error_and_keeps_checkpoint(base, sst2, tmp_path, monkeypatch, bad):
    calls = {"n": 0}
    real = Trainer.loss

    def poisoned(self, batch):
        calls["n"] += 1
        loss = real(self, batch)
        return loss * float(bad) if calls["n"] > 4 else loss

    monkeypatch.setattr(Trainer, "loss", poisoned)
    with pytest.raises(TrainingError, match=f"The loss became {bad} at step 5; the last good checkpoint is kept"):
        sp.train(base, sst2, "soft", method_cfg("soft"), cfg(), run_dir=tmp_path)
    t = Trainer(base, sst2, "soft", method_cfg("soft"), cfg(), run_dir=tmp_path)
    assert t.step == 4 and (tmp_path / CHECKPOINT).exists()
    assert all(torch.isfinite(p).all() for p in t.method.parameters())


def _count_attention_calls(base):
    """Count calls of every attention module; recomputation under checkpointing calls them again."""
    calls = {"n": 0}
    for name, m in base.model.named_modules():
        if name.endswith(("self_attn", ".attn")):
            m.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    return calls


@pytest.mark.parametrize("name", sorted(METHODS))
def test_gradient_checkpointing_gives_the_same_training(base, sst2, tmp_path, name):
    if refused(base, sst2, name, tmp_path):
        return
    build_method(name, method_cfg(name), init_context(base, sst2, 0))  # the model's layout probes: before counting
    n_layers = base.kv_layout.num_layers
    calls = _count_attention_calls(base)
    plain = sp.train(base, sst2, name, method_cfg(name), cfg(steps=3, eval_every=0), run_dir=tmp_path / "a")
    plain_calls, calls["n"] = calls["n"], 0
    ckpt = sp.train(
        base,
        sst2,
        name,
        method_cfg(name),
        cfg(steps=3, eval_every=0, gradient_checkpointing=True),
        run_dir=tmp_path / "b",
    )
    assert calls["n"] - plain_calls == 3 * n_layers  # each training forward's layers were recomputed in backward
    for k, v in plain.method.state_dict().items():
        torch.testing.assert_close(ckpt.method.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    assert not base.model.is_activation_checkpointing
    assert not any(m.training for m in base.model.modules())


def test_run_records(base, sst2, tmp_path):
    result = sp.train(base, sst2, "soft", method_cfg("soft"), cfg(final_eval=True), run_dir=tmp_path)
    assert (tmp_path / "curves.png").stat().st_size > 1000
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 7))
    assert {"zero_shot", "dev"} <= set(result.prompt.metrics)
    assert result.prompt.train["steps_done"] == 6
    assert result.seconds_per_step > 0 and result.peak_memory_bytes > 0


def test_adafactor_and_cosine_schedule_train(base, sst2, tmp_path):
    result = sp.train(
        base,
        sst2,
        "soft",
        method_cfg("soft"),
        cfg(optimizer="adafactor", scheduler="cosine", lr=0.3, warmup_steps=2, eval_every=0),
        run_dir=tmp_path,
    )
    init = Trainer(base, sst2, "soft", method_cfg("soft"), cfg(), run_dir=None).method.collapse().embeds
    assert not torch.equal(result.prompt.injection.embeds, init)
    assert result.prompt.train["optimizer"] == "adafactor" and result.prompt.train["lr"] == 0.3
    lrs = [r["lr"] for r in result.history if "lr" in r]
    assert lrs[-1] < max(lrs)  # the cosine schedule decays


# --- hardening: options that would train wrongly, non-finite prompts, run folders, what is saved when --------------


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("max_grad_norm", -1.0, "max_grad_norm must be a finite number >= 0 (0 turns clipping off), got -1.0"),
        ("max_grad_norm", float("nan"), "max_grad_norm must be a finite number >= 0"),
        ("weight_decay", -1.0, "weight_decay must be a finite number >= 0 (0 is none), got -1.0"),
        ("eval_limit", 0, "eval_limit must be >= 1, got 0"),
        ("eval_limit", -3, "eval_limit must be >= 1, got -3"),
        ("final_eval_limit", 0, "final_eval_limit must be >= 1, got 0"),
    ],
)
def test_training_options_that_would_train_or_measure_wrongly_are_refused(option, value, message):
    from softprompt.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        sp.TrainConfig(**{option: value})
    assert message in str(e.value) and f"--{option.replace('_', '-')}" in e.value.fix
    assert sp.TrainConfig(max_grad_norm=0, eval_limit=None).max_grad_norm == 0  # off, and the whole split


def test_a_non_finite_prompt_stops_training(base, sst2, tmp_path, monkeypatch):
    real_step = torch.optim.AdamW.step

    def poisoned(self, *a, **k):
        out = real_step(self, *a, **k)
        with torch.no_grad():
            self.param_groups[0]["params"][0][0, 0] = float("nan")  # the loss of this step was finite
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    with pytest.raises(TrainingError, match="became NaN or infinite at step 1; the last good checkpoint is kept"):
        sp.train(base, sst2, "soft", method_cfg("soft"), cfg(), run_dir=tmp_path)
    assert not (tmp_path / CHECKPOINT).exists()


def test_a_run_dir_that_is_a_file_or_in_use_is_refused(base, sst2, tmp_path):
    from softprompt.errors import StorageError
    from softprompt.fileio import LOCK, acquire_lock, release_lock

    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="is a file, not a folder"):
        sp.train(base, sst2, "soft", method_cfg("soft"), cfg(), run_dir=tmp_path / "file")
    lock = acquire_lock(tmp_path / "run")  # another training holds the folder
    with pytest.raises(StorageError, match="is in use by process"):
        sp.train(base, sst2, "soft", method_cfg("soft"), cfg(steps=1), run_dir=tmp_path / "run")
    release_lock(lock)
    sp.train(base, sst2, "soft", method_cfg("soft"), cfg(steps=1), run_dir=tmp_path / "run")
    assert not (tmp_path / "run" / LOCK).exists()  # released after the run


def test_the_prompt_is_saved_before_the_plot_and_a_failing_plot_is_a_warning(base, sst2, tmp_path, monkeypatch):
    import softprompt.plots as plots
    from softprompt.errors import StorageError

    def disk_full(*a, **k):
        assert (tmp_path / "p.safetensors").exists()  # the prompt was written first
        raise StorageError("Could not write curves.png: No space left on device.", "free disk space")

    monkeypatch.setattr(plots, "plot_history", disk_full)
    out = tmp_path / "p.safetensors"
    result = sp.train(base, sst2, "soft", method_cfg("soft"), cfg(steps=2), run_dir=tmp_path / "run", out=out)
    assert result.path == out and sp.load_prompt(out, base).train["steps_done"] == 2
    assert "curves.png were not written: Could not write curves.png: No space left" in result.warnings[0]
    # an existing prompt file is refused before any training (and names --overwrite)
    with pytest.raises(StorageError, match="already exists") as e:
        Trainer(base, sst2, "soft", method_cfg("soft"), cfg(), out=out, overwrite=False)
    assert "--overwrite" in e.value.fix


def test_a_prompt_file_that_appears_during_training_is_kept(base, sst2, tmp_path, monkeypatch):
    from softprompt.errors import StorageError

    out = tmp_path / "p.safetensors"
    real = Trainer._finish

    def someone_else_writes(self):
        out.write_bytes(b"theirs")
        return real(self)

    monkeypatch.setattr(Trainer, "_finish", someone_else_writes)
    with pytest.raises(StorageError, match="appeared while training and was not replaced; this run's prompt is"):
        sp.train(base, sst2, "soft", method_cfg("soft"), cfg(steps=1), out=out, overwrite=False)
    assert out.read_bytes() == b"theirs"
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("p.2")]
    assert sp.load_prompt(aside, base).train["steps_done"] == 1
