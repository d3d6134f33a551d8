"""Tasks from the real shared data (different formats and label encodings) and data errors."""

from __future__ import annotations

import json

import pytest
from helpers import BASIC, DATA, build_tiny, write_spec

import softprompt as sp
from softprompt.data import Encoder, collate
from softprompt.errors import ConfigError, DataError
from softprompt.evaluate import grouped_references


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


# --- users' own data: structured columns, references, carved dev splits, label keys ------------------------------


def jsonl(path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# WebNLG-like rows: a list of triples in, a list of reference texts out
WEBNLG = [
    {
        "triples": ["Alan | born in | Ohio", "Alan | job | pilot"],
        "lex": ["Alan, a pilot, was born in Ohio.", "Ohio-born Alan flies."],
    },
    {"triples": ["Bern | capital of | Switzerland"], "lex": ["Bern is the Swiss capital."]},
]


def webnlg_task(tmp_path, template: str, extra: str = "references_column: lex\n"):
    jsonl(tmp_path / "train.jsonl", WEBNLG)
    jsonl(tmp_path / "dev.jsonl", WEBNLG)
    (tmp_path / "task.yaml").write_text(
        f"name: webnlg\nsplits: {{train: train.jsonl, dev: dev.jsonl}}\ntemplate: |-\n  {template}\n  Text:\n{extra}"
    )
    return sp.load_task(str(tmp_path / "task.yaml"))


def test_nested_data_with_filters_and_references(tmp_path):
    with pytest.raises(DataError) as e:  # a list reaches a plain field: refused, naming the column and the filters
        webnlg_task(tmp_path, "Triples: {triples}").split("train")
    assert "Row 1 of split 'train': column 'triples' holds a list" in e.value.problem
    assert "holds a list, which the template field {triples} cannot show as text" in e.value.problem
    assert e.value.fix == 'format it with a filter: {triples|join:", "}, {triples|json} or {triples|first}.'

    task = webnlg_task(tmp_path, 'Triples: {triples|join:"; "}')
    train = task.split("train")
    assert train.prompts == [
        "Triples: Alan | born in | Ohio; Alan | job | pilot\nText:",
        "Triples: Bern | capital of | Switzerland\nText:",
    ]
    assert train.references == [r["lex"] for r in WEBNLG] and train.targets == [r["lex"][0] for r in WEBNLG]
    # evaluation scores each input against all its references
    dev = task.split("dev")
    assert grouped_references(dev.prompts, dev) == {p: r["lex"] for p, r in zip(dev.prompts, WEBNLG)}
    # training takes one reference per example, drawn by (seed, example index): the same every time
    picks = [task.examples("train", seed=0).get(j) for j in range(40)]
    assert picks == [task.examples("train", seed=0).get(j) for j in range(40)]
    assert all(t in dict(zip(train.prompts, train.references))[p] for p, t in picks)
    assert {t for p, t in picks if p == train.prompts[0]} == set(WEBNLG[0]["lex"])  # both references get trained on
    assert [t for _, t in picks] != [t for _, t in (task.examples("train", seed=1).get(j) for j in range(40))]
    assert task.spec.portable()["references_column"] == "lex"


def test_rows_that_share_an_input_pool_their_references(e2e):
    dev = e2e.split("dev").subset(range(30))
    refs = grouped_references(dev.prompts, dev)
    assert sum(len(r) for r in refs.values()) == 30 and len(refs) < 30
    assert refs[dev.prompts[0]] == [t for p, t in zip(dev.prompts, dev.targets) if p == dev.prompts[0]]


def test_template_filters(tmp_path):
    rows = [{"t": ["a", "b"], "m": {"k": "é"}, "n": [["x", 1], ["y", 2]], "s": "plain {braces}", "i": 7}]
    jsonl(tmp_path / "train.jsonl", rows)

    def render(template: str) -> str:
        body = f"name: f\nsplits: {{train: train.jsonl}}\ntarget_column: s\ntemplate: {json.dumps(template)}\n"
        return sp.load_task(str(write_spec(tmp_path, body))).split("train").prompts[0]

    assert render('{t|join:", "}') == "a, b"
    assert render('{t|join:"\\n- "}') == "a\n- b"  # the separator is a JSON string: escapes work
    assert render("{m|json}") == '{"k": "é"}' and render("{t|first}") == "a"
    assert render('{n|join:" / "}') == '["x", 1] / ["y", 2]'  # nested items as JSON
    assert render('{n|first|join:"-"}') == "x-1"  # filters chain left to right
    assert render('{{{s}}} {i:03d} {t | join:"+"}') == "{plain {braces}} 007 a+b"  # braces and format specs as before
    with pytest.raises(DataError, match=r"\{s\|first\} needs a list, but column 's' holds str"):
        render("{s|first}")
    with pytest.raises(ConfigError, match="unknown template filter 'upper'"):
        sp.TaskSpec(name="f", template="{s|upper}", target_column="s")
    with pytest.raises(ConfigError, match="needs a separator"):
        sp.TaskSpec(name="f", template="{t|join}", target_column="s")
    with pytest.raises(ConfigError, match="takes no argument"):
        sp.TaskSpec(name="f", template='{t|json:"x"}', target_column="s")
    with pytest.raises(ConfigError, match="takes no filter"):
        sp.TaskSpec(name="f", template="{t} {mask|json}", target_column="s")
    spec = sp.TaskSpec(name="f", template='{t|join:"; "}', target_column="s")
    assert spec.render_input({"t": ["a", "b"]}) == "a; b" and spec.template_fields == ["t"]


def test_later_rows_with_missing_or_null_values(tmp_path):
    body = 'name: t\nsplits: {train: train.jsonl}\ntemplate: "{text}"\nlabel_column: y\nlabels: {a: "yes", b: "no"}\n'
    spec = write_spec(tmp_path, body)
    jsonl(tmp_path / "train.jsonl", [{"text": "hi", "y": "a"}, {"y": "b"}])
    with pytest.raises(DataError) as e:
        sp.load_task(str(spec)).split("train")
    assert e.value.problem == "Row 2 of split 'train' has no value in column 'text' (missing or null)."
    jsonl(tmp_path / "train.jsonl", [{"text": "hi", "y": "a"}, {"text": "ho", "y": "b"}, {"text": "hu", "y": None}])
    with pytest.raises(DataError, match="Row 3 of split 'train' has no value in column 'y'"):
        sp.load_task(str(spec)).split("train")
    spec = write_spec(tmp_path, 'name: g\nsplits: {train: train.jsonl}\ntemplate: "{text}"\ntarget_column: ref\n')
    jsonl(tmp_path / "train.jsonl", [{"text": "hi", "ref": "Hi."}, {"text": "ho", "ref": None}])
    with pytest.raises(DataError, match="Row 2 of split 'train' has no value in column 'ref'"):
        sp.load_task(str(spec)).split("train")
    with pytest.raises(DataError, match="The input has no value in column 'text'"):
        sp.load_task(str(spec)).spec.render_input({"text": None})


def test_references_column_errors(tmp_path):
    with pytest.raises(DataError) as e:
        webnlg_task(tmp_path, "{triples|first}", extra="target_column: lex\n").split("train")
    assert "Row 1 of split 'train': target column 'lex' holds a list, not a text" in e.value.problem
    assert "references_column: lex" in e.value.fix
    jsonl(tmp_path / "train.jsonl", [{"x": "a", "lex": []}])
    task = sp.load_task(
        str(write_spec(tmp_path, "name: r\nsplits: {train: train.jsonl}\ntemplate: '{x}'\nreferences_column: lex\n"))
    )
    with pytest.raises(DataError, match="references column 'lex' must hold a non-empty list of texts"):
        task.split("train")
    with pytest.raises(ConfigError, match="must have exactly one of `labels`"):
        sp.TaskSpec(name="r", template="{x}", target_column="a", references_column="b")


def counted(name: str, n_a: int, n_b: int) -> dict[str, str]:
    rows = [f"a{i}\ta" for i in range(n_a)] + [f"b{i}\tb" for i in range(n_b)]
    return {name: "text\ty\n" + "\n".join(rows) + "\n"}


def test_dev_from_train_carves_a_seeded_stratified_dev_split(tmp_path):
    body = BASIC.replace("dev: dev.tsv", "").replace("train.tsv, ", "train.tsv") + "dev_from_train: 0.2\n"
    task = sp.load_task(str(write_spec(tmp_path, body, counted("train.tsv", 30, 10))))
    assert task.has_split("dev") and task.split_names == ["train", "dev"]
    train, dev = task.split("train"), task.split("dev")
    assert len(dev) == 8 and dev.labels.count(0) == 6 and dev.labels.count(1) == 2  # a fifth of each class
    assert len(train) == 32 and not set(train.prompts) & set(dev.prompts)  # train excludes the dev rows
    assert dev.prompts == sp.load_task(str(tmp_path / "task.yaml")).split("dev").prompts  # seeded: the same rows
    assert task.examples("train", 0).split is train
    spec = task.spec.portable()
    assert spec["dev_from_train"] == 0.2 and sp.TaskSpec.from_dict(spec).dev_from_train == 0.2  # in prompt files
    # a count, and from the caller (what --dev-from-train sets): it replaces the spec's dev split
    write_spec(tmp_path, BASIC, {"dev.tsv": "text\ty\nx\ta\n"})
    task = sp.load_task(str(tmp_path / "task.yaml"), dev_from_train=5)
    assert len(task.split("dev")) == 5 and len(task.split("train")) == 35
    assert "dev_from_train" not in sp.load_task(str(tmp_path / "task.yaml")).spec.portable()


def test_dev_from_train_keeps_the_rows_of_an_input_together(tmp_path):
    rows = "".join(f"m{i},ref {i}.{k}\n" for i in range(20) for k in range(1 + i % 3))  # E2E: one row per reference
    body = "name: g\nsplits: {train: train.csv}\ntemplate: '{mr}'\ntarget_column: ref\ndev_from_train: 0.25\n"
    task = sp.load_task(str(write_spec(tmp_path, body, {"train.csv": "mr,ref\n" + rows})))
    train, dev = task.split("train"), task.split("dev")
    assert len(set(dev.prompts)) == 5 and not set(dev.prompts) & set(train.prompts)  # a quarter of the inputs
    assert len(train) + len(dev) == len(rows.splitlines())


def test_dev_from_train_errors(tmp_path):
    for bad in (0, 1.0, -3, 1.5, True):
        with pytest.raises(ConfigError, match="dev_from_train must be a fraction between 0 and 1"):
            sp.TaskSpec(name="t", template="{x}", target_column="y", dev_from_train=bad)
    with pytest.raises(ConfigError, match="streams its train split"):
        sp.TaskSpec(name="t", template="{x}", target_column="y", streaming=True, dev_from_train=0.1)
    with pytest.raises(ConfigError, match="has both a `dev:` split and dev_from_train"):
        sp.load_task(str(write_spec(tmp_path, BASIC + "dev_from_train: 0.1\n")))
    task = sp.load_task(str(write_spec(tmp_path, BASIC, counted("train.tsv", 3, 2))), dev_from_train=5)
    with pytest.raises(DataError, match="takes 5 of the 5 train rows of task 't', leaving none to train"):
        task.split("dev")


def test_check_split_before_anything_is_read(tmp_path):
    task = sp.load_task(str(write_spec(tmp_path, BASIC, {"train.tsv": "text\ty\nhi\ta\n"})))
    task.check_split("train")
    with pytest.raises(DataError, match=r"has no split 'validation'") as e:
        task.check_split("validation")
    assert "use one of ['train', 'dev']" in e.value.fix
    with pytest.raises(DataError, match="Data file for split 'dev' of task 't' not found"):
        task.check_split("dev")
    assert task._splits == {}


def test_label_keys_match_strings_ints_and_booleans(tmp_path):
    body = 'name: t\nsplits: {train: train.jsonl}\ntemplate: "{x}"\nlabels: {%s}\n'
    jsonl(tmp_path / "train.jsonl", [{"x": "a", "label": v} for v in (True, "true", "False", False)])
    split = sp.load_task(str(write_spec(tmp_path, body % 'true: "yes", false: "no"'))).split("train")
    assert split.labels == [0, 0, 1, 1]
    jsonl(tmp_path / "train.jsonl", [{"x": "a", "label": v} for v in (0, "1", 1)])
    assert sp.load_task(str(write_spec(tmp_path, body % "0: neg, '1': pos"))).split("train").labels == [0, 1, 1]
    # unquoted yes/no are booleans to YAML: data spelling them is not matched, and the fix says why
    jsonl(tmp_path / "train.jsonl", [{"x": "a", "label": "yes"}])
    with pytest.raises(DataError, match="has label 'yes', which is not in the label map") as e:
        sp.load_task(str(write_spec(tmp_path, body % "yes: Y, no: N"))).split("train")
    assert "quote the keys in `labels:`" in e.value.fix
    assert sp.load_task(str(write_spec(tmp_path, body % "'yes': Y, 'no': N"))).split("train").labels == [0]


def test_label_keys_that_collide_are_refused(tmp_path):
    body = 'name: t\nsplits: {train: train.tsv}\ntemplate: "{x}"\nlabels: {%s}\n'
    with pytest.raises(ConfigError) as e:
        sp.load_task(str(write_spec(tmp_path, body % "0: a, '0': b")))
    assert "label keys 0 and '0' are the same label" in e.value.problem and "quote the keys in" in e.value.fix
    with pytest.raises(ConfigError, match="label keys True and 'True' are the same label"):
        sp.load_task(str(write_spec(tmp_path, body % "yes: a, 'True': b")))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"labels": {"a": "yes", "b": ""}}, "have an empty verbalizer word"),
        ({"labels": None, "target_column": "y", "max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
        ({"labels": None, "target_column": "y", "max_new_tokens": -3}, "max_new_tokens must be an integer >= 1"),
    ],
)
def test_specs_that_could_never_score_or_decode_are_refused(changes, message):
    fields = {"name": "t", "template": "Text: {text}\nLabel:", "labels": {"a": "yes", "b": "no"}} | changes
    with pytest.raises(ConfigError, match=message):
        sp.TaskSpec(**fields)
