"""`sutra serve`: load the model, build the app, run uvicorn, say where it listens."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import types
from pathlib import Path
from typing import TYPE_CHECKING

import uvicorn

from sutra.cluster.dispatch import DEFAULT_DISPATCH, DISPATCH_POLICIES
from sutra.config import EngineConfig
from sutra.engine.async_engine import AsyncEngine
from sutra.engine.client import EngineClient
from sutra.engine.engine import LLMEngine
from sutra.server.app import create_app
from sutra.server.client_series import DEFAULT_IDLE_S, DEFAULT_MAX_SERIES
from sutra.server.common import ServerState
from sutra.server.draining_server import DrainingServer
from sutra.server.limits import add_limit_args, limits_from_args
from sutra.server.many_models import (
    add_many_model_args,
    budget_bytes,
    config_for,
    pool_from_args,
    size_model,
    specs_from_args,
)
from sutra.server.metrics import ServerMetrics, ServingSlo
from sutra.server.model_pool import ModelPool
from sutra.server.request_log import enable_request_log
from sutra.server.tenants import PriorityCaps, parse_priority_caps
from sutra.server.tool_parsers import TOOL_CALL_PARSERS

if TYPE_CHECKING:
    from sutra.cluster.manager import Cluster

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0

logger = logging.getLogger(__name__)


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for all interfaces)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument(
        "--tool-call-parser",
        choices=TOOL_CALL_PARSERS,
        default=None,
        help="the format tool calls are parsed in (default: chosen from each model's chat template)",
    )
    g.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="[TENANT:]KEY",
        help="require this bearer key on every route but /health and /metrics; repeat for several "
        "tenants. A key without a TENANT: prefix is tenant key1, key2, ... in the order given",
    )
    g.add_argument(
        "--tenant-priority",
        action="append",
        default=[],
        metavar="TENANT:N",
        help="the most urgent priority TENANT's requests get (lower is more urgent): a request asking "
        "for less than N is served at N. Repeat for several tenants",
    )
    g.add_argument(
        "--default-tenant-priority",
        type=int,
        default=None,
        metavar="N",
        help="the same cap for tenants without a --tenant-priority entry (without --api-key: for "
        "every request); default: no cap",
    )
    g.add_argument(
        "--max-client-metric-series",
        type=int,
        default=DEFAULT_MAX_SERIES,
        help='clients with per-client series on /metrics; later ones share client="other" (%(default)s)',
    )
    g.add_argument(
        "--client-metric-idle-s",
        type=float,
        default=DEFAULT_IDLE_S,
        help="drop a client's /metrics series after this many seconds without a request (%(default)s)",
    )
    g.add_argument(
        "--slo-ttft-ms",
        type=_positive_float_arg,
        default=None,
        metavar="MS",
        help="time-to-first-token SLO: /metrics counts finished requests that met the SLOs "
        "(sutra:slo_requests, DistServe's attainment)",
    )
    g.add_argument(
        "--slo-tpot-ms",
        type=_positive_float_arg,
        default=None,
        metavar="MS",
        help="time-per-output-token SLO (mean gap between output tokens after the first), as --slo-ttft-ms",
    )
    g.add_argument(
        "--served-model-name",
        default=None,
        help="the model id clients send, for a server of one model (default: from --model)",
    )
    g.add_argument(
        "--max-waiting-requests",
        type=int,
        default=1024,
        help="answer 503 while this many requests wait to be scheduled",
    )
    g.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    g.add_argument(
        "--shutdown-timeout",
        type=_seconds_arg,
        default=DEFAULT_SHUTDOWN_TIMEOUT_S,
        metavar="SECONDS",
        help="on SIGTERM or SIGINT, refuse new requests (503) and let those in flight finish for at "
        "most this long, then end them with an error and exit 0; a second signal ends them at once "
        "(%(default)s)",
    )
    g.add_argument(
        "--log-requests",
        action="store_true",
        help="log one line per finished request: id, client, token counts, queue / TTFT / E2E times "
        "and finish reason (no prompt or output text)",
    )
    g.add_argument(
        "--log-request-text",
        action="store_true",
        help="with --log-requests (implied), also log each request's prompt and output text",
    )
    add_limit_args(parser)
    add_many_model_args(parser)
    add_cluster_args(parser)


def add_cluster_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("many instances (Ray)")
    g.add_argument(
        "--instances",
        type=_positive_int_arg,
        default=1,
        metavar="N",
        help="engine instances behind this one server, each a Ray actor with its own copy of the model "
        "and its own KV cache (the KV flags, and --max-waiting-requests, apply per instance); 1 (the "
        "default) runs the engine in the server process, without Ray",
    )
    g.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="join this Ray cluster (e.g. auto, or HOST:6379) instead of starting a local one; the "
        "instances then run on Ray even with --instances 1",
    )
    g.add_argument(
        "--dispatch",
        default=DEFAULT_DISPATCH,
        choices=sorted(DISPATCH_POLICIES),
        help="which instance takes each request: least-load (the freest KV cache, counting requests "
        "sent since its load was last read), round-robin (in turn), or llumnix (freeness-based "
        "dispatch plus live migration between instances to balance them) (%(default)s)",
    )
    g.add_argument(
        "--threads-per-instance",
        type=_positive_int_arg,
        default=None,
        metavar="T",
        help="torch threads of each instance (default: --num-threads if given, else this machine's "
        "cores divided by --instances, at least 1)",
    )
    g.add_argument(
        "--prefill-instances",
        type=_positive_int_arg,
        default=None,
        metavar="P",
        help="disaggregated serving (DistServe): P instances run prompts and stream each request's first "
        "token, then hand the request's KV to a decode instance; use with --decode-instances, instead "
        "of --instances",
    )
    g.add_argument(
        "--decode-instances",
        type=_positive_int_arg,
        default=None,
        metavar="D",
        help="disaggregated serving: D instances decode the requests the prefill instances hand over, "
        "each pulling one when it has room",
    )
    g.add_argument(
        "--prefill-threads",
        type=_positive_int_arg,
        default=None,
        metavar="T",
        help="torch threads of each prefill instance (default: as --threads-per-instance)",
    )
    g.add_argument(
        "--decode-threads",
        type=_positive_int_arg,
        default=None,
        metavar="T",
        help="torch threads of each decode instance (default: as --threads-per-instance)",
    )
    g.add_argument(
        "--admin-key",
        default=None,
        metavar="KEY",
        help="turn on the operator routes under /admin (list instances, migrate a request, drain, add an "
        "instance), answering only to this bearer key; for servers with Ray instances",
    )


def served_model_name(model: str | None, override: str | None) -> str:
    if override:
        return override
    if model is None:
        return DEFAULT_MODEL_NAME
    if model.startswith("random:"):
        return model
    path = Path(model)
    return path.stem if path.suffix == ".gguf" else path.name or model


def parse_api_keys(specs: list[str]) -> dict[str, str]:
    """KEY or TENANT:KEY -> {key: tenant}."""
    keys: dict[str, str] = {}
    for i, spec in enumerate(specs, start=1):
        tenant, sep, key = spec.partition(":")
        if not sep:
            tenant, key = f"key{i}", spec
        if not key or not tenant:
            raise SystemExit(f"error: --api-key {spec!r} must be KEY or TENANT:KEY")
        if key != key.strip() or any(c.isspace() for c in key):
            raise SystemExit(f"error: --api-key {spec!r}: a key cannot hold whitespace")
        if keys.get(key, tenant) != tenant:  # one key for two tenants: which would it be?
            raise SystemExit(f"error: --api-key: one key is given for tenants {keys[key]!r} and {tenant!r}")
        keys[key] = tenant
    return keys


def priority_caps_from_args(args: argparse.Namespace, api_keys: dict[str, str]) -> PriorityCaps:
    try:
        return parse_priority_caps(args.tenant_priority, args.default_tenant_priority, set(api_keys.values()))
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def metrics_from_args(args: argparse.Namespace, model_name: str) -> ServerMetrics:
    try:
        slo = None
        if args.slo_ttft_ms is not None or args.slo_tpot_ms is not None:
            slo = ServingSlo(
                None if args.slo_ttft_ms is None else args.slo_ttft_ms / 1000,
                None if args.slo_tpot_ms is None else args.slo_tpot_ms / 1000,
            )
        return ServerMetrics(model_name, args.max_client_metric_series, args.client_metric_idle_s, slo)
    except ValueError as e:
        raise SystemExit(f"error: --max-client-metric-series / --client-metric-idle-s: {e}") from None


def _positive_int_arg(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def _positive_float_arg(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def _seconds_arg(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text}")
    return value


def cmd_serve(args: argparse.Namespace, engine_config: EngineConfig) -> None:
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    api_keys = parse_api_keys(args.api_key)
    priority_caps = priority_caps_from_args(args, api_keys)
    specs, name = specs_from_args(args, lambda model: served_model_name(model, None))
    many = len(specs) > 1
    if many and uses_cluster(args):
        raise SystemExit(
            "error: several models are served by one engine instance for now; leave out --instances, "
            "--prefill-instances/--decode-instances and --ray-address, or serve one model"
        )
    metrics = metrics_from_args(args, name)  # checked before the model loads
    limits = limits_from_args(args)
    if not many:
        engine_config = config_for(engine_config, specs[0])
        if args.model_memory_gb is not None:  # a model that could never fit is refused, even alone
            size_model(specs[0], engine_config, budget_bytes(args))
    cluster = start_cluster(args, engine_config) if uses_cluster(args) else None
    try:
        engine: EngineClient | None = None
        pool: ModelPool | None = None
        if cluster is not None:
            engine = cluster.client(args.dispatch)
        else:
            if args.admin_key:
                logger.warning("--admin-key applies to servers with Ray instances (--instances above 1)")
            if args.threads_per_instance is not None:
                logger.warning("--threads-per-instance applies to Ray instances only; use --num-threads")
            if many:
                pool = pool_from_args(args, engine_config, specs, name)
            else:
                engine = AsyncEngine(LLMEngine(engine_config), max_waiting_requests=args.max_waiting_requests)
        state = ServerState(
            engine=engine,
            model_name=name,
            metrics=metrics,
            api_keys=api_keys,
            admin_key=args.admin_key,
            cluster=cluster,
            priority_caps=priority_caps,
            limits=limits,
            pool=pool,  # type: ignore[arg-type]  # None: the pool of `engine` alone
            tool_call_parser=args.tool_call_parser,
        )
        if args.log_requests or args.log_request_text:
            # On every model's engine, as each starts.
            enable_request_log(types.SimpleNamespace(listeners=state.engine_listeners), args.log_request_text)
        if pool is not None:
            pool.preload(name)  # the default model serves from the start; the others load on request
        config = uvicorn.Config(
            create_app(state),
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            access_log=False,
            # After the drain every response is complete or ending with an error; this bounds the
            # wait for a connection that would not close.
            timeout_graceful_shutdown=5,
        )
        try:
            asyncio.run(DrainingServer(config, state.pool, args.shutdown_timeout).serve())
        except KeyboardInterrupt:
            sys.exit(130)
    finally:
        if cluster is not None:
            cluster.shutdown()


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
