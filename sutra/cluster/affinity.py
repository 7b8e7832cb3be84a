"""Prefix affinity: send a prompt to the instance that last served its longest known prefix, where
that prefix's KV is likely still in the prefix cache.

The front end remembers, for each prompt it dispatched, the chained block hashes of its full blocks
(the same SHA-256 chain the KV cache keys its blocks by, salted by `cache_salt`, so tenants with
different salts never steer each other) and the instance that took it, in a bounded LRU map. A
load-aware policy then prefers the instance holding the longest matching prefix, as long as that
instance has room (positive freeness once its pending requests are counted); otherwise the load
decides. Without this, two requests with one long shared prefix land on different instances under
least-load dispatch, and neither reuses the other's KV.
"""

from __future__ import annotations

from collections import OrderedDict

from sutra.core.kv_cache import hash_block, prefix_cache_root, salted_root

MAX_ENTRIES = 65_536  # prefix hashes remembered (~100 bytes each)
MAX_BLOCKS = 64  # the first blocks of a prompt that are hashed (a 1K-token prefix at 16 tokens a block)
_ROOT = prefix_cache_root("cluster-affinity")


def prefix_hashes(prompt: list[int], block_size: int, cache_salt: str | None) -> list[bytes]:
    """Chained hashes of the prompt's full blocks (at most MAX_BLOCKS), shortest prefix first."""
    hashes: list[bytes] = []
    parent = salted_root(_ROOT, cache_salt)
    for i in range(min(len(prompt) // block_size, MAX_BLOCKS)):
        parent = hash_block(parent, prompt[i * block_size : (i + 1) * block_size])
        hashes.append(parent)
    return hashes


class PrefixAffinity:
    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._owner: OrderedDict[bytes, str] = OrderedDict()

    def lookup(self, hashes: list[bytes]) -> str | None:
        """The instance that took the longest of these prefixes most recently, if any."""
        for block_hash in reversed(hashes):
            owner = self._owner.get(block_hash)
            if owner is not None:
                return owner
        return None

    def record(self, hashes: list[bytes], instance_id: str) -> None:
        for block_hash in hashes:
            self._owner[block_hash] = instance_id
            self._owner.move_to_end(block_hash)
        while len(self._owner) > self.max_entries:
            self._owner.popitem(last=False)

    def forget(self, instance_id: str) -> None:
        """The instance is gone: its cache with it."""
        for block_hash in [h for h, owner in self._owner.items() if owner == instance_id]:
            del self._owner[block_hash]

    def __len__(self) -> int:
        return len(self._owner)
