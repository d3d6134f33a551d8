"""The decode loop: stop strings end a row early, token for token the same as decoding without them."""

from __future__ import annotations

import pytest
import torch

from softprompt.data import Encoder, TaskSpec
from softprompt.errors import ConfigError
from softprompt.evaluate import generate_texts, stop_strings
from softprompt.generate import Sampling, cut_at_stop, generate_ids
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
