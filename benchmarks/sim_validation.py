"""Simulator validation: simulated vs measured TTFT, TBT and throughput on the serving workload.

1. `sutra profile` measures this machine's step latency for the served model (same dtype, threads
   and token budget as the server), in a process of its own with the machine to itself. A served step
   runs slower than a profiled one (`serving_step_gap.py`: the server's event loop runs beside the
   torch threads); by default both use one thread fewer than the cores, which matched best.
2. For each scheduling mode (sarathi, prefill_first) a real server runs the serving benchmark's
   workload (`benchmarks/serving.py`: chat-length prompts with a 2048-token prompt as every 8th
   request, exact output lengths, Poisson arrivals) at several rates through `sutra bench serve`'s
   client; `sutra simulate`'s engine then runs the same prompts on the same arrival schedule, with the
   same engine options, against the profile. The servers of all modes are up at once and the runs go
   rate by rate with the modes side by side; with `--repeats R` the whole sequence runs R times, each
   time with a fresh sample of the workload, and a run's measured and simulated figures are the
   medians over its repeats (the machine's drift and one sample's luck both average out).
3. Side by side: TTFT and TBT (the inter-token gaps, ITL) at P50/P90/P99 and output throughput, with
   the relative error (simulated - measured) / measured. Since a measured run and its simulation share
   their arrivals, every request's TTFT is compared too (`request_ttft_error`, the median over the
   requests, signed and absolute): a figure that one sample's luck cannot move the way it moves the
   median TTFT of a run.
4. Calibrated (unless --no-calibrate): the server logs its steps (`--step-log`); after the warm-up,
   a calibration run (its own prompts and arrivals, at the middle rate) and `sutra profile --calibrate`
   measure how much longer a served step takes than the profile predicts (the median ratio over the
   steps so far, kept in steps-MODE-calibration.jsonl), and every validation run is simulated with
   steps scaled by it too (`simulated_calibrated`, `error_calibrated`). The validation runs' own steps
   are never used for it: they come after the calibration.
5. Speed-matched: each validation run is simulated once more with the median ratio of its own served
   steps (kept in steps-MODE-runK.jsonl) as the factor (`simulated_matched`, `error_matched`). That is
   not a prediction, since a run's speed is known only afterwards; this machine's speed drifts by up to
   15% over half an hour, and this column shows how much of the calibrated error is that drift and
   how much the simulator's own (its scheduler replay, the batches it forms, the cost model's shape).

--resimulate RESULT measures nothing: it simulates a saved result's runs again (a new profile, a new
cost model or calibration rule) from the profile and step logs that run left behind.

Writes benchmarks/results/sim-validation-cpu.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import common
import numpy as np
from serving import LONG_INPUT, RESULTS, ServerSpec, build_requests, running

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
REQUEST_TTFTS = "request_ttfts_s"


def profile(args: argparse.Namespace, path: Path) -> None:
    base = [sys.executable, "-m", "sutra.cli", "profile", "--dtype", args.dtype]
    base += ["--num-threads", str(args.threads), "--max-num-batched-tokens", str(args.budget)]
    # A prefill grid as dense as what is served: chunks up to the budget, at cached contexts every few
    # hundred tokens (a 2048-token prompt's chunks run at 256, 512, ... 1792). The sparser grid
    # (chunks 16/64/128/budget at 0/512/2048) mispriced both lone short prompts and long chunked ones.
    grid = ["--chunks", f"16,32,64,128,{args.budget * 3 // 4},{args.budget}"]
    grid += ["--contexts", "0,256,512,1024,1536,2048", "--batches", "1,2,3,4,8,16,32"]
    print("== profile:", " ".join(base[2:] + grid), flush=True)
    subprocess.run(base + ["--output", str(path)] + grid, check=True)
    if "prefill_first" in args.modes.split(","):
        # prefill_first prefills a whole prompt in one step (the budget does not chunk it), up to the
        # workload's longest: without points there the cost model extrapolates those steps from the
        # budget's, 14-28% low for 512-2048 tokens on this machine. At no cached context only, where
        # whole prompts start.
        sizes = [size for size in (2 * args.budget, 4 * args.budget, LONG_INPUT) if size > args.budget]
        long_path = path.with_name(f"{path.stem}-whole-prompts.json")
        grid = ["--chunks", ",".join(str(s) for s in sorted(set(sizes))), "--contexts", "0", "--batches", "1"]
        print("== profile, whole prompts:", " ".join(base[2:] + grid), flush=True)
        subprocess.run(base + ["--output", str(long_path)] + grid, check=True)
        merged = Profile.load(path)
        merged.prefill += Profile.load(long_path).prefill
        merged.save(path)


def server_spec(mode: str, args: argparse.Namespace, step_log: Path, port: int) -> ServerSpec:
    cmd = [sys.executable, "-m", "sutra.cli", "serve", "--port", str(port), "--dtype", args.dtype]
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


def figures(result: BenchResult) -> dict[str, Any]:
    m = result.metrics
    out: dict[str, Any] = {key: m.latencies[metric].percentiles_ms[p] for key, metric, p in COMPARED}
    out["output_throughput"] = m.output_throughput
    out["completed"] = m.completed
    # Each request's own TTFT (seconds, request order; 0 for a failed one): measured and simulated
    # runs share their arrivals, so they pair up request by request.
    out[REQUEST_TTFTS] = [o.ttft if o.success else 0.0 for o in result.outputs]
    return out


def request_ttft_error(measured: list[float], simulated: list[float]) -> list[float]:
    """(simulated - measured) / measured of every request that both runs completed."""
    return [(s - m) / m for m, s in zip(measured, simulated, strict=True) if m > 0 and s > 0]


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
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run every mode and rate this many times, each with fresh requests and arrivals of the "
        "workload; measured and simulated figures are medians over the repeats",
    )
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
    p.add_argument("--port", type=int, default=8191, help="the first mode's server (the next ones count up)")
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
            matched = speed_matched(profile_path, log_dir, row["mode"], k)
            report["runs"].append(
                simulated_row(
                    args,
                    row["mode"],
                    row["rate"],
                    k,
                    row.get("repeats", [row["measured"]]),
                    profile_path,
                    calibrated if args.calibrate else None,
                    matched,
                )
            )
    if args.resimulate is None:
        report["runs"] = measure(args, rates, profile_path, log_dir)
    report["summary"] = summarize(report["runs"])
    common.write_json(args.out, report)
    plot(report, args.out.with_suffix(".png"))
    print(json.dumps(report["summary"], indent=2))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


def measure(args: argparse.Namespace, rates: list[float], profile_path: Path, log_dir: Path) -> list[dict]:
    """Every mode's server up at once; after each one's warm-up and calibration, the validation runs
    go rate by rate with the modes side by side, `--repeats` times over (fresh requests each time),
    so that the machine's drift falls on every mode and rate alike."""
    modes = args.modes.split(",")
    step_logs = {mode: log_dir / f"steps-{mode}.jsonl" for mode in modes}
    for mode in modes:
        for k in range(len(rates)):
            run_log(log_dir, mode, k).unlink(missing_ok=True)
    bases: dict[str, str] = {}
    calibrated: dict[str, Path | None] = {}
    measured: dict[tuple[str, int], list[dict[str, Any]]] = {}
    with ExitStack() as servers:
        for i, mode in enumerate(modes):
            print(f"== sutra {mode}", flush=True)
            port = args.port + i
            spec = server_spec(mode, args, step_logs[mode], port)
            base = bases[mode] = servers.enter_context(running(spec, port, log_dir))
            run_benchmark(bench_config(base, float("inf"), args), build_requests(8, args.seed + 99))
            calibrated[mode] = None
            if args.calibrate:
                rate = rates[len(rates) // 2]
                run_benchmark(
                    bench_config(base, rate, args), build_requests(args.num_requests, args.seed + 100)
                )
                # The steps so far (the warm-up's and the calibration run's), kept apart from the
                # validation runs' that follow.
                shutil.copyfile(step_logs[mode], calibration_log(log_dir, mode))
                calibrated[mode] = log_dir / f"profile-{mode}-calibrated.json"
                print(
                    calibrate_file(profile_path, calibration_log(log_dir, mode), calibrated[mode]), flush=True
                )
        for repeat in range(args.repeats):
            for k, rate in enumerate(rates):
                for mode in modes:
                    print(f"== {mode} at {rate:g} req/s, repeat {repeat + 1}/{args.repeats}", flush=True)
                    requests = build_requests(args.num_requests, workload_seed(args, k, repeat))
                    first_byte = log_size(step_logs[mode])
                    result = run_benchmark(bench_config(bases[mode], rate, args), requests)
                    measured.setdefault((mode, k), []).append(figures(result))
                    keep_run_steps(step_logs[mode], first_byte, run_log(log_dir, mode, k))
    return [
        simulated_row(
            args,
            mode,
            rate,
            k,
            measured[(mode, k)],
            profile_path,
            calibrated[mode],
            speed_matched(profile_path, log_dir, mode, k),
        )
        for mode in modes
        for k, rate in enumerate(rates)
    ]


def calibration_log(log_dir: Path, mode: str) -> Path:
    return log_dir / f"steps-{mode}-calibration.jsonl"


def run_log(log_dir: Path, mode: str, k: int) -> Path:
    return log_dir / f"steps-{mode}-run{k}.jsonl"


def log_size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def keep_run_steps(step_log: Path, start: int, out: Path) -> None:
    """Append the steps one validation run added to the server's log, from byte `start` on (the log
    is written a whole line at a time; a run's repeats share a file)."""
    with step_log.open("rb") as log, out.open("ab") as f:
        log.seek(start)
        f.write(log.read())


def speed_matched(profile_path: Path, log_dir: Path, mode: str, k: int) -> Path | None:
    """The profile scaled by the median ratio of this run's own served steps (all its repeats') to the
    prediction: not a prediction (the run's speed is known only afterwards) but what separates the
    simulator's fidelity (scheduler, batches, the cost model's shape) from the machine's drift."""
    steps = run_log(log_dir, mode, k)
    if not steps.exists():
        return None
    matched = log_dir / f"profile-{mode}-run{k}-matched.json"
    print("  speed-matched:", calibrate_file(profile_path, steps, matched), flush=True)
    return matched


def workload_seed(args: argparse.Namespace, k: int, repeat: int) -> int:
    """The seed of the k-th rate's requests and arrivals in a repeat: each repeat is a fresh sample of
    the workload (the same prompts again would hit the server's prefix cache)."""
    return args.seed + k + 1000 * repeat


def median_figures(runs: list[dict[str, Any]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in runs) for key in runs[0] if key != REQUEST_TTFTS}


def simulated_row(
    args: argparse.Namespace,
    mode: str,
    rate: float,
    k: int,
    repeats: list[dict[str, Any]],
    profile_path: Path,
    calibrated: Path | None,
    matched: Path | None = None,
) -> dict[str, Any]:
    """One validation run: its measured figures (the median over its repeats) beside the simulation
    of the same requests and arrivals (the median over the same repeats), with the profile and (if
    given) the calibrated and speed-matched profiles."""
    config = bench_config("http://simulated", rate, args)

    def simulated(path: Path) -> dict[str, Any]:
        runs, errors = [], []
        for repeat, measured in enumerate(repeats):
            requests = build_requests(args.num_requests, workload_seed(args, k, repeat))
            runs.append(figures(run_simulation(config, engine_config(args, mode), path, samples=requests)))
            if REQUEST_TTFTS in measured:
                errors += request_ttft_error(measured[REQUEST_TTFTS], runs[-1][REQUEST_TTFTS])
        out = median_figures(runs)
        if errors:  # per request, a figure no sample's luck moves: the median signed and absolute error
            out["request_ttft_error"] = statistics.median(errors)
            out["request_ttft_abs_error"] = statistics.median(abs(e) for e in errors)
        return out

    start = time.perf_counter()
    row = {
        "mode": mode,
        "rate": rate,
        "measured": median_figures(repeats),
        "simulated": simulated(profile_path),
    }
    row["simulation_wall_s"] = time.perf_counter() - start
    row["error"] = compare(row["measured"], row["simulated"])
    for kind, path in (("calibrated", calibrated), ("matched", matched)):
        if path is not None:
            row[f"simulated_{kind}"] = simulated(path)
            row[f"error_{kind}"] = compare(row["measured"], row[f"simulated_{kind}"])
    row["repeats"] = repeats
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
    for kind in ("calibrated", "matched"):
        if f"error_{kind}" in row:
            errors = ", ".join(f"{k} {v:+.0%}" for k, v in row[f"error_{kind}"].items())
            print(f"    {kind}: {errors}", flush=True)
    for kind in ("", "_calibrated", "_matched"):
        sim = row.get(f"simulated{kind}", {})
        if "request_ttft_error" in sim:
            print(
                f"    per-request TTFT{kind.replace('_', ' ')}: median error {sim['request_ttft_error']:+.0%}, "
                f"median |error| {sim['request_ttft_abs_error']:.0%}",
                flush=True,
            )


def summarize(runs: list[dict[str, Any]], field: str = "error") -> dict[str, Any]:
    """Median and max |error| per figure over all runs (of the calibrated simulations too)."""
    out: dict[str, Any] = {}
    for key in [k for k, _, _ in COMPARED] + ["output_throughput"]:
        errors = sorted(abs(r[field][key]) for r in runs if key in r.get(field, {}))
        if errors:
            out[key] = {"median_abs_error": errors[len(errors) // 2], "max_abs_error": errors[-1]}
    simulated = field.replace("error", "simulated")
    per_request = sorted(
        r[simulated]["request_ttft_abs_error"]
        for r in runs
        if "request_ttft_abs_error" in r.get(simulated, {})
    )
    if per_request:  # each run's median |error| over its requests
        out["request_ttft"] = {
            "median_abs_error": per_request[len(per_request) // 2],
            "max_abs_error": per_request[-1],
        }
    for kind in ("calibrated", "matched") if field == "error" else ():
        if any(f"error_{kind}" in r for r in runs):
            out[kind] = summarize(runs, f"error_{kind}")
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
                for kind, style in (("calibrated", "+:"), ("matched", "1-.")):
                    if all(f"simulated_{kind}" in r for r in mine):
                        values = [r[f"simulated_{kind}"][key] for r in mine]
                        ax.plot(rates, values, style, color=line.get_color(), label=kind)
            ax.set_title(f"{mode}: {metric}")
            ax.set_xlabel("request rate (req/s)")
            ax.set_ylabel(unit)
            ax.grid(alpha=0.3)
            ax.legend(fontsize="x-small")
    fig.suptitle(
        "Simulated (x, dashed; calibrated +, dotted; speed-matched, dash-dot) vs measured (o, solid), "
        "serving workload, same arrivals"
    )
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
