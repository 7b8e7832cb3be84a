"""`sutra simulate`: `sutra bench serve`'s workload and report in simulated time. Under a constant
step cost every latency is known in advance, so the report's figures are checked exactly; the result
JSON has the benchmark's keys; the concurrency limit, the cluster mode and bad inputs behave."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from sutra.bench.arrivals import arrival_offsets
from sutra.bench.client import RequestOutput
from sutra.bench.config import BenchConfig
from sutra.bench.datasets import SampleRequest
from sutra.bench.errors import BenchError
from sutra.bench.report import compute_metrics
from sutra.bench.serve import BenchResult
from sutra.cli import main
from sutra.config import CacheConfig, EngineConfig, SchedulerConfig
from sutra.sim.profile import DecodePoint, PrefillPoint, Profile
from sutra.sim.simulate import run_simulation

STEP_S = 0.01  # every profiled step takes 10 ms: the fitted model is a constant


def constant_profile(path: Path, bytes_per_block: int = 1 << 20) -> Path:
    profile = Profile(
        model="const",
        dtype="float32",
        device="cpu",
        num_threads=1,
        block_size=16,
        machine="test",
        prefill=[PrefillPoint(c, x, STEP_S) for c in (16, 64, 256) for x in (0, 512)],
        decode=[DecodePoint(b, x, STEP_S) for b in (1, 8, 32) for x in (0, 512)],
        bytes_per_block=bytes_per_block,
        num_kv_blocks=1024,
        max_model_len=4096,
    )
    profile.save(path)
    return path


def engine(budget: int = 256, blocks: int | None = 1024) -> EngineConfig:
    return EngineConfig(
        cache=CacheConfig(num_blocks=blocks), scheduler=SchedulerConfig(max_num_batched_tokens=budget)
    )


def test_a_lone_request_at_a_time_has_the_latencies_the_cost_model_says(tmp_path: Path):
    # One request a second (evenly spaced) of 100-token prompts with 5 outputs: each finishes (60 ms)
    # long before the next arrives.
    bench = BenchConfig(
        num_prompts=20,
        request_rate=1.0,
        burstiness=math.inf,
        random_input_len=100,
        random_output_len=5,
        metric_percentiles=(50, 99),
    )
    bench_profile = constant_profile(tmp_path / "p.json")
    result = run_simulation(bench, engine(budget=64), bench_profile)
    m = result.metrics
    assert (m.completed, m.failed, m.total_output_tokens) == (20, 0, 100)
    # 100 tokens in chunks of 64: two steps to the first token, then one step per token.
    assert m.latencies["ttft"].percentiles_ms[99] == pytest.approx(2 * STEP_S * 1000)
    assert m.latencies["tpot"].median_ms == pytest.approx(STEP_S * 1000)
    assert m.latencies["e2el"].median_ms == pytest.approx(6 * STEP_S * 1000)
    # Requests are sent on the benchmark's own arrival schedule (same seed, same draws).
    expected = arrival_offsets(20, 1.0, math.inf, np.random.default_rng([bench.seed, 3]))
    assert [o.start_time for o in result.outputs] == pytest.approx(expected)
    assert m.duration_s == pytest.approx(expected[-1] + 6 * STEP_S)
    poisson = run_simulation(BenchConfig(num_prompts=20, request_rate=3.0), engine(), bench_profile)
    expected = arrival_offsets(20, 3.0, 1.0, np.random.default_rng([0, 3]))
    assert [o.start_time for o in poisson.outputs] == pytest.approx(expected)


def test_the_cli_prints_the_report_and_writes_the_benchmarks_json_and_png(tmp_path: Path, capsys):
    profile = constant_profile(tmp_path / "p.json")
    main(
        ["simulate", "--profile", str(profile), "--num-kv-blocks", "512", "--num-prompts", "30"]
        + ["--random-input-len", "64", "--random-output-len", "8", "--request-rate", "20"]
        + ["--metric-percentiles", "50,90,99", "--goodput", "ttft:1000", "--save-result", "--plot"]
        + ["--result-dir", str(tmp_path), "--result-filename", "sim.json"]
    )
    printed = capsys.readouterr().out
    assert "============ Serving Benchmark Result ============" in printed
    assert "Successful requests:                     30\n" in printed
    assert "Request goodput (req/s):" in printed and "P90 ITL (ms):" in printed
    assert (tmp_path / "sim.png").is_file()
    record = json.loads((tmp_path / "sim.json").read_text())
    assert record["completed"] == 30 and record["simulation"]["num_kv_blocks"] == 512
    assert record["base_url"] == f"simulated:{profile}"
    # The benchmark's own result keys, every one of them, from the same config.
    bench = BenchConfig(metric_percentiles=(50, 90, 99), goodput={"ttft": 1000.0})
    one = RequestOutput(success=True, prompt_len=4, output_tokens=2, ttft=0.1, itl=[0.1], latency=0.2)
    measured = BenchResult(
        bench, "m", [SampleRequest("x", 4, 2)], [one], compute_metrics([one], 1.0, bench.goodput, (50, 90, 99)),
        started_at=__import__("datetime").datetime.now(), run_start=0.0,
    )  # fmt: skip
    assert set(record) - {"simulation"} == set(measured.to_json())


def test_the_concurrency_limit_holds_requests_back_until_one_finishes(tmp_path: Path):
    bench = BenchConfig(num_prompts=10, random_input_len=32, random_output_len=4, max_concurrency=1)
    result = run_simulation(bench, engine(), constant_profile(tmp_path / "p.json"))
    spans = sorted((o.start_time, o.start_time + o.latency) for o in result.outputs)
    assert all(end <= next_start + 1e-9 for (_, end), (next_start, _) in zip(spans, spans[1:], strict=False))
    assert result.metrics.peak_concurrent_requests == 1
    # Each waits only for its turn: TTFT is its own prefill (one step), not the queue.
    assert result.metrics.latencies["ttft"].mean_ms == pytest.approx(STEP_S * 1000)


def test_the_kv_pool_is_sized_as_the_engine_would_size_it(tmp_path: Path):
    profile = constant_profile(tmp_path / "p.json", bytes_per_block=2**20)
    config = EngineConfig(cache=CacheConfig(kv_cache_memory_gb=0.25))
    bench = BenchConfig(num_prompts=2, random_input_len=16, random_output_len=2)
    result = run_simulation(bench, config, profile)
    assert result.extra["simulation"]["num_kv_blocks"] == 256  # 0.25 GiB / 1 MiB


def test_several_instances_share_the_load(tmp_path: Path):
    bench = BenchConfig(num_prompts=40, random_input_len=200, random_output_len=20, request_rate=math.inf)
    profile = constant_profile(tmp_path / "p.json")
    one = run_simulation(bench, engine(), profile)
    two = run_simulation(bench, engine(), profile, instances=2, dispatch="round-robin")
    assert two.metrics.completed == 40 and two.extra["simulation"]["instances"] == 2
    assert two.metrics.duration_s < one.metrics.duration_s


def test_bad_inputs_are_clear_errors(tmp_path: Path):
    profile = constant_profile(tmp_path / "p.json", bytes_per_block=0)
    bench = BenchConfig(num_prompts=2, random_input_len=16, random_output_len=2)
    with pytest.raises(BenchError, match="--num-kv-blocks"):
        run_simulation(bench, EngineConfig(), profile)
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "hello there"}\n')
    no_length = BenchConfig(dataset_name="jsonl", dataset_path=str(rows), num_prompts=1)
    with pytest.raises(BenchError, match="output length"):
        run_simulation(no_length, engine(), profile)
    limited = BenchConfig(num_prompts=2, random_input_len=16, random_output_len=2, max_concurrency=1)
    with pytest.raises(BenchError, match="--max-concurrency"):
        run_simulation(limited, engine(), profile, instances=2)
    with pytest.raises(SystemExit):
        main(["simulate", "--profile", str(tmp_path / "missing.json"), "--num-kv-blocks", "8"])
