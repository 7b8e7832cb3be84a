"""Progress of long one-off work (a first-start conversion), as log lines: a server has no terminal
to draw a bar on, and a line every few seconds tells an operator the start is moving."""

from __future__ import annotations

import logging
import time

logger = logging.getLogger("sutra.model")


class ProgressLog:
    """update(done) logs "<what>: done of total <unit> (p%)" at most every interval_s seconds, and
    only once the work has run that long, so quick work logs nothing."""

    def __init__(self, what: str, total: int, unit: str, interval_s: float = 5.0) -> None:
        self.what, self.total, self.unit, self.interval_s = what, total, unit, interval_s
        self._start = self._last = time.monotonic()

    def update(self, done: int) -> None:
        now = time.monotonic()
        if now - self._last < self.interval_s or not self.total:
            return
        self._last = now
        logger.info(
            "%s: %d of %d %s (%d%%), %.0f s so far",
            self.what, done, self.total, self.unit, 100 * done // self.total, now - self._start,
        )  # fmt: skip
