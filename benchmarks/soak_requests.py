"""Well-formed requests and deliberate aborts of the soak benchmark (`soak.py`), and the types every
kind of request shares (bad inputs are in `soak_bad_inputs.py`, the mix in `soak_mix.py`).

Every kind sends one request and returns what came back and whether that is what the server owes the
client:
- well-formed: a 200 whose every choice ends with finish_reason "stop" or "length" (a stream too, so a
  stream cut short is caught even without its [DONE]);
- aborts (the task cancelled, the stream closed after k chunks, a client-side timeout): the request
  ends, before or after the abort point; an HTTP error or a broken connection is a failure.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import openai
from openai import AsyncOpenAI

WELL_FORMED, ABORT, BAD_INPUT = "well_formed", "abort", "bad_input"
CUT_AT_DEADLINE = "cut_at_deadline"  # the outcome of a request in flight when the run's time is up
FINISH_REASONS = ("stop", "length")

_WORDS = (
    "the river carries small stones past old mills and quiet farms while children count boats "
    "under a bridge of grey brick where a baker sells warm bread to travellers who speak of "
    "mountains snow winter markets lanterns music letters ships harbours gardens clocks trains "
    "a library keeps maps of forgotten roads and every evening the keeper lights one candle"
).split()
# Prompts share a few long prefixes, so the prefix cache holds, shares and evicts blocks throughout.
_PREFIXES = tuple(" ".join(random.Random(i).choices(_WORDS, k=30)) for i in range(4))
_STOPS = (".", "\n", " the", "!", "?", "and", "ing")
# `user` labels per-client series in /metrics: quotes, backslashes and non-ASCII must not break it.
USER_NAMES = ("client-{}", 'client-{} "quoted"', "клиент-{}", "client-{}\\path")


@dataclass
class Target:
    """What the request mix needs to know about the server under test."""

    base_url: str  # http://host:port, without /v1
    model: str
    max_model_len: int
    vocab_size: int
    max_body_bytes: int


@dataclass
class Result:
    outcome: str  # finished | aborted | http_<status> | error:<what> | bad_answer
    ok: bool
    detail: str = ""


@dataclass
class Client:
    """One simulated client: its own OpenAI and raw HTTP clients, `user` name and random stream."""

    user: str
    api: AsyncOpenAI
    http: httpx.AsyncClient
    rng: random.Random
    target: Target


# ---- request bodies ---------------------------------------------------------------------------
def _text(rng: random.Random) -> str:
    words = " ".join(rng.choices(_WORDS, k=rng.randint(3, 20)))
    return f"{rng.choice(_PREFIXES)} {words}" if rng.random() < 0.6 else words


def _options(c: Client, chat: bool, long: bool) -> tuple[dict[str, Any], int]:
    """Sampling options of one request, and its n. Short outputs keep the run fast on two cores;
    `long` ones (for aborts) are still running when the abort comes."""
    rng = c.rng
    n = rng.choice((1, 1, 1, 2, 3))
    max_tokens = rng.randint(16, 64) if long else rng.randint(1, 12)
    kw: dict[str, Any] = {"n": n, "temperature": rng.choice((0.0, 0.0, 0.7, 1.0))}
    kw["max_completion_tokens" if chat and rng.random() < 0.5 else "max_tokens"] = max_tokens
    extra: dict[str, Any] = {}
    if rng.random() < 0.3:
        kw["seed"] = rng.randrange(2**31)
    if rng.random() < 0.3:
        kw["stop"] = rng.sample(_STOPS, rng.randint(1, 3))
    if rng.random() < 0.2:
        kw["top_p"] = 0.9
    if rng.random() < 0.3:
        kw["presence_penalty"] = 0.5
    if rng.random() < 0.3:
        if chat:
            kw["logprobs"], kw["top_logprobs"] = True, rng.randint(0, 5)
        else:
            kw["logprobs"] = rng.randint(0, 5)
    if rng.random() < 0.8:
        kw["user"] = c.user
    if rng.random() < 0.2:
        extra["top_k"] = rng.choice((1, 20, 100_000))
    if rng.random() < 0.2:
        extra["min_tokens"] = rng.randint(0, max_tokens)
    if rng.random() < 0.1:
        extra["cache_salt"] = c.user
    if rng.random() < 0.1:
        extra["an_unknown_field"] = {"ignored": [1, 2]}  # unknown fields are ignored, as in vLLM
    if extra:
        kw["extra_body"] = extra
    return kw, n


def _messages(rng: random.Random) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": rng.choice(_PREFIXES)}] if rng.random() < 0.5 else []
    for _ in range(rng.choice((0, 0, 0, 1))):
        messages += [{"role": "user", "content": _text(rng)}, {"role": "assistant", "content": _text(rng)}]
    return [*messages, {"role": "user", "content": _text(rng)}]


def _completion_prompt(c: Client) -> tuple[str | list[str] | list[int], int]:
    """A text, a batch of texts, or token ids; and the number of prompts."""
    rng, roll = c.rng, c.rng.random()
    if roll < 0.15:
        batch = [_text(rng) for _ in range(rng.randint(2, 3))]
        return batch, len(batch)
    if roll < 0.3:
        return [rng.randrange(17, c.target.vocab_size) for _ in range(rng.randint(4, 40))], 1
    return _text(rng), 1


async def _create(c: Client, chat: bool, stream: bool, long: bool, **kw: Any) -> tuple[Any, int]:
    """Start one completion or chat completion; returns the response (or stream) and the number
    of choices it owes."""
    options, n = _options(c, chat, long)
    options.update(kw)
    if chat:
        api: Any = c.api.chat.completions
        return await api.create(model=c.target.model, messages=_messages(c.rng), stream=stream, **options), n
    prompt, num_prompts = _completion_prompt(c)
    return await c.api.completions.create(
        model=c.target.model, prompt=prompt, stream=stream, **options
    ), n * num_prompts


def _check_choices(finish: dict[int, str | None], expected: int) -> Result:
    if sorted(finish) != list(range(expected)):
        return Result("bad_answer", False, f"choices {sorted(finish)}, expected {expected}")
    bad = {i: r for i, r in finish.items() if r not in FINISH_REASONS}
    if bad:
        return Result("bad_answer", False, f"finish reasons {bad}")
    return Result("finished", True)


async def _consume(stream: Any, expected: int, stop_after: int | None = None) -> Result:
    finish: dict[int, str | None] = {}
    chunks = 0
    async for chunk in stream:
        for choice in chunk.choices:
            if choice.finish_reason is not None:
                finish[choice.index] = choice.finish_reason
        chunks += 1
        if stop_after is not None and chunks >= stop_after:
            await stream.close()  # the client goes away mid-stream
            return Result("aborted", True)
    return _check_choices(finish, expected)


def _from_exception(e: BaseException) -> Result:
    if isinstance(e, openai.APIStatusError):
        return Result(f"http_{e.status_code}", False, str(e.message)[:300])
    if isinstance(e, openai.APITimeoutError):
        return Result("error:timeout", False, "the request timed out")
    if isinstance(e, openai.APIConnectionError):
        return Result("error:connection", False, repr(e.__cause__ or e)[:300])
    if isinstance(e, openai.APIError):
        return Result("error:stream_error", False, str(e.message)[:300])  # an error event mid-stream
    return Result(f"error:{type(e).__name__}", False, repr(e)[:300])


# ---- well-formed ------------------------------------------------------------------------------
def _well_formed(chat: bool, stream: bool) -> Callable[[Client], Awaitable[Result]]:
    async def send(c: Client) -> Result:
        try:
            if stream:
                include_usage = {"stream_options": {"include_usage": True}} if c.rng.random() < 0.5 else {}
                response, expected = await _create(c, chat, True, False, **include_usage)
                return await _consume(response, expected)
            response, expected = await _create(c, chat, False, False)
            return _check_choices({ch.index: ch.finish_reason for ch in response.choices}, expected)
        except Exception as e:
            return _from_exception(e)

    return send


# ---- aborts -----------------------------------------------------------------------------------
async def _abort_cancel(c: Client) -> Result:
    """The client's task is cancelled at a random point, closing its connection mid-request."""
    chat, stream = c.rng.random() < 0.5, c.rng.random() < 0.5

    async def run() -> Result:
        response, expected = await _create(c, chat, stream, True)
        if stream:
            return await _consume(response, expected)
        return _check_choices({ch.index: ch.finish_reason for ch in response.choices}, expected)

    task = asyncio.ensure_future(run())
    try:
        done, _ = await asyncio.wait({task}, timeout=c.rng.uniform(0.0, 1.5))
    finally:
        if not task.done():  # the abort point, or the whole run's end
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if not done:
        return Result("aborted", True)
    try:
        return task.result()
    except Exception as e:
        return _from_exception(e)


