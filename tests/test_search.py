"""Hard prompts: template and verbalizer scoring, AutoPrompt, soft-to-hard projection, `hard` prompt files."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from helpers import DATA
from helpers import run_cli as run

import softprompt as sp
from softprompt.data import Encoder
from softprompt.errors import ConfigError, InputTooLongError
from softprompt.evaluate import class_log_likelihoods, classify, evaluate
from softprompt.example import Example
from softprompt.explain import explain, nearest_tokens
from softprompt.injection import Injection
from softprompt.search import (
    AutoPromptConfig,
    Candidates,
    autoprompt,
    best_verbalizers,
    bootstrap_ci,
    fill,
    hard_prompt,
    rank_templates,
    score_templates,
    search_split,
    slotted,
    trigger_gradient,
    trigger_losses,
    trigger_vocabulary,
)
from softprompt.search.autoprompt import _split_rows

TINY_AUTOPROMPT = dict(
    num_triggers=2,
    iterations=2,
    num_candidates=3,
    grad_rows=4,
    eval_rows=4,
    verify_candidates=2,
    verify_rows=4,
    search_size=16,
)


@pytest.fixture
def candidates_file(tmp_path):
    path = tmp_path / "cands.yaml"
    path.write_text(
        'templates:\n  - "Review: {sentence}\\nSentiment:"\n  - "{sentence} It was"\n'
        '  - "{sentence} The movie is"\nlabels:\n  0: [bad, awful]\n  1: [good, great]\n'
    )
    return path


def test_bootstrap_interval_brackets_the_accuracy_and_narrows_with_more_rows():
    rng = np.random.default_rng(0)
    small, large = rng.random(50) < 0.7, rng.random(2000) < 0.7
    lo, hi = bootstrap_ci(small)
    assert lo < small.mean() < hi
    lo2, hi2 = bootstrap_ci(large)
    assert lo2 < large.mean() < hi2 and hi2 - lo2 < (hi - lo) / 3
    assert bootstrap_ci(small, seed=3) == bootstrap_ci(small, seed=3)
    assert bootstrap_ci(np.ones(40, bool)) == (1.0, 1.0)


def test_best_verbalizers_picks_the_best_distinct_combination():
    gold = [0, 0, 1, 1]
    # columns: 0 and 1 are candidates for class 0, 1 and 2 for class 1 (word 1 may serve either class)
    scores = torch.tensor([[0.0, 5, 1], [0, 5, 1], [0, 5, 6], [1, 0, 6]])
    cols, acc = best_verbalizers(scores, gold, [[0, 1], [1, 2]])
    assert cols == [1, 2] and acc == 1.0  # never (1, 1): one word cannot stand for two classes
    cols, acc = best_verbalizers(torch.zeros(4, 3), gold, [[0, 1], [1, 2]])
    assert cols == [0, 1] and acc == 0.5  # all tied: the first (default) words win


def test_builtin_candidates_load_with_the_task_words_first(sst2):
    c = Candidates.load(None, sst2.spec)
    assert len(c.templates) >= 10 and [w[0] for w in c.words] == list(sst2.spec.labels.values())
    trec = sp.load_task("trec", data_dir=str(DATA))
    t = Candidates.load(None, trec.spec)
    assert len(t.templates) >= 10 and len(t.words) == 6 and all(len(w) >= 3 for w in t.words)


@pytest.mark.parametrize(
    "text, message",
    [
        ("labels: {0: [bad]}\n", "no `templates:`"),
        ("templates: ['{sentence}']\nlabels: {7: [bad]}\n", "unknown classes"),
        ("templates: ['{sentence']\n", "not a valid format string"),
        ("templates: ['{sentence}']\nlabels: {0: bad}\n", "must be a list"),
    ],
)
def test_bad_candidate_files_are_refused(sst2, tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        Candidates.load(path, sst2.spec)


def test_search_split_is_a_seeded_sample_of_train(sst2):
    a, b = search_split(sst2, 20, seed=1), search_split(sst2, 20, seed=1)
    assert a.rows == b.rows and search_split(sst2, 20, seed=2).rows != a.rows
    train = {r["sentence"] for r in sst2.split("train").rows}
    assert all(r["sentence"] in train for r in a.rows)
    long = search_split(sst2, 20, seed=1, min_words=12)
    assert all(len(r["sentence"].split()) >= 12 for r in long.rows)
    with pytest.raises(ConfigError, match="min-words"):
        search_split(sst2, 20, min_words=10_000)


def test_template_scores_match_the_evaluation_of_each_template(base, sst2, candidates_file):
    """The pooled one-pass scoring of all words gives the numbers `evaluate` gives each combination."""
    cands = Candidates.load(candidates_file, sst2.spec)
    results, ref = score_templates(base, sst2, cands, search_size=24, finalists=2, limit=16, progress=False)
    assert len(results) in (3, 4) and [r.search["accuracy"] for r in results] == sorted(
        (r.search["accuracy"] for r in results), reverse=True
    )  # each template with its best words, and the task's own (once, when its best words are its own)
    data = search_split(sst2, 24)
    for r in results:
        assert sp.TaskSpec.from_dict(r.spec.portable()).portable() == r.spec.portable()
        scores, gold = classify(base, sst2, r.spec, data)
        assert r.search["accuracy"] == pytest.approx(float((scores.argmax(-1) == torch.tensor(gold)).float().mean()))
        lo, hi = r.search["accuracy_ci95"]
        assert lo <= r.search["accuracy"] <= hi
    for i, r in enumerate(results):
        assert (r.dev is None) == (i >= 2 and not r.own)  # the finalists and the task's own are scored on dev
        if r.dev is not None:
            assert r.dev["n"] == 16
            assert r.dev["accuracy"] == pytest.approx(evaluate(base, sst2, None, limit=16, spec=r.spec)["accuracy"])
    assert (
        ref.own
        and ref.spec == sst2.spec
        and ref.dev["accuracy"] == pytest.approx(evaluate(base, sst2, None, limit=16)["accuracy"])
    )


def test_the_ranking_always_holds_the_task_own_template_and_only_better_ones_rank_above_it(
    base, sst2, candidates_file, tmp_path
):
    """Ranking invariant, whether or not the candidates list the task's own template: the task's own template with
    its own words is ranked exactly once, scored as `classify` scores it; whatever ranks above it beats it on the
    search rows (ties go to the task's own), so the result (the first) is never worse than it there."""
    elsewhere = tmp_path / "elsewhere.yaml"
    elsewhere.write_text('templates:\n  - "{sentence} It was"\n  - "{sentence} The movie is"\n')
    data = search_split(sst2, 24)
    scores, gold = classify(base, sst2, sst2.spec, data)
    for path in (candidates_file, elsewhere):
        ranking, _ = rank_templates(base, sst2, Candidates.load(path, sst2.spec), 24, progress=False)
        [at] = [i for i, s in enumerate(ranking) if s.own]
        own = ranking[at]
        assert own.spec == sst2.spec and own.search["n"] == 24
        assert own.search["accuracy"] == pytest.approx(float((scores.argmax(-1) == torch.tensor(gold)).float().mean()))
        accuracies = [s.search["accuracy"] for s in ranking]
        assert accuracies == sorted(accuracies, reverse=True)
        assert all(s.search["accuracy"] > own.search["accuracy"] for s in ranking[:at])
        assert ranking[0].search["accuracy"] >= own.search["accuracy"]
        assert len({(s.spec.template, tuple(s.spec.labels.values())) for s in ranking}) == len(ranking)


def _rigged_scoring(monkeypatch, task, rows, right: bool):
    """Make the search see the task's own template score every search row `right` (else wrong) and every other
    template the opposite; the tiny random model cannot tell sense from noise, so the test decides which is which."""
    from softprompt.search import templates

    real = templates.class_log_likelihoods
    words = Candidates.load(None, task.spec).words

    def scores(base, enc, prompts, *args, **kw):
        real(base, enc, prompts, *args, **kw)  # the real pass still runs (and must not fail)
        gold = {enc.spec.render(r): y for r, y in zip(rows.rows, rows.labels)}
        correct = right == (enc.spec.template == task.spec.template)
        pool = list(enc.spec.labels.values())  # one column per candidate word
        of = [next(c for c, ws in enumerate(words) if w in ws) for w in pool]
        return torch.tensor([[float((of[w] == gold[p]) == correct) for w in range(len(pool))] for p in prompts])

    monkeypatch.setattr(templates, "class_log_likelihoods", scores)


@pytest.mark.parametrize("own_wins", [True, False])
def test_search_templates_never_saves_a_template_below_the_task_own(
    model_dir, sst2, tmp_path, capsys, monkeypatch, own_wins
):
    """Candidates of unrelated text that score worse than the task's own template on the search rows: the saved
    prompt is the task's own, and the summary says so and by how much; when a candidate scores better, it is saved."""
    bad = tmp_path / "unrelated.yaml"
    bad.write_text(
        'templates:\n  - "Zebra crossing {sentence} tram timetable"\n  - "{sentence} Weather: cloudy. Score:"\n'
        "labels:\n  0: [bad]\n  1: [good]\n"
    )
    _rigged_scoring(monkeypatch, sst2, search_split(sst2, 12), right=own_wins)
    out = tmp_path / "kept.safetensors"
    code, text, err = run(
        capsys,
        *("search", "templates", "--task", "sst2", "--data-dir", DATA, "--model", model_dir, "--candidates", bad),
        *("--search-size", 12, "--finalists", 1, "--limit", 8, "--no-progress", "--out", out),
    )
    assert code == 0, err
    p = sp.load_prompt(out)
    summary = " ".join(text.split())
    if own_wins:
        assert p.spec.template == sst2.spec.template and p.spec.labels == sst2.spec.labels
        assert p.method_config["kept"] == "own" and p.metrics["search"]["accuracy"] == 1.0
        assert "kept the task's own 'Review: {sentence}\\nSentiment:' with negative/positive" in summary
        assert (
            "it ranks first on the 12 search rows (100.0" in summary and "+100.0 points over the best found" in summary
        )
    else:
        assert p.spec.template != sst2.spec.template and p.method_config["kept"] == "found"
        assert "+100.0 points over the task's own on the 12 search rows" in summary
    assert f"dev {100 * p.metrics['dev']['accuracy']:.1f}" in summary  # dev numbers next to the verdict
    assert p.metrics["dev"]["n"] == 8 and p.metrics["dev_default_template"]["split"] == "dev"


def test_hard_prompt_file_has_no_tensors_and_evaluates_as_its_template(base, sst2, tmp_path):
    spec = dataclasses.replace(sst2.spec, template="{sentence} It was", labels={"0": "bad", "1": "good"})
    path = hard_prompt(
        base, spec, {"search": "templates"}, {"dev": {"accuracy": 0.5, "n": 8, "accuracy_ci95": [0.2, 0.8]}}
    ).save(tmp_path / "h")
    p = sp.load_prompt(path, base)
    assert p.method == "hard" and p.injection.tensors() == {} and p.num_parameters == 0
    assert p.spec.portable() == spec.portable() and p.metrics["dev"]["accuracy_ci95"] == [0.2, 0.8]
    assert evaluate(base, sst2, p, limit=8) == evaluate(base, sst2, None, limit=8, spec=spec)


def test_trigger_vocabulary_round_trips(tokenizer):
    texts = ["a great film", "the plot was boring", "a great story"]
    for vocab in ("frequent", "words", "all"):
        ok = trigger_vocabulary(tokenizer, vocab, texts)
        ids = ok.nonzero()[:, 0].tolist()
        assert ids and tokenizer.eos_token_id not in ids
        assert all(tokenizer(tokenizer.decode([i]), add_special_tokens=False)["input_ids"] == [i] for i in ids)
    frequent = set(trigger_vocabulary(tokenizer, "frequent", texts).nonzero()[:, 0].tolist())
    words = set(trigger_vocabulary(tokenizer, "words").nonzero()[:, 0].tolist())
    seen = {i for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] for i in ids}
    assert frequent == seen & words and {tokenizer.decode([i]) for i in frequent} >= {" film", " boring"}
    assert trigger_vocabulary(tokenizer, "words").sum() < trigger_vocabulary(tokenizer, "all").sum()


