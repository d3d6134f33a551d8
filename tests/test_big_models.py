"""Frozen bases too big for one device, on the tiny Llama: weights quantized by bitsandbytes (NF4, int8; its CPU
backend here, the same code path as on CUDA) and layers placed by a device map (offloaded to CPU RAM and disk).
Sharding over processes is in test_train_distributed.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import DATA, make_prompt, run_cli

import softprompt as sp
from softprompt.base import QUANTIZATIONS, parse_max_memory
from softprompt.errors import ConfigError
from softprompt.generate import generate_ids
from softprompt.multitask import MultiTask

STEPS = sp.TrainConfig(
    steps=3, batch_size=2, lr=5e-2, warmup_steps=0, eval_every=0, final_eval=False, progress=False, checkpoint_every=0
)
# layer 1 lives on disk between forwards (read from the safetensors checkpoint itself), the rest in CPU RAM: both
# kinds of accelerate offload hooks
OFFLOADED = {
    "model.embed_tokens": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "cpu",
}


@pytest.fixture(scope="module")
def full(model_dir):
    return sp.load_base(model_dir, device="cpu")


@pytest.fixture(scope="module", params=QUANTIZATIONS)
def quantized(model_dir, request):
    return sp.load_base(model_dir, device="cpu", quantize=request.param)


def test_a_quantized_base_keeps_its_embedding_and_fingerprint(full, quantized):
    assert quantized.quantization in QUANTIZATIONS and full.quantization is None
    linear = quantized.model.model.layers[0].self_attn.q_proj
    assert type(linear).__module__.startswith("bitsandbytes")  # really quantized, not a float copy
    assert quantized.num_bytes() < 0.6 * full.num_bytes()
    # the embedding is not quantized: prompt init and the fingerprint read the same values
    assert torch.equal(quantized.full_embedding_matrix(), full.full_embedding_matrix())
    a, b = quantized.fingerprint, full.fingerprint
    assert (a.config_hash, a.embedding_sha256) == (b.config_hash, b.embedding_sha256)
    assert a.quantization == quantized.quantization and b.quantization is None
    assert sp.Fingerprint.from_dict(a.to_dict()) == a
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        q, f = quantized.model(ids).logits, full.model(ids).logits
    assert torch.isfinite(q).all() and not torch.equal(q, f)  # the weights really are stored differently


@pytest.mark.parametrize("method", ["soft", "prefix", "llama-adapter"])
def test_only_the_full_precision_prompt_trains_on_a_quantized_base(quantized, sst2, method, tmp_path):
    # bitsandbytes' CPU backend repacks the weights for its kernel on the first forward (state_dict() then
    # re-serializes them differently at each call): compare the parameters and the function after that
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        logits = quantized.model(ids).logits
    before = {k: p.detach().clone() for k, p in quantized.model.named_parameters()}
    result = sp.train(quantized, sst2, method, {"num_virtual_tokens": 3}, STEPS, run_dir=tmp_path)
    after = dict(quantized.model.named_parameters())
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None and not p.requires_grad for p in quantized.model.parameters())
    with torch.no_grad():
        assert torch.equal(quantized.model(ids).logits, logits)
    tensors = result.prompt.injection.tensors()
    assert tensors and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in tensors.values())
    losses = [r["loss"] for r in result.history if "loss" in r]
    assert losses and all(map(torch.isfinite, torch.tensor(losses)))
    assert result.prompt.base["quantization"] == quantized.quantization
    # save -> load on the same quantized base gives identical logits
    path = result.prompt.save(tmp_path / "p.safetensors")
    loaded = sp.load_prompt(path, base=quantized)
    enc = sp.data.Encoder(sst2.spec, quantized)
    row = enc.training_example(sst2.split("dev").prompts[0], sst2.split("dev").targets[0])
    with torch.no_grad():
        x = quantized.family.next_token_logits([dataclasses.replace(row, injection=result.prompt.injection)])
        y = quantized.family.next_token_logits([dataclasses.replace(row, injection=loaded.injection)])
    assert torch.equal(x, y)


@pytest.mark.parametrize("method", ["soft", "prefix", "llama-adapter"])
def test_gradients_through_a_quantized_base_match_finite_differences(quantized, sst2, method):
    """After forwards without gradients in eval mode (evaluation, the KV layout probe), as training interleaves them:
    bitsandbytes' CPU inference kernel, which it switches 4-bit weights to there, has no backward."""
    from softprompt.methods import METHODS, InitContext, build_method

    rows = [
        sp.data.Encoder(sst2.spec, quantized).training_example(p, t)
        for p, t in zip(sst2.split("train").prompts[:2], sst2.split("train").targets[:2])
    ]
    m = build_method(method, METHODS[method].config_class(num_virtual_tokens=3), InitContext(quantized, [], None))
    with torch.no_grad():
        if method == "llama-adapter":  # open the zero-init gates: at zero the slope is below int8's rounding
            m.gate.fill_(0.5)
        quantized.family.loss([dataclasses.replace(r, injection=m()) for r in rows])  # a forward with no gradient

    def loss():
        return quantized.family.loss([dataclasses.replace(r, injection=m()) for r in rows])

    loss().backward()
    params = [p for p in m.parameters() if p.requires_grad]
    grads = [p.grad.clone() for p in params]
    direction = [g / torch.cat([x.flatten() for x in grads]).norm() for g in grads]
    eps = 1e-2
    with torch.no_grad():
        values = []
        for sign in (1, -1):
            for p, d in zip(params, direction):
                p.add_(sign * eps * d)
            values.append(loss().item())
            for p, d in zip(params, direction):
                p.sub_(sign * eps * d)
    slope = (values[0] - values[1]) / (2 * eps)
    analytic = sum((g * d).sum() for g, d in zip(grads, direction)).item()  # the gradient's norm
    # int8 (LLM.int8) also rounds the activations to 8 bits, so its loss is only piecewise smooth at this scale; the
    # adaption prompts go through two more of its matmuls in every layer (k_proj, v_proj)
    rel = 0.05 if quantized.quantization == "nf4" else 0.25 if method == "llama-adapter" else 0.15
    assert analytic > 0 and slope == pytest.approx(analytic, rel=rel)


