"""The decode loop: stop strings end a row early, token for token the same as decoding without them; log-probabilities
of the tokens decoded and of a prompt's own tokens match uncached forwards; logits that are not finite raise."""

from __future__ import annotations

import pytest
import torch
from helpers import build_tiny, make_prompt

from softprompt.data import Encoder, TaskSpec
from softprompt.errors import ConfigError
from softprompt.evaluate import generate_texts, stop_strings
from softprompt.example import Example
from softprompt.generate import (
    GREEDY,
    NonFiniteScoresError,
    Sampling,
    cut_at_stop,
    decode,
    generate_ids,
    prompt_logprobs,
    sample_next,
    scores_prompts,
)
from softprompt.injection import EMPTY

PROMPTS = ["name[The Eagle], food[french]", "name[Fun]", "the film was great and the plot of the story"]
HOT = Sampling(temperature=1.5)  # a tiny random model repeats one token when greedy: sample varied text instead


def sampled(base, spec, stop=()):
    enc = Encoder(spec, base)
    rows = [enc.example(spec.render_input(p), reserve=16) for p in PROMPTS]
    return generate_ids(base, rows, 16, HOT, generator=torch.Generator().manual_seed(0), stop=stop)


def test_a_stop_string_ends_a_row_where_it_appears_and_changes_nothing_before(base, e2e):
    free = sampled(base, e2e.spec)
    decode = base.tokenizer.decode
    # a stop string that row 0 first produces at its token k > 0
    k = next(k for k in range(1, 16) if decode(free[0][k : k + 1]).strip() not in decode(free[0][:k]))
    stop = decode(free[0][k : k + 1]).strip()
    stopped = sampled(base, e2e.spec, [stop])
    assert len(stopped[0]) == k + 1
    for ids, full in zip(stopped, free):
        assert full[: len(ids)] == ids  # token for token the same, up to where the row stopped
        if len(ids) < len(full):
            assert stop in decode(ids) and stop not in decode(ids[:-1])  # it ended at the first occurrence
    # the texts evaluation scores: cut before the stop, the rest unchanged
    prompts, enc = [e2e.spec.render_input(p) for p in PROMPTS], Encoder(e2e.spec, base)
    texts = {
        s: generate_texts(
            base, enc, prompts, EMPTY, 16, sampling=HOT, generator=torch.Generator().manual_seed(0), stop=s
        )
        for s in ((), (stop,))
    }
    assert [cut_at_stop(t, [stop]).strip() for t in texts[()]] == texts[(stop,)]
    assert any(stop in t for t in texts[()]) and not any(stop in t for t in texts[(stop,)])


def test_default_stops_follow_the_references():
    spec = TaskSpec(name="t", template="{x}", target_column="y")
    assert stop_strings(spec, [["one line", "another"], ["third"]]) == ["\n"]
    assert stop_strings(spec, [["two\nlines"]]) == []
    own = TaskSpec(name="t", template="{x}", target_column="y", stop=[".", "END"])
    assert stop_strings(own, [["one line"]]) == [".", "END"]
    assert cut_at_stop("a b. c END", [".", "END"]) == "a b"
    assert cut_at_stop("nothing here", ["."]) == "nothing here"


@pytest.mark.parametrize("stop", ["\n", [""], [1]])
def test_stop_must_be_a_list_of_strings(stop):
    with pytest.raises(ConfigError, match="stop must be a list of non-empty strings"):
        TaskSpec(name="t", template="{x}", target_column="y", stop=stop)


def prompted_rows(base, spec) -> list[Example]:
    """One row of PROMPTS each with a soft prompt (compiled to a KV prefix), a prefix prompt, and a template alone."""
    prompts = [make_prompt(base, spec, m, 4, seed=i) for i, m in enumerate(["soft", "prefix", None])]
    enc = Encoder(spec, base)
    return [
        enc.example(spec.render_input(text), base.family.compile(p.injection), 16) for text, p in zip(PROMPTS, prompts)
    ]


def test_decode_reports_the_log_probabilities_of_an_uncached_forward(base, e2e):
    rows, k = prompted_rows(base, e2e.spec), 3
    settings = [HOT, GREEDY, HOT]
    steps = list(decode(base, rows, 8, settings, generator=torch.Generator().manual_seed(0), top_logprobs=k))
    plain = list(decode(base, rows, 8, settings, generator=torch.Generator().manual_seed(0)))
    assert [s[0].tolist() for s in steps] == [s[0].tolist() for s in plain]  # asking for them changes no token
    for i, row in enumerate(rows):
        alive = [s for s in steps if s[1][i]]
        new = [int(s[0][i]) for s in alive]
        # one forward of the prompt and all its new tokens, no cache: position j predicts new token j
        logits, targets, _ = base.family.target_logits([row.with_target(new)])  # (1, N, V)
        ref = logits[0].float().log_softmax(-1)  # (N, V)
        chosen = torch.stack([s[2].chosen[i] for s in alive])  # (N,)
        top = torch.stack([s[2].top[i] for s in alive])  # (N, k)
        top_ids = torch.stack([s[2].top_ids[i] for s in alive])
        torch.testing.assert_close(chosen, ref.gather(-1, targets[0][:, None])[:, 0], atol=1e-4, rtol=0)
        torch.testing.assert_close(top, ref.topk(k).values, atol=1e-4, rtol=0)
        assert (top[:, :-1] >= top[:, 1:]).all()  # most likely first
        if settings[i] is GREEDY:
            assert top_ids[:, 0].tolist() == new


def test_a_prompts_own_tokens_are_scored_as_each_of_its_prefixes_predicts_them(base, e2e):
    assert scores_prompts(base)
    for row in prompted_rows(base, e2e.spec):
        lp = prompt_logprobs(base, row, 2)
        assert lp.chosen.shape == (len(row.source) - 1,) and lp.top.shape == (len(row.source) - 1, 2)
        for j in range(1, len(row.source)):
            _, logits = base.family.start_decoding([Example(row.source[:j], j, [], row.injection)], use_cache=False)
            ref = logits[0].float().log_softmax(-1)  # (V,) the next token after the first j
            assert float(lp.chosen[j - 1]) == pytest.approx(float(ref[row.source[j]]), abs=1e-4)
            torch.testing.assert_close(lp.top[j - 1], ref.topk(2).values, atol=1e-4, rtol=0)
        assert prompt_logprobs(base, Example(row.source[:1], 1, [], row.injection), 2).chosen.numel() == 0


def test_an_encoder_decoder_has_no_log_probabilities_of_its_prompts(tokenizer):
    assert not scores_prompts(build_tiny("t5", tokenizer))


@pytest.mark.parametrize("settings", [[GREEDY] * 3, [HOT] * 3, [GREEDY, HOT, GREEDY]], ids=["greedy", "hot", "mixed"])
def test_logits_that_are_not_finite_raise_for_greedy_rows_too(settings):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 10, generator=g)
    logits[:, :4] = -torch.inf  # tokens a model masks are fine
    assert sample_next(logits, settings, g).ge(4).all()
    for bad in (torch.nan, torch.inf, -torch.inf):
        poisoned = logits.clone()
        poisoned[1, 4 if bad != -torch.inf else slice(None)] = bad  # a NaN, a +inf, or nothing possible at all
        with pytest.raises(NonFiniteScoresError, match=r"row\(s\) \[1\] are not finite"):
            sample_next(poisoned, settings, g)
