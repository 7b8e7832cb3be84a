"""A serving benchmark run: send the prompts on an arrival schedule, collect timings, compute the metrics.

    from sutra.bench import BenchConfig, run_benchmark

    result = run_benchmark(BenchConfig(base_url="http://127.0.0.1:8000", num_prompts=64, request_rate=4))
    print(result.report())

`run_benchmark_async` is the same for callers already inside an event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from sutra.bench.arrivals import arrival_offsets, describe_arrivals
from sutra.bench.client import (
    RequestOutput,
    auth_headers,
    build_payload,
    list_models,
    send_request,
)
from sutra.bench.config import BenchConfig
from sutra.bench.datasets import SampleRequest, build_requests, describe_lengths
from sutra.bench.errors import BenchError, bench_dependency
from sutra.bench.report import BenchMetrics, compute_metrics, format_report, metrics_json, requests_json
from sutra.bench.tokenizer import load_tokenizer

if TYPE_CHECKING:
    import aiohttp


@dataclass
class BenchResult:
    config: BenchConfig
    model: str  # the model name sent with every request
    requests: list[SampleRequest]
    outputs: list[RequestOutput]  # one per request, in request order
    metrics: BenchMetrics
    started_at: datetime  # wall-clock time the arrival schedule started
    run_start: float  # time.perf_counter() at that moment; RequestOutput times are on this clock
    json_path: Path | None = None
    plot_path: Path | None = None
    errors: list[str] = field(default_factory=list)  # distinct error texts of failed requests
    source: str | None = None  # where the figures come from; None: the server at config.base_url
    extra: dict[str, Any] = field(default_factory=dict)  # more keys for the result JSON

    def report(self) -> str:
        return format_report(
            self.metrics,
            request_rate=self.config.request_rate,
            max_concurrency=self.config.max_concurrency,
            percentile_metrics=self.config.percentile_metrics,
        )

    def to_json(self) -> dict[str, Any]:
        config = asdict(self.config)
        config.pop("api_key")  # a secret
        record: dict[str, Any] = {
            "date": self.started_at.strftime("%Y%m%d-%H%M%S"),
            "model_id": self.model,
            "base_url": self.source or self.config.server_url,
            "endpoint": self.config.endpoint,
            "dataset_name": self.config.dataset_name,
            "num_prompts": len(self.requests),
            "request_rate": _finite_or_str(self.config.request_rate),
            "burstiness": _finite_or_str(self.config.burstiness),
            "max_concurrency": self.config.max_concurrency,
            "goodput_slos_ms": self.config.goodput or None,
            "dataset": describe_lengths(self.requests),
            "config": {k: _finite_or_str(v) for k, v in config.items()},
        }
        record.update(metrics_json(self.metrics))
        record.update(requests_json(self.outputs, self.run_start))
        record.update(self.extra)
        return record

    def default_stem(self) -> str:
        rate = "inf" if math.isinf(self.config.request_rate) else f"{self.config.request_rate:g}"
        concurrency = f"-concurrency{self.config.max_concurrency}" if self.config.max_concurrency else ""
        model = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(self.model).name) or "model"
        stamp = self.started_at.strftime("%Y%m%d-%H%M%S")
        return f"sutra-bench-{self.config.dataset_name}-{rate}qps{concurrency}-{model}-{stamp}"


def _finite_or_str(value: Any) -> Any:
    """inf is not valid JSON: write it as the string "inf"."""
    return str(value) if isinstance(value, float) and math.isinf(value) else value


def prepare_requests(config: BenchConfig) -> list[SampleRequest]:
    tokenizer = load_tokenizer(config.tokenizer)
    return build_requests(
        config.dataset_name,
        tokenizer,
        num_prompts=config.num_prompts,
        seed=config.seed,
        dataset_path=config.dataset_path,
        random_input_len=config.random_input_len,
        random_output_len=config.random_output_len,
        random_range_ratio=config.random_range_ratio,
        prefix_len=config.prefix_len,
    )


async def resolve_model(session: aiohttp.ClientSession, config: BenchConfig) -> str:
    """The configured model, else the server's first; either way the server must answer."""
    models = await list_models(session, config.server_url, auth_headers(config.api_key))
    if config.model:
        return config.model
    if not models:
        raise BenchError(f"{config.server_url}/v1/models lists no model; pass --model NAME")
    return models[0]


