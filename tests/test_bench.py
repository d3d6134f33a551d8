"""The benchmark: grid expansion and resume, every kind of cell on a tiny model, PEFT parity, the report."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from helpers import DATA
from helpers import run_cli as run

import softprompt as sp
from softprompt.bench import load_grid, run_grid, write_report
from softprompt.bench.baselines import (
    BASELINES,
    FullFinetune,
    PeftAdapter,
    PeftPrefix,
    PeftPrompt,
    PeftPTuning,
    _right_padded,
)
from softprompt.bench.cell import BenchTrainer, Cell, record_path, run_cell
from softprompt.bench.report import same_machine
from softprompt.errors import ConfigError
from softprompt.example import Example
from softprompt.train import Trainer, init_context

pytest.importorskip("peft")
GRID = Path(__file__).resolve().parents[1] / "benchmarks" / "smollm2.yaml"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models gain nothing from a second thread, and lose a lot when the machine is shared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_tasks(tmp_path_factory):
    """A classification and a generation task on the first rows of the shared SST-2 and E2E files."""
    if not (DATA / "sst2").is_dir() or not (DATA / "e2e_nlg").is_dir():
        pytest.skip("shared data not present")
    root = tmp_path_factory.mktemp("tasks")
    for src, dst, n in (
        ("sst2/train.tsv", "cls-train.tsv", 200),
        ("sst2/dev.tsv", "cls-dev.tsv", 40),
        ("e2e_nlg/train.csv", "gen-train.csv", 200),
        ("e2e_nlg/dev.csv", "gen-dev.csv", 40),
    ):
        (root / dst).write_text("".join((DATA / src).read_text().splitlines(keepends=True)[: n + 1]))
    cls = {
        **yaml.safe_load((Path(sp.__file__).parent / "tasks" / "sst2.yaml").read_text()),
        "name": "cls",
        "splits": {"train": "cls-train.tsv", "dev": "cls-dev.tsv"},
    }
    gen = {
        **yaml.safe_load((Path(sp.__file__).parent / "tasks" / "e2e_nlg.yaml").read_text()),
        "name": "gen",
        "splits": {"train": "gen-train.csv", "dev": "gen-dev.csv"},
        "max_new_tokens": 6,
    }
    for spec in (cls, gen):
        (root / f"{spec['name']}.yaml").write_text(yaml.safe_dump(spec))
    return root


def tiny_grid(tiny_tasks, model_dir, tmp_path, **extra) -> Path:
    """A grid with one entry of every kind (and a PEFT pair of each prompt method) on the tiny tasks."""
    methods = {
        "hard": {"kind": "hard"},
        "soft": {"kind": "soft", "config": {"num_virtual_tokens": 3}, "per_task": {"gen": {"init": "vocab"}}},
        "soft-text": {
            "kind": "soft",
            "config": {"num_virtual_tokens": 3, "init": "text", "init_text": "a review"},
            "tasks": ["cls"],
        },
        "prefix": {"kind": "prefix", "config": {"num_virtual_tokens": 2, "prefix_hidden": 8}},
        "deep": {"kind": "deep", "config": {"num_virtual_tokens": 2}},
        "ptuning": {
            "kind": "ptuning",
            "config": {"num_virtual_tokens": 3, "encoder_hidden": 8},
            "per_task": {"gen": {"init": "vocab"}},
        },
        "full": {"kind": "full"},
        "peft-prompt": {
            "kind": "peft-prompt",
            "config": {"num_virtual_tokens": 3},
            "pair": "soft",
            "per_task": {"gen": {"init": "vocab", "copy_init": True}},
        },
        "peft-prompt-text": {
            "kind": "peft-prompt",
            "pair": "soft-text",
            "tasks": ["cls"],
            "config": {"num_virtual_tokens": 3, "init": "text", "init_text": "a review"},
        },
        "peft-prefix": {
            "kind": "peft-prefix",
            "config": {"num_virtual_tokens": 2, "prefix_hidden": 8},
            "pair": "prefix",
        },
        "peft-ptuning": {
            "kind": "peft-ptuning",
            "config": {"num_virtual_tokens": 3, "encoder_hidden": 8},
            "per_task": {"gen": {"init": "vocab"}},
            "pair": "ptuning",
        },
        "peft-lora": {"kind": "peft-lora", "config": {"r": 2}},
    }
    grid = {
        "model": model_dir,
        "results": str(tmp_path / "results"),
        "seeds": [0, 1],
        "steps": [4],
        "dev_limit": 8,
        "latency_examples": 2,
        "train": {"batch_size": 2, "eval_every": 2, "log_every": 1, "warmup_steps": 1},
        "quick": {"steps": [2], "dev_limit": 4},
        "tasks": {
            "cls": {"spec": str(tiny_tasks / "cls.yaml")},
            "gen": {"spec": str(tiny_tasks / "gen.yaml"), "dev_limit": 3},
        },
        "methods": methods,
        **extra,
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def test_the_smollm2_grid_expands_as_documented():
    grid = load_grid(GRID)
    cells = grid.cells()
    tasks = ["sst2", "trec", "rte", "e2e_nlg"]
    assert [t for t in tasks if any(c.task == t for c in cells)] == tasks
    trained = [c for c in cells if c.kind != "hard"]
    question = {"soft", "prefix", "deep", "ptuning", "peft-prompt", "peft-prefix", "peft-ptuning"}
    question |= {"llama-adapter", "peft-adapter"}
    for t in tasks:  # 5 seeds for the methods that answer "prompt or prefix?", LLaMA-Adapter and their PEFT pairs
        for m in {c.method for c in trained if c.task == t}:
            seeds = {c.seed for c in trained if c.task == t and c.method == m}
            assert seeds == ({0, 1, 2, 3, 4} if m in question and t != "rte" else {0, 1}), (t, m)
    assert {c.method for c in trained if c.task == "rte"} == {"soft", "prefix", "deep", "ptuning", "full", "peft-lora"}
    assert all(c.threads == 1 and c.determinism == "strict" and c.quantize is None for c in cells)
    for t in tasks:  # every method of a task trains the same number of steps
        assert len({c.steps for c in trained if c.task == t}) == 1
    assert sum(c.kind == "hard" for c in cells) == 4  # a template is scored once per task, not per seed
    inits = {(c.task, c.config.get("init")) for c in cells if c.kind == "soft"}
    assert inits == {("sst2", i) for i in ("labels", "vocab", "text", "random")} | {
        ("trec", "labels"),
        ("rte", "labels"),
        ("e2e_nlg", "vocab"),
    }
    kinds = {c.kind for c in cells}
    assert kinds == {"hard", "soft", "prefix", "deep", "ptuning", "llama-adapter", *BASELINES}
    for c in cells:  # every PEFT prompt method is paired with a softprompt entry of the same config and seeds
        if c.pair:
            ours = next(o for o in cells if o.method == c.pair and o.task == c.task and o.seed == c.seed)
            shared = set(ours.config) & set(c.config)
            assert {k: ours.config[k] for k in shared} == {k: c.config[k] for k in shared}
    quick = grid.cells(quick=True)
    assert {c.seed for c in quick} == {0} and {c.steps for c in quick if c.kind != "hard"} == {2}
    assert len(quick) == len([c for c in cells if c.seed == 0])
    assert [c.seed for c in cells] == sorted(c.seed for c in cells)  # seed-major: a partial grid covers all once


def test_seeds_come_from_the_task_then_the_method_then_the_grid(tmp_path):
    from softprompt.bench.grid import Grid

    grid = Grid(
        tasks={"a": {}, "b": {"seeds": [7]}},
        methods={"hard": {"kind": "hard"}, "soft": {"seeds": [3, 4]}, "deep": {}},
        seeds=[0, 1],
        model="m",
    )
    got = {
        (c.task, c.method): [x.seed for x in grid.cells() if (x.task, x.method) == (c.task, c.method)]
        for c in grid.cells()
    }
    assert got == {
        ("a", "hard"): [0],
        ("a", "soft"): [3, 4],
        ("a", "deep"): [0, 1],
        ("b", "hard"): [0],  # a hard prompt is scored once, as seed 0
        ("b", "soft"): [7],
        ("b", "deep"): [7],
    }


def _cell(**kw) -> Cell:
    d = dict(task="t", method="soft", kind="soft", config={}, seed=0, steps=2, lr=None, train={}, dev_limit=4)
    return Cell(**{**d, "model": "m", **kw})


def test_the_identity_holds_threads_determinism_quantization_and_versions(monkeypatch):
    base = _cell(threads=1, deterministic=True)
    assert base.identity == _cell(threads=1, deterministic=True).identity
    changed = [
        _cell(threads=2, deterministic=True),
        _cell(threads=None, deterministic=True),
        _cell(threads=1, deterministic="warn"),
        _cell(threads=1, deterministic=False),
        _cell(threads=1, deterministic=True, quantize="nf4"),
        _cell(threads=1, deterministic=True, quantize="int8"),
        _cell(threads=1, deterministic=True, dtype="bfloat16"),
    ]
    assert len({c.identity for c in changed} | {base.identity}) == len(changed) + 1
    inputs = base.identity_inputs()
    assert inputs["dtype"] == "float32" and inputs["device"] in ("cpu", "cuda:0") and inputs["versions"]["torch"]
    assert _cell(threads=1, deterministic=True, device=inputs["device"]).identity == base.identity  # resolved
    before = base.identity
    monkeypatch.setattr("softprompt.bench.cell._versions", lambda: {**inputs["versions"], "torch": "0.0"})
    assert base.identity != before  # another torch: the record is stale
    with pytest.raises(ConfigError, match="not a mode"):
        _cell(deterministic="sometimes")


def test_quantize_reaches_load_base_and_the_cells(tiny_tasks, model_dir, tmp_path, monkeypatch):
    grid = load_grid(tiny_grid(tiny_tasks, model_dir, tmp_path), quantize="nf4")
    cell = grid.cells(quick=True)[0]
    assert {c.quantize for c in grid.cells()} == {"nf4"} and cell.identity_inputs()["quantize"] == "nf4"
    seen = {}

    def load(*args, **kwargs):
        seen.update(kwargs)
        raise SystemExit("loaded")

    monkeypatch.setattr("softprompt.bench.cell.load_base", load)
    with pytest.raises(SystemExit, match="loaded"):
        run_cell(cell, tmp_path / "r")
    assert seen["quantize"] == "nf4"
    with pytest.raises(ConfigError, match="quantize: 'q3'"):
        load_grid(tiny_grid(tiny_tasks, model_dir, tmp_path), quantize="q3")


def test_an_old_record_is_verified_as_it_ran():
    from softprompt.bench.verify import compare, rerun_cell

    spec = {k: v for k, v in vars(_cell()).items() if k not in ("threads", "deterministic", "quantize")}
    cell, notes = rerun_cell({"spec": spec, "torch_threads": 2})  # written before the pinning
    assert (cell.threads, cell.determinism) == (2, "off") and "predates pinning" in notes[0]
    record = {"dev": {"accuracy": 0.775, "n": 200}, "rows": {"correct": "10"}}
    assert compare(record, record) == []
    assert compare(record, {"dev": {"accuracy": 0.6, "n": 200}, "rows": {"correct": "11"}}) == [
        "accuracy 0.6 vs 0.775 recorded, -0.175",
        "1 of 2 rows differ",
    ]


def test_quick_grid_runs_every_kind_resumes_and_reports(tiny_tasks, model_dir, tmp_path, capsys, monkeypatch):
    grid = tiny_grid(tiny_tasks, model_dir, tmp_path)
    code, out, err = run(capsys, "bench", grid, "--quick", "--in-process")
    assert code == 0, err
    results = tmp_path / "results-quick"
    records = [json.loads(p.read_text()) for p in sorted(results.glob("cells/*.json"))]
    assert len(records) == 22 and "22 cells run, 0 already done, 0 failed" in out
    for r in records:
        assert r["dev"]["n"] > 0 and r["zero_shot"]["n"] == r["dev"]["n"]
        assert r["threads"] == r["torch_threads"] == 1 and r["determinism"] == "strict"
        assert r["identity"] == Cell(**r["spec"]).identity and r["machine"]["cores"] >= 1
        assert r["machine"]["isa"] == torch.backends.cpu.get_cpu_capability()  # e.g. AVX512: which kernels ran
        if r["metric"] == "accuracy":  # one outcome per dev row
            n = r["dev"]["n"]
            assert len(r["rows"]["correct"]) == n and r["rows"]["correct"].count("1") / n == pytest.approx(
                r["dev"]["accuracy"]
            )
        else:
            assert len(r["rows"]["bleu_stats"]) == r["dev"]["n"]
        assert r["peak_memory_bytes"] > 0 and r["latency_seconds_per_example"] > 0 and r["file_bytes"] > 0
        if r["kind"] == "hard":
            assert r["trainable_parameters"] == {"training": 0, "saved": 0} and r["dev"] == r["zero_shot"]
            continue
        assert r["steps"] == 2 and r["trainable_parameters"]["training"] > 0 and r["trainable_parameters"]["saved"] > 0
        assert r["seconds_per_step"] > 0 and r["tokens_per_second"] > 0 and r["train_tokens"] > 0
        history = [json.loads(x) for x in (results / r["history"]).read_text().splitlines()]
        assert history[-1] == {"step": 2, "eval": r["dev"]}  # the cell's metric is the final step's
    by = {(r["task"], r["method"]): r for r in records}
    # the same config from both tools: the same number of trained prompt parameters (the collapsed prompt)
    for ours, peft in (("soft", "peft-prompt"), ("prefix", "peft-prefix"), ("ptuning", "peft-ptuning")):
        assert by[("cls", ours)]["trainable_parameters"]["saved"] == by[("cls", peft)]["trainable_parameters"]["saved"]
    base_params = by[("cls", "full")]["trainable_parameters"]["training"]
    assert by[("cls", "peft-lora")]["trainable_parameters"]["training"] < base_params
    assert by[("cls", "soft")]["lr"] == by[("cls", "peft-prompt")]["lr"] == sp.METHODS["soft"].default_lr

    report = (results / "report.md").read_text()
    assert "Prompt or prefix?" in report and "| cls | soft | peft-prompt |" in report
    assert "All cells of the grid have records." in report
    for png in ("metric_vs_params.png", "metric_vs_steps.png", "cost.png", "softprompt_vs_peft.png"):
        assert (results / png).stat().st_size > 5000

    # a second run redoes nothing
    monkeypatch.setattr("softprompt.bench.grid.run_cell", lambda *a, **k: pytest.fail("a finished cell ran again"))
    counts = run_grid(load_grid(grid).cells(quick=True), results, isolate=False)
    assert counts == {"done": 0, "skipped": 22, "failed": 0}


def test_a_changed_cell_runs_again_and_a_missing_one_is_reported(tiny_tasks, model_dir, tmp_path):
    grid = load_grid(tiny_grid(tiny_tasks, model_dir, tmp_path))
    cells = [c for c in grid.cells(quick=True) if c.task == "cls" and c.method in ("hard", "soft")]
    results = tmp_path / "r"
    assert run_grid(cells, results, isolate=False, echo=lambda s: None)["done"] == 2
    changed = [replace(cells[1], config={"num_virtual_tokens": 2})] + cells[:1]
    assert run_grid(changed, results, isolate=False, echo=lambda s: None) == {"done": 1, "skipped": 1, "failed": 0}
    assert json.loads(record_path(results, cells[1]).read_text())["trainable_parameters"]["saved"] == 2 * 64

    record_path(results, cells[0]).unlink()
    report = write_report(results).read_text()
    assert "## Missing cells (1 of 2)" in report and f"- {cells[0].id}" in report


def test_cells_in_their_own_processes_run_at_once_pinned_and_verify(tiny_tasks, model_dir, tmp_path, capsys):
    grid = load_grid(tiny_grid(tiny_tasks, model_dir, tmp_path))
    cells = [c for c in grid.cells(quick=True) if c.task == "cls" and c.method in ("hard", "soft")]
    assert run_grid(cells, tmp_path / "r", isolate=True, echo=lambda s: None, jobs=2)["done"] == 2
    for cell in cells:
        record = json.loads(record_path(tmp_path / "r", cell).read_text())
        assert record["memory_kind"] == "ru_maxrss of the cell's own process" and record["peak_memory_bytes"] > 0
        assert record["torch_threads"] == 1 and record["determinism"] == "strict"
    code, out, err = run(capsys, "bench", "--verify", cells[1].id, "--results", tmp_path / "r")  # its own process
    assert code == 0 and f"{cells[1].id}: reproduced" in out, out + err


def test_a_failing_cell_is_reported_and_the_grid_goes_on(tiny_tasks, model_dir, tmp_path):
    grid = load_grid(tiny_grid(tiny_tasks, model_dir, tmp_path))
    cells = [c for c in grid.cells(quick=True) if c.task == "gen" and c.method in ("hard", "soft")]
    bad = replace(cells[1], config={"num_virtual_tokens": 3, "init": "labels"})  # a generation task has no labels
    lines = []
    assert run_grid([bad, cells[0]], tmp_path / "r", isolate=False, echo=lines.append) == {
        "done": 1,
        "skipped": 0,
        "failed": 1,
    }
    assert "FAILED" in lines[0] and "init 'labels' needs class labels" in lines[0]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "nope.yaml"], "Grid file not found"),
        (["bench", "report"], "needs the results directory"),
    ],
)
def test_bench_cli_errors(argv, message, capsys):
    code, _, err = run(capsys, *argv)
    assert code == 2 and message in err


@pytest.mark.parametrize(
    "change, message",
    [
        ({"methods": {"x": {"kind": "lora"}}}, "unknown kind 'lora'"),
        ({"methods": {"x": {"kind": "soft", "config": {"init": "nope"}}}}, "Unknown init 'nope'"),
        ({"methods": {"x": {"kind": "soft", "tasks": ["mnli"]}}}, "names task 'mnli'"),
        ({"methods": {"x": {"kind": "peft-prompt", "pair": "y"}}}, "pairs with unknown method 'y'"),
        ({"tasks": {"sst2": {"epochs": 3}}}, "unknown key(s) ['epochs']"),
    ],
)
def test_grid_mistakes_are_caught_before_running(change, message, tmp_path, capsys):
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({"tasks": {"sst2": {}}, "methods": {"soft": {}}, **change}))
    code, _, err = run(capsys, "bench", path, "--list")
    assert code == 2 and message in err


# --- PEFT: the same prompt, the same numbers -----------------------------------------------------------------------

PEFT_PROMPTS = {
    "peft-prompt": (PeftPrompt, {"num_virtual_tokens": 3, "init": "random"}),
    "peft-prefix": (PeftPrefix, {"num_virtual_tokens": 3, "prefix_hidden": 8}),
    "peft-ptuning": (PeftPTuning, {"num_virtual_tokens": 3, "encoder_hidden": 8, "init": "random"}),
    "peft-adapter": (PeftAdapter, {"num_virtual_tokens": 3, "adapter_layers": 2}),
}


def build_peft(kind, base, sst2):
    """The PEFT baseline `kind` on `base`, or None after checking that ours refuses it (adaption prompts on GPT-2's
    fused attention)."""
    cls, config = PEFT_PROMPTS[kind]
    if kind == "peft-adapter" and base.config.model_type == "gpt2":
        with pytest.raises(ConfigError, match="cannot take adaption prompts"):
            cls(cls.config_class(**config), init_context(base, sst2, 0))
        return None
    return cls(cls.config_class(**config), init_context(base, sst2, 0))


@pytest.mark.parametrize("kind", sorted(PEFT_PROMPTS))
def test_collapsed_peft_prompt_reproduces_peft_forward(base, sst2, kind):
    """Our evaluator on PEFT's collapsed prompt gives PEFT's own logits, also inside a left-padded batch."""
    torch.manual_seed(0)
    method = build_peft(kind, base, sst2)
    if method is None:
        return
    with torch.no_grad():  # move the prompt away from its initialization
        for p in method.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    ids = base.tokenizer("Review: the film was great fun\nSentiment:")["input_ids"]
    x = torch.tensor([ids])
    with torch.no_grad():
        ref = method.peft(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -len(ids) :]  # (T, V)
    # logits at every token of each row: positions 0..n-2 are the target logits of a row whose first token is its
    # source and the rest its target, position n-1 its next-token logits
    inj, rows = method.collapse(), [ids[:4], ids]
    with torch.no_grad():
        head, _, mask = base.family.target_logits([Example(r[:1], 1, r[1:], inj) for r in rows])
        last = base.family.next_token_logits([Example(r, len(r), [], inj) for r in rows])
    ours = torch.cat([head, last[:, None]], dim=1)  # (2, T, V), rows ending at the last column
    assert mask[1].all() and not mask[0].all()  # the short row is padded
    torch.testing.assert_close(ours[1], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", sorted(PEFT_PROMPTS))
def test_peft_loss_is_our_loss_on_the_same_prompt(base, sst2, kind):
    """PEFT trains on the same objective: its loss (right padding, full logits) and its gradients equal ours."""
    method = build_peft(kind, base, sst2)
    if method is None:
        return
    with torch.no_grad():  # away from the initialization (zero gates would hide an adapter's term)
        for p in method.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    trainer = BenchTrainer(
        base,
        sst2,
        trainable=method,
        config=sp.TrainConfig(batch_size=4, progress=False),
    )
    rows = sst2.split("train")
    batch = [trainer.enc.training_example(rows.prompts[i], rows.targets[i]) for i in range(4)]
    assert len({e.slot + len(e.target) for e in batch}) > 1  # rows of different lengths (padded)
    params = [p for p in method.parameters() if p.requires_grad]
    theirs, ours = trainer.loss(batch), Trainer.loss(trainer, batch)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(theirs, params), torch.autograd.grad(ours, params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_right_padding_moves_each_row_to_the_start():
    batch = [Example([5], 1, [6, 7]), Example([], 0, [8])]  # prompt tokens, then target tokens
    ids, mask, labels = _right_padded(batch, 0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert labels.tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_full_finetuning_trains_every_weight(base, sst2):
    before = {k: v.clone() for k, v in base.model.named_parameters()}
    method = FullFinetune(FullFinetune.config_class(), init_context(base, sst2, 0))
    assert method.num_trainable() == base.num_parameters()
    trainer = BenchTrainer(
        base,
        sst2,
        trainable=method,
        config=sp.TrainConfig(steps=2, batch_size=2, eval_every=0, eval_limit=4, final_eval=False, progress=False),
    )
    trainer.run()
    unchanged = [k for k, v in base.model.named_parameters() if torch.equal(v, before[k])]
    assert unchanged == [] and not base.model.training and method.collapse().num_positions == 0


def test_hard_cell_scores_a_given_template(tiny_tasks, model_dir, tmp_path):
    cell = Cell(
        task="cls",
        spec=str(tiny_tasks / "cls.yaml"),
        method="hard",
        kind="hard",
        config={"template": "Sentence: {sentence}\nMood:"},
        seed=0,
        steps=0,
        lr=None,
        train={},
        dev_limit=4,
        model=model_dir,
        latency_examples=1,
    )
    record = run_cell(cell, tmp_path)
    assert record["config"]["template"].startswith("Sentence:") and record["file_bytes"] == len(
        "Sentence: {sentence}\nMood:"
    )


def test_the_hard_cell_takes_the_best_searched_template_and_never_looks_at_dev(tokenizer, sst2, e2e, monkeypatch):
    from helpers import build_tiny

    from softprompt.bench.baselines import HardConfig, hard_prompt_spec
    from softprompt.search import Candidates, rank_templates

    base = build_tiny("llama", tokenizer)
    monkeypatch.setattr(type(sst2), "split", _train_only(type(sst2).split))
    spec = hard_prompt_spec(base, sst2, HardConfig(template="search", search_size=24))
    candidates = Candidates.load(None, sst2.spec)
    ranking, _ = rank_templates(base, sst2, candidates, 24, progress=False)
    assert spec.template in candidates.templates and spec == ranking[0].spec
    assert ranking[0].search["accuracy"] == max(s.search["accuracy"] for s in ranking)
    assert all(w in ws for w, ws in zip(spec.verbalizers, ([" " + w for w in ws] for ws in candidates.words)))
    assert hard_prompt_spec(base, e2e, HardConfig(template="search")) is e2e.spec  # nothing to search for generation
    assert hard_prompt_spec(base, sst2, HardConfig(template="default")) is sst2.spec


def _train_only(split):
    def guarded(self, name):
        assert name == "train", f"the template search read split {name!r}"
        return split(self, name)

    return guarded


def test_a_partial_run_keeps_the_whole_grid_for_the_report(tiny_tasks, model_dir, tmp_path, capsys):
    grid = tiny_grid(tiny_tasks, model_dir, tmp_path)
    code, out, err = run(capsys, "bench", grid, "--quick", "--only", "cls--hard")
    assert code == 0, err
    assert "1 cells run, 0 already done, 0 failed" in out
    results = tmp_path / "results-quick"
    assert len(json.loads((results / "grid.json").read_text())) == 22  # every cell, not just the one that ran
    report = (results / "report.md").read_text()
    assert "Missing cells (21 of 22)" in report and "cls--soft--s0--2steps" in report


def _records(task, method, values, pair=None, rows=None, metric="accuracy"):
    """Records of one (task, method), one per seed; rows: per seed a 0/1 string (None: an old record)."""
    return [
        {
            "task": task,
            "method": method,
            "kind": method,
            "tool": "peft" if pair else "softprompt",
            "pair": pair,
            "metric": metric,
            "seed": s,
            "steps": 10,
            "dev": {metric: v},
            "seconds_per_step": 1.0,
            "cpu_seconds_per_step": 1.0,
            "peak_memory_bytes": 1,
            **({"rows": {"correct": rows[s], "gold": " ".join("01" * (len(rows[s]) // 2))}} if rows else {}),
        }
        for s, v in enumerate(values)
    ]


def _correct(accuracy: float, n: int = 200, shift: int = 0) -> str:
    k = round(accuracy * n)
    return ("1" * k + "0" * (n - k))[shift:] + ("1" * k + "0" * (n - k))[:shift]


def test_bootstrap_intervals_are_sane_and_seeded():
    import numpy as np

    from softprompt.bench.stats import cell_interval, paired_difference

    ones = [np.ones(50, dtype=np.uint8)] * 3
    i = cell_interval([1.0] * 3, ones)
    assert (i.lo, i.hi, i.over) == (1.0, 1.0, "seeds and rows")
    rng = np.random.default_rng(1)
    rows = [(rng.random(200) < p).astype(np.uint8) for p in (0.7, 0.75, 0.8, 0.72, 0.78)]
    values = [float(r.mean()) for r in rows]
    a, b = cell_interval(values, rows), cell_interval(values, rows)
    assert a == b and a.lo < a.mean < a.hi and 0.02 < a.hi - a.lo < 0.2  # seeded; rows and seeds both count
    assert cell_interval(values, rows, seed=1) != a
    seeds_only = cell_interval(values, [None] * 5)
    assert seeds_only.over == "seeds" and seeds_only.hi - seeds_only.lo < a.hi - a.lo  # rows' error left out
    assert cell_interval([0.5], [None]).lo is None  # one seed without rows: nothing to resample
    assert cell_interval([values[0]], rows[:1]).over == "rows"
    # paired: the same rows scored on both sides; a constant gain of 10 rows out of 200 is exactly +0.05
    better = [r.copy() for r in rows]
    for r in better:
        r[np.flatnonzero(r == 0)[:10]] = 1
    ours = {s: (float(r.mean()), r) for s, r in enumerate(better)}
    theirs = {s: (float(r.mean()), r) for s, r in enumerate(rows)}
    d = paired_difference(ours, theirs)
    assert d.mean == pytest.approx(0.05) and d.lo > 0 and d.excludes_zero and d.seeds == 5
    only = paired_difference({0: ours[0], 9: ours[1]}, theirs)  # only the seeds both ran
    assert only.seeds == 1 and only.over == "rows"
    assert paired_difference({9: ours[0]}, theirs) is None


def test_bleu_is_recomputed_from_per_row_statistics():
    import sacrebleu

    from softprompt.bench.outcomes import bleu_of, bleu_statistics
    from softprompt.bench.stats import cell_interval, rows_of

    refs = [["the eagle is a pub", "a pub called the eagle"], ["it is cheap"], ["a cafe near the river", "x y"]]
    hyps = ["the eagle is a pub near", "cheap it is", ""]
    stats = bleu_statistics(hyps, refs)
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(2)]
    rows = rows_of({"rows": {"bleu_stats": stats}})
    assert bleu_of(rows.sum(axis=0)) == sacrebleu.corpus_bleu(hyps, streams).score
    i = cell_interval([bleu_of(rows.sum(axis=0))] * 2, [rows, rows])
    assert 0 <= i.lo <= i.mean <= i.hi <= 100


def test_dev_outcomes_give_evaluates_metrics(base, sst2, e2e):
    from softprompt.bench.outcomes import dev_outcomes
    from softprompt.evaluate import evaluate

    for task in (sst2, e2e):
        metrics, rows = dev_outcomes(base, task, None, limit=6, seed=0)
        assert metrics == evaluate(base, task, None, limit=6, seed=0)
        assert len(next(iter(rows.values()))) == metrics["n"]


def test_the_verdict_names_a_winner_only_where_intervals_separate():
    from softprompt.bench.report import Group, check, learned, verdict

    far = {
        ("t", "soft"): Group(_records("t", "soft", [0.9] * 5, rows=[_correct(0.9, shift=s) for s in range(5)])),
        ("t", "prefix"): Group(_records("t", "prefix", [0.6] * 5, rows=[_correct(0.6, shift=s) for s in range(5)])),
    }
    lines = verdict(far, ["t"], ("soft",), ("prefix",))
    assert lines[0] == "- t: learned: above chance (50.0%): soft, prefix."  # both clear the majority class
    assert "**soft** ahead (the intervals separate)" in lines[1]
    near = {
        ("t", "soft"): Group(_records("t", "soft", [0.71, 0.7], rows=[_correct(0.71), _correct(0.7)])),
        ("t", "prefix"): Group(_records("t", "prefix", [0.7, 0.69], rows=[_correct(0.7), _correct(0.69)])),
    }
    line = verdict(near, ["t"], ("soft",), ("prefix",))[-1]
    assert "no difference shown (the intervals overlap)" in line and "[" in line
    old = {k: Group(_records("t", k[1], [0.9, 0.91] if k[1] == "soft" else [0.6, 0.61])) for k in far}
    line = verdict(old, ["t"], ("soft",), ("prefix",))[-1]
    assert "no verdict from intervals over seeds only (they separate, soft higher)" in line and "]†" in line
    unknown = "- t: chance level unknown: no record has per-row outcomes."
    assert verdict(old, ["t"], ("soft",), ("prefix",))[0] == unknown
    # nothing above the majority class (half the gold labels are 0): the task is dropped from the verdict
    groups = {("t", "soft"): Group(_records("t", "soft", [0.5, 0.5], rows=[_correct(0.5), _correct(0.5)]))}
    assert learned(groups, "t")[0] is False
    assert verdict(groups, ["t"])[0].startswith("- t: dropped: no method above chance (majority class 50.0%")
    # softprompt vs PEFT: paired per seed
    peft = Group(_records("t", "peft-prompt", [0.6] * 5, "soft", rows=[_correct(0.6, shift=s) for s in range(5)]))
    c = check(far[("t", "soft")], peft)
    assert c["difference"].mean == pytest.approx(30.0) and c["difference"].lo > 0 and c["metric_ok"] is True
    assert check(peft, far[("t", "soft")])["metric_ok"] is False


def test_old_records_render_and_are_flagged(tmp_path):
    """The committed records, made to look as records from before the pinning and the per-row outcomes did (whatever
    the grid's progress): the report flags them, gives intervals over seeds only and no verdict from those."""
    import shutil

    committed = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "smollm2"
    if not (committed / "cells").is_dir():
        pytest.skip("no committed records")
    results = tmp_path / "results"
    shutil.copytree(committed, results, ignore=shutil.ignore_patterns("verify", "superseded"))
    for path in (results / "cells").glob("*.json"):
        record = json.loads(path.read_text())
        for key in ("rows", "determinism", "threads", "machine"):
            record.pop(key, None)
        record["torch_threads"] = 2 if record["seed"] else 1
        path.write_text(json.dumps(record))
    report = write_report(results, tmp_path / "report").read_text()
    assert "predate the pinning" in report and "**needs a re-run** (predates pinning)" in report
    assert "]†" in report and "no verdict from intervals over seeds only" in report
    assert "| 2 (not pinned) |" in report  # which cells ran with which thread count


def test_a_replaced_record_is_kept_and_compared_with_its_rerun(tiny_tasks, model_dir, tmp_path):
    grid = load_grid(tiny_grid(tiny_tasks, model_dir, tmp_path))
    cell = next(c for c in grid.cells(quick=True) if c.task == "cls" and c.method == "soft")
    results = tmp_path / "results"
    run_grid([cell], results, isolate=False, echo=lambda s: None)
    path = record_path(results, cell)
    old = json.loads(path.read_text())
    old["identity"] = "older"  # a record from before a change of what identifies the cell
    path.write_text(json.dumps(old))
    assert run_grid([cell], results, isolate=False, echo=lambda s: None)["done"] == 1
    assert json.loads((results / "superseded" / path.name).read_text())["identity"] == "older"
    assert json.loads(path.read_text())["identity"] == cell.identity
    report = write_report(results).read_text()
    assert "1 of the 1 that ran at the same thread count on the same kind of machine have every dev metric" in report
    assert f"| {cell.id} |" in report.split("## Re-runs of replaced records")[1]


def test_machines_are_of_one_kind_when_the_fields_both_recorded_agree():
    old = {"cpu": "Intel(R) Xeon(R) Processor", "cores": 2, "system": "Linux x86_64"}  # before `isa` was recorded
    assert same_machine(old, {**old, "isa": "AVX512"})
    assert not same_machine({**old, "isa": "AVX2"}, {**old, "isa": "AVX512"})  # one CPU name, other kernels
    assert not same_machine({**old, "cpu": "AMD EPYC"}, old) and not same_machine(None, old)


def test_verify_reproduces_a_cell_and_catches_an_edited_record(tiny_tasks, model_dir, tmp_path, capsys, monkeypatch):
    grid = load_grid(tiny_grid(tiny_tasks, model_dir, tmp_path))
    cell = next(c for c in grid.cells(quick=True) if c.task == "cls" and c.method == "soft")
    results = tmp_path / "results"
    assert run_grid([cell], results, isolate=False, echo=lambda s: None)["done"] == 1
    path = record_path(results, cell)
    before = path.read_text()
    code, out, err = run(capsys, "bench", "--verify", cell.id, "--results", results, "--in-process")
    assert code == 0, err
    assert out.strip().startswith(f"{cell.id}: reproduced (accuracy ") and len(out.strip().splitlines()) == 1
    assert path.read_text() == before  # the record is not replaced
    record = json.loads(before)
    record["dev"]["accuracy"] += 0.25
    record["rows"]["correct"] = ("0" if record["rows"]["correct"][0] == "1" else "1") + record["rows"]["correct"][1:]
    path.write_text(json.dumps(record))
    with pytest.raises(SystemExit) as e:
        run(capsys, "bench", "--verify", cell.id, "--verify", cell.id, "--results", results, "--in-process")
    out = capsys.readouterr().out.strip().splitlines()
    assert e.value.code == 1 and len(out) == 2
    assert "NOT reproduced: accuracy" in out[0] and "1 of 4 rows differ" in out[0] and "same settings" in out[0]
    assert json.loads((results / "verify" / f"{cell.id}.json").read_text())["reproduced"] is False
    report = write_report(results).read_text()
    assert "**not reproduced: cls--soft--s0--2steps**" in report and "**NOT reproduced**" in report
    code, _, err = run(capsys, "bench", "--verify", "nope", "--results", results)
    assert code == 2 and "No record of cell 'nope'" in err
    with pytest.raises(SystemExit):  # the only pinned record, the edited one, is picked
        run(capsys, "bench", "--verify", "random:1", "--results", results, "--in-process")
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"verifying: {cell.id}" and "NOT reproduced" in out[1]
    code, _, err = run(capsys, "bench", "--verify", "random:2", "--results", results)
    assert code == 2 and "only 1 recorded cells ran pinned on this kind of machine" in err
    # on another kind of machine a re-run checks nothing: it is kept apart and reported as such
    monkeypatch.setattr("softprompt.bench.verify._machine", lambda: {"cpu": "Another CPU", "cores": 2, "system": "-"})
    with pytest.raises(SystemExit):
        run(capsys, "bench", "--verify", cell.id, "--results", results, "--in-process")
    assert "another kind of machine" in capsys.readouterr().out
    assert json.loads((results / "verify" / "other-machines" / f"{cell.id}.json").read_text())["reproduced"] is False
    assert f"{cell.id} on Another CPU: differs" in write_report(results).read_text()
