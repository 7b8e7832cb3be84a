"""`sutra serve` with engine instances on Ray: which flags ask for them, and starting them."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from sutra.config import EngineConfig
from sutra.server.many_models import config_for, size_model
from sutra.server.model_memory import GB
from sutra.server.model_specs import ModelSpec
from sutra.server.served_model import ServedModel

if TYPE_CHECKING:
    from sutra.cluster.manager import Cluster
    from sutra.cluster.models import ClusterModels


def uses_cluster(args: argparse.Namespace) -> bool:
    """Instances on Ray: more than one, disaggregated ones, or a Ray cluster to join."""
    return args.instances > 1 or bool(args.ray_address) or disaggregated(args)


def disaggregated(args: argparse.Namespace) -> bool:
    """Prefill and decode instances asked for; exits with a usage error if only one role is, or
    with --instances."""
    prefill, decode = args.prefill_instances, args.decode_instances
    if prefill is None and decode is None:
        if args.prefill_threads or args.decode_threads:
            raise SystemExit(
                "error: --prefill-threads and --decode-threads need --prefill-instances and --decode-instances"
            )
        return False
    if prefill is None or decode is None:
        raise SystemExit("error: disaggregated serving needs both --prefill-instances and --decode-instances")
    if args.instances > 1:
        raise SystemExit(
            "error: --instances is for colocated instances; with --prefill-instances and "
            "--decode-instances, leave it out"
        )
    return True


def start_cluster(
    args: argparse.Namespace, engine_config: EngineConfig, specs: list[ModelSpec] | None = None
) -> Cluster:
    """The instances; with several model specs (the default first), each instance starts with one of
    them in turn and may switch to any (sutra/cluster/models.py)."""
    try:
        from sutra.cluster.manager import Cluster  # imports Ray: only when it is used
    except ImportError as e:
        raise SystemExit(
            f"error: --instances above 1 and --ray-address need Ray ({e}); pip install 'sutra[cluster]'"
        ) from None
    if disaggregated(args):
        return Cluster.start(
            engine_config,
            0,
            threads_per_instance=args.threads_per_instance or engine_config.model.num_threads,
            ray_address=args.ray_address,
            max_waiting_requests=args.max_waiting_requests,
            prefill_instances=args.prefill_instances,
            decode_instances=args.decode_instances,
            prefill_threads=args.prefill_threads,
            decode_threads=args.decode_threads,
        )
    many = specs is not None and len(specs) > 1
    return Cluster.start(
        engine_config,
        args.instances,
        threads_per_instance=args.threads_per_instance or engine_config.model.num_threads,
        ray_address=args.ray_address,
        max_waiting_requests=args.max_waiting_requests,
        models={spec.name: config_for(engine_config, spec) for spec in specs} if many else None,
        model_cache_bytes=int(args.model_cache_gb * GB),
    )


def check_cluster_of_models(args: argparse.Namespace) -> None:
    """Several models on Ray instances: colocated ones only, each holding one model at a time."""
    if disaggregated(args):
        raise SystemExit(
            "error: several models are served by colocated instances (--instances), not with "
            "--prefill-instances/--decode-instances"
        )
    if args.model_memory_gb is not None:
        raise SystemExit(
            "error: --model-memory-gb is for several models in one server process; with --instances each "
            "instance serves one model at a time (and --model-cache-gb is each instance's host memory)"
        )


def cluster_models(
    args: argparse.Namespace,
    cluster: Cluster,
    engine_config: EngineConfig,
    specs: list[ModelSpec],
    default: str,
) -> ClusterModels:
    """The model pool over the cluster's instances (sutra/cluster/models.py)."""
    from sutra.cluster.models import ClusterModels

    models: dict[str, ServedModel] = {}
    weight_bytes: dict[str, int] = {}
    for spec in specs:
        config = config_for(engine_config, spec)
        footprint, max_model_len = size_model(spec, config, None)
        models[spec.name] = ServedModel(
            spec.name, spec.model or "default", config=config, max_model_len=max_model_len
        )
        weight_bytes[spec.name] = footprint.weight_bytes
    return ClusterModels(
        cluster.actors,
        cluster.holdings(),
        models,
        cluster.tokenizers_by_model(),
        weight_bytes,
        default=default,
        dispatch=args.dispatch,
        wait_timeout_s=args.model_wait_timeout,
        max_waiting=args.max_waiting_requests,
        placement=args.model_placement,
        migration=args.model_migration,
    )
