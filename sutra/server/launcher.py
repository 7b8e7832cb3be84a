"""`sutra serve`: load the model, build the app, run uvicorn, say where it listens."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

import uvicorn

from sutra.engine.async_engine import AsyncEngine
from sutra.engine.engine import LLMEngine
from sutra.server.app import create_app
from sutra.server.common import ServerState
from sutra.server.metrics import ServerMetrics

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for all interfaces)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="[TENANT:]KEY",
        help="require this bearer key on /v1 routes; repeat for several tenants. "
        "A key without a TENANT: prefix is tenant key1, key2, ... in the order given",
    )
    g.add_argument(
        "--served-model-name", default=None, help="the model id clients send (default: from --model)"
    )
    g.add_argument(
        "--max-waiting-requests",
        type=int,
        default=1024,
        help="answer 503 while this many requests wait to be scheduled",
    )
    g.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])


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
        keys[key] = tenant
    return keys


class _Server(uvicorn.Server):
    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            name = self.config.app.state.sutra.model_name
            print(f"Sutra is serving {name} at http://{host}:{port}/v1 (Ctrl-C stops)", flush=True)


def cmd_serve(args: argparse.Namespace, engine_config) -> None:
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    api_keys = parse_api_keys(args.api_key)
    engine = LLMEngine(engine_config)
    name = served_model_name(engine_config.model.model, args.served_model_name)
    state = ServerState(
        engine=AsyncEngine(engine, max_waiting_requests=args.max_waiting_requests),
        model_name=name,
        metrics=ServerMetrics(name),
        api_keys=api_keys,
    )
    config = uvicorn.Config(
        create_app(state), host=args.host, port=args.port, log_level=args.log_level, access_log=False
    )
    try:
        asyncio.run(_Server(config).serve())
    except KeyboardInterrupt:
        sys.exit(130)
