"""Disaggregated vs colocated serving on this machine (DistServe §6, scaled to a 2-core CPU).

Three deployments of the default model at the same total threads (one torch thread per instance,
float32 on CPUs without bf16, prefix cache off), each started with `Cluster.start` as `sutra serve`
starts it, driven through the `ClusterClient` the server puts behind its OpenAI API (the same
dispatch, hand-off and streaming code, without HTTP):
- `pd`: 1 prefill + 1 decode instance (`--prefill-instances 1 --decode-instances 1`);
- `sarathi`: 2 colocated instances, chunked prefill (token budget --budget), least-load dispatch;
- `prefill_first`: 2 colocated instances, whole prompts first (vLLM-v0-like), least-load dispatch.

The workload has long prompts (uniform in [--prompt-min, --prompt-max] random token ids) and short
outputs (uniform in [--output-min, --output-max], greedy, exact lengths), Poisson arrivals at each
rate of --rates for --duration seconds, the same requests (by seed) for every deployment. A request
attains when its TTFT (send to first token, at the client) <= --ttft-slo and its TPOT (mean gap
between its tokens after the first) <= --tpot-slo: DistServe's attainment. Per deployment and
rate: attainment, P50/P99 TTFT and TPOT, and in P/D the hand-offs' wait (parked until pulled) and
transfer (the pull) times with the prompt lengths, fitted to fixed + per-token seconds (the figure
the simulator's hand-off model takes). Goodput: the highest rate with attainment >= --attainment,
interpolated linearly between the rates run (per core: / total threads).

With --profile (a `sutra profile` JSON of this machine at 1 thread), the same deployments and
workload also run in the simulator (sutra/sim/cluster.py, its P/D mode, with the measured hand-off
fit), and the report sets predicted beside measured attainment and goodput.

Writes benchmarks/results/disaggregation-cpu.{json,png} (--name to change).

Usage:
  python benchmarks/disaggregation.py                     # the figures in RESULTS.md
  python benchmarks/disaggregation.py --rates 0.2,0.4 --duration 20 --deployments pd,sarathi
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import common
import numpy as np
from cluster import Job, Record, _ids, pct, run_jobs, warm_up, with_client

from sutra.bench.arrivals import arrival_offsets
from sutra.cluster.client import ClusterClient
from sutra.cluster.handoff import HandOffRecord
from sutra.cluster.manager import Cluster
from sutra.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig

RESULTS = Path(__file__).resolve().parent / "results"
DEPLOYMENTS = ("pd", "sarathi", "prefill_first")
THREADS = 2  # total torch threads of every deployment: one per instance
logger = logging.getLogger("disaggregation-bench")


def workload(args: argparse.Namespace, rate: float) -> list[Job]:
    rng = np.random.default_rng(args.seed)
    n = max(4, round(rate * args.duration))
    offsets = arrival_offsets(n, rate, 1.0, rng)
    prompts = rng.integers(args.prompt_min, args.prompt_max + 1, size=n).tolist()
    outputs = rng.integers(args.output_min, args.output_max + 1, size=n).tolist()
    return [Job(i, _ids(rng, prompts[i]), outputs[i], offsets[i], True) for i in range(n)]


def tpot(r: Record) -> float | None:
    if r.first_token is None or r.last_token is None or r.num_tokens < 2:
        return None
    return (r.last_token - r.first_token) / (r.num_tokens - 1)


def summarize(records: list[Record], args: argparse.Namespace) -> dict[str, Any]:
    ok = [r for r in records if r.ok]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    tpots = [t for r in ok if (t := tpot(r)) is not None]
    attained = sum(
        1 for r in ok if r.ttft is not None and r.ttft <= args.ttft_slo and (tpot(r) or 0.0) <= args.tpot_slo
    )
    return {
        "requests": len(records),
        "failed": len(records) - len(ok),
        "attainment": attained / len(records) if records else None,
        "ttft_p50_s": pct(ttfts, 50),
        "ttft_p99_s": pct(ttfts, 99),
        "tpot_p50_s": pct(tpots, 50),
        "tpot_p99_s": pct(tpots, 99),
    }


def goodput(rates: list[float], attainment: list[float | None], target: float) -> float:
    """The highest rate with attainment >= target, interpolated between the rates run (0: none)."""
    best = 0.0
    points = [(r, a if a is not None else 0.0) for r, a in zip(rates, attainment, strict=True)]
    for (r0, a0), (r1, a1) in zip(points, points[1:], strict=False):
        if a0 >= target:
            best = r0
            if a1 < target:  # it crosses the target between r0 and r1
                return r0 + (r1 - r0) * (a0 - target) / (a0 - a1)
    if points and points[-1][1] >= target:
        best = points[-1][0]
    return best


def fit_transfer(records: list[dict[str, Any]]) -> dict[str, float] | None:
    """transfer_s = fixed_s + per_token_s * tokens over the completed pulls, by Theil-Sen (the
    median of pairwise slopes: robust to the pulls a busy core delayed); through the origin (the
    median of transfer / tokens) when the intercept comes out negative."""
    done = [r for r in records if r["migrated"]]
    if len(done) < 3 or len({r["tokens"] for r in done}) < 2:
        return None
    x = np.array([r["tokens"] for r in done], dtype=float)
    y = np.array([r["transfer_s"] for r in done])
    i, j = np.triu_indices(len(x), 1)
    distinct = x[i] != x[j]
    slope = float(np.median((y[j] - y[i])[distinct] / (x[j] - x[i])[distinct]))
    intercept = float(np.median(y - slope * x))
    if intercept < 0 or slope < 0:
        return {"fixed_s": 0.0, "per_token_s": float(np.median(y / x))}
    return {"fixed_s": intercept, "per_token_s": slope}


def predict(deployment: str, args: argparse.Namespace, hand_off: dict[str, float] | None) -> dict[str, Any]:
    """The same deployment and workloads in the simulator (sutra/sim), on the 1-thread profile."""
    from sutra.sim.cluster import ClusterSimulator
    from sutra.sim.cost_model import load_cost_model
    from sutra.sim.disagg import DEFAULT_HAND_OFF, DisaggSimulator, HandOffModel, InstanceGroup
    from sutra.sim.profile import Profile
    from sutra.sim.simulator import SimRequest

    cost = load_cost_model(Profile.load(args.profile))
    by_rate = {}
    for rate in args.rates:
        jobs = workload(args, rate)
        requests = [SimRequest(f"r{j.index}", j.offset, len(j.prompt), j.max_tokens) for j in jobs]
        if deployment == "pd":
            group = InstanceGroup(1, cost, args.kv_blocks)
            model = HandOffModel(**hand_off) if hand_off else DEFAULT_HAND_OFF
            sim = DisaggSimulator(
                group,
                group,
                engine_config(args, "sarathi").scheduler,
                enable_prefix_caching=False,
                hand_off=model,
            )
        else:
            config = engine_config(args, deployment).scheduler
            sim = ClusterSimulator(
                2, config, cost, args.kv_blocks, enable_prefix_caching=False, dispatch="least-load"
            )
        traces = sim.run(requests).traces.values()
        attained = sum(1 for t in traces if t.ttft <= args.ttft_slo and t.tpot <= args.tpot_slo)
        tpots = [t.tpot for t in traces if len(t.token_times) > 1]
        by_rate[str(rate)] = {"attainment": attained / len(requests), "tpot_p99_s": pct(tpots, 99)}
    attainment = [by_rate[str(r)]["attainment"] for r in args.rates]
    return {"by_rate": by_rate, "goodput_rps": goodput(args.rates, attainment, args.attainment)}


def engine_config(args: argparse.Namespace, mode: str) -> EngineConfig:
    return EngineConfig(
        ModelConfig(dtype=args.dtype),
        CacheConfig(num_blocks=args.kv_blocks, enable_prefix_caching=False),
        SchedulerConfig(max_num_batched_tokens=args.budget, mode=mode),
    )


def start(deployment: str, args: argparse.Namespace) -> Cluster:
    if deployment == "pd":
        return Cluster.start(
            engine_config(args, "sarathi"),
            0,
            prefill_instances=1,
            decode_instances=1,
            threads_per_instance=1,
            ready_timeout_s=600.0,
        )
    return Cluster.start(engine_config(args, deployment), 2, threads_per_instance=1, ready_timeout_s=600.0)


async def run_rate(cluster: Cluster, jobs: list[Job], tag: str, args: argparse.Namespace) -> dict[str, Any]:
    prompt_len = {f"{tag}-{j.index}": len(j.prompt) for j in jobs}

    async def body(client: ClusterClient) -> dict[str, Any]:
        pulls: list[HandOffRecord] = []
        client.handoffs.listeners.append(pulls.append)
        records, _, wall = await run_jobs(client, jobs, tag, timeout_s=args.run_timeout)
        return {
            "summary": summarize(records, args),
            "wall_s": wall,
            # Per request, so other SLOs can be scored from this run: [prompt, output, TTFT, TPOT].
            "requests": [[r.prompt_len, r.num_tokens, r.ttft, tpot(r)] for r in records],
            "handoffs": [
                {
                    "tokens": prompt_len.get(p.request_id, 0),
                    "wait_s": p.wait_s,
                    "transfer_s": p.transfer_s,
                    "migrated": p.result.migrated,
                }
                for p in pulls
            ],
        }

    return await with_client(cluster, "least-load", body)


async def run_deployment(deployment: str, args: argparse.Namespace) -> dict[str, Any]:
    t = time.perf_counter()
    cluster = start(deployment, args)
    print(f"{deployment}: instances ready in {time.perf_counter() - t:.1f} s", flush=True)
    try:
        await warm_up(cluster, args.seed)
        by_rate = {}
        for rate in args.rates:
            result = await run_rate(cluster, workload(args, rate), f"{deployment}-{rate}", args)
            s = result["summary"]
            print(
                f"  {deployment} rate {rate:g}: attainment {s['attainment']:.2f}, "
                f"P99 TTFT {s['ttft_p99_s'] or float('nan'):.2f} s, P99 TPOT {s['tpot_p99_s'] or float('nan'):.3f} s",
                flush=True,
            )
            by_rate[str(rate)] = result
            await asyncio.sleep(args.settle)
        return by_rate
    finally:
        cluster.shutdown()


def report(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    rates = args.rates
    table = {}
    for deployment, by_rate in results.items():
        attainment = [by_rate[str(r)]["summary"]["attainment"] for r in rates]
        rate_goodput = goodput(rates, attainment, args.attainment)
        pulls = [p for r in rates for p in by_rate[str(r)]["handoffs"]]
        done = [p for p in pulls if p["migrated"]]
        table[deployment] = {
            "goodput_rps": rate_goodput,
            "goodput_per_core": rate_goodput / THREADS,
            "attainment": dict(zip(map(str, rates), attainment, strict=True)),
            "tpot_p99_s": {str(r): by_rate[str(r)]["summary"]["tpot_p99_s"] for r in rates},
            "ttft_p99_s": {str(r): by_rate[str(r)]["summary"]["ttft_p99_s"] for r in rates},
            "handoff_wait_median_s": statistics.median([p["wait_s"] for p in done]) if done else None,
            "handoff_transfer_median_s": statistics.median([p["transfer_s"] for p in done]) if done else None,
            "handoff_transfer_fit": fit_transfer(pulls),
        }
    if args.profile is not None:
        fit = table.get("pd", {}).get("handoff_transfer_fit")
        for deployment, row in table.items():
            row["predicted"] = predict(deployment, args, fit)
    return table


def plot(report_: dict[str, Any], args: argparse.Namespace, path: Path) -> None:
    fig, axes = common.figure(1, 2, figsize=(11, 4))
    for k, (deployment, row) in enumerate(report_["table"].items()):
        color = f"C{k}"
        attainment = [row["attainment"][str(r)] for r in args.rates]
        axes[0].plot(args.rates, attainment, marker="o", color=color, label=deployment)
        if "predicted" in row:
            predicted = [row["predicted"]["by_rate"][str(r)]["attainment"] for r in args.rates]
            axes[0].plot(
                args.rates, predicted, linestyle="--", color=color, label=f"{deployment} (simulated)"
            )
        tpot = [1e3 * (row["tpot_p99_s"][str(r)] or float("nan")) for r in args.rates]
        axes[1].plot(args.rates, tpot, marker="o", color=color, label=deployment)
    axes[0].axhline(args.attainment, color="gray", linestyle=":")
    axes[0].set(
        xlabel="rate (req/s)",
        ylabel="SLO attainment",
        title=f"TTFT <= {args.ttft_slo:g} s, TPOT <= {1e3 * args.tpot_slo:g} ms",
    )
    axes[1].axhline(1e3 * args.tpot_slo, color="gray", linestyle=":")
    axes[1].set(xlabel="rate (req/s)", ylabel="P99 TPOT (ms)", title="time per output token")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Disaggregated (1 prefill + 1 decode) vs 2 colocated instances, 1 thread each")
    common.save_figure(fig, path, dpi=120)


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--deployments", default=",".join(DEPLOYMENTS))
    p.add_argument("--rates", default="0.15,0.3,0.45", help="request rates to run (req/s)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per rate")
    p.add_argument("--prompt-min", type=int, default=256)
    p.add_argument("--prompt-max", type=int, default=768)
    p.add_argument("--output-min", type=int, default=32)
    p.add_argument("--output-max", type=int, default=96)
    p.add_argument("--ttft-slo", type=float, default=6.0, help="seconds")
    p.add_argument("--tpot-slo", type=float, default=0.15, help="seconds")
    p.add_argument("--attainment", type=float, default=0.9)
    p.add_argument("--kv-blocks", type=int, default=512, help="KV blocks (16 tokens) per instance")
    p.add_argument("--budget", type=int, default=512, help="max_num_batched_tokens per step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--settle", type=float, default=2.0, help="pause between runs (s)")
    p.add_argument("--run-timeout", type=float, default=600.0)
    p.add_argument("--dtype", default="auto")
    p.add_argument(
        "--rescore", type=Path, default=None, help="a saved result JSON: report it again, run nothing"
    )
    p.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="a 1-thread `sutra profile` of this machine: also predict each deployment in the simulator",
    )
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--name", default="disaggregation-cpu", help="the result files' name (.json, .png)")
    args = p.parse_args()
    args.rates = sorted(float(r) for r in args.rates.split(","))
    deployments = args.deployments.split(",")
    if bad := set(deployments) - set(DEPLOYMENTS):
        p.error(f"unknown deployments {sorted(bad)}; choose from {DEPLOYMENTS}")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    from sutra.model.cpu_kernels import cpu_kernels

    cpu_kernels()  # built once here, not raced for by the instances
    if args.rescore is not None:  # the table (and predictions) again from a saved run
        results = json.loads(args.rescore.read_text())["runs"]
    else:
        results = {d: asyncio.run(run_deployment(d, args)) for d in deployments}
    out = {
        "machine": {"platform": platform.platform(), "cores": len(os.sched_getaffinity(0))},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "table": report(results, args),
        "runs": results,
    }
    common.write_json(args.out_dir / f"{args.name}.json", out, indent=1)
    plot(out, args, args.out_dir / f"{args.name}.png")
    for deployment, row in out["table"].items():
        print(
            f"{deployment}: goodput {row['goodput_rps']:.2f} req/s ({row['goodput_per_core']:.2f} per core)"
        )
        if row["handoff_transfer_fit"]:
            print(f"  hand-off transfer fit: {row['handoff_transfer_fit']}")
        if "predicted" in row:
            print(f"  simulated goodput {row['predicted']['goodput_rps']:.2f} req/s")


if __name__ == "__main__":
    main()
