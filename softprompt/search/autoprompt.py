"""AutoPrompt: trigger tokens searched by gradient (Shin, Razeghi, Logan, Wallace & Singh 2020, "AutoPrompt: Eliciting
Knowledge from Language Models with Automatically Generated Prompts", arXiv:2010.15980). K
trigger tokens fill a `{trigger}` slot in the template (default: its end, right before the
label word, where the paper puts them). Each step takes the gradient of the class
cross-entropy w.r.t. the trigger tokens' input embeddings (K, D) on a batch, proposes the
top-k vocabulary tokens w by -grad . e_w for one trigger position (a first-order estimate of
the loss change of the swap; HotFlip, Ebrahimi et al. 2018), scores every candidate on a few
rows, re-scores the best few against the current triggers on fresh rows, and keeps the best
(a second draw, so that a candidate cannot win on lucky rows alone).

Why a slot, and how the gradient is read: the slot lets triggers sit between the input and
the answer, where they see the input. The text before the slot does not depend on the
triggers, so each search row keeps it as a KV prefix (`Family.kv_of_embeddings`, computed
once, exact for causal attention, so AutoPrompt runs on the families that compile); the
triggers then enter as an `Injection(embeds=...)` leaf that requires grad, placed right after
that prefix at the positions the text prompt gives them, and `.grad` is read. Candidates are
scored the same way with their token ids, so a step costs K + |text after the slot| tokens per
row instead of the whole prompt. Final numbers score the saved text itself.

AutoPrompt can also hold rows of the search split out of the flips (`select_rows`) and return
the visited trigger that scores best on them, not the last one (early stopping on train data),
and run several searches from the start trigger (`restarts`) that compete on those same rows:
on SST-2 the searched-for trigger depends on the seed as much as on the data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..data import Encoder, Split, Task, TaskSpec, frequent_token_ids
from ..errors import ConfigError, check_at_least, check_choice, check_types
from ..evaluate import gold_classes
from ..example import Example
from ..injection import EMPTY, Injection
from .common import search_split, with_template

SLOT = "{trigger}"
_MARK = "\ue000"  # a private-use character standing in for the triggers while splitting a rendered prompt
VOCABULARIES = ("frequent", "words", "all")


# --- AutoPrompt ---------------------------------------------------------------------------------------------------


@dataclass
class AutoPromptConfig:
    """Options of the trigger-token search (see the module docstring)."""

    num_triggers: int = field(default=4, metadata={"help": "K, the number of trigger tokens"})
    iterations: int = field(default=30, metadata={"help": "search steps (one trigger position flipped per step)"})
    num_candidates: int = field(default=24, metadata={"help": "tokens proposed per step from the gradient (top-k)"})
    grad_rows: int = field(default=32, metadata={"help": "search rows whose gradient proposes the candidates"})
    eval_rows: int = field(default=16, metadata={"help": "search rows on which every candidate is scored per step"})
    verify_candidates: int = field(
        default=3,
        metadata={
            "help": "best candidates re-scored against the current trigger on fresh rows (guards against lucky rows)"
        },
    )
    verify_rows: int = field(default=64, metadata={"help": "fresh search rows for that comparison"})
    search_size: int = field(default=512, metadata={"help": "rows of the train split the search may look at"})
    select_rows: int = field(
        default=0,
        metadata={
            "help": "of those, rows held out of the flips: at the end, every "
            "trigger the search went through is scored on them and the "
            "best is kept (early stopping; 0: keep the last trigger)"
        },
    )
    search_min_words: int = field(
        default=0, metadata={"help": "only search on train rows with at least this many words of input"}
    )
    init_token: str = field(default=" the", metadata={"help": "text of the token every trigger starts as"})
    vocab: str = field(
        default="frequent",
        metadata={
            "help": "trigger vocabulary: frequent (words among the 5,000 "
            "most frequent tokens of the train inputs), words (a "
            "space and letters) or all (any printable token)"
        },
    )
    restarts: int = field(
        default=1,
        metadata={
            "help": "independent searches from the start trigger, each with its "
            "own draws (restart r is seeded seed + 1000 r); with "
            "--select-rows, the trigger best on the held-out rows across "
            "all of them is kept"
        },
    )
    seed: int = field(
        default=0, metadata={"help": "seed of the search split and of the search (batches and positions)"}
    )

    def __post_init__(self):
        # first: a --config file passes its values unconverted (`iterations: 1.5`, `vocab: 3`), which the range
        # checks below would compare, or raise on, as they are
        check_types(self)
        check_at_least(
            self,
            1,
            "num_triggers",
            "iterations",
            "restarts",
            "num_candidates",
            "grad_rows",
            "eval_rows",
            "verify_candidates",
            "verify_rows",
            "search_size",
        )
        check_at_least(self, 0, "search_min_words")
        if not 0 <= self.select_rows < self.search_size:
            raise ConfigError(
                f"select_rows must be >= 0 and leave search rows, got {self.select_rows} of "
                f"search_size {self.search_size}.",
                "lower --select-rows or raise --search-size.",
            )
        if self.restarts > 1 and not self.select_rows:
            raise ConfigError(
                f"{self.restarts} restarts need held-out rows to choose between their triggers.",
                "pass --select-rows (e.g. 256) or --restarts 1.",
            )
        check_choice(self, "vocab", VOCABULARIES, "trigger vocabulary")


@dataclass
class AutoPromptResult:
    spec: TaskSpec  # the template with the triggers written in
    triggers: list[int]  # token ids
    history: list[dict]  # per step: restart, position, kept token, loss of the current trigger on that step's rows
    selection: list[dict] = field(
        default_factory=list
    )  # per trigger visited, in order: restart, held-out accuracy, loss
    kept: int | None = None  # index into `selection` of the trigger returned (None: no held-out rows, the last one)


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def slotted(template: str) -> str:
    """The template with a trigger slot: as given if it has one, else with the slot at its end."""
    return template if SLOT in template else template + SLOT


def fill(spec: TaskSpec, template: str, text: str) -> TaskSpec:
    """The spec whose template is `template` (with a slot) with `text` written into the slot."""
    return with_template(spec, template.replace(SLOT, _escape(text)))


def trigger_vocabulary(
    tokenizer, vocab: str = "words", texts: list[str] | None = None, top: int = 5000
) -> torch.Tensor:
    """(V,) bool: tokens a trigger may take.

    Every such token decodes to printable text that encodes back to that one token (so the saved
    text prompt holds the tokens that were searched). words: also a space and letters only;
    frequent: also among the `top` most frequent tokens of `texts` (the task's train inputs),
    which keeps out rare tokens whose large embeddings dominate first-order proposals.
    """
    V = len(tokenizer)
    texts_of = tokenizer.batch_decode([[i] for i in range(V)])
    special = set(tokenizer.all_special_ids)
    word = re.compile(r"^ [A-Za-z]{2,}$")
    ok = [
        i not in special and t.isprintable() and "\ufffd" not in t and (vocab == "all" or bool(word.match(t)))
        for i, t in enumerate(texts_of)
    ]
    back = tokenizer([t if k else "" for t, k in zip(texts_of, ok)], add_special_tokens=False)["input_ids"]
    allowed = torch.tensor([k and b == [i] for i, (k, b) in enumerate(zip(ok, back))])
    if vocab == "frequent":
        common = torch.zeros(V, dtype=torch.bool)
        common[frequent_token_ids(tokenizer, texts or [], top)] = True
        allowed &= common
    return allowed


@dataclass
class _Row:
    """A search row split at the slot: the text before it as a KV prefix (computed once), the tokens after it."""

    prefix: Injection  # kv (L, 2, H_kv, P, hd) of the tokens before the slot, kv_positions = P
    post: list[int]  # token ids after the slot
    gold: int  # class index in the spec's order


def _split_rows(
    base, spec: TaskSpec, template: str, data: Split, gold: list[int], enc: Encoder | None = None, reserve: int = 0
) -> list[_Row]:
    """The rows split at the slot; with `enc`, fitted by its truncation policy to what its context leaves after
    `reserve` positions (the triggers and the label word), as `Encoder.example` fits a prompt."""
    family = base.family
    out = []
    for r, y in zip(data.rows, gold):
        before, after = fill(spec, template, _MARK).render(r).split(_MARK)
        pre, _ = family.source_ids(before) if before else ([], 0)
        post = base.tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
        if enc is not None:  # fit the positions of pre + post, then split what is kept back at the slot
            n = len(pre) + len(post)
            keep, _ = enc.fit(list(range(n)), n, family.source_budget(EMPTY, reserve, enc.max_length))
            pre, post = [pre[i] for i in keep if i < len(pre)], [post[i - len(pre)] for i in keep if i >= len(pre)]
        prefix = (
            Injection(
                kv=family.kv_of_embeddings(base.embed(torch.tensor(pre, device=base.device))), kv_positions=len(pre)
            )
            if pre
            else EMPTY
        )
        out.append(_Row(prefix, post, y))
    return out


def _scores(
    base, rows: list[_Row], verb: list[list[int]], triggers: list[list[int]], injections: list[Injection]
) -> torch.Tensor:
    """(B, C) class log-likelihoods of rows whose triggers (token ids, or part of each row's prompt) precede the text
    after the slot."""
    examples = [Example(t + r.post, len(t) + len(r.post), [], inj) for t, r, inj in zip(triggers, rows, injections)]
    return torch.stack(base.family.class_scores([(e, verb) for e in examples]))


def trigger_gradient(base, rows: list[_Row], verb: list[list[int]], triggers: list[int]) -> torch.Tensor:
    """d(mean class cross-entropy)/d(trigger input embeddings): (K, D).

    The triggers enter as virtual-token embeddings after each row's KV prefix (the text before
    the slot) and before the text after it, at the positions the text prompt gives them.
    """
    T = base.embed(torch.tensor(triggers, device=base.device)).detach().requires_grad_()  # (K, D)
    inj = [Injection(embeds=T, kv=r.prefix.kv, kv_positions=r.prefix.kv_positions) for r in rows]
    scores = _scores(base, rows, verb, [[] for _ in rows], inj)  # (B, C)
    torch.nn.functional.cross_entropy(scores, torch.tensor([r.gold for r in rows], device=scores.device)).backward()
    return T.grad


@torch.inference_mode()
def trigger_scores(
    base, rows: list[_Row], verb: list[list[int]], options: list[list[int]], batch_size: int = 64
) -> torch.Tensor:
    """Class log-likelihoods of every trigger sequence in `options` on every row: (len(options), len(rows), C)."""
    pairs = [(o, r) for o in options for r in rows]
    scores = torch.empty(len(pairs), len(verb))
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        scores[i : i + len(chunk)] = (
            _scores(base, [r for _, r in chunk], verb, [o for o, _ in chunk], [r.prefix for _, r in chunk])
            .float()
            .cpu()
        )
    return scores.view(len(options), len(rows), len(verb))


def _mean_losses(scores: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
    """Mean class cross-entropy per option of (O, N, C) scores on `rows`: (O,)."""
    gold = torch.tensor([r.gold for r in rows]).repeat(len(scores))
    return (
        torch.nn.functional.cross_entropy(scores.flatten(0, 1), gold, reduction="none").view(scores.shape[:2]).mean(1)
    )


def trigger_losses(base, rows: list[_Row], verb: list[list[int]], options: list[list[int]]) -> torch.Tensor:
    """Mean class cross-entropy of every trigger sequence in `options` on `rows`: (len(options),)."""
    return _mean_losses(trigger_scores(base, rows, verb, options), rows)


def _contest(
    base,
    draw,
    verb: list[list[int]],
    allowed: torch.Tensor,
    triggers: list[int],
    config: AutoPromptConfig,
    g: torch.Generator,
) -> tuple[int, list[list[int]], torch.Tensor]:
    """One AutoPrompt step: the current `triggers` (option 0) against the best few one-token flips at a random
    position. Returns (that position, the options, their mean losses on fresh search rows (O,))."""
    grad = trigger_gradient(base, draw(config.grad_rows), verb, triggers)  # (K, D)
    pos = int(torch.randint(config.num_triggers, (1,), generator=g))
    # first-order loss change of putting token w at `pos`: (e_w - e_now) . grad; most negative first
    gain = -(base.full_embedding_matrix().to(grad.device) @ grad[pos]).float().cpu()  # (V,)
    gain[~allowed] = -float("inf")
    gain[triggers[pos]] = -float("inf")
    candidates = [triggers[:pos] + [w] + triggers[pos + 1 :] for w in gain.topk(config.num_candidates).indices.tolist()]
    # successive halving: all candidates on a few rows, the best few against the current trigger on fresh rows
    screen = trigger_losses(base, draw(config.eval_rows), verb, candidates)
    options = [triggers] + [candidates[i] for i in screen.argsort()[: config.verify_candidates].tolist()]
    return pos, options, trigger_losses(base, draw(config.verify_rows), verb, options)


def _checked_template(base, spec: TaskSpec, template: str | None) -> str:
    """The template with its one trigger slot, after refusing what AutoPrompt cannot search."""
    if spec.chat:
        raise ConfigError(
            "AutoPrompt searches plain-text templates; this task wraps prompts in a chat template.",
            "use a task spec with `chat: false`.",
        )
    if not base.family.compiles:
        raise ConfigError(
            f"AutoPrompt keeps the text before its triggers as keys/values, which is exact only for causal "
            f"attention; this base model ('{base.name}') is not a transformer causal LM.",
            "search templates instead (`softprompt search templates`), or use a causal LM.",
        )
    template = slotted(template or spec.template)
    if template.count(SLOT) != 1:
        raise ConfigError(f"The template has {template.count(SLOT)} {SLOT} slots.", f"put exactly one {SLOT} in it.")
    fill(spec, template, "")  # a malformed template fails here, before any compute
    return template


def _start_trigger(tok, config: AutoPromptConfig, allowed: torch.Tensor) -> list[int]:
    init = tok(config.init_token, add_special_tokens=False)["input_ids"]
    if len(init) != 1 or not allowed[init[0]]:
        raise ConfigError(
            f"--init-token {config.init_token!r} is not one token of the trigger vocabulary.",
            "pass a single common word with its leading space, e.g. ' the'.",
        )
    return init * config.num_triggers


def _search(base, rows: list[_Row], verb, allowed, start: list[int], config: AutoPromptConfig, progress: bool):
    """Every restart's flips from `start`. Returns (history, visited: (restart, trigger ids) of the start and of every
    kept flip)."""
    tok = base.tokenizer
    bar = tqdm(total=config.iterations * config.restarts, desc="autoprompt", disable=not progress)
    history, visited = [], []
    g = torch.Generator()

    def draw(n: int) -> list[_Row]:
        return [rows[i] for i in torch.randperm(len(rows), generator=g)[:n].tolist()]

    for restart in range(config.restarts):
        g.manual_seed(config.seed + 1000 * restart)  # restart 0 draws exactly what a single search draws
        triggers = start
        visited.append((restart, triggers))
        for step in range(config.iterations):
            pos, options, losses = _contest(base, draw, verb, allowed, triggers, config, g)
            best = int(losses.argmin())  # the current trigger (0) stays unless a candidate beats it on these rows
            triggers = options[best]
            if best:
                visited.append((restart, triggers))
            history.append(
                {
                    "restart": restart,
                    "step": step,
                    "position": pos,
                    "token": tok.decode([triggers[pos]]),
                    "loss": float(losses[best]),
                    "loss_before": float(losses[0]),
                }
            )
            bar.update()
            bar.set_postfix(restart=restart, loss=f"{float(losses[best]):.3f}", trigger=repr(tok.decode(triggers)))
    bar.close()
    return history, visited


def _select(base, held: list[_Row], verb, visited: list[tuple[int, list[int]]]) -> tuple[list[dict], int]:
    """Early stopping: every visited trigger scored on held-out search rows, and the index of the best.

    A flip that won on search rows can still lose on rows the search never saw (see
    benchmarks/results/hard_prompts.md). Restarts share the start trigger: each distinct trigger is
    scored once.
    """
    distinct = list(dict.fromkeys(tuple(t) for _, t in visited))
    scores = trigger_scores(base, held, verb, [list(t) for t in distinct])  # (O, N, C)
    acc = (scores.argmax(-1) == torch.tensor([r.gold for r in held])).float().mean(1)  # (O,)
    held_out = dict(zip(distinct, zip(acc.tolist(), _mean_losses(scores, held).tolist())))
    selection = [
        {
            "restart": r,
            "trigger": base.tokenizer.decode(t),
            "accuracy": held_out[tuple(t)][0],
            "loss": held_out[tuple(t)][1],
        }
        for r, t in visited
    ]
    kept = max(range(len(visited)), key=lambda i: (selection[i]["accuracy"], -selection[i]["loss"]))
    return selection, kept


def autoprompt(
    base,
    task: Task,
    config: AutoPromptConfig,
    spec: TaskSpec | None = None,
    template: str | None = None,
    progress: bool = True,
    truncate: str = "error",
    max_length: int | None = None,
) -> AutoPromptResult:
    """Search `config.num_triggers` trigger tokens for `template` (default: `spec`'s, slot at its end).

    truncate, max_length: how search rows over the context (or `max_length` positions, triggers and label word
    included) are fitted, as everywhere else.
    """
    spec = spec or task.spec
    template = _checked_template(base, spec, template)
    data = search_split(task, config.search_size, config.seed, config.search_min_words)
    train = task.split("train")
    allowed = trigger_vocabulary(
        base.tokenizer,
        config.vocab,
        [" ".join(str(r[task.spec.column(f)]) for f in spec.template_fields) for r in train.rows],
    )
    start = _start_trigger(base.tokenizer, config, allowed)
    enc = Encoder(spec, base, truncate, max_length)
    verb = enc.verbalizer_ids
    reserve = config.num_triggers + max(map(len, verb))
    rows = _split_rows(base, spec, template, data, gold_classes(task, spec, data), enc, reserve)
    # the search split is a seeded random sample, so its first rows are as random a hold-out as any
    held, rows = rows[: config.select_rows], rows[config.select_rows :]
    history, visited = _search(base, rows, verb, allowed, start, config, progress)
    selection, kept = _select(base, held, verb, visited) if held else ([], None)
    triggers = visited[-1 if kept is None else kept][1]
    return AutoPromptResult(fill(spec, template, base.tokenizer.decode(triggers)), triggers, history, selection, kept)
