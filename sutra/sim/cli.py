"""`sutra profile | simulate | plan`: measure (or derive from a roofline) the step latency the
simulator's cost model is fitted to, run `sutra bench serve`'s workload through the simulator, and
plan a deployment in simulation (`plan capacity`: the highest rate within SLOs; `plan placement`:
the colocated or prefill/decode split of a machine with the most goodput per core)."""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

from sutra.config import EngineConfig
from sutra.engine.engine import LLMEngine
from sutra.sim.calibrate import calibrate_file
from sutra.sim.cost_model import fit_cost_model
from sutra.sim.profile import profile_engine
from sutra.sim.roofline import (
    DEVICES,
    RooflineCostModel,
    device_spec,
    kv_cache_blocks,
    model_shape,
    roofline_profile,
)


def _positive(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not sizes or any(s < 0 for s in sizes):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 0, got {text!r}")
    return sizes


def add_profile_parser(
    sub: argparse._SubParsersAction,
    add_engine_args: Callable[[argparse.ArgumentParser], None],
    engine_config: Callable[[argparse.Namespace], EngineConfig],
) -> None:
    p = sub.add_parser(
        "profile", help="measure step latency on this machine and fit the simulator's cost model"
    )
    add_engine_args(p)
    p.add_argument("--output", required=True, help="where to write the profile JSON")
    p.add_argument("--chunks", type=_sizes, default=[16, 64, 256, 512], help="prefill chunk sizes (tokens)")
    p.add_argument("--contexts", type=_sizes, default=[0, 512, 2048], help="cached tokens before each batch")
    p.add_argument("--batches", type=_sizes, default=[1, 2, 4, 16, 64], help="decode batch sizes")
    p.add_argument(
        "--reps",
        type=_positive,
        default=5,
        help="timed passes over the grid, each in a shuffled order (each point keeps its median)",
    )
    p.add_argument(
        "--roofline",
        choices=sorted(DEVICES),
        default=None,
        help="compute the points from this GPU's roofline instead of measuring (no engine is built)",
    )
    p.add_argument(
        "--shape", default="llama-3-8b", help="model shape for --roofline (a preset or mistral-7b)"
    )
    p.add_argument(
        "--tp",
        type=int,
        default=1,
        metavar="K",
        help="with --roofline: one instance on K GPUs, tensor parallel (assumed costs: sutra/sim/roofline.py)",
    )
    p.add_argument(
        "--calibrate",
        default=None,
        metavar="PROFILE",
        help="instead of measuring: calibrate this profile on the served steps of --step-log (their "
        "median ratio to its predictions scales the simulator's steps); writes --output",
    )
    p.add_argument("--step-log", default=None, help="with --calibrate: a `sutra serve --step-log` file")
    p.set_defaults(
        func=lambda args: (
            cmd_calibrate(args)
            if args.calibrate
            else cmd_roofline_profile(args)
            if args.roofline
            else cmd_profile(args, engine_config(args))
        )
    )


def cmd_roofline_profile(args: argparse.Namespace) -> None:
    try:
        model = RooflineCostModel(
            device_spec(args.roofline), model_shape(args.shape), tensor_parallel=args.tp
        )
    except ValueError as e:
        raise SystemExit(f"error: --tp {args.tp}: {e}") from None
    profile = roofline_profile(model, args.chunks, args.contexts, args.batches, args.block_size)
    profile.save(args.output)
    blocks = kv_cache_blocks(model.device, model.shape, args.block_size, tensor_parallel=args.tp)
    gpus = f"{args.tp} x {args.roofline} (tensor parallel)" if args.tp > 1 else args.roofline
    print(f"wrote {args.output}: {len(profile.prefill)} prefill and {len(profile.decode)} decode points")
    print(f"roofline: {args.shape} on {gpus}, {blocks} KV blocks of {args.block_size} tokens fit")


def cmd_calibrate(args: argparse.Namespace) -> None:
    if not args.step_log:
        raise SystemExit("error: --calibrate needs --step-log FILE (from `sutra serve --step-log`)")
    try:
        print(calibrate_file(args.calibrate, args.step_log, args.output))
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"error: {e}") from None


def cmd_profile(args: argparse.Namespace, config: EngineConfig) -> None:
    engine = LLMEngine(config)
    profile = profile_engine(
        engine,
        args.chunks,
        args.contexts,
        args.batches,
        args.reps,
        model_name=config.model.model or "default",
    )
    profile.save(args.output)
    print(f"wrote {args.output}: {len(profile.prefill)} prefill and {len(profile.decode)} decode points")
    try:
        model = fit_cost_model(profile)
    except ValueError as e:  # a partial grid, e.g. to be merged into another profile
        print(f"no cost model fitted ({e}); the points are saved")
        return
    errors = model.relative_errors(profile)
    print(f"cost model: {model.describe()}")
    print(f"fit error: median {statistics.median(errors):.1%}, max {max(errors):.1%}")


