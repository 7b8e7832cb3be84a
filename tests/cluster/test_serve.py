"""A real `sutra serve --instances 2` (the default model, two Ray instances behind one front end),
through the official `openai` client, and its operator routes: a live migration of a streaming
request, a drain that stops an instance, and an instance added. One server: starting it takes a
while on two cores."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest

from tests.server_process import run_server

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ADMIN = "admin-secret"
PROMPT = "Write a long story about a lighthouse keeper."


def test_serve_with_two_instances_answers_completions_and_streaming_chat():
    pytest.importorskip("ray")
    args = ["--instances", "2", "--threads-per-instance", "1", "--num-kv-blocks", "128", "--admin-key", ADMIN]
    with run_server(*args) as server:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
        out = client.completions.create(
            model=server.model,
            prompt=["The capital of Japan is", "Once upon a time"],
            max_tokens=8,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert [c.index for c in out.choices] == [0, 1]
        assert all(c.finish_reason == "length" and c.text for c in out.choices)
        assert out.usage.completion_tokens == 16

        stream = client.chat.completions.create(
            model=server.model,
            messages=[{"role": "user", "content": "What is the capital of Japan?"}],
            max_tokens=24,
            temperature=0,
            stream=True,
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert "Tokyo" in text
        assert chunks[-1].choices[0].finish_reason == "stop"

        # /metrics sums the two instances' caches.
        assert server.metric("sutra:kv_cache_total_blocks") == 2 * 128
        server.wait_idle()
        check_admin_routes(server, client)
        server.stop()
        assert server.wait_exit(timeout=60) == 0


def admin(server, method: str, path: str, key: str | None = ADMIN, **kwargs) -> httpx.Response:
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    return httpx.request(method, f"{server.base_url}/admin{path}", headers=headers, timeout=300, **kwargs)


def check_admin_routes(server, client: openai.OpenAI) -> None:
    assert admin(server, "GET", "/instances", key=None).status_code == 401
    assert admin(server, "GET", "/instances", key="wrong").status_code == 401
    listed = admin(server, "GET", "/instances").json()["data"]
    assert sorted(row["id"] for row in listed) == ["i0", "i1"]
    assert all(row["load"]["total_blocks"] == 128 for row in listed)

    # A streaming request moves to the other instance while it runs; its text is the unmoved one's.
    request = {"model": server.model, "prompt": PROMPT, "max_tokens": 96, "temperature": 0}
    stream = client.completions.create(**request, stream=True, extra_body={"ignore_eos": True})
    chunks = [next(stream)]
    rest: list = []
    reader = threading.Thread(target=lambda: rest.extend(stream))
    reader.start()
    request_id = chunks[0].id
    holder = next(row["id"] for row in admin(server, "GET", "/instances").json()["data"] if row["requests"])
    other = "i1" if holder == "i0" else "i0"
    moved = admin(server, "POST", "/migrate", json={"request_id": request_id, "instance": other})
    assert moved.status_code == 200 and moved.json()["outcome"] == "migrated", moved.text
    reader.join(300)
    chunks += rest
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    unmoved = client.completions.create(**request, extra_body={"ignore_eos": True})
    assert text == unmoved.choices[0].text
    assert server.metric("sutra:migrations_total", outcome="migrated") == 1
    assert server.metric("sutra:instance_kv_cache_total_blocks", instance=other) == 128
    refused = admin(server, "POST", "/migrate", json={"request_id": "nobody", "instance": other})
    assert refused.status_code == 409 and "not in flight" in refused.json()["error"]["message"]

    # Drain and stop one instance: the other serves on; then add one back.
    drained = admin(server, "POST", "/drain", json={"instance": "i1"})
    assert drained.status_code == 200 and drained.json()["stopped"], drained.text
    assert [row["id"] for row in admin(server, "GET", "/instances").json()["data"]] == ["i0"]
    assert admin(server, "POST", "/drain", json={"instance": "i0"}).status_code == 409  # the last one
    assert client.completions.create(model=server.model, prompt="Hi", max_tokens=2).choices[0].text
    added = admin(server, "POST", "/instances")
    assert added.status_code == 201, added.text
    assert sorted(row["id"] for row in admin(server, "GET", "/instances").json()["data"]) == [
        "i0",
        added.json()["id"],
    ]


def test_serve_joins_a_running_ray_cluster_and_leaves_it_running(ray_session):
    """--ray-address: the instances are actors of the cluster given (here, the test run's own), and
    the server leaves that cluster running when it exits."""
    import ray

    address = ray.get_runtime_context().gcs_address
    args = ["--ray-address", address, "--model", "random:tiny-llama", "--num-kv-blocks", "64"]
    with run_server(*args, "--threads-per-instance", "1") as server:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
        out = client.completions.create(model=server.model, prompt="Hello", max_tokens=4, temperature=0)
        assert out.choices[0].finish_reason == "length"
        assert server.metric("sutra:kv_cache_total_blocks") == 64
        server.stop()
        assert server.wait_exit(timeout=60) == 0
    assert ray.is_initialized() and ray.cluster_resources().get("CPU") == 2  # still up
