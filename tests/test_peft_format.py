"""PEFT adapters in and out: logits equal PEFT's own, both ways, for every prompt-learning method.

Like is compared with like (see `softprompt.peft_format`): unpadded rows, whose positions agree in
both libraries; for KV prefixes also left-padded rows, with PEFT given the position ids that
softprompt uses (PEFT adds the prefix length to any it is given).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import DATA, make_prompt

import softprompt as sp
from softprompt.errors import PromptFileError
from softprompt.example import Example
from softprompt.hub import write_model_card
from softprompt.methods import METHODS
from softprompt.peft_format import export_peft, import_peft, read_peft


def fresh_prompt(base, spec, method: str, P: int = 4):
    """A prompt of `method` as initialized (random, seed 3), not moved: both libraries see the same tensors."""
    return make_prompt(base, spec, method, P, seed=3, init="random", moved=0)


peft = pytest.importorskip("peft")
# the methods of PEFT's prompt-learning formats; LLaMA-Adapter's export is refused (test_llama_adapter.py)
EXPORTED = sorted(m for m, cls in METHODS.items() if "adapter" not in cls.fills)

TOL = 1e-5


def _batch(base, padded: bool):
    """(input_ids, attention_mask) of 3 rows: all of length 7, or left-padded to 7 from lengths 7, 4, 2."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, len(base.tokenizer), (3, 7), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        for row, n in enumerate((7, 4, 2)):
            mask[row, : 7 - n] = 0
            ids[row, : 7 - n] = base.tokenizer.pad_token_id
    return ids, mask


@torch.no_grad()
def ours(base, prompt, ids, mask):
    """softprompt's logits for the text positions of the batch, (B, T, V); pads zeroed.

    One forward over the family's layout of the batch (left padding, like `ids`), all positions' logits: the
    public scorers keep only some positions' logits, and a projection of one position runs another kernel
    than PEFT's of all (SmolLM2's logits then differ by ~4e-5).
    """
    family = base.family
    rows = [r[m.bool()].tolist() for r, m in zip(ids, mask)]
    layout = family.layout([Example(r, len(r), [], prompt.injection) for r in rows])
    assert torch.equal(layout.mask[:, -ids.shape[1] :], mask)  # the same layout as the left-padded batch
    logits = family._forward(layout, 0)
    return logits[:, -ids.shape[1] :] * mask[..., None]


@torch.no_grad()
def theirs(peft_model, ids, mask, positions=None):
    """PEFT's logits for the text positions, (B, T, V); `positions` are passed on as position_ids (PEFT adds P)."""
    extra = {} if positions is None else {"position_ids": positions}
    logits = peft_model(input_ids=ids, attention_mask=mask, **extra).logits
    return logits[:, -ids.shape[1] :] * mask[..., None]


@torch.no_grad()
def peft_tensors(peft_model) -> dict[str, torch.Tensor]:
    """What PEFT feeds the model, in softprompt's layout: embeds (P, D) or kv (L, 2, H_kv, P, hd).

    Logits of tiny random models can be insensitive to a prompt (GPT-2's barely move for a soft
    prompt), so the layouts are also compared directly.
    """
    prompt = peft_model.get_prompt(batch_size=1)
    if isinstance(prompt, torch.Tensor):
        return {"embeds": prompt[0]}
    return {"kv": torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in prompt.layers])}


def text_positions(mask):
    """Positions counted from each row's first real token (what softprompt uses, and PEFT's generate)."""
    return (mask.cumsum(1) - 1).clamp(min=0)


@pytest.mark.parametrize("method", EXPORTED)
def test_export_gives_peft_the_same_logits(base, sst2, tmp_path, method):
    prompt = sp.load_prompt(fresh_prompt(base, sst2.spec, method).save(tmp_path / "p"), base)
    notes = export_peft(prompt, tmp_path / "peft")
    assert notes == []  # both libraries place prefixes at positions 0..P-1: nothing to adjust
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base.model), tmp_path / "peft").eval()
    inj = prompt.injection
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    expected = {"soft": "PROMPT_TUNING", "mpt": "PROMPT_TUNING", "ptuning": "P_TUNING"}.get(method, "PREFIX_TUNING")
    assert config["peft_type"] == expected  # an MPT task prompt is collapsed to a soft prompt
    assert {k: torch.equal(v, inj.tensors()[k]) for k, v in peft_tensors(model).items()} == {
        k: True for k in inj.tensors()
    }
    for padded in (False, True) if inj.kv is not None else (False,):
        ids, mask = _batch(base, padded)
        positions = None
        if inj.kv is not None:
            # PEFT adds P to the position ids it is given: pass the text's own positions (padded rows need them)
            positions = text_positions(mask) + inj.kv_positions - inj.num_kv
        diff = (ours(base, prompt, ids, mask) - theirs(model, ids, mask, positions)).abs().max().item()
        print(f"export {base.config.model_type} {method} padded={padded}: max |diff| {diff:.2e}")  # shown with -s
        assert diff < TOL, f"{method} padded={padded}: max |diff| {diff:.2e}"


PEFT_CONFIGS = {
    "prompt_tuning": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "p_tuning_mlp": lambda: peft.PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=32
    ),
    "p_tuning_lstm": lambda: peft.PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16, encoder_reparameterization_type="LSTM"
    ),
    "prefix": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "prefix_mlp": lambda: peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=32
    ),
}


