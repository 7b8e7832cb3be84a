"""Cluster benchmarks on Ray (Llumnix §6.3 and §6.5, scaled to a 2-core CPU): load balance under
skewed, bursty load, and draining an instance.

Both parts run N engine instances (`Cluster.start`: one Ray actor per instance, the default model,
float32 on CPUs without bf16, 1 torch thread each, no Ray CPUs reserved) and drive the
`ClusterClient` that `sutra serve --instances N` puts behind its OpenAI server, in this process: the
same dispatch, streaming and migration code as the server, without HTTP. Prompts are random token
ids (no tokenizer round trip); outputs have exact lengths (greedy, ignore_eos). The prefix cache is
off, so a policy cannot reuse the KV of the prompts the policy before it ran (random prompts share
no prefix within a run, so it would find nothing there anyway).

1. Balance (`--part balance`). One seeded workload, the same request by request (prompt ids,
   lengths, send times) for every dispatch policy: `round-robin`, `least-load` and `llumnix`
   (least-load's dispatch plus Llumnix's migration trigger every ~0.5 s, cluster/rebalance.py). The
   policies run one after another on the same instances (warmed up once before the first), each
   with a fresh client. Arrivals: gamma-distributed gaps with coefficient of variation --cv (shape
   1/cv^2, mean gap 1/--rate), so requests come in bursts. Lengths are long-tailed: --long-frac of
   the requests are long prompts (uniform in [--long-min, --long-max] tokens), the rest log-normal
   (median 32, sigma 0.8, in [8, 192]); outputs log-normal (median 32, sigma 1.0, in [8, 256]) for
   both. Each instance has a small KV pool (--kv-blocks blocks of 16 tokens), so a few long requests
   on one instance exhaust it and running requests are preempted (by recompute).
   Per request, timed by the client: TTFT (send, just before submit_many, to the first token's
   delta), TBT (the gaps between the deltas that carry tokens, pooled over requests; one delta per
   engine step), end-to-end (send to the last delta). Per policy: P50/P99/mean TTFT, P99/max TBT,
   P99 end-to-end, the TTFT of the long prompts alone (their queueing: a long prompt waits until its
   instance has room for all its blocks), preemptions (the sum of the instances' EngineStats
   num_preemptions deltas over the run), migrations (Migrator.num_migrated, and the outcomes the
   migrator reported), where each request was dispatched, and the CPU time each instance got.
   Ratios (round-robin / llumnix, ...) compare policies from this same run.
   Writes benchmarks/results/cluster-balance-cpu.{json,png}.

2. Drain (`--part drain`): a steady Poisson load (--drain-rate, short prompts, outputs of 64-192
   tokens) under round-robin dispatch, so the instance to drain holds about half the requests when
   the drain begins (dispatch skips a draining instance under every policy). --drain-at seconds in,
   the last instance is drained (`client.migrator.drain(instance, --drain-timeout)`: it takes no new
   requests, and its running requests move to the others by live migration as soon as each
   decodes), then retired (`client.retire`, which kills its actor) once nothing is left on it; the
   load goes on until every request is sent. Reported: the drain time (the drain call), the requests
   on the instance when the drain began, how many moved (and failed or were left), the longest token
   gap a moved request saw, that no request was dispatched to the draining instance after the drain
   began, and that every request finished with `stop`/`length` (none failed).
   Writes benchmarks/results/cluster-drain-cpu.json.

Every Ray call and wait has a timeout; Ray is shut down at the end.

Usage:
  python benchmarks/cluster.py                      # both parts, the figures in RESULTS.md
  python benchmarks/cluster.py --part balance --num-requests 60 --policies round-robin,llumnix
  python benchmarks/cluster.py --part drain
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import common
import numpy as np

from sutra.bench.arrivals import arrival_offsets
from sutra.bench.datasets import LogNormalLengths
from sutra.cluster.client import ClusterClient
from sutra.cluster.manager import Cluster
from sutra.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from sutra.sampling_params import SamplingParams

RESULTS = Path(__file__).resolve().parent / "results"
POLICIES = ("round-robin", "least-load", "llumnix")
FIRST_PLAIN_TOKEN = 17  # SmolLM2's ids below this are special tokens
VOCAB_SIZE = 49152
SHORT_PROMPT = LogNormalLengths(median=32, sigma=0.8, low=8, high=192)
OUTPUT = LogNormalLengths(median=32, sigma=1.0, low=8, high=256)
RPC_TIMEOUT_S = 30.0
SHUTDOWN_TIMEOUT_S = 60.0

logger = logging.getLogger("cluster-bench")


# ---- workload --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    index: int
    prompt: list[int]
    max_tokens: int
    offset: float  # send time, seconds from the start of the run
    long: bool


def _ids(rng: np.random.Generator, n: int) -> list[int]:
    return rng.integers(FIRST_PLAIN_TOKEN, VOCAB_SIZE, size=n).tolist()


def balance_workload(args: argparse.Namespace) -> list[Job]:
    rng = np.random.default_rng(args.seed)
    n = args.num_requests
    offsets = arrival_offsets(n, args.rate, 1.0 / args.cv**2, rng)
    is_long = rng.random(n) < args.long_frac
    short_lens = SHORT_PROMPT.sample(n, rng)
    long_lens = rng.integers(args.long_min, args.long_max + 1, size=n).tolist()
    out_lens = OUTPUT.sample(n, rng)
    return [
        Job(
            i,
            _ids(rng, long_lens[i] if is_long[i] else short_lens[i]),
            out_lens[i],
            offsets[i],
            bool(is_long[i]),
        )
        for i in range(n)
    ]


def drain_workload(args: argparse.Namespace) -> list[Job]:
    rng = np.random.default_rng(args.seed + 1)
    n = max(1, round(args.drain_rate * args.drain_duration))
    offsets = arrival_offsets(n, args.drain_rate, 1.0, rng)
    prompt_lens = SHORT_PROMPT.sample(n, rng)
    out_lens = rng.integers(64, 193, size=n).tolist()
    return [Job(i, _ids(rng, prompt_lens[i]), out_lens[i], offsets[i], False) for i in range(n)]


# ---- one request, as a client sees it --------------------------------------------------------
@dataclass
class Record:
    index: int
    long: bool
    prompt_len: int
    max_tokens: int
    offset: float
    send: float | None = None  # seconds from the run's start
    first_token: float | None = None
    last_token: float | None = None
    token_times: list[float] = field(default_factory=list)  # one per delta that carried tokens
    num_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    instances: list[str] = field(default_factory=list)  # dispatched to, then where it moved
    preemptions: int = 0  # the request's own count (its last delta's metrics)
    queue_s: float | None = None  # instance-side: arrival there to first scheduled

    @property
    def ok(self) -> bool:
        return self.error is None and self.finish_reason in ("stop", "length")

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None or self.send is None else self.first_token - self.send

    @property
    def e2e(self) -> float | None:
        return None if self.last_token is None or self.send is None else self.last_token - self.send

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:], strict=False)]


async def run_request(client: ClusterClient, job: Job, rid: str, t0: float, rec: Record) -> None:
    await asyncio.sleep(max(0.0, t0 + job.offset - time.perf_counter()))
    params = SamplingParams(temperature=0.0, max_tokens=job.max_tokens, ignore_eos=True)
    rec.send = time.perf_counter() - t0
    try:
        await client.submit_many([(rid, job.prompt, params)])
        where = client.instance_of(rid)
        if where is not None:
            rec.instances.append(where)
        async for delta in client.stream(rid):
            now = time.perf_counter() - t0
            where = client.instance_of(rid)
            if where is not None and (not rec.instances or where != rec.instances[-1]):
                rec.instances.append(where)
            tokens = len(delta.completions[0].token_ids)
            if tokens:
                if rec.first_token is None:
                    rec.first_token = now
                rec.last_token = now
                rec.token_times.append(now)
                rec.num_tokens += tokens
            if delta.finished:
                rec.finish_reason = delta.completions[0].finish_reason
                rec.preemptions = delta.metrics.num_preemptions
                rec.queue_s = delta.metrics.queue_time
    except Exception as e:  # recorded: the report counts failed requests
        rec.error = f"{type(e).__name__}: {e}"


async def run_jobs(
    client: ClusterClient, jobs: list[Job], prefix: str, timeout_s: float, during: Any = None
) -> tuple[list[Record], float, float]:
    """Send every job at its time and follow its stream; `during(t0)` runs alongside. Returns the
    records, the start (perf_counter) and the wall time until the last request ended."""
    records = [Record(j.index, j.long, len(j.prompt), j.max_tokens, j.offset) for j in jobs]
    t0 = time.perf_counter()
    tasks = [
        asyncio.create_task(run_request(client, job, f"{prefix}-{job.index}", t0, rec))
        for job, rec in zip(jobs, records, strict=True)
    ]
    side = asyncio.create_task(during(t0)) if during is not None else None
    done, pending = await asyncio.wait(tasks, timeout=timeout_s)
    wall = time.perf_counter() - t0
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=RPC_TIMEOUT_S)
        for rec in records:
            if rec.finish_reason is None and rec.error is None:
                rec.error = f"timed out: the run took more than {timeout_s:g} s"
    if side is not None:
        side_done, _ = await asyncio.wait([side], timeout=RPC_TIMEOUT_S)
        if not side_done:
            side.cancel()
        elif side.exception() is not None:
            raise side.exception()
    return records, t0, wall


# ---- instance state --------------------------------------------------------------------------
async def instance_stats(client: ClusterClient) -> dict[str, Any]:
    """Each live instance's EngineStats, read from its actor (not the client's ~100 ms old copy)."""
    ids = client.instance_ids
    stats = await asyncio.gather(
        *(client.call(client.actor_of(i).stats.remote(), RPC_TIMEOUT_S) for i in ids)
    )
    return dict(zip(ids, stats, strict=True))


def proc_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process on this host (None if it is gone or elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) CPU jiffies of the whole machine since boot."""
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:9]]
    return sum(vals) - vals[3] - vals[4], sum(vals)


