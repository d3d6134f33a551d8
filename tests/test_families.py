"""Model families: batch layout, positions and masks, semantics of KV prefixes, and what each family refuses."""

from __future__ import annotations

import pytest
import torch
import zoo
from helpers import build_tiny

from softprompt.base import load_base
from softprompt.data import TaskSpec
from softprompt.errors import ConfigError, InputTooLongError
from softprompt.example import MASK, Example
from softprompt.injection import EMPTY, Injection

TEXTS = ["the film was great", "bad", "who loved the plot and the acting of the actor"]
ATTENTION_ONLY = [a for a in zoo.CAUSAL if not zoo.FEATURES[a] & {"ssm"}]
HYBRID = [a for a in zoo.CAUSAL if {"ssm"} <= zoo.FEATURES[a] and "pure_ssm" not in zoo.FEATURES[a]]


def kv(base, n):
    lay = base.kv_layout
    return torch.randn(lay.num_layers, 2, lay.num_kv_heads, n, lay.head_dim)


def example(base, text, target=" good", injection=EMPTY):
    ids, slot = base.family.source_ids(text)
    return Example(ids, slot, base.family.target_ids(target, eos=False), injection)


# --- the causal layout ---------------------------------------------------------------------------------------------


@torch.no_grad()
def test_no_prompt_equals_the_plain_model_under_left_padding(base):
    logits, targets, mask = base.family.target_logits([example(base, t) for t in TEXTS])
    for i, text in enumerate(TEXTS):
        e = example(base, text)
        plain = base.model(input_ids=torch.tensor([e.source + e.target])).logits[0, -len(e.target) - 1 : -1]
        torch.testing.assert_close(logits[i][mask[i]], plain, rtol=0, atol=1e-5)


def test_prompt_is_adjacent_to_the_text_and_positions_count_from_it(base):
    P, K = 3, 4
    rows = [
        example(base, t, injection=Injection(embeds=torch.randn(P, base.hidden_size), kv=kv(base, K), kv_positions=K))
        for t in TEXTS
    ]
    x = base.family.layout(rows)
    lens = [len(r.source) for r in rows]
    S = x.inputs_embeds.shape[1]
    assert P + max(lens) == S and x.mask.shape == (3, K + S)
    for i, n in enumerate(lens):
        # [pads][P virtual tokens][n text tokens]: no padding between prompt and text
        assert x.mask[i, K:].tolist() == [0] * (S - P - n) + [1] * (P + n)
        # the KV prefix takes positions 0..K-1, the virtual tokens and text continue
        assert x.positions[i, S - P - n :].tolist() == list(range(K, K + P + n))
        assert x.mask[i, :K].tolist() == [1] * K and x.slot_positions[i].tolist() == list(range(K))


def test_labels_follow_their_tokens(base):
    rows = [Example([5, 6, 7], 1, [8, 9]), Example([4], 1, [3])]
    rows = [
        Example(r.source[: r.slot], r.slot, r.target, Injection(embeds=torch.zeros(2, base.hidden_size))) for r in rows
    ]
    x = base.family.layout(rows, labels=True)
    assert x.labels.tolist() == [[-100, -100, -100, 8, 9], [-100, -100, -100, -100, 3]]


def test_too_long_input_is_a_clear_error(base):
    with pytest.raises(InputTooLongError, match="context"):
        base.family.layout([example(base, TEXTS[0], injection=Injection(embeds=torch.zeros(600, base.hidden_size)))])


# --- what a KV prefix means ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ATTENTION_ONLY)
@torch.no_grad()
def test_a_prefix_of_real_tokens_keys_values_is_those_tokens(arch, tokenizer):
    """The keys/values of real tokens, as a prefix, give exactly what the tokens give in the text, in a padded batch.

    This is the model's own semantics of a prefix, sliding windows and chunks included: the prefix
    stands at the positions of the tokens it holds, so a window stops seeing it where it would stop
    seeing them.
    """
    base = build_tiny(arch, tokenizer)
    family = base.family
    head = family.source_ids("the plot and the acting of the story")[0]
    tail = tokenizer(" was great fun and the actor loved it", add_special_tokens=False)["input_ids"]
    prefix = Injection(kv=family.kv_of_embeddings(base.embed(torch.tensor(head))), kv_positions=len(head))
    target = family.target_ids(" good", eos=False)
    rows = [Example(tail, len(tail), target, prefix), Example(tail[:2], 2, target, EMPTY)]  # padding in the batch
    with_prefix, _ = family.target_log_probs(rows)
    in_text, _ = family.target_log_probs([Example(head + tail, len(head + tail), target)])
    torch.testing.assert_close(with_prefix[0, -len(target) :], in_text[0, -len(target) :], rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ATTENTION_ONLY)
