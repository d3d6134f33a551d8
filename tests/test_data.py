"""Tasks from the real shared data (different formats and label encodings) and data errors."""

from __future__ import annotations

import pytest
from helpers import BASIC, DATA, build_tiny, write_spec

import softprompt as sp
from softprompt.data import Encoder, collate
from softprompt.errors import ConfigError, DataError


@pytest.mark.parametrize(
    "name, n_classes, first_label",
    [("sst2", 2, "negative"), ("trec", 6, "description"), ("rte", 2, "False"), ("cb", 3, "yes")],
)
def test_builtin_classification_tasks_load_real_data(name, n_classes, first_label):
    if not (DATA / name).is_dir():
        pytest.skip("shared data missing")
    task = sp.load_task(name, data_dir=str(DATA))
    train = task.split("train")
    assert len(task.spec.labels) == n_classes
    assert train.targets[0] == first_label
    assert set(train.labels) == set(range(n_classes))
    assert all("{" not in p for p in train.prompts[:50])  # every template field was filled


def test_e2e_is_generation_with_grouped_references(e2e):
    dev = e2e.split("dev")
    assert not e2e.spec.is_classification and dev.labels is None
    assert len(set(dev.prompts)) < len(dev.prompts)  # several references per meaning representation
    assert dev.targets[0] == dev.rows[0]["ref"]


def test_missing_file_names_path_and_fix(tmp_path):
    spec = write_spec(tmp_path, BASIC, {"train.tsv": "text\ty\nhi\ta\n"})
    with pytest.raises(DataError, match="dev.tsv") as e:
        sp.load_task(str(spec)).split("dev")
    assert e.value.fix


def test_missing_column(tmp_path):
    spec = write_spec(tmp_path, BASIC, {"train.tsv": "sentence\ty\nhi\ta\n"})
    with pytest.raises(DataError, match=r"no column\(s\) \['text'\]"):
        sp.load_task(str(spec)).split("train")


def test_label_not_in_label_map(tmp_path):
    spec = write_spec(tmp_path, BASIC, {"train.tsv": "text\ty\nhi\ta\nho\tc\n"})
    with pytest.raises(DataError, match="Row 2 .* label 'c'"):
        sp.load_task(str(spec)).split("train")


def test_empty_split(tmp_path):
    spec = write_spec(tmp_path, BASIC, {"train.tsv": "text\ty\n"})
    with pytest.raises(DataError, match="Split 'train' of task 't' is empty"):
        sp.load_task(str(spec)).split("train")


def test_file_that_is_not_utf8(tmp_path):
    spec = write_spec(tmp_path, BASIC, {"train.tsv": "text\ty\ncaf\xe9\ta\n".encode("latin-1")})
    with pytest.raises(DataError, match="UTF-8"):
        sp.load_task(str(spec)).split("train")


def test_template_field_that_does_not_exist(tmp_path):
    spec = write_spec(tmp_path, BASIC.replace("{text}", "{sentence}"), {"train.tsv": "text\ty\nhi\ta\n"})
    with pytest.raises(DataError, match="sentence"):
        sp.load_task(str(spec)).split("train")


def test_unknown_task_and_unknown_spec_key(tmp_path):
    with pytest.raises(ConfigError, match="Unknown task 'nope'"):
        sp.load_task("nope")
    spec = write_spec(tmp_path, BASIC + "colour: red\n", {})
    with pytest.raises(ConfigError, match="colour"):
        sp.load_task(str(spec))


def test_unknown_split(sst2):
    with pytest.raises(DataError, match="no split 'validation'"):
        sst2.split("validation")


def test_column_mapping_and_jsonl(tmp_path):
    body = (
        'name: t\nsplits: {train: train.jsonl}\ntemplate: "{p} / {h}"\ncolumns: {p: premise, h: hypothesis}\n'
        'label_column: label\nlabels: {0: "no", 1: "yes"}\n'
    )
    spec = write_spec(tmp_path, body, {"train.jsonl": '{"premise": "A", "hypothesis": "B", "label": 1}\n'})
    split = sp.load_task(str(spec)).split("train")
    assert split.prompts == ["A / B"] and split.labels == [1] and split.targets == ["yes"]


def test_training_example_masks_prompt_and_ends_generation_with_eos(llama, e2e):
    enc = Encoder(e2e.spec, llama)
    eos = llama.tokenizer.eos_token_id
    ex = enc.training_example("Table: x\nText:", "A pub.")
    prompt, slot = llama.family.source_ids("Table: x\nText:")
    assert ex.source == prompt and ex.slot == slot == len(prompt)  # a causal LM's target follows the prompt
    assert ex.target == llama.tokenizer(" A pub.", add_special_tokens=False)["input_ids"] + [eos]
    # the loss covers the target only: the prompt's tokens are labelled -100
    labels = llama.family.layout([ex], labels=True).labels[0].tolist()
    n_prompt = len(prompt)
    assert labels[:n_prompt] == [-100] * n_prompt
    assert labels[n_prompt:] == ex.target and ex.target[-1] == eos


def test_truncation_policy(llama, sst2):
    enc = Encoder(sst2.spec, llama, truncate="error", max_length=20)
    long = "word " * 50
    with pytest.raises(sp.SoftpromptError, match="does not fit"):
        enc.training_example(long, "positive")
    left = Encoder(sst2.spec, llama, truncate="left", max_length=20)
    ex = left.training_example(long, "positive")
    assert len(ex.source) + len(ex.target) == 20 and ex.target == left.target_ids("positive", eos=False)
    assert ex.slot == len(ex.source)


def test_collate_left_pads():
    b = collate([[1, 2, 3], [4]], pad_id=0, labels=[[-100, 2, 3], [4]])
    assert b["input_ids"].tolist() == [[1, 2, 3], [0, 0, 4]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert b["labels"].tolist() == [[-100, 2, 3], [-100, -100, 4]]


def test_chat_mode_wraps_the_template_as_a_user_turn(tokenizer, sst2):
    import copy

    from softprompt.data import TaskSpec

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    spec = TaskSpec.from_dict({**sst2.spec.portable(), "chat": True})
    enc = Encoder(spec, build_tiny("llama", tok))
    text = spec.render({"sentence": "a fine film"})
    assert tok.decode(enc.example(text).source) == f"<user>{text}</s><assistant>"
    ex = enc.training_example(text, "positive")
    assert ex.source == enc.example(text).source
    assert tok.decode(ex.target) == "positive"  # no " " separator: the assistant turn starts the answer