def add_simulate_parser(
    sub: argparse._SubParsersAction,
    add_engine_args: Callable[[argparse.ArgumentParser], None],
    engine_config: Callable[[argparse.Namespace], EngineConfig],
) -> None:
    from sutra.bench.cli import add_workload_args

    p = sub.add_parser(
        "simulate",
        help="run `sutra bench serve`'s workload through the simulator (the real scheduler, a cost model)",
        description="The same prompts, arrivals and report as `sutra bench serve`, in simulated time: "
        "the engine's own scheduler, KV manager and policies run against the profile's cost model.",
    )
    p.add_argument("--profile", required=True, help="a profile JSON from `sutra profile`")
    add_cluster_args(p)
    add_engine_args(p)
    add_workload_args(p)
    p.set_defaults(func=lambda args: cmd_simulate(args, engine_config(args)))


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    from sutra.cluster.dispatch import DEFAULT_DISPATCH, DISPATCH_POLICIES

    g = p.add_argument_group("cluster")
    g.add_argument("--instances", type=int, default=1, help="simulated engine instances")
    g.add_argument("--dispatch", default=DEFAULT_DISPATCH, choices=sorted(DISPATCH_POLICIES))


def cmd_simulate(args: argparse.Namespace, config: EngineConfig) -> None:
    from sutra.bench.cli import config_from_args
    from sutra.sim.simulate import run_simulation

    bench = config_from_args(args, server=False)
    result = run_simulation(bench, config, args.profile, instances=args.instances, dispatch=args.dispatch)
    sim = result.extra["simulation"]
    print(
        f"simulated {len(result.requests)} requests in {sim['wall_s']:.2f} s of wall time "
        f"({sim['simulated_requests_per_wall_s']:.0f} requests/s), {sim['num_steps']} steps, "
        f"{sim['num_preemptions']} preemptions"
    )
    print(result.report())
    for path in (result.json_path, result.plot_path):
        if path is not None:
            print(f"wrote {path}")


def add_plan_parser(
    sub: argparse._SubParsersAction,
    add_engine_args: Callable[[argparse.ArgumentParser], None],
    engine_config: Callable[[argparse.Namespace], EngineConfig],
) -> None:
    from sutra.bench.cli import add_workload_args

    plan = sub.add_parser("plan", help="plan a deployment in simulation")
    kinds = plan.add_subparsers(dest="plan_command", required=True)
    p = kinds.add_parser(
        "capacity",
        help="the highest request rate a configuration serves within the SLOs",
        description="Search, in simulation, the highest rate of `sutra bench serve`'s workload that the "
        "configured engine(s) serve within the SLOs (--request-rate is ignored: it is what is searched).",
    )
    p.add_argument("--profile", required=True, help="a profile JSON from `sutra profile`")
    p.add_argument(
        "--slo",
        action="append",
        default=[],
        metavar="NAME:MS",
        help="a latency bound, NAME one of p99_tbt, p50_tbt, p99_ttft, p50_ttft, p99_e2e (repeatable)",
    )
    p.add_argument("--low", type=float, default=0.5, help="first low rate of the search (req/s)")
    p.add_argument("--high", type=float, default=2.0, help="first high rate of the search (req/s)")
    p.add_argument("--tolerance", type=float, default=0.02, help="relative width the search stops at")
    p.add_argument(
        "--keep-up",
        type=float,
        default=0.85,
        help="a rate passes only if requests finish at >= this fraction of it while they arrive (a "
        "short trace above capacity ends before its queue breaks a latency bound)",
    )
    p.add_argument("--output", default=None, help="also write the trials and the capacity as JSON")
    add_cluster_args(p)
    add_engine_args(p)
    add_workload_args(p)
    p.set_defaults(func=lambda args: cmd_plan_capacity(args, engine_config(args)))
    add_placement_parser(kinds, add_engine_args, engine_config)


