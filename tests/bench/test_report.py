"""Metrics on hand-made request records: the numbers, the printed block, the JSON and the PNG."""

from __future__ import annotations

import json
import math
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from sutra.bench.client import RequestOutput
from sutra.bench.config import BenchConfig
from sutra.bench.datasets import SampleRequest
from sutra.bench.plot import plot_run
from sutra.bench.report import (
    compute_metrics,
    format_report,
    output_tokens_per_second,
    request_tpot,
    requests_in_flight,
)
from sutra.bench.serve import BenchResult, write_outputs

T0 = 100.0


def _ok(
    prompt_len: int, start: float, chunks: list[float], output_tokens: int | None = None
) -> RequestOutput:
    return RequestOutput(
        success=True,
        prompt_len=prompt_len,
        output_tokens=len(chunks) if output_tokens is None else output_tokens,
        ttft=chunks[0] - start,
        itl=[b - a for a, b in zip(chunks, chunks[1:], strict=False)],
        latency=chunks[-1] - start,
        start_time=start,
        chunk_times=chunks,
    )


def _records() -> list[RequestOutput]:
    return [
        # TTFT 0.1, 5 tokens 0.1 s apart: E2EL 0.5, TPOT (0.5 - 0.1) / 4 = 0.1
        _ok(10, T0, [T0 + 0.1, T0 + 0.2, T0 + 0.3, T0 + 0.4, T0 + 0.5]),
        # TTFT 0.3, 3 tokens 0.2 s apart: E2EL 0.7, TPOT 0.2
        _ok(20, T0 + 0.2, [T0 + 0.5, T0 + 0.7, T0 + 0.9]),
        # one token: TTFT = E2EL = 0.05, no TPOT
        _ok(1, T0 + 1.0, [T0 + 1.05]),
        # failed: none of its numbers may count
        RequestOutput(success=False, error="HTTP 500", prompt_len=99, ttft=9.0, latency=9.0, start_time=T0),
    ]


def test_counts_tokens_and_throughputs_exclude_failed_requests():
    m = compute_metrics(_records(), duration_s=2.0)
    assert (m.completed, m.failed) == (3, 1)
    assert m.total_input_tokens == 31
    assert m.total_output_tokens == 9
    assert m.request_throughput == pytest.approx(1.5)
    assert m.output_throughput == pytest.approx(4.5)
    assert m.total_token_throughput == pytest.approx(20.0)
    assert m.request_goodput is None


def test_latency_statistics():
    m = compute_metrics(_records(), duration_s=2.0, percentiles=(50, 99))
    ttft, tpot, itl, e2el = (m.latencies[k] for k in ("ttft", "tpot", "itl", "e2el"))
    assert ttft.mean_ms == pytest.approx(150.0)
    assert ttft.median_ms == pytest.approx(100.0)
    assert ttft.percentiles_ms[99] == pytest.approx(100 + 0.98 * 200)  # linear between 100 and 300
    # TPOT excludes the first token and the single-token request: samples 100 and 200 ms
    assert tpot.mean_ms == pytest.approx(150.0)
    assert tpot.percentiles_ms[50] == pytest.approx(150.0)
    assert tpot.percentiles_ms[99] == pytest.approx(199.0)
    # ITL pools every gap: four of 100 ms, two of 200 ms
    assert itl.mean_ms == pytest.approx(800 / 6)
    assert itl.median_ms == pytest.approx(100.0)
    assert e2el.mean_ms == pytest.approx((500 + 700 + 50) / 3)
    assert e2el.std_ms > 0


def test_tpot_excludes_the_first_token():
    record = _ok(1, 0.0, [1.0, 1.5, 2.0, 2.5])  # slow first token, then 0.5 s per token
    assert request_tpot(record) == pytest.approx(0.5)
    assert request_tpot(_ok(1, 0.0, [1.0])) is None


@pytest.mark.parametrize(
    "slos, good",
    [
        ({"ttft": 200}, 2),  # 100 and 50 ms pass, 300 fails
        ({"tpot": 150}, 2),  # 100 passes, 200 fails; a one-token request counts as TPOT 0
        ({"e2el": 600}, 2),  # 500 and 50 pass, 700 fails
        ({"ttft": 200, "e2el": 400}, 1),  # every SLO must hold: only the one-token request
        ({"ttft": 0}, 0),
        ({"ttft": 10_000, "tpot": 10_000, "e2el": 10_000}, 3),  # the failed request never counts
    ],
)
def test_goodput_counts_requests_meeting_every_slo(slos: dict[str, float], good: int):
    m = compute_metrics(_records(), duration_s=2.0, goodput_slos_ms=slos)
    assert m.request_goodput == pytest.approx(good / 2.0)


def test_peaks_over_time():
    records = _records()
    m = compute_metrics(records, duration_s=2.0)
    # second 0 holds the first request's 5 tokens and the second's 3; second 1 the last request's 1
    assert output_tokens_per_second(records) == [8.0, 1.0, 0.0]
    assert m.peak_output_throughput == 8.0
    # the first two overlap (0.2 s to 0.5 s); the third starts after both ended
    assert m.peak_concurrent_requests == 2
    times, counts = requests_in_flight(records)
    assert counts[-1] == 0 and max(counts) == 2
    assert times == sorted(times)


