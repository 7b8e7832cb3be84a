"""Forking a live scheduler: an exact, independent copy of its state (requests, queues, KV manager,
policy state such as VTC counters) that a SimEngine can run forward, for completion estimates or
what-if questions, while the original serves on untouched.

The copy is copy.deepcopy of the scheduler, with its bulky parts copied by hand into deepcopy's memo
first: the requests (a new token list each; prompt, spec and sampling params are never mutated, so
they are shared) and the KV pool's blocks and block tables (deepcopy's generic path costs ~10 us a
block). Everything else goes through deepcopy, so state added to those classes later is copied too.
Measured (2-core dev machine, Python 3.11): ~5 ms for a 5,000-block pool, 2,200 of them in use,
with 64 running requests and 200 waiting (a plain deepcopy of the scheduler: ~135 ms).

The runner's bookkeeping is cleared in the copy, so a fresh SimExecutor learns every running request
as new, with its num_computed_tokens, from the copy's first schedule(). With `elapsed`, policies that
read a clock (rate limits, idle-client memory) read, in the copy, their clock at the fork plus
`elapsed()`: time passes for them as the simulation's does.
"""

from __future__ import annotations

import copy
import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterator

from sutra.core.kv_cache import KVBlock, KVCacheManager
from sutra.core.policies import Policy
from sutra.core.request import Request
from sutra.core.scheduler import Scheduler

Clock = Callable[[], float]


def fork_scheduler(scheduler: Scheduler, elapsed: Clock | None = None) -> Scheduler:
    """An exact copy of `scheduler` sharing no mutable state with it, its runner bookkeeping cleared."""
    memo: dict[int, object] = {}
    for request in scheduler.requests.values():
        memo[id(request)] = _copy_request(request)
    _memo_kv(scheduler.kv, memo)
    for policy in _policies(scheduler.policy):
        _memo_policy(policy, memo, elapsed)
    forked = copy.deepcopy(scheduler, memo)
    forked._runner_blocks.clear()
    forked._finished_for_runner.clear()
    return forked


def _copy_request(request: Request) -> Request:
    forked = object.__new__(type(request))
    forked.__dict__.update(request.__dict__)
    forked.token_ids = list(request.token_ids)  # the only container the scheduler mutates
    return forked


def _memo_kv(kv: KVCacheManager, memo: dict[int, object]) -> None:
    """Blocks, the free queue, the prefix-cache map and the tables, copied directly."""
    pool = kv.pool
    blocks = [KVBlock(b.block_id, b.ref_count, b.block_hash) for b in pool.blocks]
    memo.update(zip(map(id, pool.blocks), blocks, strict=True))
    memo[id(pool.blocks)] = blocks
    memo[id(pool._free)] = OrderedDict((i, blocks[i]) for i in pool._free)
    memo[id(pool._cached)] = {h: blocks[b.block_id] for h, b in pool._cached.items()}
    memo[id(kv._tables)] = {rid: [blocks[b.block_id] for b in t] for rid, t in kv._tables.items()}
    memo[id(kv._hashes)] = {rid: list(h) for rid, h in kv._hashes.items()}
    memo[id(kv._reserved)] = {i: blocks[i] for i in kv._reserved}


def _policies(policy: Policy) -> Iterator[Policy]:
    """The policy and the policies nested in it (a priority policy's per-class inner ones)."""
    yield policy
    for value in vars(policy).values():
        inner = value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]
        for item in inner:
            if isinstance(item, Policy):
                yield from _policies(item)


def _memo_policy(policy: Policy, memo: dict[int, object], elapsed: Clock | None) -> None:
    for value in vars(policy).values():
        if isinstance(value, itertools.count):
            # Copyable by deepcopy only up to Python 3.13; its repr is "count(n)" or "count(n, step)".
            memo[id(value)] = itertools.count(*(_number(x) for x in repr(value)[6:-1].split(",")))
    clock = vars(policy).get("clock")  # an attribute: its id is stable while deepcopy runs
    if elapsed is not None and callable(clock) and id(clock) not in memo:
        memo[id(clock)] = _shifted(clock(), elapsed)


def _number(text: str) -> int | float:
    text = text.strip()
    return float(text) if any(c in text for c in ".en") else int(text)


def _shifted(start: float, elapsed: Clock) -> Clock:
    return lambda: start + elapsed()
