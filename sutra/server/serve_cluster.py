"""`sutra serve` with engine instances on Ray: which flags ask for them, and starting them."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from sutra.config import EngineConfig

if TYPE_CHECKING:
    from sutra.cluster.manager import Cluster


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


def start_cluster(args: argparse.Namespace, engine_config: EngineConfig) -> Cluster:
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
    return Cluster.start(
        engine_config,
        args.instances,
        threads_per_instance=args.threads_per_instance or engine_config.model.num_threads,
        ray_address=args.ray_address,
        max_waiting_requests=args.max_waiting_requests,
    )
