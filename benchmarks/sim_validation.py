"""Simulator validation: simulated vs measured TTFT, TBT and throughput on the serving workload.

1. `sutra profile` measures this machine's step latency for the served model (same dtype, threads
   and token budget as the server), in a process of its own with the machine to itself. A served step
   runs slower than a profiled one (`serving_step_gap.py`: the server's event loop runs beside the
   torch threads); by default both use one thread fewer than the cores, which matched best.
2. For each scheduling mode (sarathi, prefill_first) a real server runs the serving benchmark's
   workload (`benchmarks/serving.py`: chat-length prompts with a 2048-token prompt as every 8th
   request, exact output lengths, Poisson arrivals) at several rates through `sutra bench serve`'s
   client; `sutra simulate`'s engine then runs the same prompts on the same arrival schedule, with the
   same engine options, against the profile.
3. Side by side: TTFT and TBT (the inter-token gaps, ITL) at P50/P90/P99 and output throughput, with
   the relative error (simulated - measured) / measured.
4. Calibrated (unless --no-calibrate): the server logs its steps (`--step-log`); after the warm-up,
   a calibration run (its own prompts and arrivals, at the middle rate) and `sutra profile --calibrate`
   measure how much longer a served step takes than the profile predicts (the median ratio over the
   steps so far, kept in steps-MODE-calibration.jsonl), and every validation run is simulated with
   steps scaled by it too (`simulated_calibrated`, `error_calibrated`). The validation runs' own steps
   are never used: they come after the calibration.

--resimulate RESULT measures nothing: it simulates a saved result's runs again (a new profile, a new
calibration rule) from the profile and calibration logs that run left behind.

Writes benchmarks/results/sim-validation-cpu.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import common
import numpy as np
from serving import RESULTS, ServerSpec, build_requests, running

from sutra.bench.arrivals import arrival_offsets
from sutra.bench.config import BenchConfig
from sutra.bench.serve import BenchResult, run_benchmark
from sutra.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from sutra.sim.calibrate import calibrate_file
from sutra.sim.capacity import Slo, find_capacity
from sutra.sim.cost_model import load_cost_model
from sutra.sim.profile import Profile
from sutra.sim.simulate import run_simulation, sim_requests, simulate

PERCENTILES = (50.0, 90.0, 99.0)
COMPARED = [(f"p{int(p)}_{m}", m, p) for m in ("ttft", "itl") for p in PERCENTILES]


def profile(args: argparse.Namespace, path: Path) -> None:
    cmd = [sys.executable, "-m", "sutra.cli", "profile", "--output", str(path), "--dtype", args.dtype]
    cmd += ["--num-threads", str(args.threads), "--max-num-batched-tokens", str(args.budget)]
    # A prefill grid as dense as what is served: chunks up to the budget, at cached contexts every few
    # hundred tokens (a 2048-token prompt's chunks run at 256, 512, ... 1792). The sparser grid
    # (chunks 16/64/128/budget at 0/512/2048) mispriced both lone short prompts and long chunked ones.
    cmd += [
        "--chunks",
        f"16,32,64,128,{args.budget * 3 // 4},{args.budget}",
        "--contexts",
        "0,256,512,1024,1536,2048",
        "--batches",
        "1,2,3,4,8,16,32",
    ]
    print("== profile:", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)


def server_spec(mode: str, args: argparse.Namespace, step_log: Path) -> ServerSpec:
    cmd = [sys.executable, "-m", "sutra.cli", "serve", "--port", str(args.port), "--dtype", args.dtype]
    cmd += ["--step-log", str(step_log)]
    cmd += ["--scheduling-mode", mode, "--max-num-batched-tokens", str(args.budget)]
    cmd += ["--num-threads", str(args.threads), "--kv-cache-memory-gb", str(args.kv_cache_gb)]
    cmd += ["--max-waiting-requests", "100000"]
    return ServerSpec(f"sutra-{mode}", cmd, {})


def choose_rates(args: argparse.Namespace, profile_path: Path) -> list[float]:
    """Rates at the given fractions of sarathi's simulated capacity (median TTFT <= 2 s, the
    scheduling-delay bound of Sarathi-Serve's capacity experiment): light, medium and near-full load."""
    profile = Profile.load(profile_path)
    cost = load_cost_model(profile)
    samples = build_requests(args.num_requests, args.seed)
    config = engine_config(args, "sarathi")

    def run_at(rate: float):
        offsets = arrival_offsets(len(samples), rate, 1.0, np.random.default_rng([args.seed, 3]))
        return simulate(sim_requests(samples, offsets, [None] * len(samples)), config, profile, cost)

    found = find_capacity(run_at, Slo(p50_scheduling_delay_s=2.0).meets, low=0.1, high=1.0, tolerance=0.05)
    print(f"== simulated capacity (sarathi, median TTFT <= 2 s): {found.capacity:.3f} req/s", flush=True)
    return [round(f * found.capacity, 3) for f in args.load_fractions]


