"""Mixed-task batches: every row equals its task run alone, compiled or not; the store as the source of truth."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import build_tiny, make_prompt, spec_like

import softprompt as sp
from softprompt.data import Encoder
from softprompt.errors import ConfigError, PromptFileError
from softprompt.evaluate import class_log_likelihoods
from softprompt.generate import generate_ids
from softprompt.multitask import MultiTask, UnknownTaskError, class_scores, padded_groups
from softprompt.store import Prompt, Store

SST2_INPUTS = ["the film was great fun", "bad", "who hated the plot and the acting of the actor", "a boring story"]
E2E_INPUTS = ["name[The Eagle], eatType[pub]", "name[Fun], food[italian], area[near the shop]"]


def task_prompts(base, sst2, e2e) -> dict[str, sp.Prompt]:
    """Every method (LLaMA-Adapter where the model takes it: not GPT-2), different numbers of virtual tokens,
    classification and generation, a template alone, and a task whose class words are several tokens long."""
    cls, gen = sst2.spec, e2e.spec
    multi = spec_like(cls, name="sst2-words", labels={"0": "bad", "1": "great fun", "2": "awful boring plot"})
    adapter = {} if base.config.model_type == "gpt2" else {"sst2-adapter": make_prompt(base, cls, "llama-adapter", 3)}
    return adapter | {
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
    assert len({ex.injection.num_positions for _, ex in rows}) > 3  # really different prompt lengths

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
    assert mt.injection(entry).embeds is None and mt.injection(entry).kv_positions == 3


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
    # a bad copy replaces a good file: the task in use keeps serving its last good version, named in `stale`; a task
    # whose prompt was never read has no good version in memory and is refused
    assert mt.classify([("a", "great")])[0].label
    for name in ("a", "broken"):
        store.path(name).write_bytes(store.path(name).read_bytes()[:100])
    mt.sync(store)
    assert "truncated" in mt.refused["a"] and mt.stale == {"a": mt.refused["a"]}
    assert mt.get("a").prompt.method == "deep" and mt.classify([("a", "great")])[0].label
    assert "broken" not in mt and "truncated" in mt.refused["broken"]
    store.save("a", prompts["sst2-soft"])  # fixed again
    mt.sync(store)
    assert mt.get("a").prompt.method == "soft" and mt.stale == {} and "a" not in mt.refused


def test_a_store_is_indexed_from_headers_and_read_on_first_use(base, prompts, tmp_path, monkeypatch):
    store = Store(tmp_path)
    store.save("a", prompts["sst2-soft"])
    store.save("b", prompts["sst2-deep"])
    store.save("nan", make_prompt(base, prompts["sst2-soft"].spec, "ptuning", 2))
    # NaN in the tensors of a file whose header is fine: found when its tensors are first read
    data = bytearray(store.path("nan").read_bytes())
    data[-4:] = bytes.fromhex("0000c07f")  # the last float32 of the tensors: NaN
    store.path("nan").write_bytes(bytes(data))
    reads = []
    load = Prompt.load
    monkeypatch.setattr(
        Prompt, "load", classmethod(lambda cls, path, base=None: reads.append(path) or load(path, base))
    )
    mt = MultiTask(base)
    assert mt.sync(store)["added"] == ["a", "b", "nan"] and reads == []  # headers only
    assert all(t.is_meta for t in mt.get("a").prompt.injection.tensors().values()) and len(mt.cache) == 0
    first = mt.classify([("a", "great"), ("b", "awful")])
    assert len(reads) == 2 and len(mt.cache) == 2
    assert mt.classify([("a", "great"), ("b", "awful")]) == first and len(reads) == 2  # warm: not read again
    with pytest.raises(PromptFileError, match="NaN"):
        mt.classify([("nan", "great")])
    assert "nan" not in mt and "NaN" in mt.refused["nan"]
    assert mt.sync(store)["refused"] == {}  # the same bad file is not read again


def test_the_prompt_cache_keeps_its_budget_and_evicted_prompts_come_back_identical(base, prompts, tmp_path):
    store = Store(tmp_path)
    spec = prompts["sst2-soft"].spec
    names = ["soft", "deep", "prefix", "ptuning"]
    for i, n in enumerate(names):
        store.save(n, make_prompt(base, spec, n, 2 + i, seed=i))
    unlimited = MultiTask(base, cache_bytes=None)
    unlimited.sync(store)
    reference = unlimited.classify([(n, "great") for n in names])
    sizes = [unlimited.cache._items[unlimited.get(n)][1] for n in names]
    budget = max(sizes) + min(sizes)  # room for two prompts at most
    mt = MultiTask(base, cache_bytes=budget)
    mt.sync(store)
    for _ in range(2):
        for n, ref in zip(names, reference):
            got = mt.classify([(n, "great")])[0]
            assert got.label == ref.label
            torch.testing.assert_close(torch.tensor(got.log_likelihoods), torch.tensor(ref.log_likelihoods))
            assert mt.cache.bytes <= budget
    assert mt.cache.stats["evictions"] >= 4 and len(mt.cache) <= 2
    with pytest.raises(ConfigError, match="cache-bytes"):
        MultiTask(base, cache_bytes=-1)


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
