"""`sutra serve` with many models: the flags, and the model pool they describe.

Every model gets the same engine options (dtype, KV cache size, scheduler); its source is its own. At
start each model is sized from its architecture (nothing is loaded but the default model), so one that
could never fit in `--model-memory-gb` stops the server with its name, before it listens.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable

from sutra.config import EngineConfig
from sutra.errors import SutraError
from sutra.model.probe import probe_arch
from sutra.server.engine_loader import EngineLoader
from sutra.server.host_cache import HostCache
from sutra.server.model_memory import GB, Footprint, estimate_footprint
from sutra.server.model_pool import DEFAULT_WAIT_TIMEOUT_S, ModelPool
from sutra.server.model_specs import ModelSpec, model_specs
from sutra.server.served_model import ServedModel

DEFAULT_MODEL_CACHE_GB = 4.0


def add_many_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("many models")
    g.add_argument(
        "--models-file",
        default=None,
        metavar="FILE",
        help='a JSON object of model name -> source ({"smol": "default", "tiny": "random:tiny-llama"}), '
        "served besides (after) the --model ones",
    )
    g.add_argument(
        "--default-model",
        default=None,
        metavar="NAME",
        help="the model for requests that name none (default: the first one)",
    )
    g.add_argument(
        "--model-memory-gb",
        type=_non_negative_arg,
        default=None,
        metavar="GB",
        help="memory for loaded models, each counted as its weights plus its KV cache: idle models are "
        "evicted (least recently used first) to load the ones requests ask for; default: no limit",
    )
    g.add_argument(
        "--model-cache-gb",
        type=_non_negative_arg,
        default=DEFAULT_MODEL_CACHE_GB,
        metavar="GB",
        help="host memory for the weights of evicted models, so loading them again skips the disk "
        "(least recently evicted dropped first; with --instances, each instance's); 0 turns it off "
        "(%(default)s)",
    )
    g.add_argument(
        "--model-placement",
        choices=["startup", "lru"],
        default="startup",
        help="with --instances: the instance a model starts on; startup: where its estimated startup "
        "(queue + bytes / bandwidth of the tier the instance holds it in) is smallest; lru: the instance "
        "whose model was used least recently, idle ones first, a locality-blind baseline (%(default)s)",
    )
    g.add_argument(
        "--model-migration",
        choices=["live", "recompute"],
        default="live",
        help="with --instances: how running requests move away to free an instance for another model; "
        "live: their KV is copied; recompute: token-level, resumed from their tokens on the other "
        "instance (%(default)s)",
    )
    g.add_argument(
        "--model-wait-timeout",
        type=_non_negative_arg,
        default=DEFAULT_WAIT_TIMEOUT_S,
        metavar="SECONDS",
        help="how long a request waits for memory for its model while other models drain, before a 503 "
        "(a load under way is always waited for) (%(default)s)",
    )


def specs_from_args(
    args: argparse.Namespace, default_name: Callable[[str | None], str]
) -> tuple[list[ModelSpec], str]:
    """The models and the default one's name (SystemExit naming the flag at fault)."""
    try:
        specs = model_specs(args.model_args, args.models_file, args.served_model_name, default_name)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    names = [s.name for s in specs]
    default = args.default_model or names[0]
    if default not in names:
        raise SystemExit(f"error: --default-model {default!r} is not one of the models: {', '.join(names)}")
    return specs, default


def config_for(engine_config: EngineConfig, spec: ModelSpec) -> EngineConfig:
    return dataclasses.replace(
        engine_config, model=dataclasses.replace(engine_config.model, model=spec.model)
    )


def size_model(spec: ModelSpec, config: EngineConfig, budget: int | None) -> tuple[Footprint, int]:
    """The model's estimated footprint and context length; SystemExit if it cannot be read or can
    never fit in the budget."""
    try:
        arch = probe_arch(spec.model)
    except SutraError as e:
        raise SystemExit(f"error: model `{spec.name}`: {e}") from None
    footprint = estimate_footprint(config, arch)
    if budget is not None and footprint.total > budget:
        raise SystemExit(
            f"error: model `{spec.name}` needs about {footprint.describe()}, more than --model-memory-gb "
            f"({budget / GB:.2f} GB) holds; raise the budget or give it a smaller KV cache "
            "(--num-kv-blocks, --kv-cache-memory-gb)"
        )
    return footprint, config.model.max_model_len or arch.max_position_embeddings


def budget_bytes(args: argparse.Namespace) -> int | None:
    return None if args.model_memory_gb is None else int(args.model_memory_gb * GB)


def pool_from_args(
    args: argparse.Namespace, engine_config: EngineConfig, specs: list[ModelSpec], default: str
) -> ModelPool:
    """The pool of several models, none loaded yet (ModelPool.preload loads the default one)."""
    budget = budget_bytes(args)
    models: dict[str, ServedModel] = {}
    for spec in specs:
        config = config_for(engine_config, spec)
        footprint, max_model_len = size_model(spec, config, budget)
        models[spec.name] = ServedModel(
            spec.name,
            spec.model or "default",
            config=config,
            footprint=footprint.total,
            max_model_len=max_model_len,
        )
    cache_bytes = int(args.model_cache_gb * GB)
    return ModelPool(
        models,
        EngineLoader(args.max_waiting_requests, keep_weights=cache_bytes > 0),
        default=default,
        memory_budget=budget,
        cache=HostCache(cache_bytes) if cache_bytes > 0 else None,
        wait_timeout_s=args.model_wait_timeout,
        max_waiting=args.max_waiting_requests,
    )


def _non_negative_arg(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value
