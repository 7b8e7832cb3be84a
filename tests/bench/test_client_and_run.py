"""The client and a whole run against a stub server whose timing and answers are known."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

from sutra.bench.arrivals import arrival_offsets
from sutra.bench.client import SseDecoder
from sutra.bench.config import BenchConfig
from sutra.bench.datasets import SampleRequest
from sutra.bench.errors import BenchError
from sutra.bench.serve import BenchResult, run_benchmark_async

from .stub_server import StubServer

T = TypeVar("T")


def _with_server(server: StubServer, body: Callable[[str], Awaitable[T]]) -> T:
    async def main() -> T:
        base_url = await server.start()
        try:
            return await body(base_url)
        finally:
            await server.stop()

    return asyncio.run(main())


def _run(server: StubServer, requests: list[SampleRequest], **config: Any) -> BenchResult:
    async def body(base_url: str) -> BenchResult:
        cfg = BenchConfig(base_url=base_url, disable_tqdm=True, **config)
        return await run_benchmark_async(cfg, requests)

    return _with_server(server, body)


def _prompts(n: int, output_len: int | None = 4) -> list[SampleRequest]:
    return [SampleRequest(f"prompt number {i}", 3, output_len) for i in range(n)]


def test_completions_run_records_every_request():
    server = StubServer(first_token_delay=0.03, token_delay=0.01)
    result = _run(server, _prompts(6), max_concurrency=2, api_key="k-123")
    assert result.model == "stub-model"  # the first id of /v1/models
    assert result.metrics.completed == 6 and result.metrics.failed == 0
    for out in result.outputs:
        assert out.success and out.error == ""
        assert out.output_tokens == 4 and out.output_tokens_from_usage
        assert out.prompt_len == 7  # the server's count replaces the dataset's
        assert out.ttft >= 0.03
        assert len(out.itl) == 3 and all(gap >= 0.009 for gap in out.itl)
        assert out.ttft < out.latency
        assert out.latency == pytest.approx(out.ttft + sum(out.itl))
        assert out.generated_text == " t0 t1 t2 t3"
    assert server.max_in_flight == 2  # --max-concurrency holds, and is reached
    assert result.metrics.peak_concurrent_requests <= 2
    payload = server.payloads[0]
    assert payload["model"] == "stub-model" and payload["prompt"].startswith("prompt number")
    assert payload["stream"] is True and payload["stream_options"] == {"include_usage": True}
    assert payload["max_tokens"] == 4 and payload["ignore_eos"] is True
    assert set(server.auth_headers) == {"Bearer k-123"}


def test_chat_role_chunk_is_not_the_first_token():
    server = StubServer(first_token_delay=0.15)
    result = _run(server, _prompts(2), endpoint="/v1/chat/completions", model="named")
    assert server.payloads[0]["messages"] == [{"role": "user", "content": "prompt number 0"}]
    assert server.payloads[0]["model"] == "named"
    for out in result.outputs:
        assert out.success
        assert out.ttft >= 0.15  # timed from the first content, not the role-only chunk
        assert out.output_tokens == 4 and out.generated_text == " t0 t1 t2 t3"


def test_without_usage_tokens_are_counted_from_chunks():
    result = _run(StubServer(send_usage=False), _prompts(3, output_len=5))
    for out in result.outputs:
        assert out.success and not out.output_tokens_from_usage
        assert out.output_tokens == 5
        assert out.prompt_len == 3  # the dataset's count stands
    assert result.metrics.total_output_tokens == 15


def test_failed_requests_are_recorded_and_excluded():
    requests = [*_prompts(3), SampleRequest("please FAIL", 3, 4)]
    result = _run(StubServer(), requests)
    assert result.metrics.completed == 3 and result.metrics.failed == 1
    failed = result.outputs[3]
    assert not failed.success and failed.error.startswith("HTTP 500")
    assert "refused" in failed.error
    assert result.errors == [failed.error]
    assert result.metrics.total_output_tokens == 12
    assert result.metrics.total_input_tokens == 21


def test_stream_cut_short_is_a_failure():
    result = _run(StubServer(end_stream_early=True), _prompts(1))
    assert not result.outputs[0].success
    assert "without [DONE] or a finish reason" in result.outputs[0].error


def test_no_ignore_eos_and_no_output_len():
    server = StubServer()
    requests = [SampleRequest("a", 1, 3), SampleRequest("b", 1, None)]
    result = _run(server, requests, ignore_eos=False)
    assert "ignore_eos" not in server.payloads[0] and server.payloads[0]["max_tokens"] == 3
    assert "max_tokens" not in server.payloads[1] and "ignore_eos" not in server.payloads[1]
    assert result.metrics.completed == 2


def test_requests_are_sent_on_the_arrival_schedule():
    n, rate, seed = 8, 20.0, 3
    result = _run(StubServer(), _prompts(n, output_len=1), request_rate=rate, seed=seed)
    expected = arrival_offsets(n, rate, 1.0, np.random.default_rng([seed, 3]))
    sent = [o.start_time - result.run_start for o in result.outputs]
    for actual, planned in zip(sent, expected, strict=True):
        assert planned - 0.002 <= actual <= planned + 0.25  # never early; late only by scheduling noise
    assert result.metrics.duration_s >= expected[-1]


def test_run_writes_json_and_png(tmp_path: Path):
    result = _run(
        StubServer(),
        _prompts(4),
        save_result=True,
        plot=True,
        result_dir=str(tmp_path / "out"),
        result_filename="r.json",
        goodput={"ttft": 10_000.0},
    )
    assert result.json_path == tmp_path / "out" / "r.json"
    data = json.loads(result.json_path.read_text())
    assert data["completed"] == 4 and data["request_goodput"] > 0
    assert data["model_id"] == "stub-model"
    assert result.plot_path is not None and result.plot_path.read_bytes().startswith(b"\x89PNG")


def test_unreachable_server_is_a_clear_error():
    async def body() -> None:
        cfg = BenchConfig(base_url="http://127.0.0.1:9", disable_tqdm=True)
        await run_benchmark_async(cfg, _prompts(1))

    with pytest.raises(BenchError, match="cannot reach the server at http://127.0.0.1:9"):
        asyncio.run(body())


def test_server_without_models_needs_model_flag():
    with pytest.raises(BenchError, match="lists no model; pass --model"):
        _run(StubServer(models=[]), _prompts(1))


def test_chat_messages_need_the_chat_endpoint():
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(BenchError, match="--endpoint /v1/chat/completions"):
        _run(StubServer(), [SampleRequest(messages, 5, 2)])


def test_sse_decoder_handles_split_lines_comments_and_crlf():
    decoder = SseDecoder()
    assert decoder.feed(b'data: {"a"') == []
    assert decoder.feed(b": 1}\r\n\r\n: keep-alive\n\nevent: x\ndata: [DO") == ['{"a": 1}']
    assert decoder.feed(b"NE]\n\n") == ["[DONE]"]
    assert decoder.feed(b"data:{}") == []
    assert decoder.flush() == ["{}"]


def test_min_tokens_is_sent_when_asked():
    server = StubServer()
    _run(server, [SampleRequest("a", 1, 3), SampleRequest("b", 1, None)], send_min_tokens=True)
    assert server.payloads[0]["min_tokens"] == 3 and server.payloads[0]["max_tokens"] == 3
    assert "min_tokens" not in server.payloads[1]
