"""The uvicorn server of `sutra serve`: SIGTERM or SIGINT drains the models' engines before it stops."""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType

import uvicorn

from sutra.engine.client import EngineDrainingError
from sutra.server.model_pool import ModelPool

logger = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """uvicorn whose SIGTERM / SIGINT drains the engine before the server stops.

    uvicorn would stop listening at the first signal (so new requests would see a refused connection
    rather than a 503) and re-raise the signal after shutdown (so the process would die by it rather
    than exit 0). Here the signal only starts the drain; the tick below ends it.
    """

    def __init__(self, config: uvicorn.Config, engine: ModelPool, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.engine = engine  # the model pool: every model's engine, and requests waiting for one
        self.shutdown_timeout = shutdown_timeout
        self._signal: int | None = None
        self._drain_deadline: float | None = None  # monotonic time; set at the first tick after a signal
        self._signals_seen = 0

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            state = self.config.app.state.sutra
            others = [name for name in state.pool.models if name != state.model_name]
            also = f"; also {', '.join(others)} (loaded on request)" if others else ""
            print(
                f"Sutra is serving {state.model_name} at http://{host}:{port}/v1 (Ctrl-C stops){also}",
                flush=True,
            )

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler: set flags only (no logging, no asyncio); the next tick acts on them.
        self.engine.begin_drain()
        self._signal = sig
        self._signals_seen += 1

    async def on_tick(self, counter: int) -> bool:
        should_exit = await super().on_tick(counter)
        if self._signal is None:
            return should_exit
        now = time.monotonic()
        if self._drain_deadline is None:
            self._drain_deadline = now + self.shutdown_timeout
            logger.warning(
                "%s: refusing new requests; waiting up to %.0f s for %d in flight (a second signal "
                "stops now)",
                signal.Signals(self._signal).name,
                self.shutdown_timeout,
                self.engine.num_in_flight,
            )
        if self.engine.num_in_flight == 0:
            return True
        if now < self._drain_deadline and self._signals_seen < 2:
            return False
        ended = self.engine.abort_all(
            EngineDrainingError("the server shut down before this request finished; retry it")
        )
        logger.warning("shutting down: ended %d requests still in flight", ended)
        return True  # uvicorn then lets their responses (now errors) go out, and stops