def _rows(base, sst2, template, n=6):
    data = search_split(sst2, n)
    return data, _split_rows(base, sst2.spec, template, data, data.labels)


@pytest.mark.parametrize(
    "template", ["Review: {sentence}\nSentiment:{trigger}", "Review:{trigger} {sentence}\nSentiment:"]
)
def test_kv_prefixed_trigger_scores_equal_scoring_the_text(base, sst2, template):
    """Search-time scoring (text before the slot as a KV prefix, triggers as ids) = scoring the rendered text."""
    tok = base.tokenizer
    triggers = tok(" good film", add_special_tokens=False)["input_ids"]
    data, rows = _rows(base, sst2, template)
    enc = Encoder(sst2.spec, base)
    spec = fill(sst2.spec, template, tok.decode(triggers))
    texts = [spec.render(r) for r in data.rows]
    assert all(
        tok(t)["input_ids"]
        == tok(t.split(" good film")[0])["input_ids"]
        + triggers
        + tok(t.split(" good film")[1], add_special_tokens=False)["input_ids"]
        for t in texts
    )  # same tokens
    ce = torch.nn.functional.cross_entropy(class_log_likelihoods(base, enc, texts), torch.tensor(data.labels))
    assert float(trigger_losses(base, rows, enc.verbalizer_ids, [triggers])[0]) == pytest.approx(float(ce), abs=1e-4)


