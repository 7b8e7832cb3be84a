"""Paged KV block manager: a block pool with reference counts, per-request block tables and an
automatic prefix cache keyed by chained block hashes, with LRU eviction of unreferenced cached blocks.

Block hashes are SHA-256, chained from a root that names the model (its fingerprint, dtype and block
size), and from the request's `cache_salt` if it has one: they are the same in every process and on
every machine (instances can compare them), a collision is not a practical concern (unlike Python's
`hash`), and requests with different salts never share a block, so one tenant cannot learn another's
prompts from cache hits.

It tracks block ids only; the tensors live with the model runner. A request's KV can therefore be
exported and imported by block id (`block_ids`), which migration, hand-off and offload build on.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sutra.core.request import Request


@dataclass(eq=False)
class KVBlock:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None  # set once the block is full and registered in the prefix cache


def prefix_cache_root(model_fingerprint: str = "", dtype: str = "", block_size: int = 0) -> bytes:
    """The hash every request's chain starts from: KV is only reusable for the same model and dtype."""
    return hashlib.sha256(f"sutra-prefix-cache/1|{model_fingerprint}|{dtype}|{block_size}".encode()).digest()


def salted_root(root: bytes, cache_salt: str | None) -> bytes:
    """Requests with different salts start different chains, so they never share a block."""
    if cache_salt is None:
        return root
    return hashlib.sha256(root + b"|salt|" + cache_salt.encode("utf-8", "surrogatepass")).digest()


_TOKEN_PACKERS: dict[int, struct.Struct] = {}  # by block length: one compiled format each


def hash_block(parent_hash: bytes, token_ids: list[int]) -> bytes:
    """Chained hash: a block's identity covers every token before it (and the root), not only its own."""
    packer = _TOKEN_PACKERS.get(len(token_ids))
    if packer is None:
        packer = _TOKEN_PACKERS[len(token_ids)] = struct.Struct(f"<{len(token_ids)}q")
    return hashlib.sha256(parent_hash + packer.pack(*token_ids)).digest()


