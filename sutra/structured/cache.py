"""Compiled grammars by spec, least recently used dropped first.

Entries are futures, so a spec being compiled is compiled once however many requests ask for it at
the same time; a failed compile is kept too (the same spec fails the same way), so a client sending
one bad spec over and over costs one compile.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future


class CompileCache:
    def __init__(self, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self._entries: OrderedDict[Hashable, Future] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get_or_start(self, key: Hashable, start: Callable[[], Future]) -> Future:
        """The entry for `key`, or the future `start()` returns, stored under it. `start` runs under
        the cache's lock, so it must only submit the work, not do it."""
        with self._lock:
            future = self._entries.get(key)
            if future is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return future
            self.misses += 1
            future = start()
            self._entries[key] = future
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)  # a dropped future still completes for its waiters
            return future

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
