"""Batched decoding with a KV cache, for any mix of prompts in one batch, on any family that generates.

We run our own decode loop instead of `model.generate`: the prompt's key/value prefix must sit in
the cache, the attention mask must cover it, and positions must continue from each row's own
count. The family lays that out (`Family.start_decoding`, `continue_decoding`); this loop samples,
stops rows at EOS or their length limit, and yields tokens as they come. Cached and uncached
decoding give the same tokens (PEFT on transformers 5.x silently loses the prefix in `generate`).

Log-probabilities (what OpenAI's `logprobs` report) are those of the model's raw logits, before
temperature, top-k and top-p, as vLLM reports them by default: per step for the tokens decoded
(`decode(..., top_logprobs=k)`), and for the tokens of a prompt itself (`prompt_logprobs`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from .errors import ConfigError, SoftpromptError
from .example import Example


@dataclass(frozen=True)
class Sampling:
    """Decoding settings of one request. temperature 0 means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ConfigError(f"Invalid sampling settings {self}.", "use temperature >= 0, 0 < top_p <= 1, top_k >= 0.")


GREEDY = Sampling()


class NonFiniteScoresError(SoftpromptError):
    """The model scored the next token of some rows with NaN or inf (e.g. a prompt whose tensors hold NaN)."""


def check_finite(logits: torch.Tensor) -> None:
    """Raise `NonFiniteScoresError` unless every row of logits (..., V) is usable: no NaN, no +inf, and some token
    that is not -inf (a model may mask tokens with -inf; argmax of NaN would silently pick a token)."""
    best = logits.amax(-1)  # NaN where a row holds NaN
    bad = ~best.isfinite()
    if bool(bad.any()):
        rows = bad.reshape(-1).nonzero()[:, 0].tolist()
        error = NonFiniteScoresError(
            f"The next-token scores of row(s) {rows[:8]} are not finite (NaN or inf).",
            "check the prompt's tensors and the base model's weights for NaN or inf.",
        )
        error.rows = rows  # for a caller that answers the other rows
        raise error


@dataclass(frozen=True)
class LogProbs:
    """Log-probabilities of N tokens, each with the k most likely tokens in its place (most likely first)."""

    chosen: torch.Tensor  # (N,) log p of each token picked (or given)
    top_ids: torch.Tensor  # (N, k)
    top: torch.Tensor  # (N, k) their log p, descending


def log_probs(logits: torch.Tensor, chosen: torch.Tensor, k: int) -> LogProbs:
    """`LogProbs` of tokens `chosen` (N,) under logits (N, V): one log_softmax and one topk for all rows."""
    logp = logits.float().log_softmax(-1)  # (N, V)
    top, top_ids = logp.topk(min(k, logp.shape[-1]), dim=-1)  # (N, k)
    return LogProbs(logp.gather(-1, chosen[:, None])[:, 0], top_ids, top)


def sample_next(logits: torch.Tensor, settings: list[Sampling], generator: torch.Generator | None) -> torch.Tensor:
    """Pick the next token of each row (B, V) -> (B,), each row with its own settings.

    transformers' logits warpers take one setting per batch; a mixed batch carries one per request. Raises
    `NonFiniteScoresError` when a row's logits are not usable, greedy rows included.
    """
    check_finite(logits)
    greedy = logits.argmax(-1)
    if all(s.temperature == 0 for s in settings):
        return greedy
    dev = logits.device
    temp = torch.tensor([max(s.temperature, 1e-6) if s.temperature else 1.0 for s in settings], device=dev)[:, None]
    top_p = torch.tensor([s.top_p for s in settings], device=dev)[:, None]
    V = logits.shape[-1]
    top_k = torch.tensor([min(s.top_k, V) or V for s in settings], device=dev)[:, None]  # any int a request sends
    logits = logits.float()
    # shifted so that the best token scores 0 and the others less: dividing by a tiny temperature gives -inf at
    # worst, never inf (whose softmax is nan)
    scaled = (logits - logits.amax(-1, keepdim=True)) / temp
    sorted_logits, order = scaled.sort(-1, descending=True)  # (B, V)
    probs = sorted_logits.softmax(-1)
    rank = torch.arange(V, device=dev)[None, :]
    # keep the top-k, and the smallest prefix whose probability mass reaches top_p; always the first token, even for
    # a top_p that rounds to 0 in float32 (a request may send 5e-324)
    keep = (rank < top_k) & (((probs.cumsum(-1) - probs) < top_p) | (rank == 0))
    probs = torch.where(keep, probs, torch.zeros_like(probs))
    choice = torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=generator)  # (B, 1)
    sampled = order.gather(-1, choice)[:, 0]
    is_greedy = torch.tensor([s.temperature == 0 for s in settings], device=dev)
    return torch.where(is_greedy, greedy, sampled)


