"""`sutra profile | simulate`: measure (or derive from a roofline) the step latency the simulator's
cost model is fitted to, and run `sutra bench serve`'s workload through the simulator."""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

from sutra.config import EngineConfig
from sutra.engine.engine import LLMEngine
from sutra.sim.cost_model import FEATURES, CostModel
from sutra.sim.profile import profile_engine
from sutra.sim.roofline import (
    DEVICES,
    RooflineCostModel,
    device_spec,
    kv_cache_blocks,
    model_shape,
    roofline_profile,
)


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
    p.add_argument("--reps", type=int, default=5, help="timed runs per point (the median is kept)")
    p.add_argument(
        "--roofline",
        choices=sorted(DEVICES),
        default=None,
        help="compute the points from this GPU's roofline instead of measuring (no engine is built)",
    )
    p.add_argument(
        "--shape", default="llama-3-8b", help="model shape for --roofline (a preset or mistral-7b)"
    )
    p.set_defaults(
        func=lambda args: (
            cmd_roofline_profile(args) if args.roofline else cmd_profile(args, engine_config(args))
        )
    )


def cmd_roofline_profile(args: argparse.Namespace) -> None:
    model = RooflineCostModel(device_spec(args.roofline), model_shape(args.shape))
    profile = roofline_profile(model, args.chunks, args.contexts, args.batches, args.block_size)
    profile.save(args.output)
    blocks = kv_cache_blocks(model.device, model.shape, args.block_size)
    print(f"wrote {args.output}: {len(profile.prefill)} prefill and {len(profile.decode)} decode points")
    print(f"roofline: {args.shape} on {args.roofline}, {blocks} KV blocks of {args.block_size} tokens fit")


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
    model = CostModel.fit(profile)
    errors = model.relative_errors(profile)
    print(f"wrote {args.output}: {len(profile.prefill)} prefill and {len(profile.decode)} decode points")
    print(
        "cost model: " + ", ".join(f"{n}={c:.3g}" for n, c in zip(FEATURES, model.coefficients, strict=True))
    )
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
