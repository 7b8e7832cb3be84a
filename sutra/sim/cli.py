"""`sutra profile`: measure the step latency of the current model on this machine and fit the cost
model the simulator runs on."""

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
    p.add_argument("--batches", type=_sizes, default=[1, 4, 16, 64], help="decode batch sizes")
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
