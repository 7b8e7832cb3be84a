"""Raw HTTP against a test server: bodies reach it exactly as sent, errors are checked as OpenAI's."""

from __future__ import annotations

import httpx


def post(server, path: str, body, headers: dict | None = None) -> httpx.Response:
    """POST a dict as JSON, or a str/bytes body as written (e.g. JSON holding NaN)."""
    kwargs = {"content": body} if isinstance(body, (str, bytes)) else {"json": body}
    return httpx.post(
        f"{server.base_url}{path}",
        headers={"content-type": "application/json", **(headers or {})},
        timeout=60,
        **kwargs,
    )


def assert_error(response: httpx.Response, status: int, param: str | None, *contains: str) -> dict:
    """An OpenAI error body with this status and param, whose message holds each of `contains`."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    for text in contains:
        assert text in error["message"], error
    return error


def assert_serving(server) -> None:
    """The engine still answers, and once idle holds no KV block."""
    ok = post(server, "/v1/completions", {"prompt": "Hello", "max_tokens": 2})
    assert ok.status_code == 200, ok.text
    server.wait_idle()
    assert server.metric("sutra:kv_cache_free_blocks") == server.metric("sutra:kv_cache_total_blocks")