def engine_config(args: argparse.Namespace, mode: str) -> EngineConfig:
    """What the server runs (serving.py's sutra_spec), as the simulator's engine options."""
    return EngineConfig(
        model=ModelConfig(dtype=args.dtype, num_threads=args.threads),
        cache=CacheConfig(kv_cache_memory_gb=args.kv_cache_gb),
        scheduler=SchedulerConfig(max_num_batched_tokens=args.budget, mode=mode),
    )


def bench_config(base: str, rate: float, args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(
        base_url=base,
        request_rate=rate,
        seed=args.seed,
        metric_percentiles=PERCENTILES,
        percentile_metrics=("ttft", "tpot", "itl", "e2el"),
        disable_tqdm=True,
        send_min_tokens=True,
    )


def figures(result: BenchResult) -> dict[str, float]:
    m = result.metrics
    out = {key: m.latencies[metric].percentiles_ms[p] for key, metric, p in COMPARED}
    out["output_throughput"] = m.output_throughput
    out["completed"] = m.completed
    return out


def compare(measured: dict[str, float], simulated: dict[str, float]) -> dict[str, float]:
    keys = [k for k, _, _ in COMPARED] + ["output_throughput"]
    return {k: (simulated[k] - measured[k]) / measured[k] for k in keys if measured[k] > 0}


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__)
    p.add_argument("--rates", default=None, help="comma-separated req/s (default: from --load-fractions)")
    p.add_argument(
        "--load-fractions",
        type=lambda t: [float(x) for x in t.split(",")],
        default=[0.3, 0.6, 0.9],
        help="rates as fractions of sarathi's simulated capacity",
    )
    p.add_argument("--modes", default="sarathi,prefill_first")
    p.add_argument("--num-requests", type=int, default=48, help="requests of each run")
    p.add_argument("--budget", type=int, default=256, help="token budget per iteration")
    p.add_argument(
        "--threads",
        type=int,
        default=max(1, len(os.sched_getaffinity(0)) - 1),
        help="torch threads of the server and the profile (default: one core left to the server's event "
        "loop, which matched best; see serving_step_gap.py)",
    )
    p.add_argument("--dtype", default="auto")
    p.add_argument("--kv-cache-gb", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=8191)
    p.add_argument("--profile", type=Path, default=None, help="reuse this profile instead of measuring one")
    p.add_argument(
        "--no-calibrate",
        dest="calibrate",
        action="store_false",
        help="skip the calibration run and the calibrated simulations",
    )
    p.add_argument(
        "--resimulate",
        type=Path,
        default=None,
        metavar="RESULT",
        help="measure nothing: simulate the runs of this saved result again (with --profile, and the "
        "calibration logs the run left in benchmarks/out/sim-validation-logs)",
    )
    p.add_argument("--out", type=Path, default=RESULTS / "sim-validation-cpu.json")
    args = p.parse_args(argv)
    log_dir = RESULTS.parent / "out" / "sim-validation-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    profile_path = args.profile or log_dir / "profile.json"
    if args.profile is None and args.resimulate is None:
        profile(args, profile_path)
    rates = (
        []
        if args.resimulate
        else [float(r) for r in args.rates.split(",")]
        if args.rates
        else choose_rates(args, profile_path)
    )
    report: dict[str, Any] = {
        "settings": {k: str(v) for k, v in vars(args).items()},
        "rates": rates,
        "runs": [],
    }
    if args.resimulate is not None:  # the measured figures of a saved run, simulated anew
        saved = json.loads(args.resimulate.read_text())
        report["rates"] = saved["rates"]
        for row in saved["runs"]:
            k = saved["rates"].index(row["rate"])
            calibrated = log_dir / f"profile-{row['mode']}-calibrated.json"
            if args.calibrate:
                calibrate_file(profile_path, calibration_log(log_dir, row["mode"]), calibrated)
            report["runs"].append(
                simulated_row(
                    args,
                    row["mode"],
                    row["rate"],
                    k,
                    row["measured"],
                    profile_path,
                    calibrated if args.calibrate else None,
                )
            )
    for mode in [] if args.resimulate is not None else args.modes.split(","):
        print(f"== sutra {mode}", flush=True)
        step_log = log_dir / f"steps-{mode}.jsonl"
        with running(server_spec(mode, args, step_log), args.port, log_dir) as base:
            run_benchmark(bench_config(base, float("inf"), args), build_requests(8, args.seed + 99))
            calibrated = None
            if args.calibrate:
                rate = rates[len(rates) // 2]
                run_benchmark(
                    bench_config(base, rate, args), build_requests(args.num_requests, args.seed + 100)
                )
                # The steps so far (the warm-up's and the calibration run's), kept apart from the
                # validation runs' that follow.
                shutil.copyfile(step_log, calibration_log(log_dir, mode))
                calibrated = log_dir / f"profile-{mode}-calibrated.json"
                print(calibrate_file(profile_path, calibration_log(log_dir, mode), calibrated), flush=True)
            for k, rate in enumerate(rates):
                requests = build_requests(args.num_requests, args.seed + k)
                measured = figures(run_benchmark(bench_config(base, rate, args), requests))
                report["runs"].append(simulated_row(args, mode, rate, k, measured, profile_path, calibrated))
    report["summary"] = summarize(report["runs"])
    common.write_json(args.out, report)
    plot(report, args.out.with_suffix(".png"))
    print(json.dumps(report["summary"], indent=2))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


def calibration_log(log_dir: Path, mode: str) -> Path:
    return log_dir / f"steps-{mode}-calibration.jsonl"


def simulated_row(
    args: argparse.Namespace,
    mode: str,
    rate: float,
    k: int,
    measured: dict[str, float],
    profile_path: Path,
    calibrated: Path | None,
) -> dict[str, Any]:
    """One validation run: its measured figures beside the simulation of the same requests and
    arrivals, with the profile and (if given) the calibrated profile."""
    requests = build_requests(args.num_requests, args.seed + k)
    config = bench_config("http://simulated", rate, args)
    start = time.perf_counter()
    sim = run_simulation(config, engine_config(args, mode), profile_path, samples=requests)
    row = {
        "mode": mode,
        "rate": rate,
        "measured": measured,
        "simulated": figures(sim),
        "simulation_wall_s": time.perf_counter() - start,
    }
    row["error"] = compare(row["measured"], row["simulated"])
    if calibrated is not None:
        sim = run_simulation(config, engine_config(args, mode), calibrated, samples=requests)
        row["simulated_calibrated"] = figures(sim)
        row["error_calibrated"] = compare(row["measured"], row["simulated_calibrated"])
    print_row(row)
    return row


def print_row(row: dict[str, Any]) -> None:
    cells = [
        f"{k} {row['measured'][k]:.0f}/{row['simulated'][k]:.0f} ms ({row['error'].get(k, 0):+.0%})"
        for k, _, _ in COMPARED
    ]
    tput = "output_throughput"
    cells.append(f"tok/s {row['measured'][tput]:.1f}/{row['simulated'][tput]:.1f}")
    print(f"  {row['mode']} {row['rate']:g} req/s (measured/simulated): " + ", ".join(cells), flush=True)
    if "error_calibrated" in row:
        errors = ", ".join(f"{k} {v:+.0%}" for k, v in row["error_calibrated"].items())
        print(f"    calibrated: {errors}", flush=True)


def summarize(runs: list[dict[str, Any]], field: str = "error") -> dict[str, Any]:
    """Median and max |error| per figure over all runs (of the calibrated simulations too)."""
    out: dict[str, Any] = {}
    for key in [k for k, _, _ in COMPARED] + ["output_throughput"]:
        errors = sorted(abs(r[field][key]) for r in runs if key in r.get(field, {}))
        if errors:
            out[key] = {"median_abs_error": errors[len(errors) // 2], "max_abs_error": errors[-1]}
    if field == "error" and any("error_calibrated" in r for r in runs):
        out["calibrated"] = summarize(runs, "error_calibrated")
    return out


def plot(report: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    runs = report["runs"]
    modes = list(dict.fromkeys(r["mode"] for r in runs))
    fig = Figure(figsize=(13, 4 * len(modes)), layout="constrained")
    axes = fig.subplots(len(modes), 3, squeeze=False)
    for row, mode in enumerate(modes):
        mine = [r for r in runs if r["mode"] == mode]
        rates = [r["rate"] for r in mine]
        for col, (metric, unit) in enumerate([("ttft", "ms"), ("itl", "ms"), ("output_throughput", "tok/s")]):
            ax = axes[row][col]
            keys = [f"p{int(p)}_{metric}" for p in PERCENTILES] if metric != "output_throughput" else [metric]
            for key in keys:
                (line,) = ax.plot(rates, [r["measured"][key] for r in mine], "o-", label=f"{key} measured")
                ax.plot(
                    rates,
                    [r["simulated"][key] for r in mine],
                    "x--",
                    color=line.get_color(),
                    label="simulated",
                )
                if all("simulated_calibrated" in r for r in mine):
                    calibrated = [r["simulated_calibrated"][key] for r in mine]
                    ax.plot(rates, calibrated, "+:", color=line.get_color(), label="calibrated")
            ax.set_title(f"{mode}: {metric}")
            ax.set_xlabel("request rate (req/s)")
            ax.set_ylabel(unit)
            ax.grid(alpha=0.3)
            ax.legend(fontsize="x-small")
    fig.suptitle(
        "Simulated (x, dashed; calibrated +, dotted) vs measured (o, solid), serving workload, same arrivals"
    )
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