class CpuMeter:
    """CPU seconds each instance (and this driver) got over an interval, and the machine's busy share."""

    def __init__(self, cluster: Cluster) -> None:
        self.pids = {i: info.pid for i, info in cluster.infos.items()}
        self.start()

    def start(self) -> None:
        self.t = time.perf_counter()
        self.cpu = {i: proc_cpu_s(pid) for i, pid in self.pids.items()}
        self.driver = time.process_time()
        self.jiffies = machine_jiffies()

    def read(self) -> dict[str, Any]:
        wall = time.perf_counter() - self.t
        busy0, total0 = self.jiffies
        busy1, total1 = machine_jiffies()
        per_instance = {}
        for i, pid in self.pids.items():
            now = proc_cpu_s(pid)
            if now is not None and self.cpu[i] is not None:
                per_instance[i] = now - self.cpu[i]
        busy_share = (busy1 - busy0) / max(1, total1 - total0)
        driver = time.process_time() - self.driver
        cores = len(os.sched_getaffinity(0))
        return {
            "wall_s": wall,
            "instance_cpu_s": per_instance,
            "instance_cpu_share": {i: s / wall for i, s in per_instance.items()},
            "driver_cpu_s": driver,
            "machine_busy_share": busy_share,
            # Cores' worth of CPU used by everything else: Ray's daemons and other work on the machine.
            "other_cores": busy_share * cores - (sum(per_instance.values()) + driver) / wall,
            "loadavg_1m_end": os.getloadavg()[0],
        }


