"""SPoT's retrieval of a source prompt: similarity of prompts, ranking a store, and `store similar`."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import build_tiny, make_prompt
from helpers import run_cli as run

from softprompt.errors import ConfigError
from softprompt.injection import Injection
from softprompt.store import Store
from softprompt.transfer import rank_sources, similarity


def test_similarity_is_spot_cosine_of_average_tokens_or_of_token_pairs():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # (P, D)
    b = torch.tensor([[1.0, 1.0]])
    assert similarity(Injection(a), Injection(b)) == pytest.approx(1.0)  # the averages point the same way
    assert similarity(Injection(a), Injection(b), "per-token") == pytest.approx(2**-0.5)
    assert similarity(Injection(a), Injection(-a)) == pytest.approx(-1.0)
    kv = torch.randn(2, 2, 1, 3, 4)  # (L, 2, H_kv, P, hd): a position's keys and values in every layer
    assert similarity(Injection(kv=kv), Injection(kv=kv[:, :, :, :2]), "per-token") < 1
    assert similarity(Injection(kv=kv), Injection(kv=kv.clone())) == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="different widths"):
        similarity(Injection(a), Injection(torch.ones(1, 3)))
    with pytest.raises(ConfigError, match="Unknown similarity metric"):
        similarity(Injection(a), Injection(b), "l2")


def test_rank_sources_ranks_the_close_prompt_first_and_says_why_it_skipped(llama, sst2, e2e, tokenizer):
    target = make_prompt(llama, sst2.spec, "soft", 4, seed=0, moved=0.0)
    near = make_prompt(llama, sst2.spec, "soft", 4, seed=0, moved=0.01)  # the target, barely moved
    far = make_prompt(llama, e2e.spec, "soft", 6, seed=5, init="random")
    sources = {
        "near": near,
        "far": far,
        "prefix": make_prompt(llama, e2e.spec, "prefix", 3),
        "hard": make_prompt(llama, sst2.spec, None),
        "other": make_prompt(build_tiny("gpt2", tokenizer), sst2.spec, "soft", 4),
    }
    ranking = rank_sources(target, sources)
    assert [name for name, _ in ranking.ranked] == ["near", "far"]  # best first
    assert set(ranking.skipped) == {"prefix", "hard", "other"}
    assert "another base model" in ranking.skipped["other"] and "a hard prompt" in ranking.skipped["hard"]
    with pytest.raises(ConfigError, match="Only a prompt of one kind"):
        rank_sources(sources["hard"], {"near": near})


def test_store_similar_ranks_a_store_and_skips_a_damaged_file(llama, sst2, e2e, tmp_path, capsys):
    store = Store(tmp_path / "store")
    store.save("sst2-a", make_prompt(llama, sst2.spec, "soft", 4, seed=0, moved=0.0))
    store.save("sst2-b", make_prompt(llama, sst2.spec, "soft", 4, seed=0, moved=0.01))
    store.save("e2e", make_prompt(llama, e2e.spec, "soft", 4, seed=3, init="random"))
    store.path("broken").write_bytes(b"not a safetensors file")
    code, out, err = run(capsys, "store", "similar", "sst2-a", "--store", store.root, "--json")
    assert code == 0, err
    d = json.loads(out)
    assert [r["name"] for r in d["ranked"]] == ["sst2-b", "e2e"] and "broken" in d["skipped"]  # not itself
    code, out, err = run(
        capsys, "store", "similar", store.path("sst2-a"), "--store", store.root, "--metric", "per-token"
    )
    assert code == 0 and "sst2-b" in out and "skipped" in out
    code, _, err = run(capsys, "store", "similar", "nope", "--store", store.root)
    assert code == 2 and "No prompt file or task 'nope'" in err
