"""Smoke tests on the real embedded SmolLM2-135M-Instruct (slow: SOFTPROMPT_SLOW=1 pytest -m slow)."""

from __future__ import annotations

import pytest
import torch

import softprompt as sp
from softprompt.data import Encoder
from softprompt.generate import generate_ids
from softprompt.injection import Injection

pytestmark = pytest.mark.slow


def test_layout_from_config_has_grouped_query_attention(smollm2):
    lay = smollm2.kv_layout
    assert (lay.num_layers, lay.num_kv_heads, lay.head_dim) == (30, 3, 64)
    assert smollm2.config.num_attention_heads == 9 and smollm2.hidden_size == 576
    assert smollm2.dtype == torch.float32 and not any(p.requires_grad for p in smollm2.model.parameters())


def test_zero_shot_template_is_well_above_chance(smollm2, sst2):
    metrics = sp.evaluate(smollm2, sst2, None, limit=100)
    assert metrics["accuracy"] > 0.65


def test_cached_generation_equals_uncached_with_a_soft_prompt(smollm2, sst2):
    torch.manual_seed(0)
    inj = Injection(embeds=smollm2.embedding_matrix[torch.randint(5000, (8,))].clone())
    enc = Encoder(sst2.spec, smollm2)
    prompts = [enc.example(p, inj, 10) for p in sst2.split("dev").prompts[:3]]
    assert generate_ids(smollm2, prompts, 10) == generate_ids(smollm2, prompts, 10, use_cache=False)
