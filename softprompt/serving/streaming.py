"""Text out: token ids to text deltas with stop strings, and one completion request's events to OpenAI's JSON or
server-sent events, with the tokens' log-probabilities where asked.

A token's log-probabilities go out with the text that completes it, so that text and log-probabilities agree: text
held back because it may begin a stop string holds its tokens back too, and tokens a stop string cuts away (all of
whose text lies after the cut) are never shown."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass

from ..multitask import Entry
from .batcher import Job, Scored
from .schemas import ApiError, Disconnected, SampledRequest

log = logging.getLogger("softprompt.serve")


class TextStream:
    """Token ids in, text deltas out: holds back incomplete characters and anything that may start a stop string.

    Per token, the stop strings are looked for only where they could newly end (the new text and a stop's length
    before it), and the text held back is at most the longest stop less one character: the work per token is
    bounded by the stops' lengths, not by the text produced so far."""

    def __init__(self, tokenizer, stops: list[str], lstrip: bool = False):
        self.tokenizer, self.stops, self.lstrip = tokenizer, stops, lstrip
        self.ids: list[int] = []
        self.ends: list[int] = []  # per token: the length of the text up to its end
        self.sent = ""
        self.searched = 0  # stop strings do not occur in the text before this (less a stop's length)
        self.stopped = False

    def _text(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return text.lstrip() if self.lstrip else text

    def push(self, token: int) -> str:
        """The new text that is safe to send after `token`; sets `stopped` when a stop string appeared."""
        self.ids.append(token)
        text = self._text()
        self.ends.append(len(text))
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens
            return ""
        found = [
            at for s in self.stops if (at := text.find(s, max(0, min(self.searched, len(self.sent)) - len(s) + 1))) >= 0
        ]
        if found:
            self.stopped = True
            return self._emit(text[: min(found)])
        self.searched = len(text)
        hold = max((_overlap(text, s) for s in self.stops), default=0)
        return self._emit(text[: len(text) - hold])

    def flush(self) -> str:
        return "" if self.stopped else self._emit(self._text())

    def start(self, j: int) -> int:
        """Where token j's text starts."""
        return self.ends[j - 1] if j else 0

    def shown(self, j: int) -> bool:
        """Whether token j's text is out: all of it; once a stop string has cut the text, any of it."""
        return self.start(j) < len(self.sent) if self.stopped else self.ends[j] <= len(self.sent)

    def _emit(self, text: str) -> str:
        if not text.startswith(self.sent):  # the tokenizer re-spaced earlier text; never resend it
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta


def _overlap(text: str, stop: str) -> int:
    """The length of the longest end of `text` that begins `stop` (shorter than all of `stop`)."""
    tail = text[-(len(stop) - 1) :] if len(stop) > 1 else ""
    at = tail.find(stop[0]) if tail else -1
    while at >= 0:  # each place the stop's first character occurs, earliest (longest) first
        if stop.startswith(tail[at:]):
            return len(tail) - at
        at = tail.find(stop[0], at + 1)
    return 0


CONTEXT = 3  # tokens before a token that decide how it reads: a leading space, the bytes of a split character


def token_texts(tokenizer, before: list[int], ids: list[int]) -> list[str]:
    """The text of each of `ids` in place after the tokens `before` (SentencePiece drops a leading space at the start
    of a text, so a token decoded alone can read differently)."""
    head = tokenizer.decode(before, skip_special_tokens=True)
    fulls = tokenizer.batch_decode([before + [t] for t in ids], skip_special_tokens=True)
    return [
        full[len(head) :] if full.startswith(head) else tokenizer.decode([t], skip_special_tokens=True)
        for full, t in zip(fulls, ids)
    ]


@dataclass(frozen=True)
class Token:
    """A token of a choice as its log-probabilities show it."""

    text: str
    offset: int  # where it starts in the choice's text
    scored: Scored
    top: list[str]  # the text of each of `scored.top`


def _logprob(x: float) -> float:
    return max(x, -9999.0)  # vLLM's stand-in for -inf, which JSON cannot hold


def _chat_token(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": _logprob(logprob), "bytes": list(text.encode())}


def _alternatives(t: Token) -> dict[str, float]:
    """A token's `top_logprobs` in completions: the likeliest texts, best first (of tokens that read alike, the
    likelier), and the chosen token's, which OpenAI's hold too."""
    top: dict[str, float] = {}
    for text, (_, lp) in zip(t.top, t.scored.top):
        top.setdefault(text, _logprob(lp))
    top.setdefault(t.text, _logprob(t.scored.logprob))
    return top


def channel() -> tuple[asyncio.Queue, object]:
    """A queue for a request's events and a thread-safe function with which the worker fills it."""
    queue: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def send(event) -> None:
        if not loop.is_closed():  # the server is shutting down: nobody is listening any more
            loop.call_soon_threadsafe(queue.put_nowait, event)

    return queue, send


async def _disconnect(receive) -> None:
    """Return once the client has gone (the request body is read already: what comes next is the disconnect)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def events(jobs: list[Job], queue: asyncio.Queue, deadline: float, receive=None):
    """Yield the jobs' events until each has ended; raise 504 at `deadline` (time.monotonic()) and `Disconnected`
    when the client goes away (`receive`: the request's ASGI receive); when the consumer stops early, or on either,
    release the jobs, which the worker then drops."""
    open_jobs = len(jobs)
    gone = asyncio.ensure_future(_disconnect(receive)) if receive is not None else None
    try:
        while open_jobs:
            getter = asyncio.ensure_future(queue.get())
            waits = {getter} if gone is None else {getter, gone}
            left = max(0.0, deadline - time.monotonic())
            done, _ = await asyncio.wait(waits, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                if gone is not None and gone in done:
                    raise Disconnected
                raise ApiError(504, "The request did not finish within the server's time limit.", "request_timeout")
            event = getter.result()
            if event[1] in ("done", "result", "error"):
                open_jobs -= 1
            yield event
    finally:
        if gone is not None:
            gone.cancel()
        for job in jobs:
            job.finished = True


class Completion:
    """The choices of one /v1/completions or /v1/chat/completions request, in OpenAI's format."""

    def __init__(
        self,
        entry: Entry,
        jobs: list[Job],
        queue: asyncio.Queue,
        tokenizer,
        body: SampledRequest,
        chat: bool,
        deadline: float,
        receive=None,
    ):
        self.entry, self.jobs, self.queue, self.chat, self.stream = entry, jobs, queue, chat, body.stream
        self.deadline, self.receive = deadline, receive
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.tokenizer = tokenizer
        self.k = jobs[0].logprobs  # the request's, as every job's: alternatives per token (None: no log-probabilities)
        self.texts = [TextStream(tokenizer, body.stops(), lstrip=chat) for _ in jobs]
        self.scored: list[list[Scored]] = [[] for _ in jobs]  # per choice, of every new token
        self.released = [0] * len(jobs)  # per choice, the tokens whose log-probabilities are out
        self.echoed = [0] * len(jobs)  # per choice, the length of the prompt text that starts it
        self.finish: list[str | None] = [None] * len(jobs)
        self.t0 = time.perf_counter()

    def choice(self, index: int, text: str | None, finish: str | None = None, logprobs: dict | None = None) -> dict:
        if not self.chat:
            return {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        if not self.stream:
            message = {"role": "assistant", "content": text}
            return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}
        return {
            "index": index,
            "delta": {} if text is None else {"content": text},
            "logprobs": logprobs,
            "finish_reason": finish,
        }

    def logprobs(self, tokens: list[Token]) -> dict | None:
        """The log-probabilities of `tokens` in OpenAI's format: chat's list of tokens, or completions' columns (whose
        `top_logprobs` hold the chosen token too, as OpenAI's do)."""
        if self.k is None:
            return None
        if self.chat:
            return {
                "content": [
                    _chat_token(t.text, t.scored.logprob)
                    | {"top_logprobs": [_chat_token(a, lp) for a, (_, lp) in zip(t.top, t.scored.top)]}
                    for t in tokens
                ]
            }
        # an echoed prompt's first token has none: nothing before it predicts it
        return {
            "tokens": [t.text for t in tokens],
            "token_logprobs": [None if t.scored.logprob is None else _logprob(t.scored.logprob) for t in tokens],
            "top_logprobs": [None if t.scored.logprob is None else _alternatives(t) for t in tokens],
            "text_offset": [t.offset for t in tokens],
        }

    def _token(self, ids: list[int], j: int, scored: Scored, offset: int) -> Token:
        """Token j of `ids` (a prompt's or a choice's), starting at `offset` in the choice's text."""
        texts = token_texts(self.tokenizer, ids[max(0, j - CONTEXT) : j], [scored.token] + [t for t, _ in scored.top])
        return Token(texts[0], offset, scored, texts[1:])

    def _echo(self, index: int, scored: list[Scored] | None) -> tuple[str, list[Token]]:
        """The prompt text that starts choice `index`, and its tokens when they were scored."""
        source = self.jobs[index].example.source
        text = self.tokenizer.decode(source, skip_special_tokens=True)
        self.echoed[index] = len(text)
        tokens, offset = [], 0
        for j, s in enumerate(scored or []):
            tokens.append(self._token(source, j, s, offset))
            offset += len(tokens[-1].text)
        return text, tokens

    def _release(self, index: int) -> list[Token]:
        """The choice's tokens whose text is out now (all of them at its end, unless a stop string cut some away)."""
        text, scored, first = self.texts[index], self.scored[index], self.released[index]
        last = first
        if self.finish[index] is not None and not text.stopped:
            last = len(scored)
        while last < len(scored) and text.shown(last):
            last += 1
        self.released[index] = last
        return [self._token(text.ids, j, scored[j], self.echoed[index] + text.start(j)) for j in range(first, last)]

    def envelope(self, choices: list[dict], usage: bool = False) -> dict:
        kind = (
            "chat.completion.chunk"
            if self.chat and self.stream
            else "chat.completion"
            if self.chat
            else "text_completion"
        )
        out = {"id": self.id, "object": kind, "created": self.created, "model": self.entry.name, "choices": choices}
        if usage:
            prompt, done = sum(len(j.example.source) for j in self.jobs), sum(len(t.ids) for t in self.texts)
            out["usage"] = {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}
        return out

    async def deltas(self):
        """(choice index, new text, the `Token`s out with that text, finish reason or None) until every choice has
        finished; an echoed prompt comes first in its choice."""
        async with aclosing(events(self.jobs, self.queue, self.deadline, self.receive)) as stream:
            async for index, kind, value in stream:
                if self.finish[index] is not None:  # ended early by a stop string; the worker's "done" comes later
                    continue
                if kind == "error":
                    raise value
                if kind == "prompt":
                    yield index, *self._echo(index, value), None
                    continue
                text = self.texts[index]
                if kind in ("token", "scored"):
                    if kind == "scored":
                        self.scored[index].append(value)
                    delta = text.push(value if kind == "token" else value.token)
                    if text.stopped:
                        self.jobs[index].finished = True  # the worker may drop this row
                        self.finish[index] = "stop"
                else:
                    delta, self.finish[index] = text.flush(), value
                yield index, delta, self._release(index), self.finish[index]
                if all(f is not None for f in self.finish):
                    return

    async def response(self) -> dict:
        out = [""] * len(self.jobs)
        tokens: list[list[Token]] = [[] for _ in self.jobs]
        try:
            async for index, delta, released, _ in self.deltas():
                out[index] += delta
                tokens[index] += released
        except ApiError as e:
            self.log("cancelled" if isinstance(e, Disconnected) else f"error {e.status}")
            raise
        self.log("ok")
        choices = [self.choice(i, out[i], self.finish[i], self.logprobs(tokens[i])) for i in range(len(self.jobs))]
        return self.envelope(choices, usage=True)

    async def sse(self):
        """Server-sent events as OpenAI streams them, ending with `data: [DONE]`."""
        status = "cancelled"  # unless we get to the end: the client went away
        try:
            if self.chat:  # OpenAI opens each chat choice with the assistant's role
                opening = [
                    {
                        "index": j.index,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                    for j in self.jobs
                ]
                yield _sse(self.envelope(opening))
            async for index, delta, released, finish in self.deltas():
                if delta or released:
                    yield _sse(self.envelope([self.choice(index, delta, logprobs=self.logprobs(released))]))
                if finish is not None:
                    yield _sse(self.envelope([self.choice(index, None if self.chat else "", finish)]))
            status = "ok"
            yield "data: [DONE]\n\n"
        except Disconnected:
            pass
        except ApiError as e:  # headers are sent already: report it in the stream
            status = f"error {e.status}"
            yield _sse(e.payload())
        finally:
            for job in self.jobs:
                job.finished = True
            self.log(status)

    def log(self, status: str) -> None:
        log.info(
            "%s %s task=%s rows=%d prompt_tokens=%d completion_tokens=%d %s %.0f ms",
            self.id,
            "chat" if self.chat else "completions",
            self.entry.name,
            len(self.jobs),
            sum(len(j.example.source) for j in self.jobs),
            sum(len(t.ids) for t in self.texts),
            status,
            1000 * (time.perf_counter() - self.t0),
        )


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"
