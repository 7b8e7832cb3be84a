"""`sutra plan capacity`: the highest request rate a configuration serves within given SLOs, found
in simulation (Sarathi-Serve's capacity experiment).

The workload is `sutra bench serve`'s (dataset, lengths, burstiness, seed); every rate tried replays
the same requests with the gaps between them scaled. The search (sutra/sim/capacity.py) brackets
then bisects, assuming SLO attainment falls as the rate grows.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from sutra.bench.config import BenchConfig
from sutra.bench.errors import BenchError
from sutra.config import EngineConfig
from sutra.sim.capacity import CapacityResult, Slo, find_capacity, keeps_up
from sutra.sim.simulate import Workload, read_profile, simulate
from sutra.sim.simulator import SimResult

SLO_NAMES = tuple(f.name.removesuffix("_s") for f in fields(Slo))  # p99_tbt, p50_ttft, ...


def parse_slos(specs: list[str]) -> Slo:
    """["p99_tbt:100", "p50_ttft:2000"] (milliseconds) -> Slo(p99_tbt_s=0.1, p50_ttft_s=2.0)."""
    bounds: dict[str, float] = {}
    for spec in (part for item in specs for part in item.split()):
        name, sep, value = spec.partition(":")
        if not sep or name not in SLO_NAMES:
            raise BenchError(f"--slo {spec}: expected NAME:MS with NAME one of {', '.join(SLO_NAMES)}")
        try:
            ms = float(value)
        except ValueError:
            raise BenchError(f"--slo {spec}: {value!r} is not a number of milliseconds") from None
        if not ms > 0:
            raise BenchError(f"--slo {spec}: the bound must be > 0 ms")
        bounds[f"{name}_s"] = ms / 1000
    if not bounds:
        raise BenchError("give at least one --slo, e.g. --slo p99_tbt:200")
    return Slo(**bounds)


def plan_capacity(
    bench: BenchConfig,
    engine: EngineConfig,
    profile_path: str | Path,
    slo: Slo,
    *,
    low: float = 0.5,
    high: float = 2.0,
    tolerance: float = 0.02,
    instances: int = 1,
    dispatch: str = "least-load",
    keep_up: float = 0.85,
) -> CapacityResult:
    """Search the rate; each trial is a whole simulated run of the workload at that rate. A trial
    passes when it meets the SLOs and keeps up (`keeps_up`): a finite trace above capacity can end
    before its queue has grown enough to break a latency bound, but it falls behind."""
    profile, cost = read_profile(profile_path)
    workload = Workload.prepare(bench)

    def run_at(rate: float) -> SimResult:
        requests = workload.at_rate(rate, bench.burstiness, bench.seed)
        return simulate(requests, engine, profile, cost, instances, dispatch, bench.max_concurrency)

    def passes(result: SimResult) -> bool:
        return slo.meets(result) and keeps_up(result, keep_up)

    try:
        return find_capacity(run_at, passes, low, high, tolerance)
    except ValueError as e:
        raise BenchError(f"--low/--high: {e}") from None


def format_plan(result: CapacityResult, slo: Slo) -> str:
    bounds = ", ".join(f"{k.removesuffix('_s')} <= {v * 1000:g} ms" for k, v in asdict(slo).items() if v)
    lines = [f"SLOs: {bounds}", f"{'rate':>9} {'meets':>6} {'P50 TTFT':>10} {'P99 TTFT':>10} {'P99 TBT':>9}"]
    for trial in result.curve():
        f = trial.figures
        lines.append(
            f"{trial.rate:9.3f} {'yes' if trial.meets else 'no':>6} {f.get('p50_ttft_s', 0) * 1000:8.0f}ms "
            f"{f.get('p99_ttft_s', 0) * 1000:8.0f}ms {f.get('p99_tbt_s', 0) * 1000:7.0f}ms"
        )
    if result.capacity == 0.0:
        lines.append("capacity: none of the rates tried meets the SLOs")
    else:
        bound = "" if result.bracketed else " (a lower bound: the highest rate tried still met the SLOs)"
        lines.append(f"capacity: {result.capacity:.3f} requests/s{bound}")
    return "\n".join(lines)


def plan_json(result: CapacityResult, slo: Slo, bench: BenchConfig, engine: EngineConfig) -> dict[str, Any]:
    return {
        "capacity_req_s": result.capacity,
        "bracketed": result.bracketed,
        "slo_s": {k: v for k, v in asdict(slo).items() if v is not None},
        "workload": {
            "dataset_name": bench.dataset_name,
            "num_prompts": bench.num_prompts,
            "burstiness": bench.burstiness,
            "seed": bench.seed,
        },
        "scheduler": asdict(engine.scheduler),
        "trials": [asdict(t) for t in result.curve()],
    }


def write_plan(path: str | Path, record: dict[str, Any]) -> None:
    try:
        Path(path).write_text(json.dumps(record, indent=2) + "\n")
    except OSError as e:
        raise BenchError(f"--output {path}: {e}") from e
