"""PEFT parity beyond causal LMs: T5 and BART (`PeftModelForSeq2SeqLM`), BERT and RoBERTa
(`PeftModelForFeatureExtraction`).

Both directions for every shared method: an adapter trained in PEFT and imported gives the logits
PEFT gives; a softprompt prompt exported and loaded with `PeftModel.from_pretrained` gives PEFT the
logits softprompt gives. Logits are compared where the target is predicted: every decoder position
of a seq2seq model, the mask positions of a masked LM, with the encoder side right-padded.
`-s` prints the max |difference| of every case.
"""

from __future__ import annotations

import pytest
import torch
from helpers import build_tiny

import softprompt as sp
from softprompt.example import MASK, Example
from softprompt.injection import EMPTY
from softprompt.methods import METHODS, InitContext, build_method
from softprompt.peft_format import export_peft, import_peft

peft = pytest.importorskip("peft")

TOL = 1e-5
ARCHS = ("t5", "bart", "bert", "roberta")
TEXTS = ["the film was great and the acting", "bad", "who loved the plot"]


def rows(base) -> list[Example]:
    family = base.family
    out = []
    for text in TEXTS:
        ids, slot = family.source_ids(text + (MASK if family.name == "masked_lm" else ""))
        out.append(Example(ids, slot, family.target_ids(" good fun", eos=False)))
    return out


@torch.no_grad()
def ours(base, injection) -> list[torch.Tensor]:
    """softprompt's logits at every target position, one (K_i, V) per row."""
    logits, _, mask = base.family.target_logits([Example(e.source, e.slot, e.target, injection) for e in rows(base)])
    return [logits[i][mask[i]] for i in range(len(logits))]


@torch.no_grad()
def theirs(base, peft_model, num_virtual_tokens: int, prepends: bool) -> list[torch.Tensor]:
    """PEFT's logits at the same positions: the plain inputs of `rows`, right-padded, through the PEFT model."""
    family, examples = base.family, rows(base)
    pad = base.tokenizer.pad_token_id
    if family.name == "seq2seq":
        src = [e.source for e in examples]
        dec = [[family.start_id] + e.target[:-1] for e in examples]
    else:
        src = [e.source[: e.slot] + [family.mask_id] * len(e.target) + e.source[e.slot :] for e in examples]
    ids = torch.full((len(src), max(map(len, src))), pad)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(src):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
    if family.name == "seq2seq":
        dec_ids = torch.full((len(dec), max(map(len, dec))), pad)
        dec_mask = torch.zeros_like(dec_ids)
        for i, d in enumerate(dec):
            dec_ids[i, : len(d)], dec_mask[i, : len(d)] = torch.tensor(d), 1
        logits = peft_model(
            input_ids=ids, attention_mask=mask, decoder_input_ids=dec_ids, decoder_attention_mask=dec_mask
        ).logits
        return [logits[i, : len(e.target)] for i, e in enumerate(examples)]
    logits = peft_model(input_ids=ids, attention_mask=mask).logits
    shift = num_virtual_tokens if prepends else 0  # prompt tuning returns the virtual tokens' positions too
    return [logits[i, shift + e.slot : shift + e.slot + len(e.target)] for i, e in enumerate(examples)]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def check(base, injection, peft_logits, name, record_parity):
    logits = ours(base, injection)
    assert max_diff(logits, ours(base, EMPTY)) > 1e-3  # the prompt changes the output: the comparison means something
    diff = max_diff(logits, peft_logits)
    record_parity(name, diff)
    assert diff < TOL


def task_type(base) -> str:
    return {"causal": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM", "masked_lm": "FEATURE_EXTRACTION"}[base.family.name]


PEFT_CONFIGS = {
    "prompt_tuning": lambda t: peft.PromptTuningConfig(task_type=t, num_virtual_tokens=4),
    "p_tuning_mlp": lambda t: peft.PromptEncoderConfig(task_type=t, num_virtual_tokens=4, encoder_hidden_size=32),
    "p_tuning_lstm": lambda t: peft.PromptEncoderConfig(
        task_type=t, num_virtual_tokens=4, encoder_hidden_size=16, encoder_reparameterization_type="LSTM"
    ),
    "prefix": lambda t: peft.PrefixTuningConfig(task_type=t, num_virtual_tokens=4),
    "prefix_mlp": lambda t: peft.PrefixTuningConfig(
        task_type=t, num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=32
    ),
}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", sorted(PEFT_CONFIGS))
def test_an_imported_peft_adapter_gives_peft_s_logits(arch, kind, tokenizer, tmp_path, record_parity):
    base = build_tiny(arch, tokenizer)
    torch.manual_seed(5)
    trained = peft.get_peft_model(build_tiny(arch, tokenizer).model, PEFT_CONFIGS[kind](task_type(base)))
    with torch.no_grad():  # away from the init, as training would move it
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    trained.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(build_tiny(arch, tokenizer).model, tmp_path).eval()  # as a user loads it
    prompt = import_peft(tmp_path, base)
    check(
        base,
        prompt.injection,
        theirs(base, loaded, 4, prompt.injection.embeds is not None),
        f"import {arch} {kind}",
        record_parity,
    )


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", sorted(m for m, cls in METHODS.items() if "adapter" not in cls.fills))
def test_an_exported_prompt_gives_peft_softprompt_s_logits(arch, method, tokenizer, tmp_path, record_parity, sst2):
    base = build_tiny(arch, tokenizer)
    config = METHODS[method].config_class(num_virtual_tokens=4, init="random")
    m = build_method(method, config, InitContext(base, sst2.spec.verbalizers, seed=3))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    prompt = sp.Prompt(
        injection=m.collapse(),
        method=method,
        method_config=m.config.to_dict(),
        task=sst2.spec.portable(),
        base=base.fingerprint.to_dict(),
    )
    assert export_peft(prompt, tmp_path) == []
    loaded = peft.PeftModel.from_pretrained(build_tiny(arch, tokenizer).model, tmp_path).eval()
    check(
        base,
        prompt.injection,
        theirs(base, loaded, 4, prompt.injection.embeds is not None),
        f"export {arch} {method}",
        record_parity,
    )
    again = import_peft(tmp_path, base)  # and back: the file holds softprompt's metadata
    assert all(torch.equal(again.injection.tensors()[k], v) for k, v in prompt.injection.tensors().items())