@torch.no_grad()
def test_a_compiled_soft_prompt_gives_the_same_log_probs(arch, tokenizer):
    base = build_tiny(arch, tokenizer)
    family = base.family
    soft = Injection(embeds=torch.randn(3, base.hidden_size), kv=kv(base, 2), kv_positions=2)
    compiled = family.compile(soft)
    assert compiled.embeds is None and compiled.num_kv == 5 and compiled.kv_positions == 5
    rows = [example(base, t) for t in TEXTS]
    a, mask = family.target_log_probs([Example(r.source, r.slot, r.target, soft) for r in rows])
    b, _ = family.target_log_probs([Example(r.source, r.slot, r.target, compiled) for r in rows])
    torch.testing.assert_close(a[mask], b[mask], rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", HYBRID)
def test_hybrids_take_kv_prefixes_in_their_attention_layers_only(arch, tokenizer):
    base = build_tiny(arch, tokenizer)
    attention = [layer for layer in base.model.modules() if type(layer).__name__.endswith("Attention")]
    assert 0 < base.kv_layout.num_layers <= len(attention)
    assert base.kv_layout.num_layers < base.model.config.num_hidden_layers or arch == "falcon_h1"
    assert not base.family.compiles  # a recurrent state after the virtual tokens is no KV prefix
    soft = Injection(embeds=torch.randn(3, base.hidden_size))
    assert base.family.compile(soft) is soft


@pytest.mark.parametrize("arch", ["mamba", "mamba2"])
def test_a_pure_state_space_model_refuses_kv_prefixes_and_takes_soft_prompts(arch, tokenizer):
    base = build_tiny(arch, tokenizer)
    with pytest.raises(ConfigError, match="no attention layers.*--method soft"):
        _ = base.kv_layout
    rows = [example(base, t, injection=Injection(embeds=torch.randn(2, base.hidden_size))) for t in TEXTS]
    logp, mask = base.family.target_log_probs(rows)
    assert torch.isfinite(logp[mask]).all()


# --- our one loss is the model's own cross-entropy ------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "t5", "bart", "bert", "roberta"])
@torch.no_grad()
def test_the_loss_is_the_models_own_cross_entropy(arch, tokenizer):
    base = build_tiny(arch, tokenizer)
    family = base.family
    text = "the film was great" + (MASK if family.name == "masked_lm" else "")
    e = example(base, text, " good bad")
    ours = family.loss([e])
    if family.name == "causal":
        ids = torch.tensor([e.source + e.target])
        labels = torch.tensor([[-100] * len(e.source) + e.target])
        theirs = base.model(input_ids=ids, labels=labels).loss
    elif family.name == "seq2seq":
        theirs = base.model(input_ids=torch.tensor([e.source]), labels=torch.tensor([e.target])).loss
    else:
        masked = e.source[: e.slot] + [family.mask_id] * len(e.target) + e.source[e.slot :]
        labels = [-100] * e.slot + e.target + [-100] * (len(e.source) - e.slot)
        theirs = base.model(input_ids=torch.tensor([masked]), labels=torch.tensor([labels])).loss
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


# --- which family, and what it refuses -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch, family",
    [
        ("llama", "causal"),
        ("t5", "seq2seq"),
        ("bart", "seq2seq"),
        ("bert", "masked_lm"),
        ("roberta", "masked_lm"),
        ("gemma2", "causal"),
    ],
)
def test_load_base_picks_the_family_from_the_config(arch, family, tokenizer, tmp_path):
    tiny = build_tiny(arch, tokenizer)
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    base = load_base(str(tmp_path), device="cpu")  # sdpa by default; Gemma 2 has no SDPA path and falls back to eager
    assert base.family.name == family and base.fingerprint.family == family
    assert base.model.config._attn_implementation == zoo.attn_implementation(arch)
    ours, theirs = base.fingerprint, tiny.fingerprint
    assert (ours.config_hash, ours.embedding_sha256) == (theirs.config_hash, theirs.embedding_sha256)


def spec(template, **kw):
    return TaskSpec(name="t", template=template, **({"labels": {"0": "bad", "1": "good"}} | kw))


@pytest.mark.parametrize(
    "arch, task, message",
    [
        ("bert", spec("{text} It was"), "no {mask} slot"),
        ("bert", spec("{text} {mask}", labels=None, target_column="ref"), "has no decoder"),
        ("llama", spec("{text} It was {mask} indeed."), "text after {mask}"),
        (
            "t5",
            spec(
                "{text} It was {mask}.",
            ),
            "text after {mask}",
        ),
        ("t5", spec("{text}", chat=True), "chat templates are for causal LMs"),
    ],
)
def test_a_task_that_does_not_fit_the_family_is_refused_with_the_fix(arch, task, message, tokenizer):
    from softprompt.data import Encoder

    with pytest.raises(ConfigError, match=message):
        Encoder(task, build_tiny(arch, tokenizer))