class BlockPool:
    """All blocks, the free queue (LRU order: evict from the front) and the hash -> block map."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # Unreferenced blocks, cached or not. Freed blocks go to the back, so the least recently
        # used cached blocks are reused (evicted) first.
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[bytes, KVBlock] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def lookup(self, block_hash: bytes) -> KVBlock | None:
        return self._cached.get(block_hash)

    def take(self, n: int) -> list[KVBlock]:
        """n fresh blocks from the front of the free queue, evicting their cached contents."""
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} blocks, {len(self._free)} free")
        taken = []
        for _ in range(n):
            _, block = self._free.popitem(last=False)
            if block.block_hash is not None:
                del self._cached[block.block_hash]
                block.block_hash = None
            block.ref_count = 1
            taken.append(block)
        return taken

    def share(self, block: KVBlock) -> None:
        if block.ref_count == 0:
            del self._free[block.block_id]
        block.ref_count += 1

    def release(self, block: KVBlock) -> None:
        block.ref_count -= 1
        if block.ref_count < 0:
            raise RuntimeError(f"block {block.block_id} released more often than taken")
        if block.ref_count == 0:
            self._free[block.block_id] = block

    def register(self, block: KVBlock, block_hash: bytes) -> None:
        """Publish a full block in the prefix cache (first writer wins for a duplicate hash)."""
        if block.block_hash is None and block_hash not in self._cached:
            block.block_hash = block_hash
            self._cached[block_hash] = block

    def unregister(self, block: KVBlock) -> None:
        """Withdraw a block from the prefix cache (its KV will never be written)."""
        if block.block_hash is not None and self._cached.get(block.block_hash) is block:
            del self._cached[block.block_hash]
        block.block_hash = None

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)


class KVCacheManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        hash_root: bytes | None = None,  # prefix_cache_root(...) of the model; a generic one if None
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.hash_root = hash_root if hash_root is not None else prefix_cache_root(block_size=block_size)
        self.pool = BlockPool(num_blocks)
        self._tables: dict[str, list[KVBlock]] = {}
        self._hashes: dict[str, list[bytes]] = {}  # chained hashes of the request's full blocks
        self._num_registered: dict[str, int] = {}  # how many of those are published in the cache
        self._room: dict[str, int] = {}  # tokens a request reaches before allocate() has work to do
        self._reserved: dict[int, KVBlock] = {}  # blocks held for KV arriving from another instance
        self.prefix_queries = 0  # tokens of admitted requests looked up in the prefix cache
        self.prefix_hits = 0  # of which found

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return 1.0 - self.pool.num_free_blocks / self.pool.num_blocks

    def block_ids(self, request_id: str, start: int = 0) -> list[int]:
        """The request's block ids from its `start`-th block on."""
        return [b.block_id for b in self._tables.get(request_id, [])[start:]]

    def num_request_blocks(self, request_id: str) -> int:
        return len(self._tables.get(request_id, ()))

    @property
    def block_tables(self) -> Mapping[str, Sequence[KVBlock]]:
        """Every request's blocks (read only), for a loop over a whole batch without a call each."""
        return self._tables

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _full_block_hashes(self, request: Request, num_tokens: int) -> tuple[list[bytes], int]:
        """The request's memoised chained block hashes, extended to cover its full blocks within the
        first num_tokens tokens, and how many blocks that is (the memo may hold more)."""
        hashes = self._hashes.get(request.request_id)
        if hashes is None:
            hashes = self._hashes[request.request_id] = []
        bs = self.block_size
        num_full = num_tokens // bs
        if len(hashes) < num_full:
            tokens = request.token_ids
            parent = hashes[-1] if hashes else salted_root(self.hash_root, request.cache_salt)
            for i in range(len(hashes), num_full):
                parent = hash_block(parent, tokens[i * bs : (i + 1) * bs])
                hashes.append(parent)
        return hashes, num_full

    def find_cached_prefix(self, request: Request) -> list[KVBlock]:
        """The longest run of cached blocks matching the request's tokens. At least one token is
        always left to compute, so the last block of a fully cached prompt is not reused. A request
        that needs every prompt position's hidden state takes no hits (a cached block has none)."""
        if not self.enable_prefix_caching or request.sampling_params.needs_every_prompt_state:
            return []
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVBlock] = []
        hashes, num_full = self._full_block_hashes(request, max_blocks * self.block_size)
        for block_hash in hashes[:num_full]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    def record_prefix_lookup(self, num_tokens: int, num_cached: int) -> None:
        """Count an admitted request's prompt against the prefix cache's hit rate."""
        self.prefix_queries += num_tokens
        self.prefix_hits += num_cached

    def can_fit(self, num_tokens: int, cached: list[KVBlock] = ()) -> bool:
        """Whether a new request with this many tokens could get all its blocks now."""
        reusable_free = sum(1 for b in cached if b.ref_count == 0)
        return self.blocks_needed(num_tokens) - len(cached) <= self.num_free_blocks - reusable_free

    def allocate(self, request: Request, num_new_tokens: int, cached: list[KVBlock] = ()) -> bool:
        """Give the request blocks for num_new_tokens more tokens; False (and no change) if short.
        `cached` are prefix-cache hits for a request that has no blocks yet."""
        rid = request.request_id
        total = request.num_computed_tokens + num_new_tokens
        if not cached and total <= self._room.get(rid, 0):
            return True  # most decode steps: the last block has room and no block fills up to publish
        bs = self.block_size
        table = self._tables.get(rid)
        new_blocks = -(-total // bs) - (len(table) if table is not None else 0) - len(cached)
        if new_blocks > 0 or cached:  # else there is only a full block to publish: nothing to fall short of
            reusable_free = sum(1 for b in cached if b.ref_count == 0) if cached else 0
            if new_blocks > self.pool.num_free_blocks - reusable_free:
                return False
            for block in cached:
                self.pool.share(block)
        if table is None:
            table = self._tables[rid] = []
        table.extend(cached)
        if new_blocks > 0:
            table.extend(self.pool.take(new_blocks))
        num_registered = self._num_registered.get(rid, 0)
        if self.enable_prefix_caching and total // bs > num_registered:
            # Blocks filled by this step are published now: the step writes their KV before any
            # later step can read them.
            hashes, num_full = self._full_block_hashes(request, total)
            register = self.pool.register
            for i in range(num_registered, num_full):
                register(table[i], hashes[i])
            num_registered = self._num_registered[rid] = num_full
        self._update_room(rid, len(table), num_registered)
        return True

    def allocate_decodes(self, decodes: list[Request], start: int, stop: int) -> int:
        """allocate(request, 1) for each of decodes[start:stop] in order, up to the first that cannot
        get its blocks: that one's index, or stop if all could. Most decodes need nothing (their last
        block has room and none fills up): they cost a dict lookup, not a call."""
        room, allocate = self._room, self.allocate
        for i in range(start, stop):
            request = decodes[i]
            if request.num_computed_tokens >= room.get(request.request_id, 0) and not allocate(request, 1):
                return i
        return stop

    def _update_room(self, request_id: str, num_blocks: int, num_registered: int) -> None:
        """Record the most tokens the request can reach with no block to take and none to publish."""
        room = num_blocks * self.block_size
        if self.enable_prefix_caching:
            published = (num_registered + 1) * self.block_size - 1  # up to a full block to publish
            room = published if published < room else room  # min() without the builtin's call cost
        self._room[request_id] = room

    # ---- KV that is read or written outside a step (migration) ----------------------------------
    def pin(self, block_ids: list[int]) -> None:
        """Keep blocks from being freed and reused while their KV is read off the step thread."""
        for block_id in block_ids:
            self.pool.share(self.pool.blocks[block_id])

    def unpin(self, block_ids: list[int]) -> None:
        for block_id in block_ids:
            self.pool.release(self.pool.blocks[block_id])

    # ---- KV that arrives from elsewhere (migration, hand-off) -----------------------------------
    def reserve(self, num_blocks: int) -> list[int] | None:
        """Hold num_blocks fresh blocks for incoming KV; None (and nothing held) if too few are free."""
        if num_blocks > self.num_free_blocks:
            return None
        blocks = self.pool.take(num_blocks)
        self._reserved.update((b.block_id, b) for b in blocks)
        return [b.block_id for b in blocks]

    def release_reserved(self, block_ids: list[int]) -> None:
        """Give back reserved blocks whose request never arrived (an aborted migration)."""
        for block_id in block_ids:
            self.pool.release(self._reserved.pop(block_id))

    @property
    def num_reserved_blocks(self) -> int:
        return len(self._reserved)

    def adopt(self, request: Request, block_ids: list[int]) -> None:
        """Make reserved blocks, now holding the KV of the request's first num_computed_tokens tokens
        in order, its block table; its full blocks join the prefix cache (their KV is written)."""
        if request.request_id in self._tables:
            raise ValueError(f"request {request.request_id!r} already has KV blocks here")
        if self.blocks_needed(request.num_computed_tokens) > len(block_ids):
            raise ValueError(
                f"{len(block_ids)} blocks cannot hold the KV of {request.num_computed_tokens} tokens"
            )
        missing = [b for b in block_ids if b not in self._reserved]
        if missing:
            raise ValueError(f"blocks {missing} were not reserved")
        table = self._tables[request.request_id] = [self._reserved.pop(b) for b in block_ids]
        num_full = 0
        if self.enable_prefix_caching:
            hashes, num_full = self._full_block_hashes(request, request.num_computed_tokens)
            for i in range(num_full):
                self.pool.register(table[i], hashes[i])
            self._num_registered[request.request_id] = num_full
        self._update_room(request.request_id, len(table), num_full)

    def free(self, request: Request) -> None:
        """Return a request's blocks; tail first, so a shared prefix outlives its private suffix."""
        table = self._tables.pop(request.request_id, [])
        # A request preempted after its slice was allocated in this iteration never computes that
        # slice: blocks published for it hold no KV and must not serve later prefix hits.
        for block in table[request.num_computed_tokens // self.block_size :]:
            self.pool.unregister(block)
        for block in reversed(table):
            self.pool.release(block)
        self._hashes.pop(request.request_id, None)
        self._num_registered.pop(request.request_id, None)
        self._room.pop(request.request_id, None)
