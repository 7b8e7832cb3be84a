"""A ClusterClient's view of its instances' loads: every instance's report read about every 100 ms,
what dispatch chooses from, and the two things a read drives: a round of the migration trigger every
few reads (llumnix dispatch) and the start of hand-offs (disaggregated serving). A mixin of
ClusterClient (sutra/cluster/client.py).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from ray.exceptions import ActorDiedError

from sutra.cluster.rpc import summarize_error
from sutra.core.stats import EngineStats, InstanceLoad

if TYPE_CHECKING:
    from sutra.cluster.client import ClusterClient, _Instance

logger = logging.getLogger("sutra.cluster.client")

# Load reads are frequent and only advisory: a slow one is skipped, the last load stands.
REPORT_TIMEOUT_S = 5.0
LOAD_REFRESH_S = 0.1
# Load reads between two rounds of the migration trigger (llumnix dispatch): every ~0.5 s.
REBALANCE_EVERY = 5


class InstanceLoads:
    # The public methods take a plain self: as EngineClient methods their signatures match AsyncEngine's.
    _instances: dict[str, _Instance]

    def instance_stats(self) -> dict[str, EngineStats]:
        """The latest stats of every instance alive that has reported (for per-instance metrics)."""
        return {i: inst.report.stats for i, inst in self._instances.items() if inst.alive and inst.report}

    def loads(self) -> dict[str, InstanceLoad]:
        """The latest load of every instance alive that has reported one."""
        return {
            i: inst.report.load
            for i, inst in self._instances.items()
            if inst.alive and inst.report is not None
        }

    def stats(self) -> EngineStats:
        """The sum of the instances' latest stats (at most ~100 ms old)."""
        return EngineStats.total(
            [inst.report.stats for inst in self._instances.values() if inst.alive and inst.report]
        )

    async def _refresh_loop(self: ClusterClient) -> None:
        rounds = 0
        rebalancing: asyncio.Task[int] | None = None
        while not self._closed:
            try:
                await self._refresh_loads()
            except Exception:
                logger.exception("reading the instances' loads failed")
            rounds += 1
            if self.dispatch.migrates and rounds % self.rebalance_every == 0:
                if rebalancing is None or rebalancing.done():
                    rebalancing = asyncio.create_task(self._rebalance())
            await asyncio.sleep(self.load_refresh_s)
        if rebalancing is not None:
            rebalancing.cancel()

    async def _rebalance(self: ClusterClient) -> int:
        try:
            return await self.migrator.rebalance()
        except Exception:
            logger.exception("a rebalancing round failed")
            return 0

    async def _refresh_loads(self: ClusterClient) -> None:
        alive = [inst for inst in self._instances.values() if inst.alive]
        mark = self.dispatch.mark()
        read_index = self.load_reads
        self.load_reads += 1
        results = await asyncio.gather(
            *(self._call(inst.actor.report.remote(), self.report_timeout_s) for inst in alive),
            return_exceptions=True,
        )
        refreshed: list[str] = []
        for inst, result in zip(alive, results, strict=True):
            if isinstance(result, ActorDiedError):
                self._instance_died(inst, summarize_error(result))
            elif isinstance(result, BaseException):
                logger.debug("no load from engine instance %s: %s", inst.instance_id, summarize_error(result))
            elif result.dead_reason is not None:
                self._instance_died(inst, f"its engine loop stopped: {result.dead_reason}")
            else:
                inst.report = result
                refreshed.append(inst.instance_id)
        self.dispatch.loads_refreshed(refreshed, mark)
        try:
            self.handoffs.loads_refreshed(read_index)
        except Exception:
            logger.exception("starting hand-offs failed")