@pytest.mark.parametrize("truncate", ["left", "right"])
def test_search_rows_are_fitted_by_the_truncation_policy(base, sst2, truncate):
    """AutoPrompt's rows (text before the slot as a KV prefix, text after it as ids) fit --max-length as every input
    does, leaving room for the triggers and the label word: the policy drops the start (left) or the end (right)."""
    template = "Review:{trigger} {sentence}\nSentiment:"
    data, full = _rows(base, sst2, template)
    rows = _split_rows(base, sst2.spec, template, data, data.labels, Encoder(sst2.spec, base, truncate, 12), 3)
    assert any(f.prefix.kv_positions + len(f.post) > 9 for f in full)
    for r, f in zip(rows, full):
        assert r.prefix.kv_positions + len(r.post) == min(f.prefix.kv_positions + len(f.post), 12 - 3)
        if truncate == "left":  # the start goes, the text before the slot first
            assert r.post == f.post[len(f.post) - len(r.post) :]
        else:  # the end goes: the text after the slot, then the text before it
            assert r.post == f.post[: len(r.post)] and r.prefix.kv_positions == min(f.prefix.kv_positions, 9)
    with pytest.raises(InputTooLongError, match="does not fit the"):
        _split_rows(base, sst2.spec, template, data, data.labels, Encoder(sst2.spec, base, "error", 12), 3)


