"""With --api-key, no request reaches anything but /health and /metrics without a valid key, whatever
its Host header or path spelling says (raw HTTP over a socket, so nothing normalises the request)."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

import httpx
import openai
import pytest

from tests.server_process import run_server

pytestmark = pytest.mark.slow

KEY = "sk-alice"


@pytest.fixture(scope="module")
def server():
    with run_server("--num-kv-blocks", "64", "--api-key", f"alice:{KEY}", api_key=KEY) as handle:
        yield handle


def _raw(server, target: str, host: str | None = None, key: str | None = None, method: str = "GET") -> int:
    """Send one request exactly as written; returns the status code."""
    url = urlsplit(server.base_url)
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host if host is not None else url.netloc}"]
    if key is not None:
        lines.append(f"Authorization: Bearer {key}")
    lines += ["Content-Length: 0", "Connection: close", "", ""]
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall("\r\n".join(lines).encode("latin-1"))
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    status_line = response.split(b"\r\n", 1)[0].decode()
    return int(status_line.split()[1])


@pytest.mark.parametrize(
    "target,host",
    [
        ("/v1/models", None),
        # request.url is rebuilt from Host: these make its path "" or "/health" in Starlette < 1.0.1.
        ("/v1/models", "x?"),
        ("/v1/models", "a/?x="),
        ("/v1/models", "x/health?"),
        ("/v1/models", "x#"),
        # Path spellings that do not start with "/v1" as written.
        ("//v1/models", None),
        ("/%2Fv1/models", None),
        ("/v1%2Fmodels", None),
        ("/%76%31/models", None),
        ("/V1/models", None),
        ("/v1/../v1/models", None),
        ("/./v1/models", None),
        ("http://127.0.0.1/v1/models", None),  # absolute form
        # The API's documentation and schema, and paths that match no route.
        ("/docs", None),
        ("/redoc", None),
        ("/openapi.json", None),
        ("/docs/oauth2-redirect", None),
        ("/health/", None),
        ("/nothing-here", None),
    ],
)
def test_no_path_or_host_trick_skips_the_key(server, target, host):
    assert _raw(server, target, host) == 401
    assert _raw(server, target, host, key="sk-wrong") == 401


@pytest.mark.parametrize("target", ["/docs", "/redoc", "/openapi.json", "/v1/models"])
def test_documentation_follows_the_key_rule(server, target):
    assert _raw(server, target, key=KEY) == 200


@pytest.mark.parametrize("host", [None, "x?", "a/?x="])
@pytest.mark.parametrize("target", ["/health", "/metrics"])
def test_health_and_metrics_stay_open(server, target, host):
    assert _raw(server, target, host) == 200


def test_only_a_valid_bearer_key_is_served(server):
    body = {"model": server.model, "prompt": "Hi", "max_tokens": 1}
    url = f"{server.base_url}/v1/completions"
    for auth in [None, "Bearer", f"Basic {KEY}", f"Bearer {KEY}x", f"Bearer {KEY[:-1]}"]:
        headers = {} if auth is None else {"Authorization": auth}
        response = httpx.post(url, json=body, headers=headers, timeout=60)
        assert response.status_code == 401, auth
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert (
        httpx.post(url, json=body, headers={"Authorization": f"bearer {KEY}"}, timeout=60).status_code == 200
    )
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="sk-wrong", max_retries=0).models.list()
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == [server.model]
