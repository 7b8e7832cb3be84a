"""Each HTTP request holds the models it uses until its response has ended, streams included.

A handler acquires its model (ServerState.model_for) and records the lease in the ASGI scope; this
middleware, around the whole app, releases the leases once the app is done with the request: after
the last byte of a stream, or when the client left and the response was torn down. So a model with a
response still going out is never evicted, and the lease cannot leak whatever the handler did.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request

from sutra.server.model_pool import Lease

SCOPE_KEY = "sutra.model_leases"


class ModelLeases:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        leases: list[Lease] = []
        scope[SCOPE_KEY] = leases
        try:
            await self.app(scope, receive, send)
        finally:
            for lease in leases:
                lease.release()


def hold(http_request: Request, lease: Lease) -> None:
    """Release `lease` when the request's response has ended."""
    leases = http_request.scope.get(SCOPE_KEY)
    if leases is None:  # not behind the middleware: nothing would release it
        lease.release()
        raise RuntimeError("model leases need the ModelLeases middleware around the app")
    leases.append(lease)
