"""The FastAPI application: OpenAI routes, health, metrics, API keys, and the engine loop's lifetime."""

from __future__ import annotations

import contextlib
import secrets

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from sutra.server.admin import admin_key_matches, install_admin_routes, is_admin_path
from sutra.server.body_limit import BodySizeLimit
from sutra.server.chat import create_chat_completion
from sutra.server.common import ServerState
from sutra.server.completions import create_completion
from sutra.server.embeddings import create_embedding
from sutra.server.errors import APIError, install_error_handlers
from sutra.server.model_leases import ModelLeases
from sutra.server.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from sutra.server.tokenize import DetokenizeRequest, TokenizeRequest, detokenize, server_version, tokenize


def create_app(state: ServerState) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        state.pool.start()  # starts the ready engines, with the metrics listening to each
        yield
        await state.pool.shutdown()

    app = FastAPI(title="Sutra", lifespan=lifespan)
    app.state.sutra = state
    install_error_handlers(app)
    migrator = getattr(state.engine, "migrator", None)  # a cluster of instances
    if migrator is not None:
        cluster_metrics = state.metrics.enable_cluster()
        migrator.listeners.append(
            lambda r: cluster_metrics.observe_migration(r.outcome, r.downtime_s, r.bytes_copied)
        )
        state.engine.handoffs.listeners.append(
            lambda r: cluster_metrics.observe_handoff(r.result.outcome, r.wait_s, r.transfer_s)
        )
        if state.admin_key:
            install_admin_routes(app, state.engine, state.cluster)

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        # Keys guard every route (the API, /docs, /redoc, /openapi.json, unknown paths) but /health and
        # /metrics, open for probes and scrapers as in vLLM. The path is the ASGI scope's, the one the
        # router matches: request.url is rebuilt from the Host header (CVE-2026-48710, `Host: x?`).
        path = request.scope["path"]
        if is_admin_path(path):  # the admin key alone opens /admin, and nothing else
            if not state.admin_key or not admin_key_matches(
                request.headers.get("authorization", ""), state.admin_key
            ):
                return APIError(401, "Incorrect admin key provided.", code="invalid_admin_key").response()
            return await call_next(request)
        if state.api_keys and path not in OPEN_PATHS:
            tenant = _tenant_of(request.headers.get("authorization", ""), state.api_keys)
            if tenant is None:
                return APIError(
                    401, "Incorrect API key provided.", param=None, code="invalid_api_key"
                ).response()
            request.state.tenant = tenant
        return await call_next(request)

    @app.get("/health")
    async def health() -> Response:
        # 503 tells a load balancer to send traffic elsewhere: no model can serve (the engine loop
        # has stopped: only a restart helps), or the server is draining before it exits. With many
        # models it is 200 while any can serve (a cold one can: it loads).
        pool = state.pool
        if pool.dead_reason is not None:
            message = f"the engine is not running: {pool.dead_reason}"
            return APIError(503, message, type="service_unavailable_error", code="engine_dead").response()
        if pool.is_draining:
            message = "the server is shutting down"
            return APIError(
                503, message, type="service_unavailable_error", code="server_shutting_down"
            ).response()
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        for name, model in state.pool.models.items():
            series = state.metrics.for_model(name)
            if model.engine is not None:
                series.observe_state(model.engine.stats())
            else:
                series.engine_gone()
        state.metrics.models.observe_pool(state.pool)
        if state.metrics.cluster is not None:
            engine = state.engine
            stats = engine.instance_stats()
            roles = {i: engine.role_of(i) for i in stats}
            state.metrics.cluster.observe_instances(stats, engine.loads(), roles, len(engine.handoffs.queue))
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        # Every model served, whether loaded or not; "sutra" (ignored by OpenAI clients) says which.
        data = []
        for name, model in state.pool.models.items():
            entry = {"id": name, "object": "model", "created": state.created, "owned_by": "sutra"}
            if model.max_model_len is not None:
                entry["max_model_len"] = model.max_model_len
            entry["sutra"] = {"state": model.state.value}
            if model.placements:  # a cluster: which instance holds it in which tier
                entry["sutra"]["instances"] = dict(model.placements)
            data.append(entry)
        return JSONResponse({"object": "list", "data": data})

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await create_completion(state, body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await create_chat_completion(state, body, request)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request):
        return await create_embedding(state, body, request)

    # vLLM's paths, without /v1; behind the API key like every route but /health and /metrics.
    @app.post("/tokenize")
    async def tokenize_route(body: TokenizeRequest, request: Request) -> JSONResponse:
        return JSONResponse(await tokenize(state, body, request))

    @app.post("/detokenize")
    async def detokenize_route(body: DetokenizeRequest, request: Request) -> JSONResponse:
        return JSONResponse(await detokenize(state, body, request))

    version = server_version()

    @app.get("/version")
    async def version_route() -> JSONResponse:
        return JSONResponse({"version": version})

    app.add_middleware(BodySizeLimit, max_bytes=state.limits.max_body_bytes)  # before auth
    # Outermost: releases each request's hold on its model once the response has ended.
    app.add_middleware(ModelLeases)
    return app


OPEN_PATHS = frozenset({"/health", "/metrics"})  # served without a key, even when keys are set


def _tenant_of(authorization: str, api_keys: dict[str, str]) -> str | None:
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not key:
        return None
    for known, tenant in api_keys.items():
        if secrets.compare_digest(known.encode(), key.strip().encode()):
            return tenant
    return None