async def sample_loads(
    client: ClusterClient, t0: float, samples: list[dict[str, Any]], every_s: float
) -> None:
    """Every every_s seconds until cancelled: each instance's load summary, as the client last read it."""
    while True:
        now = time.perf_counter() - t0
        row: dict[str, Any] = {"t": round(now, 2)}
        for i, load in client.loads().items():
            row[i] = {
                "used_blocks": load.used_blocks,
                "running": load.num_running,
                "waiting": load.num_waiting,
                "freeness": None if not np.isfinite(load.freeness) else round(load.freeness, 2),
            }
        samples.append(row)
        await asyncio.sleep(every_s)


async def with_client(cluster: Cluster, dispatch: str, body: Any) -> Any:
    client = cluster.client(dispatch)
    client.start()
    try:
        return await body(client)
    finally:
        shutting = asyncio.ensure_future(client.shutdown())
        done, _ = await asyncio.wait([shutting], timeout=SHUTDOWN_TIMEOUT_S)
        if not done:
            shutting.cancel()
            logger.warning("the %s client did not shut down within %g s", dispatch, SHUTDOWN_TIMEOUT_S)


async def warm_up(cluster: Cluster, seed: int) -> None:
    """A long and a short request on every instance (first-touch allocations, kernel caches)."""
    rng = np.random.default_rng(seed + 99)
    n = len(cluster.actors)
    jobs = [Job(k, _ids(rng, 512), 8, 0.0, True) for k in range(n)]
    jobs += [Job(n + k, _ids(rng, 32), 24, 0.0, False) for k in range(n)]

    async def body(client: ClusterClient) -> None:
        records, _, _ = await run_jobs(client, jobs, "warmup", timeout_s=300.0)
        bad = [r for r in records if not r.ok]
        if bad:
            raise RuntimeError(f"warm-up failed: {bad[0].error or bad[0].finish_reason}")

    await with_client(cluster, "round-robin", body)