def peft_adapter(base, kind: str, path):
    """A randomly initialized PEFT adapter of `kind`, saved to `path`; returns the live PEFT model (eval mode)."""
    torch.manual_seed(5)
    model = peft.get_peft_model(copy.deepcopy(base.model), PEFT_CONFIGS[kind]()).eval()
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("kind", sorted(PEFT_CONFIGS))
def test_import_gives_peft_the_same_logits(base, tmp_path, kind):
    model = peft_adapter(base, kind, tmp_path / "peft")
    prompt = sp.load_prompt(import_peft(tmp_path / "peft", base).save(tmp_path / "p"), base)
    assert prompt.spec.template == "{text}"
    for k, v in peft_tensors(model).items():
        torch.testing.assert_close(prompt.injection.tensors()[k], v, rtol=0, atol=1e-6)
    batches = [(False, None)]
    if prompt.injection.kv is not None:
        assert prompt.injection.kv_positions == 4  # the text starts after the prefix, in both libraries
        batches.append((True, "ours"))
    for padded, pos in batches:
        ids, mask = _batch(base, padded)
        positions = text_positions(mask) if pos else None
        diff = (ours(base, prompt, ids, mask) - theirs(model, ids, mask, positions)).abs().max().item()
        print(f"import {base.config.model_type} {kind} padded={padded}: max |diff| {diff:.2e}")  # shown with -s
        assert diff < TOL, f"{kind} padded={padded}: max |diff| {diff:.2e}"


@pytest.mark.parametrize("method", EXPORTED)
def test_export_then_import_restores_the_prompt(base, sst2, tmp_path, method):
    prompt = fresh_prompt(base, sst2.spec, method)
    export_peft(prompt, tmp_path)
    back = import_peft(tmp_path, base)
    for k, v in prompt.injection.tensors().items():
        assert torch.equal(back.injection.tensors()[k], v)
    assert back.injection.kv_positions == prompt.injection.kv_positions
    assert (back.method, back.method_config, back.task) == (prompt.method, prompt.method_config, prompt.task)
    assert not (tmp_path / "README.md").exists()  # the library writes no card: `softprompt export` does
    write_model_card(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: peft" in card


def test_imports_are_checked(base, sst2, tokenizer, tmp_path):
    from helpers import build_tiny

    peft_adapter(base, "prefix", tmp_path / "a")
    other = build_tiny("gpt2" if base.config.model_type == "llama" else "llama", tokenizer)
    with pytest.raises(PromptFileError, match="does not fit"):
        import_peft(tmp_path / "a", other)
    export_peft(fresh_prompt(base, sst2.spec, "soft"), tmp_path / "ours")  # names its model: other weights are refused
    with pytest.raises(PromptFileError, match="weights"):
        import_peft(tmp_path / "ours", build_tiny(base.config.model_type, tokenizer, seed=1))
    with pytest.raises(PromptFileError, match="not a softprompt prompt file"):
        sp.load_prompt(tmp_path / "ours" / "adapter_model.safetensors")
    (tmp_path / "a" / "adapter_model.safetensors").rename(tmp_path / "a" / "adapter_model.bin")
    with pytest.raises(PromptFileError, match="pickles are never loaded"):
        read_peft(tmp_path / "a")
    lora = peft.get_peft_model(
        copy.deepcopy(base.model), peft.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules="all-linear")
    )
    lora.save_pretrained(tmp_path / "lora")
    with pytest.raises(PromptFileError, match="prompt_embeddings|not a prompt-learning"):
        import_peft(tmp_path / "lora", base)


def test_cli_export_and_import(model_dir, tmp_path, capsys):
    from softprompt.commands import main

    base = sp.load_base(model_dir, device="cpu")
    sst2 = sp.load_task("sst2", str(DATA))
    path = fresh_prompt(base, sst2.spec, "deep").save(tmp_path / "p")
    assert main(["export", "--format", "peft", str(path), str(tmp_path / "peft")]) == 0
    assert "position_ids" not in capsys.readouterr().out
    assert main(["import", str(tmp_path / "peft"), "--model", model_dir, "--out", str(tmp_path / "q")]) == 0
    q = sp.load_prompt(tmp_path / "q.safetensors", base)
    assert torch.equal(q.injection.kv, sp.load_prompt(path).injection.kv)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["soft", "deep"])
def test_smollm2_round_trip_through_peft(smollm2, sst2, tmp_path, method):
    """Grouped-query attention at full size (30 layers, 3 KV heads of 64): export, load in PEFT, import back."""
    prompt = fresh_prompt(smollm2, sst2.spec, method, 8)
    export_peft(prompt, tmp_path / "peft")
    model = peft.PeftModel.from_pretrained(copy.deepcopy(smollm2.model), tmp_path / "peft").eval()
    ids, mask = _batch(smollm2, padded=False)
    inj = prompt.injection
    positions = None if inj.kv is None else text_positions(mask) + inj.kv_positions - inj.num_kv
    back = import_peft(tmp_path / "peft", smollm2)
    for way, p in (("export", prompt), ("import", back)):
        diff = (ours(smollm2, p, ids, mask) - theirs(model, ids, mask, positions)).abs().max().item()
        print(f"smollm2 {method} {way}: max |diff| {diff:.2e}")  # shown with -s
        assert diff < TOL
