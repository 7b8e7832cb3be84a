"""Operator routes under /admin, for a server in front of many instances (`--admin-key` turns them on).

- GET  /admin/instances: every instance alive with its load summary (Llumnix freeness) and stats.
- POST /admin/migrate {"request_id", "instance"}: live-migrate a running request to an instance.
- POST /admin/drain {"instance", "timeout_s", "stop"}: move every request off an instance (it takes
  no new ones meanwhile), then, with "stop" (the default), stop it.
- POST /admin/instances: start one more instance with the same model and settings.

They answer only to `Authorization: Bearer <admin key>`, a key of their own (API keys do not open
them, and the admin key opens nothing else), checked in constant time.
"""

from __future__ import annotations

import dataclasses
import secrets
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from sutra.core.migration import MigrationAborted
from sutra.server.errors import APIError

if TYPE_CHECKING:
    from sutra.cluster.client import ClusterClient
    from sutra.cluster.manager import Cluster

ADMIN_PREFIX = "/admin"


class MigrateBody(BaseModel):
    request_id: str = Field(min_length=1, max_length=256)
    instance: str = Field(min_length=1, max_length=256)


class DrainBody(BaseModel):
    instance: str = Field(min_length=1, max_length=256)
    timeout_s: float = Field(default=60.0, gt=0, le=3600)
    stop: bool = True


def is_admin_path(path: str) -> bool:
    return path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/")


def admin_key_matches(authorization: str, admin_key: str) -> bool:
    scheme, _, key = authorization.partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(key.strip().encode(), admin_key.encode())


def install_admin_routes(app: FastAPI, client: ClusterClient, cluster: Cluster | None) -> None:
    router = APIRouter(prefix=ADMIN_PREFIX)

    def known(instance: str) -> None:
        if instance not in client.instance_ids:
            raise APIError(
                404, f"no engine instance {instance!r} is alive", param="instance", code="not_found"
            )

    @router.get("/instances")
    async def instances() -> JSONResponse:
        loads, stats = client.loads(), client.instance_stats()
        rows: list[dict[str, Any]] = []
        for instance in client.instance_ids:
            load = loads.get(instance)
            rows.append(
                {
                    "id": instance,
                    "requests": len(client.requests_on(instance)),
                    "load": None
                    if load is None
                    else {**dataclasses.asdict(load), "freeness": _finite(load.freeness)},
                    "stats": None if instance not in stats else dataclasses.asdict(stats[instance]),
                }
            )
        return JSONResponse({"object": "list", "data": rows})

    @router.post("/migrate")
    async def migrate(body: MigrateBody) -> JSONResponse:
        known(body.instance)
        try:
            result = await client.migrator.migrate(body.request_id, body.instance)
        except MigrationAborted as e:
            raise APIError(409, str(e), param="request_id", code="migration_refused") from None
        payload = dataclasses.asdict(result) | {"outcome": result.outcome}
        return JSONResponse(payload, status_code=200 if result.migrated else 409)

    @router.post("/drain")
    async def drain(body: DrainBody) -> JSONResponse:
        known(body.instance)
        if len(client.instance_ids) < 2:
            raise APIError(409, "the last instance cannot be drained", param="instance", code="last_instance")
        report = await client.migrator.drain(body.instance, body.timeout_s)
        stopped = False
        if body.stop and report["left"] == 0:
            await client.retire(body.instance)
            stopped = True
        return JSONResponse({"instance": body.instance, **report, "stopped": stopped})

    @router.post("/instances")
    async def add_instance() -> JSONResponse:
        if cluster is None:
            raise APIError(409, "this server cannot start instances", code="not_supported")
        instance_id, actor, info = await cluster.add_instance_async()
        client.add_instance(instance_id, actor, info)
        return JSONResponse({"id": instance_id, "pid": info.pid, "node": info.node}, status_code=201)

    app.include_router(router)


def _finite(value: float) -> float | None:
    return value if value not in (float("inf"), float("-inf")) else None