@pytest.mark.parametrize("single", [True, False])  # label words of one token each / of several tokens
def test_trigger_gradient_predicts_the_loss_change(base, sst2, single):
    """Directional derivative check of the (K, D) gradient by central finite differences."""
    template = "Review: {sentence}\nSentiment:{trigger}"
    tok = base.tokenizer
    spec = dataclasses.replace(
        sst2.spec, labels={"0": "boring", "1": "film"} if single else {"0": "awful boring", "1": "positive"}
    )
    verb = Encoder(spec, base).verbalizer_ids
    assert (max(map(len, verb)) == 1) == single
    triggers = tok(" good film", add_special_tokens=False)["input_ids"]
    data = search_split(sst2, 6)
    rows = _split_rows(base, spec, template, data, data.labels)
    grad = trigger_gradient(base, rows, verb, triggers)
    assert grad.shape == (2, base.hidden_size)

    def loss(T):  # every (row, class) pair scored as a sequence, independently of the code under test
        inj = [Injection(embeds=T, kv=r.prefix.kv, kv_positions=r.prefix.kv_positions) for r in rows]
        examples = [Example(r.post, len(r.post), v, i) for r, i in zip(rows, inj) for v in verb]
        scores = base.family.target_log_probs(examples)[0].sum(1)  # log p(label word) of every (row, class)
        return float(torch.nn.functional.cross_entropy(scores.view(len(rows), -1), torch.tensor(data.labels)))

    with torch.no_grad():
        T = base.embed(torch.tensor(triggers))
        d = torch.randn(T.shape, generator=torch.Generator().manual_seed(0)) * T.std()  # at the embedding scale
        eps = 1e-2
        numeric = (loss(T + eps * d) - loss(T - eps * d)) / (2 * eps)
    assert float((grad * d).sum()) == pytest.approx(numeric, rel=0.05, abs=1e-4)


