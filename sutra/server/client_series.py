"""Per-client metric label values that no client can turn against /metrics.

A request's client (its API key's tenant, else its `user` field) labels three series families on the
unauthenticated /metrics. A client controls that name, so it is made safe (printable characters only,
so valid UTF-8 with no control, format or line-breaking characters, and at most MAX_LABEL_CHARS), and
the set of names with series of their own is bounded: at most `max_series` clients, the rest folded
into OTHER, and a client unseen for `idle_s` loses its series (dropped from the registry; a counter
that comes back starts again from 0, which Prometheus' rate() reads as a counter reset).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

OTHER = "other"  # the label of every client past the cap
ANONYMOUS = "anonymous"  # the label of requests that name no client
MAX_LABEL_CHARS = 128
DEFAULT_MAX_SERIES = 100
DEFAULT_IDLE_S = 3600.0


def safe_label(name: str, max_chars: int = MAX_LABEL_CHARS) -> str:
    """The name with every non-printable character (controls, lone surrogates, separators other than
    the space, format characters such as bidi overrides) replaced by '?', cut to max_chars."""
    if len(name) <= max_chars and name.isprintable():  # the common case, at C speed
        return name or ANONYMOUS
    return "".join(c if c.isprintable() else "?" for c in name[:max_chars])


class ClientSeries:
    """Which label each client's series use. label() is O(1) amortised: each name it admits is
    dropped at most once, by the expiry that later calls do on the longest unseen names first."""

    def __init__(
        self,
        max_series: int = DEFAULT_MAX_SERIES,
        idle_s: float = DEFAULT_IDLE_S,
        on_drop: Callable[[str], None] = lambda label: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_series < 0:
            raise ValueError(f"max_series must be >= 0, got {max_series}")
        if not idle_s > 0:
            raise ValueError(f"idle_s must be > 0 seconds, got {idle_s}")
        self.max_series = max_series
        self.idle_s = idle_s
        self._on_drop = on_drop
        self._clock = clock
        self._last_seen: OrderedDict[str, float] = OrderedDict()  # least recently seen first

    def label(self, client: str | None) -> str:
        now = self._clock()
        name = safe_label(client) if client else ANONYMOUS
        self.expire(now)
        if name in self._last_seen:
            self._last_seen[name] = now
            self._last_seen.move_to_end(name)
            return name
        if name == OTHER or len(self._last_seen) >= self.max_series:
            return OTHER
        self._last_seen[name] = now
        return name

    def expire(self, now: float | None = None) -> None:
        """Drop the series of clients unseen for idle_s (also called on each scrape)."""
        now = self._clock() if now is None else now
        while self._last_seen:
            name, seen = next(iter(self._last_seen.items()))
            if now - seen < self.idle_s:
                return
            del self._last_seen[name]
            self._on_drop(name)

    def __len__(self) -> int:
        return len(self._last_seen)
