"""The FastAPI application: OpenAI routes, health, metrics, API keys, and the engine loop's lifetime."""

from __future__ import annotations

import contextlib
import secrets

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from sutra.server.chat import create_chat_completion
from sutra.server.common import ServerState
from sutra.server.completions import create_completion
from sutra.server.errors import APIError, install_error_handlers
from sutra.server.protocol import ChatCompletionRequest, CompletionRequest


def create_app(state: ServerState) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        state.engine.listeners.append(state.metrics)
        state.engine.start()
        yield
        await state.engine.shutdown()

    app = FastAPI(title="Sutra", lifespan=lifespan)
    app.state.sutra = state
    install_error_handlers(app)

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        # Keys guard the API; /health and /metrics stay open for probes and scrapers, as in vLLM.
        if state.api_keys and request.url.path.startswith("/v1"):
            tenant = _tenant_of(request.headers.get("authorization", ""), state.api_keys)
            if tenant is None:
                return APIError(
                    401, "Incorrect API key provided.", param=None, code="invalid_api_key"
                ).response()
            request.state.tenant = tenant
        return await call_next(request)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        state.metrics.observe_state(state.engine.engine)
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": state.model_name,
                        "object": "model",
                        "created": state.created,
                        "owned_by": "sutra",
                        "max_model_len": state.engine.max_model_len,
                    }
                ],
            }
        )

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await create_completion(state, body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await create_chat_completion(state, body, request)

    return app


def _tenant_of(authorization: str, api_keys: dict[str, str]) -> str | None:
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not key:
        return None
    for known, tenant in api_keys.items():
        if secrets.compare_digest(known.encode(), key.strip().encode()):
            return tenant
    return None
