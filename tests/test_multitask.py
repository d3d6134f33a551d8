"""Mixed-task batches: every row equals its task run alone, compiled or not; the store as the source of truth."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import build_tiny, make_prompt, spec_like

import softprompt as sp
from softprompt.data import Encoder
from softprompt.errors import PromptFileError
from softprompt.evaluate import class_log_likelihoods
from softprompt.generate import generate_ids
from softprompt.multitask import MultiTask, UnknownTaskError, class_scores, padded_groups
from softprompt.store import Store

SST2_INPUTS = ["the film was great fun", "bad", "who hated the plot and the acting of the actor", "a boring story"]
E2E_INPUTS = ["name[The Eagle], eatType[pub]", "name[Fun], food[italian], area[near the shop]"]


def task_prompts(base, sst2, e2e) -> dict[str, sp.Prompt]:
    """Every method, different numbers of virtual tokens, classification and generation, a template alone,
    and a task whose class words are several tokens long."""
    cls, gen = sst2.spec, e2e.spec
    multi = spec_like(cls, name="sst2-words", labels={"0": "bad", "1": "great fun", "2": "awful boring plot"})
    return {
        "sst2-soft": make_prompt(base, cls, "soft", 3),
        "e2e-prefix": make_prompt(base, gen, "prefix", 5, seed=1),
        "sst2-deep": make_prompt(base, multi, "deep", 2, seed=2),
        "e2e-ptuning": make_prompt(base, gen, "ptuning", 4, seed=3),
        "sst2-hard": make_prompt(base, spec_like(cls, template="Movie review: {sentence}\nIs it good?"), None),
        "e2e-soft": make_prompt(base, spec_like(gen, template="Data: {mr}\nSentence:"), "soft", 6, seed=4),
    }


def mixed_requests(prompts):
    names = list(prompts)
    reqs = []
    for i in range(8):
        name = names[i % len(names)]
        pool = SST2_INPUTS if name.startswith("sst2") else E2E_INPUTS
        reqs.append((name, pool[i % len(pool)]))
    return reqs


@pytest.fixture
def prompts(base, sst2, e2e):
    return task_prompts(base, sst2, e2e)


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "uncompiled"])
def test_every_row_of_a_mixed_batch_equals_its_task_alone(base, prompts, compiled):
    mt = MultiTask(base, compile=compiled)
    for name, prompt in prompts.items():
        mt.add(name, prompt)
    reqs = mixed_requests(prompts)
    rows = [mt.encode(t, v, reserve=8) for t, v in reqs]
    assert len({e.injection.num_positions for e, _ in rows}) > 3  # really different prompt lengths

    # next-token logits of the whole mixed batch vs each row alone with its uncompiled prompt file
    with torch.no_grad():
        mixed = base.family.next_token_logits([ex for _, ex in rows])
        for (t, _), (_, ex), row in zip(reqs, rows, mixed):
            alone = base.family.next_token_logits([dataclasses.replace(ex, injection=prompts[t].injection)])
            torch.testing.assert_close(row, alone[0], rtol=0, atol=1e-4)

    # greedy tokens of one mixed decode loop vs each task generating alone
    together = mt.generate_ids(reqs, max_new_tokens=8)
    for (t, _), (_, ex), toks in zip(reqs, rows, together):
        assert generate_ids(base, [dataclasses.replace(ex, injection=prompts[t].injection)], 8) == [toks]
    assert sum(map(len, together)) > 0

    # class scores of a mixed batch of classification tasks (in one forward pass, and grouped by length as the
    # server runs them) vs `evaluate` on the row alone
    cls_reqs = [(t, v) for t, v in reqs if prompts[t].spec.is_classification]
    results = mt.classify(cls_reqs)
    cls_rows = [mt.encode(t, v) for t, v in cls_reqs]
    one_pass = class_scores(base, [(ex, e.encoder.verbalizer_ids) for e, ex in cls_rows], None)
    for (t, v), res, once in zip(cls_reqs, results, one_pass):
        spec = prompts[t].spec
        ref = class_log_likelihoods(base, Encoder(spec, base), [spec.render_input(v)], prompts[t].injection)[0]
        torch.testing.assert_close(torch.tensor(res.log_likelihoods), ref, rtol=0, atol=1e-4)
        torch.testing.assert_close(once, ref, rtol=0, atol=1e-4)
        assert res.label == spec.class_names[int(ref.argmax())]
        assert sum(res.probs.values()) == pytest.approx(1.0)


def test_compiled_and_uncompiled_registries_agree(base, prompts):
    reqs = mixed_requests(prompts)
    outs = []
    for compiled in (True, False):
        mt = MultiTask(base, compile=compiled)
        for name, prompt in prompts.items():
            mt.add(name, prompt)
        outs.append((mt.generate_ids(reqs, max_new_tokens=6), mt.classify([r for r in reqs if "sst2" in r[0]])))
    assert outs[0][0] == outs[1][0]
    for a, b in zip(outs[0][1], outs[1][1]):
        assert a.label == b.label
        torch.testing.assert_close(torch.tensor(a.log_likelihoods), torch.tensor(b.log_likelihoods), rtol=0, atol=1e-4)
    # soft prompts and P-tuning became pure KV prefixes whose keys carry their positions
    mt = MultiTask(base)
    entry = mt.add("s", prompts["sst2-soft"])
    assert entry.injection.embeds is None and entry.injection.kv_positions == 3


def test_a_prompt_without_tensors_saves_and_loads(base, sst2, tmp_path):
    hard = make_prompt(base, spec_like(sst2.spec, template="Is this review positive? {sentence}\nAnswer:"), None)
    path = Store(tmp_path).save("hard", hard)
    loaded = sp.load_prompt(path, base)
    assert loaded.injection.tensors() == {} and loaded.num_parameters == 0
    assert loaded.spec.template == hard.spec.template
    mt = MultiTask(base)
    mt.add("hard", loaded)
    assert mt.classify([("hard", "great fun")])[0].label in sst2.spec.class_names


def test_unknown_task_names_the_known_ones(base, prompts):
    mt = MultiTask(base)
    mt.add("sst2-soft", prompts["sst2-soft"])
    with pytest.raises(UnknownTaskError, match=r"Unknown task 'nope'.*\['sst2-soft'\]"):
        mt.classify([("nope", "x")])
    mt.add("gen", prompts["e2e-soft"])
    with pytest.raises(sp.SoftpromptError, match="generation task"):
        mt.classify([("gen", "name[x]")])
    with pytest.raises(sp.SoftpromptError, match="Invalid task name"):
        mt.add("../x", prompts["sst2-soft"])


def other_arch(arch):
    return "gpt2" if arch == "llama" else "llama"


def test_sync_follows_the_store_and_refuses_bad_files(base, arch, tokenizer, prompts, tmp_path):
    store = Store(tmp_path)
    store.save("a", prompts["sst2-soft"])
    store.save("b", prompts["e2e-prefix"])
    other = build_tiny(other_arch(arch), tokenizer)
    store.save("foreign", make_prompt(other, prompts["sst2-soft"].spec, "soft", 2))
    store.path("broken").write_bytes(b"not a prompt file")
    mt = MultiTask(base)
    report = mt.sync(store)
    assert sorted(report["added"]) == ["a", "b"] and mt.names() == ["a", "b"]
    assert "architecture" in mt.refused["foreign"] and "truncated or corrupted" in mt.refused["broken"]
    with pytest.raises(UnknownTaskError, match="refused"):
        mt.get("broken")
    assert mt.classify([("a", "great")])[0].label  # the good tasks serve

    assert mt.sync(store) == {"added": [], "updated": [], "removed": [], "refused": {}}  # nothing changed, no reload
    store.save("a", prompts["sst2-deep"])  # changed
    store.remove("b")
    store.save("broken", prompts["e2e-soft"])  # fixed
    report = mt.sync(store)
    assert report == {"added": ["broken"], "updated": ["a"], "removed": ["b"], "refused": {}}
    assert mt.get("a").prompt.method == "deep" and "b" not in mt and "broken" in mt and "broken" not in mt.refused
    store.path("a").write_bytes(store.path("a").read_bytes()[:100])  # a bad copy replaces a good file
    mt.sync(store)
    assert "a" not in mt and "truncated" in mt.refused["a"] and "broken" in mt


def test_prompt_for_another_model_is_refused_on_add(arch, tokenizer, prompts):
    other = build_tiny(other_arch(arch), tokenizer)
    with pytest.raises(PromptFileError, match="trained for base model"):
        MultiTask(other).add("a", prompts["sst2-soft"])


def test_padded_groups_bound_the_padding():
    lengths = [10, 100, 96, 40, 12, 80, 11]
    groups = padded_groups(lengths, 0.25)
    assert sorted(i for g in groups for i in g) == list(range(7))
    for g in groups:
        assert min(lengths[i] for i in g) >= 0.75 * max(lengths[i] for i in g)
    assert groups[0] == [1, 2, 5] and padded_groups(lengths, None) == [sorted(range(7), key=lambda i: -lengths[i])]