def test_autoprompt_is_seeded_and_only_keeps_improvements(base, sst2):
    cfg = AutoPromptConfig(**TINY_AUTOPROMPT, seed=3)
    a = autoprompt(base, sst2, cfg, progress=False)
    b = autoprompt(base, sst2, cfg, progress=False)
    assert a.triggers == b.triggers and a.history == b.history
    assert len(a.triggers) == 2 and len(a.history) == 2
    assert all(h["loss"] <= h["loss_before"] for h in a.history)
    text = base.tokenizer.decode(a.triggers)
    assert a.spec.template == sst2.spec.template + text and a.spec.labels == sst2.spec.labels
    allowed = trigger_vocabulary(base.tokenizer)
    assert all(allowed[t] for t in a.triggers)
    assert slotted("{sentence} {trigger}!") == "{sentence} {trigger}!"


def test_autoprompt_keeps_the_visited_trigger_best_on_held_out_rows(base, sst2):
    cfg = AutoPromptConfig(**{**TINY_AUTOPROMPT, "iterations": 4, "search_size": 24}, select_rows=8, seed=1)
    a = autoprompt(base, sst2, cfg, progress=False)
    decode = base.tokenizer.decode
    # the start and every kept flip, in order, each scored on the 8 held-out rows
    kept_flips = [h for h in a.history if h["loss"] < h["loss_before"]]
    assert len(a.selection) == 1 + len(kept_flips) and a.selection[0]["trigger"] == " the the"
    best = max(a.selection, key=lambda x: (x["accuracy"], -x["loss"]))
    assert decode(a.triggers) == best["trigger"] and a.spec.template == sst2.spec.template + best["trigger"]
    assert all(x["accuracy"] in {k / 8 for k in range(9)} for x in a.selection)
    # held-out rows are the search split's first rows: they agree with scoring those rows directly
    data = search_split(sst2, 24, 1)
    verb = Encoder(sst2.spec, base).verbalizer_ids
    rows = _split_rows(
        base, sst2.spec, slotted(sst2.spec.template), data.subset(range(8)), data.subset(range(8)).labels
    )
    ce = trigger_losses(base, rows, verb, [base.tokenizer(best["trigger"], add_special_tokens=False)["input_ids"]])
    assert float(ce[0]) == pytest.approx(best["loss"], abs=1e-5)
    with pytest.raises(ConfigError, match="select-rows"):
        AutoPromptConfig(search_size=16, select_rows=16)


