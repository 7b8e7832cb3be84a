"""`sutra bench serve` on the command line: flags, clean errors, and a whole run as a subprocess."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sutra.bench.cli import config_from_args
from sutra.bench.errors import BenchError
from sutra.cli import build_parser

from .stub_server import StubServer


def _config(*flags: str):
    return config_from_args(build_parser().parse_args(["bench", "serve", *flags]))


def _sutra(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sutra.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_flags_fill_the_config(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    config = _config(
        "--host", "10.0.0.5", "--endpoint", "/v1/chat/completions", "--dataset-name", "sharegpt",
        "--num-prompts", "12", "--request-rate", "2.5", "--burstiness", "0.5", "--max-concurrency", "3",
        "--goodput", "ttft:500", "tpot:50", "--percentile-metrics", "ttft,e2el",
        "--metric-percentiles", "50,90,99.9", "--prefix-len", "8", "--no-ignore-eos", "--seed", "4",
    )  # fmt: skip
    assert config.request_url == "http://10.0.0.5:8000/v1/chat/completions"
    assert config.chat and config.dataset_name == "sharegpt" and config.num_prompts == 12
    assert (config.request_rate, config.burstiness, config.max_concurrency) == (2.5, 0.5, 3)
    assert config.goodput == {"ttft": 500.0, "tpot": 50.0}
    assert config.percentile_metrics == ("ttft", "e2el")
    assert config.metric_percentiles == (50.0, 90.0, 99.9)
    assert (config.prefix_len, config.ignore_eos, config.seed, config.api_key) == (8, False, 4, None)


def test_defaults_and_base_url(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OPENAI_API_KEY", "from-env")
    config = _config()
    assert config.request_url == "http://127.0.0.1:8000/v1/completions"
    assert config.request_rate == float("inf") and config.percentile_metrics == ("ttft", "tpot", "itl")
    assert config.metric_percentiles == (99.0,) and config.api_key == "from-env"
    assert _config("--port", "9001").server_url == "http://127.0.0.1:9001"
    # --base-url wins, and a trailing /v1 is not doubled
    assert _config("--base-url", "http://h:1/v1/", "--port", "5").request_url == "http://h:1/v1/completions"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--goodput", "ttft"], "expected METRIC:MS"),
        (["--goodput", "itl:5"], "expected METRIC:MS"),
        (["--goodput", "ttft:fast"], "is not a number"),
        (["--goodput", "e2el:-1"], "must be a finite number >= 0"),
        (["--percentile-metrics", "ttft,p99"], "choose from"),
        (["--metric-percentiles", "0"], "in (0, 100]"),
        (["--request-rate", "0"], "--request-rate must be positive"),
        (["--burstiness", "-1"], "--burstiness must be positive"),
        (["--max-concurrency", "0"], "--max-concurrency must be >= 1"),
        (["--random-range-ratio", "1"], "in [0, 1)"),
        (["--num-prompts", "0"], "at least 1"),
        (["--endpoint", "/v1/embeddings"], "expected /v1/completions or /v1/chat/completions"),
        (["--base-url", "localhost:8000"], "expected http://host:port"),
        (["--dataset-name", "jsonl"], "needs --dataset-path"),
    ],
)
def test_bad_flags_are_bench_errors(flags: list[str], message: str):
    with pytest.raises(BenchError) as e:
        _config(*flags)
    assert message in str(e.value)


def test_unreachable_server_exits_nonzero_without_traceback():
    result = _sutra("bench", "serve", "--port", "9", "--num-prompts", "2", "--random-input-len", "8")
    assert result.returncode == 1
    assert "error: cannot reach the server at http://127.0.0.1:9" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_goodput_exits_nonzero_without_traceback():
    result = _sutra("bench", "serve", "--goodput", "ttft=5")
    assert result.returncode == 1
    assert "error: --goodput ttft=5: expected METRIC:MS" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture
def stub_url() -> Iterator[str]:
    """The stub server on its own thread, so a subprocess can talk to it."""
    server = StubServer()
    loop = asyncio.new_event_loop()
    started: concurrent.futures.Future[str] = concurrent.futures.Future()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        started.set_result(loop.run_until_complete(server.start()))
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield started.result(timeout=10)
    asyncio.run_coroutine_threadsafe(server.stop(), loop).result(timeout=10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)
    loop.close()


def test_cli_run_prints_the_block_and_writes_files(stub_url: str, tmp_path: Path):
    result = _sutra(
        "bench", "serve", "--base-url", stub_url, "--num-prompts", "5", "--random-input-len", "16",
        "--random-output-len", "3", "--request-rate", "50", "--disable-tqdm", "--save-result", "--plot",
        "--result-dir", str(tmp_path), "--result-filename", "cli.json", "--goodput", "e2el:60000",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "============ Serving Benchmark Result ============" in out
    assert "Successful requests:                     5\n" in out
    assert "Failed requests:                         0\n" in out
    assert "Request rate configured (RPS):           50.00\n" in out
    assert "Total input tokens:                      35\n" in out  # the stub reports 7 per prompt
    assert "Total generated tokens:                  15\n" in out
    assert "Request goodput (req/s):" in out
    assert "---------------Time to First Token----------------" in out
    assert "P99 ITL (ms):" in out
    assert json.loads((tmp_path / "cli.json").read_text())["completed"] == 5
    assert (tmp_path / "cli.png").is_file()


def test_cli_run_where_every_request_fails_exits_nonzero(stub_url: str, tmp_path: Path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "FAIL me", "output_len": 2}\n')
    result = _sutra(
        "bench", "serve", "--base-url", stub_url, "--dataset-name", "jsonl", "--dataset-path", str(prompts),
        "--num-prompts", "2", "--disable-tqdm",
    )  # fmt: skip
    assert result.returncode == 1
    assert "Failed requests:                         2" in result.stdout
    assert "HTTP 500" in result.stderr and "error: all 2 requests failed" in result.stderr
    assert "Traceback" not in result.stderr