# ---- statistics ------------------------------------------------------------------------------
def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize(records: list[Record]) -> dict[str, Any]:
    ok = [r for r in records if r.ok]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    long_ttft = [r.ttft for r in ok if r.long and r.ttft is not None]
    short_ttft = [r.ttft for r in ok if not r.long and r.ttft is not None]
    gaps = [g for r in ok for g in r.gaps]
    e2e = [r.e2e for r in ok if r.e2e is not None]
    long_queue = [r.queue_s for r in ok if r.long and r.queue_s is not None]
    return {
        "requests": len(records),
        "finished_ok": len(ok),
        "failed": len(records) - len(ok),
        "errors": sorted({r.error for r in records if r.error})[:5],
        "output_tokens": sum(r.num_tokens for r in ok),
        "ttft_p50_s": pct(ttft, 50),
        "ttft_p99_s": pct(ttft, 99),
        "ttft_mean_s": statistics.fmean(ttft) if ttft else None,
        "ttft_max_s": max(ttft, default=None),
        "short_ttft_p50_s": pct(short_ttft, 50),
        "short_ttft_p99_s": pct(short_ttft, 99),
        "long_prompts": len(long_ttft),
        "long_ttft_p50_s": pct(long_ttft, 50),
        "long_ttft_p99_s": pct(long_ttft, 99),
        "long_ttft_mean_s": statistics.fmean(long_ttft) if long_ttft else None,
        "long_queue_mean_s": statistics.fmean(long_queue) if long_queue else None,
        "tbt_p50_s": pct(gaps, 50),
        "tbt_p99_s": pct(gaps, 99),
        "tbt_max_s": max(gaps, default=None),
        "e2e_p50_s": pct(e2e, 50),
        "e2e_p99_s": pct(e2e, 99),
        "e2e_mean_s": statistics.fmean(e2e) if e2e else None,
        "requests_preempted": sum(1 for r in ok if r.preemptions),
        "request_preemptions_sum": sum(r.preemptions for r in ok),
        "requests_moved": sum(1 for r in ok if len(r.instances) > 1),
    }


def dispatch_split(records: list[Record]) -> dict[str, Any]:
    """Where the requests were first sent: counts, prompt tokens, long prompts, per instance."""
    split: dict[str, dict[str, int]] = {}
    for r in records:
        if not r.instances:
            continue
        row = split.setdefault(r.instances[0], {"requests": 0, "prompt_tokens": 0, "long_prompts": 0})
        row["requests"] += 1
        row["prompt_tokens"] += r.prompt_len
        row["long_prompts"] += r.long
    return dict(sorted(split.items()))


