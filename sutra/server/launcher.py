"""`sutra serve`: load the model, build the app, run uvicorn, say where it listens."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
import types
from pathlib import Path
from typing import TYPE_CHECKING

import uvicorn

from sutra.config import EngineConfig
from sutra.engine.async_engine import AsyncEngine
from sutra.engine.client import EngineClient
from sutra.engine.engine import LLMEngine
from sutra.engine.step_log import StepLog
from sutra.server.app import create_app
from sutra.server.common import ServerState
from sutra.server.draining_server import DrainingServer
from sutra.server.limits import limits_from_args
from sutra.server.many_models import budget_bytes, config_for, pool_from_args, size_model, specs_from_args
from sutra.server.metrics import ServerMetrics, ServingSlo
from sutra.server.model_pool import ModelPool
from sutra.server.request_log import enable_request_log
from sutra.server.serve_args import add_serve_args as add_serve_args  # where sutra/cli.py finds it
from sutra.server.serve_args import structured_config
from sutra.server.serve_cluster import check_cluster_of_models, cluster_models, start_cluster, uses_cluster
from sutra.server.tenants import PriorityCaps, parse_priority_caps

if TYPE_CHECKING:
    from sutra.cluster.models import ClusterModels

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

logger = logging.getLogger(__name__)


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


def cmd_serve(args: argparse.Namespace, engine_config: EngineConfig) -> None:
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    # The structured-output limits are server flags (sutra/server/serve_args.py): the engine, the
    # front end's compile and every Ray instance read them from this config.
    engine_config = dataclasses.replace(engine_config, structured=structured_config(args))
    api_keys = parse_api_keys(args.api_key)
    priority_caps = priority_caps_from_args(args, api_keys)
    specs, name = specs_from_args(args, lambda model: served_model_name(model, None))
    many = len(specs) > 1
    if args.step_log and (many or uses_cluster(args)):
        raise SystemExit("error: --step-log applies to a server of one model on one engine instance")
    if many and uses_cluster(args):
        check_cluster_of_models(args)
        specs = sorted(specs, key=lambda spec: spec.name != name)  # the first instance starts the default
    metrics = metrics_from_args(args, name)  # checked before the model loads
    limits = limits_from_args(args)
    if not many:
        engine_config = config_for(engine_config, specs[0])
        if args.model_memory_gb is not None:  # a model that could never fit is refused, even alone
            size_model(specs[0], engine_config, budget_bytes(args))
    cluster = start_cluster(args, engine_config, specs) if uses_cluster(args) else None
    try:
        engine: EngineClient | None = None
        pool: ModelPool | ClusterModels | None = None
        if cluster is not None and many:
            if args.admin_key:
                logger.warning("--admin-key applies to servers of one model on Ray instances")
            pool = cluster_models(args, cluster, engine_config, specs, name)
        elif cluster is not None:
            engine = cluster.client(args.dispatch)
        else:
            if args.admin_key:
                logger.warning("--admin-key applies to servers with Ray instances (--instances above 1)")
            if args.threads_per_instance is not None:
                logger.warning("--threads-per-instance applies to Ray instances only; use --num-threads")
            if many:
                pool = pool_from_args(args, engine_config, specs, name)
            else:
                local = AsyncEngine(LLMEngine(engine_config), max_waiting_requests=args.max_waiting_requests)
                if args.step_log:
                    try:
                        local.log_steps(StepLog(args.step_log))
                    except OSError as e:
                        raise SystemExit(f"error: --step-log: {e}") from None
                engine = local
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