def test_a_prompt_moves_between_full_precision_and_quantized_bases_with_a_warning(
    full, quantized, sst2, tmp_path, capsys
):
    for made_on, runs_on in ((full, quantized), (quantized, full)):
        path = make_prompt(made_on, sst2.spec, "soft", 3).save(tmp_path / f"{made_on.quantization}.safetensors")
        capsys.readouterr()
        sp.load_prompt(path, base=runs_on)  # not refused
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("softprompt: warning:"), err
        assert f"quantized to {quantized.quantization}" in err[0] and "in full precision" in err[0]
    sp.load_prompt(path, base=quantized)  # the same storage: silent
    assert capsys.readouterr().err == ""


def test_a_quantized_base_serves_mixed_batches_row_for_row(quantized, sst2, e2e):
    prompts = {
        "sst2-soft": make_prompt(quantized, sst2.spec, "soft", 3),
        "e2e-prefix": make_prompt(quantized, e2e.spec, "prefix", 4, seed=1),
        "e2e-plain": make_prompt(quantized, e2e.spec, None),
    }
    mt = MultiTask(quantized)
    for name, prompt in prompts.items():
        mt.add(name, prompt)
    reqs = [("sst2-soft", "the film was great fun"), ("e2e-prefix", "name[The Eagle], eatType[pub]")]
    reqs += [("e2e-plain", "name[Fun], food[italian]"), ("sst2-soft", "bad")]
    together = mt.generate_ids(reqs, max_new_tokens=6)
    for (task, text), tokens in zip(reqs, together):
        _, row = mt.encode(task, text, reserve=6)
        assert generate_ids(quantized, [dataclasses.replace(row, injection=prompts[task].injection)], 6) == [tokens]


def test_a_device_map_offloads_layers_and_trains_the_same_prompt(model_dir, full, sst2, tmp_path):
    placed = sp.load_base(model_dir, device_map=OFFLOADED, offload_folder=tmp_path / "offload")
    assert placed.model.hf_device_map["model.layers.1"] == "disk"
    assert placed.model.model.layers[1].mlp.up_proj.weight.device.type == "meta"  # not in memory between forwards
    assert placed.device.type == "cpu" and placed.fingerprint == full.fingerprint
    a = sp.train(placed, sst2, "soft", {"num_virtual_tokens": 3}, STEPS, run_dir=tmp_path / "placed")
    b = sp.train(full, sst2, "soft", {"num_virtual_tokens": 3}, STEPS, run_dir=tmp_path / "full")
    start = make_prompt(full, sst2.spec, "soft", 3, moved=0).injection.embeds
    assert not torch.equal(a.prompt.injection.embeds, start)  # it trained
    torch.testing.assert_close(a.prompt.injection.embeds, b.prompt.injection.embeds, rtol=0, atol=1e-6)


def test_the_command_line_trains_on_a_quantized_base_with_auto_placement(model_dir, tmp_path, capsys):
    args = ["--task", "sst2", "--data-dir", DATA, "--model", model_dir]
    train = ["train", *args, "--steps", 2, "--batch-size", 2, "--num-virtual-tokens", 2, "--eval-every", 0]
    train += ["--no-final-eval", "--no-progress", "--run-dir", tmp_path / "run"]
    code, out, err = run_cli(capsys, *train, "--quantize", "nf4", "--out", tmp_path / "nf4.safetensors")
    assert code == 0, err
    assert sp.load_prompt(tmp_path / "nf4.safetensors").base["quantization"] == "nf4"
    code, out, err = run_cli(
        capsys, *train, "--device-map", "auto", "--max-memory", "cpu=300000", "--out", tmp_path / "auto.safetensors"
    )
    assert code == 0, err
    code, out, err = run_cli(capsys, "eval", *args, "--prompt", tmp_path / "nf4.safetensors", "--limit", 4)
    assert code == 0 and "quantized to nf4" in err and "in full precision" in err


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"device": "cpu", "device_map": "auto"}, "pass one of the two"),
        ({"max_memory": "cpu=1GiB"}, "need --device-map"),
        ({"device_map": "everywhere"}, "Unknown device map"),
        ({"quantize": "int3"}, "Unknown quantization"),
    ],
)
def test_placement_mistakes_are_one_line_errors(model_dir, options, match):
    with pytest.raises(ConfigError, match=match):
        sp.load_base(model_dir, **options)


def test_max_memory_is_parsed_into_bytes():
    assert parse_max_memory("0=1GiB, cpu=300000") == {0: 2**30, "cpu": 300000}
    for bad in ("", "0", "=1GiB", "cpu=lots"):
        with pytest.raises(ConfigError, match="max-memory"):
            parse_max_memory(bad)