def record_row(r: Record) -> dict[str, Any]:
    return {
        "i": r.index,
        "long": r.long,
        "prompt": r.prompt_len,
        "out": r.max_tokens,
        "send": _round(r.send),
        "ttft": _round(r.ttft),
        "e2e": _round(r.e2e),
        "max_gap": _round(max(r.gaps, default=None)),
        "finish": r.finish_reason,
        "error": r.error,
        "instances": r.instances,
        "preemptions": r.preemptions,
    }


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)


# ---- part 1: balance -------------------------------------------------------------------------
async def run_policy(
    cluster: Cluster, policy: str, jobs: list[Job], args: argparse.Namespace
) -> dict[str, Any]:
    async def body(client: ClusterClient) -> dict[str, Any]:
        outcomes: list[Any] = []
        client.migrator.listeners.append(outcomes.append)
        before = await instance_stats(client)
        meter = CpuMeter(cluster)
        samples: list[dict[str, Any]] = []
        sampler_task: list[asyncio.Task[None]] = []

        async def during(t0: float) -> None:
            sampler_task.append(asyncio.create_task(sample_loads(client, t0, samples, 1.0)))

        try:
            records, _, wall = await run_jobs(client, jobs, policy, args.run_timeout, during)
        finally:
            for task in sampler_task:
                task.cancel()
        cpu = meter.read()
        after = await instance_stats(client)
        preemptions = {i: after[i].num_preemptions - before[i].num_preemptions for i in after}
        summary = summarize(records)
        summary.update(
            {
                "wall_s": wall,
                "preemptions": sum(preemptions.values()),
                "preemptions_per_instance": preemptions,
                "migrations": client.migrator.num_migrated,
                "migration_outcomes": _outcomes(outcomes),
                "migration_call_offs": _reasons(outcomes),
                "migration_pause_ms_median": _median_ms([o.downtime_s for o in outcomes if o.migrated]),
                "dispatch": dispatch_split(records),
                "cpu": cpu,
            }
        )
        return {
            "policy": policy,
            "summary": summary,
            "loads": samples,
            "requests": [record_row(r) for r in records],
        }

    return await with_client(cluster, policy, body)