def test_autoprompt_restarts_compete_on_the_same_held_out_rows(base, sst2):
    single = AutoPromptConfig(**{**TINY_AUTOPROMPT, "iterations": 3, "search_size": 24}, select_rows=8, seed=2)
    one = autoprompt(base, sst2, single, progress=False)
    three = autoprompt(base, sst2, dataclasses.replace(single, restarts=3), progress=False)
    # restart 0 is the single search, draw for draw; the others draw differently
    assert [h for h in three.history if h["restart"] == 0] == [{"restart": 0, **h} for h in one.history]
    assert len(three.history) == 9 and {h["restart"] for h in three.history} == {0, 1, 2}
    assert [x["accuracy"] for x in three.selection[: len(one.selection)]] == [x["accuracy"] for x in one.selection]
    # every restart starts from the same trigger, scored on the same held-out rows
    starts = [x for x in three.selection if x["trigger"] == " the the"]
    assert [x["restart"] for x in starts][:3] == [0, 1, 2] and len({(x["accuracy"], x["loss"]) for x in starts}) == 1
    best = max(three.selection, key=lambda x: (x["accuracy"], -x["loss"]))
    assert three.selection[three.kept] == best and base.tokenizer.decode(three.triggers) == best["trigger"]
    assert best["accuracy"] >= one.selection[one.kept]["accuracy"]
    with pytest.raises(ConfigError, match="select-rows"):
        AutoPromptConfig(restarts=2)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"iterations": 1.5}, "iterations must be an integer, got 1.5 (float)"),
        ({"num_triggers": float("nan")}, "num_triggers must be an integer, got nan"),
        ({"search_size": float("inf")}, "search_size must be an integer, got inf"),
        ({"select_rows": True}, "select_rows must be an integer, got True (bool)"),
        ({"vocab": 3}, "vocab must be a string, got 3 (int)"),
        ({"init_token": None}, "init_token must be a string, got None"),
        ({"search_min_words": -1}, "search_min_words must be >= 0, got -1"),
        ({"seed": "0"}, "seed must be an integer, got '0' (str)"),
    ],
)
def test_autoprompt_config_refuses_values_of_the_wrong_type_or_range(values, message):
    """A --config file (or a caller) hands values over unconverted: each is one error naming the option."""
    with pytest.raises(ConfigError) as e:
        AutoPromptConfig(**values)
    assert message in e.value.problem and f"--{next(iter(values)).replace('_', '-')}" in e.value.fix


def test_autoprompt_rejects_bad_templates(base, sst2):
    cfg = AutoPromptConfig(**TINY_AUTOPROMPT)
    with pytest.raises(ConfigError, match="slots"):
        autoprompt(base, sst2, cfg, template="{trigger} {sentence} {trigger}", progress=False)
    with pytest.raises(ConfigError, match="init-token"):
        autoprompt(base, sst2, dataclasses.replace(cfg, init_token=" zzzqqq"), progress=False)
    with pytest.raises(ConfigError, match="vocab"):
        AutoPromptConfig(vocab="emoji")


def test_explain_recovers_tokens_that_are_vocabulary_embeddings(base, sst2):
    ids = torch.tensor([5, 17, 42, 99])
    E = base.embedding_matrix.detach()
    near = nearest_tokens(E[ids], E, k=3)
    assert near["l2"][0][:, 0].tolist() == ids.tolist() and near["cosine"][0][:, 0].tolist() == ids.tolist()
    assert torch.all(near["l2"][1][:, 0] < 1e-3) and torch.all(near["cosine"][1][:, 0] > 0.999)
    assert torch.all(near["l2"][1].diff(dim=1) >= 0) and torch.all(near["cosine"][1].diff(dim=1) <= 0)
    prompt = sp.Prompt(
        injection=Injection(embeds=E[ids] + 1e-4),
        method="soft",
        method_config={},
        task=sst2.spec.portable(),
        base=base.fingerprint.to_dict(),
    )
    out = explain(base, prompt, sst2, limit=8, k=2)
    assert out["projected_ids"]["l2"] == ids.tolist() and len(out["tokens"]) == 4
    soft, proj = out["scores"]["soft"], out["scores"]["projected (l2)"]
    assert proj["n"] == 8 and proj["accuracy"] == soft["accuracy"]  # a prompt of real tokens is its own projection
    kv_prompt = dataclasses.replace(prompt, injection=Injection(kv=torch.zeros(2, 2, 2, 3, 16)))
    with pytest.raises(ConfigError, match="soft prompt"):
        explain(base, kv_prompt)


