"""Every size a client controls has a limit (a `sutra serve` flag): a breach is a 400 naming the field
and the limit, or a 413 for the body, and the server goes on serving."""

from __future__ import annotations

import json
import socket
from urllib.parse import urlsplit

import httpx
import openai
import pytest

from tests.server_process import run_server

pytestmark = pytest.mark.slow

BODY_LIMIT = 64 * 1024
LIMIT_ARGS = {
    "--max-n": 3,
    "--max-stop-strings": 2,
    "--max-stop-string-chars": 8,
    "--max-stop-token-ids": 3,
    "--max-prompts-per-batch": 2,
    "--max-chat-messages": 3,
    "--max-user-chars": 10,
    "--max-body-bytes": BODY_LIMIT,
}
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server():
    args = [str(x) for pair in LIMIT_ARGS.items() for x in pair]
    with run_server("--num-kv-blocks", "128", *args) as handle:
        yield handle


def _post(server, path: str, body: dict | bytes, **kwargs) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        f"{server.base_url}{path}",
        content=content,
        headers={"content-type": "application/json"},
        timeout=60,
        **kwargs,
    )


def _assert_error(response: httpx.Response, status: int, param: str | None, *contains: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    for text in contains:
        assert text in error["message"]


def _assert_serving(server) -> None:
    ok = _post(server, "/v1/completions", {"prompt": "Hello", "max_tokens": 2})
    assert ok.status_code == 200, ok.text
    server.wait_idle()
    assert server.metric("sutra:kv_cache_free_blocks") == server.metric("sutra:kv_cache_total_blocks")


# (field values at the limit are served; one more is refused naming the field and the limit)
CASES = [
    ("/v1/completions", "n", 3, 4, "at most 3 choices"),
    ("/v1/chat/completions", "n", 3, 4, "at most 3 choices"),
    ("/v1/completions", "stop", ["a", "b"], ["a", "b", "c"], "at most 2 stop strings"),
    ("/v1/chat/completions", "stop", ["a", "b"], ["a", "b", "c"], "at most 2 stop strings"),
    ("/v1/completions", "stop", "x" * 8, "x" * 9, "at most 8 characters in a stop string"),
    ("/v1/completions", "stop_token_ids", [5, 6, 7], [5, 6, 7, 8], "at most 3 stop token ids"),
    ("/v1/completions", "prompt", ["a", "b"], ["a", "b", "c"], "at most 2 prompts"),
    ("/v1/completions", "user", "u" * 10, "u" * 11, "at most 10 characters in user"),
    ("/v1/chat/completions", "messages", USER * 3, USER * 4, "at most 3 messages"),
]


@pytest.mark.parametrize(("path", "field", "ok", "over", "message"), CASES)
def test_each_limit_refuses_one_over_and_serves_the_limit(server, path, field, ok, over, message):
    base = {"prompt": "hi"} if path == "/v1/completions" else {"messages": USER}
    served = _post(server, path, {**base, "max_tokens": 2, field: ok})
    assert served.status_code == 200, served.text
    _assert_error(_post(server, path, {**base, "max_tokens": 2, field: over}), 400, field, message)
    _assert_serving(server)


def test_a_token_id_prompt_is_one_prompt_not_a_batch(server):
    """A flat list of ids is a single prompt, however long: only batches count against the limit."""
    out = _post(server, "/v1/completions", {"prompt": [42] * 20, "max_tokens": 2})
    assert out.status_code == 200 and len(out.json()["choices"]) == 1
    _assert_error(_post(server, "/v1/completions", {"prompt": [[42]] * 3}), 400, "prompt", "at most 2")


def test_limits_through_the_openai_client(server):
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=server.model, prompt="hi", n=4, max_tokens=2)
    assert e.value.body["param"] == "n" and "at most 3" in e.value.body["message"]


def test_body_over_the_limit_by_content_length_is_413(server):
    body = json.dumps({"prompt": "x" * BODY_LIMIT, "max_tokens": 2}).encode()
    _assert_error(_post(server, "/v1/completions", body), 413, None, f"limit of {BODY_LIMIT} bytes")
    at_limit = json.dumps({"prompt": "hi", "max_tokens": 2, "pad": ""}).encode()
    at_limit = at_limit.replace(b'"pad": ""', b'"pad": "' + b" " * (BODY_LIMIT - len(at_limit)) + b'"')
    assert len(at_limit) == BODY_LIMIT
    assert _post(server, "/v1/completions", at_limit).status_code == 200
    _assert_serving(server)


def test_chunked_body_over_the_limit_is_413(server):
    def chunks():  # no content-length: httpx sends it chunked
        yield b'{"prompt": "'
        for _ in range(BODY_LIMIT // 4096 + 1):
            yield b"x" * 4096
        yield b'", "max_tokens": 2}'

    response = httpx.post(
        f"{server.base_url}/v1/completions",
        content=chunks(),
        headers={"content-type": "application/json"},
        timeout=60,
    )
    _assert_error(response, 413, None, f"limit of {BODY_LIMIT} bytes")
    _assert_serving(server)


def _raw_exchange(server, head: bytes, body: bytes) -> bytes:
    """Send a request head and part of a body, never the rest; return the response the server sent."""
    url = urlsplit(server.base_url)
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(head + body)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def test_oversized_bodies_are_refused_before_they_are_read(server):
    """The server answers 413 while the body is still unsent, so it never holds more than the limit."""
    head = b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
    declared = _raw_exchange(server, head + b"content-length: 1000000000\r\n\r\n", b'{"prompt": "')
    assert declared.startswith(b"HTTP/1.1 413"), declared[:200]
    assert b'"code":"request_too_large"' in declared
    piece = b"x" * 8192
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(BODY_LIMIT // len(piece) + 1))
    streamed = _raw_exchange(server, head + b"transfer-encoding: chunked\r\n\r\n", chunked)
    assert streamed.startswith(b"HTTP/1.1 413"), streamed[:200]
    _assert_serving(server)


def test_default_limits(sutra_server):
    """The defaults: 64 stop strings of up to 1024 characters, 1024 stop token ids, 256 prompts per
    request, 2048 chat messages, n up to 128, a 16 MiB body."""
    url = f"{sutra_server.base_url}/v1/completions"
    cases = [
        ({"stop": ["s"] * 65}, "stop", "at most 64 stop strings"),
        ({"stop": "s" * 1025}, "stop", "at most 1024 characters"),
        ({"stop_token_ids": [5] * 1025}, "stop_token_ids", "at most 1024 stop token ids"),
        ({"prompt": ["a"] * 257}, "prompt", "at most 256 prompts"),
        ({"n": 129}, "n", "at most 128 choices"),
        ({"user": "u" * 257}, "user", "at most 256 characters"),
    ]
    for extra, param, message in cases:
        response = httpx.post(url, json={"prompt": "hi", "max_tokens": 2, **extra}, timeout=60)
        _assert_error(response, 400, param, message)
    chat = {"messages": USER * 2049, "max_tokens": 2}
    response = httpx.post(f"{sutra_server.base_url}/v1/chat/completions", json=chat, timeout=60)
    _assert_error(response, 400, "messages", "at most 2048 messages")
    head = b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
    over = _raw_exchange(sutra_server, head + b"content-length: %d\r\n\r\n" % (16 * 2**20 + 1), b"{")
    assert over.startswith(b"HTTP/1.1 413") and b"limit of 16777216 bytes" in over