async def run_benchmark_async(
    config: BenchConfig, requests: list[SampleRequest] | None = None
) -> BenchResult:
    """Run the benchmark; `requests` replaces the configured dataset when given."""
    config.validate()
    chat = config.chat
    if requests is None:
        requests = prepare_requests(config)
    if not requests:
        raise BenchError("no requests to send")
    if not chat and any(r.is_chat for r in requests):
        raise BenchError("the prompts include chat messages: use --endpoint /v1/chat/completions")
    result_dir = result_directory(config)
    offsets = arrival_offsets(
        len(requests), config.request_rate, config.burstiness, np.random.default_rng([config.seed, 3])
    )
    headers = auth_headers(config.api_key)
    limit = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
    aiohttp = bench_dependency("aiohttp")
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)  # the semaphore is the only limit
    async with aiohttp.ClientSession(connector=connector) as session:
        model = await resolve_model(session, config)
        payloads = [
            build_payload(r, model, chat, config.ignore_eos, config.send_min_tokens) for r in requests
        ]
        progress = tqdm(total=len(requests), disable=config.disable_tqdm, unit="req", desc="requests")

        async def one(index: int) -> RequestOutput:
            async with limit or contextlib.nullcontext():
                out = await send_request(
                    session, config.request_url, payloads[index], requests[index].prompt_len, headers
                )
            progress.update(1)
            return out

        started_at = datetime.now()
        run_start = time.perf_counter()
        tasks = []
        for index, offset in enumerate(offsets):
            wait = run_start + offset - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            tasks.append(asyncio.create_task(one(index)))
        outputs = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - run_start
        progress.close()

    metrics = compute_metrics(outputs, duration, config.goodput, config.metric_percentiles)
    result = BenchResult(
        config=config,
        model=model,
        requests=requests,
        outputs=outputs,
        metrics=metrics,
        started_at=started_at,
        run_start=run_start,
        errors=list(dict.fromkeys(o.error for o in outputs if not o.success)),
    )
    write_outputs(result, result_dir)
    return result


def run_benchmark(config: BenchConfig, requests: list[SampleRequest] | None = None) -> BenchResult:
    """Blocking form of run_benchmark_async (starts its own event loop)."""
    return asyncio.run(run_benchmark_async(config, requests))


def result_directory(config: BenchConfig) -> Path | None:
    """The folder results go to, created before the run so that a bad path fails before any request."""
    if not (config.save_result or config.plot):
        return None
    directory = Path(config.result_dir).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BenchError(f"--result-dir {config.result_dir}: cannot create it: {e}") from e
    return directory


def write_outputs(result: BenchResult, directory: Path | None) -> None:
    """The JSON (save_result) and the PNG (plot) the config asks for."""
    config = result.config
    if directory is None:
        return
    name = config.result_filename or result.default_stem() + ".json"
    json_path = directory / name
    try:
        if config.save_result:
            json_path.write_text(json.dumps(result.to_json(), indent=2) + "\n", encoding="utf-8")
            result.json_path = json_path
        if config.plot:
            bench_dependency("matplotlib")  # costs ~0.5 s to import: only when asked
            from sutra.bench.plot import plot_run

            arrivals = describe_arrivals(config.request_rate, config.burstiness)
            title = f"{result.model} {config.endpoint}: {config.dataset_name}, {arrivals}"
            result.plot_path = plot_run(result.outputs, json_path.with_suffix(".png"), title)
    except OSError as e:
        raise BenchError(f"cannot write the results under {directory}: {e}") from e
