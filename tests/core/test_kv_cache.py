"""KV block accounting: every block returns to the pool after any mix of finish/abort/preempt."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
from collections import Counter

import pytest

from sutra.core.kv_cache import BlockPool, KVCacheManager, hash_block, prefix_cache_root
from sutra.core.request import RequestStatus
from tests.core.fake_runner import FakeRunner, make_request, make_scheduler, step


def test_pool_take_share_release():
    pool = BlockPool(4)
    a, b = pool.take(2)
    assert pool.num_free_blocks == 2 and a.ref_count == 1
    pool.share(a)
    pool.release(a)
    assert pool.num_free_blocks == 2
    pool.release(a)
    pool.release(b)
    assert pool.num_free_blocks == 4


def test_cached_blocks_are_evicted_lru():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    first = make_request(tokens=[1, 2, 3, 4, 5])
    assert kv.allocate(first, 5)
    first_blocks = kv.block_ids(first.request_id)
    first.num_computed_tokens = 5  # the step ran
    kv.free(first)
    assert kv.pool.num_cached_blocks == 2  # two full blocks published, all blocks free again
    assert kv.num_free_blocks == 4
    # A request with the same prefix finds the very blocks the first one wrote, in order.
    again = make_request(tokens=[1, 2, 3, 4, 9])
    hits = kv.find_cached_prefix(again)
    assert [b.block_id for b in hits] == first_blocks[:2]
    # Filling the pool with unrelated tokens evicts the cached blocks.
    other = make_request(tokens=[7, 8, 9, 10, 11, 12, 13, 14])
    assert kv.allocate(other, 8)
    assert kv.pool.num_cached_blocks == 4 and kv.find_cached_prefix(again) == []


def test_blocks_of_a_slice_that_never_ran_are_not_cached():
    """Preempted in the iteration that allocated its slice, a request never writes those blocks."""
    kv = KVCacheManager(num_blocks=8, block_size=2)
    victim = make_request(tokens=[1, 2, 3, 4, 5, 6, 7])
    assert kv.allocate(victim, 4)
    victim.num_computed_tokens = 4  # first slice computed: blocks [1,2] and [3,4] hold KV
    assert kv.allocate(victim, 3)  # second slice allocated and published ...
    assert kv.pool.num_cached_blocks == 3
    kv.free(victim)  # ... then preempted before it ran
    twin = make_request(tokens=[1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert len(kv.find_cached_prefix(twin)) == 2  # [5,6] was never written: no hit on it
    assert kv.pool.num_cached_blocks == 2 and kv.num_free_blocks == 8


def test_chained_hash_depends_on_prefix():
    kv = KVCacheManager(num_blocks=8, block_size=2)
    a = make_request(tokens=[1, 2, 3, 4, 5])
    kv.allocate(a, 5)
    # Same second block, different first block: no hit at all.
    b = make_request(tokens=[9, 9, 3, 4, 5])
    assert kv.find_cached_prefix(b) == []


def test_allocation_failure_changes_nothing():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    r = make_request(prompt_len=20)
    assert not kv.allocate(r, 20)
    assert kv.num_free_blocks == 2 and kv.block_ids(r.request_id) == []


def test_random_mix_returns_every_block():
    rng = random.Random(0)
    scheduler, runner = make_scheduler(num_blocks=40, block_size=8, budget=64, max_seqs=16), FakeRunner()
    shared = list(range(500, 532))
    reqs = []
    for _ in range(400):
        if rng.random() < 0.3 and len(reqs) < 60:
            prefix = shared if rng.random() < 0.5 else []
            r = make_request(
                tokens=prefix + [rng.randrange(10, 900) for _ in range(rng.randrange(1, 60))],
                max_tokens=rng.randrange(1, 30),
            )
            scheduler.add_request(r)
            reqs.append(r)
        live = [r for r in reqs if not r.status.finished]
        if live and rng.random() < 0.1:
            scheduler.abort_requests([rng.choice(live).request_id])
        step(scheduler, runner)
        kv = scheduler.kv
        held = Counter(b for r in scheduler.running for b in kv.block_ids(r.request_id))
        assert kv.num_free_blocks + len(held) == 40
        # Each block's reference count is exactly the number of running requests whose table holds it.
        assert all(block.ref_count == held.get(block.block_id, 0) for block in kv.pool.blocks)
    while scheduler.has_unfinished_requests():
        step(scheduler, runner)
    assert scheduler.num_preemptions > 0, "the mix should exercise preemption"
    assert any(r.status is RequestStatus.FINISHED_ABORTED for r in reqs)
    assert any(r.num_cached_tokens > 0 for r in reqs)
    assert scheduler.kv.num_free_blocks == 40
    assert all(b.ref_count == 0 for b in scheduler.kv.pool.blocks)


# ---- block hashes: stable, cryptographic, per model, per salt ---------------------------------------


def test_block_hash_is_sha256_of_parent_and_little_endian_token_ids():
    """The format is fixed, so other processes, machines and versions compute the same keys."""
    root = prefix_cache_root("model-a", "torch.bfloat16", 16)
    expected = hashlib.sha256(root + b"".join(t.to_bytes(8, "little") for t in [5, 70000, 1])).digest()
    assert hash_block(root, [5, 70000, 1]) == expected


_HASHES_IN_A_CHILD = """
import sys
from sutra.core.kv_cache import KVCacheManager
from sutra.core.request import Request, RequestSpec
from sutra.sampling_params import SamplingParams
kv = KVCacheManager(num_blocks=8, block_size=2)
r = Request("r", [1, 2, 3, 4, 5], SamplingParams(), spec=RequestSpec(cache_salt=sys.argv[1] or None))
kv.allocate(r, 5)
print(",".join(kv.pool.blocks[b].block_hash.hex() for b in kv.block_ids("r")[:2]))
"""


@pytest.mark.parametrize("salt", ["", "tenant-a"])
def test_block_hashes_are_the_same_in_every_process(salt: str):
    """Python's hash() chained from hash(None) differs between processes before Python 3.12; two
    instances must agree on block keys to compare caches."""
    kv = KVCacheManager(num_blocks=8, block_size=2)
    r = make_request(tokens=[1, 2, 3, 4, 5], cache_salt=salt or None)
    kv.allocate(r, 5)
    here = ",".join(kv.pool.blocks[b].block_hash.hex() for b in kv.block_ids(r.request_id)[:2])
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        child = subprocess.run(
            [sys.executable, "-c", _HASHES_IN_A_CHILD, salt],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        assert child.stdout.strip() == here


def test_different_models_never_share_blocks():
    a = KVCacheManager(num_blocks=8, block_size=2, hash_root=prefix_cache_root("model-a", "bf16", 2))
    b = KVCacheManager(num_blocks=8, block_size=2, hash_root=prefix_cache_root("model-b", "bf16", 2))
    ra, rb = make_request(tokens=[1, 2, 3, 4, 5]), make_request(tokens=[1, 2, 3, 4, 5])
    a.allocate(ra, 5)
    b.allocate(rb, 5)
    assert not {blk.block_hash for blk in a.pool.blocks} & {blk.block_hash for blk in b.pool.blocks} - {None}


def test_cache_salt_separates_tenants():
    kv = KVCacheManager(num_blocks=16, block_size=2)
    writer = make_request(tokens=[1, 2, 3, 4, 5], cache_salt="tenant-a")
    assert kv.allocate(writer, 5)
    writer.num_computed_tokens = 5
    kv.free(writer)
    assert len(kv.find_cached_prefix(make_request(tokens=[1, 2, 3, 4, 9], cache_salt="tenant-a"))) == 2
    assert kv.find_cached_prefix(make_request(tokens=[1, 2, 3, 4, 9], cache_salt="tenant-b")) == []
    assert kv.find_cached_prefix(make_request(tokens=[1, 2, 3, 4, 9])) == []  # unsalted
