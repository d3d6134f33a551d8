"""The injection layout: padding, positions and masks for every mix of prompts in one batch."""

from __future__ import annotations

import pytest
import torch

from softprompt.data import collate
from softprompt.errors import InputTooLongError
from softprompt.inject import EMPTY, Injection, assemble, forward

TEXTS = ["the film was great", "bad", "who loved the plot and the acting of the actor"]


def kv(base, n):
    lay = base.kv_layout
    return torch.randn(lay.num_layers, 2, lay.num_kv_heads, n, lay.head_dim)


def batch(base, texts=TEXTS):
    return collate([base.tokenizer(t)["input_ids"] for t in texts], base.tokenizer.pad_token_id)


def mixed(base):
    D = base.hidden_size
    return [Injection(embeds=torch.randn(3, D)), Injection(kv=kv(base, 5)),
            Injection(embeds=torch.randn(2, D), kv=kv(base, 2)), EMPTY]


@torch.no_grad()
def test_each_row_of_a_mixed_batch_equals_the_row_alone(base):
    injections = mixed(base)
    texts = TEXTS + ["great fun"]
    b = batch(base, texts)
    logits, _ = forward(base, assemble(base, b["input_ids"], b["attention_mask"], injections))
    for i, text in enumerate(texts):
        one = batch(base, [text])
        alone, _ = forward(base, assemble(base, one["input_ids"], one["attention_mask"], injections[i]))
        n = one["input_ids"].shape[1]
        torch.testing.assert_close(logits[i, -n:], alone[0, -n:], rtol=0, atol=1e-5)


@torch.no_grad()
def test_no_prompt_equals_the_plain_model_under_left_padding(base):
    b = batch(base)
    ours, _ = forward(base, assemble(base, b["input_ids"], b["attention_mask"], EMPTY))
    for i, text in enumerate(TEXTS):
        ids = torch.tensor([base.tokenizer(text)["input_ids"]])
        plain = base.model(input_ids=ids).logits
        torch.testing.assert_close(ours[i, -ids.shape[1]:], plain[0], rtol=0, atol=1e-5)


def test_layout_prompt_adjacent_to_text_and_positions(base):
    D = base.hidden_size
    b = batch(base)
    P = 3
    x = assemble(base, b["input_ids"], b["attention_mask"], Injection(embeds=torch.randn(P, D), kv=kv(base, 4)))
    lens = b["attention_mask"].sum(1)
    S = x.inputs_embeds.shape[1]
    assert S == P + int(lens.max())
    assert x.attention_mask.shape == (3, 4 + S)
    for i in range(3):
        n = int(lens[i])
        seq_mask = x.attention_mask[i, 4:]
        # [pads][P virtual tokens][n text tokens]: no padding between prompt and text
        assert seq_mask.tolist() == [0] * (S - P - n) + [1] * (P + n)
        # positions count from the first virtual token; the KV prefix takes none
        assert x.position_ids[i, S - P - n:].tolist() == list(range(P + n))
        assert x.attention_mask[i, :4].tolist() == [1] * 4


def test_compiled_prefix_positions_continue_after_prefix(base):
    b = batch(base)
    x = assemble(base, b["input_ids"], b["attention_mask"], Injection(kv=kv(base, 4), kv_positions=4))
    n = int(b["attention_mask"][1].sum())
    assert x.position_ids[1, -n:].tolist() == list(range(4, 4 + n))


def test_labels_follow_their_tokens(base):
    b = collate([[5, 6, 7], [8]], base.tokenizer.pad_token_id, [[-100, 6, 7], [8]])
    x = assemble(base, b["input_ids"], b["attention_mask"], Injection(embeds=torch.zeros(2, base.hidden_size)),
                 labels=b["labels"])
    assert x.labels.tolist() == [[-100, -100, -100, 6, 7], [-100, -100, -100, -100, 8]]


def test_too_long_input_is_a_clear_error(base):
    b = batch(base)
    with pytest.raises(InputTooLongError, match="context"):
        assemble(base, b["input_ids"], b["attention_mask"], Injection(embeds=torch.zeros(600, base.hidden_size)))


def test_right_padded_input_is_rejected(base):
    b = batch(base)
    with pytest.raises(ValueError, match="left-padded"):
        assemble(base, b["input_ids"].flip(1), b["attention_mask"].flip(1), EMPTY)
