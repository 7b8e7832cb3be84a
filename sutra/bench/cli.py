"""`sutra bench serve ...`: the command line of the serving benchmark."""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any

from sutra.bench.config import (
    DEFAULT_BASE_URL,
    BenchConfig,
    parse_goodput,
    parse_metric_percentiles,
    parse_percentile_metrics,
)
from sutra.bench.datasets import DATASET_NAMES
from sutra.bench.errors import BenchError

MAX_ERRORS_SHOWN = 10


def add_bench_parser(subparsers: Any) -> None:
    """Register `bench` (with its subcommand `serve`) on the top-level subparsers of `sutra`."""
    bench = subparsers.add_parser("bench", help="benchmarks against a running server")
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    serve = kinds.add_parser(
        "serve",
        help="load-test an OpenAI-compatible server and report TTFT, TPOT, ITL and throughput",
        description="Send prompts to an OpenAI-compatible server on an arrival schedule and report "
        "latencies and throughput, as `vllm bench serve` does.",
    )
    add_bench_serve_args(serve)
    serve.set_defaults(func=cmd_bench_serve)


def add_bench_serve_args(parser: argparse.ArgumentParser) -> None:
    add_server_args(parser)
    add_workload_args(parser)


def add_server_args(parser: argparse.ArgumentParser) -> None:
    server = parser.add_argument_group("server")
    server.add_argument("--base-url", default=None, help=f"server root URL (default {DEFAULT_BASE_URL})")
    server.add_argument("--host", default=None, help="server host, when --base-url is not given")
    server.add_argument("--port", type=int, default=None, help="server port, when --base-url is not given")
    server.add_argument(
        "--endpoint", default="/v1/completions", help="/v1/completions or /v1/chat/completions"
    )
    server.add_argument("--model", default=None, help="model name to send (default: first id at /v1/models)")
    server.add_argument("--api-key", default=None, help="bearer token (default: $OPENAI_API_KEY if set)")


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    """The prompts, the arrival process and the report: what `sutra simulate` shares with `bench serve`."""

    data = parser.add_argument_group("prompts")
    data.add_argument("--dataset-name", default="random", choices=DATASET_NAMES)
    data.add_argument("--dataset-path", default=None, help="the jsonl file of prompts")
    data.add_argument(
        "--tokenizer", default=None, help="local HF tokenizer directory (default: bundled model's)"
    )
    data.add_argument("--random-input-len", type=int, default=1024, help="prompt tokens (random dataset)")
    data.add_argument("--random-output-len", type=int, default=128, help="output tokens (random dataset)")
    data.add_argument(
        "--random-range-ratio",
        type=float,
        default=0.0,
        help="draw lengths uniformly from [L*(1-r), L*(1+r)] (random dataset)",
    )
    data.add_argument("--prefix-len", type=int, default=0, help="shared prefix tokens in every prompt")
    data.add_argument("--num-prompts", type=int, default=1000)
    data.add_argument("--seed", type=int, default=0)
    data.add_argument(
        "--no-ignore-eos",
        dest="ignore_eos",
        action="store_false",
        help="let the model stop at end-of-sequence instead of asking for exactly the output length",
    )
    data.add_argument(
        "--send-min-tokens",
        action="store_true",
        help="also send min_tokens = the output length (for servers without ignore_eos, e.g. llama.cpp's)",
    )

    load = parser.add_argument_group("load")
    load.add_argument("--request-rate", type=float, default=math.inf, help="requests/s; inf: all at once")
    load.add_argument(
        "--burstiness", type=float, default=1.0, help="gamma shape of the gaps: 1 Poisson, <1 burstier"
    )
    load.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")

    report = parser.add_argument_group("report")
    report.add_argument(
        "--goodput",
        nargs="+",
        default=None,
        metavar="METRIC:MS",
        help="SLOs a good request meets, any of ttft:MS tpot:MS e2el:MS",
    )
    report.add_argument("--percentile-metrics", default="ttft,tpot,itl", help="subset of ttft,tpot,itl,e2el")
    report.add_argument("--metric-percentiles", default="99", help="comma-separated, e.g. 50,90,99")
    report.add_argument("--save-result", action="store_true", help="write the result JSON")
    report.add_argument("--result-dir", default=".", help="where the JSON and PNG go")
    report.add_argument("--result-filename", default=None, help="JSON file name (the PNG takes its stem)")
    report.add_argument("--plot", action="store_true", help="draw latency CDFs and tokens/s over time (PNG)")
    report.add_argument("--disable-tqdm", action="store_true", help="no progress bar")


def base_url_of(args: argparse.Namespace) -> str:
    if args.base_url:
        return str(args.base_url)
    if args.host is None and args.port is None:
        return DEFAULT_BASE_URL
    return f"http://{args.host or '127.0.0.1'}:{args.port or 8000}"


def config_from_args(args: argparse.Namespace, server: bool = True) -> BenchConfig:
    """The benchmark's config; with server=False (a parser without the server options) the server
    fields keep their defaults."""
    target: dict[str, Any] = {}
    if server:
        target = {
            "base_url": base_url_of(args),
            "endpoint": args.endpoint,
            "model": args.model,
            "api_key": args.api_key or os.environ.get("OPENAI_API_KEY") or None,
        }
    config = BenchConfig(
        **target,
        dataset_name=args.dataset_name,
        dataset_path=args.dataset_path,
        tokenizer=args.tokenizer,
        random_input_len=args.random_input_len,
        random_output_len=args.random_output_len,
        random_range_ratio=args.random_range_ratio,
        prefix_len=args.prefix_len,
        num_prompts=args.num_prompts,
        request_rate=args.request_rate,
        burstiness=args.burstiness,
        max_concurrency=args.max_concurrency,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
        send_min_tokens=args.send_min_tokens,
        goodput=parse_goodput(args.goodput or []),
        percentile_metrics=parse_percentile_metrics(args.percentile_metrics),
        metric_percentiles=parse_metric_percentiles(args.metric_percentiles),
        save_result=args.save_result,
        result_dir=args.result_dir,
        result_filename=args.result_filename,
        plot=args.plot,
        disable_tqdm=args.disable_tqdm,
    )
    config.validate()
    return config


def cmd_bench_serve(args: argparse.Namespace) -> None:
    from sutra.bench.serve import run_benchmark  # aiohttp and numpy load only for this command

    config = config_from_args(args)
    print(f"Target: {config.request_url}")
    print(f"Traffic request rate: {config.request_rate}")
    burst = "Poisson process" if config.burstiness == 1.0 else "Gamma distribution"
    print(f"Burstiness factor: {config.burstiness} ({burst})")
    print(f"Maximum request concurrency: {config.max_concurrency}", flush=True)
    result = run_benchmark(config)
    print(f"Model: {result.model}")
    if result.errors:
        failed = result.metrics.failed
        print(f"{failed} request(s) failed; distinct errors (first {MAX_ERRORS_SHOWN}):", file=sys.stderr)
        for error in result.errors[:MAX_ERRORS_SHOWN]:
            print(f"  {error}", file=sys.stderr)
    print(result.report())
    for path in (result.json_path, result.plot_path):
        if path is not None:
            print(f"wrote {path}")
    if result.metrics.completed == 0:
        raise BenchError(f"all {result.metrics.failed} requests failed (see the errors above)")