def test_back_to_back_requests_do_not_overlap():
    records = [_ok(1, 0.0, [0.5]), _ok(1, 0.5, [1.0]), _ok(1, 1.0, [1.5])]
    assert compute_metrics(records, 1.5).peak_concurrent_requests == 1


def test_bundled_chunks_are_weighted_by_usage_tokens():
    # 2 chunks but 6 tokens per the usage block: each chunk carries 3 tokens
    records = [_ok(4, 0.0, [0.2, 1.4], output_tokens=6)]
    assert output_tokens_per_second(records) == [3.0, 3.0, 0.0]
    assert compute_metrics(records, 1.4).total_output_tokens == 6


def test_no_successful_request_gives_zeros():
    m = compute_metrics([RequestOutput(error="boom")], duration_s=1.0, goodput_slos_ms={"ttft": 1})
    assert (m.completed, m.failed, m.request_goodput) == (0, 1, 0.0)
    assert m.latencies["ttft"].mean_ms == 0.0
    assert m.peak_output_throughput == 0.0 and m.peak_concurrent_requests == 0


def test_printed_block_matches_vllm_layout():
    m = compute_metrics(_records(), duration_s=2.0, goodput_slos_ms={"ttft": 200}, percentiles=(50, 99.9))
    text = format_report(m, request_rate=4.0, max_concurrency=8, percentile_metrics=("ttft", "tpot", "e2el"))
    lines = text.splitlines()
    assert lines[0] == "============ Serving Benchmark Result ============"
    assert lines[-1] == "=" * 50
    for line in [
        "Successful requests:                     3",
        "Failed requests:                         1",
        "Maximum request concurrency:             8",
        "Request rate configured (RPS):           4.00",
        "Benchmark duration (s):                  2.00",
        "Total input tokens:                      31",
        "Total generated tokens:                  9",
        "Request throughput (req/s):              1.50",
        "Request goodput (req/s):                 1.00",
        "Output token throughput (tok/s):         4.50",
        "Peak output token throughput (tok/s):    8.00",
        "Peak concurrent requests:                2",
        "Total Token throughput (tok/s):          20.00",
        "---------------Time to First Token----------------",
        "Mean TTFT (ms):                          150.00",
        "Median TTFT (ms):                        100.00",
        "P50 TTFT (ms):                           100.00",
        "-----Time per Output Token (excl. 1st token)------",
        "Mean TPOT (ms):                          150.00",
        "----------------End-to-end Latency----------------",
        "Median E2EL (ms):                        500.00",
    ]:
        assert line in lines, line
    assert any(line.startswith("P99.9 TTFT (ms):") for line in lines)
    assert "Inter-token Latency" not in text  # not among the selected metrics


def test_block_omits_unset_settings():
    text = format_report(compute_metrics(_records(), 2.0), request_rate=math.inf, max_concurrency=None)
    assert "Request rate configured" not in text
    assert "Maximum request concurrency" not in text
    assert "Request goodput" not in text
    assert "P99 ITL (ms):" in text and "E2EL" not in text


def _result(tmp_path: Path, **config: Any) -> BenchResult:
    outputs = _records()
    requests = [SampleRequest("x", o.prompt_len, 5) for o in outputs]
    cfg = BenchConfig(
        result_dir=str(tmp_path), api_key="secret", goodput={"ttft": 200.0}, request_rate=4.0, **config
    )
    return BenchResult(
        config=cfg,
        model="org/some model",
        requests=requests,
        outputs=outputs,
        metrics=compute_metrics(outputs, 2.0, cfg.goodput, cfg.metric_percentiles),
        started_at=datetime(2026, 1, 2, 3, 4, 5),
        run_start=T0,
    )


def test_json_and_png_are_written(tmp_path: Path):
    result = _result(tmp_path, save_result=True, plot=True)
    write_outputs(result, tmp_path)
    assert result.json_path == tmp_path / "sutra-bench-random-4qps-some_model-20260102-030405.json"
    assert result.plot_path == result.json_path.with_suffix(".png")
    data = json.loads(result.json_path.read_text())
    assert data["completed"] == 3 and data["failed"] == 1
    assert data["total_output_tokens"] == 9
    assert data["request_goodput"] == pytest.approx(1.0)
    assert data["mean_tpot_ms"] == pytest.approx(150.0)
    assert data["p99_tpot_ms"] == pytest.approx(199.0)
    assert data["output_lens"] == [5, 3, 1, 0]
    assert data["start_times"] == pytest.approx([0.0, 0.2, 1.0, 0.0])
    assert data["errors"] == ["", "", "", "HTTP 500"]
    assert data["goodput_slos_ms"] == {"ttft": 200.0}
    assert "api_key" not in data["config"] and "secret" not in result.json_path.read_text()
    png = result.plot_path.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_infinite_rate_is_valid_json(tmp_path: Path):
    result = _result(tmp_path, save_result=True, result_filename="run.json")
    result.config.request_rate = math.inf
    write_outputs(result, tmp_path)

    def reject(constant: str) -> None:
        raise AssertionError(f"{constant} is not valid JSON")

    data = json.loads((tmp_path / "run.json").read_text(), parse_constant=reject)
    assert data["request_rate"] == "inf"
    assert result.plot_path is None


def test_plot_without_successes(tmp_path: Path):
    path = plot_run([RequestOutput(error="x")], tmp_path / "empty.png", "nothing succeeded")
    assert path.read_bytes().startswith(b"\x89PNG")