def test_a_masked_lm_cannot_generate(tokenizer):
    base = build_tiny("bert", tokenizer)
    with pytest.raises(ConfigError, match="cannot generate"):
        base.family.start_decoding([example(base, "the film" + MASK)])


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma2", "jamba", "falcon_h1", "t5", "bart", "bert"])
def test_gradient_checkpointing_keeps_the_prompt_and_the_gradients(arch, tokenizer):
    """Bit-identical gradients with and without checkpointing: KV prefixes survive it, recurrent states are not
    replayed, and dropout stays off (BART's layers read their own training flag)."""
    base = build_tiny(arch, tokenizer)
    lay = base.kv_layout
    kv = torch.randn(lay.num_layers, 2, lay.num_kv_heads, 3, lay.head_dim, requires_grad=True)
    embeds = torch.randn(2, base.hidden_size, requires_grad=True)
    inj = Injection(embeds=embeds, kv=kv, kv_positions=3)
    rows = [
        example(base, "the film was great" + (MASK if base.family.name == "masked_lm" else ""), " good bad", inj),
        example(base, "bad" + (MASK if base.family.name == "masked_lm" else ""), " good", inj),
    ]
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            base.family.enable_gradient_checkpointing()
        base.family.loss(rows).backward()
        grads.append((kv.grad.clone(), embeds.grad.clone()))
        kv.grad = embeds.grad = None
    base.family.disable_gradient_checkpointing()
    assert grads[0][0].abs().sum() > 0 and grads[0][1].abs().sum() > 0
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    assert not any(m.training for m in base.model.modules())  # left as it was found


def test_only_the_families_run_the_model_or_name_a_family():
    """The seam holds: no other module passes a forward's arguments or branches on a family's name.

    (bench/baselines.py runs PEFT's own model, which is what it measures; peft_format.py maps families to PEFT's
    task types.)
    """
    import re
    from pathlib import Path

    import softprompt
    from softprompt.families import FAMILIES

    root = Path(softprompt.__file__).parent
    forward = re.compile(r"inputs_embeds=|past_key_values|decoder_input_ids|position_ids=|transformers\.cache_utils")
    names = re.compile("|".join(rf"[\"']{f.name}[\"']" for f in FAMILIES))
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("families/"):
            continue
        text = path.read_text()
        if rel != "bench/baselines.py":
            assert not forward.search(text), f"{rel} runs the model itself: {forward.search(text).group()}"
        if rel != "peft_format.py":
            assert not names.search(text), f"{rel} names a family: {names.search(text).group()}"


@pytest.mark.parametrize("arch", ["t5", "bart"])
@torch.no_grad()
def test_seq2seq_class_scores_share_the_encoder_and_equal_the_loss_s_log_likelihoods(arch, tokenizer):
    base = build_tiny(arch, tokenizer)
    family = base.family
    lay = base.kv_layout
    injections = [EMPTY, Injection(embeds=torch.randn(2, base.hidden_size)), Injection(kv=kv(base, 3), kv_positions=3)]
    rows = [example(base, t, injection=i) for t, i in zip(TEXTS, injections)]
    verb = [family.target_ids(w, eos=False) for w in (" good", " bad fun", " great")]
    scores = family.class_scores([(r, verb) for r in rows])
    for r, s in zip(rows, scores):
        logp, _ = family.target_log_probs([r.with_target(v) for v in verb])
        torch.testing.assert_close(s, logp.sum(1), rtol=0, atol=1e-5)
    assert lay.num_layers == base.model.config.num_decoder_layers if arch == "t5" else lay.num_layers > 0


@pytest.mark.parametrize("arch", [*ATTENTION_ONLY, *HYBRID])
@torch.no_grad()
def test_causal_class_scores_run_each_row_once_and_equal_the_loss_s_log_likelihoods(arch, tokenizer):
    """Label words of several tokens continue from the row's forked cache; each equals scoring it as a target, in a
    padded batch that mixes prompts (windowed and chunked models included; recurrent ones score words as targets)."""
    base = build_tiny(arch, tokenizer)
    family = base.family
    injections = [EMPTY, Injection(embeds=torch.randn(2, base.hidden_size))]
    if not zoo.FEATURES[arch] & {"ssm"}:
        injections.append(Injection(kv=kv(base, 3), kv_positions=3))
    rows = [example(base, t, injection=i) for t, i in zip(TEXTS, injections)]
    verb = [family.target_ids(w, eos=False) for w in (" good", " bad fun", " great acting of the plot")]
    assert sorted(map(len, verb))[0] < sorted(map(len, verb))[-1]  # words of different lengths
    scores = family.class_scores([(r, verb) for r in rows])
    for r, s in zip(rows, scores):
        alone, _ = family.target_log_probs([r.with_target(v) for v in verb])
        torch.testing.assert_close(s, alone.sum(1), rtol=0, atol=1e-4)