async def _abort_close_stream(c: Client) -> Result:
    """The client reads k chunks of a stream (k may be 0) and closes it."""
    try:
        response, expected = await _create(c, c.rng.random() < 0.5, True, True)
        k = c.rng.randint(0, 8)
        if k == 0:
            await response.close()  # gone as soon as the headers came
            return Result("aborted", True)
        return await _consume(response, expected, stop_after=k)
    except Exception as e:
        return _from_exception(e)


async def _abort_timeout(c: Client) -> Result:
    """A client-side timeout fires mid-request (the openai client then drops the connection)."""
    try:
        response, expected = await _create(
            c, c.rng.random() < 0.5, False, True, timeout=c.rng.uniform(0.02, 0.8)
        )
        return _check_choices({ch.index: ch.finish_reason for ch in response.choices}, expected)
    except openai.APITimeoutError:
        return Result("aborted", True)
    except Exception as e:
        return _from_exception(e)


WELL_FORMED_KINDS: dict[str, Callable[[Client], Awaitable[Result]]] = {
    f"{'chat' if chat else 'completion'}{'_stream' if stream else ''}": _well_formed(chat, stream)
    for chat in (False, True)
    for stream in (False, True)
}
ABORT_KINDS: dict[str, Callable[[Client], Awaitable[Result]]] = {
    "abort_cancel": _abort_cancel,
    "abort_close_stream": _abort_close_stream,
    "abort_timeout": _abort_timeout,
}
