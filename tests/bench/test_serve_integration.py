"""`sutra bench serve` against a real `sutra serve` on the default model (the `sutra_server` fixture)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sutra.bench import BenchConfig, run_benchmark
from sutra.bench.arrivals import arrival_offsets

pytestmark = pytest.mark.slow

NUM_PROMPTS = 8
INPUT_LEN = 32
OUTPUT_LEN = 8


def _config(server: Any, tmp_path: Path, **overrides: Any) -> BenchConfig:
    settings: dict[str, Any] = dict(
        base_url=server.base_url,
        model=server.model,
        api_key=server.api_key,
        dataset_name="random",
        random_input_len=INPUT_LEN,
        random_output_len=OUTPUT_LEN,
        num_prompts=NUM_PROMPTS,
        seed=0,
        disable_tqdm=True,
        save_result=True,
        plot=True,
        result_dir=str(tmp_path),
    )
    settings.update(overrides)
    return BenchConfig(**settings)


def _check_run(result: Any) -> None:
    assert result.errors == []
    assert result.metrics.completed == NUM_PROMPTS and result.metrics.failed == 0
    for request, out in zip(result.requests, result.outputs, strict=True):
        assert out.success, out.error
        assert request.prompt_len == INPUT_LEN  # the dataset built exact lengths
        assert out.prompt_len == INPUT_LEN  # and the server counted the same prompt tokens
        assert out.output_tokens == OUTPUT_LEN  # max_tokens and ignore_eos honored
        assert 0 < out.ttft <= out.latency
        assert len(out.itl) == len(out.chunk_times) - 1
    m = result.metrics
    assert m.total_input_tokens == NUM_PROMPTS * INPUT_LEN
    assert m.total_output_tokens == NUM_PROMPTS * OUTPUT_LEN
    assert m.output_throughput > 0 and m.latencies["tpot"].mean_ms > 0

    data = json.loads(result.json_path.read_text())
    assert data["completed"] == NUM_PROMPTS
    assert data["output_lens"] == [OUTPUT_LEN] * NUM_PROMPTS
    assert data["model_id"] == result.model
    assert result.plot_path.read_bytes().startswith(b"\x89PNG")


def test_all_at_once(sutra_server: Any, tmp_path: Path):
    result = run_benchmark(_config(sutra_server, tmp_path, goodput={"e2el": 600_000.0}))
    _check_run(result)
    assert result.metrics.request_goodput == pytest.approx(result.metrics.request_throughput)
    assert result.metrics.peak_concurrent_requests > 1  # sent together, served concurrently


def test_poisson_rate_and_chat_endpoint(sutra_server: Any, tmp_path: Path):
    rate, seed = 4.0, 1
    config = _config(
        sutra_server,
        tmp_path,
        endpoint="/v1/chat/completions",
        request_rate=rate,
        seed=seed,
        max_concurrency=4,
    )
    result = run_benchmark(config)
    assert result.errors == []
    for out in result.outputs:
        assert out.success and out.output_tokens == OUTPUT_LEN
        assert out.prompt_len > INPUT_LEN  # the chat template wraps the random text
        assert 0 < out.ttft <= out.latency
    planned = arrival_offsets(NUM_PROMPTS, rate, 1.0, np.random.default_rng([seed, 3]))
    sent = sorted(o.start_time - result.run_start for o in result.outputs)
    assert all(s >= p - 0.002 for s, p in zip(sent, planned, strict=True))  # never ahead of schedule
    assert result.metrics.peak_concurrent_requests <= 4
    assert result.json_path is not None and result.json_path.is_file()
    assert result.plot_path is not None and result.plot_path.is_file()


def test_finite_rate_completions(sutra_server: Any, tmp_path: Path):
    result = run_benchmark(_config(sutra_server, tmp_path, request_rate=8.0, burstiness=0.5))
    _check_run(result)


def test_command_line(sutra_server: Any, tmp_path: Path):
    args = [
        "bench", "serve", "--base-url", sutra_server.base_url, "--model", sutra_server.model,
        "--dataset-name", "random", "--num-prompts", "4", "--random-input-len", str(INPUT_LEN),
        "--random-output-len", str(OUTPUT_LEN), "--request-rate", "inf", "--disable-tqdm",
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
        "--save-result", "--result-dir", str(tmp_path), "--result-filename", "cli.json",
    ]  # fmt: skip
    if sutra_server.api_key:
        args += ["--api-key", sutra_server.api_key]
    result = subprocess.run(
        [sys.executable, "-m", "sutra.cli", *args], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for line in [
        "============ Serving Benchmark Result ============",
        "Successful requests:                     4",
        "Failed requests:                         0",
        f"Total input tokens:                      {4 * INPUT_LEN}",
        f"Total generated tokens:                  {4 * OUTPUT_LEN}",
        "---------------Time to First Token----------------",
        "-----Time per Output Token (excl. 1st token)------",
        "---------------Inter-token Latency----------------",
        "----------------End-to-end Latency----------------",
        "==================================================",
    ]:
        assert line in out.splitlines(), line
    for label in ("Request throughput (req/s):", "P50 TTFT (ms):", "P99 E2EL (ms):", "Median ITL (ms):"):
        assert label in out
    assert json.loads((tmp_path / "cli.json").read_text())["completed"] == 4