def test_cli_search_explain_and_use_of_the_hard_prompt(model_dir, candidates_file, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "best.safetensors"
    code, text, err = run(
        capsys,
        "search",
        "templates",
        "--task",
        "sst2",
        "--data-dir",
        DATA,
        "--model",
        model_dir,
        "--candidates",
        candidates_file,
        "--search-size",
        12,
        "--finalists",
        1,
        "--limit",
        8,
        "--out",
        out,
    )
    assert code == 0, err
    assert "3 templates x 9 verbalizers, and the task's own" in text and out.exists()
    verdict = "kept the task's own" if sp.load_prompt(out).method_config["kept"] == "own" else "over the task's own"
    assert verdict in " ".join(text.split())
    code, text, _ = run(capsys, "info", out, "--json")
    d = json.loads(text)
    assert d["metrics"]["search"]["split"] == "train" and d["metrics"]["dev"]["split"] == "dev"
    assert d["method"] == "hard" and d["parameters_saved"] == 0 and d["metrics"]["dev"]["n"] == 8
    code, text, _ = run(
        capsys, "eval", "--task", "sst2", "--data-dir", DATA, "--model", model_dir, "--prompt", out, "--limit", 8
    )
    assert code == 0 and json.loads(text)["accuracy"] == pytest.approx(d["metrics"]["dev"]["accuracy"])

    auto = tmp_path / "auto.safetensors"
    config = tmp_path / "autoprompt.json"  # the search's own options from a JSON config file, the rest as flags
    config.write_text(json.dumps({**TINY_AUTOPROMPT, "restarts": 2, "select-rows": 8}, indent="\t"))
    code, text, err = run(
        capsys,
        "search",
        "autoprompt",
        "--task",
        "sst2",
        "--data-dir",
        DATA,
        "--model",
        model_dir,
        "--start",
        out,
        "--limit",
        8,
        "--out",
        auto,
        "--max-length",
        400,
        "--no-progress",
        "--config",
        config,
    )
    assert code == 0, err
    p = sp.load_prompt(auto)
    assert p.method == "hard" and p.spec.template.startswith(sp.load_prompt(out).spec.template)
    assert "found" in text and len(p.method_config["triggers"]) == 2
    assert "of 2) of" in text and p.method_config["restarts"] == 2
    assert {x["restart"] for x in p.method_config["selection"]} == {0, 1}

    base = sp.load_base(model_dir)
    soft = tmp_path / "soft.safetensors"
    sp.Prompt(
        injection=Injection(embeds=torch.randn(3, base.hidden_size)),
        method="soft",
        method_config={},
        task=p.task,
        base=base.fingerprint.to_dict(),
    ).save(soft)
    code, text, err = run(
        capsys,
        *("explain", soft, "--model", model_dir, "--data-dir", DATA, "--limit", 8, "--top-k", 2),
        *("--max-length", 400, "--truncate", "left", "--no-progress"),
    )
    assert code == 0, err
    assert "projected (cosine)" in text and "dev soft: accuracy" in text
    code, text, err = run(capsys, "explain", auto, "--model", model_dir, "--no-score")
    assert code == 2 and "soft prompt" in err
