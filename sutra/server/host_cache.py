"""HostCache: the weights of recently evicted models, kept in host memory so a reload skips the disk.

ServerlessLLM's middle tier between a ready model and its checkpoint on disk. It is bounded by bytes
(`--model-cache-gb`) and drops the least recently evicted model first. A model leaves the cache when it
is loaded again (its weights become the new engine's), so a model is in one tier at a time and no byte
is counted twice.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any


@dataclass
class _Entry:
    payload: Any  # what the loader builds the model from (a LoadedModel for the real engine)
    nbytes: int


class HostCache:
    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"the host cache's capacity must be >= 0 bytes, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently put first
        self.used_bytes = 0

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        """Cached models, the next to be dropped first."""
        return list(self._entries)

    def put(self, name: str, payload: Any, nbytes: int, keep: Collection[str] = ()) -> list[str]:
        """Keep a model's weights, dropping the least recently put models (but not those in `keep`:
        requests wait for them) as needed to stay within the capacity; returns the names dropped. A
        model that cannot get room that way is not kept, and nothing is dropped for it."""
        self.discard(name)
        droppable = [n for n in self._entries if n not in keep]
        free = self.capacity_bytes - self.used_bytes + sum(self._entries[n].nbytes for n in droppable)
        if nbytes > free:
            return []
        dropped: list[str] = []
        for old in droppable:
            if self.used_bytes + nbytes <= self.capacity_bytes:
                break
            self.used_bytes -= self._entries.pop(old).nbytes
            dropped.append(old)
        self._entries[name] = _Entry(payload, nbytes)
        self.used_bytes += nbytes
        return dropped

    def take(self, name: str) -> Any | None:
        """Remove a model's weights and hand them over (to be loaded); None if not cached."""
        entry = self._entries.pop(name, None)
        if entry is None:
            return None
        self.used_bytes -= entry.nbytes
        return entry.payload

    def discard(self, name: str) -> None:
        self.take(name)
