"""What a serving benchmark run does: the server, the prompts, the arrival process and the report."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from sutra.bench.datasets import DATASET_NAMES
from sutra.bench.errors import BenchError

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
GOODPUT_METRICS = ("ttft", "tpot", "e2el")


@dataclass
class BenchConfig:
    base_url: str = DEFAULT_BASE_URL  # scheme://host:port; a trailing /v1 is dropped
    endpoint: str = "/v1/completions"  # or /v1/chat/completions
    model: str | None = None  # None: the first model the server lists at /v1/models
    api_key: str | None = None
    dataset_name: str = "random"  # sharegpt | random | jsonl
    dataset_path: str | None = None  # the jsonl file
    tokenizer: str | None = None  # a local Hugging Face tokenizer directory; None: the bundled model's
    random_input_len: int = 1024
    random_output_len: int = 128
    random_range_ratio: float = 0.0
    prefix_len: int = 0  # shared prefix tokens in front of every sharegpt/random prompt
    num_prompts: int = 1000
    request_rate: float = math.inf  # requests per second; inf sends everything at once
    burstiness: float = 1.0  # 1: Poisson arrivals; otherwise gamma-distributed gaps
    max_concurrency: int | None = None  # requests in flight at most; None: no limit
    seed: int = 0
    ignore_eos: bool = True  # ask for exactly output_len tokens
    send_min_tokens: bool = False  # also send min_tokens = output_len (servers without ignore_eos)
    goodput: dict[str, float] = field(default_factory=dict)  # metric -> SLO in ms, e.g. {"ttft": 500}
    percentile_metrics: tuple[str, ...] = ("ttft", "tpot", "itl")  # which metrics the report prints
    metric_percentiles: tuple[float, ...] = (99.0,)
    save_result: bool = False
    result_dir: str = "."
    result_filename: str | None = None  # None: derived from the dataset, rate, model and time
    plot: bool = False  # write a PNG (latency CDFs, output tokens/s over time) next to the JSON
    disable_tqdm: bool = False

    @property
    def chat(self) -> bool:
        """True for the chat completions endpoint, False for completions."""
        return endpoint_is_chat(self.endpoint)

    @property
    def server_url(self) -> str:
        url = self.base_url.rstrip("/")
        return url[: -len("/v1")] if url.endswith("/v1") else url

    @property
    def request_url(self) -> str:
        return self.server_url + "/" + self.endpoint.lstrip("/")

    def validate(self) -> None:
        """Raise BenchError naming the first setting that cannot work."""
        if not self.base_url.startswith(("http://", "https://")):
            raise BenchError(f"--base-url {self.base_url}: expected http://host:port or https://...")
        endpoint_is_chat(self.endpoint)
        if self.dataset_name not in DATASET_NAMES:
            raise BenchError(f"--dataset-name {self.dataset_name}: choose one of {', '.join(DATASET_NAMES)}")
        if self.dataset_name == "jsonl" and not self.dataset_path:
            raise BenchError("--dataset-name jsonl needs --dataset-path FILE")
        if self.dataset_name == "jsonl" and self.prefix_len:
            raise BenchError("--prefix-len applies to the sharegpt and random datasets, not to jsonl")
        _check(self.num_prompts >= 1, f"--num-prompts must be at least 1, got {self.num_prompts}")
        _check(self.random_input_len >= 0, f"--random-input-len must be >= 0, got {self.random_input_len}")
        _check(self.random_output_len >= 1, f"--random-output-len must be >= 1, got {self.random_output_len}")
        _check(
            0 <= self.random_range_ratio < 1,
            f"--random-range-ratio must be in [0, 1), got {self.random_range_ratio}",
        )
        _check(self.prefix_len >= 0, f"--prefix-len must be >= 0, got {self.prefix_len}")
        _check(self.request_rate > 0, f"--request-rate must be positive (or inf), got {self.request_rate}")
        _check(self.burstiness > 0, f"--burstiness must be positive, got {self.burstiness}")
        if self.max_concurrency is not None:
            _check(self.max_concurrency >= 1, f"--max-concurrency must be >= 1, got {self.max_concurrency}")
        for name, slo in self.goodput.items():
            _check(name in GOODPUT_METRICS, f"--goodput {name}: choose from {', '.join(GOODPUT_METRICS)}")
            _check(slo >= 0, f"--goodput {name}:{slo}: the SLO must be >= 0 ms")
        for name in self.percentile_metrics:
            _check(
                name in LATENCY_METRICS,
                f"--percentile-metrics {name}: choose from {', '.join(LATENCY_METRICS)}",
            )
        for p in self.metric_percentiles:
            _check(0 < p <= 100, f"--metric-percentiles {p:g}: percentiles must be in (0, 100]")


def endpoint_is_chat(endpoint: str) -> bool:
    path = endpoint.rstrip("/")
    if path.endswith("/chat/completions"):
        return True
    if path.endswith("/completions"):
        return False
    raise BenchError(f"--endpoint {endpoint}: expected /v1/completions or /v1/chat/completions")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise BenchError(message)


def parse_goodput(specs: Iterable[str]) -> dict[str, float]:
    """["ttft:500", "tpot:50"] (or one space-separated string) -> {"ttft": 500.0, "tpot": 50.0}, in ms."""
    slos: dict[str, float] = {}
    for spec in (part for item in specs for part in item.split()):
        name, sep, value = spec.partition(":")
        if not sep or name not in GOODPUT_METRICS:
            raise BenchError(
                f"--goodput {spec}: expected METRIC:MS with METRIC one of {', '.join(GOODPUT_METRICS)}"
            )
        try:
            slo = float(value)
        except ValueError:
            raise BenchError(f"--goodput {spec}: {value!r} is not a number of milliseconds") from None
        if not math.isfinite(slo) or slo < 0:
            raise BenchError(f"--goodput {spec}: the SLO must be a finite number >= 0 ms")
        slos[name] = slo
    return slos


def parse_percentile_metrics(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    for name in names:
        if name not in LATENCY_METRICS:
            raise BenchError(f"--percentile-metrics {name}: choose from {', '.join(LATENCY_METRICS)}")
    return names


def parse_metric_percentiles(text: str) -> tuple[float, ...]:
    values = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            value = float(part)
        except ValueError:
            raise BenchError(f"--metric-percentiles {part}: not a number") from None
        if not 0 < value <= 100:
            raise BenchError(f"--metric-percentiles {part}: percentiles must be in (0, 100]")
        values.append(value)
    return tuple(values)