def stop_ids(base) -> set[int]:
    ids = {base.tokenizer.eos_token_id}
    gen_eos = getattr(getattr(base.model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return {i for i in ids if i is not None}


class Decoder:
    """Rows decoding together with a KV cache, which rows may join and leave between steps: continuous batching.

    `join` prefills new rows apart and merges them into the running batch (`Family.merge_decoding`); `sample` picks
    every row's next token; `advance` feeds them, dropping the rows told to leave (`Family.select_decoding`). Where
    the family cannot merge decoding states, rows join only an empty decoder and rows that leave stay in the batch
    as padding until it empties: batches that start together, as static batching runs them.
    """

    def __init__(
        self,
        base,
        generator: torch.Generator | None = None,
        top_logprobs: int | None = None,
        use_cache: bool = True,
    ):
        self.base, self.family, self.generator, self.k, self.use_cache = (
            base,
            base.family,
            generator,
            top_logprobs,
            use_cache,
        )
        self.pad = base.tokenizer.pad_token_id
        self.state = None
        self.logits: torch.Tensor | None = None  # (B, V) the next-token logits of every row
        self.settings: list[Sampling] = []
        self.keys: list = []  # the caller's key of each row, in batch order; None for a row that left (padding)

    def __len__(self) -> int:
        """Rows decoding (not counting those that left and stay as padding)."""
        return sum(k is not None for k in self.keys)

    @property
    def can_join(self) -> bool:
        return self.state is None or self.family.merges_decoding(self.state)

    @torch.inference_mode()
    def join(self, keys: list, examples: list[Example], max_new_tokens: list[int], settings: list[Sampling]) -> None:
        """Prefill `examples` (one per key) and add them to the batch; raises like `Family.start_decoding`, leaving
        the running rows as they were."""
        if not self.can_join:
            raise ValueError("rows can join this decoder only once it is empty (its family merges no states)")
        self.family.check_fits(examples, list(max_new_tokens))
        state, logits = self.family.start_decoding(examples, self.use_cache)
        if self.state is None:
            self.state, self.logits = state, logits
        else:
            self.state = self.family.merge_decoding(self.state, state)
            self.logits = torch.cat([self.logits, logits])
        self.keys += list(keys)
        self.settings += list(settings)

    @torch.inference_mode()
    def sample(self) -> tuple[torch.Tensor, LogProbs | None]:
        """The next token of every row (B,), and with `top_logprobs` their `LogProbs`; rows that left get padding."""
        nxt = sample_next(self.logits, self.settings, self.generator)
        nxt = torch.where(self._live(), nxt, torch.full_like(nxt, self.pad))
        return nxt, None if self.k is None else log_probs(self.logits, nxt, self.k)

    @torch.inference_mode()
    def release(self, rows: list[int]) -> None:
        """Let rows leave at once, before their next token (e.g. rows whose scores are not finite): the others
        sample as if they had never been there."""
        for i in rows:
            self.keys[i] = None
            self.logits[i] = 0

    @torch.inference_mode()
    def advance(self, tokens: torch.Tensor, leave: list[bool] | None = None) -> None:
        """Feed each row its token (B,); rows with `leave` true leave the batch first."""
        if leave is not None:
            self.keys = [None if gone else k for k, gone in zip(self.keys, leave)]
        if not any(k is not None for k in self.keys):
            self.state, self.logits, self.settings, self.keys = None, None, [], []
            return
        if None in self.keys and self.family.merges_decoding(self.state):
            index = torch.tensor([i for i, k in enumerate(self.keys) if k is not None], device=tokens.device)
            self.state = self.family.select_decoding(self.state, index)
            tokens = tokens[index]
            self.settings = [self.settings[i] for i in index.tolist()]
            self.keys = [self.keys[i] for i in index.tolist()]
        self.logits = self.family.continue_decoding(self.state, tokens)

    def _live(self) -> torch.Tensor:
        return torch.tensor([k is not None for k in self.keys], device=self.logits.device)


@torch.inference_mode()
def decode(
    base,
    examples: list[Example],
    max_new_tokens: int | list[int],
    sampling: Sampling | list[Sampling] = GREEDY,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    ended: Callable[[], list[int]] | None = None,
    top_logprobs: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, LogProbs]]:
    """Yield (next tokens (B,), active (B,)) once per step; a row is inactive after its EOS or length limit.

    examples: one per row, each with its prompt (`Example.injection`); what is decoded follows each source.
    With use_cache=False every step re-runs the whole sequence (slow; a reference for tests).
    ended: called after each step the caller has consumed; the rows it returns end there (e.g. at a stop string).
    top_logprobs: when given (k >= 0), each step yields a third element, the `LogProbs` of the tokens picked and of
    the k most likely tokens, for the whole batch (a row that wants fewer reads the first of them).
    The rows start together and stay in the batch (inactive ones as padding): `Decoder` lets rows come and go.
    """
    B = len(examples)
    settings = [sampling] * B if isinstance(sampling, Sampling) else list(sampling)
    limits = [max_new_tokens] * B if isinstance(max_new_tokens, int) else list(max_new_tokens)
    decoder = Decoder(base, generator, top_logprobs, use_cache)
    decoder.join(list(range(B)), examples, limits, settings)
    eos = torch.tensor(sorted(stop_ids(base)), device=base.device)
    active = torch.ones(B, dtype=torch.bool, device=base.device)
    limits = torch.tensor(limits, device=base.device)
    for step in range(int(limits.max())):
        nxt, lp = decoder.sample()
        nxt = torch.where(active, nxt, torch.full_like(nxt, decoder.pad))
        yield (nxt, active.clone()) if lp is None else (nxt, active.clone(), lp)
        active &= ~torch.isin(nxt, eos) & (limits > step + 1)
        if ended is not None:
            active[ended()] = False
        if not active.any():
            return
        decoder.advance(nxt)


def scores_prompts(base) -> bool:
    """Whether a prompt's own tokens have log-probabilities: where one stack reads the prompt and predicts each of
    its tokens (a causal LM), not in an encoder-decoder, whose encoder predicts nothing."""
    return base.family.generates and not getattr(base.model.config, "is_encoder_decoder", False)


@torch.inference_mode()
def prompt_logprobs(base, example: Example, k: int) -> LogProbs:
    """`LogProbs` of each source token after the ones before it, under the row's prompt: N = len(source) - 1 (the
    first token has none). One uncached forward of the row scores its source as a target; one row at a time, since
    the logits of a long prompt (N, V) are large."""
    first, rest = example.source[:1], example.source[1:]
    if not rest:  # a one-token prompt: nothing to score
        return LogProbs(torch.empty(0), torch.empty(0, k, dtype=torch.long), torch.empty(0, k))
    logits, targets, _ = base.family.target_logits([Example(first, 1, rest, example.injection)])  # (1, N, V), (1, N)
    check_finite(logits)
    return log_probs(logits[0], targets[0], k)


def generate_ids(
    base,
    examples: list[Example],
    max_new_tokens: int | list[int] = 64,
    sampling: Sampling | list[Sampling] = GREEDY,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    stop: Sequence[str] = (),
) -> list[list[int]]:
    """New token ids per row, without the EOS token. A row also ends once its text contains a `stop` string (the
    ids then run to the token that completed it; `cut_at_stop` trims the text)."""
    out: list[list[int]] = [[] for _ in examples]
    eos = stop_ids(base)
    grew: list[int] = []  # rows that got a token in the last step

    def stopped() -> list[int]:
        return [i for i in grew if any(s in base.tokenizer.decode(out[i]) for s in stop)]

    for nxt, active in decode(
        base, examples, max_new_tokens, sampling, use_cache, generator, stopped if stop else None
    ):
        grew = []
        for i in active.nonzero()[:, 0].tolist():
            if int(nxt[i]) not in eos:
                out[i].append(int(nxt[i]))
                grew.append(i)
    return out


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to its first `stop` string (all of it when none occurs)."""
    return min((text[: text.index(s)] for s in stop if s in text), key=len, default=text)
