"""Every failure leaves the server as an OpenAI error body: {"error": {message, type, param, code}}."""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sutra.engine.client import EngineDeadError, EngineDrainingError, EngineOverloadedError
from sutra.errors import InvalidRequestError, RequestFailedError, SutraError

logger = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)

    def sse(self) -> str:
        return f"data: {json.dumps(self.body())}\n\n"


def to_api_error(e: Exception) -> APIError:
    """Map an exception raised while serving a request to what the client is told."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, InvalidRequestError):
        return APIError(400, str(e), param=e.param)
    if isinstance(e, EngineDrainingError):
        return APIError(503, str(e), type="service_unavailable_error", code="server_shutting_down")
    if isinstance(e, EngineOverloadedError):
        return APIError(503, str(e), type="service_unavailable_error", code="queue_full")
    if isinstance(e, (EngineDeadError, RequestFailedError)):
        return APIError(500, str(e), type="internal_server_error")
    logger.exception("unexpected error while serving a request", exc_info=e)
    return APIError(500, f"internal error: {type(e).__name__}: {e}", type="internal_server_error")


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request body")
    first = errors[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first.get('msg')}")
    param = ".".join(loc) or None
    where = f"{param}: " if param else ""
    return APIError(400, f"{where}{first.get('msg', 'invalid value')}", param=param)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Starlette fills detail with the status phrase when none is given.
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), type=type_).response()

    @app.exception_handler(APIError)
    async def _on_api(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(SutraError)
    async def _on_sutra(_: Request, exc: SutraError) -> JSONResponse:
        return to_api_error(exc).response()

    @app.exception_handler(Exception)
    async def _on_any(_: Request, exc: Exception) -> JSONResponse:
        return to_api_error(exc).response()
