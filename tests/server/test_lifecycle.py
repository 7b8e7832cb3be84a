"""The server's life: /health tells the truth, a dead engine loop fails its waiters at once, SIGTERM
drains (503 for newcomers, in-flight requests finish or end cleanly, exit 0), request logs, and an
engine that cannot schedule anything does not spin a core."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

from sutra.config import CacheConfig, EngineConfig, ModelConfig
from sutra.engine.async_engine import AsyncEngine
from sutra.engine.client import EngineListener
from sutra.engine.engine import LLMEngine
from sutra.server.app import create_app
from sutra.server.common import ServerState
from sutra.server.metrics import ServerMetrics
from sutra.server.request_log import enable_request_log
from tests.server_process import ServerHandle, run_server

TIMEOUT_S = 60.0


def _events(response: httpx.Response) -> Iterator[dict | str]:
    """Server-sent events: JSON payloads, then the "[DONE]" sentinel."""
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            yield data if data == "[DONE]" else json.loads(data)


# ---- an in-process server (a random tiny model), so a test can reach into its engine loop ----------
@contextlib.contextmanager
def _in_process_server(
    *listeners: EngineListener, log_text: bool = False, max_waiting_requests: int | None = None
) -> Iterator[str]:
    engine = LLMEngine(EngineConfig(ModelConfig(model="random:tiny-llama"), CacheConfig(num_blocks=256)))
    aengine = AsyncEngine(engine, max_waiting_requests=max_waiting_requests)
    aengine.listeners.extend(listeners)
    if log_text:
        enable_request_log(aengine, include_text=True)
    state = ServerState(engine=aengine, model_name="tiny", metrics=ServerMetrics("tiny"))
    server = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        host, port = server.servers[0].sockets[0].getsockname()[:2]
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(TIMEOUT_S)


class _LoopKiller(BaseException):
    """Not an Exception: nothing inside the engine loop catches it, so the loop itself ends."""


class _PoisonListener:
    """Ends the engine loop at the first step of a request from the client "poison"."""

    def on_step(self, engine: AsyncEngine, outputs: list) -> None:
        if any((info := engine.request_info(d.request_id)) and info.client == "poison" for d in outputs):
            raise _LoopKiller("poisoned")

    def on_abort(self, engine: AsyncEngine, request_id: str) -> None:
        pass


def test_a_dead_engine_loop_fails_every_waiter_at_once_and_health_says_503():
    with _in_process_server(_PoisonListener()) as url:
        assert httpx.get(f"{url}/health").status_code == 200
        body = {"prompt": "Once upon a time", "max_tokens": 1000, "ignore_eos": True}
        with httpx.stream(
            "POST",
            f"{url}/v1/completions",
            json={**body, "stream": True, "user": "victim"},
            timeout=TIMEOUT_S,
        ) as victim:
            events = _events(victim)
            assert next(events)["choices"][0]["text"] is not None  # it is running
            poison = httpx.post(
                f"{url}/v1/completions", json={**body, "max_tokens": 5, "user": "poison"}, timeout=TIMEOUT_S
            )
            rest = list(events)  # ends now: no waiter hangs on a dead loop
        assert poison.status_code == 500
        assert "engine loop stopped (_LoopKiller: poisoned)" in poison.json()["error"]["message"]
        assert rest[-1] == "[DONE]"
        assert "_LoopKiller: poisoned" in rest[-2]["error"]["message"]
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503
        assert health.json()["error"]["code"] == "engine_dead"
        later = httpx.post(f"{url}/v1/completions", json={**body, "max_tokens": 5}, timeout=TIMEOUT_S)
        assert later.status_code == 500 and "engine loop stopped" in later.json()["error"]["message"]


def test_request_text_is_logged_only_when_asked(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="sutra.requests")
    with _in_process_server(log_text=True) as url:
        reply = httpx.post(
            f"{url}/v1/completions",
            json={"prompt": "The zebra", "max_tokens": 3, "ignore_eos": True},
            timeout=TIMEOUT_S,
        )
        assert reply.status_code == 200
        text = reply.json()["choices"][0]["text"]
    lines = [r.getMessage() for r in caplog.records if r.name == "sutra.requests"]
    assert len(lines) == 1
    assert 'prompt="The zebra"' in lines[0] and f"output={json.dumps(text, ensure_ascii=False)}" in lines[0]


def test_a_batch_that_could_never_fit_the_waiting_queue_is_a_400_not_a_503():
    with _in_process_server(max_waiting_requests=2) as url:
        reply = httpx.post(
            f"{url}/v1/completions", json={"prompt": ["a", "b", "c"], "max_tokens": 1}, timeout=TIMEOUT_S
        )
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert (
            error["param"] == "prompt" and "3 prompts" in error["message"] and "at most 2" in error["message"]
        )
        fits = httpx.post(
            f"{url}/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 1}, timeout=TIMEOUT_S
        )
        assert fits.status_code == 200 and len(fits.json()["choices"]) == 2


# ---- a real `sutra serve` process ----------------------------------------------------------------
def _http_status_of_new_request(server: ServerHandle) -> httpx.Response:
    return httpx.post(
        f"{server.base_url}/v1/completions",
        json={"model": server.model, "prompt": "Hello", "max_tokens": 2},
        timeout=TIMEOUT_S,
    )


def _wait_for_health(server: ServerHandle, status: int) -> httpx.Response:
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        health = httpx.get(f"{server.base_url}/health", timeout=TIMEOUT_S)
        if health.status_code == status or time.monotonic() > deadline:
            return health
        time.sleep(0.05)


@pytest.mark.slow
def test_sigterm_drains_refuses_newcomers_lets_the_stream_finish_and_exits_0():
    with run_server("--num-kv-blocks", "256") as server:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
        stream = client.completions.create(
            model=server.model,
            prompt="Write a long story about a lighthouse keeper.",
            max_tokens=200,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        chunks = iter(stream)
        text = next(chunks).choices[0].text
        server.stop(signal.SIGTERM)
        health = _wait_for_health(server, 503)
        assert health.status_code == 503 and health.json()["error"]["code"] == "server_shutting_down"
        refused = _http_status_of_new_request(server)
        assert refused.status_code == 503
        error = refused.json()["error"]
        assert error["code"] == "server_shutting_down" and "shutting down" in error["message"]
        finish = None
        for chunk in chunks:  # the stream in flight carries on to its end
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        assert finish == "length"
        assert server.wait_exit(TIMEOUT_S) == 0
        assert "SIGTERM: refusing new requests" in server.log()


@pytest.mark.slow
def test_the_shutdown_timeout_ends_requests_in_flight_cleanly_and_exits_0():
    with run_server("--num-kv-blocks", "256", "--shutdown-timeout", "1") as server:
        long = {"model": server.model, "prompt": "Count to ten thousand:", "max_tokens": 4000}
        long["ignore_eos"] = True
        whole: dict = {}

        def non_streaming() -> None:
            whole["reply"] = httpx.post(f"{server.base_url}/v1/completions", json=long, timeout=TIMEOUT_S)

        waiter = threading.Thread(target=non_streaming)
        with httpx.stream(
            "POST", f"{server.base_url}/v1/completions", json={**long, "stream": True}, timeout=TIMEOUT_S
        ) as response:
            events = _events(response)
            assert next(events)["choices"]
            waiter.start()
            deadline = time.monotonic() + TIMEOUT_S
            while server.metric("sutra:num_requests_running") != 2:
                assert time.monotonic() < deadline, "the second request never ran"
                time.sleep(0.05)
            started = time.monotonic()
            server.stop(signal.SIGTERM)
            rest = list(events)
            ended_after = time.monotonic() - started
        waiter.join(TIMEOUT_S)
        assert ended_after < 10  # the 1 s timeout, not the 4000 tokens
        assert rest[-1] == "[DONE]"
        error = rest[-2]["error"]
        assert error["code"] == "server_shutting_down" and "shut down before" in error["message"]
        reply = whole["reply"]
        assert reply.status_code == 503 and reply.json()["error"]["code"] == "server_shutting_down"
        assert server.wait_exit(TIMEOUT_S) == 0
        assert "ended 2 requests still in flight" in server.log()


@pytest.mark.slow
def test_log_requests_writes_one_line_per_request_without_its_text():
    with run_server("--log-requests") as server:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
        reply = client.completions.create(
            model=server.model,
            prompt="The secret zebra password",
            max_tokens=5,
            temperature=0,
            user="alice",
            extra_body={"ignore_eos": True},
        )
        deadline = time.monotonic() + TIMEOUT_S
        while reply.id not in server.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        log = server.log()
    lines = [line for line in log.splitlines() if reply.id in line]
    assert len(lines) == 1, log
    line = lines[0]
    prompt_tokens = reply.usage.prompt_tokens
    for field in (
        'client="alice"',
        f"prompt_tokens={prompt_tokens}",
        "output_tokens=5",
        "finish_reason=length",
    ):
        assert field in line, line
    for timing in ("queue_s=", "ttft_s=", "e2e_s="):
        assert float(line.split(timing)[1].split()[0]) >= 0
    assert "zebra" not in log  # the prompt's text


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.slow
def test_a_throttled_request_does_not_spin_the_engine_loop(tmp_path: Path):
    policy = tmp_path / "rpm.json"
    policy.write_text(json.dumps({"policy": "rpm", "rpm_limit": 1}))
    with run_server("--scheduling-policy", "rpm", "--policy-config", str(policy)) as server:
        body = {"model": server.model, "prompt": "Hi", "max_tokens": 2, "user": "u"}
        assert (
            httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=TIMEOUT_S).status_code == 200
        )
        # The same client's second request this minute waits in the queue: no step can schedule it.
        with httpx.stream(
            "POST", f"{server.base_url}/v1/completions", json={**body, "stream": True}, timeout=TIMEOUT_S
        ):
            deadline = time.monotonic() + TIMEOUT_S
            while server.metric("sutra:num_requests_waiting") != 1:
                assert time.monotonic() < deadline, "the second request never queued"
                time.sleep(0.05)
            time.sleep(0.3)
            before, start = _cpu_seconds(server.process.pid), time.monotonic()
            time.sleep(2.0)
            used = (_cpu_seconds(server.process.pid) - before) / (time.monotonic() - start)
        # Spinning on step() would use a whole core; waiting for a wakeup uses next to nothing.
        assert used < 0.25, f"the server used {used:.2f} of a core while nothing could run"