def add_placement_parser(
    kinds: argparse._SubParsersAction,
    add_engine_args: Callable[[argparse.ArgumentParser], None],
    engine_config: Callable[[argparse.Namespace], EngineConfig],
) -> None:
    from sutra.bench.cli import add_workload_args
    from sutra.cluster.dispatch import DEFAULT_DISPATCH, DISPATCH_POLICIES
    from sutra.sim.placement import DEFAULT_MAX_INSTANCES

    p = kinds.add_parser(
        "placement",
        help="the colocated or prefill/decode configuration with the most goodput per core (GPU)",
        description="Try, in simulation, every way to split --cores (--gpus for roofline profiles) into "
        "colocated instances or prefill and decode instances of the profiled sizes, find each one's "
        "goodput (the highest rate at which --attainment of requests meet both SLOs) and its "
        "attainment at --rate, and rank them by goodput per core. The workload is `sutra bench "
        "serve`'s (--request-rate is ignored; --num-prompts defaults to 300 here).",
    )
    p.add_argument(
        "--profile",
        action="append",
        required=True,
        metavar="[N:]PROFILE.json",
        help="the cost model of instances of N threads (roofline: N GPUs); without N: the threads the "
        "profile was taken with (`sutra profile --num-threads N`). Repeat for each size",
    )
    p.add_argument("--cores", "--gpus", dest="cores", type=int, required=True, help="cores (GPUs) to spend")
    p.add_argument("--ttft-slo", type=float, required=True, metavar="MS", help="time to first token, ms")
    p.add_argument(
        "--tpot-slo",
        type=float,
        required=True,
        metavar="MS",
        help="time per output token after the first, ms",
    )
    p.add_argument(
        "--rate", type=float, required=True, help="the offered load to report attainment at (req/s)"
    )
    p.add_argument(
        "--attainment",
        type=float,
        default=0.9,
        help="share of requests that must meet both SLOs (%(default)s)",
    )
    p.add_argument(
        "--max-instances",
        type=int,
        default=DEFAULT_MAX_INSTANCES,
        help="instances per role at most (%(default)s)",
    )
    p.add_argument(
        "--tp",
        type=_sizes,
        default=[],
        metavar="K[,K...]",
        help="roofline profiles: also try instances of K GPUs, tensor parallel, derived from the profile",
    )
    p.add_argument("--tolerance", type=float, default=0.05, help="relative width each search stops at")
    p.add_argument(
        "--keep-up",
        type=float,
        default=0.85,
        help="a rate passes only if requests finish at >= this fraction of it while they arrive "
        "(0: attainment alone, DistServe's definition)",
    )
    p.add_argument("--dispatch", default=DEFAULT_DISPATCH, choices=sorted(DISPATCH_POLICIES))
    p.add_argument(
        "--hand-off-ms",
        type=float,
        nargs=2,
        default=None,
        metavar=("FIXED", "PER_TOKEN"),
        help="a hand-off's time: FIXED ms plus PER_TOKEN ms per prompt token (default: 0 and 0.2, the "
        "pulls measured between two 1-thread CPU instances by benchmarks/disaggregation.py)",
    )
    p.add_argument("--json", default=None, metavar="FILE", help="also write the whole table as JSON")
    p.add_argument(
        "--apply",
        action="store_true",
        help="then run `sutra serve` with the best configuration (measured CPU profiles only)",
    )
    add_engine_args(p)
    add_workload_args(p)
    p.set_defaults(num_prompts=300, func=lambda args: cmd_plan_placement(args, engine_config(args)))


def cmd_plan_placement(args: argparse.Namespace, config: EngineConfig) -> None:
    import os
    import shlex

    from sutra.bench.cli import config_from_args
    from sutra.bench.errors import BenchError
    from sutra.sim.capacity import AttainmentSlo
    from sutra.sim.disagg import DEFAULT_HAND_OFF, HandOffModel
    from sutra.sim.placement import plan_placement, read_profiles
    from sutra.sim.placement_report import (
        exec_argv,
        format_placement,
        placement_json,
        serve_command,
        write_placement,
    )

    try:
        slo = AttainmentSlo(args.ttft_slo / 1000, args.tpot_slo / 1000, args.attainment)
    except ValueError as e:
        raise BenchError(f"--ttft-slo / --tpot-slo / --attainment: {e}") from None
    fixed_ms, per_token_ms = args.hand_off_ms or (
        1e3 * DEFAULT_HAND_OFF.fixed_s,
        1e3 * DEFAULT_HAND_OFF.per_token_s,
    )
    if fixed_ms < 0 or per_token_ms < 0:
        raise BenchError("--hand-off-ms: the times must be >= 0")
    bench = config_from_args(args, server=False)
    profiles = read_profiles(args.profile, args.tp)
    if args.apply and next(iter(profiles.values())).roofline:
        raise BenchError(
            "--apply starts `sutra serve` on this machine's CPU cores; a roofline profile describes GPUs "
            "this engine does not serve on: drop --apply"
        )
    plan = plan_placement(
        bench,
        config,
        profiles,
        slo,
        args.rate,
        args.cores,
        max_instances=args.max_instances,
        dispatch=args.dispatch,
        tolerance=args.tolerance,
        keep_up=args.keep_up,
        hand_off=HandOffModel(fixed_ms / 1000, per_token_ms / 1000),
    )
    print(format_placement(plan))
    if args.json:
        write_placement(args.json, placement_json(plan, bench, config))
        print(f"wrote {args.json}")
    if args.apply:
        if plan.best.goodput == 0.0:
            raise BenchError("--apply: no configuration meets the SLOs, so none is started")
        extra = ["--policy-config", args.policy_config] if args.policy_config else []
        argv = serve_command(plan.best.placement, config, args.dispatch, extra)
        print(shlex.join(argv), flush=True)
        argv = exec_argv(argv)
        os.execvp(argv[0], argv)


def cmd_plan_capacity(args: argparse.Namespace, config: EngineConfig) -> None:
    from sutra.bench.cli import config_from_args
    from sutra.sim.plan import format_plan, parse_slos, plan_capacity, plan_json, write_plan

    slo = parse_slos(args.slo)
    bench = config_from_args(args, server=False)
    result = plan_capacity(
        bench,
        config,
        args.profile,
        slo,
        low=args.low,
        high=args.high,
        tolerance=args.tolerance,
        instances=args.instances,
        dispatch=args.dispatch,
        keep_up=args.keep_up,
    )
    print(format_plan(result, slo))
    if args.output:
        write_plan(args.output, plan_json(result, slo, bench, config))
        print(f"wrote {args.output}")