def _outcomes(results: list[Any]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in results:
        outcome = getattr(r, "outcome", "migrated" if r.migrated else "not migrated")
        counts[outcome] = counts.get(outcome, 0) + 1
    return counts


def _reasons(results: list[Any]) -> dict[str, int]:
    """Why the moves that did not happen were called off (request ids and numbers stripped)."""
    import re

    counts: dict[str, int] = {}
    for r in results:
        if not r.migrated:
            reason = re.sub(r"'[^']*'|\b[0-9a-f]{8}\b|\d+", "_", r.reason or "?")[:160]
            counts[reason] = counts.get(reason, 0) + 1
    return counts


def _median_ms(values: list[float]) -> float | None:
    return statistics.median(values) * 1e3 if values else None


RATIO_KEYS = (
    "ttft_p50_s",
    "ttft_p99_s",
    "ttft_mean_s",
    "long_ttft_p99_s",
    "long_ttft_mean_s",
    "short_ttft_p99_s",
    "tbt_p99_s",
    "e2e_p99_s",
    "e2e_mean_s",
    "preemptions",
)


def ratios(by_policy: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """baseline / other for every pair of policies run (above 1: `other` is better)."""
    pairs = [
        ("round-robin", "llumnix"),
        ("round-robin", "least-load"),
        ("least-load", "llumnix"),
    ]
    out: dict[str, dict[str, float | None]] = {}
    for base, other in pairs:
        if base not in by_policy or other not in by_policy:
            continue
        a, b = by_policy[base], by_policy[other]
        out[f"{base} / {other}"] = {
            k: (a[k] / b[k] if a.get(k) is not None and b.get(k) else None) for k in RATIO_KEYS
        }
    return out


def plot_balance(report: dict[str, Any], path: Path) -> None:
    runs = report["policies"]
    names = [r["policy"] for r in runs]
    colors = {"round-robin": "tab:gray", "least-load": "tab:blue", "llumnix": "tab:orange"}
    panels = [
        ("ttft_p99_s", "P99 TTFT (s)"),
        ("long_ttft_p99_s", "P99 TTFT, long prompts (s)"),
        ("tbt_p99_s", "P99 TBT (s)"),
        ("preemptions", "preemptions (sum of instances)"),
    ]
    fig, axes = common.figure(1, len(panels), figsize=(4 * len(panels), 4.2))
    for ax, (key, title) in zip(axes, panels, strict=True):
        values = [r["summary"].get(key) or 0.0 for r in runs]
        bars = ax.bar(names, values, color=[colors.get(n, "tab:green") for n in names])
        for bar, value, r in zip(bars, values, runs, strict=True):
            label = f"{value:.0f}" if key == "preemptions" else f"{value:.2f}"
            if key == "preemptions" and r["summary"]["migrations"]:
                label += f"\n({r['summary']['migrations']} migr.)"
            ax.annotate(
                label, (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom", fontsize=8
            )
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
        ax.margins(y=0.2)
        ax.grid(True, axis="y", alpha=0.3)
    w = report["workload"]
    fig.suptitle(
        f"{report['num_instances']} instances x 1 thread, {w['kv_blocks']} KV blocks each; {w['num_requests']} "
        f"requests, gamma arrivals {w['rate']:g} req/s CV {w['cv']:g}, {w['long_prompts']} long prompts "
        f"({w['long_min']}-{w['long_max']} tok)",
        fontsize=9,
    )
    common.save_figure(fig, path, dpi=120)


async def part_balance(cluster: Cluster, args: argparse.Namespace) -> dict[str, Any]:
    jobs = balance_workload(args)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    runs = []
    for k, policy in enumerate(policies):
        if k:
            await asyncio.sleep(args.settle)
        print(f"[balance] {policy}: {len(jobs)} requests over {jobs[-1].offset:.0f} s ...", flush=True)
        run = await run_policy(cluster, policy, jobs, args)
        s = run["summary"]
        print(
            f"[balance] {policy:11s} ok {s['finished_ok']}/{s['requests']}  "
            f"TTFT p50 {s['ttft_p50_s']:.2f} p99 {s['ttft_p99_s']:.2f} s  "
            f"long TTFT p99 {s['long_ttft_p99_s'] or 0:.2f} s  TBT p99 {s['tbt_p99_s']:.3f} s  "
            f"E2E p99 {s['e2e_p99_s']:.2f} s  preemptions {s['preemptions']}  migrations {s['migrations']}  "
            f"wall {s['wall_s']:.0f} s  machine busy {s['cpu']['machine_busy_share']:.0%}",
            flush=True,
        )
        runs.append(run)
    lens = [len(j.prompt) for j in jobs]
    outs = [j.max_tokens for j in jobs]
    gaps = np.diff([0.0] + [j.offset for j in jobs])
    report = {
        "benchmark": "cluster_balance",
        "machine": platform.processor() or platform.machine(),
        "cores": len(os.sched_getaffinity(0)),
        "num_instances": args.instances,
        "threads_per_instance": 1,
        "workload": {
            "num_requests": len(jobs),
            "seed": args.seed,
            "rate": args.rate,
            "cv": args.cv,
            "measured_gap_cv": float(np.std(gaps) / np.mean(gaps)),
            "span_s": jobs[-1].offset,
            "long_frac": args.long_frac,
            "long_min": args.long_min,
            "long_max": args.long_max,
            "long_prompts": sum(j.long for j in jobs),
            "short_prompt": dataclasses.asdict(SHORT_PROMPT),
            "output": dataclasses.asdict(OUTPUT),
            "prompt_tokens": {"mean": float(np.mean(lens)), "p50": float(np.median(lens)), "max": max(lens)},
            "output_tokens": {"mean": float(np.mean(outs)), "p50": float(np.median(outs)), "max": max(outs)},
            "kv_blocks": args.kv_blocks,
            "block_size": 16,
            "max_num_batched_tokens": args.budget,
        },
        "policies": runs,
        "ratios": ratios({r["policy"]: r["summary"] for r in runs}),
    }
    return report


# ---- part 2: drain ---------------------------------------------------------------------------
async def part_drain(cluster: Cluster, args: argparse.Namespace) -> dict[str, Any]:
    jobs = drain_workload(args)
    victim = sorted(cluster.actors)[-1]
    print(
        f"[drain] {len(jobs)} requests over {jobs[-1].offset:.0f} s; draining {victim} at {args.drain_at:g} s ...",
        flush=True,
    )

    async def body(client: ClusterClient) -> dict[str, Any]:
        outcomes: list[Any] = []
        client.migrator.listeners.append(outcomes.append)
        event: dict[str, Any] = {}

        async def during(t0: float) -> None:
            await asyncio.sleep(max(0.0, t0 + args.drain_at - time.perf_counter()))
            on_victim = client.requests_on(victim)
            event["begin_s"] = time.perf_counter() - t0
            event["on_instance_at_begin"] = len(on_victim)
            event["in_flight_at_begin"] = client.num_in_flight
            start = time.perf_counter()
            drain = asyncio.ensure_future(client.migrator.drain(victim, args.drain_timeout))
            done, _ = await asyncio.wait([drain], timeout=args.drain_timeout + RPC_TIMEOUT_S)
            if not done:
                drain.cancel()
                raise RuntimeError(f"drain did not return within {args.drain_timeout + RPC_TIMEOUT_S:g} s")
            event["drain_s"] = time.perf_counter() - start
            event["result"] = drain.result()
            # What could not move (still prefilling at the deadline) finishes where it is.
            deadline = time.perf_counter() + args.drain_timeout
            while client.requests_on(victim) and time.perf_counter() < deadline:
                await asyncio.sleep(0.1)
            event["empty_s"] = time.perf_counter() - start
            event["left_before_retire"] = len(client.requests_on(victim))
            event["engine_in_flight_before_retire"] = await client.call(
                client.actor_of(victim).num_in_flight.remote(), RPC_TIMEOUT_S
            )
            await client.retire(victim)
            event["retired_s"] = time.perf_counter() - t0
            event["instances_after"] = client.instance_ids

        records, _, wall = await run_jobs(client, jobs, "drain", args.run_timeout, during)
        begin = event.get("begin_s", float("inf"))
        moved = [r for r in records if len(r.instances) > 1]
        after = [r for r in records if r.send is not None and r.send >= begin]
        summary = summarize(records)
        summary.update(
            {
                "wall_s": wall,
                "drained_instance": victim,
                **event,
                "requests_moved": len(moved),
                "migration_outcomes": _outcomes(outcomes),
                "migration_call_offs": _reasons(outcomes),
                "migration_pause_ms_median": _median_ms([o.downtime_s for o in outcomes if o.migrated]),
                "moved_max_token_gap_s": max((g for r in moved for g in r.gaps), default=None),
                "sent_after_drain_began": len(after),
                "sent_after_drain_began_to_drained": sum(1 for r in after if r.instances[:1] == [victim]),
                "finish_reasons": _counts(r.finish_reason or "error" for r in records),
                "all_finished_ok": all(r.ok for r in records),
                "dispatch": dispatch_split(records),
            }
        )
        return {"summary": summary, "requests": [record_row(r) for r in records]}

    run = await with_client(cluster, "round-robin", body)
    s = run["summary"]
    res = s.get("result", {})
    print(
        f"[drain] drain {s.get('drain_s', float('nan')):.2f} s: {s.get('on_instance_at_begin')} requests on "
        f"{victim}, moved {res.get('moved')}, failed {res.get('failed')}, left {res.get('left')}; "
        f"all {s['requests']} requests finished ok: {s['all_finished_ok']} ({s['finish_reasons']}); "
        f"longest gap of a moved request {s['moved_max_token_gap_s'] or 0:.3f} s",
        flush=True,
    )
    return {
        "benchmark": "cluster_drain",
        "machine": platform.processor() or platform.machine(),
        "cores": len(os.sched_getaffinity(0)),
        "num_instances": args.instances,
        "workload": {
            "num_requests": len(jobs),
            "rate": args.drain_rate,
            "arrivals": "Poisson",
            "prompt": dataclasses.asdict(SHORT_PROMPT),
            "output_tokens": [64, 192],
            "drain_at_s": args.drain_at,
            "drain_timeout_s": args.drain_timeout,
            "kv_blocks": args.kv_blocks,
        },
        **run,
    }


def _counts(items: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return counts


# ---- main ------------------------------------------------------------------------------------
async def run_parts(cluster: Cluster, args: argparse.Namespace) -> None:
    t = time.perf_counter()
    await warm_up(cluster, args.seed)
    print(f"warm-up {time.perf_counter() - t:.1f} s", flush=True)
    if args.part in ("both", "balance"):
        report = await part_balance(cluster, args)
        out = args.out_dir / "cluster-balance-cpu.json"
        common.write_json(out, report, indent=1)
        plot_balance(report, out.with_suffix(".png"))
        for pair, values in report["ratios"].items():
            shown = {k: round(v, 2) for k, v in values.items() if v is not None}
            print(f"[balance] {pair}: {shown}", flush=True)
        print(f"wrote {out} and {out.with_suffix('.png')}", flush=True)
    if args.part in ("both", "drain"):
        if args.part == "both":
            await asyncio.sleep(args.settle)
        report = await part_drain(cluster, args)
        out = args.out_dir / "cluster-drain-cpu.json"
        common.write_json(out, report, indent=1)
        print(f"wrote {out}", flush=True)


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--part", choices=("both", "balance", "drain"), default="both")
    p.add_argument("--instances", type=int, default=2)
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--kv-blocks", type=int, default=64, help="KV blocks (16 tokens) per instance")
    p.add_argument("--budget", type=int, default=512, help="max_num_batched_tokens per step")
    p.add_argument("--num-requests", type=int, default=100)
    p.add_argument("--rate", type=float, default=0.9, help="mean request rate (req/s)")
    p.add_argument("--cv", type=float, default=3.0, help="coefficient of variation of the gamma gaps")
    p.add_argument("--long-frac", type=float, default=0.12)
    p.add_argument("--long-min", type=int, default=256)
    p.add_argument("--long-max", type=int, default=640)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--settle", type=float, default=3.0, help="pause between runs (s)")
    p.add_argument("--run-timeout", type=float, default=600.0, help="per run: every request done by then (s)")
    p.add_argument("--drain-rate", type=float, default=0.5)
    p.add_argument("--drain-duration", type=float, default=60.0, help="seconds of arrivals in the drain part")
    p.add_argument("--drain-at", type=float, default=25.0)
    p.add_argument("--drain-timeout", type=float, default=60.0)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args()
    if args.cv <= 0 or args.rate <= 0:
        p.error("--rate and --cv must be positive")
    if args.long_max + OUTPUT.high > args.kv_blocks * 16:
        p.error("--kv-blocks must hold the longest request (long-max + 256 output tokens)")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    args.out_dir.mkdir(parents=True, exist_ok=True)

    from sutra.model.cpu_kernels import cpu_kernels

    cpu_kernels()  # built (or found built) once here, not raced for by the instances
    config = EngineConfig(
        ModelConfig(dtype=args.dtype),
        CacheConfig(num_blocks=args.kv_blocks, enable_prefix_caching=False),
        SchedulerConfig(max_num_batched_tokens=args.budget),
    )
    t = time.perf_counter()
    cluster = Cluster.start(config, args.instances, threads_per_instance=1, ready_timeout_s=600.0)
    print(f"{args.instances} instances ready in {time.perf_counter() - t:.1f} s", flush=True)
    try:
        asyncio.run(run_parts(cluster, args))
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
