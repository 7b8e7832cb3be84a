"""Streaming requests to an OpenAI-compatible server, timed chunk by chunk.

Every request streams (`stream: true`) and asks for a final usage block (`stream_options.include_usage`);
`max_tokens` is the requested output length, and `ignore_eos: true` (vLLM's extension; servers that do not
know it ignore it) asks for exactly that many tokens; `min_tokens` (optional) does the same on servers
without ignore_eos, such as llama.cpp's. A chunk counts as generated output when it carries
text: chat servers' role-only first chunk and a final empty chunk with the finish reason are not tokens.
Output tokens come from the usage block when the server sends one, else from the number of text chunks.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sutra.bench.datasets import SampleRequest
from sutra.bench.errors import BenchError, bench_dependency

if TYPE_CHECKING:
    import aiohttp

REQUEST_TIMEOUT_S = 6 * 60 * 60
ERROR_BODY_CHARS = 500


@dataclass
class RequestOutput:
    """What one request measured. Times are time.perf_counter() seconds; durations are seconds."""

    success: bool = False
    error: str = ""
    prompt_len: int = 0  # the server's prompt_tokens when reported, else the dataset's count
    output_tokens: int = 0
    output_tokens_from_usage: bool = False
    ttft: float = 0.0  # first text chunk - send time
    itl: list[float] = field(default_factory=list)  # gaps between consecutive text chunks
    latency: float = 0.0  # last text chunk - send time
    start_time: float = 0.0  # when the request was sent
    chunk_times: list[float] = field(default_factory=list)  # arrival of each text chunk
    generated_text: str = ""


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def build_payload(
    request: SampleRequest, model: str, chat: bool, ignore_eos: bool, send_min_tokens: bool = False
) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "model": model,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if chat:
        prompt = request.prompt
        payload["messages"] = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    elif isinstance(request.prompt, str):
        payload["prompt"] = request.prompt
    else:
        raise BenchError("chat messages need --endpoint /v1/chat/completions")
    if request.output_len is not None:
        payload["max_tokens"] = request.output_len
        if ignore_eos:
            payload["ignore_eos"] = True
        if send_min_tokens:
            payload["min_tokens"] = request.output_len
    return payload


class SseDecoder:
    """Splits a byte stream into the payloads of its `data:` lines (comments and other fields dropped)."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[str]:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        return [p for p in (self._payload(line) for line in lines) if p is not None]

    def flush(self) -> list[str]:
        line, self._buffer = self._buffer, b""
        payload = self._payload(line)
        return [payload] if payload is not None else []

    @staticmethod
    def _payload(line: bytes) -> str | None:
        text = line.decode("utf-8", errors="replace").rstrip("\r")
        if not text.startswith("data:"):
            return None
        return text[len("data:") :].strip()


def chunk_text(event: dict[str, Any], chat: bool) -> str:
    choices = event.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else None
    if not isinstance(choice, dict):
        return ""
    if chat:
        delta = choice.get("delta") or {}
        return (delta.get("content") or "") + (delta.get("reasoning_content") or "")
    return choice.get("text") or ""


async def send_request(
    session: aiohttp.ClientSession,
    url: str,
    payload: dict[str, Any],
    prompt_len: int,
    headers: dict[str, str] | None = None,
) -> RequestOutput:
    """POST one streaming request and time its chunks; failures are recorded, never raised."""
    aiohttp = bench_dependency("aiohttp")
    chat = "messages" in payload
    out = RequestOutput(prompt_len=prompt_len)
    out.start_time = time.perf_counter()
    try:
        async with session.post(
            url, json=payload, headers=headers, timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        ) as response:
            if response.status != 200:
                body = (await response.text(errors="replace"))[:ERROR_BODY_CHARS]
                out.error = f"HTTP {response.status} {response.reason or ''}: {body}".strip()
                return out
            decoder = SseDecoder()
            done = False
            async for data in response.content.iter_any():
                arrived = time.perf_counter()
                for message in decoder.feed(data):
                    done = _take_event(out, message, arrived, chat) or done
            for message in decoder.flush():
                done = _take_event(out, message, time.perf_counter(), chat) or done
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
        out.error = f"{type(e).__name__}: {e}".rstrip(": ")
        return out
    except ValueError as e:  # a malformed event
        out.error = str(e)
        return out
    if out.error:
        return out
    if not out.chunk_times:
        out.error = "the stream ended without any generated text"
        return out
    if not done:
        out.error = "the stream ended without [DONE] or a finish reason (closed mid-response)"
        return out
    out.ttft = out.chunk_times[0] - out.start_time
    out.latency = out.chunk_times[-1] - out.start_time
    out.itl = [later - earlier for earlier, later in itertools.pairwise(out.chunk_times)]
    if not out.output_tokens_from_usage:
        out.output_tokens = len(out.chunk_times)
    out.success = True
    return out


def _take_event(out: RequestOutput, message: str, arrived: float, chat: bool) -> bool:
    """Record one stream event; True when it ends the response ([DONE] or a finish reason)."""
    if message == "[DONE]":
        return True
    if not message:
        return False
    try:
        event = json.loads(message)
    except json.JSONDecodeError as e:
        raise ValueError(f"malformed stream event ({e.msg}): {message[:ERROR_BODY_CHARS]}") from e
    if not isinstance(event, dict):
        raise ValueError(f"unexpected stream event: {message[:ERROR_BODY_CHARS]}")
    if event.get("error"):
        error = event["error"]
        detail = error.get("message", error) if isinstance(error, dict) else error
        out.error = f"server error in the stream: {detail}"
        return False
    text = chunk_text(event, chat)
    if text:
        out.chunk_times.append(arrived)
        out.generated_text += text
    choices = event.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else None
    finished = isinstance(choice, dict) and choice.get("finish_reason") is not None
    usage = event.get("usage")
    if isinstance(usage, dict):
        if isinstance(usage.get("completion_tokens"), int):
            out.output_tokens = usage["completion_tokens"]
            out.output_tokens_from_usage = True
        if isinstance(usage.get("prompt_tokens"), int):
            out.prompt_len = usage["prompt_tokens"]
    return finished


async def list_models(session: aiohttp.ClientSession, base_url: str, headers: dict[str, str]) -> list[str]:
    """Ids from GET /v1/models; an unreachable server is a BenchError, a missing route an empty list."""
    aiohttp = bench_dependency("aiohttp")
    url = f"{base_url}/v1/models"
    try:
        async with session.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=30)) as response:
            if response.status in (401, 403):
                raise BenchError(f"{url}: HTTP {response.status} (check --api-key)")
            if response.status != 200:
                return []
            body = await response.json(content_type=None)
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
        raise BenchError(f"cannot reach the server at {base_url}: {e}") from e
    except json.JSONDecodeError:
        return []
    data = body.get("data") if isinstance(body, dict) else None
    return [m["id"] for m in data or [] if isinstance(m, dict) and isinstance(m.get("id"), str)]
