"""Bad inputs of the soak benchmark: requests the server must refuse, each with its documented status
and an OpenAI error body ({"error": {"message", "type", "param", "code"}}), without hurting anyone.

They go out as raw bytes over httpx, so malformed JSON, bare Infinity / NaN and lone surrogates reach
the server exactly as a client may send them. The oversized body with a declared content-length goes
over a raw socket: the server refuses it by its header, so the check reads the answer after sending
only the headers and the body's first bytes (a regression that reads the whole body first would hang
here until the client's timeout); the chunked one is sent until the server answers.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import httpx
from soak_requests import Client, Result

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
_CHUNK = 64 * 1024

Body = bytes | Callable[[], AsyncIterator[bytes]]


def _path(rng: random.Random) -> str:
    return rng.choice((COMPLETIONS, CHAT))


def _json(c: Client, path: str | None = None, **fields: Any) -> tuple[str, Body]:
    path = path or _path(c.rng)
    base: dict[str, Any] = {"model": c.target.model, "max_tokens": 4}
    base.update({"messages": [{"role": "user", "content": "hi"}]} if path == CHAT else {"prompt": "hi"})
    # allow_nan: Infinity and NaN go out as the bare JSON extensions Python's parser accepts, and a
    # lone surrogate as the \ud800 escape, exactly as a client would send them.
    return path, json.dumps({**base, **fields}, allow_nan=True).encode()


def _oversized_body(c: Client) -> bytes:
    size = c.target.max_body_bytes + c.rng.randint(1, _CHUNK)
    head = f'{{"model": "{c.target.model}", "prompt": "'.encode()
    return head + b"a" * (size - len(head) - 2) + b'"}'


def _chunked_oversized(c: Client) -> tuple[str, Body]:
    body = _oversized_body(c)

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(body), _CHUNK):
            yield body[i : i + _CHUNK]

    return COMPLETIONS, chunks


_BODIES: dict[str, tuple[int, Callable[[Client], tuple[str, Body]]]] = {
    "invalid_json": (400, lambda c: (_path(c.rng), b'{"model": "m", "prompt": "unterminated')),
    "json_not_an_object": (400, lambda c: (_path(c.rng), b"[1, 2, 3]")),
    "wrong_type_max_tokens": (400, lambda c: _json(c, max_tokens="many")),
    "wrong_type_n": (400, lambda c: _json(c, n={"value": 2})),
    "wrong_type_messages": (400, lambda c: (CHAT, json.dumps({"messages": "hello"}).encode())),
    "temperature_infinity": (400, lambda c: _json(c, temperature=float("inf"), min_tokens=1)),
    "temperature_infinity_string": (400, lambda c: _json(c, temperature="Infinity", min_tokens=1)),
    "temperature_1e39": (400, lambda c: _json(c, temperature=1e39, min_tokens=1)),
    "top_p_nan": (400, lambda c: _json(c, top_p=float("nan"))),
    "stop_token_ids_whole_vocab": (
        400,
        lambda c: _json(c, stop_token_ids=list(range(c.target.vocab_size)), min_tokens=1),
    ),
    "surrogate_prompt": (400, lambda c: _json(c, COMPLETIONS, prompt="abc \ud800 def")),
    "surrogate_chat_content": (
        400,
        lambda c: _json(c, CHAT, messages=[{"role": "user", "content": "\ud800"}]),
    ),
    "surrogate_user": (400, lambda c: _json(c, user="client-\udfff")),
    "huge_n": (400, lambda c: _json(c, n=10**6)),
    "too_many_stop_strings": (400, lambda c: _json(c, stop=[f"s{i}" for i in range(5000)])),
    "prompt_over_context": (
        400,
        lambda c: _json(c, COMPLETIONS, prompt=[100 + i % 1000 for i in range(c.target.max_model_len + 1)]),
    ),
    "token_id_over_vocab": (400, lambda c: _json(c, COMPLETIONS, prompt=[1, 2, c.target.vocab_size + 10**6])),
    "token_id_negative": (400, lambda c: _json(c, COMPLETIONS, prompt=[1, -5, 3])),
    "unknown_model": (404, lambda c: _json(c, model="no-such-model")),
    "body_over_limit_chunked": (413, _chunked_oversized),
}


def judge(status: int, text: str, expected: int) -> Result:
    """The documented status with an OpenAI error body, or a failure saying what came instead."""
    outcome = f"http_{status}"
    if status != expected:
        return Result(outcome, False, f"expected {expected}: {text[:300]}")
    try:
        error = json.loads(text).get("error")
    except (ValueError, AttributeError):
        error = None
    if not (isinstance(error, dict) and {"message", "type", "param", "code"} <= error.keys()):
        return Result(outcome, False, f"not an OpenAI error body: {text[:300]}")
    return Result(outcome, True, str(error["message"])[:300])


def _over_http(
    expected: int, build: Callable[[Client], tuple[str, Body]]
) -> Callable[[Client], Awaitable[Result]]:
    async def send(c: Client) -> Result:
        path, body = build(c)
        content = body() if callable(body) else body
        try:
            response = await c.http.post(
                c.target.base_url + path, content=content, headers={"content-type": "application/json"}
            )
        except httpx.HTTPError as e:
            return Result(f"error:{type(e).__name__}", False, repr(e)[:300])
        return judge(response.status_code, response.text, expected)

    return send


async def _declared_oversized(c: Client) -> Result:
    """Headers declaring a body over the limit and its first bytes; the 413 must come before the rest."""
    body = _oversized_body(c)
    url = urlsplit(c.target.base_url)
    head = (
        f"POST {COMPLETIONS} HTTP/1.1\r\nhost: {url.netloc}\r\ncontent-type: application/json\r\n"
        f"authorization: {c.http.headers.get('authorization', '')}\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    writer = None
    timeout = c.http.timeout.read or 120.0
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(url.hostname, url.port), timeout)
        writer.write(head.encode() + body[:_CHUNK])
        await writer.drain()
        status, text = await asyncio.wait_for(_read_response(reader), timeout)
    except (OSError, EOFError, asyncio.TimeoutError, asyncio.LimitOverrunError, ValueError, IndexError) as e:
        return Result(f"error:{type(e).__name__}", False, repr(e)[:300])
    finally:
        if writer is not None:
            writer.close()
    return judge(status, text, 413)


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, str]:
    """Status and body of one HTTP/1.1 response (content-length framed, as error bodies are)."""
    header = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    status_line, *lines = header.split("\r\n")
    status = int(status_line.split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines if line)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, body.decode("utf-8", "replace")


BAD_INPUTS: dict[str, tuple[int, Callable[[Client], Awaitable[Result]]]] = {
    **{name: (status, _over_http(status, build)) for name, (status, build) in _BODIES.items()},
    "body_over_limit": (413, _declared_oversized),
}
